"""
A straightforward per-query implementation of QUEEN, written for the overhead benchmark only.

It follows the same algorithm as :class:`art_queen.Queen` and uses the same fitted parts (mapping network, centres,
radii, feature centres, shadow models), but in the style of the authors' code: one Python iteration per query, a
forward pass of the victim per query to read its features, a linear scan over the recorded queries of the class, the
max-cosine projection onto the simplex solved by SciPy's SLSQP per reversed query, ``k`` single-row shadow passes
per reversed query, and the feature perturbation evaluated one step (one head call) at a time. Never use it to defend
a model: it exists to show what vectorising buys.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import erfc

from art_queen.core import CASE_COVERED, CASE_OUTSIDE, CASE_RECORDED, CASE_REVERSED

STAGES = ("features", "embedding", "bookkeeping", "shadows", "projection", "perturbation")
"""Stages whose time :class:`ReferenceQueen` accumulates in ``timings``."""


def slsqp_max_cosine(vector: np.ndarray) -> np.ndarray:
    """
    The probability vector with the largest cosine similarity to ``vector``, found numerically with SLSQP (objective
    ``-cos(y, v)``, equality constraint ``sum(y) = 1``, bounds ``0 <= y <= 1``, uniform start, finite-difference
    gradients), as the authors' code does per query.

    :param vector: Target direction ``v`` of shape `(C,)`.
    :return: Probability vector of shape `(C,)`.
    """
    vector = np.asarray(vector, dtype=np.float64)
    norm_v = float(np.linalg.norm(vector))

    def negative_cosine(y: np.ndarray) -> float:
        return -float(y @ vector) / (float(np.linalg.norm(y)) * norm_v + 1e-12)

    size = vector.shape[0]
    result = minimize(
        negative_cosine,
        np.full(size, 1.0 / size),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * size,
        constraints=[{"type": "eq", "fun": lambda y: float(np.sum(y)) - 1.0}],
        options={"ftol": 1e-10, "maxiter": 200},
    )
    answer = np.clip(result.x, 0.0, None)
    return answer / answer.sum()


class ReferenceQueen:
    """
    Per-query QUEEN over the fitted parts of a :class:`art_queen.Queen` (for comparison only).

    Its query state (CQS and records) is its own; the shadow subsets come from a generator seeded like the Queen's,
    drawn per reversed query in query order, so both draw the same subsets from a fresh state.

    :param queen: A fitted, attached :class:`art_queen.Queen`.
    """

    def __init__(self, queen: Any) -> None:
        import torch

        if not queen.is_fitted or queen._view is None:
            raise ValueError("ReferenceQueen needs a fitted Queen attached to its model.")
        self.queen = queen
        self.view = queen._view
        self.nb_classes = int(queen.nb_classes)
        self.r = float(queen.r)
        self.threshold = float(queen.threshold)
        self.alpha = float(queen.alpha)
        self.k = int(queen.k)
        self.centres = np.asarray(queen.class_centres_, dtype=np.float64)
        self.radii = np.asarray(queen.sensitive_radii_, dtype=np.float64)
        self.feature_centres = queen.feature_centres_
        self.step = float(queen.perturb_step) * float(queen.feature_spread_)
        self.max_steps = int(queen.perturb_max_steps)
        self.perturb = queen.perturb
        self.multiples = torch.arange(1, self.max_steps + 1, dtype=torch.float32) * self.step
        self.cqs = np.zeros(self.nb_classes)
        self.records: dict[int, np.ndarray] = {}
        self.rng = np.random.default_rng(queen.seed)
        self.timings: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        """Forget the CQS, the records, the timings and restart the shadow-subset generator."""
        self.cqs = np.zeros(self.nb_classes)
        self.records = {}
        self.rng = np.random.default_rng(self.queen.seed)
        self.timings = defaultdict(float)

    def defend(self, x: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """
        Defended answers for ``x``, one query at a time.

        :param x: Queried inputs, shape `(n, ...)`.
        :param preds: Model outputs for ``x`` (probabilities or logits), shape `(n, C)`.
        :return: Pair of answers `(n, C)` (float32) and cases `(n,)`.
        """
        from art_queen.model_access import to_probabilities

        answers = np.zeros((x.shape[0], self.nb_classes), dtype=np.float32)
        cases = np.zeros(x.shape[0], dtype=np.int64)
        for i in range(x.shape[0]):
            probabilities = to_probabilities(preds[i : i + 1])[0].astype(np.float64)
            answers[i], cases[i] = self._defend_one(x[i : i + 1], probabilities)
        return answers, cases

    def _defend_one(self, x: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, int]:
        import torch

        clock = time.perf_counter()
        features = self.view.features(x).float()  # a forward pass of the victim for this query alone
        now = time.perf_counter()
        self.timings["features"] += now - clock
        clock = now

        with torch.no_grad():
            point = self.queen.mapping_network_(features).double().cpu().numpy()[0] / self.queen.embedding_scale_
        now = time.perf_counter()
        self.timings["embedding"] += now - clock
        clock = now

        case = self._decide(point, int(np.argmax(probabilities)))
        now = time.perf_counter()
        self.timings["bookkeeping"] += now - clock

        if case == CASE_REVERSED:
            return self._gradient_reverse(x, probabilities), case
        if self.perturb == "all" and self.max_steps > 0 and self.step > 0:
            return self._perturb(features[0], int(np.argmax(probabilities)), probabilities), case
        return probabilities, case

    def _decide(self, point: np.ndarray, cls: int) -> int:
        distance = float(np.sqrt(np.sum((point - self.centres[cls]) ** 2)))
        radius = float(self.radii[cls])
        if not distance < radius:
            return CASE_OUTSIDE
        recorded = self.records.get(cls)
        if recorded is not None:
            for previous in recorded:  # linear scan over the class's records
                if np.sum((point - previous) ** 2) <= self.r**2:
                    return CASE_COVERED
        if self.cqs[cls] > self.threshold:
            return CASE_REVERSED
        sqs = 0.5 * erfc(self.alpha * (distance - radius) / radius)
        self.cqs[cls] += sqs**2 * (self.r / radius) ** 2
        self.records[cls] = point[None, :] if recorded is None else np.vstack([recorded, point[None, :]])
        return CASE_RECORDED

    def _gradient_reverse(self, x: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        import torch

        from art_queen.model_access import torch_to_probabilities

        clock = time.perf_counter()
        chosen = np.argsort(self.rng.random(len(self.queen.shadows_)))[: self.k]
        inputs = self.view.model_inputs(x)
        outputs = []
        with torch.no_grad():
            for index in chosen:  # one single-row pass per chosen shadow
                outputs.append(torch_to_probabilities(self.queen.shadows_[index](inputs)).double().cpu().numpy()[0])
        pirate = np.mean(outputs, axis=0)
        now = time.perf_counter()
        self.timings["shadows"] += now - clock
        clock = now
        answer = slsqp_max_cosine(2.0 * pirate - probabilities)
        self.timings["projection"] += time.perf_counter() - clock
        return answer

    def _perturb(self, feature: Any, cls: int, probabilities: np.ndarray) -> np.ndarray:
        import torch

        clock = time.perf_counter()
        with torch.no_grad():
            distances = torch.sqrt(((self.feature_centres - feature[None, :]) ** 2).sum(dim=1))
            direction = self.feature_centres[int(torch.argmax(distances))] - feature
            direction = direction / direction.norm().clamp_min(1e-12)
            answer = probabilities
            for step in range(self.max_steps):  # one head call per step, stop at the first label change
                logits = self.view.head_logits((feature + self.multiples[step] * direction)[None, :])[0]
                if int(torch.argmax(logits)) != cls:
                    break
                answer = torch.softmax(logits.double(), dim=0).cpu().numpy()
        self.timings["perturbation"] += time.perf_counter() - clock
        return answer
