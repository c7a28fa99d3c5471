"""Guidance: the calibrated objective, classifier preconditioning, schedules."""
from .classifier import ClassifierGuidance
from .clip import CLIPGuidance, load_clip
from .objective import calibrated_objective, objective_logit_grad
from .precondition import precondition_classifier
from .schedules import GuidanceInterval, ddpm_sine_add, edm_guidance_weights, sine_factor
from .settings import GuidanceSettings

__all__ = ["ClassifierGuidance", "CLIPGuidance", "load_clip", "calibrated_objective", "objective_logit_grad", "precondition_classifier",
           "GuidanceInterval", "GuidanceSettings", "ddpm_sine_add", "edm_guidance_weights", "sine_factor"]
