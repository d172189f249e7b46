"""The consumer loop: poll, process, dead-letter, commit; exactly-once effect on state.

Offsets live in the state store, written in the same RocksDB batch as the state
they produced. On every assignment the consumer seeks to the stored offsets, so a
crash at any instant replays exactly the records whose effect was not committed.
Offsets are also committed to Kafka afterwards, for monitoring tools only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from store.exceptions import StoreError
from store.partition import StorePartition
from worker.metrics import Metrics
from worker.processor import BatchResult, DeadLetter, Processor, SourceRecord
from worker.settings import Settings

log = logging.getLogger(__name__)


def dead_letter_payload(dead: DeadLetter) -> bytes:
    """The dead-letter message: the reason, where the record came from, and the record."""
    rec = dead.record
    value: Any
    try:
        value = None if rec.value is None else rec.value.decode()
        encoding = "utf-8"
    except UnicodeDecodeError:
        value = rec.value.hex() if rec.value is not None else None
        encoding = "hex"
    return orjson.dumps(
        {
            "reason": dead.reason,
            "topic": rec.topic,
            "partition": rec.partition,
            "offset": rec.offset,
            "key": rec.key.decode(errors="replace") if rec.key else None,
            "value": value,
            "value_encoding": encoding,
            "ts": int(time.time() * 1000),
        }
    )


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    """On assignment, position each partition at the offset stored with the state.

    Runs on kafka-python's I/O thread, so it only reads a few keys and seeks.
    """

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: Any) -> None:
        # Every applied batch is already committed with its offsets: nothing pending.
        log.info("partitions revoked: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        for tp in assigned:
            stored = self.loop.store.get_offset(tp.topic, tp.partition)
            if stored is not None:
                self.loop.consumer.seek(tp, stored)
            else:  # no state for it yet: rebuild from the start, whatever Kafka committed
                self.loop.consumer.seek_to_beginning(tp)
        self.loop.assigned = set(assigned)
        log.info(
            "partitions assigned: %s",
            sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
        )


@dataclass
class LoopStats:
    batches: int = 0
    records: int = 0
    dead: int = 0
    last_batch_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


class ConsumerLoop:
    """Polls the event topics and applies each batch atomically to the store.

    ``on_applied`` is called after each committed batch (from the loop's thread)
    with the batch's result; the daemon uses it to wake the scheduler.
    """

    def __init__(
        self,
        settings: Settings,
        store: StorePartition,
        processor: Processor,
        metrics: Metrics,
        on_applied: Callable[[BatchResult], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.processor = processor
        self.metrics = metrics
        self.on_applied = on_applied
        self.stop_event = threading.Event()
        self.assigned: set[TopicPartition] = set()
        self.stats = LoopStats()
        self.healthy = False
        self.topics = [
            settings.topic("items"),
            settings.topic("interactions"),
            settings.topic("control"),
        ]
        self.control_topic = settings.topic("control")
        self.snapshots_topic = settings.topic("snapshots")
        #: held while a batch with control commands is processed and written, and by the
        #: publisher, so version pointers are changed by one writer at a time
        self.versions_lock = threading.RLock()
        self.deadletter_topic = settings.topic("deadletter")
        common = settings.kafka_common()
        self.consumer = KafkaConsumer(
            **common,
            group_id=settings.kafka_group_id,
            group_instance_id=settings.kafka_group_instance_id or None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.poll_max_records,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            max_poll_interval_ms=600_000,
            metadata_max_age_ms=10_000,  # notice new partitions and topics within seconds
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(1000, settings.kafka_session_timeout_ms // 5),
        )
        self.producer = KafkaProducer(**common, acks="all", linger_ms=5, retries=5)

    # ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until :meth:`stop` is called; then finish the batch and close."""
        self._wait_for_topics()
        self.consumer.subscribe(self.topics, listener=_SeekToStoredOffsets(self))
        log.info("consuming %s as group %s", self.topics, self.settings.kafka_group_id)
        try:
            while not self.stop_event.is_set():
                polled = self.consumer.poll(
                    timeout_ms=self.settings.poll_timeout_ms,
                    max_records=self.settings.poll_max_records,
                )
                self.healthy = True
                if polled:
                    self.apply(polled)
                self._report_lag()
        finally:
            self.close()

    def _wait_for_topics(self) -> None:
        """Subscribe only once every topic exists, so the first assignment covers them all
        (a group joined before a topic's metadata arrived would leave it unassigned until
        the next metadata refresh)."""
        last_warning = 0.0
        while not self.stop_event.is_set():
            try:
                missing = sorted(set(self.topics) - set(self.consumer.topics()))
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

    def stop(self) -> None:
        """Ask the loop to stop after the batch in progress (safe from any thread)."""
        self.stop_event.set()

    def apply(self, polled: dict[TopicPartition, list[Any]]) -> BatchResult:
        """Apply one polled batch.

        1. Flatten the records, in partition then offset order.
        2. Process them into one write batch (state + next offsets) and dead letters.
        3. Send the dead letters and wait until the broker has them.
        4. Write the batch to the store: state and offsets commit together.
        5. Commit the same offsets to Kafka (monitoring only; failures are logged).
        """
        started = time.perf_counter()
        for tp, recs in polled.items():
            self.metrics.count_consumed(tp.topic, len(recs))
        # -- 1. flatten --------------------------------------------------------------------
        records = [
            SourceRecord(r.topic, r.partition, r.offset, r.key, r.value)
            for tp in sorted(polled, key=lambda t: (t.topic, t.partition))
            for r in polled[tp]
        ]
        # -- 2. process (under the versions lock if the batch holds control commands) -----
        has_control = any(r.topic == self.control_topic for r in records)
        if has_control:
            self.versions_lock.acquire()
        try:
            result = self.processor.process(records)
            # -- 3. dead letters -----------------------------------------------------------
            if result.dead:
                for dead in result.dead:
                    self.producer.send(
                        self.deadletter_topic, key=dead.record.key, value=dead_letter_payload(dead)
                    )
                    log.warning(
                        "dead-lettered %s-%d@%d: %s",
                        dead.record.topic,
                        dead.record.partition,
                        dead.record.offset,
                        dead.reason,
                    )
                self.producer.flush(timeout=30)
            # -- 4. write ------------------------------------------------------------------
            try:
                self.store.write(result.batch)
            except StoreError:
                self.healthy = False
                raise
        finally:
            if has_control:
                self.versions_lock.release()
        for switch in result.switches:
            self.announce({"event": "rollback", **switch, "at": time.time()})
        # -- 5. commit to Kafka (monitoring) -----------------------------------------------
        offsets = {
            tp: OffsetAndMetadata(records_[-1].offset + 1, "", -1)
            for tp, records_ in polled.items()
            if records_
        }
        try:
            self.consumer.commit_async(offsets)
        except KafkaError as exc:  # the store holds the truth; this is for lag monitors
            log.debug("kafka offset commit failed: %s", exc)
        elapsed = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.records += len(records)
        self.stats.dead += len(result.dead)
        self.stats.last_batch_s = elapsed
        self.metrics.observe_batch(result, len(records), elapsed)
        if self.on_applied is not None:
            self.on_applied(result)
        return result

    def announce(self, event: dict[str, Any]) -> None:
        """A small message on the snapshots topic (publish, rejection, rollback)."""
        domain = str(event.get("domain", ""))
        try:
            self.producer.send(self.snapshots_topic, key=domain.encode(), value=orjson.dumps(event))
        except KafkaError as exc:  # the version switch is committed; the notice is best-effort
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
        try:
            self.producer.flush(timeout=10)
            self.producer.close(timeout=10)
        except KafkaError as exc:
            log.warning("closing the dead-letter producer: %s", exc)
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as exc:
            log.warning("closing the consumer: %s", exc)
        self.healthy = False
