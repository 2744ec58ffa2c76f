"""
This module implements the core-avoidance attack `CoreAvoidance` against QUEEN.

QUEEN only records and reverses queries that are *new* (no recorded query of their class within ``r``) and *inside*
their class's sensitive region (the class core in its embedding). A query set shaped to stay off the cores, or to
stay within ``r`` of queries QUEEN has already recorded, explores the victim without raising its class query
sensitivity.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from art_queen.attacks._common import AdaptiveExtractionAttack, check_fraction, check_positive_int
from art_queen.attacks.sparsity_filter import sparse_answers

if TYPE_CHECKING:  # pragma: no cover
    from art.utils import CLASSIFIER_TYPE

logger = logging.getLogger(__name__)

_NOISE_LADDER = (0.002, 0.004, 0.008, 0.016, 0.032, 0.064)
_MIXUP_CANDIDATES = 3
"""Mixup candidates drawn per mixup query; the most off-core ones (by the proxy's core score) are asked."""
_MIN_TELLS = 10
"""Reversal tells (and non-tells) needed before the attack fits its risk model on them."""
_DUPLICATE_SAFETY = 0.3
"""Near-duplicates may move the proxy's features by this share of ``record_radius`` only: the proxy's feature space
and QUEEN's embedding are different spaces, so the attacker keeps a margin."""


class CoreAvoidance(AdaptiveExtractionAttack):
    """
    Extraction attack that chooses and transforms its queries so that QUEEN records and reverses as few as possible.

    1. **Seed**: ``seed_fraction`` of the budget on random source samples, asked first (while QUEEN's class
       sensitivities are still low); the thieved classifier warms up on their answers and serves as the proxy.
    2. **Class cores in the proxy's features** (the input of its last linear layer): per class (the answers' top-1)
       the mean feature vector and the mean distance to it; a sample's *core score* is its distance to the centre of
       its predicted class in units of that class's mean radius, lowered by the proxy's confidence (off-core samples
       score high).
    3. **Near-duplicates** (``duplicate_fraction``): small noise added to the most core-like seed queries, each scaled
       (largest of a ladder of noise levels) so that the proxy's feature displacement stays within ``record_radius``
       times the class's mean radius, the attacker's estimate of QUEEN's public default ``r``: a near-duplicate of a
       recorded query is never new, hence never recorded or reversed.
    4. **Off-core samples and mixups**, asked in ``rounds`` rounds: unqueried source samples, and (``mixup_fraction``
       of the budget) convex combinations of two source samples of different predicted classes, which fall between
       the class cores, near the decision boundaries. Each round asks the candidates of lowest *risk*: minus the core
       score at first; once enough answers carry QUEEN's reversal tell (exact zeros, see
       :class:`~art_queen.attacks.SparsityFilter`), plus (rank for rank) the output of a logistic regression on the
       proxy's features and probabilities that predicts the tell, refitted on all answers before each round: it
       learns where the over-explored cores lie in the proxy's feature space.

    The thieved classifier then trains on all answers.

    | Paper link: https://arxiv.org/abs/2407.01251
    """

    attack_params = AdaptiveExtractionAttack.attack_params + [
        "seed_fraction",
        "duplicate_fraction",
        "mixup_fraction",
        "record_radius",
        "warmup_epochs",
        "rounds",
    ]

    def __init__(
        self,
        classifier: CLASSIFIER_TYPE,
        batch_size_fit: int = 64,
        batch_size_query: int = 256,
        nb_epochs: int = 30,
        nb_stolen: int = 1000,
        use_probability: bool = True,
        seed_fraction: float = 0.2,
        duplicate_fraction: float = 0.2,
        mixup_fraction: float = 0.3,
        record_radius: float = 0.1,
        warmup_epochs: int = 20,
        rounds: int = 4,
        seed: int | None = 0,
        verbose: bool = False,
    ) -> None:
        """
        Create a CoreAvoidance attack.

        :param classifier: The victim classifier.
        :param batch_size_fit: Batch size for training the thieved classifier.
        :param batch_size_query: Rows per ``predict`` call to the victim.
        :param nb_epochs: Training epochs of the thieved classifier on all answers.
        :param nb_stolen: Query budget (rows sent to ``predict``).
        :param use_probability: Train on probability vectors; `False` trains on their top-1 labels.
        :param seed_fraction: Share of the budget for the random seed queries, in (0, 1).
        :param duplicate_fraction: Share of the budget for near-duplicates of seed queries, in [0, 1).
        :param mixup_fraction: Share of the budget for mixups of two predicted classes, in [0, 1).
        :param record_radius: The attacker's estimate of QUEEN's record radius ``r``, in units of a class's mean
                              radius (QUEEN's public default is 0.1).
        :param warmup_epochs: Training epochs of the thieved classifier on the seed answers (the proxy).
        :param rounds: Number of rounds in which the off-core samples and mixups are chosen and asked; the risk model
                       is refitted on all answers before each round.
        :param seed: Seed of the query selection, transformations and training order.
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
        self.seed_fraction = seed_fraction
        self.duplicate_fraction = duplicate_fraction
        self.mixup_fraction = mixup_fraction
        self.record_radius = record_radius
        self.warmup_epochs = warmup_epochs
        self.rounds = rounds
        self.query_kinds_: np.ndarray | None = None
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_fraction("seed_fraction", self.seed_fraction, 0.0, 1.0)
        if self.seed_fraction == 0:
            raise ValueError("The parameter `seed_fraction` must be positive: the proxy learns from the seed answers.")
        check_fraction("duplicate_fraction", self.duplicate_fraction, 0.0, 1.0)
        check_fraction("mixup_fraction", self.mixup_fraction, 0.0, 1.0)
        if self.seed_fraction + self.duplicate_fraction + self.mixup_fraction > 1.0 + 1e-9:
            raise ValueError(
                "The parameters `seed_fraction`, `duplicate_fraction` and `mixup_fraction` must sum to at most 1, got "
                f"{self.seed_fraction} + {self.duplicate_fraction} + {self.mixup_fraction}."
            )
        check_fraction("record_radius", self.record_radius, 0.0, 10.0)
        if self.record_radius == 0:
            raise ValueError("The parameter `record_radius` must be positive.")
        check_positive_int("warmup_epochs", self.warmup_epochs)
        check_positive_int("rounds", self.rounds)

    def extract(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> CLASSIFIER_TYPE:
        """
        Ask seed queries, warm up the thieved classifier as proxy, ask near-duplicates of the seeds, then ask off-core
        samples and mixups in ``rounds`` rounds chosen with the proxy (and with the reversals seen so far), and train
        the thieved classifier on all answers.

        After the call: ``queries_used_`` and ``query_kinds_`` (per query, in query order: ``"seed"``,
        ``"duplicate"``, ``"offcore"`` or ``"mixup"``).

        :param x: Source samples of the attacker.
        :param y: Not used.
        :param thieved_classifier: A fresh, undefended ART ``PyTorchClassifier`` to train.
        :return: The trained thieved classifier.
        """
        from art_queen.model_access import ModelView

        if y is not None:
            logger.warning("This attack does not use the provided labels y.")
        x, thieved_classifier = self._start(x, kwargs)
        order = self._draw(x, x.shape[0])
        n_seed = min(len(order), max(1, int(round(self.seed_fraction * self.nb_stolen))))
        seed_x, pool_x = x[order[:n_seed]], x[order[n_seed:]]
        seed_answers = self._query(seed_x, description="Seed queries")
        self._train(thieved_classifier, seed_x, seed_answers, nb_epochs=self.warmup_epochs, description="Warm-up")

        asked = _Asked()
        view = ModelView(thieved_classifier)
        try:
            seed_features = view.features(seed_x).double().cpu().numpy()
            seed_classes = np.argmax(seed_answers, axis=1)
            centres, radii = _class_cores(seed_features, seed_classes, thieved_classifier.nb_classes)
            seed_probabilities = _probabilities(thieved_classifier, seed_x)
            asked.add("seed", seed_x, seed_answers, seed_features, seed_probabilities)

            n_duplicate = min(self.queries_left, int(round(self.duplicate_fraction * self.nb_stolen)))
            if n_duplicate:
                scores = _core_scores(seed_features, seed_answers, centres, radii)
                # A reversed answer (exact zeros) means the seed was not recorded: its neighbours are not covered.
                scores[sparse_answers(seed_answers)] = np.inf
                sources = np.resize(np.argsort(scores, kind="stable")[:n_duplicate], n_duplicate)  # cycle if short
                limits = radii[seed_classes[sources]]
                duplicates = self._near_duplicates(view, seed_x[sources], seed_features[sources], limits)
                answers = self._query(duplicates, description="Near-duplicates")
                asked.add("duplicate", duplicates, answers, *_describe(view, thieved_classifier, duplicates))

            pool_features, pool_probabilities = _describe(view, thieved_classifier, pool_x)
            available = np.ones(len(pool_x), dtype=bool)
            n_mixup = min(self.queries_left, int(round(self.mixup_fraction * self.nb_stolen)))
            n_offcore = min(len(pool_x), self.queries_left - n_mixup)
            n_mixup = self.queries_left - n_offcore  # a short pool leaves more room for mixups
            for round_index in range(self.rounds):
                left = self.rounds - round_index
                offcore_now, mixup_now = -(-n_offcore // left), -(-n_mixup // left)
                n_offcore, n_mixup = n_offcore - offcore_now, n_mixup - mixup_now
                risk = self._risk_model(asked, centres, radii)
                parts = []
                if offcore_now:
                    rows = np.flatnonzero(available)
                    chosen = rows[np.argsort(risk(pool_features[rows], pool_probabilities[rows]), kind="stable")]
                    chosen = np.sort(chosen[:offcore_now])
                    available[chosen] = False
                    parts.append(("offcore", pool_x[chosen], pool_features[chosen], pool_probabilities[chosen]))
                if mixup_now:
                    source = pool_x if len(pool_x) else seed_x
                    classes = np.argmax(pool_probabilities if len(pool_x) else seed_probabilities, axis=1)
                    candidates = self._mixups(source, classes, _MIXUP_CANDIDATES * mixup_now)
                    features, probabilities = _describe(view, thieved_classifier, candidates)
                    chosen = np.sort(np.argsort(risk(features, probabilities), kind="stable")[:mixup_now])
                    parts.append(("mixup", candidates[chosen], features[chosen], probabilities[chosen]))
                if not parts:
                    continue
                batch = np.concatenate([part[1] for part in parts])
                answers = self._query(batch, description=f"Round {round_index + 1}")
                start = 0
                for kind, queries, features, probabilities in parts:
                    asked.add(kind, queries, answers[start : start + len(queries)], features, probabilities)
                    start += len(queries)
        finally:
            view.close()

        queries, answers, kinds = asked.queries(), asked.answers(), asked.kinds()
        self.query_kinds_ = kinds
        logger.info(
            "CoreAvoidance: %s queries per kind, %d answers with the reversal tell.",
            {kind: int(np.sum(kinds == kind)) for kind in ("seed", "duplicate", "offcore", "mixup")},
            int(sparse_answers(answers).sum()),
        )
        return self._train(thieved_classifier, queries, answers)

    def _risk_model(self, asked: _Asked, centres: np.ndarray, radii: np.ndarray) -> Any:
        """
        A function scoring candidates by their risk of being recorded or reversed (lower is safer). The prior risk is
        minus the core score; once enough answers carry the reversal tell, a logistic regression on the proxy's
        features and probabilities that predicts the tell from the answers so far is added, rank for rank (its
        ranking alone is noisier than the core score, the sum beats both).
        """
        from scipy.stats import rankdata
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        def prior(features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
            return -_core_scores(features, probabilities, centres, radii)

        tells = sparse_answers(asked.answers())
        if min(int(tells.sum()), int((~tells).sum())) < _MIN_TELLS:
            return prior
        detector = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, class_weight="balanced"))
        detector.fit(np.concatenate([asked.features(), asked.probabilities()], axis=1), tells)

        def risk(features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
            if len(features) == 0:
                return np.zeros(0)
            learned = detector.predict_proba(np.concatenate([features, probabilities], axis=1))[:, 1]
            return rankdata(learned) + rankdata(prior(features, probabilities))

        return risk

    def _near_duplicates(
        self, view: Any, sources: np.ndarray, source_features: np.ndarray, class_radii: np.ndarray
    ) -> np.ndarray:
        """Noisy copies of ``sources`` whose proxy features move by at most ``record_radius`` class radii."""
        noise = self._rng.standard_normal(sources.shape).astype(np.float32)
        limits = _DUPLICATE_SAFETY * self.record_radius * class_radii
        best = sources.copy()
        for level in _NOISE_LADDER:  # increasing: keep the largest level within the limit
            candidates = np.clip(sources + level * noise, 0.0, 1.0).astype(np.float32)
            moved = np.linalg.norm(view.features(candidates).double().cpu().numpy() - source_features, axis=1)
            within = moved <= limits
            best[within] = candidates[within]
        clip_values = getattr(self.estimator, "clip_values", None)
        if clip_values is not None:
            best = np.clip(best, clip_values[0], clip_values[1])
        return best

    def _mixups(self, source_x: np.ndarray, classes: np.ndarray, count: int) -> np.ndarray:
        """``count`` convex combinations of two source samples, of different predicted classes where possible."""
        first = self._rng.integers(0, len(source_x), size=count)
        second = self._rng.integers(0, len(source_x), size=count)
        for _ in range(10):  # redraw partners of the same predicted class
            same = classes[first] == classes[second]
            if not np.any(same) or len(np.unique(classes)) < 2:
                break
            second[same] = self._rng.integers(0, len(source_x), size=int(same.sum()))
        weights = self._rng.uniform(0.25, 0.75, size=(count,) + (1,) * (source_x.ndim - 1)).astype(np.float32)
        return (weights * source_x[first] + (1.0 - weights) * source_x[second]).astype(np.float32)


class _Asked:
    """The queries asked so far, with their answers, kinds and the proxy's view of them (features, probabilities)."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(
        self, kind: str, queries: np.ndarray, answers: np.ndarray, features: np.ndarray, probabilities: np.ndarray
    ) -> None:
        self._parts.append((kind, queries, answers, features, probabilities))

    def kinds(self) -> np.ndarray:
        return np.concatenate([np.full(len(part[1]), part[0]) for part in self._parts])

    def queries(self) -> np.ndarray:
        return np.concatenate([part[1] for part in self._parts]).astype(np.float32, copy=False)

    def answers(self) -> np.ndarray:
        return np.concatenate([part[2] for part in self._parts])

    def features(self) -> np.ndarray:
        return np.concatenate([part[3] for part in self._parts])

    def probabilities(self) -> np.ndarray:
        return np.concatenate([part[4] for part in self._parts])


def _describe(view: Any, classifier: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The proxy's features and probabilities of ``x``."""
    if len(x) == 0:
        return np.zeros((0, 0)), np.zeros((0, classifier.nb_classes), dtype=np.float32)
    return view.features(x).double().cpu().numpy(), _probabilities(classifier, x)


def _probabilities(classifier: Any, x: np.ndarray) -> np.ndarray:
    from art_queen.model_access import to_probabilities

    return to_probabilities(classifier.predict(x))


def _class_cores(features: np.ndarray, classes: np.ndarray, nb_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class feature centres and mean radii; classes without samples get the global centre and mean radius."""
    overall = features.mean(axis=0)
    centres = np.tile(overall, (nb_classes, 1))
    radii = np.full(nb_classes, np.nan)
    for c in range(nb_classes):
        members = features[classes == c]
        if len(members):
            centres[c] = members.mean(axis=0)
            radii[c] = np.linalg.norm(members - centres[c], axis=1).mean()
    fallback = np.nanmean(radii) if np.any(np.isfinite(radii)) else 1.0
    radii = np.where(np.isfinite(radii) & (radii > 0), radii, fallback if fallback > 0 else 1.0)
    return centres, radii


def _core_scores(features: np.ndarray, probabilities: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Off-core score: distance to the predicted class's centre in class radii, minus the proxy's confidence."""
    classes = np.argmax(probabilities, axis=1)
    distance = np.linalg.norm(features - centres[classes], axis=1) / radii[classes]
    return distance - probabilities.max(axis=1)
