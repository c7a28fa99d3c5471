"""What each block of a network costs, measured: the budget of a block-plan search in seconds per
image (or FLOPs), not in blocks.

AutoDiffusion counts executed blocks, but blocks differ in cost by 10x or more (an attention layer
at 32x32 against a ResBlock at 8x8), and on a small network the per-call overheads that no block
owns can dominate. So the cost of a plan is measured where it will run: the job's network as the
engine configured it (precision, device), called at the job's batch size,

    full         one call with every block,
    skip b       one call bypassing block b alone, for every block id b,
    reuse k      one call reusing cache point k (after a call that stored it), for every k,

each timed `repeats` times round-robin (so a slow moment of a shared machine hits every variant
alike) with the profiler's clock (host marks on the CPU, CUDA events on CUDA), the median kept.
A plan's cost is then additive: full (or reuse k) minus the savings full - (skip b) of the blocks
it bypasses that still run (a bypassed block outside reuse k's shallow path saves nothing more).
FLOPs (matrix multiplies and convolutions) are counted the same way, exactly. `bench/` checks
the additive estimate against the measured time of whole plans.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from ..job import Job
from ..models.block_plan import BlockPlan, plan_fingerprint
from .profile import count_flops, device_timer

SAMPLERS_WITH_PLANS = ("edm", "edm2")  # jobs whose network has EDM's interface net(x, sigma, labels)


@dataclass(frozen=True)
class BlockCosts:
    """Per-image costs of one network call, measured at `batch_size` on `device` in `precision`.

    seconds: full call; skip_savings[b]: seconds saved by bypassing block b alone;
    reuse_seconds[k]: a call reusing cache point k; shallow[k]: the block ids that still run then.
    The same for FLOPs (`flops`, `skip_flop_savings`, `reuse_flops`).
    """

    network: str
    batch_size: int
    device: str
    precision: str
    seconds: float
    skip_savings: tuple[float, ...]
    reuse_seconds: tuple[float, ...]
    shallow: tuple[tuple[int, ...], ...]
    flops: int
    skip_flop_savings: tuple[int, ...]
    reuse_flops: tuple[int, ...]

    def call_seconds(self, plan: BlockPlan | None) -> float:
        """Estimated seconds per image of one network call under `plan` (None: every block)."""
        return self._call(plan, self.seconds, self.skip_savings, self.reuse_seconds)

    def call_flops(self, plan: BlockPlan | None) -> float:
        """FLOPs per image of one network call under `plan`."""
        return self._call(plan, self.flops, self.skip_flop_savings, self.reuse_flops)

    def _call(self, plan, full, savings, reuse):
        if plan is None:
            return full
        base, running = full, None
        if plan.reuse is not None:
            base, running = reuse[plan.reuse], set(self.shallow[plan.reuse])
        return base - sum(savings[b] for b in plan.skip if running is None or b in running)

    def json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> BlockCosts:
        values = dict(data)
        for key in ("skip_savings", "reuse_seconds", "skip_flop_savings", "reuse_flops"):
            values[key] = tuple(values[key])
        values["shallow"] = tuple(tuple(ids) for ids in values["shallow"])
        return cls(**values)


def _blocks_run(net, plan: BlockPlan, call) -> tuple[int, ...]:
    """The block ids whose modules `call()` (a call of `net` under `plan`) runs."""
    seen: set[int] = set()
    hooks = []
    for module in net.modules():
        if hasattr(module, "block_id"):
            ids = [module.block_id] + ([module.attention_id] if hasattr(module, "attention_id") else [])
            hooks.append(module.register_forward_pre_hook(lambda m, args, ids=ids: seen.update(ids)))
    try:
        call()
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(sorted(seen))


def measure_block_costs(job: Job, *, batch_size: int, repeats: int = 7, sigma: float = 1.0) -> BlockCosts:
    """The `BlockCosts` of `job`'s network at `batch_size` (see the module docstring).

    The network is called as the sampler calls it (EDM's interface, through the engine's
    precision wrapper if the job has one) on standard normal inputs times `sigma` (a network's
    cost does not depend on the noise level), with labels of class 0 for a conditional network.
    """
    if job.sampler not in SAMPLERS_WITH_PLANS:
        raise ValueError(f"block costs: measured for the {', '.join(SAMPLERS_WITH_PLANS)} samplers' networks, "
                         f"not the {job.sampler} sampler's")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"block costs: batch_size and repeats must be >= 1, got {batch_size}, {repeats}")
    net, device = job.net, torch.device(job.device)
    names = net.block_names()
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn((batch_size, *job.noise_shape), generator=generator, device=device) * sigma
    sigma_t = torch.tensor(sigma, device=device)
    labels = None
    if getattr(net, "label_dim", 0):
        labels = torch.zeros(batch_size, net.label_dim, device=device)
        labels[:, 0] = 1
    cache: dict = {}
    variants = [BlockPlan()] + [BlockPlan(frozenset({b})) for b in range(len(names))] + \
        [BlockPlan(reuse=k) for k in range(net.cache_points)]

    def call(plan: BlockPlan):
        return net(x, sigma_t, labels, block_plan=plan, block_cache=cache)

    with torch.no_grad():
        for k in range(net.cache_points):
            call(BlockPlan(store=k))
        for plan in variants:  # warm-up: first-call costs (allocator, kernel selection)
            call(plan)
        timer = device_timer(device)
        marks: list[list[tuple]] = [[] for _ in variants]
        for _ in range(repeats):
            for i, plan in enumerate(variants):
                start = timer.mark()
                call(plan)
                marks[i].append((start, timer.mark()))
                timer.synchronize()
        seconds = [statistics.median(timer.seconds(a, b) for a, b in m) / batch_size for m in marks]
        flops = [count_flops(lambda plan=plan: call(plan)) / batch_size for plan in variants]
        shallow = tuple(_blocks_run(net, BlockPlan(reuse=k), lambda k=k: call(BlockPlan(reuse=k)))
                        for k in range(net.cache_points))
    n = len(names)
    precision = str(getattr(net, "dtype", None) or next(iter(net.parameters())).dtype).removeprefix("torch.")
    return BlockCosts(
        network=plan_fingerprint(names), batch_size=batch_size, device=str(device), precision=precision,
        seconds=seconds[0], skip_savings=tuple(seconds[0] - s for s in seconds[1:n + 1]),
        reuse_seconds=tuple(seconds[n + 1:]), shallow=shallow,
        flops=int(flops[0]), skip_flop_savings=tuple(int(flops[0] - f) for f in flops[1:n + 1]),
        reuse_flops=tuple(int(f) for f in flops[n + 1:]))


__all__ = ["BlockCosts", "SAMPLERS_WITH_PLANS", "measure_block_costs"]
