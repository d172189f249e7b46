"""Errors raised on purpose by the :mod:`store` package.

Every class derives from :class:`adacode.errors.AdacodeError`. Messages name the
state directory (or partition), the cause and the fix; errors of the storage engine
are chained with ``raise ... from exc``.
"""

from adacode.errors import AdacodeError


class StoreError(AdacodeError):
    """Base class of all errors raised by :mod:`store`.

    Also raised directly for misuse: an unknown column family, a batch written twice
    or to another partition, a write to a read-only partition.
    """


class StateFormatError(StoreError):
    """The state directory is not an adacode state store of a format this version reads.

    Raised for a directory that holds other files, a RocksDB database without the
    adacode format marker or with another format's marker, and a corrupted database.
    The directory is never reused silently.
    """


class StateLockedError(StoreError):
    """Another process (or another open partition in this one) holds the state directory."""


class StoreClosedError(StoreError):
    """The partition was used after :meth:`~store.partition.StorePartition.close`."""


class StoreWriteError(StoreError):
    """A batch could not be written (disk full, I/O error): nothing of it was committed.

    The batch holds the consumer offsets too, so the offsets were not committed
    either; after the cause is fixed the worker resumes from the last committed ones.
    """
