"""
This module implements the recovery attack `Recovery` against QUEEN (the idea of D-DAE: learn to undo a defence).

Kerckhoffs's principle: QUEEN's algorithm and public defaults are known, only its fitted state is secret. The attacker
runs QUEEN itself (the public implementation, :class:`art_queen.Queen`) on a proxy model of its own, which yields
pairs of defended and clean answers on the attacker's own data, learns a map from defended answers back to clean
ones, and applies it to the victim's answers before training the thieved classifier.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from art_queen.attacks._common import (
    AdaptiveExtractionAttack,
    check_fraction,
    check_positive_int,
    make_proxy_classifier,
    predict_probabilities,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from art.utils import CLASSIFIER_TYPE

logger = logging.getLogger(__name__)


class Recovery(AdaptiveExtractionAttack):
    """
    Extraction attack that maps the victim's defended answers back to clean ones with a network trained on an
    emulation of the defence.

    1. Ask ``nb_stolen`` samples of the source data.
    2. Train a proxy model (the thieved classifier's architecture, fresh) on the top-1 labels of the first
       ``seed_fraction`` of the answers, the ones asked before the defence had seen much.
    3. Emulate the defence: a :class:`art_queen.Queen` with the public defaults (or ``emulator_params``) is attached
       to the proxy, fitted on the attacker's queries labelled with the top-1 of the victim's answers, and answers
       ``emulation_rounds`` replays of the query stream (the first in the real order, the others shuffled), its state
       reset before each; every emulated answer is paired with the proxy's clean answer.
    4. Train a small MLP (``map_hidden`` units, ``map_epochs`` epochs) from defended to clean answers, on the answer,
       its log and its zero pattern; it predicts a correction of the log-answer.
    5. Map the victim's answers; with ``trust_top1``, an answer without zero entries keeps its top-1 class (the map
       only redistributes its other probabilities), since in QUEEN's algorithm only reversed answers, which have
       zeros, change the top-1. Train the thieved classifier on the mapped answers.

    If the emulator cannot be fitted (a class that fewer than two answers name), the raw answers are used and a
    warning says so.

    | Paper link: https://arxiv.org/abs/2407.01251
    """

    attack_params = AdaptiveExtractionAttack.attack_params + [
        "seed_fraction",
        "proxy_epochs",
        "emulator_params",
        "emulation_rounds",
        "map_hidden",
        "map_epochs",
        "trust_top1",
    ]

    def __init__(
        self,
        classifier: CLASSIFIER_TYPE,
        batch_size_fit: int = 64,
        batch_size_query: int = 256,
        nb_epochs: int = 30,
        nb_stolen: int = 1000,
        use_probability: bool = True,
        seed_fraction: float = 0.3,
        proxy_epochs: int = 30,
        emulator_params: dict[str, Any] | None = None,
        emulation_rounds: int = 1,
        map_hidden: int = 128,
        map_epochs: int = 60,
        trust_top1: bool = True,
        seed: int | None = 0,
        verbose: bool = False,
    ) -> None:
        """
        Create a Recovery attack.

        :param classifier: The victim classifier.
        :param batch_size_fit: Batch size for training the thieved classifier.
        :param batch_size_query: Rows per ``predict`` call to the victim.
        :param nb_epochs: Training epochs of the thieved classifier.
        :param nb_stolen: Query budget (rows sent to ``predict``).
        :param use_probability: Train on the recovered probability vectors; `False` trains on their top-1 labels.
        :param seed_fraction: Share of the answers (the first ones) whose top-1 labels train the proxy, in (0, 1].
        :param proxy_epochs: Training epochs of the proxy.
        :param emulator_params: Keyword arguments of the emulated :class:`art_queen.Queen` other than ``nb_classes``
                                and ``seed`` (`None`: QUEEN's public defaults).
        :param emulation_rounds: Number of emulated replays of the query stream.
        :param map_hidden: Hidden width of the recovery MLP.
        :param map_epochs: Training epochs of the recovery MLP.
        :param trust_top1: Keep the top-1 class of every answer without zero entries: in QUEEN's public algorithm only
                           reversed answers (which have zeros) change the top-1, feature perturbation never does.
        :param seed: Seed of the query selection, the proxy, the emulator, the MLP and the training order.
        :param verbose: Show progress bars.
        """
        super().__init__(
            classifier,
            batch_size_fit=batch_size_fit,
            batch_size_query=batch_size_query,
            nb_epochs=nb_epochs,
            nb_stolen=nb_stolen,
            use_probability=use_probability,
            seed=seed,
            verbose=verbose,
        )
        self.seed_fraction = seed_fraction
        self.proxy_epochs = proxy_epochs
        self.emulator_params = emulator_params
        self.emulation_rounds = emulation_rounds
        self.map_hidden = map_hidden
        self.map_epochs = map_epochs
        self.trust_top1 = trust_top1
        self.queries_: np.ndarray | None = None
        self.raw_answers_: np.ndarray | None = None
        self.recovered_answers_: np.ndarray | None = None
        self.emulator_: Any = None
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_fraction("seed_fraction", self.seed_fraction, 0.0, 1.0, closed_high=True)
        if self.seed_fraction == 0:
            raise ValueError("The parameter `seed_fraction` must be positive: the proxy learns from those answers.")
        check_positive_int("proxy_epochs", self.proxy_epochs)
        if self.emulator_params is not None:
            if not isinstance(self.emulator_params, dict):
                raise ValueError(
                    f"The parameter `emulator_params` must be a dict of Queen arguments or None, got "
                    f"{type(self.emulator_params).__name__}."
                )
            reserved = {"nb_classes", "seed"} & set(self.emulator_params)
            if reserved:
                raise ValueError(
                    f"The parameter `emulator_params` must not set {sorted(reserved)}: the attack sets them."
                )
        check_positive_int("emulation_rounds", self.emulation_rounds)
        check_positive_int("map_hidden", self.map_hidden)
        check_positive_int("map_epochs", self.map_epochs)
        if not isinstance(self.trust_top1, bool):
            raise ValueError(f"The parameter `trust_top1` must be a boolean, got {self.trust_top1!r}.")

    def extract(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> CLASSIFIER_TYPE:
        """
        Ask the victim, emulate QUEEN on a proxy, learn the recovery map, map the answers and train the thief.

        After the call: ``queries_used_``, ``queries_`` (the queries), ``raw_answers_`` (the victim's answers),
        ``recovered_answers_`` (after the map) and ``emulator_`` (the emulated QUEEN, or `None` if it failed).

        :param x: Source samples of the attacker.
        :param y: Not used.
        :param thieved_classifier: A fresh, undefended ART ``PyTorchClassifier`` to train.
        :return: The trained thieved classifier.
        """
        if y is not None:
            logger.warning("This attack does not use the provided labels y.")
        x, thieved_classifier = self._start(x, kwargs)
        queries = x[self._draw(x, self.nb_stolen)]
        answers = self._query(queries)
        recovered = self.recover(thieved_classifier, queries, answers)
        self.queries_, self.raw_answers_, self.recovered_answers_ = queries, answers, recovered
        return self._train(thieved_classifier, queries, recovered)

    def recover(self, thieved_classifier: CLASSIFIER_TYPE, queries: np.ndarray, answers: np.ndarray) -> np.ndarray:
        """
        Learn the recovery map on an emulation of QUEEN and apply it to ``answers``.

        :param thieved_classifier: The thieved classifier (its architecture and preprocessing make the proxy).
        :param queries: The queries, in the order they were asked.
        :param answers: The victim's answers, probability rows.
        :return: Recovered probability rows (the raw answers if the emulation could not be set up).
        """
        nb_classes = answers.shape[1]
        proxy = make_proxy_classifier(thieved_classifier, seed=self._training_seed())
        n_seed = max(1, int(round(self.seed_fraction * len(queries))))
        seed_labels = np.eye(nb_classes, dtype=np.float32)[np.argmax(answers[:n_seed], axis=1)]
        self._train_proxy(proxy, queries[:n_seed], seed_labels)

        clean = predict_probabilities(proxy.model, _model_inputs(proxy, queries))
        emulator = self._fit_emulator(proxy, queries, np.argmax(answers, axis=1))
        self.emulator_ = emulator
        if emulator is None:
            return answers

        defended_parts, clean_parts = [], []
        rounds = tqdm(range(self.emulation_rounds), desc="Emulating QUEEN", disable=not self.verbose, leave=False)
        for round_index in rounds:
            order = np.arange(len(queries)) if round_index == 0 else self._rng.permutation(len(queries))
            emulator.reset()
            for start in range(0, len(order), self.batch_size_query):
                rows = order[start : start + self.batch_size_query]
                defended_parts.append(emulator.defend(queries[rows], clean[rows]))
                clean_parts.append(clean[rows])
        defended = np.concatenate(defended_parts)
        targets = np.concatenate(clean_parts)
        logger.info(
            "Recovery: %d emulated pairs, %.1f%% reversed by the emulator in its last round.",
            len(defended),
            100.0 * emulator.stats["reversed"] / max(1, emulator.stats["queries"]),
        )
        network = self._train_map(defended, targets)
        recovered = _apply_map(network, answers)
        if self.trust_top1:
            recovered = keep_top1(recovered, answers)
        return recovered

    def _train_proxy(self, proxy: Any, x: np.ndarray, targets: np.ndarray) -> None:
        from art_queen.attacks._common import train_thieved_classifier

        train_thieved_classifier(
            proxy,
            x,
            targets,
            nb_epochs=self.proxy_epochs,
            batch_size=self.batch_size_fit,
            seed=self._training_seed(),
            verbose=self.verbose,
            description="Training proxy",
        )

    def _fit_emulator(self, proxy: Any, x: np.ndarray, labels: np.ndarray) -> Any:
        from art_queen.queen import Queen

        params = dict(self.emulator_params or {})
        params.setdefault("verbose", False)
        emulator = Queen(nb_classes=int(proxy.nb_classes), seed=0 if self.seed is None else int(self.seed), **params)
        emulator.attach(proxy)
        try:
            emulator.fit(x, labels)
        except ValueError as error:
            logger.warning("The QUEEN emulator could not be fitted (%s); the raw answers are used.", error)
            return None
        return emulator

    def _train_map(self, defended: np.ndarray, clean: np.ndarray) -> torch.nn.Module:
        import torch

        nb_classes = defended.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._training_seed())
            network = torch.nn.Sequential(
                torch.nn.Linear(3 * nb_classes, self.map_hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(self.map_hidden, self.map_hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(self.map_hidden, nb_classes),
            )
            last = network[-1]
            assert isinstance(last, torch.nn.Linear)
            torch.nn.init.zeros_(last.weight)  # start from the identity map (a residual on the log-answer)
            torch.nn.init.zeros_(last.bias)
        inputs = torch.from_numpy(_map_features(defended))
        targets = torch.from_numpy(clean.astype(np.float32))
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(self._training_seed())
        network.train()
        epochs = tqdm(range(self.map_epochs), desc="Training recovery map", disable=not self.verbose, leave=False)
        for _ in epochs:
            order = torch.randperm(inputs.shape[0], generator=generator)
            for start in range(0, inputs.shape[0], 128):
                batch = order[start : start + 128]
                logits = _residual_logits(network, inputs[batch])
                loss = -(targets[batch] * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        network.eval()
        return network


def _model_inputs(classifier: Any, x: np.ndarray) -> np.ndarray:
    x, _ = classifier._apply_preprocessing(x, y=None, fit=False)
    return np.asarray(x, dtype=np.float32)


def _map_features(answers: np.ndarray) -> np.ndarray:
    """Input of the recovery map: the answer, its clamped log (scaled) and its zero pattern."""
    answers = np.asarray(answers, dtype=np.float32)
    logs = np.log(np.clip(answers, 1e-8, 1.0)) / 10.0
    zeros = (answers <= 0).astype(np.float32)
    return np.concatenate([answers, logs, zeros], axis=1).astype(np.float32)


def keep_top1(recovered: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """
    For every answer without zero entries whose recovered top-1 differs from its own, swap the recovered
    probabilities of the two classes, so that the recovered row keeps the answer's top-1 class.

    :param recovered: Recovered probability rows, shape `(n, C)`.
    :param answers: The answers they were recovered from, shape `(n, C)`.
    :return: Adjusted copy of ``recovered``.
    """
    recovered = np.array(recovered, dtype=np.float32, copy=True)
    own, mapped = np.argmax(answers, axis=1), np.argmax(recovered, axis=1)
    rows = np.flatnonzero(~np.any(answers <= 0, axis=1) & (own != mapped))
    own_values = recovered[rows, own[rows]].copy()
    recovered[rows, own[rows]] = recovered[rows, mapped[rows]]
    recovered[rows, mapped[rows]] = own_values
    return recovered


def _residual_logits(network: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Recovered logits: the log-answer (the second block of the features, unscaled) plus the network's correction."""
    nb_classes = features.shape[1] // 3
    return 10.0 * features[:, nb_classes : 2 * nb_classes] + network(features)


def _apply_map(network: torch.nn.Module, answers: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = _residual_logits(network, torch.from_numpy(_map_features(answers)))
        return torch.softmax(logits, dim=1).numpy().astype(np.float32)
