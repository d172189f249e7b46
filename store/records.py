"""Binary layouts of the values kept in a partition.

Every value starts with a one-byte layout version so that a later layout can be
read beside an older one. Keys are not built here: every key layout lives in
:mod:`worker.state.layout`.

==============  ==================================
column family   value
==============  ==================================
items           :class:`ItemRecord`
popularity      :class:`Popularity`
interactions    :class:`LoggedInteraction`
meta            :class:`DomainCounters`
==============  ==================================
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from store.exceptions import StoreError

_V1 = 1


def _corrupt(what: str, raw: bytes) -> StoreError:
    return StoreError(
        f"{what} record of {len(raw)} bytes is malformed or of an unknown layout "
        f"(first byte {raw[:1]!r}); the state directory may be corrupted or written by a newer "
        f"adacode: restore it from a backup or rebuild it by replaying the topics"
    )


# --- items ---------------------------------------------------------------------------

_ITEM_HEAD = struct.Struct(">BBqqH")  # version, flags, first_seen, last_seen, text_hash length
_PLACEHOLDER = 1


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """An item: its frozen embedding and when it was seen.

    A *placeholder* stands for an item that interactions named before its item
    event arrived: it has no embedding yet; the item event fills it in.
    """

    first_seen: int
    last_seen: int
    text_hash: bytes = b""
    embedding: bytes = b""  # float32, little-endian
    placeholder: bool = False

    def vector(self) -> np.ndarray:
        return np.frombuffer(self.embedding, dtype="<f4")

    def encode(self) -> bytes:
        flags = _PLACEHOLDER if self.placeholder else 0
        head = _ITEM_HEAD.pack(_V1, flags, self.first_seen, self.last_seen, len(self.text_hash))
        return head + self.text_hash + self.embedding

    @classmethod
    def decode(cls, raw: bytes) -> ItemRecord:
        if len(raw) < _ITEM_HEAD.size or raw[0] != _V1:
            raise _corrupt("item", raw)
        _, flags, first, last, hlen = _ITEM_HEAD.unpack_from(raw)
        body = raw[_ITEM_HEAD.size :]
        if len(body) < hlen or (len(body) - hlen) % 4:
            raise _corrupt("item", raw)
        return cls(first, last, body[:hlen], body[hlen:], bool(flags & _PLACEHOLDER))

    def seen(self, ts: int) -> ItemRecord:
        return replace(self, first_seen=min(self.first_seen, ts), last_seen=max(self.last_seen, ts))


def hold_embeddings(raws: Sequence[bytes]) -> np.ndarray:
    """Per encoded :class:`ItemRecord`, whether it holds an embedding (not a placeholder,
    a non-empty vector), read from the records' heads in bulk (no Python call per record:
    a scan of a million items does not hold the interpreter record by record). A record that
    :meth:`ItemRecord.decode` would refuse raises the same error."""
    n, size = len(raws), _ITEM_HEAD.size
    lengths = np.fromiter(map(len, raws), dtype=np.int64, count=n)
    if n and lengths.min() < size:
        raise _corrupt("item", raws[int(np.argmin(lengths))])
    heads = np.frombuffer(
        b"".join(map(operator.itemgetter(slice(0, size)), raws)), dtype=np.uint8
    ).reshape(n, size)
    text = heads[:, size - 2].astype(np.int64) << 8 | heads[:, size - 1]  # ">H", last
    body = lengths - size
    bad = (heads[:, 0] != _V1) | (body < text) | ((body - text) % 4 != 0)
    if bad.any():
        raise _corrupt("item", raws[int(np.argmax(bad))])
    return ((heads[:, 1] & _PLACEHOLDER) == 0) & (body > text)


# --- popularity ----------------------------------------------------------------------

_POP = struct.Struct(">Bqdqdq")  # version, count, weight_sum, decay_ts, decayed, last_ts


@dataclass(frozen=True, slots=True)
class Popularity:
    """Raw and time-decayed interaction counts of an item.

    ``decayed`` is the exponentially decayed sum of weights, valid at event time
    ``decay_ts``; :meth:`add` folds in one interaction, :meth:`at` reads the value
    at another time. Both use the half-life given in seconds.
    """

    count: int = 0
    weight_sum: float = 0.0
    decay_ts: int = 0
    decayed: float = 0.0
    last_ts: int = 0

    def add(self, ts: int, weight: float, half_life_s: float) -> Popularity:
        if self.count == 0:
            return Popularity(1, weight, ts, weight, ts)
        if ts >= self.decay_ts:
            decayed = self.decayed * math.exp2(-(ts - self.decay_ts) / half_life_s) + weight
            decay_ts = ts
        else:  # late event: decay its weight to the reference time instead
            decayed = self.decayed + weight * math.exp2(-(self.decay_ts - ts) / half_life_s)
            decay_ts = self.decay_ts
        return Popularity(
            self.count + 1, self.weight_sum + weight, decay_ts, decayed, max(self.last_ts, ts)
        )

    def at(self, ts: int, half_life_s: float) -> float:
        """The decayed count as seen at event time ``ts`` (never grows backwards)."""
        if self.count == 0:
            return 0.0
        return self.decayed * math.exp2(-max(0, ts - self.decay_ts) / half_life_s)

    def encode(self) -> bytes:
        return _POP.pack(
            _V1, self.count, self.weight_sum, self.decay_ts, self.decayed, self.last_ts
        )

    @classmethod
    def decode(cls, raw: bytes) -> Popularity:
        if len(raw) != _POP.size or raw[0] != _V1:
            raise _corrupt("popularity", raw)
        _, count, wsum, dts, decayed, last = _POP.unpack(raw)
        return cls(count, wsum, dts, decayed, last)


def fold_popularity(
    raw: bytes | None, events: Iterable[tuple[int, float]], half_life_s: float
) -> tuple[bytes, int]:
    """:meth:`Popularity.add` of each ``(ts, weight)`` in order on the encoded record ``raw``
    (``None``: no interactions yet), with the same float operations, so folding a sequence
    in one call or across calls gives the same bits. Returns the encoded record and its
    ``last_ts``."""
    if raw is None:
        count, wsum, dts, decayed, last = 0, 0.0, 0, 0.0, 0
    else:
        if len(raw) != _POP.size or raw[0] != _V1:
            raise _corrupt("popularity", raw)
        _, count, wsum, dts, decayed, last = _POP.unpack(raw)
    exp2 = math.exp2
    for ts, weight in events:
        if count == 0:
            count, wsum, dts, decayed, last = 1, weight, ts, weight, ts
            continue
        if ts >= dts:
            decayed = decayed * exp2(-(ts - dts) / half_life_s) + weight
            dts = ts
        else:
            decayed = decayed + weight * exp2(-(dts - ts) / half_life_s)
        count += 1
        wsum = wsum + weight
        if ts > last:
            last = ts
    return _POP.pack(_V1, count, wsum, dts, decayed, last), last


_POP_DTYPE = np.dtype(
    [
        ("version", "u1"),
        ("count", ">i8"),
        ("weight_sum", ">f8"),
        ("decay_ts", ">i8"),
        ("decayed", ">f8"),
        ("last_ts", ">i8"),
    ]
)


def _popularity_rows(values: Sequence[bytes]) -> np.ndarray:
    """Encoded :class:`Popularity` records as one structured array (checked)."""
    raw = b"".join(values)
    if len(raw) != _POP.size * len(values):
        bad = next(v for v in values if len(v) != _POP.size)
        raise _corrupt("popularity", bad)
    rows = np.frombuffer(raw, dtype=_POP_DTYPE)
    if (rows["version"] != _V1).any():
        raise _corrupt("popularity", values[int(np.argmax(rows["version"] != _V1))])
    return rows


def popularity_since(values: Sequence[bytes], ref_ts: int, half_life_s: float) -> np.ndarray:
    """Decayed counts of encoded :class:`Popularity` records expressed at ``ref_ts`` *without
    clamping*: ``decayed * 2 ** ((decay_ts - ref_ts) / half_life)``. Taken at one fixed
    ``ref_ts``, an item's value changes only when it gets an interaction, and the ratio
    of two items' values is that of their decayed counts at any later time (float64)."""
    if not values:
        return np.zeros(0, dtype=np.float64)
    rows = _popularity_rows(values)
    dt = (rows["decay_ts"].astype(np.float64) - float(ref_ts)) / half_life_s
    out = rows["decayed"] * np.exp2(dt)
    return np.where(rows["count"] > 0, out, 0.0)


def popularity_at(values: Sequence[bytes], ts: int, half_life_s: float) -> list[float]:
    """:meth:`Popularity.at` of many encoded :class:`Popularity` records (same results)."""
    if not values:
        return []
    rows = _popularity_rows(values)
    exp2 = math.exp2
    return [
        decayed * exp2(-max(0, ts - dts) / half_life_s) if count else 0.0
        for count, dts, decayed in zip(
            rows["count"].tolist(),
            rows["decay_ts"].tolist(),
            rows["decayed"].tolist(),
            strict=True,
        )
    ]


# --- interaction log -----------------------------------------------------------------

_LOG_WEIGHT = struct.Struct(">Bd")


def encode_interactions(
    user_ids: Sequence[str], item_ids: Sequence[str], weights: Sequence[float]
) -> list[bytes]:
    """:meth:`LoggedInteraction.encode` of many interactions (columns of equal length),
    the same bytes."""
    heads: dict[float, bytes] = {}
    for w in set(weights):
        heads[w] = _LOG_WEIGHT.pack(_V1, w)
    return [
        heads[w] + f"{u}\x00{i}".encode()
        for w, u, i in zip(weights, user_ids, item_ids, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class LoggedInteraction:
    user_id: str
    item_id: str
    weight: float = 1.0

    def encode(self) -> bytes:
        return _LOG_WEIGHT.pack(_V1, self.weight) + f"{self.user_id}\x00{self.item_id}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> LoggedInteraction:
        if len(raw) < _LOG_WEIGHT.size or raw[0] != _V1:
            raise _corrupt("interaction", raw)
        _, weight = _LOG_WEIGHT.unpack_from(raw)
        user, sep, item = raw[_LOG_WEIGHT.size :].decode().partition("\x00")
        if not sep:
            raise _corrupt("interaction", raw)
        return cls(user, item, weight)


# --- per-domain counters -------------------------------------------------------------

_COUNTERS = struct.Struct(">Bqqqqq")


@dataclass(frozen=True, slots=True)
class DomainCounters:
    """Totals kept per domain, updated in the same batch as the records they count."""

    items: int = 0  # items with an item event
    placeholders: int = 0  # items named only by interactions so far
    interactions: int = 0  # interactions applied
    logged: int = 0  # interactions currently in the log (after retention)
    last_ts: int = 0  # newest event time seen

    def encode(self) -> bytes:
        return _COUNTERS.pack(
            _V1, self.items, self.placeholders, self.interactions, self.logged, self.last_ts
        )

    @classmethod
    def decode(cls, raw: bytes) -> DomainCounters:
        if len(raw) != _COUNTERS.size or raw[0] != _V1:
            raise _corrupt("domain counters", raw)
        _, items, placeholders, interactions, logged, last_ts = _COUNTERS.unpack(raw)
        return cls(items, placeholders, interactions, logged, last_ts)
