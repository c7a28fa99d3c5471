"""Generation of large sample sets: per-seed noise, EDM's batching over ranks, resume, output.

An image depends only on its seed and the run's settings. Its latents and label come from its own
generator (`StackedRandomGenerator`) in EDM's draw order, and `sample_fn` must treat the samples
of a batch independently; then neither batch size, nor world size, nor the point a run resumed
from changes a single byte.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ..checks import check_int
from ..rng import StackedRandomGenerator, check_seeds
from . import dist
from .atomic import check_writable, remove_quietly
from .layout import RUN_FILE, SHARD_DIR, manifest_paths
from .lock import RunLock
from .outputs import SampleWriter, check_formats, finished_by_format
from .ownership import check_run_folder
from .run_config import check_run_config, write_run_config

RandnLike = Callable[[torch.Tensor], torch.Tensor]
# sample_fn(latents (B, *image_shape) float32, labels (B,) int64 or None, randn_like) -> images
# (B, C, H, W) float in [-1, 1]; randn_like draws each sample's noise from its own generator.
SampleFn = Callable[[torch.Tensor, torch.Tensor | None, RandnLike], torch.Tensor]


class GeneratedBatch(NamedTuple):
    """One batch of finished samples.

    images: uint8 (B, H, W, C) on the CPU; labels: int64 (B,) or None; seeds: B ints.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    seeds: list[int]


class NonFiniteSampleError(FloatingPointError):
    """A sample holds NaN or Inf; `seeds` names the samples concerned."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        shown = ", ".join(str(s) for s in self.seeds[:10])
        super().__init__(f"non-finite values (NaN or Inf) in the samples of seed(s) {shown}"
                         f"{' ...' if len(self.seeds) > 10 else ''}; nothing of their batch was written")


def quantize_round(x: torch.Tensor) -> torch.Tensor:
    """EDM's quantization of [-1, 1] images: round to the nearest of 256 levels."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def quantize_floor(x: torch.Tensor) -> torch.Tensor:
    """ADM's quantization of [-1, 1] images: truncate towards zero."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)


QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"round": quantize_round, "floor": quantize_floor}


def rank_batches(seeds: Sequence[int], *, batch_size: int, rank: int = 0, world_size: int = 1,
                 skip_seeds: Collection[int] = frozenset()) -> list[list[int]]:
    """This rank's batches of seeds, split as EDM's generate.py splits them.

    Finished seeds (`skip_seeds`) are removed before splitting, so a resumed run spends no work on
    them. Batches hold at most `batch_size` seeds; a rank may get fewer batches than another.
    """
    check_int("batch_size", batch_size, minimum=1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    skip = set(skip_seeds)
    todo = [int(s) for s in seeds if int(s) not in skip]
    if not todo:
        return []
    num_batches = ((len(todo) - 1) // (batch_size * world_size) + 1) * world_size
    all_batches = torch.as_tensor(todo, dtype=torch.int64).tensor_split(num_batches)
    return [batch.tolist() for batch in all_batches[rank::world_size] if len(batch)]


def draw_latents_and_labels(rnd: StackedRandomGenerator, image_shape: Sequence[int], *,
                            num_classes: int | None, class_label: int | None,
                            device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents (B, *image_shape) float32 and labels (B,) int64 or None, in EDM's draw order.

    The label is drawn after the latents from the same generator, even when `class_label` fixes
    it: the draw advances the generator, and the sampler's noise that follows must match EDM's
    generate.py run with `--class`.
    """
    size = [len(rnd.seeds), *image_shape]
    latents = rnd.randn(size, device=device)
    if num_classes is None:
        return latents, None
    labels = rnd.randint(num_classes, size=[len(rnd.seeds)], device=device)
    if class_label is not None:
        labels = torch.full_like(labels, class_label)
    return latents, labels


def generate(sample_fn: SampleFn, seeds: Sequence[int], *, image_shape: Sequence[int],
             num_classes: int | None = None, class_label: int | None = None, batch_size: int = 64,
             quantize: str = "round", device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
             skip_seeds: Collection[int] = frozenset()) -> Iterator[GeneratedBatch]:
    """Generates this rank's share of `seeds`, batch by batch.

    Per batch: one generator per seed draws the latents (B, *image_shape) float32, then the labels
    (uniform in [0, num_classes), or all `class_label`); `sample_fn(latents, labels, randn_like)`
    returns images (B, C, H, W) in [-1, 1], checked finite (NonFiniteSampleError otherwise, before
    anything of the batch is yielded) and quantized with `quantize` ("round": EDM, "floor": ADM).
    `image_shape` is the shape of one latent: the image itself for pixel-space models.
    """
    seeds = check_seeds(seeds)
    image_shape = _check_settings(image_shape, num_classes, class_label, quantize)
    return _generate(sample_fn, seeds, image_shape=image_shape, num_classes=num_classes, class_label=class_label,
                     batch_size=batch_size, quantize=quantize, device=device, rank=rank, world_size=world_size,
                     skip_seeds=skip_seeds)


def _generate(sample_fn: SampleFn, seeds: list[int], *, image_shape: list[int], num_classes: int | None,
              class_label: int | None, batch_size: int, quantize: str, device: torch.device | str, rank: int,
              world_size: int, skip_seeds: Collection[int]) -> Iterator[GeneratedBatch]:
    """`generate` with its arguments checked."""
    for batch_seeds in rank_batches(seeds, batch_size=batch_size, rank=rank, world_size=world_size,
                                    skip_seeds=skip_seeds):
        rnd = StackedRandomGenerator(device, batch_seeds)
        latents, labels = draw_latents_and_labels(rnd, image_shape, num_classes=num_classes,
                                                  class_label=class_label, device=device)
        x = sample_fn(latents, labels, rnd.randn_like)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or len(x) != len(batch_seeds) or x.shape[1] not in (1, 3) \
                or not x.is_floating_point():
            raise ValueError(f"sample_fn: expected float images (B={len(batch_seeds)}, 1|3, H, W), got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        # One reduction (and one host sync) per batch; the per-sample search runs only on failure.
        if not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x.flatten(1))).any(dim=1).nonzero().flatten().tolist()
            raise NonFiniteSampleError([batch_seeds[i] for i in bad])
        images = QUANTIZERS[quantize](x).permute(0, 2, 3, 1).cpu()
        yield GeneratedBatch(images, None if labels is None else labels.cpu(), batch_seeds)


def _check_settings(image_shape: Sequence[int], num_classes: int | None, class_label: int | None,
                    quantize: str) -> list[int]:
    image_shape = [int(n) for n in image_shape]
    if not image_shape or any(n < 1 for n in image_shape):
        raise ValueError(f"image_shape: expected positive sizes such as (3, 64, 64), got {image_shape}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes: must be positive or None, got {num_classes}")
    if class_label is not None:
        if num_classes is None:
            raise ValueError("class_label: needs num_classes (an unconditional model takes no label)")
        if not 0 <= class_label < num_classes:
            raise ValueError(f"class_label: must be in [0, {num_classes}), got {class_label}")
    if quantize not in QUANTIZERS:
        raise ValueError(f"quantize: choose one of {sorted(QUANTIZERS)}, got {quantize!r}")
    return image_shape


def run_config(config: Mapping, *, image_shape: Sequence[int], num_classes: int | None,
               class_label: int | None, quantize: str) -> dict:
    """The configuration stored in `run.json`: the caller's `config` (model, sampler, guidance ...)
    plus the settings of this module that change the images."""
    own = {"image_shape": [int(n) for n in image_shape], "num_classes": num_classes,
           "class_label": class_label, "quantize": quantize}
    clashes = [key for key in own if key in config and json.dumps(config[key]) != json.dumps(own[key])]
    if clashes:
        raise ValueError(f"config: {clashes} disagree with the generation arguments of the same name")
    return {**config, **own}


def labels_of_seeds(image_shape: Sequence[int], num_classes: int | None,
                    class_label: int | None) -> Callable[[int], int | None]:
    """seed -> the label a run with these settings gives it (EDM's draw order: the latents, then the
    label, from the seed's own generator), for checking records against their seeds."""
    def label_of(seed: int) -> int | None:
        _, labels = draw_latents_and_labels(StackedRandomGenerator("cpu", [seed]), image_shape,
                                            num_classes=num_classes, class_label=class_label, device="cpu")
        return None if labels is None else int(labels[0])
    return label_of


def run_generation(sample_fn: SampleFn, seeds: Sequence[int], outdir: str | os.PathLike, *, config: Mapping,
                   image_shape: Sequence[int], num_classes: int | None = None, class_label: int | None = None,
                   batch_size: int = 64, formats: Sequence[str] = ("png",), quantize: str = "round",
                   device: torch.device | str = "cpu", progress: bool = True,
                   compile_seconds: Callable[[], float] | None = None, discard_damaged: bool = False) -> dict:
    """Generates `seeds` into `outdir`, resuming where an earlier run with the same configuration
    stopped; under torchrun each rank generates its share (call `dist.init_distributed` first).

    `config` (JSON-able) holds everything else that determines the images; a directory holding
    a different configuration is refused, and so is a directory another process is writing (an
    advisory lock per rank), and a non-empty directory that is not a run (`ownership`: a run
    touches only its own files). Seeds already written intact are skipped; damaged, missing,
    unrecorded and wrongly recorded files are reported, moved aside into `damaged/` (deleted with
    `discard_damaged`) and regenerated. A run that fails before it recorded any image leaves
    nothing behind (no `run.json` that would refuse the corrected command). `compile_seconds()`,
    if given, reports the time spent compiling during the run, which images/s then leaves out.
    Rank 0 shows progress and prints a summary. Returns the summary: seeds, skipped, generated,
    seconds, compile_seconds, images_per_second, repairs (messages), outdir.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    seeds = check_seeds(seeds)
    formats = check_formats(formats)
    image_shape = _check_settings(image_shape, num_classes, class_label, quantize)
    check_int("batch_size", batch_size, minimum=1)
    config = run_config(config, image_shape=image_shape, num_classes=num_classes, class_label=class_label,
                        quantize=quantize)
    outdir = Path(outdir)
    check_writable(outdir, "outdir", directory=True)
    check_run_folder(outdir)
    created = [path for path in (outdir, *outdir.parents) if not path.exists()]
    outdir.mkdir(parents=True, exist_ok=True)
    undo = False
    writer: SampleWriter | None = None
    try:
        with RunLock(outdir, rank):
            fresh = not (outdir / RUN_FILE).exists()
            try:
                # Every rank checks before the first barrier, so a refused directory stops all of them alike.
                check_run_config(outdir, config)
                dist.barrier()
                label_of = labels_of_seeds(image_shape, num_classes, class_label)
                repairs: list[str] = []
                if rank == 0:
                    done_by_format = finished_by_format(outdir, config, formats, repair=True, log=repairs.append,
                                                        label_of=label_of, discard_damaged=discard_damaged)
                    write_run_config(outdir, config, seeds)
                    for message in repairs:
                        dist.print_main(message)
                dist.barrier()
                if rank != 0:
                    done_by_format = finished_by_format(outdir, config, formats, repair=False, log=lambda message: None,
                                                        label_of=label_of)
                # Nobody writes before every rank has read the same finished set: batching depends on it.
                dist.barrier()

                done = set.intersection(*done_by_format.values())
                skipped = sum(1 for s in seeds if s in done)
                mine = rank_batches(seeds, batch_size=batch_size, rank=rank, world_size=world_size, skip_seeds=done)
                writer = SampleWriter(outdir, formats=formats, rank=rank, done=done_by_format)
                start = time.perf_counter()
                with dist.progress_bar(sum(len(b) for b in mine), desc="generating", enabled=progress) as bar:
                    for batch in _generate(sample_fn, seeds, image_shape=image_shape, num_classes=num_classes,
                                           class_label=class_label, batch_size=batch_size, quantize=quantize,
                                           device=device, rank=rank, world_size=world_size, skip_seeds=done):
                        writer.write(batch.images.numpy(), None if batch.labels is None else batch.labels.numpy(),
                                     batch.seeds)
                        bar.update(len(batch.seeds))
                dist.barrier()
            except BaseException:
                if rank == 0 and fresh and not any(m.stat().st_size for m in manifest_paths(outdir)):
                    _remove_fresh_run(outdir, [] if writer is None else writer.files_written)
                    undo = True
                raise
    finally:
        if undo:
            for folder in created:  # the folders this run made, now empty, once the lock file is gone
                try:
                    folder.rmdir()
                except OSError:
                    break
    seconds = time.perf_counter() - start
    compiling = float(compile_seconds()) if compile_seconds is not None else 0.0
    generated = len(seeds) - skipped
    sampling = seconds - compiling
    summary = {"outdir": str(outdir), "seeds": len(seeds), "skipped": skipped, "generated": generated,
               "seconds": seconds, "compile_seconds": compiling,
               "images_per_second": generated / sampling if sampling > 0 else math.nan, "repairs": repairs}
    compile_text = f"; compiling took {compiling:.1f} s of it" if compiling else ""
    dist.print_main(f"{outdir}: generated {generated} image(s), skipped {skipped} already finished, "
                    f"in {seconds:.1f} s{compile_text} ({summary['images_per_second']:.2f} images/s over "
                    f"{world_size} rank(s){', compile time excluded' if compiling else ''})")
    return summary


def _remove_fresh_run(outdir: Path, images: list[Path]) -> None:
    """Undoes a run that failed before recording any image: its run.json, empty manifests and
    the image files it wrote (`images`), so the corrected command starts afresh. The folder held
    nothing of anyone else's (`check_run_folder`), and nothing else is touched."""
    for path in [*images, *manifest_paths(outdir), outdir / RUN_FILE]:
        remove_quietly(path)
    for folder in sorted({p.parent for p in images} | {outdir / SHARD_DIR}, reverse=True):
        if folder.is_dir() and folder != outdir and not any(folder.iterdir()):
            folder.rmdir()


__all__ = ["GeneratedBatch", "NonFiniteSampleError", "QUANTIZERS", "SampleFn", "draw_latents_and_labels",
           "generate", "labels_of_seeds", "quantize_floor", "quantize_round", "rank_batches", "run_config",
           "run_generation"]
