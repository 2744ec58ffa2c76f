"""Saving and loading QUEEN: exact round trips, atomic writes that survive a kill, refusal of bad files."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import attacker_queries, make_classifier  # noqa: E402

from art_queen import Queen, persistence  # noqa: E402
from art_queen.core import CASE_REVERSED  # noqa: E402
from art_queen.persistence import (  # noqa: E402
    FORMAT_VERSION,
    load_queen,
    load_queen_state,
    payload_checksum,
    save_queen,
    save_queen_state,
)

pytestmark = pytest.mark.torch

SETTINGS = dict(nb_classes=10, r=0.1, threshold=0.05, k=3, n_shadows=4, seed=0)


@pytest.fixture(scope="module")
def fitted(digits, digits_model):
    queen = Queen(**SETTINGS)
    victim = make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen])
    queen.bind(victim)
    queen.fit(digits["x_train"], digits["y_train"])
    return queen, victim


@pytest.fixture()
def protected(fitted):
    queen, victim = fitted
    queen.reset()
    yield queen, victim
    queen.reset()


@pytest.fixture(scope="module")
def queries(digits):
    return attacker_queries(digits, 1200, seed=3)


def bound(queen, digits_model):
    """A fresh victim (copy of the same weights) whose predict feeds ``queen``."""
    victim = make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen])
    return queen.bind(victim)


def snapshot(queen):
    """Everything observable about QUEEN's query state, to compare before and after."""
    clients = {}
    for key in queen._states:
        points, classes = queen.recorded_points(key) if key is not None else queen.recorded_points()
        order = np.lexsort((points[:, 1], points[:, 0], classes)) if len(classes) else np.zeros(0, dtype=int)
        stats = queen.client_stats(key)
        clients[key] = (stats, points[order].tolist(), classes[order].tolist())
    return {"stats": queen.stats, "clients": clients, "rng": queen._rng.bit_generator.state}


def rewrite(source, target, mutate):
    """Copy a QUEEN file with ``mutate`` applied to its payload, re-signed so that only the mutation is wrong."""
    payload = torch.load(source, weights_only=True)
    payload.pop("checksum")
    mutate(payload)
    payload["checksum"] = payload_checksum(payload)
    torch.save(payload, target)


# ------------------------------------------------------------------------------------------------ round trips
def test_round_trip_reproduces_answers_state_and_random_draws(protected, digits_model, queries, tmp_path):
    queen, victim = protected
    victim.predict(queries[:600])
    path = tmp_path / "queen.pt"
    queen.save(str(path))
    before = snapshot(queen)

    original_answers = victim.predict(queries[600:])
    original_cases = queen.last_cases.copy()
    # The continuation reverses answers, so it consumes the random shadow subsets: the RNG must continue identically.
    assert np.sum(original_cases == CASE_REVERSED) > 10

    loaded = Queen.load(str(path))
    assert snapshot(loaded) == before
    for name in Queen.params:
        assert getattr(loaded, name) == getattr(queen, name)
    loaded_victim = bound(loaded, digits_model)
    loaded_answers = loaded_victim.predict(queries[600:])
    assert np.array_equal(loaded.last_cases, original_cases)
    assert np.array_equal(loaded_answers, original_answers)
    assert snapshot(loaded) == snapshot(queen)
    np.testing.assert_array_equal(loaded.class_centres_, queen.class_centres_)
    np.testing.assert_array_equal(loaded.sensitive_radii_, queen.sensitive_radii_)


def test_round_trip_per_client_state(protected, digits_model, queries, tmp_path):
    queen, victim = protected
    queen.set_params(scope="per_client")
    try:
        victim.predict(queries[:300], client_id="alice")
        victim.predict(queries[300:500], client_id=7)
        victim.predict(queries[500:550], client_id="bob")
        path = tmp_path / "clients.pt"
        save_queen(queen, path)
        loaded = load_queen(path)
        assert snapshot(loaded) == snapshot(queen)
        assert loaded.stats["clients"] == 3
        loaded_victim = bound(loaded, digits_model)
        for client in ("alice", 7, "bob", "carol"):
            expected = victim.predict(queries[550:700], client_id=client)
            assert np.array_equal(loaded_victim.predict(queries[550:700], client_id=client), expected)
        assert snapshot(loaded) == snapshot(queen)
    finally:
        queen.set_params(scope="global")


def test_loaded_queen_refuses_to_answer_until_a_model_is_attached(protected, digits_model, digits, tmp_path):
    queen, _ = protected
    path = tmp_path / "queen.pt"
    queen.save(str(path))
    loaded = Queen.load(str(path))
    assert loaded.is_fitted and loaded.shadows_ == []
    preds = np.full((3, 10), 0.1, dtype=np.float32)
    with pytest.raises(ValueError, match="not attached"):
        loaded.defend(digits["x_test"][:3], preds)
    # A loaded QUEEN whose shadows are pending can be saved again, unchanged.
    again = tmp_path / "again.pt"
    loaded.save(str(again))
    reloaded = load_queen(again, classifier=copy.deepcopy(digits_model))
    assert len(reloaded.shadows_) == SETTINGS["n_shadows"]
    expected = queen.defend(digits["x_test"][:50], np.log(np.full((50, 10), 0.1) + np.eye(10)[digits["y_test"][:50]]))
    got = reloaded.defend(digits["x_test"][:50], np.log(np.full((50, 10), 0.1) + np.eye(10)[digits["y_test"][:50]]))
    np.testing.assert_array_equal(got, expected)


def test_shadow_weights_that_do_not_fit_the_attached_model_are_refused(protected, digits_model, tmp_path):
    queen, _ = protected
    path = tmp_path / "queen.pt"
    queen.save(str(path))
    loaded = Queen.load(str(path))
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with pytest.raises(ValueError, match="shadow model 0"):
        loaded.attach(other)
    assert loaded._view is None and loaded.shadows_ == []
    bound(loaded, digits_model)  # the right model still works afterwards
    assert len(loaded.shadows_) == SETTINGS["n_shadows"]


def test_shadow_factory_rebuilds_the_shadows(protected, digits_model, tmp_path):
    queen, _ = protected
    path = tmp_path / "queen.pt"
    queen.save(str(path))
    built = []

    def factory():
        model = copy.deepcopy(digits_model)
        built.append(model)
        return model

    loaded = load_queen(path, classifier=copy.deepcopy(digits_model), shadow_factory=factory)
    assert len(built) == SETTINGS["n_shadows"]
    for shadow, original in zip(loaded.shadows_, queen.shadows_):
        for (name, a), (_, b) in zip(shadow.state_dict().items(), original.state_dict().items()):
            assert torch.equal(a, b), name


def test_unfitted_queen_round_trip(tmp_path):
    queen = Queen(nb_classes=3, r=0.2, threshold=0.5, k=2, n_shadows=3, scope="per_client", seed=4)
    path = tmp_path / "unfitted.pt"
    queen.save(str(path))
    loaded = Queen.load(str(path))
    assert not loaded.is_fitted
    for name in Queen.params:
        assert getattr(loaded, name) == getattr(queen, name)


def test_save_state_load_state_round_trip(protected, queries, tmp_path):
    queen, victim = protected
    victim.predict(queries[:600])
    path = tmp_path / "state.pt"
    queen.save_state(str(path))
    before = snapshot(queen)
    continued = victim.predict(queries[600:])
    assert snapshot(queen) != before
    queen.load_state(str(path))
    assert snapshot(queen) == before
    assert np.array_equal(victim.predict(queries[600:]), continued)
    # A full file's state part loads too.
    full = tmp_path / "full.pt"
    save_queen(queen, full)
    after = snapshot(queen)
    queen.reset()
    load_queen_state(queen, full)
    assert snapshot(queen) == after


def test_state_of_another_fit_or_setting_is_refused(protected, queries, tmp_path):
    queen, victim = protected
    victim.predict(queries[:300])
    path = tmp_path / "state.pt"
    save_queen_state(queen, path)
    victim.predict(queries[300:400])
    before = snapshot(queen)

    for name, value in (("r", 0.2), ("alpha", 2.0), ("scope", "per_client")):
        saved = getattr(queen, name)
        queen.set_params(**{name: value})  # resets the state
        try:
            with pytest.raises(ValueError, match=f"saved with {name}="):
                queen.load_state(str(path))
            assert queen.stats["queries"] == 0
        finally:
            queen.set_params(**{name: saved})

    victim.predict(queries[300:400])
    before = snapshot(queen)
    other_fit = tmp_path / "other_fit.pt"
    rewrite(path, other_fit, lambda payload: payload["state"].update(fingerprint="0" * 64))
    with pytest.raises(ValueError, match="different fit"):
        queen.load_state(str(other_fit))
    assert snapshot(queen) == before


# ----------------------------------------------------------------------------------------------- bad files
def _set_row(name, row, value):
    return lambda p: p["state"][name].__setitem__(row, value)


STATE_MUTATIONS = {
    "version": (lambda p: p.update(version=FORMAT_VERSION + 1), "version"),
    "format": (lambda p: p.update(format="something.else"), "not a QUEEN file"),
    "nb_classes": (lambda p: p["state"].update(nb_classes=11), "nb_classes"),
    "embedding_dim": (lambda p: p["state"].update(embedding_dim=3), "embedding_dim"),
    "cqs_shape": (lambda p: p["state"].update(cqs=torch.zeros(1, 11, dtype=torch.float64)), "shape"),
    "cqs_nan": (_set_row("cqs", (0, 0), float("nan")), "NaN"),
    "cqs_negative": (_set_row("cqs", (0, 0), -1.0), "non-negative"),
    "points_shape": (lambda p: p["state"].update(points=torch.zeros(len(p["state"]["classes"]), 3)), "shape"),
    "points_dtype": (lambda p: p["state"].update(points=p["state"]["points"].long()), "floating"),
    "points_far": (_set_row("points", 0, 1e12), "too far"),
    "classes_range": (_set_row("classes", 0, 10), r"\[0, 9\]"),
    "classes_rows": (lambda p: p["state"].update(classes=torch.zeros(1, dtype=torch.int64)), "shape"),
    "classes_dtype": (lambda p: p["state"].update(classes=p["state"]["classes"].double()), "integers"),
    "record_counts": (_set_row("record_counts", 0, 1), "shape"),
    "record_counts_negative": (_set_row("record_counts", 0, -1), "non-negative"),
    "counts": (_set_row("counts", (0, 0), 1), "inconsistent"),
    "counts_negative": (_set_row("counts", (0, 1), -5), "non-negative"),
    "count_names": (lambda p: p["state"]["count_names"].pop(), "count_names"),
    "client_id": (lambda p: p["state"].update(client_ids=["alice"]), "scope='global'"),
    "two_clients": (lambda p: p["state"].update(client_ids=[None, None]), "at most one"),
    "rng": (lambda p: p["state"].update(rng={"bit_generator": "PCG64", "state": "garbage"}), "random generator"),
    "rng_kind": (lambda p: p["state"].update(rng={"bit_generator": "os.system"}), "bit generator"),
    "no_state": (lambda p: p.pop("state"), "'state'"),
}

FULL_MUTATIONS = {
    "shadow_count": (lambda p: p["fit"]["shadow_states"].pop(), "shadow models"),
    "shadow_weights": (lambda p: p["fit"]["shadow_states"][-1].popitem(), "shadow model 3"),
    "shadow_nan": (lambda p: next(iter(p["fit"]["shadow_states"][1].values())).fill_(float("nan")), "NaN"),
    "mapping_widths": (lambda p: p["fit"].update(mapping_widths=p["fit"]["mapping_widths"][:-1]), "mapping_widths"),
    "mapping_state": (lambda p: p["fit"]["mapping_state"].popitem(), "mapping network"),
    "class_centres": (lambda p: p["fit"].update(class_centres=torch.zeros(10, 3, dtype=torch.float64)), "shape"),
    "radii": (lambda p: p["fit"]["class_mean_radius"].__setitem__(2, 0.0), "positive"),
    "feature_dim": (lambda p: p["fit"].update(feature_centres=torch.zeros(10, 7)), "shape"),
    "scale": (lambda p: p["fit"].update(embedding_scale=float("inf")), "embedding_scale"),
    "params_invalid": (lambda p: p["params"].update(r=-1.0), "invalid QUEEN parameters"),
    "params_unknown": (lambda p: p["params"].update(colour="red"), "unknown QUEEN parameters"),
    "fingerprint": (lambda p: p["state"].update(fingerprint="0" * 64), "different fit"),
    "kind": (lambda p: p.update(kind="queen_state"), "only a QUEEN state"),
}


@pytest.mark.parametrize("mutation", sorted(STATE_MUTATIONS))
def test_mismatched_state_file_is_refused_and_state_untouched(protected, queries, tmp_path, mutation):
    queen, victim = protected
    victim.predict(queries[:300])
    good = tmp_path / "good.pt"
    queen.save_state(str(good))
    victim.predict(queries[300:500])
    before = snapshot(queen)
    bad = tmp_path / "bad.pt"
    mutate, message = STATE_MUTATIONS[mutation]
    rewrite(good, bad, mutate)
    with pytest.raises(ValueError, match=message):
        queen.load_state(str(bad))
    assert snapshot(queen) == before


@pytest.mark.parametrize(
    "client_ids, message",
    [([1.5, "bob", 7], "strings or integers"), (["alice", "alice", 7], "twice"), ([True, "bob", 7], "strings")],
)
def test_per_client_file_with_bad_client_ids_is_refused(protected, queries, tmp_path, client_ids, message):
    queen, victim = protected
    queen.set_params(scope="per_client")
    try:
        for client in ("alice", "bob", 7):
            victim.predict(queries[:50], client_id=client)
        good = tmp_path / "good.pt"
        queen.save_state(str(good))
        before = snapshot(queen)
        bad = tmp_path / "bad.pt"
        rewrite(good, bad, lambda payload: payload["state"].update(client_ids=client_ids))
        with pytest.raises(ValueError, match=message):
            queen.load_state(str(bad))
        assert snapshot(queen) == before
    finally:
        queen.set_params(scope="global")


def test_many_clients_save_and_load_quickly(fitted, tmp_path):
    """The state file holds a few column tensors, not a few tensors per client."""
    import time

    from art_queen.state import QueryState

    queen, _ = fitted
    clone = Queen(**{**SETTINGS, "scope": "per_client"})
    rng = np.random.default_rng(0)
    for client in range(5000):
        state = QueryState(10, clone.r, 2)
        state.records.load(rng.normal(0.0, 1.0, (5, 2)), rng.integers(0, 10, 5))
        state.counts.update(queries=5, recorded=5)
        state.cqs[:] = rng.random(10)
        clone._states[f"client-{client}"] = state
    path = tmp_path / "many.pt"
    start = time.perf_counter()
    clone.save_state(str(path))
    restored = Queen(**{**SETTINGS, "scope": "per_client"})
    restored.load_state(str(path))
    elapsed = time.perf_counter() - start
    assert restored.stats == clone.stats and restored.stats["clients"] == 5000
    assert np.array_equal(restored.recorded_points("client-42")[0], clone.recorded_points("client-42")[0])
    # One entry per client (the first layout) took about 7 s to save and 20 s to load 10,000 clients.
    assert elapsed < 20


@pytest.mark.parametrize("mutation", sorted(FULL_MUTATIONS))
def test_mismatched_queen_file_is_refused(protected, queries, tmp_path, mutation):
    queen, victim = protected
    victim.predict(queries[:300])
    good = tmp_path / "good.pt"
    queen.save(str(good))
    bad = tmp_path / "bad.pt"
    mutate, message = FULL_MUTATIONS[mutation]
    rewrite(good, bad, mutate)
    with pytest.raises(ValueError, match=message):
        Queen.load(str(bad))


class _Payload:
    """Not plain data: torch.load(weights_only=True) must refuse to rebuild it."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("corruption", ["truncated", "random", "empty", "flipped_bit", "pickled_code", "not_a_dict"])
def test_corrupt_file_is_refused_and_state_untouched(protected, queries, tmp_path, corruption):
    queen, victim = protected
    victim.predict(queries[:300])
    good = tmp_path / "good.pt"
    queen.save(str(good))
    content = good.read_bytes()
    bad = tmp_path / "bad.pt"
    if corruption == "truncated":
        bad.write_bytes(content[: len(content) // 2])
    elif corruption == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif corruption == "empty":
        bad.write_bytes(b"")
    elif corruption == "flipped_bit":
        # A flipped bit inside a tensor still unpickles; the checksum catches it.
        cqs = torch.load(good, weights_only=True)["state"]["cqs"].numpy().tobytes()
        position = content.find(cqs) + 3
        assert position > 3
        bad.write_bytes(content[:position] + bytes([content[position] ^ 0x10]) + content[position + 1 :])
    elif corruption == "pickled_code":
        torch.save({"format": "art_queen.Queen", "version": FORMAT_VERSION, "payload": _Payload()}, bad)
    else:
        torch.save([1, 2, 3], bad)
    before = snapshot(queen)
    with pytest.raises(ValueError):
        Queen.load(str(bad))
    with pytest.raises(ValueError):
        queen.load_state(str(bad))
    assert snapshot(queen) == before


def test_missing_file_raises_file_not_found(protected, tmp_path):
    queen, _ = protected
    with pytest.raises(FileNotFoundError):
        Queen.load(str(tmp_path / "absent.pt"))
    with pytest.raises(FileNotFoundError):
        queen.load_state(str(tmp_path / "absent.pt"))


# ------------------------------------------------------------------------------------------------ atomic writes
@pytest.mark.parametrize("failure", ["during_write", "at_rename"])
def test_failure_during_save_leaves_the_previous_file_intact(protected, queries, tmp_path, monkeypatch, failure):
    queen, victim = protected
    victim.predict(queries[:300])
    path = tmp_path / "queen.pt"
    queen.save(str(path))
    previous = path.read_bytes()
    saved_state = snapshot(queen)
    victim.predict(queries[300:600])

    if failure == "during_write":

        def crashing_save(obj, handle, *args, **kwargs):
            handle.write(b"PK\x03\x04 half a file")
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", crashing_save)
    else:

        def crashing_replace(source, target):
            raise OSError("killed before rename")

        monkeypatch.setattr(persistence.os, "replace", crashing_replace)
    with pytest.raises(OSError):
        queen.save(str(path))
    with pytest.raises(OSError):
        queen.save_state(str(path))
    monkeypatch.undo()

    assert path.read_bytes() == previous
    assert sorted(os.listdir(tmp_path)) == ["queen.pt"]  # no temporary file left behind
    assert snapshot(Queen.load(str(path))) == saved_state


@pytest.mark.slow
def test_process_killed_while_saving_leaves_a_loadable_file(protected, queries, tmp_path):
    """A subprocess rewrites the file in a tight loop (two alternating contents) and is SIGKILLed at a random moment."""
    queen, victim = protected
    victim.predict(queries[:300])
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    queen.save(str(first))
    queen.reset()
    queen.save(str(second))
    target = tmp_path / "target.pt"
    # The child needs only torch and the writer (no ART import), so it starts fast.
    script = textwrap.dedent(f"""
        import torch
        from art_queen.persistence import _atomic_torch_save
        payloads = [torch.load(name, weights_only=True) for name in ({str(first)!r}, {str(second)!r})]
        count = 0
        while True:
            _atomic_torch_save(payloads[count % 2], {str(target)!r})
            count += 1
            if count == 3:
                print("saving", flush=True)
        """)
    env = dict(os.environ, HOME=str(tmp_path), OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=root)
    try:
        assert child.stdout.readline().strip() == b"saving"
        time.sleep(float(np.random.default_rng().uniform(0.0, 0.3)))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    loaded = Queen.load(str(target))
    expected = [snapshot(Queen.load(str(name))) for name in (first, second)]
    assert snapshot(loaded) in expected
