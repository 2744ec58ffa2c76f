"""
QUEEN's shadow models: briefly trained models that stand in for a pirate early in its training, so that QUEEN can
estimate the pirate's output ``y_pir`` when it builds a gradient-reversed answer.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from art_queen.model_access import (
    log_probabilities,
    outputs_are_probabilities,
    reinitialised_copy,
    torch_to_probabilities,
)

logger = logging.getLogger(__name__)


def _loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Models may end in logits or in a softmax; train either with cross-entropy on log-probabilities.
    with torch.no_grad():
        are_probabilities = outputs_are_probabilities(outputs)
    return nn.functional.nll_loss(log_probabilities(outputs, are_probabilities), labels)


def train_shadow_models(
    template: nn.Module | Callable[[], nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    n_shadows: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    verbose: bool,
) -> list[nn.Module]:
    """
    Train ``n_shadows`` shadow models for ``epochs`` epochs each, on the defender's training data.

    :param template: Either a model to copy and re-initialise, or a factory returning a fresh model.
    :param inputs: Preprocessed training inputs, as the model consumes them.
    :param labels: Training labels (class indices).
    :param n_shadows: Number of shadow models.
    :param epochs: Training epochs per shadow.
    :param batch_size: Training batch size.
    :param learning_rate: Adam learning rate.
    :param seed: Base seed; shadow ``j`` uses ``seed + j``.
    :param verbose: Show a progress bar.
    :return: The trained shadows, in eval mode.
    """
    shadows = []
    for index in tqdm(range(n_shadows), desc="QUEEN shadow models", disable=not verbose, leave=False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + index)
            shadow = template() if not isinstance(template, nn.Module) else reinitialised_copy(template, seed + index)
            shadow = shadow.to(inputs.device)
            optimiser = torch.optim.Adam(shadow.parameters(), lr=learning_rate)
            shadow.train()
            for _ in range(epochs):
                order = torch.randperm(inputs.shape[0]).to(inputs.device)
                for start in range(0, inputs.shape[0], batch_size):
                    batch = order[start : start + batch_size]
                    loss = _loss(shadow(inputs[batch]), labels[batch])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        shadow.eval()
        for parameter in shadow.parameters():
            parameter.requires_grad_(False)
        shadows.append(shadow)
    logger.info("Trained %d shadow models for %d epoch(s) each.", n_shadows, epochs)
    return shadows


def pirate_estimate(
    shadows: list[nn.Module], inputs: torch.Tensor, subsets: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """
    ``y_pir`` per row: the mean of the softmax outputs of the shadows in that row's subset.

    Each shadow runs once over just the rows whose subset contains it (in batches of ``batch_size`` rows, which
    keeps the activations in cache), so the cost is ``k`` shadow passes per row.

    :param shadows: The shadow models.
    :param inputs: Preprocessed inputs of the rows, shape `(m, ...)`.
    :param subsets: Boolean array `(m, n_shadows)`: which shadows each row averages.
    :param batch_size: Rows per shadow forward call.
    :return: Array of shape `(m, C)`, float64.
    """
    total: torch.Tensor | None = None
    with torch.no_grad():
        for index, shadow in enumerate(shadows):
            rows = np.flatnonzero(subsets[:, index])
            for start in range(0, rows.size, batch_size):
                row_index = torch.from_numpy(rows[start : start + batch_size]).to(inputs.device)
                probabilities = torch_to_probabilities(shadow(inputs[row_index])).double()
                if total is None:
                    total = torch.zeros(
                        (inputs.shape[0], probabilities.shape[1]), dtype=torch.float64, device=inputs.device
                    )
                total.index_add_(0, row_index, probabilities)
    if total is None:
        raise ValueError("No shadow model was selected for any row.")
    counts = torch.from_numpy(subsets.sum(axis=1, keepdims=True).astype(np.float64)).to(total.device)
    return (total / counts).cpu().numpy()
