"""CUDA-graph capture of one whole sampler step, replayed for every step.

A step function is pure (its noise is an input, drawn outside by the per-seed generators),
so each variant (flag combination) is captured once with static input buffers and replayed:
one launch per step instead of hundreds, and no host synchronisation. The noise stays exactly
the per-seed generators' noise, so images do not change with the batch or the capture.

Capture can fail (an op that syncs, a network that allocates on the host): then that variant
runs uncaptured and the runner says so once, with the reason.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .compile import step_variant_key


class CudaGraphAPI:
    """The CUDA calls the runner makes, gathered so tests on machines without CUDA can
    substitute a recording stand-in."""

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, pool, fn: Callable):
        """Records `fn()` into `graph` and returns its outputs (the static output buffers)."""
        with torch.cuda.graph(graph, pool=pool):
            return fn()

    def side_stream(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(stream), stream

    def join(self, stream):
        torch.cuda.current_stream().wait_stream(stream)

    def pool_of(self, graph):
        return graph.pool()


@dataclass
class _Captured:
    graph: Any
    static_inputs: list  # tensors in the flattened argument order, None for non-tensors
    constants: list  # the non-tensor leaves the graph was captured with
    spec: Any
    outputs: Any


class CUDAGraphStepRunner:
    """Maps a step function to a captured-and-replayed version.

    Args:
        warmup: eager calls on a side stream before capture (library workspaces, lazy init).
        api: the CUDA calls (tests pass a stand-in).

    Outputs of a replay live in static buffers that the next replay of the same variant
    overwrites; the samplers only read them before the next step.
    """

    def __init__(self, warmup: int = 1, api: CudaGraphAPI | None = None):
        self.warmup = warmup
        self.api = api or CudaGraphAPI()
        self.captured: dict[tuple, _Captured | None] = {}
        self.fallbacks: dict[tuple, str] = {}
        self._pool = None

    def __call__(self, step: Callable) -> Callable:
        @functools.wraps(step)
        def run(*args, **flags):
            key = step_variant_key(flags)
            if key not in self.captured:
                plan = flags.get("net_extra", {}).get("block_plan")
                if plan is not None and (plan.store is not None or plan.reuse is not None):
                    # A replay's outputs live in static buffers the next replay overwrites, and a
                    # captured read of the cache would keep reading the capture's tensor.
                    self.fallbacks[key] = "block plans that store or reuse a cached feature run without a graph"
                    self.captured[key] = None
                else:
                    self.captured[key] = self._capture(step, args, flags, key)
            entry = self.captured[key]
            if entry is None:
                return step(*args, **flags)
            leaves, spec = tree_flatten(args)
            if spec != entry.spec or any(
                    static is None and leaf is not constant and leaf != constant
                    for leaf, static, constant in zip(leaves, entry.static_inputs, entry.constants)):
                raise ValueError("cuda_graphs: a captured step was called with other networks or settings; "
                             "a runner serves one sampler run")
            for leaf, static in zip(leaves, entry.static_inputs):
                if static is not None and leaf is not static:
                    static.copy_(leaf)
            entry.graph.replay()
            return entry.outputs

        return run

    def _capture(self, step: Callable, args: tuple, flags: dict, key: tuple) -> _Captured | None:
        leaves, spec = tree_flatten(args)
        static_inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
        constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_args = tree_unflatten([s if s is not None else c for s, c in zip(static_inputs, constants)], spec)
        try:
            context, stream = self.api.side_stream()
            with context:
                for _ in range(self.warmup):
                    step(*static_args, **flags)
            self.api.join(stream)
            graph = self.api.new_graph()
            outputs = self.api.capture(graph, self._pool, lambda: step(*static_args, **flags))
            if self._pool is None:
                self._pool = self.api.pool_of(graph)
        except Exception as err:  # capture fails in many ways; each is reported, then run eagerly
            reason = f"{type(err).__name__}: {err}"
            self.fallbacks[key] = reason
            warnings.warn(f"cuda_graphs: capture of step variant {dict(flags)} failed ({reason}); "
                          "running that variant without a graph", RuntimeWarning, stacklevel=3)
            return None
        return _Captured(graph, static_inputs, constants, spec, outputs)
