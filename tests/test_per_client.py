"""Per-client scope: one client's exploration does not falsify another client's answers; client ids are checked."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import attacker_queries, make_classifier  # noqa: E402

from art_queen import Queen  # noqa: E402
from art_queen.core import CASE_REVERSED  # noqa: E402

pytestmark = pytest.mark.torch
logger = logging.getLogger(__name__)

SETTINGS = dict(nb_classes=10, r=0.05, threshold=1e9, k=3, n_shadows=4, seed=0, scope="per_client")


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
    defaults = {name: SETTINGS[name] for name in ("scope", "threshold", "r")}
    queen.set_params(**defaults)
    queen.reset()
    yield queen, victim
    queen.set_params(**defaults)
    queen.reset()


def undefended_accuracy(victim, x, y):
    with torch.no_grad():
        return float(np.mean(victim.model(torch.from_numpy(x)).argmax(1).numpy() == y))


def test_attacker_client_does_not_falsify_honest_client_answers(protected, digits):
    queen, victim = protected
    x_test, y_test = digits["x_test"], digits["y_test"]
    attack = attacker_queries(digits, 3000, seed=1)

    # Calibrate the threshold on the honest workload, as a deployment would: measure the CQS that the honest
    # client's queries reach (threshold disabled), and put the threshold 15 % above it.
    victim.predict(x_test, client_id="probe-honest")
    victim.predict(attack, client_id="probe-attacker")
    honest_cqs = np.array(queen.client_stats("probe-honest")["cqs"])
    attacker_cqs = np.array(queen.client_stats("probe-attacker")["cqs"])
    threshold = 1.15 * float(honest_cqs.max())
    # Precondition: the attacker's 3000 queries do cross that threshold in several classes.
    assert np.sum(attacker_cqs > threshold) >= 3, (honest_cqs, attacker_cqs)
    queen.set_params(threshold=threshold)
    queen.reset()

    undefended = undefended_accuracy(victim, x_test, y_test)

    victim.predict(attack, client_id="attacker")
    assert queen.client_stats("attacker")["reversed"] > 100
    answers = victim.predict(x_test, client_id="honest")
    per_client = float(np.mean(answers.argmax(1) == y_test))
    assert queen.client_stats("honest")["queries"] == len(x_test)
    assert queen.client_stats("honest")["reversed"] == 0
    assert abs(per_client - undefended) <= 0.01

    # The paper's global state under the same attack falsifies the honest client's answers.
    queen.set_params(scope="global")
    victim.predict(attack)
    answers = victim.predict(x_test)
    global_scope = float(np.mean(answers.argmax(1) == y_test))
    reversed_honest = int(np.sum(queen.last_cases == CASE_REVERSED))
    logger.info(
        "honest accuracy: undefended %.4f, per-client %.4f, global %.4f (%d of %d honest answers reversed), "
        "threshold %.4f",
        undefended,
        per_client,
        global_scope,
        reversed_honest,
        len(x_test),
        threshold,
    )
    assert reversed_honest > 20
    assert global_scope < undefended - 0.05


def test_clients_are_isolated_and_ids_normalised(protected, digits):
    queen, victim = protected
    queen.set_params(threshold=0.0)  # every new sensitive query after the first record of a class is reversed
    x = digits["x_test"][:60]
    victim.predict(x, client_id="alice")
    alice = queen.client_stats("alice")
    assert alice["reversed"] > 0
    # bob sends the same queries: his answers depend on his own history only
    victim.predict(x, client_id="bob")
    assert queen.client_stats("bob") == alice
    # integer ids: numpy and python integers name the same client, the string "3" is another one
    victim.predict(x[:10], client_id=3)
    victim.predict(x[10:20], client_id=np.int64(3))
    assert queen.client_stats(3)["queries"] == 20
    assert queen.client_stats("3")["queries"] == 0
    assert queen.stats["clients"] == 3
    assert queen.stats["queries"] == 140
    # a defend call routes to the same per-client state as the bound predict
    preds = np.log(np.full((5, 10), 0.1) + np.eye(10)[digits["y_test"][60:65]])
    queen.defend(digits["x_test"][60:65], preds, client_id="alice")
    assert queen.client_stats("alice")["queries"] == 65


@pytest.mark.parametrize("client_id", [None, 1.5, ["a"], ("a",), True, b"alice", {"id": 1}])
def test_invalid_client_id_is_refused_without_state_change(protected, digits, client_id):
    queen, victim = protected
    victim.predict(digits["x_test"][:20], client_id="alice")
    before = (queen.stats, queen.client_stats("alice"), queen._rng.bit_generator.state)
    with pytest.raises(ValueError, match="client"):
        victim.predict(digits["x_test"][20:30], client_id=client_id)
    preds = np.full((3, 10), 0.1, dtype=np.float32)
    with pytest.raises(ValueError, match="client"):
        queen.defend(digits["x_test"][:3], preds, client_id=client_id)
    assert (queen.stats, queen.client_stats("alice"), queen._rng.bit_generator.state) == before


def test_global_scope_ignores_client_ids(protected, digits):
    queen, victim = protected
    queen.set_params(scope="global")
    victim.predict(digits["x_test"][:10], client_id="alice")
    victim.predict(digits["x_test"][10:20])
    assert queen.stats["clients"] == 1 and queen.stats["queries"] == 20


# ----------------------------------------------------------------------------------- cost per query vs records
def spread_records(rng, count, centres, radii):
    """``count`` records spread uniformly over the sensitive discs of the classes (2-D)."""
    classes = rng.integers(0, len(centres), count)
    angle = rng.uniform(0.0, 2.0 * np.pi, count)
    distance = np.sqrt(rng.uniform(0.0, 1.0, count)) * radii[classes]
    return centres[classes] + distance[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1), classes


def interleaved_medians(functions, repeats):
    """
    Median duration of each function, calling them in turn (in alternating order, so that neither always runs first)
    so that machine load hits all of them alike.
    """
    import time

    durations = [[] for _ in functions]
    for repeat in range(repeats):
        order = range(len(functions)) if repeat % 2 == 0 else reversed(range(len(functions)))
        for index in order:
            start = time.perf_counter()
            functions[index](repeat)
            durations[index].append(time.perf_counter() - start)
    return [float(np.median(values)) for values in durations]


def test_record_look_up_cost_per_query_does_not_grow_with_records():
    """Single-query look-ups in stores of 1,000 and 1,000,000 records of equal density (records per grid cell)."""
    from art_queen.state import RecordStore

    rng = np.random.default_rng(0)
    r, density = 0.01, 0.5  # records per cell, all classes together
    stores, queries = [], []
    for count in (1_000, 1_000_000):
        side = np.sqrt(count / density) * r
        store = RecordStore(r, 2)
        store.load(rng.uniform(0.0, side, (count, 2)), rng.integers(0, 10, count))
        stores.append(store)
        queries.append((rng.uniform(0.0, side, (500, 2)), rng.integers(0, 10, 500)))

    def look_up(index):
        points, classes = queries[index]
        return lambda i: stores[index].covered(points[i : i + 1], classes[i : i + 1])

    small, large = interleaved_medians([look_up(0), look_up(1)], repeats=500)
    batch_small, batch_large = interleaved_medians(
        [lambda _: stores[0].covered(*queries[0]), lambda _: stores[1].covered(*queries[1])], repeats=7
    )
    logger.info(
        "record look-up per query: %.1f us at 1e3 and %.1f us at 1e6 records (ratio %.2f); in batches of 500: %.2f us"
        " and %.2f us (ratio %.2f)",
        small * 1e6,
        large * 1e6,
        large / small,
        batch_small / 500 * 1e6,
        batch_large / 500 * 1e6,
        batch_large / batch_small,
    )
    assert large / small < 3


def test_defend_latency_with_a_million_records_stays_flat(protected, digits):
    """Per-query ``defend`` latency of a client with 1,000 records vs one with 1,000,000 (threshold never reached)."""
    from art_queen.state import QueryState

    queen, victim = protected
    queen.set_params(r=0.002, threshold=1e9)  # 1e6 records spread over the discs: ~0.13 records per cell and class
    rng = np.random.default_rng(0)
    for name, count in (("small", 1_000), ("large", 1_000_000)):
        state = QueryState(queen.nb_classes, queen.r, queen.embedding_dim)
        state.records.load(*spread_records(rng, count, queen.class_centres_, queen.sensitive_radii_))
        queen._states[name] = state
    x = digits["x_test"]
    with torch.no_grad():
        preds = torch.softmax(victim.model(torch.from_numpy(x)), dim=1).numpy()

    def query(client):
        return lambda i: queen.defend(x[i : i + 1], preds[i : i + 1], client_id=client)

    small, large = interleaved_medians([query("small"), query("large")], repeats=len(x))
    assert queen.client_stats("large")["recorded"] > 50  # the queries went through the look-up and were recorded
    assert len(queen._states["large"].records) == 1_000_000 + queen.client_stats("large")["recorded"]
    batch_small, batch_large = interleaved_medians(
        [lambda _: queen.defend(x, preds, client_id="small"), lambda _: queen.defend(x, preds, client_id="large")],
        repeats=4,
    )
    logger.info(
        "defend latency per single-query call: %.2f ms with 1e3 records, %.2f ms with 1e6 (ratio %.3f); per row in "
        "batches of %d: %.1f us and %.1f us (ratio %.2f)",
        small * 1e3,
        large * 1e3,
        large / small,
        len(x),
        batch_small / len(x) * 1e6,
        batch_large / len(x) * 1e6,
        batch_large / batch_small,
    )
    assert large / small < 1.5  # target about 1; loose bound for shared, noisy CI machines


def test_max_clients_refuses_a_new_client_and_keeps_the_known_ones(digits, digits_model):
    from art_queen import TooManyClientsError

    queen = Queen(nb_classes=10, scope="per_client", max_clients=2, seed=0, mapping_epochs=5)
    victim = queen.bind(make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen]))
    queen.fit(digits["x_train"], digits["y_train"])
    queries = digits["x_test"][:20]
    victim.predict(queries, client_id="alice")
    victim.predict(queries, client_id="bob")
    before = queen.stats
    with pytest.raises(TooManyClientsError, match="max_clients=2"):
        victim.predict(queries, client_id="mallory")
    assert queen.stats == before
    victim.predict(queries, client_id="alice")
    assert queen.client_stats("alice")["queries"] == 40
    with pytest.raises(ValueError, match="max_clients"):
        Queen(nb_classes=10, max_clients=0)
