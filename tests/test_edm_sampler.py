import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import baseline
from elucd_fast.guidance import ClassifierGuidance, GuidanceInterval
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers.edm import edm_sampler
from tiny_models import TinyClassifier, TinyEDMNet, rel_err

SEEDS = [3, 14, 15, 92, 65]


def _inputs(seeds=SEEDS, net=None):
    net = net or TinyEDMNet()
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = rnd.randint(net.label_dim, size=[len(seeds)])
    return net, latents, labels


CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)


@pytest.mark.parametrize("sde", [False, True], ids=["ode", "churn"])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_float64_equals_baseline(sde, guided):
    # A float64 network, so float64-level differences in the state are not absorbed by a
    # float32 cast inside the denoiser.
    net, latents, labels = _inputs(net=TinyEDMNet(compute_dtype=torch.float64))
    kwargs = dict(num_steps=7, max_guidance=0.05, add_factor=0.3, **(CHURN if sde else {}))
    classifier = TinyClassifier().double()
    guide = ClassifierGuidance(classifier, softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0) if guided else None
    ours = edm_sampler(net, latents, labels, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like,
                       guidance=guide, dtype=torch.float64, **kwargs)
    ref = baseline.edm_sample(net, latents, labels, baseline.smooth_relu(classifier, 5.0) if guided else None,
                              randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like,
                              joint_temperature=1.0, marginal_temperature=0.0, **kwargs)
    err = rel_err(ours, ref)
    print(f"edm float64 sde={sde} guided={guided}: relative error {err:.3e}")
    assert err <= 1e-10, err
    if guided:  # guidance really moved the samples
        unguided = edm_sampler(net, latents, labels, randn_like=StackedRandomGenerator("cpu", SEEDS).randn_like,
                               dtype=torch.float64, **kwargs)
        assert rel_err(unguided, ref) > 1e-3


def test_one_hot_labels_equal_ids():
    net, latents, labels = _inputs()
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    a = edm_sampler(net, latents, labels, num_steps=4, guidance=guide, max_guidance=0.01)
    b = edm_sampler(net, latents, torch.nn.functional.one_hot(labels, 10).float(), num_steps=4, guidance=guide, max_guidance=0.01)
    assert torch.equal(a, b)


def test_zero_classifier_gradient_gives_no_nan():
    net, latents, labels = _inputs()

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 10) + 0 * x.flatten(1)[:, :1]

    guided = edm_sampler(net, latents, labels, num_steps=4, guidance=ClassifierGuidance(Constant()), max_guidance=0.5)
    plain = edm_sampler(net, latents, labels, num_steps=4)
    assert torch.isfinite(guided).all() and torch.equal(guided, plain)


def test_guidance_interval_skips_steps():
    net, latents, labels = _inputs()
    calls = []

    class Counting(ClassifierGuidance):
        def forward(self, x, labels, weight=None):
            calls.append(1)
            return super().forward(x, labels, weight)

    guide = Counting(TinyClassifier())
    edm_sampler(net, latents, labels, num_steps=10, guidance=guide, guidance_interval=GuidanceInterval(2, 9, 3))
    assert len(calls) == 3  # steps 2, 5, 8


def test_per_sample_determinism_across_batches():
    """A seed gives the same image whatever the batch size and its position in the batch."""
    net = TinyEDMNet()
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)

    def run(seeds):
        _, latents, labels = _inputs(seeds, net)
        return edm_sampler(net, latents, labels, randn_like=StackedRandomGenerator("cpu", seeds).randn_like,
                           num_steps=6, guidance=guide, max_guidance=0.05, **CHURN)

    full = run([7, 8, 9, 10, 11])
    alone = run([9])
    shuffled = run([11, 9, 7])
    for got, expect in ((alone[0], full[2]), (shuffled[0], full[4]), (shuffled[1], full[2]), (shuffled[2], full[0])):
        assert rel_err(got, expect) < 1e-6
    assert torch.equal(((alone[0] * 127.5 + 128).clip(0, 255).to(torch.uint8)),
                       ((full[2] * 127.5 + 128).clip(0, 255).to(torch.uint8)))


class CountSyncs(TorchDispatchMode):
    SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC_OPS:
            self.syncs.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def count_syncs_after_first_step(run):
    """Counts device->host syncs in every step after the first (set-up checks run before) up to
    the last step's end (the one check after the loop is not inside it)."""
    mode = CountSyncs()
    entered = []
    counted = []

    def callback(state):
        if state["i"] == 0:
            mode.__enter__()
            entered.append(True)
        counted[:] = list(mode.syncs)

    try:
        run(callback)
    finally:
        if entered:
            mode.__exit__(None, None, None)
    return counted


@pytest.mark.parametrize("sde", [False, True])
def test_no_host_sync_inside_the_loop(sde):
    net, latents, labels = _inputs()
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.0)
    syncs = count_syncs_after_first_step(lambda cb: edm_sampler(
        net, latents, labels, num_steps=5, guidance=guide, add_factor=0.3, callback=cb, **(CHURN if sde else {})))
    assert syncs == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=1), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(max_guidance=math.nan), "max_guidance"),
    (dict(max_guidance=-1.0), "max_guidance"),
    (dict(add_factor=math.inf), "add_factor"),
    (dict(S_churn=-1), "S_churn"),
    (dict(sigma_min=0), "sigma_min"),
])
def test_bad_arguments(kwargs, match):
    net, latents, labels = _inputs()
    with pytest.raises(ValueError, match=match):
        edm_sampler(net, latents, labels, guidance=ClassifierGuidance(TinyClassifier()), **kwargs)


def test_bad_labels_and_shapes():
    net, latents, labels = _inputs()
    guide = ClassifierGuidance(TinyClassifier())
    with pytest.raises(ValueError, match=r"class_labels: ids must be in \[0, 10\)"):
        edm_sampler(net, latents, labels + 10, guidance=guide)
    with pytest.raises(ValueError, match="labels for a batch"):
        edm_sampler(net, latents, labels[:2], guidance=guide)
    with pytest.raises(TypeError, match="class_labels"):
        edm_sampler(net, latents, labels.float(), guidance=guide)
    with pytest.raises(ValueError, match="guidance needs target labels"):
        edm_sampler(TinyEDMNet(label_dim=0), latents, None, guidance=guide)
    with pytest.raises(ValueError, match="cannot take images of shape"):
        edm_sampler(TinyEDMNet(channels=1), torch.randn(5, 1, 8, 8), labels, guidance=guide)
    with pytest.raises(TypeError, match="latents"):
        edm_sampler(net, latents.to(torch.int64), labels)
    with pytest.raises(TypeError, match="dtype"):
        edm_sampler(net, latents, labels, dtype=torch.float16)
