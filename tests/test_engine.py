"""The fast paths (precision, compiled step, CUDA-graph replay) against the plain path."""
import dataclasses
import warnings

import pytest
import torch

from elucd_fast.engine import (AutocastModule, CompiledStepRunner, CUDAGraphStepRunner, apply_precision,
                               make_step_runner, resolve_compile, resolve_precision)
from elucd_fast.engine.cuda_graph import CudaGraphAPI
from elucd_fast.engine.precision import hardware_bf16
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
    assert fp64.state_dtype == torch.float64 and fp64.network_dtype is None
    auto = resolve_precision("auto")
    assert auto.name == "fp32" and "auto" in auto.reason
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8")
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


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
