"""bench/gpu_check.py: its CPU half runs and reports, its parts fail and time out without
ending the run, and its report says what was skipped and why."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_structure(report: dict, parts: list[str]) -> None:
    assert report["schema"] == gpu_check.SCHEMA and set(report["parts"]) == set(parts)
    assert report["environment"]["cuda"] is torch.cuda.is_available() and report["environment"]["torch"]
    for name, record in report["parts"].items():
        assert record["status"] in ("ok", "skipped"), (name, record)
        assert isinstance(record["seconds"], (int, float)) and isinstance(record["skipped"], list)
    assert all(set(s) == {"what", "why"} and s["why"] for s in report["skipped"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU half")
def test_cpu_half_subset_writes_the_report(tmp_path):
    result = run_script("--out", str(tmp_path), "--parts", "precision,step")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    check_structure(report, ["precision", "step"])
    assert report["parts"]["step"]["status"] == "skipped" and "needs a CUDA device" in report["parts"]["step"]["reason"]
    rows = report["parts"]["precision"]["result"]["rows"]
    assert rows[0]["policy"] == "fp32 (strict)" and all(row["finite"] for row in rows)
    skipped = {s["what"]: s["why"] for s in report["skipped"]}
    assert skipped["precision: fp16, tf32"] == "CUDA only" and "step" in skipped
    assert "skipped: step: needs a CUDA device" in result.stdout
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Precision policies against strict float32" in markdown and "## Skipped" in markdown
    # A rerun of one part keeps the others' results.
    assert run_script("--out", str(tmp_path), "--parts", "step").returncode == 0
    assert set(json.loads((tmp_path / "gpu_check.json").read_text())["parts"]) == {"precision", "step"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU half")
def test_cpu_half(tmp_path):
    """The whole CPU half (about 2 minutes on a loaded 2-core machine)."""
    start = time.monotonic()
    result = run_script("--out", str(tmp_path))
    print(f"CPU half: {time.monotonic() - start:.0f} s\n{result.stdout}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    check_structure(report, list(gpu_check.PARTS))
    kernels = report["parts"]["kernels"]["result"]["rows"]
    seen = {(row["implementation"], row["kernel"], row["dtype"]) for row in kernels}
    for kernel in ("guidance_update", "classifier_input", "dit_guided_difference", "ddpm_guided_mean"):
        assert {("cpp", kernel, dtype) for dtype in ("float32", "bfloat16", "float16", "float64")} <= seen
    assert {("triton", "softplus forward+backward", "float64"), ("triton", "logit_grad", "float32")} <= seen
    assert all(row["nonfinite_match"] for row in kernels)
    assert all(row["max_rel_error"] < (1e-2 if row["dtype"] in ("bfloat16", "float16") else 1e-5) for row in kernels)
    assert set(report["parts"]["kernels"]["result"]["speedups_float32"]) == {"edm_update", "ddpm_mean",
                                                                              "dit_difference"}
    compiled = report["parts"]["compiled"]["result"]["modes"]["compiled"]
    assert compiled["rel_error_vs_plain_eager"] < 1e-5 and compiled["guided_over_unguided"] > 0
    torchrun = report["parts"]["torchrun"]["result"]
    assert torchrun["byte_equal"] is True and torchrun["process_group"]["backend"] == "gloo"
    skipped = {s["what"] for s in report["skipped"]}
    assert {"step", "precision: fp16, tf32", "compiled: compiled + CUDA graphs", "kernels: triton timings",
            "compiled: inductor code generation"} <= skipped


def test_a_failing_part_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    def broken(ctx):
        ctx.result["before"] = 1
        ctx.attempt("an item that fails", 0, lambda: 1 / 0)
        raise RuntimeError("the part broke")

    monkeypatch.setitem(gpu_check.PARTS, "broken", gpu_check.Part(broken, broken, 5, 5))
    gpu_check.run_part_here("broken", tmp_path)
    record = json.loads((tmp_path / "parts" / "broken.json").read_text())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: the part broke"
    assert "broken" in record["traceback"] and record["result"] == {"before": 1}
    assert record["skipped"][0]["item"] == "an item that fails"
    assert record["skipped"][0]["reason"].startswith("failed: ZeroDivisionError")
    assert not (tmp_path / "parts" / "broken.partial.json").exists()


def test_attempt_skips_what_the_budget_cannot_hold(tmp_path):
    ctx = gpu_check.Context(torch.device("cpu"), tmp_path, budget=1.0, name="budget")
    assert ctx.attempt("long", needs=60, call=lambda: 1) is None
    assert ctx.attempt("short", needs=0, call=lambda: 2) == 2
    assert ctx.skipped == [{"item": "long", "reason": ctx.skipped[0]["reason"]}]
    assert ctx.skipped[0]["reason"].startswith("time budget")
    assert json.loads((tmp_path / "parts" / "budget.partial.json").read_text())["skipped"] == ctx.skipped


def test_markdown_names_failures_timeouts_and_skips():
    report = {"environment": {"device": "GPU X", "torch": "2", "commit": "abc"}, "finished": "now", "seconds": 3.0,
              "parts": {"kernels": {"status": "ok", "seconds": 1.0, "skipped": [{"item": "fp16", "reason": "why"}],
                                    "result": {"rows": [{"implementation": "triton", "kernel": "k", "dtype": "float32",
                                                         "shape": [2, 3], "max_rel_error": 1e-7,
                                                         "nonfinite_match": True}]}},
                        "compiled": {"status": "timeout", "seconds": 190.0, "skipped": [], "error": "stopped"},
                        "step": {"status": "skipped", "seconds": 0.0, "skipped": [], "reason": "no GPU"}}}
    text = gpu_check.markdown(report)
    assert "| triton | k | float32 | 2x3 | 1.00e-07 | yes |" in text
    assert "- compiled (timeout): stopped" in text and "- kernels: fp16: why" in text and "- step: no GPU" in text


def test_unknown_parts_are_refused():
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--parts", "kernels,nonsense"])
    assert exit_info.value.code == 2


def test_numbers_and_nonfinite_values_survive_json():
    assert gpu_check._jsonable({"a": float("nan"), "b": [1.5, float("inf")], ("c", 1): (2,)}) == \
        {"a": "nan", "b": [1.5, "inf"], "('c', 1)": [2]}
    assert gpu_check.rel_error(torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([1.0, 0.0, 4.0])) == 0.5
    assert gpu_check.nonfinite_match(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 2.0]))
    assert not gpu_check.nonfinite_match(torch.tensor([float("inf")]), torch.tensor([float("-inf")]))
