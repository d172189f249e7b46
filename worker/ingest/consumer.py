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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError

from store.exceptions import StoreError
from store.partition import StorePartition
from worker.core.memory import release_free_memory
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.ingest.exceptions import BatchAbandoned, KafkaUnavailableError
from worker.ingest.group import domain_partition
from worker.ingest.health import BACKOFF_MAX_S, BACKOFF_MIN_S, BrokerWatch
from worker.ingest.processor import BatchResult, DeadLetter, Processor

log = logging.getLogger(__name__)

#: seconds between returns of free heap pages to the OS from the consuming thread
TRIM_EVERY_S = 30.0


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
    """On assignment, restore what moves between owners, then seek to the stored offsets.

    Runs inside ``poll`` on the loop's thread, between batches: every applied batch
    is already committed with its offsets, so a revocation has nothing pending.
    """

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: Any) -> None:
        # waits for a publish in progress: it either lands before the move or not at all
        with self.loop.versions_lock:
            self.loop.assigned = set()
        log.info("partitions revoked: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        """1. Restore what other owners of the assigned partitions committed (the store's
           :meth:`~store.partition.StorePartition.restore_owned`: the table versions of a
           group's store, see worker.ingest.group; nothing for a plain store).
        2. Seek each partition to the offset stored with the state; a partition this
           store never processed starts from the beginning, whatever Kafka committed.
        3. Publish the new assignment (ownership of domains follows it).
        """
        loop = self.loop
        # -- 1. restore --------------------------------------------------------------------
        changed = loop.store.restore_owned({tp.partition for tp in assigned})
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
        shared state (versions, codebook), which must exist before the worker subscribes.
        """
        self.settings = settings
        self.store = store
        self.processor = processor
        self.metrics = metrics
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.on_applied = on_applied
        self.on_restored = on_restored
        self.before_subscribe = before_subscribe
        self.assigned: set[TopicPartition] = set()
        self.stats = LoopStats()
        self.healthy = False
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
            # co-partitioned topics: partition p of items, interactions and control go to
            # the same worker, so a domain's events and commands have one owner
            partition_assignment_strategy=(RangePartitionAssignor,),
            metadata_max_age_ms=10_000,  # notice new partitions and topics within seconds
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(1000, settings.kafka_session_timeout_ms // 5),
        )
        self.producer = KafkaProducer(**common, acks="all", linger_ms=5, retries=5)

    # ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until :meth:`stop` is called; then finish the batch and close.

        A broker outage does not stop it: see :mod:`worker.ingest.health` for how it is detected.
        """
        self._wait_for_topics()
        if self.before_subscribe is not None and not self.stop_event.is_set():
            self.before_subscribe()
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
                    polled = self.consumer.poll(
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
                if polled:
                    try:
                        self.apply(polled)
                    except BatchAbandoned as exc:
                        log.warning("%s", exc)
                        break
                if time.monotonic() - trimmed_at >= TRIM_EVERY_S:
                    # each batch's parsed events, freed, leave holes in the heap that glibc
                    # keeps; without this the resident size climbs between fine-tunes
                    release_free_memory()
                    trimmed_at = time.monotonic()
                state = watch.check()
                self.healthy = state.healthy and poll_failures < 3
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
        4. Write the batch to the store: state and offsets commit together.
        5. Commit the same offsets to Kafka (monitoring only; failures are logged).
        """
        started = time.perf_counter()
        for tp, recs in polled.items():
            self.metrics.count_consumed(tp.topic, len(recs))
        # -- 1. flatten --------------------------------------------------------------------
        # (kafka-python's ConsumerRecord is a processor.Record: no per-record copies;
        # TopicPartition sorts by topic, then partition)
        records = [r for tp in sorted(polled) for r in polled[tp]]
        # -- 2. process (under the versions lock if the batch holds control commands) -----
        has_control = any(tp.topic == self.control_topic and recs for tp, recs in polled.items())
        if has_control:
            self.versions_lock.acquire()
        try:
            result = self.processor.process(records)
            # -- 3. dead letters (retried while the broker is away) ----------------------
            if result.dead:
                for dead in result.dead:
                    log.warning(
                        "dead-lettered %s-%d@%d: %s",
                        dead.record.topic,
                        dead.record.partition,
                        dead.record.offset,
                        dead.reason,
                    )
                self._until_delivered(lambda: self._send_dead_letters(result.dead), "dead letters")
            # -- 4. write (table versions reach the versions topic first, retried too) -----
            try:
                self._until_delivered(lambda: self.store.write(result.batch), "table versions")
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
        self.metrics.observe_batch(
            applied=result.applied,
            dead_topics=[dead.record.topic for dead in result.dead],
            texts_encoded=result.texts_encoded,
            code_changes=[(domain, change.reason) for domain, change in result.coding.changes],
            seconds=elapsed,
        )
        if self.on_applied is not None:
            self.on_applied(result)
        return result

    def _send_dead_letters(self, dead: list[DeadLetter]) -> None:
        futures = [
            self.producer.send(
                self.deadletter_topic, key=d.record.key, value=dead_letter_payload(d)
            )
            for d in dead
        ]
        self.producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)

    def _until_delivered(self, action: Callable[[], None], what: str) -> None:
        """Run ``action`` until Kafka takes it; the batch waits, nothing is committed before.

        A stop requested meanwhile abandons the batch (:class:`BatchAbandoned`): its
        records are replayed by the next run, as after a crash.
        """
        wait = BACKOFF_MIN_S
        while True:
            try:
                action()
                return
            except (KafkaError, KafkaUnavailableError) as exc:
                self.healthy = False
                if self.stop_event.is_set():
                    raise BatchAbandoned(
                        f"stopping while Kafka at {self.settings.kafka_bootstrap} does not take "
                        f"the batch's {what}; nothing of it was committed, it is replayed on "
                        "the next start"
                    ) from exc
                log.warning(
                    "Kafka did not take the batch's %s (%s); retrying in %.1f s", what, exc, wait
                )
                self.stop_event.wait(wait)
                wait = min(BACKOFF_MAX_S, wait * 2)

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
