"""Distribution: single-process fallback, and a 2-process torchrun run equal byte for byte to a
1-process run with another batch size."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed

from elucd_fast.runs import dist
from elucd_fast.runs import merge_npz_shards
from test_writers import SEEDS, TESTS_DIR, generate_into, png_tree, temp_files

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_plain_python_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    rank, world_size, device = dist.init_distributed()
    assert (rank, world_size, device.type) == (0, 1, "cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.distributed.is_initialized()
    assert dist.is_main() and dist.get_world_size() == 1
    dist.barrier()
    dist.shutdown()


def test_world_size_without_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        dist.init_distributed()


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this python")
def test_torchrun_two_ranks_match_one_process(tmp_path: Path):
    script = tmp_path / "generate_distributed.py"
    script.write_text(textwrap.dedent(f"""
        import pathlib, sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from elucd_fast.runs import dist
        from test_writers import generate_into
        rank, world_size, device = dist.init_distributed()
        assert world_size == 2 and device.type == "cpu"
        generate_into(pathlib.Path(sys.argv[1]), batch_size=3, device=device)
        dist.shutdown()
    """))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(two)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    # Rank 0 alone prints the summary.
    assert process.stderr.count("generated 30 image(s)") == 1, process.stderr[-3000:]
    assert sorted(p.name for p in two.glob("manifest-rank*.jsonl")) == ["manifest-rank000.jsonl",
                                                                        "manifest-rank001.jsonl"]

    one = tmp_path / "one"
    generate_into(one, batch_size=5)
    assert png_tree(two) == png_tree(one) and len(png_tree(one)) == len(SEEDS)
    merge_npz_shards(two, tmp_path / "two.npz")
    merge_npz_shards(one, tmp_path / "one.npz")
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    assert not temp_files(two)

    # A run started on two ranks resumes on one.
    summary = generate_into(two, seeds=range(40), batch_size=8)
    assert (summary["skipped"], summary["generated"]) == (30, 10)
