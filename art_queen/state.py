"""
QUEEN's query state: the record store (a spatial hash grid in the embedding space), the cumulative query sensitivity
(CQS) per class, and the sequential four-case decision over a batch of queries.

The record store's per-query cost barely grows with the number of records: a look-up inspects the ``3^e`` grid cells
(cell size ``r``) around the query as ``3^(e-1)`` contiguous key ranges of a sorted key array (``O(log R)`` binary
searches). Records arrive in a small sorted level that is merged into the large one when it outgrows
``max(buffer_limit, 32 sqrt(R))``, so adding a batch costs ``O(sqrt(R))`` amortised, never a copy of all records.

The decisions of a batch are vectorised: the only order dependence (a query recorded earlier in the batch covers
later ones within ``r``) is resolved on the pairs of candidate queries that lie within ``r`` of each other, found on
the same grid, and the threshold crossing of each class on a running sum of its increments.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from art_queen.core import CASE_COVERED, CASE_OUTSIDE, CASE_RECORDED, CASE_REVERSED, cqs_increment

logger = logging.getLogger(__name__)

CLASS_BITS = 16
"""Bits of a cell key that hold the class index (at most 65536 classes)."""

_EXPANSION_CHUNK = 1 << 20
"""Largest number of (query, record) candidate pairs materialised at once by a look-up."""

_PAIR_LIMIT = 1 << 21
"""Above this many candidate pairs within one batch, the decisions fall back to the record-by-record loop (dense
batches of near-duplicates, where that loop is fast because each record covers many queries)."""

_CACHED_KEYS = 1 << 16
"""Key arrays longer than this are searched with sorted needles."""

_RANGE_STEPS = 8
"""Keys stepped over to find the end of a look-up range before a binary search finds it instead."""

_GREEDY_ROUNDS = 64
"""Vectorised rounds of the in-batch greedy before the remaining (long-chained) queries are settled one by one."""


def cell_coordinate_bits(embedding_dim: int) -> int:
    """
    Bits available per embedding coordinate in a cell key.

    :param embedding_dim: Dimension of the embedding.
    :return: Number of bits per coordinate.
    """
    return (63 - CLASS_BITS) // embedding_dim


class _CellGrid:
    """Cell keys of a grid of cell size ``cell_size``: ``class | cell_0 | ... | cell_{e-1}``, one int64 each."""

    def __init__(self, cell_size: float, embedding_dim: int) -> None:
        self.cell_size = float(cell_size)
        self.embedding_dim = int(embedding_dim)
        self.bits = cell_coordinate_bits(self.embedding_dim)
        self.offset = 1 << (self.bits - 1)
        # Neighbour cells: all offsets of the leading coordinates; the last coordinate's three cells are contiguous.
        lead = list(itertools.product((-1, 0, 1), repeat=self.embedding_dim - 1))
        self.strip_offsets = np.array(lead, dtype=np.int64).reshape(len(lead), self.embedding_dim - 1)

    @property
    def max_cell_index(self) -> int:
        return self.offset - 2

    def cells(self, points: np.ndarray) -> np.ndarray:
        cells = np.floor(points / self.cell_size).astype(np.int64)
        if cells.size and np.abs(cells).max() > self.max_cell_index:
            raise ValueError(
                "An embedding lies too far from the origin for the record grid; increase `r` or reduce `embedding_dim`."
            )
        return cells

    def keys(self, cells: np.ndarray, classes: np.ndarray) -> np.ndarray:
        keys = classes.astype(np.int64)
        for axis in range(self.embedding_dim):
            keys = (keys << self.bits) | (cells[..., axis] + self.offset)
        return keys

    def strip_bounds(self, cells: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """
        Smallest and largest key of each of the ``3^(e-1)`` strips of three cells that make up the neighbourhood
        of each point's cell (same class): arrays of shape `(n, 3^(e-1))`.
        """
        lead = cells[:, None, :-1] + self.strip_offsets[None, :, :]
        last = np.broadcast_to(cells[:, None, -1:], lead.shape[:2] + (1,))
        neighbour_classes = np.broadcast_to(classes[:, None], lead.shape[:2])
        low = self.keys(np.concatenate([lead, last - 1], axis=2), neighbour_classes)
        high = self.keys(np.concatenate([lead, last + 1], axis=2), neighbour_classes)
        return low, high


def _squared_distances(
    points: np.ndarray, rows: np.ndarray, others: np.ndarray, other_points: np.ndarray
) -> np.ndarray:
    """``sum((other_points[others] - points[rows]) ** 2, axis=1)``, coordinate by coordinate (the same additions in
    the same order as the row sum, without gathering whole rows)."""
    total = np.zeros(rows.shape[0], dtype=np.float64)
    for axis in range(points.shape[1]):
        difference = other_points[:, axis][others] - points[:, axis][rows]
        total += difference * difference
    return total


def _expanded_pairs(low: np.ndarray, high: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten the index ranges ``[low, high)`` of the given rows (arrays `(n, s)`) into (row, position) pairs."""
    counts = (high[rows] - low[rows]).reshape(-1)
    strips = low.shape[1]
    total = int(counts.sum())
    row_of = np.repeat(np.repeat(rows, strips), counts)
    starts = np.repeat(low[rows].reshape(-1) - (np.cumsum(counts) - counts), counts)
    return row_of, starts + np.arange(total, dtype=np.int64)


def _range_chunks(counts_per_row: np.ndarray) -> list[np.ndarray]:
    """Split row indices (with at least one candidate) into chunks of at most about ``_EXPANSION_CHUNK`` pairs."""
    rows = np.flatnonzero(counts_per_row)
    if rows.size == 0:
        return []
    total = np.cumsum(counts_per_row[rows])
    if int(total[-1]) <= _EXPANSION_CHUNK:
        return [rows]
    chunks, start = [], 0
    while start < rows.size:
        already = int(total[start - 1]) if start else 0
        end = max(int(np.searchsorted(total, already + _EXPANSION_CHUNK, side="right")), start + 1)
        chunks.append(rows[start:end])
        start = end
    return chunks


def _key_ranges(keys: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """
    Index ranges ``[first, last)`` of the sorted ``keys`` within ``[low, high]`` (arrays of any shape).

    One binary search per range, for its start (with the needles sorted when the key array is large: NumPy then
    narrows each search with the previous result, so the searches share the cache lines they read); the end is
    found by stepping over the few keys of the range, or by a second search for the ranges that hold many.
    """
    shape = low.shape
    low, high = low.reshape(-1), high.reshape(-1)
    if keys.shape[0] > _CACHED_KEYS:
        order = np.argsort(low, kind="stable")
        first = np.empty_like(low)
        first[order] = np.searchsorted(keys, low[order], side="left")
    else:
        first = np.searchsorted(keys, low, side="left")
    last = first.copy()
    size = keys.shape[0]
    stepping = np.arange(low.shape[0])
    for _ in range(_RANGE_STEPS):
        inside = last[stepping] < size
        stepping = stepping[inside]
        stepping = stepping[keys[last[stepping]] <= high[stepping]]
        if stepping.size == 0:
            break
        last[stepping] += 1
    else:
        last[stepping] = np.searchsorted(keys, high[stepping], side="right")
    return first.reshape(shape), last.reshape(shape)


class _SortedLevel:
    """Records sorted by cell key."""

    def __init__(self, embedding_dim: int) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.points = np.zeros((0, embedding_dim), dtype=np.float64)
        self.classes = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def replace(self, keys: np.ndarray, points: np.ndarray, classes: np.ndarray) -> None:
        """Hold exactly these records (given sorted by key)."""
        self.keys, self.points, self.classes = keys, points, classes

    def merge(self, keys: np.ndarray, points: np.ndarray, classes: np.ndarray) -> None:
        """Insert records given sorted by key (stable: after existing records of equal key)."""
        positions = np.searchsorted(self.keys, keys, side="right")
        self.replace(
            np.insert(self.keys, positions, keys),
            np.insert(self.points, positions, points, axis=0),
            np.insert(self.classes, positions, classes),
        )

    def clear(self) -> None:
        self.replace(self.keys[:0], self.points[:0], self.classes[:0])

    def covered(
        self, points: np.ndarray, low: np.ndarray, high: np.ndarray, radius_sq: float, result: np.ndarray
    ) -> None:
        """Mark in ``result`` the points with a record of this level within the radius (strip bounds given)."""
        if not len(self):
            return
        first, last = _key_ranges(self.keys, low, high)
        for rows in _range_chunks((last - first).sum(axis=1)):
            row_of, position = _expanded_pairs(first, last, rows)
            close = _squared_distances(points, row_of, position, self.points) <= radius_sq
            result[row_of[close]] = True


class RecordStore:
    """
    Recorded query embeddings of all classes for one state, indexed by a spatial hash grid of cell size ``r``.

    Memory: ``8 * (embedding_dim + 2)`` bytes per record. Records of one class are pairwise more than ``r`` apart and
    all lie inside the class's sensitive disc, so a class holds at most about ``(2 r_s / r + 1)^e`` records; recording
    stops once the class's CQS passes the threshold, which bounds it further (see
    :func:`art_queen.core.queries_before_reversal`).

    :param cell_size: Grid cell size, equal to the record radius ``r``.
    :param embedding_dim: Dimension of the embedding.
    :param buffer_limit: Smallest size of the level of recent records that triggers a merge into the main level
                         (the limit grows as ``32 sqrt(R)`` with the number of records ``R``).
    """

    def __init__(self, cell_size: float, embedding_dim: int, buffer_limit: int = 1024) -> None:
        self.cell_size = float(cell_size)
        self.embedding_dim = int(embedding_dim)
        self.buffer_limit = int(buffer_limit)
        self._grid = _CellGrid(self.cell_size, self.embedding_dim)
        self._main = _SortedLevel(self.embedding_dim)
        self._recent = _SortedLevel(self.embedding_dim)

    def __len__(self) -> int:
        return len(self._main) + len(self._recent)

    @property
    def max_cell_index(self) -> int:
        """Largest absolute cell index a key can hold."""
        return self._grid.max_cell_index

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
        low, high = self._grid.strip_bounds(self._grid.cells(points), classes)
        radius_sq = self.cell_size**2
        self._main.covered(points, low, high, radius_sq, result)
        pending = np.flatnonzero(~result)
        if len(self._recent) and pending.size:
            found = np.zeros(pending.size, dtype=bool)
            self._recent.covered(points[pending], low[pending], high[pending], radius_sq, found)
            result[pending[found]] = True
        return result

    def add(self, points: np.ndarray, classes: np.ndarray) -> None:
        """
        Add records (the caller guarantees they are new).

        :param points: Embeddings of shape `(m, e)`.
        :param classes: Class index of each record, shape `(m,)`.
        """
        if points.shape[0] == 0:
            return
        keys = self._grid.keys(self._grid.cells(points), classes)  # validates the range before anything changes
        order = np.argsort(keys, kind="stable")
        self._recent.merge(keys[order], points[order].astype(np.float64), classes[order].astype(np.int64))
        if len(self._recent) >= max(self.buffer_limit, 32 * math.isqrt(len(self._main))):
            self._merge()

    def _merge(self) -> None:
        self._main.merge(self._recent.keys, self._recent.points, self._recent.classes)
        self._recent.clear()

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """
        All records.

        :return: Pair of embeddings `(R, e)` and classes `(R,)`.
        """
        return (
            np.concatenate([self._main.points, self._recent.points]),
            np.concatenate([self._main.classes, self._recent.classes]),
        )

    def load(self, points: np.ndarray, classes: np.ndarray) -> None:
        """
        Replace all records (used when restoring a saved state).

        :param points: Embeddings of shape `(R, e)`.
        :param classes: Classes of shape `(R,)`.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, self.embedding_dim)
        classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        keys = self._grid.keys(self._grid.cells(points), classes)
        order = np.argsort(keys, kind="stable")
        self._main = _SortedLevel(self.embedding_dim)
        self._recent = _SortedLevel(self.embedding_dim)
        self._main.replace(keys[order], points[order], classes[order])


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
    earlier in the batch covers later ones within ``r``, and recording stops once the class's CQS passes the
    threshold. Both are resolved without a loop over queries (see :func:`_sequential_decisions`).

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

    increments = cqs_increment(distance[candidates], radius[candidates], r, alpha)
    candidate_cases, cqs = _sequential_decisions(
        embedding[candidates], classes[candidates], increments, state.cqs, threshold, r
    )
    cases[candidates] = candidate_cases
    recorded_rows = candidates[candidate_cases == CASE_RECORDED]

    # Commit (nothing above changed the state).
    state.records.add(embedding[recorded_rows], classes[recorded_rows])
    state.cqs = cqs
    state.counts["queries"] += n
    for name, case in (("outside", 1), ("covered", 2), ("recorded", 3), ("reversed", 4)):
        state.counts[name] += int(np.sum(cases == case))
    return cases


def _close_pairs(points: np.ndarray, classes: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray] | None:
    """
    All pairs ``(i, j)``, ``i < j``, of points of the same class within distance ``r`` (inclusive), or `None` when
    there are too many candidate pairs (then the caller falls back to the record-by-record loop).
    """
    grid = _CellGrid(r, points.shape[1])
    keys = grid.keys(grid.cells(points), classes)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    low, high = grid.strip_bounds(grid.cells(points), classes)
    first, last = _key_ranges(sorted_keys, low, high)
    counts = (last - first).sum(axis=1)
    if int(counts.sum()) > _PAIR_LIMIT:
        return None
    rows = np.flatnonzero(counts)
    row_of, position = _expanded_pairs(first, last, rows)
    other = order[position]
    later = other > row_of
    row_of, other = row_of[later], other[later]
    close = _squared_distances(points, row_of, other, points) <= r**2
    return row_of[close], other[close]


def _greedy_records(size: int, earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """
    Which points a record-as-you-go pass in index order would record if nothing stopped it: point ``j`` is recorded
    iff none of its earlier neighbours (pairs ``(earlier, later)`` with ``earlier < later``) is recorded.

    Settled in vectorised rounds (a point whose earlier neighbours are all settled is settled in the next round);
    points left after ``_GREEDY_ROUNDS`` rounds (long chains) are settled one by one in index order.
    """
    undecided, keep, drop = 0, 1, 2
    status = np.full(size, keep, dtype=np.int8)
    status[later] = undecided  # points without an earlier neighbour are recorded
    all_earlier, all_later = earlier, later
    for _ in range(_GREEDY_ROUNDS):
        # A recorded earlier neighbour drops a point; pairs that can no longer decide anything are discarded.
        status[later[status[earlier] == keep]] = drop
        open_pairs = (status[later] == undecided) & (status[earlier] != drop)
        earlier, later = earlier[open_pairs], later[open_pairs]
        if earlier.size == 0:
            status[status == undecided] = keep
            return status == keep
        # A point whose earlier neighbours are all dropped is recorded.
        blocked = np.zeros(size, dtype=bool)
        blocked[later] = True
        status[(status == undecided) & ~blocked] = keep
    earlier, later = all_earlier, all_later
    remaining = np.flatnonzero(status == undecided)
    if remaining.size:
        by_later = np.argsort(later, kind="stable")
        bounds = np.searchsorted(later[by_later], np.stack([remaining, remaining + 1]), side="left")
        for point, start, end in zip(remaining.tolist(), bounds[0].tolist(), bounds[1].tolist()):
            neighbours = earlier[by_later[start:end]]
            status[point] = drop if np.any(status[neighbours] == keep) else keep
    return status == keep


def _sequential_decisions(
    points: np.ndarray, classes: np.ndarray, increments: np.ndarray, cqs: np.ndarray, threshold: float, r: float
) -> tuple[np.ndarray, np.ndarray]:
    """
    Cases of the new sensitive queries of a batch (given in query order) and the updated CQS, as if decided one by
    one: a query is recorded if no query recorded before it in the batch lies within ``r`` and its class's CQS is at
    most the threshold (then the CQS grows by its increment); covered if a recorded query lies within ``r``; reversed
    otherwise.

    Without the threshold the recorded queries are the in-order greedy over the within-``r`` pairs. The threshold only
    cuts that sequence: once a class's running CQS passes it at some query, no later query of the class is recorded.
    The running CQS is accumulated in query order from the current value, exactly as one-by-one additions.

    :return: Pair of cases `(m,)` and CQS `(C,)`.
    """
    m = points.shape[0]
    cqs = cqs.copy()
    cases = np.full(m, CASE_COVERED, dtype=np.int64)
    # A class already over the threshold records nothing, so each of its new queries is reversed.
    recording = cqs[classes] <= threshold
    cases[~recording] = CASE_REVERSED
    if not recording.all():
        rows = np.flatnonzero(recording)
        cases[rows], cqs = _sequential_decisions(points[rows], classes[rows], increments[rows], cqs, threshold, r)
        return cases, cqs
    if m == 0:
        return cases, cqs
    pairs = _close_pairs(points, classes, r)
    if pairs is None:
        return _sequential_decisions_by_loop(points, classes, increments, cqs, threshold, r)
    earlier, later = pairs
    greedy = _greedy_records(m, earlier, later)

    stop = np.full(m, m, dtype=np.int64)  # index from which a query's class records nothing more
    for cls in np.unique(classes[greedy]).tolist():
        rows = np.flatnonzero(greedy & (classes == cls))
        running = np.add.accumulate(np.concatenate([[cqs[cls]], increments[rows]]))
        over = np.flatnonzero(running[:-1] > threshold)
        if over.size:
            stop[classes == cls] = rows[over[0]]
            cqs[cls] = running[over[0]]
        else:
            cqs[cls] = running[-1]
    index = np.arange(m)
    recorded = greedy & (index < stop)
    cases[recorded] = CASE_RECORDED
    # After the stop, a query is covered only by a recorded query within r; otherwise it is reversed.
    covered_by_record = np.zeros(m, dtype=bool)
    covered_by_record[later[recorded[earlier]]] = True
    cases[(index >= stop) & ~covered_by_record] = CASE_REVERSED
    return cases, cqs


def _sequential_decisions_by_loop(
    points: np.ndarray, classes: np.ndarray, increments: np.ndarray, cqs: np.ndarray, threshold: float, r: float
) -> tuple[np.ndarray, np.ndarray]:
    """Record-by-record form of :func:`_sequential_decisions`, for dense batches (one iteration per record)."""
    cases = np.full(points.shape[0], CASE_COVERED, dtype=np.int64)
    for cls in np.unique(classes).tolist():
        rows = np.flatnonzero(classes == cls)
        open_rows = np.ones(rows.shape[0], dtype=bool)
        position = 0
        while cqs[cls] <= threshold:
            following = np.flatnonzero(open_rows[position:])
            if following.size == 0:
                break
            position += int(following[0])
            open_rows[position] = False
            cases[rows[position]] = CASE_RECORDED
            cqs[cls] += increments[rows[position]]
            # Later open queries of this class within r of the new record are no longer new.
            later = np.flatnonzero(open_rows)
            near = np.sum((points[rows[later]] - points[rows[position]]) ** 2, axis=1) <= r**2
            open_rows[later[near]] = False
        cases[rows[open_rows]] = CASE_REVERSED
    return cases, cqs
