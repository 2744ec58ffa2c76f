"""
QUEEN's algorithmic core as pure numpy functions: sensitivity, the gradient-reverse target and its closed-form
projection onto the probability simplex, and the reversal-onset estimate.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import numpy as np
from scipy.special import erfc

CASE_OUTSIDE = 1
"""Case 1: the query lies outside its class's sensitive region; no state change, feature-perturbed answer."""
CASE_COVERED = 2
"""Case 2: inside the region but within ``r`` of a recorded query; no state change, feature-perturbed answer."""
CASE_RECORDED = 3
"""Case 3: sensitive (inside and new) while the class's CQS is at most the threshold: recorded, perturbed answer."""
CASE_REVERSED = 4
"""Case 4: sensitive while the class's CQS exceeds the threshold: gradient-reversed answer."""


def single_query_sensitivity(distance: np.ndarray, sensitive_radius: np.ndarray, alpha: float) -> np.ndarray:
    """
    Single query sensitivity ``SQS = 0.5 * erfc(alpha * (d - r_s) / r_s)``: 0.5 on the edge of the sensitive region,
    about 0.92 at its centre for ``alpha = 1``, decaying outside.

    :param distance: Distance of each query's embedding from its class centre, shape `(n,)`.
    :param sensitive_radius: Sensitive radius of each query's class, shape `(n,)`.
    :param alpha: Sharpness of the decay.
    :return: SQS per query, shape `(n,)`.
    """
    return 0.5 * erfc(alpha * (distance - sensitive_radius) / sensitive_radius)


def cqs_increment(distance: np.ndarray, sensitive_radius: np.ndarray, r: float, alpha: float) -> np.ndarray:
    """
    CQS increment of recording a query: ``SQS^2 * (r / r_s)^2``, the SQS-weighted share of the class's sensitive disc
    that a record of radius ``r`` covers.

    :param distance: Distance of each query's embedding from its class centre, shape `(n,)`.
    :param sensitive_radius: Sensitive radius of each query's class, shape `(n,)`.
    :param r: Record radius (same units as the embedding).
    :param alpha: Sharpness of the SQS decay.
    :return: Increment per query, shape `(n,)`.
    """
    sqs = single_query_sensitivity(distance, sensitive_radius, alpha)
    return sqs**2 * (r / sensitive_radius) ** 2


def project_to_simplex_max_cosine(vectors: np.ndarray) -> np.ndarray:
    """
    For each row ``v``, the probability vector with the largest cosine similarity to ``v``: ``relu(v) / sum(relu(v))``,
    or the one-hot of ``argmax v`` when no entry is positive.

    Closed form of the projection the reference code solved with an iterative optimiser per query: for ``y >= 0``,
    ``<y, v> <= <y, relu(v)>`` and Cauchy-Schwarz make ``relu(v)`` the best direction.

    :param vectors: Array of shape `(n, C)`.
    :return: Probability rows of shape `(n, C)`.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    positive = np.maximum(vectors, 0.0)
    totals = positive.sum(axis=1, keepdims=True)
    result = np.zeros_like(vectors)
    has_positive = totals[:, 0] > 0
    result[has_positive] = positive[has_positive] / totals[has_positive]
    if not np.all(has_positive):
        rows = np.flatnonzero(~has_positive)
        result[rows, np.argmax(vectors[rows], axis=1)] = 1.0
    return result


def gradient_reverse_target(victim_probs: np.ndarray, pirate_probs: np.ndarray) -> np.ndarray:
    """
    Gradient-reversed answers: ``project(2 * y_pir - p)``.

    With soft-label cross-entropy a clone's logit gradient is ``sigma(z) - y``. For a clone whose output is
    ``y_pir`` the honest answer ``p`` gives ``y_pir - p``; the target ``v = 2 y_pir - p`` gives ``p - y_pir``, the
    honest gradient with its sign flipped, so the clone unlearns. The projection keeps the answer a probability row.

    :param victim_probs: Victim probabilities ``p``, shape `(n, C)`.
    :param pirate_probs: Shadow estimate ``y_pir`` of the pirate's output, shape `(n, C)`.
    :return: Reversed probability rows, shape `(n, C)`.
    """
    return project_to_simplex_max_cosine(
        2.0 * np.asarray(pirate_probs, np.float64) - np.asarray(victim_probs, np.float64)
    )


def expected_sqs_squared(alpha: float, samples: int = 4096) -> float:
    """
    Mean of ``SQS^2`` for queries spread uniformly over a sensitive disc (2-D), by deterministic quadrature.

    :param alpha: Sharpness of the SQS decay.
    :param samples: Number of radial quadrature points.
    :return: The mean of ``SQS^2`` over the disc.
    """
    # Uniform on the unit disc: the radius has density 2u on [0, 1].
    u = (np.arange(samples) + 0.5) / samples
    sqs = 0.5 * erfc(alpha * (u - 1.0))
    return float(np.sum(2.0 * u * sqs**2) / samples)


def queries_before_reversal(
    r: float, threshold: float, sensitive_radius: float | np.ndarray = 1.0, alpha: float = 1.0
) -> np.ndarray:
    """
    Estimate after how many distinct recorded queries of a class QUEEN starts reversing answers for that class.

    Each record adds ``SQS^2 (r / r_s)^2`` to the class's CQS and reversal starts once CQS exceeds ``threshold``, so
    about ``threshold / (E[SQS^2] (r / r_s)^2)`` records, plus the one that crosses, with ``E[SQS^2]`` for queries
    spread uniformly over the sensitive disc. Queries within ``r`` of a recorded one are not counted (not recorded).

    :param r: Record radius, in units of the mean class radius.
    :param threshold: CQS threshold ``t``.
    :param sensitive_radius: Sensitive radius ``r_s`` of the class (``beta`` times its mean radius), same units.
    :param alpha: Sharpness of the SQS decay.
    :return: Estimated number of recorded queries before reversal (one per class if an array is given).
    """
    if r <= 0 or threshold < 0:
        raise ValueError("`r` must be positive and `threshold` non-negative.")
    increment = expected_sqs_squared(alpha) * (r / np.asarray(sensitive_radius, dtype=np.float64)) ** 2
    return np.floor(threshold / increment) + 1.0
