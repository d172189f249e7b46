"""Errors raised by the worker: configuration, events, Kafka and the daemon."""

from __future__ import annotations

from adacode.errors import AdacodeError


class WorkerError(AdacodeError):
    """Base class of worker errors."""


class ConfigError(WorkerError):
    """A setting is missing, unknown or out of range.

    The message names the key, where it came from (file, environment, flag), what
    was wrong and what is allowed.
    """


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


class EncoderError(WorkerError):
    """The text encoder could not be loaded or failed on a batch."""


class DatasetError(WorkerError):
    """A dataset directory is missing a file or has a malformed line."""
