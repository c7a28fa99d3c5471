"""Model architectures compatible with the public checkpoints, and their safe loaders."""
from .adm_unet import adm_model_flags, create_adm_model, load_adm_model
from .block_plan import BlockPlan
from .classifiers import load_classifier
from .denoiser import DenoiserEpsModel, EpsModelDenoiser
from .dit import DiT_models, load_dit, load_sd_vae
from .edm2_encoders import StabilityVAEEncoder, StandardRGBEncoder
from .edm2_networks import EDM2_CONFIGS, EDM2Precond, EDM2UNet, edm2_config
from .edm_networks import DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond, iDDPMPrecond
from .edm_pickle import describe_edm_pickle, load_edm_network
from .info import describe_checkpoint

__all__ = ["adm_model_flags", "BlockPlan", "create_adm_model", "load_adm_model", "load_classifier", "DenoiserEpsModel",
           "EpsModelDenoiser", "DiT_models", "load_dit", "load_sd_vae", "DhariwalUNet", "EDMPrecond", "SongUNet",
           "VEPrecond", "VPPrecond", "iDDPMPrecond", "describe_edm_pickle", "load_edm_network", "describe_checkpoint",
           "EDM2_CONFIGS", "EDM2Precond", "EDM2UNet", "edm2_config", "StabilityVAEEncoder", "StandardRGBEncoder"]
