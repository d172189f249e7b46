"""The root of the worker's errors, and configuration errors.

Each wing that defines errors has its own ``exceptions`` module; the whole tree::

    AdacodeError                       adacode.errors
    └── WorkerError                    worker.core.exceptions
        ├── ConfigError                worker.core.exceptions
        ├── KeyLayoutError             worker.state.exceptions
        ├── VersionError               worker.state.exceptions
        ├── EventError                 worker.ingest.exceptions
        ├── KafkaUnavailableError      worker.ingest.exceptions
        ├── KafkaRefusedError          worker.ingest.exceptions
        ├── EncoderError               worker.ingest.exceptions
        ├── BatchAbandoned             worker.ingest.exceptions
        ├── NotOwnedError              worker.ingest.exceptions
        ├── CodebookConflictError      worker.ingest.exceptions
        ├── BootstrapError             worker.ingest.exceptions
        ├── BootstrapStopped           worker.ingest.exceptions
        ├── Abandoned                  worker.tuning.exceptions
        ├── FineTuneDataError          worker.tuning.exceptions
        ├── ServingError               worker.serving.exceptions (and its subclasses)
        ├── DatasetError               worker.commands.exceptions
        └── WorkerProcessError         worker.commands.exceptions (and its subclasses)

A wing's own tree is drawn in its ``exceptions`` module's docstring.
"""

from __future__ import annotations

from adacode.errors import AdacodeError


class WorkerError(AdacodeError):
    """Base class of worker errors."""


class ConfigError(WorkerError):
    """A setting is missing, unknown or out of range.

    The message names the key, where it came from (file, environment, flag), what
    was wrong and what is allowed.
    """
