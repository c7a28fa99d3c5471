"""The digits ablation: its rows follow the paper's table, and a small run writes its files."""
import csv
import math

import pytest
from click.testing import CliRunner
from PIL import Image

from elucd_fast.tools.ablate import AXES, ablation_rows, run_ablation
from elucd_fast.cli import main


def test_rows_follow_the_paper():
    rows = ablation_rows()
    assert [row.axis for row in rows].count("softplus") == 5 and len(rows) == 17
    assert [row.paper_fid for row in rows if row.axis == "sine"] == [5.57, 5.30, 5.27, 5.24, 5.38]
    first, second = ablation_rows(["input"])
    assert (first.settings["guidance_input"], second.settings["guidance_input"]) == ("xt", "x0")
    assert math.isinf(second.settings["softplus_beta"]) and second.settings["gamma_factor"] == 0
    tau = [row.settings for row in rows if row.axis == "temperature"]
    assert all(s["softplus_beta"] == 3 and s["gamma_factor"] == 0 for s in tau)
    with pytest.raises(ValueError, match="axes"):
        ablation_rows(["recurrent"])


def test_small_ablation_writes_table_csv_and_chart(tmp_path):
    summary = run_ablation(tmp_path, num_samples=24, num_steps=4, axes=["input", "sine"], batch_size=24,
                           log=lambda line: None)
    assert len(summary["rows"]) == 7
    assert all(0 <= row["class_accuracy"] <= 1 and 0 <= row["ice"] <= 1 and math.isfinite(row["fd"])
               for row in summary["rows"])
    table = (tmp_path / "ablation.md").read_text()
    assert "| input: x_t as input | 8.61 |" in table and "Seed noise" in table
    with open(tmp_path / "ablation.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 7 and lines[0]["guidance_input"] == "xt"
    with Image.open(tmp_path / "ablation.png") as chart:
        assert chart.size[0] > 300


@pytest.mark.parametrize("flags, message", [
    (["--axes", "input,recurrent"], "axes"),
    (["--num-samples", "1"], "num_samples"),
    (["--preset", "digits"], "DDPM"),
    (["--steps", "1"], "num_steps"),
])
def test_bad_flags_exit_2(tmp_path, flags, message):
    result = CliRunner().invoke(main, ["ablate", "--outdir", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output and not (tmp_path / "out").exists()


def test_axes_constant():
    assert AXES == ("input", "softplus", "temperature", "sine")
