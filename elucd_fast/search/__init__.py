"""AutoDiffusion's step search in the engine: candidate spaces (`space`), the trajectory-matching
DP (`trajectory_dp`), the evolutionary search (`evolution`), fitness on fixed seeds (`fitness`),
the resumable state (`state`), charts (`report`), and the whole search (`step_search`).

It drives presets, runs and metrics, never the other way round.
"""
from .evolution import EvolutionSettings, evolve
from .fitness import METRICS, Fitness, check_metric
from .space import Candidate, GuidanceAxis, StepSpace
from .step_search import SearchSettings, StepSearch, analytic_families, steps_for_evaluations
from .trajectory_dp import best_path, teacher_costs

__all__ = ["METRICS", "Candidate", "EvolutionSettings", "Fitness", "GuidanceAxis", "SearchSettings", "StepSearch",
           "StepSpace", "analytic_families", "best_path", "check_metric", "evolve", "steps_for_evaluations",
           "teacher_costs"]
