"""Guidance: the calibrated objective, classifier preconditioning, schedules."""
from .classifier import ClassifierGuidance
from .clip import CLIPGuidance, load_clip
from .objective import calibrated_objective, objective_logit_grad
from .precondition import precondition_classifier
from .schedules import GuidanceInterval, ddpm_sine_add, edm_guidance_weights, sine_factor

__all__ = ["ClassifierGuidance", "CLIPGuidance", "load_clip", "calibrated_objective", "objective_logit_grad", "precondition_classifier",
           "GuidanceInterval", "ddpm_sine_add", "edm_guidance_weights", "sine_factor"]
