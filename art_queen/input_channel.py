"""
The input channel: how a postprocessor that needs the *inputs* of a query receives them inside ART.

ART hands a postprocessor only the predictions (``BaseEstimator._apply_postprocessing`` calls ``defence(preds)``).
Defences such as QUEEN, adaptive misinformation or prediction poisoning also need the queried inputs. This module
gives them a channel:

* :meth:`InputAwarePostprocessor.bind` makes a classifier's ``predict`` hand its inputs (and an optional client id)
  to the defence through thread-local storage before ART runs the model and the postprocessing chain;
* :class:`InputAwarePyTorchClassifier` is the explicit alternative: a ``PyTorchClassifier`` whose ``predict`` does the
  same and whose ``clone_for_refitting`` drops input-aware defences (ART's clone shares postprocessors by reference);
* a defence called without inputs and without a hand-over **fails closed** with :class:`InputsNotAvailableError`.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from art.defences.postprocessor.postprocessor import Postprocessor

logger = logging.getLogger(__name__)


class InputsNotAvailableError(RuntimeError):
    """
    Raised when an input-aware defence receives predictions but not the inputs they were computed from.

    The defence refuses to answer rather than silently returning undefended predictions.
    """


class _Handover(threading.local):
    """Per-thread slot through which a bound ``predict`` passes its inputs to the defence."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: np.ndarray | None = None
        self.client_id: Any = None
        self.active: bool = False


class InputAwarePostprocessor(Postprocessor, abc.ABC):
    """
    Base class of ART postprocessors whose answers depend on the queried inputs, not only on the predictions.

    Subclasses implement :meth:`defend` (pure algorithm, no ART coupling) and may override :meth:`_on_attach` to
    learn about the estimator they protect (its model, device and preprocessing).
    """

    def __init__(self, is_fitted: bool = False, apply_fit: bool = False, apply_predict: bool = True) -> None:
        super().__init__(is_fitted=is_fitted, apply_fit=apply_fit, apply_predict=apply_predict)
        self._handover = _Handover()
        self._estimator: Any = None

    # ------------------------------------------------------------------------------------------------ the algorithm
    @abc.abstractmethod
    def defend(self, x: np.ndarray, preds: np.ndarray, **kwargs: Any) -> np.ndarray:
        """
        Return the defended answers for the queries ``x`` whose undefended model outputs are ``preds``.

        :param x: Queried inputs, as given to the classifier's ``predict``.
        :param preds: Model outputs for ``x`` (probabilities or logits), one row per query.
        :return: Defended probability rows, float32, same shape as ``preds``.
        """

    # ----------------------------------------------------------------------------------------------- ART interface
    def __call__(self, preds: np.ndarray, x: np.ndarray | None = None, client_id: Any = None) -> np.ndarray:
        """
        Postprocess ``preds``. The inputs come from ``x`` when given, else from the bound classifier's ``predict``.

        :param preds: Model outputs to be postprocessed.
        :param x: Inputs the predictions were computed from; optional when the defence is bound to the classifier.
        :param client_id: Identifier of the querying client (used by defences with per-client state).
        :return: Postprocessed model outputs.
        :raises InputsNotAvailableError: If neither ``x`` nor a hand-over from a bound classifier is available.
        """
        handover = self._handover
        if x is None:
            if not handover.active or handover.inputs is None:
                raise InputsNotAvailableError(
                    f"{type(self).__name__} needs the queried inputs but received predictions only. Call "
                    f"`{type(self).__name__.lower()}.bind(classifier)` after creating the classifier with "
                    "`postprocessing_defences=[...]`, use `InputAwarePyTorchClassifier`, or pass `x=` explicitly. "
                    "Refusing to answer undefended."
                )
            x = handover.inputs
            if client_id is None:
                client_id = handover.client_id
        return self.defend(x, preds, client_id=client_id)

    @contextlib.contextmanager
    def handover(self, x: np.ndarray, client_id: Any = None) -> Iterator[None]:
        """
        Context in which postprocessing calls from the current thread receive ``x`` (and ``client_id``).

        :param x: Inputs of the ``predict`` call in progress.
        :param client_id: Identifier of the querying client, or `None`.
        """
        slot = self._handover
        previous = (slot.inputs, slot.client_id, slot.active)
        slot.inputs, slot.client_id, slot.active = x, client_id, True
        try:
            yield
        finally:
            slot.inputs, slot.client_id, slot.active = previous

    def attach(self, estimator: Any) -> None:
        """
        Tell the defence which estimator it protects, without changing the estimator's ``predict``.

        :param estimator: The ART classifier (or a ``torch.nn.Module``) whose outputs the defence postprocesses.
        """
        self._estimator = estimator
        self._on_attach(estimator)

    def bind(self, classifier: Any) -> Any:
        """
        Make ``classifier.predict`` hand its inputs to this defence, and return the classifier.

        The classifier must already list this defence in ``postprocessing_defences``. Binding twice is harmless.
        ``predict`` gains a keyword argument ``client_id`` that is passed to the defence.

        :param classifier: An ART classifier created with ``postprocessing_defences=[..., self, ...]``.
        :return: The same classifier, now feeding its inputs to this defence.
        :raises ValueError: If the classifier does not use this defence as a postprocessor.
        """
        defences = getattr(classifier, "postprocessing_defences", None) or []
        if isinstance(defences, Postprocessor):
            defences = [defences]
        if not any(defence is self for defence in defences):
            raise ValueError(
                f"The classifier does not list this {type(self).__name__} in `postprocessing_defences`; create it "
                f"with `postprocessing_defences=[{type(self).__name__.lower()}]` before calling `bind`."
            )
        self.attach(classifier)
        predict = classifier.predict
        if getattr(predict, "_art_queen_fed_defences", None) is not None:
            if self not in predict._art_queen_fed_defences:
                predict._art_queen_fed_defences.append(self)
            return classifier

        fed_defences: list[InputAwarePostprocessor] = [self]

        @functools.wraps(predict)
        def predict_with_handover(x: np.ndarray, *args: Any, client_id: Any = None, **kwargs: Any) -> np.ndarray:
            with contextlib.ExitStack() as stack:
                for defence in fed_defences:
                    stack.enter_context(defence.handover(x, client_id))
                return predict(x, *args, **kwargs)

        predict_with_handover._art_queen_fed_defences = fed_defences  # type: ignore[attr-defined]
        classifier.predict = predict_with_handover
        return classifier

    def _on_attach(self, estimator: Any) -> None:
        """Hook for subclasses: learn about the protected estimator. Does nothing by default."""


def _input_aware(defences: Any) -> list[InputAwarePostprocessor]:
    if defences is None:
        return []
    if isinstance(defences, Postprocessor):
        defences = [defences]
    return [defence for defence in defences if isinstance(defence, InputAwarePostprocessor)]


def _make_input_aware_classifier_class() -> type:
    from art.estimators.classification.pytorch import PyTorchClassifier

    class InputAwarePyTorchClassifier(PyTorchClassifier):
        """
        A ``PyTorchClassifier`` whose ``predict`` hands its inputs to its input-aware postprocessors (such as
        :class:`art_queen.Queen`), and whose ``clone_for_refitting`` drops them, so that a model refit from the clone
        (for instance a thief) does not route its own predictions through the defence.

        It takes the same arguments as ``PyTorchClassifier``; ``predict`` additionally accepts ``client_id``.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for defence in _input_aware(self.postprocessing_defences):
                defence.attach(self)

        def predict(  # pylint: disable=arguments-differ
            self,
            x: np.ndarray,
            batch_size: int = 128,
            training_mode: bool = False,
            client_id: Any = None,
            **kwargs: Any,
        ) -> np.ndarray:
            """
            Perform prediction, handing ``x`` and ``client_id`` to the input-aware postprocessors.

            :param x: Input samples.
            :param batch_size: Size of batches.
            :param training_mode: `True` for model set to training mode and `False` for evaluation mode.
            :param client_id: Identifier of the querying client (for per-client defences).
            :return: Array of postprocessed predictions of shape `(nb_inputs, nb_classes)`.
            """
            with contextlib.ExitStack() as stack:
                for defence in _input_aware(self.postprocessing_defences):
                    stack.enter_context(defence.handover(x, client_id))
                return super().predict(x, batch_size=batch_size, training_mode=training_mode, **kwargs)

        def clone_for_refitting(self) -> PyTorchClassifier:
            """
            Create an untrained copy without the input-aware defences.

            :return: A plain ``PyTorchClassifier`` with the same architecture, freshly initialised.
            """
            import copy

            model = copy.deepcopy(self.model)
            if self._optimizer is None:
                raise ValueError("An optimizer is needed to train the model, but none is provided.")
            optimizer = type(self._optimizer)(model.parameters(), **self._optimizer.defaults)
            remaining = [d for d in (self.postprocessing_defences or []) if not isinstance(d, InputAwarePostprocessor)]
            clone = PyTorchClassifier(
                model,
                self._loss,
                self.input_shape,
                self.nb_classes,
                optimizer=optimizer,
                channels_first=self.channels_first,
                clip_values=self.clip_values,
                preprocessing_defences=self.preprocessing_defences,
                postprocessing_defences=remaining or None,
                preprocessing=self.preprocessing,
                device_type="gpu" if self._device.type == "cuda" else "cpu",
            )
            clone.reset()
            return clone

    return InputAwarePyTorchClassifier


def __getattr__(name: str) -> Any:
    # Built lazily so that this module imports without torch.
    if name == "InputAwarePyTorchClassifier":
        cls = _make_input_aware_classifier_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
