"""QUEEN-aware adaptive attacks: each does what it claims on digits, respects its budget and rejects bad parameters."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from art.attacks.extraction import KnockoffNets  # noqa: E402
from art.defences.postprocessor import GaussianNoise, ReverseSigmoid, Rounded  # noqa: E402
from conftest import attacker_queries, build_digits_model, make_classifier  # noqa: E402

from art_queen import Queen  # noqa: E402
from art_queen.attacks import CoreAvoidance, Recovery, RepeatCompare, SparsityFilter, Sybil  # noqa: E402
from art_queen.attacks._common import BudgetExceededError, train_thieved_classifier  # noqa: E402
from art_queen.attacks.sybil import accepts_client_id  # noqa: E402
from art_queen.core import CASE_RECORDED, CASE_REVERSED  # noqa: E402

pytestmark = pytest.mark.torch

SETTINGS = dict(nb_classes=10, r=0.1, threshold=0.05, k=5, n_shadows=10, seed=0)
FAST = dict(nb_epochs=12, batch_size_fit=64, seed=0)
ALL_ATTACKS = [RepeatCompare, SparsityFilter, CoreAvoidance, Recovery, Sybil]
FAST_EXTRA = {CoreAvoidance: dict(warmup_epochs=8)}


class CaseLog:
    """Test-only wrapper of a QUEEN-defended ``predict``: logs the ground truth (``last_cases``) of every query."""

    def __init__(self, victim, queen):
        self.queen, self.cases, self.rows = queen, [], 0
        inner = victim.predict

        def predict(x, *args, client_id=None, **kwargs):
            answers = inner(x, *args, client_id=client_id, **kwargs)
            self.cases.append(queen.last_cases.copy())
            self.rows += len(x)
            return answers

        victim.predict = predict

    @property
    def all(self) -> np.ndarray:
        return np.concatenate(self.cases)


class RowCounter:
    """Counts the rows an undefended classifier's ``predict`` receives."""

    def __init__(self, classifier):
        self.rows = 0
        inner = classifier.predict

        def predict(x, *args, **kwargs):
            self.rows += len(x)
            return inner(x, *args, **kwargs)

        classifier.predict = predict


@pytest.fixture(scope="module")
def queen_victim(digits, digits_model):
    """A digits CNN protected by a bound, fitted QUEEN (shared by the tests; its state is reset per test)."""
    queen = Queen(**SETTINGS)
    victim = make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[queen])
    queen.bind(victim)
    queen.fit(digits["x_train"], digits["y_train"])
    return queen, victim


@pytest.fixture()
def defended(queen_victim):
    queen, victim = queen_victim
    predict = victim.predict
    queen.set_params(scope="global")
    queen.reset()
    yield queen, victim
    victim.predict = predict
    queen.set_params(scope="global")
    queen.reset()


@pytest.fixture()
def undefended(digits_model):
    return make_classifier(copy.deepcopy(digits_model))


@pytest.fixture(scope="module")
def queries(digits):
    return attacker_queries(digits, 1000, seed=1)


def thief(seed: int = 1):
    return make_classifier(build_digits_model(seed=seed))


def accuracy(classifier, digits) -> float:
    return float(np.mean(np.argmax(classifier.predict(digits["x_test"]), axis=1) == digits["y_test"]))


def clean_top1(victim, x) -> np.ndarray:
    with torch.no_grad():
        return victim.model(torch.from_numpy(x)).argmax(dim=1).numpy()


# ------------------------------------------------------------------------------------------------ every attack
@pytest.mark.parametrize("attack_class", ALL_ATTACKS)
def test_every_attack_steals_an_undefended_classifier_within_budget(attack_class, undefended, digits, queries):
    counter = RowCounter(undefended)
    attack = attack_class(undefended, nb_stolen=500, **FAST, **FAST_EXTRA.get(attack_class, {}))
    stolen = attack.extract(queries, thieved_classifier=thief())
    assert attack.queries_used_ == counter.rows <= 500
    assert attack.queries_used_ >= 450  # the budget is used, not wasted
    assert accuracy(stolen, digits) > 0.8


@pytest.mark.parametrize("attack_class", ALL_ATTACKS)
def test_every_attack_runs_against_art_reverse_sigmoid(attack_class, digits_model, digits, queries):
    model = torch.nn.Sequential(copy.deepcopy(digits_model), torch.nn.Softmax(dim=1))
    defended = make_classifier(model, postprocessing_defences=[ReverseSigmoid(beta=1.0, gamma=0.1)])
    attack = attack_class(defended, nb_stolen=400, use_probability=False, **FAST, **FAST_EXTRA.get(attack_class, {}))
    stolen = attack.extract(queries, thieved_classifier=thief())
    assert attack.queries_used_ <= 400
    assert accuracy(stolen, digits) > 0.6


@pytest.mark.parametrize(
    "attack_class, bad",
    [
        (RepeatCompare, dict(repeat_fraction=1.0)),
        (RepeatCompare, dict(n_repeats=1)),
        (RepeatCompare, dict(tolerance=-0.1)),
        (RepeatCompare, dict(suspect_weight=1.5)),
        (RepeatCompare, dict(repeat_order="oldest")),
        (SparsityFilter, dict(mode="ignore")),
        (SparsityFilter, dict(zero_threshold=-1e-3)),
        (SparsityFilter, dict(max_flagged_fraction=2.0)),
        (CoreAvoidance, dict(seed_fraction=0.0)),
        (CoreAvoidance, dict(seed_fraction=0.5, duplicate_fraction=0.4, mixup_fraction=0.3)),
        (CoreAvoidance, dict(record_radius=0.0)),
        (Recovery, dict(emulator_params={"seed": 3})),
        (Recovery, dict(emulation_rounds=0)),
        (Recovery, dict(seed_fraction=0.0)),
        (Sybil, dict(n_clients=0)),
        (Sybil, dict(client_prefix=7)),
        (Sybil, dict(nb_stolen=0)),
        (Sybil, dict(use_probability="yes")),
        (SparsityFilter, dict(seed=-1)),
        (RepeatCompare, dict(batch_size_query=0)),
    ],
)
def test_bad_parameters_raise_value_error(attack_class, bad, undefended):
    with pytest.raises(ValueError, match="`"):
        attack_class(undefended, **bad)
    attack = attack_class(undefended)
    before = {name: getattr(attack, name) for name in bad}
    with pytest.raises(ValueError):
        attack.set_params(**bad)
    assert {name: getattr(attack, name) for name in bad} == before


def test_extract_rejects_a_missing_thief_and_wrong_inputs(undefended, queries):
    attack = SparsityFilter(undefended, nb_stolen=50)
    with pytest.raises(ValueError, match="thieved classifier"):
        attack.extract(queries)
    with pytest.raises(ValueError, match="shape"):
        attack.extract(queries.reshape(len(queries), 64), thieved_classifier=thief())
    bad = queries.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        attack.extract(bad, thieved_classifier=thief())
    assert attack.queries_used_ == 0


def test_the_budget_is_a_hard_limit(undefended, queries):
    attack = SparsityFilter(undefended, nb_stolen=10)
    attack._start(queries, {"thieved_classifier": thief()})
    attack._query(queries[:8])
    with pytest.raises(BudgetExceededError):
        attack._query(queries[:3])
    assert attack.queries_used_ == 8


# ------------------------------------------------------------------------------------------------ repeat-compare
def test_repeat_compare_finds_reversed_answers_by_their_instability(defended, queries, digits):
    queen, victim = defended
    log = CaseLog(victim, queen)
    attack = RepeatCompare(victim, nb_stolen=1000, repeat_fraction=0.3, **FAST)
    attack.extract(queries, thieved_classifier=thief())
    assert attack.queries_used_ == log.rows == 1000
    first_cases = log.all[: len(attack.flagged_)]
    reversed_ = first_cases == CASE_REVERSED
    repeated_reversed = reversed_[attack.repeated_]
    assert attack.repeated_.size == 300 and repeated_reversed.sum() >= 20
    # Repeats of non-reversed answers are identical, repeats of reversed answers differ.
    precision = repeated_reversed[attack.changed_].mean()
    recall = attack.changed_[repeated_reversed].mean()
    assert precision == 1.0 and recall >= 0.9, (precision, recall)
    # Repeating the least confident answers catches most reversed answers of the whole stream.
    assert attack.flagged_[reversed_].mean() >= 0.8
    assert reversed_[attack.flagged_].mean() >= 0.9


def test_repeat_compare_averages_instead_of_dropping_against_a_randomising_defence(digits_model, queries):
    noisy = make_classifier(copy.deepcopy(digits_model), postprocessing_defences=[GaussianNoise(scale=0.05)])
    attack = RepeatCompare(noisy, nb_stolen=300, **FAST)
    attack.extract(queries, thieved_classifier=thief())
    assert attack.changed_.mean() > 0.9
    assert not attack.flagged_.any()


# ------------------------------------------------------------------------------------------------ sparsity
def test_sparsity_filter_flags_exactly_the_reversed_answers_and_recovers_their_label(defended, queries):
    queen, victim = defended
    log = CaseLog(victim, queen)
    attack = SparsityFilter(victim, nb_stolen=1000, mode="recover", **FAST)
    attack.extract(queries, thieved_classifier=thief())
    reversed_ = log.all == CASE_REVERSED
    flagged = attack.flagged_
    assert reversed_.sum() >= 50
    assert reversed_[flagged].mean() >= 0.99 and flagged[reversed_].mean() >= 0.99
    # The victim's own top class is among the zero entries of a reversed answer.
    targets, _, label_sets = attack.training_targets(attack.answers_, flagged)
    truth = clean_top1(victim, attack.queries_[flagged])
    assert np.all(label_sets[flagged])
    assert np.mean(targets[flagged][np.arange(flagged.sum()), truth] == 1.0) >= 0.95


def test_sparsity_filter_ignores_zeros_that_every_answer_has(digits_model, queries):
    model = torch.nn.Sequential(copy.deepcopy(digits_model), torch.nn.Softmax(dim=1))
    rounded = make_classifier(model, postprocessing_defences=[Rounded(decimals=1)])
    attack = SparsityFilter(rounded, nb_stolen=200, **FAST)
    attack.extract(queries, thieved_classifier=thief())
    assert not attack.flagged_.any()


@pytest.mark.parametrize("mode", ["drop", "complementary"])
def test_sparsity_filter_modes_build_the_documented_targets(mode, undefended):
    attack = SparsityFilter(undefended, mode=mode)
    answers = np.array([[0.0, 0.7, 0.3], [0.2, 0.5, 0.3]], dtype=np.float32)
    flagged = np.array([True, False])
    targets, weights, label_sets = attack.training_targets(answers, flagged)
    if mode == "drop":
        assert weights.tolist() == [0.0, 1.0] and not label_sets.any()
    else:
        assert label_sets.tolist() == [True, False]
        assert targets[0].tolist() == [1.0, 0.0, 1.0]  # every class but the reversed answer's top class
    assert np.allclose(targets[1], answers[1])


# ------------------------------------------------------------------------------------------------ core avoidance
def test_core_avoidance_makes_queen_record_and_reverse_less_than_knockoff_nets(defended, queries):
    queen, victim = defended
    np.random.seed(0)  # KnockoffNets draws with numpy's global generator
    knockoff = KnockoffNets(victim, batch_size_fit=64, batch_size_query=256, nb_epochs=1, nb_stolen=1000)
    knockoff.extract(queries, thieved_classifier=thief())
    baseline = queen.stats
    queen.reset()
    attack = CoreAvoidance(victim, nb_stolen=1000, **FAST, warmup_epochs=8)
    attack.extract(queries, thieved_classifier=thief())
    avoided = queen.stats
    assert avoided["queries"] == baseline["queries"] == 1000 == attack.queries_used_
    sensitive_baseline = baseline["recorded"] + baseline["reversed"]
    sensitive_avoided = avoided["recorded"] + avoided["reversed"]
    assert sensitive_avoided < 0.8 * sensitive_baseline, (avoided, baseline)
    assert avoided["reversed"] < 0.7 * baseline["reversed"], (avoided, baseline)
    kinds = attack.query_kinds_
    assert set(np.unique(kinds)) == {"seed", "duplicate", "offcore", "mixup"} and len(kinds) == 1000


def test_core_avoidance_near_duplicates_are_covered_by_their_recorded_sources(defended, queries):
    queen, victim = defended
    log = CaseLog(victim, queen)
    attack = CoreAvoidance(victim, nb_stolen=600, **FAST, warmup_epochs=8)
    attack.extract(queries, thieved_classifier=thief())
    cases = log.all
    duplicates = cases[attack.query_kinds_ == "duplicate"]
    # Far fewer near-duplicates are new to QUEEN than seeds inside the cores were.
    seeds = cases[attack.query_kinds_ == "seed"]
    assert np.mean(np.isin(duplicates, [CASE_RECORDED, CASE_REVERSED])) < 0.5 * np.mean(
        np.isin(seeds, [CASE_RECORDED, CASE_REVERSED])
    )


def test_core_avoidance_fills_its_budget_from_a_small_pool_with_mixups(undefended, queries):
    attack = CoreAvoidance(undefended, nb_stolen=300, **FAST, warmup_epochs=4)
    attack.extract(queries[:100], thieved_classifier=thief())
    kinds = attack.query_kinds_
    assert attack.queries_used_ == len(kinds) == 300
    assert np.sum(kinds == "seed") + np.sum(kinds == "offcore") <= 100
    assert np.sum(kinds == "mixup") >= 90


# ------------------------------------------------------------------------------------------------ recovery
def test_recovery_maps_defended_answers_closer_to_clean_ones(defended, queries, digits):
    queen, victim = defended
    log = CaseLog(victim, queen)
    attack = Recovery(victim, nb_stolen=1000, **FAST)
    stolen = attack.extract(queries, thieved_classifier=thief())
    assert attack.queries_used_ == log.rows == 1000
    reversed_ = log.all == CASE_REVERSED
    truth = clean_top1(victim, attack.queries_)
    raw_agreement = np.mean(attack.raw_answers_.argmax(1) == truth)
    recovered_agreement = np.mean(attack.recovered_answers_.argmax(1) == truth)
    assert reversed_.sum() >= 50 and np.mean(attack.raw_answers_[reversed_].argmax(1) == truth[reversed_]) == 0
    assert np.mean(attack.recovered_answers_[reversed_].argmax(1) == truth[reversed_]) >= 0.7
    assert recovered_agreement > raw_agreement + 0.05
    raw_thief = train_thieved_classifier(
        thief(), attack.queries_, attack.raw_answers_, nb_epochs=FAST["nb_epochs"], batch_size=64, seed=0
    )
    assert accuracy(stolen, digits) > accuracy(raw_thief, digits)


def test_recovery_falls_back_to_raw_answers_when_the_emulator_cannot_be_fitted(undefended, digits):
    three_classes = digits["x_pool"][digits["y_pool"] < 3][:60]  # QUEEN needs two samples of every class
    attack = Recovery(undefended, nb_stolen=60, **FAST)
    attack.extract(three_classes, thieved_classifier=thief())
    assert attack.emulator_ is None
    assert np.array_equal(attack.recovered_answers_, attack.raw_answers_)
    assert attack.queries_used_ == 60


# ------------------------------------------------------------------------------------------------ sybil
def test_sybil_spreads_queries_over_client_ids_and_escapes_reversal(defended, queries):
    queen, victim = defended
    queen.set_params(scope="per_client")
    single = Sybil(victim, nb_stolen=800, n_clients=1, **FAST)
    single.extract(queries, thieved_classifier=thief())
    one_client = queen.stats
    queen.reset()
    sybil = Sybil(victim, nb_stolen=800, n_clients=16, **FAST)
    sybil.extract(queries, thieved_classifier=thief())
    many = queen.stats
    assert sybil.clients_used_ == many["clients"] == 16 and one_client["clients"] == 1
    assert sybil.queries_used_ == many["queries"] == 800
    assert one_client["reversed"] >= 50 and many["reversed"] < 0.2 * one_client["reversed"]
    assert queen.client_stats("sybil-3")["queries"] == 50


def test_sybil_falls_back_to_one_client_without_client_ids(undefended, queries, digits):
    assert accepts_client_id(undefended.predict) is False
    attack = Sybil(undefended, nb_stolen=300, n_clients=8, **FAST)
    stolen = attack.extract(queries, thieved_classifier=thief())
    assert attack.clients_used_ == 1 and attack.queries_used_ == 300
    assert accuracy(stolen, digits) > 0.7


def test_sybil_falls_back_when_predict_rejects_client_ids(undefended, queries):
    inner = undefended.predict

    def strict_predict(x, batch_size=128, client_id=None):
        if client_id is not None:
            raise TypeError("predict() got an unexpected keyword argument 'client_id'")
        return inner(x, batch_size=batch_size)

    undefended.predict = strict_predict
    attack = Sybil(undefended, nb_stolen=200, n_clients=4, **FAST)
    attack.extract(queries, thieved_classifier=thief())
    assert attack.clients_used_ == 1 and attack.queries_used_ == 200


def test_client_id_support_is_found_through_functools_wraps(defended):
    import functools

    queen, victim = defended
    assert accepts_client_id(victim.predict)  # the bound QUEEN's predict names `client_id`
    inner = victim.predict

    @functools.wraps(inner)
    def logging_predict(x, *args, **kwargs):
        return inner(x, *args, **kwargs)

    def opaque_predict(x, *args, **kwargs):
        return inner(x, *args, **kwargs)

    assert accepts_client_id(logging_predict) and not accepts_client_id(opaque_predict)
