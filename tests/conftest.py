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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
