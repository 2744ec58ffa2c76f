"""
Metrics of the evaluation protocol (DESIGN.md §6) on plain numpy arrays, and their aggregation over seeds.

Per cell (defence, attack, budget, seed): benign accuracy of the defended model after the attack, clone accuracy,
fidelity (agreement of the clone with the undefended victim), mean L1 distortion of the answers, the shares of
queries QUEEN recorded and reversed, the latency ratio to the undefended ``predict``, and the KS statistic the QUEEN
authors used. Over cells: mean ± standard deviation over seeds, and the worst case over attacks.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

KS_CAVEAT = (
    "KS: the two-sample Kolmogorov-Smirnov statistic between the top-1 classes that the clone stolen from the "
    "defended victim and the clone stolen from the undefended victim predict on the test set (the QUEEN authors' "
    "measure). It compares two class histograms, treating class indices as ordered numbers; it is not a distance "
    "between models: two clones that disagree on every input can have KS = 0."
)
"""How to read the KS statistic; printed under every table that shows it."""

CELL_METRICS = (
    "victim_accuracy",
    "benign_accuracy",
    "benign_accuracy_fresh",
    "clone_accuracy",
    "fidelity",
    "l1_distortion",
    "recorded_share",
    "reversed_share",
    "latency_ratio",
    "ks_statistic",
    "ks_pvalue",
    "queries",
    "attack_seconds",
)
"""Numeric per-cell metrics that are averaged over seeds."""


def _labels(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 2:
        array = np.argmax(array, axis=1)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be class indices of shape (n,) or scores of shape (n, C), got {array.shape}.")
    return array


def _pair(first: Any, second: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _labels(first, names[0]), _labels(second, names[1])
    if a.shape != b.shape:
        raise ValueError(f"`{names[0]}` and `{names[1]}` must have the same number of rows, got {len(a)} and {len(b)}.")
    if a.size == 0:
        raise ValueError(f"`{names[0]}` and `{names[1]}` are empty; at least one row is needed.")
    return a, b


def accuracy(predictions: Any, labels: Any) -> float:
    """
    Share of rows whose predicted class is the true class.

    :param predictions: Class indices `(n,)` or scores `(n, C)` (argmax taken).
    :param labels: True class indices `(n,)` or one-hot `(n, C)`.
    :return: Accuracy in [0, 1].
    :raises ValueError: On empty or mismatched inputs.
    """
    predicted, truth = _pair(predictions, labels, ("predictions", "labels"))
    return float(np.mean(predicted == truth))


def fidelity(clone_predictions: Any, victim_predictions: Any) -> float:
    """
    Agreement of the clone's top-1 class with the undefended victim's, on the same inputs.

    :param clone_predictions: Class indices `(n,)` or scores `(n, C)` of the clone.
    :param victim_predictions: Class indices `(n,)` or scores `(n, C)` of the undefended victim.
    :return: Share of rows where both agree, in [0, 1].
    :raises ValueError: On empty or mismatched inputs.
    """
    clone, victim = _pair(clone_predictions, victim_predictions, ("clone_predictions", "victim_predictions"))
    return float(np.mean(clone == victim))


def mean_l1_distortion(defended: Any, undefended: Any) -> float:
    """
    Mean over queries of the L1 distance between the defended answer and the undefended probability row.

    :param defended: Answers the defence gave, shape `(n, C)`.
    :param undefended: Undefended probability rows for the same queries, shape `(n, C)`.
    :return: Mean L1 distance, in [0, 2] for probability rows.
    :raises ValueError: On empty, mismatched or non-finite inputs.
    """
    a = np.asarray(defended, dtype=np.float64)
    b = np.asarray(undefended, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"`defended` and `undefended` must be 2-D arrays of equal shape, got {a.shape} and {b.shape}.")
    if a.shape[0] == 0:
        raise ValueError("`defended` and `undefended` are empty; at least one row is needed.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("`defended` and `undefended` must be finite.")
    return float(np.abs(a - b).sum(axis=1).mean())


def ks_statistic(defended_clone_predictions: Any, undefended_clone_predictions: Any) -> tuple[float, float]:
    """
    The QUEEN authors' KS measure: ``scipy.stats.ks_2samp`` on the top-1 classes predicted on the test set by the
    clone stolen from the defended victim and by the clone stolen from the undefended victim. See :data:`KS_CAVEAT`.

    :param defended_clone_predictions: Class indices `(n,)` or scores `(n, C)`.
    :param undefended_clone_predictions: Class indices `(m,)` or scores `(m, C)`.
    :return: Pair (statistic in [0, 1], p-value).
    :raises ValueError: If either sample is empty.
    """
    from scipy.stats import ks_2samp

    first = _labels(defended_clone_predictions, "defended_clone_predictions")
    second = _labels(undefended_clone_predictions, "undefended_clone_predictions")
    if first.size == 0 or second.size == 0:
        raise ValueError("The KS statistic needs two non-empty samples.")
    with warnings.catch_warnings():  # "exact calculation unsuccessful, switching to asymp" is expected for ties
        warnings.simplefilter("ignore", RuntimeWarning)
        result = ks_2samp(first.astype(np.float64), second.astype(np.float64))
    return float(result.statistic), float(result.pvalue)


def share(count: float | None, total: float | None) -> float | None:
    """
    ``count / total``, or `None` when either is unknown or the total is zero.

    :param count: Numerator.
    :param total: Denominator.
    :return: The share or `None`.
    """
    if count is None or total is None or total == 0:
        return None
    return float(count) / float(total)


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """
    Mean and population standard deviation of the known (not `None`, not NaN) values.

    :param values: Values.
    :return: Triple (mean, std, count); mean and std are `None` when no value is known.
    """
    known = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not known:
        return None, None, 0
    array = np.asarray(known)
    return float(array.mean()), float(array.std()), len(known)


# -------------------------------------------------------------------------------------------------- aggregation
CELL_KEYS = ("defence", "setting", "attack", "sampling", "labels", "budget")
"""Columns that identify a row of the aggregated results (everything but the seed)."""


def aggregate_cells(cells: Sequence[Mapping[str, Any]], metrics: Sequence[str] = CELL_METRICS) -> list[dict[str, Any]]:
    """
    Mean ± std over seeds of every metric, per (defence, setting, attack, sampling, labels, budget), in the order
    the rows first appear.

    :param cells: Per-seed cell records.
    :param metrics: Metrics to aggregate.
    :return: One dictionary per row with the key columns, ``seeds``, ``failed`` (cells that raised an error) and
             ``<metric>_mean`` / ``<metric>_std`` (over the cells that did not fail).
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(tuple(cell[key] for key in CELL_KEYS), []).append(cell)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(CELL_KEYS, key))
        row["seeds"] = sorted({member["seed"] for member in members})
        row["failed"] = sum(1 for member in members if member.get("error"))
        for metric in metrics:
            mean, std, _ = mean_std(member.get(metric) for member in members)
            row[f"{metric}_mean"] = mean
            row[f"{metric}_std"] = std
        rows.append(row)
    return rows


def summarise_defences(
    rows: Sequence[Mapping[str, Any]], cells: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """
    One line per (defence, setting): the worst case over attacks and budgets (the attack row with the highest mean
    clone accuracy), the benign accuracy averaged over all its rows and its lowest row, and the mean latency ratio.

    :param rows: Aggregated rows from :func:`aggregate_cells`.
    :param cells: Per-seed records; when given, the benign accuracy's std is over seeds of per-seed means.
    :return: Summary dictionaries, in the order the defences first appear.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["defence"], row["setting"]), []).append(row)
    summaries = []
    for (defence, setting), members in groups.items():
        scored = [m for m in members if m.get("clone_accuracy_mean") is not None]
        worst = max(scored, key=lambda m: m["clone_accuracy_mean"]) if scored else None
        benign_rows = [m["benign_accuracy_mean"] for m in members if m.get("benign_accuracy_mean") is not None]
        benign_mean, benign_std, _ = mean_std(benign_rows)
        if cells is not None:
            per_seed: dict[Any, list[float]] = {}
            for cell in cells:
                if (
                    cell["defence"] == defence
                    and cell["setting"] == setting
                    and cell.get("benign_accuracy") is not None
                ):
                    per_seed.setdefault(cell["seed"], []).append(cell["benign_accuracy"])
            _, benign_std, _ = mean_std(float(np.mean(v)) for v in per_seed.values())
        victim_mean, _, _ = mean_std(m.get("victim_accuracy_mean") for m in members)
        latency_mean, _, _ = mean_std(m.get("latency_ratio_mean") for m in members)
        fresh_mean, _, _ = mean_std(m.get("benign_accuracy_fresh_mean") for m in members)
        l1_mean, _, _ = mean_std(m.get("l1_distortion_mean") for m in members)
        summary: dict[str, Any] = {
            "defence": defence,
            "setting": setting,
            "victim_accuracy": victim_mean,
            "benign_accuracy_mean": benign_mean,
            "benign_accuracy_std": benign_std,
            "benign_accuracy_worst": min(benign_rows) if benign_rows else None,
            "benign_accuracy_fresh": fresh_mean,
            "benign_accuracy_loss": None if victim_mean is None or benign_mean is None else victim_mean - benign_mean,
            "worst_clone_accuracy_mean": worst["clone_accuracy_mean"] if worst else None,
            "worst_clone_accuracy_std": worst["clone_accuracy_std"] if worst else None,
            "worst_attack": _attack_label(worst) if worst else None,
            "worst_budget": worst["budget"] if worst else None,
            "worst_fidelity_mean": worst.get("fidelity_mean") if worst else None,
            "worst_ks_statistic_mean": worst.get("ks_statistic_mean") if worst else None,
            "l1_distortion_mean": l1_mean,
            "latency_ratio_mean": latency_mean,
        }
        summaries.append(summary)
    return summaries


def worst_case_by_budget(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """
    Worst-case clone accuracy over attacks per (defence, setting, budget).

    :param rows: Aggregated rows from :func:`aggregate_cells`.
    :return: Dictionaries with ``defence``, ``setting``, ``budget``, ``worst_clone_accuracy_mean``/``_std`` and
             ``worst_attack``.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("clone_accuracy_mean") is not None:
            groups.setdefault((row["defence"], row["setting"], row["budget"]), []).append(row)
    result = []
    for (defence, setting, budget), members in groups.items():
        worst = max(members, key=lambda m: m["clone_accuracy_mean"])
        result.append(
            {
                "defence": defence,
                "setting": setting,
                "budget": budget,
                "worst_clone_accuracy_mean": worst["clone_accuracy_mean"],
                "worst_clone_accuracy_std": worst["clone_accuracy_std"],
                "worst_attack": _attack_label(worst),
            }
        )
    return result


def _attack_label(row: Mapping[str, Any]) -> str:
    return f"{row['attack']} ({row['sampling']}, {row['labels']})"
