"""
Shared machinery of the QUEEN-aware extraction attacks: a base class holding the common parameters, sending every
query through the victim's ``predict`` while counting it against the budget, and training the thieved classifier on
soft labels, label sets and per-sample weights (ART's ``fit`` takes neither weights nor label sets).

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from art.attacks.attack import ExtractionAttack
from art.config import ART_NUMPY_DTYPE
from art.estimators.classification.classifier import ClassifierMixin
from art.estimators.estimator import BaseEstimator
from tqdm.auto import tqdm

from art_queen.model_access import to_probabilities

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from art.utils import CLASSIFIER_TYPE

logger = logging.getLogger(__name__)


class BudgetExceededError(RuntimeError):
    """Raised when an attack would send more queries than its budget ``nb_stolen`` allows (a bug in the attack)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0, closed_high: bool = False) -> None:
    """
    Raise a ``ValueError`` unless ``value`` is a finite number in ``[low, high)`` (``[low, high]`` if ``closed_high``).

    :param name: Parameter name, for the message.
    :param value: The value to check.
    :param low: Smallest allowed value.
    :param high: Upper bound.
    :param closed_high: Whether ``high`` itself is allowed.
    """
    ok = _is_number(value) and np.isfinite(value) and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        interval = f"[{low}, {high}]" if closed_high else f"[{low}, {high})"
        raise ValueError(f"The parameter `{name}` must be a number in {interval}, got {value!r}.")


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    """
    Raise a ``ValueError`` unless ``value`` is an integer of at least ``minimum``.

    :param name: Parameter name, for the message.
    :param value: The value to check.
    :param minimum: Smallest allowed value.
    """
    if not _is_int(value) or value < minimum:
        raise ValueError(f"The parameter `{name}` must be an integer of at least {minimum}, got {value!r}.")


class AdaptiveExtractionAttack(ExtractionAttack):
    """
    Base class of the QUEEN-aware extraction attacks.

    It holds the parameters every attack shares, sends queries only through ``self.estimator.predict`` and counts
    every row sent (repeats included) in ``queries_used_``, which never exceeds ``nb_stolen``. Answers are turned into
    probability rows (a classifier without postprocessing returns logits). The thieved classifier is trained with
    its own optimiser (Adam with learning rate 1e-3 if it has none) on a weighted loss that mixes soft-label
    cross-entropy and the likelihood of label sets (``-log`` of the probability mass the thief puts on a set of
    classes that holds the true label).
    """

    attack_params = ExtractionAttack.attack_params + [
        "batch_size_fit",
        "batch_size_query",
        "nb_epochs",
        "nb_stolen",
        "use_probability",
        "seed",
        "verbose",
    ]
    _estimator_requirements = (BaseEstimator, ClassifierMixin)

    def __init__(
        self,
        classifier: CLASSIFIER_TYPE,
        batch_size_fit: int = 64,
        batch_size_query: int = 256,
        nb_epochs: int = 30,
        nb_stolen: int = 1000,
        use_probability: bool = True,
        seed: int | None = 0,
        verbose: bool = False,
    ) -> None:
        """
        :param classifier: The victim classifier (possibly defended).
        :param batch_size_fit: Batch size for training the thieved classifier.
        :param batch_size_query: Rows per ``predict`` call to the victim.
        :param nb_epochs: Training epochs of the thieved classifier.
        :param nb_stolen: Query budget: the largest number of rows sent to the victim's ``predict``, repeats included.
        :param use_probability: Train on the (cleaned) probability vectors; `False` trains on their top-1 labels.
        :param seed: Seed of the attack's random choices and of the training order; `None` for fresh randomness.
        :param verbose: Show progress bars.
        """
        super().__init__(estimator=classifier)
        self.batch_size_fit = batch_size_fit
        self.batch_size_query = batch_size_query
        self.nb_epochs = nb_epochs
        self.nb_stolen = nb_stolen
        self.use_probability = use_probability
        self.seed = seed
        self.verbose = verbose
        self.queries_used_ = 0
        self._rng = np.random.default_rng(0)  # reseeded with `seed` at the start of every run, after validation

    # ------------------------------------------------------------------------------------------------ parameters
    def _check_params(self) -> None:
        check_positive_int("batch_size_fit", self.batch_size_fit)
        check_positive_int("batch_size_query", self.batch_size_query)
        check_positive_int("nb_epochs", self.nb_epochs)
        check_positive_int("nb_stolen", self.nb_stolen)
        if not isinstance(self.use_probability, bool):
            raise ValueError(f"The parameter `use_probability` must be a boolean, got {self.use_probability!r}.")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"The parameter `seed` must be a non-negative integer or None, got {self.seed!r}.")
        if not isinstance(self.verbose, bool):
            raise ValueError(f"The parameter `verbose` must be a boolean, got {self.verbose!r}.")

    def set_params(self, **kwargs: Any) -> None:
        """
        Set attack parameters; they are validated first and nothing changes when one is invalid.

        :param kwargs: Parameters from :attr:`attack_params`.
        """
        previous = {key: getattr(self, key) for key in kwargs if key in self.attack_params}
        try:
            super().set_params(**kwargs)
        except ValueError:
            for key, value in previous.items():
                setattr(self, key, value)
            raise

    # ---------------------------------------------------------------------------------------------- run helpers
    def _start(self, x: Any, kwargs: dict[str, Any]) -> tuple[np.ndarray, CLASSIFIER_TYPE]:
        """Validate the inputs and the thieved classifier, and reset the query counter and random generator."""
        thieved_classifier = kwargs.get("thieved_classifier")
        if thieved_classifier is None or not isinstance(thieved_classifier, ClassifierMixin):
            raise ValueError("A thieved classifier is needed: pass `thieved_classifier=` (an ART classifier).")
        if not hasattr(thieved_classifier, "model") or not hasattr(thieved_classifier.model, "parameters"):
            raise ValueError("The thieved classifier must be a PyTorch classifier (ART `PyTorchClassifier`).")
        if not isinstance(x, np.ndarray) or x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"The parameter `x` must be a non-empty array of samples, got {getattr(x, 'shape', x)!r}.")
        expected = getattr(self.estimator, "input_shape", None)
        if expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise ValueError(f"The samples have shape {x.shape[1:]} but the victim expects {tuple(expected)}.")
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise ValueError("The parameter `x` must hold finite numbers.")
        self.queries_used_ = 0
        self._rng = np.random.default_rng(self.seed)
        return x.astype(ART_NUMPY_DTYPE, copy=False), thieved_classifier

    @property
    def queries_left(self) -> int:
        """Queries still allowed by the budget in the current run."""
        return int(self.nb_stolen) - int(self.queries_used_)

    def _draw(self, x: np.ndarray, count: int) -> np.ndarray:
        """Indices of ``count`` distinct rows of ``x`` in a seeded random order (fewer, with a warning, if ``x`` is
        short)."""
        if count > x.shape[0]:
            logger.warning(
                "The source input has %d samples, fewer than the %d fresh queries this attack wants; using %d.",
                x.shape[0],
                count,
                x.shape[0],
            )
            count = x.shape[0]
        return self._rng.permutation(x.shape[0])[:count]

    def _query(self, x: np.ndarray, description: str = "Querying victim", **predict_kwargs: Any) -> np.ndarray:
        """
        Send ``x`` to the victim's ``predict`` in chunks of ``batch_size_query`` rows, in order, counting every row.

        :param x: Queries.
        :param description: Progress bar label.
        :param predict_kwargs: Extra keyword arguments of ``predict`` (such as ``client_id``).
        :return: The answers as float32 probability rows.
        :raises BudgetExceededError: If the budget does not allow that many rows.
        """
        rows = int(x.shape[0])
        if rows > self.queries_left:
            raise BudgetExceededError(
                f"Sending {rows} queries would exceed the budget nb_stolen={self.nb_stolen} "
                f"({self.queries_used_} already used)."
            )
        answers = []
        starts = range(0, rows, self.batch_size_query)
        for start in tqdm(starts, desc=description, disable=not self.verbose, leave=False):
            chunk = x[start : start + self.batch_size_query]
            preds = self.estimator.predict(chunk, batch_size=self.batch_size_query, **predict_kwargs)
            self.queries_used_ += int(chunk.shape[0])
            answers.append(to_probabilities(np.asarray(preds)))
        if not answers:
            return np.zeros((0, self.estimator.nb_classes), dtype=ART_NUMPY_DTYPE)
        return np.concatenate(answers).astype(ART_NUMPY_DTYPE, copy=False)

    def _training_seed(self) -> int:
        return int(self._rng.integers(0, 2**31 - 1))

    def _train(
        self,
        thieved_classifier: CLASSIFIER_TYPE,
        x: np.ndarray,
        targets: np.ndarray,
        weights: np.ndarray | None = None,
        label_sets: np.ndarray | None = None,
        nb_epochs: int | None = None,
        description: str = "Training thieved classifier",
    ) -> CLASSIFIER_TYPE:
        """
        Train the thieved classifier. With ``use_probability=False`` soft targets are reduced to their top-1 label.

        :param thieved_classifier: The classifier to train.
        :param x: Training inputs.
        :param targets: Rows of shape `(n, C)`: probability rows, or 0/1 masks for the rows flagged in ``label_sets``.
        :param weights: Per-sample loss weights (`None` for ones).
        :param label_sets: Boolean `(n,)`: rows whose target is a set of classes holding the true label.
        :param nb_epochs: Epochs (default ``self.nb_epochs``).
        :param description: Progress bar label.
        :return: The trained classifier.
        """
        targets = np.asarray(targets, dtype=np.float32)
        label_sets = np.zeros(len(x), dtype=bool) if label_sets is None else np.asarray(label_sets, dtype=bool)
        if not self.use_probability:
            soft = ~label_sets
            hard = np.zeros_like(targets[soft])
            hard[np.arange(hard.shape[0]), np.argmax(targets[soft], axis=1)] = 1.0
            targets = targets.copy()
            targets[soft] = hard
        return train_thieved_classifier(
            thieved_classifier,
            x,
            targets,
            weights=weights,
            label_sets=label_sets,
            nb_epochs=self.nb_epochs if nb_epochs is None else nb_epochs,
            batch_size=self.batch_size_fit,
            seed=self._training_seed(),
            verbose=self.verbose,
            description=description,
        )


def train_thieved_classifier(
    classifier: CLASSIFIER_TYPE,
    x: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray | None = None,
    label_sets: np.ndarray | None = None,
    nb_epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    verbose: bool = False,
    description: str = "Training thieved classifier",
) -> CLASSIFIER_TYPE:
    """
    Train an ART ``PyTorchClassifier`` (logits or probability outputs) on weighted soft labels and label sets.

    The loss of a row is ``-sum_j t_j log q_j`` for a probability target ``t`` and ``-log sum_{j in S} q_j`` for a
    label set ``S`` (a one-class set is an ordinary hard label; the complement of a class is a complementary label),
    multiplied by the row's weight; a batch's loss is the mean over its rows. Rows of weight 0 are skipped.

    :param classifier: The thieved classifier; its model is trained in place with its optimiser (Adam with learning
                       rate 1e-3 if it has none), after the classifier's own preprocessing.
    :param x: Training inputs.
    :param targets: Array `(n, C)`: probability rows, or 0/1 masks for the rows flagged in ``label_sets``.
    :param weights: Non-negative per-row weights, or `None` for ones.
    :param label_sets: Boolean `(n,)` marking the rows whose target is a set, or `None`.
    :param nb_epochs: Number of epochs.
    :param batch_size: Batch size.
    :param seed: Seed of the shuffling order.
    :param verbose: Show a progress bar.
    :param description: Progress bar label.
    :return: The trained classifier.
    """
    import torch

    n = len(x)
    targets = np.asarray(targets, dtype=np.float32)
    weights = np.ones(n, dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    label_sets = np.zeros(n, dtype=bool) if label_sets is None else np.asarray(label_sets, dtype=bool)
    if targets.shape[0] != n or weights.shape != (n,) or label_sets.shape != (n,):
        raise ValueError("The inputs, targets, weights and label-set flags must have the same number of rows.")
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("The sample weights must be finite and non-negative.")
    keep = weights > 0
    keep &= ~(label_sets & (targets.sum(axis=1) <= 0))  # an empty label set carries no information
    if not np.any(keep):
        logger.warning("No training sample has a positive weight; the thieved classifier is left untrained.")
        return classifier
    x, targets, weights, label_sets = x[keep], targets[keep], weights[keep], label_sets[keep]

    model = classifier.model
    device = getattr(classifier, "device", None) or next(model.parameters()).device
    optimizer = getattr(classifier, "optimizer", None)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if hasattr(classifier, "_apply_preprocessing"):
        x, _ = classifier._apply_preprocessing(x, y=None, fit=True)
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    target_tensor = torch.from_numpy(targets).to(device)
    weight_tensor = torch.from_numpy(weights).to(device)
    set_tensor = torch.from_numpy(label_sets).to(device)
    generator = torch.Generator().manual_seed(int(seed))

    model.train()
    epochs = tqdm(range(int(nb_epochs)), desc=description, disable=not verbose, leave=False)
    for _ in epochs:
        order = torch.randperm(inputs.shape[0], generator=generator).to(device)
        for start in range(0, inputs.shape[0], int(batch_size)):
            batch = order[start : start + int(batch_size)]
            outputs = model(inputs[batch])
            log_q = _log_probabilities(outputs)
            target = target_tensor[batch]
            soft_loss = -(target * log_q).sum(dim=1)
            set_loss = -torch.logsumexp(log_q.masked_fill(target <= 0, float("-inf")), dim=1)
            per_row = torch.where(set_tensor[batch], set_loss, soft_loss)
            loss = (weight_tensor[batch] * per_row).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return classifier


def _log_probabilities(outputs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of model outputs: ``log_softmax`` of logits, or the clamped log of probability rows."""
    import torch

    from art_queen.model_access import log_probabilities, outputs_are_probabilities

    with torch.no_grad():
        are_probabilities = outputs_are_probabilities(outputs)
    return log_probabilities(outputs, are_probabilities)


def make_proxy_classifier(thieved_classifier: CLASSIFIER_TYPE, seed: int, learning_rate: float = 1e-3) -> Any:
    """
    A fresh ART ``PyTorchClassifier`` with the thieved classifier's architecture, input shape, clip values and
    preprocessing, re-initialised (seeded) and with its own Adam optimiser: the attacker's proxy model.

    :param thieved_classifier: The thieved classifier serving as template (left untouched).
    :param seed: Seed of the initialisation.
    :param learning_rate: Adam learning rate.
    :return: The proxy classifier.
    """
    import torch
    from art.estimators.classification import PyTorchClassifier

    model = fresh_model_copy(thieved_classifier.model, seed)
    preprocessing = getattr(thieved_classifier, "preprocessing", None)
    return PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(thieved_classifier.input_shape),
        nb_classes=int(thieved_classifier.nb_classes),
        optimizer=torch.optim.Adam(model.parameters(), lr=learning_rate),
        clip_values=getattr(thieved_classifier, "clip_values", None),
        preprocessing=preprocessing if preprocessing is not None else (0.0, 1.0),
        channels_first=getattr(thieved_classifier, "channels_first", True),
        device_type="gpu" if str(getattr(thieved_classifier, "device", "cpu")).startswith("cuda") else "cpu",
    )


def fresh_model_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """
    A deep copy of ``model`` with every parameterised layer re-initialised, seeded.

    :param model: Template model (typically the thieved classifier's model).
    :param seed: Seed of the initialisation.
    :return: The fresh copy.
    """
    import copy

    import torch

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return clone


def predict_probabilities(model: torch.nn.Module, inputs: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """
    Probability rows of the attacker's own model (no postprocessing, no query to the victim).

    :param model: A PyTorch model returning logits or probabilities.
    :param inputs: Model inputs.
    :param batch_size: Rows per forward pass.
    :return: Array `(n, C)`, float32.
    """
    import torch

    from art_queen.model_access import torch_to_probabilities

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32))
            outputs.append(torch_to_probabilities(model(chunk.to(device))).cpu().numpy())
    model.train(was_training)
    return np.concatenate(outputs).astype(np.float32)
