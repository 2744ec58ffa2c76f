"""
The evaluation harness: defences × extraction attacks × query budgets × seeds on a small model zoo, with the
metrics of the QUEEN evaluation protocol, a terminal table, JSON/CSV files and PNG plots. The ``art-queen bench``
command is its front end.

Typical use::

    from art_queen.evaluation import BenchmarkConfig, run_benchmark, write_outputs

    result = run_benchmark(BenchmarkConfig(defences=("Queen", "ReverseSigmoid"), attacks=("CopycatCNN",)))
    write_outputs(result, "art_queen_results")
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "BenchmarkConfig": "art_queen.evaluation.grid",
    "BenchmarkResult": "art_queen.evaluation.grid",
    "run_benchmark": "art_queen.evaluation.grid",
    "quick_config": "art_queen.evaluation.grid",
    "DEFENCES": "art_queen.evaluation.registry",
    "ATTACKS": "art_queen.evaluation.registry",
    "DefenceSpec": "art_queen.evaluation.registry",
    "AttackSpec": "art_queen.evaluation.registry",
    "format_report": "art_queen.evaluation.report",
    "write_outputs": "art_queen.evaluation.report",
    "KS_CAVEAT": "art_queen.evaluation.metrics",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package (or its datasets module) does not import torch or ART.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
