"""The state partition: an ordered key-value store with column families.

Modelled on quix-streams' ``state/``: one abstract :class:`StorePartition` with a
RocksDB implementation (:mod:`store.rocksdb`) and an in-memory one
(:mod:`store.memory`); the same test suite runs against both.

Keys and values are ``bytes``. Every change goes through a :class:`WriteBatch`
which is applied atomically by :meth:`StorePartition.write`: the worker puts a
polled batch's state changes *and* the next consumer offset of each partition in
the same batch, so state and offsets never disagree.
"""

from __future__ import annotations

import itertools
import struct
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Self

from store.exceptions import StateFormatError

#: Column families every partition has. Their key layouts (and who writes them) are
#: documented and built in worker/state/layout.py, their values in store/records.py.
COLUMN_FAMILIES: tuple[str, ...] = (
    "meta",  # format marker; per-domain counters; codebooks; versions-topic restore positions
    "items",  # domain \x00 item_id -> ItemRecord
    "popularity",  # domain \x00 item_id -> Popularity (small, hot)
    "interactions",  # domain \x00 ts(8, BE) partition(4, BE) offset(8, BE) -> LoggedInteraction
    "users",  # domain \x00 user_id -> recent items: the ring's header (or a whole older row)
    "recent",  # domain \x00 user_id \x00 slot(2, BE) -> one recent item (ts, item_id)
    "codes",  # state \x00 domain -> assigner state; hist \x00 domain \x00 ts ... -> code change
    "versions",  # kind \x00 domain [\x00 version(8, BE)] -> version record, table, items, ...
    "offsets",  # topic \x00 partition(4, BE) -> next offset (8, BE); built here (offset_key)
)

#: The format marker every partition holds in ``meta``: ``FORMAT_KEY`` -> ``FORMAT``.
FORMAT_KEY = b"format"
FORMAT = b"adacode-state-v1"

_OFFSET = struct.Struct(">q")
_PARTITION = struct.Struct(">i")


def offset_key(topic: str, partition: int) -> bytes:
    """Key of a consumer offset in the ``offsets`` column family."""
    return topic.encode() + b"\x00" + _PARTITION.pack(partition)


def decode_offset_key(key: bytes) -> tuple[str, int]:
    """Inverse of :func:`offset_key`.

    The partition number is the fixed-size tail (its bytes may contain ``\\x00``, so
    the key is not split at the last separator).
    """
    size = _PARTITION.size
    topic, sep, part = key[: -size - 1], key[-size - 1 : -size], key[-size:]
    if sep != b"\x00" or len(part) != size:
        raise StateFormatError(
            f"the offsets column family holds {key!r}, which is not an offset key "
            "(topic, \\x00, 4-byte partition); the state store was written by other "
            "software: move it away or point state_dir elsewhere"
        )
    return topic.decode(), _PARTITION.unpack(part)[0]


def prefix_upper_bound(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix``.

    Trailing ``\\xff`` bytes are dropped and the last remaining byte incremented;
    ``None`` when there is no such key (``prefix`` is empty or all ``\\xff``).
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def key_after(key: bytes) -> bytes:
    """The smallest key greater than ``key`` (an exclusive range end that keeps ``key``)."""
    return key + b"\x00"


def key_range(prefix: bytes, start: bytes | None, end: bytes | None) -> tuple[bytes, bytes | None]:
    """The ``[lower, upper)`` key range of ``items(prefix=, start=, end=)``; ``None``: unbounded."""
    lower = prefix if start is None else max(start, prefix)
    upper = prefix_upper_bound(prefix)
    if end is not None:
        upper = end if upper is None else min(end, upper)
    return lower, upper


#: rows a bulk read (:meth:`StorePartition.scan`) takes per call (~10 ms with the GIL held at
#: ~1 us a row: between two chunks, other threads run)
SCAN_CHUNK = 8192


class WriteBatch(ABC):
    """A set of changes applied all together or not at all."""

    @abstractmethod
    def put(self, cf: str, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value`` in column family ``cf``."""

    @abstractmethod
    def delete(self, cf: str, key: bytes) -> None:
        """Remove ``key`` from ``cf`` (no error if absent)."""

    @abstractmethod
    def delete_range(self, cf: str, start: bytes, end: bytes) -> None:
        """Remove every key ``k`` of ``cf`` with ``start <= k < end`` (none if ``start >= end``)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of operations recorded."""

    def set_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """Record the next offset to consume for ``topic``/``partition``."""
        self.put("offsets", offset_key(topic, partition), _OFFSET.pack(next_offset))


class StorePartition(ABC):
    """An ordered, column-family key-value store with atomic batches."""

    @abstractmethod
    def get(self, cf: str, key: bytes) -> bytes | None:
        """The value of ``key`` in ``cf``, or ``None``."""

    @abstractmethod
    def multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        """Values of many keys at once, in the order given."""

    @abstractmethod
    def items(
        self,
        cf: str,
        *,
        prefix: bytes = b"",
        start: bytes | None = None,
        end: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Key/value pairs of ``cf`` in key order (``start <= k < end``, and ``k`` starts with ``prefix``)."""

    def scan(self, cf: str, *, prefix: bytes = b"") -> tuple[list[bytes], list[bytes]]:
        """Every key and value of ``cf`` under ``prefix``, in key order, as two lists (keys,
        values): a bulk read (a million rows without a Python call per row where the backend
        allows). Two lists of bytes, not a list of pairs: a million pairs kept alive are a
        million objects the cyclic collector tracks, and a full pass over them held the
        interpreter ~150 ms in the middle of a fine-tune's read."""
        keys: list[bytes] = []
        values: list[bytes] = []
        for chunk_keys, chunk_values in self.scan_chunks(cf, SCAN_CHUNK, prefix=prefix):
            keys += chunk_keys
            values += chunk_values
        return keys, values

    def scan_chunks(
        self, cf: str, size: int, *, prefix: bytes = b""
    ) -> Iterator[tuple[list[bytes], list[bytes]]]:
        """:meth:`scan` in chunks of at most ``size`` rows (keys, values), read from one
        snapshot as the caller goes: a pass over a whole column family in bounded memory,
        without a Python call per row where the backend allows."""
        if size < 1:
            raise ValueError(f"scan_chunks: size={size}; it must be at least 1")
        rows = self.items(cf, prefix=prefix)
        while chunk := self._take(rows, size):
            keys, values = zip(*chunk, strict=True)  # the pairs die here
            yield list(keys), list(values)

    def _take(self, rows: Iterator[tuple[bytes, bytes]], n: int) -> list[tuple[bytes, bytes]]:
        """The next ``n`` rows at most of an :meth:`items` iterator (a backend may read
        them in one call instead of one by one)."""
        return list(itertools.islice(rows, n))

    @abstractmethod
    def batch(self) -> WriteBatch:
        """A new, empty batch for this partition."""

    @abstractmethod
    def write(self, batch: WriteBatch, *, durable: bool = True) -> None:
        """Apply ``batch`` atomically and durably (fsync'd WAL where the backend has one).

        With ``durable=False`` the batch is applied and logged but not flushed to disk: it
        becomes durable with the next durable write (RocksDB's one write-ahead log is synced
        in order), and a crash before that may lose it. For data that nothing reads until a
        later durable write refers to it (a version's blob parts before its manifest): an
        fsync holds the interpreter in RocksDB's write (~10-15 ms here).

        The batch is consumed: writing it again raises. A failed write applies nothing
        and raises :class:`store.exceptions.StoreWriteError`.
        """

    @abstractmethod
    def checkpoint(self, path: Path) -> StorePartition:
        """A consistent, read-only copy of the whole partition at one instant, opened at ``path``."""

    @abstractmethod
    def close(self) -> None:
        """Release the partition; further calls fail."""

    @abstractmethod
    def memory_usage(self) -> dict[str, int]:
        """Bytes the partition holds in memory, by part (for ``/metrics`` and the soak)."""

    # ---- between owners --------------------------------------------------------------

    def restore_owned(self, partitions: Collection[int]) -> list[str]:
        """Bring in the state that other owners of the event ``partitions`` committed, before
        they are processed here; returns the domains whose state changed, sorted.

        Called on each assignment. A plain partition is the only copy of its state, so the
        default does nothing; a store shared by a group of workers (the worker's
        ``MirroredStore``) restores what moves between owners.
        """
        return []

    # ---- derived helpers -------------------------------------------------------------

    def offsets(self) -> dict[tuple[str, int], int]:
        """Every stored next-offset, as ``{(topic, partition): offset}``."""
        return {decode_offset_key(k): _OFFSET.unpack(v)[0] for k, v in self.items("offsets")}

    def get_offset(self, topic: str, partition: int) -> int | None:
        raw = self.get("offsets", offset_key(topic, partition))
        return None if raw is None else _OFFSET.unpack(raw)[0]

    def count(self, cf: str, *, prefix: bytes = b"") -> int:
        return sum(1 for _ in self.items(cf, prefix=prefix))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
