"""Errors of the tuning wing::

    AdacodeError
    └── WorkerError
        ├── Abandoned
        └── FineTuneDataError

:class:`Abandoned` never leaves :meth:`worker.tuning.finetune.FineTuner.run`: it unwinds
the training loop on a stop, and ``run`` answers an outcome with status
:attr:`~worker.tuning.finetune.FinetuneStatus.ABANDONED`.
"""

from __future__ import annotations

from worker.core.exceptions import WorkerError


class Abandoned(WorkerError):
    """The fine-tune was stopped (shutdown); nothing was published."""


class FineTuneDataError(WorkerError):
    """The snapshot's data cannot be trained on (e.g. a coded item without an embedding)."""
