"""
Access to the protected PyTorch model: its feature/head split, its inputs after ART preprocessing, and capture of the
features that the model's own forward pass computes (so that a defence does not pay a second forward pass).

The split: the *head* is the module that maps features to logits (for an ``nn.Sequential``, by default the last
``nn.Linear``); the *features* are the head's input. Features are read with a forward hook on the head, so any model
architecture works, including models that end in a softmax after the head.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

PROBABILITY_TOLERANCE = 1e-3


def is_probability_rows(values: np.ndarray, tolerance: float = PROBABILITY_TOLERANCE) -> bool:
    """
    Tell whether every row of ``values`` is a probability vector (non-negative, summing to 1 within ``tolerance``).

    :param values: Array of shape `(n, C)`.
    :param tolerance: Allowed deviation of each row sum from 1.
    :return: `True` if all rows are probability vectors.
    """
    if values.size == 0:
        return True
    return bool(np.all(values >= -1e-6) and np.all(np.abs(values.sum(axis=1) - 1.0) <= tolerance))


def to_probabilities(preds: np.ndarray) -> np.ndarray:
    """
    Return ``preds`` as float32 probability rows: rows that already are probability vectors are renormalised, any
    other input is treated as logits and put through a softmax.

    The decision is made for the whole array, so a batch is never half logits, half probabilities.

    :param preds: Model outputs of shape `(n, C)`.
    :return: Probability rows of shape `(n, C)`, float32.
    """
    preds = np.asarray(preds, dtype=np.float64)
    if is_probability_rows(preds):
        clipped = np.clip(preds, 0.0, None)
        return (clipped / clipped.sum(axis=1, keepdims=True)).astype(np.float32)
    shifted = preds - preds.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def torch_to_probabilities(outputs: torch.Tensor) -> torch.Tensor:
    """
    Torch counterpart of :func:`to_probabilities` (softmax unless the rows already are probability vectors).

    :param outputs: Tensor of shape `(n, C)`.
    :return: Probability rows of shape `(n, C)`.
    """
    import torch

    if outputs_are_probabilities(outputs):
        clipped = outputs.clamp_min(0.0)
        return clipped / clipped.sum(dim=1, keepdim=True)
    return torch.softmax(outputs, dim=1)


def outputs_are_probabilities(outputs: torch.Tensor) -> bool:
    """
    Tell whether a model's outputs are probability rows (the model ends in a softmax) rather than logits.

    :param outputs: Model outputs of shape `(n, C)`.
    :return: `True` for probability rows.
    """
    import torch

    return bool(
        outputs.numel()
        and torch.all(outputs >= -1e-6)
        and torch.all((outputs.sum(dim=-1) - 1.0).abs() <= PROBABILITY_TOLERANCE)
    )


def log_probabilities(outputs: torch.Tensor, are_probabilities: bool) -> torch.Tensor:
    """
    Log-probabilities of model outputs along the last axis.

    :param outputs: Logits, or probability rows when ``are_probabilities``.
    :param are_probabilities: Whether ``outputs`` already are probabilities.
    :return: Log-probabilities, same shape as ``outputs``.
    """
    import torch

    if are_probabilities:
        return torch.log(outputs.clamp_min(1e-12))
    return torch.log_softmax(outputs, dim=-1)


def find_head(model: torch.nn.Module, head: str | torch.nn.Module | None = None) -> tuple[str, torch.nn.Module]:
    """
    Locate the head (features → logits) of ``model``.

    :param model: The classifier's PyTorch module.
    :param head: A module name as listed by ``model.named_modules()``, the module itself, or `None` for the last
                 ``nn.Linear`` of the model in registration order.
    :return: Pair of the head's qualified name and the head module.
    :raises ValueError: If the head cannot be found.
    """
    import torch

    named = list(model.named_modules())
    if head is None:
        linears = [(name, module) for name, module in named if isinstance(module, torch.nn.Linear)]
        if not linears:
            raise ValueError(
                "The model has no `nn.Linear` layer to use as the head; pass `head=` with the name of the module that "
                "maps features to logits."
            )
        return linears[-1]
    if isinstance(head, str):
        for name, module in named:
            if name == head:
                return name, module
        raise ValueError(f"The model has no module named {head!r}; available names: {[n for n, _ in named if n]}.")
    if isinstance(head, torch.nn.Module):
        for name, module in named:
            if module is head:
                return name, module
        raise ValueError("The module passed as `head` is not part of the model.")
    raise ValueError(f"`head` must be a module name, a module of the model or None, not {type(head).__name__}.")


def module_by_name(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """
    Return the sub-module of ``model`` called ``name`` (the empty name is the model itself).

    :param model: A PyTorch module.
    :param name: Qualified module name.
    :return: The module.
    """
    return model if name == "" else model.get_submodule(name)


def reinitialised_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """
    Return a copy of ``model`` with the same architecture and freshly initialised parameters.

    Every sub-module with a ``reset_parameters`` method is reset under the given seed, without touching PyTorch's
    global random state. Hooks registered on the original (for example the feature capture of a defence) are neither
    deep-copied nor carried over to the copy.

    :param model: The module to copy.
    :param seed: Seed of the initialisation.
    :return: The re-initialised copy, in training mode as the original, on the original's device.
    """
    import copy

    import torch

    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if name.endswith("hooks") and isinstance(value, dict):
                for hook in value.values():
                    memo[id(hook)] = hook
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():
        for name, value in list(vars(module).items()):
            if name.endswith("hooks") and isinstance(value, dict):
                setattr(module, name, type(value)())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return clone


class ModelView:
    """
    A defence's view of the protected model: where it runs, how inputs are preprocessed, and how to read its
    features (the head's input) and logits (the head's output).

    :param estimator: An ART ``PyTorchClassifier`` (its preprocessing is applied) or a bare ``torch.nn.Module``.
    :param head: The head as for :func:`find_head`.
    """

    def __init__(self, estimator: Any, head: str | torch.nn.Module | None = None) -> None:
        import torch

        if isinstance(estimator, torch.nn.Module):
            self.estimator = None
            self.model = estimator
            self.device = next((p.device for p in estimator.parameters()), torch.device("cpu"))
        elif hasattr(estimator, "model") and isinstance(estimator.model, torch.nn.Module):
            self.estimator = estimator
            self.model = estimator.model
            self.device = getattr(estimator, "_device", None) or next(
                (p.device for p in self.model.parameters()), torch.device("cpu")
            )
        else:
            raise ValueError(
                "The defence needs a PyTorch model: bind it to an ART `PyTorchClassifier` or attach a `torch.nn.Module`"
                f", not {type(estimator).__name__}."
            )
        self.head_name, self.head = find_head(self.model, head)
        self._capture = threading.local()
        self._hook = self.head.register_forward_hook(self._capture_hook)

    def close(self) -> None:
        """Remove the capture hook from the model."""
        self._hook.remove()

    # The capture hook lives in the model's hook table, so copies and pickles of the model (shadows, ART's
    # clone_for_refitting, joblib workers) carry it along: copies share this view, pickles get an inert stand-in.
    def __deepcopy__(self, memo: dict) -> ModelView:
        return self

    def __reduce__(self) -> tuple:
        return (_DetachedView, ())

    # ------------------------------------------------------------------------------------------------------ inputs
    def model_inputs(self, x: np.ndarray) -> torch.Tensor:
        """
        Turn raw inputs into the tensor the model consumes (ART preprocessing applied when there is an estimator).

        :param x: Raw inputs as given to ``predict``.
        :return: Float tensor on the model's device.
        """
        import torch

        if self.estimator is not None and hasattr(self.estimator, "_apply_preprocessing"):
            x, _ = self.estimator._apply_preprocessing(x, y=None, fit=False)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    # ----------------------------------------------------------------------------------------------- capture hook
    def _capture_hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # Deep copies of the model (shadows, ART clones) carry this hook along; only the original head captures.
        if module is not self.head:
            return
        slot = getattr(self._capture, "buffer", None)
        if slot is not None:
            slot.append(inputs[0].detach())

    def start_capture(self) -> None:
        """Start collecting the head inputs computed by forward passes in the current thread."""
        self._capture.buffer = []

    def stop_capture(self) -> torch.Tensor | None:
        """
        Stop collecting and return the collected head inputs of this thread, concatenated, or `None` if none.

        :return: Tensor of shape `(n, d)` or `None`.
        """
        import torch

        buffer = getattr(self._capture, "buffer", None)
        self._capture.buffer = None
        if not buffer:
            return None
        return torch.cat([b.reshape(b.shape[0], -1) for b in buffer], dim=0)

    # ------------------------------------------------------------------------------------------- features, logits
    def features(self, x: np.ndarray, batch_size: int = 512) -> torch.Tensor:
        """
        Compute the features (head inputs) of ``x`` with one forward pass of the model, without gradients.

        :param x: Raw inputs.
        :param batch_size: Rows per forward pass.
        :return: Tensor of shape `(n, d)` on the model's device.
        """
        import torch

        was_training = self.model.training
        self.model.eval()
        inputs = self.model_inputs(x)
        self.start_capture()
        try:
            with torch.no_grad():
                for start in range(0, inputs.shape[0], batch_size):
                    self.model(inputs[start : start + batch_size])
        finally:
            captured = self.stop_capture()
            self.model.train(was_training)
        if captured is None or captured.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"The head module {self.head_name!r} was not called exactly once per input row during the forward "
                "pass; pass `head=` naming the layer that maps features to logits."
            )
        return captured

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """
        Apply the head to features (no capture happens: only forward passes of the whole model are captured).

        :param features: Tensor of shape `(n, d)`.
        :return: Logits of shape `(n, C)`.
        """
        import torch

        slot = getattr(self._capture, "buffer", None)
        self._capture.buffer = None
        try:
            with torch.no_grad():
                return self.head(features)
        finally:
            self._capture.buffer = slot


class _DetachedView:
    """Stand-in for a :class:`ModelView` in an unpickled model: its capture hook does nothing."""

    def _capture_hook(self, module: Any, inputs: tuple, output: Any) -> None:
        return None
