"""Prefix-node statistics kept item by item: the incremental form of
:class:`~quantize.lengths.PrefixStats`.

A node is a prefix of ``depth`` digits (``1..L``) of the items' full paths. Per node and
depth, :class:`PrefixNodes` holds the item count, the count of items with positive
popularity, the popularity mass, the sum of ``p log p`` and the head count, and changes
them by the contributions of the items that moved: adding items, moving their
popularity or head flag, or re-placing them under a new path costs O(items moved x L),
whatever the catalogue. :meth:`PrefixNodes.stats_for` gives a :class:`PrefixStats` over
a subset of items (their nodes renumbered), so a :class:`~quantize.lengths.LengthPolicy`
runs on just those items with the statistics of the whole catalogue.

Sums taken in another order than :meth:`PrefixStats.compute` differ in the last bits; a
node whose items all have zero popularity has mass exactly 0 (the positive count says
so), and policies compare entropies with :data:`~quantize.lengths.ENTROPY_TIE`.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from quantize.lengths import PrefixStats

_MIN_CAPACITY = 64

#: the values of a :func:`code_key` (4-byte ints, native order, as ``struct``'s ``=i``)
KEY_DTYPE = np.dtype("=i4")

#: the most items one C-level call (a dict update, a list conversion) takes at a time.
#: Python threads switch only between such calls, so a load of a million items made of
#: whole-catalogue calls held the interpreter ~0.5 s at a time from the threads that
#: answer HTTP; in chunks of this size each call takes a few milliseconds. A thread waiting
#: for the interpreter waits for the call under way to end, and a scrape takes the
#: interpreter several times (accept, read, the handler's thread, render, write): chunks of
#: 32,768 keys held it 12 ms a call on a quiet machine and 40-56 ms beside the 1M bench's
#: ingest, and a scrape that waited out several of them took 100-230 ms. 4,096 keys: 1.2 ms a
#: call (median, quiet), the same total; a dict's resize past a power of two stays one call
#: (26 ms at a million keys)
GIL_CHUNK = 4_096


def number_keys(keys: Sequence[Hashable], start: int, into: dict[Any, int]) -> None:
    """Add ``{keys[j]: start + j}`` to ``into``, :data:`GIL_CHUNK` keys per call."""
    for lo in range(0, len(keys), GIL_CHUNK):
        hi = min(lo + GIL_CHUNK, len(keys))
        into.update(zip(keys[lo:hi], range(start + lo, start + hi), strict=True))


def take_items(seq: Sequence[Any], idx: np.ndarray, chunk: int = GIL_CHUNK) -> list[Any]:
    """``[seq[i] for i in idx]``, ``chunk`` items per call (one ``tolist`` of a million
    indices held the interpreter ~20 ms)."""
    out: list[Any] = []
    for lo in range(0, len(idx), chunk):
        out += map(seq.__getitem__, idx[lo : lo + chunk].tolist())
    return out


def join_records(
    records: Sequence[bytes], dtype: np.dtype[Any], chunk: int = GIL_CHUNK
) -> np.ndarray:
    """Fixed-size records (``dtype.itemsize`` bytes each) as one array of ``dtype``,
    joined ``chunk`` at a time: ``np.frombuffer(b"".join(records))`` over a million rows
    held the interpreter ~60 ms. Records that do not add up to ``dtype.itemsize`` bytes
    each, chunk by chunk, raise ``ValueError``."""
    out = np.empty(len(records), dtype=dtype)
    for lo in range(0, len(records), chunk):
        hi = min(lo + chunk, len(records))
        raw = b"".join(records[lo:hi])
        if len(raw) != (hi - lo) * dtype.itemsize:
            raise ValueError(
                f"records {lo}..{hi - 1} hold {len(raw)} bytes, not {hi - lo} x {dtype.itemsize}"
            )
        out[lo:hi] = np.frombuffer(raw, dtype=dtype)
    return out


def row_tuples(table: np.ndarray) -> list[tuple[int, ...]]:
    """The rows of a 2-d integer array as tuples of Python ints, :data:`GIL_CHUNK` rows per
    call."""
    out: list[tuple[int, ...]] = []
    for lo in range(0, table.shape[0], GIL_CHUNK):
        out += map(tuple, table[lo : lo + GIL_CHUNK].tolist())
    return out


def row_keys(table: np.ndarray) -> list[bytes]:
    """The rows of a 2-d integer array as :func:`code_key` keys (each row's values as
    4-byte native ints in one ``bytes``), :data:`GIL_CHUNK` rows per call."""
    rows, width = table.shape[0], 4 * table.shape[1]
    if width == 0:
        return [b""] * rows
    out: list[bytes] = []
    for lo in range(0, rows, GIL_CHUNK):
        raw = np.ascontiguousarray(table[lo : lo + GIL_CHUNK], dtype=KEY_DTYPE).tobytes()
        out += [raw[at : at + width] for at in range(0, len(raw), width)]
    return out


def code_key(code: Sequence[int]) -> bytes:
    """A code (a tuple of ints) as the key of a long-lived dictionary: its values as
    4-byte native ints in one ``bytes``, equal to :func:`row_keys`' key of the same
    values. The cyclic collector does not track ``bytes``; it tracks tuples until a pass
    finds they hold only ints. Tuple keys made by code changes and freed ones of older
    generations kept the young generation's count level while it filled (a 1M-item ingest
    gathered ~350,000 of them: one young pass of 260-325 ms, every thread waiting)."""
    return _packer(len(code)).pack(*code)


@functools.cache
def _packer(n: int) -> struct.Struct:
    return struct.Struct(f"={n}i")


def _grown(arr: np.ndarray, size: int) -> np.ndarray:
    """``arr`` with room for at least ``size`` rows (doubling; zeros beyond the old rows)."""
    if arr.shape[0] >= size:
        return arr
    cap = max(_MIN_CAPACITY, size, 2 * arr.shape[0])
    out = np.zeros((cap, *arr.shape[1:]), dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


def _plogp(pop: np.ndarray) -> np.ndarray:
    return np.where(pop > 0, pop * np.log(np.where(pop > 0, pop, 1.0)), 0.0)


def _distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-d array (as ``np.unique``, whose hashing is
    slower for the few thousand values of a round)."""
    out = np.sort(values)
    if out.size > 1:
        keep = np.empty(out.size, dtype=bool)
        keep[0] = True
        np.not_equal(out[1:], out[:-1], out=keep[1:])
        out = out[keep]
    return out


#: above this share of the bound, :func:`_distinct_below` marks a bitmap instead of sorting
_BITMAP_SHARE = 1 / 32


def _distinct_below(values: np.ndarray, bound: int) -> np.ndarray:
    """:func:`_distinct` of non-negative ``values`` below ``bound``. Many values (the members
    of a shallow node of a large catalogue: a quarter of a million rows and more) are marked
    in a bitmap of ``bound`` flags, O(values + bound), instead of sorted (a sort of 500k rows
    took ~30 ms of a round)."""
    if values.size <= bound * _BITMAP_SHARE:
        return _distinct(values)
    seen = np.zeros(bound, dtype=bool)
    seen[values] = True
    return np.flatnonzero(seen)


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(start, stop)`` over the pairs (int64)."""
    sizes = stops - starts
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = starts - (np.cumsum(sizes) - sizes)
    return np.repeat(shift, sizes) + np.arange(total, dtype=np.int64)


#: bits per pass of :func:`stable_order` (numpy sorts 16-bit keys stably by radix, in O(n))
_RADIX_BITS = 16


def stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative integer ``keys`` below
    ``bound``, in O(n) per 16 bits of ``bound``: least significant digit first, each pass
    a stable radix sort of one 16-bit digit (numpy's own for ``uint16``). At a million
    keys below 2**32 it takes about a quarter of the comparison sort's time."""
    keys = np.asarray(keys)
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    passes = max(1, -(-max(int(bound) - 1, 1).bit_length() // _RADIX_BITS))
    order: np.ndarray | None = None
    mask = (1 << _RADIX_BITS) - 1
    for p in range(passes):
        digit = ((keys >> (_RADIX_BITS * p)) & mask).astype(np.uint16)
        if order is None:
            order = np.argsort(digit, kind="stable")
        else:
            order = order[np.argsort(digit[order], kind="stable")]
    assert order is not None
    return order.astype(np.int64, copy=False)


#: the sums of one node, side by side: a round reads and writes a few thousand scattered
#: nodes, each then one memory access instead of one per sum
_NODE_SUMS = np.dtype(
    [
        ("count", np.int64),
        ("positive", np.int64),
        ("mass", np.float64),
        ("plogp", np.float64),
        ("heads", np.int64),
    ]
)


class _Depth:
    """The nodes of one depth: a lookup from (parent node, digit) and per-node sums (views
    of the fields of one record per node).

    The lookup is two arrays, the node keys sorted and each key's node id, searched with
    :func:`numpy.searchsorted`: at a million nodes a dict held a million Python ints for
    each depth, took ~0.5 s to build in one call on a load, and made every cyclic
    collection longer."""

    def __init__(self) -> None:
        self._sorted_keys = np.zeros(0, dtype=np.int64)
        self._sorted_ids = np.zeros(0, dtype=np.int64)
        self._sums = np.zeros(0, dtype=_NODE_SUMS)

    def __len__(self) -> int:
        """The number of nodes."""
        return int(self._sorted_keys.size)

    @property
    def count(self) -> np.ndarray:
        return self._sums["count"]

    @property
    def positive(self) -> np.ndarray:
        return self._sums["positive"]

    @property
    def mass(self) -> np.ndarray:
        return self._sums["mass"]

    @property
    def plogp(self) -> np.ndarray:
        return self._sums["plogp"]

    @property
    def heads(self) -> np.ndarray:
        return self._sums["heads"]

    def ids(self, keys: np.ndarray) -> np.ndarray:
        """Node ids of ``keys`` (``parent * width + digit``), new nodes numbered on (in key
        order)."""
        uniq, inv = np.unique(np.asarray(keys, dtype=np.int64), return_inverse=True)
        pos = np.searchsorted(self._sorted_keys, uniq)
        found = pos < len(self)
        found[found] = self._sorted_keys[pos[found]] == uniq[found]
        ids = np.full(uniq.size, -1, dtype=np.int64)
        ids[found] = self._sorted_ids[pos[found]]
        new = np.flatnonzero(~found)
        if new.size:
            start = len(self)
            ids[new] = np.arange(start, start + new.size, dtype=np.int64)
            self._sorted_keys = np.insert(self._sorted_keys, pos[new], uniq[new])
            self._sorted_ids = np.insert(self._sorted_ids, pos[new], ids[new])
        self._sums = _grown(self._sums, len(self))
        return ids[inv.reshape(-1)]

    def entropy_reusing(self, nodes: np.ndarray, have: np.ndarray, ent: np.ndarray) -> np.ndarray:
        """:meth:`entropy` of ``nodes``, taken from ``ent`` for the nodes of ``have``
        (sorted, their entropy now) and computed for the others."""
        if nodes.size == have.size and np.array_equal(nodes, have):
            return ent
        if have.size == 0:
            return self.entropy(nodes)
        pos = np.minimum(np.searchsorted(have, nodes), have.size - 1)
        hit = have[pos] == nodes
        out = np.empty(nodes.size, dtype=np.float64)
        out[hit] = ent[pos[hit]]
        out[~hit] = self.entropy(nodes[~hit])
        return out

    def entropy(self, nodes: np.ndarray) -> np.ndarray:
        """As :meth:`PrefixStats.compute`: of the popularity-weighted distribution, or of
        the uniform one where the node's mass is 0."""
        mass = np.where(self.positive[nodes] > 0, self.mass[nodes], 0.0)
        s = self.plogp[nodes]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = np.where(mass > 0, np.log(np.where(mass > 0, mass, 1.0)) - s / mass, 0.0)
        return np.where(mass > 0, np.maximum(ent, 0.0), np.log(np.maximum(self.count[nodes], 1)))


class PrefixNodes:
    """Per-node statistics of a growing set of items (rows ``0..n-1``)."""

    def __init__(self, levels: int, width: int) -> None:
        self.levels = levels
        self.width = width
        self.depths = [_Depth() for _ in range(levels)]
        self.node_ids = np.zeros((0, levels), dtype=np.int64)
        self.n = 0
        #: per depth, rows ``0..indexed-1`` sorted by node and each node's first position
        #: there (built when needed; rows placed later are scanned until it is rebuilt)
        self._members: list[tuple[np.ndarray, np.ndarray]] = []
        self._indexed = 0
        #: indexed rows placed again since (their entries in the index are out of date):
        #: left out of what the index finds and scanned instead, until it is rebuilt
        self._stale_rows: list[int] = []
        self._stale = np.zeros(0, dtype=bool)

    def place(self, rows: np.ndarray, paths: np.ndarray) -> None:
        """Give ``rows`` (new, or removed before) the nodes of ``paths``; they count as
        items of zero popularity, not head, until :meth:`contribute` says otherwise."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        self._mark_stale(rows)
        self.node_ids = _grown(self.node_ids, int(rows.max()) + 1)
        self.n = max(self.n, int(rows.max()) + 1)
        parent = np.zeros(rows.size, dtype=np.int64)
        for d, depth in enumerate(self.depths):
            nodes = depth.ids(parent * self.width + paths[:, d])
            if 4 * nodes.size >= len(depth):  # many rows (a load): one pass
                depth.count[: len(depth)] += np.bincount(nodes, minlength=len(depth))
            else:
                np.add.at(depth.count, nodes, 1)
            self.node_ids[rows, d] = nodes
            parent = nodes

    def remove(self, rows: np.ndarray, popularity: np.ndarray, head: np.ndarray) -> None:
        """Take ``rows`` (with their current popularity and head flags) out of their nodes."""
        rows = np.asarray(rows, dtype=np.int64)
        self.contribute(rows, popularity, head, -1)
        self._mark_stale(rows)
        for d, depth in enumerate(self.depths):
            np.subtract.at(depth.count, self.node_ids[rows, d], 1)

    def contribute(
        self, rows: np.ndarray, popularity: np.ndarray, head: np.ndarray, sign: int
    ) -> None:
        """Add (``sign=1``) or take away (``-1``) the popularity and head flags of ``rows``."""
        if len(rows) == 0:
            return
        pop = np.asarray(popularity, dtype=np.float64)
        pos = (pop > 0).astype(np.int64) * sign
        plogp = _plogp(pop) * sign
        heads = np.asarray(head, dtype=np.int64) * sign
        for d, depth in enumerate(self.depths):
            nodes = self.node_ids[rows, d]
            np.add.at(depth.positive, nodes, pos)
            np.add.at(depth.mass, nodes, pop * sign)
            np.add.at(depth.plogp, nodes, plogp)
            np.add.at(depth.heads, nodes, heads)
            if sign < 0:  # a node left without positive popularity has mass exactly 0
                empty = nodes[depth.positive[nodes] == 0]
                depth.mass[empty] = 0.0
                depth.plogp[empty] = 0.0

    def nodes_of(self, rows: np.ndarray) -> list[np.ndarray]:
        """Per depth, the distinct nodes of ``rows``."""
        return [_distinct(self.node_ids[rows, d]) for d in range(self.levels)]

    def members(self, nodes: list[np.ndarray]) -> np.ndarray:
        """The rows under any of ``nodes[d]`` at depth ``d`` (sorted, each once): from an
        index of the rows by node, so the cost grows with the rows found, not with all."""
        self._index_members()
        found: list[np.ndarray] = []
        start, stop = self._indexed, self.n
        stale = np.asarray(self._stale_rows, dtype=np.int64)
        for d, wanted in enumerate(nodes):
            if not wanted.size:
                continue
            order, offsets = self._members[d]
            known = wanted[wanted < offsets.size - 1]
            indexed = order[_ranges(offsets[known], offsets[known + 1])]
            if stale.size:  # placed again since: found by their nodes now, below
                indexed = indexed[~self._stale[indexed]]
                found.append(stale[np.isin(self.node_ids[stale, d], wanted)])
            found.append(indexed)
            if stop > start:  # placed since the index was built
                late = np.isin(self.node_ids[start:stop, d], wanted)
                found.append(np.flatnonzero(late) + start)
        if not found:
            return np.zeros(0, dtype=np.int64)
        return _distinct_below(np.concatenate(found).astype(np.int64, copy=False), self.n)

    def index_members(self) -> None:
        """Bring the index of rows by node up to date: the rows placed since it was built
        are merged into it (sorted among themselves, then inserted at the end of their
        nodes' runs: O(rows) copies, no sort of the indexed rows); without an index, or
        after rows changed nodes, it is built from every row (:func:`stable_order`)."""
        n = self.n
        if self._members and n == self._indexed and not self._stale_rows:
            return
        if self._stale_rows:  # rows changed nodes: merging is not enough
            self._forget_members()
        row_type = np.int32 if n < 2**31 else np.int64
        merged = []
        for d, depth in enumerate(self.depths):
            n_nodes = len(depth)
            if self._members:
                merged.append(self._merged(d, n_nodes, row_type))
                continue
            ids = self.node_ids[:n, d]
            order = stable_order(ids, n_nodes).astype(row_type)
            offsets = np.zeros(n_nodes + 1, dtype=row_type)
            np.cumsum(np.bincount(ids, minlength=n_nodes), out=offsets[1:])
            merged.append((order, offsets))
        self._members = merged
        self._indexed = n

    def _merged(self, d: int, n_nodes: int, row_type: type) -> tuple[np.ndarray, np.ndarray]:
        """Depth ``d``'s index with rows ``indexed..n-1`` merged in (each node's rows stay in
        row order: the newer rows follow the indexed ones)."""
        order, offsets = self._members[d]
        late_ids = self.node_ids[self._indexed : self.n, d]
        late = stable_order(late_ids, n_nodes)
        ends = np.full(n_nodes + 1, offsets[-1], dtype=np.int64)
        ends[: offsets.size] = offsets
        order = np.insert(order, ends[late_ids[late] + 1], (late + self._indexed).astype(row_type))
        added = np.zeros(n_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(late_ids, minlength=n_nodes), out=added[1:])
        return order, (ends + added).astype(row_type)

    def _index_members(self) -> None:
        """Bring the index up to date when rows placed since outnumber a quarter of those
        indexed (the scans of the newer rows stay small, merges amortized)."""
        slack = max(4096, self._indexed // 4)
        if self._members and self.n - self._indexed <= slack and len(self._stale_rows) <= slack:
            return
        self.index_members()

    def _mark_stale(self, rows: np.ndarray) -> None:
        """``rows`` leave their nodes: those the index holds are scanned from now on (an item
        re-coded costs O(rows found), not a rebuild of the index over every row)."""
        if not self._members:
            return
        old = rows[rows < self._indexed]
        if not old.size:
            return
        if self._stale.size < self._indexed:
            self._stale = _grown(self._stale, self._indexed)
        fresh = old[~self._stale[old]]
        self._stale[fresh] = True
        self._stale_rows += _distinct(fresh).tolist()

    def _forget_members(self) -> None:
        """The index of rows by node is rebuilt when next needed."""
        self._members = []
        self._indexed = 0
        self._stale_rows = []
        self._stale = np.zeros(0, dtype=bool)

    def head_count(self, d: int, nodes: np.ndarray) -> np.ndarray:
        return self.depths[d].heads[nodes]

    def entropy(self, d: int, nodes: np.ndarray) -> np.ndarray:
        return self.depths[d].entropy(nodes)

    def stats_for(
        self,
        rows: np.ndarray,
        paths: np.ndarray,
        known: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> PrefixStats:
        """A :class:`PrefixStats` over ``rows`` only (``paths`` their full paths), with the
        statistics of every item; its node ids are renumbered among ``rows``' nodes.
        ``known``: per depth, sorted distinct nodes and their current :meth:`entropy`,
        when the caller has them (the entropy of the other nodes is computed)."""
        node_ids = np.zeros((rows.size, self.levels), dtype=np.int64)
        count, mass, entropy, heads = [], [], [], []
        for d, depth in enumerate(self.depths):
            ids = self.node_ids[rows, d]
            uniq, inv = np.unique(ids, return_inverse=True)
            ent = depth.entropy(uniq) if known is None else depth.entropy_reusing(uniq, *known[d])
            node_ids[:, d] = inv.reshape(-1)
            count.append(depth.count[uniq].copy())
            mass.append(np.where(depth.positive[uniq] > 0, depth.mass[uniq], 0.0))
            entropy.append(ent)
            heads.append(depth.heads[uniq].copy())
        return PrefixStats(
            paths=paths,
            node_ids=node_ids,
            count=tuple(count),
            mass=tuple(mass),
            entropy=tuple(entropy),
            head_count=tuple(heads),
        )
