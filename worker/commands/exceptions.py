"""Errors of the command-line wing.

::

    AdacodeError
    └── WorkerError
        ├── DatasetError               a dataset directory is missing a file or malformed
        └── WorkerProcessError         a worker subprocess did not get where it was awaited
            ├── WorkerExitedError      ... because it exited (``returncode``)
            └── WorkerTimeoutError     ... in time (it still runs)
"""

from __future__ import annotations

from worker.core.exceptions import WorkerError


class DatasetError(WorkerError):
    """A dataset directory is missing a file or has a malformed line."""


class WorkerProcessError(WorkerError):
    """The worker process did not get where it was awaited; the message ends with its log.

    ``returncode`` is its exit status when it exited, ``None`` when it ran out of time.
    """

    def __init__(self, message: str, returncode: int | None, log_tail: str) -> None:
        super().__init__(f"{message}; the end of its log:\n{log_tail}")
        self.returncode = returncode
        self.log_tail = log_tail


class WorkerExitedError(WorkerProcessError):
    """The worker exited before what was awaited (``returncode`` is its exit status)."""


class WorkerTimeoutError(WorkerProcessError):
    """The worker still ran, but did not get where it was awaited in time."""
