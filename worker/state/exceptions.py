"""Errors of the state wing: stored keys and table versions.

::

    AdacodeError
    └── WorkerError
        ├── KeyLayoutError
        └── VersionError
"""

from __future__ import annotations

from worker.core.exceptions import WorkerError


class KeyLayoutError(WorkerError):
    """A stored key does not follow its column family's layout (see
    :mod:`worker.state.layout`): it was not written by adacode."""


class VersionError(WorkerError):
    """A version operation cannot be done (unknown version, no table, nothing to roll back to)."""
