"""
Helpers shared by the peer defences: validation of the arrays they receive, and the PyTorch plumbing of defences
that run models of their own (fresh copies of the victim's architecture, log-probabilities of model outputs).

PyTorch is imported inside the functions that need it, so this module imports without PyTorch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    pass

logger = logging.getLogger(__name__)


class DefenceNotFittedError(ValueError):
    """Raised when a defence that must be fitted (or bound to a classifier) first is used before that."""


def check_predictions(preds: Any) -> np.ndarray:
    """
    Validate model outputs handed to a defence and return them as a float64 array.

    :param preds: Model outputs (probabilities or logits) of shape `(n_queries, n_classes)`.
    :return: The outputs as a float64 array of the same shape.
    :raises ValueError: If ``preds`` is not a non-empty, finite, floating-point 2-D array with at least two columns.
    """
    array = np.asarray(preds)
    if array.dtype.kind != "f":
        raise ValueError(f"The predictions must be a floating-point array, not an array of dtype {array.dtype}.")
    if array.ndim != 2:
        raise ValueError(
            f"The predictions must be a 2-D array of shape (n_queries, n_classes), but their shape is {array.shape}."
        )
    if array.shape[0] == 0:
        raise ValueError("The batch of predictions is empty; a defence needs at least one query.")
    if array.shape[1] < 2:
        raise ValueError(
            f"The predictions must have at least two columns (one per class), but they have {array.shape[1]}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("The predictions contain NaN or infinite values.")
    return array.astype(np.float64)


def check_inputs(x: Any, nb_rows: int) -> np.ndarray:
    """
    Validate the queried inputs handed to an input-aware defence.

    :param x: Queried inputs, one row per query.
    :param nb_rows: The number of rows of the predictions that go with ``x``.
    :return: ``x`` as a float32 array.
    :raises ValueError: If ``x`` is not a finite floating-point array with ``nb_rows`` rows.
    """
    array = np.asarray(x)
    if array.dtype.kind != "f":
        raise ValueError(f"The inputs must be a floating-point array, not an array of dtype {array.dtype}.")
    if array.ndim < 2:
        raise ValueError(
            f"The inputs must have a batch dimension and at least one feature, but their shape is {array.shape}."
        )
    if array.shape[0] == 0:
        raise ValueError("The batch of inputs is empty; a defence needs at least one query.")
    if array.shape[0] != nb_rows:
        raise ValueError(
            f"The inputs have {array.shape[0]} rows but the predictions have {nb_rows}; they must describe the same "
            "queries."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("The inputs contain NaN or infinite values.")
    return array.astype(np.float32, copy=False)


def check_labels(y: Any, nb_rows: int, nb_classes: int) -> np.ndarray:
    """
    Validate training labels given as class indices or as one-hot (or soft-label) rows and return class indices.

    :param y: Labels of shape `(n,)` (indices) or `(n, nb_classes)`.
    :param nb_rows: The number of training inputs.
    :param nb_classes: The number of classes of the model.
    :return: Class indices of shape `(n,)`, int64.
    :raises ValueError: If the labels do not match the inputs or name classes outside `[0, nb_classes)`.
    """
    array = np.asarray(y)
    if array.ndim == 2:
        if array.shape[1] != nb_classes:
            raise ValueError(f"One-hot labels must have {nb_classes} columns, but they have {array.shape[1]}.")
        if not np.all(np.isfinite(array)):
            raise ValueError("The labels contain NaN or infinite values.")
        array = np.argmax(array, axis=1)
    elif array.ndim == 1:
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise ValueError("Label indices must be whole numbers.")
        elif array.dtype.kind not in "iu":
            raise ValueError(f"Label indices must be integers, not values of dtype {array.dtype}.")
    else:
        raise ValueError(
            f"The labels must be indices of shape (n,) or one-hot rows of shape (n, C), not {array.shape}."
        )
    if array.shape[0] != nb_rows:
        raise ValueError(f"There are {array.shape[0]} labels for {nb_rows} inputs; give one label per input.")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= nb_classes):
        raise ValueError(f"Label indices must lie in [0, {nb_classes - 1}].")
    return array
