"""Multi-process generation under torchrun: setup, barriers, and output from rank 0 alone.

Generation ranks share nothing but barriers: each writes its own files, and no image is ever
gathered. The step search, which scores small sample sets in memory, gathers them
(`gather_objects`) and shares rank 0's decisions (`broadcast_from_main`).
Run as plain `python` (no torchrun environment), everything here degrades to a single process
without a process group.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as torch_dist
from tqdm import tqdm


def init_distributed() -> tuple[int, int, torch.device]:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK) and picks the
    device: `cuda:LOCAL_RANK` with the nccl backend where CUDA is available, else the CPU with gloo.

    Returns (rank, world_size, device). Without torchrun's environment, or with a world of one,
    no process group is created: (0, 1, cuda or cpu).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset; launch with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch_dist.init_process_group(backend="nccl", init_method="env://", device_id=device)
    else:
        device = torch.device("cpu")
        torch_dist.init_process_group(backend="gloo", init_method="env://")
    return rank, world_size, device


def get_rank() -> int:
    """This process's rank: 0 without a process group."""
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes: 1 without a process group."""
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one process that prints."""
    return get_rank() == 0


def barrier() -> None:
    """Waits for every rank; a no-op without a process group."""
    if torch_dist.is_initialized():
        torch_dist.barrier()


def gather_objects(value) -> list:
    """Every rank's picklable `value`, in rank order, on every rank ([value] without a process
    group). For small results (a search candidate's images and labels), never a run's output."""
    if not torch_dist.is_initialized():
        return [value]
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value):
    """Rank 0's picklable `value`, on every rank (so that all ranks act on one decision)."""
    if not torch_dist.is_initialized():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """Leaves the process group, if one was joined."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def print_main(message: str) -> None:
    """Prints `message` to stderr on rank 0 only."""
    if is_main():
        print(message, file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "img", per_rank: bool = True) -> tqdm:
    """A progress bar shown by rank 0 only. With `per_rank` it counts rank 0's images scaled by
    the world size: an estimate of the whole run's images/s and ETA without any communication
    between ranks; without it, units every rank completes together (a search's candidates)."""
    world_size = get_world_size()
    scale = world_size if per_rank and world_size > 1 else False
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, disable=not (enabled and is_main()),
                file=sys.stderr, dynamic_ncols=True)


__all__ = ["barrier", "broadcast_from_main", "gather_objects", "get_rank", "get_world_size", "init_distributed",
           "is_main", "print_main", "progress_bar", "shutdown"]
