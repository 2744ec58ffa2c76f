"""
QUEEN's query state: the record store (a spatial hash grid in the embedding space), the cumulative query sensitivity
(CQS) per class, and the sequential four-case decision over a batch of queries.

The record store's per-query cost does not grow with the number of records: each look-up inspects the ``3^e`` grid
cells (cell size ``r``) around the query in a sorted key array (``O(log R)`` by binary search), plus a small buffer of
recent records that is merged into the sorted array when it fills up.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from art_queen.core import CASE_COVERED, CASE_OUTSIDE, CASE_RECORDED, CASE_REVERSED, cqs_increment

logger = logging.getLogger(__name__)

CLASS_BITS = 16
"""Bits of a cell key that hold the class index (at most 65536 classes)."""


def cell_coordinate_bits(embedding_dim: int) -> int:
    """
    Bits available per embedding coordinate in a cell key.

    :param embedding_dim: Dimension of the embedding.
    :return: Number of bits per coordinate.
    """
    return (63 - CLASS_BITS) // embedding_dim


class RecordStore:
    """
    Recorded query embeddings of all classes for one state, indexed by a spatial hash grid of cell size ``r``.

    Memory: ``8 * (embedding_dim + 2)`` bytes per record. Records of one class are pairwise more than ``r`` apart and
    all lie inside the class's sensitive disc, so a class holds at most about ``(2 r_s / r + 1)^e`` records; recording
    stops once the class's CQS passes the threshold, which bounds it further (see
    :func:`art_queen.core.queries_before_reversal`).

    :param cell_size: Grid cell size, equal to the record radius ``r``.
    :param embedding_dim: Dimension of the embedding.
    :param buffer_limit: Recent records kept unsorted before a merge into the sorted index.
    """

    def __init__(self, cell_size: float, embedding_dim: int, buffer_limit: int = 1024) -> None:
        self.cell_size = float(cell_size)
        self.embedding_dim = int(embedding_dim)
        self.buffer_limit = int(buffer_limit)
        self._bits = cell_coordinate_bits(self.embedding_dim)
        self._offset = 1 << (self._bits - 1)
        self._keys = np.zeros(0, dtype=np.int64)
        self._points = np.zeros((0, self.embedding_dim), dtype=np.float64)
        self._classes = np.zeros(0, dtype=np.int64)
        self._buffer_points = np.zeros((0, self.embedding_dim), dtype=np.float64)
        self._buffer_classes = np.zeros(0, dtype=np.int64)
        self._neighbour_offsets = np.array(list(itertools.product((-1, 0, 1), repeat=self.embedding_dim)), np.int64)

    def __len__(self) -> int:
        return int(self._keys.shape[0] + self._buffer_classes.shape[0])

    @property
    def max_cell_index(self) -> int:
        """Largest absolute cell index a key can hold."""
        return self._offset - 2

    def _cells(self, points: np.ndarray) -> np.ndarray:
        cells = np.floor(points / self.cell_size).astype(np.int64)
        if cells.size and np.abs(cells).max() > self.max_cell_index:
            raise ValueError(
                "An embedding lies too far from the origin for the record grid; increase `r` or reduce `embedding_dim`."
            )
        return cells

    def _keys_of(self, cells: np.ndarray, classes: np.ndarray) -> np.ndarray:
        keys = classes.astype(np.int64)
        for axis in range(self.embedding_dim):
            keys = (keys << self._bits) | (cells[..., axis] + self._offset)
        return keys

    def covered(self, points: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """
        Tell, for each point, whether a record of the same class lies within distance ``r`` (inclusive).

        :param points: Embeddings of shape `(n, e)`.
        :param classes: Class index of each point, shape `(n,)`.
        :return: Boolean array of shape `(n,)`.
        """
        n = points.shape[0]
        result = np.zeros(n, dtype=bool)
        if n == 0 or len(self) == 0:
            return result
        radius_sq = self.cell_size**2
        if self._keys.shape[0]:
            neighbour_cells = self._cells(points)[:, None, :] + self._neighbour_offsets[None, :, :]
            keys = self._keys_of(neighbour_cells, np.broadcast_to(classes[:, None], neighbour_cells.shape[:2]))
            low = np.searchsorted(self._keys, keys, side="left")
            high = np.searchsorted(self._keys, keys, side="right")
            counts = high - low
            widest = int(counts.max())
            for slot in range(widest):
                present = counts > slot
                if not present.any():
                    break
                rows, cells = np.nonzero(present)
                candidates = self._points[low[rows, cells] + slot]
                close = np.sum((candidates - points[rows]) ** 2, axis=1) <= radius_sq
                result[rows[close]] = True
        if self._buffer_classes.shape[0]:
            pending = np.flatnonzero(~result)
            if pending.size:
                diff = points[pending, None, :] - self._buffer_points[None, :, :]
                close = (np.sum(diff**2, axis=2) <= radius_sq) & (classes[pending, None] == self._buffer_classes[None, :])
                result[pending[close.any(axis=1)]] = True
        return result

    def add(self, points: np.ndarray, classes: np.ndarray) -> None:
        """
        Add records (the caller guarantees they are new).

        :param points: Embeddings of shape `(m, e)`.
        :param classes: Class index of each record, shape `(m,)`.
        """
        if points.shape[0] == 0:
            return
        self._cells(points)  # validates the range before anything changes
        self._buffer_points = np.concatenate([self._buffer_points, points.astype(np.float64)])
        self._buffer_classes = np.concatenate([self._buffer_classes, classes.astype(np.int64)])
        if self._buffer_classes.shape[0] >= self.buffer_limit:
            self._merge()

    def _merge(self) -> None:
        keys = self._keys_of(self._cells(self._buffer_points), self._buffer_classes)
        order = np.argsort(keys, kind="stable")
        keys, points, classes = keys[order], self._buffer_points[order], self._buffer_classes[order]
        positions = np.searchsorted(self._keys, keys, side="right")
        self._keys = np.insert(self._keys, positions, keys)
        self._points = np.insert(self._points, positions, points, axis=0)
        self._classes = np.insert(self._classes, positions, classes)
        self._buffer_points = self._buffer_points[:0]
        self._buffer_classes = self._buffer_classes[:0]

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """
        All records.

        :return: Pair of embeddings `(R, e)` and classes `(R,)`.
        """
        return (
            np.concatenate([self._points, self._buffer_points]),
            np.concatenate([self._classes, self._buffer_classes]),
        )

    def load(self, points: np.ndarray, classes: np.ndarray) -> None:
        """
        Replace all records (used when restoring a saved state).

        :param points: Embeddings of shape `(R, e)`.
        :param classes: Classes of shape `(R,)`.
        """
        self._keys = np.zeros(0, dtype=np.int64)
        self._points = np.zeros((0, self.embedding_dim), dtype=np.float64)
        self._classes = np.zeros(0, dtype=np.int64)
        self._buffer_points = np.asarray(points, dtype=np.float64).reshape(-1, self.embedding_dim)
        self._buffer_classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        if self._buffer_classes.shape[0]:
            self._merge()


@dataclass
class QueryState:
    """
    The state of one query stream (all queries under ``scope="global"``, one client's under ``"per_client"``).

    :param nb_classes: Number of classes.
    :param record_radius: Record radius ``r`` in the standardised embedding.
    :param embedding_dim: Dimension of the embedding.
    """

    nb_classes: int
    record_radius: float
    embedding_dim: int
    cqs: np.ndarray = field(init=False)
    records: RecordStore = field(init=False)
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.cqs = np.zeros(self.nb_classes, dtype=np.float64)
        self.records = RecordStore(self.record_radius, self.embedding_dim)
        self.counts = {"queries": 0, "outside": 0, "covered": 0, "recorded": 0, "reversed": 0}


def decide_cases(
    state: QueryState,
    embedding: np.ndarray,
    classes: np.ndarray,
    centres: np.ndarray,
    sensitive_radii: np.ndarray,
    threshold: float,
    alpha: float,
) -> np.ndarray:
    """
    Decide QUEEN's case (1-4) for every query of a batch, in query order, and update ``state`` accordingly.

    Order matters only among sensitive queries of a class that is not yet over its threshold: a query recorded
    earlier in the batch covers later ones within ``r``. Everything else is vectorised; the loop below runs once
    per *recorded* query, not per query.

    :param state: The query state to read and update.
    :param embedding: Standardised embeddings of the queries, shape `(n, e)`.
    :param classes: Victim's top-1 class per query, shape `(n,)`.
    :param centres: Class centres in the embedding, shape `(C, e)`.
    :param sensitive_radii: Sensitive radius per class, shape `(C,)`.
    :param threshold: CQS threshold ``t``.
    :param alpha: Sharpness of the SQS decay.
    :return: Case per query (ints 1-4), shape `(n,)`.
    """
    r = state.record_radius
    n = embedding.shape[0]
    distance = np.linalg.norm(embedding - centres[classes], axis=1)
    radius = sensitive_radii[classes]
    cases = np.full(n, CASE_OUTSIDE, dtype=np.int64)

    inside = np.flatnonzero(distance < radius)
    covered = state.records.covered(embedding[inside], classes[inside])
    cases[inside[covered]] = CASE_COVERED
    candidates = inside[~covered]  # new with respect to every earlier record, in query order

    cqs = state.cqs.copy()
    recorded: list[int] = []
    increments = cqs_increment(distance[candidates], radius[candidates], r, alpha)
    for cls in np.unique(classes[candidates]):
        in_class = classes[candidates] == cls
        rows, class_increments = candidates[in_class], increments[in_class]
        open_rows = np.ones(rows.shape[0], dtype=bool)
        position = 0
        while cqs[cls] <= threshold:
            following = np.flatnonzero(open_rows[position:])
            if following.size == 0:
                break
            position += int(following[0])
            open_rows[position] = False
            cases[rows[position]] = CASE_RECORDED
            cqs[cls] += class_increments[position]
            recorded.append(int(rows[position]))
            # Later open queries of this class within r of the new record are no longer new.
            later = np.flatnonzero(open_rows)
            near = np.sum((embedding[rows[later]] - embedding[rows[position]]) ** 2, axis=1) <= r**2
            cases[rows[later[near]]] = CASE_COVERED
            open_rows[later[near]] = False
        cases[rows[open_rows]] = CASE_REVERSED

    # Commit (nothing above changed the state).
    recorded_rows = np.array(sorted(recorded), dtype=np.int64)
    state.records.add(embedding[recorded_rows], classes[recorded_rows])
    state.cqs = cqs
    state.counts["queries"] += n
    for name, case in (("outside", 1), ("covered", 2), ("recorded", 3), ("reversed", 4)):
        state.counts[name] += int(np.sum(cases == case))
    return cases
