"""
Quickstart: protect a digits classifier with QUEEN, steal it with ART's CopycatCNN, and compare with the undefended
victim. Runs offline on a CPU in well under a minute.

    python examples/quickstart.py
"""

from __future__ import annotations

import numpy as np
import torch
from art.attacks.extraction import CopycatCNN
from art.estimators.classification import PyTorchClassifier

from art_queen import Queen
from art_queen.evaluation.datasets import load_dataset, split_dataset
from art_queen.evaluation.zoo import SoftmaxOutput, build_model, train_model

SEED = 0
BUDGET = 500  # queries the attacker may send
torch.manual_seed(SEED)
torch.set_num_threads(1)


def classifier(model: torch.nn.Module, defences: list) -> PyTorchClassifier:
    """An ART classifier answering with probabilities (softmax first), then the given defences."""
    return PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        postprocessing_defences=[SoftmaxOutput(), *defences],
    )


def steal(victim: PyTorchClassifier, x_pool: np.ndarray) -> PyTorchClassifier:
    """CopycatCNN with soft labels; the clone is a fresh, undefended classifier of the same architecture."""
    np.random.seed(SEED)
    model = build_model((1, 8, 8), 10, seed=SEED + 1)
    clone = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    attack = CopycatCNN(
        victim, batch_size_fit=32, batch_size_query=128, nb_epochs=30, nb_stolen=BUDGET, use_probability=True
    )
    return attack.extract(x_pool, thieved_classifier=clone)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(predictions, axis=1) == labels))


def main() -> None:
    # Victim training data, a disjoint query pool for the attacker, and a test set.
    (x_train, y_train), (x_pool, _), (x_test, y_test) = split_dataset(load_dataset("digits"), 0.5, 0.3, seed=SEED)
    model = train_model(build_model((1, 8, 8), 10, seed=SEED), x_train, y_train, epochs=30, seed=SEED)

    # The undefended victim and its clone.
    undefended = classifier(model, [])
    clone_undefended = steal(undefended, x_pool)

    # The same model behind QUEEN: bind it so that predict hands QUEEN the queries, then fit it on the training data.
    queen = Queen(nb_classes=10, seed=SEED)
    defended = classifier(model, [queen])
    queen.bind(defended)
    queen.fit(x_train, y_train)
    clone_defended = steal(defended, x_pool)
    attack_stats = dict(queen.stats)
    defended_accuracy = accuracy(defended.predict(x_test), y_test)  # after the attack, QUEEN's state not reset

    print(f"victim accuracy (undefended):          {accuracy(undefended.predict(x_test), y_test):.3f}")
    print(f"victim accuracy behind QUEEN:          {defended_accuracy:.3f}  (after the attack, test set as one client)")
    print(f"clone accuracy, undefended victim:     {accuracy(clone_undefended.predict(x_test), y_test):.3f}")
    print(f"clone accuracy, victim behind QUEEN:   {accuracy(clone_defended.predict(x_test), y_test):.3f}")
    print(
        f"QUEEN after the {BUDGET} attack queries: "
        + ", ".join(f"{k}={v}" for k, v in attack_stats.items() if k != "cqs")
    )
    print(f"estimated records per class before reversal: {queen.queries_before_reversal().round(1).tolist()}")


if __name__ == "__main__":
    main()
