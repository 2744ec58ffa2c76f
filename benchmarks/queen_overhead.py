"""
QUEEN's overhead on a digits CNN, measured in one run and reported as ratios.

Run::

    python -m benchmarks.queen_overhead [--quick] [--out FILE.json] [--repeats N]

What it measures (the numbers of issue 7 and ``DESIGN.md`` §7):

1. ``overhead``: defended vs undefended ``victim.predict`` time on the same queries, for batch sizes 128 and 1024,
   in three regimes with a measured share of reversed answers:

   * ``0%``: noisy digits (inside and outside the class cores) with ``threshold=1e9`` — the CQS never exceeds it,
     so in-core queries are recorded or covered, never reversed (this is the regime with the most bookkeeping);
   * ``50%``: half the queries from the cores (embedding at most 0.9 sensitive radii from the class centre), half
     from outside them (at least 1.1 radii), shuffled; before each run the state is reset and every class's CQS set
     above the threshold, so every in-core query is new and sensitive, hence reversed;
   * ``100%``: only core queries, with the same primed state.

   The 100 % target is ``1.25 (1 + k c)`` with ``c`` one shadow pass's time over one victim pass's: a shadow model's
   forward over the same queries in the same batches, divided by the undefended ``predict`` time.
2. ``stages``: QUEEN's time per stage of :meth:`Queen.defend` for one call over all queries (as ART hands them), by
   calling the stage methods on the same arrays with ``time.perf_counter`` around each; ``in predict`` is the whole
   ``defend`` with features captured from the victim's forward pass, as in a bound ``predict``.
3. ``reference``: ``Queen.defend`` vs :class:`benchmarks.reference_queen.ReferenceQueen` (per query, SLSQP, step by
   step head) on the same queries of the 50 % regime, both computing their features themselves.
4. ``records``: per-query cost of defended ``predict`` (calls of ``call_size`` rows) with 1,000 vs 1,000,000
   records loaded with ``RecordStore.load`` (uniform in the sensitive discs; ``r=0.0005`` so that the records
   rarely cover a query and both runs do the same work; ``threshold=1e9``: every new in-core query is recorded).
5. ``fit``: ``Queen.fit`` time by stage (feature extraction, mapping network, shadows), timed by wrapping the
   library functions that ``fit`` calls.

``--quick`` (for CI) uses 1,000 queries, 3 repeats, 100 reference queries and 1,000 vs 100,000 records.

Timings use one torch thread. Each repeat times the runs to compare back to back (in alternating order), and a
ratio is the median over repeats of the per-repeat ratios, which cancels most of a shared machine's load swings;
times are medians over repeats. The machine's load average is recorded before and after: on a shared machine the
ratios are the meaningful numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "n_queries": 10_000,
        "repeats": 9,
        "batch_sizes": (128, 1024),
        "victim_epochs": 10,
        "mapping_epochs": 40,
        "reference_queries": 10_000,
        "records": (1_000, 1_000_000),
        "call_size": 1_000,
    },
    "quick": {
        "n_queries": 1_000,
        "repeats": 3,
        "batch_sizes": (128, 1024),
        "victim_epochs": 4,
        "mapping_epochs": 5,
        "reference_queries": 100,
        "records": (1_000, 100_000),
        "call_size": 500,
    },
}
QUEEN_SETTINGS = {"nb_classes": 10, "r": 0.1, "threshold": 0.05, "k": 5, "n_shadows": 10, "seed": 0}
REGIMES = ("0%", "50%", "100%")
STAGES = (
    "validation",
    "probabilities",
    "features",
    "embedding",
    "bookkeeping",
    "shadows",
    "projection",
    "perturbation",
)
NO_REVERSAL_THRESHOLD = 1e9
RECORDS_RADIUS = 0.0005
NOISE = 0.01


# ------------------------------------------------------------------------------------------------------ timing
def median_time(function: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> float:
    """
    Median wall time of ``function`` over ``repeats`` runs; ``setup`` runs untimed before each.

    :param function: The timed call.
    :param repeats: Number of runs.
    :param setup: Untimed preparation before each run.
    :return: Median time in seconds.
    """
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (what ``uptime`` prints)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without getloadavg
        return []


# ------------------------------------------------------------------------------------------------------- setup
def build_model(seed: int) -> Any:
    """The benchmark's digits CNN: Conv2d(1,16,3,p=1)-ReLU-MaxPool2d(2)-Flatten-Linear(256,64)-ReLU-Linear(64,10)."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def load_digits_data() -> dict[str, np.ndarray]:
    """scikit-learn's digits as float32 images in [0, 1], shuffled, split into 1,200 training and the rest."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return {"x_train": x[:1200], "y_train": y[:1200], "x_all": x}


def train_victim(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> Any:
    """Train the victim with Adam and cross-entropy; returns it in eval mode."""
    import torch

    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    return model


def make_classifier(model: Any, defences: list[Any] | None = None) -> Any:
    """An ART ``PyTorchClassifier`` over the digits model (returns logits unless a defence changes them)."""
    import torch
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model,
        torch.nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        postprocessing_defences=defences,
        device_type="cpu",
    )


@contextlib.contextmanager
def patched(owner: Any, name: str, timings: dict[str, float], stage: str) -> Iterator[None]:
    """Temporarily wrap ``owner.name`` so that its calls add their wall time to ``timings[stage]``."""
    original = getattr(owner, name)
    own_attribute = name in vars(owner)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)
    try:
        yield
    finally:
        if own_attribute:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def fit_by_stage(queen: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """
    Fit QUEEN, timing the stages by wrapping what ``fit`` calls: the view's feature extraction, the mapping network's
    training, and the shadow models' training. ``other`` is the rest (centres, radii, scale, validation).
    """
    import art_queen.mapping
    import art_queen.shadows

    timings: dict[str, float] = {}
    view = queen._view
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(view, "features", timings, "features"))
        stack.enter_context(patched(art_queen.mapping, "train_mapping_network", timings, "mapping network"))
        stack.enter_context(patched(art_queen.shadows, "train_shadow_models", timings, "shadows"))
        start = time.perf_counter()
        queen.fit(x, y)
        total = time.perf_counter() - start
    result = {stage: timings.get(stage, 0.0) for stage in ("features", "mapping network", "shadows")}
    result["other"] = total - sum(result.values())
    result["total"] = total
    return result


def noisy_copies(x: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` samples of ``x`` drawn with replacement, plus Gaussian noise, clipped to [0, 1]."""
    chosen = x[rng.integers(0, len(x), count)]
    return np.clip(chosen + rng.normal(0.0, NOISE, chosen.shape).astype(np.float32), 0.0, 1.0).astype(np.float32)


def relative_distances(queen: Any, model: Any, x: np.ndarray) -> np.ndarray:
    """Distance of each input's embedding from its predicted class's centre, in sensitive radii."""
    import torch

    with torch.no_grad():
        classes = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    embedding = queen.embed(x)
    distance = np.linalg.norm(embedding - queen.class_centres_[classes], axis=1)
    return distance / queen.sensitive_radii_[classes]


def make_regimes(queen: Any, model: Any, x_all: np.ndarray, n: int, seed: int = 1) -> dict[str, dict[str, Any]]:
    """
    The three query sets and how to prime QUEEN's state before each run (see the module docstring).

    :return: Regime name → ``{"x": queries, "threshold": t, "cqs": initial CQS}``.
    """
    rng = np.random.default_rng(seed)
    pool = noisy_copies(x_all, 4 * n, rng)
    relative = relative_distances(queen, model, pool)
    core, outside = pool[relative <= 0.9], pool[relative >= 1.1]
    if len(core) < n or len(outside) < n // 2:
        extra = noisy_copies(x_all, 8 * n, rng)
        relative_extra = relative_distances(queen, model, extra)
        core = np.concatenate([core, extra[relative_extra <= 0.9]])
        outside = np.concatenate([outside, extra[relative_extra >= 1.1]])
    core = core[rng.permutation(len(core))[:n]]
    core = core[rng.integers(0, len(core), n)] if len(core) < n else core
    mixed = np.concatenate([core[: n // 2], outside[rng.integers(0, len(outside), n - n // 2)]])
    mixed = mixed[rng.permutation(n)]
    above = float(queen.threshold) + 1.0
    return {
        "0%": {"x": noisy_copies(x_all, n, rng), "threshold": NO_REVERSAL_THRESHOLD, "cqs": 0.0},
        "50%": {"x": mixed, "threshold": float(queen.threshold), "cqs": above},
        "100%": {"x": core, "threshold": float(queen.threshold), "cqs": above},
    }


def prime_state(queen: Any, regime: dict[str, Any]) -> Any:
    """Reset QUEEN, set the regime's threshold and install a fresh global state with the regime's CQS."""
    from art_queen.state import QueryState

    queen.reset()
    queen.threshold = regime["threshold"]
    state = QueryState(queen.nb_classes, float(queen.r), queen.embedding_dim)
    state.cqs[:] = regime["cqs"]
    queen._states[None] = state
    return state


# ------------------------------------------------------------------------------------------------ measurements
def measure_overhead(
    queen: Any, undefended: Any, defended: Any, regimes: dict[str, dict[str, Any]], batch_sizes: tuple, repeats: int
) -> list[dict[str, Any]]:
    """Defended / undefended ``predict`` time per regime and batch size, with the measured reversed share and c."""
    import torch

    rows = []
    shadow = queen.shadows_[0]
    for batch_size in batch_sizes:
        for name in REGIMES:
            regime = regimes[name]
            x = regime["x"]
            inputs = torch.from_numpy(x)

            def shadow_pass(inputs: Any = inputs, batch_size: int = batch_size) -> None:
                with torch.no_grad():
                    for start in range(0, inputs.shape[0], batch_size):
                        shadow(inputs[start : start + batch_size])

            def undefended_predict(x: np.ndarray = x, batch_size: int = batch_size) -> None:
                undefended.predict(x, batch_size=batch_size)

            def defended_predict(x: np.ndarray = x, batch_size: int = batch_size) -> None:
                defended.predict(x, batch_size=batch_size)

            prime_state(queen, regime)
            defended_predict()  # warm-up
            undefended_predict()
            undefended_times, defended_times, shadow_times = [], [], []
            for repeat in range(repeats):
                # Back to back, in alternating order: each repeat gives one ratio under (nearly) the same load.
                prime_state(queen, regime)
                if repeat % 2:
                    defended_times.append(median_time(defended_predict, 1))
                    undefended_times.append(median_time(undefended_predict, 1))
                else:
                    undefended_times.append(median_time(undefended_predict, 1))
                    defended_times.append(median_time(defended_predict, 1))
                shadow_times.append(median_time(shadow_pass, 1))
            stats = queen.stats
            undefended_s = statistics.median(undefended_times)
            defended_s = statistics.median(defended_times)
            ratio = statistics.median(d / u for d, u in zip(defended_times, undefended_times))
            c = statistics.median(s / u for s, u in zip(shadow_times, undefended_times))
            reversed_share = stats["reversed"] / stats["queries"]
            if name == "0%":
                target = 1.5
            elif name == "100%":
                target = 1.25 * (1 + queen.k * c)
            else:
                target = None
            rows.append(
                {
                    "regime": name,
                    "batch_size": batch_size,
                    "queries": int(stats["queries"]),
                    "reversed_share": reversed_share,
                    "undefended_s": undefended_s,
                    "defended_s": defended_s,
                    "ratio": ratio,
                    "c": c,
                    "target": target,
                    "meets_target": None if target is None else bool(ratio <= target),
                }
            )
    return rows


def victim_rows_per_query(queen: Any, defended: Any, x: np.ndarray) -> float:
    """Rows that pass through the victim's first layer during one defended ``predict``, per query (1.0 = no second
    forward pass for QUEEN's features)."""
    rows: list[int] = []
    first = next(module for module in queen._view.model.modules() if not list(module.children()))
    hook = first.register_forward_hook(lambda module, inputs, output: rows.append(int(inputs[0].shape[0])))
    try:
        queen.reset()
        defended.predict(x, batch_size=128)
    finally:
        hook.remove()
    return sum(rows) / x.shape[0]


def measure_stages(queen: Any, model: Any, regime: dict[str, Any], repeats: int) -> dict[str, float]:
    """
    Time of each stage of one ``defend`` call over all queries of a regime, by calling the stage methods on the same
    arrays. ``in predict`` times the whole ``defend`` with the features captured from the victim's forward pass;
    ``features recomputed`` is what reading the features with a second forward pass would cost instead.
    """
    import torch

    from art_queen.core import CASE_REVERSED, gradient_reverse_target
    from art_queen.shadows import pirate_estimate
    from art_queen.state import decide_cases

    x = regime["x"]
    view = queen._view
    inputs = torch.from_numpy(x)

    def victim_forward() -> None:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], 1024):
                model(inputs[start : start + 1024])

    with torch.no_grad():
        preds = model(inputs).numpy()

    def capture() -> None:
        view.start_capture()
        victim_forward()

    times: dict[str, float] = {}
    times["validation"] = median_time(
        lambda: (queen._validate_inputs(x), queen._validate_preds(preds, x.shape[0])), repeats
    )
    times["probabilities"] = median_time(lambda: queen._probabilities(preds), repeats)
    times["features"] = median_time(lambda: queen._features_of(x), repeats, setup=capture)
    times["features recomputed"] = median_time(lambda: queen._features_of(x), repeats)
    features = queen._features_of(x)
    probabilities = queen._probabilities(preds)
    classes = np.argmax(probabilities, axis=1)
    times["embedding"] = median_time(lambda: queen._embed_features(features), repeats)
    embedding = queen._embed_features(features)
    holder: dict[str, Any] = {}

    def decide() -> None:
        holder["cases"] = decide_cases(
            holder["state"],
            embedding,
            classes,
            queen.class_centres_,
            queen.sensitive_radii_,
            queen.threshold,
            queen.alpha,
        )

    times["bookkeeping"] = median_time(decide, repeats, setup=lambda: holder.update(state=prime_state(queen, regime)))
    cases = holder["cases"]
    reversed_rows = np.flatnonzero(cases == CASE_REVERSED)
    kept_rows = np.flatnonzero(cases != CASE_REVERSED)
    answers = probabilities.astype(np.float64)
    if reversed_rows.size:

        def shadows() -> None:
            subsets = queen._draw_shadow_subsets(reversed_rows.size)
            holder["pirate"] = pirate_estimate(queen.shadows_, view.model_inputs(x[reversed_rows]), subsets)

        times["shadows"] = median_time(shadows, repeats)
        times["projection"] = median_time(
            lambda: gradient_reverse_target(probabilities[reversed_rows], holder["pirate"]), repeats
        )
    else:
        times["shadows"] = times["projection"] = 0.0
    times["perturbation"] = (
        median_time(lambda: queen._feature_perturbation(features, kept_rows, classes, answers), repeats)
        if kept_rows.size
        else 0.0
    )
    times["sum of stages"] = sum(times[stage] for stage in STAGES)

    def prime_and_capture() -> None:
        prime_state(queen, regime)
        capture()

    times["in predict"] = median_time(lambda: queen.defend(x, preds), repeats, setup=prime_and_capture)
    times["victim forward"] = median_time(victim_forward, repeats)
    return times


def measure_reference(queen: Any, model: Any, regime: dict[str, Any], n: int) -> dict[str, Any]:
    """``Queen.defend`` vs the per-query reference on the first ``n`` queries of a regime, from the same state."""
    import torch

    from benchmarks.reference_queen import STAGES as REFERENCE_STAGES
    from benchmarks.reference_queen import ReferenceQueen

    x = regime["x"][:n]
    with torch.no_grad():
        preds = model(torch.from_numpy(x)).numpy()
    queen_s = median_time(lambda: queen.defend(x, preds), 3, setup=lambda: prime_state(queen, regime))
    queen_cases = queen.last_cases.copy()
    reference = ReferenceQueen(queen)
    reference.threshold = regime["threshold"]
    reference.cqs[:] = regime["cqs"]
    start = time.perf_counter()
    _, reference_cases = reference.defend(x, preds)
    reference_s = time.perf_counter() - start
    return {
        "queries": n,
        "queen_s": queen_s,
        "reference_s": reference_s,
        "speedup": reference_s / queen_s,
        "same_cases": float(np.mean(queen_cases == reference_cases)),
        "reversed_share": float(np.mean(reference_cases == 4)),
        "reference_stages_s": {stage: float(reference.timings.get(stage, 0.0)) for stage in REFERENCE_STAGES},
    }


def fill_records(queen: Any, count: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``count`` record points spread uniformly over the classes' sensitive discs."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, queen.nb_classes, count)
    angle = rng.uniform(0.0, 2.0 * np.pi, count)
    radius = queen.sensitive_radii_[classes] * np.sqrt(rng.uniform(0.0, 1.0, count))
    offsets = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return queen.class_centres_[classes] + offsets, classes


def install_records(queen: Any, points: np.ndarray, classes: np.ndarray) -> Any:
    """Reset QUEEN and install a global state holding the given records, CQS 0 and no reversal threshold."""
    from art_queen.state import QueryState

    queen.reset()
    queen.threshold = NO_REVERSAL_THRESHOLD
    state = QueryState(queen.nb_classes, float(queen.r), queen.embedding_dim)
    state.records.load(points, classes)
    queen._states[None] = state
    return state


def measure_records(
    queen: Any, defended: Any, x: np.ndarray, counts: tuple, call_size: int, repeats: int
) -> tuple[float, list[dict[str, Any]]]:
    """
    Per-query cost of defended ``predict`` (calls of ``call_size`` rows) with ``counts`` records preloaded, runs of
    the different counts back to back in alternating order; also the bookkeeping (``decide_cases``) alone over all
    queries at once.

    :return: The median over repeats of the cost ratio of the last count to the first, and a row per count.
    """
    import torch

    from art_queen.state import decide_cases

    def serve() -> None:
        for start in range(0, x.shape[0], call_size):
            defended.predict(x[start : start + call_size], batch_size=128)

    previous_r = queen.r
    queen.set_params(r=RECORDS_RADIUS)
    try:
        stores = [fill_records(queen, count) for count in counts]
        serve_times: list[list[float]] = [[] for _ in counts]
        decide_times: list[list[float]] = [[] for _ in counts]
        shares = []
        embedding = queen.embed(x)
        with torch.no_grad():
            classes = queen._view.model(torch.from_numpy(x)).argmax(dim=1).numpy()
        for points, labels in stores:
            install_records(queen, points, labels)
            serve()  # warm-up, and the case shares of a run
            stats = queen.stats
            shares.append((stats["recorded"] / stats["queries"], stats["covered"] / stats["queries"]))
        for repeat in range(repeats):
            order = range(len(stores)) if repeat % 2 == 0 else reversed(range(len(stores)))
            for index in order:
                points, labels = stores[index]
                install_records(queen, points, labels)
                serve_times[index].append(median_time(serve, 1))
                state = install_records(queen, points, labels)
                start = time.perf_counter()
                decide_cases(
                    state,
                    embedding,
                    classes,
                    queen.class_centres_,
                    queen.sensitive_radii_,
                    queen.threshold,
                    queen.alpha,
                )
                decide_times[index].append(time.perf_counter() - start)
    finally:
        queen.set_params(r=previous_r)
    ratios = [last / first for first, last in zip(serve_times[0], serve_times[-1])]
    return statistics.median(ratios), [
        {
            "records": count,
            "per_query_us": 1e6 * statistics.median(serve_times[index]) / x.shape[0],
            "run_s": serve_times[index],
            "bookkeeping_per_query_us": 1e6 * statistics.median(decide_times[index]) / x.shape[0],
            "recorded_share": shares[index][0],
            "covered_share": shares[index][1],
        }
        for index, count in enumerate(counts)
    ]


# ----------------------------------------------------------------------------------------------------- driver
def run(mode: str = "full", repeats: int | None = None) -> dict[str, Any]:
    """
    Run every measurement of the benchmark.

    :param mode: ``"full"`` or ``"quick"``.
    :param repeats: Override of the number of timed repeats.
    :return: The results as a JSON-serialisable dictionary.
    """
    import torch

    from art_queen import Queen

    settings = dict(SETTINGS[mode])
    if repeats is not None:
        settings["repeats"] = int(repeats)
    torch.set_num_threads(1)
    load_before = load_average()
    started = time.perf_counter()

    data = load_digits_data()
    model = train_victim(build_model(0), data["x_train"], data["y_train"], settings["victim_epochs"])
    reference_model = build_model(0)
    reference_model.load_state_dict(model.state_dict())
    reference_model.eval()
    queen = Queen(**QUEEN_SETTINGS, mapping_epochs=settings["mapping_epochs"])
    defended = make_classifier(model, [queen])
    queen.bind(defended)
    undefended = make_classifier(reference_model)
    fit = fit_by_stage(queen, data["x_train"], data["y_train"])

    regimes = make_regimes(queen, model, data["x_all"], settings["n_queries"])
    threshold = queen.threshold
    try:
        overhead = measure_overhead(queen, undefended, defended, regimes, settings["batch_sizes"], settings["repeats"])
        rows_per_query = victim_rows_per_query(queen, defended, regimes["50%"]["x"])
        stages = {name: measure_stages(queen, model, regimes[name], settings["repeats"]) for name in REGIMES}
        reference = measure_reference(queen, model, regimes["50%"], settings["reference_queries"])
        records_ratio, records = measure_records(
            queen, defended, regimes["0%"]["x"], settings["records"], settings["call_size"], settings["repeats"]
        )
    finally:
        queen.threshold = threshold
        queen.reset()

    # QUEEN's stages per query, from the stage split of the same regime (all queries in one call).
    reference["queen_stages_us"] = {
        stage: 1e6 * stages["50%"][source] / settings["n_queries"]
        for stage, source in (
            ("features", "features recomputed"),
            ("embedding", "embedding"),
            ("bookkeeping", "bookkeeping"),
            ("shadows", "shadows"),
            ("projection", "projection"),
            ("perturbation", "perturbation"),
        )
    }
    return {
        "mode": mode,
        "settings": {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()},
        "queen": {**QUEEN_SETTINGS},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_average(),
        },
        "victim_rows_per_query": rows_per_query,
        "overhead": overhead,
        "stages": stages,
        "reference": reference,
        "records": records,
        "records_ratio": records_ratio,
        "fit": fit,
        "elapsed_s": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------------------- report
def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table with right-aligned columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(h).rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows)
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """The benchmark's tables as text."""
    machine = results["machine"]
    parts = [
        f"QUEEN overhead benchmark ({results['mode']}): digits CNN, {results['settings']['n_queries']} queries, "
        f"k={results['queen']['k']} of {results['queen']['n_shadows']} shadows; torch {machine['torch']}, "
        f"{machine['torch_threads']} thread, {machine['cpus']} CPUs, load average {machine['load_before']} before, "
        f"{machine['load_after']} after; medians of {results['settings']['repeats']} runs.",
        "",
        f"1. defended / undefended predict (victim rows per query in a defended predict: "
        f"{results['victim_rows_per_query']:.2f})",
    ]
    rows = []
    for row in results["overhead"]:
        target = "-" if row["target"] is None else f"<= {row['target']:.2f}"
        verdict = "" if row["meets_target"] is None else ("yes" if row["meets_target"] else "NO")
        rows.append(
            [
                row["regime"],
                str(row["batch_size"]),
                f"{100 * row['reversed_share']:.1f}%",
                f"{1e3 * row['undefended_s']:.1f}",
                f"{1e3 * row['defended_s']:.1f}",
                f"{row['ratio']:.2f}",
                f"{row['c']:.2f}",
                target,
                verdict,
            ]
        )
    parts.append(
        format_table(
            ["regime", "batch", "reversed", "undefended ms", "defended ms", "ratio", "c", "target", "met"], rows
        )
    )
    parts += ["", "2. QUEEN's time by stage, one defend call over all queries (ms; % of the victim's forward pass)"]
    stages = results["stages"]
    names = [*STAGES, "sum of stages", "in predict", "features recomputed", "victim forward"]
    rows = []
    for name in names:
        cells = [name]
        for regime in REGIMES:
            value = stages[regime][name]
            share = 100 * value / stages[regime]["victim forward"]
            cells.append(f"{1e3 * value:.1f} ({share:.0f}%)")
        rows.append(cells)
    parts.append(format_table(["stage", *REGIMES], rows))

    reference = results["reference"]
    parts += [
        "",
        f"3. QUEEN vs per-query reference, {reference['queries']} queries of the 50% regime "
        f"(reversed {100 * reference['reversed_share']:.1f}%, same cases {100 * reference['same_cases']:.1f}%): "
        f"speed-up {reference['speedup']:.0f}x",
    ]
    n = reference["queries"]
    rows = []
    for stage, slow in reference["reference_stages_s"].items():
        slow_us, fast_us = 1e6 * slow / n, reference["queen_stages_us"][stage]
        rows.append([stage, f"{slow_us:.1f}", f"{fast_us:.2f}", f"{slow_us / fast_us:.0f}x" if fast_us > 0 else "-"])
    rows.append(
        [
            "total defend",
            f"{1e6 * reference['reference_s'] / n:.1f}",
            f"{1e6 * reference['queen_s'] / n:.2f}",
            f"{reference['speedup']:.0f}x",
        ]
    )
    parts.append(format_table(["stage", "reference us/query", "QUEEN us/query", "speed-up"], rows))

    parts += [
        "",
        f"4. per-query cost of defended predict vs records (calls of {results['settings']['call_size']} rows): "
        f"ratio {results['records_ratio']:.2f} (target <= 1.2)",
    ]
    rows = [
        [
            f"{row['records']:,}",
            f"{row['per_query_us']:.1f}",
            f"{row['bookkeeping_per_query_us']:.2f}",
            f"{100 * row['recorded_share']:.1f}%",
            f"{100 * row['covered_share']:.1f}%",
        ]
        for row in results["records"]
    ]
    parts.append(format_table(["records", "us/query", "bookkeeping us/query", "recorded", "covered"], rows))

    fit = results["fit"]
    parts += ["", "5. fit time by stage (s)"]
    parts.append(
        format_table(
            ["stage", "s", "share"],
            [[stage, f"{value:.2f}", f"{100 * value / fit['total']:.0f}%"] for stage, value in fit.items()],
        )
    )
    parts.append(f"\nelapsed {results['elapsed_s']:.0f} s")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="Measure QUEEN's overhead on a digits CNN (ratios within one run).")
    parser.add_argument("--quick", action="store_true", help="small sizes for CI (seconds instead of minutes)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (median is reported)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    results = run("quick" if args.quick else "full", repeats=args.repeats)
    print(report(results))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
