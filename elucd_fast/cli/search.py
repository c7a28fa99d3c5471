"""`elucd-fast search`: AutoDiffusion's step search for a preset at a number of network
evaluations (stage 1: the trajectory DP; stage 2: the evolutionary search on fixed seeds; the
best re-scored on disjoint seeds), into OUTDIR:

    search.json     every candidate and its scores, the seeds, timings, network evaluations spent
                    (rewritten after each candidate: rerunning the same command resumes)
    schedule.json   the declared schedule (`generate --schedule schedule.json` runs it)
    search.png      fitness per generation; the winner beside the DP and every analytic family

With --prune (or --cache) the steps are searched together with a block plan per step (bypassed
blocks, or DeepCache's reused deep feature) under a budget of measured seconds per image, and the
winner's plans go into schedule.json.

Bad flags exit with status 2 before anything is loaded or written.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..engine import COMPILE_MODES, FUSED_CHOICES, PRECISIONS, configure_job
from ..presets import list_presets
from ..runs import dist, parse_seeds
from ..runs.atomic import check_writable
from ._options import (DEVICE, checkpoint_options, configure_preset, default_device, file_overrides, flag_name,
                       settings_options, usage_errors)

# Below this many seeds a Fréchet distance is mostly noise (and the digits features are 64-d).
MIN_SEEDS = 100
# Flags that set the steps, which the search chooses.
_STEP_FLAGS = ("num_steps", "sigmas", "timesteps", "timestep_respacing")


@click.command("search")
@click.option("--preset", default="digits", show_default=True, type=click.Choice(list_presets()),
              help="Named configuration whose steps are searched.")
@click.option("--nfe", type=int, required=True,
              help="Network evaluations per image of the searched schedule (Heun: 2N - 1 for N steps; the "
                   "multistep solvers and DDPM/DDIM: N).")
@click.option("--metric", default=None, help="Fitness, lower is better: fd_acc (digits: FD + 100 (1 - class "
              "accuracy)), fd (digits), fid, fd_dinov2 [default: fd_acc for digits presets, else fid].")
@click.option("--search-seeds", default="0-499", show_default=True,
              help="The fixed seeds every candidate is scored on.")
@click.option("--selection-seeds", default="20000-21999", show_default=True,
              help="Disjoint seeds on which the best candidates are re-scored before one is declared.")
@click.option("--rescore", type=int, default=3, show_default=True,
              help="Best search candidates re-scored on the selection seeds (beside the DP's and the families').")
@click.option("--pilot-seeds", default="50000-50127", show_default=True, help="The trajectory DP's pilot seeds.")
@click.option("--dp-steps", type=int, default=40, show_default=True,
              help="Steps of the DP's teacher (its grid); 0 skips the DP.")
@click.option("--grid-size", type=int, default=200, show_default=True,
              help="Log-uniform noise levels on which EDM/EDM2 steps are searched (ADM chains: every timestep).")
@click.option("--population", type=int, default=16, show_default=True, help="Candidates per generation.")
@click.option("--generations", type=int, default=6, show_default=True, help="Generations after the first.")
@click.option("--parents", type=int, default=6, show_default=True, help="Best candidates ever seen that breed.")
@click.option("--mutants", type=int, default=8, show_default=True, help="Mutated children per generation.")
@click.option("--crossovers", type=int, default=5, show_default=True, help="Crossed children per generation.")
@click.option("--mutation-probability", type=float, default=0.25, show_default=True,
              help="Chance that a mutant redraws each step.")
@click.option("--search-seed", type=int, default=0, show_default=True, help="Seed of the search's own choices.")
@click.option("--search-guidance/--no-search-guidance", default=False, show_default=True,
              help="Search the guidance settings jointly with the steps (wmax and add factor, classifier scale and "
                   "gamma, or EDM2's guide weight).")
@click.option("--prune", "plan_mode", flag_value="prune", default=None,
              help="Also search which network blocks each step bypasses (AutoDiffusion's second stage), under --budget.")
@click.option("--cache", "plan_mode", flag_value="cache",
              help="Also search which steps reuse a cached deep decoder feature (DeepCache), under --budget.")
@click.option("--budget", type=float, default=0.75, show_default=True,
              help="With --prune/--cache: measured seconds per image allowed, as a fraction of the NFE schedule's "
                   "cost with every block run.")
@click.option("--max-fraction", type=float, default=0.5, show_default=True,
              help="With --prune/--cache: the final allowed fraction of bypassed blocks per step (or of reusing steps).")
@click.option("--steps-generations", type=int, default=2, show_default=True,
              help="With --prune/--cache: generations that search the steps alone before pruning ramps up.")
@click.option("--extra-steps", type=int, default=2, show_default=True,
              help="With --prune/--cache: steps a candidate may have beyond the NFE schedule's (bought with pruning).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Reference statistics for fid / fd_dinov2 (`elucd-fast fid ref`).")
@click.option("--inception", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inception weights file for fid.")
@click.option("--dinov2", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local DINOv2 folder for fd_dinov2.")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: out/search-PRESET-nfeN].")
@click.option("--batch", "batch_size", type=int, default=500, show_default=True, help="Images per sampler call.")
@click.option("--guidance/--no-guidance", default=None, help="Classifier guidance on or off [default: the preset's].")
@click.option("--sampler", type=click.Choice(["edm", "ddpm"]), default=None,
              help="The digits presets' sampler [default: the preset's].")
@settings_options
@checkpoint_options
@click.option("--device", type=DEVICE, default=None, help="[default: under torchrun cuda:LOCAL_RANK or cpu; else cuda "
              "if available, else cpu]")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Network precision (as `generate`).")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_MODES), default="off", show_default=True,
              help="torch.compile one whole guided step (as `generate`).")
@click.option("--fused", type=click.Choice(FUSED_CHOICES), default="off", show_default=True,
              help="Fused kernels for the guided update (as `generate`).")
@click.option("--progress/--no-progress", default=True)
def command(preset: str, nfe: int, metric: str | None, search_seeds: str, selection_seeds: str, rescore: int,
            pilot_seeds: str, dp_steps: int, grid_size: int, population: int, generations: int, parents: int,
            mutants: int, crossovers: int, mutation_probability: float, search_seed: int, search_guidance: bool,
            plan_mode: str | None, budget: float, max_fraction: float, steps_generations: int, extra_steps: int,
            reference: Path | None, inception: Path | None, dinov2: Path | None, outdir: Path | None,
            batch_size: int, device: str | None, precision: str, compile_mode: str, fused: str, progress: bool,
            **settings) -> None:
    """Search the step sequence of a preset at NFE network evaluations per image.

    \b
    Examples:
      elucd-fast search --preset digits --nfe 5                     # ~3 min on 2 idle CPU cores
      elucd-fast search --preset digits --nfe 5 --solver ipndm      # the multistep solver
      elucd-fast search --preset digits-ddpm --nfe 4 --ddim --gamma-factor 0
      elucd-fast search --preset digits --nfe 5 --prune             # steps + bypassed blocks per step
      elucd-fast generate --preset digits --schedule out/search-digits-nfe5/schedule.json
      torchrun --standalone --nproc_per_node 2 -m elucd_fast search --preset digits --nfe 5
    """
    from ..search import EvolutionSettings, Fitness, SearchSettings, StepSearch, check_metric, steps_for_evaluations
    from ..search.plan_search import PlanSearch, PlanSettings
    from ..tools.block_costs import SAMPLERS_WITH_PLANS
    from ..search.fitness import reference_scorer
    from ..search.space import default_guidance_axes

    files = file_overrides(settings)
    given_steps = [flag_name(k) for k in _STEP_FLAGS if settings.get(k) is not None]
    if given_steps:
        raise click.UsageError(f"{', '.join(given_steps)}: the search chooses the steps; set --nfe instead")
    overrides = {key: value for key, value in settings.items() if value is not None}
    configured, _ = configure_preset(preset, overrides, None)
    digits = hasattr(configured, "scorer")
    metric = metric or ("fd_acc" if digits else "fid")
    chosen_metric = usage_errors(lambda: check_metric(metric, digits=digits))
    if not digits and reference is None:
        raise click.UsageError(f"--reference: the {metric} metric needs reference statistics (`elucd-fast fid ref`)")
    usage_errors(lambda: steps_for_evaluations(configured.settings, nfe))
    seed_sets = {}
    for name, text in (("--search-seeds", search_seeds), ("--selection-seeds", selection_seeds)):
        seed_sets[name] = usage_errors(lambda: parse_seeds(text))
        if len(seed_sets[name]) < MIN_SEEDS:
            raise click.UsageError(f"{name}: {len(seed_sets[name])} seed(s) are too few to score a Fréchet distance; "
                                   f"give at least {MIN_SEEDS}")
    pilots = usage_errors(lambda: parse_seeds(pilot_seeds))
    for name, value, low in (("--rescore", rescore, 1), ("--dp-steps", dp_steps, 0), ("--grid-size", grid_size, 2),
                             ("--batch", batch_size, 1)):
        if value < low:
            raise click.UsageError(f"{name}: must be at least {low}, got {value}")
    if dp_steps and dp_steps < 2 * nfe:
        raise click.UsageError(f"--dp-steps: the DP's teacher needs more steps than the searched schedule; "
                               f"give at least {2 * nfe} (or 0: no DP)")
    evolution = usage_errors(lambda: EvolutionSettings(
        population=population, parents=parents, mutants=mutants, crossovers=crossovers,
        mutation_probability=mutation_probability, generations=generations, seed=search_seed))
    axes = usage_errors(lambda: default_guidance_axes(configured.settings, classifier_guided=bool(
        getattr(configured, "guidance", False)))) if search_guidance else ()
    search_settings = usage_errors(lambda: SearchSettings(
        nfe=nfe, metric=metric, search_seeds=tuple(seed_sets["--search-seeds"]),
        selection_seeds=tuple(seed_sets["--selection-seeds"]), rescore=rescore, pilot_seeds=tuple(pilots),
        dp_steps=dp_steps, grid_size=grid_size, evolution=evolution, guidance_axes=axes))
    plan_settings = None
    if plan_mode is not None:
        if search_guidance:
            raise click.UsageError("--search-guidance: not with --prune/--cache (search the guidance first)")
        plan_settings = usage_errors(lambda: PlanSettings(mode=plan_mode, budget=budget, max_fraction=max_fraction,
                                                          steps_generations=steps_generations,
                                                          extra_steps=extra_steps, cost_batch=batch_size))
        if configured.settings.name not in SAMPLERS_WITH_PLANS:
            raise click.UsageError(f"--{plan_mode}: block costs are measured for the {', '.join(SAMPLERS_WITH_PLANS)} "
                                   f"samplers' networks; preset {preset!r} uses the {configured.settings.name} sampler")
    outdir = outdir or Path("out") / f"search-{preset}-nfe{nfe}{'-' + plan_mode if plan_mode else ''}"
    usage_errors(lambda: check_writable(outdir, "--outdir", directory=True))

    _, _, dist_device = dist.init_distributed()
    device = device or (str(dist_device) if dist.get_world_size() > 1 else default_device())
    job = usage_errors(lambda: configured.build(device=device, **files))
    for note in job.notes:
        dist.print_main(note)
    job, choices = usage_errors(lambda: configure_job(job, precision=precision, compile=compile_mode,
                                                      cuda_graphs=False, fused=fused,
                                                      num_images=len(search_settings.search_seeds)))
    for line in choices:
        dist.print_main(line)
    if digits:
        scorer = configured.scorer()
    else:
        scorer = usage_errors(lambda: reference_scorer(reference, chosen_metric, weights_path=inception,
                                                       dinov2_path=dinov2, device=device))
    fitness = Fitness(job, scorer, chosen_metric, batch_size=batch_size)
    if plan_settings is not None:
        search = usage_errors(lambda: PlanSearch(job, fitness, search_settings, plan_settings, outdir, preset=preset,
                                                 progress=progress))
    else:
        search = usage_errors(lambda: StepSearch(job, fitness, search_settings, outdir, preset=preset,
                                                 progress=progress))
    summary = usage_errors(search.run)
    winner = summary["winner"]
    shown = {"steps": winner["steps"], "source": winner["source"], "score": winner["selection"]["score"],
             **({"seconds_per_image_estimate": winner["seconds_per_image_estimate"]} if plan_mode else {}),
             **{k: winner["selection"][k] for k in ("fd_digits", "class_accuracy") if k in winner["selection"]},
             "network_evaluations_spent": summary["network_evaluations_total"]}
    click.echo(f"{outdir}: {json.dumps(shown)}")
    dist.shutdown()
