import os

import lightning  # noqa: F401  - import once under pytest's session capture, see below
import pytest
import torch

# Lightning's log handler keeps the sys.stderr it saw at first import. Importing it here, while
# pytest's session-wide capture is active, keeps that stream valid; a first import inside a
# `capsys` test would leave the handler writing to a closed stream in later tests.

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
