"""Fuzzed bad input (hypothesis): every malformed query, client id or file gets a clear error and changes nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import attacker_queries, make_classifier  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from art_queen import InputsNotAvailableError, Queen  # noqa: E402

pytestmark = pytest.mark.torch

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
INPUT_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def served(digits, digits_model):
    """A per-client QUEEN with some history (records, reversals) in two clients."""
    queen = Queen(nb_classes=10, r=0.1, threshold=0.05, k=3, n_shadows=4, seed=0, scope="per_client")
    victim = make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen])
    queen.bind(victim)
    queen.fit(digits["x_train"], digits["y_train"])
    victim.predict(attacker_queries(digits, 400, seed=2), client_id="alice")
    victim.predict(digits["x_test"][:50], client_id=17)
    assert queen.stats["reversed"] > 0 and queen.stats["records"] > 0
    return queen, victim


def observable_state(queen):
    clients = {}
    for key in list(queen._states):
        points, classes = queen.recorded_points(key)
        clients[key] = (queen.client_stats(key), points.tolist(), classes.tolist())
    last = None if queen.last_cases is None else queen.last_cases.tolist()
    return {"stats": queen.stats, "clients": clients, "rng": queen._rng.bit_generator.state, "last_cases": last}


def valid_batch(digits, rows):
    x = digits["x_test"][:rows].copy()
    preds = np.full((rows, 10), 0.05, dtype=np.float32)
    preds[np.arange(rows), digits["y_test"][:rows]] = 0.55
    return x, preds


BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, object, np.complex64, np.complex128, np.str_]


DEFECTS = [
    "x_non_finite",
    "preds_non_finite",
    "x_dtype",
    "preds_dtype",
    "x_shape",
    "empty",
    "rows",
    "preds_shape",
    "x_not_array",
    "preds_not_array",
    "client_id",
]
BAD_CLIENT_IDS = [None, 1.5, float("nan"), ["alice"], ("alice",), True, b"alice", {"id": "alice"}, np.float32(3.0)]


@st.composite
def malformed_queries(draw):
    """A batch description with exactly one defect (see :func:`apply_defect`)."""
    rows = draw(st.integers(min_value=1, max_value=6))
    return {
        "rows": rows,
        "defect": draw(st.sampled_from(DEFECTS)),
        "value": draw(st.sampled_from([np.nan, np.inf, -np.inf])),
        "row": draw(st.integers(min_value=0, max_value=rows - 1)),
        "column": draw(st.integers(min_value=0, max_value=63)),
        "dtype": draw(st.sampled_from(BAD_DTYPES)),
        "client_id": draw(st.sampled_from(BAD_CLIENT_IDS)),
        "x_shape": draw(st.sampled_from([(), (64,), (1, 8), (1, 8, 7), (2, 8, 8), (8, 8, 1), (1, 8, 8, 1)])),
        "preds_shape": draw(st.sampled_from([(), (9,), (11,), (10, 1)])),
        "extra_rows": draw(st.sampled_from([-3, -2, -1, 1, 2, 3])),
    }


def apply_defect(digits, spec):
    rows, defect = spec["rows"], spec["defect"]
    x, preds = valid_batch(digits, rows)
    client_id = "alice"
    if defect == "x_non_finite":
        x.reshape(rows, -1)[spec["row"], spec["column"]] = spec["value"]
    elif defect == "preds_non_finite":
        preds[spec["row"], spec["column"] % 10] = spec["value"]
    elif defect == "x_dtype":
        x = x.astype(spec["dtype"])
    elif defect == "preds_dtype":
        preds = preds.astype(spec["dtype"])
    elif defect == "x_shape":
        x = np.zeros((rows, *spec["x_shape"]), dtype=np.float32) if spec["x_shape"] else np.float32(0.5)
    elif defect == "empty":
        x, preds = x[:0], preds[:0]
    elif defect == "rows":
        preds = np.resize(preds, (max(rows + spec["extra_rows"], 0), 10)).astype(np.float32)
    elif defect == "preds_shape":
        preds = np.zeros((rows, *spec["preds_shape"]), dtype=np.float32) if spec["preds_shape"] else np.float32(1)
    elif defect == "x_not_array":
        x = x.tolist()
    elif defect == "preds_not_array":
        preds = preds.tolist()
    else:
        client_id = spec["client_id"]
    return x, preds, client_id


@FUZZ
@given(spec=malformed_queries())
def test_malformed_defend_call_is_refused_and_changes_nothing(served, digits, spec):
    queen, _ = served
    x, preds, client_id = apply_defect(digits, spec)
    before = observable_state(queen)
    with pytest.raises(ValueError) as error:
        queen.defend(x, preds, client_id=client_id)
    assert len(str(error.value)) > 20  # a sentence, not a bare code
    # The ART postprocessor entry point behaves the same.
    with pytest.raises(ValueError):
        queen(preds, x=x, client_id=client_id)
    assert observable_state(queen) == before


@FUZZ
@given(
    rows=st.integers(min_value=1, max_value=5),
    defect=st.sampled_from(["nan", "inf", "client_id"]),
    bad_id=st.sampled_from([None, 2.5, ["bob"], True, b"bob"]),
    position=st.integers(min_value=0, max_value=63),
)
def test_malformed_predict_call_is_refused_and_changes_nothing(served, digits, rows, defect, bad_id, position):
    """Through the bound classifier: what ART itself accepts but QUEEN must refuse."""
    queen, victim = served
    x = digits["x_test"][:rows].copy()
    client_id = "alice"
    if defect == "client_id":
        client_id = bad_id
    else:
        x.reshape(rows, -1)[rows - 1, position] = np.nan if defect == "nan" else np.inf
    before = observable_state(queen)
    with pytest.raises(ValueError):
        victim.predict(x, client_id=client_id)
    assert observable_state(queen) == before


@FUZZ
@given(
    magnitude=st.floats(min_value=1.0, max_value=3.4e38, allow_nan=False, allow_infinity=False),
    sign=st.sampled_from([-1.0, 1.0]),
    row=st.integers(min_value=0, max_value=3),
)
def test_extreme_finite_inputs_give_finite_answers_or_a_clear_refusal(served, digits, magnitude, sign, row):
    queen, _ = served
    x, preds = valid_batch(digits, 4)
    x[row] = np.float32(sign * magnitude)
    before = observable_state(queen)
    try:
        answers = queen.defend(x, preds, client_id="extreme")
    except ValueError:
        assert observable_state(queen) == before
    else:
        assert np.all(np.isfinite(answers)) and np.allclose(answers.sum(axis=1), 1.0, atol=1e-5)
        assert np.all(answers >= 0)


def test_predictions_without_inputs_fail_closed(served, digits):
    queen, _ = served
    before = observable_state(queen)
    with pytest.raises(InputsNotAvailableError):
        queen(valid_batch(digits, 2)[1])
    assert observable_state(queen) == before


def test_unknown_client_ids_read_as_empty_and_create_nothing(served):
    queen, _ = served
    before = observable_state(queen)
    stats = queen.client_stats("never-seen")
    assert stats["queries"] == 0 and stats["records"] == 0 and max(stats["cqs"]) == 0
    points, classes = queen.recorded_points("never-seen")
    assert points.shape == (0, 2) and classes.shape == (0,)
    assert observable_state(queen) == before


@pytest.fixture(scope="module")
def saved_state(served, tmp_path_factory):
    queen, _ = served
    path = tmp_path_factory.mktemp("fuzz") / "state.pt"
    queen.save_state(str(path))
    return path.read_bytes(), observable_state(queen)


@FUZZ
@given(
    kind=st.sampled_from(["truncate", "flip", "insert", "overwrite", "random"]),
    position=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    noise=st.binary(min_size=1, max_size=64),
)
def test_corrupt_state_file_is_refused_and_changes_nothing(served, saved_state, tmp_path, kind, position, noise):
    queen, _ = served
    content, saved = saved_state
    at = int(position * len(content))
    if kind == "truncate":
        corrupt = content[:at]
    elif kind == "flip":
        corrupt = content[:at] + bytes([content[at] ^ (noise[0] or 1)]) + content[at + 1 :]
    elif kind == "insert":
        corrupt = content[:at] + noise + content[at:]
    elif kind == "overwrite":
        corrupt = content[:at] + noise + content[at + len(noise) :]
    else:
        corrupt = noise * 8
    path = tmp_path / "corrupt.pt"
    path.write_bytes(corrupt)
    before = observable_state(queen)
    try:
        queen.load_state(str(path))
    except ValueError as error:
        assert str(error)
        assert observable_state(queen) == before
    else:
        # Only a change that leaves the content intact (zip metadata that torch ignores) may load, and then it
        # must restore exactly the saved state.
        after = observable_state(queen)
        assert {key: after[key] for key in ("stats", "clients", "rng")} == {
            key: saved[key] for key in ("stats", "clients", "rng")
        }


# ------------------------------------------------------------------------------------------------- record store
@FUZZ
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    embedding_dim=st.integers(min_value=1, max_value=4),
    r=st.sampled_from([0.1, 1 / 3, 0.07, 0.25]),
    lattice=st.booleans(),
    buffer_limit=st.integers(min_value=1, max_value=64),
    batches=st.integers(min_value=1, max_value=5),
)
def test_record_store_look_up_is_exact(seed, embedding_dim, r, lattice, buffer_limit, batches):
    """The grid look-up agrees with brute force, also on lattices where distances of exactly r are common."""
    from art_queen.state import RecordStore

    rng = np.random.default_rng(seed)

    def sample(count):
        if lattice:  # multiples of r/2: many pairs at distance exactly r, many points on cell borders
            points = rng.integers(-12, 12, (count, embedding_dim)) * (r / 2)
        else:
            points = rng.normal(0.0, 4 * r, (count, embedding_dim))
        return points, rng.integers(0, 3, count)

    store = RecordStore(r, embedding_dim, buffer_limit=buffer_limit)
    store.load(*sample(int(rng.integers(0, 200))))
    for _ in range(batches):
        store.add(*sample(int(rng.integers(0, 40))))
        queries, query_classes = sample(150)
        # also query points exactly one r away from records along an axis
        records, record_classes = store.points()
        if len(records):
            picks = rng.integers(0, len(records), 50)
            shift = np.zeros((50, embedding_dim))
            shift[np.arange(50), rng.integers(0, embedding_dim, 50)] = rng.choice([-r, r], 50)
            queries = np.concatenate([queries, records[picks] + shift])
            query_classes = np.concatenate([query_classes, record_classes[picks]])
        squared = np.sum((queries[:, None, :] - records[None, :, :]) ** 2, axis=2)
        brute = np.any((squared <= r**2) & (query_classes[:, None] == record_classes[None, :]), axis=1)
        np.testing.assert_array_equal(store.covered(queries, query_classes), brute)
