"""One policy for every Kafka call outside the main poll.

The consumer's poll survives a broker outage by itself (see :mod:`worker.ingest.health`).
Every other call the worker makes to Kafka goes through :meth:`KafkaCalls.call`: reading or
offering the group's codebook, mirroring table versions, restoring them on assignment,
sending dead letters, control commands and snapshot notices. The policy:

1. **Transient** faults (no broker, connection lost, coordinator or leader unknown, time-outs:
   kafka-python's *retriable* errors, and :class:`~worker.ingest.exceptions.KafkaUnavailableError`)
   wait with doubling back-off (:data:`~worker.ingest.health.BACKOFF_MIN_S` up to
   :data:`~worker.ingest.health.BACKOFF_MAX_S`) and try again. Meanwhile :attr:`KafkaCalls.waiting`
   is true, so ``/healthz`` and ``/readyz`` answer 503.
2. A **stop request** (the stop event given to the constructor) abandons the wait at once with
   :class:`~worker.ingest.exceptions.BatchAbandoned`: nothing of the batch in progress was
   committed, so a restart replays it, as after a crash.
3. **Permanent** faults (a record too large, an invalid topic, no authorization: errors Kafka
   will give again whatever the wait) raise :class:`~worker.ingest.exceptions.KafkaRefusedError`
   at once, naming the call and the cause; the caller decides what the batch does (a dead
   letter that Kafka refuses is logged and counted, and the batch goes on).

A call that waits blocks its own thread only: the consumer loop for codebooks, mirrors,
restores and dead letters (the batch is held whole, uncommitted, and resumes where it
waited), the fine-tune thread for a publish, an HTTP thread (bounded by ``max_wait_s``) for a
control command.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka.errors import KafkaError

from worker.ingest.exceptions import BatchAbandoned, KafkaRefusedError, KafkaUnavailableError
from worker.ingest.health import BACKOFF_MAX_S, BACKOFF_MIN_S

log = logging.getLogger(__name__)

T = TypeVar("T")
#: one poll's records by partition (kafka-python's ``TopicPartition`` -> ``ConsumerRecord`` list)
Polled = dict[Any, list[Any]]


class KafkaCall(enum.Enum):
    """The Kafka calls made outside the main poll (the phases a broker outage can hit)."""

    CONNECT = "connection of a client to the cluster"
    CODEBOOK_READ = "read of the group's codebook"
    CODEBOOK_OFFER = "offer of a codebook to the group"
    VERSIONS_MIRROR = "mirror of table versions"
    VERSIONS_RESTORE = "restore of table versions"
    DEAD_LETTERS = "dead letters"
    CONTROL_SEND = "control command"
    SNAPSHOT_ANNOUNCE = "snapshot notice"


class KafkaFault(enum.Enum):
    """How a Kafka error is handled: waited out, or named and handed to the caller."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"


def classify(exc: BaseException) -> KafkaFault:
    """Transient for kafka-python's retriable errors (and the worker's own
    :class:`KafkaUnavailableError`, raised when a call found no broker); permanent otherwise."""
    if isinstance(exc, KafkaUnavailableError):
        return KafkaFault.TRANSIENT
    if isinstance(exc, KafkaError) and exc.retriable:
        return KafkaFault.TRANSIENT
    return KafkaFault.PERMANENT


def _cause(exc: BaseException) -> BaseException:
    """The Kafka error behind a :class:`KafkaUnavailableError` wrapper, for classification."""
    inner = exc.__cause__
    if isinstance(exc, KafkaUnavailableError) and isinstance(inner, KafkaError):
        return inner
    return exc


class KafkaCalls:
    """The policy above, shared by every part of one worker (one instance per daemon).

    ``stop``: the worker's stop event; a wait ends as soon as it is set. ``bootstrap``: for
    messages. ``max_wait_s``: how long one call may wait out transient faults before
    :class:`KafkaUnavailableError` is raised (``None``: until Kafka answers or a stop).
    """

    def __init__(
        self,
        stop: threading.Event,
        bootstrap: str,
        *,
        max_wait_s: float | None = None,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.stop = stop
        self.bootstrap = bootstrap
        self.max_wait_s = max_wait_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> bool:
        """Whether some call is waiting for Kafka now (the worker reports unhealthy)."""
        return self._waiting > 0

    def call(
        self, kind: KafkaCall, action: Callable[[], T], *, max_wait_s: float | None = None
    ) -> T:
        """Run ``action`` (one Kafka call of ``kind``) under the policy; returns its result.

        ``max_wait_s`` bounds this call's wait (default: the policy's ``max_wait_s``).
        """
        limit = self.max_wait_s if max_wait_s is None else max_wait_s
        started = time.monotonic()
        wait = self.backoff_min_s
        counted = False
        try:
            while True:
                try:
                    return action()
                except (KafkaError, KafkaUnavailableError) as exc:
                    self._refuse_if_permanent(kind, exc)
                    if not counted:
                        self._count(+1)
                        counted = True
                    self._abandon_if_stopping(kind, exc)
                    self._give_up_if_too_long(kind, exc, started, limit)
                    log.warning(
                        "Kafka at %s did not take the %s (%s); retrying in %.1f s",
                        self.bootstrap,
                        kind.value,
                        exc,
                        wait,
                    )
                    self.stop.wait(wait)
                    self._abandon_if_stopping(kind, exc)
                    wait = min(self.backoff_max_s, wait * 2)
        finally:
            if counted:
                self._count(-1)

    def _count(self, delta: int) -> None:
        with self._lock:
            self._waiting += delta

    def _refuse_if_permanent(self, kind: KafkaCall, exc: BaseException) -> None:
        cause = _cause(exc)
        if classify(cause) is KafkaFault.PERMANENT:
            raise KafkaRefusedError(
                kind.value,
                f"Kafka at {self.bootstrap} refused the {kind.value} for good "
                f"({type(cause).__name__}: {cause}); waiting would not change the answer",
            ) from exc

    def _abandon_if_stopping(self, kind: KafkaCall, exc: BaseException) -> None:
        if self.stop.is_set():
            raise BatchAbandoned(
                f"stopping while Kafka at {self.bootstrap} does not take the {kind.value}: "
                "abandoned; a batch in progress is not committed and is replayed on the next start"
            ) from exc

    def _give_up_if_too_long(
        self, kind: KafkaCall, exc: BaseException, started: float, limit: float | None
    ) -> None:
        if limit is not None and time.monotonic() - started >= limit:
            raise KafkaUnavailableError(
                f"Kafka at {self.bootstrap} did not take the {kind.value} within "
                f"{limit:.0f} s ({exc}); start the broker and try again"
            ) from exc


def poll_records(consumer: Any, *, timeout_ms: int, max_records: int | None = None) -> Polled:
    """``consumer.poll(...)``'s records, in a dict of their own: the one ``poll`` returned is
    emptied before it is handed back.

    kafka-python 3.0 (up to 3.0.12 at least) ends a poll's wait for a fetch by raising and
    catching a ``KafkaTimeoutError``, and keeps the exception in a dict that the frame which
    raised it holds: a reference cycle through the traceback, which also holds the frames of
    the poll itself (the fetcher's, ``_poll_once``'s, ``poll``'s) and of every caller that
    returns meanwhile, each with the locals it ended with: the dict of records it returned.
    Those records then lived until the cyclic collector found the cycle. Measured in the
    daemon (``bench/scale.py`` at 1M items / 10M interactions, a collector probe): 15-20k
    records of 3-4 batches per young-generation pass, in passes of 47-166 ms with the
    interpreter held. Emptied, the records are freed as soon as the batch lets them go, and
    what the cycles keep is a few dozen small objects. For the same reason this function
    keeps no local of its own: its frame is one of those caught in the cycle.
    """
    return _detached(consumer.poll(timeout_ms=timeout_ms, max_records=max_records))


def _detached(polled: Polled) -> Polled:
    records = dict(polled)
    polled.clear()
    return records


def close_producer(producer: Any, timeout_s: float, what: str) -> None:
    """Close a kafka-python producer, waiting at most ``timeout_s`` for its sends. When the
    broker does not take them, they are given up (what they carried belongs to a batch that
    is not committed, or is offered again) and the producer is marked closed, so neither its
    exit hook nor its finalizer tries again and prints a traceback on stderr."""
    try:
        producer.close(timeout=timeout_s)
    except KafkaError as exc:
        log.warning("closing the %s producer: %s (unsent records given up)", what, exc)
        producer._closed = True  # kafka-python's close() and __del__ return at once after this
