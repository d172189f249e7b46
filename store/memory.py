"""An in-memory :class:`~store.partition.StorePartition` for tests and dry runs.

Each column family is a dict plus a sorted list of its keys (kept with
:mod:`bisect`), so point reads are O(1) and ordered range scans O(log n + k).
A write applies its batch under a lock and undoes what it applied if anything
fails midway, so a batch lands whole or not at all. Nothing survives the process.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from store.exceptions import StoreClosedError, StoreError, StoreWriteError
from store.partition import (
    COLUMN_FAMILIES,
    FORMAT,
    FORMAT_KEY,
    StorePartition,
    WriteBatch,
    key_range,
)

_Op = tuple[Literal["put", "delete", "delete_range"], str, bytes, bytes]

_NAME = "in-memory state partition"


def _check_cf(cf: str) -> None:
    if cf not in COLUMN_FAMILIES:
        raise StoreError(
            f"{_NAME}: unknown column family {cf!r}; use one of {', '.join(COLUMN_FAMILIES)}"
        )


class MemoryWriteBatch(WriteBatch):
    """Records operations, in order, for :meth:`MemoryPartition.write`."""

    def __init__(self, owner: MemoryPartition) -> None:
        self._owner = owner
        self._ops: list[_Op] = []
        self._consumed = False

    def _record(self, op: _Op) -> None:
        if self._consumed:
            raise StoreError(
                f"{_NAME}: this batch was already written; start a new one with partition.batch()"
            )
        _check_cf(op[1])
        self._ops.append(op)

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self._record(("put", cf, bytes(key), bytes(value)))

    def delete(self, cf: str, key: bytes) -> None:
        self._record(("delete", cf, bytes(key), b""))

    def delete_range(self, cf: str, start: bytes, end: bytes) -> None:
        self._record(("delete_range", cf, bytes(start), bytes(end)))

    def __len__(self) -> int:
        return len(self._ops)


class _Family:
    """One column family: values by key and the keys in order."""

    __slots__ = ("keys", "values")

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.keys: list[bytes] = []

    def set(self, key: bytes, value: bytes) -> None:
        if key not in self.values:
            bisect.insort(self.keys, key)
        self.values[key] = value

    def remove(self, key: bytes) -> None:
        if self.values.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]

    def copy(self) -> _Family:
        twin = _Family()
        twin.values = dict(self.values)
        twin.keys = list(self.keys)
        return twin


class MemoryPartition(StorePartition):
    """A thread-safe, ordered, in-memory partition with every column family."""

    def __init__(self) -> None:
        self._families = {cf: _Family() for cf in COLUMN_FAMILIES}
        self._families["meta"].set(FORMAT_KEY, FORMAT)  # as a new RocksDB partition has
        self._lock = threading.RLock()
        self._closed = False
        self._read_only = False

    # ---- reads ---------------------------------------------------------------------

    def _family(self, cf: str) -> _Family:
        if self._closed:
            raise StoreClosedError(f"{_NAME} was used after close(); open a new partition")
        _check_cf(cf)
        return self._families[cf]

    def get(self, cf: str, key: bytes) -> bytes | None:
        with self._lock:
            return self._family(cf).values.get(key)

    def multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        with self._lock:
            values = self._family(cf).values
            return [values.get(key) for key in keys]

    def items(
        self,
        cf: str,
        *,
        prefix: bytes = b"",
        start: bytes | None = None,
        end: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        with self._lock:
            family = self._family(cf)
            lower, upper = key_range(prefix, start, end)
            lo = bisect.bisect_left(family.keys, lower)
            hi = len(family.keys) if upper is None else bisect.bisect_left(family.keys, upper)
            # The view is taken now, so later writes never show up in this iteration.
            rows = [(k, family.values[k]) for k in family.keys[lo:hi]]
        if reverse:
            rows.reverse()
        return self._guarded(rows)

    def _guarded(self, rows: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
        for row in rows:
            if self._closed:
                raise StoreClosedError(f"{_NAME} was closed while being iterated")
            yield row

    # ---- writes --------------------------------------------------------------------

    def batch(self) -> MemoryWriteBatch:
        if self._closed:
            raise StoreClosedError(f"{_NAME} was used after close(); open a new partition")
        return MemoryWriteBatch(self)

    def write(self, batch: WriteBatch, *, durable: bool = True) -> None:
        if not isinstance(batch, MemoryWriteBatch) or batch._owner is not self:
            raise StoreError(
                f"{_NAME}: the batch was not made by this partition; use partition.batch()"
            )
        if self._read_only:
            raise StoreError(f"{_NAME} is a read-only checkpoint; write to the live partition")
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"{_NAME} was used after close(); open a new partition")
            if batch._consumed:
                raise StoreError(
                    f"{_NAME}: this batch was already written; start a new one with partition.batch()"
                )
            undo: list[tuple[_Family, bytes, bytes | None]] = []
            try:
                for kind, cf, a, b in batch._ops:
                    family = self._families[cf]
                    if kind == "put":
                        undo.append((family, a, family.values.get(a)))
                        family.set(a, b)
                    elif kind == "delete":
                        undo.append((family, a, family.values.get(a)))
                        family.remove(a)
                    else:
                        lo = bisect.bisect_left(family.keys, a)
                        hi = bisect.bisect_left(family.keys, b, lo)
                        for key in family.keys[lo:hi]:
                            undo.append((family, key, family.values[key]))
                            family.remove(key)
            except BaseException as exc:
                for family, key, old in reversed(undo):
                    if old is None:
                        family.remove(key)
                    else:
                        family.set(key, old)
                if not isinstance(exc, Exception):
                    raise
                raise StoreWriteError(
                    f"{_NAME}: applying a batch of {len(batch)} operations failed ({exc}); "
                    "it was rolled back, so nothing of it, offsets included, was committed"
                ) from exc
            batch._consumed = True

    # ---- lifecycle -----------------------------------------------------------------

    def checkpoint(self, path: Path) -> MemoryPartition:
        """A frozen, read-only copy of every column family; ``path`` is not used."""
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"{_NAME} was used after close(); open a new partition")
            twin = MemoryPartition()
            twin._families = {cf: family.copy() for cf, family in self._families.items()}
        twin._read_only = True
        return twin

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._families = {}

    def memory_usage(self) -> dict[str, int]:
        """``values``: the bytes of every key and value held (Python's overhead aside)."""
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"{_NAME} was used after close(); open a new partition")
            held = sum(
                len(k) + len(v)
                for family in self._families.values()
                for k, v in family.values.items()
            )
        return {"values": held}
