"""torch.compile of one whole guided sampler step (denoiser forward(s), classifier forward and
input gradient, update).

The samplers pass every per-step value as a 0-d tensor, so one compiled graph serves all steps;
only the step's flags (guided or not, Heun or last step) select among a handful of graphs.
Compile time is measured apart from run time.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping

import torch

COMPILE_MODES = ("off", "on", "auto")

# `auto` compiles when the job is large enough to repay compilation: on CUDA a real-size
# guided step compiles in about a minute and the whole run must be long compared with that.
AUTO_COMPILE_MIN_IMAGES_CUDA = 2000


def resolve_compile(compile: str, *, num_images: int, device: torch.device | str) -> tuple[bool, str]:
    """(whether to compile, why) for `compile` in COMPILE_MODES."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile: expected one of {COMPILE_MODES}, got {compile!r}")
    if compile != "auto":
        return compile == "on", f"compile {compile} (requested)"
    if torch.device(device).type != "cuda":
        return False, ("compile auto: off on CPU (inductor's CPU convolutions gain little over oneDNN "
                       "and compiling a real-size net takes minutes); use --compile on to force it")
    if num_images < AUTO_COMPILE_MIN_IMAGES_CUDA:
        return False, f"compile auto: off for {num_images} images (< {AUTO_COMPILE_MIN_IMAGES_CUDA}: compiling would not repay)"
    return True, f"compile auto: on for {num_images} images"


def _dynamo_compile_seconds() -> float:
    """Seconds dynamo has spent compiling so far in this process."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def _flag_key(value):
    """A hashable key of a step flag's value: a block plan's keyword mapping counts by its plan;
    the run's block cache (a plain dict, the same object all run long) by nothing (dynamo still
    guards on its content, so the first store into it compiles once more)."""
    if type(value) is dict:
        return ("dict",)
    if isinstance(value, Mapping):
        return tuple(sorted((key, _flag_key(item)) for key, item in value.items()))
    return value


def step_variant_key(flags: Mapping) -> tuple:
    """The hashable key of a step's keyword flags: which compiled (or captured) variant it runs."""
    return tuple(sorted((name, _flag_key(value)) for name, value in flags.items()))


class CompiledStepRunner:
    """Maps a sampler's step function to its torch.compile'd version.

    Args:
        backend: torch.compile backend ("inductor"; "aot_eager" traces without code
            generation and is what fast tests use).
        mode: torch.compile mode (None, "max-autotune-no-cudagraphs", "reduce-overhead", ...).
        fullgraph: refuse graph breaks (an error instead of a silently slower step).

    After a run, `compile_seconds` holds the time spent compiling (apart from running) and
    `graphs` the number of distinct compiled step variants.
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, fullgraph: bool = False):
        self.backend, self.mode, self.fullgraph = backend, mode, fullgraph
        self.compile_seconds = 0.0
        self.variants: set[tuple] = set()

    @property
    def graphs(self) -> int:
        return len(self.variants)

    def __call__(self, step: Callable) -> Callable:
        compiled = torch.compile(step, backend=self.backend, mode=self.mode, fullgraph=self.fullgraph, dynamic=False)

        @functools.wraps(step)
        def run(*args, **flags):
            key = step_variant_key(flags)
            if key in self.variants:
                return compiled(*args, **flags)
            # First call of a variant: compile and run; the compile part is counted apart.
            self.variants.add(key)
            before, start = _dynamo_compile_seconds(), time.perf_counter()
            out = compiled(*args, **flags)
            spent = _dynamo_compile_seconds() - before
            self.compile_seconds += spent if spent > 0 else time.perf_counter() - start
            return out

        return run
