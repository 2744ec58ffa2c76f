"""
This module implements Prediction Poisoning (Orekondy, Schiele and Fritz, ICLR 2020) with its MAD and MAD-argmax
variants: answers are perturbed, within an L1 budget, so that the gradient an attacker's model would take on them
points away from the gradient of the true answer.

| Paper link: https://arxiv.org/abs/1906.10908
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from art.config import ART_NUMPY_DTYPE
from tqdm.auto import tqdm, trange

from art_queen.defences._common import (
    DefenceNotFittedError,
    check_inputs,
    check_labels,
    check_predictions,
)
from art_queen.input_channel import InputAwarePostprocessor
from art_queen.model_access import (
    log_probabilities,
    outputs_are_probabilities,
    reinitialised_copy,
    to_probabilities,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

#: Up to this many classes, MAD-argmax evaluates every argmax-preserving extreme point (2^(C-1) of them); above it,
#: it grows the support greedily, one class at a time.
EXHAUSTIVE_ARGMAX_MAX_CLASSES = 11

#: Extra weight of the kept top-1 class in MAD-argmax's extreme points, so that the top-1 label wins strictly.
ARGMAX_MARGIN = 1e-3


class PredictionPoisoning(InputAwarePostprocessor):
    """
    Prediction Poisoning by maximising angular deviation (MAD), and its top-1-preserving variant MAD-argmax.

    For a query ``x`` with victim probabilities ``p``, let ``G`` be the Jacobian of a surrogate model's
    log-probabilities with respect to its parameters (by default, as in the paper, the parameters of its last layer),
    so that ``G^T y`` is, up to sign, the gradient an attacker's model would follow when trained on the answer ``y``.
    MAD answers the ``y`` on the probability simplex with ``||y - p||_1 <= epsilon`` that makes ``G^T y`` deviate
    most in angle from ``G^T p``, i.e. maximises ``|| G^T y / ||G^T y|| - G^T p / ||G^T p|| ||^2``. The paper's
    heuristic, used here: evaluate the objective at extreme points ``y*`` of the simplex, pick the best, and answer
    ``y = p + t (y* - p)`` with ``t = min(1, epsilon / ||y* - p||_1)``.

    * ``variant="mad"``: the extreme points are the one-hot vectors of all classes.
    * ``variant="mad_argmax"``: the extreme points are those of the region of the simplex where the victim's top-1
      class ``c`` stays the largest entry, i.e. uniform distributions over class sets that contain ``c`` (with ``c``
      slightly up-weighted so that it wins strictly). The segment from ``p`` to such a point stays in the region, so
      the top-1 label is kept. Up to :data:`EXHAUSTIVE_ARGMAX_MAX_CLASSES` classes all ``2^(C-1)`` such points are
      evaluated, above that the class set is grown greedily.

    ``selection="vertex"`` (default) is the paper's heuristic: the extreme point is chosen by the objective *at the
    point*. For a confident ``p`` this often favours points with a small gradient (for MAD-argmax, near-uniform rows,
    when the fresh surrogate's output is near uniform), and the budget-limited step towards them barely turns the
    gradient. ``selection="answer"`` chooses,
    among the same extreme points, the one whose budget-limited answer ``y`` deviates most: the same cost and a
    stronger defence at the same ``epsilon`` (a refinement of the paper's heuristic, not in the paper).

    The surrogate is, as in the paper, a freshly initialised copy of the victim's model (an attacker's model early in
    its training), created when the defence is bound; :meth:`fit` can train it briefly. Jacobians of all queries of a
    batch are computed at once with ``torch.func`` (``vmap`` of ``jacrev`` over ``functional_call``); the objective
    only needs the Gram matrix ``G G^T`` (``C x C``), so its cost does not grow with the number of parameters.

    With the default ``jacobian_parameters="head"`` and a linear last layer, ``G^T y = (y - q) (x) [f, 1]`` where
    ``q`` are the surrogate's probabilities and ``f`` its features, so the objective is the angle between ``y - q``
    and ``p - q``; ``"all"`` uses the Jacobian for all parameters (more faithful to a deep attacker's gradient,
    memory ``O(batch_size * C * n_parameters)``).

    | Paper link: https://arxiv.org/abs/1906.10908
    """

    params = ["epsilon", "variant", "selection", "jacobian_parameters", "seed", "batch_size", "verbose"]

    _variants = ("mad", "mad_argmax")
    _selections = ("vertex", "answer")
    _jacobian_parameter_choices = ("head", "all")

    def __init__(
        self,
        epsilon: float = 0.5,
        variant: str = "mad",
        selection: str = "vertex",
        jacobian_parameters: str = "head",
        seed: int = 0,
        batch_size: int = 128,
        verbose: bool = False,
        apply_fit: bool = False,
        apply_predict: bool = True,
    ) -> None:
        """
        Create a PredictionPoisoning postprocessor.

        :param epsilon: Positive L1 budget of the perturbation of each answer (the L1 distance between two
                        probability rows is at most 2, so ``epsilon >= 2`` means no limit).
        :param variant: ``"mad"`` (any answer) or ``"mad_argmax"`` (keep the victim's top-1 label).
        :param selection: ``"vertex"`` (the paper's heuristic: pick the extreme point with the largest deviation at
                          the point itself) or ``"answer"`` (pick the extreme point whose budget-limited answer has the
                          largest deviation; same candidates and cost, a stronger defence at the same ``epsilon``).
        :param jacobian_parameters: ``"head"`` (the surrogate's last layer, as in the paper) or ``"all"`` (all
                                    parameters of the surrogate).
        :param seed: Seed of the surrogate's initialisation and of the batch order in :meth:`fit`.
        :param batch_size: Queries per batched Jacobian computation.
        :param verbose: Show progress bars.
        :param apply_fit: True if applied during fitting/training.
        :param apply_predict: True if applied during predicting.
        """
        super().__init__(is_fitted=True, apply_fit=apply_fit, apply_predict=apply_predict)
        self.epsilon = epsilon
        self.variant = variant
        self.selection = selection
        self.jacobian_parameters = jacobian_parameters
        self.seed = seed
        self.batch_size = batch_size
        self.verbose = verbose
        self._check_params()
        self._view: Any = None
        self.surrogate_: torch.nn.Module | None = None

    # ------------------------------------------------------------------------------------------------- set-up
    def _on_attach(self, estimator: Any) -> None:
        from art_queen.model_access import ModelView

        view = ModelView(estimator)
        view.close()  # only the model, its head's name, its device and its preprocessing are needed
        surrogate = reinitialised_copy(view.model, self.seed).to(view.device)
        surrogate.eval()
        self._view = view
        self.surrogate_ = surrogate

    def _require_surrogate(self) -> torch.nn.Module:
        if self.surrogate_ is None:
            raise DefenceNotFittedError(
                "PredictionPoisoning has no surrogate model yet: bind it to the classifier (`defence.bind(classifier)`)"
                " or attach the victim's model (`defence.attach(model)`) first."
            )
        return self.surrogate_

    def fit(  # pylint: disable=arguments-renamed
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        nb_epochs: int = 1,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        """
        Train the surrogate briefly, as an attacker early in its training would be, with soft-label cross-entropy.

        Without ``y`` the surrogate learns the victim's own probabilities on ``x`` (computed with the victim's model
        directly, not through the defended ``predict``).

        :param x: Inputs, in the format the protected classifier's ``predict`` takes.
        :param y: Optional labels: class indices `(n,)` or probability / one-hot rows `(n, C)`.
        :param nb_epochs: Number of epochs (positive integer).
        :param batch_size: Batch size (positive integer).
        :param learning_rate: Learning rate of the Adam optimiser (positive).
        :raises DefenceNotFittedError: If the defence is not bound or attached yet.
        :raises ValueError: If the data or the training parameters are invalid.
        """
        import copy

        import torch

        from art_queen.defences.adaptive_misinformation import _check_training_params

        surrogate = self._require_surrogate()
        _check_training_params(nb_epochs, batch_size, learning_rate)
        inputs = self._view.model_inputs(check_inputs(x, len(x)))
        device = self._view.device
        with torch.no_grad():
            probe = surrogate(inputs[:1]).reshape(1, -1)
        nb_classes = probe.shape[1]
        are_probabilities = outputs_are_probabilities(probe)
        if y is None:
            was_training = self._view.model.training
            self._view.model.eval()
            with torch.no_grad():
                outputs = torch.cat(
                    [self._view.model(inputs[i : i + 512]) for i in range(0, inputs.shape[0], 512)]
                ).reshape(inputs.shape[0], -1)
            self._view.model.train(was_training)
            targets = log_probabilities(outputs, outputs_are_probabilities(outputs)).exp().float()
        else:
            labels = np.asarray(y)
            if labels.ndim == 2 and labels.dtype.kind == "f":
                check_labels(labels, inputs.shape[0], nb_classes)  # shape and finiteness
                targets = torch.from_numpy(to_probabilities(labels)).to(device)
            else:
                indices = torch.from_numpy(check_labels(labels, inputs.shape[0], nb_classes)).to(device)
                targets = torch.nn.functional.one_hot(indices, nb_classes).float()
        if targets.shape != (inputs.shape[0], nb_classes):
            raise ValueError(f"The victim answers {targets.shape[1]} classes but the surrogate {nb_classes}.")

        model = copy.deepcopy(surrogate)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        generator = torch.Generator().manual_seed(self.seed)
        model.train()
        for _ in trange(nb_epochs, desc="Surrogate", disable=not self.verbose):
            order = torch.randperm(inputs.shape[0], generator=generator).to(device)
            for start in range(0, inputs.shape[0], batch_size):
                batch = order[start : start + batch_size]
                outputs = model(inputs[batch]).reshape(len(batch), -1)
                loss = -(targets[batch] * log_probabilities(outputs, are_probabilities)).sum(dim=1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        self.surrogate_ = model

    # ---------------------------------------------------------------------------------------------- gradients
    def _jacobian_parameter_names(self, surrogate: torch.nn.Module) -> list[str]:
        if self.jacobian_parameters == "all":
            return [name for name, parameter in surrogate.named_parameters() if parameter.requires_grad]
        head_name = self._view.head_name
        head = surrogate if head_name == "" else surrogate.get_submodule(head_name)
        prefix = f"{head_name}." if head_name else ""
        return [prefix + name for name, _ in head.named_parameters()]

    def surrogate_jacobian(self, x: np.ndarray) -> torch.Tensor:
        """
        Per-query Jacobians ``G`` of the surrogate's log-probabilities with respect to the selected parameters.

        :param x: Inputs, in the format the protected classifier's ``predict`` takes.
        :return: Tensor of shape `(n, C, D)` (``D`` = number of selected parameters), on the model's device.
        """
        self._require_surrogate()
        return self._jacobian(self._view.model_inputs(check_inputs(x, len(x))))

    def _jacobian(self, inputs: torch.Tensor) -> torch.Tensor:
        import torch
        from torch.func import functional_call, jacrev, vmap

        surrogate = self._require_surrogate()
        names = self._jacobian_parameter_names(surrogate)
        parameters = {name: value.detach() for name, value in surrogate.named_parameters()}
        differentiated = {name: parameters.pop(name) for name in names}
        fixed = {**parameters, **{name: value.detach() for name, value in surrogate.named_buffers()}}
        with torch.no_grad():
            are_probabilities = outputs_are_probabilities(surrogate(inputs).reshape(inputs.shape[0], -1))

        def row_log_probabilities(weights: dict[str, torch.Tensor], row: torch.Tensor) -> torch.Tensor:
            outputs = functional_call(surrogate, {**fixed, **weights}, (row.unsqueeze(0),))
            return log_probabilities(outputs.reshape(-1), are_probabilities)

        jacobians = vmap(jacrev(row_log_probabilities), in_dims=(None, 0))(differentiated, inputs)
        nb_rows = inputs.shape[0]
        return torch.cat([jacobians[name].reshape(nb_rows, -1, jacobians[name][0, 0].numel()) for name in names], dim=2)

    def _gram(self, inputs: torch.Tensor) -> np.ndarray:
        jacobian = self._jacobian(inputs).double()
        return (jacobian @ jacobian.transpose(1, 2)).cpu().numpy()

    # ------------------------------------------------------------------------------------------------- answer
    def defend(self, x: np.ndarray, preds: np.ndarray, **kwargs: Any) -> np.ndarray:
        """
        Poison each answer within the L1 budget ``epsilon``.

        :param x: Queried inputs, as given to the classifier's ``predict``.
        :param preds: The victim's outputs for ``x`` (probabilities or logits), shape `(n, C)`.
        :param kwargs: Ignored (for example ``client_id``: this defence keeps no per-client state).
        :return: Probability rows of shape `(n, C)`, float32, each within L1 distance ``epsilon`` of the victim's.
        :raises DefenceNotFittedError: If the defence is not bound or attached yet.
        :raises ValueError: On empty, non-finite or mismatched ``x`` and ``preds``.
        """
        values = check_predictions(preds)
        inputs = check_inputs(x, values.shape[0])
        self._require_surrogate()
        victim = to_probabilities(values).astype(np.float64)
        answers = np.empty_like(victim)
        starts = range(0, victim.shape[0], self.batch_size)
        for start in tqdm(starts, desc="Prediction poisoning", disable=not self.verbose):
            stop = start + self.batch_size
            gram = self._gram(self._view.model_inputs(inputs[start:stop]))
            if gram.shape[1] != victim.shape[1]:
                raise ValueError(
                    f"The surrogate answers {gram.shape[1]} classes but the predictions have {victim.shape[1]}."
                )
            answers[start:stop] = self._poison(victim[start:stop], gram)
        answers = answers.astype(ART_NUMPY_DTYPE)
        answers /= answers.sum(axis=1, keepdims=True)
        if self.variant == "mad_argmax":
            # Guard against float32 rounding of near-ties: such rows keep the victim's answer.
            flipped = np.argmax(answers, axis=1) != np.argmax(victim.astype(ART_NUMPY_DTYPE), axis=1)
            answers[flipped] = victim[flipped]
        return answers

    def _poison(self, victim: np.ndarray, gram: np.ndarray) -> np.ndarray:
        """Move each row of ``victim`` towards its chosen extreme point, by at most ``epsilon`` in L1."""
        scorer = _Scorer(victim, gram, float(self.epsilon) if self.selection == "answer" else None)
        if self.variant == "mad":
            target = _best_vertex(scorer)
        elif victim.shape[1] <= EXHAUSTIVE_ARGMAX_MAX_CLASSES:
            target = _best_argmax_preserving_point(scorer)
        else:
            target = _greedy_argmax_preserving_point(scorer)
        distance = np.abs(target - victim).sum(axis=1)
        step = np.minimum(1.0, float(self.epsilon) / np.maximum(distance, 1e-300))
        return victim + step[:, None] * (target - victim)

    def angular_deviation(self, x: np.ndarray, answers: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """
        Angle (radians) between the surrogate gradients ``G^T y`` of the answers and ``G^T p`` of the victim's rows.

        MAD's objective ``|| G^T y / ||G^T y|| - G^T p / ||G^T p|| ||^2`` equals ``2 - 2 cos(angle)``.

        :param x: Queried inputs.
        :param answers: Answers ``y``, probability rows of shape `(n, C)`.
        :param preds: The victim's outputs for ``x`` (probabilities or logits), shape `(n, C)`.
        :return: Angles in [0, pi] of shape `(n,)`, float64.
        """
        victim = to_probabilities(check_predictions(preds)).astype(np.float64)
        answered = check_predictions(answers)
        if answered.shape != victim.shape:
            raise ValueError(f"The answers have shape {answered.shape} but the predictions {victim.shape}.")
        inputs = check_inputs(x, victim.shape[0])
        self._require_surrogate()
        gram = np.concatenate(
            [
                self._gram(self._view.model_inputs(inputs[start : start + self.batch_size]))
                for start in range(0, victim.shape[0], self.batch_size)
            ]
        )
        return np.arccos(_cosines(answered[:, None, :], victim, gram)[:, 0])

    def _check_params(self) -> None:
        if (
            isinstance(self.epsilon, bool)
            or not isinstance(self.epsilon, (int, float, np.integer, np.floating))
            or not np.isfinite(self.epsilon)
            or self.epsilon <= 0
        ):
            raise ValueError(f"The parameter `epsilon` must be a positive finite number, but it is {self.epsilon!r}.")
        if self.variant not in self._variants:
            raise ValueError(f"The parameter `variant` must be one of {self._variants}, but it is {self.variant!r}.")
        if self.selection not in self._selections:
            raise ValueError(
                f"The parameter `selection` must be one of {self._selections}, but it is {self.selection!r}."
            )
        if self.jacobian_parameters not in self._jacobian_parameter_choices:
            raise ValueError(
                f"The parameter `jacobian_parameters` must be one of {self._jacobian_parameter_choices}, but it is "
                f"{self.jacobian_parameters!r}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"The parameter `seed` must be a non-negative integer, but it is {self.seed!r}.")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, (int, np.integer))
            or self.batch_size < 1
        ):
            raise ValueError(f"The parameter `batch_size` must be a positive integer, but it is {self.batch_size!r}.")
        if not isinstance(self.verbose, bool):
            raise ValueError(f"The parameter `verbose` must be a boolean, but it is {self.verbose!r}.")


# ------------------------------------------------------------------------------------------- the objective
def _cosines(candidates: np.ndarray, victim: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """
    Cosines between ``G^T v`` for candidate rows ``v`` and ``G^T p``, from the Gram matrices ``G G^T``.

    :param candidates: `(n, m, C)`.
    :param victim: `(n, C)`.
    :param gram: `(n, C, C)`.
    :return: `(n, m)`.
    """
    gram_victim = np.einsum("ncd,nd->nc", gram, victim)
    victim_norm2 = np.einsum("nc,nc->n", victim, gram_victim)
    candidate_dot = np.einsum("nmc,nc->nm", candidates, gram_victim)
    candidate_norm2 = np.einsum("nmc,nmc->nm", candidates @ gram, candidates)
    return _cosine_from_parts(candidate_dot, candidate_norm2, victim_norm2, gram)


def _cosine_from_parts(
    dot: np.ndarray, candidate_norm2: np.ndarray, victim_norm2: np.ndarray, gram: np.ndarray
) -> np.ndarray:
    """
    ``cos = dot / sqrt(candidate_norm2 * victim_norm2)``, with shapes `(n, m)`, `(n, m)`, `(n,)`. A zero gradient has
    no direction: its cosine is taken as 1 (no deviation).
    """
    scale = np.maximum(np.trace(gram, axis1=1, axis2=2), 1e-300)[:, None]
    valid = (candidate_norm2 > 1e-12 * scale) & (victim_norm2[:, None] > 1e-12 * scale)
    denominator = np.sqrt(np.maximum(candidate_norm2, 0.0) * np.maximum(victim_norm2, 0.0)[:, None])
    cosine = np.where(valid, dot / np.where(valid, denominator, 1.0), 1.0)
    return np.clip(cosine, -1.0, 1.0)


class _Scorer:
    """
    Scores candidate extreme points ``v`` (probability rows) of each query by a cosine to minimise.

    With ``epsilon=None`` (the paper's heuristic) the score is the cosine between ``G^T v`` and ``G^T p``; otherwise
    it is the cosine for the answer ``y = p + t (v - p)``, ``t = min(1, epsilon / ||v - p||_1)``, that ``v`` leads
    to. Candidates are described by ``a = v^T K p``, ``b = v^T K v`` (``K = G G^T``) and ``||v - p||_1``.
    """

    def __init__(self, victim: np.ndarray, gram: np.ndarray, epsilon: float | None) -> None:
        self.victim = victim
        self.gram = gram
        self.epsilon = epsilon
        self.gram_victim = np.einsum("ncd,nd->nc", gram, victim)
        self.victim_norm2 = np.einsum("nc,nc->n", victim, self.gram_victim)

    def score(self, dot: np.ndarray, norm2: np.ndarray, distance: np.ndarray) -> np.ndarray:
        """
        :param dot: ``v^T K p``, shape `(n, m)`.
        :param norm2: ``v^T K v``, shape `(n, m)`.
        :param distance: ``||v - p||_1``, shape `(n, m)`.
        :return: Cosines, shape `(n, m)`.
        """
        if self.epsilon is not None:
            step = np.minimum(1.0, self.epsilon / np.maximum(distance, 1e-300))
            keep = 1.0 - step
            victim_norm2 = self.victim_norm2[:, None]
            dot, norm2 = (
                keep * victim_norm2 + step * dot,
                keep**2 * victim_norm2 + 2.0 * step * keep * dot + step**2 * norm2,
            )
        return _cosine_from_parts(dot, norm2, self.victim_norm2, self.gram)

    def score_points(self, points: np.ndarray) -> np.ndarray:
        """
        :param points: Candidate probability rows, shape `(n, m, C)`.
        :return: Cosines, shape `(n, m)`.
        """
        dot = np.einsum("nmc,nc->nm", points, self.gram_victim)
        norm2 = np.einsum("nmc,nmc->nm", points @ self.gram, points)
        distance = np.abs(points - self.victim[:, None, :]).sum(axis=-1)
        return self.score(dot, norm2, distance)


def _best_vertex(scorer: _Scorer) -> np.ndarray:
    """MAD: the best one-hot vector."""
    victim, gram = scorer.victim, scorer.gram
    cosine = scorer.score(scorer.gram_victim, np.diagonal(gram, axis1=1, axis2=2).copy(), 2.0 * (1.0 - victim))
    return np.eye(victim.shape[1])[np.argmin(cosine, axis=1)]


def _argmax_preserving_points(supports: np.ndarray, top: np.ndarray) -> np.ndarray:
    """
    Uniform distributions over class sets that contain the top-1 class, with the top-1 class up-weighted.

    :param supports: Boolean class sets of shape `(n, C)` or `(n, m, C)`, each containing its row's top class.
    :param top: Top-1 class of each row, shape `(n,)`.
    :return: Probability rows of the same shape as ``supports``.
    """
    points = supports.astype(np.float64)
    rows = np.arange(top.shape[0])
    if points.ndim == 2:
        points[rows, top] += ARGMAX_MARGIN
    else:
        points[rows, :, top] += ARGMAX_MARGIN
    return points / points.sum(axis=-1, keepdims=True)


def _best_argmax_preserving_point(scorer: _Scorer) -> np.ndarray:
    """MAD-argmax, exhaustive: the best of the ``2^(C-1)`` extreme points of the region where the top-1 class wins."""
    nb_rows, nb_classes = scorer.victim.shape
    top = np.argmax(scorer.victim, axis=1)
    subsets = (np.arange(2 ** (nb_classes - 1))[:, None] >> np.arange(nb_classes - 1)) & 1  # (m, C-1)
    templates = np.stack([np.insert(subsets, c, 1, axis=1) for c in range(nb_classes)]).astype(bool)  # (C, m, C)
    candidates = _argmax_preserving_points(templates[top], top)  # (n, m, C)
    cosine = scorer.score_points(candidates)
    return candidates[np.arange(nb_rows), np.argmin(cosine, axis=1)]


def _greedy_argmax_preserving_point(scorer: _Scorer) -> np.ndarray:
    """
    MAD-argmax, greedy: grow the class set from the top-1 class, adding the class that gives the smallest cosine,
    and keep the best point seen. Inner products and distances are updated incrementally: ``O(C^2)`` per row.
    """
    victim, gram = scorer.victim, scorer.gram
    nb_rows, nb_classes = victim.shape
    rows = np.arange(nb_rows)
    top = np.argmax(victim, axis=1)
    diagonal = np.diagonal(gram, axis1=1, axis2=2)
    weight = 1.0 + ARGMAX_MARGIN
    # Unnormalised point u = 1_S + margin * e_top with mass `total`; the candidate is u / total.
    support = np.zeros((nb_rows, nb_classes), dtype=bool)
    support[rows, top] = True
    unnormalised = support * 1.0
    unnormalised[rows, top] = weight
    total = weight
    dot = weight * scorer.gram_victim[rows, top]
    norm2 = weight**2 * gram[rows, top, top]
    gram_point = weight * gram[rows, :, top]
    best_support = support.copy()
    best_cosine = scorer.score(
        (dot / total)[:, None], (norm2 / total**2)[:, None], np.abs(unnormalised / total - victim).sum(axis=1)[:, None]
    )[:, 0]
    for _ in range(nb_classes - 1):
        new_total = total + 1.0
        candidate_dot = dot[:, None] + scorer.gram_victim
        candidate_norm2 = norm2[:, None] + 2.0 * gram_point + diagonal
        # ||(u + e_k) / new_total - p||_1 for k outside the set, where u_k = 0.
        base = np.abs(unnormalised / new_total - victim).sum(axis=1, keepdims=True)
        distance = base - victim + np.abs(1.0 / new_total - victim)
        cosine = scorer.score(candidate_dot / new_total, candidate_norm2 / new_total**2, distance)
        cosine[support] = np.inf
        choice = np.argmin(cosine, axis=1)
        support[rows, choice] = True
        unnormalised[rows, choice] = 1.0
        total = new_total
        dot = candidate_dot[rows, choice]
        norm2 = candidate_norm2[rows, choice]
        gram_point = gram_point + gram[rows, :, choice]
        better = cosine[rows, choice] < best_cosine
        best_support[better] = support[better]
        best_cosine = np.where(better, cosine[rows, choice], best_cosine)
    return _argmax_preserving_points(best_support, top)
