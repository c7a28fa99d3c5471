"""Noise schedules, apart from the samplers that walk them (as k-diffusion keeps them): EDM's
sigma steps and churn, ADM's Gaussian-diffusion tables and the DDPM/DDIM step maths they define."""
from .edm import edm_churn, edm_sigma_steps
from .gaussian_diffusion import BETA_SCHEDULES, GaussianDiffusion, named_beta_schedule, space_timesteps

__all__ = ["BETA_SCHEDULES", "GaussianDiffusion", "edm_churn", "edm_sigma_steps", "named_beta_schedule",
           "space_timesteps"]
