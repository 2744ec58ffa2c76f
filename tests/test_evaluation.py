"""Tests of the evaluation harness: metrics, registries, model zoo and cache, grid, outputs and plots."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from art_queen.evaluation import metrics
from art_queen.evaluation.registry import (
    ATTACKS,
    DEFENCES,
    NO_DEFENCE,
    AttackSpec,
    import_target,
    select_attacks,
    select_defences,
    setting_label,
)


# ---------------------------------------------------------------------------------------------------------- metrics
def test_accuracy_and_fidelity_accept_labels_and_scores():
    labels = np.array([0, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 2]]
    assert metrics.accuracy(scores, labels) == pytest.approx(0.75)
    assert metrics.fidelity(np.array([0, 1, 1, 2]), scores) == 1.0
    assert metrics.fidelity(np.array([1, 1, 1, 1]), labels) == pytest.approx(0.25)


@pytest.mark.parametrize("first, second", [(np.zeros(3), np.zeros(4)), (np.zeros(0), np.zeros(0))])
def test_accuracy_rejects_mismatched_or_empty_inputs(first, second):
    with pytest.raises(ValueError, match="rows|empty"):
        metrics.accuracy(first, second)


def test_mean_l1_distortion_on_hand_made_rows():
    defended = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    undefended = np.array([[0.0, 1.0], [0.5, 0.5], [0.3, 0.7]])
    # Row distances 2.0, 0.0 and 0.2.
    assert metrics.mean_l1_distortion(defended, undefended) == pytest.approx(2.2 / 3)
    assert metrics.mean_l1_distortion(undefended, undefended) == 0.0
    with pytest.raises(ValueError, match="equal shape"):
        metrics.mean_l1_distortion(defended, undefended[:2])
    with pytest.raises(ValueError, match="finite"):
        metrics.mean_l1_distortion(np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]))


def test_ks_statistic_compares_class_histograms_not_models():
    rng = np.random.default_rng(0)
    clone_a = rng.integers(0, 10, size=200)
    clone_b = (clone_a + 1) % 10  # disagrees with clone_a on every input ...
    permuted = rng.permutation(clone_a)  # ... while this one has exactly the same histogram
    statistic, pvalue = metrics.ks_statistic(clone_a, permuted)
    assert statistic == 0.0 and pvalue == pytest.approx(1.0)
    assert metrics.fidelity(clone_a, clone_b) == 0.0
    statistic, pvalue = metrics.ks_statistic(np.zeros(50, dtype=int), np.full(50, 9))
    assert statistic == 1.0 and pvalue < 1e-10
    # Scores are reduced to their argmax first.
    assert metrics.ks_statistic(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2]))[0] == 0.0
    assert "not a distance between models" in metrics.KS_CAVEAT


def test_mean_std_ignores_unknown_values_and_share_handles_zero():
    assert metrics.mean_std([0.5, None, float("nan"), 1.0]) == (0.75, 0.25, 2)
    assert metrics.mean_std([None]) == (None, None, 0)
    assert metrics.share(3, 4) == 0.75
    assert metrics.share(3, 0) is None and metrics.share(None, 4) is None


def _cell(defence, attack, labels, budget, seed, clone, benign, **extra):
    return {
        "defence": defence,
        "setting": "-",
        "attack": attack,
        "sampling": "random",
        "labels": labels,
        "budget": budget,
        "seed": seed,
        "clone_accuracy": clone,
        "benign_accuracy": benign,
        "victim_accuracy": 0.9,
        **extra,
    }


def test_aggregation_means_over_seeds_and_worst_case_over_attacks():
    cells = [
        _cell("D", "A", "soft", 10, 0, 0.5, 0.9),
        _cell("D", "A", "soft", 10, 1, 0.7, 0.7),
        _cell("D", "B", "hard", 10, 0, 0.8, 0.8),
        _cell("D", "B", "hard", 10, 1, 0.8, 0.8),
        _cell("D", "B", "hard", 20, 0, None, None, error="ValueError: boom"),
    ]
    rows = metrics.aggregate_cells(cells)
    assert [(r["attack"], r["budget"]) for r in rows] == [("A", 10), ("B", 10), ("B", 20)]
    assert rows[0]["clone_accuracy_mean"] == pytest.approx(0.6)
    assert rows[0]["clone_accuracy_std"] == pytest.approx(0.1)
    assert rows[0]["seeds"] == [0, 1] and rows[0]["failed"] == 0
    assert rows[2]["failed"] == 1 and rows[2]["clone_accuracy_mean"] is None

    (summary,) = metrics.summarise_defences(rows, cells)
    assert summary["worst_clone_accuracy_mean"] == pytest.approx(0.8)
    assert summary["worst_attack"] == "B (random, hard)"
    assert summary["benign_accuracy_worst"] == pytest.approx(0.8)
    # Per-seed means of the benign accuracy are 0.85 and 0.75.
    assert summary["benign_accuracy_mean"] == pytest.approx(0.8)
    assert summary["benign_accuracy_std"] == pytest.approx(0.05)
    by_budget = metrics.worst_case_by_budget(rows)
    assert [(w["budget"], w["worst_attack"]) for w in by_budget] == [(10, "B (random, hard)")]


# --------------------------------------------------------------------------------------------------------- registry
def test_registry_holds_every_required_defence_and_attack():
    from art.defences.postprocessor.postprocessor import Postprocessor

    required = {"NoDefence", "Queen", "ReverseSigmoid", "Rounded", "GaussianNoise", "HighConfidence", "TopLabel"}
    assert required <= set(DEFENCES)
    for key, spec in DEFENCES.items():
        assert spec.settings, key
        if spec.target is None:
            assert key == NO_DEFENCE
            continue
        cls = import_target(spec.target)
        assert issubclass(cls, Postprocessor)
        assert cls.__name__ == spec.name == key  # outputs name defences by their class names
    variants = {(a.name, a.sampling, a.labels) for a in ATTACKS.values()}
    assert {
        ("CopycatCNN", "random", "soft"),
        ("CopycatCNN", "random", "hard"),
        ("KnockoffNets", "random", "soft"),
        ("KnockoffNets", "random", "hard"),
        ("KnockoffNets", "adaptive", "hard"),
    } <= variants
    for spec in ATTACKS.values():
        assert callable(import_target(spec.target))


def test_default_defence_settings_construct():
    from art_queen.evaluation.grid import build_defence

    for key in DEFENCES:
        for settings in DEFENCES[key].settings:
            defence = build_defence(key, settings, nb_classes=10, seed=0)
            assert (defence is None) == (key == NO_DEFENCE)
            for name, value in settings.items():
                assert getattr(defence, name) == value


def test_selection_by_name_variant_and_case():
    assert select_attacks(["copycatcnn"]) == ["CopycatCNN/soft", "CopycatCNN/hard"]
    assert select_attacks(["KnockoffNets/random"]) == ["KnockoffNets/random/soft", "KnockoffNets/random/hard"]
    assert select_defences(["queen", "NoDefence"]) == ["NoDefence", "Queen"]
    assert select_attacks(None) == list(ATTACKS)
    with pytest.raises(ValueError, match="valid defences are"):
        select_defences(["Nope"])
    with pytest.raises(ValueError, match="Unknown attack"):
        select_attacks(["Copy"])
    assert setting_label({}) == "-"
    assert setting_label({"beta": 1.0, "gamma": 0.1}) == "beta=1.0, gamma=0.1"
    with pytest.raises(ValueError, match="package.module:Name"):
        import_target("no_colon")


@pytest.mark.torch
def test_knockoff_reward_shim_is_finite_for_one_hot_answers_and_matches_art_otherwise(digits):
    import torch
    from art.attacks.extraction import KnockoffNets

    from art_queen.evaluation.registry import knockoff_nets_with_safe_rewards
    from art_queen.evaluation.zoo import make_classifier

    classifier = make_classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8), 10)
    safe = knockoff_nets_with_safe_rewards(classifier, sampling_strategy="adaptive", nb_stolen=3)
    assert isinstance(safe, KnockoffNets)
    safe.y_avg, safe.reward_avg, safe.reward_var = np.zeros(10), np.zeros(3), np.zeros(3)
    one_hot = np.eye(10)[[3]]
    rewards = [safe._reward_all(one_hot, np.zeros((1, 10)), n) for n in (1, 2, 3)]
    assert np.all(np.isfinite(rewards))

    rng = np.random.default_rng(0)
    art = KnockoffNets(classifier, sampling_strategy="adaptive", nb_stolen=3)
    for attack in (safe, art):
        attack.y_avg, attack.reward_avg, attack.reward_var = np.zeros(10), np.zeros(3), np.zeros(3)
    for n in range(1, 6):
        output = rng.dirichlet(np.ones(10))[None]
        estimate = rng.normal(size=(1, 10))
        assert safe._reward_all(output, estimate, n) == pytest.approx(art._reward_all(output, estimate, n))


# ------------------------------------------------------------------------------------------------------ model zoo
@pytest.mark.torch
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_zoo_models_end_in_a_logits_linear(shape):
    import torch

    from art_queen.evaluation.zoo import build_model

    model = build_model(shape, 7, seed=0)
    assert isinstance(model, torch.nn.Sequential) and isinstance(model[-1], torch.nn.Linear)
    assert model(torch.zeros((2, *shape))).shape == (2, 7)
    same = build_model(shape, 7, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))


def test_zoo_rejects_unknown_shapes():
    from art_queen.evaluation.zoo import architecture_name, build_model

    with pytest.raises(ValueError, match="no architecture"):
        architecture_name((2, 8, 8))
    with pytest.raises(ValueError, match="nb_classes"):
        build_model((1, 8, 8), 1)


@pytest.mark.torch
def test_victim_cache_avoids_retraining(digits, tmp_path):
    from art_queen.evaluation import zoo

    x, y = digits["x_train"][:200], digits["y_train"][:200]
    runs = zoo.TRAINING_RUNS["count"]
    first = zoo.load_or_train_victim("digits", x, y, 10, epochs=2, seed=3, cache_dir=str(tmp_path))
    assert not first.from_cache and os.path.isfile(first.path)
    assert zoo.TRAINING_RUNS["count"] == runs + 1
    stamp = os.stat(first.path).st_mtime_ns

    second = zoo.load_or_train_victim("digits", x, y, 10, epochs=2, seed=3, cache_dir=str(tmp_path))
    assert second.from_cache and second.path == first.path
    assert zoo.TRAINING_RUNS["count"] == runs + 1
    assert os.stat(first.path).st_mtime_ns == stamp
    probe = digits["x_test"][:20]
    np.testing.assert_array_equal(zoo.predict_logits(first.model, probe), zoo.predict_logits(second.model, probe))

    # Another setting is another entry; a corrupt entry is retrained, not trusted.
    other = zoo.load_or_train_victim("digits", x, y, 10, epochs=3, seed=3, cache_dir=str(tmp_path))
    assert not other.from_cache and other.path != first.path
    with open(first.path, "wb") as handle:
        handle.write(b"not a checkpoint")
    again = zoo.load_or_train_victim("digits", x, y, 10, epochs=2, seed=3, cache_dir=str(tmp_path))
    assert not again.from_cache
    assert zoo.TRAINING_RUNS["count"] == runs + 3


# ----------------------------------------------------------------------------------------------------------- grid
def _tiny_config(tmp_path, **overrides):
    from art_queen.evaluation.grid import BenchmarkConfig

    settings = {
        "defences": ("Queen",),
        "defence_settings": {"Queen": ({"scope": "global", "n_shadows": 2, "k": 1, "mapping_epochs": 3},)},
        "attacks": ("CopycatCNN/soft",),
        "budgets": (40,),
        "seeds": (0,),
        "victim_epochs": 3,
        "clone_epochs": 2,
        "clone_min_steps": 1,
        "cache_dir": str(tmp_path / "cache"),
        "jobs": 1,
        "verbose": False,
    }
    settings.update(overrides)
    return BenchmarkConfig(**settings)


@pytest.mark.torch
def test_tiny_grid_end_to_end_writes_json_csv_and_pngs(tmp_path):
    from art_queen.evaluation.grid import run_benchmark
    from art_queen.evaluation.report import format_report, write_outputs

    result = run_benchmark(_tiny_config(tmp_path))
    assert [c["defence"] for c in result.cells] == ["NoDefence", "Queen"]
    assert result.cells[1]["setting"] == "scope=global, n_shadows=2, k=1, mapping_epochs=3"
    undefended, queen = result.cells
    for cell in result.cells:
        assert cell["error"] is None and cell["queries"] == 40
        for name in ("benign_accuracy", "clone_accuracy", "fidelity", "victim_accuracy"):
            assert 0.0 <= cell[name] <= 1.0
        assert "_clone_labels" not in cell
    assert undefended["l1_distortion"] < 1e-5 and undefended["ks_statistic"] is None
    assert undefended["benign_accuracy"] == undefended["victim_accuracy"]
    assert queen["l1_distortion"] > 0.0 and 0.0 <= queen["ks_statistic"] <= 1.0
    assert 0.0 < queen["recorded_share"] <= 1.0 and 0.0 <= queen["reversed_share"] <= 1.0
    assert result.sensitivity_map is not None and len(result.sensitivity_map["query_points"]) == 40

    paths = write_outputs(result, str(tmp_path / "out"))
    expected = {"results.json", "results.csv", "cells.csv", "summary.csv", "tradeoff.png", "queen_sensitivity_map.png"}
    assert expected <= set(paths)
    for path in paths.values():
        assert os.path.getsize(path) > 0
    with open(paths["results.json"], encoding="utf-8") as handle:
        data = json.load(handle)
    assert len(data["cells"]) == 2 and data["summary"][1]["defence"] == "Queen"
    assert "not a distance between models" in data["ks_caveat"]
    with open(paths["cells.csv"], encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
    assert {"seed", "clone_epochs", "error", "ks_statistic", "recorded_share"} <= set(header)
    with open(paths["results.csv"], encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0].startswith("defence,setting,attack,sampling,labels,budget") and len(lines) == 3
    with open(paths["tradeoff.png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    text = format_report(result)
    assert "Queen" in text and "CopycatCNN" in text and "Caveat: KS" in text


@pytest.mark.torch
def test_runs_are_picklable_pure_functions_of_their_specification(tmp_path):
    from art_queen.evaluation.grid import plan_runs, prepare_victims, run_defence

    config = _tiny_config(tmp_path, defences=("GaussianNoise",), attacks=("KnockoffNets/random/hard",)).resolved()
    prepare_victims(config)
    runs = plan_runs(config)
    assert {run.defence for run in runs} == {"NoDefence", "GaussianNoise"}
    run = next(r for r in runs if r.defence == "GaussianNoise")
    first = run_defence(pickle.loads(pickle.dumps(run)))
    second = run_defence(run)
    stable = ("benign_accuracy", "clone_accuracy", "fidelity", "l1_distortion")
    assert [[c[k] for k in stable] for c in first] == [[c[k] for k in stable] for c in second]
    assert first[0]["l1_distortion"] > 0.0


@pytest.mark.torch
def test_a_failing_cell_is_reported_without_losing_the_grid(tmp_path, monkeypatch):
    from art_queen.evaluation.grid import run_benchmark
    from art_queen.evaluation.report import format_report

    broken = AttackSpec(name="Broken", target="art_queen.evaluation.registry:does_not_exist", sampling="-", labels="-")
    monkeypatch.setitem(ATTACKS, "Broken/x", broken)
    config = _tiny_config(tmp_path, defences=("Rounded",), attacks=("Broken/x", "CopycatCNN/hard"))
    result = run_benchmark(config)
    failed = [c for c in result.cells if c["error"]]
    assert len(failed) == 2 and all("does_not_exist" in c["error"] for c in failed)
    assert all(c["clone_accuracy"] is not None for c in result.cells if c["attack"] == "CopycatCNN")
    assert "FAILED cells (2" in format_report(result)


@pytest.mark.torch
def test_query_recorder_records_and_restores_predict(digits, tmp_path):
    import torch

    from art_queen.evaluation.grid import QueryRecorder
    from art_queen.evaluation.zoo import make_classifier

    classifier = make_classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8), 10)
    x = digits["x_test"][:5]
    with QueryRecorder(classifier, None, "attacker") as recorder:
        classifier.predict(x[:2])
        classifier.predict(x[2:])
    inputs, answers, cases = recorder.recorded()
    np.testing.assert_array_equal(inputs, x)
    assert answers.shape == (5, 10) and cases is None
    np.testing.assert_allclose(answers.sum(axis=1), 1.0, rtol=1e-5)
    assert "predict" not in vars(classifier)


@pytest.mark.torch
def test_query_recorder_passes_the_client_id_to_bound_defences_and_keeps_it_visible(digits):
    import inspect

    import torch

    from art_queen.evaluation.grid import QueryRecorder
    from art_queen.evaluation.zoo import make_classifier
    from art_queen.input_channel import InputAwarePostprocessor

    class SeesClient(InputAwarePostprocessor):
        def __init__(self):
            super().__init__(is_fitted=True)
            self.clients = []

        def defend(self, x, preds, client_id=None, **kwargs):
            self.clients.append(client_id)
            return preds

    defence = SeesClient()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    classifier = defence.bind(make_classifier(model, (1, 8, 8), 10, [defence]))
    bound = classifier.predict
    with QueryRecorder(classifier, defence, "attacker"):
        classifier.predict(digits["x_test"][:3])
        classifier.predict(digits["x_test"][:3], client_id="sybil-1")
        assert "client_id" in inspect.signature(classifier.predict.__wrapped__, follow_wrapped=False).parameters
    assert defence.clients == ["attacker", "sybil-1"]
    assert classifier.predict is bound


def test_small_budgets_get_enough_clone_training_steps():
    from art_queen.evaluation.grid import BenchmarkConfig, clone_epochs_for

    config = BenchmarkConfig(clone_epochs=20, clone_min_steps=240, batch_size_fit=32).resolved()
    assert clone_epochs_for(config, 100) == 60  # 4 batches per epoch
    assert clone_epochs_for(config, 500) == 20  # 16 batches per epoch: 320 steps already
    assert clone_epochs_for(config, 1) == 240


def test_config_validation_messages(tmp_path):
    from art_queen.evaluation.grid import BenchmarkConfig

    for overrides, message in [
        ({"budgets": (0,)}, "budgets"),
        ({"seeds": (-1,)}, "seeds"),
        ({"dataset": "imagenet"}, "Unknown dataset"),
        ({"train_fraction": 0.7, "pool_fraction": 0.4}, "below 1"),
        ({"jobs": 0}, "jobs"),
        ({"clone_min_steps": 0}, "clone_min_steps"),
        ({"defences": ("Nope",)}, "Unknown defence"),
    ]:
        with pytest.raises(ValueError, match=message):
            BenchmarkConfig(**overrides).resolved()
    resolved = BenchmarkConfig(defences=("Queen",)).resolved()
    assert resolved.defences == ("NoDefence", "Queen") and resolved.budgets == (500,)


# ---------------------------------------------------------------------------------------------------------- plots
def test_sensitivity_map_and_tradeoff_plots(tmp_path):
    from art_queen.evaluation.plots import plot_sensitivity_map, plot_tradeoff

    data = {
        "class_centres": [[0.0, 0.0], [3.0, 0.0]],
        "sensitive_radii": [1.0, 1.2],
        "query_points": [[0.1, 0.2], [3.1, 0.1], [5.0, 5.0]],
        "query_classes": [0, 1, 1],
        "recorded_points": [[0.1, 0.2]],
        "recorded_classes": [0],
        "reversed_points": [[3.1, 0.1]],
        "attack": "CopycatCNN",
    }
    path = plot_sensitivity_map(data, str(tmp_path / "map.png"))
    assert os.path.getsize(path) > 1000
    with pytest.raises(ValueError, match="2-D embedding"):
        plot_sensitivity_map({**data, "class_centres": [[0.0, 0.0, 0.0]]}, str(tmp_path / "bad.png"))
    summaries = [
        {"defence": "A", "setting": "-", "benign_accuracy_mean": 0.9, "worst_clone_accuracy_mean": 0.8},
        {"defence": "B", "setting": "x=1", "benign_accuracy_mean": 0.9, "worst_clone_accuracy_mean": 0.8},
    ]
    assert os.path.getsize(plot_tradeoff(summaries, str(tmp_path / "t.png"))) > 1000
    with pytest.raises(ValueError, match="No defence"):
        plot_tradeoff([{"defence": "A", "benign_accuracy_mean": None}], str(tmp_path / "none.png"))


@pytest.mark.torch
def test_every_registered_attack_accepts_what_the_grid_offers(digits_model):
    """The grid offers nb_stolen, nb_epochs, batch sizes, seed and verbose; each attack must construct with them."""
    import copy

    from conftest import make_classifier

    from art_queen.evaluation.registry import ATTACKS, accepted_arguments, import_target

    victim = make_classifier(copy.deepcopy(digits_model))
    offered = {
        "nb_stolen": 20,
        "nb_epochs": 1,
        "batch_size_fit": 16,
        "batch_size_query": 16,
        "seed": 3,
        "verbose": False,
    }
    for key, spec in ATTACKS.items():
        attack_cls = import_target(spec.target)
        attack = attack_cls(victim, **{**accepted_arguments(attack_cls, offered), **spec.params})
        assert attack.nb_stolen == 20, key
