"""Integrations: EluCD guidance embedded in other diffusion toolkits.

    kdiffusion   GuidedDenoiser (any k-diffusion sampler becomes EluCD-guided),
                 as_kdiffusion_denoiser / from_kdiffusion (EDM interface <-> k-diffusion protocol)
    diffusers    guided_dit_pipeline, guided_ddpm_pipeline (diffusers pipelines run by our
                 samplers), DiffusersEpsModel, scheduler_chain

Neither module imports k-diffusion; `diffusers` imports diffusers only where it is used, so
importing this package needs neither.
"""
from .kdiffusion import GuidedDenoiser, KDiffusionDenoiser, KDiffusionNetwork, as_kdiffusion_denoiser, from_kdiffusion

__all__ = ["GuidedDenoiser", "KDiffusionDenoiser", "KDiffusionNetwork", "as_kdiffusion_denoiser", "from_kdiffusion"]
