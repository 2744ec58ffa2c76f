"""
Saving and loading QUEEN: the fitted defence and its query state, in one file, written atomically.

File format (``torch.save`` of a dictionary of tensors and plain Python data, read back with
``torch.load(..., weights_only=True)``, so loading never runs code from the file):

* ``format`` (``"art_queen.Queen"``), ``version`` (:data:`FORMAT_VERSION`), ``kind`` (``"queen"`` for
  :func:`save_queen`, ``"queen_state"`` for :func:`save_queen_state`);
* ``params``: QUEEN's parameters (:attr:`art_queen.Queen.params`) and ``head`` (the head module's name);
* ``fit`` (full files of a fitted QUEEN, else `None`): mapping network widths and ``state_dict``, embedding scale,
  class centres and mean radii, feature centres and spread, one ``state_dict`` per shadow model;
* ``state``: number of classes, embedding dimension, ``r``, ``alpha``, ``scope``, a fingerprint of the fit the state
  belongs to; the clients as columns (``client_ids``, ``cqs`` `(K, C)`, ``counts`` `(K, 5)` with ``count_names``,
  ``record_counts`` `(K,)`, and all records concatenated: ``points`` `(R, e)`, ``classes`` `(R,)`), so that the file
  holds a handful of tensors however many clients there are; and the random generator's state as plain data
  (``Generator.bit_generator.state``);
* ``checksum``: SHA-256 of everything else (tensors by dtype, shape and bytes).

Writes are atomic: the file is written to a temporary file in the destination's folder, flushed and ``fsync``-ed,
renamed over the destination with ``os.replace``, and the folder is ``fsync``-ed; a process killed mid-save leaves
the previous file intact (and at worst a stray ``.<name>.*.tmp`` file next to it). Loading checks the format, the
version and every shape before anything changes, and refuses a mismatched or corrupt file with a ``ValueError``.

The shadow models are stored as ``state_dict`` s only. On loading, they are rebuilt, when QUEEN learns the protected
model (``classifier=`` here, or a later ``bind``/``attach``), as re-initialised copies of that model (or with
``shadow_factory``) and the saved weights are loaded into them; until then QUEEN refuses to answer.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from art_queen.queen import Queen

logger = logging.getLogger(__name__)

FORMAT_NAME = "art_queen.Queen"
"""Value of the ``format`` entry of every QUEEN file."""
FORMAT_VERSION = 1
"""Version of the file layout; files of another version are refused."""
KIND_QUEEN = "queen"
KIND_STATE = "queen_state"

_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


# ------------------------------------------------------------------------------------------------------ public API
def save_queen(queen: Queen, path: str | os.PathLike) -> None:
    """
    Save a QUEEN (parameters, fitted parts and query state) to one file, atomically.

    The snapshot is taken under QUEEN's lock, so it is consistent with concurrent queries; the file is written
    outside the lock. A QUEEN loaded from a file whose shadow models are still waiting for the protected model saves
    those pending weights.

    :param queen: The QUEEN to save (fitted or not).
    :param path: Destination file.
    """
    with queen._lock:
        payload = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "kind": KIND_QUEEN,
            "params": _params_of(queen),
            "fit": _fit_of(queen) if queen.is_fitted else None,
            "state": _state_of(queen),
        }
    _atomic_torch_save(payload, path)
    logger.info("Saved QUEEN to %s.", os.fspath(path))


def save_queen_state(queen: Queen, path: str | os.PathLike) -> None:
    """
    Save only QUEEN's query state (CQS, records, counters per client; random generator), atomically. Small and fast,
    for frequent checkpoints of a running server.

    :param queen: The QUEEN whose state is saved.
    :param path: Destination file.
    """
    with queen._lock:
        payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": KIND_STATE, "state": _state_of(queen)}
    _atomic_torch_save(payload, path)
    logger.info("Saved QUEEN state to %s.", os.fspath(path))


def load_queen(
    path: str | os.PathLike,
    classifier: Any = None,
    shadow_factory: Callable[[], Any] | None = None,
) -> Queen:
    """
    Load a QUEEN written by :func:`save_queen`.

    The shadow models are rebuilt when the protected model is known: from ``classifier`` here, or from a later
    ``queen.bind(classifier)`` / ``queen.attach(model)``. To route a classifier's ``predict`` through the loaded
    QUEEN, create the classifier with ``postprocessing_defences=[queen]`` and call ``queen.bind(classifier)``.

    :param path: File written by :func:`save_queen`.
    :param classifier: Optional ART classifier (or ``torch.nn.Module``) to attach right away.
    :param shadow_factory: Optional callable returning a fresh shadow model, for shadows whose architecture differs
                           from the protected model's.
    :return: The loaded QUEEN.
    :raises ValueError: If the file is corrupt, of another format or version, or inconsistent.
    """
    from art_queen.queen import Queen

    payload = _read(path)
    if payload["kind"] != KIND_QUEEN:
        raise ValueError(
            f"{os.fspath(path)!r} holds only a QUEEN state (kind {payload['kind']!r}); load it into an existing QUEEN "
            "with `queen.load_state(path)`."
        )
    params = _require_dict(payload, "params", path)
    head = params.pop("head", None)
    if head is not None and not isinstance(head, str):
        raise ValueError(f"{os.fspath(path)!r}: the saved `head` must be a module name, got {type(head).__name__}.")
    unknown = set(params) - set(Queen.params)
    if unknown:
        raise ValueError(f"{os.fspath(path)!r} holds unknown QUEEN parameters {sorted(unknown)}.")
    try:
        queen = Queen(**params, head=head, shadow_factory=shadow_factory)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)!r} holds invalid QUEEN parameters: {error}") from error

    fit = payload.get("fit")
    fitted = _validate_fit(fit, queen, path) if fit is not None else None
    state_payload = _require_dict(payload, "state", path)
    fingerprint = _fingerprint_of_parts(fitted) if fitted is not None else None
    states, rng = _validate_state(state_payload, queen, fingerprint, path)

    if fitted is not None:
        queen.mapping_network_ = fitted["mapping_network"]
        queen.embedding_scale_ = fitted["embedding_scale"]
        queen.class_centres_ = fitted["class_centres"]
        queen.class_mean_radius_ = fitted["class_mean_radius"]
        queen.feature_centres_ = fitted["feature_centres"]
        queen.feature_spread_ = fitted["feature_spread"]
        queen.shadows_ = []
        queen._pending_shadow_states = fitted["shadow_states"]
        queen._is_fitted = True
    queen._states = states
    queen._rng = rng
    logger.info("Loaded QUEEN from %s (%s).", os.fspath(path), "fitted" if fit is not None else "not fitted")
    if classifier is not None:
        queen.attach(classifier)
    return queen


def load_queen_state(queen: Queen, path: str | os.PathLike) -> None:
    """
    Replace ``queen``'s query state with the one in ``path`` (written by :func:`save_queen_state`, or the state part
    of a file written by :func:`save_queen`).

    The file is read and checked completely (format, version, classes, embedding dimension, ``r``, ``alpha``,
    ``scope``, that it belongs to this QUEEN's fit, every array's shape and values) before the live state is swapped,
    under QUEEN's lock; on any error the state is left untouched.

    :param queen: The QUEEN to restore.
    :param path: File holding a saved state.
    :raises ValueError: If the file is corrupt or does not match ``queen``.
    """
    payload = _read(path)
    state_payload = _require_dict(payload, "state", path)
    with queen._lock:
        fingerprint = fit_fingerprint(queen) if queen.is_fitted else None
        states, rng = _validate_state(state_payload, queen, fingerprint, path)
        queen._states = states
        queen._rng = rng
        queen.last_cases = None
    logger.info("Loaded QUEEN state from %s.", os.fspath(path))


def restore_pending_shadows(queen: Queen) -> None:
    """
    Rebuild the shadow models of a loaded QUEEN now that its model is attached: re-initialised copies of the
    protected model (or ``queen.shadow_factory()``) with the saved weights loaded, and move the mapping network and
    feature centres to the model's device. Called by ``Queen._on_attach``.

    :param queen: A QUEEN with pending shadow weights and an attached model view.
    :raises ValueError: If the saved weights do not fit the rebuilt shadow models.
    """
    import torch

    from art_queen.model_access import reinitialised_copy

    pending = getattr(queen, "_pending_shadow_states", None)
    view = queen._view
    if pending is None or view is None:
        return
    shadows = []
    with torch.random.fork_rng(devices=[]):  # re-initialising the copies must not disturb the global torch RNG
        for index, weights in enumerate(pending):
            shadow = (
                queen.shadow_factory() if queen.shadow_factory is not None else reinitialised_copy(view.model, index)
            )
            try:
                shadow.load_state_dict(weights, strict=True)
            except (RuntimeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"The saved weights of shadow model {index} do not fit the attached model's architecture; attach "
                    "the model QUEEN was saved with, or set `queen.shadow_factory` to build the saved shadow "
                    f"architecture. Details: {error}"
                ) from error
            shadow = shadow.to(view.device)
            shadow.eval()
            for parameter in shadow.parameters():
                parameter.requires_grad_(False)
            shadows.append(shadow)
    with queen._lock:
        queen.shadows_ = shadows
        queen.mapping_network_ = queen.mapping_network_.to(view.device)
        queen.feature_centres_ = queen.feature_centres_.to(view.device)
        queen._pending_shadow_states = None
    logger.info("Rebuilt %d shadow models from saved weights.", len(shadows))


def fit_fingerprint(queen: Queen) -> str:
    """
    A digest of QUEEN's fitted embedding (mapping network weights, scale, class centres and radii). A saved state
    only makes sense with the fit it was recorded under; loading compares fingerprints.

    :param queen: A fitted QUEEN.
    :return: Hexadecimal SHA-256 digest.
    """
    return _fingerprint_of_parts(
        {
            "mapping_state": queen.mapping_network_.state_dict(),
            "embedding_scale": queen.embedding_scale_,
            "class_centres": queen.class_centres_,
            "class_mean_radius": queen.class_mean_radius_,
        }
    )


# -------------------------------------------------------------------------------------------------- snapshots
def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _params_of(queen: Queen) -> dict[str, Any]:
    params = {name: _plain(getattr(queen, name)) for name in queen.params}
    head = queen.head
    if not isinstance(head, str):
        view = queen._view
        head = view.head_name if view is not None and head is not None else None
    params["head"] = head
    return params


def _cpu_state_dict(module: Any) -> dict[str, Any]:
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}


def _fit_of(queen: Queen) -> dict[str, Any]:
    import torch

    pending = getattr(queen, "_pending_shadow_states", None)
    shadow_states = pending if pending is not None else [_cpu_state_dict(shadow) for shadow in queen.shadows_]
    if queen.embedding_scale_ is None or queen.feature_spread_ is None:
        raise ValueError("QUEEN is marked fitted but lacks its fitted parts; refit it before saving.")
    return {
        "mapping_widths": [int(width) for width in queen.mapping_network_.widths],
        "mapping_state": _cpu_state_dict(queen.mapping_network_),
        "embedding_scale": float(queen.embedding_scale_),
        "class_centres": torch.from_numpy(np.array(queen.class_centres_, dtype=np.float64)),
        "class_mean_radius": torch.from_numpy(np.array(queen.class_mean_radius_, dtype=np.float64)),
        "feature_centres": queen.feature_centres_.detach().cpu().clone(),
        "feature_spread": float(queen.feature_spread_),
        "shadow_states": list(shadow_states),
    }


def _state_of(queen: Queen) -> dict[str, Any]:
    """The query state of all clients in a few column tensors (one row per client, records concatenated)."""
    import torch

    from art_queen.state import QueryState

    keys = list(queen._states)
    states = [queen._states[key] for key in keys]
    count_names = list(QueryState(queen.nb_classes, float(queen.r), queen.embedding_dim).counts)
    records = [state.records.points() for state in states]
    dim = int(queen.embedding_dim)
    return {
        "nb_classes": int(queen.nb_classes),
        "embedding_dim": dim,
        "r": float(queen.r),
        "alpha": float(queen.alpha),
        "scope": queen.scope,
        "fingerprint": fit_fingerprint(queen) if queen.is_fitted else None,
        "client_ids": keys,
        "cqs": torch.from_numpy(
            np.array([state.cqs for state in states], dtype=np.float64).reshape(len(states), queen.nb_classes)
        ),
        "count_names": count_names,
        "counts": torch.from_numpy(
            np.array([[state.counts[name] for name in count_names] for state in states], dtype=np.int64).reshape(
                len(states), len(count_names)
            )
        ),
        "record_counts": torch.from_numpy(np.array([len(classes) for _, classes in records], dtype=np.int64)),
        "points": torch.from_numpy(
            np.concatenate([points for points, _ in records]).astype(np.float64)
            if records
            else np.zeros((0, dim), dtype=np.float64)
        ),
        "classes": torch.from_numpy(
            np.concatenate([classes for _, classes in records]).astype(np.int64)
            if records
            else np.zeros(0, dtype=np.int64)
        ),
        "rng": queen._rng.bit_generator.state,
    }


# ------------------------------------------------------------------------------------------------ atomic write
def _atomic_torch_save(payload: dict[str, Any], path: str | os.PathLike) -> None:
    import torch

    payload = {**payload, "checksum": payload_checksum(payload)}
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    if not os.path.isdir(directory):
        raise ValueError(f"Cannot save to {path!r}: the folder {directory!r} does not exist.")
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):  # keep the permissions of the file being replaced
            os.chmod(temporary, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows has no directory fsync
        return
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -------------------------------------------------------------------------------------------------- validation
def _read(path: str | os.PathLike) -> dict[str, Any]:
    import torch

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"No QUEEN file at {name!r}.")
    try:
        payload = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated, foreign or code-carrying files
        raise ValueError(f"{name!r} is not a readable QUEEN file (corrupt, truncated or foreign): {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(f"{name!r} is not a QUEEN file (no '{FORMAT_NAME}' format marker).")
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{name!r} has QUEEN file format version {version!r}; this art_queen reads version {FORMAT_VERSION}."
        )
    if payload.get("checksum") != payload_checksum(payload):
        raise ValueError(f"{name!r} is corrupt: its content does not match its checksum.")
    if payload.get("kind") not in (KIND_QUEEN, KIND_STATE):
        raise ValueError(f"{name!r} has an unknown kind {payload.get('kind')!r}.")
    return payload


def payload_checksum(payload: dict[str, Any]) -> str:
    """
    SHA-256 of a file's content (every entry but ``checksum``, tensors by dtype, shape and bytes), stored in the file
    on saving and compared on loading, so that corruption that still unpickles (a flipped bit inside a tensor) is
    refused too.

    :param payload: The dictionary written to (or read from) a QUEEN file.
    :return: Hexadecimal digest.
    """
    digest = hashlib.sha256()
    _update_digest(digest, {key: value for key, value in payload.items() if key != "checksum"})
    return digest.hexdigest()


def _update_digest(digest: Any, value: Any) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{data.dtype}{tuple(value.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _update_digest(digest, key)
            _update_digest(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _update_digest(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise ValueError(f"A QUEEN file cannot hold a {type(value).__name__}.")


def _require_dict(payload: dict[str, Any], key: str, path: str | os.PathLike) -> dict[str, Any]:
    value = payload.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{os.fspath(path)!r}: the entry {key!r} is missing or not a dictionary.")
    return dict(value)


def _tensor(container: dict[str, Any], key: str, shape: tuple[int | None, ...], kind: str, where: str) -> np.ndarray:
    """Check that ``container[key]`` is a tensor of ``shape`` (None: any length) and ``kind`` and return it as numpy."""
    import torch

    value = container.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}.")
    if value.dim() != len(shape) or any(want is not None and got != want for got, want in zip(value.shape, shape)):
        expected = tuple("any" if want is None else want for want in shape)
        raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)}, expected {expected}.")
    if kind == "float":
        if not value.is_floating_point():
            raise ValueError(f"{where}: {key!r} must be floating point, got {value.dtype}.")
        array = value.detach().cpu().double().numpy()
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{where}: {key!r} contains NaN or infinite values.")
        return array
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{where}: {key!r} must hold integers, got {value.dtype}.")
    return value.detach().cpu().long().numpy()


def _positive_float(value: Any, name: str, where: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name!r} must be a number, got {type(value).__name__}.")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{where}: {name!r} must be a {'non-negative' if allow_zero else 'positive'} finite number.")
    return value


def _validate_fit(fit: Any, queen: Queen, path: str | os.PathLike) -> dict[str, Any]:
    import torch

    from art_queen.mapping import MappingNetwork

    where = f"{os.fspath(path)!r} (fitted parts)"
    if not isinstance(fit, dict):
        raise ValueError(f"{where}: the entry 'fit' must be a dictionary.")
    classes, dim = queen.nb_classes, queen.embedding_dim

    widths = fit.get("mapping_widths")
    if (
        not isinstance(widths, list)
        or len(widths) != queen.mapping_layers + 1
        or not all(isinstance(width, int) and not isinstance(width, bool) and width >= 1 for width in widths)
    ):
        raise ValueError(
            f"{where}: 'mapping_widths' must be {queen.mapping_layers + 1} positive integers (mapping_layers + 1), "
            f"got {widths!r}."
        )
    if widths[-1] != dim:
        raise ValueError(f"{where}: the mapping network ends in {widths[-1]} dimensions, embedding_dim is {dim}.")
    feature_dim = widths[0]
    mapping_state = fit.get("mapping_state")
    if not isinstance(mapping_state, dict):
        raise ValueError(f"{where}: 'mapping_state' must be a state_dict.")
    with torch.random.fork_rng(devices=[]):
        network = MappingNetwork(widths)
    try:
        network.load_state_dict(mapping_state, strict=True)
    except (RuntimeError, KeyError, TypeError) as error:
        raise ValueError(f"{where}: the mapping network weights do not match widths {widths}: {error}") from error
    if not all(bool(torch.isfinite(tensor).all()) for tensor in network.state_dict().values()):
        raise ValueError(f"{where}: the mapping network weights contain NaN or infinite values.")
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)

    centres = _tensor(fit, "class_centres", (classes, dim), "float", where)
    radii = _tensor(fit, "class_mean_radius", (classes,), "float", where)
    if np.any(radii <= 0):
        raise ValueError(f"{where}: 'class_mean_radius' must be positive.")
    feature_centres = _tensor(fit, "feature_centres", (classes, feature_dim), "float", where)

    shadow_states = fit.get("shadow_states")
    if not isinstance(shadow_states, list) or len(shadow_states) != queen.n_shadows:
        count = len(shadow_states) if isinstance(shadow_states, list) else type(shadow_states).__name__
        raise ValueError(f"{where}: expected {queen.n_shadows} shadow models (n_shadows), found {count}.")
    layout = None
    for index, weights in enumerate(shadow_states):
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"{where}: shadow model {index} has no state_dict.")
        for name, tensor in weights.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{where}: shadow model {index} has a malformed state_dict entry {name!r}.")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}: shadow model {index} has NaN or infinite weights in {name!r}.")
        # All shadows share one architecture; the attached model is checked against it when it becomes known.
        shapes = [(name, tuple(tensor.shape)) for name, tensor in weights.items()]
        if layout is None:
            layout = shapes
        elif shapes != layout:
            raise ValueError(f"{where}: shadow model {index} has weights named or shaped unlike shadow model 0's.")

    fitted = {
        "mapping_network": network,
        "mapping_state": network.state_dict(),
        "embedding_scale": _positive_float(fit.get("embedding_scale"), "embedding_scale", where),
        "class_centres": centres,
        "class_mean_radius": radii,
        "feature_centres": torch.from_numpy(feature_centres).float(),
        "feature_spread": _positive_float(fit.get("feature_spread"), "feature_spread", where, allow_zero=True),
        "shadow_states": shadow_states,
    }
    # The saved embedding must fit the record grid at the saved r, as after fit.
    from art_queen.state import cell_coordinate_bits

    reach = np.abs(centres).max(axis=1) + queen.beta * radii
    if float(reach.max()) / queen.r + 2 > (1 << (cell_coordinate_bits(dim) - 1)) - 2:
        raise ValueError(f"{where}: the class centres lie too far out for the record grid at r={queen.r}.")
    return fitted


def _fingerprint_of_parts(parts: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(parts["mapping_state"]):
        digest.update(name.encode())
        digest.update(parts["mapping_state"][name].detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(np.float64(parts["embedding_scale"]).tobytes())
    digest.update(np.ascontiguousarray(parts["class_centres"], dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(parts["class_mean_radius"], dtype=np.float64).tobytes())
    return digest.hexdigest()


def _validate_client_ids(client_ids: Any, scope: str, where: str) -> list[Any]:
    if not isinstance(client_ids, list):
        raise ValueError(f"{where}: 'client_ids' must be a list.")
    if scope == "global":
        if len(client_ids) > 1 or any(client_id is not None for client_id in client_ids):
            raise ValueError(
                f"{where}: a state saved under scope='global' must hold at most one state, with client id None; got "
                f"{len(client_ids)} client ids."
            )
        return client_ids
    for client_id in client_ids:
        if isinstance(client_id, bool) or not isinstance(client_id, (str, int)):
            raise ValueError(f"{where}: client ids must be strings or integers, got {type(client_id).__name__}.")
    if len(set(client_ids)) != len(client_ids):
        raise ValueError(f"{where}: a client id appears twice.")
    return client_ids


def _validate_state(
    state: dict[str, Any], queen: Queen, fingerprint: str | None, path: str | os.PathLike
) -> tuple[dict[Any, Any], np.random.Generator]:
    """Build the per-client states and the generator from a saved state, checking everything against ``queen``."""
    from art_queen.state import QueryState

    where = f"{os.fspath(path)!r} (state)"
    if not isinstance(state, dict):
        raise ValueError(f"{where}: the entry 'state' must be a dictionary.")
    expected = {
        "nb_classes": queen.nb_classes,
        "embedding_dim": queen.embedding_dim,
        "r": float(queen.r),
        "alpha": float(queen.alpha),
        "scope": queen.scope,
    }
    for name, value in expected.items():
        if state.get(name) != value:
            raise ValueError(
                f"{where}: saved with {name}={state.get(name)!r} but this QUEEN has {name}={value!r}; the state does "
                "not apply."
            )
    saved_fingerprint = state.get("fingerprint")
    if saved_fingerprint is not None and fingerprint is None:
        raise ValueError(f"{where}: the state belongs to a fitted QUEEN but this QUEEN is not fitted.")
    if saved_fingerprint is not None and saved_fingerprint != fingerprint:
        raise ValueError(
            f"{where}: the state was recorded under a different fit (mapping network, class centres or radii) "
            "than this QUEEN's; its records would be meaningless here."
        )

    classes, dim = queen.nb_classes, queen.embedding_dim
    client_ids = _validate_client_ids(state.get("client_ids"), queen.scope, where)
    clients = len(client_ids)
    cqs = _tensor(state, "cqs", (clients, classes), "float", where)
    if np.any(cqs < 0):
        raise ValueError(f"{where}: 'cqs' must be non-negative.")
    count_names = list(QueryState(classes, float(queen.r), dim).counts)
    if not isinstance(state.get("count_names"), list) or sorted(state["count_names"]) != sorted(count_names):
        raise ValueError(f"{where}: 'count_names' must name exactly the counters {sorted(count_names)}.")
    counts = _tensor(state, "counts", (clients, len(count_names)), "int", where)
    if np.any(counts < 0):
        raise ValueError(f"{where}: 'counts' must be non-negative.")
    named = {name: counts[:, column] for column, name in enumerate(state["count_names"])}
    if np.any(named["queries"] != sum(named[name] for name in count_names if name != "queries")):
        raise ValueError(f"{where}: 'counts' are inconsistent (queries differ from the sum of the cases).")
    record_counts = _tensor(state, "record_counts", (clients,), "int", where)
    if np.any(record_counts < 0):
        raise ValueError(f"{where}: 'record_counts' must be non-negative.")
    points = _tensor(state, "points", (int(record_counts.sum()), dim), "float", where)
    record_classes = _tensor(state, "classes", (points.shape[0],), "int", where)
    if record_classes.size and (record_classes.min() < 0 or record_classes.max() >= classes):
        raise ValueError(f"{where}: record classes must lie in [0, {classes - 1}].")

    states: dict[Any, Any] = {}
    bounds = np.concatenate([[0], np.cumsum(record_counts)])
    for index, key in enumerate(client_ids):
        query_state = QueryState(classes, float(queen.r), dim)
        try:
            query_state.records.load(
                points[bounds[index] : bounds[index + 1]], record_classes[bounds[index] : bounds[index + 1]]
            )
        except ValueError as error:
            raise ValueError(f"{where}: records of client {key!r}: {error}") from error
        query_state.cqs = cqs[index].copy()
        query_state.counts = {name: int(named[name][index]) for name in count_names}
        states[key] = query_state

    rng_state = state.get("rng")
    if not isinstance(rng_state, dict) or rng_state.get("bit_generator") not in _BIT_GENERATORS:
        raise ValueError(f"{where}: 'rng' must be a numpy bit generator state of one of {_BIT_GENERATORS}.")
    try:
        bit_generator = getattr(np.random, rng_state["bit_generator"])()
        bit_generator.state = rng_state
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        raise ValueError(f"{where}: the random generator state is invalid: {error}") from error
    return states, np.random.Generator(bit_generator)
