"""
PNG plots of a benchmark, drawn with matplotlib's Agg canvas (no display, no change to pyplot's global backend).

* :func:`plot_tradeoff`: utility–security trade-off, benign accuracy against worst-case clone accuracy, one point
  per defence and setting.
* :func:`plot_sensitivity_map`: QUEEN's 2-D embedding for one cell: the class discs (centre and sensitive radius),
  the attacker's queries, the recorded queries and the reversed ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_tradeoff(summaries: Sequence[Mapping[str, Any]], path: str) -> str:
    """
    Benign accuracy (utility, higher is better) against worst-case clone accuracy over attacks (security, lower is
    better), one point per defence and setting (colour per defence, marker per setting, named in the legend), with
    the std over seeds as error bars.

    :param summaries: Per-defence summaries (:func:`art_queen.evaluation.metrics.summarise_defences`).
    :param path: PNG file to write.
    :return: The path.
    :raises ValueError: If no summary has both numbers.
    """
    from matplotlib import colormaps

    points = [
        s
        for s in summaries
        if s.get("benign_accuracy_mean") is not None and s.get("worst_clone_accuracy_mean") is not None
    ]
    if not points:
        raise ValueError("No defence has both a benign accuracy and a worst-case clone accuracy to plot.")
    figure = _figure(8.0, 6.0)
    axes = figure.add_subplot(1, 1, 1)
    names = list(dict.fromkeys(s["defence"] for s in points))
    palette = colormaps["tab10"]
    markers = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
    settings_seen: dict[str, int] = {}
    for summary in points:
        # Colour per defence, marker per setting; the legend names every point (labels on the plot would overlap).
        colour = palette(names.index(summary["defence"]) % 10)
        index = settings_seen[summary["defence"]] = settings_seen.get(summary["defence"], -1) + 1
        label = (
            summary["defence"]
            if summary.get("setting") in (None, "-")
            else f"{summary['defence']} ({summary['setting']})"
        )
        axes.errorbar(
            100 * summary["worst_clone_accuracy_mean"],
            100 * summary["benign_accuracy_mean"],
            xerr=100 * (summary.get("worst_clone_accuracy_std") or 0.0),
            yerr=100 * (summary.get("benign_accuracy_std") or 0.0),
            fmt=markers[index % len(markers)],
            color=colour,
            capsize=3,
            markersize=7,
            alpha=0.85,
            label=label,
        )
    victim = [s["victim_accuracy"] for s in points if s.get("victim_accuracy") is not None]
    if victim:
        axes.axhline(100 * float(np.mean(victim)), color="grey", linestyle="--", linewidth=1, label="undefended victim")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    axes.set_xlabel("worst-case clone accuracy over attacks (%)  ← more secure")
    axes.set_ylabel("benign accuracy after the attack (%)  ↑ more useful")
    axes.set_title("Utility–security trade-off (mean ± std over seeds)")
    axes.grid(True, alpha=0.3)
    return _save(figure, path)


def plot_sensitivity_map(data: Mapping[str, Any], path: str) -> str:
    """
    QUEEN's standardised 2-D embedding for one cell: a disc per class (centre ``class_centres_``, radius
    ``sensitive_radii_``), the attacker's queries (small dots, coloured by the victim's class), the recorded queries
    (circles) and the reversed queries (red crosses).

    :param data: Map data (``class_centres``, ``sensitive_radii``, ``query_points``, ``query_classes``,
                 ``recorded_points``, ``recorded_classes``, ``reversed_points``, and the cell's description).
    :param path: PNG file to write.
    :return: The path.
    :raises ValueError: If the embedding is not two-dimensional.
    """
    from matplotlib import colormaps
    from matplotlib.patches import Circle

    centres = np.asarray(data["class_centres"], dtype=float)
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise ValueError(f"The sensitivity map needs a 2-D embedding, got class centres of shape {centres.shape}.")
    radii = np.asarray(data["sensitive_radii"], dtype=float)
    palette = colormaps["tab10"]
    figure = _figure(7.5, 7.0)
    axes = figure.add_subplot(1, 1, 1)

    def points(name: str) -> np.ndarray:
        array = np.asarray(data.get(name) or [], dtype=float)
        return array.reshape(-1, 2)

    queries, recorded, reversed_ = points("query_points"), points("recorded_points"), points("reversed_points")
    query_classes = np.asarray(data.get("query_classes") or [], dtype=int)
    recorded_classes = np.asarray(data.get("recorded_classes") or [], dtype=int)
    for index, (centre, radius) in enumerate(zip(centres, radii)):
        colour = palette(index % 10)
        axes.add_patch(Circle(tuple(centre), radius, facecolor=colour, alpha=0.12, edgecolor=colour, linewidth=1.5))
        axes.annotate(str(index), tuple(centre), ha="center", va="center", fontsize=10, weight="bold", color=colour)
    if len(queries):
        colours = [palette(c % 10) for c in query_classes] if len(query_classes) == len(queries) else "grey"
        axes.scatter(queries[:, 0], queries[:, 1], s=6, c=colours, alpha=0.35, linewidths=0, label="attacker queries")
    if len(recorded):
        colours = [palette(c % 10) for c in recorded_classes] if len(recorded_classes) == len(recorded) else "black"
        axes.scatter(
            recorded[:, 0],
            recorded[:, 1],
            s=28,
            facecolors="none",
            edgecolors=colours,
            linewidths=1.0,
            label="recorded",
        )
    if len(reversed_):
        axes.scatter(reversed_[:, 0], reversed_[:, 1], s=30, c="red", marker="x", linewidths=1.2, label="reversed")
    every = np.concatenate([centres + radii[:, None], centres - radii[:, None], queries, recorded, reversed_])
    low, high = every.min(axis=0), every.max(axis=0)
    margin = 0.05 * float(np.max(high - low) or 1.0)
    axes.set_xlim(low[0] - margin, high[0] + margin)
    axes.set_ylim(low[1] - margin, high[1] + margin)
    axes.set_aspect("equal")
    axes.set_xlabel("embedding dimension 1 (units of mean class radius)")
    axes.set_ylabel("embedding dimension 2")
    title = "QUEEN sensitivity map"
    if data.get("attack"):
        title += (
            f"\n{data.get('defence', 'Queen')} ({data.get('setting', '-')}) vs {data['attack']} "
            f"({data.get('sampling', '-')}, {data.get('labels', '-')}), {data.get('budget', '?')} queries, seed "
            f"{data.get('seed', '?')}: {len(recorded)} recorded, {len(reversed_)} reversed"
        )
    axes.set_title(title, fontsize=10)
    axes.legend(loc="best", fontsize=8)
    return _save(figure, path)
