"""State partitions: ordered key-value stores with column families and atomic batches.

:func:`open_partition` is the front door: a RocksDB partition for a directory, an
in-memory one for ``None``.
"""

from __future__ import annotations

from pathlib import Path

from store.exceptions import StoreError
from store.memory import MemoryPartition
from store.partition import StorePartition, WriteBatch
from store.rocksdb import RocksDBPartition

__all__ = [
    "MemoryPartition",
    "RocksDBPartition",
    "StorePartition",
    "WriteBatch",
    "open_partition",
]


def open_partition(
    path: Path | str | None,
    *,
    read_only: bool = False,
    secondary_path: Path | None = None,
    sync_writes: bool = True,
) -> StorePartition:
    """Open the state partition at ``path`` (see :meth:`RocksDBPartition.open`).

    ``path=None`` gives a fresh :class:`MemoryPartition`, which has no read-only or
    secondary mode.
    """
    if path is None:
        if read_only or secondary_path is not None:
            raise StoreError(
                "an in-memory partition has no read-only or secondary view; "
                "pass the state directory to inspect a RocksDB partition"
            )
        return MemoryPartition()
    return RocksDBPartition.open(
        Path(path), read_only=read_only, secondary_path=secondary_path, sync_writes=sync_writes
    )
