"""
This module implements the sparsity-tell attack `SparsityFilter` against QUEEN.

QUEEN answers a query in an over-explored class core with the gradient-reversed vector ``relu(2 y_pir - p) / sum``,
which is exactly zero on every class where ``2 y_pir <= p``, while a softmax answer is strictly positive. The zero
entries betray the reversed answers; because the victim's own top class carries most of ``p``, it is almost always
among them.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from art_queen.attacks._common import AdaptiveExtractionAttack, check_fraction

if TYPE_CHECKING:  # pragma: no cover
    from art.utils import CLASSIFIER_TYPE

logger = logging.getLogger(__name__)

SPARSITY_MODES = ("drop", "complementary", "recover")


def zero_entry_mask(answers: np.ndarray, zero_threshold: float = 0.0) -> np.ndarray:
    """
    Entries of probability rows that count as zero.

    :param answers: Probability rows, shape `(n, C)`.
    :param zero_threshold: Entries at or below this value count as zero.
    :return: Boolean array `(n, C)`.
    """
    return np.asarray(np.asarray(answers) <= zero_threshold)


def sparse_answers(answers: np.ndarray, zero_threshold: float = 0.0) -> np.ndarray:
    """
    Rows with at least one zero entry: the tell of a gradient-reversed (projected) answer.

    :param answers: Probability rows, shape `(n, C)`.
    :param zero_threshold: Entries at or below this value count as zero.
    :return: Boolean array `(n,)`.
    """
    return np.asarray(zero_entry_mask(answers, zero_threshold).any(axis=1))


class SparsityFilter(AdaptiveExtractionAttack):
    """
    Extraction attack that detects gradient-reversed answers by their exact zeros and drops them, trains on them as
    wrong (complementary label: the answer's top class is not the true one), or recovers the true label from them
    (label set: the true class lies among the zero entries).

    The tell is calibrated: when more than ``max_flagged_fraction`` of the answers have zeros, zeros are a property of
    the defence's answers in general (rounding, top-1 answers) rather than a reversal tell, and nothing is flagged.

    | Paper link: https://arxiv.org/abs/2407.01251
    """

    attack_params = AdaptiveExtractionAttack.attack_params + ["zero_threshold", "mode", "max_flagged_fraction"]

    def __init__(
        self,
        classifier: CLASSIFIER_TYPE,
        batch_size_fit: int = 64,
        batch_size_query: int = 256,
        nb_epochs: int = 30,
        nb_stolen: int = 1000,
        use_probability: bool = True,
        zero_threshold: float = 0.0,
        mode: str = "recover",
        max_flagged_fraction: float = 0.5,
        seed: int | None = 0,
        verbose: bool = False,
    ) -> None:
        """
        Create a SparsityFilter attack.

        :param classifier: The victim classifier.
        :param batch_size_fit: Batch size for training the thieved classifier.
        :param batch_size_query: Rows per ``predict`` call to the victim.
        :param nb_epochs: Training epochs of the thieved classifier.
        :param nb_stolen: Query budget (rows sent to ``predict``).
        :param use_probability: Train on the probability vectors of the trusted answers; `False` trains on their
                                top-1 labels.
        :param zero_threshold: Answer entries at or below this value count as zero (a softmax is strictly positive).
        :param mode: What to do with a flagged answer: ``"drop"`` it, ``"complementary"`` (train the thief away from
                     its top class) or ``"recover"`` (train the thief towards the set of its zero classes).
        :param max_flagged_fraction: If a larger share of the answers has zeros, the tell is considered uninformative
                                     and no answer is flagged.
        :param seed: Seed of the query selection and training order.
        :param verbose: Show progress bars.
        """
        super().__init__(
            classifier,
            batch_size_fit=batch_size_fit,
            batch_size_query=batch_size_query,
            nb_epochs=nb_epochs,
            nb_stolen=nb_stolen,
            use_probability=use_probability,
            seed=seed,
            verbose=verbose,
        )
        self.zero_threshold = zero_threshold
        self.mode = mode
        self.max_flagged_fraction = max_flagged_fraction
        self.queries_: np.ndarray | None = None
        self.answers_: np.ndarray | None = None
        self.flagged_: np.ndarray | None = None
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_fraction("zero_threshold", self.zero_threshold, 0.0, 1.0)
        if self.mode not in SPARSITY_MODES:
            raise ValueError(f"The parameter `mode` must be one of {SPARSITY_MODES}, got {self.mode!r}.")
        check_fraction("max_flagged_fraction", self.max_flagged_fraction, 0.0, 1.0, closed_high=True)

    def extract(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> CLASSIFIER_TYPE:
        """
        Query ``nb_stolen`` samples of ``x``, flag the answers with zero entries and train the thieved classifier.

        After the call: ``queries_used_`` (rows sent), ``queries_`` and ``answers_`` (in query order) and
        ``flagged_`` (which answers were taken for gradient-reversed ones).

        :param x: Source samples of the attacker.
        :param y: Not used.
        :param thieved_classifier: A fresh, undefended ART ``PyTorchClassifier`` to train.
        :return: The trained thieved classifier.
        """
        if y is not None:
            logger.warning("This attack does not use the provided labels y.")
        x, thieved_classifier = self._start(x, kwargs)
        queries = x[self._draw(x, self.nb_stolen)]
        answers = self._query(queries)
        flagged = self.detect(answers)
        self.queries_, self.answers_, self.flagged_ = queries, answers, flagged
        targets, weights, label_sets = self.training_targets(answers, flagged)
        logger.info(
            "SparsityFilter: %d of %d answers flagged as reversed (mode %s).", flagged.sum(), len(flagged), self.mode
        )
        return self._train(thieved_classifier, queries, targets, weights=weights, label_sets=label_sets)

    def detect(self, answers: np.ndarray) -> np.ndarray:
        """
        Flag the answers that look gradient-reversed (at least one zero entry), unless too many do.

        :param answers: Probability rows, shape `(n, C)`.
        :return: Boolean array `(n,)`.
        """
        flagged = sparse_answers(answers, self.zero_threshold)
        if flagged.mean() > self.max_flagged_fraction:
            logger.warning(
                "%.0f%% of the answers have zero entries, more than max_flagged_fraction=%s: zeros are not a reversal "
                "tell for this classifier, so no answer is flagged.",
                100 * flagged.mean(),
                self.max_flagged_fraction,
            )
            return np.zeros_like(flagged)
        return flagged

    def training_targets(self, answers: np.ndarray, flagged: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """
        Targets, weights and label-set flags for training, following ``mode``.

        :param answers: Probability rows, shape `(n, C)`.
        :param flagged: Boolean `(n,)`: answers taken for reversed ones.
        :return: ``(targets, weights, label_sets)`` as expected by the thief's training.
        """
        targets = answers.astype(np.float32, copy=True)
        weights = np.ones(len(answers), dtype=np.float32)
        label_sets = np.zeros(len(answers), dtype=bool)
        rows = np.flatnonzero(flagged)
        if self.mode == "drop":
            weights[rows] = 0.0
        elif self.mode == "complementary":
            masks = np.ones((rows.size, answers.shape[1]), dtype=np.float32)
            masks[np.arange(rows.size), np.argmax(answers[rows], axis=1)] = 0.0
            targets[rows] = masks
            label_sets[rows] = True
        else:
            targets[rows] = zero_entry_mask(answers[rows], self.zero_threshold).astype(np.float32)
            label_sets[rows] = True
        return targets, weights, label_sets
