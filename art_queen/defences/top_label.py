"""
This module implements a correct top-1 (hard label) postprocessor.

ART 1.20.1's ``ClassLabels`` indexes ``class_labels[:, index_labels] = 1`` with the winners of all rows at once, so
for a batch of more than one row every row gets a one at every row's winning class. :class:`TopLabel` answers each
row with the one-hot vector of its own winner.
"""

from __future__ import annotations

import logging

import numpy as np
from art.config import ART_NUMPY_DTYPE
from art.defences.postprocessor.postprocessor import Postprocessor

from art_queen.defences._common import check_predictions

logger = logging.getLogger(__name__)


class TopLabel(Postprocessor):
    """
    Answer only the top-1 label of each query, as a one-hot probability row.

    This is the "label only" baseline of model-extraction defences: the answer keeps the accuracy of the model and
    removes all information carried by the secondary probabilities. Ties go to the lowest class index, as
    ``numpy.argmax``. It replaces ART's ``ClassLabels``, which is wrong for batches of more than one row.

    | Paper link: https://arxiv.org/abs/1609.02943 (Tramer et al., returning class labels only as a countermeasure)
    """

    params: list[str] = []

    def __init__(self, apply_fit: bool = False, apply_predict: bool = True) -> None:
        """
        Create a TopLabel postprocessor.

        :param apply_fit: True if applied during fitting/training.
        :param apply_predict: True if applied during predicting.
        """
        super().__init__(is_fitted=True, apply_fit=apply_fit, apply_predict=apply_predict)
        self._check_params()

    def __call__(self, preds: np.ndarray) -> np.ndarray:
        """
        Replace each row of ``preds`` by the one-hot vector of its largest entry.

        :param preds: Model outputs (probabilities or logits) of shape `(n_queries, n_classes)`.
        :return: One-hot rows of shape `(n_queries, n_classes)`, float32.
        :raises ValueError: If ``preds`` is empty, not 2-D, has fewer than two columns or non-finite values.
        """
        values = check_predictions(preds)
        winners = np.argmax(values, axis=1)
        answers = np.zeros(values.shape, dtype=ART_NUMPY_DTYPE)
        answers[np.arange(values.shape[0]), winners] = 1.0
        return answers

    def _check_params(self) -> None:
        pass
