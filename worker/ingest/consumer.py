"""The consumer loop: poll, process, dead-letter, commit; exactly-once effect on state.

Offsets live in the state store, written in the same RocksDB batch as the state
they produced. On every assignment the consumer seeks to the stored offsets, so a
crash at any instant replays exactly the records whose effect was not committed.
Offsets are also committed to Kafka afterwards, for monitoring tools only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.future import Future

from store.exceptions import StoreError
from store.partition import StorePartition
from worker.core.memory import collect_young_garbage, release_if_grown
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.ingest.exceptions import BatchAbandoned, KafkaRefusedError, KafkaUnavailableError
from worker.ingest.group import domain_partition
from worker.ingest.health import BACKOFF_MAX_S, BACKOFF_MIN_S, BrokerWatch
from worker.ingest.kafka_calls import (
    KafkaCall,
    KafkaCalls,
    KafkaFault,
    classify,
    close_producer,
    poll_records,
)
from worker.ingest.processor import BatchResult, DeadLetter, Processor

log = logging.getLogger(__name__)

#: seconds between two looks, from the consuming thread, at whether free heap pages are
#: worth returning to the OS
TRIM_EVERY_S = 30.0
#: the growth of the resident size since the last trim that makes the consuming thread trim
#: (:func:`worker.core.memory.release_if_grown`): below it a trim would walk the heap, a
#: stall for the threads that share the arena it walks, to return next to nothing
TRIM_GROWTH_BYTES = 64 << 20
#: how long a send waits for metadata, and a flush for acknowledgements, before the Kafka
#: policy (worker.ingest.kafka_calls) takes over: short, so a stop request is honoured
MAX_BLOCK_MS = 5_000
FLUSH_TIMEOUT_S = 10.0


#: the most bytes of a record's value a dead letter copies; a larger value is cut to its
#: first DEAD_LETTER_VALUE_BYTES, and the letter says so (``"truncated": true``) with the
#: value's size and SHA-256, so the original can still be found on its source topic
DEAD_LETTER_VALUE_BYTES = 64 * 1024
#: the same for the record's key (keys are domains: short), in the letter and as its key
DEAD_LETTER_KEY_BYTES = 1024
#: the most characters of a reason a dead letter copies (a reason may quote the value)
DEAD_LETTER_REASON_CHARS = 4096
#: an upper bound of a dead letter's size: each copied byte or character takes at most six
#: bytes of JSON (a control character escaped as \u00XX); the rest (topic name of at most
#: 249 characters, numbers, field names) well under 2 KiB
DEAD_LETTER_MAX_BYTES = (
    6 * (DEAD_LETTER_VALUE_BYTES + DEAD_LETTER_KEY_BYTES + DEAD_LETTER_REASON_CHARS) + 2 * 1024
)
#: the most bytes one fetch response holds, and per partition. kafka-python decodes a
#: response on its I/O thread in calls that hold the interpreter for the whole response
#: (its frame is zero-filled, copied and sliced in one piece each): 64 MiB responses of
#: item events held it 40-110 ms at a time, stalling the API's threads; 8 MiB / 2 MiB
#: removed those holds (Kafka still returns a larger record batch whole, so no event is
#: too large for them). Batch cuts follow from these limits, and no state depends on them
#: (the bootstrap's sample included: it ends at the event that fills it).
FETCH_MAX_BYTES = 8 * 1024 * 1024
FETCH_MAX_PARTITION_BYTES = 2 * 1024 * 1024
#: the producer's largest request (kafka-python's default, stated): every dead letter fits,
#: with its key and the record's overhead, so Kafka never refuses one for its size
PRODUCER_MAX_REQUEST_BYTES = 1024 * 1024


def dead_letter_key(dead: DeadLetter) -> bytes | None:
    """The dead letter's Kafka key: the record's key, cut to DEAD_LETTER_KEY_BYTES."""
    key = dead.record.key
    return key if key is None else key[:DEAD_LETTER_KEY_BYTES]


def _as_text(raw: bytes, limit: int) -> tuple[str, str]:
    """The first ``limit`` bytes of ``raw`` as text, and the encoding: UTF-8 when the whole
    of ``raw`` is (a character split by the cut is dropped), else hex."""
    try:
        raw.decode()
    except UnicodeDecodeError:
        return raw[:limit].hex(), "hex"
    return raw[:limit].decode(errors="ignore"), "utf-8"


def _cut_reason(reason: str) -> str:
    if len(reason) <= DEAD_LETTER_REASON_CHARS:
        return reason
    return f"{reason[:DEAD_LETTER_REASON_CHARS]}... (cut at {DEAD_LETTER_REASON_CHARS} characters)"


def dead_letter_payload(dead: DeadLetter) -> bytes:
    """The dead-letter message: the reason, where the record came from, and the record.

    ``{"reason", "topic", "partition", "offset", "key", "value", "value_encoding", "ts",
    "truncated"}``; a value longer than DEAD_LETTER_VALUE_BYTES is cut to its first bytes
    (``"truncated": true``) and the letter adds ``"value_bytes"`` (the original size) and
    ``"value_sha256"`` (hex digest of the whole value); a key longer than
    DEAD_LETTER_KEY_BYTES likewise (``"key_truncated": true``, ``"key_bytes"``,
    ``"key_sha256"``). So a letter is at most DEAD_LETTER_MAX_BYTES, whatever the record.
    """
    rec = dead.record
    key, value = rec.key, rec.value
    doc: dict[str, Any] = {
        "reason": _cut_reason(dead.reason),
        "topic": rec.topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "key": key[:DEAD_LETTER_KEY_BYTES].decode(errors="replace") if key else None,
        "value": None,
        "value_encoding": "utf-8",
        "ts": int(time.time() * 1000),
        "truncated": False,
    }
    if value is not None:
        doc["value"], doc["value_encoding"] = _as_text(value, DEAD_LETTER_VALUE_BYTES)
        if len(value) > DEAD_LETTER_VALUE_BYTES:
            doc["truncated"] = True
            doc["value_bytes"] = len(value)
            doc["value_sha256"] = hashlib.sha256(value).hexdigest()
    if key and len(key) > DEAD_LETTER_KEY_BYTES:
        doc["key_truncated"] = True
        doc["key_bytes"] = len(key)
        doc["key_sha256"] = hashlib.sha256(key).hexdigest()
    return orjson.dumps(doc)


async def _off_the_io_thread(consumer: Any, work: Callable[[], None], name: str) -> None:
    """Run ``work`` on a thread of its own and await it from kafka-python's I/O loop.

    kafka-python 3 calls a rebalance listener on its I/O thread, whose loop also sends the
    group's heartbeats. A callback that waits there (for a publish in progress, for a
    restore from the versions topic, for a broker through an outage) stops the heartbeats:
    past the session timeout the coordinator expels the worker, and the rejoin that follows
    calls the listener again (a rebalance storm). Awaiting a :class:`kafka.future.Future`
    instead suspends only the rebalance: the loop goes on heartbeating meanwhile. The
    future is resolved on the loop itself (``call_soon_threadsafe``, which wakes it up);
    an error of ``work`` is raised here, where kafka-python logs a listener's errors.
    """
    done: Future = Future()
    net = getattr(consumer, "_net", None)  # kafka-python 3's NetworkSelector (no public name)

    def resolve(error: BaseException | None) -> None:
        def settle() -> None:
            if error is None:
                done.success(None)
            else:
                done.failure(error)

        if net is not None and hasattr(net, "call_soon_threadsafe"):
            try:
                net.call_soon_threadsafe(settle)
                return
            except RuntimeError:  # the selector closed meanwhile: nobody awaits any more
                pass
        settle()

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the awaiting listener, which raises it
            resolve(exc)
        else:
            resolve(None)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done


class _SeekToStoredOffsets(AsyncConsumerRebalanceListener):
    """On assignment, restore what moves between owners, then seek to the stored offsets.

    Called by kafka-python inside a ``poll`` of the loop's thread, between batches (every
    applied batch is already committed with its offsets, so a revocation has nothing
    pending), on kafka-python's I/O thread: each callback's work runs on a thread of its own
    that the callback awaits (:func:`_off_the_io_thread`), so that waiting for a publish or
    a restore never stops the heartbeats.
    """

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await _off_the_io_thread(
            self.loop.consumer, lambda: self.revoke(revoked), "adacode-rebalance-revoke"
        )

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await _off_the_io_thread(
            self.loop.consumer, lambda: self.assign(assigned), "adacode-rebalance-assign"
        )

    def revoke(self, revoked: Any) -> None:
        # waits for a publish in progress: it either lands before the move or not at all
        with self.loop.versions_lock:
            self.loop.assigned = set()
        log.info("partitions revoked: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in revoked))

    def assign(self, assigned: Any) -> None:
        """1. Restore what other owners of the assigned partitions committed (the store's
           :meth:`~store.partition.StorePartition.restore_owned`: the table versions of a
           group's store, see worker.ingest.group; nothing for a plain store).
        2. Seek each partition to the offset stored with the state; a partition this
           store never processed starts from the beginning, whatever Kafka committed.
        3. Publish the new assignment (ownership of domains follows it).
        """
        loop = self.loop
        # -- 1. restore --------------------------------------------------------------------
        try:  # a group's store waits out an outage here, under the Kafka policy
            changed = loop.store.restore_owned({tp.partition for tp in assigned})
        except BatchAbandoned as exc:
            # kafka-python logs a listener's errors and would fetch from Kafka's own
            # offsets: fetch nothing instead; the loop sees the stop and closes
            loop.consumer.pause(*assigned)
            log.warning("%s (partitions %s paused)", exc, sorted(map(str, assigned)))
            return
        if loop.on_restored is not None and changed:
            loop.on_restored(changed)
        # -- 2. seek -----------------------------------------------------------------------
        for tp in assigned:
            stored = loop.store.get_offset(tp.topic, tp.partition)
            if stored is not None:
                loop.consumer.seek(tp, stored)
            else:
                loop.consumer.seek_to_beginning(tp)
        # -- 3. ownership ------------------------------------------------------------------
        with loop.versions_lock:
            loop.assigned = set(assigned)
        log.info("partitions assigned: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))


@dataclass
class LoopStats:
    batches: int = 0
    records: int = 0
    dead: int = 0
    last_batch_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


class ConsumerLoop:
    """Polls the event topics and applies each batch atomically to the store.

    Its collaborators are handed to the constructor (quix-streams hands its consumer the
    ``on_assign``/``on_revoke`` callbacks the same way); the callbacks run on the loop's
    thread, inside :meth:`run`, so they may refer to objects built after the loop.
    """

    def __init__(
        self,
        settings: Settings,
        store: StorePartition,
        processor: Processor,
        metrics: Metrics,
        *,
        stop_event: threading.Event | None = None,
        on_applied: Callable[[BatchResult], None] | None = None,
        on_restored: Callable[[list[str]], None] | None = None,
        before_subscribe: Callable[[], None] | None = None,
        shared_topics: Sequence[str] = (),
        kafka_calls: KafkaCalls | None = None,
        producer: Any = None,
    ) -> None:
        """``store`` restores what other owners committed on each assignment
        (:meth:`~store.partition.StorePartition.restore_owned`: a group's ``MirroredStore``
        restores table versions; a plain store, a lone worker's, nothing).

        ``stop_event``: set to stop the loop after the batch in progress (by default its
        own, set by :meth:`stop`); ``on_applied``: called after each committed batch with
        its result (the daemon feeds serving and the fine-tune scheduler); ``on_restored``:
        called with the domains whose state a restore changed; ``before_subscribe``:
        called once every required topic exists, before the group is joined (the daemon
        agrees on the group's codebook); ``shared_topics``: the topics of the group's
        shared state (versions, codebook), which must exist before the worker subscribes;
        ``kafka_calls``: the policy of every Kafka call outside the poll (see
        :mod:`worker.ingest.kafka_calls`; by default its own, on ``stop_event``);
        ``producer``: the producer of dead letters and notices (by default a KafkaProducer
        made when the loop connects).

        The Kafka clients are made when :meth:`run` starts, under that policy, so a worker
        started while the broker is away waits for it (unhealthy) instead of failing.
        """
        self.settings = settings
        self.store = store
        self.processor = processor
        self.metrics = metrics
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.kafka_calls = kafka_calls or KafkaCalls(self.stop_event, settings.kafka_bootstrap)
        self.on_applied = on_applied
        self.on_restored = on_restored
        self.before_subscribe = before_subscribe
        self.assigned: set[TopicPartition] = set()
        self.stats = LoopStats()
        self._healthy = False
        self.topics = [
            settings.topic("items"),
            settings.topic("interactions"),
            settings.topic("control"),
        ]
        #: topics that must exist before the worker subscribes (the shared-state topics too)
        self.required_topics = self.topics + list(shared_topics)
        self.control_topic = settings.topic("control")
        self.snapshots_topic = settings.topic("snapshots")
        #: held while a batch with control commands is processed and written, and by the
        #: publisher, so version pointers are changed by one writer at a time
        self.versions_lock = threading.RLock()
        self.deadletter_topic = settings.topic("deadletter")
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = producer

    @property
    def healthy(self) -> bool:
        """The loop polls, a broker is connected, store writes succeed, and no Kafka call of
        this worker is waiting out a fault."""
        return self._healthy and not self.kafka_calls.waiting

    @property
    def consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            raise KafkaUnavailableError("the consumer loop has not connected to Kafka yet")
        return self._consumer

    @property
    def producer(self) -> KafkaProducer:
        """The loop's producer (dead letters, snapshot notices, the API's control commands)."""
        if self._producer is None:
            raise KafkaUnavailableError("the consumer loop has not connected to Kafka yet")
        return self._producer

    def _connect(self) -> None:
        """Make the consumer and the producer (each waits for a broker under the policy)."""
        settings = self.settings
        common = settings.kafka_common()
        self._consumer = self.kafka_calls.call(
            KafkaCall.CONNECT,
            lambda: KafkaConsumer(
                **common,
                group_id=settings.kafka_group_id,
                group_instance_id=settings.kafka_group_instance_id or None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=settings.poll_max_records,
                fetch_max_bytes=FETCH_MAX_BYTES,
                max_partition_fetch_bytes=FETCH_MAX_PARTITION_BYTES,
                max_poll_interval_ms=600_000,
                # co-partitioned topics: partition p of items, interactions and control go to
                # the same worker, so a domain's events and commands have one owner
                partition_assignment_strategy=(RangePartitionAssignor,),
                metadata_max_age_ms=10_000,  # notice new partitions and topics within seconds
                session_timeout_ms=settings.kafka_session_timeout_ms,
                heartbeat_interval_ms=max(1000, settings.kafka_session_timeout_ms // 5),
            ),
        )
        # a send waits for metadata at most MAX_BLOCK_MS: the policy, not kafka-python, waits
        # out an outage, so a stop request is honoured within seconds. Its largest request is
        # kafka-python's default 1 MiB, stated: a dead letter is at most DEAD_LETTER_MAX_BYTES
        # (about 416 KiB: the value cut to 64 KiB, see dead_letter_payload), far below it and
        # below the broker's default message.max.bytes, so none is refused for its size
        if self._producer is None:
            self._producer = self.kafka_calls.call(
                KafkaCall.CONNECT,
                lambda: KafkaProducer(
                    **common,
                    acks="all",
                    linger_ms=5,
                    retries=5,
                    max_block_ms=MAX_BLOCK_MS,
                    max_request_size=PRODUCER_MAX_REQUEST_BYTES,
                ),
            )

    # ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until :meth:`stop` is called; then finish the batch and close.

        A broker outage does not stop it: see :mod:`worker.ingest.health` for how it is detected.
        """
        try:
            self._connect()
            self._wait_for_topics()
            if self.before_subscribe is not None and not self.stop_event.is_set():
                self.before_subscribe()
        except BatchAbandoned as exc:
            log.warning("%s", exc)
            self.close()
            return
        if self.stop_event.is_set():
            self.close()
            return
        self.consumer.subscribe(self.topics, listener=_SeekToStoredOffsets(self))
        log.info("consuming %s as group %s", self.topics, self.settings.kafka_group_id)
        # While no broker is connected, kafka-python's polls return nothing and it reconnects
        # by itself: the loop keeps polling, waits longer between empty polls, logs now and
        # then, and reports unhealthy once the outage outlasts the watch's grace period.
        watch = BrokerWatch(self.consumer)
        poll_failures = 0
        trimmed_at = time.monotonic()
        try:
            while not self.stop_event.is_set():
                try:
                    polled = poll_records(
                        self.consumer,
                        timeout_ms=self.settings.poll_timeout_ms,
                        max_records=self.settings.poll_max_records,
                    )
                    poll_failures = 0
                except KafkaError as exc:  # retriable or not, the next poll tries again
                    polled = {}
                    poll_failures += 1
                    log.warning(
                        "polling Kafka at %s failed: %r", self.settings.kafka_bootstrap, exc
                    )
                if polled or self.processor.background_work():
                    # an empty batch too while background work waits to be written (a
                    # codebook trained meanwhile, items held from before it to code)
                    try:
                        self.apply(polled)
                    except BatchAbandoned as exc:
                        log.warning("%s", exc)
                        break
                else:  # idle: the Kafka client's cyclic garbage, a little at a time
                    collect_young_garbage()
                if time.monotonic() - trimmed_at >= TRIM_EVERY_S:
                    # each batch's parsed events, freed, leave holes in the heap that glibc
                    # keeps; without this the resident size climbs between fine-tunes
                    release_if_grown(TRIM_GROWTH_BYTES, "consumer")
                    trimmed_at = time.monotonic()
                state = watch.check()
                self._healthy = state.healthy and poll_failures < 3
                if polled or (state.healthy and not poll_failures):
                    if state.connected:
                        self._report_lag()
                    continue
                if not state.connected and watch.should_log():
                    log.warning(
                        "no Kafka broker connected at %s for %.0f s; waiting for it (state up to "
                        "the last applied batch is committed; /healthz answers 503 meanwhile)",
                        self.settings.kafka_bootstrap,
                        state.down_for,
                    )
                failure_wait = BACKOFF_MIN_S * 2 ** min(poll_failures, 8) if poll_failures else 0
                self.stop_event.wait(min(BACKOFF_MAX_S, max(state.wait_s, failure_wait)))
        finally:
            self.close()

    def _wait_for_topics(self) -> None:
        """Subscribe only once every topic exists, so the first assignment covers them all
        (a group joined before a topic's metadata arrived would leave it unassigned until
        the next metadata refresh)."""
        last_warning = 0.0
        while not self.stop_event.is_set():
            try:
                missing = sorted(set(self.required_topics) - set(self.consumer.topics()))
            except KafkaError as exc:
                missing = [f"(broker unreachable: {exc})"]
            if not missing:
                return
            if time.monotonic() - last_warning > 10:
                log.warning(
                    "waiting for topics %s on %s; create them with: adacode topics create",
                    ", ".join(missing),
                    self.settings.kafka_bootstrap,
                )
                last_warning = time.monotonic()
            self.stop_event.wait(0.5)

    def owned_partitions(self) -> set[int]:
        """Partition numbers this worker owns now (the same for every event topic)."""
        return {tp.partition for tp in self.assigned}

    def owns(self, domain: str) -> bool:
        """Whether ``domain``'s events (key = domain) are on a partition assigned here."""
        if not self.assigned:
            return False
        parts = self.consumer.partitions_for_topic(self.topics[0])
        if not parts:
            return False
        return domain_partition(domain, len(parts)) in self.owned_partitions()

    def stop(self) -> None:
        """Ask the loop to stop after the batch in progress (safe from any thread)."""
        self.stop_event.set()

    def apply(self, polled: dict[TopicPartition, list[Any]]) -> BatchResult:
        """Apply one polled batch.

        1. Flatten the records, in partition then offset order.
        2. Process them into one write batch (state + next offsets) and dead letters.
        3. Send the dead letters and wait until the broker has them.
        4. Write the batch to the store: state and offsets commit together (a group's store
           mirrors table versions to Kafka first, under the same policy).
        5. Announce the rollbacks it applied, commit the same offsets to Kafka (monitoring
           only), count it and hand the result on.

        Steps 2-4 run under the versions lock when the batch holds control commands. A
        Kafka call that waits out a fault holds the batch where it is, uncommitted; a stop
        request meanwhile abandons it (:class:`BatchAbandoned`) and a restart replays it.
        """
        started = time.perf_counter()
        records = self._flatten(polled)
        with self._versions_lock_if(self._has_control(polled)):
            result = self.processor.process(records)
            self._dead_letter(result.dead)
            self._write(result)
        self._after_commit(polled, records, result, time.perf_counter() - started)
        return result

    def _flatten(self, polled: dict[TopicPartition, list[Any]]) -> list[Any]:
        """The batch's records in partition then offset order (kafka-python's ConsumerRecord
        is a processor.Record: no per-record copies; TopicPartition sorts by topic, then
        partition)."""
        for tp, recs in polled.items():
            self.metrics.count_consumed(tp.topic, len(recs))
        return [r for tp in sorted(polled) for r in polled[tp]]

    def _has_control(self, polled: dict[TopicPartition, list[Any]]) -> bool:
        return any(tp.topic == self.control_topic and recs for tp, recs in polled.items())

    def _versions_lock_if(self, held: bool) -> contextlib.AbstractContextManager[Any]:
        return self.versions_lock if held else contextlib.nullcontext()

    def _dead_letter(self, dead: list[DeadLetter]) -> None:
        """Send the batch's dead letters; wait until Kafka has them (transient faults).

        A dead letter that Kafka refuses for good (see :class:`KafkaRefusedError`) is logged
        with its source coordinates and counted (``adacode_dead_letters_refused_total``); the
        batch goes on: its source record is not applied either way.
        """
        if not dead:
            return
        for d in dead:
            log.warning(
                "dead-lettered %s-%d@%d: %s",
                d.record.topic,
                d.record.partition,
                d.record.offset,
                d.reason,
            )
        refused = self.kafka_calls.call(
            KafkaCall.DEAD_LETTERS, lambda: self._send_dead_letters(dead)
        )
        for d, exc in refused:
            log.error(
                "Kafka refused the dead letter of %s-%d@%d for good (%s: %s); it is not on %s",
                d.record.topic,
                d.record.partition,
                d.record.offset,
                type(exc).__name__,
                exc,
                self.deadletter_topic,
            )
            self.metrics.dead_letters_refused.labels(d.record.topic).inc()

    def _send_dead_letters(self, dead: list[DeadLetter]) -> list[tuple[DeadLetter, KafkaError]]:
        """Send each dead letter and wait for its acknowledgement; returns those Kafka
        refused for good. A transient fault raises (the policy sends them all again)."""
        sent: list[tuple[DeadLetter, Any]] = []
        refused: list[tuple[DeadLetter, KafkaError]] = []
        for d in dead:
            try:
                future = self.producer.send(
                    self.deadletter_topic, key=dead_letter_key(d), value=dead_letter_payload(d)
                )
            except KafkaError as exc:
                if classify(exc) is KafkaFault.TRANSIENT:
                    raise
                refused.append((d, exc))
                continue
            sent.append((d, future))
        self.producer.flush(timeout=FLUSH_TIMEOUT_S)
        for d, future in sent:
            try:
                future.get(timeout=FLUSH_TIMEOUT_S)
            except KafkaError as exc:
                if classify(exc) is KafkaFault.TRANSIENT:
                    raise
                refused.append((d, exc))
        return refused

    def _write(self, result: BatchResult) -> None:
        """State and offsets in one atomic write (a failed store write stops the loop)."""
        try:
            self.store.write(result.batch)
        except StoreError:
            self._healthy = False
            raise

    def _after_commit(
        self,
        polled: dict[TopicPartition, list[Any]],
        records: list[Any],
        result: BatchResult,
        seconds: float,
    ) -> None:
        for switch in result.switches:
            self.announce({"event": "rollback", **switch, "at": time.time()})
        self._commit_to_kafka(polled)
        self._count(records, result, seconds)
        if self.on_applied is not None:
            self.on_applied(result)

    def _commit_to_kafka(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """The batch's offsets, committed to Kafka for lag monitors (the store holds the truth)."""
        offsets = {
            tp: OffsetAndMetadata(records_[-1].offset + 1, "", -1)
            for tp, records_ in polled.items()
            if records_
        }
        try:
            self.consumer.commit_async(offsets)
        except KafkaError as exc:
            log.debug("kafka offset commit failed: %s", exc)

    def _count(self, records: list[Any], result: BatchResult, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.records += len(records)
        self.stats.dead += len(result.dead)
        self.stats.last_batch_s = seconds
        self.metrics.observe_batch(
            applied=result.applied,
            dead_topics=[dead.record.topic for dead in result.dead],
            texts_encoded=result.texts_encoded,
            code_changes=[(domain, change.reason) for domain, change in result.coding.changes],
            seconds=seconds,
            key_mismatches=result.key_mismatches,
        )

    def announce(self, event: dict[str, Any]) -> None:
        """A small message on the snapshots topic (publish, rejection, rollback), sent under
        the Kafka policy: it waits out an outage (a stop abandons it; the switch it reports
        is committed already). A notice Kafka refuses for good is logged and dropped."""
        domain = str(event.get("domain", ""))

        def send() -> None:
            self.producer.send(
                self.snapshots_topic, key=domain.encode(), value=orjson.dumps(event)
            ).get(timeout=FLUSH_TIMEOUT_S)

        try:
            self.kafka_calls.call(KafkaCall.SNAPSHOT_ANNOUNCE, send)
        except KafkaRefusedError as exc:
            log.warning("could not announce %s on %s: %s", event, self.snapshots_topic, exc)

    def _report_lag(self) -> None:
        if not self.assigned:
            return
        try:
            for tp in self.assigned:
                highwater = self.consumer.highwater(tp)
                if highwater is None:
                    continue
                position = self.consumer.position(tp, timeout_ms=100)
                if position is not None:
                    self.metrics.set_lag(tp.topic, tp.partition, highwater - position)
        except KafkaError:
            pass  # lag is best-effort; the next poll reports connection trouble

    def close(self) -> None:
        if self._producer is not None:  # unsent letters belong to an uncommitted batch
            close_producer(self._producer, 10, "dead-letter")
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except KafkaError as exc:
                log.warning("closing the consumer: %s", exc)
        self._healthy = False
