"""
art_queen: QUEEN (Query Unlearning against Model Extraction) and model-extraction evaluation for the Adversarial
Robustness Toolbox (ART).

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "Queen": "art_queen.queen",
    "QueenNotFittedError": "art_queen.queen",
    "TooManyClientsError": "art_queen.queen",
    "InputAwarePostprocessor": "art_queen.input_channel",
    "InputAwarePyTorchClassifier": "art_queen.input_channel",
    "InputsNotAvailableError": "art_queen.input_channel",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    # Lazy so that `import art_queen` works without torch and stays cheap.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
