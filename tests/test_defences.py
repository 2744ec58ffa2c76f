"""Torch-free peer defences: TopLabel (correct one-hot top-1) and SoftmaxFlattening (the QUEEN paper's "DP")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.special import entr

from art_queen.defences import SoftmaxFlattening, TopLabel


def _entropy(rows: np.ndarray) -> np.ndarray:
    return entr(rows.astype(np.float64)).sum(axis=1)


def _probability_rows(nb_rows: int, nb_classes: int, seed: int) -> np.ndarray:
    """Probability rows from peaked to flat, including sparse rows with zeros."""
    rng = np.random.default_rng(seed)
    blocks = [rng.dirichlet(np.full(nb_classes, concentration), nb_rows) for concentration in (0.05, 0.3, 1.0, 5.0)]
    sparse = np.zeros((nb_rows, nb_classes))
    sparse[:, :2] = rng.dirichlet([0.5, 0.5], nb_rows)
    blocks.append(sparse)
    return np.concatenate(blocks).astype(np.float32)


BAD_PREDICTIONS = [
    pytest.param(np.array([[0.2, np.nan], [0.5, 0.5]], dtype=np.float32), "NaN", id="nan"),
    pytest.param(np.array([[0.2, np.inf], [0.5, 0.5]], dtype=np.float32), "infinite", id="inf"),
    pytest.param(np.zeros((0, 3), dtype=np.float32), "empty", id="empty"),
    pytest.param(np.array([0.2, 0.8], dtype=np.float32), "2-D", id="one-dimensional"),
    pytest.param(np.ones((3, 1), dtype=np.float32), "two columns", id="one-column"),
    pytest.param(np.array([[0, 1], [1, 0]], dtype=np.int64), "floating-point", id="integer-dtype"),
]


# ------------------------------------------------------------------------------------------------------ TopLabel
def test_top_label_answers_each_row_with_its_own_winner():
    preds = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]], dtype=np.float32)
    answers = TopLabel()(preds)
    assert answers.dtype == np.float32
    assert answers.shape == preds.shape
    np.testing.assert_array_equal(answers.sum(axis=1), 1.0)
    np.testing.assert_array_equal(answers.max(axis=1), 1.0)
    np.testing.assert_array_equal(np.argmax(answers, axis=1), np.argmax(preds, axis=1))


def test_top_label_accepts_logits_and_breaks_ties_towards_the_lowest_index():
    logits = np.array([[-3.0, 5.0, 1.0], [2.0, 2.0, -1.0]], dtype=np.float32)
    answers = TopLabel()(logits)
    np.testing.assert_array_equal(answers, np.array([[0, 1, 0], [1, 0, 0]], dtype=np.float32))


def test_art_class_labels_is_wrong_for_multi_row_batches_and_top_label_is_not():
    """Documents why we ship TopLabel: ART's ClassLabels marks every row's winner in every row."""
    from art.defences.postprocessor import ClassLabels

    preds = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7]], dtype=np.float32)
    ours = TopLabel()(preds)
    np.testing.assert_array_equal(ours, np.eye(3, dtype=np.float32))
    theirs = ClassLabels()(preds)
    if np.array_equal(theirs, ours):
        pytest.skip("This ART version's ClassLabels is correct for multi-row batches; TopLabel is now a drop-in twin.")
    assert not np.array_equal(theirs, ours)
    assert np.all(theirs.sum(axis=1) > 1), "ART's bug: each row gets a one at every row's winning class"


@pytest.mark.parametrize("preds, message", BAD_PREDICTIONS)
def test_top_label_rejects_bad_predictions(preds, message):
    with pytest.raises(ValueError, match=message):
        TopLabel()(preds)


def test_top_label_does_not_apply_at_fit_time_by_default():
    defence = TopLabel()
    assert defence.apply_predict and not defence.apply_fit and defence.is_fitted


# --------------------------------------------------------------------------------------------- SoftmaxFlattening
def test_softmax_flattening_implements_the_formula():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]], dtype=np.float32)
    epsilon = 3.0
    expected = np.exp(epsilon / 2 * probabilities.astype(np.float64))
    expected /= expected.sum(axis=1, keepdims=True)
    answers = SoftmaxFlattening(epsilon=epsilon)(probabilities)
    assert answers.dtype == np.float32
    np.testing.assert_allclose(answers, expected, rtol=1e-6)


@pytest.mark.parametrize("nb_classes", [2, 3, 10])
@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0, 4.0])
def test_softmax_flattening_keeps_top1_gives_probabilities_and_never_sharpens_up_to_epsilon_4(nb_classes, epsilon):
    preds = _probability_rows(2000, nb_classes, seed=nb_classes)
    answers = SoftmaxFlattening(epsilon=epsilon)(preds)
    assert answers.dtype == np.float32
    assert np.all(answers >= 0)
    np.testing.assert_allclose(answers.sum(axis=1), 1.0, atol=1e-6)
    # Top-1 kept wherever the input's top-1 is unique (ties stay ties).
    sorted_preds = np.sort(preds, axis=1)
    unique_top = sorted_preds[:, -1] - sorted_preds[:, -2] > 1e-6
    np.testing.assert_array_equal(np.argmax(answers, axis=1)[unique_top], np.argmax(preds, axis=1)[unique_top])
    assert np.all(_entropy(answers) >= _entropy(preds) - 1e-5)


def test_softmax_flattening_with_large_epsilon_can_sharpen():
    """The documented limit: beyond epsilon = 4 the map is no longer a flattening near ties."""
    preds = np.array([[0.55, 0.45]], dtype=np.float32)
    answers = SoftmaxFlattening(epsilon=40.0)(preds)
    assert _entropy(answers)[0] < _entropy(preds)[0]
    assert np.argmax(answers) == 0


def test_softmax_flattening_treats_logits_as_their_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (50, 10)).astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    defence = SoftmaxFlattening(epsilon=2.0)
    np.testing.assert_allclose(defence(logits), defence(probabilities), atol=1e-6)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, np.nan, np.inf, "1", None, True])
def test_softmax_flattening_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        SoftmaxFlattening(epsilon=epsilon)


def test_softmax_flattening_set_params_validates_and_keeps_the_old_value_usable():
    defence = SoftmaxFlattening(epsilon=2.0)
    defence.set_params(epsilon=1.0)
    assert defence.epsilon == 1.0
    with pytest.raises(ValueError, match="epsilon"):
        defence.set_params(epsilon=-2.0)


@pytest.mark.parametrize("preds, message", BAD_PREDICTIONS)
def test_softmax_flattening_rejects_bad_predictions(preds, message):
    with pytest.raises(ValueError, match=message):
        SoftmaxFlattening()(preds)


@pytest.mark.torch
def test_torch_free_defences_inside_an_art_classifier(digits):
    import torch
    from conftest import make_classifier

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = digits["x_test"][:20]
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    hard = make_classifier(model, postprocessing_defences=[TopLabel()]).predict(x)
    np.testing.assert_array_equal(hard, np.eye(10, dtype=np.float32)[np.argmax(logits, axis=1)])
    flat = make_classifier(model, postprocessing_defences=[SoftmaxFlattening(epsilon=1.0)]).predict(x)
    np.testing.assert_array_equal(np.argmax(flat, axis=1), np.argmax(logits, axis=1))
    assert flat.max() <= np.exp(0.5) / (np.exp(0.5) + 9) + 1e-6  # the largest answer an epsilon of 1 allows


def test_defences_package_imports_and_works_without_torch():
    script = textwrap.dedent("""
        import importlib.util, sys

        class BlockTorch:
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "torch":
                    raise ModuleNotFoundError("No module named 'torch'")

        sys.meta_path.insert(0, BlockTorch())
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, package=None: (
            None if name.split(".")[0] == "torch" else real_find_spec(name, package)
        )
        import tempfile
        import warnings

        warnings.simplefilter("ignore")
        import art.config

        art.config.set_data_path(tempfile.mkdtemp())
        import numpy as np
        import art_queen.defences as defences

        preds = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
        assert defences.TopLabel()(preds).tolist() == [[0.0, 1.0], [1.0, 0.0]]
        assert defences.SoftmaxFlattening(epsilon=2.0)(preds).argmax(axis=1).tolist() == [1, 0]
        defences.PredictionPoisoning(epsilon=0.5)
        defences.AdaptiveMisinformation(tau=0.5)
        assert "torch" not in sys.modules
        print("ok")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
