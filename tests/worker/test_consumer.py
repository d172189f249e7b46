"""The consumer loop's wait for Kafka inside a batch (``ConsumerLoop._until_delivered``).

A batch whose dead letters or table versions Kafka does not take must wait (nothing of it
is committed before), report unhealthy, back off, and either go on once Kafka takes them
or, on a stop, be abandoned uncommitted. The broker-level behaviour is covered by
tests/integration/test_outage.py; here the retry logic runs on its own, with an action that
fails as kafka-python fails (its exception types), so every path is taken deterministically.
"""

from __future__ import annotations

import itertools
import threading
import time
from types import SimpleNamespace

import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError

import worker.ingest.consumer as consumer_module
from worker.core.settings import Settings
from worker.ingest.consumer import ConsumerLoop
from worker.ingest.exceptions import BatchAbandoned, KafkaUnavailableError


def _loop() -> SimpleNamespace:
    """The attributes ``_until_delivered`` uses, without a consumer or producer."""
    return SimpleNamespace(
        stop_event=threading.Event(), healthy=True, settings=Settings(kafka_bootstrap="h:1")
    )


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "BACKOFF_MIN_S", 0.01)
    monkeypatch.setattr(consumer_module, "BACKOFF_MAX_S", 0.04)


def test_a_refused_send_is_retried_with_backoff_until_kafka_takes_it() -> None:
    loop = _loop()
    calls: list[float] = []
    failures = [
        KafkaTimeoutError("no ack"),
        KafkaConnectionError("refused"),
        KafkaUnavailableError("x"),
    ]

    def send() -> None:
        calls.append(time.monotonic())
        if failures:
            raise failures.pop(0)

    ConsumerLoop._until_delivered(loop, send, "dead letters")  # type: ignore[arg-type]
    assert len(calls) == 4 and not failures
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02 and gaps[2] >= 0.04  # doubling, capped
    assert loop.healthy is False  # reported while it waited; the loop's watch restores it


def test_a_stop_while_waiting_abandons_the_batch_uncommitted() -> None:
    loop = _loop()
    attempts = 0

    def send() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            loop.stop_event.set()  # SIGTERM arrives while Kafka is away
        raise KafkaTimeoutError("no ack")

    with pytest.raises(BatchAbandoned, match="table versions") as info:
        ConsumerLoop._until_delivered(loop, send, "table versions")  # type: ignore[arg-type]
    assert attempts == 2
    assert "replayed on the next start" in str(info.value)
    assert isinstance(info.value.__cause__, KafkaTimeoutError)


def test_other_errors_are_not_swallowed() -> None:
    loop = _loop()

    def send() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        ConsumerLoop._until_delivered(loop, send, "dead letters")  # type: ignore[arg-type]
    assert loop.healthy is True
