"""QUEEN as an ART postprocessor: the acceptance example, fail-closed behaviour, bad input, ART attacks."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from art.attacks.extraction import CopycatCNN, KnockoffNets  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402
from conftest import attacker_queries, build_digits_model, make_classifier, train_digits_model  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402

from art_queen import InputAwarePyTorchClassifier, InputsNotAvailableError, Queen  # noqa: E402
from art_queen.core import CASE_REVERSED  # noqa: E402

pytestmark = pytest.mark.torch

SETTINGS = dict(nb_classes=10, r=0.1, threshold=0.05, k=5, n_shadows=10, seed=0)


@pytest.fixture(scope="module")
def protected(digits, digits_model):
    """The acceptance example: a bound, fitted QUEEN on a digits CNN."""
    queen = Queen(**SETTINGS)
    victim = make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen])
    assert queen.bind(victim) is victim
    queen.fit(digits["x_train"], digits["y_train"])
    return queen, victim


@pytest.fixture()
def fresh(protected):
    queen, victim = protected
    queen.reset()
    yield queen, victim
    queen.reset()


def undefended_probabilities(victim, x):
    with torch.no_grad():
        return torch.softmax(victim.model(torch.from_numpy(x)), dim=1).numpy()


def test_acceptance_example_defends_and_keeps_top1_where_not_reversed(fresh, digits):
    queen, victim = fresh
    honest = undefended_probabilities(victim, digits["x_test"])
    answers = victim.predict(digits["x_test"])
    assert answers.dtype == np.float32 and answers.shape == honest.shape
    assert np.allclose(answers.sum(axis=1), 1.0, atol=1e-5) and np.all(answers >= 0)
    cases = queen.last_cases
    kept = cases != CASE_REVERSED
    assert np.array_equal(answers[kept].argmax(1), honest[kept].argmax(1))
    # Feature perturbation really changes the secondary probabilities.
    assert np.abs(answers[kept] - honest[kept]).sum(axis=1).mean() > 1e-3
    stats = queen.stats
    assert stats["queries"] == len(digits["x_test"])
    assert {"queries", "within", "recorded", "reversed"} <= set(stats)


def test_attacker_stream_is_recorded_then_reversed(fresh, digits):
    queen, victim = fresh
    queries = attacker_queries(digits, 3000)
    answers = victim.predict(queries)
    stats = queen.stats
    assert stats["queries"] == 3000 and stats["recorded"] > 0 and stats["reversed"] > 0
    assert stats["recorded"] == stats["records"]
    honest = undefended_probabilities(victim, queries)
    cases = queen.last_cases
    assert np.array_equal(answers[cases != CASE_REVERSED].argmax(1), honest[cases != CASE_REVERSED].argmax(1))
    # Every class that reversed is over the threshold.
    reversed_classes = np.unique(honest[cases == CASE_REVERSED].argmax(1))
    assert np.all(np.array(stats["cqs"])[reversed_classes] > SETTINGS["threshold"])


def test_reset_forgets_the_state_but_keeps_the_fit(fresh, digits):
    queen, victim = fresh
    victim.predict(attacker_queries(digits, 500))
    assert queen.stats["records"] > 0
    centres = queen.class_centres_.copy()
    queen.reset()
    assert queen.stats["queries"] == 0 and queen.stats["records"] == 0
    assert np.array_equal(queen.class_centres_, centres)
    victim.predict(digits["x_test"][:10])
    assert queen.stats["queries"] == 10


def test_defend_core_matches_the_bound_predict(fresh, digits):
    queen, victim = fresh
    queries = attacker_queries(digits, 400, seed=5)
    through_art = victim.predict(queries)
    queen.reset()
    with torch.no_grad():
        logits = victim.model(torch.from_numpy(queries)).numpy()
    direct = queen.defend(queries, logits)
    assert np.allclose(through_art, direct, atol=1e-5)


def test_model_ending_in_softmax_gives_the_same_decisions(digits):
    results = []
    for ends_in_softmax in (False, True):
        model = train_digits_model(digits, ends_in_softmax=ends_in_softmax, epochs=15)
        queen = Queen(**SETTINGS)
        victim = queen.bind(make_classifier(model, postprocessing_defences=[queen]))
        queen.fit(digits["x_train"], digits["y_train"])
        answers = victim.predict(attacker_queries(digits, 1000))
        assert np.allclose(answers.sum(axis=1), 1.0, atol=1e-5) and np.all(answers >= 0)
        honest = undefended_probabilities(victim, attacker_queries(digits, 1000)) if not ends_in_softmax else None
        if honest is not None:
            kept = queen.last_cases != CASE_REVERSED
            assert np.array_equal(answers[kept].argmax(1), honest[kept].argmax(1))
        results.append(queen.stats)
    for stats in results:
        assert stats["recorded"] > 0 and stats["reversed"] > 0


def test_fails_closed_without_inputs(digits_model):
    queen = Queen(**SETTINGS)
    victim = make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen])
    preds = np.full((3, 10), 0.1, dtype=np.float32)
    with pytest.raises(InputsNotAvailableError, match="bind"):
        queen(preds)
    with pytest.raises(InputsNotAvailableError):
        victim.predict(np.zeros((3, 1, 8, 8), np.float32))  # never bound


def test_unfitted_queen_names_fit(digits_model):
    queen = Queen(**SETTINGS)
    victim = queen.bind(make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen]))
    with pytest.raises(NotFittedError, match=r"fit\("):
        victim.predict(np.zeros((2, 1, 8, 8), np.float32))


def test_bind_requires_the_queen_to_be_a_postprocessor_of_the_classifier(digits_model):
    queen = Queen(**SETTINGS)
    with pytest.raises(ValueError, match="postprocessing_defences"):
        queen.bind(make_classifier(copy.deepcopy(digits_model)))


@pytest.mark.parametrize(
    "x, preds, message",
    [
        (np.full((2, 1, 8, 8), np.nan, np.float32), np.full((2, 10), 0.1, np.float32), "NaN"),
        (np.zeros((2, 1, 8, 8), np.float32), np.full((2, 10), np.inf, np.float32), "NaN or infinite"),
        (np.zeros((2, 1, 8, 7), np.float32), np.full((2, 10), 0.1, np.float32), "expects"),
        (np.zeros((3, 1, 8, 8), np.float32), np.full((2, 10), 0.1, np.float32), "must match"),
        (np.zeros((0, 1, 8, 8), np.float32), np.zeros((0, 10), np.float32), "empty"),
        (np.zeros((2, 1, 8, 8), np.int64), np.full((2, 10), 0.1, np.float32), "floating point"),
        (np.zeros((2, 1, 8, 8), np.float32), np.full((2, 9), 0.1, np.float32), r"shape \(n, 10\)"),
        ([[0.0]], np.full((1, 10), 0.1, np.float32), "numpy array"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_state_untouched(fresh, digits, x, preds, message):
    queen, victim = fresh
    victim.predict(attacker_queries(digits, 300))
    before = queen.stats
    records_before = queen.recorded_points()[0].copy()
    with pytest.raises(ValueError, match=message):
        queen.defend(x, preds)
    assert queen.stats == before
    assert np.array_equal(queen.recorded_points()[0], records_before)


@pytest.mark.parametrize(
    "params, name",
    [
        ({"r": 0}, "r"),
        ({"r": float("nan")}, "r"),
        ({"threshold": -1}, "threshold"),
        ({"k": 11}, "k"),
        ({"k": 0}, "k"),
        ({"n_shadows": 0}, "n_shadows"),
        ({"alpha": 0}, "alpha"),
        ({"beta": -1}, "beta"),
        ({"embedding_dim": 9}, "embedding_dim"),
        ({"perturb": "some"}, "perturb"),
        ({"scope": "local"}, "scope"),
        ({"nb_classes": 1}, "nb_classes"),
        ({"seed": -3}, "seed"),
        ({"verbose": "yes"}, "verbose"),
        ({"perturb_max_steps": 1.5}, "perturb_max_steps"),
    ],
)
def test_parameters_are_validated(params, name):
    settings = {**SETTINGS, **params}
    with pytest.raises(ValueError, match=f"`{name}`"):
        Queen(**settings)
    queen = Queen(**SETTINGS)
    with pytest.raises(ValueError, match=f"`{name}`"):
        queen.set_params(**params)
    assert {key: getattr(queen, key) for key in SETTINGS} == SETTINGS


def test_fit_refuses_a_class_without_samples(digits, digits_model):
    queen = Queen(**SETTINGS)
    queen.bind(make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen]))
    y = digits["y_train"].copy()
    keep = y != 7
    with pytest.raises(ValueError, match=r"classes \[7\]"):
        queen.fit(digits["x_train"][keep], y[keep])
    assert not queen.is_fitted


def test_queries_before_reversal_helper(protected):
    queen, _ = protected
    estimate = queen.queries_before_reversal()
    assert estimate.shape == (10,) and np.all(estimate >= 1)
    queen.set_params(threshold=0.1)
    assert np.all(queen.queries_before_reversal() >= estimate)
    queen.set_params(threshold=0.05)


def count_queries(queen):
    return queen.stats["queries"]


def thief():
    model = build_digits_model(seed=1)
    return make_classifier(model)


@pytest.mark.parametrize("use_probability", [True, False])
def test_copycat_cnn_queries_all_reach_queen_and_the_clone_learns_less(fresh, digits, use_probability):
    queen, victim = fresh
    attack = CopycatCNN(
        victim, batch_size_fit=64, batch_size_query=64, nb_epochs=10, nb_stolen=600, use_probability=use_probability
    )
    np.random.seed(0)
    clone = attack.extract(digits["x_pool"], thieved_classifier=thief())
    assert count_queries(queen) == 600
    clone_accuracy = (clone.predict(digits["x_test"]).argmax(1) == digits["y_test"]).mean()
    assert 0.1 < clone_accuracy <= 1.0


def test_knockoff_random_and_adaptive_query_counts(fresh, digits):
    queen, victim = fresh
    np.random.seed(0)
    attack = KnockoffNets(
        victim,
        batch_size_fit=64,
        batch_size_query=64,
        nb_epochs=2,
        nb_stolen=300,
        sampling_strategy="random",
        use_probability=True,
    )
    attack.extract(digits["x_pool"], thieved_classifier=thief())
    assert count_queries(queen) == 300
    queen.reset()
    attack = KnockoffNets(
        victim,
        batch_size_fit=16,
        batch_size_query=1,
        nb_epochs=1,
        nb_stolen=60,
        sampling_strategy="adaptive",
        reward="all",
    )
    y_pool = np.eye(10, dtype=np.float32)[digits["y_pool"]]
    attack.extract(digits["x_pool"], y_pool, thieved_classifier=thief())
    assert count_queries(queen) == 60


def test_explicit_classifier_subclass_feeds_queen_and_clones_without_it(digits, digits_model):
    queen = Queen(**SETTINGS)
    victim = make_classifier(
        copy.deepcopy(digits_model), postprocessing_defences=[queen], classifier_class=InputAwarePyTorchClassifier
    )
    queen.fit(digits["x_train"], digits["y_train"])
    answers = victim.predict(attacker_queries(digits, 200))
    assert answers.shape == (200, 10) and queen.stats["queries"] == 200
    clone = victim.clone_for_refitting()
    assert isinstance(clone, PyTorchClassifier) and not clone.postprocessing_defences
    clone.fit(digits["x_train"][:64], np.eye(10)[digits["y_train"][:64]], nb_epochs=1)
    clone.predict(digits["x_test"][:5])
    assert queen.stats["queries"] == 200


def test_bound_predict_reuses_the_victims_forward_pass(fresh, digits):
    queen, victim = fresh
    calls = []
    hook = victim.model[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        victim.predict(digits["x_test"][:100], batch_size=100)
    finally:
        hook.remove()
    assert len(calls) == 1  # the victim's own pass; QUEEN read the features from it
