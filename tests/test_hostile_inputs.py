"""The second audit: hostile-but-ordinary inputs. A command touches only its own files (the rule of
`runs.ownership`), reads regular files only, takes sizes from headers before data, bounds every
flag, and recovers from torn state. Each case: exit status 2 with a message naming what was wrong
(or the correct result), no traceback, and what is on disk afterwards."""
import fcntl
import json
import os
import shutil
import signal
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from elucd_fast.digits.load import reference_path
from test_bad_inputs import DIGITS, assert_refused, run

NO_METRICS = [*DIGITS, "--no-metrics"]
EVERY_RECORD = [(seed, fmt) for seed in range(4) for fmt in ("npz", "png")]  # of a finished DIGITS run


@contextmanager
def no_hang(seconds: int = 60):
    """Fails the test instead of hanging it (a FIFO read blocks forever)."""
    def timeout(signum, frame):
        raise AssertionError(f"the command blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def generate(outdir: Path, *extra, formats: str = "npz,png"):
    return run("generate", *NO_METRICS, "--formats", formats, "--outdir", outdir, *extra)


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> dict[str, Path]:
    """One finished DIGITS run per format list, generated once and copied for each test."""
    runs = {}
    for formats in ("npz,png", "npz"):
        outdir = tmp_path_factory.mktemp("finished") / formats.replace(",", "-")
        assert generate(outdir, formats=formats).exit_code == 0
        runs[formats] = outdir
    return runs


@pytest.fixture
def finished_run(finished_runs):
    """finished_run(tmp_path, name, formats): a copy of a finished run at tmp_path / name."""
    def copy(tmp_path, name: str = "out", formats: str = "npz,png") -> Path:
        return Path(shutil.copytree(finished_runs[formats], tmp_path / name, symlinks=True))
    return copy


def records(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest-rank000.jsonl").read_text().splitlines() if line]


def append_records(outdir: Path, *extra: dict) -> None:
    with open(outdir / "manifest-rank000.jsonl", "a") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in extra)


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture
def canary(tmp_path) -> Path:
    """A file outside every output folder that no command may change."""
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text("the user's precious file")
    return path


# --------------------------------------------------------------------------------------------
# A. a run touches only its own files


@pytest.mark.parametrize("file", ["../outside/victim.txt", "ABSOLUTE", "000000/../../outside/victim.txt",
                                  "manifest-rank000.jsonl", "run.json", "000000/000001.png"])
def test_a_record_naming_a_file_outside_the_layout_is_ignored_never_acted_on(tmp_path, canary, file, finished_run):
    outdir = finished_run(tmp_path)
    before = {name: snapshot(outdir / name) for name in ("run.json",)}
    record = dict(next(r for r in records(outdir) if r["format"] == "png" and r["seed"] == 0))
    record.update(file=str(canary) if file == "ABSOLUTE" else file, sha256="0" * 64)
    append_records(outdir, record)
    canary_before = snapshot(canary)
    result = generate(outdir)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "which is not a file of this run" in result.output and "nothing was done to that path" in result.output
    assert snapshot(canary) == canary_before
    assert snapshot(outdir / "run.json")[0] == before["run.json"][0]
    # The refused record is dropped; every image keeps its one record.
    assert sorted((r["seed"], r["format"]) for r in records(outdir)) == EVERY_RECORD


def test_a_lock_file_link_planted_in_a_run_is_refused_and_its_target_kept(tmp_path, canary, finished_run):
    outdir = finished_run(tmp_path)
    os.symlink(canary, outdir / ".lock-rank000")
    before = snapshot(canary)
    assert_refused(generate(outdir), ".lock-rank000: is a symbolic link")
    assert snapshot(canary) == before


def test_the_lock_never_follows_a_link(tmp_path, canary):
    from elucd_fast.runs.lock import RunLock
    from elucd_fast.runs.ownership import OwnershipError

    os.symlink(canary, tmp_path / ".lock-rank000")
    before = snapshot(canary)
    with pytest.raises(OwnershipError, match="is a symbolic link"):
        with RunLock(tmp_path, 0):
            pass
    assert snapshot(canary) == before


@pytest.mark.parametrize("entry", ["manifest-rank000.jsonl", "run.json", "000000", "shards"])
def test_a_run_entry_that_is_a_link_is_refused(tmp_path, canary, entry, finished_run):
    outdir = finished_run(tmp_path)
    target = canary if "." in entry else canary.parent
    moved = tmp_path / "moved"
    os.rename(outdir / entry, moved)
    if target.is_dir():
        os.rename(moved, tmp_path / "outside" / entry)  # the run's folder, now outside, reached by a link
        target = tmp_path / "outside" / entry
    os.symlink(target, outdir / entry)
    listing = sorted(p.name for p in tmp_path.joinpath("outside").iterdir())
    before = snapshot(canary)
    assert_refused(generate(outdir), f"{entry}: is a symbolic link")
    assert_refused(run("merge", outdir, tmp_path / "all.npz"), f"{entry}: is a symbolic link")
    assert snapshot(canary) == before and sorted(p.name for p in tmp_path.joinpath("outside").iterdir()) == listing


def test_a_folder_of_the_users_files_is_refused_before_anything_is_written(tmp_path):
    outdir = tmp_path / "mine"
    (outdir / "000000").mkdir(parents=True)
    (outdir / "000000" / "000000.png").write_bytes(b"my own picture")
    (outdir / ".notes.tmp").write_text("notes")
    result = generate(outdir)
    assert_refused(result, "not empty and not a run of elucd-fast", ".notes.tmp", "000000", "nothing was written")
    assert sorted(p.relative_to(outdir).as_posix() for p in outdir.rglob("*")) == [
        ".notes.tmp", "000000", "000000/000000.png"]
    assert (outdir / "000000" / "000000.png").read_bytes() == b"my own picture"


def test_files_in_a_run_that_no_record_vouches_for_are_moved_aside_not_deleted(tmp_path, finished_run):
    outdir = finished_run(tmp_path)
    (outdir / ".notes.tmp").write_text("notes")  # not ours by name: left alone
    (outdir / "000000" / "000777.png").write_bytes(b"a user's picture")  # in the layout, unrecorded
    png = outdir / "000000" / "000002.png"
    png.write_bytes(png.read_bytes()[:-5])  # damaged after the fact
    fifo = outdir / "000000" / "000003.png"
    fifo.unlink()
    os.mkfifo(fifo)  # a FIFO where a PNG of ours was: never opened, moved aside
    with no_hang():
        result = generate(outdir)
    assert result.exit_code == 0, result.output
    assert "moved aside to damaged/000000/000777.png.aside" in result.output
    assert (outdir / "damaged" / "000000" / "000777.png.aside").read_bytes() == b"a user's picture"
    assert (outdir / "damaged" / "000000" / "000002.png.aside").exists()
    assert (outdir / "damaged" / "000000" / "000003.png.aside").is_fifo()
    assert not list((outdir / "damaged").rglob("*.png"))  # an image set read from OUTDIR never counts them
    assert (outdir / ".notes.tmp").read_text() == "notes"
    clean = finished_run(tmp_path, "clean")
    assert (outdir / "samples.npz").read_bytes() == (clean / "samples.npz").read_bytes()
    assert all((outdir / r["file"]).is_file() for r in records(outdir))


def test_damaged_files_are_deleted_only_when_asked(tmp_path, finished_run):
    outdir = finished_run(tmp_path)
    (outdir / "000000" / "000777.png").write_bytes(b"junk")
    result = generate(outdir, "--discard-damaged")
    assert result.exit_code == 0, result.output
    assert "000000/000777.png: deleted" in result.output
    assert not (outdir / "000000" / "000777.png").exists() and not (outdir / "damaged").exists()


@pytest.mark.parametrize("target", ["shard", "run.json", "manifest-rank000.jsonl", "shards/new.npz", "000000/x.npz"])
def test_merge_never_writes_over_the_runs_own_files(tmp_path, target, finished_run):
    outdir = finished_run(tmp_path)
    shard = next((outdir / "shards").iterdir())
    out_path = shard if target == "shard" else outdir / target
    before = {p: p.read_bytes() for p in outdir.rglob("*") if p.is_file()}
    assert_refused(run("merge", outdir, out_path), "out_path:", "Choose")
    assert {p: p.read_bytes() for p in outdir.rglob("*") if p.is_file()} == before
    result = generate(outdir)  # the run is still whole
    assert result.exit_code == 0 and "generated 0 image(s)" in result.output, result.output


def _digit_images(path: Path, count: int = 8) -> Path:
    images = (np.random.default_rng(0).random((count, 8, 8, 1)) * 255).astype(np.uint8)
    np.savez(path, arr_0=images)
    return path


def test_fid_outputs_never_replace_their_inputs(tmp_path):
    images = _digit_images(tmp_path / "images.npz")
    before = snapshot(images)
    extractor = ["--feature-extractor", "digits-eval"]
    assert_refused(run("fid", "ref", "--images", images, "--out-path", images, *extractor),
                   "--out-path:", "is the input", "would destroy the input")
    assert_refused(run("fid", "calc", "--samples", images, "--reference", reference_path(), "--json-out", images,
                       *extractor), "--json-out:", "is the input")
    link = tmp_path / "link.npz"
    os.symlink(images, link)  # the same file through a link
    assert_refused(run("fid", "ref", "--images", images, "--out-path", link, *extractor), "is the input")
    assert snapshot(images) == before
    folder = tmp_path / "pngs"
    folder.mkdir()
    assert_refused(run("fid", "ref", "--images", folder, "--out-path", folder / "ref.npz", *extractor),
                   "lies inside the input folder")
    assert not (folder / "ref.npz").exists()


def test_calibrate_and_generate_outputs_never_replace_their_inputs(tmp_path, finished_run):
    out = tmp_path / "cal"
    out.mkdir()
    images = out / "calibration.json"
    images.write_bytes(b"not really json")
    assert_refused(run("calibrate", "--images", images, "--out", out), "--out:", "is the input")
    assert images.read_bytes() == b"not really json"
    outdir = finished_run(tmp_path)
    network = outdir / "net.pt"  # kept inside a run folder: the run could move or replace it
    network.write_bytes(b"weights")
    assert_refused(run("generate", *NO_METRICS, "--preset", "edm64-18", "--network", network, "--outdir", outdir),
                   "--outdir:", "holds the input", str(network))
    assert network.read_bytes() == b"weights"


def test_no_output_lands_among_another_runs_own_files(tmp_path, finished_run):
    outdir = finished_run(tmp_path)
    before = {p: p.read_bytes() for p in outdir.rglob("*") if p.is_file()}
    samples = _digit_images(tmp_path / "images.npz")
    extractor = ["--feature-extractor", "digits-eval"]
    for out in (outdir / "run.json", outdir / "manifest-rank000.jsonl", outdir / "shards" / "x.npz",
                outdir / "000000" / "000000.png"):
        assert_refused(run("fid", "calc", "--samples", samples, "--reference", reference_path(), *extractor,
                           "--json-out", out), "--json-out:", "is a file of the run in")
        assert_refused(run("fid", "ref", "--images", samples, "--out-path", out, *extractor), "is a file of the run")
    assert {p: p.read_bytes() for p in outdir.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------------------------
# B. only regular files are read


def test_calibrate_refuses_a_fifo_for_images(tmp_path):
    fifo = tmp_path / "images.npz"
    os.mkfifo(fifo)
    with no_hang():
        assert_refused(run("calibrate", "--images", fifo, "--out", tmp_path / "cal"), "--images:",
                       "is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "cal").exists()


@pytest.mark.parametrize("role", ["samples", "reference"])
def test_fid_refuses_a_fifo_named_like_an_image_in_a_folder(tmp_path, role):
    folder = tmp_path / "pngs"
    folder.mkdir()
    os.mkfifo(folder / "0.png")
    paths = {"samples": reference_path(), "reference": reference_path()}
    paths[role] = folder
    with no_hang():
        assert_refused(run("fid", "calc", "--samples", paths["samples"], "--reference", paths["reference"],
                           "--feature-extractor", "digits-eval"), "0.png: is a FIFO (named pipe), not a regular file")


@pytest.mark.parametrize("command", [["fid", "calc", "--samples", "FIFO", "--reference", "REF"],
                                     ["fid", "calc", "--samples", "REF", "--reference", "FIFO"],
                                     ["info", "FIFO"]])
def test_a_fifo_where_a_file_is_expected_is_refused_by_name(tmp_path, command):
    fifo = tmp_path / "file.npz"
    os.mkfifo(fifo)
    args = [fifo if a == "FIFO" else reference_path() if a == "REF" else a for a in command]
    with no_hang():
        result = run(*args, "--feature-extractor", "digits-eval") if command[0] == "fid" else run(*args)
    assert_refused(result, f"{fifo} is a FIFO (named pipe), not a regular file")


def test_hashing_refuses_anything_but_a_regular_file(tmp_path):
    from elucd_fast.models.checkpoint import sha256_file

    os.mkfifo(tmp_path / "pipe")
    with no_hang(), pytest.raises(ValueError, match="is a FIFO"):
        sha256_file(tmp_path / "pipe")


# --------------------------------------------------------------------------------------------
# C. sizes from headers before data


def _deflated_member(path: Path, arrays: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value)
    return path


@pytest.fixture
def no_inflating(monkeypatch):
    """Fails the test if any npz member's data is read (refusals must come from the headers)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an array was read before its size was checked")

    monkeypatch.setattr(np.lib.format, "read_array", refuse)


def test_a_deflated_image_bomb_is_refused_from_its_header(tmp_path, no_inflating):
    bomb = _deflated_member(tmp_path / "bomb.npz", {"arr_0": np.zeros((600, 64, 64, 3), np.uint8)})
    assert bomb.stat().st_size < 200_000
    result = run("fid", "calc", "--samples", bomb, "--reference", reference_path(), "--feature-extractor",
                 "digits-eval", "--max-array-bytes", 1_000_000)
    assert_refused(result, "bomb.npz", "7,372,800 bytes once read, over the limit of 1,000,000", "--max-array-bytes")


def test_a_deflated_npz_under_the_limit_gives_the_same_metrics(tmp_path):
    stored = _digit_images(tmp_path / "stored.npz", 16)
    with np.load(stored) as data:
        deflated = _deflated_member(tmp_path / "deflated.npz", {"arr_0": data["arr_0"]})
    outputs = [run("fid", "calc", "--samples", path, "--reference", reference_path(), "--feature-extractor",
                   "digits-eval").output for path in (stored, deflated)]
    first, second = (json.loads(text) for text in outputs)
    assert first["frechet_inception_distance"] == second["frechet_inception_distance"]


def test_huge_statistics_are_refused_before_they_are_read(tmp_path, no_inflating):
    path = _deflated_member(tmp_path / "stats.npz", {"mu": np.zeros(2000), "sigma": np.zeros((2000, 2000))})
    result = run("fid", "calc", "--samples", reference_path(), "--reference", path, "--feature-extractor",
                 "digits-eval", "--max-array-bytes", 10_000_000)
    assert_refused(result, "2,000-dimensional statistics", "over the limit of 10,000,000", "--max-array-bytes")


def test_statistics_of_the_wrong_shape_are_refused_from_the_header(tmp_path, no_inflating):
    path = _deflated_member(tmp_path / "stats.npz", {"mu": np.zeros(64), "sigma": np.zeros((64, 65))})
    assert_refused(run("fid", "calc", "--samples", reference_path(), "--reference", path, "--feature-extractor",
                       "digits-eval"), "has mu (64,) and sigma (64, 65); expected (D,) and (D, D)")


def test_a_stored_npz_whose_header_lies_about_its_size_is_refused_by_name(tmp_path):
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (300 << 20, 32, 32, 1)})
            member.write(bytes(4096))
    assert_refused(run("fid", "calc", "--samples", path, "--reference", reference_path(), "--feature-extractor",
                       "digits-eval"), "liar.npz", "member 'arr_0' declares", "the file is damaged or forged")


def test_info_reads_a_safetensors_header_not_its_data(tmp_path, monkeypatch):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("info read the tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    path = tmp_path / "vae.safetensors"
    size = 64 << 20  # declared and present (sparse: nothing on disk), never loaded
    shapes = {"encoder.conv_in.weight": [128, 3, 3, 3], "decoder.conv_in.weight": [512, 4, 3, 3],
              "decoder.up.0.weight": [size // 4]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    result = run("info", path, "--json")
    assert result.exit_code == 0, result.output
    described = json.loads(result.output)
    assert described["kind"] == "vae" and described["details"]["latent_channels"] == 4
    assert described["parameters"] == sum(int(np.prod(shape)) for shape in shapes.values())
    liar = tmp_path / "liar.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}).encode()
    liar.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    assert_refused(run("info", liar), "liar.safetensors", "but the file holds 16 bytes of data")


# --------------------------------------------------------------------------------------------
# D. every flag bounded where it is parsed; run.json validated as a whole; JSON never NaN


def test_a_huge_step_count_is_refused_at_once(tmp_path):
    from elucd_fast.samplers.settings import MAX_STEPS

    assert_refused(generate(tmp_path / "out", "--steps", 1_000_000_000),
                   f"num_steps: must be an integer in [2, {MAX_STEPS}]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seeds,message", [
    ([[0, 5_000_000_000]], "must lie in [0, 4294967295]"), (5, "seeds must be a non-empty list"),
    ([[3, 1]], "must lie in"), ([[0, 3], [2, 5]], "come after the previous range"),
    ([[0, 1], "x"], "is not a [first, last] pair"), ([[0, 20_000_000]], "more than 10,000,000 seeds"),
    ([[0, True]], "is not a [first, last] pair")])
def test_an_edited_run_json_is_refused_as_a_whole(tmp_path, seeds, message, finished_run):
    outdir = finished_run(tmp_path, formats="npz")
    run_file = json.loads((outdir / "run.json").read_text())
    run_file["seeds"] = seeds
    (outdir / "run.json").write_text(json.dumps(run_file))
    assert_refused(run("merge", outdir, tmp_path / "all.npz"), "run.json: not a run description", message)
    assert_refused(generate(outdir, formats="npz"), "run.json: not a run description", message)
    assert not (tmp_path / "all.npz").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(config="x"), "config must be an object"),
    (lambda r: r["config"].update(quantize="floor"), "config_sha256 does not match config"),
    (lambda r: r.update(format_version=7), "format_version 7"),
    (lambda r: r.pop("config_sha256"), "missing config_sha256")])
def test_run_json_fields_are_checked_together(tmp_path, edit, message, finished_run):
    outdir = finished_run(tmp_path, formats="npz")
    run_file = json.loads((outdir / "run.json").read_text())
    edit(run_file)
    (outdir / "run.json").write_text(json.dumps(run_file))
    assert_refused(run("merge", outdir, tmp_path / "all.npz"), message)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"config": ' * 50_000])
def test_a_run_json_nested_beyond_the_parser_is_refused(tmp_path, text, finished_run):
    outdir = finished_run(tmp_path, formats="npz")
    (outdir / "run.json").write_text(text)
    assert_refused(run("merge", outdir, tmp_path / "all.npz"), "run.json: not a run description")


def test_profile_batches_and_rounds_are_bounded(tmp_path):
    from elucd_fast.tools.profile import MAX_PROFILE_BATCH

    assert_refused(run("profile", "--batch", MAX_PROFILE_BATCH + 1, "--out", tmp_path / "p"),
                   "Invalid value for '--batch'")
    assert_refused(run("profile", "--rounds", 10**9, "--out", tmp_path / "p"), "Invalid value for '--batches'")
    assert not (tmp_path / "p").exists()


def test_calibrate_images_of_the_wrong_shape_or_bytes_are_named(tmp_path):
    wrong = tmp_path / "rgb16.npz"
    np.savez(wrong, arr_0=np.zeros((4, 16, 16, 3), np.uint8), arr_1=np.zeros(4, np.int64))
    assert_refused(run("calibrate", "--images", wrong, "--betas", "inf", "--inputs", "x0", "--out", tmp_path / "c"),
                   "images: (C, H, W) = (3, 16, 16), but this job's networks take (1, 8, 8)")
    noise = tmp_path / "noise.npz"
    noise.write_bytes(os.urandom(1000))
    assert_refused(run("calibrate", "--images", noise, "--out", tmp_path / "c"), "--images:", "noise.npz",
                   "not a readable npz file")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags,message", [
    (["--prc", "--prc-neighborhood", "50"], "prc_neighborhood: must be an integer in [1, 7] (8 samples"),
    (["--kid", "--kid-subsets", "0"], "Invalid value for '--kid-subsets'"),
    (["--kid", "--kid-subset-size", "1"], "Invalid value for '--kid-subset-size'"),
    (["--kid", "--kid-subset-size", "9"], "kid_subset_size: must be an integer in [2, 8]"),
    (["--isc", "--isc-splits", "0"], "Invalid value for '--isc-splits'"),
    (["--isc", "--isc-splits", "9"], "isc_splits: must be an integer in [1, 8]"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'")])
def test_metric_options_are_bounded_by_the_sample_count(tmp_path, flags, message):
    samples = _digit_images(tmp_path / "samples.npz")
    reference = _digit_images(tmp_path / "reference.npz", 20)
    result = run("fid", "calc", "--samples", samples, "--reference", reference, "--feature-extractor", "digits-eval",
                 *flags)
    assert_refused(result, message)
    assert "NaN" not in result.output


def test_metrics_json_never_holds_nan(tmp_path):
    samples = _digit_images(tmp_path / "samples.npz")
    result = run("fid", "calc", "--samples", samples, "--reference", samples, "--feature-extractor", "digits-eval",
                 "--isc", "--isc-splits", "8", "--json-out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    for text in (result.output, (tmp_path / "m.json").read_text()):
        json.loads(text, parse_constant=lambda name: pytest.fail(f"JSON holds {name}"))


@pytest.mark.parametrize("seeds", ["²", "٣", "1-²", "３"])
def test_seeds_are_ascii_digits(tmp_path, seeds):
    assert_refused(run("generate", "--seeds", seeds, "--outdir", tmp_path / "out"),
                   f"seeds: {seeds!r} is neither an integer nor a range")


def test_metrics_of_a_single_sample_are_refused_up_front(tmp_path):
    assert_refused(run("generate", "--seeds", "5", "--outdir", tmp_path / "out", "--no-progress"),
                   "--metrics: scoring needs at least 2 samples")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# E. state that must recover


@pytest.mark.parametrize("damage", ["tail", "middle"])
def test_a_manifest_with_bytes_that_are_not_utf8_is_recovered(tmp_path, damage, finished_run):
    outdir = finished_run(tmp_path)
    manifest = outdir / "manifest-rank000.jsonl"
    if damage == "tail":
        with open(manifest, "ab") as f:
            f.write(b'{"seed": 9, "file": "\xff\xfe\x80')
    else:
        data = manifest.read_bytes()
        manifest.write_bytes(data[:40] + b"\xc3\x28" + data[42:])  # one record's bytes rotted
    result = generate(outdir)
    assert result.exit_code == 0, result.output
    assert "manifest-rank000.jsonl:" in result.output
    assert "unreadable record (torn by a crash, or damaged)" in result.output
    assert sorted((r["seed"], r["format"]) for r in records(outdir)) == EVERY_RECORD
    assert generate(outdir).output.count("unreadable record") == 0  # repaired for good


@pytest.mark.parametrize("edit", [lambda r: r.pop("label"), lambda r: r.update(label="7"),
                                  lambda r: r.update(seed=-1), lambda r: r.update(seed=2**40),
                                  lambda r: r.update(file=None), lambda r: r.update(format="jpg")])
def test_a_record_with_a_bad_field_is_skipped_with_a_message(tmp_path, edit, finished_run):
    outdir = finished_run(tmp_path)
    record = dict(records(outdir)[0])
    edit(record)
    append_records(outdir, record)
    result = generate(outdir)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "manifest-rank000.jsonl:9: unreadable record" in result.output
    assert len(records(outdir)) == 8


def test_every_single_file_output_removes_its_own_dead_temporaries(tmp_path):
    images = _digit_images(tmp_path / "images.npz")
    dead = tmp_path / ".ref.npz.0123456789ab.tmp"  # a `fid ref` killed with -9 left it
    dead.write_bytes(b"half")
    result = run("fid", "ref", "--images", images, "--out-path", tmp_path / "ref.npz", "--feature-extractor",
                 "digits-eval")
    assert result.exit_code == 0, result.output
    assert not dead.exists() and (tmp_path / "ref.npz").is_file()


def test_a_fresh_run_killed_before_its_run_json_was_durable_resumes(tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / ".lock-rank000").write_text("12345")  # kill -9: the lock file stays (its lock does not)
    (outdir / ".run.json.0123456789ab.tmp").write_text('{"format_ver')
    result = generate(outdir)
    assert result.exit_code == 0, result.output
    assert not (outdir / ".run.json.0123456789ab.tmp").exists() and records(outdir)


def test_calibration_settings_are_bounded(tmp_path):
    betas = ",".join(str(k + 1) for k in range(600))
    assert_refused(run("calibrate", "--betas", betas, "--out", tmp_path / "c"), "make 1,200 settings; at most 1000")


def test_merge_removes_its_own_dead_temporaries_only(tmp_path, finished_run):
    outdir = finished_run(tmp_path, formats="npz")
    target = tmp_path / "merged" / "all.npz"
    target.parent.mkdir()
    dead = target.parent / ".all.npz.0123456789ab.tmp"  # left by a merge killed with -9
    dead.write_bytes(b"half a file")
    live = target.parent / ".all.npz.ba9876543210.tmp"  # a merge writing right now holds its lock
    live.write_bytes(b"being written")
    other = target.parent / ".other.npz.0123456789ab.tmp"
    other.write_bytes(b"another file's")
    notes = target.parent / ".all.npz.notes.tmp"
    notes.write_bytes(b"not a temporary of ours")
    with open(live, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = run("merge", outdir, target)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["removed_temporaries"] == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists() and notes.exists()
    assert target.is_file()


def test_a_killed_writers_temporaries_are_removed_on_resume(tmp_path, finished_run):
    outdir = finished_run(tmp_path)
    dead = outdir / "000000" / ".000001.png.0123456789ab.tmp"
    dead.write_bytes(b"cut short")
    result = generate(outdir)
    assert result.exit_code == 0, result.output
    assert "temporary file left by an interrupted run; removed" in result.output and not dead.exists()


# --------------------------------------------------------------------------------------------
# The guard: a canary outside the run, reachable through every path field and link a run reads


@pytest.mark.slow
def test_no_command_changes_a_file_outside_its_outputs(tmp_path, canary, finished_run):
    """Records naming the canary (relative, absolute, through an image folder, in both formats)
    and links to it where a run looks for its images, shards and temporaries: generate (resume),
    merge, fid calc/ref on the run's images and calibrate run, and the canary keeps its bytes and
    mtime; nothing appears beside it."""
    outdir = finished_run(tmp_path)
    png = next(r for r in records(outdir) if r["format"] == "png" and r["seed"] == 0)
    for file in (os.path.relpath(canary, outdir), str(canary), f"000000/{os.path.relpath(canary, outdir / '000000')}"):
        append_records(outdir, {**png, "file": file, "sha256": "0" * 64},
                       {**png, "format": "npz", "file": file, "row": 0})
    for link in ("000000/000999.png", "shards/rank000-0000000999.npz", "000000/.000001.png.0123456789ab.tmp",
                 ".run.json.0123456789ab.tmp", ".samples.npz.0123456789ab.tmp"):
        os.symlink(canary, outdir / link)
    (outdir / "000000" / "000001.png").write_bytes(b"damaged")  # so that a repair has work to do
    before = snapshot(canary)
    extractor = ["--feature-extractor", "digits-eval"]
    results = [generate(outdir), generate(outdir), run("merge", outdir, tmp_path / "all.npz"),
               run("fid", "calc", "--samples", outdir / "samples.npz", "--reference", reference_path(), *extractor,
                   "--json-out", tmp_path / "fid.json"),
               run("fid", "ref", "--images", outdir / "samples.npz", "--out-path", tmp_path / "ref.npz", *extractor),
               run("calibrate", "--betas", "inf", "--inputs", "x0", "--num-images", "16", "--timesteps", "3",
                   "--out", tmp_path / "cal")]
    for result in results:
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert snapshot(canary) == before
    assert sorted(p.name for p in canary.parent.iterdir()) == ["victim.txt"]
    assert os.path.islink(outdir / "damaged" / "000000" / "000999.png.aside")  # the link itself was moved aside


@pytest.mark.parametrize("link", [".lock-rank000", "manifest-rank001.jsonl", "run.json", "damaged", "001000"])
def test_a_link_that_would_lead_a_run_outside_refuses_it(tmp_path, canary, link, finished_run):
    outdir = finished_run(tmp_path)
    if link == "run.json":
        (outdir / link).unlink()
    os.symlink(canary.parent if link in ("damaged", "001000") else canary, outdir / link)
    (outdir / "000000" / "000001.png").write_bytes(b"damaged")  # a repair would move it (into damaged/)
    before = snapshot(canary)
    for result in (generate(outdir), run("merge", outdir, tmp_path / "all.npz")):
        assert_refused(result, f"{link}: is a symbolic link")
    assert snapshot(canary) == before
    assert sorted(p.name for p in canary.parent.iterdir()) == ["victim.txt"]
