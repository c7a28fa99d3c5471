"""Bad inputs and faults, as a new user meets them: each gives a clear message naming what was
wrong and what is allowed, exit status 2 from the command line (no traceback), and leaves nothing
partial or poisoning on disk. One test per case of the audit, plus the newcomer points."""
import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from elucd_fast.cli import main
from elucd_fast.digits.load import reference_path
from elucd_fast.runs.lock import RunLock

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--seeds", "0-3", "--batch", "4", "--no-progress"]


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def assert_refused(result, *messages):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for message in messages:
        assert message in result.output, result.output


def digits_stats(tmp_path, mu=None, sigma=None) -> Path:
    """A reference npz of 64-d statistics (the digits-eval features' size)."""
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(64) if mu is None else mu, sigma=np.eye(64) if sigma is None else sigma)
    return path


def fid_calc(reference, *extra):
    return run("fid", "calc", "--samples", reference_path(), "--reference", reference,
               "--feature-extractor", "digits-eval", *extra)


# --------------------------------------------------------------------------------------------
# fid


def test_fid_reference_sigma_with_nan_is_refused_at_once(tmp_path):
    sigma = np.eye(64)
    sigma[3, 5] = np.nan
    assert_refused(fid_calc(digits_stats(tmp_path, sigma=sigma)), "mu or sigma holds NaN or Inf")


@pytest.mark.parametrize("mu,sigma,message", [
    (np.full(64, np.inf), None, "mu or sigma holds NaN or Inf"),
    (None, -np.eye(64), "sigma is not positive semi-definite"),
    (None, np.triu(np.ones((64, 64))), "sigma is not symmetric"),
])
def test_fid_reference_statistics_must_be_a_gaussians(tmp_path, mu, sigma, message):
    assert_refused(fid_calc(digits_stats(tmp_path, mu, sigma)), message)


def test_fid_json_out_is_checked_before_extraction_and_the_result_is_printed_first(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_refused(fid_calc(reference_path(), "--json-out", blocker / "metrics.json"), "--json-out",
                   "is a file, not a folder")
    import elucd_fast.cli.fid as fid_cli

    def full_disk(path, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fid_cli, "write_json", full_disk)
    result = fid_calc(reference_path(), "--json-out", tmp_path / "metrics.json")
    assert_refused(result, "No space left on device (ENOSPC)")
    printed = json.loads(result.output[:result.output.index("}") + 1])
    assert printed["frechet_inception_distance"] == pytest.approx(0, abs=1e-6)


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height black pixels, a few hundred KB however large it decodes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + (width + 7) // 8)
    compressor, parts = zlib.compressobj(9), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size", [40000, 9000])
def test_fid_ref_refuses_decompression_bombs_before_decoding(tmp_path, size):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(4 if size == 9000 else 1):
        _bomb_png(folder / f"{k}.png", size, size)
    assert (folder / "0.png").stat().st_size < 2_000_000
    result = run("fid", "ref", "--images", folder, "--out-path", tmp_path / "ref.npz",
                 "--feature-extractor", "digits-eval")
    assert_refused(result, "--max-image-pixels")
    assert not (tmp_path / "ref.npz").exists()


# --------------------------------------------------------------------------------------------
# generate: settings checked before anything is written


@pytest.fixture
def tiny_paper_row(tmp_path, monkeypatch):
    """ddpm128-r101 on a tiny ADM state dict and ResNet-18 (the real files' formats)."""
    import torchvision

    from elucd_fast.presets import PRESETS
    from test_paper_presets import tiny_ddpm_row

    network, row = tiny_ddpm_row(tmp_path)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18.pth")
    monkeypatch.setitem(PRESETS, "ddpm128-r101", row)
    return ["--preset", "ddpm128-r101", "--network", network, "--classifier", tmp_path / "resnet18.pth",
            "--seeds", "0-1", "--batch", "2", "--no-progress"]


@pytest.mark.parametrize("flags,message", [
    (["--classifier-scale", "inf"], "classifier_scale: must be a finite number"),
    (["--gamma-factor", "-1"], "gamma_factor: must be >= 0"),
    (["--steps", "1"], "num_steps: must be an integer in [2, 1000]"),
])
def test_bad_paper_preset_settings_write_nothing_and_the_fix_runs(tmp_path, tiny_paper_row, flags, message):
    outdir = tmp_path / "out"
    assert_refused(run("generate", *tiny_paper_row, "--outdir", outdir, *flags, "--steps", "2"
                       if "--steps" not in flags else "1"), message)
    assert not outdir.exists()
    result = run("generate", *tiny_paper_row, "--outdir", outdir, "--steps", "2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("flags", [["--max-guidance", "1e38"], ["--cfg-scale", "1e38"],
                                   ["--joint-temperature", "1e38"]])
def test_settings_that_make_samples_non_finite_fail_cleanly(tmp_path, flags):
    outdir = tmp_path / "out"
    result = run("generate", *DIGITS, "--outdir", outdir, *flags)
    assert_refused(result, "non-finite (NaN or Inf) at step", "Nothing non-finite was written")
    assert not outdir.exists()  # no run.json left to refuse the corrected command
    assert run("generate", *DIGITS, "--outdir", outdir).exit_code == 0


def test_too_many_seeds_are_refused_before_allocating(tmp_path):
    assert_refused(run("generate", "--seeds", "0-999999999", "--outdir", tmp_path / "out"),
                   "asks for 1,000,000,000+ seeds; one run takes at most 10,000,000")


@pytest.mark.parametrize("device,message", [("potato", "'potato' is not a device"),
                                            ("cuda", "no CUDA device is available here")])
def test_devices_are_checked(tmp_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_refused(run("generate", *DIGITS, "--device", device, "--outdir", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# generate: the run folder


def _records(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest-rank000.jsonl").read_text().splitlines()]


def _write_records(outdir: Path, records: list[dict]) -> None:
    (outdir / "manifest-rank000.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _clean_run(tmp_path) -> bytes:
    clean = tmp_path / "clean"
    assert run("generate", *DIGITS, "--formats", "npz,png", "--outdir", clean).exit_code == 0
    return (clean / "samples.npz").read_bytes()


def test_an_edited_manifest_label_is_found_and_repaired(tmp_path):
    outdir = tmp_path / "out"
    assert run("generate", *DIGITS, "--formats", "npz,png", "--outdir", outdir).exit_code == 0
    records = _records(outdir)
    shard = next(r for r in records if r["format"] == "npz" and r["seed"] == 2)
    shard["label"] = (shard["label"] + 1) % 10  # one byte of the manifest changed
    _write_records(outdir, records)
    result = run("generate", *DIGITS, "--formats", "npz,png", "--outdir", outdir)
    assert result.exit_code == 0, result.output
    assert "says label" in result.output and "the shard holds" in result.output and "edited record" in result.output
    assert (outdir / "samples.npz").read_bytes() == _clean_run(tmp_path)


def test_an_edited_png_record_seed_is_found_and_repaired(tmp_path):
    outdir = tmp_path / "out"
    assert run("generate", *DIGITS, "--formats", "png,npz", "--outdir", outdir).exit_code == 0
    records = _records(outdir)
    png = next(r for r in records if r["format"] == "png" and r["seed"] == 1)
    png["seed"] = 3
    _write_records(outdir, records)
    result = run("generate", *DIGITS, "--formats", "png,npz", "--outdir", outdir)
    assert result.exit_code == 0, result.output
    assert ("record names '000000/000001.png', which is not a file of this run (a png record may name only its "
            "seed's own PNG path); ignored") in result.output
    by_key = {(r["seed"], r["format"]) for r in _records(outdir)}
    assert by_key == {(s, f) for s in range(4) for f in ("png", "npz")} and len(_records(outdir)) == 8


def test_a_second_writer_is_refused(tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    with RunLock(outdir, 0):
        assert_refused(run("generate", *DIGITS, "--outdir", outdir), "another process (pid", "is writing this run")
    assert not (outdir / "run.json").exists()
    assert run("generate", *DIGITS, "--outdir", outdir).exit_code == 0
    assert len(_records(outdir)) == 4  # one record per image: no doubled manifest


def test_outdir_under_a_file_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert_refused(run("generate", *DIGITS, "--outdir", tmp_path / "a_file" / "sub"), "is a file, not a folder")


def test_read_only_outdir_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    outdir = tmp_path / "ro"
    outdir.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == outdir and mode & os.W_OK
                        else real_access(path, mode))
    assert_refused(run("generate", *DIGITS, "--outdir", outdir), "is not writable")


@pytest.mark.parametrize("failing", ["png", "manifest"])
def test_a_full_disk_ends_with_a_message_and_resumes(tmp_path, monkeypatch, failing):
    outdir = tmp_path / "out"
    real_fsync = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if (failing == "png" and ".000002.png." in name and name.endswith(".tmp")) or \
                (failing == "manifest" and name.endswith(".jsonl")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = run("generate", *DIGITS, "--formats", "npz,png", "--outdir", outdir)
    monkeypatch.undo()
    assert_refused(result, "No space left on device", "(ENOSPC)", "rerun the same command: it resumes")
    assert not list(outdir.rglob("*.tmp"))
    assert run("generate", *DIGITS, "--formats", "npz,png", "--outdir", outdir).exit_code == 0
    assert (outdir / "samples.npz").read_bytes() == _clean_run(tmp_path)


def test_merge_to_a_read_only_place_ends_with_a_message(tmp_path, monkeypatch):
    outdir = tmp_path / "out"
    assert run("generate", *DIGITS, "--outdir", outdir).exit_code == 0
    real_open = os.open

    def read_only(path, flags, mode=0o777, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert_refused(run("merge", outdir, tmp_path / "ro" / "all.npz"), "Read-only file system (EROFS)",
                   "choose a folder you can write to")


# --------------------------------------------------------------------------------------------
# the library


def test_sampler_latents_must_be_finite():
    from elucd_fast import edm_sampler
    from tiny_models import TinyEDMNet

    latents = torch.randn(3, 3, 8, 8)
    latents[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"latents: non-finite values \(NaN or Inf\) in sample\(s\) \[1\]"):
        edm_sampler(TinyEDMNet(), latents, torch.tensor([1, 2, 3]), num_steps=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_name_the_first_bad_step(bad):
    from elucd_fast import ClassifierGuidance, edm_sampler
    from elucd_fast.checks import NonFiniteStateError
    from tiny_models import TinyClassifier, TinyEDMNet

    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyClassifier()
            self.calls = 0

        def forward(self, x):
            logits = self.inner(x)
            self.calls += 1
            return logits * bad if self.calls > 3 else logits  # the check_input probe is call 1

    guidance = ClassifierGuidance(Breaks(), marginal_temperature=1.0)
    with pytest.raises(NonFiniteStateError, match="non-finite .* at step 2 of 4"):
        edm_sampler(TinyEDMNet(), torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), num_steps=4, guidance=guidance)


def test_a_classifier_returning_a_tuple_is_told_what_to_return():
    from elucd_fast import ClassifierGuidance, edm_sampler
    from tiny_models import TinyClassifier, TinyEDMNet

    class Pair(TinyClassifier):
        def forward(self, x):
            return super().forward(x), x

    with pytest.raises(TypeError, match=r"must return logits as one tensor \(B, K\), got tuple"):
        edm_sampler(TinyEDMNet(), torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), num_steps=3,
                    guidance=ClassifierGuidance(Pair()))


# --------------------------------------------------------------------------------------------
# what a newcomer meets


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert run("generate", *DIGITS, "--formats", "npz,png", "--outdir", tmp_path / "out").exit_code == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_every_command_has_examples_and_guidance_flags_have_units():
    for command in ("generate", "fid", "presets", "info", "profile", "calibrate", "ablate", "merge", "sample"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Examples:" in result.output, command
    text = run("generate", "--help").output.replace("\n", " ")
    for unit in ("multiples of rms(x_i) per step", "fraction of wmax", "multiples of the variance",
                 "multiples of rms(eps_c - eps_u)", "multiplier of the logits"):
        assert unit in " ".join(text.split()), unit


def test_presets_name_prints_every_setting():
    output = run("presets", "digits").output
    for flag, value in (("--max-guidance", "0.02"), ("--steps", "18"), ("--softplus-beta", "5.0"),
                        ("--add-factor", "0.3"), ("--S-churn", "0.0")):
        assert any(line.split()[:2] == [flag, value] for line in output.splitlines()), (flag, output)


def test_the_digits_metric_is_recomputed_by_fid_calc(tmp_path):
    outdir = tmp_path / "out"
    assert run("generate", *DIGITS, "--outdir", outdir).exit_code == 0
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert "frechet_inception_distance" not in metrics
    result = run("fid", "calc", "--samples", outdir / "samples.npz", "--reference", reference_path(),
                 "--feature-extractor", "digits-eval")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["frechet_inception_distance"] == pytest.approx(metrics["fd_digits"], rel=1e-9)


def test_compile_time_is_reported_apart_from_images_per_second(tmp_path):
    from elucd_fast.runs import run_generation

    def sample(latents, labels, randn_like):
        return torch.zeros_like(latents)

    summary = run_generation(sample, range(4), tmp_path / "out", config={"kind": "zeros"}, image_shape=(1, 4, 4),
                             batch_size=2, formats=("npz",), progress=False, compile_seconds=lambda: 1e6)
    assert summary["compile_seconds"] == 1e6 and summary["seconds"] < 1e6
    assert np.isnan(summary["images_per_second"])  # nothing left of the time once compiling is removed


def test_a_hostile_pt_is_refused_without_unsafe_advice(tmp_path):
    class Reduce:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"x": Reduce()}, tmp_path / "evil.pt")
    result = run("info", tmp_path / "evil.pt")
    assert result.exit_code == 2 and "refused" in result.output and "posix.system" in result.output
    assert "weights_only=False" not in result.output and "likely succeed" not in result.output
    assert not (tmp_path / "pwned").exists()


def test_info_knows_the_shipped_digits_weights():
    from elucd_fast.digits.load import WEIGHTS_DIR

    result = run("info", WEIGHTS_DIR / "classifier.safetensors")
    assert result.exit_code == 0 and "digits-benchmark" in result.output and "DigitsResNet" in result.output


def test_python_dash_m_elucd_fast_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "elucd_fast", "presets"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and "digits:" in result.stdout, result.stderr
