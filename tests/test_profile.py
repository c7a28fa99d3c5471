import dataclasses
import json
import sys
import time
import types

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from elucd_fast.cli import main
from elucd_fast.guidance import ClassifierGuidance
from elucd_fast.job import Job
from elucd_fast.samplers import DDPMSettings, EDMSettings
from elucd_fast.tools.charts import write_profile_chart
from elucd_fast.tools.profile import PARTS, profile_job
from elucd_fast.tools.telemetry import GpuTelemetry, TelemetryUnavailable, gpu_telemetry
from tiny_models import TinyClassifier, TinyEDMNet, TinyEpsModel


def _job(sampler="edm"):
    guide = ClassifierGuidance(TinyClassifier(), softplus_beta=3.0)
    if sampler == "edm":
        return Job(TinyEDMNet(), guide, EDMSettings(num_steps=4, max_guidance=0.05), (3, 8, 8), 10)
    return Job(TinyEpsModel(), guide, DDPMSettings(num_timesteps=100, timestep_respacing="5"), (3, 8, 8), 10)


@pytest.mark.parametrize("sampler,steps,denoiser_calls", [("edm", 4, [2, 2, 2, 1]), ("ddpm", 5, [1] * 5)])
def test_parts_sum_to_the_step_and_calls_are_counted(sampler, steps, denoiser_calls):
    report = profile_job(_job(sampler), batch_size=3)
    assert len(report["steps"]) == steps
    assert [s["denoiser_calls"] for s in report["steps"]] == denoiser_calls
    assert all(s["guidance_calls"] == 1 for s in report["steps"])
    for step in report["steps"]:
        parts = sum(step[p] for p in PARTS)
        assert parts == pytest.approx(step["total"], rel=1e-6)
        assert all(step[p] >= 0 for p in PARTS if p != "update")
    totals = report["totals"]
    # The steps account for the sampler call as timed from outside, up to the set-up before step 0.
    assert totals["total"] <= totals["sampling_wall"] * 1.05
    assert report["flops"]["denoiser_forward"] > 0 and report["flops"]["classifier_forward_backward"] > 0
    assert report["flop_limit_ratio"] >= 1 and report["guidance_overhead_ratio"] > 0
    assert report["telemetry"].startswith("no GPU telemetry")
    json.dumps(report)


def test_chart_and_trace(tmp_path):
    report = profile_job(_job(), batch_size=2, trace_path=tmp_path / "trace.json")
    write_profile_chart(report, tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size[0] > 100
    assert "traceEvents" in json.loads((tmp_path / "trace.json").read_text())


def test_no_nvml_reasons(monkeypatch):
    with pytest.raises(TelemetryUnavailable, match="not a CUDA GPU"):
        gpu_telemetry("cpu")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(TelemetryUnavailable, match="not installed"):
        gpu_telemetry("cuda")


def test_telemetry_thread_with_a_stand_in_nvml():
    class NVMLError(Exception):
        pass

    state = {"energy": 1000.0}

    def energy(handle):
        state["energy"] += 50.0
        return state["energy"]

    def no_clock(handle, which):
        raise NVMLError("not supported")

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, nvmlShutdown=lambda: state.setdefault("shut", True),
        nvmlDeviceGetPowerUsage=lambda h: 250_000, nvmlDeviceGetTotalEnergyConsumption=energy,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 ** 30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=90, memory=40),
        nvmlDeviceGetClockInfo=no_clock)
    with GpuTelemetry(fake, "handle", 0.01) as telemetry:
        time.sleep(0.1)
    assert state.get("shut") and len(telemetry.samples) >= 3
    summary = telemetry.summary()
    assert summary["power_w_mean"] == 250 and summary["memory_used_bytes_max"] == 2 ** 30
    assert summary["energy_j"] > 0 and summary["sm_clock_mhz_mean"] is None


@pytest.fixture
def tiny_preset(monkeypatch):
    """The digits preset, configured as the flags say, builds a job of tiny networks."""
    from elucd_fast.presets import DigitsPreset

    monkeypatch.setattr(DigitsPreset, "build", lambda self, device="cpu", **files: dataclasses.replace(
        _job(), settings=self.settings))


def test_cli_writes_json_and_chart(tmp_path, tiny_preset):
    result = CliRunner().invoke(main, ["profile", "--batch", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "no GPU telemetry" in result.output and "FLOP limit" in result.output
    assert json.loads((tmp_path / "profile.json").read_text())["batch_size"] == 2
    Image.open(tmp_path / "profile.png").verify()


@pytest.mark.parametrize("args", [["--batch", "0"], ["--steps", "1"], ["--batches", "x"]])
def test_cli_bad_flags_exit_2(tmp_path, tiny_preset, args):
    assert CliRunner().invoke(main, ["profile", "--out", str(tmp_path), *args]).exit_code == 2


def test_cli_profiles_a_schedule_files_steps(tmp_path, tiny_preset):
    from elucd_fast.schedules.schedule_file import ScheduleFile, write_schedule

    write_schedule(tmp_path / "s.json", ScheduleFile("edm", (40.0, 4.0, 0.4), 5, guidance={"max_guidance": 0.03}))
    result = CliRunner().invoke(main, ["profile", "--batch", "2", "--batches", "1", "--out", str(tmp_path / "p"),
                                       "--schedule", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert report["num_steps"] == 3 and report["step_sequence"] == [40.0, 4.0, 0.4]
    assert report["network_evaluations"] == 5 and report["schedule"]["content"]["steps"] == [40.0, 4.0, 0.4]
    for bad, message in (({"network_evaluations": 6}, "steps cost 5"), ({"sampler": "ddpm", "steps": [9, 5, 0]}, "made for the ddpm sampler")):
        (tmp_path / "bad.json").write_text(json.dumps({**json.loads((tmp_path / "s.json").read_text()), **bad}))
        result = CliRunner().invoke(main, ["profile", "--out", str(tmp_path / "q"), "--schedule",
                                           str(tmp_path / "bad.json")])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "q").exists()


def test_telemetry_through_an_installed_stand_in_nvml(monkeypatch):
    calls = {}

    class NVMLError(Exception):
        pass

    fake = types.ModuleType("pynvml")
    fake.NVMLError, fake.NVML_CLOCK_SM, fake.NVML_CLOCK_MEM = NVMLError, 0, 1
    fake.nvmlInit = lambda: calls.setdefault("init", True)
    fake.nvmlShutdown = lambda: calls.setdefault("shutdown", True)
    fake.nvmlDeviceGetHandleByPciBusId = lambda bus_id: calls.setdefault("bus_id", bus_id)
    fake.nvmlDeviceGetPowerUsage = lambda h: 100_000
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda h: 5_000
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=123)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50, memory=10)
    fake.nvmlDeviceGetClockInfo = lambda h, which: 1980 if which == 0 else 2619
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0))
    with gpu_telemetry("cuda:0", 0.01) as telemetry:
        time.sleep(0.05)
    assert calls == {"init": True, "bus_id": "0000:3b:00.0", "shutdown": True}
    summary = telemetry.summary()
    assert summary["samples"] >= 2 and summary["power_w_mean"] == 100 and summary["energy_j"] == 0
    assert summary["sm_clock_mhz_mean"] == 1980 and summary["memory_clock_mhz_mean"] == 2619
    assert summary["gpu_util_percent_mean"] == 50


def test_a_step_runner_is_set_aside():
    job = dataclasses.replace(_job(), step_runner=lambda step: step)
    report = profile_job(job, batch_size=2, warmup=False)
    assert report["step_runner"].startswith("removed") and len(report["steps"]) == 4


def test_cli_trace(tmp_path, tiny_preset):
    out = tmp_path / "new"
    result = CliRunner().invoke(main, ["profile", "--batch", "2", "--trace", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "traceEvents" in json.loads((out / "trace.json").read_text())


def test_an_edm2_job_with_a_guide_network_is_profiled():
    from test_edm2_networks import tiny_network

    from elucd_fast.samplers import EDM2Settings

    net, guide_net = tiny_network(3, 10), tiny_network(3, 10, seed=7, model_channels=8)
    job = Job(net, ClassifierGuidance(TinyClassifier(), softplus_beta=3.0),
              EDM2Settings(num_steps=3, max_guidance=0.05, guide_weight=2.0), (3, 16, 16), 10, guide_net=guide_net)
    report = profile_job(job, batch_size=2, num_batches=2)
    # Heun with a guide: two networks per evaluation, two evaluations a step but the last.
    assert [s["denoiser_calls"] for s in report["steps"]] == [4, 4, 2]
    assert len(report["guidance_overhead_rounds"]) == 2 and report["guidance_overhead_ratio"] > 0
    low, high = report["guidance_overhead_spread"]
    assert low <= report["guidance_overhead_ratio"] <= high
