"""Ingest throughput of the worker: applied events/s against the raw kafka-python consume rate.

One command::

    python bench/ingest.py [--bootstrap HOST:PORT] [--interactions N] [--items N]
                           [--text-items M] [--repeats R]

Without ``--bootstrap`` it starts its own broker (``ops/kafka.sh up`` on free ports, data in a
temporary directory) and stops it at the end. It produces three workloads, each to a fresh
topic set (unique prefix, ``create_topics(settings, partitions=3)``):

* ``interactions``: N interaction events (~100-byte JSON, a few domains as keys, Zipf item
  popularity), no item events;
* ``items+embedding``: N item events carrying a ready 384-float embedding;
* ``items+text``: M item events with a short product title and no embedding (MiniLM encodes).

and measures on the same topics, each ``--repeats`` times with a fresh consumer group and a
fresh RocksDB (median, min, max):

* raw: a group-less ``KafkaConsumer`` (assign + seek_to_beginning, ``poll(max_records=5000)``,
  the worker's fetch sizes), counting records until all are consumed, values untouched;
* applied: the real worker (``ConsumerLoop`` + ``Processor`` + ``RocksDBPartition`` in a temp
  dir), timed from the partition assignment (group join excluded and reported separately)
  to the commit of the batch that holds the last record; ``sync_writes`` True and False;
  text items with ``TextEncoder`` at 1 and 2 torch threads (model load excluded, reported).

The headline is applied/raw. A stage breakdown (poll, process, store.write, commit, ...) is
kept for every applied run by timing around the loop's calls (subclasses; the worker is not
edited); one extra run per workload splits ``Processor.process`` further (parse, read,
encode, apply, flush), and one cProfile run of the interactions workload lists the hottest
functions. Prototype fixes (:class:`FastProcessor`, :class:`FastLoop`) are measured beside
the real worker on the same topics, their state checked equal to the real worker's.

Writes ``bench/out/ingest.json``, ``bench/out/ingest.png`` and ``bench/out/ingest_profile.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import logging
import math
import os
import platform
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import kafka
import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.record import util as kafka_record_util
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import worker.processor as processor_module
from adacode.errors import AdacodeError
from bench.common import out_path
from store.partition import WriteBatch
from store.rocksdb import RocksDBPartition
from worker.consumer import ConsumerLoop
from worker.encoder import TextEncoder
from worker.events import interaction_payload, item_payload
from worker.metrics import Metrics
from worker.processor import BatchResult, Encode, Processor, SourceRecord
from worker.settings import Settings
from worker.topics import create_topics

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "ops" / "kafka.sh"
PARTITIONS = 3
POLL_MAX_RECORDS = 5000
FETCH_MAX_BYTES = 64 * 1024 * 1024  # the worker's fetch sizes (worker/consumer.py)
MAX_PARTITION_FETCH_BYTES = 16 * 1024 * 1024
DIM = 384
ZIPF_EXPONENT = 1.0
#: A few domains with skewed traffic; they are the message keys (as in production).
DOMAINS = ("books", "movies", "music", "games", "office")
DOMAIN_WEIGHTS = (0.40, 0.25, 0.15, 0.12, 0.08)
BASE_TS = 1_700_000_000_000
RUN_TIMEOUT_S = 300.0
GOAL_APPLIED_PER_S = 20_000.0
GOAL_RATIO = 0.5

log = logging.getLogger("bench.ingest")


class IngestBenchError(AdacodeError):
    """The ingest benchmark could not start its broker, produce, or finish a run."""


# ======================================================================================
# broker
# ======================================================================================


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    """Yield a bootstrap address: ``bootstrap`` as given, or a broker started for this run."""
    if bootstrap:
        yield bootstrap
        return
    port = free_port()
    controller = free_port()
    while controller == port:
        controller = free_port()
    data = Path(tempfile.mkdtemp(prefix="adacode-bench-kafka-"))
    flags = ["--port", str(port), "--controller-port", str(controller), "--data", str(data)]
    started = time.perf_counter()
    up = subprocess.run(
        ["bash", str(KAFKA_SH), "up", *flags], capture_output=True, text=True, check=False
    )
    if up.returncode != 0:
        subprocess.run(["bash", str(KAFKA_SH), "down", *flags], capture_output=True, check=False)
        shutil.rmtree(data, ignore_errors=True)
        raise IngestBenchError(
            f"ops/kafka.sh up {' '.join(flags)} failed with exit code {up.returncode}: "
            f"{(up.stdout + up.stderr).strip()[-2000:]}; fix the broker setup (ops/kafka.sh "
            "fetch, java) or pass --bootstrap HOST:PORT of a running broker"
        )
    log.info("broker up on 127.0.0.1:%d in %.1f s", port, time.perf_counter() - started)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        down = subprocess.run(
            ["bash", str(KAFKA_SH), "down", *flags], capture_output=True, text=True, check=False
        )
        if down.returncode != 0:
            print(f"warning: ops/kafka.sh down failed: {down.stderr.strip()}", file=sys.stderr)
        shutil.rmtree(data, ignore_errors=True)


# ======================================================================================
# workloads
# ======================================================================================

Event = tuple[bytes, bytes]  # (key, value)


@dataclass
class Workload:
    """One topic set holding one kind of event."""

    name: str
    settings: Settings  # topic prefix and bootstrap; per-run fields are replaced
    records: int
    end: dict[tuple[str, int], int] = field(default_factory=dict)  # partitions with data
    partitions: list[tuple[str, int]] = field(default_factory=list)  # every event partition
    payload_bytes: float = 0.0  # mean value size

    @property
    def topics(self) -> list[str]:
        return [self.settings.topic("items"), self.settings.topic("interactions")]


def _domains(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(len(DOMAINS), size=n, p=np.asarray(DOMAIN_WEIGHTS))


@dataclass(frozen=True)
class Catalogue:
    """The items with embeddings; interactions name these items (ids and domains)."""

    item_ids: list[str]
    domains: np.ndarray  # int [n_items], index into DOMAINS
    vectors: np.ndarray  # float32 [n_items, DIM], L2-normalized


def make_catalogue(n_items: int, seed: int) -> Catalogue:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_items, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Catalogue([f"i{i:07d}" for i in range(n_items)], _domains(rng, n_items), vectors)


def embedding_item_events(cat: Catalogue) -> list[Event]:
    """One item event per catalogue item, with its 384-float embedding (as ``item_payload``)."""
    out: list[Event] = []
    for i in tqdm(range(len(cat.item_ids)), desc="make items+embedding", unit="ev", leave=False):
        domain = DOMAINS[cat.domains[i]]
        value = item_payload(cat.item_ids[i], domain, BASE_TS + i, embedding=cat.vectors[i])
        out.append((domain.encode(), value))
    return out


def interaction_events(n: int, cat: Catalogue, seed: int) -> list[Event]:
    """``n`` interactions with catalogue items: Zipf item popularity, time-ordered."""
    rng = np.random.default_rng(seed + 1)
    n_items = len(cat.item_ids)
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    p = ranks**-ZIPF_EXPONENT
    by_rank = rng.permutation(n_items)  # popularity rank -> item index
    items = by_rank[rng.choice(n_items, size=n, p=p / p.sum())]
    users = rng.integers(0, max(1, n // 10), size=n)
    ts = BASE_TS + n_items + np.cumsum(rng.exponential(5.0, size=n)).astype(np.int64)
    out: list[Event] = []
    for i in tqdm(range(n), desc="make interactions", unit="ev", leave=False):
        domain = DOMAINS[cat.domains[items[i]]]
        value = interaction_payload(f"u{users[i]:07d}", cat.item_ids[items[i]], domain, int(ts[i]))
        out.append((domain.encode(), value))
    return out


_BRANDS = ("Nordvik", "Acme", "Solano", "Kestrel", "Brightline", "Oakmere", "Vanta", "Lumo")
_ADJECTIVES = ("Compact", "Wireless", "Ergonomic", "Heavy-Duty", "Portable", "Classic", "Slim")
_MATERIALS = ("Stainless Steel", "Bamboo", "Aluminium", "Recycled Plastic", "Leather", "Cotton")
_NOUNS = (
    "Water Bottle",
    "Desk Lamp",
    "Notebook",
    "Headphones",
    "Office Chair",
    "Backpack",
    "Keyboard",
    "Coffee Mug",
    "Paperback Novel",
    "Board Game",
)
_SIZES = ("750 ml", "A5", "2-Pack", "Large", "12 in", "500 g", "Set of 4", "XL")
_COLOURS = ("Blue", "Black", "Forest Green", "Sand", "Red", "White", "Grey")


def text_item_events(m: int, seed: int) -> list[Event]:
    """``m`` item events with a short product-like title and no embedding."""
    rng = np.random.default_rng(seed)
    domains = _domains(rng, m)
    parts = (_BRANDS, _ADJECTIVES, _MATERIALS, _NOUNS, _SIZES, _COLOURS)
    picks = [rng.integers(0, len(words), size=m) for words in parts]
    out: list[Event] = []
    for i in range(m):
        brand, adj, material, noun, size, colour = (
            words[pick[i]] for words, pick in zip(parts, picks, strict=True)
        )
        title = f"{brand} {adj} {material} {noun} {size}, {colour}"
        domain = DOMAINS[domains[i]]
        out.append((domain.encode(), item_payload(f"t{i:07d}", domain, BASE_TS + i, text=title)))
    return out


def produce(bootstrap: str, topic: str, events: Sequence[Event]) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="adacode-bench",
        acks=1,
        linger_ms=20,
        batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    try:
        futures = []
        for key, value in tqdm(events, desc=f"produce {topic}", unit="msg", leave=False):
            futures.append(producer.send(topic, key=key, value=value))
        producer.flush(timeout=120)
        for fut in futures[-10:]:
            fut.get(timeout=30)  # raises if the tail of the stream failed
    finally:
        producer.close(timeout=30)


def partitions_and_ends(
    bootstrap: str, topics: list[str]
) -> tuple[list[tuple[str, int]], dict[tuple[str, int], int]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="adacode-bench")
    try:
        consumer.topics()  # fetch metadata so partitions_for_topic knows every topic
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        ends = consumer.end_offsets(tps)
    finally:
        consumer.close()
    every = sorted((tp.topic, tp.partition) for tp in tps)
    return every, {(tp.topic, tp.partition): off for tp, off in ends.items() if off}


def make_workload(
    bootstrap: str, base: Settings, name: str, topic: str, events: Sequence[Event]
) -> Workload:
    prefix = f"bench-ingest-{uuid.uuid4().hex[:8]}-{name.replace('+', '-')}."
    settings = dataclasses.replace(base, kafka_bootstrap=bootstrap, topic_prefix=prefix)
    create_topics(settings, partitions=PARTITIONS)
    produce(bootstrap, settings.topic(topic), events)
    wl = Workload(name, settings, len(events))
    wl.partitions, wl.end = partitions_and_ends(bootstrap, wl.topics)
    if sum(wl.end.values()) != len(events):
        raise IngestBenchError(
            f"topic {settings.topic(topic)} holds {sum(wl.end.values())} records after "
            f"producing {len(events)}; the broker lost or duplicated records: check its log"
        )
    wl.payload_bytes = float(np.mean([len(v) for _, v in events])) if events else 0.0
    return wl


# ======================================================================================
# measurements
# ======================================================================================


@dataclass
class Run:
    records: int
    seconds: float
    join_s: float = 0.0
    batches: int = 0
    bootstrap_s: float = 0.0  # apply time of the batch that trained the codebook, if any
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else math.inf


def measure_raw(wl: Workload, repeat: int, *, check_crcs: bool = True) -> Run:
    """Group-less consume of every partition from the beginning; values untouched."""
    consumer = KafkaConsumer(
        bootstrap_servers=wl.settings.kafka_bootstrap,
        client_id="adacode-bench-raw",
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
        check_crcs=check_crcs,
    )
    try:
        tps = [TopicPartition(t, p) for t, p in wl.partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        total = sum(wl.end.values())
        count = batches = 0
        bar = tqdm(total=total, desc=f"raw {wl.name} #{repeat}", unit="rec", leave=False)
        started = time.perf_counter()
        deadline = started + RUN_TIMEOUT_S
        while count < total:
            polled = consumer.poll(timeout_ms=200, max_records=POLL_MAX_RECORDS)
            got = sum(len(recs) for recs in polled.values())
            count += got
            batches += bool(got)
            bar.update(got)
            if time.perf_counter() > deadline:
                raise IngestBenchError(
                    f"raw consume of {wl.name} read {count} of {total} records in "
                    f"{RUN_TIMEOUT_S:.0f}s; the broker is stuck or overloaded: check its log"
                )
        seconds = time.perf_counter() - started
        bar.close()
    finally:
        consumer.close()
    return Run(count, seconds, batches=batches)


STAGES = (
    "poll",  # kafka-python: fetch responses, decode record batches into ConsumerRecords
    "flatten+metrics",  # ConsumerLoop.apply minus the parts below
    "process",  # Processor.process: parse, read, encode, apply in memory, build the batch
    "store.write",  # RocksDB write of the batch (fsync'd WAL with sync_writes)
    "commit_async",  # Kafka offset commit (monitoring only)
    "lag report",  # ConsumerLoop._report_lag after every poll
    "loop rest",  # the remainder of the run loop
)


class TimedStore(RocksDBPartition):
    """The real RocksDB partition; times ``write`` and ``multi_get``."""

    timing: dict[str, float]

    def write(self, batch: WriteBatch) -> None:
        started = time.perf_counter()
        super().write(batch)
        self.timing["store.write"] = (
            self.timing.get("store.write", 0.0) + time.perf_counter() - started
        )

    def multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        started = time.perf_counter()
        out = super().multi_get(cf, keys)
        self.timing["read"] = self.timing.get("read", 0.0) + time.perf_counter() - started
        return out


def open_timed_store(path: Path, sync_writes: bool) -> TimedStore:
    store = TimedStore.open(path, sync_writes=sync_writes)
    if not isinstance(store, TimedStore):
        raise IngestBenchError(f"RocksDBPartition.open({path}) did not return the subclass")
    store.timing = {}
    return store


class TimedLoop(ConsumerLoop):
    """The real consumer loop, stopped after ``expected`` records, with stage timers.

    The clock starts when the partitions are assigned (the ``assigned`` attribute is set
    by the loop's rebalance listener) and stops when the batch holding the last record
    has been written and committed.
    """

    def __init__(
        self,
        settings: Settings,
        store: TimedStore,
        processor: Processor,
        expected: int,
        progress: tqdm[Any] | None = None,
    ) -> None:
        self._assigned: set[TopicPartition] = set()
        self.assigned_at: float | None = None
        self.created_at = time.perf_counter()
        super().__init__(settings, store, processor, Metrics())
        self.timed_store = store
        self.expected = expected
        self.finished_at: float | None = None
        self.bootstrap_s = 0.0
        self.progress = progress
        self.timing: dict[str, float] = dict.fromkeys(
            ("poll", "apply", "process", "commit_async", "lag report"), 0.0
        )
        raw_poll = self.consumer.poll
        raw_commit = self.consumer.commit_async

        def poll(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = raw_poll(*args, **kwargs)
            if self.assigned_at is not None and self.finished_at is None:
                self._add("poll", max(started, self.assigned_at))
            return out

        def commit_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = raw_commit(*args, **kwargs)
            self._add("commit_async", started)
            return out

        self.consumer.poll = poll
        self.consumer.commit_async = commit_async

    def _add(self, stage: str, started: float) -> None:
        self.timing[stage] += time.perf_counter() - started

    @property  # type: ignore[override]
    def assigned(self) -> set[TopicPartition]:
        return self._assigned

    @assigned.setter
    def assigned(self, value: set[TopicPartition]) -> None:
        if value and self.assigned_at is None:
            self.assigned_at = time.perf_counter()
        self._assigned = value

    def apply(self, polled: dict[TopicPartition, list[Any]]) -> BatchResult:
        started = time.perf_counter()
        result = super().apply(polled)
        self._add("apply", started)
        coding = getattr(result, "coding", None)
        if coding is not None and getattr(coding, "trained", None):
            self.bootstrap_s += time.perf_counter() - started
        if self.progress is not None:
            self.progress.update(sum(len(r) for r in polled.values()))
        if self.stats.records >= self.expected and self.finished_at is None:
            self.finished_at = time.perf_counter()
            self.stop()
        return result

    def _report_lag(self) -> None:
        started = time.perf_counter()
        super()._report_lag()
        if self.finished_at is None:
            self._add("lag report", started)

    def stage_times(self) -> dict[str, float]:
        if self.assigned_at is None or self.finished_at is None:
            raise IngestBenchError("the run did not finish; no stage times")
        total = self.finished_at - self.assigned_at
        write = self.timed_store.timing.get("store.write", 0.0)
        inner = self.timing["process"] + write + self.timing["commit_async"]
        out = {
            "poll": self.timing["poll"],
            "flatten+metrics": self.timing["apply"] - inner,
            "process": self.timing["process"],
            "store.write": write,
            "commit_async": self.timing["commit_async"],
            "lag report": self.timing["lag report"],
        }
        out["loop rest"] = total - sum(out.values())
        return out


def timed_processor(base: type[Processor]) -> type[Processor]:
    """``base`` with ``process`` timed into ``self.loop_timing['process']``."""

    class Timed(base):  # type: ignore[valid-type,misc]
        loop_timing: dict[str, float]

        def process(self, records: Sequence[SourceRecord]) -> BatchResult:
            started = time.perf_counter()
            out = super().process(records)
            self.loop_timing["process"] += time.perf_counter() - started
            return out

    return Timed


# --------------------------------------------------------------------------------------
# the split of Processor.process (one extra run per workload: per-call timers cost a bit)
# --------------------------------------------------------------------------------------

PROCESS_PARTS = ("parse", "read", "encode", "apply", "codes", "flush", "other")


@contextlib.contextmanager
def process_split(timing: dict[str, float]) -> Iterator[type[Processor]]:
    """A Processor subclass and wrappers that time the parts of ``process``.

    The parse functions and ``_Cache.prefetch``/``flush`` are module-level in the worker, so
    they are wrapped with ``mock.patch`` for the duration of the block (nothing is edited).
    """

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timing[part] += time.perf_counter() - started

        return wrapper

    for part in PROCESS_PARTS:
        timing.setdefault(part, 0.0)
    cache = processor_module._Cache

    class Split(Processor):
        def _encode_items(self, *args: Any, **kwargs: Any) -> list[bytes | None]:
            return timed("encode", super()._encode_items)(*args, **kwargs)  # type: ignore[no-any-return]

        def _apply_item(self, *args: Any, **kwargs: Any) -> None:
            timed("apply", super()._apply_item)(*args, **kwargs)

        def _apply_interaction(self, *args: Any, **kwargs: Any) -> None:
            timed("apply", super()._apply_interaction)(*args, **kwargs)

        def _trim_log(self, *args: Any, **kwargs: Any) -> Any:
            return timed("apply", super()._trim_log)(*args, **kwargs)

        def _assign_codes(self, *args: Any, **kwargs: Any) -> None:
            timed("codes", super()._assign_codes)(*args, **kwargs)

    with (
        mock.patch.object(
            processor_module,
            "parse_interaction",
            timed("parse", processor_module.parse_interaction),
        ),
        mock.patch.object(
            processor_module, "parse_item", timed("parse", processor_module.parse_item)
        ),
        mock.patch.object(cache, "prefetch", timed("read", cache.prefetch)),
        mock.patch.object(cache, "flush", timed("flush", cache.flush)),
    ):
        yield Split


# --------------------------------------------------------------------------------------
# one applied run
# --------------------------------------------------------------------------------------


@dataclass
class AppliedConfig:
    label: str
    sync_writes: bool = True
    encode: Encode | None = None
    processor: type[Processor] = Processor
    loop: type[TimedLoop] = TimedLoop


def measure_applied(
    wl: Workload,
    cfg: AppliedConfig,
    tag: str,
    *,
    initial: Path | None = None,
    keep: Path | None = None,
    profile: cProfile.Profile | None = None,
) -> Run:
    """One run of the real worker over ``wl`` with a fresh group.

    The RocksDB starts empty, or as a copy of the state directory ``initial`` (items
    already applied from another topic set); ``keep`` receives the final state.
    """
    state = Path(tempfile.mkdtemp(prefix="adacode-bench-state-"))
    db = state / "db"
    if initial is not None:
        shutil.copytree(initial, db)
    settings = dataclasses.replace(
        wl.settings,
        kafka_group_id=f"{wl.settings.topic_prefix}g-{uuid.uuid4().hex[:8]}",
        state_dir=str(db),
        sync_writes=cfg.sync_writes,
    )
    store = open_timed_store(db, cfg.sync_writes)
    bar = tqdm(total=wl.records, desc=f"{tag} {wl.name}", unit="rec", leave=False)
    try:
        processor = timed_processor(cfg.processor)(store, settings, cfg.encode)
        loop = cfg.loop(settings, store, processor, wl.records, bar)
        processor.loop_timing = loop.timing  # type: ignore[attr-defined]
        watchdog = threading.Timer(RUN_TIMEOUT_S, loop.stop)
        watchdog.daemon = True
        watchdog.start()
        try:
            if profile is not None:
                profile.runcall(loop.run)
            else:
                loop.run()
        finally:
            watchdog.cancel()
        bar.close()
        if loop.finished_at is None or loop.assigned_at is None:
            raise IngestBenchError(
                f"{cfg.label} on {wl.name} applied {loop.stats.records} of {wl.records} "
                f"records within {RUN_TIMEOUT_S:.0f}s; see the log above for the cause"
            )
        offsets = {tp: off for tp, off in store.offsets().items() if tp[0] in wl.topics}
        if offsets != wl.end or loop.stats.dead or loop.stats.records != wl.records:
            raise IngestBenchError(
                f"{cfg.label} on {wl.name}: stored offsets {offsets} differ from the end "
                f"offsets {wl.end}, or {loop.stats.dead} records were dead-lettered, or "
                f"{loop.stats.records} of {wl.records} were applied; not a valid measurement"
            )
        return Run(
            loop.stats.records,
            loop.finished_at - loop.assigned_at,
            join_s=loop.assigned_at - loop.created_at,
            batches=loop.stats.batches,
            bootstrap_s=loop.bootstrap_s,
            stages=loop.stage_times() | {f"store.{k}": v for k, v in store.timing.items()},
        )
    finally:
        bar.close()
        store.close()
        if keep is not None and db.is_dir():
            shutil.move(db, keep)
        shutil.rmtree(state, ignore_errors=True)


# ======================================================================================
# prototype fixes (measured here; the changes themselves belong in worker/)
# ======================================================================================

#: Which CRC-32C kafka-python uses to check every fetched record batch.
CRC_IMPL = "C (crc32c package)" if kafka_record_util.crc32c_c is not None else "pure Python"


class NoCrcLoop(TimedLoop):
    """The loop with kafka-python's CRC check off: the cost a C CRC-32C would leave (~0)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumer._fetcher.config["check_crcs"] = False


def measure_prototypes(inter: Workload, warm: Path, raw: Row, repeats: int) -> list[Row]:
    """Rows for each prototype fix, against their own raw baseline where it moves."""
    raw_nocrc = Row(inter, "raw, check_crcs=False")
    raw_nocrc.note = "prototype: no CRC check in the baseline either"
    nocrc = Row(inter, "applied, check_crcs=False", raw=raw_nocrc)
    nocrc.note = f"prototype: CRC-32C cost removed (kafka-python uses {CRC_IMPL} CRC here)"
    for i in range(repeats):
        raw_nocrc.runs.append(measure_raw(inter, i, check_crcs=False))
        nocrc.runs.append(
            measure_applied(inter, AppliedConfig(nocrc.path, loop=NoCrcLoop), f"#{i}", initial=warm)
        )
    return [raw_nocrc, nocrc]


# ======================================================================================
# summary, table, JSON, chart
# ======================================================================================


@dataclass
class Row:
    workload: Workload
    path: str
    runs: list[Run] = field(default_factory=list)
    raw: Row | None = None  # the baseline row of the ratio
    note: str = ""

    @property
    def rates(self) -> list[float]:
        return [r.rate for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def ratio(self) -> float | None:
        return None if self.raw is None else self.median / self.raw.median

    def stage_medians(self) -> dict[str, float]:
        keys = [k for k in STAGES if all(k in r.stages for r in self.runs)]
        return {k: statistics.median(r.stages[k] for r in self.runs) for k in keys}

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload.name,
            "path": self.path,
            "records": self.workload.records,
            "rate_median": self.median,
            "rate_min": min(self.rates),
            "rate_max": max(self.rates),
            "ratio_vs_raw": self.ratio,
            "note": self.note,
            "runs": [dataclasses.asdict(r) | {"rate": r.rate} for r in self.runs],
        }


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def render_table(rows: list[Row]) -> str:
    head = (
        f"{'workload':<26}{'path':<34}{'median/s':>11}{'min/s':>11}{'max/s':>11}"
        f"{'ratio':>8}{'join s':>8}{'boot s':>8}{'batches':>8}"
    )
    lines = [head, "-" * len(head)]
    last = ""
    notes: list[str] = []
    for row in rows:
        wl = f"{row.workload.name} ({row.workload.records:,})" if row.workload.name != last else ""
        last = row.workload.name
        ratio = "" if row.ratio is None else f"{row.ratio:.3f}"
        join = statistics.median(r.join_s for r in row.runs)
        boot = statistics.median(r.bootstrap_s for r in row.runs)
        batches = statistics.median(r.batches for r in row.runs)
        path = row.path
        if row.note:
            notes.append(row.note)
            path += f" [{len(notes)}]"
        lines.append(
            f"{wl:<26}{path:<34}{fmt_rate(row.median):>11}{fmt_rate(min(row.rates)):>11}"
            f"{fmt_rate(max(row.rates)):>11}{ratio:>8}{join:>8.2f}{boot:>8.2f}{batches:>8.0f}"
        )
    lines += [f"  [{i}] {note}" for i, note in enumerate(notes, start=1)]
    return "\n".join(lines)


def render_stages(rows: list[Row]) -> str:
    applied = [r for r in rows if r.raw is not None and r.runs and r.runs[0].stages]
    head = f"{'stage (median s, share)':<26}" + "".join(
        f"{r.workload.name[:12] + ' ' + r.path.split(' ', 1)[-1][:13]:>27}" for r in applied
    )
    lines = [head, "-" * len(head)]
    medians = [r.stage_medians() for r in applied]
    totals = [statistics.median(run.seconds for run in r.runs) for r in applied]
    for stage in STAGES:
        cells = []
        for med, total in zip(medians, totals, strict=True):
            v = med.get(stage, 0.0)
            cells.append(f"{v:>10.3f} s {100 * v / total:>5.1f} %     ")
        lines.append(f"{stage:<26}" + "".join(f"{c:>27}" for c in cells))
    dominant = [max(med, key=lambda k: med[k]) for med in medians]
    lines.append(f"{'dominant stage':<26}" + "".join(f"{d:>27}" for d in dominant))
    return "\n".join(lines)


def render_split(splits: dict[str, tuple[dict[str, float], Run]]) -> str:
    head = f"{'Processor.process part':<26}" + "".join(f"{name:>24}" for name in splits)
    lines = [head, "-" * len(head)]
    for part in PROCESS_PARTS:
        cells = []
        for timing, _ in splits.values():
            total = sum(timing[p] for p in PROCESS_PARTS)
            v = timing.get(part, 0.0)
            cells.append(f"{v:.3f} s {100 * v / total if total else 0:5.1f} %")
        lines.append(f"{part:<26}" + "".join(f"{c:>24}" for c in cells))
    cells = [f"{fmt_rate(run.rate)}/s" for _, run in splits.values()]
    lines.append(f"{'rate of the timed run':<26}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def profile_top(profile: cProfile.Profile, n: int) -> tuple[str, list[dict[str, Any]]]:
    buf = io.StringIO()
    stats = pstats.Stats(profile, stream=buf)
    stats.sort_stats("tottime").print_stats(60)
    entries = []
    raw_stats: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw_stats.values())
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in sorted(
        raw_stats.items(), key=lambda kv: -kv[1][2]
    )[:n]:
        short = filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
        entries.append(
            {
                "function": f"{short}:{line}({name})",
                "calls": ncalls,
                "tottime": tottime,
                "cumtime": cumtime,
                "share": tottime / total if total else 0.0,
            }
        )
    return buf.getvalue(), entries


def render_profile(entries: list[dict[str, Any]]) -> str:
    head = f"{'tottime s':>10}{'share':>8}{'calls':>10}  function"
    lines = [head, "-" * 90]
    for e in entries:
        lines.append(
            f"{e['tottime']:>10.3f}{100 * e['share']:>7.1f}%{e['calls']:>10}  {e['function'][-70:]}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r.workload.name}\n{r.path}" for r in rows]
    med = np.array([r.median for r in rows])
    lo = med - np.array([min(r.rates) for r in rows])
    hi = np.array([max(r.rates) for r in rows]) - med
    colours = ["#888888" if r.raw is None else "#1f77b4" for r in rows]
    y = np.arange(len(rows))[::-1]
    ax1.barh(y, med, xerr=[lo, hi], color=colours, capsize=3)
    ax1.set_yticks(y, labels, fontsize=7)
    ax1.set_xscale("log")
    ax1.set_xlabel("records/s (median, min-max whiskers; grey = raw kafka-python)")
    ax1.axvline(GOAL_APPLIED_PER_S, color="red", ls="--", lw=1, label="goal 20k interactions/s")
    for yi, r in zip(y, rows, strict=True):
        if r.ratio is not None:
            ax1.text(r.median * 1.05, yi, f"{r.ratio:.2f}x raw", va="center", fontsize=7)
    ax1.legend(fontsize=7)
    ax1.set_title("ingest rate: applied (worker) vs raw consume")
    applied = [r for r in rows if r.raw is not None and r.runs[0].stages]
    bottom = np.zeros(len(applied))
    for stage in STAGES:
        shares = np.array(
            [
                r.stage_medians().get(stage, 0.0) / statistics.median(run.seconds for run in r.runs)
                for r in applied
            ]
        )
        ax2.bar(np.arange(len(applied)), shares, bottom=bottom, label=stage)
        bottom += shares
    ax2.set_xticks(
        np.arange(len(applied)),
        [f"{r.workload.name}\n{r.path.replace('applied ', '')}" for r in applied],
        fontsize=6,
        rotation=30,
        ha="right",
    )
    ax2.set_ylabel("share of applied wall time")
    ax2.set_title("where the applied time goes")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ======================================================================================
# main
# ======================================================================================


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--bootstrap", help="HOST:PORT of a running broker (default: start one)")
    parser.add_argument("--interactions", type=int, default=200_000, help="interaction events")
    parser.add_argument("--items", type=int, default=20_000, help="items with embeddings")
    parser.add_argument("--text-items", type=int, default=2_000, help="items with text (MiniLM)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the split and cProfile runs"
    )
    args = parser.parse_args(argv)
    for name in ("interactions", "items", "text_items", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_encoder(threads: int) -> tuple[TextEncoder, float]:
    encoder = TextEncoder(batch_size=Settings().text_batch_size, threads=threads)
    started = time.perf_counter()
    encoder.encode(["warm-up: load the model"])
    return encoder, time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wall = time.perf_counter()
    load_before = os.getloadavg()
    base = Settings(kafka_client_id="adacode-bench", http_port=0, kafka_session_timeout_ms=6000)
    rows: list[Row] = []
    splits: dict[str, tuple[dict[str, float], Run]] = {}
    profile_entries: list[dict[str, Any]] = []
    model_load: dict[str, float] = {}
    with broker(args.bootstrap) as bootstrap, tempfile.TemporaryDirectory() as scratch:
        print(f"broker {bootstrap}; producing workloads", flush=True)
        cat = make_catalogue(args.items, args.seed)
        emb = make_workload(bootstrap, base, "items+embedding", "items", embedding_item_events(cat))
        inter = make_workload(
            bootstrap,
            base,
            "interactions",
            "interactions",
            interaction_events(args.interactions, cat, args.seed),
        )
        text = make_workload(
            bootstrap, base, "items+text", "items", text_item_events(args.text_items, args.seed)
        )
        warm = Path(scratch) / "warm"  # the state after the catalogue: items coded

        # -- items with embeddings, fresh state (the codebook bootstrap is part of it) -----
        raws: dict[str, Row] = {}
        for wl, initial in ((emb, None), (inter, warm)):
            raw = raws[wl.name] = Row(wl, "raw kafka-python")
            synced = Row(wl, "applied sync_writes=True", raw=raw)
            unsynced = Row(wl, "applied sync_writes=False", raw=raw)
            for i in range(args.repeats):
                raw.runs.append(measure_raw(wl, i))
                keep = warm if wl is emb and i == 0 else None
                synced.runs.append(
                    measure_applied(
                        wl, AppliedConfig(synced.path), f"#{i}", initial=initial, keep=keep
                    )
                )
                unsynced.runs.append(
                    measure_applied(
                        wl, AppliedConfig(unsynced.path, False), f"#{i}", initial=initial
                    )
                )
            rows += [raw, synced, unsynced]
        cold = Row(inter, "applied, empty state", raw=raws[inter.name])
        cold.note = "no catalogue: every item is a placeholder, no codebook"
        for i in range(args.repeats):
            cold.runs.append(measure_applied(inter, AppliedConfig(cold.path), f"#{i}"))
        rows.append(cold)

        # -- text items through MiniLM, on the warm state ------------------------------
        raw = raws[text.name] = Row(text, "raw kafka-python")
        for i in range(args.repeats):
            raw.runs.append(measure_raw(text, i))
        rows.append(raw)
        encoders: dict[int, TextEncoder] = {}
        for threads in (1, 2):
            encoder, load_s = load_encoder(threads)
            encoders[threads] = encoder
            model_load[f"torch_threads={threads}"] = load_s
            row = Row(text, f"applied MiniLM torch_threads={threads}", raw=raw)
            row.note = f"model load {load_s:.1f} s excluded"
            cfg = AppliedConfig(row.path, encode=encoder.encode)
            for i in range(args.repeats):
                row.runs.append(measure_applied(text, cfg, f"#{i}", initial=warm))
            rows.append(row)

        # -- prototype fixes, measured on the same topics ------------------------------
        rows += measure_prototypes(inter, warm, raws[inter.name], args.repeats)

        # -- split of Processor.process and cProfile -----------------------------------
        if not args.no_profile:
            for wl, enc, initial, label in (
                (inter, None, warm, "interactions"),
                (emb, None, None, "items+embedding"),
                (text, encoders[2].encode, warm, "items+text (2 thr)"),
            ):
                timing: dict[str, float] = {}
                with process_split(timing) as split_cls:
                    run = measure_applied(
                        wl,
                        AppliedConfig("split", encode=enc, processor=split_cls),
                        "split",
                        initial=initial,
                    )
                timing["other"] = run.stages["process"] - sum(
                    v for k, v in timing.items() if k != "other"
                )
                splits[label] = (timing, run)
            profile = cProfile.Profile()
            prun = measure_applied(
                inter, AppliedConfig("cProfile"), "cProfile", initial=warm, profile=profile
            )
            text_report, profile_entries = profile_top(profile, 15)
            out_path("ingest_profile.txt").write_text(
                f"cProfile of the applied interactions run ({prun.rate:,.0f} records/s "
                f"under the profiler)\n\n{text_report}"
            )

    load_after = os.getloadavg()
    elapsed = time.perf_counter() - wall
    table = render_table(rows)
    print()
    print(
        f"Ingest benchmark: {args.interactions:,} interactions, {args.items:,} items with "
        f"embeddings, {args.text_items:,} items with text; {PARTITIONS} partitions; "
        f"{args.repeats} repeats (median, min, max); {os.cpu_count()} cores; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(f"kafka-python {kafka.__version__}, CRC-32C check of fetched batches: {CRC_IMPL}")
    print(
        f"payload sizes: interactions {inter.payload_bytes:.0f} B, items+embedding "
        f"{emb.payload_bytes:.0f} B, items+text {text.payload_bytes:.0f} B"
    )
    print(
        "ratio = applied median / raw median on the same topics; join s = group join "
        "(excluded from the rate)"
    )
    print(table)
    print("model load (excluded): " + ", ".join(f"{k} {v:.1f} s" for k, v in model_load.items()))
    print()
    print("Stage breakdown of the applied runs (median seconds over repeats, share of the run)")
    print(render_stages(rows))
    if splits:
        print()
        print("Split of Processor.process (one extra run each, per-call timers included)")
        print(render_split(splits))
    if profile_entries:
        print()
        print(
            "cProfile, applied interactions (top 15 by own time; full: bench/out/ingest_profile.txt)"
        )
        print(render_profile(profile_entries))

    inter_row = next(r for r in rows if r.workload is inter and r.path.endswith("=True"))
    goals = {
        "applied_interactions_per_s": inter_row.median,
        "goal_applied_per_s": GOAL_APPLIED_PER_S,
        "ratio": inter_row.ratio,
        "goal_ratio": GOAL_RATIO,
        "rate_met": inter_row.median >= GOAL_APPLIED_PER_S,
        "ratio_met": (inter_row.ratio or 0.0) >= GOAL_RATIO,
    }
    print()
    print(
        f"Goals (interactions, sync_writes=True): {fmt_rate(inter_row.median)}/s applied "
        f"(goal {fmt_rate(GOAL_APPLIED_PER_S)}: {'met' if goals['rate_met'] else 'MISSED'}), "
        f"ratio {inter_row.ratio:.3f} (goal {GOAL_RATIO}: "
        f"{'met' if goals['ratio_met'] else 'MISSED'})"
    )
    print(f"total wall time {elapsed:.0f} s")

    result = {
        "args": vars(args),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "payload_bytes": {wl.name: wl.payload_bytes for wl in (inter, emb, text)},
        "rows": [r.to_json() for r in rows],
        "stages": {
            f"{r.workload.name} | {r.path}": r.stage_medians() for r in rows if r.raw is not None
        },
        "process_split": {k: {"seconds": t, "rate": run.rate} for k, (t, run) in splits.items()},
        "model_load_s": model_load,
        "profile_top": profile_entries,
        "goals": goals,
        "wall_s": elapsed,
    }
    out_path("ingest.json").write_text(json.dumps(result, indent=2, default=str))
    plot(rows, out_path("ingest.png"))
    print("wrote bench/out/ingest.json, bench/out/ingest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
