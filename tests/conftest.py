import sys
from pathlib import Path

import pytest
import torch

# The plain baseline in bench/ is the tests' oracle.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
