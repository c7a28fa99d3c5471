"""diffusers integration: tiny random DiT/VAE/UNet pipelines, compared with diffusers' own
pipelines for the same generator, and guided."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: E402
                       DiTPipeline, DiTTransformer2DModel, EulerDiscreteScheduler, UNet2DModel)

from elucd_fast.guidance import ClassifierGuidance, calibrated_objective  # noqa: E402
from elucd_fast.integrations.diffusers import (DiffusersEpsModel, guided_ddpm_pipeline,  # noqa: E402
                                               guided_dit_pipeline, scheduler_chain)
from elucd_fast.schedules.gaussian_diffusion import GaussianDiffusion  # noqa: E402
from tiny_models import TinyClassifier  # noqa: E402

LABELS = [1, 2, 3]


def tiny_dit_pipeline(scheduler=None, learn_sigma=True):
    torch.manual_seed(0)
    # Freshly built diffusers models are in training mode, where DiT drops labels at random.
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                        out_channels=8 if learn_sigma else 4, num_layers=1, sample_size=4).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4).eval()
    pipe = DiTPipeline(transformer, vae, scheduler or DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(num_classes=None):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                       num_class_embeds=num_classes).eval()


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _objective(guidance, images01, labels):
    """J of images given in [0, 1] (pipeline output), as the classifier sees them in [-1, 1]."""
    with torch.no_grad():
        return calibrated_objective(guidance.logits(images01 * 2 - 1), torch.as_tensor(labels),
                                    guidance.joint_temperature, guidance.marginal_temperature)


# --- DiT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["conditional", "cfg"])
def test_dit_cfg_only_equals_dit_pipeline(cfg):
    pipe = tiny_dit_pipeline()
    expected = pipe(LABELS, guidance_scale=cfg, generator=_generator(), num_inference_steps=10, output_type="pt").images
    got = guided_dit_pipeline(pipe, LABELS, guidance_scale=cfg, generator=_generator(), num_inference_steps=10,
                              output_type="pt").images
    assert got.shape == (3, 3, 8, 8)
    assert (got - expected).abs().max() <= 1e-4


def test_dit_guidance_gives_finite_images_and_raises_objective():
    pipe = tiny_dit_pipeline()
    guidance = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.5)
    kwargs = dict(guidance_scale=1.5, generator=None, num_inference_steps=10, output_type="pt")
    plain = guided_dit_pipeline(pipe, LABELS, **{**kwargs, "generator": _generator()}).images
    reports = []
    guided = guided_dit_pipeline(pipe, LABELS, guidance=guidance, classifier_scale=2.0, callback=reports.append,
                                 **{**kwargs, "generator": _generator()}).images
    assert guided.shape == (3, 3, 8, 8) and torch.isfinite(guided).all()
    assert len(reports) == 10 and all(r["J"] is not None for r in reports)
    gain = _objective(guidance, guided, LABELS) - _objective(guidance, plain, LABELS)
    assert (gain > 0).all(), gain


def test_dit_ddpm_scheduler_runs_with_its_variance():
    pipe = tiny_dit_pipeline(DDPMScheduler(clip_sample=False))
    out = guided_dit_pipeline(pipe, LABELS, generator=_generator(), num_inference_steps=10, output_type="np").images
    assert out.shape == (3, 8, 8, 3) and (out >= 0).all() and (out <= 1).all()
    with pytest.raises(ValueError, match="clip_sample=True"):
        guided_dit_pipeline(tiny_dit_pipeline(DDIMScheduler()), LABELS, num_inference_steps=10)


# --- UNet2DModel + DDPM / DDIM ---------------------------------------------------------------

def test_adapter_eps_equals_unet_output():
    unet = tiny_unet(num_classes=10)
    chain = scheduler_chain(DDPMScheduler(variance_type="fixed_large"), 20)
    model = DiffusersEpsModel(unet, chain)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([950, 450]), torch.tensor([4, 7])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), unet(x, t, class_labels=y).sample)
        small = DiffusersEpsModel(unet, scheduler_chain(DDPMScheduler(), 20))(x, t, y)
    assert torch.equal(small[:, :3], unet(x, t, class_labels=y).sample) and (small[:, 3:] == -1).all()
    assert model.class_conditional and model.num_classes == 10


@pytest.mark.parametrize("variance,prediction", [("fixed_small", "epsilon"), ("fixed_large", "epsilon"),
                                                 ("fixed_small_log", "v_prediction"), ("fixed_small", "sample")])
def test_unguided_equals_ddpm_pipeline(variance, prediction):
    pipe = DDPMPipeline(tiny_unet(), DDPMScheduler(variance_type=variance, prediction_type=prediction))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, generator=_generator(), num_inference_steps=20, output_type="pt").images
    got = guided_ddpm_pipeline(pipe, batch_size=2, generator=_generator(), num_inference_steps=20,
                               output_type="pt").images
    # "sample" goes through eps and back, which rounds at the last steps' small sqrt(1 - abar).
    assert (got - expected).abs().max() <= (1e-4 if prediction == "sample" else 1e-5)


def test_unguided_equals_ddim_pipeline_with_eta():
    pipe = DDIMPipeline(tiny_unet(), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, generator=_generator(), num_inference_steps=20, eta=0.5,
                    use_clipped_model_output=True, output_type="pt").images
    got = guided_ddpm_pipeline(pipe, batch_size=2, generator=_generator(), num_inference_steps=20, eta=0.5,
                               output_type="pt").images
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("use_ddim", [False, True], ids=["ddpm", "ddim"])
def test_unet_guidance_raises_objective(use_ddim):
    scheduler = DDIMScheduler() if use_ddim else DDPMScheduler()
    pipe = DDPMPipeline(tiny_unet(num_classes=10), scheduler)
    guidance = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0, marginal_temperature=0.5)
    kwargs = dict(class_labels=LABELS, num_inference_steps=20, output_type="pt")
    plain = guided_ddpm_pipeline(pipe, generator=_generator(), **kwargs).images
    guided = guided_ddpm_pipeline(pipe, guidance=guidance, classifier_scale=3.0, gamma_factor=0 if use_ddim else 0.3,
                                  generator=_generator(), **kwargs).images
    assert torch.isfinite(guided).all()
    gain = _objective(guidance, guided, LABELS) - _objective(guidance, plain, LABELS)
    assert (gain > 0).all(), gain


def test_chain_mapping():
    chain = scheduler_chain(DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"), 50)
    assert (chain.beta_schedule, chain.timestep_respacing, chain.variance) == ("cosine", "50", "fixed_small")
    assert scheduler_chain(DDPMScheduler(), 1000).timestep_respacing is None
    assert scheduler_chain(DDIMScheduler(), 25).timestep_respacing == "ddim25"
    adm_betas = GaussianDiffusion.create(1000, "linear", None).betas
    assert scheduler_chain(DDPMScheduler(trained_betas=adm_betas), 20).beta_schedule == "linear"


@pytest.mark.parametrize("scheduler,match", [
    (DDPMScheduler(beta_schedule="scaled_linear"), "betas differ"),
    (DDPMScheduler(beta_start=0.001), "betas differ"),
    (DDPMScheduler(timestep_spacing="trailing"), "respacings"),
    (DDIMScheduler(steps_offset=1), "respacings"),
    (DDIMScheduler(set_alpha_to_one=False), "respacings"),
    (DDPMScheduler(variance_type="learned"), "variance_type"),
    (DDPMScheduler(thresholding=True), "thresholding"),
    (DDPMScheduler(clip_sample_range=2.0), "clip_sample_range"),
    (EulerDiscreteScheduler(), "not supported"),
], ids=["scaled_linear", "beta_start", "trailing", "steps_offset", "final_alpha", "learned", "thresholding",
        "clip_range", "euler"])
def test_chains_without_exact_equivalent_are_refused(scheduler, match):
    with pytest.raises(ValueError, match=match):
        scheduler_chain(scheduler, 20)


def test_learned_range_needs_variance_channels():
    with pytest.raises(ValueError, match="learned_range"):
        DiffusersEpsModel(tiny_unet(), scheduler_chain(DDPMScheduler(variance_type="learned_range"), 20))
