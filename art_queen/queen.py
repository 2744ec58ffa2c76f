"""
QUEEN (Query Unlearning against Model Extraction) as an ART postprocessor.

QUEEN measures how much of each class's core a query stream has explored (sensitivity in a learned 2-D feature
embedding). Once a class is over-explored, new queries in its core get gradient-reversed probabilities that make a
clone trained on them unlearn; all other answers keep their top-1 label but have their secondary probabilities
distorted (feature perturbation).

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.exceptions import NotFittedError

from art_queen.core import CASE_REVERSED, gradient_reverse_target, queries_before_reversal
from art_queen.input_channel import InputAwarePostprocessor
from art_queen.state import QueryState, cell_coordinate_bits, decide_cases

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from art_queen.model_access import ModelView

logger = logging.getLogger(__name__)

SCOPES = ("global", "per_client")
PERTURB_MODES = ("all", "none")
_PERTURB_CHUNK = 4096


class QueenNotFittedError(NotFittedError):
    """Raised when QUEEN is used before :meth:`Queen.fit`."""


class TooManyClientsError(ValueError):
    """Raised under per-client scope when a new client id would exceed ``max_clients``."""


class Queen(InputAwarePostprocessor):
    """
    QUEEN defence against model extraction, as an ART postprocessor.

    Usage::

        queen = Queen(nb_classes=10, r=0.1, threshold=0.05, k=5, n_shadows=10, seed=0)
        victim = PyTorchClassifier(model, loss, input_shape=(1, 8, 8), nb_classes=10,
                                   postprocessing_defences=[queen])
        queen.bind(victim)           # victim.predict now hands its inputs to QUEEN
        queen.fit(x_train, y_train)  # mapping network, class centres and radii, shadow models
        answers = victim.predict(x)  # defended probabilities

    The data path of one batch of queries is :meth:`defend`: inputs → features (the head's input, captured from the
    victim's own forward pass when bound) → standardised embedding → the four cases, decided in query order →
    answers (gradient-reversed for case 4, feature-perturbed otherwise).

    Units: the embedding is standardised at fit time so that the mean class radius is 1; ``r`` and the sensitive
    radii (``beta`` times each class's mean radius) are in that unit. ``perturb_step`` is a fraction of the mean
    distance of training features to their class's feature centre.

    | Paper link: https://arxiv.org/abs/2407.01251
    """

    params = [
        "nb_classes",
        "r",
        "threshold",
        "k",
        "n_shadows",
        "alpha",
        "beta",
        "embedding_dim",
        "mapping_layers",
        "step_down",
        "mapping_epochs",
        "temperature",
        "shadow_epochs",
        "perturb_step",
        "perturb_max_steps",
        "perturb",
        "scope",
        "max_clients",
        "seed",
        "verbose",
    ]

    # Changing these after fit makes the fitted parts stale.
    _REFIT_PARAMS = {"nb_classes", "embedding_dim", "mapping_layers", "step_down", "mapping_epochs", "temperature"}
    _RESHADOW_PARAMS = {"n_shadows", "shadow_epochs"}
    # Changing these invalidates the records and CQS.
    _RESET_PARAMS = {"r", "scope", "alpha"}

    def __init__(
        self,
        nb_classes: int,
        r: float = 0.1,
        threshold: float = 0.05,
        k: int = 5,
        n_shadows: int = 10,
        alpha: float = 1.0,
        beta: float = 1.0,
        embedding_dim: int = 2,
        mapping_layers: int = 4,
        step_down: int = 2,
        mapping_epochs: int = 40,
        temperature: float = 0.1,
        shadow_epochs: int = 1,
        perturb_step: float = 0.05,
        perturb_max_steps: int = 20,
        perturb: str = "all",
        scope: str = "global",
        max_clients: int | None = None,
        head: str | Any = None,
        shadow_factory: Callable[[], Any] | None = None,
        seed: int | None = 0,
        verbose: bool = False,
        apply_fit: bool = False,
        apply_predict: bool = True,
    ) -> None:
        """
        Create a QUEEN postprocessor.

        :param nb_classes: Number of classes of the protected classifier.
        :param r: Record radius, in units of the mean class radius of the embedding. A query within ``r`` of a
                  recorded query of its class is not new.
        :param threshold: CQS threshold ``t`` above which new sensitive queries of a class are reversed.
        :param k: Number of shadow models averaged (a fresh random subset per query) for a reversed answer.
        :param n_shadows: Number of shadow models trained at fit time.
        :param alpha: Sharpness of the single query sensitivity ``0.5 * erfc(alpha * (d - r_s) / r_s)``.
        :param beta: Sensitive radius of a class as a multiple of its mean radius.
        :param embedding_dim: Dimension of the embedding (2 in the paper).
        :param mapping_layers: Number of linear layers of the mapping network.
        :param step_down: Width shrink factor per mapping layer.
        :param mapping_epochs: Training epochs of the mapping network.
        :param temperature: Temperature of the supervised contrastive loss.
        :param shadow_epochs: Training epochs of each shadow model.
        :param perturb_step: Feature perturbation step, as a fraction of the mean feature distance to class centres.
        :param perturb_max_steps: Largest number of perturbation steps tried.
        :param perturb: ``"all"`` to perturb every non-reversed answer (the reference behaviour) or ``"none"``.
        :param scope: ``"global"`` (one state shared by all queries, as in the paper) or ``"per_client"`` (one state
                      per client id, passed as ``predict(x, client_id=...)``).
        :param max_clients: Under per-client scope, the most client states kept (about 9 KB each at the defaults);
                            queries from a further client id are refused with :class:`TooManyClientsError`. States
                            are never evicted, since eviction would let a client reset its own record. `None`: no
                            limit (memory grows with the number of distinct client ids).
        :param head: The head of the protected model (features → logits): a module name, the module, or `None` for
                     the model's last ``nn.Linear``.
        :param shadow_factory: Callable returning a fresh shadow model; `None` for re-initialised copies of the
                               protected model.
        :param seed: Seed for the mapping network, shadows and shadow subsets.
        :param verbose: Show progress bars.
        :param apply_fit: True if applied during fitting/training.
        :param apply_predict: True if applied during predicting.
        """
        super().__init__(is_fitted=False, apply_fit=apply_fit, apply_predict=apply_predict)
        self.nb_classes = nb_classes
        self.r = r
        self.threshold = threshold
        self.k = k
        self.n_shadows = n_shadows
        self.alpha = alpha
        self.beta = beta
        self.embedding_dim = embedding_dim
        self.mapping_layers = mapping_layers
        self.step_down = step_down
        self.mapping_epochs = mapping_epochs
        self.temperature = temperature
        self.shadow_epochs = shadow_epochs
        self.perturb_step = perturb_step
        self.perturb_max_steps = perturb_max_steps
        self.perturb = perturb
        self.scope = scope
        self.max_clients = max_clients
        self.seed = seed
        self.verbose = verbose
        self._check_params()
        self.head = head
        self.shadow_factory = shadow_factory
        self._view: ModelView | None = None
        self._lock = threading.RLock()
        self._states: dict[Hashable, QueryState] = {}
        self._rng = np.random.default_rng(seed)
        self.last_cases: np.ndarray | None = None
        # Fitted parts.
        self.mapping_network_: Any = None
        self.embedding_scale_: Any = None
        self.class_centres_: Any = None
        self.class_mean_radius_: Any = None
        self.feature_centres_: Any = None
        self.feature_spread_: Any = None
        self.shadows_: list[Any] = []

    # ------------------------------------------------------------------------------------------------- parameters
    def _check_params(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

        if not is_int(self.nb_classes) or self.nb_classes < 2:
            raise ValueError(f"`nb_classes` must be an integer of at least 2, got {self.nb_classes!r}.")
        if not is_number(self.r) or not np.isfinite(self.r) or self.r <= 0:
            raise ValueError(f"`r` (record radius) must be a positive finite number, got {self.r!r}.")
        if not is_number(self.threshold) or not np.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"`threshold` must be a non-negative finite number, got {self.threshold!r}.")
        if not is_int(self.n_shadows) or self.n_shadows < 1:
            raise ValueError(f"`n_shadows` must be a positive integer, got {self.n_shadows!r}.")
        if not is_int(self.k) or not 1 <= self.k <= self.n_shadows:
            raise ValueError(f"`k` must be an integer between 1 and n_shadows={self.n_shadows}, got {self.k!r}.")
        for name in ("alpha", "beta", "temperature"):
            value = getattr(self, name)
            if not is_number(value) or not np.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
        if not is_int(self.embedding_dim) or not 1 <= self.embedding_dim <= 4:
            raise ValueError(
                f"`embedding_dim` must be an integer between 1 and 4 (the record grid inspects 3^e cells), "
                f"got {self.embedding_dim!r}."
            )
        for name in ("mapping_layers", "step_down", "mapping_epochs", "shadow_epochs"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not is_number(self.perturb_step) or not np.isfinite(self.perturb_step) or self.perturb_step < 0:
            raise ValueError(f"`perturb_step` must be a non-negative finite number, got {self.perturb_step!r}.")
        if not is_int(self.perturb_max_steps) or self.perturb_max_steps < 0:
            raise ValueError(f"`perturb_max_steps` must be a non-negative integer, got {self.perturb_max_steps!r}.")
        if self.perturb not in PERTURB_MODES:
            raise ValueError(f"`perturb` must be one of {PERTURB_MODES}, got {self.perturb!r}.")
        if self.scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {self.scope!r}.")
        if self.max_clients is not None and (not is_int(self.max_clients) or self.max_clients < 1):
            raise ValueError(f"`max_clients` must be a positive integer or None, got {self.max_clients!r}.")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise ValueError(f"`seed` must be a non-negative integer or None, got {self.seed!r}.")
        if not isinstance(self.verbose, bool):
            raise ValueError(f"`verbose` must be a boolean, got {self.verbose!r}.")

    def set_params(self, **kwargs: Any) -> None:
        """
        Change parameters. Values are validated first; on error nothing changes. Parameters that change what fit
        learns mark QUEEN unfitted; ``r``, ``scope`` and ``alpha`` reset the query state.

        :param kwargs: Parameters from :attr:`params`.
        """
        unknown = set(kwargs) - set(self.params)
        if unknown:
            raise ValueError(f"Unknown QUEEN parameter(s): {sorted(unknown)}; valid names are {self.params}.")
        with self._lock:
            previous = {name: getattr(self, name) for name in kwargs}
            for name, value in kwargs.items():
                setattr(self, name, value)
            try:
                self._check_params()
            except ValueError:
                for name, value in previous.items():
                    setattr(self, name, value)
                raise
            changed = {name for name in kwargs if previous[name] != kwargs[name]}
            if changed & self._REFIT_PARAMS:
                self._is_fitted = False
            if changed & self._RESHADOW_PARAMS:
                self._is_fitted = False
            if changed & self._RESET_PARAMS:
                self._states = {}

    # ------------------------------------------------------------------------------------------------ binding
    def _on_attach(self, estimator: Any) -> None:
        from art_queen.model_access import ModelView

        if self._view is not None:
            if self._view.model is getattr(estimator, "model", estimator):
                return
            self._view.close()
        self._view = ModelView(estimator, head=self.head)
        nb_classes = getattr(estimator, "nb_classes", None)
        if nb_classes is not None and nb_classes != self.nb_classes:
            raise ValueError(f"QUEEN was created for {self.nb_classes} classes but the classifier has {nb_classes}.")
        if getattr(self, "_pending_shadow_states", None) is not None:
            # A loaded QUEEN: rebuild its shadow models from the saved weights now that the architecture is known.
            from art_queen.persistence import restore_pending_shadows

            try:
                restore_pending_shadows(self)
            except ValueError:
                self._view.close()
                self._view = None
                self._estimator = None
                raise

    @contextlib.contextmanager
    def handover(self, x: np.ndarray, client_id: Any = None) -> Iterator[None]:
        """
        Context in which postprocessing calls from this thread receive ``x``, and in which the features computed by
        the victim's own forward pass are captured (so QUEEN does not run the feature extractor a second time).

        :param x: Inputs of the ``predict`` call in progress.
        :param client_id: Identifier of the querying client.
        """
        view = self._view
        with super().handover(x, client_id):
            if view is not None:
                view.start_capture()
            try:
                yield
            finally:
                if view is not None:
                    view.stop_capture()

    # ------------------------------------------------------------------------------------------------------- fit
    def fit(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256, **kwargs: Any) -> Queen:  # type: ignore[override]
        """
        Fit QUEEN on the defender's training data: mapping network, embedding scale, class centres and radii (from
        all samples of each class), feature centres, and shadow models. Resets the query state.

        :param x: Training inputs, as given to the classifier's ``predict``.
        :param y: Training labels, class indices of shape `(n,)` or one-hot of shape `(n, nb_classes)`.
        :param batch_size: Batch size for feature extraction and shadow training.
        :return: self.
        """
        import torch

        from art_queen.mapping import mapping_widths, train_mapping_network
        from art_queen.shadows import train_shadow_models

        view = self._require_view()
        x = self._validate_inputs(x)
        labels = self._validate_labels(y, x.shape[0])

        features = view.features(x, batch_size=max(batch_size, 512)).float()
        label_tensor = torch.from_numpy(labels).to(features.device)
        generator = torch.Generator().manual_seed(0 if self.seed is None else int(self.seed))
        widths = mapping_widths(features.shape[1], self.embedding_dim, self.mapping_layers, self.step_down)
        network = train_mapping_network(
            features,
            label_tensor,
            widths,
            epochs=self.mapping_epochs,
            batch_size=256,
            learning_rate=1e-3,
            temperature=self.temperature,
            generator=generator,
            verbose=self.verbose,
        )
        with torch.no_grad():
            raw = network(features).double().cpu().numpy()
        centres = np.stack([raw[labels == c].mean(axis=0) for c in range(self.nb_classes)])
        radii = np.array([np.linalg.norm(raw[labels == c] - centres[c], axis=1).mean() for c in range(self.nb_classes)])
        scale = float(radii.mean())
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError("The mapping network collapsed all training features to one point; check the features.")

        feature_centres = torch.stack([features[label_tensor == c].mean(dim=0) for c in range(self.nb_classes)])
        spread = float((features - feature_centres[label_tensor]).norm(dim=1).mean())

        template = self.shadow_factory if self.shadow_factory is not None else view.model
        shadows = train_shadow_models(
            template,
            view.model_inputs(x),
            label_tensor,
            n_shadows=self.n_shadows,
            epochs=self.shadow_epochs,
            batch_size=64,
            learning_rate=1e-3,
            seed=1000 + (0 if self.seed is None else int(self.seed)),
            verbose=self.verbose,
        )

        with self._lock:
            self.mapping_network_ = network
            self.embedding_scale_ = scale
            self.class_centres_ = centres / scale
            self.class_mean_radius_ = radii / scale
            self.feature_centres_ = feature_centres
            self.feature_spread_ = spread
            self.shadows_ = shadows
            self._check_grid_range()
            self._is_fitted = True
            self.reset()
        logger.info(
            "QUEEN fitted: %d classes, class radii %s (standardised), reversal after about %s records per class.",
            self.nb_classes,
            np.round(self.class_mean_radius_, 3).tolist(),
            self.queries_before_reversal().astype(int).tolist(),
        )
        return self

    def _check_grid_range(self) -> None:
        reach = np.abs(self.class_centres_).max(axis=1) + self.sensitive_radii_
        largest_cell = float(reach.max()) / self.r + 2
        if largest_cell > (1 << (cell_coordinate_bits(self.embedding_dim) - 1)) - 2:
            raise ValueError(f"`r`={self.r} is too small for the record grid of this embedding; increase `r`.")

    # --------------------------------------------------------------------------------------------- the defence
    def defend(self, x: np.ndarray, preds: np.ndarray, client_id: Any = None, **kwargs: Any) -> np.ndarray:
        """
        Defended answers for queries ``x`` whose undefended model outputs are ``preds``; updates the query state.

        :param x: Queried inputs, as given to the classifier's ``predict``.
        :param preds: Model outputs for ``x``: probabilities or logits (rows that are not probability vectors are
                      put through a softmax), shape `(n, nb_classes)`.
        :param client_id: Client identifier; required when ``scope="per_client"``, ignored otherwise.
        :return: Defended probability rows, float32, shape `(n, nb_classes)`.
        """
        view = self._require_fitted()
        x = self._validate_inputs(x)
        preds = self._validate_preds(preds, x.shape[0])
        state_key = self._state_key(client_id)

        # inputs → features → embedding
        probabilities = self._probabilities(preds)
        features = self._features_of(x)
        embedding = self._embed_features(features)
        if not np.all(np.isfinite(embedding)):
            # Finite but extreme inputs (far outside the model's input range) overflow the features.
            raise ValueError(
                "The model's features of some inputs are not finite (inputs far outside the model's input range?); "
                "refusing to answer them."
            )
        classes = np.argmax(probabilities, axis=1)

        # decision: the only sequential, stateful step
        with self._lock:
            state = self._states.get(state_key)
            if state is None:
                if self.max_clients is not None and len(self._states) >= self.max_clients:
                    raise TooManyClientsError(
                        f"QUEEN already keeps the state of max_clients={self.max_clients} clients; refusing the new "
                        f"client id {client_id!r}."
                    )
                state = self._states[state_key] = QueryState(self.nb_classes, float(self.r), self.embedding_dim)
            cases = decide_cases(
                state, embedding, classes, self.class_centres_, self.sensitive_radii_, self.threshold, self.alpha
            )
            reversed_rows = np.flatnonzero(cases == CASE_REVERSED)
            subsets = self._draw_shadow_subsets(reversed_rows.size)
            self.last_cases = cases

        # answers
        answers = probabilities.astype(np.float64)
        kept_rows = np.flatnonzero(cases != CASE_REVERSED)
        if self.perturb == "all" and kept_rows.size and self.perturb_max_steps > 0 and self.perturb_step > 0:
            answers[kept_rows] = self._feature_perturbation(features, kept_rows, classes, answers)
        if reversed_rows.size:
            answers[reversed_rows] = self._gradient_reverse(view, x, reversed_rows, probabilities, subsets)
        return answers.astype(np.float32)

    def _probabilities(self, preds: np.ndarray) -> np.ndarray:
        from art_queen.model_access import to_probabilities

        return to_probabilities(preds).astype(np.float64)

    def _features_of(self, x: np.ndarray) -> torch.Tensor:
        view = self._require_view()
        captured = view.stop_capture()
        if captured is not None and captured.shape[0] == x.shape[0]:
            return captured.float()
        return view.features(x).float()

    def _embed_features(self, features: torch.Tensor) -> np.ndarray:
        from art_queen.mapping import embed

        return embed(self.mapping_network_, features, self.embedding_scale_)

    def _draw_shadow_subsets(self, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros((0, self.n_shadows), dtype=bool)
        chosen = np.argsort(self._rng.random((count, self.n_shadows)), axis=1)[:, : self.k]
        subsets = np.zeros((count, self.n_shadows), dtype=bool)
        np.put_along_axis(subsets, chosen, True, axis=1)
        return subsets

    def _gradient_reverse(
        self, view: ModelView, x: np.ndarray, rows: np.ndarray, probabilities: np.ndarray, subsets: np.ndarray
    ) -> np.ndarray:
        from art_queen.shadows import pirate_estimate

        pirate = pirate_estimate(self.shadows_, view.model_inputs(x[rows]), subsets)
        return gradient_reverse_target(probabilities[rows], pirate)

    def _feature_perturbation(
        self, features: torch.Tensor, rows: np.ndarray, classes: np.ndarray, probabilities: np.ndarray
    ) -> np.ndarray:
        """
        Move each feature vector towards the farthest class feature centre in ``perturb_max_steps`` steps and answer
        the head's softmax at the largest step such that every step up to it keeps the top-1 class. Rows for which
        even the first step changes the top-1 keep their unperturbed answer.

        For a linear head ``h(f) = W f + b`` the logits are affine along the path: with ``u = (m - f) / |m - f|``,
        ``h(f + s u) = h(f) + s (W m - W f) / |m - f|``, and ``W m`` of every class centre is one small product. So
        every step of every row is decided in the space of logits, without forming the perturbed features: the
        steps kept are those before the first zero crossing of the top-1 margin (the minimum of affine functions
        is concave, so the kept steps are a prefix). Rows whose margin is within rounding of zero at a deciding step
        are checked again by evaluating the head at every step. Other heads are evaluated at all steps of all rows
        in batched calls.
        """
        import torch

        view = self._require_view()
        step = self.perturb_step * self.feature_spread_
        multiples = torch.arange(1, self.perturb_max_steps + 1, dtype=features.dtype, device=features.device) * step
        nb_steps = multiples.numel()
        head: Any = view.head
        centres = self.feature_centres_
        affine = isinstance(head, torch.nn.Linear) and head.weight.dtype == features.dtype
        width = max(self.nb_classes, features.shape[1])
        chunk_rows = max(1, (1 << 22) // width if affine else min(_PERTURB_CHUNK, (1 << 22) // (nb_steps * width)))
        result = probabilities[rows].copy()
        if rows.size == 0 or nb_steps == 0:
            return result
        contiguous = bool(np.all(np.diff(rows) == 1))  # read the rows as a slice, without a copy

        def directions(feats: Any, farthest: Any) -> Any:
            direction = centres[farthest] - feats
            return direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)

        def steps_kept_by_evaluation(feats: Any, direction: Any, target: Any) -> Any:
            candidates = feats[:, None, :] + multiples[None, :, None] * direction[:, None, :]
            logits = view.head_logits(candidates.reshape(-1, feats.shape[1])).reshape(feats.shape[0], nb_steps, -1)
            return (logits.argmax(dim=2) == target[:, None]).to(torch.int64).cumprod(dim=1).sum(dim=1)

        with torch.no_grad():
            if affine:
                centre_logits = centres @ head.weight.T  # W m for every class centre, (C, C)
                bias = head.bias if head.bias is not None else torch.zeros_like(centre_logits[0])
            for start in range(0, rows.size, chunk_rows):
                chunk = rows[start : start + chunk_rows]
                if contiguous:
                    feats = features[int(chunk[0]) : int(chunk[-1]) + 1]
                else:
                    feats = features[torch.from_numpy(chunk).to(features.device)]
                target = torch.from_numpy(classes[chunk]).to(features.device)
                distances = torch.cdist(feats, centres)
                farthest = distances.argmax(dim=1)
                if not affine:
                    direction = directions(feats, farthest)
                    steps_kept = steps_kept_by_evaluation(feats, direction, target)
                    moved = torch.nonzero(steps_kept > 0).flatten()
                    if moved.numel():
                        chosen = feats[moved] + multiples[steps_kept[moved] - 1][:, None] * direction[moved]
                        answers = torch.softmax(view.head_logits(chosen).double(), dim=1)
                        result[start + moved.cpu().numpy()] = answers.cpu().numpy()
                    continue
                weighted = feats @ head.weight.T  # W f
                base = weighted + bias
                span = distances.gather(1, farthest[:, None]).clamp_min(1e-12)
                slope = (centre_logits[farthest] - weighted) / span  # W u
                # Margin of the target over class j at step s: gap_j + s * rate_j.
                target_column = target[:, None]
                gap = (base.gather(1, target_column) - base).scatter(1, target_column, float("inf"))
                rate = (slope.gather(1, target_column) - slope).scatter(1, target_column, 0.0)
                crossing = torch.where(rate < 0, gap / -rate, torch.full_like(gap, float("inf"))).amin(dim=1)
                steps_kept = torch.searchsorted(multiples, crossing.contiguous(), side="left")
                first_margin = (gap + multiples[0] * rate).amin(dim=1)
                steps_kept[first_margin <= 0] = 0
                # Rows whose margin is within rounding of zero at a deciding step are evaluated step by step.
                tolerance = 1e-4 * (1.0 + base.abs().amax(dim=1) + multiples[-1] * slope.abs().amax(dim=1))
                unsure = first_margin.abs() <= tolerance
                for deciding in (steps_kept, steps_kept + 1):
                    inside = (deciding >= 1) & (deciding <= nb_steps)
                    at = multiples[(deciding - 1).clamp(0, nb_steps - 1)]
                    unsure |= inside & ((gap + at[:, None] * rate).amin(dim=1).abs() <= tolerance)
                unsure = torch.nonzero(unsure).flatten()
                if unsure.numel():
                    direction = directions(feats[unsure], farthest[unsure])
                    steps_kept[unsure] = steps_kept_by_evaluation(feats[unsure], direction, target[unsure])
                moved = torch.nonzero(steps_kept > 0).flatten()
                if moved.numel():
                    logits = base[moved] + multiples[steps_kept[moved] - 1][:, None] * slope[moved]
                    answers = torch.softmax(logits.double(), dim=1)
                    result[start + moved.cpu().numpy()] = answers.cpu().numpy()
        return result

    # --------------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the query state (CQS, records, counters) of every client; keep the fitted parts."""
        with self._lock:
            self._states = {}
            self._rng = np.random.default_rng(self.seed)
            self.last_cases = None

    @property
    def sensitive_radii_(self) -> np.ndarray:
        """Sensitive radius of each class in the standardised embedding (``beta`` times its mean radius)."""
        if self.class_mean_radius_ is None:
            raise QueenNotFittedError("QUEEN is not fitted yet; call `fit(x_train, y_train)` first.")
        return self.beta * self.class_mean_radius_

    @property
    def stats(self) -> dict[str, Any]:
        """
        Counters of the query state, summed over clients: ``queries``, ``within`` (inside a sensitive region),
        ``outside``, ``covered``, ``recorded``, ``reversed``, ``records`` (stored), ``clients``, and ``cqs`` (per
        class; the maximum over clients under per-client scope).
        """
        with self._lock:
            totals = {"queries": 0, "outside": 0, "covered": 0, "recorded": 0, "reversed": 0}
            cqs = np.zeros(self.nb_classes)
            records = 0
            for state in self._states.values():
                for name in totals:
                    totals[name] += state.counts[name]
                cqs = np.maximum(cqs, state.cqs)
                records += len(state.records)
            return {
                **totals,
                "within": totals["covered"] + totals["recorded"] + totals["reversed"],
                "records": records,
                "clients": len(self._states),
                "cqs": cqs.tolist(),
            }

    def client_stats(self, client_id: Any) -> dict[str, Any]:
        """
        Counters and CQS of one client (per-client scope) or of the global state (``client_id=None``).

        :param client_id: Client identifier.
        :return: Dictionary like :attr:`stats` for that client alone.
        """
        with self._lock:
            state = self._states.get(self._state_key(client_id))
            if state is None:
                state = QueryState(self.nb_classes, float(self.r), self.embedding_dim)
            counts = dict(state.counts)
            counts["within"] = counts["covered"] + counts["recorded"] + counts["reversed"]
            counts["records"] = len(state.records)
            counts["cqs"] = state.cqs.tolist()
            return counts

    def recorded_points(self, client_id: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """
        Recorded query embeddings and their classes: of one client, or of all clients when ``client_id`` is `None`.

        :param client_id: Client identifier or `None`.
        :return: Pair of arrays `(R, embedding_dim)` and `(R,)`.
        """
        with self._lock:
            if client_id is None:
                states = list(self._states.values())
            else:
                state = self._states.get(self._state_key(client_id))
                states = [] if state is None else [state]
            parts = [state.records.points() for state in states]
        if not parts:
            return np.zeros((0, self.embedding_dim)), np.zeros(0, dtype=np.int64)
        return np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts])

    def embed(self, x: np.ndarray) -> np.ndarray:
        """
        Standardised embedding of inputs (the plane in which QUEEN decides).

        :param x: Inputs, as given to the classifier's ``predict``.
        :return: Array of shape `(n, embedding_dim)`.
        """
        view = self._require_fitted()
        x = self._validate_inputs(x)
        return self._embed_features(view.features(x).float())

    def queries_before_reversal(self) -> np.ndarray:
        """
        Estimated number of distinct recorded queries per class after which reversal starts, for the fitted radii
        and the current ``r``, ``threshold`` and ``alpha`` (see :func:`art_queen.core.queries_before_reversal`).

        :return: Array of shape `(nb_classes,)`.
        """
        return queries_before_reversal(self.r, self.threshold, self.sensitive_radii_, self.alpha)

    # ------------------------------------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """
        Save the fitted parts and the query state to one file, atomically (temporary file, fsync, rename).

        :param path: Destination file.
        """
        from art_queen.persistence import save_queen

        save_queen(self, path)

    @classmethod
    def load(cls, path: str, classifier: Any = None) -> Queen:
        """
        Load a QUEEN saved with :meth:`save`. The file holds tensors and plain data, no code: the shadow models are
        rebuilt from the protected model's architecture (or ``shadow_factory``) when the model becomes known, through
        ``classifier`` here or a later :meth:`bind`/:meth:`attach`.

        :param path: File written by :meth:`save`.
        :param classifier: Optional classifier (or ``torch.nn.Module``) to attach.
        :return: The loaded QUEEN.
        """
        from art_queen.persistence import load_queen

        return load_queen(path, classifier=classifier)

    def save_state(self, path: str) -> None:
        """
        Save only the query state (CQS, records, counters, random generator) atomically, for frequent checkpoints.

        :param path: Destination file.
        """
        from art_queen.persistence import save_queen_state

        save_queen_state(self, path)

    def load_state(self, path: str) -> None:
        """
        Replace the query state with one saved by :meth:`save_state`; the file must match this QUEEN's classes,
        embedding dimension and record radius, else nothing changes and a ``ValueError`` explains why.

        :param path: File written by :meth:`save_state`.
        """
        from art_queen.persistence import load_queen_state

        load_queen_state(self, path)

    # ---------------------------------------------------------------------------------------------- validation
    def _require_view(self) -> ModelView:
        if self._view is None:
            raise ValueError(
                "QUEEN is not attached to a model: call `queen.bind(classifier)` (or `queen.attach(model)`) first."
            )
        return self._view

    def _require_fitted(self) -> ModelView:
        if not self._is_fitted:
            raise QueenNotFittedError("QUEEN is not fitted yet; call `queen.fit(x_train, y_train)` before querying.")
        return self._require_view()

    def _state_key(self, client_id: Any) -> Hashable:
        if self.scope == "global":
            return None
        if client_id is None:
            raise ValueError(
                "QUEEN has scope='per_client' but the query carries no client id; call "
                "`classifier.predict(x, client_id=...)` or `queen.defend(x, preds, client_id=...)`."
            )
        if not isinstance(client_id, (str, int, np.integer)) or isinstance(client_id, bool):
            raise ValueError(f"A client id must be a string or an integer, got {type(client_id).__name__}.")
        return client_id if isinstance(client_id, str) else int(client_id)

    def _validate_inputs(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise ValueError(f"Inputs must be a numpy array, got {type(x).__name__}.")
        if x.ndim < 2:
            raise ValueError(f"Inputs must have a batch dimension and at least one feature dimension, got {x.shape}.")
        if x.shape[0] == 0:
            raise ValueError("The batch of inputs is empty.")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"Inputs must be floating point (float32 expected), got dtype {x.dtype}.")
        expected = getattr(self._estimator, "input_shape", None)
        if expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise ValueError(
                f"Inputs have shape {x.shape[1:]} per sample but the classifier expects {tuple(expected)}."
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("Inputs contain NaN or infinite values.")
        return x.astype(np.float32, copy=False)

    def _validate_preds(self, preds: Any, rows: int) -> np.ndarray:
        if not isinstance(preds, np.ndarray):
            raise ValueError(f"Predictions must be a numpy array, got {type(preds).__name__}.")
        if preds.ndim != 2 or preds.shape[1] != self.nb_classes:
            raise ValueError(f"Predictions must have shape (n, {self.nb_classes}), got {preds.shape}.")
        if preds.shape[0] != rows:
            raise ValueError(f"Got {rows} input rows but {preds.shape[0]} prediction rows; they must match.")
        if not np.issubdtype(preds.dtype, np.floating):
            raise ValueError(f"Predictions must be floating point, got dtype {preds.dtype}.")
        if not np.all(np.isfinite(preds)):
            raise ValueError("Predictions contain NaN or infinite values.")
        return preds

    def _validate_labels(self, y: Any, rows: int) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == self.nb_classes:
            y = np.argmax(y, axis=1)
        if y.ndim != 1 or y.shape[0] != rows:
            raise ValueError(f"Labels must be {rows} class indices or a one-hot array, got shape {y.shape}.")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.isfinite(y)) or not np.all(np.equal(np.mod(y, 1), 0)):
                raise ValueError("Labels must be integer class indices.")
        labels = y.astype(np.int64)
        if labels.min() < 0 or labels.max() >= self.nb_classes:
            raise ValueError(f"Labels must lie in [0, {self.nb_classes - 1}].")
        counts = np.bincount(labels, minlength=self.nb_classes)
        if np.any(counts < 2):
            missing = np.flatnonzero(counts < 2).tolist()
            raise ValueError(
                f"Every class needs at least 2 training samples to get a centre and radius; classes {missing} have "
                "fewer. QUEEN would leave them unprotected."
            )
        return labels
