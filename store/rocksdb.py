"""The RocksDB :class:`~store.partition.StorePartition`, on rocksdict in raw (bytes) mode.

One RocksDB database per state directory, one RocksDB column family per entry of
:data:`~store.partition.COLUMN_FAMILIES`. Three ways to open it:

* primary (the worker): read-write, holds the directory's lock, every batch
  written with an fsync'd WAL unless ``sync_writes=False``;
* ``read_only=True``: a frozen view of the database as it was when opened, usable
  while the primary runs (in this process or another);
* ``secondary_path=DIR``: a read-only view that follows the primary on
  :meth:`RocksDBPartition.catch_up`; ``DIR`` holds the secondary's own logs.

The ``meta`` column family holds a format marker (``b"format"`` →
``b"adacode-state-v1"``), written when the store is created. A directory with other
files, another format, or a corrupted database raises
:class:`~store.exceptions.StateFormatError`; it is never reused silently.

rocksdict pitfalls, checked in ``tests/store/test_rocksdb.py``:

* ``ReadOptions.set_iterate_lower_bound`` sets the *upper* bound (rocksdict 0.3.29
  assigns the wrong field), so lower bounds are applied by seeking and, in reverse,
  by stopping at the bound;
* an ``RdictItems`` iterator does not keep its ``ReadOptions`` alive although it
  reads the iterate bound from it, so each scan holds on to its options;
* iterators of ``Rdict.snapshot()`` show writes made after the snapshot (only its
  point reads are consistent), so consistent copies are taken with
  :meth:`RocksDBPartition.checkpoint` instead.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import rocksdict

from store.exceptions import (
    StateFormatError,
    StateLockedError,
    StoreClosedError,
    StoreError,
    StoreWriteError,
)
from store.partition import (
    COLUMN_FAMILIES,
    FORMAT,
    FORMAT_KEY,
    StorePartition,
    WriteBatch,
    key_range,
)

_DEFAULT_CF = "default"
_MOVE_AWAY = "move it away or point state_dir elsewhere"

Mode = Literal["primary", "read-only", "secondary"]


#: Memtables of all column families together are flushed beyond this many bytes. RocksDB's
#: default is 64 MiB *per column family* (two of them each before a stall), so a worker with
#: a dozen families and a steady stream kept growing for many minutes before its first
#: flushes; one shared cap bounds the state's memory from the start.
MEMTABLE_BUDGET_BYTES = 64 * 1024 * 1024

#: Data, index and filter blocks read from disk, for every column family of every store
#: this process opens. Without it RocksDB gives each column family its own 32 MiB cache
#: and keeps the index and filter blocks of every table file outside any cache, so the
#: resident size followed the state's size on disk.
BLOCK_CACHE_BYTES = 64 * 1024 * 1024
_BLOCK_CACHE = rocksdict.Cache(BLOCK_CACHE_BYTES)
#: the most seconds a checkpoint waits for the memtables' background flush (see
#: RocksDBPartition._flush_in_background)
FLUSH_WAIT_S = 5.0


#: column families read key by key on the ingest path (each batch reads its items, their
#: popularity, its users' recent items, counters and offsets): their table files carry a
#: Bloom filter, so a lookup reads the data block of the one file that holds the key instead
#: of one per L0 file and level whose key range covers it. Without filters the users' reads
#: grew from 13 % to 20 % of the consumer's time over a 10M-interaction run as the family
#: grew levels. The others are scanned by prefix, where whole-key filters do not help.
POINT_READ_FAMILIES = frozenset({"meta", "items", "popularity", "users", "recent", "offsets"})
#: bits per key of those filters (~1 % false positives)
BLOOM_BITS_PER_KEY = 10


def _family_options(cf: str = _DEFAULT_CF) -> rocksdict.Options:
    """Options of one column family: raw bytes, blocks in the shared cache, a Bloom filter
    for the families read key by key."""
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(_BLOCK_CACHE)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    if cf in POINT_READ_FAMILIES:
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)  # a full filter per file
    options = rocksdict.Options(raw_mode=True)
    options.set_block_based_table_factory(table)
    return options


def _options(*, create: bool = False) -> rocksdict.Options:
    options = _family_options()
    options.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES)
    options.create_if_missing(create)
    options.create_missing_column_families(create)
    return options


def _open_error(path: Path, exc: Exception) -> StoreError:
    """Translate a rocksdict error raised while opening ``path``."""
    message = str(exc)
    lowered = message.lower()
    if "lock" in lowered:
        return StateLockedError(
            f"state directory {path} is in use by another process or open partition "
            f"({message}); stop the other worker first, or inspect it with "
            "read_only=True or a secondary_path"
        )
    if "permission denied" in lowered:
        return StoreError(
            f"cannot open state directory {path}: permission denied ({message}); "
            "give the worker's user read and write access to it"
        )
    return StateFormatError(
        f"state directory {path} could not be opened as a RocksDB database ({message}); "
        f"it is corrupted or not an adacode state store: {_MOVE_AWAY}"
    )


class RocksDBWriteBatch(WriteBatch):
    """A rocksdict ``WriteBatch`` addressed by column family name."""

    def __init__(self, owner: RocksDBPartition) -> None:
        self._owner = owner
        self._batch = rocksdict.WriteBatch(raw_mode=True)
        self._count = 0
        self._consumed = False

    def _handle(self, cf: str) -> rocksdict.ColumnFamily:
        if self._consumed:
            raise StoreError(
                f"state store {self._owner.path}: this batch was already written; "
                "start a new one with partition.batch()"
            )
        handle = self._owner._handle(cf)
        self._count += 1
        return handle

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        # the hot path of every batch: a dict look-up, the checks only when it misses
        # (no reference to the handles is kept: it would hold the database open after close)
        handle = self._owner._handles.get(cf) if not self._consumed else None
        if handle is None:
            handle = self._handle(cf)
            self._count -= 1
        self._count += 1
        self._batch.put(key, value, handle)

    def delete(self, cf: str, key: bytes) -> None:
        self._batch.delete(key, self._handle(cf))

    def delete_range(self, cf: str, start: bytes, end: bytes) -> None:
        handle = self._handle(cf)
        if start < end:  # RocksDB rejects or mishandles reversed ranges
            self._batch.delete_range(start, end, handle)

    def __len__(self) -> int:
        return self._count


class _Cursor(Iterator[tuple[bytes, bytes]]):
    """An ordered scan of one column family; its rows come from one implicit snapshot.

    The partition releases live cursors on close (an open rocksdict iterator would
    keep the database, and its lock, alive); a released cursor raises
    :class:`StoreClosedError`.
    """

    def __init__(
        self,
        owner: RocksDBPartition,
        rows: Iterator[Any],
        floor: bytes | None,
        read_options: rocksdict.ReadOptions,
    ) -> None:
        self._owner = owner
        self._rows: Iterator[Any] | None = rows
        # rocksdict's iterator does not keep its ReadOptions alive, and the upper
        # bound lives there: freeing it early makes the scan stop at garbage.
        self._read_options: rocksdict.ReadOptions | None = read_options
        self._floor = floor
        self._released = False

    def __next__(self) -> tuple[bytes, bytes]:
        rows = self._rows
        if rows is None:
            if self._released:
                raise StoreClosedError(
                    f"state store {self._owner.path} was closed while being iterated"
                )
            raise StopIteration
        try:
            key, value = cast(tuple[bytes, bytes], next(rows))
        except StopIteration:
            self._rows = self._read_options = None
            raise
        except Exception as exc:
            raise self._failed(exc) from exc
        if self._floor is not None and key < self._floor:
            self._rows = self._read_options = None
            raise StopIteration
        return key, value

    def take(self, n: int) -> list[tuple[bytes, bytes]]:
        """The next ``n`` rows at most, read in one call into rocksdict (no Python call per
        row); forward cursors only (a reverse one has a floor to check row by row)."""
        rows = self._rows
        if rows is None or self._floor is not None:
            return list(itertools.islice(self, n))
        try:
            chunk = cast(list[tuple[bytes, bytes]], list(itertools.islice(rows, n)))
        except Exception as exc:
            raise self._failed(exc) from exc
        if len(chunk) < n:
            self._rows = self._read_options = None
        return chunk

    def _failed(self, exc: Exception) -> StoreError:
        """The error a failed read of the iterator raises (closed, or the disk)."""
        if isinstance(exc, rocksdict.DbClosedError):
            return StoreClosedError(
                f"state store {self._owner.path} was closed while being iterated"
            )
        return StoreError(
            f"reading state store {self._owner.path} failed ({exc}); "
            "check the disk, then restart the worker"
        )

    def release(self) -> None:
        self._rows = self._read_options = None
        self._released = True


class RocksDBPartition(StorePartition):
    """A state partition in one RocksDB directory. Create it with :meth:`open`."""

    def __init__(
        self,
        db: rocksdict.Rdict,
        path: Path,
        *,
        mode: Mode,
        sync_writes: bool,
    ) -> None:
        self._db: rocksdict.Rdict | None = db
        self._path = path
        self._mode: Mode = mode
        self._families = {cf: db.get_column_family(cf) for cf in COLUMN_FAMILIES}
        self._handles = {cf: db.get_column_family_handle(cf) for cf in COLUMN_FAMILIES}
        self._sync_writes = sync_writes
        self._cursors: weakref.WeakSet[_Cursor] = weakref.WeakSet()
        self._closed = False

    # ---- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        read_only: bool = False,
        secondary_path: Path | None = None,
        sync_writes: bool = True,
    ) -> RocksDBPartition:
        """Open (the primary creates) the state store at ``path``.

        ``secondary_path`` opens a read-only secondary that follows the primary on
        :meth:`catch_up`; ``read_only`` a frozen view. Raises
        :class:`StateFormatError` for anything but an adacode state store of this
        format, :class:`StateLockedError` when another primary holds ``path``.
        """
        path = Path(path)
        mode: Mode = (
            "secondary" if secondary_path is not None else "read-only" if read_only else "primary"
        )
        if path.exists() and not path.is_dir():
            raise StateFormatError(
                f"state directory {path} is a file, not a directory; {_MOVE_AWAY}"
            )
        try:
            entries = sorted(p.name for p in path.iterdir()) if path.exists() else []
        except OSError as exc:
            raise StoreError(
                f"cannot list state directory {path} ({exc}); give the worker's user "
                "read and write access to it"
            ) from exc
        if not entries:
            if mode != "primary":
                raise StateFormatError(
                    f"state directory {path} holds no state store (it is missing or empty); "
                    "start the worker once to create it, or check the path"
                )
            return cls._create(path, sync_writes=sync_writes)
        if "CURRENT" not in entries:
            found = ", ".join(entries[:5])
            raise StateFormatError(
                f"state directory {path} is not a RocksDB database (found {found}, "
                f"no CURRENT file); {_MOVE_AWAY}"
            )
        try:
            existing = rocksdict.Rdict.list_cf(str(path), _options())
        except Exception as exc:
            raise _open_error(path, exc) from exc
        if "meta" not in existing:
            # RocksDB lists only "default" for an unreadable MANIFEST too.
            raise StateFormatError(
                f"state directory {path} holds a RocksDB database without adacode's column "
                f"families (found {', '.join(existing)}): another program's database or a "
                f"corrupted one; {_MOVE_AWAY}"
            )
        db = cls._open_rdict(path, existing, secondary_path=secondary_path, read_only=read_only)
        try:
            cls._check_format(db, path, existing, writable=mode == "primary")
            missing = [cf for cf in COLUMN_FAMILIES if cf not in existing]
            if missing and mode != "primary":
                raise StateFormatError(
                    f"state store {path} lacks column families {', '.join(missing)}; "
                    "open it once read-write (start the worker) to add them"
                )
            for cf in missing:
                db.create_column_family(cf, _family_options(cf)).close()
            return cls(db, path, mode=mode, sync_writes=sync_writes)
        except BaseException:
            db.close()
            raise

    @classmethod
    def _create(cls, path: Path, *, sync_writes: bool) -> RocksDBPartition:
        """Create the store beside ``path``, complete with its format marker, then move it
        into place: a reader (e.g. a secondary instance) never sees a half-made store."""
        staging = path.parent / f".{path.name}.creating-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        db = cls._open_rdict(staging, list(COLUMN_FAMILIES), create=True)
        partition = cls(db, staging, mode="primary", sync_writes=sync_writes)
        try:
            batch = partition.batch()
            batch.put("meta", FORMAT_KEY, FORMAT)
            partition._write_now(batch, sync=True)
        finally:
            partition.close()
        if path.is_dir():
            path.rmdir()  # empty (checked by the caller); rename needs it gone or empty
        staging.rename(path)
        db = cls._open_rdict(path, list(COLUMN_FAMILIES))
        return cls(db, path, mode="primary", sync_writes=sync_writes)

    @staticmethod
    def _open_rdict(
        path: Path,
        families: list[str],
        *,
        secondary_path: Path | None = None,
        read_only: bool = False,
        create: bool = False,
    ) -> rocksdict.Rdict:
        if secondary_path is not None:
            secondary_path.mkdir(parents=True, exist_ok=True)
            access = rocksdict.AccessType.secondary(str(secondary_path))
        elif read_only:
            access = rocksdict.AccessType.read_only(False)
        else:
            access = rocksdict.AccessType.read_write()
        column_families = {cf: _family_options(cf) for cf in families if cf != _DEFAULT_CF}
        try:
            return rocksdict.Rdict(
                str(path), _options(create=create), column_families, access_type=access
            )
        except Exception as exc:
            raise _open_error(path, exc) from exc

    @staticmethod
    def _check_format(
        db: rocksdict.Rdict, path: Path, existing: list[str], *, writable: bool
    ) -> None:
        meta = db.get_column_family("meta")
        try:
            found = meta.get(FORMAT_KEY)
            if found == FORMAT:
                return
            if found is None and writable and _is_blank(db, existing):
                # Created by us and interrupted before the marker was written.
                meta.put(FORMAT_KEY, FORMAT, _write_sync(True))
                return
        finally:
            meta.close()
        if found is None:
            raise StateFormatError(
                f"state directory {path} is a RocksDB database without adacode's format "
                f"marker (meta/{FORMAT_KEY.decode()} is missing); {_MOVE_AWAY}"
            )
        raise StateFormatError(
            f"state directory {path} holds state format {found!r}; this version of adacode "
            f"reads {FORMAT!r} only: {_MOVE_AWAY}, or run the adacode version that wrote it"
        )

    # ---- properties ----------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The state directory."""
        return self._path

    @property
    def mode(self) -> Mode:
        """``"primary"``, ``"read-only"`` or ``"secondary"``."""
        return self._mode

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._mode
        return f"RocksDBPartition({str(self._path)!r}, {state})"

    # ---- reads ---------------------------------------------------------------------

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError(f"state store {self._path} was used after close(); open it again")

    def _family(self, cf: str) -> rocksdict.Rdict:
        if self._closed:
            raise self._closed_error()
        try:
            return self._families[cf]
        except KeyError:
            raise StoreError(
                f"state store {self._path}: unknown column family {cf!r}; "
                f"use one of {', '.join(COLUMN_FAMILIES)}"
            ) from None

    def _handle(self, cf: str) -> rocksdict.ColumnFamily:
        self._family(cf)
        return self._handles[cf]

    def _read_error(self, exc: Exception) -> StoreError:
        if isinstance(exc, rocksdict.DbClosedError):
            return self._closed_error()
        return StoreError(
            f"reading state store {self._path} failed ({exc}); check the disk, then restart"
        )

    def get(self, cf: str, key: bytes) -> bytes | None:
        family = self._family(cf)
        try:
            return cast(bytes | None, family.get(key))
        except Exception as exc:
            raise self._read_error(exc) from exc

    def multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        family = self._family(cf)
        if not keys:
            return []
        try:
            return cast(list[bytes | None], family.get(list(keys)))
        except Exception as exc:
            raise self._read_error(exc) from exc

    def items(
        self,
        cf: str,
        *,
        prefix: bytes = b"",
        start: bytes | None = None,
        end: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        family = self._family(cf)
        lower, upper = key_range(prefix, start, end)
        if upper is not None and lower >= upper:
            return iter(())
        read_options = rocksdict.ReadOptions()
        # scans (a fine-tune reads a domain's whole log) would evict the point reads' working
        # set from the block cache and grow it to its bound: they read past it
        # (rocksdict 0.3.29's stub omits the argument; the call takes it: test_rocksdb.py)
        read_options.fill_cache(False)  # type: ignore[call-arg]
        if upper is not None:
            read_options.set_iterate_upper_bound(upper)
        try:
            if reverse:
                rows = family.items(backwards=True, read_opt=read_options)
            else:
                rows = family.items(from_key=lower, read_opt=read_options)
        except Exception as exc:
            raise self._read_error(exc) from exc
        cursor = _Cursor(self, rows, lower if reverse and lower else None, read_options)
        self._cursors.add(cursor)
        return cursor

    def _take(self, rows: Iterator[tuple[bytes, bytes]], n: int) -> list[tuple[bytes, bytes]]:
        # rocksdict's iterator into a list, ``n`` rows per call: no wrapper call per row, and
        # other threads (a scrape, a request) get the GIL between chunks instead of waiting
        # for a million rows (~1 s held in one call); the cursor is released with the
        # partition, as any scan's
        if isinstance(rows, _Cursor):
            return rows.take(n)
        return super()._take(rows, n)  # an empty range

    # ---- writes --------------------------------------------------------------------

    def batch(self) -> RocksDBWriteBatch:
        if self._closed:
            raise self._closed_error()
        return RocksDBWriteBatch(self)

    def write(self, batch: WriteBatch, *, durable: bool = True) -> None:
        if not isinstance(batch, RocksDBWriteBatch) or batch._owner is not self:
            raise StoreError(
                f"state store {self._path}: the batch was not made by this partition; "
                "use partition.batch()"
            )
        if self._mode != "primary":
            raise StoreError(
                f"state store {self._path} is open {self._mode}; "
                "only the primary (the worker) writes"
            )
        self._write_now(batch, sync=None if durable else False)

    def _write_now(self, batch: RocksDBWriteBatch, *, sync: bool | None) -> None:
        if self._closed or self._db is None:
            raise self._closed_error()
        if batch._consumed:
            raise StoreError(
                f"state store {self._path}: this batch was already written; "
                "start a new one with partition.batch()"
            )
        batch._consumed = True  # rocksdict consumes it even when the write fails
        durable = self._sync_writes if sync is None else sync
        try:
            self._db.write(batch._batch, _UNSYNCED)
        except rocksdict.DbClosedError as exc:
            raise self._closed_error() from exc
        except Exception as exc:
            raise StoreWriteError(
                f"writing a batch of {len(batch)} operations to state store {self._path} "
                f"failed ({exc}); nothing of it was committed, consumer offsets included. "
                "Free disk space or fix the disk, then restart the worker: it resumes "
                "from the last committed offsets"
            ) from exc
        if durable:
            self._sync_wal(len(batch))

    def _sync_wal(self, operations: int) -> None:
        """fsync the write-ahead log, with the interpreter released.

        A synced ``Rdict.write`` holds the GIL through its fsync (rocksdict 0.3.29), which
        stalled every other thread (the API's) 10-40 ms per batch; ``flush_wal(sync=True)``
        releases it. The batch is already in the log (written, not yet synced) and the
        caller acknowledges nothing before this returns, so what survives a power loss is
        the same: a crash before the sync replays from an earlier offset, one after it
        from this batch's.
        """
        assert self._db is not None
        try:
            self._db.flush_wal(True)
        except rocksdict.DbClosedError as exc:
            raise self._closed_error() from exc
        except Exception as exc:
            raise StoreWriteError(
                f"syncing the write-ahead log of state store {self._path} after a batch of "
                f"{operations} operations failed ({exc}); the batch may not be durable. Fix "
                "the disk, then restart the worker: it resumes from the offsets the log holds"
            ) from exc

    # ---- lifecycle -----------------------------------------------------------------

    def checkpoint(self, path: Path) -> RocksDBPartition:
        """A RocksDB checkpoint (hard links where possible) at ``path``, opened read-only.

        ``path`` must not exist; the caller removes it when done. This is how a job
        off the consumer thread gets a consistent copy of every column family.
        """
        if self._closed or self._db is None:
            raise self._closed_error()
        path = Path(path)
        if path.exists():
            raise StoreError(
                f"checkpoint directory {path} already exists; pass a fresh path "
                "or remove the old checkpoint"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self._flush_in_background()
        try:
            rocksdict.Checkpoint(self._db).create_checkpoint(str(path))
        except Exception as exc:
            raise StoreError(
                f"creating a checkpoint of state store {self._path} at {path} failed "
                f"({exc}); check free disk space and that {path.parent} is writable"
            ) from exc
        return RocksDBPartition.open(path, read_only=True)

    def _flush_in_background(self) -> None:
        """Flush every family's memtable in RocksDB's background threads and wait for it
        here, in short sleeps. A checkpoint flushes the memtables itself, inside one call
        that holds the interpreter (~200 ms for 12 MB in process: every other thread, the
        HTTP server's included, waited); after this it has only what was written since.
        Best effort: a flush that cannot be scheduled or is still pending after
        ``FLUSH_WAIT_S`` is left to the checkpoint."""
        try:
            families = [self._family(cf) for cf in COLUMN_FAMILIES]
            for family in families:
                family.flush(wait=False)
            deadline = time.monotonic() + FLUSH_WAIT_S
            while time.monotonic() < deadline and any(
                family.property_int_value("rocksdb.mem-table-flush-pending")
                or family.property_int_value("rocksdb.num-running-flushes")
                for family in families
            ):
                time.sleep(0.005)
        except Exception:  # the checkpoint flushes what is left, and reports a real failure
            return

    def catch_up(self) -> None:
        """Make a secondary see everything the primary has written so far."""
        if self._closed or self._db is None:
            raise self._closed_error()
        if self._mode != "secondary":
            raise StoreError(
                f"state store {self._path} is open {self._mode}; catch_up() needs a "
                "secondary: open it with secondary_path=..."
            )
        try:
            self._db.try_catch_up_with_primary()
        except Exception as exc:
            raise StoreError(
                f"secondary of state store {self._path} could not catch up with the "
                f"primary ({exc}); reopen the secondary"
            ) from exc

    def memory_usage(self) -> dict[str, int]:
        """``memtables`` (all column families, bounded by :data:`MEMTABLE_BUDGET_BYTES`),
        ``block_cache`` (the process's shared cache, bounded by :data:`BLOCK_CACHE_BYTES`)
        and ``table_readers`` (table-file metadata held outside the cache)."""
        usage = {"memtables": 0, "table_readers": 0}
        for cf in COLUMN_FAMILIES:
            family = self._family(cf)
            for part, name in (
                ("memtables", "rocksdb.cur-size-all-mem-tables"),
                ("table_readers", "rocksdb.estimate-table-readers-mem"),
            ):
                usage[part] += family.property_int_value(name) or 0
        usage["block_cache"] = _BLOCK_CACHE.get_usage()
        return usage

    def close(self) -> None:
        """Release the database and its lock; idempotent.

        Live iterators are released too. Raises :class:`StoreError` when RocksDB
        fails to flush on close (after a disk error): batches written with
        ``sync_writes`` are in the write-ahead log and are replayed on the next open.
        """
        if self._closed:
            return
        self._closed = True
        for cursor in list(self._cursors):
            cursor.release()
        db, families = self._db, list(self._families.values())
        self._db, self._families, self._handles = None, {}, {}
        failures: list[Exception] = []
        for family in families:
            try:
                family.close()
            except Exception as exc:
                failures.append(exc)
        if db is not None:
            try:
                db.close()
            except Exception as exc:
                failures.append(exc)
        del db, families
        if failures:
            raise StoreError(
                f"closing state store {self._path} failed ({failures[-1]}); batches written "
                "with sync_writes are in the write-ahead log and replay on the next open; "
                "fix the disk before restarting"
            ) from failures[-1]


def _write_sync(sync: bool) -> rocksdict.WriteOptions:
    options = rocksdict.WriteOptions()
    options.sync = sync
    return options


def _is_blank(db: rocksdict.Rdict, existing: list[str]) -> bool:
    """Whether ``db`` has only adacode's column families and no key at all."""
    if not set(existing) <= {*COLUMN_FAMILIES, _DEFAULT_CF}:
        return False
    for cf in existing:
        family = db if cf == _DEFAULT_CF else db.get_column_family(cf)
        keys: Any = family.keys()
        empty = next(keys, None) is None
        del keys
        if family is not db:
            family.close()
        if not empty:
            return False
    return True


#: every batch is written unsynced; a durable one is then synced by ``flush_wal``, which
#: releases the interpreter (see :meth:`RocksDBPartition._sync_wal`)
_UNSYNCED = _write_sync(False)
