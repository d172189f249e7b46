"""Errors of the ingest wing: events, Kafka, the encoder and the group's shared state.

::

    AdacodeError
    └── WorkerError
        ├── EventError                 an event is invalid (its record is dead-lettered)
        ├── KafkaUnavailableError      the Kafka cluster did not answer in time
        ├── KafkaRefusedError          Kafka refused a call for good (size, topic, authorization)
        ├── EncoderError               the text encoder failed to load or on a batch
        ├── BatchAbandoned             the loop stopped while a batch waited for Kafka
        ├── NotOwnedError              a write to a domain whose partition moved away
        ├── CodebookConflictError      this state's codebook is not the group's
        ├── BootstrapError             the background codebook bootstrap failed
        └── BootstrapStopped           the stop event ended a bootstrap (nothing trained)
"""

from __future__ import annotations

from worker.core.exceptions import WorkerError


class EventError(WorkerError):
    """An event could not be parsed or validated; ``reason`` says why.

    The worker never raises this past one message: the message goes to the
    dead-letter topic with the reason and the worker carries on.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KafkaUnavailableError(WorkerError):
    """The Kafka cluster did not answer in time."""


class KafkaRefusedError(WorkerError):
    """Kafka refused a call for a reason that waiting does not change (a record too large,
    an invalid topic, no authorization); ``call`` names the call (see
    :class:`worker.ingest.kafka_calls.KafkaCall`)."""

    def __init__(self, call: str, message: str) -> None:
        super().__init__(message)
        self.call = call


class EncoderError(WorkerError):
    """The text encoder could not be loaded or failed on a batch."""


class BatchAbandoned(WorkerError):
    """The loop stopped while a batch waited for Kafka; nothing of it was committed."""


class NotOwnedError(WorkerError):
    """A write to a domain whose partition this worker does not own (it moved away)."""


class CodebookConflictError(WorkerError):
    """This state was coded with another codebook than the group's."""


class BootstrapError(WorkerError):
    """The background codebook bootstrap (:mod:`worker.ingest.bootstrap`) failed; the cause
    is chained (``__cause__``)."""


class BootstrapStopped(WorkerError):
    """The stop event was set while a bootstrap chose or read its sample or trained; nothing
    was trained and nothing was written."""
