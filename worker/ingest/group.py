"""Shared state of a group of workers: table versions and the codebook, on Kafka.

Most of a worker's state is *derived*: items, popularity, the interaction log,
users and codes are a deterministic function of a domain's events, so a worker
that takes over a partition rebuilds them by replaying that partition's events
from its own stored offsets (from the beginning when it never owned it): the
event topics are the changelog of that state, as Kafka Streams does with source
topics. Two things are not derived and must travel between owners:

* **table versions** (the ``versions`` column family: fine-tuned rows, records,
  the current pointer, the next version number) plus the offsets of the control
  partition whose commands changed them. They are mirrored, key by key, on the
  compacted ``versions`` topic, partitioned like the events (a domain's versions
  live in its events' partition). Every write of a batch that touches them sends
  its changes there and waits for the broker *before* the local RocksDB write, so
  the topic always holds at least what any owner committed. A new owner restores
  them before it processes the partition; version numbers therefore keep
  increasing across owners, and rollbacks already applied are not applied again.
* **the codebook**, shared by every domain so that table rows are comparable. The
  ``codebook`` topic has one partition; the first codebook on it wins: a worker
  that trains one at bootstrap sends it, then adopts whichever codebook came
  first, so a group agrees on one. A codebook migration moves it on: a *successor*
  record (key ``next\0`` + the new id, value the id it follows, ``\0``, the new
  codebook) counts when it follows the chain's last codebook, the first such record in
  offset order winning; the group's codebook is the chain's last (:meth:`CodebookLog.chain`).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.partitioner import murmur2

from quantize.codebook import ResidualCodebook
from quantize.exceptions import CodebookError
from store.partition import StorePartition, WriteBatch, decode_offset_key
from worker.core.exceptions import WorkerError
from worker.core.settings import Settings
from worker.ingest.coding import CodeService
from worker.ingest.exceptions import (
    BatchAbandoned,
    CodebookConflictError,
    KafkaRefusedError,
    KafkaUnavailableError,
    NotOwnedError,
)
from worker.ingest.kafka_calls import KafkaCall, KafkaCalls, close_producer, poll_records
from worker.state.layout import (
    mirrored_offset_key,
    restore_position_key,
    split_mirrored_offset_key,
    version_key_domain,
)
from worker.state.reads import codebook_lineage

log = logging.getLogger(__name__)

_POSITION = struct.Struct(">q")
#: large enough for a version's table and items of a few hundred thousand items
MAX_RECORD_BYTES = 64 * 1024 * 1024
#: how long a command's Kafka call (no daemon, no stop event) waits out a broker outage
COMMAND_WAIT_S = 30.0
#: how long a send waits for metadata before the policy takes over (see worker.ingest.kafka_calls)
MAX_BLOCK_MS = 5_000
#: how long one metadata or offsets request may block (kafka-python's default is 30 s)
CALL_TIMEOUT_MS = 5_000


def topic_reader(settings: Settings, what: str) -> KafkaConsumer:
    """A consumer without a group that reads whole records of up to :data:`MAX_RECORD_BYTES`;
    no broker: :class:`KafkaUnavailableError` saying it could not ``what``."""
    try:
        return KafkaConsumer(
            **settings.kafka_common(),
            enable_auto_commit=False,
            max_partition_fetch_bytes=MAX_RECORD_BYTES,
            fetch_max_bytes=MAX_RECORD_BYTES,
        )
    except KafkaError as exc:
        raise KafkaUnavailableError(f"could not {what}: {exc}") from exc


def command_calls(settings: Settings) -> KafkaCalls:
    """The Kafka policy of a part made outside the daemon (a command, a test): no stop
    event, each call's wait bounded by :data:`COMMAND_WAIT_S`."""
    return KafkaCalls(threading.Event(), settings.kafka_bootstrap, max_wait_s=COMMAND_WAIT_S)


def domain_partition(domain: str, partitions: int) -> int:
    """The partition of ``domain``'s events: Kafka's default partitioner on key = domain."""
    return (murmur2(domain.encode()) & 0x7FFFFFFF) % partitions


# -- the store wrapper that mirrors writes ------------------------------------------------


@dataclass(frozen=True, slots=True)
class MirrorOp:
    partition: int
    key: bytes  # changelog key
    value: bytes | None  # None: deleted


#: the column families :meth:`MirroredStore.mirror_op` mirrors operations of (others: none)
MIRRORED_FAMILIES = frozenset({"versions", "offsets"})


class _RecordingBatch(WriteBatch):
    """Delegates to the real batch and records the operations that must be mirrored."""

    def __init__(self, inner: WriteBatch, owner: MirroredStore) -> None:
        self.inner = inner
        self.owner = owner
        self.ops: list[MirrorOp] = []

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self.inner.put(cf, key, value)
        if cf in MIRRORED_FAMILIES:  # a batch's tens of thousands of others: no call
            self._record(cf, key, value)

    def delete(self, cf: str, key: bytes) -> None:
        self.inner.delete(cf, key)
        if cf in MIRRORED_FAMILIES:
            self._record(cf, key, None)

    def delete_range(self, cf: str, start: bytes, end: bytes) -> None:
        if cf == "versions":
            raise WorkerError(
                "range deletes of the versions column family cannot be mirrored to the "
                "versions topic; delete the keys one by one"
            )
        self.inner.delete_range(cf, start, end)

    def __len__(self) -> int:
        return len(self.inner)

    def _record(self, cf: str, key: bytes, value: bytes | None) -> None:
        op = self.owner.mirror_op(cf, key, value)
        if op is not None:
            self.ops.append(op)


class MirroredStore(StorePartition):
    """A store whose writes to table versions also go to the ``versions`` topic, first.

    1. A batch records the operations on the ``versions`` column family and on the
       stored offsets of the control topic while they are added.
    2. :meth:`write` refuses operations on domains whose partition is not owned now
       (a fine-tune that finished after its domain moved away publishes nothing).
    3. It sends the recorded operations to the ``versions`` topic and waits for
       every acknowledgement.
    4. Only then it writes the batch to the local store (state and offsets at once).

    A crash between 3 and 4 leaves the topic ahead of the local store: the records
    are re-sent with the same values when the batch is replayed (compaction keeps
    one), or restored by the next owner; never behind.

    On each assignment the consumer loop calls :meth:`restore_owned`, which brings the
    assigned partitions' versions up to the topic's end before they are processed.
    """

    def __init__(
        self,
        inner: StorePartition,
        log_: VersionsLog,
        owned: Callable[[], set[int] | None],
    ) -> None:
        self.inner = inner
        self.versions_log = log_
        self.owned = owned  # partitions owned now; None = not in a group (everything)

    def mirror_op(self, cf: str, key: bytes, value: bytes | None) -> MirrorOp | None:
        """The operation to mirror for one put or delete (``None``: not mirrored; only
        families of :data:`MIRRORED_FAMILIES` have any)."""
        if cf == "versions":
            part = self.versions_log.partition_of(version_key_domain(key))
            return MirrorOp(part, key, value)
        if cf == "offsets":
            topic, partition = decode_offset_key(key)
            if topic == self.versions_log.control_topic:
                return MirrorOp(partition, mirrored_offset_key(key), value)
        return None

    # -- StorePartition ------------------------------------------------------------------

    def get(self, cf: str, key: bytes) -> bytes | None:
        return self.inner.get(cf, key)

    def multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        return self.inner.multi_get(cf, keys)

    def items(
        self,
        cf: str,
        *,
        prefix: bytes = b"",
        start: bytes | None = None,
        end: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        return self.inner.items(cf, prefix=prefix, start=start, end=end, reverse=reverse)

    def scan(self, cf: str, *, prefix: bytes = b"") -> tuple[list[bytes], list[bytes]]:
        return self.inner.scan(cf, prefix=prefix)

    def scan_chunks(
        self, cf: str, size: int, *, prefix: bytes = b""
    ) -> Iterator[tuple[list[bytes], list[bytes]]]:
        return self.inner.scan_chunks(cf, size, prefix=prefix)

    def batch(self) -> WriteBatch:
        return _RecordingBatch(self.inner.batch(), self)

    def write(self, batch: WriteBatch, *, durable: bool = True) -> None:
        if not isinstance(batch, _RecordingBatch):
            raise WorkerError("a batch written to a MirroredStore must come from its batch()")
        # -- 1./2. ownership of every mirrored partition ---------------------------------
        owned = self.owned()
        if owned is not None:
            foreign = sorted({op.partition for op in batch.ops} - owned)
            if foreign:
                raise NotOwnedError(
                    f"this worker no longer owns partition(s) {foreign} of "
                    f"{self.versions_log.topic}; the change was not written (the new owner "
                    "continues from the versions topic)"
                )
        # -- 3. the versions topic first ------------------------------------------------
        if batch.ops:
            self.versions_log.send(batch.ops)
        # -- 4. then the local store -----------------------------------------------------
        self.inner.write(batch.inner, durable=durable)

    def restore_owned(self, partitions: Collection[int]) -> list[str]:
        """Restore ``partitions``' versions from the topic into the local store (unmirrored);
        returns the domains whose versions changed."""
        report = self.versions_log.restore(self.inner, partitions)
        log.info(
            "restored table versions of partitions %s: %d records, %d domains, %.2f s",
            report.partitions,
            report.records,
            len(report.domains),
            report.seconds,
        )
        return sorted(report.domains)

    def checkpoint(self, path: Path) -> StorePartition:
        return self.inner.checkpoint(path)

    def close(self) -> None:
        self.inner.close()

    def memory_usage(self) -> dict[str, int]:
        return self.inner.memory_usage()


# -- the versions topic ---------------------------------------------------------------------


@dataclass
class RestoreReport:
    partitions: list[int] = field(default_factory=list)
    records: int = 0
    domains: set[str] = field(default_factory=set)
    seconds: float = 0.0


class VersionsLog:
    """The compacted ``versions`` topic: send mirrored changes, restore partitions."""

    def __init__(
        self,
        settings: Settings,
        partitions: int | None = None,
        *,
        calls: KafkaCalls | None = None,
    ) -> None:
        """``calls``: the worker's Kafka policy (by default :func:`command_calls`)."""
        self.settings = settings
        self.calls = calls or command_calls(settings)
        self.topic = settings.topic("versions")
        self.control_topic = settings.topic("control")
        self._partitions = partitions
        self._producer: KafkaProducer | None = None

    @property
    def partitions(self) -> int:
        if self._partitions is None:
            self._partitions = self.calls.call(KafkaCall.VERSIONS_MIRROR, self._count_partitions)
        return self._partitions

    def _count_partitions(self) -> int:
        consumer = KafkaConsumer(**self.settings.kafka_common(), enable_auto_commit=False)
        try:
            found = consumer.partitions_for_topic(self.topic)
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"could not read the partitions of {self.topic} from "
                f"{self.settings.kafka_bootstrap}: {exc}; is the broker up?"
            ) from exc
        finally:
            consumer.close()
        if not found:
            raise KafkaUnavailableError(
                f"topic {self.topic} does not exist on {self.settings.kafka_bootstrap}; "
                "create the topics with: adacode topics create"
            )
        return len(found)

    def partition_of(self, domain: str) -> int:
        return domain_partition(domain, self.partitions)

    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(
                **self.settings.kafka_common(),
                acks="all",
                linger_ms=2,
                retries=5,
                max_request_size=MAX_RECORD_BYTES,
                max_block_ms=MAX_BLOCK_MS,
            )
        return self._producer

    def send(self, ops: Iterable[MirrorOp], timeout_s: float = 10.0) -> None:
        """Send ``ops`` in order and wait until the broker has every one (under the Kafka
        policy: an outage is waited out, a stop abandons the write before anything local)."""
        pending = list(ops)
        self.calls.call(KafkaCall.VERSIONS_MIRROR, lambda: self._send(pending, timeout_s))

    def _send(self, ops: list[MirrorOp], timeout_s: float) -> None:
        try:
            producer = self.producer()
            futures = [
                producer.send(self.topic, key=op.key, value=op.value, partition=op.partition)
                for op in ops
            ]
            producer.flush(timeout=timeout_s)
            for future in futures:
                future.get(timeout=timeout_s)
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"could not write table versions to {self.topic} on "
                f"{self.settings.kafka_bootstrap}: {exc}; nothing was written locally, "
                "the change is retried with its batch"
            ) from exc

    def restore(self, store: StorePartition, partitions: Iterable[int]) -> RestoreReport:
        """:meth:`restore_once` under the Kafka policy (an outage is waited out, a stop
        abandons it with nothing written)."""
        wanted = sorted(partitions)
        return self.calls.call(KafkaCall.VERSIONS_RESTORE, lambda: self.restore_once(store, wanted))

    def restore_once(self, store: StorePartition, partitions: Iterable[int]) -> RestoreReport:
        """Bring the local ``versions`` of ``partitions`` up to the topic's end.

        Reads each partition from where this store last restored it (``meta``
        ``restore/<topic>/<p>``), applies puts, deletes and control offsets in
        order, and writes everything with the new positions in one batch.
        """
        started = time.monotonic()
        report = RestoreReport(partitions=sorted(partitions))
        if not report.partitions:
            return report
        consumer = topic_reader(self.settings, f"restore table versions from {self.topic}")
        batch = store.batch()
        try:
            tps = [TopicPartition(self.topic, p) for p in report.partitions]
            consumer.assign(tps)
            ends = consumer.end_offsets(tps, timeout_ms=CALL_TIMEOUT_MS)
            for tp in tps:
                raw = store.get("meta", restore_position_key(self.topic, tp.partition))
                start = _POSITION.unpack(raw)[0] if raw is not None else 0
                if start >= ends[tp]:
                    continue
                consumer.seek(tp, start)
                position = start
                deadline = time.monotonic() + 120
                while position < ends[tp]:
                    if self.calls.stop.is_set():
                        raise KafkaUnavailableError("restore interrupted by a stop request")
                    if time.monotonic() > deadline:
                        raise KafkaUnavailableError(
                            f"restoring {tp.topic}-{tp.partition} stalled at offset {position} "
                            f"of {ends[tp]}; check the broker at {self.settings.kafka_bootstrap}"
                        )
                    for records in poll_records(consumer, timeout_ms=500).values():
                        for rec in records:
                            self._apply(store, batch, rec.key, rec.value, report)
                            position = rec.offset + 1
                    position = max(position, consumer.position(tp, timeout_ms=CALL_TIMEOUT_MS))
                batch.put(
                    "meta", restore_position_key(self.topic, tp.partition), _POSITION.pack(position)
                )
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"could not restore table versions from {self.topic}: {exc}"
            ) from exc
        finally:
            consumer.close()
        store.write(batch)
        report.seconds = time.monotonic() - started
        return report

    def _apply(
        self,
        store: StorePartition,
        batch: WriteBatch,
        key: bytes | None,
        value: bytes | None,
        report: RestoreReport,
    ) -> None:
        if key is None:
            return
        report.records += 1
        okey = split_mirrored_offset_key(key)
        if okey is not None:
            if value is None:
                return
            topic, partition = decode_offset_key(okey)
            local = store.get_offset(topic, partition)
            restored = _POSITION.unpack(value)[0]
            if local is None or restored > local:
                batch.set_offset(topic, partition, restored)
            return
        report.domains.add(version_key_domain(key))
        if value is None:
            batch.delete("versions", key)
        else:
            batch.put("versions", key, value)

    def close(self) -> None:
        if self._producer is not None:
            close_producer(self._producer, 10, "versions")


# -- the codebook topic -----------------------------------------------------------------------


def _successor(key: bytes) -> bool:
    return key.startswith(SUCCESSOR)


#: the key prefix of a successor record on the codebook topic (see the module docstring)
SUCCESSOR = b"next\x00"


def follow_chain(records: Iterable[tuple[bytes, bytes]]) -> list[ResidualCodebook]:
    """The chain of codebooks in the codebook topic's ``(key, value)`` records (offset
    order): the first codebook, then each successor record that follows the chain's last
    (the first such record wins)."""
    chain: list[ResidualCodebook] = []
    for key, value in records:
        if not _successor(key):
            if not chain:
                chain.append(ResidualCodebook.from_bytes(value))
            continue
        follows, _, raw = value.partition(b"\x00")
        if chain and follows.decode() == chain[-1].codebook_id:
            chain.append(ResidualCodebook.from_bytes(raw))
    return chain


class CodebookLog:
    """The one-partition ``codebook`` topic: the first codebook on it, then each successor
    that follows the last (see the module docstring)."""

    def __init__(self, settings: Settings, *, calls: KafkaCalls | None = None) -> None:
        """``calls``: the worker's Kafka policy (by default :func:`command_calls`)."""
        self.settings = settings
        self.calls = calls or command_calls(settings)
        self.topic = settings.topic("codebook")
        self._seen: list[ResidualCodebook] | None = None

    def current(self, timeout_s: float = 5.0) -> ResidualCodebook | None:
        """The group's codebook now: the chain's last (read now), ``None`` when none was
        published yet."""
        chain = self.chain(timeout_s)
        return chain[-1] if chain else None

    def chain(self, timeout_s: float = 5.0) -> list[ResidualCodebook]:
        """The group's codebooks in the order it moved through them (read now); the last
        is the group's codebook (empty: none yet)."""
        records = self.calls.call(KafkaCall.CODEBOOK_READ, lambda: self._read(timeout_s))
        chain = follow_chain(records)
        self._seen = chain  # one reference assigned: readers see the old list or this one
        return chain

    def seen(self) -> list[ResidualCodebook] | None:
        """The chain as it was last read (at start, by an offer or by :meth:`watch`), without
        a Kafka call and without waiting for one in progress (the consumer asks before every
        batch); ``None`` before the first read."""
        return self._seen

    def watch(self, interval_s: float, stop_event: threading.Event) -> threading.Thread | None:
        """Read the chain again every ``interval_s`` on a thread of its own until
        ``stop_event`` is set, so that :meth:`seen` follows a migration another worker made
        (``interval_s`` 0: no thread). A read that fails (the broker is down) is logged and
        tried again at the next interval."""
        if interval_s <= 0:
            return None

        def run() -> None:
            while not stop_event.wait(interval_s):
                try:
                    self.chain()
                except BatchAbandoned:
                    return  # stopping while the broker is down
                except (KafkaUnavailableError, KafkaRefusedError) as exc:
                    log.warning("could not read the group's codebook: %s", exc)
                except CodebookError as exc:
                    log.error("%s holds a codebook that cannot be read: %s", self.topic, exc)

        thread = threading.Thread(target=run, name="codebook-watch", daemon=True)
        thread.start()
        return thread

    def succeed(self, old_id: str, new: ResidualCodebook) -> ResidualCodebook | None:
        """Offer ``new`` as the successor of ``old_id``; returns the group's codebook after
        the offer (``new`` if it follows the chain's last and no other successor came
        first)."""
        chain = self.chain()
        if chain and chain[-1].codebook_id == old_id:
            value = old_id.encode() + b"\x00" + new.to_bytes()
            self.calls.call(
                KafkaCall.CODEBOOK_OFFER,
                lambda: self._offer(new, key=SUCCESSOR + new.codebook_id.encode(), value=value),
            )
            chain = self.chain()
        return chain[-1] if chain else None

    def agree(self, candidate: ResidualCodebook) -> ResidualCodebook:
        """Offer ``candidate`` as the group's first codebook; returns the group's codebook
        (``candidate`` if it came first; the chain's last if the group moved on since)."""
        found = self.current()
        if found is not None:
            return found
        self.calls.call(KafkaCall.CODEBOOK_OFFER, lambda: self._offer(candidate))
        winner = self.current()
        if winner is None:
            raise KafkaUnavailableError(
                f"codebook {candidate.codebook_id} was acknowledged by {self.topic} but cannot "
                "be read back; check the topic's retention (it must be compacted, not deleted)"
            )
        if winner.codebook_id != candidate.codebook_id:
            log.info(
                "another worker's codebook %s came first; using it instead of %s",
                winner.codebook_id,
                candidate.codebook_id,
            )
        return winner

    def _offer(
        self, candidate: ResidualCodebook, *, key: bytes | None = None, value: bytes | None = None
    ) -> None:
        try:
            producer = KafkaProducer(
                **self.settings.kafka_common(),
                acks="all",
                max_request_size=MAX_RECORD_BYTES,
                max_block_ms=MAX_BLOCK_MS,
            )
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"could not offer codebook {candidate.codebook_id} on {self.topic}: {exc}"
            ) from exc
        # the offer may run on the bootstrap thread when the process exits (a SIGTERM during
        # an outage): drop kafka-python's exit hook, which would flush an unsent offer and print
        # a traceback; the finally below closes it otherwise (an offer not sent is made again)
        getattr(producer, "_unregister_cleanup", lambda: None)()
        try:
            producer.send(
                self.topic,
                key=candidate.codebook_id.encode() if key is None else key,
                value=candidate.to_bytes() if value is None else value,
            ).get(timeout=10)
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"could not offer codebook {candidate.codebook_id} on {self.topic}: {exc}"
            ) from exc
        finally:
            close_producer(producer, 10, "codebook")

    def _read(self, timeout_s: float) -> list[tuple[bytes, bytes]]:
        """Every record of the topic with a value, ``(key, value)`` in offset order."""
        consumer = topic_reader(self.settings, f"read the group's codebook from {self.topic}")
        out: list[tuple[bytes, bytes]] = []
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            end = consumer.end_offsets([tp], timeout_ms=CALL_TIMEOUT_MS)[tp]
            if not end:
                return out
            consumer.seek_to_beginning(tp)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for records in poll_records(consumer, timeout_ms=500).values():
                    out.extend((rec.key or b"", rec.value) for rec in records if rec.value)
                if consumer.position(tp, timeout_ms=CALL_TIMEOUT_MS) >= end:
                    return out
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"could not read the group's codebook from {self.topic}: {exc}"
            ) from exc
        finally:
            consumer.close()
        raise KafkaUnavailableError(
            f"reading the codebooks of {self.topic} took more than {timeout_s:.0f} s"
        )


def adopt_group_codebook(store: StorePartition, codes: CodeService, group: CodebookLog) -> None:
    """Make this worker use the group's codebook, before it processes anything.

    1. No group codebook yet and a local one (a worker that ran alone): offer it.
    2. A group codebook and none locally: store it; items are coded as they arrive.
    3. The local one moved past the group's (this worker migrated, or its state was
       retrained, since the group's was offered: the group's is in its lineage): offer the
       local one as the group's successor.
    4. The group's moved past the local one (another worker migrated: the local one is in
       the group's chain): migrate to the group's, live, from the first batch on.
    5. Both, unrelated: refuse to start (the codes would not be comparable).
    """
    local = codes.codebook
    chain = group.chain()
    # -- 1. offer the local one ---------------------------------------------------------------
    if not chain:
        if local is None:
            return  # nobody has one: the first worker to bootstrap offers its own
        chain = [group.agree(local)]
    winner = chain[-1]
    # -- 2. adopt -----------------------------------------------------------------------------
    if local is None:
        batch = store.batch()
        codes.adopt(batch, winner)  # items held already are coded by the next batches
        store.write(batch)
        log.info("using the group's codebook %s", winner.codebook_id)
        return
    if winner.codebook_id == local.codebook_id:
        return
    # -- 3. this worker moved on: the group follows -------------------------------------------
    if winner.codebook_id in codebook_lineage(store):
        moved = group.succeed(winner.codebook_id, local)
        if moved is not None and moved.codebook_id == local.codebook_id:
            log.info(
                "the group's codebook moves from %s to this worker's %s",
                winner.codebook_id,
                local.codebook_id,
            )
            return
        winner = moved or winner
    # -- 4. the group moved on: this worker follows --------------------------------------------
    elif local.codebook_id in {c.codebook_id for c in chain}:
        batch = store.batch()
        codes.request_migration(
            batch, f"the group's codebook is {winner.codebook_id}", target=winner
        )
        store.write(batch)
        log.info(
            "the group's codebook moved from %s to %s: migrating to it",
            local.codebook_id,
            winner.codebook_id,
        )
        return
    # -- 5. conflict --------------------------------------------------------------------------
    raise CodebookConflictError(
        f"the state in {codes.settings.state_dir} was coded with codebook "
        f"{local.codebook_id}, but the group's codebook on {group.topic} is "
        f"{winner.codebook_id}; start this worker with an empty state directory (it "
        "rebuilds its partitions from the topics) or use another topic prefix"
    )
