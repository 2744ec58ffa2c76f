"""
The evaluation grid: defences × attacks × query budgets × seeds, run in parallel through joblib.

The unit of parallel work is a :class:`DefenceRun`: one seed and one defence setting, with the (attack, budget)
cells to run against it. A run is a pure function of its specification: it loads the data split and the (cached)
victim for its seed, builds and fits the defence once, and before each cell resets the defence's state and reseeds
every random generator from ``(seed, attack, budget)``. Cells of different defences with the same (attack, budget,
seed) therefore use the same clone initialisation and, as far as the defence lets them, the same queries, which
makes the comparisons paired. Because runs are plain picklable specifications, ``joblib.parallel_backend("dask")``
(or ray's backend) hands them to a cluster without code changes.

The protocol of one cell (DESIGN.md §6):

1. reset the defence; the attacker (client id ``"attacker"``) runs ``extract`` against the served, defended
   classifier; every ``predict`` call is recorded (inputs, answers, and QUEEN's case per row when available);
2. the clone is a fresh classifier of the victim's architecture without any defence;
3. after the attack, without resetting the defence: benign accuracy of the defended classifier on the test set (as
   client ``"benign"``: a fresh client under per-client scope), timed against the undefended ``predict``;
4. clone accuracy and fidelity on the test set; mean L1 distortion of the attacker's answers; QUEEN's counters;
5. for a stateful defence, the defence is then reset and the benign client asks again (``benign_accuracy_fresh``:
   what the defence costs an honest client when no attacker has been around).

The KS statistic pairs each cell with the undefended cell of the same (attack, budget, seed), so ``NoDefence`` is
always run.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from art_queen.evaluation import metrics
from art_queen.evaluation.registry import (
    ATTACKS,
    DEFENCES,
    NO_DEFENCE,
    accepted_arguments,
    import_target,
    select_attacks,
    select_defences,
    setting_label,
)
from art_queen.evaluation.zoo import DEFAULT_CACHE_DIR

logger = logging.getLogger(__name__)

ATTACKER_CLIENT = "attacker"
"""Client id of the attacker's queries (matters under per-client scope)."""
BENIGN_CLIENT = "benign"
"""Client id of the benign test queries: a fresh client under per-client scope."""

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"victim_epochs": 30, "clone_epochs": 15, "budgets": (500,), "quick_budget": 100},
    "mnist5k": {"victim_epochs": 15, "clone_epochs": 20, "budgets": (250, 1000), "quick_budget": 250},
    "mnist": {"victim_epochs": 5, "clone_epochs": 10, "budgets": (1000, 5000), "quick_budget": 1000},
    "fashion_mnist": {"victim_epochs": 8, "clone_epochs": 10, "budgets": (1000, 5000), "quick_budget": 1000},
    "cifar10": {"victim_epochs": 20, "clone_epochs": 15, "budgets": (1000, 5000), "quick_budget": 1000},
}
"""Per-dataset defaults of the victim's and clones' training epochs, of the query budgets, and of ``--quick``'s
budget. The digits default is one budget so that the whole default grid (every defence against every attack, three
seeds) stays under 10 minutes on 2 CPU cores."""

DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class BenchmarkConfig:
    """
    Settings of one benchmark. ``None`` fields take the per-dataset defaults of :data:`DATASET_DEFAULTS`.

    :param dataset: Dataset name (see :func:`art_queen.evaluation.datasets.load_dataset`).
    :param data_dir: Folder of the dataset files (MNIST, Fashion-MNIST, CIFAR-10).
    :param limit: Keep a class-stratified subset of this many samples.
    :param defences: Defence names (registry keys); `None` for all. ``NoDefence`` is always added.
    :param defence_settings: Parameter sets per defence name, replacing the registry's defaults.
    :param attacks: Attack keys or names; `None` for all.
    :param budgets: Query budgets.
    :param seeds: Seeds; each one gives its own split, victim, defence seed, query selection and clone.
    :param train_fraction: Share of the data used to train the victim.
    :param pool_fraction: Share of the data given to the attacker as its query pool (the rest is the test set).
    :param victim_epochs: Training epochs of the victim.
    :param clone_epochs: Training epochs of the clone (the attacks' ``nb_epochs``), at least.
    :param clone_min_steps: Fewest optimiser steps of the clone's training: small budgets get more epochs
                            (``ceil(clone_min_steps / batches per epoch)``), as an attacker would train a small
                            transfer set to convergence rather than stop after a fixed number of epochs.
    :param batch_size_fit: Clone training batch size.
    :param batch_size_query: Batch size of the attackers' queries.
    :param cache_dir: Folder of cached victims; `None` disables the cache.
    :param jobs: Parallel joblib workers (processes with the default backend); 1 runs in this process.
    :param verbose: Progress bars.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    limit: int | None = None
    defences: tuple[str, ...] | None = None
    defence_settings: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)
    attacks: tuple[str, ...] | None = None
    budgets: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    train_fraction: float = 0.5
    pool_fraction: float = 0.3
    victim_epochs: int | None = None
    clone_epochs: int | None = None
    clone_min_steps: int = 120
    batch_size_fit: int = 32
    batch_size_query: int = 128
    cache_dir: str | None = DEFAULT_CACHE_DIR
    jobs: int = 1
    verbose: bool = True

    def resolved(self) -> BenchmarkConfig:
        """
        A copy with the per-dataset defaults filled in, names resolved to registry keys and values validated.

        :return: The resolved configuration.
        :raises ValueError: On an unknown dataset, defence or attack, or a value out of range.
        """
        key = str(self.dataset).strip().lower().replace("-", "_")
        if key not in DATASET_DEFAULTS:
            raise ValueError(f"Unknown dataset {self.dataset!r}; valid names are: {', '.join(DATASET_DEFAULTS)}.")
        defaults = DATASET_DEFAULTS[key]
        defences = select_defences(list(self.defences) if self.defences is not None else None)
        if NO_DEFENCE not in defences:
            defences = [NO_DEFENCE, *defences]
        attacks = select_attacks(list(self.attacks) if self.attacks is not None else None)
        settings: dict[str, tuple[Mapping[str, Any], ...]] = {}
        for name, values in dict(self.defence_settings).items():
            resolved = select_defences([name])[0]
            values = tuple(dict(v) for v in values)
            if not values:
                raise ValueError(f"The settings of defence {resolved!r} are empty; give at least one parameter set.")
            settings[resolved] = values
        config = BenchmarkConfig(
            **{
                **asdict_shallow(self),
                "dataset": key,
                "defences": tuple(defences),
                "attacks": tuple(attacks),
                "defence_settings": settings,
                "budgets": tuple(self.budgets) if self.budgets is not None else tuple(defaults["budgets"]),
                "seeds": tuple(self.seeds),
                "victim_epochs": self.victim_epochs if self.victim_epochs is not None else defaults["victim_epochs"],
                "clone_epochs": self.clone_epochs if self.clone_epochs is not None else defaults["clone_epochs"],
            }
        )
        config._check_values()
        return config

    def _check_values(self) -> None:
        def positive_int(value: Any) -> bool:
            return bool(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0)

        if not self.budgets or not all(positive_int(b) for b in self.budgets):
            raise ValueError(f"`budgets` must be one or more positive integers, got {self.budgets!r}.")
        if not self.seeds or not all(positive_int(s) or (s == 0 and not isinstance(s, bool)) for s in self.seeds):
            raise ValueError(f"`seeds` must be one or more non-negative integers, got {self.seeds!r}.")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError("`seeds` and `budgets` must not contain duplicates.")
        for name in ("victim_epochs", "clone_epochs", "clone_min_steps", "batch_size_fit", "batch_size_query"):
            if not positive_int(getattr(self, name)):
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if not isinstance(self.jobs, (int, np.integer)) or isinstance(self.jobs, bool) or self.jobs == 0:
            raise ValueError(
                f"`jobs` must be a non-zero integer (negative counts from the CPU count), got {self.jobs!r}."
            )
        if self.limit is not None and not positive_int(self.limit):
            raise ValueError(f"`limit` must be a positive integer or None, got {self.limit!r}.")
        for name in ("train_fraction", "pool_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must be in the open interval (0, 1), got {value!r}.")
        if self.train_fraction + self.pool_fraction >= 1.0:
            raise ValueError("`train_fraction + pool_fraction` must be below 1 so that a test set remains.")

    def settings_of(self, defence: str) -> tuple[Mapping[str, Any], ...]:
        """
        The parameter sets evaluated for ``defence``: the configured ones, else the registry's defaults.

        :param defence: Registry key.
        :return: Parameter sets.
        """
        return tuple(self.defence_settings.get(defence, DEFENCES[defence].settings))

    def to_dict(self) -> dict[str, Any]:
        """
        Plain-data view for JSON output.

        :return: Dictionary of the settings.
        """
        data = asdict_shallow(self)
        data["defence_settings"] = {k: [dict(s) for s in v] for k, v in dict(self.defence_settings).items()}
        for name in ("defences", "attacks", "budgets", "seeds"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data


def asdict_shallow(config: BenchmarkConfig) -> dict[str, Any]:
    """
    Fields of a configuration as a dictionary, values not copied.

    :param config: Configuration.
    :return: Dictionary.
    """
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


@dataclass(frozen=True)
class DefenceRun:
    """
    One unit of parallel work: a defence setting against a list of (attack key, budget) cells, for one seed.

    :param config: The resolved benchmark configuration.
    :param defence: Defence registry key.
    :param settings: Its parameter set.
    :param seed: Seed.
    :param cells: The (attack key, budget) pairs, run in this order.
    :param map_cell: The cell whose QUEEN sensitivity map is collected, if any.
    """

    config: BenchmarkConfig
    defence: str
    settings: Mapping[str, Any]
    seed: int
    cells: tuple[tuple[str, int], ...]
    map_cell: tuple[str, int] | None = None


@dataclass
class BenchmarkResult:
    """
    Everything a benchmark produced.

    :param config: The resolved configuration.
    :param cells: One record per (defence, setting, attack, budget, seed).
    :param rows: Mean ± std over seeds per (defence, setting, attack, budget).
    :param defences: One summary per (defence, setting): benign accuracy and worst-case clone accuracy.
    :param worst_by_budget: Worst-case clone accuracy over attacks per (defence, setting, budget).
    :param sensitivity_map: QUEEN's 2-D map of one cell (class discs, recorded and reversed queries), or `None`.
    :param wall_seconds: Wall time of the benchmark.
    :param victims: Per seed: victim accuracy, cache file, whether it came from the cache.
    """

    config: BenchmarkConfig
    cells: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    defences: list[dict[str, Any]]
    worst_by_budget: list[dict[str, Any]]
    sensitivity_map: dict[str, Any] | None
    wall_seconds: float
    victims: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """
        Plain-data view for JSON output.

        :return: Dictionary.
        """
        return {
            "config": self.config.to_dict(),
            "wall_seconds": self.wall_seconds,
            "victims": self.victims,
            "summary": self.defences,
            "worst_case_by_budget": self.worst_by_budget,
            "rows": self.rows,
            "cells": self.cells,
            "sensitivity_map": self.sensitivity_map,
            "ks_caveat": metrics.KS_CAVEAT,
        }


# ------------------------------------------------------------------------------------------------------- planning
def plan_runs(config: BenchmarkConfig) -> list[DefenceRun]:
    """
    Split a resolved configuration into units of parallel work, the costliest (stateful, fitted defences) first.

    :param config: Resolved configuration (:meth:`BenchmarkConfig.resolved`).
    :return: The runs.
    """
    cells = tuple((attack, int(budget)) for attack in config.attacks or () for budget in config.budgets or ())
    map_cell = _choose_map_cell(config)
    runs = []
    for defence in config.defences or ():
        for index, settings in enumerate(config.settings_of(defence)):
            for seed in config.seeds:
                is_map = (
                    map_cell is not None and defence == "Queen" and index == map_cell[0] and seed == config.seeds[0]
                )
                runs.append(
                    DefenceRun(
                        config=config,
                        defence=defence,
                        settings=dict(settings),
                        seed=int(seed),
                        cells=cells,
                        map_cell=map_cell[1] if is_map and map_cell else None,
                    )
                )
    runs.sort(key=lambda run: 0 if DEFENCES[run.defence].fit_on_training_data else 1)
    return runs


def _choose_map_cell(config: BenchmarkConfig) -> tuple[int, tuple[str, int]] | None:
    if "Queen" not in (config.defences or ()) or not config.attacks:
        return None
    settings = config.settings_of("Queen")
    index = next((i for i, s in enumerate(settings) if s.get("scope", "global") == "global"), 0)
    attack = "CopycatCNN/soft" if "CopycatCNN/soft" in config.attacks else config.attacks[0]
    return index, (attack, max(config.budgets or (0,)))


def clone_epochs_for(config: BenchmarkConfig, queries: int) -> int:
    """
    Training epochs of a clone trained on ``queries`` samples: ``clone_epochs``, or more so that the training makes
    at least ``clone_min_steps`` optimiser steps.

    :param config: Resolved configuration.
    :param queries: Size of the clone's training set.
    :return: Number of epochs.
    """
    batches = max(1, math.ceil(int(queries) / int(config.batch_size_fit)))
    return max(int(config.clone_epochs or 1), math.ceil(int(config.clone_min_steps) / batches))


def cell_seed(seed: int, attack: str, budget: int) -> int:
    """
    The seed of one cell: depends on the seed, the attack and the budget, not on the defence (paired comparisons).

    :param seed: Benchmark seed.
    :param attack: Attack key.
    :param budget: Query budget.
    :return: A seed in [0, 2**31).
    """
    return zlib.crc32(f"{int(seed)}|{attack}|{int(budget)}".encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------- data, victim
@functools.lru_cache(maxsize=2)
def _load(dataset: str, data_dir: str | None, limit: int | None) -> Any:
    from art_queen.evaluation.datasets import load_dataset

    return load_dataset(dataset, data_dir=data_dir, limit=limit)


@functools.lru_cache(maxsize=4)
def load_split(
    dataset: str, data_dir: str | None, limit: int | None, train_fraction: float, pool_fraction: float, seed: int
) -> tuple[Any, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """
    The dataset and its split for one seed (memoised per process; treat the arrays as read-only).

    :return: ``(dataset, (x_train, y_train), (x_pool, y_pool), (x_test, y_test))``.
    """
    from art_queen.evaluation.datasets import split_dataset

    data = _load(dataset, data_dir, limit)
    train, pool, test = split_dataset(data, train_fraction, pool_fraction, seed)
    return data, train, pool, test


def victim_for(config: BenchmarkConfig, seed: int, verbose: bool = False) -> tuple[Any, Any, tuple, tuple, tuple]:
    """
    The victim of one seed (from the cache when possible) and its data split.

    :param config: Resolved configuration.
    :param seed: Seed.
    :param verbose: Progress bar while training.
    :return: ``(victim, dataset, train, pool, test)`` with :class:`art_queen.evaluation.zoo.Victim`.
    """
    from art_queen.evaluation.zoo import load_or_train_victim

    data, train, pool, test = load_split(
        config.dataset, config.data_dir, config.limit, config.train_fraction, config.pool_fraction, seed
    )
    victim = load_or_train_victim(
        config.dataset,
        train[0],
        train[1],
        data.nb_classes,
        epochs=int(config.victim_epochs or 1),
        seed=seed,
        cache_dir=config.cache_dir,
        verbose=verbose,
    )
    return victim, data, train, pool, test


# ------------------------------------------------------------------------------------------------------- a defence
def build_defence(
    defence: str, settings: Mapping[str, Any], nb_classes: int, seed: int, verbose: bool = False
) -> Any | None:
    """
    Construct a defence from the registry (not yet attached to a classifier).

    :param defence: Registry key.
    :param settings: Parameter set.
    :param nb_classes: Number of classes (passed when the constructor takes it).
    :param seed: Seed (passed when the constructor takes it).
    :param verbose: Progress bars of the defence (passed when the constructor takes it).
    :return: The postprocessor, or `None` for ``NoDefence``.
    """
    spec = DEFENCES[defence]
    if spec.target is None:
        return None
    cls = import_target(spec.target)
    kwargs = accepted_arguments(cls, {"nb_classes": nb_classes, "seed": seed, "verbose": verbose})
    kwargs.update(settings)
    return cls(**kwargs)


def serve(
    model: Any,
    input_shape: tuple,
    nb_classes: int,
    defence: Any | None,
    x_train: np.ndarray,
    y_train: np.ndarray,
    spec: Any,
) -> Any:
    """
    The classifier the clients query: softmax, then the defence; bound and fitted as the registry entry says.

    :return: The served ART classifier.
    """
    from art_queen.evaluation.zoo import make_classifier
    from art_queen.input_channel import InputAwarePostprocessor

    classifier = make_classifier(model, input_shape, nb_classes, [defence] if defence is not None else [])
    if isinstance(defence, InputAwarePostprocessor):
        defence.bind(classifier)
    if defence is not None and spec.fit_on_training_data:
        defence.fit(x_train, y_train, **dict(spec.fit_kwargs))
    return classifier


def check_defence_settings(config: BenchmarkConfig) -> None:
    """
    Fail early on a configuration that would fail in a worker: load the data of the first seed (a missing or
    malformed file is reported now) and construct every defence setting once (its ``_check_params`` runs).

    :param config: Resolved configuration.
    :raises ValueError: On an invalid defence parameter (or a malformed data file).
    :raises FileNotFoundError: On a missing data file.
    """
    data, _, _, _ = load_split(
        config.dataset, config.data_dir, config.limit, config.train_fraction, config.pool_fraction, config.seeds[0]
    )
    for defence in config.defences or ():
        for settings in config.settings_of(defence):
            try:
                build_defence(defence, settings, int(data.nb_classes), int(config.seeds[0]))
            except TypeError as error:  # an unknown keyword argument
                raise ValueError(f"Invalid parameters {dict(settings)} for defence {defence!r}: {error}.") from error
            except ValueError as error:
                raise ValueError(f"Invalid parameters {dict(settings)} for defence {defence!r}: {error}") from error


class QueryRecorder:
    """
    Context in which a classifier's ``predict`` records every call (inputs, answers, and QUEEN's per-row cases) and
    passes a default client id to defences that take one.

    :param classifier: The served classifier.
    :param defence: Its defence (to read ``last_cases``), or `None`.
    :param client_id: Client id passed when the classifier's ``predict`` accepts one (bound input-aware defences).
    """

    def __init__(self, classifier: Any, defence: Any, client_id: Any) -> None:
        self.classifier = classifier
        self.defence = defence
        self.client_id = client_id
        self.inputs: list[np.ndarray] = []
        self.answers: list[np.ndarray] = []
        self.cases: list[np.ndarray] | None = []
        self.seconds = 0.0
        self._had_instance_predict = False
        self._original: Any = None

    def __enter__(self) -> QueryRecorder:
        self._had_instance_predict = "predict" in vars(self.classifier)
        self._original = self.classifier.predict
        takes_client = getattr(self._original, "_art_queen_fed_defences", None) is not None
        original, client_id = self._original, self.client_id

        # functools.wraps keeps the wrapped predict reachable (``__wrapped__``), so attacks that look for a
        # ``client_id`` parameter (Sybil) still find it.
        @functools.wraps(original)
        def recording_predict(x: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
            if takes_client:
                kwargs.setdefault("client_id", client_id)
            start = time.perf_counter()
            answers = original(x, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.inputs.append(np.array(x, dtype=np.float32, copy=True))
            self.answers.append(np.array(answers, dtype=np.float32, copy=True))
            cases = getattr(self.defence, "last_cases", None) if self.defence is not None else None
            if self.cases is not None and cases is not None and len(cases) == len(x):
                self.cases.append(np.array(cases, copy=True))
            else:
                self.cases = None
            return answers

        self.classifier.predict = recording_predict
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._had_instance_predict:
            self.classifier.predict = self._original
        else:
            del self.classifier.predict

    def recorded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """
        All recorded calls, concatenated.

        :return: ``(inputs, answers, cases or None)``.
        """
        if not self.inputs:
            return np.zeros((0,)), np.zeros((0, 0)), None
        cases = np.concatenate(self.cases) if self.cases else None
        return np.concatenate(self.inputs), np.concatenate(self.answers), cases


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------- a run
def run_defence(run: DefenceRun) -> list[dict[str, Any]]:
    """
    Run every cell of one :class:`DefenceRun` (a pure function of the run; safe to call in a worker process).

    :param run: The run.
    :return: One record per cell; the private keys ``_clone_labels`` (the clone's test predictions, for the KS
             statistic) and ``_map`` (the sensitivity map, for the map cell) are consumed by :func:`run_benchmark`.
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per worker: the parallelism is across runs
    try:
        return _run_defence(run)
    finally:
        torch.set_num_threads(previous_threads)


def _run_defence(run: DefenceRun) -> list[dict[str, Any]]:
    config = run.config
    spec = DEFENCES[run.defence]
    victim, data, (x_train, y_train), pool, (x_test, y_test) = victim_for(config, run.seed)
    model = victim.model
    input_shape, nb_classes = tuple(data.input_shape), int(data.nb_classes)

    from art_queen.evaluation.zoo import make_classifier, predict_logits

    plain = make_classifier(model, input_shape, nb_classes, [])
    victim_test_labels = np.argmax(predict_logits(model, x_test), axis=1)
    victim_accuracy = metrics.accuracy(victim_test_labels, y_test)

    defence = build_defence(run.defence, run.settings, nb_classes, run.seed)
    served = serve(model, input_shape, nb_classes, defence, x_train, y_train, spec)
    records = []
    for attack_key, budget in run.cells:
        if spec.stateful and defence is not None and not hasattr(defence, "reset"):
            defence = build_defence(run.defence, run.settings, nb_classes, run.seed)
            served = serve(model, input_shape, nb_classes, defence, x_train, y_train, spec)
        try:
            record = _run_cell(
                run,
                attack_key,
                budget,
                model=model,
                plain=plain,
                served=served,
                defence=defence,
                pool=pool,
                test=(x_test, y_test),
                victim_test_labels=victim_test_labels,
                input_shape=input_shape,
                nb_classes=nb_classes,
                collect_map=run.map_cell == (attack_key, budget),
            )
        except Exception as error:  # pylint: disable=broad-except  # one failed cell must not lose the whole grid
            logger.warning(
                "Cell %s / %s / %s / budget %d / seed %d failed: %s",
                spec.name,
                setting_label(run.settings),
                attack_key,
                budget,
                run.seed,
                error,
                exc_info=True,
            )
            record = _failed_record(run, attack_key, budget, error)
        record["victim_accuracy"] = victim_accuracy
        records.append(record)
    return records


def _run_cell(
    run: DefenceRun,
    attack_key: str,
    budget: int,
    *,
    model: Any,
    plain: Any,
    served: Any,
    defence: Any,
    pool: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    victim_test_labels: np.ndarray,
    input_shape: tuple,
    nb_classes: int,
    collect_map: bool,
) -> dict[str, Any]:
    import torch

    from art_queen.evaluation.datasets import augment_to_budget
    from art_queen.evaluation.zoo import make_clone, predict_logits

    config = run.config
    attack_spec = ATTACKS[attack_key]
    seed = cell_seed(run.seed, attack_key, budget)
    if defence is not None and hasattr(defence, "reset"):
        defence.reset()
    np.random.seed(seed)
    torch.manual_seed(seed)

    x_pool, y_pool = pool
    queries = int(min(budget, attack_spec.max_budget)) if attack_spec.max_budget else int(budget)
    if attack_spec.augment and queries > len(x_pool):
        x_attack = augment_to_budget(x_pool, queries, seed=seed)
    else:
        x_attack = x_pool
    clone = make_clone(input_shape, nb_classes, seed=seed)
    attack_cls = import_target(attack_spec.target)
    nb_epochs = clone_epochs_for(config, queries)
    kwargs = accepted_arguments(
        attack_cls,
        {
            "nb_stolen": queries,
            "nb_epochs": nb_epochs,
            "batch_size_fit": config.batch_size_fit,
            "batch_size_query": config.batch_size_query,
            "seed": seed,
            "verbose": False,
        },
    )
    kwargs.update(attack_spec.params)

    with QueryRecorder(served, defence, ATTACKER_CLIENT) as recorder:
        attack = attack_cls(served, **kwargs)
        start = time.perf_counter()
        if attack_spec.needs_labels:
            attack.extract(x_attack, y=y_pool, thieved_classifier=clone)
        else:
            attack.extract(x_attack, thieved_classifier=clone)
        attack_seconds = time.perf_counter() - start
    stats = dict(getattr(defence, "stats", None) or {}) if defence is not None else {}

    x_queries, answers, cases = recorder.recorded()
    undefended_answers = _softmax(predict_logits(model, x_queries)) if len(x_queries) else answers
    l1 = metrics.mean_l1_distortion(answers, undefended_answers) if len(x_queries) else None

    sensitivity_map = None
    if collect_map and defence is not None and hasattr(defence, "embed") and hasattr(defence, "recorded_points"):
        sensitivity_map = _sensitivity_map(run, attack_key, budget, defence, x_queries, undefended_answers, cases)

    # Benign accuracy after the attack (state not reset), timed against the undefended predict.
    # The undefended time is the mean of two calls after a warm-up; a stateful defence's call runs once (it changes
    # state), a stateless one's twice.
    x_test, y_test = test
    undefended_times = []
    for _ in range(3):
        start = time.perf_counter()
        plain.predict(x_test, batch_size=config.batch_size_query)
        undefended_times.append(time.perf_counter() - start)
    undefended_seconds = float(np.mean(undefended_times[1:]))
    predict = served.predict
    benign_kwargs = {"client_id": BENIGN_CLIENT} if getattr(predict, "_art_queen_fed_defences", None) else {}
    start = time.perf_counter()
    benign_answers = predict(x_test, batch_size=config.batch_size_query, **benign_kwargs)
    defended_seconds = time.perf_counter() - start
    spec = DEFENCES[run.defence]
    if not spec.stateful:
        start = time.perf_counter()
        predict(x_test, batch_size=config.batch_size_query, **benign_kwargs)
        defended_seconds = (defended_seconds + time.perf_counter() - start) / 2
    benign_accuracy = metrics.accuracy(benign_answers, y_test)
    # The same honest client alone, with the defence's state reset: what the defence costs without any attacker.
    benign_accuracy_fresh = benign_accuracy
    if spec.stateful and defence is not None and hasattr(defence, "reset"):
        defence.reset()
        benign_accuracy_fresh = metrics.accuracy(
            predict(x_test, batch_size=config.batch_size_query, **benign_kwargs), y_test
        )

    clone_labels = np.argmax(clone.predict(x_test, batch_size=512), axis=1)
    nb_queries = int(len(x_queries))
    record: dict[str, Any] = {
        "dataset": config.dataset,
        "defence": spec.name,
        "setting": setting_label(run.settings),
        "attack": attack_spec.name,
        "sampling": attack_spec.sampling,
        "labels": attack_spec.labels,
        "attack_key": attack_key,
        "budget": int(budget),
        "queries": nb_queries,
        "seed": run.seed,
        "clone_epochs": nb_epochs,
        "benign_accuracy": benign_accuracy,
        "benign_accuracy_fresh": benign_accuracy_fresh,
        "clone_accuracy": metrics.accuracy(clone_labels, y_test),
        "fidelity": metrics.fidelity(clone_labels, victim_test_labels),
        "l1_distortion": l1,
        "recorded_share": metrics.share(stats.get("recorded"), stats.get("queries")),
        "reversed_share": metrics.share(stats.get("reversed"), stats.get("queries")),
        "latency_ratio": defended_seconds / undefended_seconds if undefended_seconds > 0 else None,
        "defended_ms_per_query": 1000.0 * defended_seconds / len(x_test),
        "undefended_ms_per_query": 1000.0 * undefended_seconds / len(x_test),
        "attack_seconds": attack_seconds,
        "ks_statistic": None,
        "ks_pvalue": None,
        "error": None,
        "_clone_labels": clone_labels.astype(np.int64),
    }
    if sensitivity_map is not None:
        record["_map"] = sensitivity_map
    return record


def _failed_record(run: DefenceRun, attack_key: str, budget: int, error: BaseException) -> dict[str, Any]:
    attack_spec = ATTACKS[attack_key]
    record: dict[str, Any] = {
        "dataset": run.config.dataset,
        "defence": DEFENCES[run.defence].name,
        "setting": setting_label(run.settings),
        "attack": attack_spec.name,
        "sampling": attack_spec.sampling,
        "labels": attack_spec.labels,
        "attack_key": attack_key,
        "budget": int(budget),
        "seed": run.seed,
        "_clone_labels": None,
    }
    record.update({metric: None for metric in metrics.CELL_METRICS})
    record["error"] = f"{type(error).__name__}: {error}"
    return record


def _sensitivity_map(
    run: DefenceRun,
    attack_key: str,
    budget: int,
    defence: Any,
    x_queries: np.ndarray,
    undefended_answers: np.ndarray,
    cases: np.ndarray | None,
) -> dict[str, Any]:
    from art_queen.core import CASE_REVERSED

    points, classes = defence.recorded_points()
    query_points = defence.embed(x_queries) if len(x_queries) else np.zeros((0, 2))
    query_classes = np.argmax(undefended_answers, axis=1) if len(x_queries) else np.zeros(0, dtype=np.int64)
    reversed_rows = np.flatnonzero(cases == CASE_REVERSED) if cases is not None else np.zeros(0, dtype=np.int64)
    return {
        "defence": DEFENCES[run.defence].name,
        "setting": setting_label(run.settings),
        "attack": ATTACKS[attack_key].name,
        "sampling": ATTACKS[attack_key].sampling,
        "labels": ATTACKS[attack_key].labels,
        "budget": int(budget),
        "seed": run.seed,
        "class_centres": np.asarray(defence.class_centres_).tolist(),
        "sensitive_radii": np.asarray(defence.sensitive_radii_).tolist(),
        "recorded_points": np.asarray(points).tolist(),
        "recorded_classes": np.asarray(classes).astype(int).tolist(),
        "query_points": np.asarray(query_points).tolist(),
        "query_classes": query_classes.astype(int).tolist(),
        "reversed_points": np.asarray(query_points)[reversed_rows].tolist(),
        "reversed_classes": query_classes[reversed_rows].astype(int).tolist(),
        "cases_known": cases is not None,
    }


# --------------------------------------------------------------------------------------------------- the benchmark
def prepare_victims(config: BenchmarkConfig) -> list[dict[str, Any]]:
    """
    Train (or load from the cache) the victim of every seed in this process, so that workers only load them.

    :param config: Resolved configuration.
    :return: Per seed: ``seed``, ``victim_accuracy``, ``cache_file`` and ``from_cache``.
    """
    import torch

    from art_queen.evaluation.zoo import predict_labels

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summaries = []
        for seed in config.seeds:
            victim, _, _, _, (x_test, y_test) = victim_for(config, int(seed), verbose=config.verbose)
            summaries.append(
                {
                    "seed": int(seed),
                    "victim_accuracy": metrics.accuracy(predict_labels(victim.model, x_test), y_test),
                    "cache_file": victim.path,
                    "from_cache": victim.from_cache,
                }
            )
        return summaries
    finally:
        torch.set_num_threads(previous_threads)


def run_benchmark(config: BenchmarkConfig | None = None, **overrides: Any) -> BenchmarkResult:
    """
    Run the grid and aggregate the results.

    :param config: Configuration; `None` for the defaults (digits, every defence and attack, 3 seeds).
    :param overrides: Fields of :class:`BenchmarkConfig` replacing those of ``config``.
    :return: The result.
    :raises ValueError: On an invalid configuration.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    base = config if config is not None else BenchmarkConfig()
    if overrides:
        base = BenchmarkConfig(**{**asdict_shallow(base), **overrides})
    config = base.resolved()
    started = time.perf_counter()
    victims = prepare_victims(config)
    runs = plan_runs(config)
    total_cells = sum(len(run.cells) for run in runs)
    logger.info("Running %d cells in %d runs with %s job(s).", total_cells, len(runs), config.jobs)

    records: list[dict[str, Any]] = []
    progress = tqdm(total=total_cells, desc="Benchmark cells", unit="cell", disable=not config.verbose)
    jobs = int(config.jobs)
    try:
        if jobs == 1:
            outputs: Any = (run_defence(run) for run in runs)
        else:
            try:
                outputs = Parallel(n_jobs=jobs, return_as="generator_unordered")(delayed(run_defence)(r) for r in runs)
            except ValueError:  # a backend without generator support (e.g. multiprocessing)
                outputs = Parallel(n_jobs=jobs)(delayed(run_defence)(r) for r in runs)
        for output in outputs:
            records.extend(output)
            progress.update(len(output))
    finally:
        progress.close()

    return assemble_result(config, records, victims, time.perf_counter() - started)


def assemble_result(
    config: BenchmarkConfig, records: list[dict[str, Any]], victims: list[dict[str, Any]], wall_seconds: float
) -> BenchmarkResult:
    """
    Pair every cell with its undefended counterpart (KS statistic), order the records and aggregate them.

    :param config: Resolved configuration.
    :param records: Cell records from :func:`run_defence` (private keys are removed here).
    :param victims: Victim summaries.
    :param wall_seconds: Wall time.
    :return: The result.
    """
    reference = {
        (r["attack_key"], r["budget"], r["seed"]): r["_clone_labels"] for r in records if r["defence"] == NO_DEFENCE
    }
    for record in records:
        undefended = reference.get((record["attack_key"], record["budget"], record["seed"]))
        if record["defence"] != NO_DEFENCE and undefended is not None and record["_clone_labels"] is not None:
            record["ks_statistic"], record["ks_pvalue"] = metrics.ks_statistic(record["_clone_labels"], undefended)

    defence_order = {DEFENCES[key].name: i for i, key in enumerate(config.defences or ())}
    setting_order = {
        (DEFENCES[key].name, setting_label(s)): j
        for key in config.defences or ()
        for j, s in enumerate(config.settings_of(key))
    }
    attack_order = {key: i for i, key in enumerate(config.attacks or ())}
    records.sort(
        key=lambda r: (
            defence_order.get(r["defence"], len(defence_order)),
            setting_order.get((r["defence"], r["setting"]), 0),
            attack_order.get(r["attack_key"], 0),
            r["budget"],
            r["seed"],
        )
    )
    sensitivity_map = None
    for record in records:
        record.pop("_clone_labels", None)
        found = record.pop("_map", None)
        if found is not None:
            sensitivity_map = found
    rows = metrics.aggregate_cells(records)
    summaries = metrics.summarise_defences(rows, records)
    return BenchmarkResult(
        config=config,
        cells=records,
        rows=rows,
        defences=summaries,
        worst_by_budget=metrics.worst_case_by_budget(rows),
        sensitivity_map=sensitivity_map,
        wall_seconds=wall_seconds,
        victims=victims,
    )


def quick_config(config: BenchmarkConfig) -> BenchmarkConfig:
    """
    The ``--quick`` variant of a configuration: every defence and attack, the dataset's smallest (quick) budget,
    one seed.

    :param config: Configuration (its dataset, folders and job count are kept).
    :return: The quick configuration.
    """
    resolved = config.resolved()
    return BenchmarkConfig(
        **{
            **asdict_shallow(resolved),
            "defences": None,
            "attacks": None,
            "budgets": (DATASET_DEFAULTS[resolved.dataset]["quick_budget"],),
            "seeds": (resolved.seeds[0],),
        }
    ).resolved()


def available_cpus() -> int:
    """
    Number of CPUs this process may use.

    :return: CPU count (at least 1).
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "DefenceRun",
    "QueryRecorder",
    "assemble_result",
    "build_defence",
    "cell_seed",
    "plan_runs",
    "prepare_victims",
    "quick_config",
    "run_benchmark",
    "run_defence",
]
