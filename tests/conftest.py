"""Shared pytest configuration: the ``gpu`` marker skips where CUDA is absent."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # Most tests use tiny tensors, for which intra-op threads only add synchronisation; with
    # 2 cores and 2-process tests running beside them, one thread per process is faster.
    torch.set_num_threads(1)
