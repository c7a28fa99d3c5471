"""The guided samplers, each a settings dataclass, a sampler function with its original
keyword signature, and one pure step function (paper Algorithms 1-3; EDM2 beyond the paper)."""
from .ddpm import DDPMSettings, ddpm_sampler, ddpm_step
from .dit import DiTSettings, dit_sampler, dit_step
from .edm import EDMSettings, edm_sampler, edm_step
from .edm2 import EDM2Settings, edm2_sampler, edm2_step
from .settings import SamplerSettings

# Settings class -> the sampler function that takes it.
SAMPLERS = {EDMSettings: edm_sampler, DDPMSettings: ddpm_sampler, DiTSettings: dit_sampler,
            EDM2Settings: edm2_sampler}
SETTINGS_BY_NAME = {cls.name: cls for cls in SAMPLERS}


def sampler_for(settings: SamplerSettings):
    """The sampler function of a settings object."""
    try:
        return SAMPLERS[type(settings)]
    except KeyError:
        raise TypeError(f"settings: expected one of {', '.join(c.__name__ for c in SAMPLERS)}, "
                        f"got {type(settings).__name__}") from None


__all__ = ["DDPMSettings", "DiTSettings", "EDM2Settings", "EDMSettings", "SAMPLERS", "SETTINGS_BY_NAME",
           "SamplerSettings", "ddpm_sampler", "ddpm_step", "dit_sampler", "dit_step", "edm2_sampler", "edm2_step",
           "edm_sampler", "edm_step", "sampler_for"]
