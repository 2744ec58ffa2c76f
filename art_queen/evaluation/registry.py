"""
Registries of the defences and attacks the evaluation harness knows: name → how to build it.

Adding a defence or an attack is one entry in :data:`DEFENCES` or :data:`ATTACKS`. Classes are named by an import path
(``"module:Class"``) and imported only when a cell needs them, so entries cost nothing and stay picklable (a cell is
sent to a worker process as its specification, never as live objects).

How the harness uses an entry:

* a defence is constructed with the entry's settings (one cell per setting); the arguments ``nb_classes``, ``seed``
  and ``verbose`` are added when the constructor accepts them. It is appended to the served classifier's
  ``postprocessing_defences`` after a softmax (every defence receives probability rows), bound to the classifier
  when it is an input-aware postprocessor, and fitted on the victim's training data ``fit(x_train, y_train)`` when
  the entry says so. A stateful defence is ``reset()`` before every cell (or rebuilt if it has no ``reset``).
* an attack is constructed with the defended classifier and the entry's parameters; ``nb_stolen``, ``nb_epochs``,
  ``batch_size_fit``, ``batch_size_query`` and ``verbose`` are added when the constructor accepts them. It runs
  ``extract(x_pool, y=y_pool if the entry needs labels, thieved_classifier=clone)``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

NO_DEFENCE = "NoDefence"
"""Name of the undefended reference (always run: the KS statistic and the comparisons need it)."""


@dataclass(frozen=True)
class DefenceSpec:
    """
    How to build and prepare one defence.

    :param name: Name in the outputs (the class name).
    :param target: Import path ``"module:Class"`` of the postprocessor, or `None` for the undefended reference.
    :param settings: Parameter sets evaluated by default; each one gives its own row in the outputs.
    :param fit_on_training_data: Call ``fit(x_train, y_train, **fit_kwargs)`` after binding.
    :param fit_kwargs: Extra keyword arguments of that ``fit`` call.
    :param stateful: The defence keeps state across queries: it is reset (or rebuilt) before each cell.
    :param description: One line for ``art-queen list``.
    """

    name: str
    target: str | None
    settings: tuple[Mapping[str, Any], ...] = ({},)
    fit_on_training_data: bool = False
    fit_kwargs: Mapping[str, Any] = field(default_factory=dict)
    stateful: bool = False
    description: str = ""


@dataclass(frozen=True)
class AttackSpec:
    """
    How to build and run one attack variant.

    :param name: Name in the outputs (the class name).
    :param target: Import path ``"module:Class"`` of the ``ExtractionAttack``.
    :param sampling: Query selection variant shown in the outputs (``"random"``, ``"adaptive"``, ...).
    :param labels: What the clone trains on: ``"soft"`` (probability rows) or ``"hard"`` (top-1 labels).
    :param params: Constructor arguments of this variant.
    :param needs_labels: ``extract`` receives the pool's labels ``y`` (KnockoffNets' adaptive strategy).
    :param augment: Reach budgets larger than the pool with light augmentation; without it the attack gets the pool
                    itself (and samples from it as it likes).
    :param max_budget: Largest number of queries this variant is run with (for attacks with a high cost per query);
                       the outputs report the number of queries actually made.
    :param description: One line for ``art-queen list``.
    """

    name: str
    target: str
    sampling: str
    labels: str
    params: Mapping[str, Any] = field(default_factory=dict)
    needs_labels: bool = False
    augment: bool = True
    max_budget: int | None = None
    description: str = ""


def _label_variants(name: str, sampling: str, params: Mapping[str, Any], description: str) -> dict[str, AttackSpec]:
    """The soft- and hard-label variants of one of ``art_queen.attacks``' QUEEN-aware attacks."""
    return {
        f"{name}/{labels}": AttackSpec(
            name=name,
            target=f"art_queen.attacks:{name}",
            sampling=sampling,
            labels=labels,
            params={**params, "use_probability": labels == "soft"},
            description=f"QUEEN-aware: {description}; {'probability rows' if labels == 'soft' else 'top-1 labels'}.",
        )
        for labels in ("soft", "hard")
    }


DEFENCES: dict[str, DefenceSpec] = {
    NO_DEFENCE: DefenceSpec(
        name=NO_DEFENCE, target=None, description="The undefended victim (softmax probabilities), the reference."
    ),
    "Queen": DefenceSpec(
        name="Queen",
        target="art_queen.queen:Queen",
        settings=({"scope": "global"}, {"scope": "per_client"}),
        fit_on_training_data=True,
        stateful=True,
        description="QUEEN (query unlearning); global state as in the paper, and one state per client.",
    ),
    "ReverseSigmoid": DefenceSpec(
        name="ReverseSigmoid",
        target="art.defences.postprocessor:ReverseSigmoid",
        settings=({"beta": 1.0, "gamma": 0.1},),
        description="ART's reverse sigmoid perturbation (Lee et al. 2019), ART's default parameters.",
    ),
    "Rounded": DefenceSpec(
        name="Rounded",
        target="art.defences.postprocessor:Rounded",
        settings=({"decimals": 1},),
        description="ART's rounding of the probabilities (1 decimal; ART's default of 3 changes almost nothing).",
    ),
    "GaussianNoise": DefenceSpec(
        name="GaussianNoise",
        target="art.defences.postprocessor:GaussianNoise",
        settings=({"scale": 0.2},),
        description="ART's gaussian noise on the probabilities, renormalised (ART's default scale).",
    ),
    "HighConfidence": DefenceSpec(
        name="HighConfidence",
        target="art.defences.postprocessor:HighConfidence",
        settings=({"cutoff": 0.25},),
        description="ART's zeroing of probabilities below a cutoff (ART's default cutoff).",
    ),
    "TopLabel": DefenceSpec(
        name="TopLabel",
        target="art_queen.defences.top_label:TopLabel",
        description="Top-1 label only, one-hot (a correct replacement of ART's ClassLabels).",
    ),
    "SoftmaxFlattening": DefenceSpec(
        name="SoftmaxFlattening",
        target="art_queen.defences.softmax_flattening:SoftmaxFlattening",
        settings=({"epsilon": 1.0},),
        description="The QUEEN paper's 'DP' baseline: softmax of epsilon/2 times the probabilities (top-1 kept).",
    ),
    "AdaptiveMisinformation": DefenceSpec(
        name="AdaptiveMisinformation",
        target="art_queen.defences.adaptive_misinformation:AdaptiveMisinformation",
        settings=({"tau": 0.8, "nu": 1000.0},),
        fit_on_training_data=True,
        description="Adaptive misinformation (Kariyappa & Qureshi 2020): low-confidence queries get misinformation.",
    ),
    "PredictionPoisoning": DefenceSpec(
        name="PredictionPoisoning",
        target="art_queen.defences.prediction_poisoning:PredictionPoisoning",
        settings=({"variant": "mad", "epsilon": 0.5}, {"variant": "mad_argmax", "epsilon": 0.5}),
        description="Prediction poisoning (Orekondy et al. 2020), MAD and MAD-argmax within an L1 ball of 0.5.",
    ),
}
"""Known defences, by name. Each setting of each selected defence is one row of the outputs."""


ATTACKS: dict[str, AttackSpec] = {
    "CopycatCNN/soft": AttackSpec(
        name="CopycatCNN",
        target="art.attacks.extraction:CopycatCNN",
        sampling="random",
        labels="soft",
        params={"use_probability": True},
        description="ART's Copycat CNN, clone trained on the returned probability rows.",
    ),
    "CopycatCNN/hard": AttackSpec(
        name="CopycatCNN",
        target="art.attacks.extraction:CopycatCNN",
        sampling="random",
        labels="hard",
        params={"use_probability": False},
        description="ART's Copycat CNN, clone trained on the returned top-1 labels.",
    ),
    "KnockoffNets/random/soft": AttackSpec(
        name="KnockoffNets",
        target="art.attacks.extraction:KnockoffNets",
        sampling="random",
        labels="soft",
        params={"sampling_strategy": "random", "use_probability": True},
        description="ART's Knockoff Nets, random sampling, probability rows.",
    ),
    "KnockoffNets/random/hard": AttackSpec(
        name="KnockoffNets",
        target="art.attacks.extraction:KnockoffNets",
        sampling="random",
        labels="hard",
        params={"sampling_strategy": "random", "use_probability": False},
        description="ART's Knockoff Nets, random sampling, top-1 labels.",
    ),
    "KnockoffNets/adaptive/hard": AttackSpec(
        name="KnockoffNets",
        target="art_queen.evaluation.registry:knockoff_nets_with_safe_rewards",
        sampling="adaptive",
        labels="hard",
        params={"sampling_strategy": "adaptive", "reward": "all", "use_probability": False},
        needs_labels=True,
        augment=False,
        max_budget=250,
        description=(
            "ART's Knockoff Nets, adaptive (bandit) sampling over the pool's classes; ART always trains it on top-1 "
            "labels (so there is no soft variant) and makes one single-row query per step (slow: at most 250 "
            "queries). Its reward normalisation is guarded against a zero variance (see "
            "knockoff_nets_with_safe_rewards)."
        ),
    ),
    **_label_variants(
        "RepeatCompare", "repeat", {}, "asks uncertain queries twice, drops answers that change (reversals are random)"
    ),
    **_label_variants(
        "SparsityFilter", "random", {"mode": "recover"}, "flags answers with exact zeros (QUEEN's reversal tell)"
    ),
    **_label_variants(
        "CoreAvoidance", "core-avoiding", {}, "queries off the class cores and near-duplicates, judged by its own model"
    ),
    **_label_variants("Recovery", "random", {}, "emulates QUEEN on a proxy and learns to undo defended answers"),
    **_label_variants("Sybil", "sybil", {"n_clients": 20}, "spreads its queries over 20 client ids"),
}
"""Known attack variants, by key ``Name/variant``. Selecting ``Name`` selects all its variants."""


# ------------------------------------------------------------------------------------------------- attack shims
_SAFE_KNOCKOFF: list[type] = []


def knockoff_nets_with_safe_rewards(classifier: Any, **kwargs: Any) -> Any:
    """
    ART's ``KnockoffNets`` whose ``reward="all"`` normalisation tolerates a reward with zero variance.

    ART 1.20.1 divides each reward by the square root of its running variance. When a reward is constant (the
    certainty reward is always 1 when every answer is one-hot, as under a top-1 defence) that is 0 / 0, the bandit's
    action probabilities become NaN and the attack crashes. Here a component with zero variance contributes 0;
    everything else is ART's attack unchanged, so results are identical wherever ART's attack runs.

    :param classifier: The victim classifier.
    :param kwargs: ``KnockoffNets`` arguments.
    :return: The attack.
    """
    from art.attacks.extraction import KnockoffNets

    if not _SAFE_KNOCKOFF:

        class KnockoffNetsSafeRewards(KnockoffNets):  # pylint: disable=too-many-ancestors
            """``KnockoffNets`` with a zero-variance guard in the ``"all"`` reward."""

            def _reward_all(self, y_output: np.ndarray, y_hat: np.ndarray, n: int) -> float:
                rewards = np.array(
                    [self._reward_cert(y_output), self._reward_div(y_output, n), self._reward_loss(y_output, y_hat)],
                    dtype=np.float64,
                )
                # ART creates reward_avg and reward_var in _adaptive_extraction.
                average: np.ndarray = self.reward_avg + (rewards - self.reward_avg) / n  # type: ignore[has-type]
                variance: np.ndarray = self.reward_var + ((rewards - average) ** 2 - self.reward_var) / n  # type: ignore
                self.reward_avg, self.reward_var = average, variance
                if n > 1:
                    scale = np.sqrt(np.maximum(self.reward_var, 0.0))
                    normalised = np.zeros_like(rewards)
                    np.divide(rewards - average, scale, out=normalised, where=scale > 0)
                else:
                    normalised = np.clip(rewards, 0.0, 1.0)
                return float(np.mean(normalised))

        _SAFE_KNOCKOFF.append(KnockoffNetsSafeRewards)
    # The grid offers arguments (such as ``seed``) to any attack that takes ``**kwargs``; keep ART's own.
    return _SAFE_KNOCKOFF[0](classifier, **accepted_arguments(KnockoffNets, kwargs))


# ------------------------------------------------------------------------------------------------------ helpers
def import_target(target: str) -> Any:
    """
    Import ``"module:attribute"``.

    :param target: Import path.
    :return: The attribute.
    :raises ValueError: If the path is malformed, or the module or attribute does not exist.
    """
    module_name, _, attribute = str(target).partition(":")
    if not module_name or not attribute:
        raise ValueError(f"An import target must look like 'package.module:Name', got {target!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"Cannot import module {module_name!r} of target {target!r}: {error}.") from error
    try:
        return getattr(module, attribute)
    except AttributeError as error:
        raise ValueError(f"Module {module_name!r} has no attribute {attribute!r}.") from error


def accepted_arguments(callable_: Any, candidates: Mapping[str, Any]) -> dict[str, Any]:
    """
    The subset of ``candidates`` that ``callable_`` accepts as keyword arguments (all of them if it takes ``**kwargs``).

    :param callable_: A class or function.
    :param candidates: Keyword arguments to offer.
    :return: The accepted ones.
    """
    try:
        parameters = inspect.signature(callable_).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signature
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(candidates)
    return {name: value for name, value in candidates.items() if name in parameters}


def select_defences(names: list[str] | None) -> list[str]:
    """
    Resolve defence names (case-insensitive) to registry keys, in registry order; `None` selects all.

    :param names: Names, or `None`.
    :return: Registry keys.
    :raises ValueError: If a name is unknown.
    """
    return _select(names, DEFENCES, "defence")


def select_attacks(names: list[str] | None) -> list[str]:
    """
    Resolve attack keys (``CopycatCNN/soft``) or attack names (``CopycatCNN``: all its variants), case-insensitive,
    to registry keys in registry order; `None` selects all.

    :param names: Keys or names, or `None`.
    :return: Registry keys.
    :raises ValueError: If a name matches nothing.
    """
    return _select(names, ATTACKS, "attack")


def _select(names: list[str] | None, registry: Mapping[str, Any], kind: str) -> list[str]:
    if names is None:
        return list(registry)
    chosen: set[str] = set()
    lowered = {key.lower(): key for key in registry}
    for name in names:
        wanted = str(name).strip().lower()
        matches = [key for low, key in lowered.items() if low == wanted or low.startswith(wanted + "/")]
        if not matches:
            raise ValueError(f"Unknown {kind} {name!r}; valid {kind}s are: {', '.join(registry)}.")
        chosen.update(matches)
    return [key for key in registry if key in chosen]


def setting_label(settings: Mapping[str, Any]) -> str:
    """
    Text of one parameter set, as shown in the outputs: ``"beta=1.0, gamma=0.1"``, or ``"-"`` when empty.

    :param settings: Parameter set.
    :return: The label.
    """
    if not settings:
        return "-"
    return ", ".join(f"{name}={value}" for name, value in settings.items())
