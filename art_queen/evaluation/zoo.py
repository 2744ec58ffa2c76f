"""
The model zoo of the evaluation harness: small CNNs sized for each dataset, victim training with an on-disk cache, and
the fresh clone (thieved) classifiers that extraction attacks train.

Every architecture is an ``nn.Sequential`` that ends in an ``nn.Linear`` producing logits; that last layer is QUEEN's
head by default and its input (the penultimate activations) are the features. The victim and the clone share the
architecture (the paper's protocol); the clone starts from a fresh initialisation.

The classifiers served to clients answer with probability rows: :class:`SoftmaxOutput` is the first postprocessor of
every served classifier, so that ART's postprocessing defences (which all assume probabilities) and the attackers see
probability vectors while the model itself keeps its logits head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from art.defences.postprocessor.postprocessor import Postprocessor

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "art_queen")
"""Default folder of cached victim weights (overridden by the ``cache_dir`` arguments and ``--cache-dir``)."""

TRAINING_RUNS = {"count": 0}
"""Number of victim trainings this process ran (cache misses); lets callers and tests check that the cache works."""


# ------------------------------------------------------------------------------------------------- architectures
def _digits_cnn(nb_classes: int) -> torch.nn.Sequential:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, nb_classes),
    )


def _mnist_cnn(nb_classes: int) -> torch.nn.Sequential:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, nb_classes),
    )


def _cifar_cnn(nb_classes: int) -> torch.nn.Sequential:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, nb_classes),
    )


ARCHITECTURES: dict[tuple[int, int, int], tuple[str, Callable[[int], Any]]] = {
    (1, 8, 8): ("cnn_8x8x1", _digits_cnn),
    (1, 28, 28): ("cnn_28x28x1", _mnist_cnn),
    (3, 32, 32): ("cnn_32x32x3", _cifar_cnn),
}
"""Input shape (channels first) → (architecture name, builder taking the number of classes)."""


def architecture_name(input_shape: Sequence[int]) -> str:
    """
    Name of the zoo architecture for inputs of ``input_shape``.

    :param input_shape: Channels-first input shape, such as `(1, 8, 8)`.
    :return: The architecture's name (part of the victim cache key).
    :raises ValueError: If the zoo has no architecture for this shape.
    """
    return _lookup(input_shape)[0]


def build_model(input_shape: Sequence[int], nb_classes: int, seed: int | None = None) -> torch.nn.Sequential:
    """
    Build a freshly initialised zoo CNN for ``input_shape``: an ``nn.Sequential`` ending in an ``nn.Linear`` (logits).

    :param input_shape: Channels-first input shape: `(1, 8, 8)`, `(1, 28, 28)` or `(3, 32, 32)`.
    :param nb_classes: Number of classes (width of the logits layer).
    :param seed: Seed of the initialisation; `None` uses torch's global generator as it stands.
    :return: The model, in training mode, on the CPU.
    :raises ValueError: If the zoo has no architecture for this shape or ``nb_classes`` is below 2.
    """
    # Validate before importing torch, so that bad arguments get the same error with or without it.
    if int(nb_classes) < 2:
        raise ValueError(f"`nb_classes` must be at least 2, got {nb_classes}.")
    _, builder = _lookup(input_shape)
    import torch

    if seed is None:
        return builder(int(nb_classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return builder(int(nb_classes))


def _lookup(input_shape: Sequence[int]) -> tuple[str, Callable[[int], Any]]:
    key = tuple(int(v) for v in input_shape)
    if key not in ARCHITECTURES:
        raise ValueError(
            f"The model zoo has no architecture for input shape {key}; supported shapes (channels first): "
            f"{sorted(ARCHITECTURES)}."
        )
    return ARCHITECTURES[key]  # type: ignore[index]


# -------------------------------------------------------------------------------------------- serving postprocessor
class SoftmaxOutput(Postprocessor):
    """
    Turn logits into probability rows. The first postprocessor of every classifier the harness serves, so that the
    defences that follow it (ART's all assume probabilities) and the attackers see probability vectors.
    """

    params: list[str] = []

    def __init__(self) -> None:
        super().__init__(is_fitted=True, apply_fit=False, apply_predict=True)

    def __call__(self, preds: np.ndarray) -> np.ndarray:
        """
        Softmax of each row.

        :param preds: Logits of shape `(n, C)`.
        :return: Probability rows of shape `(n, C)`, float32.
        """
        logits = np.asarray(preds, dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def fit(self, preds: np.ndarray, **kwargs: Any) -> None:
        """No parameters to fit."""


# ------------------------------------------------------------------------------------------------- classifiers
def make_classifier(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    nb_classes: int,
    postprocessing_defences: Sequence[Postprocessor] | None = None,
    learning_rate: float = 1e-3,
    serve_probabilities: bool = True,
) -> Any:
    """
    Wrap a zoo model in an ART ``PyTorchClassifier`` (cross-entropy loss, which accepts soft labels; Adam).

    :param model: The PyTorch model (logits output).
    :param input_shape: Channels-first input shape.
    :param nb_classes: Number of classes.
    :param postprocessing_defences: Defences applied after the softmax, in order.
    :param learning_rate: Adam learning rate (used when the classifier is trained, e.g. as a clone).
    :param serve_probabilities: Put :class:`SoftmaxOutput` first so that ``predict`` returns probability rows; clones
                                are built without it (ART's attacks expect logits from the thieved classifier).
    :return: The classifier.
    """
    import torch
    from art.estimators.classification import PyTorchClassifier

    defences: list[Postprocessor] = [SoftmaxOutput()] if serve_probabilities else []
    defences.extend(postprocessing_defences or [])
    return PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=learning_rate),
        input_shape=tuple(int(v) for v in input_shape),
        nb_classes=int(nb_classes),
        clip_values=(0.0, 1.0),
        postprocessing_defences=defences or None,
        device_type="cpu",
    )


def make_clone(input_shape: Sequence[int], nb_classes: int, seed: int, learning_rate: float = 1e-3) -> Any:
    """
    A fresh, undefended thieved classifier with the zoo architecture (logits output, no postprocessing at all).

    :param input_shape: Channels-first input shape.
    :param nb_classes: Number of classes.
    :param seed: Seed of the initialisation.
    :param learning_rate: Adam learning rate of the clone's training.
    :return: A ``PyTorchClassifier`` without defences.
    """
    model = build_model(input_shape, nb_classes, seed=seed)
    return make_classifier(model, input_shape, nb_classes, learning_rate=learning_rate, serve_probabilities=False)


# ------------------------------------------------------------------------------------------------ victim training
@dataclass(frozen=True)
class VictimSettings:
    """
    Everything that determines a trained victim; its hash is the cache key.

    :param dataset: Dataset name.
    :param input_shape: Channels-first input shape.
    :param nb_classes: Number of classes.
    :param nb_train: Number of training rows.
    :param data_digest: Digest of the training arrays (so a changed split or file never hits a stale cache entry).
    :param epochs: Training epochs.
    :param batch_size: Training batch size.
    :param learning_rate: Adam learning rate.
    :param seed: Seed of initialisation and shuffling.
    """

    dataset: str
    input_shape: tuple[int, ...]
    nb_classes: int
    nb_train: int
    data_digest: str
    epochs: int
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0

    def cache_key(self) -> str:
        """
        Hash of the settings, the architecture and the torch version.

        :return: Hexadecimal key (24 characters).
        """
        import torch

        payload = dict(self.__dict__)
        payload["input_shape"] = list(self.input_shape)
        payload["architecture"] = architecture_name(self.input_shape)
        payload["torch"] = torch.__version__
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass
class Victim:
    """
    A trained victim model.

    :param model: The PyTorch model (logits output, evaluation mode).
    :param settings: The settings it was trained with.
    :param path: Cache file of its weights, or `None` if caching was off.
    :param from_cache: Whether the weights were loaded rather than trained in this call.
    """

    model: Any
    settings: VictimSettings
    path: str | None
    from_cache: bool


def array_digest(*arrays: np.ndarray) -> str:
    """
    Digest of the contents, shapes and dtypes of ``arrays``.

    :param arrays: Numpy arrays.
    :return: Hexadecimal digest (16 characters).
    """
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(str((array.shape, array.dtype.str)).encode("utf-8"))
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def train_model(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    verbose: bool = False,
    description: str = "Training victim",
) -> torch.nn.Module:
    """
    Train ``model`` with Adam and cross-entropy on ``(x, y)``, seeded (initialisation aside, the shuffling order).

    :param model: The model to train (modified in place).
    :param x: Inputs of shape `(n, C, H, W)`, float32.
    :param y: Class indices of shape `(n,)`.
    :param epochs: Number of epochs (positive).
    :param batch_size: Batch size (positive).
    :param learning_rate: Adam learning rate (positive).
    :param seed: Seed of the shuffling order.
    :param verbose: Show a progress bar over epochs.
    :param description: Label of the progress bar.
    :return: The trained model, in evaluation mode.
    :raises ValueError: On non-positive sizes or mismatched arrays.
    """
    import torch
    from tqdm.auto import tqdm

    if int(epochs) <= 0 or int(batch_size) <= 0 or not learning_rate > 0:
        raise ValueError(
            f"`epochs`, `batch_size` and `learning_rate` must be positive, got {epochs}, {batch_size}, {learning_rate}."
        )
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"`x` and `y` must have the same, non-zero number of rows, got {len(x)} and {len(y)}.")
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    progress = tqdm(range(int(epochs)), desc=description, disable=not verbose, leave=False)
    for _ in progress:
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(order), int(batch_size)):
            index = order[start : start + int(batch_size)]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[index]), labels[index])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        progress.set_postfix(loss=f"{total / len(order):.4f}")
    model.eval()
    return model


def load_or_train_victim(
    dataset: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    nb_classes: int,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    cache_dir: str | None = DEFAULT_CACHE_DIR,
    verbose: bool = False,
) -> Victim:
    """
    Return the victim trained with these settings, from the cache when it holds one, else trained now and cached.

    The cache key hashes the dataset name, the training data (size and contents), the architecture, the training
    settings, the seed and the torch version. Cache writes are atomic (temporary file, then rename).

    :param dataset: Dataset name.
    :param x_train: Training inputs, float32 of shape `(n, C, H, W)`.
    :param y_train: Training labels (class indices).
    :param nb_classes: Number of classes.
    :param epochs: Training epochs.
    :param seed: Seed of initialisation and shuffling.
    :param batch_size: Training batch size.
    :param learning_rate: Adam learning rate.
    :param cache_dir: Cache folder; `None` disables the cache.
    :param verbose: Show a progress bar while training.
    :return: The victim.
    """
    import torch

    settings = VictimSettings(
        dataset=str(dataset),
        input_shape=tuple(int(v) for v in x_train.shape[1:]),
        nb_classes=int(nb_classes),
        nb_train=int(len(x_train)),
        data_digest=array_digest(x_train, y_train),
        epochs=int(epochs),
        batch_size=int(batch_size),
        learning_rate=float(learning_rate),
        seed=int(seed),
    )
    model = build_model(settings.input_shape, settings.nb_classes, seed=settings.seed)
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, "victims", f"{settings.dataset}-{settings.cache_key()}.pt")
        if os.path.isfile(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
                model.eval()
                logger.info("Loaded the cached victim %s.", path)
                return Victim(model=model, settings=settings, path=path, from_cache=True)
            except Exception as error:  # pylint: disable=broad-except  # corrupt or incompatible entry: retrain
                logger.warning("Ignoring the unreadable cached victim %s (%s); retraining.", path, error)
    TRAINING_RUNS["count"] += 1
    train_model(
        model,
        x_train,
        y_train,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        verbose=verbose,
        description=f"Training victim ({settings.dataset}, seed {settings.seed})",
    )
    if path is not None:
        _atomic_torch_save(model.state_dict(), path)
        with open(path[:-3] + ".json", "w", encoding="utf-8") as handle:
            json.dump({**settings.__dict__, "torch": torch.__version__}, handle, indent=1)
    return Victim(model=model, settings=settings, path=path, from_cache=False)


def _atomic_torch_save(obj: Any, path: str) -> None:
    import torch

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def predict_labels(model: torch.nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """
    Undefended argmax predictions of a PyTorch model.

    :param model: The model (logits output).
    :param x: Inputs.
    :param batch_size: Rows per forward pass.
    :return: Class indices of shape `(n,)`.
    """
    return np.argmax(predict_logits(model, x, batch_size=batch_size), axis=1)


def predict_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """
    Undefended logits of a PyTorch model, without gradients, in evaluation mode.

    :param model: The model.
    :param x: Inputs.
    :param batch_size: Rows per forward pass.
    :return: Logits of shape `(n, C)`, float32.
    """
    import torch

    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
            outputs.append(model(batch).numpy())
    model.train(was_training)
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32)
