"""Schedule files (`schedules.schedule_file`): written atomically and read back equal, refused
per defect with exit status 2 before any model loads or anything is written, applied through
the Python API, recorded in run.json, and a one-line note for another model's schedule."""
import json

import pytest
from click.testing import CliRunner

from elucd_fast.cli import main
from elucd_fast.presets import DigitsPreset, get_preset, preset_with_schedule
from elucd_fast.samplers import DDPMSettings, DiTSettings, EDM2Settings, EDMSettings
from elucd_fast.schedules.families import family_steps
from elucd_fast.schedules.schedule_file import (MAX_SCHEDULE_BYTES, ScheduleError, ScheduleFile, apply_schedule,
                                                read_schedule, schedule_from_settings, schedule_note,
                                                schedule_sha256, write_schedule)

EDM_SCHEDULE = ScheduleFile("edm", (80.0, 9.7, 0.47, 0.002), 7, preset="digits", guidance={"max_guidance": 0.03},
                            scoring={"metric": "fd_digits", "seeds": "0-999"}, scores={"fd_digits": 17.5})
SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.mark.parametrize("settings", [EDMSettings(num_steps=5, max_guidance=0.02), EDM2Settings(num_steps=3),
                                      DDPMSettings(timestep_respacing="ddim10", use_ddim=True),
                                      DiTSettings(timestep_respacing="4")])
def test_written_and_read_back_equal_and_applied(tmp_path, settings):
    keys = ("max_guidance",) if settings.name == "edm" else ()
    schedule = schedule_from_settings(settings, guidance_keys=keys, preset="x", scores={"fd": 1.5})
    write_schedule(tmp_path / "s.json", schedule)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left
    read = read_schedule(tmp_path / "s.json")
    assert read == schedule and schedule_sha256(read) == schedule_sha256(schedule)
    applied = apply_schedule(type(settings)(), read)
    assert applied.step_sequence() == settings.step_sequence()
    assert applied.network_evaluations == settings.network_evaluations == read.network_evaluations
    if keys:
        assert applied.max_guidance == 0.02


def test_the_python_api_runs_a_schedule_on_a_preset():
    preset = preset_with_schedule(get_preset("digits").configure(), EDM_SCHEDULE)
    assert preset.settings.sigmas == EDM_SCHEDULE.steps and preset.settings.max_guidance == 0.03
    ddpm = get_preset("digits-ddpm").configure()
    steps = family_steps(ddpm.settings, "trailing", 4)
    trailing = ScheduleFile("ddpm", steps, 4, guidance={"classifier_scale": 0.5})
    configured = preset_with_schedule(ddpm, trailing)
    assert configured.settings.step_sequence() == (999, 749, 499, 249) and configured.settings.classifier_scale == 0.5
    with pytest.raises(ScheduleError, match="made for the ddpm sampler; these settings are for the edm sampler"):
        preset_with_schedule(get_preset("digits").configure(), trailing)
    with pytest.raises(ScheduleError, match="sets max_guidance, which an unguided job does not use"):
        preset_with_schedule(get_preset("digits").configure(guidance=False), EDM_SCHEDULE)


def test_a_note_for_another_model_or_classifier_not_a_refusal():
    schedule = ScheduleFile("edm", (80.0, 1.0), 3, preset="digits", model_sha256=SHA_A, classifier_sha256=SHA_B)
    assert schedule_note(schedule, {"network_sha256": SHA_A, "classifier_sha256": SHA_B}) is None
    assert schedule_note(schedule, {"weights_sha256": {"denoiser": SHA_A, "classifier": SHA_B}}) is None
    note = schedule_note(schedule, {"weights_sha256": {"denoiser": "c" * 64, "classifier": SHA_B}})
    assert note.startswith("schedule: made for another model (model sha256 aaaaaaaaaaaa... (this job's cccccccccccc")
    assert "\n" not in note and "classifier" not in note
    both = schedule_note(schedule, {"network_sha256": "c" * 64, "classifier_sha256": "d" * 64})
    assert "another model and classifier" in both
    assert schedule_note(ScheduleFile("edm", (80.0, 1.0), 3), {"network_sha256": SHA_A}) is None


def _valid(**changes) -> dict:
    return {**EDM_SCHEDULE.json(), **changes}


def _ddpm(**changes) -> dict:
    return {**ScheduleFile("ddpm", (999, 500, 0), 3).json(), **changes}


# (preset, the file's content (dict: as JSON; str: raw text; None: a directory), message)
DEFECTS = {
    "not-decreasing": ("digits", _valid(steps=[80.0, 0.47, 9.7, 0.002]), "steps: must be strictly decreasing"),
    "sigma-zero": ("digits", _valid(steps=[80.0, 0.0]), r"steps[1]: must be > 0"),
    "timestep-out-of-range": ("digits-ddpm", _ddpm(steps=[1000, 500, 0]),
                              "steps[0]: must be an integer in [0, 999], got 1000"),
    "timestep-negative": ("digits-ddpm", _ddpm(steps=[999, 0, -1]), "steps[2]: must be an integer >= 0"),
    "nan": ("digits", json.dumps(_valid()).replace("9.7", "NaN"), "NaN in the file"),
    "infinity": ("digits", json.dumps(_valid()).replace("80.0", "Infinity"), "Infinity in the file"),
    "wrong-sampler": ("digits", _ddpm(), "made for the ddpm sampler; these settings are for the edm sampler"),
    "unknown-sampler": ("digits", _valid(sampler="heun"), "sampler: expected one of edm, edm2, ddpm, dit"),
    "duplicate-steps": ("digits-ddpm", _ddpm(steps=[999, 500, 500], network_evaluations=3),
                        "steps: must be distinct, 500 repeated"),
    "timesteps-ascending": ("digits-ddpm", _ddpm(steps=[0, 500, 999]), "steps: must be strictly decreasing"),
    "unknown-key": ("digits", _valid(steps_run=4), "unknown key(s) 'steps_run'"),
    "missing-key": ("digits", {k: v for k, v in _valid().items() if k != "network_evaluations"},
                    "missing key(s) 'network_evaluations'"),
    "wrong-type": ("digits", _valid(network_evaluations="7"), "network_evaluations: must be an integer >= 1"),
    "steps-not-a-list": ("digits", _valid(steps="80,1"), "steps: expected a non-empty list of noise levels"),
    "wrong-format": ("digits", _valid(format="elucd-fast-run"), "format: expected 'elucd-fast-schedule'"),
    "future-version": ("digits", _valid(version=2), "version: this engine reads version 1, got 2"),
    "bad-sha256": ("digits", _valid(model_sha256="abc"), "model_sha256: must be 64 lowercase hex digits"),
    "unknown-guidance-key": ("digits", _valid(guidance={"wmax": 0.1}), "guidance: unknown key(s) 'wmax'"),
    "guidance-of-another-sampler": ("digits", _valid(guidance={"classifier_scale": 0.5}),
                                    "guidance key(s) classifier_scale are not settings of the edm sampler"),
    "guidance-bad-value": ("digits", _valid(guidance={"max_guidance": -1}), "max_guidance: must be >= 0"),
    "evaluations-mismatch": ("digits", _valid(network_evaluations=4), "network_evaluations is 4, but its 4 steps cost 7"),
    "not-json": ("digits", "{'sampler': 'edm'}", "not valid JSON"),
    "not-an-object": ("digits", "[80.0, 1.0]", "expected a JSON object, got list"),
    "too-large": ("digits", json.dumps(_valid()) + " " * MAX_SCHEDULE_BYTES, "a schedule file has at most"),
    "not-a-regular-file": ("digits", None, "not a regular file"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_bad_schedule_files_exit_2_before_anything_loads(tmp_path, monkeypatch, defect):
    loaded = []
    monkeypatch.setattr(DigitsPreset, "build", lambda self, **kwargs: loaded.append(1))
    preset, content, message = DEFECTS[defect]
    path = tmp_path / "schedule.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    outdir = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--preset", preset, "--schedule", str(path), "--outdir",
                                       str(outdir), "--seeds", "0-3", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "--schedule" in result.output, result.output
    assert "Traceback" not in result.output
    assert not loaded and not outdir.exists()


@pytest.mark.parametrize("flags, message", [
    (["--steps", "5"], "--steps: set by --schedule"),
    (["--sigmas", "80,1"], "--sigmas: set by --schedule"),
    (["--max-guidance", "0.1"], "--max-guidance: set by --schedule"),
    (["--no-guidance"], "sets max_guidance, which an unguided job does not use"),
])
def test_flags_that_the_schedule_decides_are_refused(tmp_path, monkeypatch, flags, message):
    loaded = []
    monkeypatch.setattr(DigitsPreset, "build", lambda self, **kwargs: loaded.append(1))
    write_schedule(tmp_path / "s.json", EDM_SCHEDULE)
    result = CliRunner().invoke(main, ["generate", "--schedule", str(tmp_path / "s.json"), "--outdir",
                                       str(tmp_path / "out"), "--seeds", "0-3", *flags])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not loaded and not (tmp_path / "out").exists()


def test_a_missing_schedule_file(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--schedule", str(tmp_path / "none.json"), "--outdir",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2 and "cannot read the schedule file" in result.output


def test_generate_runs_and_records_the_schedule_and_resume_checks_it(tmp_path):
    write_schedule(tmp_path / "s.json", EDM_SCHEDULE)
    outdir = tmp_path / "out"
    args = ["generate", "--outdir", str(outdir), "--seeds", "0-7", "--batch", "8", "--no-progress", "--no-metrics"]
    result = CliRunner().invoke(main, [*args, "--schedule", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    config = json.loads((outdir / "run.json").read_text())["config"]
    assert config["schedule"] == {"sha256": schedule_sha256(EDM_SCHEDULE), "content": EDM_SCHEDULE.json()}
    settings = config["preset"]["settings"]
    assert settings["sigmas"] == [80.0, 9.7, 0.47, 0.002] and settings["num_steps"] == 4
    assert settings["max_guidance"] == 0.03
    # The same steps given as flags are the same images, but not the same recorded run.
    flags = CliRunner().invoke(main, ["generate", "--outdir", str(tmp_path / "flags"), "--seeds", "0-7", "--batch",
                                      "8", "--no-progress", "--no-metrics", "--sigmas", "80,9.7,0.47,0.002",
                                      "--max-guidance", "0.03"])
    assert flags.exit_code == 0, flags.output
    assert (outdir / "samples.npz").read_bytes() == (tmp_path / "flags" / "samples.npz").read_bytes()
    # Resuming with another schedule is refused like any other changed setting; the note for a
    # schedule made for another model is one line, and the run goes on.
    other = ScheduleFile("edm", (80.0, 9.7, 0.47, 0.002), 7, guidance={"max_guidance": 0.03}, model_sha256=SHA_A)
    write_schedule(tmp_path / "other.json", other)
    refused = CliRunner().invoke(main, [*args, "--schedule", str(tmp_path / "other.json")])
    assert refused.exit_code == 2 and "different configuration" in refused.output and "schedule" in refused.output
    noted = CliRunner().invoke(main, [*args[:2], str(tmp_path / "noted"), *args[3:], "--schedule",
                                      str(tmp_path / "other.json")])
    assert noted.exit_code == 0, noted.output
    assert "schedule: made for another model (model sha256 aaaaaaaaaaaa..." in noted.output
