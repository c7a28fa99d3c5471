"""The fast paths (precision, compiled step, CUDA-graph replay) against the plain path."""
import dataclasses
import warnings

import pytest
import torch

from elucd_fast.engine import (AutocastModule, CompiledStepRunner, CUDAGraphStepRunner, apply_precision,
                               make_step_runner, resolve_compile, resolve_precision)
from elucd_fast.engine.cuda_graph import CudaGraphAPI
from elucd_fast.engine.precision import (BF16_MIN_STEP_FLOPS, DIGITS_QUALITY, auto_precision, bf16_quality_equal,
                                         hardware_bf16)
from elucd_fast.guidance import ClassifierGuidance
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers.ddpm import ddpm_sampler
from elucd_fast.samplers.edm import edm_sampler
from tiny_models import TinyClassifier, TinyEDMNet, TinyEpsModel, rel_err

SEEDS = [11, 12, 13]


def _edm_run(step_runner=None, num_steps=4, net=None, guide=None, seeds=SEEDS, shape=(3, 8, 8)):
    net = net or TinyEDMNet()
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([len(seeds), *shape])
    labels = rnd.randint(10, size=[len(seeds)])
    guide = guide or ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.0)
    return edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=num_steps, guidance=guide,
                       max_guidance=0.05, add_factor=0.3, S_churn=10, step_runner=step_runner)


def test_resolve_precision():
    assert resolve_precision("fp32").network_dtype is None
    fp64 = resolve_precision("fp64")
    assert fp64.state_dtype == torch.float64 and fp64.network_dtype is None and not fp64.fast_layers
    auto = resolve_precision("auto")  # no job cost given: the safe choice
    assert auto.name == "fp32" and "auto" in auto.reason
    big = resolve_precision("auto", step_flops=10 * BF16_MIN_STEP_FLOPS)
    assert big.name == ("bf16" if hardware_bf16("cpu") else "fp32")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8")
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_auto_precision_rule():
    """bf16 exactly where the hardware has it, the digits check passed and the job is large."""
    large, small = 2 * BF16_MIN_STEP_FLOPS, BF16_MIN_STEP_FLOPS / 2
    name, reason = auto_precision("cpu", large, bf16_hardware=True)
    assert name == "bf16" and "GFLOP per image per step" in reason and "digits" in reason
    assert auto_precision("cpu", BF16_MIN_STEP_FLOPS, bf16_hardware=True)[0] == "bf16"
    name, reason = auto_precision("cpu", small, bf16_hardware=True)
    assert name == "fp32" and "too small" in reason
    name, reason = auto_precision("cpu", None, bf16_hardware=True)
    assert name == "fp32" and "unknown" in reason
    name, reason = auto_precision("cpu", large, bf16_hardware=False)
    assert name == "fp32" and "AVX512-BF16" in reason
    name, reason = auto_precision("cuda", large, bf16_hardware=False)
    assert name == "fp32" and "fp16" in reason
    assert auto_precision("cuda", large, bf16_hardware=True)[0] == "bf16"
    worse = {"fp32": (0.988, 18.5), "bf16": (0.980, 18.5)}
    name, reason = auto_precision("cpu", large, bf16_hardware=True, quality=worse)
    assert name == "fp32" and "differs" in reason
    assert not bf16_quality_equal({"fp32": (0.99, 18.0), "bf16": (0.99, 21.5)})
    assert bf16_quality_equal(DIGITS_QUALITY), "the recorded digits check must pass for auto to pick bf16"
    assert "not yet validated" not in reason


def test_step_flops_per_image_counts_one_step():
    from elucd_fast.engine.cost import step_flops_per_image
    from elucd_fast.job import Job
    from elucd_fast.samplers import EDMSettings

    net, guide = TinyEDMNet(), ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    flops = {}
    for steps in (3, 6):
        job = Job(net, guide, EDMSettings(num_steps=steps, max_guidance=0.05), (3, 8, 8), 10)
        flops[steps] = step_flops_per_image(job)
    unguided = step_flops_per_image(Job(net, None, EDMSettings(num_steps=3), (3, 8, 8), 10))
    assert flops[3] == flops[6] > unguided > 0  # one step whatever the run's length; guidance adds


@pytest.mark.skipif(not hardware_bf16("cpu"), reason="this CPU has no bf16 hardware (AMX or AVX512-BF16)")
def test_bf16_networks_close_to_fp32_on_odd_shapes():
    torch.manual_seed(0)
    policy = resolve_precision("bf16", "cpu")
    net = TinyEDMNet(channels=3, resolution=13)
    fast = apply_precision(net, policy, "cpu")
    assert isinstance(fast, AutocastModule) and fast.sigma_min == net.sigma_min and fast.label_dim == 10
    x = torch.randn(5, 3, 13, 11)
    labels = torch.nn.functional.one_hot(torch.arange(5), 10).float()
    with torch.no_grad():
        err = rel_err(fast(x, torch.tensor(1.7), labels), net(x, torch.tensor(1.7), labels))
    print(f"bf16 denoiser relative error {err:.2e}")
    assert 0 < err < 3e-2
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    guide_fast = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    guide_fast.classifier = apply_precision(guide_fast.classifier, policy, "cpu")
    y = torch.tensor([0, 1, 2, 3, 4])
    g_ref, j_ref = guide(x, y)
    g_fast, j_fast = guide_fast(x, y)
    assert g_fast.dtype == torch.float32 and j_fast.dtype == torch.float32
    err_g, err_j = rel_err(g_fast, g_ref), rel_err(j_fast, j_ref)
    print(f"bf16 guidance gradient relative error {err_g:.2e}, J {err_j:.2e}")
    assert err_g < 5e-2 and err_j < 2e-2


def test_compiled_step_equals_eager_aot_eager():
    torch._dynamo.reset()
    eager = _edm_run()
    runner = CompiledStepRunner(backend="aot_eager")
    compiled = _edm_run(runner)
    assert rel_err(compiled, eager) < 1e-6
    assert runner.graphs == 2 and runner.compile_seconds > 0


def test_no_recompilation_across_steps():
    """Per-step values are tensors: the number of compiled variants does not grow with steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runner = CompiledStepRunner(backend="aot_eager")
    _edm_run(runner, num_steps=3)
    graphs_3 = counters["stats"]["unique_graphs"]
    _edm_run(runner, num_steps=7)
    assert counters["stats"]["unique_graphs"] == graphs_3 == 2
    assert runner.graphs == 2


def test_compiled_ddpm_step_equals_eager():
    torch._dynamo.reset()
    rnd = StackedRandomGenerator("cpu", SEEDS)
    noise, labels = rnd.randn([3, 3, 8, 8]), rnd.randint(10, size=[3])
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.5)
    kw = dict(num_timesteps=100, timestep_respacing="6", guidance=guide, gamma_factor=0.3, classifier_scale=5.0)
    eager = ddpm_sampler(TinyEpsModel(), noise, labels, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like, **kw)
    runner = CompiledStepRunner(backend="aot_eager")
    compiled = ddpm_sampler(TinyEpsModel(), noise, labels, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like,
                            step_runner=runner, **kw)
    assert rel_err(compiled, eager) < 1e-6 and runner.graphs == 2


@pytest.mark.slow
def test_compiled_step_equals_eager_inductor():
    """Inductor code generation on a tiny net (about a minute on 2 cores)."""
    torch._dynamo.reset()
    eager = _edm_run(num_steps=3, shape=(3, 7, 9))
    compiled = _edm_run(CompiledStepRunner(backend="inductor"), num_steps=3, shape=(3, 7, 9))
    err = rel_err(compiled, eager)
    print(f"inductor vs eager relative error {err:.2e}")
    assert err < 1e-4


def test_resolve_compile():
    assert resolve_compile("on", num_images=10, device="cpu")[0] is True
    assert resolve_compile("off", num_images=10**6, device="cpu")[0] is False
    on, reason = resolve_compile("auto", num_images=50000, device="cpu")
    assert on is False and "CPU" in reason
    with pytest.raises(ValueError, match="compile"):
        resolve_compile("maybe", num_images=1, device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs"):
        make_step_runner(cuda_graphs=True, device="cpu")


class FakeGraph:
    """Replays the captured call into the same output buffers, as a CUDA graph does."""

    def __init__(self):
        self.fn = self.outputs = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        fresh = self.fn()
        for static, new in zip(torch.utils._pytree.tree_leaves(self.outputs), torch.utils._pytree.tree_leaves(fresh)):
            if isinstance(static, torch.Tensor):
                static.copy_(new)


class FakeCudaGraphAPI(CudaGraphAPI):
    def __init__(self, fail=False):
        self.fail = fail
        self.graphs = []

    def new_graph(self):
        self.graphs.append(FakeGraph())
        return self.graphs[-1]

    def capture(self, graph, pool, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph.fn = fn
        graph.outputs = fn()
        return graph.outputs

    def side_stream(self):
        import contextlib
        return contextlib.nullcontext(), None

    def join(self, stream):
        pass

    def pool_of(self, graph):
        return "pool"


def test_cuda_graph_runner_replays_equal_to_eager():
    eager = _edm_run(num_steps=5)
    api = FakeCudaGraphAPI()
    runner = CUDAGraphStepRunner(api=api)
    replayed = _edm_run(runner, num_steps=5)
    assert torch.equal(replayed, eager)
    assert len(api.graphs) == 2 and sum(g.replays for g in api.graphs) == 5  # 4 Heun steps + the last


def test_cuda_graph_runner_falls_back_with_a_message():
    eager = _edm_run(num_steps=4)
    runner = CUDAGraphStepRunner(api=FakeCudaGraphAPI(fail=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _edm_run(runner, num_steps=4)
    assert torch.equal(out, eager)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("capture of step variant" in m and "not permitted" in m for m in messages)
    assert len(runner.fallbacks) == 2


@pytest.mark.cuda
def test_cuda_graph_on_gpu_equals_eager():
    device = "cuda"
    net = TinyEDMNet().to(device)
    guide = ClassifierGuidance(TinyClassifier().to(device), softplus_beta=3.0)
    rnd = StackedRandomGenerator(device, SEEDS)
    latents, labels = rnd.randn([3, 3, 8, 8], device=device), rnd.randint(10, size=[3], device=device)
    kw = dict(num_steps=6, guidance=guide, max_guidance=0.05)
    eager = edm_sampler(net, latents, labels, randn_like=StackedRandomGenerator(device, SEEDS).randn_like, **kw)
    runner = CUDAGraphStepRunner()
    graphed = edm_sampler(net, latents, labels, randn_like=StackedRandomGenerator(device, SEEDS).randn_like,
                          step_runner=runner, **kw)
    assert not runner.fallbacks and rel_err(graphed, eager) < 1e-5


def test_bf16_edm_preconditioner_keeps_float32_preconditioning():
    from elucd_fast.models.edm_networks import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]).eval()
    # EDM zero-initialises the output layer; random weights everywhere make the backbone count.
    for p in net.parameters():
        if p.ndim > 1:
            torch.nn.init.kaiming_normal_(p)
    fast = apply_precision(net, resolve_precision("bf16", "cpu"), "cpu")
    assert isinstance(fast.model, AutocastModule) and not isinstance(net.model, AutocastModule)
    x = torch.randn(3, 3, 8, 8)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 10).float()
    with torch.no_grad():
        out, ref = fast(x, torch.tensor(0.7), labels), net(x, torch.tensor(0.7), labels)
    assert out.dtype == torch.float32
    err = rel_err(out, ref)
    print(f"bf16 EDMPrecond(SongUNet) relative error {err:.2e}")
    assert 0 < err < 3e-2


def _random_edm_net(**unet):
    from elucd_fast.models.edm_networks import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_type="DhariwalUNet", **unet).eval()
    # EDM zero-initialises each block's last layers; random weights everywhere make them count.
    for p in net.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
    return net.requires_grad_(False)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_fused_attention_block_equals_edm_block(layout):
    from elucd_fast.engine.edm_layers import fast_edm_backbone
    from elucd_fast.models.edm_networks import UNetBlock

    torch.manual_seed(0)
    block = UNetBlock(in_channels=12, out_channels=16, emb_channels=8, attention=True, num_heads=2).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    holder = torch.nn.ModuleDict({"block": block})
    fast = fast_edm_backbone(holder)["block"]
    assert type(fast).__name__ == "FusedAttentionUNetBlock" and type(block) is UNetBlock
    x = torch.randn(3, 12, 5, 7).contiguous(memory_format=layout)  # odd, non-square positions
    emb = torch.randn(3, 8)
    with torch.no_grad():
        out, ref = fast(x, emb), block(x, emb)
    assert out.is_contiguous(memory_format=layout)
    err = rel_err(out, ref)
    print(f"fused attention vs EDM's attention ({layout}): relative error {err:.2e}")
    assert err < 1e-5


def test_nearest_upsampling_equals_edm_transposed_convolution_bitwise():
    from elucd_fast.engine.edm_layers import fast_edm_backbone
    from elucd_fast.models.edm_networks import Conv2d

    torch.manual_seed(0)
    layers = torch.nn.ModuleDict({f"k{k}": Conv2d(6, 6 if k == 0 else 4, kernel=k, up=True, init_bias=1)
                                  for k in (0, 1, 3)})
    layers["fused"] = Conv2d(6, 4, kernel=3, up=True, fused_resample=True)  # different numbers: kept
    fast = fast_edm_backbone(layers)
    assert type(fast["fused"]) is Conv2d and type(fast["k3"]).__name__ == "NearestUpsampledConv2d"
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 6, 5, 3).contiguous(memory_format=layout)
        with torch.no_grad():
            for name, layer in layers.items():
                assert torch.equal(fast[name](x), layer(x)), name
    assert all(type(m) is Conv2d and m.up for m in layers.values())  # the caller's layers untouched


def test_fast_edm_network_equals_plain_and_leaves_it_untouched():
    from elucd_fast.models.edm_networks import UNetBlock

    net = _random_edm_net(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fast = apply_precision(net, resolve_precision("fp32"), "cpu")
    kinds = {type(m).__name__ for m in fast.modules()}
    assert {"FusedAttentionUNetBlock", "NearestUpsampledConv2d"} <= kinds
    shared = {id(p) for p in net.parameters()}
    assert sum(id(p) not in shared for p in fast.parameters()) == 2 * sum(  # only the permuted qkv
        type(m).__name__ == "FusedAttentionUNetBlock" for m in fast.modules())
    x = torch.randn(3, 3, 8, 8)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4, 7]), 10).float()
    with torch.no_grad():
        err = rel_err(fast(x, torch.tensor(1.3), labels), net(x, torch.tensor(1.3), labels))
    print(f"fp32 fast EDM network vs plain: relative error {err:.2e}")
    assert 0 <= err < 1e-5
    assert all(type(m) is UNetBlock for m in net.modules() if isinstance(m, UNetBlock))
    assert all(torch.equal(v, state[k]) and v.dtype == state[k].dtype for k, v in net.state_dict().items())
    plain = apply_precision(net, resolve_precision("fp64"), "cpu")  # the authors' setting: plain networks
    assert plain is net


@pytest.mark.skipif(not hardware_bf16("cpu"), reason="this CPU has no bf16 hardware (AMX or AVX512-BF16)")
def test_bf16_fast_edm_network_close_to_fp32():
    net = _random_edm_net(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    fast = apply_precision(net, resolve_precision("bf16"), "cpu")
    convs = [m.weight for m in fast.modules() if type(m).__name__ == "Conv2d" and m.weight is not None]
    assert convs and all(w.dtype == torch.bfloat16 for w in convs)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    x = torch.randn(3, 3, 8, 8)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4, 7]), 10).float()
    with torch.no_grad():
        out = fast(x, torch.tensor(1.3), labels)
        err = rel_err(out, net(x, torch.tensor(1.3), labels))
    assert out.dtype == torch.float32
    print(f"bf16 fast EDM network (DhariwalUNet) vs fp32: relative error {err:.2e}")
    assert 0 < err < 3e-2


def test_fused_cpu_ops_equal_plain_ops():
    """The C++ fused step ops against the plain PyTorch ones over whole guided EDM runs."""
    from elucd_fast.engine import fused_ops

    ops, reason = fused_ops("cpu")
    if ops.guidance_update.__module__.endswith("guidance_update"):
        pytest.skip(f"C++ ops not built here: {reason}")
    assert "C++" in reason
    net = TinyEDMNet(channels=3, resolution=9, compute_dtype=torch.float64)
    seeds = [5, 6, 7, 8, 9]
    rnd = StackedRandomGenerator("cpu", seeds)
    latents, labels = rnd.randn([5, 3, 9, 9]), rnd.randint(10, size=[5])
    guide = ClassifierGuidance(TinyClassifier().double(), softplus_beta=3.0, marginal_temperature=0.0)
    for dtype, bound in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
        runs = [edm_sampler(net, latents, labels, randn_like=StackedRandomGenerator("cpu", seeds).randn_like,
                            num_steps=6, guidance=guide, max_guidance=0.05, add_factor=0.3, S_churn=10, dtype=dtype,
                            ops=step_ops) for step_ops in (None, ops)]
        err = rel_err(runs[1], runs[0])
        print(f"C++ fused step ops vs plain, {dtype}: relative error {err:.2e}")
        assert err < bound
    assert "off" in fused_ops("cpu", "off")[1]
    with pytest.raises(ValueError, match="fused"):
        fused_ops("cpu", "maybe")


def test_configure_job_applies_and_reports_choices():
    from elucd_fast.engine import configure_job
    from elucd_fast.job import Job

    from elucd_fast.samplers import DDPMSettings, EDMSettings

    job = Job(TinyEDMNet(), ClassifierGuidance(TinyClassifier(), softplus_beta=3.0),
              EDMSettings(num_steps=3, max_guidance=0.05), (3, 8, 8), 10, config={"preset": "tiny"})
    fast, messages = configure_job(job, precision="fp64", compile="off")
    assert fast.dtype == torch.float64 and fast.config["engine"]["precision"] == "fp64"
    assert any("precision: fp64" in m for m in messages) and job.dtype is None
    rnd = StackedRandomGenerator("cpu", [1, 2])
    out = fast.sample(rnd.randn([2, 3, 8, 8]), torch.tensor([3, 4]), rnd.randn_like)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="fused"):
        configure_job(dataclasses.replace(job, settings=DDPMSettings()), fused="on")
