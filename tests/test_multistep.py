"""The multistep solvers (iPNDM, DPM-Solver++(2M)) of the EDM and EDM2 samplers: equal to a plain
float64 implementation of SPEC §10's formulas guided and unguided, bit-equal unguided to
k-diffusion's `sample_dpmpp_2m` and to diff-sampler's iPNDM (its loop restated below in its
operation order), no host syncs, compiled and graph-replayed steps equal to eager, seed-only
images, every EDM-family preset, refused settings."""
import math

import pytest
import torch
from click.testing import CliRunner

import baseline
from elucd_fast.cli import main
from elucd_fast.guidance import ClassifierGuidance
from elucd_fast.presets import build_job, get_preset, list_presets
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers import DDPMSettings, DiTSettings, EDM2Settings, EDMSettings
from elucd_fast.samplers.edm import edm_sampler
from elucd_fast.samplers.edm2 import edm2_sampler
from test_edm2_networks import tiny_network
from test_edm_sampler import count_syncs_after_first_step
from tiny_models import TinyClassifier, TinyEDMNet, rel_err

SEEDS = [3, 14, 15, 92]
MULTISTEP = ["ipndm", "dpmpp_2m"]
GUIDE = dict(max_guidance=0.05, add_factor=0.3)


def _inputs(net, seeds=SEEDS, shape=None):
    rnd = StackedRandomGenerator("cpu", seeds)
    shape = shape or [net.img_channels, net.img_resolution, net.img_resolution]
    return rnd.randn([len(seeds), *shape]), rnd.randint(10, size=[len(seeds)])


def _guidance(classifier):
    return ClassifierGuidance(classifier, softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0)


def _one_hot(labels):
    return torch.nn.functional.one_hot(labels, 10).to(torch.float32)


@pytest.mark.parametrize("max_order", [1, 2, 4])
@pytest.mark.parametrize("solver", MULTISTEP)
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_edm_float64_equals_the_formulas(solver, guided, max_order):
    net = TinyEDMNet(compute_dtype=torch.float64)
    latents, labels = _inputs(net)
    classifier = TinyClassifier().double()
    kwargs = dict(num_steps=7, solver=solver, max_order=max_order, **GUIDE)
    ours = edm_sampler(net, latents, labels, guidance=_guidance(classifier) if guided else None, dtype=torch.float64,
                       **kwargs)
    sigmas = baseline.edm_time_steps(net, 7, 0.002, 80, 7).tolist()
    ref = baseline.multistep_sample(lambda x, sigma: net(x, sigma, _one_hot(labels)), latents, sigmas, labels,
                                    baseline.smooth_relu(classifier, 5.0) if guided else None, solver=solver,
                                    max_order=max_order, **GUIDE)
    err = rel_err(ours, ref)
    print(f"edm {solver} max_order {max_order} float64 guided={guided}: relative error {err:.3e}")
    assert err <= 1e-12, err
    if guided:  # the guidance really moved the samples
        assert rel_err(edm_sampler(net, latents, labels, dtype=torch.float64, **kwargs), ref) > 1e-3


@pytest.mark.parametrize("solver", MULTISTEP)
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_edm2_float64_with_a_guide_network_equals_the_formulas(solver, guided):
    net, gnet = tiny_network(3, 10).double(), tiny_network(3, 10, seed=7, model_channels=8).double()
    latents, labels = _inputs(net, shape=[3, 8, 8])
    classifier = TinyClassifier().double()
    kwargs = dict(num_steps=6, solver=solver, guide_weight=1.6, **GUIDE)
    ours = edm2_sampler(net, latents, labels, gnet=gnet, guidance=_guidance(classifier) if guided else None,
                        dtype=torch.float64, **kwargs)

    def denoiser(x, sigma):  # EDM2's guided denoiser, D_g + w (D - D_g)
        d_net, d_guide = net(x, sigma, _one_hot(labels)), gnet(x, sigma, _one_hot(labels))
        return d_guide + 1.6 * (d_net - d_guide)

    sigmas = EDM2Settings(num_steps=6).time_steps(torch.float64).tolist()
    ref = baseline.multistep_sample(denoiser, latents, sigmas, labels,
                                    baseline.smooth_relu(classifier, 5.0) if guided else None, solver=solver, **GUIDE)
    err = rel_err(ours, ref)
    print(f"edm2 {solver} float64 guided={guided}: relative error {err:.3e}")
    assert err <= 1e-12, err


def diff_sampler_ipndm(net, latents, t_steps, labels, max_order):
    """diff-sampler's `ipndm_sampler` loop (zju-pi/diff-sampler, gits-main/solvers.py), restated
    with its operation order: Adams-Bashforth over d = (x - D) / t, order min(max_order, i + 1)."""
    x_next = latents * t_steps[0]
    buffer = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = (x_cur - net(x_cur, t_cur, labels)) / t_cur
        order = min(max_order, i + 1)
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x_cur + (t_next - t_cur) * (3 * d_cur - buffer[-1]) / 2
        elif order == 3:
            x_next = x_cur + (t_next - t_cur) * (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x_next = x_cur + (t_next - t_cur) * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        buffer = (buffer + [d_cur])[-(max_order - 1):] if max_order > 1 else []
    return x_next


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_unguided_is_diff_samplers_bit_for_bit(max_order, dtype):
    net = TinyEDMNet()
    latents, labels = _inputs(net)
    for num_steps in (2, 3, 6):
        ours = edm_sampler(net, latents, labels, num_steps=num_steps, solver="ipndm", max_order=max_order, dtype=dtype)
        t_steps = EDMSettings(num_steps=num_steps).time_steps(net)
        theirs = diff_sampler_ipndm(net, latents.to(dtype), t_steps, _one_hot(labels), max_order)
        assert torch.equal(ours, theirs.to(dtype)), (num_steps, (ours - theirs).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpmpp_2m_unguided_is_k_diffusions_bit_for_bit(dtype):
    from k_diffusion.sampling import sample_dpmpp_2m

    net = TinyEDMNet()
    latents, labels = _inputs(net)
    for num_steps in (2, 3, 8):
        ours = edm_sampler(net, latents, labels, num_steps=num_steps, solver="dpmpp_2m", dtype=dtype)
        sigmas = EDMSettings(num_steps=num_steps).time_steps(net)
        # k-diffusion's denoiser protocol: sigma per sample (all equal here).
        theirs = sample_dpmpp_2m(lambda x, sigma: net(x, sigma[0], _one_hot(labels)).to(x.dtype),
                                 latents.to(dtype) * sigmas[0], sigmas, disable=True)
        assert torch.equal(ours, theirs), (num_steps, (ours - theirs).abs().max())


def test_edm2_dpmpp_2m_unguided_is_k_diffusions_bit_for_bit():
    """EDM2 computes its time steps in the state dtype (float32): so do the coefficients."""
    from k_diffusion.sampling import sample_dpmpp_2m

    net, gnet = tiny_network(3, 10), tiny_network(3, 10, seed=7, model_channels=8)
    latents, labels = _inputs(net, shape=[3, 8, 8])
    ours = edm2_sampler(net, latents, labels, gnet=gnet, guide_weight=1.6, num_steps=5, solver="dpmpp_2m")
    sigmas = EDM2Settings(num_steps=5).time_steps(torch.float32)

    def denoiser(x, sigma):
        return gnet(x, sigma[0], _one_hot(labels)).to(x.dtype).lerp(net(x, sigma[0], _one_hot(labels)), 1.6)

    theirs = sample_dpmpp_2m(denoiser, latents * sigmas[0], sigmas, disable=True)
    assert torch.equal(ours, theirs)


def test_guided_dpmpp_2m_equals_k_diffusion_with_the_guided_denoiser():
    """`integrations.kdiffusion.GuidedDenoiser` inside k-diffusion's DPM-Solver++(2M) takes the
    same steps from the same displaced states, history at the displaced points: the same images up
    to rounding (its algebra regroups the arithmetic)."""
    from k_diffusion.sampling import sample_dpmpp_2m

    from elucd_fast.integrations.kdiffusion import GuidedDenoiser

    net = TinyEDMNet(compute_dtype=torch.float64)
    latents, labels = _inputs(net)
    guide = _guidance(TinyClassifier().double())
    ours = edm_sampler(net, latents, labels, guidance=guide, num_steps=6, solver="dpmpp_2m", dtype=torch.float64,
                       **GUIDE)
    sigmas = EDMSettings(num_steps=6).time_steps(net)
    guided = GuidedDenoiser(lambda x, sigma: net(x, sigma[0], _one_hot(labels)), guide, sigmas, class_labels=labels,
                            multistep="dpmpp_2m", **GUIDE)
    theirs = sample_dpmpp_2m(guided, latents.double() * sigmas[0], sigmas, disable=True)
    err = rel_err(ours, theirs)
    print(f"guided dpmpp_2m vs k-diffusion + GuidedDenoiser: relative error {err:.3e}")
    assert err < 1e-10


@pytest.mark.parametrize("solver", MULTISTEP)
def test_no_host_sync_inside_the_loop(solver):
    net = TinyEDMNet()
    latents, labels = _inputs(net)
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.0)
    syncs = count_syncs_after_first_step(lambda cb: edm_sampler(
        net, latents, labels, num_steps=6, solver=solver, guidance=guide, callback=cb, **GUIDE))
    assert syncs == []
    edm2_net, gnet = tiny_network(3, 10), tiny_network(3, 10, seed=7, model_channels=8)
    syncs = count_syncs_after_first_step(lambda cb: edm2_sampler(
        edm2_net, latents, labels, gnet=gnet, guide_weight=1.5, num_steps=6, solver=solver, guidance=guide,
        callback=cb, **GUIDE))
    assert syncs == []


def test_one_call_per_step():
    calls = []

    class Counting(TinyEDMNet):
        def forward(self, x, sigma, class_labels=None):
            calls.append(float(sigma))
            return super().forward(x, sigma, class_labels)

    net = Counting()
    latents, labels = _inputs(net)
    for solver in MULTISTEP:
        calls.clear()
        settings = EDMSettings(num_steps=5, solver=solver)
        edm_sampler(net, latents, labels, settings=settings, guidance=_guidance(TinyClassifier()))
        assert len(calls) == settings.network_evaluations == 5
        assert calls == settings.time_steps(net)[:-1].tolist()


@pytest.mark.parametrize("solver", MULTISTEP)
def test_compiled_step_equals_eager_in_one_graph(solver):
    """Per-step values are 0-d tensors and the history a fixed-size stack: one graph per flag
    combination (guided or not) serves every step, whatever the order reached."""
    from torch._dynamo.utils import counters

    from elucd_fast.engine import CompiledStepRunner

    torch._dynamo.reset()
    net = TinyEDMNet()
    latents, labels = _inputs(net)
    kwargs = dict(num_steps=6, solver=solver, guidance=_guidance(TinyClassifier()), **GUIDE)
    eager = edm_sampler(net, latents, labels, **kwargs)
    runner = CompiledStepRunner(backend="aot_eager")
    compiled = edm_sampler(net, latents, labels, step_runner=runner, **kwargs)
    err = rel_err(compiled, eager)
    print(f"{solver} compiled (aot_eager) vs eager: relative error {err:.2e}")
    assert err < 1e-6 and runner.graphs == 1
    # Another batch (another run, its own denoiser closure and labels) reuses the graph.
    graphs = counters["stats"]["unique_graphs"]
    other_latents, other_labels = _inputs(net, seeds=[5, 6, 7, 8])
    edm_sampler(net, other_latents, other_labels, step_runner=runner, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("solver", MULTISTEP)
def test_cuda_graph_replay_equals_eager(solver):
    """Replayed outputs live in static buffers the next replay overwrites: the history must not
    alias them (a stand-in API replays as a CUDA graph does)."""
    from elucd_fast.engine import CUDAGraphStepRunner
    from test_engine import FakeCudaGraphAPI

    net = TinyEDMNet()
    latents, labels = _inputs(net)
    kwargs = dict(num_steps=6, solver=solver, guidance=_guidance(TinyClassifier()), **GUIDE)
    eager = edm_sampler(net, latents, labels, **kwargs)
    api = FakeCudaGraphAPI()
    replayed = edm_sampler(net, latents, labels, step_runner=CUDAGraphStepRunner(api=api), **kwargs)
    assert torch.equal(replayed, eager) and len(api.graphs) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("solver", MULTISTEP)
def test_cuda_graph_on_gpu_equals_eager(solver):
    from elucd_fast.engine import CUDAGraphStepRunner

    net = TinyEDMNet().to("cuda")
    latents, labels = (t.to("cuda") for t in _inputs(net))
    kwargs = dict(num_steps=6, solver=solver, guidance=_guidance(TinyClassifier().to("cuda")), **GUIDE)
    eager = edm_sampler(net, latents, labels, **kwargs)
    runner = CUDAGraphStepRunner()
    graphed = edm_sampler(net, latents, labels, step_runner=runner, **kwargs)
    assert not runner.fallbacks and rel_err(graphed, eager) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("solver", MULTISTEP)
def test_the_engine_runs_the_solver_compiled_with_fused_ops(solver):
    """`configure_job` (what `generate --compile on --fused on` does) on the guided digits job:
    the compiled multistep step with the fused update equals the plain job's images (tracing the
    digits U-Net takes some 10-20 s)."""
    from elucd_fast.engine import configure_job

    torch._dynamo.reset()
    job = build_job("digits", num_steps=5, solver=solver)
    fast, messages = configure_job(job, precision="fp32", compile="on", fused="on", num_images=8, backend="aot_eager")
    assert fast.config["engine"]["compile"] is True
    rnd = StackedRandomGenerator("cpu", list(range(8)))
    latents, labels = rnd.randn([8, 1, 8, 8]), rnd.randint(10, size=[8])
    plain, engine = job.sample(latents, labels, rnd.randn_like), fast.sample(latents, labels, rnd.randn_like)
    err = rel_err(engine, plain)
    print(f"{solver} through the engine (compiled, fused {fast.config['engine']['fused_pieces']}) vs plain: "
          f"relative error {err:.2e}")
    assert err < 1e-5 and fast.step_runner.graphs == 1


def test_fused_ops_equal_the_plain_ones():
    from elucd_fast.csrc import ops as cpp_ops
    from elucd_fast.samplers.edm import StepOps

    if not cpp_ops.cpp_ops_available():
        pytest.skip("the C++ ops cannot be built here")
    net = TinyEDMNet(resolution=7)
    latents, labels = _inputs(net, shape=[3, 7, 5])
    kwargs = dict(num_steps=5, solver="ipndm", guidance=_guidance(TinyClassifier()), **GUIDE)
    plain = edm_sampler(net, latents, labels, **kwargs)
    fused = edm_sampler(net, latents, labels, ops=StepOps(cpp_ops.classifier_input, cpp_ops.guidance_update), **kwargs)
    err = rel_err(fused, plain)
    print(f"ipndm fused C++ ops vs plain: relative error {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("solver", MULTISTEP)
def test_images_depend_only_on_their_seed(solver):
    net = TinyEDMNet()
    guide = _guidance(TinyClassifier())

    def run(seeds):
        latents, labels = _inputs(net, seeds)
        return edm_sampler(net, latents, labels, num_steps=5, solver=solver, guidance=guide, **GUIDE)

    full, alone, shuffled = run([7, 8, 9, 10]), run([9]), run([10, 9])
    # Only the batched convolutions' rounding differs (amplified a little by the 4th-order weights).
    assert rel_err(alone[0], full[2]) < 1e-5 and rel_err(shuffled[0], full[3]) < 1e-5
    assert torch.equal(run([7, 8, 9, 10]), full)


def test_network_evaluations_of_every_settings_class():
    assert EDMSettings(num_steps=6).network_evaluations == 11
    assert EDMSettings(num_steps=6, solver="ipndm").network_evaluations == 6
    assert EDM2Settings(num_steps=6, solver="dpmpp_2m").network_evaluations == 6
    assert EDM2Settings(num_steps=6).network_evaluations == 11
    assert DDPMSettings(timestep_respacing="25").network_evaluations == 25
    assert DDPMSettings(timestep_respacing="ddim10", use_ddim=True).network_evaluations == 10
    assert DiTSettings(timestep_respacing="50").network_evaluations == 50


@pytest.mark.parametrize("changes,message", [
    (dict(solver="rk4"), r"solver: expected one of 'heun', 'ipndm', 'dpmpp_2m', got 'rk4'"),
    (dict(solver="ipndm", max_order=5), r"max_order: must be an integer in \[1, 4\], got 5"),
    (dict(solver="ipndm", max_order=0), r"max_order: must be an integer in \[1, 4\]"),
    (dict(solver="dpmpp_2m", max_order=2.0), r"max_order: must be an integer"),
    (dict(max_order=2), "max_order: only the multistep solvers"),
    (dict(solver="ipndm", S_churn=40), "S_churn: the multistep solver ipndm integrates the ODE and takes no churn"),
])
def test_bad_settings_are_refused(changes, message):
    for settings in (EDMSettings, EDM2Settings):
        with pytest.raises(ValueError, match=message):
            settings(**changes)


@pytest.mark.parametrize("flags,message", [
    (["--solver", "rk4"], "'rk4' is not one of"),
    (["--solver", "ipndm", "--max-order", "7"], "max_order: must be an integer in [1, 4], got 7"),
    (["--max-order", "2"], "max_order: only the multistep solvers"),
    (["--preset", "edm64-sde256", "--solver", "dpmpp_2m"], "S_churn: the multistep solver dpmpp_2m"),
])
def test_bad_flags_exit_2_before_anything_loads(tmp_path, flags, message):
    result = CliRunner().invoke(main, ["generate", *flags, "--outdir", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


EDM_FAMILY = [name for name in list_presets() if get_preset(name).json()["settings"]["sampler"] in ("edm", "edm2")]


def test_every_edm_family_preset_takes_the_solvers():
    assert len(EDM_FAMILY) > 40
    assert {"digits", "digits-edm2", "edm64-18", "edm2-img512-xxl-autog-fid+cls"} <= set(EDM_FAMILY)
    for name in EDM_FAMILY:
        preset = get_preset(name)
        for solver in MULTISTEP:
            if name == "edm64-sde256":  # EDM's churned SDE: refused, with the reason
                with pytest.raises(ValueError, match="S_churn"):
                    preset.configure(solver=solver)
                assert preset.configure(solver=solver, S_churn=0).settings.solver == solver
                continue
            assert preset.configure(solver=solver).settings.solver == solver
        if preset.settings.sigmas is None:
            assert preset.settings.solver == "heun", name  # the presets' default
        else:  # a shipped searched schedule (digits-fast*): the solver it was searched for
            assert name.startswith("digits-fast") and preset.settings.solver == "ipndm", name


DIGITS_EDM = [name for name in EDM_FAMILY if name.startswith("digits")]


@pytest.mark.parametrize("name", DIGITS_EDM)
def test_digits_presets_sample_with_the_solvers_guided_and_unguided(name):
    rnd = StackedRandomGenerator("cpu", [0, 1, 2])
    latents, labels = rnd.randn([3, 1, 8, 8]), rnd.randint(10, size=[3])
    for solver in MULTISTEP:
        for guidance in (True, False):
            # A preset on a shipped schedule keeps its explicit steps; the others take 4 rho steps.
            steps = {} if get_preset(name).settings.sigmas is not None else {"num_steps": 4}
            job = build_job(name, solver=solver, guidance=guidance, **steps)
            assert job.settings.network_evaluations == job.settings.num_steps == len(job.settings.step_sequence())
            images = job.sample(latents, labels, rnd.randn_like)
            assert images.shape[0] == 3 and torch.isfinite(images).all(), (name, solver, guidance)


@pytest.mark.parametrize("solver", MULTISTEP)
def test_paper_edm_row_samples_with_the_solvers(tmp_path, solver):
    from test_paper_presets import _classifier_file, _sample

    import edm_fixtures

    net = edm_fixtures.build_edm_network(
        "EDMPrecond", img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet", model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    network = edm_fixtures.write_edm_snapshot(tmp_path / "edm.pkl", net)
    from dataclasses import replace

    preset = replace(get_preset("edm64-18"), classifier_arch="resnet18", image_shape=(3, 16, 16), num_classes=10)
    for guidance in (True, False):
        job = preset.build(network=network, classifier=_classifier_file(tmp_path, 10) if guidance else None,
                           guidance=guidance, num_steps=3, solver=solver)
        images = _sample(job)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("solver", MULTISTEP)
def test_edm2_rows_sample_with_the_solvers(solver):
    """A pixel row with its guide network and classifier, and a latent row guided through the
    decoder (x0: the previous step's estimate), guided and unguided."""
    from elucd_fast.models.edm2_encoders import StabilityVAEEncoder, StandardRGBEncoder
    from test_edm2_presets import TinyVAE, _sample, _tiny_preset

    pixel = _tiny_preset("edm2-img64-s-autog-fid+cls")
    net, gnet = tiny_network(3, 1000), tiny_network(3, 1000, seed=7, model_channels=8)
    latent = _tiny_preset("edm2-img512-xs-guid-fid+cls")
    lnet, lgnet = tiny_network(4, 1000), tiny_network(4, 0, seed=5)
    for guidance in (True, False):
        extra = dict(classifier=TinyClassifier(num_classes=1000)) if guidance else {}
        job = pixel.configure(num_steps=4, solver=solver, guidance=guidance).job(
            net, encoder=StandardRGBEncoder(), guide_net=gnet, **extra)
        assert _sample(job).images.shape == (3, 16, 16, 3)
        strength = dict(max_guidance=0.05) if guidance else {}
        job = latent.configure(num_steps=4, solver=solver, guidance=guidance, **strength).job(
            lnet, encoder=StabilityVAEEncoder.from_statistics(batch_size=2), guide_net=lgnet, vae=TinyVAE(), **extra)
        assert _sample(job).images.shape == (3, 32, 32, 3)


def test_cli_generate_and_profile_take_the_solver(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--preset", "digits", "--solver", "ipndm", "--steps", "3",
                                       "--seeds", "0-9", "--batch", "5", "--outdir", str(tmp_path / "gen"),
                                       "--no-metrics"])
    assert result.exit_code == 0, result.output
    import json

    config = json.loads((tmp_path / "gen" / "run.json").read_text())
    assert "ipndm" in json.dumps(config)
    result = CliRunner().invoke(main, ["profile", "--preset", "digits", "--solver", "dpmpp_2m", "--steps", "3",
                                       "--batch", "4", "--rounds", "1", "--out", str(tmp_path / "prof")])
    assert result.exit_code == 0, result.output
    assert "3 steps (3 network evaluations)" in result.output


def test_the_schedule_of_coefficients():
    from elucd_fast.samplers.multistep import multistep_coefficients

    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    ipndm = multistep_coefficients("ipndm", sigmas, 4)
    assert ipndm[:, 0].tolist() == [-70.0, -9.0, -0.9, -0.1]
    assert ipndm[:, 1:].tolist() == [[1, 0, 0, 0, 1], [3, 1, 0, 0, 2], [23, 16, 5, 0, 12], [55, 59, 37, 9, 24]]
    dpm = multistep_coefficients("dpmpp_2m", sigmas, 4)
    assert dpm[0, 2:].tolist() == [1, 0] and dpm[-1].tolist() == [0, -1, 1, 0]  # first step; to sigma = 0
    r = math.log(80 / 10) / math.log(10 / 1)
    assert dpm[1, 2:].tolist() == pytest.approx([1 + 1 / (2 * r), 1 / (2 * r)])
    assert dpm[1, :2].tolist() == pytest.approx([0.1, -0.9])  # the step subtracts expm1(-h)
    assert multistep_coefficients("dpmpp_2m", sigmas, 1)[:, 3].tolist() == [0, 0, 0, 0]
