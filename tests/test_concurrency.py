"""Thread safety: concurrent predict calls on one bound classifier keep inputs, predictions and the state together."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import attacker_queries, make_classifier  # noqa: E402
from scipy.spatial.distance import pdist  # noqa: E402

from art_queen import Queen  # noqa: E402
from art_queen.core import CASE_REVERSED  # noqa: E402

pytestmark = pytest.mark.torch

THREADS = 8
CALLS_PER_THREAD = 25
ROWS_PER_CALL = 8


@pytest.fixture(scope="module")
def fitted(digits, digits_model):
    queen = Queen(nb_classes=10, r=0.1, threshold=0.05, k=3, n_shadows=4, seed=0)
    victim = make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen])
    queen.bind(victim)
    queen.fit(digits["x_train"], digits["y_train"])
    return queen, victim


@pytest.fixture(scope="module")
def calls(digits):
    """THREADS * CALLS_PER_THREAD batches of distinct noisy pool samples."""
    queries = attacker_queries(digits, THREADS * CALLS_PER_THREAD * ROWS_PER_CALL, seed=5, noise=0.05)
    return list(queries.reshape(THREADS * CALLS_PER_THREAD, ROWS_PER_CALL, *queries.shape[1:]))


@pytest.fixture()
def protected(fitted):
    queen, victim = fitted
    settings = {name: getattr(queen, name) for name in ("r", "threshold", "scope")}
    queen.reset()
    yield queen, victim
    queen.set_params(**settings)
    queen.reset()


def run(function, count, threads):
    """Call ``function(i)`` for every i < count: in order, or spread over threads (thread t runs t, t+threads, ...)."""
    results = [None] * count
    if threads == 1:
        for index in range(count):
            results[index] = function(index)
        return results
    barrier = threading.Barrier(threads)
    errors = []

    def worker(first):
        try:
            barrier.wait()
            for index in range(first, count, threads):
                results[index] = function(index)
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)

    workers = [threading.Thread(target=worker, args=(first,)) for first in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        raise errors[0]
    return results


def sorted_records(queen, client_id=None):
    points, classes = queen.recorded_points(client_id)
    order = np.lexsort((points[:, 1], points[:, 0], classes))
    return points[order], classes[order]


def undefended_top1(victim, x):
    with torch.no_grad():
        return victim.model(torch.from_numpy(x)).argmax(1).numpy()


def test_threads_give_the_same_answers_and_final_state_as_sequential_calls(protected, calls):
    """
    With a threshold that never reverses and ``r`` below half the smallest distance between any two queries, the
    answers and the final state do not depend on the order of the queries, so 8 threads must reproduce the
    sequential run exactly: same answers per call (a call's inputs are never paired with another call's predictions
    or features), same counters and records (no lost update), same CQS up to summation order.
    """
    queen, victim = protected
    embeddings = queen.embed(np.concatenate(calls))
    queen.set_params(r=0.5 * float(pdist(embeddings).min()), threshold=1e9)

    def predict(index):
        return victim.predict(calls[index])

    sequential = run(predict, len(calls), threads=1)
    expected_stats, expected_records = queen.stats, sorted_records(queen)
    assert expected_stats["recorded"] > 100  # the test exercises the record store
    queen.reset()
    concurrent = run(predict, len(calls), threads=THREADS)
    stats, records = queen.stats, sorted_records(queen)

    for index, (answer, reference) in enumerate(zip(concurrent, sequential)):
        np.testing.assert_allclose(answer, reference, rtol=0, atol=1e-6, err_msg=f"call {index}")
        assert np.array_equal(answer.argmax(1), undefended_top1(victim, calls[index]))
    cqs, expected_cqs = stats.pop("cqs"), expected_stats.pop("cqs")
    assert stats == expected_stats
    assert stats["queries"] == len(calls) * ROWS_PER_CALL and stats["records"] == stats["recorded"]
    np.testing.assert_allclose(cqs, expected_cqs, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(records[1], expected_records[1])
    np.testing.assert_allclose(records[0], expected_records[0], rtol=0, atol=1e-9)


def test_threads_with_one_client_each_match_the_sequential_run_per_client(protected, calls):
    """
    Per-client scope with a real threshold (answers do get reversed): each thread is one client whose calls are in
    the same order as in the sequential run, so every client's cases, counters, CQS and records must match; answers
    match on the rows that are not reversed (reversed answers draw shadow subsets from the shared generator, whose
    draw order depends on the interleaving).
    """
    queen, victim = protected
    queen.set_params(scope="per_client")
    cases = {}

    def predict(index):
        answer = victim.predict(calls[index], client_id=f"client-{index % THREADS}")
        if threading.current_thread() is threading.main_thread():
            cases[index] = queen.last_cases.copy()  # last_cases is meaningful only without concurrency
        return answer

    sequential = run(predict, len(calls), threads=1)
    expected = {client: queen.client_stats(f"client-{client}") for client in range(THREADS)}
    expected_records = {client: sorted_records(queen, f"client-{client}") for client in range(THREADS)}
    assert sum(stats["reversed"] for stats in expected.values()) > 50
    queen.reset()
    concurrent = run(predict, len(calls), threads=THREADS)

    for client in range(THREADS):
        stats = queen.client_stats(f"client-{client}")
        cqs, expected_cqs = stats.pop("cqs"), dict(expected[client]).pop("cqs")
        assert {k: v for k, v in stats.items()} == {k: v for k, v in expected[client].items() if k != "cqs"}
        np.testing.assert_allclose(cqs, expected_cqs, rtol=1e-12, atol=0)
        points, classes = sorted_records(queen, f"client-{client}")
        np.testing.assert_array_equal(classes, expected_records[client][1])
        np.testing.assert_allclose(points, expected_records[client][0], rtol=0, atol=1e-9)
    for index, (answer, reference) in enumerate(zip(concurrent, sequential)):
        kept = cases[index] != CASE_REVERSED
        np.testing.assert_allclose(answer[kept], reference[kept], rtol=0, atol=1e-6, err_msg=f"call {index}")


def test_concurrent_defend_and_checkpoints_lose_no_update(protected, calls, digits_model, tmp_path):
    """Global scope, reversals on: threads calling ``defend`` directly while another thread checkpoints the state."""
    queen, _ = protected
    preds = [
        torch.softmax(digits_model(torch.from_numpy(batch)), dim=1).detach().numpy().astype(np.float32)
        for batch in calls
    ]
    stop = threading.Event()
    checkpoints = []

    def checkpoint():
        while not stop.is_set():
            path = tmp_path / f"state-{len(checkpoints) % 3}.pt"
            queen.save_state(str(path))
            checkpoints.append(torch.load(path, weights_only=True)["state"])

    saver = threading.Thread(target=checkpoint)
    saver.start()
    try:
        run(lambda index: queen.defend(calls[index], preds[index]), len(calls), threads=THREADS)
    finally:
        stop.set()
        saver.join()
    stats = queen.stats
    assert stats["queries"] == len(calls) * ROWS_PER_CALL
    assert stats["outside"] + stats["within"] == stats["queries"]
    assert stats["records"] == stats["recorded"] > 0 and stats["reversed"] > 0
    # Every checkpoint is a consistent snapshot: records match the recorded count, counters add up.
    assert checkpoints
    for state in checkpoints:
        assert state["client_ids"] in ([], [None])
        counts = dict(zip(state["count_names"], state["counts"].sum(dim=0).tolist()))
        assert counts.get("recorded", 0) == state["points"].shape[0] == state["classes"].shape[0]
        assert counts.get("queries", 0) == sum(value for name, value in counts.items() if name != "queries")
        assert counts.get("queries", 0) % ROWS_PER_CALL == 0  # a call's rows are committed together
