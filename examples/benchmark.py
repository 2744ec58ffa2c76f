"""
Programmatic use of the evaluation harness: a small QUEEN threshold sweep against two ART baselines, with the table
printed and the JSON, CSV and PNG outputs written. ``art-queen bench`` is the command-line front end of the same API.

    python examples/benchmark.py [OUTPUT_FOLDER]

The grid runs through joblib, so a cluster backend needs no code change::

    from joblib import parallel_backend
    with parallel_backend("dask"):          # after creating a dask.distributed Client
        result = run_benchmark(config)
"""

from __future__ import annotations

import sys

from art_queen.evaluation.grid import BenchmarkConfig, run_benchmark
from art_queen.evaluation.report import format_report, write_outputs


def main(out: str = "art_queen_example_results") -> None:
    config = BenchmarkConfig(
        dataset="digits",
        defences=("Queen", "ReverseSigmoid", "TopLabel"),  # NoDefence is always added as the reference
        defence_settings={
            # Every parameter set is one row of the outputs and one point of the trade-off plot.
            "Queen": tuple({"threshold": t, "scope": "global"} for t in (0.05, 0.5)),
            "ReverseSigmoid": ({"beta": 1.0, "gamma": 0.1}, {"beta": 0.5, "gamma": 0.2}),
        },
        attacks=("CopycatCNN", "KnockoffNets/random"),  # a name selects all its variants (soft and hard labels)
        budgets=(300,),
        seeds=(0, 1),
        jobs=2,
    )
    result = run_benchmark(config)
    print(format_report(result))

    # The per-defence summary is plain data: pick the defence setting you can afford.
    best = min(
        (s for s in result.defences if s["benign_accuracy_loss"] is not None and s["benign_accuracy_loss"] <= 0.01),
        key=lambda s: s["worst_clone_accuracy_mean"],
    )
    print(
        f"\nLowest worst-case clone accuracy at <= 1 point benign loss: {best['defence']} ({best['setting']}): "
        f"{100 * best['worst_clone_accuracy_mean']:.1f}%"
    )
    paths = write_outputs(result, out)
    print("Wrote", ", ".join(sorted(paths.values())))


if __name__ == "__main__":
    main(*sys.argv[1:2])
