"""QUEEN's numpy core: sensitivity, closed-form projection, gradient reversal and the sequential four cases."""

from __future__ import annotations

import numpy as np
import pytest

from art_queen.core import (
    CASE_COVERED,
    CASE_OUTSIDE,
    CASE_RECORDED,
    CASE_REVERSED,
    cqs_increment,
    gradient_reverse_target,
    project_to_simplex_max_cosine,
    queries_before_reversal,
    single_query_sensitivity,
)
from art_queen.state import QueryState, RecordStore, decide_cases


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_sqs_is_half_on_the_edge_and_high_at_the_centre():
    radius = np.array([2.0, 2.0, 2.0])
    sqs = single_query_sensitivity(np.array([2.0, 0.0, 6.0]), radius, alpha=1.0)
    assert sqs[0] == pytest.approx(0.5)
    assert sqs[1] == pytest.approx(0.9214, abs=1e-3)
    assert sqs[2] < 0.01
    increment = cqs_increment(np.array([0.0]), np.array([1.0]), r=0.1, alpha=1.0)
    assert increment[0] == pytest.approx(0.9214**2 * 0.01, rel=1e-3)


def test_closed_form_projection_beats_every_point_of_a_dense_simplex_sample():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 4))
    vectors[:20] = -np.abs(vectors[:20])  # rows without a positive entry take the one-hot branch
    projected = project_to_simplex_max_cosine(vectors)
    assert np.allclose(projected.sum(axis=1), 1.0) and np.all(projected >= 0)
    candidates = rng.dirichlet(np.full(4, 0.3), size=20000)
    candidates = np.concatenate([candidates, np.eye(4)])
    for vector, answer in zip(vectors, projected):
        best_sampled = cosine(candidates, vector[None, :]).max()
        assert cosine(answer, vector) >= best_sampled - 1e-9


def test_reversed_answer_flips_the_honest_gradient_of_a_clone_that_outputs_the_shadow_estimate():
    rng = np.random.default_rng(1)
    victim = rng.dirichlet(np.full(10, 0.2), size=500)
    pirate = rng.dirichlet(np.full(10, 2.0), size=500)
    reversed_answers = gradient_reverse_target(victim, pirate)
    # Soft-label cross-entropy: the clone's logit gradient is output - target.
    honest_gradient = pirate - victim
    reversed_gradient = pirate - reversed_answers
    cosines = cosine(honest_gradient, reversed_gradient)
    assert np.all(cosines < 0), cosines.max()
    assert np.median(cosines) < -0.5
    # Without projection the flip is exact.
    assert np.allclose(pirate - (2 * pirate - victim), -honest_gradient)


def test_reversal_onset_estimate_matches_simulated_recording():
    estimate = queries_before_reversal(r=0.1, threshold=0.05, sensitive_radius=1.0, alpha=1.0)
    rng = np.random.default_rng(2)
    # Distinct queries spread uniformly over the unit disc of class 0; count records until the first reversal.
    angle = rng.uniform(0, 2 * np.pi, 4000)
    radius = np.sqrt(rng.uniform(0, 1, 4000))
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    state = QueryState(nb_classes=1, record_radius=0.1, embedding_dim=2)
    cases = decide_cases(state, points, np.zeros(4000, np.int64), np.zeros((1, 2)), np.ones(1), 0.05, 1.0)
    records_before_reversal = int(np.sum(cases[: np.argmax(cases == CASE_REVERSED)] == CASE_RECORDED))
    assert abs(records_before_reversal - float(estimate)) <= 0.35 * float(estimate)


def make_state() -> tuple[QueryState, np.ndarray, np.ndarray]:
    state = QueryState(nb_classes=2, record_radius=0.1, embedding_dim=2)
    centres = np.array([[0.0, 0.0], [5.0, 0.0]])
    radii = np.array([1.0, 1.0])
    return state, centres, radii


def test_each_of_the_four_cases_updates_the_state_as_specified():
    state, centres, radii = make_state()
    threshold = 0.02  # three central records (0.0085 each) push class 0 over it
    # Case 1: outside the disc: nothing changes.
    cases = decide_cases(state, np.array([[3.0, 0.0]]), np.array([0]), centres, radii, threshold, 1.0)
    assert cases.tolist() == [CASE_OUTSIDE] and len(state.records) == 0 and state.cqs.sum() == 0
    # Case 3: sensitive while CQS <= t: recorded, CQS grows by SQS^2 (r/r_s)^2.
    cases = decide_cases(state, np.array([[0.0, 0.0]]), np.array([0]), centres, radii, threshold, 1.0)
    assert cases.tolist() == [CASE_RECORDED] and len(state.records) == 1
    assert state.cqs[0] == pytest.approx(cqs_increment(np.array([0.0]), np.array([1.0]), 0.1, 1.0)[0])
    # Case 2: within r of a record: nothing changes.
    before = state.cqs.copy()
    cases = decide_cases(state, np.array([[0.05, 0.0]]), np.array([0]), centres, radii, threshold, 1.0)
    assert cases.tolist() == [CASE_COVERED] and len(state.records) == 1 and np.array_equal(state.cqs, before)
    # Push class 0 over the threshold with new central queries, then a new central query is reversed (case 4).
    cases = decide_cases(
        state, np.array([[0.2, 0.0], [-0.2, 0.0], [0.0, 0.2]]), np.zeros(3, np.int64), centres, radii, threshold, 1.0
    )
    assert cases.tolist() == [CASE_RECORDED, CASE_RECORDED, CASE_REVERSED]
    assert state.cqs[0] > threshold and len(state.records) == 3
    before = state.cqs.copy()
    cases = decide_cases(state, np.array([[0.0, -0.4]]), np.array([0]), centres, radii, threshold, 1.0)
    assert cases.tolist() == [CASE_REVERSED] and len(state.records) == 3 and np.array_equal(state.cqs, before)
    # The other class is unaffected: its first central query is recorded.
    cases = decide_cases(state, np.array([[5.0, 0.0]]), np.array([1]), centres, radii, threshold, 1.0)
    assert cases.tolist() == [CASE_RECORDED]
    assert state.counts == {"queries": 8, "outside": 1, "covered": 1, "recorded": 4, "reversed": 2}


def test_batch_decisions_equal_one_query_at_a_time():
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=4.0, size=(3, 2))
    radii = np.array([1.0, 0.7, 1.3])
    classes = rng.integers(0, 3, 600)
    points = centres[classes] + rng.normal(scale=0.6, size=(600, 2))
    points[100:200] = points[:100] + rng.normal(scale=0.02, size=(100, 2))  # near-duplicates of earlier queries
    batch_state = QueryState(3, 0.1, 2)
    batch_cases = decide_cases(batch_state, points, classes, centres, radii, 0.2, 1.0)
    single_state = QueryState(3, 0.1, 2)
    single_cases = np.concatenate(
        [
            decide_cases(single_state, points[i : i + 1], classes[i : i + 1], centres, radii, 0.2, 1.0)
            for i in range(600)
        ]
    )
    assert np.array_equal(batch_cases, single_cases)
    assert set(batch_cases.tolist()) == {1, 2, 3, 4}
    assert np.allclose(batch_state.cqs, single_state.cqs)
    assert np.array_equal(*(np.sort(s.records.points()[0], axis=0) for s in (batch_state, single_state)))


def test_record_store_lookup_is_exact_against_brute_force():
    rng = np.random.default_rng(4)
    store = RecordStore(cell_size=0.1, embedding_dim=2, buffer_limit=64)
    points = rng.uniform(-2, 2, (500, 2))
    classes = rng.integers(0, 3, 500)
    for start in range(0, 500, 50):  # exercises buffer, merge and sorted index together
        store.add(points[start : start + 50], classes[start : start + 50])
    queries = rng.uniform(-2, 2, (2000, 2))
    query_classes = rng.integers(0, 3, 2000)
    distances = np.linalg.norm(queries[:, None, :] - points[None, :, :], axis=2)
    expected = ((distances <= 0.1) & (query_classes[:, None] == classes[None, :])).any(axis=1)
    assert np.array_equal(store.covered(queries, query_classes), expected)
    assert 0.05 < expected.mean() < 0.95
