"""
This module implements the repeat-and-compare attack `RepeatCompare` against QUEEN.

QUEEN builds a gradient-reversed answer from a fresh random subset of its shadow models for every query, while its
other answers (feature-perturbed) are a deterministic function of the query. Asking the same query again therefore
gives a different answer only when the answer is reversed.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from art_queen.attacks._common import AdaptiveExtractionAttack, check_fraction, check_positive_int

if TYPE_CHECKING:  # pragma: no cover
    from art.utils import CLASSIFIER_TYPE

logger = logging.getLogger(__name__)

REPEAT_ORDERS = ("least_confident", "latest", "random")


class RepeatCompare(AdaptiveExtractionAttack):
    """
    Extraction attack that spends part of its budget on asking queries again and drops (or down-weights) the answers
    that change between repeats by more than ``tolerance`` in L1 distance.

    The budget splits into ``U`` distinct queries and ``R * (n_repeats - 1)`` repeat asks, with the repeat asks about
    ``repeat_fraction`` of the budget. The repeated queries are those whose first answer looks most suspicious
    (``repeat_order``): the least confident (reversed answers follow the shadows, not the confident victim), the
    latest (reversal sets in once a class is over-explored), or random ones. Optionally (``propagate``) a logistic
    regression on the sorted answer vector, fitted on the repeated queries' verdicts, flags the unrepeated answers
    too.

    The repeats are sent after all first asks, so a query recorded by QUEEN on its first ask is covered (not new) when
    it comes back, and its answer repeats exactly. When most repeated answers change, the defence randomises every
    answer (noise, not reversal): nothing is dropped and the repeats are averaged instead.

    | Paper link: https://arxiv.org/abs/2407.01251
    """

    attack_params = AdaptiveExtractionAttack.attack_params + [
        "repeat_fraction",
        "n_repeats",
        "tolerance",
        "suspect_weight",
        "repeat_order",
        "propagate",
        "max_changed_fraction",
    ]

    def __init__(
        self,
        classifier: CLASSIFIER_TYPE,
        batch_size_fit: int = 64,
        batch_size_query: int = 256,
        nb_epochs: int = 30,
        nb_stolen: int = 1000,
        use_probability: bool = True,
        repeat_fraction: float = 0.3,
        n_repeats: int = 2,
        tolerance: float = 1e-4,
        suspect_weight: float = 0.0,
        repeat_order: str = "least_confident",
        propagate: bool = True,
        max_changed_fraction: float = 0.95,
        seed: int | None = 0,
        verbose: bool = False,
    ) -> None:
        """
        Create a RepeatCompare attack.

        :param classifier: The victim classifier.
        :param batch_size_fit: Batch size for training the thieved classifier.
        :param batch_size_query: Rows per ``predict`` call to the victim.
        :param nb_epochs: Training epochs of the thieved classifier.
        :param nb_stolen: Query budget (rows sent to ``predict``, repeats included).
        :param use_probability: Train on probability vectors; `False` trains on their top-1 labels.
        :param repeat_fraction: Share of the budget spent on repeat asks, in [0, 1).
        :param n_repeats: How many times a repeated query is asked in all (at least 2).
        :param tolerance: Largest L1 distance between the answers to the same query that still counts as equal.
        :param suspect_weight: Training weight of an answer that changed between repeats (0 drops it), in [0, 1].
        :param repeat_order: Which queries to repeat: ``"least_confident"``, ``"latest"`` or ``"random"``.
        :param propagate: Flag unrepeated answers with a classifier of answer vectors fitted on the repeated ones.
        :param max_changed_fraction: If a larger share of the repeated answers changed, the defence is taken for a
                                     randomising one: nothing is dropped and repeats are averaged.
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
        self.repeat_fraction = repeat_fraction
        self.n_repeats = n_repeats
        self.tolerance = tolerance
        self.suspect_weight = suspect_weight
        self.repeat_order = repeat_order
        self.propagate = propagate
        self.max_changed_fraction = max_changed_fraction
        self.repeated_: np.ndarray | None = None
        self.changed_: np.ndarray | None = None
        self.flagged_: np.ndarray | None = None
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_fraction("repeat_fraction", self.repeat_fraction, 0.0, 1.0)
        check_positive_int("n_repeats", self.n_repeats, minimum=2)
        if (
            not isinstance(self.tolerance, (int, float, np.number))
            or not np.isfinite(self.tolerance)
            or self.tolerance < 0
        ):
            raise ValueError(f"The parameter `tolerance` must be a non-negative finite number, got {self.tolerance!r}.")
        check_fraction("suspect_weight", self.suspect_weight, 0.0, 1.0, closed_high=True)
        if self.repeat_order not in REPEAT_ORDERS:
            raise ValueError(f"The parameter `repeat_order` must be one of {REPEAT_ORDERS}, got {self.repeat_order!r}.")
        if not isinstance(self.propagate, bool):
            raise ValueError(f"The parameter `propagate` must be a boolean, got {self.propagate!r}.")
        check_fraction("max_changed_fraction", self.max_changed_fraction, 0.0, 1.0, closed_high=True)

    def split_budget(self) -> tuple[int, int]:
        """
        Split the budget into distinct queries and repeated queries.

        :return: ``(n_distinct, n_repeated)`` with ``n_distinct + n_repeated * (n_repeats - 1) <= nb_stolen`` and
                 ``n_repeated <= n_distinct``.
        """
        extra_asks = self.n_repeats - 1
        n_repeated = int(np.floor(self.repeat_fraction * self.nb_stolen)) // extra_asks
        n_distinct = self.nb_stolen - n_repeated * extra_asks
        return n_distinct, min(n_repeated, n_distinct)

    def extract(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> CLASSIFIER_TYPE:
        """
        Ask distinct samples of ``x``, repeat the most suspicious ones, drop or down-weight the answers that change,
        and train the thieved classifier on the rest.

        After the call: ``queries_used_`` (every row sent), ``repeated_`` (indices, in first-ask order, of the
        repeated queries), ``changed_`` (boolean per repeated query: its answers differed) and ``flagged_``
        (boolean per distinct query: taken for reversed, by repeat or by propagation).

        :param x: Source samples of the attacker.
        :param y: Not used.
        :param thieved_classifier: A fresh, undefended ART ``PyTorchClassifier`` to train.
        :return: The trained thieved classifier.
        """
        if y is not None:
            logger.warning("This attack does not use the provided labels y.")
        x, thieved_classifier = self._start(x, kwargs)
        n_distinct, n_repeated = self.split_budget()
        queries = x[self._draw(x, n_distinct)]
        if queries.shape[0] < n_distinct:  # a short pool leaves budget over: spend it on more repeats
            n_repeated = min(queries.shape[0], (self.nb_stolen - queries.shape[0]) // (self.n_repeats - 1))
        answers = self._query(queries, description="First asks")

        repeated = self._choose_repeats(answers, n_repeated)
        repeat_answers = [
            self._query(queries[repeated], description=f"Repeat {round_ + 2}") for round_ in range(self.n_repeats - 1)
        ]
        all_answers = np.stack([answers[repeated], *repeat_answers])  # (n_repeats, R, C)
        spread = np.abs(all_answers - all_answers[0:1]).sum(axis=2).max(axis=0)
        changed = spread > self.tolerance

        targets = answers.astype(np.float32, copy=True)
        flagged = np.zeros(len(queries), dtype=bool)
        if repeated.size and changed.mean() > self.max_changed_fraction:
            logger.warning(
                "%.0f%% of the repeated answers changed (more than max_changed_fraction=%s): the defence randomises "
                "every answer, so repeats are averaged and nothing is dropped.",
                100 * changed.mean(),
                self.max_changed_fraction,
            )
            targets[repeated] = all_answers.mean(axis=0)
        else:
            flagged[repeated[changed]] = True
            if self.propagate:
                unrepeated = np.setdiff1d(np.arange(len(queries)), repeated)
                flagged[unrepeated] = self._propagate(answers[repeated], changed, answers[unrepeated])
        weights = np.where(flagged, self.suspect_weight, 1.0).astype(np.float32)
        self.repeated_, self.changed_, self.flagged_ = repeated, changed, flagged
        logger.info(
            "RepeatCompare: %d distinct queries, %d repeated, %d changed, %d flagged in all.",
            len(queries),
            repeated.size,
            int(changed.sum()),
            int(flagged.sum()),
        )
        return self._train(thieved_classifier, queries, targets, weights=weights)

    def _choose_repeats(self, answers: np.ndarray, count: int) -> np.ndarray:
        if count <= 0:
            return np.zeros(0, dtype=np.int64)
        if self.repeat_order == "least_confident":
            order = np.argsort(answers.max(axis=1), kind="stable")
        elif self.repeat_order == "latest":
            order = np.arange(len(answers))[::-1]
        else:
            order = self._rng.permutation(len(answers))
        return np.sort(order[:count])

    def _propagate(self, repeated_answers: np.ndarray, changed: np.ndarray, others: np.ndarray) -> np.ndarray:
        """Flag unrepeated answers with a logistic regression on sorted log-answers fitted on the repeat verdicts."""
        from sklearn.linear_model import LogisticRegression

        if others.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        if min(int(changed.sum()), int((~changed).sum())) < 5:
            logger.info("Too few changed or unchanged repeats to fit a detector; unrepeated answers are kept.")
            return np.zeros(len(others), dtype=bool)
        detector = LogisticRegression(max_iter=1000)
        detector.fit(_answer_features(repeated_answers), changed)
        return detector.predict(_answer_features(others)).astype(bool)


def _answer_features(answers: np.ndarray) -> np.ndarray:
    """Features of answer vectors that ignore which class is which: sorted log-probabilities."""
    return np.sort(np.log(np.clip(answers, 1e-12, 1.0)), axis=1)
