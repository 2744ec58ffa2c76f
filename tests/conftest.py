"""Shared test fixtures: ART's data path in a temporary folder, one CPU thread, seeded digits data and victim."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

# Importing ART writes ~/.art; point it (and HOME) at a temporary folder before anything imports ART.
_ART_HOME = tempfile.mkdtemp(prefix="art_queen_tests_")
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import art.config

    art.config.set_data_path(_ART_HOME)
except ImportError:  # pragma: no cover - torch-free environments without ART
    pass

try:
    import torch

    torch.set_num_threads(1)
    HAS_TORCH = True
except ImportError:  # pragma: no cover
    HAS_TORCH = False


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``torch`` cleanly when PyTorch is not installed."""
    if HAS_TORCH:
        return
    skip = pytest.mark.skip(reason="PyTorch is not installed")
    for item in items:
        if "torch" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    """Digits as float32 images in [0, 1] of shape (n, 1, 8, 8), split into train / attacker pool / test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return {
        "x_train": x[:900],
        "y_train": y[:900],
        "x_pool": x[900:1500],
        "y_pool": y[900:1500],
        "x_test": x[1500:],
        "y_test": y[1500:],
    }
