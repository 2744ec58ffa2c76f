"""Shared test fixtures: ART's data path in a temporary folder, one CPU thread, seeded digits data and victim."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

# Importing ART writes ~/.art; point it (and HOME) at a temporary folder before anything imports ART.
_ART_HOME = tempfile.mkdtemp(prefix="art_queen_tests_")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# ART decides where ~/.art is when it is first imported: import it with HOME pointing at the temporary folder.
_SAVED_HOME = os.environ.get("HOME")
os.environ["HOME"] = _ART_HOME
try:
    import art.config

    art.config.set_data_path(_ART_HOME)
except ImportError:  # pragma: no cover - torch-free environments without ART
    pass
finally:
    if _SAVED_HOME is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = _SAVED_HOME

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


def build_digits_model(ends_in_softmax: bool = False, seed: int = 0):
    """A small CNN for 1x8x8 digits ending in logits (or in a softmax)."""
    import torch

    torch.manual_seed(seed)
    layers = [
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ]
    if ends_in_softmax:
        layers.append(torch.nn.Softmax(dim=1))
    return torch.nn.Sequential(*layers)


def make_classifier(model, postprocessing_defences=None, classifier_class=None):
    """Wrap a digits model in an ART PyTorchClassifier (or a given subclass)."""
    import torch
    from art.estimators.classification import PyTorchClassifier

    cls = classifier_class or PyTorchClassifier
    return cls(
        model,
        torch.nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        postprocessing_defences=postprocessing_defences,
    )


def train_digits_model(digits, ends_in_softmax: bool = False, seed: int = 0, epochs: int = 30):
    """Train the digits CNN on the fixture's training split; returns the torch model in eval mode."""
    import torch

    model = build_digits_model(ends_in_softmax=ends_in_softmax, seed=seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.from_numpy(digits["x_train"])
    y = torch.from_numpy(digits["y_train"])
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            output = model(x[batch])
            if ends_in_softmax:
                loss = torch.nn.functional.nll_loss(torch.log(output.clamp_min(1e-12)), y[batch])
            else:
                loss = torch.nn.functional.cross_entropy(output, y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    return model


@pytest.fixture(scope="session")
def digits_model(digits):
    """A trained digits CNN ending in logits (shared, do not modify; deep-copy it if you need to)."""
    if not HAS_TORCH:
        pytest.skip("PyTorch is not installed")
    return train_digits_model(digits)


def attacker_queries(digits, count: int, seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """An attacker's query set: pool samples drawn with replacement plus light noise, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    x = digits["x_pool"][rng.integers(0, len(digits["x_pool"]), count)]
    x = x + rng.normal(0.0, noise, x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)
