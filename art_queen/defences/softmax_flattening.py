"""
This module implements softmax flattening, the baseline the QUEEN paper calls "DP".

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import logging

import numpy as np
from art.config import ART_NUMPY_DTYPE
from art.defences.postprocessor.postprocessor import Postprocessor

from art_queen.defences._common import check_predictions
from art_queen.model_access import to_probabilities

logger = logging.getLogger(__name__)

#: Largest ``epsilon`` for which the answer is never sharper than the input (see :class:`SoftmaxFlattening`).
FLATTENING_EPSILON_BOUND = 4.0


class SoftmaxFlattening(Postprocessor):
    """
    Answer ``y_i = exp(epsilon/2 * p_i) / sum_j exp(epsilon/2 * p_j)`` for the probability row ``p`` of each query.

    The QUEEN paper compares against this transformation under the name "DP" because it has the form of the
    exponential mechanism. It is **not** differential privacy: the answer is a deterministic function of ``p``, no
    randomness is drawn and no privacy guarantee follows; it is named here for what it does.

    Properties: the top-1 label is kept (the map is strictly increasing in each ``p_i``), answers are probability
    rows, and the largest ratio between two answer entries is ``exp(epsilon/2)``, so a small ``epsilon`` gives a
    nearly uniform answer. For ``epsilon <= 4`` the answer is never sharper than ``p`` (its entropy is not lower; for
    two classes this follows from the concavity of the sigmoid on the positive axis; for more classes it is checked
    numerically by the tests). A larger ``epsilon`` sharpens rows near a tie (for two classes the map's slope at the
    uniform row is ``epsilon/4``), so it no longer flattens there. Inputs that are not probability rows are treated as
    logits and put through a softmax first.

    | Paper link: https://arxiv.org/abs/2407.01251
    """

    params = ["epsilon"]

    def __init__(self, epsilon: float = 1.0, apply_fit: bool = False, apply_predict: bool = True) -> None:
        """
        Create a SoftmaxFlattening postprocessor.

        :param epsilon: Positive temperature parameter: the answer is the softmax of ``epsilon/2`` times the
                        probability row. Smaller is flatter; ``epsilon <= 4`` never sharpens.
        :param apply_fit: True if applied during fitting/training.
        :param apply_predict: True if applied during predicting.
        """
        super().__init__(is_fitted=True, apply_fit=apply_fit, apply_predict=apply_predict)
        self.epsilon = epsilon
        self._check_params()

    def __call__(self, preds: np.ndarray) -> np.ndarray:
        """
        Flatten each probability row of ``preds``.

        :param preds: Model outputs (probabilities or logits) of shape `(n_queries, n_classes)`.
        :return: Flattened probability rows of shape `(n_queries, n_classes)`, float32.
        :raises ValueError: If ``preds`` is empty, not 2-D, has fewer than two columns or non-finite values.
        """
        probabilities = to_probabilities(check_predictions(preds)).astype(np.float64)
        scores = 0.5 * float(self.epsilon) * probabilities
        scores -= scores.max(axis=1, keepdims=True)
        weights = np.exp(scores)
        return (weights / weights.sum(axis=1, keepdims=True)).astype(ART_NUMPY_DTYPE)

    def _check_params(self) -> None:
        if (
            isinstance(self.epsilon, bool)
            or not isinstance(self.epsilon, (int, float, np.integer, np.floating))
            or not np.isfinite(self.epsilon)
            or self.epsilon <= 0
        ):
            raise ValueError(f"The parameter `epsilon` must be a positive finite number, but it is {self.epsilon!r}.")
