"""elucd-fast: off-the-shelf classifier guidance for diffusion models (EluCD).

Public API (stable names; see the README's "Use as a library"):
    edm_sampler, ddpm_sampler, dit_sampler guided samplers (paper Algorithms 2, 1 and 3)
    edm2_sampler                           EDM2's sampler (guide network) with the classifier term
    EDMSettings, DDPMSettings,             their settings, validated once
    DiTSettings, EDM2Settings
    ClassifierGuidance, CLIPGuidance       calibrated guidance through a frozen classifier / CLIP
    GuidanceSettings                       Softplus beta and the two temperatures
    calibrated_objective                   J = tau_j l_y - logsumexp(tau_m l)
    GuidanceInterval                       which steps are guided
    family_steps, STEP_FAMILIES            analytic step families (EDM rho, logSNR, ADM even, DDIM
                                           leading / trailing) -> settings.with_steps(steps)
    ScheduleFile, read_schedule,           schedule files (a searched step sequence and what it
    write_schedule, apply_schedule         was searched for), read checked, applied to settings
    StackedRandomGenerator                 one generator per seed
    EpsModelDenoiser, DenoiserEpsModel     k-diffusion-style views between model kinds
    load_classifier, load_edm_network,     safe loaders of the public checkpoints (local files)
    load_adm_model, load_dit
    generate, run_generation               per-seed sample sets, sharded and resumable
    compute_metrics, build_reference       FID / IS / precision-recall / KID via torch-fidelity
"""
from .metrics.evaluate import build_reference, compute_metrics
from .guidance import (CLIPGuidance, ClassifierGuidance, GuidanceInterval, GuidanceSettings, calibrated_objective,
                       objective_logit_grad)
from .guidance.latent import VAEDecoder, decode_latents
from .models import BlockPlan, DenoiserEpsModel, EpsModelDenoiser, load_adm_model, load_classifier, load_dit, load_edm_network
from .rng import StackedRandomGenerator
from .runs import generate, parse_seeds, run_generation
from .samplers import (DDPMSettings, DiTSettings, EDM2Settings, EDMSettings, ddpm_sampler, dit_sampler, edm2_sampler,
                       edm_sampler)
from .schedules.families import STEP_FAMILIES, family_steps
from .schedules.schedule_file import ScheduleFile, apply_schedule, read_schedule, write_schedule

__version__ = "0.1.0"

__all__ = ["BlockPlan", "edm_sampler", "ddpm_sampler", "dit_sampler", "edm2_sampler", "EDMSettings", "DDPMSettings", "DiTSettings",
           "EDM2Settings",
           "decode_latents", "VAEDecoder", "ClassifierGuidance", "CLIPGuidance", "GuidanceSettings",
           "GuidanceInterval", "calibrated_objective", "objective_logit_grad", "StackedRandomGenerator",
           "EpsModelDenoiser", "DenoiserEpsModel", "load_classifier", "load_edm_network", "load_adm_model",
           "load_dit", "generate", "parse_seeds", "run_generation", "compute_metrics", "build_reference", "STEP_FAMILIES",
           "family_steps", "ScheduleFile", "read_schedule", "write_schedule", "apply_schedule"]
