"""The Kafka policy of every call outside the main poll (``worker.ingest.kafka_calls``).

A call that Kafka does not take must wait (nothing of the batch is committed before), report
unhealthy while it waits, back off, and either go on once Kafka takes it or, on a stop, be
abandoned uncommitted; an error that waiting does not change is named at once. The
broker-level behaviour is covered by tests/integration/test_outage.py and
test_kafka_outages.py; here the policy runs on its own, with actions that fail as
kafka-python fails (its exception types), so every path is taken deterministically.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest
from kafka.errors import (
    InvalidTopicError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)

import worker.ingest.group as group_module
from store.memory import MemoryPartition
from tests.conftest import _free_ports
from worker.commands.operations import send_control
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.ingest.consumer import ConsumerLoop
from worker.ingest.exceptions import BatchAbandoned, KafkaRefusedError, KafkaUnavailableError
from worker.ingest.kafka_calls import KafkaCall, KafkaCalls, KafkaFault, classify
from worker.ingest.processor import DeadLetter, Processor, SourceRecord


def _calls(**kw: float) -> KafkaCalls:
    return KafkaCalls(threading.Event(), "h:1", backoff_min_s=0.01, backoff_max_s=0.04, **kw)


@pytest.mark.parametrize(
    ("exc", "fault"),
    [
        (KafkaTimeoutError("no ack"), KafkaFault.TRANSIENT),
        (KafkaConnectionError("refused"), KafkaFault.TRANSIENT),
        (NotLeaderForPartitionError(), KafkaFault.TRANSIENT),
        (KafkaUnavailableError("x"), KafkaFault.TRANSIENT),
        (MessageSizeTooLargeError(), KafkaFault.PERMANENT),
        (RecordListTooLargeError(), KafkaFault.PERMANENT),
        (InvalidTopicError(), KafkaFault.PERMANENT),
        (TopicAuthorizationFailedError(), KafkaFault.PERMANENT),
    ],
)
def test_faults_are_classified_by_kafkas_own_retriable_flag(
    exc: BaseException, fault: KafkaFault
) -> None:
    assert classify(exc) is fault


def test_a_refused_call_is_retried_with_backoff_until_kafka_takes_it() -> None:
    calls = _calls()
    attempts: list[float] = []
    waiting_seen: list[bool] = []
    failures = [
        KafkaTimeoutError("no ack"),
        KafkaConnectionError("refused"),
        KafkaUnavailableError("x"),
    ]

    def send() -> str:
        attempts.append(time.monotonic())
        waiting_seen.append(calls.waiting)
        if failures:
            raise failures.pop(0)
        return "taken"

    assert not calls.waiting
    assert calls.call(KafkaCall.DEAD_LETTERS, send) == "taken"
    assert len(attempts) == 4 and not failures
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02 and gaps[2] >= 0.04  # doubling, capped
    assert waiting_seen == [False, True, True, True]  # unhealthy while it waited
    assert not calls.waiting  # and no longer once Kafka took it


def test_a_stop_while_waiting_abandons_the_batch_uncommitted() -> None:
    calls = _calls()
    attempts = 0

    def send() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            calls.stop.set()  # SIGTERM arrives while Kafka is away
        raise KafkaTimeoutError("no ack")

    with pytest.raises(BatchAbandoned, match="mirror of table versions") as info:
        calls.call(KafkaCall.VERSIONS_MIRROR, send)
    assert attempts == 2
    assert "replayed on the next start" in str(info.value)
    assert isinstance(info.value.__cause__, KafkaTimeoutError)
    assert not calls.waiting


def test_a_stop_ends_a_long_backoff_at_once() -> None:
    calls = KafkaCalls(threading.Event(), "h:1", backoff_min_s=30.0, backoff_max_s=30.0)
    threading.Timer(0.2, calls.stop.set).start()
    started = time.monotonic()
    with pytest.raises(BatchAbandoned):
        calls.call(KafkaCall.CODEBOOK_READ, lambda: (_ for _ in ()).throw(KafkaTimeoutError()))
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "exc",
    [
        MessageSizeTooLargeError("2 MB"),
        TopicAuthorizationFailedError(),
        KafkaUnavailableError("wrapped"),  # wrapping a permanent error: its cause decides
    ],
)
def test_a_permanent_refusal_is_named_at_once_not_retried(exc: BaseException) -> None:
    calls = _calls()
    attempts = 0

    def send() -> None:
        nonlocal attempts
        attempts += 1
        if isinstance(exc, KafkaUnavailableError):
            raise exc from InvalidTopicError("bad name")
        raise exc

    with pytest.raises(KafkaRefusedError, match="dead letters") as info:
        calls.call(KafkaCall.DEAD_LETTERS, send)
    assert attempts == 1
    assert info.value.call == KafkaCall.DEAD_LETTERS.value
    assert not calls.waiting


def test_a_bounded_call_gives_up_with_a_clear_error() -> None:
    calls = _calls(max_wait_s=0.1)
    with pytest.raises(KafkaUnavailableError, match=r"control command within 0 s|within"):
        calls.call(KafkaCall.CONTROL_SEND, lambda: (_ for _ in ()).throw(KafkaTimeoutError()))
    other = _calls()
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError):
        other.call(
            KafkaCall.CONTROL_SEND,
            lambda: (_ for _ in ()).throw(KafkaTimeoutError()),
            max_wait_s=0.1,
        )
    assert time.monotonic() - started < 2.0


def test_other_errors_are_not_swallowed() -> None:
    calls = _calls()

    def send() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        calls.call(KafkaCall.DEAD_LETTERS, send)
    assert not calls.waiting


# -- dead letters: a permanent refusal of one does not hold the batch ---------------------------


class _Future:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    def get(self, timeout: float) -> None:
        if self.exc is not None:
            raise self.exc


class _Producer:
    """Refuses values above ``limit`` bytes at send time (as kafka-python does above
    ``max_request_size``) and fails the acknowledgement of ``b"broker-refuses"`` for good."""

    def __init__(self, limit: int, transient_failures: int = 0) -> None:
        self.limit = limit
        self.transient_failures = transient_failures
        self.sent: list[bytes] = []

    def send(self, topic: str, key: bytes | None, value: bytes) -> _Future:
        if len(value) > self.limit:
            raise MessageSizeTooLargeError(f"{len(value)} bytes")
        if self.transient_failures:
            self.transient_failures -= 1
            return _Future(KafkaTimeoutError("no ack"))
        if b"broker-refuses" in value:
            return _Future(RecordListTooLargeError("refused"))
        self.sent.append(value)
        return _Future(None)

    def flush(self, timeout: float) -> None:
        pass


def _dead(offset: int, value: bytes) -> DeadLetter:
    return DeadLetter("bad", SourceRecord("t.interactions", 0, offset, b"shop", value))


def test_dead_letters_kafka_refuses_for_good_are_counted_and_the_batch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(kafka_bootstrap="h:1")
    metrics = Metrics()
    loop = ConsumerLoop(
        settings,
        MemoryPartition(),
        Processor(MemoryPartition(), settings, None),
        metrics,
        kafka_calls=_calls(),
        producer=_Producer(limit=2_000, transient_failures=1),
    )
    dead = [_dead(1, b"ok"), _dead(2, b"x" * 5_000), _dead(3, b"broker-refuses"), _dead(4, b"ok2")]
    loop._dead_letter(dead)
    producer = loop.producer
    assert isinstance(producer, _Producer)
    # the transient failure resent the batch's dead letters; the refused ones never block it
    assert sum(b'"offset":4' in v for v in producer.sent) >= 1
    assert not any(b'"offset":2' in v or b'"offset":3' in v for v in producer.sent)
    refused = metrics.dead_letters_refused.labels("t.interactions")._value.get()
    assert refused == 2
    assert "t.interactions-0@2" in caplog.text and "t.interactions-0@3" in caplog.text


def test_a_command_sending_control_without_a_broker_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(group_module, "COMMAND_WAIT_S", 1.0)
    (port,) = _free_ports(1)  # nothing listens there
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{port}", state_dir=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError, match="start the broker or stop the worker"):
        send_control(settings, "rollback", "shop", version=1, previous=False)
    assert time.monotonic() - started < 30.0
