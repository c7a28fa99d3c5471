"""The fast paths (precision, compiled step, CUDA-graph replay) against the plain path."""
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


@pytest.mark.parametrize("cpu_bf16", [True, False], indirect=True, ids=["bf16-cpu", "no-bf16-cpu"])
def test_resolve_precision(cpu_bf16):
    assert hardware_bf16("cpu") is cpu_bf16
    assert resolve_precision("fp32").network_dtype is None
    fp64 = resolve_precision("fp64")
    assert fp64.state_dtype == torch.float64 and fp64.network_dtype is None and not fp64.fast_layers
    auto = resolve_precision("auto")  # no job cost given: the safe choice
    assert auto.name == "fp32" and "auto" in auto.reason
    big = resolve_precision("auto", step_flops=10 * BF16_MIN_STEP_FLOPS)
    if cpu_bf16:
        assert big.name == "bf16" and "native bf16 on cpu" in big.reason
        assert resolve_precision("bf16", "cpu").network_dtype == torch.bfloat16
    else:
        assert big.name == "fp32" and "no AMX or AVX512-BF16" in big.reason
        with pytest.raises(ValueError, match="bf16 needs AMX/AVX512-BF16 .CPU. or sm80. .GPU.; cpu has neither"):
            resolve_precision("bf16", "cpu")
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


@pytest.mark.parametrize("cpu_bf16", [True], indirect=True)
def test_bf16_edm_preconditioner_keeps_float32_preconditioning(cpu_bf16):
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


def test_configure_job_applies_and_reports_choices():
    from elucd_fast.engine import configure_job
    from elucd_fast.job import Job

    from elucd_fast.samplers import EDMSettings

    job = Job(TinyEDMNet(), ClassifierGuidance(TinyClassifier(), softplus_beta=3.0),
              EDMSettings(num_steps=3, max_guidance=0.05), (3, 8, 8), 10, config={"preset": "tiny"})
    fast, messages = configure_job(job, precision="fp64", compile="off")
    assert fast.dtype == torch.float64 and fast.config["engine"]["precision"] == "fp64"
    assert any("precision: fp64" in m for m in messages) and job.dtype is None
    rnd = StackedRandomGenerator("cpu", [1, 2])
    out = fast.sample(rnd.randn([2, 3, 8, 8]), torch.tensor([3, 4]), rnd.randn_like)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert fast.config["engine"]["fused"] == "off"
    assert fast.config["engine"]["fused_pieces"] == dict.fromkeys(["edm_update", "softplus", "logit_grad"], "torch")
    with pytest.raises(ValueError, match="fused"):
        configure_job(job, fused="maybe")


@pytest.mark.parametrize("cpu_bf16", [True, False], indirect=True, ids=["bf16-cpu", "no-bf16-cpu"])
def test_configure_job_leaves_the_given_job_as_it_was(cpu_bf16):
    from elucd_fast.engine import configure_job
    from elucd_fast.job import Job
    from elucd_fast.samplers import EDMSettings

    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    classifier = guide.classifier
    job = Job(TinyEDMNet(), guide, EDMSettings(num_steps=3), (3, 8, 8), 10)
    if cpu_bf16:
        fast, _ = configure_job(job, precision="bf16")
        assert isinstance(fast.guidance.classifier, AutocastModule)
    else:
        with pytest.raises(ValueError, match="bf16 needs"):
            configure_job(job, precision="bf16")
    fast, _ = configure_job(job, fused="on")
    assert job.guidance is guide and guide.classifier is classifier and job.ops is None and "engine" not in job.config


# ------------------------------------------------------------------------------------------------
# Fused kernels: the engine's choice, and each kernel in production against its plain twin.


def cpp_built() -> bool:
    from elucd_fast.csrc import ops

    return ops.cpp_ops_available()


def triton_runs_here() -> bool:
    """Triton kernels take this machine's tensors: on a GPU, or in Triton's interpreter
    (TRITON_INTERPRET=1, set by conftest.py without one), where kernels chosen for "cuda" run
    on CPU tensors."""
    from elucd_fast import kernels

    return kernels.triton_available() and (torch.cuda.is_available() or kernels.triton_interpret_mode())


# Where the tensors of a run with the kernels for a kind of device live on this machine.
TENSORS_FOR = {"cpu": "cpu", "cuda": "cuda" if torch.cuda.is_available() else "cpu"}


def test_choose_fused_choices_messages_and_record():
    from elucd_fast.engine import choose_fused
    from elucd_fast.engine.fused import KERNELS

    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    off = choose_fused("cpu", "off", guidance=guide)
    assert off.step_ops is None
    assert off.implementations == dict.fromkeys(["edm_update", "softplus", "logit_grad"], "torch")
    assert off.messages == ("fused off (requested): edm_update, softplus, logit_grad run plain PyTorch",)
    for fused in ("auto", "on"):
        choice = choose_fused("cpu", fused, guidance=guide)
        assert len(choice.messages) == 3 and choice.make_softplus is None and choice.logit_grad is None
        assert "softplus runs plain PyTorch (no CPU kernel: a C++ softplus measured no faster" in choice.messages[1]
        if cpp_built():
            assert choice.implementations["edm_update"] == "cpp" and "C++ kernel" in choice.messages[0]
            assert ("measured guidance_update 3.3x" in choice.messages[0]) == (fused == "auto")
    compiled_auto = choose_fused("cpu", "auto", sampler="ddpm", compiled=True)
    assert compiled_auto.step_ops is None and "auto under torch.compile" in compiled_auto.messages[0]
    assert compiled_auto.messages[-1] == "fused auto: softplus, logit_grad not used (unguided)"
    assert compiled_auto.implementations == {"ddpm_mean": "torch"}
    if cpp_built():
        assert choose_fused("cpu", "on", sampler="dit", compiled=True).implementations == {"dit_difference": "cpp"}
    other = choose_fused("cpu", "on", sampler="euler", guidance=lambda x, y: (x, y))
    assert other.implementations == {"euler_step": "torch"}
    assert "no fused kernels for the euler sampler" in other.messages[0]
    # EDM2 applies Algorithm 2 as EDM does, with the same fused pieces.
    assert choose_fused("cpu", "on", sampler="edm2").implementations == {"edm_update": "cpp"}
    assert "has no swappable pieces" in other.messages[1]
    relu = choose_fused("cpu", "on", guidance=ClassifierGuidance(TinyClassifier()))
    assert "softplus not used (the classifier keeps ReLU)" in relu.messages[-1]
    assert "softplus" not in relu.implementations
    # CUDA: kernels exist for every piece; none is measured yet, so auto keeps the plain ones.
    cuda_auto = choose_fused("cuda", "auto", guidance=guide)
    assert cuda_auto.implementations == dict.fromkeys(["edm_update", "softplus", "logit_grad"], "torch")
    assert all("not yet measured faster on cuda" in m for m in cuda_auto.messages)
    if triton_runs_here():
        cuda_compiled = choose_fused("cuda", "on", guidance=guide, compiled=True)
        assert cuda_compiled.implementations == {"edm_update": "triton", "softplus": "torch", "logit_grad": "triton"}
        assert "cannot be traced inside torch.func.vjp" in cuda_compiled.messages[1]
    assert {(k.piece, k.device_type) for k in KERNELS} >= {(p, "cuda") for p in
                                                           ("edm_update", "ddpm_mean", "dit_difference", "softplus",
                                                            "logit_grad")}
    with pytest.raises(ValueError, match="fused"):
        choose_fused("cpu", "maybe")


class TinyLatentDiT(TinyEpsModel):
    """DiT's interface `dit(z, t, y)` on 4 latent channels; class id 10 is DiT's "no class"."""

    def __init__(self):
        super().__init__(channels=4, num_classes=11)


def tiny_decoder():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(4, 3, 3, padding=1),
                               torch.nn.Tanh()).eval().requires_grad_(False)


def run_sampler(sampler: str, choice, *, device="cpu", dtype=torch.float32, num_steps=4, step_runner=None,
                seeds=(5, 6, 7)):
    """A guided run of `sampler` on tiny networks on `device` with the pieces of `choice`
    (None: plain)."""
    from elucd_fast.samplers.dit import dit_sampler

    seeds = list(seeds)
    rnd = StackedRandomGenerator(device, seeds)
    noise = StackedRandomGenerator(device, seeds).randn_like
    labels = rnd.randint(10, size=[len(seeds)], device=device)
    guide = ClassifierGuidance(TinyClassifier().to(device, dtype), softplus_beta=3.0, marginal_temperature=0.5)
    ops = None
    if choice is not None:
        guide, ops = choice.prepare_guidance(guide), choice.step_ops
    runtime = dict(dtype=dtype, step_runner=step_runner, **({"ops": ops} if ops is not None else {}))
    if sampler == "edm":
        net = TinyEDMNet(channels=3, resolution=9, compute_dtype=dtype).to(device)
        return edm_sampler(net, rnd.randn([len(seeds), 3, 9, 9], device=device), labels, randn_like=noise,
                           num_steps=num_steps,
                           guidance=guide, max_guidance=0.05, add_factor=0.3, S_churn=10, **runtime)
    if sampler == "ddpm":
        return ddpm_sampler(TinyEpsModel().to(device, dtype), rnd.randn([len(seeds), 3, 7, 9], device=device), labels,
                            randn_like=noise, num_timesteps=100, timestep_respacing=str(num_steps), guidance=guide,
                            gamma_factor=0.3, classifier_scale=5.0, **runtime)
    return dit_sampler(TinyLatentDiT().to(device, dtype), rnd.randn([len(seeds), 4, 4, 6], device=device), labels,
                       randn_like=noise, null_label=10, decoder=tiny_decoder().to(device, dtype), guidance=guide,
                       num_timesteps=100,
                       timestep_respacing=str(num_steps), guidance_scale=0.5, gamma_factor=0.3, **runtime)


# Whole-run bounds (max |fused - plain| / max |plain|): float32 rounding of states at
# sigma_max = 80 (EDM), carried to images in [-1, 1], is what the float32 bound allows for.
BOUNDS = ((torch.float64, 1e-13), (torch.float32, 1e-4))


def test_guidance_with_pieces_is_the_same_guidance_prepared_again():
    from elucd_fast.kernels.softplus import FusedSoftplus

    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=4.0, marginal_temperature=0.3, fold_batchnorm=True,
                               input_transform="imagenet").double()
    calls = []

    def logit_grad(*args):
        calls.append(args[2:4])
        return guide.logit_grad(*args)

    fast = guide.with_pieces(make_softplus=lambda beta: FusedSoftplus(beta, 20.0), logit_grad=logit_grad)
    assert fast.settings == guide.settings and fast.report == guide.report and fast.input_dtype == torch.float64
    assert type(fast.transform) is type(guide.transform) and fast.transform is not guide.transform
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.classifier.modules())
    assert [type(m) for m in fast.classifier.modules() if isinstance(m, (torch.nn.Softplus, FusedSoftplus))] \
        == [FusedSoftplus]
    x, labels = torch.randn(2, 3, 6, 7, dtype=torch.float64), torch.tensor([1, 7])
    (grad, objective), (grad_ref, objective_ref) = fast(x, labels), guide(x, labels)
    assert calls == [(1.0, 0.3)]
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(objective, objective_ref, rtol=1e-12, atol=1e-15)
    plain_again = guide.with_pieces()
    assert plain_again.logit_grad is guide.logit_grad and not any(isinstance(m, FusedSoftplus) for m in
                                                                   plain_again.classifier.modules())


@pytest.mark.parametrize("sampler", ["edm", "ddpm", "dit"])
def test_fused_cpu_kernels_equal_plain_over_whole_runs(sampler):
    from elucd_fast.engine import choose_fused

    if not cpp_built():
        pytest.skip("the C++ ops could not be built here")
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    choice = choose_fused("cpu", "on", sampler=sampler, guidance=guide)
    assert choice.step_ops is not None
    for dtype, bound in BOUNDS:
        plain, fused = run_sampler(sampler, None, dtype=dtype), run_sampler(sampler, choice, dtype=dtype)
        err = rel_err(fused, plain)
        print(f"C++ {sampler} step piece vs plain, whole run, {dtype}: relative error {err:.2e}")
        assert torch.isfinite(fused).all() and err < bound


@pytest.mark.parametrize("sampler", ["edm", "ddpm", "dit"])
def test_fused_triton_kernels_equal_plain_over_whole_runs(sampler):
    """Every Triton piece the engine picks for a GPU (the step piece, the classifier's softplus
    and logit gradient), in whole guided runs (in Triton's interpreter without a GPU)."""
    from elucd_fast.engine import choose_fused

    if not triton_runs_here():
        pytest.skip("Triton cannot run here")
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    choice = choose_fused("cuda", "on", sampler=sampler, guidance=guide)
    assert set(choice.implementations.values()) == {"triton"}
    device = TENSORS_FOR["cuda"]
    for dtype, bound in BOUNDS:
        plain = run_sampler(sampler, None, device=device, dtype=dtype, num_steps=3)
        fused = run_sampler(sampler, choice, device=device, dtype=dtype, num_steps=3)
        err = rel_err(fused, plain)
        print(f"Triton pieces, {sampler}, whole run, {dtype}: relative error {err:.2e}")
        assert torch.isfinite(fused).all() and err < bound


@pytest.mark.parametrize("device_type", ["cpu", "cuda"], ids=["cpp", "triton"])
def test_fused_kernels_under_torch_compile(device_type):
    """The kernels are custom ops with shape-only fakes: a compiled step (aot_eager: tracing
    without code generation) runs them and equals the eager fused run."""
    from elucd_fast.engine import choose_fused

    if device_type == "cpu" and not cpp_built() or device_type == "cuda" and not triton_runs_here():
        pytest.skip(f"no {device_type} kernels run here")
    for sampler in ("edm", "ddpm"):
        choice = choose_fused(device_type, "on", sampler=sampler, compiled=True,
                              guidance=ClassifierGuidance(TinyClassifier(), softplus_beta=3.0))
        torch._dynamo.reset()
        runner = CompiledStepRunner(backend="aot_eager", fullgraph=True)
        device = TENSORS_FOR[device_type]
        compiled = run_sampler(sampler, choice, device=device, num_steps=3, step_runner=runner)
        eager = run_sampler(sampler, choice, device=device, num_steps=3)
        assert runner.graphs == 2 and rel_err(compiled, eager) < 1e-6


def _launchers() -> dict[str, object]:
    """Every public launch function of kernels/ and csrc/: the names in each module's __all__."""
    import importlib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    modules = [f"elucd_fast.kernels.{p.stem}" for p in sorted((repo / "kernels").glob("*.py")) if p.stem != "__init__"]
    modules += [f"elucd_fast.csrc.{p.stem}" for p in sorted((repo / "csrc").glob("*.py")) if p.stem != "__init__"]
    found = {}
    for name in modules:
        module = importlib.import_module(name)
        assert getattr(module, "__all__", None), f"{name} names no launchers in __all__"
        found.update({f"{name}.{attr}": getattr(module, attr) for attr in module.__all__})
    return found


def _codes(launcher) -> set:
    import inspect

    if inspect.isclass(launcher):
        return {f.__code__ for f in vars(launcher).values() if inspect.isfunction(f)}
    return {launcher.__code__}


def test_every_kernel_is_reachable_from_the_engine():
    """Each public launch function of kernels/ and csrc/ (each module's __all__), and each op
    of elucd_ops.cpp, runs when the samplers run with the pieces `engine.fused` picks for the
    CPU and for CUDA: no kernel without a production caller."""
    import re
    import sys
    from pathlib import Path

    from torch.utils._python_dispatch import TorchDispatchMode

    from elucd_fast.engine import choose_fused

    if not (cpp_built() and triton_runs_here()):
        pytest.skip("needs both the C++ ops and Triton (interpreter or GPU)")
    called_codes: set = set()
    called_ops: set[str] = set()

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called_ops.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    def record(frame, event, arg):
        if event == "call":
            called_codes.add(frame.f_code)

    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    runs = [(device_type, sampler, choose_fused(device_type, "on", sampler=sampler, guidance=guide))
            for device_type in ("cpu", "cuda") for sampler in ("edm", "ddpm", "dit")]
    sys.setprofile(record)
    try:
        with RecordOps():
            for device_type, sampler, choice in runs:
                run_sampler(sampler, choice, device=TENSORS_FOR[device_type], num_steps=2, seeds=(5, 6))
    finally:
        sys.setprofile(None)
    launchers = _launchers()
    unreached = sorted(name for name, launcher in launchers.items() if not _codes(launcher) & called_codes)
    assert not unreached, f"launchers no engine choice reaches: {unreached}"
    source = (Path(__file__).resolve().parents[1] / "csrc" / "elucd_ops.cpp").read_text()
    cpp_ops = set(re.findall(r'm\.def\("(\w+)\(', source))
    assert cpp_ops and not {f"elucd::{op}" for op in cpp_ops} - called_ops, (cpp_ops, called_ops)


@pytest.mark.parametrize("cpu_bf16", [True], indirect=True)
def test_the_guide_network_runs_under_the_precision_policy_and_compile_time_is_exposed(cpu_bf16):
    from test_edm2_networks import tiny_network

    from elucd_fast.engine import configure_job
    from elucd_fast.engine.configure import CompiledGraphedStepRunner
    from elucd_fast.job import Job
    from elucd_fast.samplers import EDM2Settings

    job = Job(tiny_network(3, 10), None, EDM2Settings(num_steps=3, guide_weight=2.0), (3, 16, 16), 10,
              guide_net=tiny_network(3, 10, seed=7))
    fast, _ = configure_job(job, precision="bf16")
    assert isinstance(fast.guide_net, AutocastModule) and fast.guide_net.dtype == torch.bfloat16
    assert type(fast.guide_net) is type(fast.net) and job.guide_net is not fast.guide_net
    compiled = CompiledStepRunner(backend="aot_eager")
    chained = CompiledGraphedStepRunner(compiled, lambda step: step)
    compiled.compile_seconds = 2.5
    assert chained.compile_seconds == 2.5
