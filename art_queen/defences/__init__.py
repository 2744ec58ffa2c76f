"""
Peer defences against model extraction, as ART postprocessors, for comparison with QUEEN.

* :class:`TopLabel`: one-hot top-1 answers (a correct replacement of ART's ``ClassLabels``);
* :class:`SoftmaxFlattening`: the softmax-of-probabilities baseline the QUEEN paper calls "DP";
* :class:`AdaptiveMisinformation`: Kariyappa and Qureshi, CVPR 2020 (needs PyTorch);
* :class:`PredictionPoisoning`: MAD and MAD-argmax, Orekondy et al., ICLR 2020 (needs PyTorch).

The PyTorch-based defences are imported lazily, so ``import art_queen.defences`` works without PyTorch.
"""

from __future__ import annotations

from typing import Any

from art_queen.defences._common import DefenceNotFittedError
from art_queen.defences.softmax_flattening import SoftmaxFlattening
from art_queen.defences.top_label import TopLabel

_LAZY = {
    "AdaptiveMisinformation": "art_queen.defences.adaptive_misinformation",
    "PredictionPoisoning": "art_queen.defences.prediction_poisoning",
}

__all__ = ["DefenceNotFittedError", "SoftmaxFlattening", "TopLabel", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
