"""Per-seed generation: batching, labels, quantization, non-finite samples, seed parsing, resume.

`toy_sample_fn` and `TOY_SETTINGS` are shared with the other generation tests (they import this
module, as do the scripts they run in subprocesses).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elucd_fast.runs.generation import (NonFiniteSampleError, generate, quantize_floor, quantize_round, rank_batches,
                                        run_generation)
from elucd_fast.runs.layout import TEMP_SUFFIX, png_relpath
from elucd_fast.runs.outputs import finished_seeds
from elucd_fast.runs.run_config import RunConfigMismatchError
from elucd_fast.runs.seeds import parse_seeds

TOY_CONFIG = {"model": "toy", "sampler": {"steps": 3, "noise": 0.3}}
TOY_SETTINGS = {"image_shape": (3, 8, 8), "num_classes": 10}


def toy_sample_fn(latents: torch.Tensor, labels: torch.Tensor | None, randn_like, *,
                  delay: float = 0.0) -> torch.Tensor:
    """A deterministic stand-in for a sampler: per-sample arithmetic on the latents, three draws of
    per-step noise, a label offset; `delay` (s) slows it down."""
    x = latents
    for _ in range(3):
        x = 0.8 * x + 0.3 * randn_like(x)
    if labels is not None:
        x = x + labels.to(x.dtype).view(-1, 1, 1, 1) / 10
    if delay:
        time.sleep(delay)
    return torch.tanh(x)


def images_by_seed(batches) -> dict[int, tuple[np.ndarray, int | None]]:
    out = {}
    for batch in batches:
        for i, seed in enumerate(batch.seeds):
            out[seed] = (batch.images[i].numpy(), None if batch.labels is None else int(batch.labels[i]))
    return out


def assert_same_images(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for seed in a:
        np.testing.assert_array_equal(a[seed][0], b[seed][0], err_msg=f"seed {seed}")
        assert a[seed][1] == b[seed][1], f"seed {seed}"


def test_image_depends_only_on_its_seed():
    seeds = list(range(20))
    runs = [images_by_seed(generate(toy_sample_fn, seeds, batch_size=b, **TOY_SETTINGS)) for b in (1, 3, 7)]
    # Reversed order puts every seed at another position of another batch.
    runs.append(images_by_seed(generate(toy_sample_fn, seeds[::-1], batch_size=6, **TOY_SETTINGS)))
    for run in runs[1:]:
        assert_same_images(runs[0], run)
    first = runs[0][0][0]
    assert first.dtype == np.uint8 and first.shape == (8, 8, 3)


def test_ranks_and_skipped_seeds_do_not_change_images():
    seeds = list(range(23))
    reference = images_by_seed(generate(toy_sample_fn, seeds, batch_size=4, **TOY_SETTINGS))
    skip = {0, 5, 6, 22}
    for world_size in (2, 3):
        merged = {}
        for rank in range(world_size):
            merged.update(images_by_seed(generate(toy_sample_fn, seeds, batch_size=3, rank=rank,
                                                  world_size=world_size, skip_seeds=skip, **TOY_SETTINGS)))
        assert_same_images({s: v for s, v in reference.items() if s not in skip}, merged)


def test_rank_batches_follow_edm_split():
    # EDM: num_batches = ((10 - 1) // (3 * 2) + 1) * 2 = 4 -> [0 1 2] [3 4 5] [6 7] [8 9].
    assert rank_batches(range(10), batch_size=3, rank=0, world_size=2) == [[0, 1, 2], [6, 7]]
    assert rank_batches(range(10), batch_size=3, rank=1, world_size=2) == [[3, 4, 5], [8, 9]]
    # Finished seeds go before splitting: no batch is spent on them.
    assert rank_batches(range(10), batch_size=4, skip_seeds=range(8)) == [[8, 9]]
    assert rank_batches(range(3), batch_size=4, rank=3, world_size=4, skip_seeds={0, 1, 2}) == []
    with pytest.raises(ValueError, match="batch_size"):
        rank_batches(range(3), batch_size=0)


def test_labels_drawn_after_latents_from_each_seeds_generator():
    seeds = [3, 11, 4000000000]
    batch = next(generate(lambda z, y, randn_like: torch.zeros_like(z), seeds, batch_size=3, **TOY_SETTINGS))
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        torch.randn([3, 8, 8], generator=g)
        assert int(batch.labels[i]) == int(torch.randint(10, size=[], generator=g))
    assert batch.labels.dtype == torch.int64


def test_fixed_class_label_keeps_edm_noise_stream():
    seeds = [1, 2]
    noise = {}

    def record_noise(z, y, randn_like):
        noise[tuple(y.tolist())] = randn_like(z)
        return torch.zeros_like(z)

    next(generate(record_noise, seeds, batch_size=2, class_label=7, **TOY_SETTINGS))
    g = torch.Generator().manual_seed(1)
    torch.randn([3, 8, 8], generator=g)
    torch.randint(10, size=[], generator=g)
    torch.testing.assert_close(noise[(7, 7)][0], torch.randn([3, 8, 8], generator=g), rtol=0, atol=0)
    with pytest.raises(ValueError, match="class_label"):
        next(generate(record_noise, seeds, class_label=10, **TOY_SETTINGS))
    with pytest.raises(ValueError, match="needs num_classes"):
        next(generate(record_noise, seeds, class_label=1, image_shape=(3, 8, 8)))


def test_unconditional_has_no_labels():
    batch = next(generate(toy_sample_fn, [0, 1], image_shape=(1, 4, 4)))
    assert batch.labels is None and batch.images.shape == (2, 4, 4, 1)


def test_quantizers_match_edm_and_adm():
    x = torch.tensor([-1.5, -1.0, -0.004, 0.0, 0.5, 0.999, 1.0, 2.0])
    assert quantize_round(x).tolist() == [0, 0, 127, 128, 191, 255, 255, 255]
    assert quantize_floor(x).tolist() == [0, 0, 126, 127, 191, 254, 255, 255]
    z = next(generate(toy_sample_fn, [0], quantize="floor", **TOY_SETTINGS)).images
    r = next(generate(toy_sample_fn, [0], quantize="round", **TOY_SETTINGS)).images
    assert (r.int() - z.int()).abs().max() <= 1
    with pytest.raises(ValueError, match="quantize"):
        next(generate(toy_sample_fn, [0], quantize="nearest", **TOY_SETTINGS))


def test_nan_sample_names_seed_and_writes_nothing_of_its_batch(tmp_path: Path):
    latents_of_seed_5 = torch.randn([3, 8, 8], generator=torch.Generator().manual_seed(5))

    def sample_fn(z, y, randn_like):
        x = toy_sample_fn(z, y, randn_like)
        x[(z == latents_of_seed_5).flatten(1).all(dim=1)] = float("nan")
        return x

    seeds = list(range(8))
    with pytest.raises(NonFiniteSampleError, match="seed\\(s\\) 5") as info:
        run_generation(sample_fn, seeds, tmp_path, config=TOY_CONFIG, batch_size=4, formats=("png", "npz"),
                       progress=False, **TOY_SETTINGS)
    assert info.value.seeds == [5]
    assert finished_seeds(tmp_path, _stored_config(), ("png", "npz"), repair=False) == {0, 1, 2, 3}
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["000000/000000.png", "000000/000001.png", "000000/000002.png", "000000/000003.png",
                       "manifest-rank000.jsonl", "run.json", "shards/rank000-0000000000.npz"]


def _stored_config() -> dict:
    return {**TOY_CONFIG, "image_shape": [3, 8, 8], "num_classes": 10, "class_label": None, "quantize": "round"}


def test_parse_seeds():
    assert parse_seeds("0-3,10, 20-21") == [0, 1, 2, 3, 10, 20, 21]
    assert parse_seeds("4294967295") == [4294967295]
    for text, message in [("5-3", "backwards"), ("a-b", "neither"), ("", "neither"), ("1,,2", "neither"),
                          ("-1", "neither"), ("0-4294967296", "largest seed"), ("1,0-3", "more than once")]:
        with pytest.raises(ValueError, match=message):
            parse_seeds(text)


def test_resume_skips_finished_seeds_and_refuses_other_config(tmp_path: Path):
    first = run_generation(toy_sample_fn, range(6), tmp_path, config=TOY_CONFIG, batch_size=4, progress=False,
                           **TOY_SETTINGS)
    assert (first["generated"], first["skipped"]) == (6, 0)
    second = run_generation(toy_sample_fn, range(9), tmp_path, config=TOY_CONFIG, batch_size=2, progress=False,
                            **TOY_SETTINGS)
    assert (second["generated"], second["skipped"]) == (3, 6)
    assert sorted(p.name for p in (tmp_path / "000000").iterdir()) == [
        Path(png_relpath(s)).name for s in range(9)]
    other = {**TOY_CONFIG, "sampler": {"steps": 4, "noise": 0.3}}
    with pytest.raises(RunConfigMismatchError, match="sampler.steps: 3 -> 4"):
        run_generation(toy_sample_fn, range(9), tmp_path, config=other, progress=False, **TOY_SETTINGS)
    with pytest.raises(RunConfigMismatchError, match="quantize"):
        run_generation(toy_sample_fn, range(9), tmp_path, config=TOY_CONFIG, quantize="floor", progress=False,
                       **TOY_SETTINGS)
    with pytest.raises(ValueError, match="batch_size"):
        run_generation(toy_sample_fn, range(9), tmp_path, config=TOY_CONFIG, batch_size=0, progress=False,
                       **TOY_SETTINGS)
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))
