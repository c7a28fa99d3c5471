import os
import sys
from pathlib import Path

# Triton decides between compiling and interpreting when it is first imported: without a GPU,
# its kernels are tested in the interpreter, so say so before anything imports it.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests run tiny networks: one thread is faster than two there (no fork/join per op), and
# far faster on a loaded machine.
torch.set_num_threads(1)

# The plain baseline in bench/ is the tests' oracle.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


@pytest.fixture
def cpu_bf16(request, monkeypatch) -> bool:
    """The CPU's bf16 hardware probe overridden with `request.param` (parametrize indirectly with
    True/False): every machine then tests the engine's bf16 branch and its no-bf16 branch (auto
    choosing fp32, the bf16 refusal). bf16 arithmetic itself runs on any x86-64 CPU, emulated
    where the hardware lacks it; tests of bf16 accuracy or speed skip on such CPUs instead."""
    value = bool(request.param)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: value, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: value, raising=False)
    return value


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
