"""elucd-fast: off-the-shelf classifier guidance for diffusion models (EluCD).

Public API (stable names; see the README's "Use as a library"):
    edm_sampler, ddpm_sampler            guided samplers (paper Algorithms 2 and 1)
    ClassifierGuidance                   calibrated guidance through a frozen classifier
    calibrated_objective                 J = tau_j l_y - logsumexp(tau_m l)
    GuidanceInterval                     which steps are guided
    StackedRandomGenerator               one generator per seed
    EpsModelDenoiser, DenoiserEpsModel   k-diffusion-style views between model kinds
"""
from .guidance import ClassifierGuidance, GuidanceInterval, calibrated_objective, objective_logit_grad
from .models.denoiser import DenoiserEpsModel, EpsModelDenoiser
from .rng import StackedRandomGenerator
from .samplers.ddpm import ddpm_sampler
from .samplers.edm import edm_sampler

__version__ = "0.1.0"

__all__ = ["edm_sampler", "ddpm_sampler", "ClassifierGuidance", "GuidanceInterval", "calibrated_objective",
           "objective_logit_grad", "StackedRandomGenerator", "EpsModelDenoiser", "DenoiserEpsModel"]
