"""Writers: deterministic bytes, atomic files, manifest, resume after SIGKILL, damage, disk full,
merging shards."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from elucd_fast.cli import main as cli
from elucd_fast.runs.generation import generate, run_config, run_generation
from elucd_fast.runs.atomic import atomic_write
from elucd_fast.runs.encoding import StreamedArray, png_bytes, write_npz
from elucd_fast.runs.layout import TEMP_SUFFIX, png_relpath
from elucd_fast.runs.merge import ShardMergeError, merge_npz_shards
from elucd_fast.runs.outputs import SampleWriter, finished_seeds
from elucd_fast.runs.run_config import RunConfigMismatchError, config_differences, write_run_config
from elucd_fast.runs.seeds import expand_seed_ranges, seed_ranges
from test_generate import TOY_CONFIG, TOY_SETTINGS, toy_sample_fn

TESTS_DIR = Path(__file__).resolve().parent
FORMATS = ("png", "npz")
SEEDS = list(range(30))


def generate_into(outdir: Path, seeds=SEEDS, sample_fn=toy_sample_fn, **kwargs) -> dict:
    options = {"batch_size": 4, "formats": FORMATS, "progress": False, **kwargs}
    return run_generation(sample_fn, seeds, outdir, config=TOY_CONFIG, **TOY_SETTINGS, **options)


def stored_config() -> dict:
    return run_config(TOY_CONFIG, image_shape=TOY_SETTINGS["image_shape"], num_classes=TOY_SETTINGS["num_classes"],
                      class_label=None, quantize="round")


def png_tree(outdir: Path) -> dict[str, bytes]:
    return {p.relative_to(outdir).as_posix(): p.read_bytes() for p in sorted(outdir.glob("*/*.png"))}


def temp_files(outdir: Path) -> list[Path]:
    return [p for p in outdir.rglob(f"*{TEMP_SUFFIX}")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, bytes]:
    """An uninterrupted run with another batch size: its PNG tree and merged npz are the truth."""
    outdir = tmp_path_factory.mktemp("reference")
    generate_into(outdir, batch_size=7)
    merge_npz_shards(outdir, outdir / "merged.npz")
    return outdir, (outdir / "merged.npz").read_bytes()


def assert_matches_reference(outdir: Path, reference_run) -> None:
    reference_dir, merged = reference_run
    assert png_tree(outdir) == png_tree(reference_dir)
    merge_npz_shards(outdir, outdir / "merged.npz")
    assert (outdir / "merged.npz").read_bytes() == merged
    assert not temp_files(outdir)


# ---------------------------------------------------------------------------------------------
# Encoders and atomic files


def test_png_bytes_are_deterministic_and_lossless():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert png_bytes(rgb) == png_bytes(rgb.copy())
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(rgb)))), rgb)
    gray = Image.open(io.BytesIO(png_bytes(rgb[:, :, :1])))
    assert gray.mode == "L"
    np.testing.assert_array_equal(np.asarray(gray), rgb[:, :, 0])


def test_npz_bytes_do_not_depend_on_the_clock(monkeypatch):
    arrays = {"arr_0": np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3), "arr_1": np.array([7], dtype=np.int64)}

    def npz() -> bytes:
        buffer = io.BytesIO()
        write_npz(buffer, arrays)
        return buffer.getvalue()

    first = npz()
    later = time.time() + 86400 * 400
    monkeypatch.setattr(time, "time", lambda: later)
    monkeypatch.setattr(time, "localtime", lambda *args: time.gmtime(later))
    assert npz() == first
    with np.load(io.BytesIO(first)) as loaded:
        assert sorted(loaded.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(loaded["arr_0"], arrays["arr_0"])
        np.testing.assert_array_equal(loaded["arr_1"], arrays["arr_1"])


def test_streamed_npz_member_checks_its_size():
    member = StreamedArray(np.dtype(np.uint8), (2, 3), [np.zeros(3, np.uint8)])
    with pytest.raises(ValueError, match="chunks hold 3 values"):
        write_npz(io.BytesIO(), {"arr_0": member})


def test_atomic_write_leaves_no_temp_on_error(tmp_path: Path):
    target = tmp_path / "a.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_seed_ranges_roundtrip():
    seeds = [9, 0, 1, 2, 5, 6, 4000000000]
    assert seed_ranges(seeds) == [[0, 2], [5, 6], [9, 9], [4000000000, 4000000000]]
    assert expand_seed_ranges(seed_ranges(seeds)) == sorted(seeds)


def test_sample_writer_layout_and_records(tmp_path: Path):
    writer = SampleWriter(tmp_path, formats=FORMATS, rank=2)
    images = np.zeros((2, 4, 4, 3), np.uint8)
    records = writer.write(images, np.array([3, 4]), [1999, 2000])
    assert {r["file"] for r in records} == {"001000/001999.png", "002000/002000.png", "shards/rank002-0000001999.npz"}
    lines = [json.loads(line) for line in (tmp_path / "manifest-rank002.jsonl").read_text().splitlines()]
    assert lines == records
    for record in records:
        assert hashlib.sha256((tmp_path / record["file"]).read_bytes()).hexdigest() == record["sha256"]
    with np.load(tmp_path / "shards/rank002-0000001999.npz") as shard:
        assert shard["seeds"].tolist() == [1999, 2000] and shard["arr_1"].tolist() == [3, 4]


# ---------------------------------------------------------------------------------------------
# Run configuration


def test_config_differences_are_listed():
    old = {"a": 1, "guidance": {"scale": 1.0, "beta": 3}, "gone": True}
    new = {"a": 1, "guidance": {"scale": 2.0, "beta": 3}, "added": 0}
    assert config_differences(old, new) == ["added", "gone", "guidance.scale"]


def test_other_config_in_same_directory_is_refused(tmp_path: Path):
    generate_into(tmp_path, seeds=range(4))
    other = {**TOY_CONFIG, "model": "another"}
    with pytest.raises(RunConfigMismatchError) as info:
        run_generation(toy_sample_fn, range(4), tmp_path, config=other, **TOY_SETTINGS, progress=False)
    assert "differing keys: model: 'toy' -> 'another'" in str(info.value)
    with pytest.raises(ValueError, match="JSON"):
        run_generation(toy_sample_fn, range(4), tmp_path / "new", config={"x": object()}, **TOY_SETTINGS,
                       progress=False)


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_after_sigkill_gives_identical_files(tmp_path: Path, reference_run):
    outdir = tmp_path / "run"
    script = tmp_path / "generate_slowly.py"
    script.write_text(textwrap.dedent(f"""
        import functools, pathlib, sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from test_generate import toy_sample_fn
        from test_writers import generate_into
        slow = functools.partial(toy_sample_fn, delay=0.25)
        generate_into(pathlib.Path(sys.argv[1]), sample_fn=slow, batch_size=2)
    """))
    process = subprocess.Popen([sys.executable, str(script), str(outdir)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    manifest = outdir / "manifest-rank000.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 3 * 4:
            break
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()[1].decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    messages: list[str] = []
    finished = finished_seeds(outdir, stored_config(), FORMATS, repair=False, log=messages.append)
    assert 6 <= len(finished) < len(SEEDS)
    # The kill can leave temporary or unrecorded files, never a recorded file that is damaged.
    assert all("temporary file" in m or "without a record" in m for m in messages), messages
    # A temporary file as a kill in the middle of a write leaves it (named as atomic_write names them).
    (outdir / "000000" / f".000007.png.0123456789ab{TEMP_SUFFIX}").write_bytes(b"\x89PNG partial")
    summary = generate_into(outdir, batch_size=5)
    assert summary["skipped"] == len(finished)
    assert any("temporary file" in m for m in summary["repairs"]), summary["repairs"]
    assert_matches_reference(outdir, reference_run)


def test_damaged_png_and_npz_are_detected_and_regenerated(tmp_path: Path, reference_run):
    generate_into(tmp_path)
    png = tmp_path / png_relpath(13)
    png.write_bytes(png.read_bytes()[:40])
    shard = tmp_path / "shards" / "rank000-0000000020.npz"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "shards" / "rank000-0000000024.npz").write_bytes(b"PK\x03\x04 truncated")

    messages: list[str] = []
    finished = finished_seeds(tmp_path, stored_config(), FORMATS, repair=False, log=messages.append)
    assert finished == set(SEEDS) - {13, 20, 21, 22, 23, 24, 25, 26}
    text = "\n".join(messages)
    assert "000000/000013.png: file is damaged or truncated" in text and "seed(s) 13 will be regenerated" in text
    assert "shards/rank000-0000000020.npz: file is damaged" in text
    with pytest.raises(ShardMergeError, match="Resume the run"):
        merge_npz_shards(tmp_path, tmp_path / "merged.npz")
    assert not (tmp_path / "merged.npz").exists()

    summary = generate_into(tmp_path, batch_size=3)
    assert summary["generated"] == 8
    assert finished_seeds(tmp_path, stored_config(), FORMATS, repair=False, log=messages.append) == set(SEEDS)
    assert_matches_reference(tmp_path, reference_run)


def test_torn_manifest_line_is_ignored_and_not_glued(tmp_path: Path):
    generate_into(tmp_path, seeds=range(4), formats=("png",))
    manifest = tmp_path / "manifest-rank000.jsonl"
    manifest.write_text(manifest.read_text() + '{"seed": 3, "lab')
    messages: list[str] = []
    assert finished_seeds(tmp_path, stored_config(), repair=False, log=messages.append) == {0, 1, 2, 3}
    assert any("unreadable record" in m for m in messages)
    SampleWriter(tmp_path, formats=("png",)).write(np.zeros((1, 8, 8, 3), np.uint8), np.array([1]), [9])
    assert json.loads(manifest.read_text().splitlines()[-1])["seed"] == 9


def test_disk_full_leaves_earlier_files_intact_and_no_temp(tmp_path: Path, monkeypatch, reference_run):
    real_fsync = os.fsync
    temp_file_syncs = []

    def fsync_until_disk_full(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}") if stat.S_ISREG(os.fstat(fd).st_mode) else ""
        if name.endswith(TEMP_SUFFIX):
            temp_file_syncs.append(name)
            # run.json, then two batches of 4 PNGs and a shard: the 12th is the PNG of seed 8.
            if len(temp_file_syncs) == 12:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_disk_full)
    with pytest.raises(OSError) as info:
        generate_into(tmp_path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert "no partial file was left" in str(info.value) and "000000/000008.png" in str(info.value)
    assert not temp_files(tmp_path)
    assert finished_seeds(tmp_path, stored_config(), FORMATS, repair=False) == set(range(8))
    assert not (tmp_path / png_relpath(8)).exists()
    generate_into(tmp_path)
    assert_matches_reference(tmp_path, reference_run)


# ---------------------------------------------------------------------------------------------
# Merging


def test_merge_orders_by_seed(tmp_path: Path):
    seeds = [17, 3, 250000, 9, 4, 1000]
    generate_into(tmp_path, seeds=seeds, batch_size=4)
    summary = merge_npz_shards(tmp_path, tmp_path / "all.npz")
    assert summary["num_images"] == 6 and summary["num_shards"] == 2
    expected = {}
    for batch in generate(toy_sample_fn, seeds, batch_size=1, **TOY_SETTINGS):
        expected[batch.seeds[0]] = (batch.images[0].numpy(), int(batch.labels[0]))
    with np.load(tmp_path / "all.npz") as merged:
        assert sorted(merged.files) == ["arr_0", "arr_1"]
        for row, seed in enumerate(sorted(seeds)):
            np.testing.assert_array_equal(merged["arr_0"][row], expected[seed][0])
            assert merged["arr_1"][row] == expected[seed][1]


def test_merge_refuses_gaps_and_duplicates(tmp_path: Path):
    generate_into(tmp_path, seeds=range(8))
    write_run_config(tmp_path, stored_config(), range(10))
    with pytest.raises(ShardMergeError, match=r"2 of 10 seeds have no npz shard \(8, 9\)"):
        merge_npz_shards(tmp_path, tmp_path / "out.npz")
    result = CliRunner().invoke(cli, ["merge", str(tmp_path), str(tmp_path / "out.npz")])
    assert result.exit_code == 2 and "8, 9" in result.output
    assert not (tmp_path / "out.npz").exists()

    write_run_config(tmp_path, stored_config(), range(8))
    # A second, complete and intact shard holding seed 1 (as two runs sharing a directory would leave).
    with np.load(tmp_path / "shards" / "rank000-0000000000.npz") as shard:
        SampleWriter(tmp_path, formats=("npz",), rank=5).write(shard["arr_0"][1:2], shard["arr_1"][1:2], [1])
    with pytest.raises(ShardMergeError, match="seed 1 is recorded twice"):
        merge_npz_shards(tmp_path, tmp_path / "out.npz")


def test_merge_cli_writes_adm_file(tmp_path: Path):
    generate_into(tmp_path, seeds=range(5))
    result = CliRunner().invoke(cli, ["merge", str(tmp_path), str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["num_images"] == 5
    with np.load(tmp_path / "out.npz") as merged:
        assert merged["arr_0"].shape == (5, 8, 8, 3) and merged["arr_0"].dtype == np.uint8
        assert merged["arr_1"].dtype == np.int64
