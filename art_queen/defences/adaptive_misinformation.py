"""
This module implements Adaptive Misinformation (Kariyappa and Qureshi, CVPR 2020), a model-extraction defence that
answers queries which look out of distribution with the output of a *misinformation* model trained to avoid the
correct class.

| Paper link: https://arxiv.org/abs/1911.07100
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from art.config import ART_NUMPY_DTYPE
from scipy.special import expit
from tqdm.auto import trange

from art_queen.defences._common import (
    DefenceNotFittedError,
    check_inputs,
    check_labels,
    check_predictions,
)
from art_queen.input_channel import InputAwarePostprocessor
from art_queen.model_access import (
    log_probabilities,
    outputs_are_probabilities,
    reinitialised_copy,
    to_probabilities,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

#: Misinformation weights below this change no float32 answer; such rows skip the misinformation model.
_NEGLIGIBLE_WEIGHT = 1e-9


class AdaptiveMisinformation(InputAwarePostprocessor):
    """
    Adaptive Misinformation: mix the victim's answer with a misinformation model's answer according to how
    out-of-distribution (OOD) the query looks.

    For a query with victim probabilities ``p`` the OOD score is the maximum softmax probability ``msp = max p``
    (the paper's baseline detector; no outlier-exposure training is needed). The answer is

    ``y = (1 - alpha) * p + alpha * p_misinfo``  with  ``alpha = 1 / (1 + exp(nu * (msp - tau)))``,

    the paper's reverse sigmoid of the score: queries with ``msp`` well above the threshold ``tau`` get the victim's
    answer, queries well below get the misinformation model's answer, and ``nu`` sets how sharp the switch is.
    The misinformation model ``p_misinfo`` is trained in :meth:`fit` on the defender's labelled data to *avoid* the
    true class, with the paper's loss ``-log(1 - p_true)``. Its architecture is, by default, a freshly initialised
    copy of the victim's model; ``misinformation_model_factory`` can supply another one taking the same inputs.

    Use it as an ART postprocessor and bind it, so that it receives the queried inputs::

        defence = AdaptiveMisinformation(tau=0.9)
        classifier = PyTorchClassifier(model, ..., postprocessing_defences=[defence])
        defence.bind(classifier)
        defence.fit(x_train, y_train)

    | Paper link: https://arxiv.org/abs/1911.07100
    """

    params = ["tau", "nu", "misinformation_model_factory", "seed", "verbose"]

    def __init__(
        self,
        tau: float = 0.5,
        nu: float = 1000.0,
        misinformation_model_factory: Callable[[], torch.nn.Module] | None = None,
        seed: int = 0,
        verbose: bool = False,
        apply_fit: bool = False,
        apply_predict: bool = True,
    ) -> None:
        """
        Create an AdaptiveMisinformation postprocessor.

        :param tau: Threshold on the maximum softmax probability, in (0, 1): queries whose victim MSP is below it are
                    treated as out of distribution.
        :param nu: Positive sharpness of the switch between victim and misinformation answers (the paper's nu).
        :param misinformation_model_factory: Optional callable without arguments returning a fresh
                                             ``torch.nn.Module`` that maps the victim's (preprocessed) inputs to
                                             logits or probabilities over the same classes. Default: a freshly
                                             initialised copy of the victim's model.
        :param seed: Seed of the misinformation model's initialisation and of the batch order in :meth:`fit`.
        :param verbose: Show a progress bar during :meth:`fit`.
        :param apply_fit: True if applied during fitting/training.
        :param apply_predict: True if applied during predicting.
        """
        super().__init__(is_fitted=False, apply_fit=apply_fit, apply_predict=apply_predict)
        self.tau = tau
        self.nu = nu
        self.misinformation_model_factory = misinformation_model_factory
        self.seed = seed
        self.verbose = verbose
        self._check_params()
        self._view: Any = None
        self.misinformation_model_: torch.nn.Module | None = None
        self._misinformation_outputs_probabilities = False

    # ------------------------------------------------------------------------------------------------- set-up
    def _on_attach(self, estimator: Any) -> None:
        from art_queen.model_access import ModelView

        view = ModelView(estimator)
        view.close()  # only the model, its device and its preprocessing are needed: no feature capture
        self._view = view

    def _new_misinformation_model(self) -> torch.nn.Module:
        import torch

        if self.misinformation_model_factory is None:
            return reinitialised_copy(self._view.model, self.seed).to(self._view.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.misinformation_model_factory()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                "The `misinformation_model_factory` must return a `torch.nn.Module`, but it returned "
                f"{type(model).__name__}."
            )
        return model.to(self._view.device)

    # ---------------------------------------------------------------------------------------------------- fit
    def fit(  # pylint: disable=arguments-renamed
        self,
        x: np.ndarray,
        y: np.ndarray,
        nb_epochs: int = 10,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        """
        Train a fresh misinformation model on the defender's labelled data to minimise ``-log(1 - p_true)``.

        :param x: Training inputs, in the format the protected classifier's ``predict`` takes.
        :param y: True labels, as class indices of shape `(n,)` or one-hot rows of shape `(n, C)`.
        :param nb_epochs: Number of training epochs (positive integer).
        :param batch_size: Batch size (positive integer).
        :param learning_rate: Learning rate of the Adam optimiser (positive).
        :raises DefenceNotFittedError: If the defence is not bound or attached to a classifier yet.
        :raises ValueError: If the data or the training parameters are invalid.
        """
        import torch

        if self._view is None:
            raise DefenceNotFittedError(
                "AdaptiveMisinformation must be bound to a classifier (`defence.bind(classifier)`) or attached to a "
                "model (`defence.attach(model)`) before `fit`, so that it knows the victim's model."
            )
        _check_training_params(nb_epochs, batch_size, learning_rate)
        inputs = self._view.model_inputs(check_inputs(x, len(x)))
        model = self._new_misinformation_model()
        with torch.no_grad():
            model.eval()
            probe = model(inputs[: min(len(inputs), batch_size)])
        nb_classes = int(probe.reshape(probe.shape[0], -1).shape[1])
        labels = torch.from_numpy(check_labels(y, inputs.shape[0], nb_classes)).to(self._view.device)
        are_probabilities = outputs_are_probabilities(probe)

        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        generator = torch.Generator().manual_seed(self.seed)
        model.train()
        for _ in trange(nb_epochs, desc="Misinformation model", disable=not self.verbose):
            order = torch.randperm(inputs.shape[0], generator=generator).to(self._view.device)
            for start in range(0, inputs.shape[0], batch_size):
                batch = order[start : start + batch_size]
                outputs = model(inputs[batch]).reshape(len(batch), -1)
                loss = _avoid_true_class_loss(outputs, labels[batch], are_probabilities)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        self.misinformation_model_ = model
        self._misinformation_outputs_probabilities = are_probabilities
        self._is_fitted = True

    # ------------------------------------------------------------------------------------------------- answer
    def misinformation_weight(self, msp: np.ndarray) -> np.ndarray:
        """
        Weight ``alpha = 1 / (1 + exp(nu * (msp - tau)))`` of the misinformation answer for the given scores.

        :param msp: Maximum softmax probabilities of the victim, any shape.
        :return: Weights in [0, 1], same shape, float64.
        """
        return expit(-float(self.nu) * (np.asarray(msp, dtype=np.float64) - float(self.tau)))

    def _require_fitted(self) -> torch.nn.Module:
        if self.misinformation_model_ is None:
            raise DefenceNotFittedError(
                "AdaptiveMisinformation is not fitted: call `fit(x_train, y_train)` after binding it to the classifier."
            )
        return self.misinformation_model_

    def misinformation_probabilities(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """
        Probability rows of the misinformation model for the inputs ``x``.

        :param x: Inputs, in the format the protected classifier's ``predict`` takes.
        :param batch_size: Rows per forward pass.
        :return: Probability rows of shape `(n, C)`, float64.
        :raises DefenceNotFittedError: If :meth:`fit` has not run.
        """
        import torch

        model = self._require_fitted()
        inputs = self._view.model_inputs(check_inputs(x, len(x)))
        chunks = []
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                outputs = model(inputs[start : start + batch_size])
                outputs = outputs.reshape(outputs.shape[0], -1)
                chunks.append(log_probabilities(outputs, self._misinformation_outputs_probabilities).exp())
        probabilities = torch.cat(chunks).double().cpu().numpy()
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def defend(self, x: np.ndarray, preds: np.ndarray, **kwargs: Any) -> np.ndarray:
        """
        Answer each query with the victim's probabilities, the misinformation model's, or a mix, by the victim's MSP.

        :param x: Queried inputs, as given to the classifier's ``predict``.
        :param preds: The victim's outputs for ``x`` (probabilities or logits), shape `(n, C)`.
        :param kwargs: Ignored (for example ``client_id``: this defence keeps no per-client state).
        :return: Probability rows of shape `(n, C)`, float32.
        :raises DefenceNotFittedError: If :meth:`fit` has not run.
        :raises ValueError: On empty, non-finite or mismatched ``x`` and ``preds``.
        """
        self._require_fitted()
        values = check_predictions(preds)
        inputs = check_inputs(x, values.shape[0])
        victim = to_probabilities(values).astype(np.float64)
        alpha = self.misinformation_weight(victim.max(axis=1))
        answers = victim.copy()
        # Rows whose weight is below float32 resolution keep the victim's answer: no misinformation pass needed.
        mixed = np.flatnonzero(alpha > _NEGLIGIBLE_WEIGHT)
        if mixed.size:
            misinformation = self.misinformation_probabilities(inputs[mixed])
            if misinformation.shape[1] != victim.shape[1]:
                raise ValueError(
                    f"The misinformation model answers {misinformation.shape[1]} classes but the predictions have "
                    f"{victim.shape[1]}."
                )
            weight = alpha[mixed, None]
            answers[mixed] = (1.0 - weight) * victim[mixed] + weight * misinformation
        answers /= answers.sum(axis=1, keepdims=True)
        return answers.astype(ART_NUMPY_DTYPE)

    def _check_params(self) -> None:
        if not _is_real(self.tau) or not 0.0 < self.tau < 1.0:
            raise ValueError(f"The parameter `tau` must be a number strictly between 0 and 1, but it is {self.tau!r}.")
        if not _is_real(self.nu) or not np.isfinite(self.nu) or self.nu <= 0:
            raise ValueError(f"The parameter `nu` must be a positive finite number, but it is {self.nu!r}.")
        if self.misinformation_model_factory is not None and not callable(self.misinformation_model_factory):
            raise ValueError("The parameter `misinformation_model_factory` must be callable or None.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"The parameter `seed` must be a non-negative integer, but it is {self.seed!r}.")
        if not isinstance(self.verbose, bool):
            raise ValueError(f"The parameter `verbose` must be a boolean, but it is {self.verbose!r}.")


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_training_params(nb_epochs: Any, batch_size: Any, learning_rate: Any) -> None:
    for name, value in (("nb_epochs", nb_epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"The parameter `{name}` must be a positive integer, but it is {value!r}.")
    if not _is_real(learning_rate) or not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(
            f"The parameter `learning_rate` must be a positive finite number, but it is {learning_rate!r}."
        )


def _avoid_true_class_loss(outputs: torch.Tensor, labels: torch.Tensor, are_probabilities: bool) -> torch.Tensor:
    """
    The paper's misinformation loss ``mean(-log(1 - p_true))``, computed stably.

    For logits, ``log(1 - p_true) = logsumexp(z_k, k != true) - logsumexp(z)``.

    :param outputs: Model outputs of shape `(n, C)` (logits, or probabilities when ``are_probabilities``).
    :param labels: True class indices of shape `(n,)`.
    :param are_probabilities: Whether ``outputs`` are probabilities.
    :return: Scalar loss.
    """
    import torch

    true_class = torch.nn.functional.one_hot(labels, num_classes=outputs.shape[1]).bool()
    if are_probabilities:
        return -torch.log((1.0 - outputs[true_class]).clamp_min(1e-12)).mean()
    others = outputs.masked_fill(true_class, float("-inf"))
    return -(torch.logsumexp(others, dim=1) - torch.logsumexp(outputs, dim=1)).mean()
