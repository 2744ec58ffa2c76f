"""
Outputs of a benchmark: the terminal tables, ``results.json``, CSV files and the PNG plots.

This module (with the command line) is allowed to print; :func:`format_report` only returns text.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from art_queen.evaluation.metrics import CELL_KEYS, CELL_METRICS, KS_CAVEAT

logger = logging.getLogger(__name__)

NOTES = (
    "Benign accuracy: the defended classifier's accuracy on the whole test set, asked after the attack without "
    "resetting the defence, as one client (under per-client scope a fresh client). A stateful defence also counts "
    "these benign queries. Benign fresh: the same with the defence's state reset first (no attacker).",
    "Fidelity: agreement of the clone with the undefended victim on the test set. Worst case: the attack row with the "
    "highest mean clone accuracy. L1: mean L1 distance between the attacker's answers and the undefended ones. "
    "Rec./Rev.: shares of the attacker's queries that QUEEN recorded / answered gradient-reversed. Latency: defended "
    "over undefended predict time on the test set.",
    "KnockoffNets adaptive: ART trains it on top-1 labels only (no soft variant) and sends one query per step, so its "
    "budget is capped (column Queries).",
)


# ---------------------------------------------------------------------------------------------------- formatting
def _percent(mean: Any, std: Any = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f}±{100 * std:.1f}"


def _number(mean: Any, std: Any = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{std:.{digits}f}"


def _ratio(mean: Any) -> str:
    return "-" if mean is None else f"{mean:.2f}x"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 0) -> str:
    """
    Align a table of strings in columns.

    :param header: Column titles.
    :param rows: Rows of cell texts.
    :param right_from: Columns from this index on are right-aligned (numbers).
    :return: The table as text, with a rule under the header.
    """
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]).rstrip()


def format_rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """
    The per (defence, setting, attack, budget) table, mean ± std over seeds (accuracies in percent).

    :param rows: Aggregated rows.
    :return: Text.
    """
    header = [
        "Defence",
        "Setting",
        "Attack",
        "Sampling",
        "Labels",
        "Budget",
        "Queries",
        "Benign acc",
        "Clone acc",
        "Fidelity",
        "KS",
        "L1",
        "Rec.",
        "Rev.",
        "Latency",
    ]
    body = []
    for row in rows:
        body.append(
            [
                str(row["defence"]),
                str(row["setting"]),
                str(row["attack"]),
                str(row["sampling"]),
                str(row["labels"]),
                str(row["budget"]),
                _number(row.get("queries_mean"), digits=0),
                _percent(row.get("benign_accuracy_mean"), row.get("benign_accuracy_std")),
                _percent(row.get("clone_accuracy_mean"), row.get("clone_accuracy_std")),
                _percent(row.get("fidelity_mean"), row.get("fidelity_std")),
                _number(row.get("ks_statistic_mean"), digits=3),
                _number(row.get("l1_distortion_mean"), digits=3),
                _percent(row.get("recorded_share_mean")),
                _percent(row.get("reversed_share_mean")),
                _ratio(row.get("latency_ratio_mean")),
            ]
        )
    return format_table(header, body, right_from=5)


def format_summary_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """
    The per (defence, setting) table: benign accuracy against worst-case clone accuracy.

    :param summaries: Summaries from :func:`art_queen.evaluation.metrics.summarise_defences`.
    :return: Text.
    """
    header = [
        "Defence",
        "Setting",
        "Victim acc",
        "Benign acc",
        "Benign worst",
        "Benign fresh",
        "Worst-case clone acc",
        "Worst attack",
        "Budget",
        "Fidelity",
        "KS",
        "L1",
        "Latency",
    ]
    body = []
    for s in summaries:
        body.append(
            [
                str(s["defence"]),
                str(s["setting"]),
                _percent(s.get("victim_accuracy")),
                _percent(s.get("benign_accuracy_mean"), s.get("benign_accuracy_std")),
                _percent(s.get("benign_accuracy_worst")),
                _percent(s.get("benign_accuracy_fresh")),
                _percent(s.get("worst_clone_accuracy_mean"), s.get("worst_clone_accuracy_std")),
                str(s.get("worst_attack") or "-"),
                str(s.get("worst_budget") or "-"),
                _percent(s.get("worst_fidelity_mean")),
                _number(s.get("worst_ks_statistic_mean")),
                _number(s.get("l1_distortion_mean")),
                _ratio(s.get("latency_ratio_mean")),
            ]
        )
    return format_table(header, body, right_from=2)


def format_report(result: Any) -> str:
    """
    The whole terminal report: the settings, the per-row table, the summary table and how to read them.

    :param result: A :class:`art_queen.evaluation.grid.BenchmarkResult`.
    :return: Text.
    """
    config = result.config
    seeds = list(config.seeds)
    victims = ", ".join(
        f"seed {v['seed']}: {100 * v['victim_accuracy']:.1f}%{' (cached)' if v.get('from_cache') else ''}"
        for v in result.victims
    )
    notes = list(NOTES[:2])
    if any(cell.get("sampling") == "adaptive" for cell in result.cells):
        notes.append(NOTES[2])
    lines = [
        f"art-queen benchmark on {config.dataset}: {len(result.cells)} cells, seeds {seeds}, budgets "
        f"{list(config.budgets)}, {result.wall_seconds:.0f} s.",
        f"Victim test accuracy: {victims or '-'}",
        "",
        f"Results per defence and attack (mean ± std over {len(seeds)} seed(s); accuracies and shares in %):",
        format_rows_table(result.rows),
        "",
        "Summary per defence: benign accuracy against the worst-case clone accuracy over attacks and budgets:",
        format_summary_table(result.defences),
        "",
        *_failures(result.cells),
        *(f"Note: {note}" for note in notes),
        f"Caveat: {KS_CAVEAT}",
    ]
    return "\n".join(lines)


def _failures(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    failed = [c for c in cells if c.get("error")]
    if not failed:
        return []
    lines = [f"FAILED cells ({len(failed)}; their metrics are left out of the means):"]
    for cell in failed:
        lines.append(
            f"  {cell['defence']} ({cell['setting']}) vs {cell['attack']} ({cell['sampling']}, {cell['labels']}), "
            f"budget {cell['budget']}, seed {cell['seed']}: {cell['error']}"
        )
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------------ files
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        number = float(value)
        return None if math.isnan(number) or math.isinf(number) else number
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(result: Any, path: str) -> str:
    """
    Write the whole result (configuration, cells, aggregated rows, summaries, map data) as JSON.

    :param result: A benchmark result.
    :param path: File path.
    :return: The path.
    """
    _atomic_write(path, json.dumps(_plain(result.to_dict()), indent=1, allow_nan=False))
    return path


def _csv_text(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    import io

    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        row = []
        for column in columns:
            value = _plain(record.get(column))
            row.append("" if value is None else (";".join(map(str, value)) if isinstance(value, list) else value))
        writer.writerow(row)
    return stream.getvalue()


def write_csv(result: Any, folder: str) -> dict[str, str]:
    """
    Write ``results.csv`` (mean and std over seeds per defence, setting, attack and budget), ``cells.csv`` (one row
    per seed) and ``summary.csv`` (one row per defence and setting).

    :param result: A benchmark result.
    :param folder: Output folder.
    :return: Paths by name.
    """
    aggregated = [*CELL_KEYS, "seeds", "failed", *(f"{m}_{s}" for m in CELL_METRICS for s in ("mean", "std"))]
    cell_columns = [*CELL_KEYS, "seed", "dataset", "attack_key", *CELL_METRICS]
    cell_columns += ["clone_epochs", "defended_ms_per_query", "undefended_ms_per_query", "error"]
    summary_columns = list(result.defences[0]) if result.defences else ["defence", "setting"]
    paths = {
        "results.csv": os.path.join(folder, "results.csv"),
        "cells.csv": os.path.join(folder, "cells.csv"),
        "summary.csv": os.path.join(folder, "summary.csv"),
    }
    _atomic_write(paths["results.csv"], _csv_text(result.rows, aggregated))
    _atomic_write(paths["cells.csv"], _csv_text(result.cells, cell_columns))
    _atomic_write(paths["summary.csv"], _csv_text(result.defences, summary_columns))
    return paths


def write_outputs(result: Any, folder: str, plots: bool = True) -> dict[str, str]:
    """
    Write every output file into ``folder``: ``results.json``, ``results.csv``, ``cells.csv``, ``summary.csv``,
    ``tradeoff.png`` and, when QUEEN ran, ``queen_sensitivity_map.png``.

    :param result: A benchmark result.
    :param folder: Output folder (created if missing).
    :param plots: Also draw the PNG plots.
    :return: Paths by file name.
    """
    os.makedirs(folder, exist_ok=True)
    paths = {"results.json": write_json(result, os.path.join(folder, "results.json"))}
    paths.update(write_csv(result, folder))
    if plots:
        from art_queen.evaluation.plots import plot_sensitivity_map, plot_tradeoff

        paths["tradeoff.png"] = plot_tradeoff(result.defences, os.path.join(folder, "tradeoff.png"))
        if result.sensitivity_map is not None:
            paths["queen_sensitivity_map.png"] = plot_sensitivity_map(
                result.sensitivity_map, os.path.join(folder, "queen_sensitivity_map.png")
            )
    return paths
