"""Peer defences that run models of their own: AdaptiveMisinformation and PredictionPoisoning (MAD, MAD-argmax)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from conftest import build_digits_model, make_classifier  # noqa: E402

from art_queen.defences import AdaptiveMisinformation, DefenceNotFittedError, PredictionPoisoning  # noqa: E402
from art_queen.defences import prediction_poisoning as poisoning_module  # noqa: E402
from art_queen.input_channel import InputsNotAvailableError  # noqa: E402
from art_queen.model_access import to_probabilities  # noqa: E402


# ----------------------------------------------------------------------------------------------------- fixtures
def _train_tiny_victim(digits, epochs: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits["x_train"]), torch.from_numpy(digits["y_train"])
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny_victim(digits):
    """Digits MLP (Flatten, Linear(64, 32), ReLU, Linear(32, 10)), seeded; deep-copy before wrapping."""
    return _train_tiny_victim(digits)


def _victim_probabilities(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return to_probabilities(model(torch.from_numpy(x)).numpy()).astype(np.float64)


def _protect(model: torch.nn.Module, defence):
    return defence.bind(make_classifier(copy.deepcopy(model), postprocessing_defences=[defence]))


def _out_of_distribution_queries(digits, count: int = 300, seed: int = 1) -> np.ndarray:
    """Uniform noise and blends of two pool images: queries a thief might send, often with a low victim MSP."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0.0, 1.0, (count, 1, 8, 8))
    first, second = rng.integers(0, len(digits["x_pool"]), (2, count))
    blends = 0.5 * digits["x_pool"][first] + 0.5 * digits["x_pool"][second]
    return np.concatenate([noise, blends]).astype(np.float32)


def _check_probability_rows(answers: np.ndarray, shape: tuple) -> None:
    assert answers.dtype == np.float32
    assert answers.shape == shape
    assert np.all(answers >= 0)
    np.testing.assert_allclose(answers.sum(axis=1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------- AdaptiveMisinformation
TAU = 0.8


@pytest.fixture(scope="module")
def misinformed(digits, tiny_victim):
    defence = AdaptiveMisinformation(tau=TAU, nu=1000.0, seed=0)
    classifier = _protect(tiny_victim, defence)
    defence.fit(digits["x_train"], digits["y_train"], nb_epochs=5)
    return defence, classifier


def test_misinformation_model_avoids_the_true_class(digits, misinformed):
    defence, _ = misinformed
    probabilities = defence.misinformation_probabilities(digits["x_test"])
    accuracy = np.mean(np.argmax(probabilities, axis=1) == digits["y_test"])
    true_class_mass = probabilities[np.arange(len(probabilities)), digits["y_test"]].mean()
    print(f"misinformation model: accuracy {accuracy:.3f}, mean probability of the true class {true_class_mass:.3f}")
    assert accuracy < 0.05
    assert true_class_mass < 0.1


def test_in_distribution_queries_keep_the_victims_answer(digits, tiny_victim, misinformed):
    _, classifier = misinformed
    x = digits["x_test"]
    victim = _victim_probabilities(tiny_victim, x)
    confident = victim.max(axis=1) > TAU + 0.05
    assert confident.mean() > 0.5
    answers = classifier.predict(x)
    _check_probability_rows(answers, victim.shape)
    deviation = np.abs(answers[confident] - victim[confident]).max()
    print(f"in-distribution (MSP > {TAU + 0.05}): {confident.sum()} rows, max |answer - victim| {deviation:.2e}")
    assert deviation < 1e-5
    np.testing.assert_array_equal(np.argmax(answers[confident], axis=1), np.argmax(victim[confident], axis=1))


def test_low_msp_queries_get_misinformation(digits, tiny_victim, misinformed):
    _, classifier = misinformed
    x = _out_of_distribution_queries(digits)
    victim = _victim_probabilities(tiny_victim, x)
    doubtful = victim.max(axis=1) < TAU - 0.05
    assert doubtful.sum() >= 100
    answers = classifier.predict(x)
    _check_probability_rows(answers, victim.shape)
    changed = np.mean(np.argmax(answers[doubtful], axis=1) != np.argmax(victim[doubtful], axis=1))
    distortion = np.abs(answers[doubtful] - victim[doubtful]).sum(axis=1).mean()
    print(f"low MSP (< {TAU - 0.05}): {doubtful.sum()} rows, top-1 changed {changed:.3f}, mean L1 {distortion:.3f}")
    assert changed > 0.8


def test_misinformation_weight_is_the_reverse_sigmoid_of_the_msp():
    defence = AdaptiveMisinformation(tau=0.6, nu=20.0)
    scores = np.linspace(0.0, 1.0, 11)
    weights = defence.misinformation_weight(scores)
    np.testing.assert_allclose(weights, 1.0 / (1.0 + np.exp(20.0 * (scores - 0.6))))
    assert defence.misinformation_weight(np.array([0.6]))[0] == pytest.approx(0.5)
    assert np.all(np.diff(weights) < 0)
    assert np.all(np.isfinite(AdaptiveMisinformation(tau=0.5, nu=1e6).misinformation_weight(scores)))


def test_adaptive_misinformation_mixes_by_the_weight(digits, tiny_victim, misinformed):
    defence, _ = misinformed
    x = _out_of_distribution_queries(digits, count=40)
    with torch.no_grad():
        logits = tiny_victim(torch.from_numpy(x)).numpy()
    victim = to_probabilities(logits).astype(np.float64)
    alpha = defence.misinformation_weight(victim.max(axis=1))[:, None]
    expected = (1 - alpha) * victim + alpha * defence.misinformation_probabilities(x)
    np.testing.assert_allclose(defence(logits, x=x), expected, atol=1e-6)


def test_adaptive_misinformation_with_a_model_ending_in_softmax_and_a_factory(digits, tiny_victim):
    softmax_victim = torch.nn.Sequential(*copy.deepcopy(tiny_victim), torch.nn.Softmax(dim=1))
    built = []

    def factory() -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Softmax(dim=1))
        built.append(model)
        return model

    defence = AdaptiveMisinformation(tau=TAU, misinformation_model_factory=factory)
    classifier = _protect(softmax_victim, defence)
    defence.fit(digits["x_train"], digits["y_train"], nb_epochs=3)
    assert defence.misinformation_model_ is built[-1]
    assert np.mean(np.argmax(defence.misinformation_probabilities(digits["x_test"]), axis=1) == digits["y_test"]) < 0.1
    answers = classifier.predict(digits["x_test"][:50])
    _check_probability_rows(answers, (50, 10))


def test_adaptive_misinformation_refuses_to_answer_before_fit(digits, tiny_victim):
    defence = AdaptiveMisinformation()
    classifier = _protect(tiny_victim, defence)
    with pytest.raises(DefenceNotFittedError, match="fit"):
        classifier.predict(digits["x_test"][:5])
    assert not defence.is_fitted


def test_adaptive_misinformation_fit_needs_the_victim(digits):
    with pytest.raises(DefenceNotFittedError, match="bind"):
        AdaptiveMisinformation().fit(digits["x_train"], digits["y_train"])


def test_adaptive_misinformation_fails_closed_without_inputs(misinformed):
    defence, _ = misinformed
    with pytest.raises(InputsNotAvailableError):
        defence(np.full((2, 10), 0.1, dtype=np.float32))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.0}, "tau"),
        ({"tau": "0.5"}, "tau"),
        ({"nu": 0.0}, "nu"),
        ({"nu": np.inf}, "nu"),
        ({"misinformation_model_factory": 3}, "misinformation_model_factory"),
        ({"seed": -1}, "seed"),
        ({"verbose": "yes"}, "verbose"),
    ],
)
def test_adaptive_misinformation_rejects_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveMisinformation(**kwargs)


def test_adaptive_misinformation_rejects_bad_inputs_and_bad_training_data(digits, misinformed):
    defence, _ = misinformed
    model_before = defence.misinformation_model_
    x = digits["x_test"][:4]
    preds = np.full((4, 10), 0.1, dtype=np.float32)
    with pytest.raises(ValueError, match="rows"):
        defence(preds, x=x[:3])
    with pytest.raises(ValueError, match="NaN"):
        defence(np.where(np.eye(4, 10) > 0, np.nan, preds).astype(np.float32), x=x)
    with pytest.raises(ValueError, match="NaN"):
        defence(preds, x=np.full_like(x, np.nan))
    with pytest.raises(ValueError, match="empty"):
        defence(preds[:0], x=x[:0])
    with pytest.raises(ValueError, match="labels"):
        defence.fit(digits["x_train"], digits["y_train"][:10])
    with pytest.raises(ValueError, match="nb_epochs"):
        defence.fit(digits["x_train"], digits["y_train"], nb_epochs=0)
    assert defence.misinformation_model_ is model_before


# ------------------------------------------------------------------------------------------ PredictionPoisoning
EPSILON = 0.5


def _poison(model, x, **kwargs):
    defence = PredictionPoisoning(epsilon=EPSILON, **kwargs)
    classifier = _protect(model, defence)
    return defence, classifier.predict(x)


@pytest.mark.parametrize("variant", ["mad", "mad_argmax"])
@pytest.mark.parametrize("selection", ["vertex", "answer"])
def test_prediction_poisoning_respects_the_budget_and_deviates_the_gradient(digits, tiny_victim, variant, selection):
    x = np.concatenate([digits["x_test"][:150], _out_of_distribution_queries(digits, count=25)])
    victim = _victim_probabilities(tiny_victim, x)
    defence, answers = _poison(tiny_victim, x, variant=variant, selection=selection)
    _check_probability_rows(answers, victim.shape)
    distortion = np.abs(answers - victim).sum(axis=1)
    assert np.all(distortion <= EPSILON + 1e-5)
    angles = defence.angular_deviation(x, answers, victim.astype(np.float32))
    own = defence.angular_deviation(x, victim.astype(np.float32), victim.astype(np.float32))
    agreement = np.mean(np.argmax(answers, axis=1) == np.argmax(victim, axis=1))
    print(
        f"{variant}/{selection}: mean L1 {distortion.mean():.3f}, top-1 agreement {agreement:.3f}, "
        f"mean angle {angles.mean():.3f} rad, share of rows turned > 0.01 rad {np.mean(angles > 0.01):.3f}"
    )
    assert np.all(angles >= own - 1e-6)
    assert np.mean(angles > 0.01) > 0.9
    if variant == "mad_argmax":
        np.testing.assert_array_equal(np.argmax(answers, axis=1), np.argmax(victim, axis=1))


def test_answer_selection_turns_the_gradient_at_least_as_far_as_the_papers_heuristic(digits, tiny_victim):
    x = digits["x_test"][:150]
    victim = _victim_probabilities(tiny_victim, x).astype(np.float32)
    for variant in ("mad", "mad_argmax"):
        defence, vertex_answers = _poison(tiny_victim, x, variant=variant, selection="vertex")
        _, answer_answers = _poison(tiny_victim, x, variant=variant, selection="answer")
        by_vertex = defence.angular_deviation(x, vertex_answers, victim)
        by_answer = defence.angular_deviation(x, answer_answers, victim)
        print(
            f"{variant}: mean angle, paper's vertex selection {by_vertex.mean():.3f}, by answer {by_answer.mean():.3f}"
        )
        assert np.all(by_answer >= by_vertex - 1e-4)


def _per_row_jacobian(surrogate: torch.nn.Module, row: np.ndarray, parameters: list[torch.Tensor]) -> torch.Tensor:
    """The paper's loop: one autograd call per class on a single query."""
    log_probs = torch.log_softmax(surrogate(torch.from_numpy(row[None])).reshape(-1), dim=0)
    rows = []
    for k in range(log_probs.shape[0]):
        grads = torch.autograd.grad(log_probs[k], parameters, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


def test_batched_mad_equals_a_per_row_reference_computation(digits, tiny_victim):
    x = digits["x_test"][10:13]
    victim = _victim_probabilities(tiny_victim, x)
    defence, answers = _poison(tiny_victim, x, variant="mad")
    surrogate = defence.surrogate_
    head = surrogate[3]
    reference = []
    for row, p in zip(x, victim):
        jacobian = _per_row_jacobian(surrogate, row, [head.weight, head.bias]).numpy()  # (C, D)
        target_gradient = jacobian.T @ p
        target_gradient /= np.linalg.norm(target_gradient)
        objective = []
        for k in range(len(p)):
            gradient = jacobian.T @ np.eye(len(p))[k]
            objective.append(np.sum((gradient / np.linalg.norm(gradient) - target_gradient) ** 2))
        vertex = np.eye(len(p))[int(np.argmax(objective))]
        step = min(1.0, EPSILON / np.abs(vertex - p).sum())
        reference.append(p + step * (vertex - p))
    np.testing.assert_allclose(answers, np.array(reference), atol=1e-5)


@pytest.mark.parametrize("jacobian_parameters", ["head", "all"])
def test_batched_jacobian_equals_per_row_autograd_on_a_cnn(digits, jacobian_parameters):
    """torch.func Jacobians on a CNN (the shared conftest architecture) match the paper's per-row autograd loop."""
    defence = PredictionPoisoning(epsilon=EPSILON, jacobian_parameters=jacobian_parameters)
    _protect(build_digits_model(), defence)
    x = digits["x_test"][:3]
    batched = defence.surrogate_jacobian(x).double()
    surrogate = defence.surrogate_
    parameters = list(surrogate.parameters()) if jacobian_parameters == "all" else list(surrogate[6].parameters())
    for index in range(len(x)):
        np.testing.assert_allclose(
            batched[index].numpy(), _per_row_jacobian(surrogate, x[index], parameters).numpy(), rtol=1e-4, atol=1e-6
        )


def test_head_jacobian_has_the_closed_form_of_a_linear_softmax_layer(digits, tiny_victim):
    """For a linear head, d log q_k / d(W, b) = (e_k - q) (x) [f, 1]: an independent check of the Jacobian."""
    defence = PredictionPoisoning(epsilon=EPSILON)
    _protect(tiny_victim, defence)
    x = digits["x_test"][:5]
    surrogate = defence.surrogate_
    with torch.no_grad():
        features = surrogate[:3](torch.from_numpy(x)).double()
        q = torch.softmax(surrogate(torch.from_numpy(x)).double(), dim=1)
    jacobian = defence.surrogate_jacobian(x).double()
    eye = torch.eye(10, dtype=torch.float64)
    for index in range(len(x)):
        delta = eye - q[index]  # row k: e_k - q
        expected = torch.cat([(delta[:, :, None] * features[index][None, None, :]).reshape(10, -1), delta], dim=1)
        np.testing.assert_allclose(jacobian[index].numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)


def _explicit_greedy(victim: np.ndarray, gram: np.ndarray, epsilon: float | None) -> tuple[np.ndarray, float]:
    """Greedy MAD-argmax for one row, scoring every candidate point explicitly (no incremental updates)."""
    scorer = poisoning_module._Scorer(victim[None], gram[None], epsilon)
    top = np.array([np.argmax(victim)])
    nb_classes = len(victim)

    def score(support: np.ndarray) -> tuple[float, np.ndarray]:
        point = poisoning_module._argmax_preserving_points(support[None, None, :].copy(), top)
        return float(scorer.score_points(point)[0, 0]), point[0, 0]

    support = np.arange(nb_classes) == top[0]
    best_score, best_point = score(support)
    while not support.all():
        options = [(score(support | (np.arange(nb_classes) == k)), k) for k in np.flatnonzero(~support)]
        (option_score, option_point), k = min(options, key=lambda item: item[0][0])
        support[k] = True
        if option_score < best_score:
            best_score, best_point = option_score, option_point
    return best_point, best_score


def test_greedy_argmax_search_matches_an_explicit_greedy_reference():
    rng = np.random.default_rng(0)
    nb_rows, nb_classes = 6, 7
    factors = rng.normal(size=(nb_rows, nb_classes, 20))
    gram = factors @ factors.transpose(0, 2, 1)
    victim = rng.dirichlet(np.full(nb_classes, 0.3), nb_rows)
    for epsilon in (None, 0.4):
        scorer = poisoning_module._Scorer(victim, gram, epsilon)
        greedy = poisoning_module._greedy_argmax_preserving_point(scorer)
        exhaustive = poisoning_module._best_argmax_preserving_point(scorer)
        exhaustive_scores = scorer.score_points(exhaustive[:, None, :])[:, 0]
        for index in range(nb_rows):
            reference_point, reference_score = _explicit_greedy(victim[index], gram[index], epsilon)
            np.testing.assert_allclose(greedy[index], reference_point, atol=1e-12)
            assert exhaustive_scores[index] <= reference_score + 1e-12  # exhaustive search is never worse
            assert np.argmax(greedy[index]) == np.argmax(victim[index])


def test_mad_argmax_keeps_top1_with_greedy_search_too(digits, tiny_victim, monkeypatch):
    monkeypatch.setattr(poisoning_module, "EXHAUSTIVE_ARGMAX_MAX_CLASSES", 2)
    x = digits["x_test"][:60]
    victim = _victim_probabilities(tiny_victim, x)
    for selection in ("vertex", "answer"):
        _, answers = _poison(tiny_victim, x, variant="mad_argmax", selection=selection)
        _check_probability_rows(answers, victim.shape)
        assert np.all(np.abs(answers - victim).sum(axis=1) <= EPSILON + 1e-5)
        np.testing.assert_array_equal(np.argmax(answers, axis=1), np.argmax(victim, axis=1))


def test_prediction_poisoning_with_a_model_ending_in_softmax(digits, tiny_victim):
    softmax_victim = torch.nn.Sequential(*copy.deepcopy(tiny_victim), torch.nn.Softmax(dim=1))
    x = digits["x_test"][:40]
    victim = _victim_probabilities(tiny_victim, x)
    _, answers = _poison(softmax_victim, x, variant="mad_argmax")
    _check_probability_rows(answers, victim.shape)
    assert np.all(np.abs(answers - victim).sum(axis=1) <= EPSILON + 1e-5)
    np.testing.assert_array_equal(np.argmax(answers, axis=1), np.argmax(victim, axis=1))


def test_surrogate_is_a_fresh_seeded_copy_and_fit_trains_it_on_the_victims_answers(digits, tiny_victim):
    first = PredictionPoisoning(epsilon=EPSILON, seed=3)
    second = PredictionPoisoning(epsilon=EPSILON, seed=3)
    _protect(tiny_victim, first)
    _protect(tiny_victim, second)
    victim_weight = tiny_victim[3].weight.detach()
    assert torch.equal(first.surrogate_[3].weight, second.surrogate_[3].weight)
    assert not torch.equal(first.surrogate_[3].weight, victim_weight)
    assert not first.surrogate_[3]._forward_hooks

    x = digits["x_pool"]
    victim_labels = np.argmax(_victim_probabilities(tiny_victim, x), axis=1)

    def agreement(defence):
        with torch.no_grad():
            return np.mean(defence.surrogate_(torch.from_numpy(x)).argmax(dim=1).numpy() == victim_labels)

    before = agreement(first)
    first.fit(x, nb_epochs=10)
    after = agreement(first)
    print(f"surrogate agreement with the victim: fresh {before:.3f}, after fit {after:.3f}")
    assert after > max(before, 0.8)
    assert torch.equal(tiny_victim[3].weight, victim_weight)
    second.fit(x, digits["y_pool"], nb_epochs=1)


def test_prediction_poisoning_needs_the_victim(digits):
    defence = PredictionPoisoning(epsilon=EPSILON)
    preds = np.full((2, 10), 0.1, dtype=np.float32)
    with pytest.raises(DefenceNotFittedError, match="bind"):
        defence(preds, x=digits["x_test"][:2])
    with pytest.raises(DefenceNotFittedError, match="bind"):
        defence.fit(digits["x_test"][:2])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": np.nan}, "epsilon"),
        ({"variant": "mad-argmax"}, "variant"),
        ({"selection": "best"}, "selection"),
        ({"jacobian_parameters": "last"}, "jacobian_parameters"),
        ({"seed": 1.5}, "seed"),
        ({"batch_size": 0}, "batch_size"),
        ({"verbose": 1}, "verbose"),
    ],
)
def test_prediction_poisoning_rejects_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PredictionPoisoning(**kwargs)


def test_prediction_poisoning_rejects_bad_inputs(digits, tiny_victim):
    defence = PredictionPoisoning(epsilon=EPSILON)
    _protect(tiny_victim, defence)
    surrogate = defence.surrogate_
    x = digits["x_test"][:4]
    preds = np.full((4, 10), 0.1, dtype=np.float32)
    with pytest.raises(ValueError, match="rows"):
        defence(preds, x=x[:3])
    with pytest.raises(ValueError, match="infinite"):
        defence(np.where(np.eye(4, 10) > 0, np.inf, preds).astype(np.float32), x=x)
    with pytest.raises(ValueError, match="empty"):
        defence(preds[:0], x=x[:0])
    with pytest.raises(ValueError, match="classes"):
        defence(np.full((4, 7), 1 / 7, dtype=np.float32), x=x)
    with pytest.raises(ValueError, match="labels"):
        defence.fit(x, np.array([0, 1]))
    assert defence.surrogate_ is surrogate


def test_prediction_poisoning_batches_give_the_same_answers(digits, tiny_victim):
    x = digits["x_test"][:50]
    _, whole = _poison(tiny_victim, x, variant="mad", batch_size=128)
    _, chunked = _poison(tiny_victim, x, variant="mad", batch_size=7)
    np.testing.assert_allclose(whole, chunked, atol=1e-6)
