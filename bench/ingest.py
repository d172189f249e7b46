"""Ingest throughput of the worker: the daemon against its Quix Streams peer, and the stages.

One command::

    python bench/ingest.py [--bootstrap HOST:PORT] [--interactions N] [--items N]
                           [--text-items M] [--repeats R] [--embedding-repeats R]
                           [--headline-only] [--daemon-items N] [--daemon-users U]

**Headline** (issue 12): the ``adacode run`` process itself (``WorkerProcess``, fresh group and
RocksDB per run, scheduled fine-tunes off, code rounds on) on a realistic mix on one topic
set: ``--daemon-items`` items with embeddings over the five ``DOMAINS``, then the
``--interactions`` interactions of ``--daemon-users`` users; timed at its ``/metrics`` from
the first applied interaction to the last. Its **peer row**, measured in the same run on the
same interaction topic and interleaved with it: a Quix Streams application
(``bench/quix_peer.py``, in its own process) keeping per-item counts and per-user last 50
items in its RocksDB state with the exactly-once guarantee. Quix Streams is an optional
bench extra (``pip install '.[bench]'``, or ``.venv/bin/pip install quixstreams``); without
it the peer row says "not measured" and why. The headline ratio is daemon/peer (goal: 2x at
the scale of bench/scale.py); the issue-5 goals against raw kafka-python below are kept as
figures but withdrawn as goals. Beside them, three **bounds** on a copy of the mix's
interactions (the same events on an interactions-only topic set), measured in this process
in the same repeats: raw kafka-python (decoding only), the *floor* worker
(:class:`FloorProcessor`: the real loop, each interaction parsed and put once, no state) and
the peer's own state work done by the worker's loop on kafka-python
(:class:`PeerWorkProcessor`). They say how far the ratio against the peer can go with
kafka-python, the design card's client. ``--headline-only`` runs just these rows
(``bench/out/ingest_headline.json`` and ``.png``).

The rows below the headline measure the worker's parts in this process:

Without ``--bootstrap`` it starts its own broker (``ops/kafka.sh up`` on free ports, data in a
temporary directory) and stops it at the end (``ops/kafka.sh down``, same flags). Three
workloads go to fresh topic sets (unique prefix, ``create_topics(settings, partitions=3)``):

* ``items+embedding``: the catalogue, N item events with a ready 384-float embedding
  (``item_payload`` of float32 values: ~8 KB of JSON), a few domains as keys;
* ``interactions``: N interaction events (~100-byte JSON, the domain as key) with Zipf
  popularity over the catalogue's items, time-ordered;
* ``items+text``: M item events with a short product-like title and no embedding.

Measured on the same topics, with a fresh consumer group and a fresh RocksDB every run
(median, min, max over ``--repeats``):

* raw: a group-less ``KafkaConsumer`` (assign + seek_to_beginning, ``poll(max_records=5000)``,
  the worker's fetch sizes) counting records until all are consumed, values untouched;
* applied: the real worker, ``ConsumerLoop`` + ``Processor`` + ``RocksDBPartition`` in a temp
  dir, from the partition assignment (the group join is excluded and reported) to the write
  and commit of the batch holding the last record. Items+embedding start from an empty state
  (the codebook bootstrap is part of it; the first run's state is kept as the *catalogue
  state*); interactions and text items start from a copy of the catalogue state, so their
  items exist and are coded, as in steady operation. Interactions run with ``sync_writes``
  True and False, and once on an empty state; text items with ``TextEncoder`` at 1 and 2
  torch threads (model load excluded, reported).

The headline is applied/raw; ``cpu/s`` (records per CPU second of this process) sits beside
the wall rates because the machine is shared. Every applied run keeps a stage breakdown
(poll, process and its read/MiniLM/codes parts, store.write, commit, lag report) timed around
the loop's calls by subclasses and wrappers: the worker is not edited. One extra run splits
``Processor.process`` per record (parse, read, encode, apply, codes, flush) and counts the
bytes put per column family; one cProfile run lists the hottest functions.

Prototype fixes, measured on the same topics (``--prototype-repeats`` runs each): the CRC
check off in the raw baseline and in the worker (what a C CRC-32C leaves of kafka-python's
pure-Python one: ~0), then also ``poll_max_records=20000``. ``--codes-scaling 5000,20000,80000``
adds an offline measurement of the codes step against the catalogue size.

Writes ``bench/out/ingest.json``, ``bench/out/ingest.png`` and ``bench/out/ingest_profile.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import io
import json
import logging
import math
import os
import platform
import pstats
import re
import shutil
import statistics
import struct
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

import worker.ingest.processor as processor_module
from adacode.errors import AdacodeError
from bench.broker import broker, free_port
from bench.common import out_path, proc_cpu_s, scrape_metrics, worker_env
from store.partition import WriteBatch
from store.rocksdb import RocksDBPartition, RocksDBWriteBatch
from worker.commands.launch import WorkerProcess
from worker.commands.topics import create_topics
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.ingest.consumer import ConsumerLoop
from worker.ingest.encoder import TextEncoder
from worker.ingest.events import (
    interaction_payload,
    item_payload,
    parse_interactions,
)
from worker.ingest.processor import BatchResult, Encode, Processor, Record, SourceRecord
from worker.state.layout import ASSIGNER_PREFIX

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 3
POLL_MAX_RECORDS = 5000
BIG_POLL = 20_000  # prototype: larger batches amortize the per-batch costs (codes, fsync)
FETCH_MAX_BYTES = 64 * 1024 * 1024  # the worker's fetch sizes (worker/ingest/consumer.py)
MAX_PARTITION_FETCH_BYTES = 16 * 1024 * 1024
DIM = 384
ZIPF_EXPONENT = 1.0
#: A few domains with skewed traffic; they are the message keys (as in production).
DOMAINS = ("books", "movies", "music", "games", "office")
DOMAIN_WEIGHTS = (0.40, 0.25, 0.15, 0.12, 0.08)
BASE_TS = 1_700_000_000_000
RUN_TIMEOUT_S = 300.0
GOAL_APPLIED_PER_S = 50_000.0  # issue 5
GOAL_RATIO = 0.7

log = logging.getLogger("bench.ingest")


class IngestBenchError(AdacodeError):
    """The ingest benchmark could not start its broker, produce, or finish a run."""


class StalledRunError(IngestBenchError):
    """An applied run did not get through its records within ``RUN_TIMEOUT_S``."""


# ======================================================================================
# broker
# ======================================================================================


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


def interaction_events(n: int, cat: Catalogue, seed: int, n_users: int = 0) -> list[Event]:
    """``n`` interactions with catalogue items: Zipf item popularity, time-ordered, from
    ``n_users`` users (0: ``n // 10``)."""
    rng = np.random.default_rng(seed + 1)
    n_items = len(cat.item_ids)
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    p = ranks**-ZIPF_EXPONENT
    by_rank = rng.permutation(n_items)  # popularity rank -> item index
    items = by_rank[rng.choice(n_items, size=n, p=p / p.sum())]
    users = rng.integers(0, n_users or max(1, n // 10), size=n)
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
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, client_id="adacode-bench", enable_auto_commit=False
    )
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
    # a topic name takes ASCII alphanumerics, '.', '_' and '-' only
    prefix = f"bench-ingest-{uuid.uuid4().hex[:8]}-{re.sub(r'[^A-Za-z0-9._-]', '-', name)}."
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
    seconds: float  # wall time of the measured window
    cpu_s: float  # CPU time of this process (all its threads) in that window
    join_s: float = 0.0
    batches: int = 0
    bootstrap_s: float = 0.0  # apply time of the batch that trained the codebook, if any
    stages: dict[str, float] = field(default_factory=dict)
    stalls: int = 0  # runs before this one that stalled and were repeated

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else math.inf

    @property
    def cpu_rate(self) -> float:
        return self.records / self.cpu_s if self.cpu_s > 0 else math.inf


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
        started, cpu = time.perf_counter(), time.process_time()
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
        seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
        bar.close()
    finally:
        consumer.close()
    return Run(count, seconds, cpu_s, batches=batches)


#: Stages of an applied run; they add up to its wall time.
STAGES = (
    "poll",  # kafka-python: fetch responses, CRC check, decode record batches
    "flatten+metrics",  # ConsumerLoop.apply minus the parts below
    "process",  # Processor.process: parse, read, encode, apply in memory, codes, build batch
    "store.write",  # RocksDB write of the batch (fsync'd WAL with sync_writes)
    "commit_async",  # Kafka offset commit (monitoring only)
    "lag report",  # ConsumerLoop._report_lag after every poll
    "loop rest",  # the remainder of the run loop
)
#: Parts of "process" timed in every run (per batch, so at no measurable cost).
SUB_STAGES = ("process: read", "process: MiniLM", "process: codes")


class CountingBatch(RocksDBWriteBatch):
    """A RocksDB write batch that counts the bytes put per column family."""

    def __init__(self, owner: RocksDBPartition, counts: dict[str, int]) -> None:
        super().__init__(owner)
        self.counts = counts

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self.counts[cf] = self.counts.get(cf, 0) + len(key) + len(value)
        super().put(cf, key, value)


class TimedStore(RocksDBPartition):
    """The real RocksDB partition; times ``write`` and ``multi_get``, can count bytes."""

    timing: dict[str, float]
    bytes_put: dict[str, int] | None = None

    def batch(self) -> RocksDBWriteBatch:
        if self.bytes_put is None:
            return super().batch()
        return CountingBatch(self, self.bytes_put)

    def write(self, batch: WriteBatch, *, durable: bool = True) -> None:
        started = time.perf_counter()
        super().write(batch, durable=durable)
        self._add("store.write", started)

    def multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        started = time.perf_counter()
        out = super().multi_get(cf, keys)
        self._add("process: read", started)
        return out

    def _add(self, stage: str, started: float) -> None:
        self.timing[stage] = self.timing.get(stage, 0.0) + time.perf_counter() - started


def open_timed_store(path: Path, sync_writes: bool, *, count_bytes: bool = False) -> TimedStore:
    store = TimedStore.open(path, sync_writes=sync_writes)
    if not isinstance(store, TimedStore):
        raise IngestBenchError(f"RocksDBPartition.open({path}) did not return the subclass")
    store.timing = {}
    store.bytes_put = {} if count_bytes else None
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
        *,
        check_crcs: bool = True,
    ) -> None:
        self._assigned: set[TopicPartition] = set()
        self.assigned_at: float | None = None
        self.assigned_cpu = 0.0
        self.created_at = time.perf_counter()
        super().__init__(settings, store, processor, Metrics())
        self.timed_store = store
        self.expected = expected
        self.finished_at: float | None = None
        self.finished_cpu = 0.0
        self.bootstrap_s = 0.0
        self.progress = progress
        self.timing: dict[str, float] = dict.fromkeys(
            ("poll", "apply", "process", "commit_async", "lag report", "process: MiniLM"), 0.0
        )
        self.timing["process: codes"] = 0.0
        self.check_crcs = check_crcs

    def _connect(self) -> None:
        """The loop's clients (made when it runs), with the consumer's poll and commit timed."""
        super()._connect()
        if not self.check_crcs:  # prototype: what a C CRC-32C leaves of the CRC cost (~0)
            self.consumer._fetcher.config["check_crcs"] = False
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

        self.consumer.poll = poll  # type: ignore[method-assign]
        self.consumer.commit_async = commit_async  # type: ignore[method-assign]

    def _add(self, stage: str, started: float) -> None:
        self.timing[stage] += time.perf_counter() - started

    @property  # type: ignore[override]
    def assigned(self) -> set[TopicPartition]:
        return self._assigned

    @assigned.setter
    def assigned(self, value: set[TopicPartition]) -> None:
        if value and self.assigned_at is None:
            self.assigned_at = time.perf_counter()
            self.assigned_cpu = time.process_time()
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
            self.finished_cpu = time.process_time()
            self.stop()
        return result

    def _report_lag(self) -> None:
        started = time.perf_counter()
        super()._report_lag()
        if self.finished_at is None:
            self._add("lag report", started)

    def run_stats(self) -> tuple[float, float, dict[str, float]]:
        """Wall seconds, CPU seconds and the stage times of the measured window."""
        if self.assigned_at is None or self.finished_at is None:
            raise IngestBenchError("the run did not finish; no stage times")
        total = self.finished_at - self.assigned_at
        store = self.timed_store.timing
        write = store.get("store.write", 0.0)
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
        out["process: read"] = store.get("process: read", 0.0)
        out["process: MiniLM"] = self.timing["process: MiniLM"]
        out["process: codes"] = self.timing["process: codes"]
        return total, self.finished_cpu - self.assigned_cpu, out


class FloorProcessor(Processor):
    """The least a worker that keeps every interaction durably can do per batch: parse and
    check the batch (:func:`~worker.ingest.events.parse_interactions`), put each valid event's raw
    bytes under its ``(partition, offset)`` and the next offsets, in one write. No
    popularity, no per-user index, no codes: the *floor* row bounds what any state on top of
    kafka-python's decoding can reach (interactions only)."""

    def process(self, records: Sequence[Record]) -> BatchResult:
        result = BatchResult(batch=self.store.batch())
        values = [r.value for r in records]
        inter = parse_interactions(values, self.limits)
        pack = _FLOOR_KEY.pack
        put = result.batch.put
        for k in inter.index:
            rec = records[k]
            put("interactions", pack(rec.partition, rec.offset), values[k])  # type: ignore[arg-type]
        _set_next_offsets(records, result.batch)
        result.applied["interaction", "all"] += len(inter)
        return result


_FLOOR_KEY = struct.Struct(">iq")


def _set_next_offsets(records: Sequence[Record], batch: WriteBatch) -> None:
    """The next offset of each partition of ``records``, into ``batch``."""
    next_offsets: dict[tuple[str, int], int] = {}
    for rec in records:
        next_offsets[rec.topic, rec.partition] = rec.offset + 1
    for (topic, partition), offset in sorted(next_offsets.items()):
        batch.set_offset(topic, partition, offset)


class PeerWorkProcessor(Processor):
    """The Quix Streams peer's state work (``bench/quix_peer.py``) in the worker's loop, as
    lean as Python makes it: per batch, each item's interaction count and each user's last
    ``PEER_RECENT`` items are read (one multi-get each), updated in dicts and put once, with
    the next offsets, in one write. No log, no popularity decay, no codes: a bound on what a
    kafka-python worker doing the peer's work can reach (interactions only)."""

    def process(self, records: Sequence[Record]) -> BatchResult:
        result = BatchResult(batch=self.store.batch())
        inter = parse_interactions([r.value for r in records], self.limits)
        counts: dict[bytes, int] = {}
        recent: dict[bytes, list[str]] = {}
        for domain, user, item in zip(inter.domains, inter.user_ids, inter.item_ids, strict=True):
            ikey = f"{domain}\0{item}".encode()
            counts[ikey] = counts.get(ikey, 0) + 1
            recent.setdefault(f"{domain}\0{user}".encode(), []).append(item)
        ikeys, ukeys = list(counts), list(recent)
        put = result.batch.put
        for key, raw in zip(ikeys, self.store.multi_get("popularity", ikeys), strict=True):
            put("popularity", key, _PEER_COUNT.pack(counts[key] + _peer_count(raw)))
        for key, raw in zip(ukeys, self.store.multi_get("users", ukeys), strict=True):
            items = (raw.decode().split("\n") if raw else []) + recent[key]
            put("users", key, "\n".join(items[-PEER_RECENT:]).encode())
        _set_next_offsets(records, result.batch)
        result.applied["interaction", "all"] += len(inter)
        return result


#: the recent items the peer keeps per user (bench/quix_peer.py)
PEER_RECENT = 50
_PEER_COUNT = struct.Struct(">q")


def _peer_count(raw: bytes | None) -> int:
    return 0 if raw is None else int(_PEER_COUNT.unpack(raw)[0])


def timed_processor(base: type[Processor], timing: dict[str, float]) -> type[Processor]:
    """``base`` with ``process`` and its per-batch ``_assign_codes`` timed into ``timing``."""

    class Timed(base):  # type: ignore[valid-type,misc]
        def process(self, records: Sequence[SourceRecord]) -> BatchResult:
            started = time.perf_counter()
            out = super().process(records)
            timing["process"] += time.perf_counter() - started
            return out

        def _assign_codes(self, *args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            super()._assign_codes(*args, **kwargs)
            timing["process: codes"] += time.perf_counter() - started

    return Timed


def timed_encode(encode: Encode, timing: dict[str, float]) -> Encode:
    def run(texts: list[str]) -> np.ndarray:
        started = time.perf_counter()
        out = encode(texts)
        timing["process: MiniLM"] += time.perf_counter() - started
        return out

    return run


# --------------------------------------------------------------------------------------
# the split of Processor.process (one extra run: its per-record timers cost a little)
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

        def _apply_item(self, *args: Any, **kwargs: Any) -> Any:
            return timed("apply", super()._apply_item)(*args, **kwargs)

        def _apply_interactions(self, *args: Any, **kwargs: Any) -> None:
            timed("apply", super()._apply_interactions)(*args, **kwargs)

        def _trim_log(self, *args: Any, **kwargs: Any) -> Any:
            return timed("apply", super()._trim_log)(*args, **kwargs)

        def _assign_codes(self, *args: Any, **kwargs: Any) -> None:
            timed("codes", super()._assign_codes)(*args, **kwargs)

    with (
        mock.patch.object(
            processor_module,
            "parse_interactions",
            timed("parse", processor_module.parse_interactions),
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
    check_crcs: bool = True
    poll_max_records: int = POLL_MAX_RECORDS


def measure_applied(wl: Workload, cfg: AppliedConfig, tag: str, **kwargs: Any) -> Run:
    """:func:`measure_applied_once`, repeated once (and counted in ``Run.stalls``) if it stalls.

    A stall is a run that applied nothing within ``RUN_TIMEOUT_S``; it was seen once on this
    shared 2-core machine under heavy load, with no error from the worker or the broker.
    """
    try:
        return measure_applied_once(wl, cfg, tag, **kwargs)
    except StalledRunError as exc:
        print(f"warning: {exc}; repeating the run once", file=sys.stderr, flush=True)
    run = measure_applied_once(wl, cfg, tag, **kwargs)
    run.stalls += 1
    return run


def measure_applied_once(
    wl: Workload,
    cfg: AppliedConfig,
    tag: str,
    *,
    initial: Path | None = None,
    keep: Path | None = None,
    profile: cProfile.Profile | None = None,
    limit: int | None = None,
    bytes_put: dict[str, int] | None = None,
) -> Run:
    """One run of the real worker over ``wl`` with a fresh group.

    The RocksDB starts empty, or as a copy of the state directory ``initial`` (items
    already applied from another topic set); ``keep`` receives the final state. ``limit``
    stops after that many records (the profiled run); ``bytes_put`` collects the bytes put
    per column family.
    """
    expected = min(limit or wl.records, wl.records)
    state = Path(tempfile.mkdtemp(prefix="adacode-bench-state-"))
    db = state / "db"
    if initial is not None:
        shutil.copytree(initial, db)
    settings = dataclasses.replace(
        wl.settings,
        kafka_group_id=f"{wl.settings.topic_prefix}g-{uuid.uuid4().hex[:8]}",
        state_dir=str(db),
        sync_writes=cfg.sync_writes,
        poll_max_records=cfg.poll_max_records,
    )
    store = open_timed_store(db, cfg.sync_writes, count_bytes=bytes_put is not None)
    succeeded = False
    bar = tqdm(total=expected, desc=f"{tag} {wl.name}", unit="rec", leave=False)
    try:
        timing: dict[str, float] = {}
        processor_cls = timed_processor(cfg.processor, timing)
        encode = None if cfg.encode is None else timed_encode(cfg.encode, timing)
        processor = processor_cls(store, settings, encode)
        loop = cfg.loop(settings, store, processor, expected, bar, check_crcs=cfg.check_crcs)
        timing.update(loop.timing)
        loop.timing = timing
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
            where = (
                "the consumer group join never completed"
                if loop.assigned_at is None
                else f"{loop.stats.batches} batches were applied after the assignment"
            )
            raise StalledRunError(
                f"{cfg.label} on {wl.name} applied {loop.stats.records} of {expected} records "
                f"within {RUN_TIMEOUT_S:.0f}s ({where}); check the broker log and the machine "
                "load, or rerun"
            )
        offsets = {tp: off for tp, off in store.offsets().items() if tp[0] in wl.topics}
        complete = expected == wl.records
        if loop.stats.dead or (complete and (offsets != wl.end or loop.stats.records != expected)):
            raise IngestBenchError(
                f"{cfg.label} on {wl.name}: stored offsets {offsets} differ from the end "
                f"offsets {wl.end}, or {loop.stats.dead} records were dead-lettered, or "
                f"{loop.stats.records} of {expected} were applied; not a valid measurement"
            )
        if bytes_put is not None and store.bytes_put is not None:
            bytes_put.update(store.bytes_put)
        seconds, cpu_s, stages = loop.run_stats()
        succeeded = True
        return Run(
            loop.stats.records,
            seconds,
            cpu_s,
            join_s=loop.assigned_at - loop.created_at,
            batches=loop.stats.batches,
            bootstrap_s=loop.bootstrap_s,
            stages=stages,
        )
    finally:
        bar.close()
        store.close()
        if succeeded and keep is not None and db.is_dir():
            shutil.move(db, keep)
        shutil.rmtree(state, ignore_errors=True)


# ======================================================================================
# prototype fixes (measured here; the changes themselves belong in worker/ and store/)
# ======================================================================================

#: Which CRC-32C kafka-python uses to check every fetched record batch.
CRC_IMPL = "C (crc32c package)" if kafka_record_util.crc32c_c is not None else "pure Python"


@dataclass
class CodesScaling:
    """Offline cost of the codes step on interactions, for one catalogue size."""

    items: int
    process_us: float  # Processor.process, wall microseconds per interaction
    codes_us: float  # of which Processor._assign_codes
    codes_state_bytes: float  # bytes put per interaction: assigner states (codes cf)
    codes_history_bytes: float  # bytes put per interaction: code history (codes cf)
    interaction_bytes: float  # bytes put per interaction: the interaction log


def codes_scaling(n_items: int, n_interactions: int, seed: int) -> CodesScaling:
    """Apply a catalogue of ``n_items`` offline, then interactions in batches of 5000."""
    settings = Settings(topic_prefix="scaling.", http_port=0)
    cat = make_catalogue(n_items, seed)
    with tempfile.TemporaryDirectory(prefix="adacode-bench-scaling-") as tmp:
        db = Path(tmp) / "db"
        store = open_timed_store(db, False)
        try:
            settings = dataclasses.replace(settings, state_dir=str(db))
            processor = Processor(store, settings, None)
            events = embedding_item_events(cat)
            records = [SourceRecord("scaling.items", 0, i, k, v) for i, (k, v) in enumerate(events)]
            del events
            for start in tqdm(
                range(0, len(records), POLL_MAX_RECORDS), desc=f"catalogue {n_items}", leave=False
            ):
                store.write(processor.process(records[start : start + POLL_MAX_RECORDS]).batch)
            del records
            counts: dict[str, int] = {}

            class ByPrefix(CountingBatch):
                def put(self, cf: str, key: bytes, value: bytes) -> None:
                    if cf == "codes":
                        kind = "state" if key.startswith(ASSIGNER_PREFIX) else "hist"
                        tag = f"codes:{kind}"
                        counts[tag] = counts.get(tag, 0) + len(key) + len(value)
                    super().put(cf, key, value)

            store.bytes_put = {}
            timing = {"process": 0.0, "process: codes": 0.0}
            timed = timed_processor(Processor, timing)(store, settings, None)
            inter = interaction_events(n_interactions, cat, seed)
            records = [
                SourceRecord("scaling.interactions", 0, i, k, v) for i, (k, v) in enumerate(inter)
            ]
            for start in range(0, len(records), POLL_MAX_RECORDS):
                batch = ByPrefix(store, store.bytes_put)
                chunk = records[start : start + POLL_MAX_RECORDS]
                with mock.patch.object(store, "batch", return_value=batch):
                    result = timed.process(chunk)
                store.write(result.batch)
            n = max(1, len(records))
            return CodesScaling(
                n_items,
                1e6 * timing["process"] / n,
                1e6 * timing["process: codes"] / n,
                counts.get("codes:state", 0) / n,
                counts.get("codes:hist", 0) / n,
                store.bytes_put.get("interactions", 0) / n,
            )
        finally:
            store.close()


# ======================================================================================
# headline: the daemon itself (adacode run) on a realistic mix, and its Quix Streams peer
# ======================================================================================

HEADLINE_POLL_S = 0.5
QUIX_PEER = Path(__file__).resolve().parent / "quix_peer.py"
GOAL_DAEMON_VS_PEER = 2.0  # issue 12


def make_mix_workload(
    bootstrap: str, base: Settings, cat: Catalogue, interactions: Sequence[Event]
) -> Workload:
    """The realistic mix on one topic set: the catalogue (items with embeddings in every
    domain of ``DOMAINS``), then the interactions of many users."""
    prefix = f"bench-ingest-{uuid.uuid4().hex[:8]}-mix."
    settings = dataclasses.replace(base, kafka_bootstrap=bootstrap, topic_prefix=prefix)
    create_topics(settings, partitions=PARTITIONS)
    produce(bootstrap, settings.topic("items"), embedding_item_events(cat))
    produce(bootstrap, settings.topic("interactions"), interactions)
    wl = Workload("daemon mix", settings, len(interactions))
    wl.partitions, wl.end = partitions_and_ends(bootstrap, wl.topics)
    if sum(wl.end.values()) != len(cat.item_ids) + len(interactions):
        raise IngestBenchError(
            f"topics {wl.topics} hold {sum(wl.end.values())} records after producing "
            f"{len(cat.item_ids) + len(interactions)}; the broker lost or duplicated records"
        )
    wl.payload_bytes = float(np.mean([len(v) for _, v in interactions])) if interactions else 0.0
    return wl


def measure_daemon(wl: Workload, tag: str) -> Run:
    """One run of ``adacode run`` (a subprocess, as users run it; fresh group and RocksDB)
    over the mix: from the first applied interaction to the last, as seen by ``/metrics``
    polls every ``HEADLINE_POLL_S`` (each end at the middle of its poll interval, so within
    a quarter second); ``cpu_s`` is the worker process's, ``join_s`` its start to the first
    applied interaction (start-up, group join and the catalogue's items)."""
    state = Path(tempfile.mkdtemp(prefix="adacode-bench-daemon-"))
    port = free_port()
    settings: dict[str, object] = {
        "kafka_bootstrap": wl.settings.kafka_bootstrap,
        "topic_prefix": wl.settings.topic_prefix,
        "kafka_group_id": f"{wl.settings.topic_prefix}g-{uuid.uuid4().hex[:8]}",
        "state_dir": str(state / "db"),
        "http_port": port,
        "embedding_dim": DIM,
        "encoder_preload": False,
        "finetune_interval_s": 0,
        "finetune_after_interactions": 0,
        "log_level": "INFO",
    }
    samples: list[tuple[float, float, float]] = []  # (time, interactions applied, worker CPU s)
    started = time.perf_counter()
    worker = WorkerProcess.start(
        worker_env(settings), out_path("ingest_daemon.log"), cwd=REPO, append=False
    )
    bar = tqdm(total=wl.records, desc=f"daemon {tag}", unit="rec", leave=False)
    try:
        worker.wait_http(port, "/metrics", timeout_s=120)
        deadline = time.perf_counter() + RUN_TIMEOUT_S
        while not samples or samples[-1][1] < wl.records:
            if time.perf_counter() > deadline:
                raise IngestBenchError(
                    f"the daemon applied {samples[-1][1] if samples else 0:,.0f} of "
                    f"{wl.records:,} interactions in {RUN_TIMEOUT_S:.0f} s; see "
                    "bench/out/ingest_daemon.log"
                )
            time.sleep(HEADLINE_POLL_S)
            asked = time.perf_counter()
            got = scrape_metrics(port)
            n = got.applied.get("interaction", 0.0)
            samples.append((asked + got.seconds / 2, n, proc_cpu_s(worker.pid)))
            bar.update(int(n) - bar.n)
    finally:
        bar.close()
        code = worker.stop(timeout_s=60)
        shutil.rmtree(state, ignore_errors=True)
    if code != 0:
        raise IngestBenchError(f"the daemon exited with status {code}: {worker.log_tail()}")
    first = next(k for k, s in enumerate(samples) if s[1] > 0)
    before = samples[max(0, first - 1)]
    begin = (before[0] + samples[first][0]) / 2
    end = (samples[-2][0] + samples[-1][0]) / 2 if first < len(samples) - 1 else samples[-1][0]
    return Run(
        wl.records,
        max(end - begin, 1e-6),
        samples[-1][2] - before[2],
        join_s=begin - started,
    )


def measure_quix(wl: Workload, tag: str) -> Run | str:
    """One run of the Quix Streams peer (bench/quix_peer.py in its own process) on the mix's
    interaction topic; the reason instead when it cannot run (not installed)."""
    print(f"quix peer {tag} on {wl.name}", flush=True)
    proc = subprocess.run(
        [
            sys.executable,
            str(QUIX_PEER),
            "--bootstrap",
            wl.settings.kafka_bootstrap,
            "--topic",
            wl.settings.topic("interactions"),
            "--records",
            str(wl.records),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S + 120,
        cwd=REPO,
        check=False,
    )
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    doc = json.loads(found[-1]) if found else {}
    if "error" in doc:
        return str(doc["error"])
    if proc.returncode != 0 or doc.get("records", 0) < wl.records:
        raise IngestBenchError(
            f"the Quix Streams peer exited with {proc.returncode} after {doc.get('records')} "
            f"of {wl.records} records: {proc.stderr.strip()[-2000:]}"
        )
    return Run(doc["records"], doc["seconds"], doc["cpu_s"], join_s=doc["join_s"])


@dataclass
class Headline:
    """The headline rows: the daemon, its peer, and three bounds on the same interactions."""

    daemon: Row
    peer: Row
    raw: Row  # kafka-python decoding alone
    floor: Row  # parse + one put per interaction, no state: what any kafka-python worker pays
    peer_work: Row  # the peer's state work in the worker's loop, on kafka-python

    @property
    def rows(self) -> list[Row]:
        return [self.daemon, self.peer, self.raw, self.floor, self.peer_work]


def measure_headline(bootstrap: str, base: Settings, args: argparse.Namespace) -> Headline:
    """The headline row (the daemon) and its peer row, interleaved per repeat on one mix;
    then, in the same repeats, three bounds on a copy of the mix's interactions (same events,
    an interactions-only topic set): the raw kafka-python consume, the floor worker
    (:class:`FloorProcessor`) and the peer's own state work in the worker's loop
    (:class:`PeerWorkProcessor`).

    The bounds say what the goal against the peer can reach with kafka-python (the design
    card's client): a worker that decodes each record with kafka-python, parses it and
    puts it once, durably, keeping no state, runs at the floor's rate; one doing just the
    peer's work at the last bound's; every state the daemon keeps costs on top of them.
    """
    cat = make_catalogue(args.daemon_items, args.seed + 7)
    events = interaction_events(args.interactions, cat, args.seed, args.daemon_users)
    mix = make_mix_workload(bootstrap, base, cat, events)
    copy = make_workload(bootstrap, base, "copy of mix", "interactions", events)
    del events
    peer = Row(mix, "Quix Streams peer, exactly-once")
    daemon = Row(mix, "adacode run (daemon) HEADLINE", raw=peer)
    daemon.note = (
        f"headline: the worker process itself (adacode run), {len(DOMAINS)} domains, "
        f"{args.daemon_items:,} items with embeddings then {args.interactions:,} interactions "
        f"of {args.daemon_users:,} users, code rounds on, scheduled fine-tunes off; timed at "
        f"/metrics polls every {HEADLINE_POLL_S} s from the first applied interaction to the "
        "last; ratio = against the Quix Streams peer; cpu/s = per CPU second of the worker"
    )
    peer.note = (
        "Quix Streams app (bench/quix_peer.py) on the same interaction topic: per-item count "
        "and per-user last 50 items in its RocksDB state, processing_guarantee=exactly-once; "
        "to the return of Application.run (final checkpoint included); cpu/s = per CPU "
        "second of its process"
    )
    raw = Row(copy, "bound: raw kafka-python", raw=peer)
    raw.note = (
        "bound: the same interactions consumed by kafka-python in this process, values "
        "untouched (decoding only); ratio = against the peer"
    )
    peer_work = Row(copy, "bound: peer's work, kafka-python", raw=peer)
    peer_work.note = (
        "bound: the real consumer loop in this process with PeerWorkProcessor (the peer's "
        f"state: a count per item and the last {PEER_RECENT} items per user, read, updated "
        "and put once per batch; no log, no decay, no codes); ratio = against the peer"
    )
    floor = Row(copy, "bound: floor, no state", raw=peer)
    floor.note = (
        "bound: the real consumer loop in this process with FloorProcessor (parse each "
        "interaction, put its bytes once, offsets, one synced write per batch; no state), "
        "what any worker on kafka-python pays before its state; ratio = against the peer"
    )
    for i in range(args.headline_repeats or args.repeats):
        daemon.runs.append(measure_daemon(mix, f"#{i}"))
        got = measure_quix(mix, f"#{i}")
        if isinstance(got, str):
            peer.note = f"NOT MEASURED: {got}"
        else:
            peer.runs.append(got)
        raw.runs.append(measure_raw(copy, i))
        floor.runs.append(
            measure_applied(copy, AppliedConfig(floor.path, processor=FloorProcessor), f"#{i}")
        )
        peer_work.runs.append(
            measure_applied(
                copy, AppliedConfig(peer_work.path, processor=PeerWorkProcessor), f"#{i}"
            )
        )
    return Headline(daemon, peer, raw, floor, peer_work)


def headline_goals(headline: Headline) -> dict[str, Any]:
    daemon, peer, floor = headline.daemon, headline.peer, headline.floor
    return {
        "daemon_interactions_per_s": daemon.median,
        "daemon_interactions_per_cpu_s": daemon.cpu_median,
        "peer_interactions_per_s": peer.median if peer.runs else None,
        "peer_interactions_per_cpu_s": peer.cpu_median if peer.runs else None,
        "daemon_vs_peer": daemon.ratio,
        "daemon_vs_peer_cpu": daemon.cpu_ratio,
        "goal_daemon_vs_peer": GOAL_DAEMON_VS_PEER,
        "raw_vs_peer": headline.raw.ratio,
        "floor_interactions_per_s": floor.median,
        "floor_interactions_per_cpu_s": floor.cpu_median,
        "floor_vs_peer": floor.ratio,
        "floor_vs_peer_cpu": floor.cpu_ratio,
        "peer_work_interactions_per_s": headline.peer_work.median,
        "peer_work_vs_peer": headline.peer_work.ratio,
        "peer_work_vs_peer_cpu": headline.peer_work.cpu_ratio,
        "peer_note": peer.note if not peer.runs else "",
    }


def print_headline(headline: Headline) -> None:
    daemon, peer, floor = headline.daemon, headline.peer, headline.floor
    if peer.runs:
        print(
            f"Headline: adacode run applied {fmt_rate(daemon.median)} interactions/s "
            f"({fmt_rate(daemon.cpu_median)} per CPU s); Quix Streams peer "
            f"{fmt_rate(peer.median)}/s ({fmt_rate(peer.cpu_median)} per CPU s): "
            f"{fmt_ratio(daemon.ratio)}x (goal {GOAL_DAEMON_VS_PEER}x at scale: "
            f"{'met' if (daemon.ratio or 0.0) >= GOAL_DAEMON_VS_PEER else 'not met'} here)"
        )
        print(
            f"Bound: {GOAL_DAEMON_VS_PEER}x the peer is {fmt_rate(GOAL_DAEMON_VS_PEER * peer.median)}/s "
            f"({fmt_rate(GOAL_DAEMON_VS_PEER * peer.cpu_median)} per CPU s); the floor (kafka-python "
            f"decoding, parse, one put per interaction, no state) {fmt_rate(floor.median)}/s "
            f"({fmt_rate(floor.cpu_median)} per CPU s): {fmt_ratio(floor.ratio)}x the peer "
            f"({fmt_ratio(floor.cpu_ratio)}x per CPU s); the peer's own state work on "
            f"kafka-python {fmt_rate(headline.peer_work.median)}/s "
            f"({fmt_ratio(headline.peer_work.ratio)}x; "
            f"{fmt_ratio(headline.peer_work.cpu_ratio)}x per CPU s)"
        )
    else:
        print(
            f"Headline: adacode run applied {fmt_rate(daemon.median)} interactions/s "
            f"({fmt_rate(daemon.cpu_median)} per CPU s); Quix Streams peer: {peer.note}; the "
            f"floor {fmt_rate(floor.median)}/s ({fmt_rate(floor.cpu_median)} per CPU s)"
        )


def headline_main(args: argparse.Namespace, bootstrap: str, base: Settings) -> int:
    """``--headline-only``: the headline rows and their bounds, their table, JSON and chart."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    headline = measure_headline(bootstrap, base, args)
    print()
    print(
        f"Ingest headline: {args.interactions:,} interactions; {os.cpu_count()} cores; load "
        f"average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(render_table(headline.rows))
    print_headline(headline)
    out_path("ingest_headline.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "rows": [r.to_json() for r in headline.rows],
                "goals": headline_goals(headline),
                "wall_s": time.perf_counter() - started,
            },
            indent=2,
            default=str,
        )
    )
    plot([r for r in headline.rows if r.runs], out_path("ingest_headline.png"))
    print("wrote bench/out/ingest_headline.json, bench/out/ingest_headline.png")
    return 0


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
    def cpu_median(self) -> float:
        return statistics.median(r.cpu_rate for r in self.runs)

    @property
    def ratio(self) -> float | None:
        return None if self.raw is None or not self.raw.runs else self.median / self.raw.median

    @property
    def cpu_ratio(self) -> float | None:
        if self.raw is None or not self.raw.runs:
            return None
        return self.cpu_median / self.raw.cpu_median

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    def stage_medians(self) -> dict[str, float]:
        keys = [k for k in (*STAGES, *SUB_STAGES) if all(k in r.stages for r in self.runs)]
        return {k: statistics.median(r.stages[k] for r in self.runs) for k in keys}

    def to_json(self) -> dict[str, Any]:
        if not self.runs:  # a row that could not be measured (the peer without Quix Streams)
            return {"workload": self.workload.name, "path": self.path, "note": self.note}
        return {
            "workload": self.workload.name,
            "path": self.path,
            "records": self.workload.records,
            "rate_median": self.median,
            "rate_min": min(self.rates),
            "rate_max": max(self.rates),
            "ratio_vs_raw": self.ratio,
            "cpu_rate_median": self.cpu_median,
            "cpu_ratio_vs_raw": self.cpu_ratio,
            "note": self.note,
            "runs": [
                dataclasses.asdict(r) | {"rate": r.rate, "cpu_rate": r.cpu_rate} for r in self.runs
            ],
        }


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def render_table(rows: list[Row]) -> str:
    head = (
        f"{'workload':<24}{'path':<38}{'median/s':>10}{'min/s':>10}{'max/s':>10}{'ratio':>7}"
        f"{'cpu/s':>10}{'cpu ratio':>10}{'join s':>7}{'boot s':>7}{'batches':>8}"
    )
    lines = [head, "-" * len(head)]
    last = ""
    notes: list[str] = []
    for row in rows:
        wl = f"{row.workload.name} ({row.workload.records:,})" if row.workload.name != last else ""
        last = row.workload.name
        if not row.runs:  # not measured: the note says why
            notes.append(row.note)
            lines.append(f"{wl:<24}{row.path + f' [{len(notes)}]':<38}{'not measured':>10}")
            continue
        join = statistics.median(r.join_s for r in row.runs)
        boot = statistics.median(r.bootstrap_s for r in row.runs)
        batches = statistics.median(r.batches for r in row.runs)
        path = row.path
        stalls = sum(r.stalls for r in row.runs)
        note = row.note + (f"; {stalls} stalled run(s) repeated" if stalls else "")
        if note:
            notes.append(note.lstrip("; "))
            path += f" [{len(notes)}]"
        lines.append(
            f"{wl:<24}{path:<38}{fmt_rate(row.median):>10}{fmt_rate(min(row.rates)):>10}"
            f"{fmt_rate(max(row.rates)):>10}{fmt_ratio(row.ratio):>7}"
            f"{fmt_rate(row.cpu_median):>10}{fmt_ratio(row.cpu_ratio):>10}"
            f"{join:>7.2f}{boot:>7.2f}{batches:>8.0f}"
        )
    lines += [f"  [{i}] {note}" for i, note in enumerate(notes, start=1)]
    return "\n".join(lines)


_SHORT = {
    "poll": "poll",
    "flatten+metrics": "flatten",
    "process": "process",
    "store.write": "write",
    "commit_async": "commit",
    "lag report": "lag",
    "loop rest": "rest",
    "process: read": "read",
    "process: MiniLM": "MiniLM",
    "process: codes": "codes",
}


def render_stages(rows: list[Row]) -> str:
    """Share of each stage in the median applied run (the process parts are inside process)."""
    applied = [r for r in rows if r.raw is not None and r.runs and r.runs[0].stages]
    head = f"{'applied run':<44}{'wall s':>8}" + "".join(
        f"{_SHORT[s]:>9}" for s in (*STAGES, *SUB_STAGES)
    )
    head += "  dominant"
    lines = [head, "-" * len(head)]
    for row in applied:
        med = row.stage_medians()
        total = row.seconds
        cells = "".join(f"{100 * med.get(s, 0.0) / total:>8.1f}%" for s in (*STAGES, *SUB_STAGES))
        dominant = max(STAGES, key=lambda s: med.get(s, 0.0))
        name = f"{row.workload.name}: {row.path}"[:43]
        lines.append(f"{name:<44}{total:>8.2f}{cells}  {dominant}")
    return "\n".join(lines)


def render_split(timing: dict[str, float], run: Run, bytes_put: dict[str, int]) -> str:
    total = sum(timing[p] for p in PROCESS_PARTS)
    lines = [f"{'part':<10}{'s':>8}{'share':>8}{'us/record':>11}", "-" * 37]
    for part in PROCESS_PARTS:
        v = timing[part]
        lines.append(
            f"{part:<10}{v:>8.3f}{100 * v / total if total else 0:>7.1f}%"
            f"{1e6 * v / max(1, run.records):>11.2f}"
        )
    lines.append(f"rate of this timed run: {fmt_rate(run.rate)}/s")
    written = ", ".join(
        f"{cf} {v / max(1, run.records):,.0f}"
        for cf, v in sorted(bytes_put.items(), key=lambda kv: -kv[1])
    )
    lines.append(f"bytes put per record, by column family: {written}")
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
    lines = [f"{'own s':>8}{'share':>8}{'calls':>9}  function", "-" * 90]
    for e in entries:
        lines.append(
            f"{e['tottime']:>8.3f}{100 * e['share']:>7.1f}%{e['calls']:>9}  {e['function'][-70:]}"
        )
    return "\n".join(lines)


def render_scaling(scaling: list[CodesScaling]) -> str:
    lines = [
        f"{'catalogue':>10}{'process us':>12}{'codes us':>10}{'codes %':>9}"
        f"{'state B':>9}{'history B':>11}{'log B':>7}{'MB/batch':>10}",
        "-" * 78,
    ]
    for c in scaling:
        per_batch = (c.codes_state_bytes + c.codes_history_bytes) * POLL_MAX_RECORDS / 1e6
        lines.append(
            f"{c.items:>10,}{c.process_us:>12.1f}{c.codes_us:>10.1f}"
            f"{100 * c.codes_us / c.process_us if c.process_us else 0:>8.0f}%"
            f"{c.codes_state_bytes:>9.0f}{c.codes_history_bytes:>11.0f}{c.interaction_bytes:>7.0f}"
            f"{per_batch:>10.2f}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 7), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r.workload.name}: {r.path}" for r in rows]
    med = np.array([r.median for r in rows])
    lo = med - np.array([min(r.rates) for r in rows])
    hi = np.array([max(r.rates) for r in rows]) - med
    colours = ["#999999" if r.raw is None else "#1f77b4" for r in rows]
    y = np.arange(len(rows))[::-1]
    ax1.barh(y, med, xerr=[lo, hi], color=colours, capsize=3)
    ax1.set_yticks(y, labels, fontsize=7)
    ax1.set_xscale("log")
    ax1.set_xlabel("records/s, wall (median; whiskers min-max; grey = raw kafka-python)")
    ax1.axvline(
        GOAL_APPLIED_PER_S,
        color="red",
        ls="--",
        lw=1,
        label=f"goal: {GOAL_APPLIED_PER_S / 1000:.0f}k interactions/s",
    )
    for yi, r in zip(y, rows, strict=True):
        if r.ratio is not None:
            ax1.text(r.median * 1.08, yi, f"{r.ratio:.2g}x raw", va="center", fontsize=7)
    ax1.legend(fontsize=7, loc="lower right")
    ax1.set_title("ingest rate: applied by the worker vs raw consume")
    applied = [r for r in rows if r.raw is not None and r.runs and r.runs[0].stages]
    bottom = np.zeros(len(applied))
    for stage in STAGES:
        shares = np.array([r.stage_medians().get(stage, 0.0) / r.seconds for r in applied])
        ax2.barh(np.arange(len(applied))[::-1], shares, left=bottom, label=stage)
        bottom += shares
    ax2.set_yticks(
        np.arange(len(applied))[::-1],
        [f"{r.workload.name}: {r.path}"[:40] for r in applied],
        fontsize=7,
    )
    ax2.set_xlabel("share of the applied run's wall time")
    ax2.set_title("where the applied time goes")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ======================================================================================
# main
# ======================================================================================


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--bootstrap", help="HOST:PORT of a running broker (default: start one)")
    parser.add_argument("--interactions", type=int, default=200_000, help="interaction events")
    parser.add_argument(
        "--items", type=int, default=20_000, help="items with embeddings (also the catalogue)"
    )
    parser.add_argument("--text-items", type=int, default=2_000, help="items with text (MiniLM)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement")
    parser.add_argument(
        "--embedding-repeats",
        type=int,
        default=1,
        help="runs of the items+embedding workload (each pass reads N x 8 KB through "
        "kafka-python's CRC check: ~40 s for 20,000 items with its pure-Python CRC-32C)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated events")
    parser.add_argument(
        "--prototype-repeats", type=int, default=1, help="runs of each prototype-fix row"
    )
    parser.add_argument(
        "--codes-scaling",
        default="",
        metavar="SIZES",
        help="also measure the codes step offline for these catalogue sizes, e.g. "
        "5000,20000,80000 (about 20 s per 80,000 items)",
    )
    parser.add_argument(
        "--floor-repeats",
        type=int,
        default=3,
        help="runs of the floor row (parse + one put per interaction, no state; 0: none)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the split, cProfile and offline runs"
    )
    parser.add_argument(
        "--headline-only",
        action="store_true",
        help="only the headline (adacode run) and Quix Streams peer rows",
    )
    parser.add_argument(
        "--headline-repeats", type=int, default=0, help="runs of the headline rows (0: --repeats)"
    )
    parser.add_argument(
        "--daemon-items", type=int, default=5_000, help="catalogue of the headline mix"
    )
    parser.add_argument(
        "--daemon-users", type=int, default=20_000, help="users of the headline mix"
    )
    args = parser.parse_args(argv)
    for name in (
        "interactions",
        "items",
        "text_items",
        "repeats",
        "embedding_repeats",
        "daemon_items",
        "daemon_users",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.floor_repeats < 0:
        parser.error("--floor-repeats must be 0 (no floor row) or more")
    if args.prototype_repeats < 0:
        parser.error("--prototype-repeats must be 0 (no prototype rows) or more")
    try:
        args.codes_scaling = [int(x) for x in args.codes_scaling.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--codes-scaling {args.codes_scaling!r}: give item counts like 5000,20000")
    if any(n < 1 for n in args.codes_scaling):
        parser.error("--codes-scaling sizes must be positive item counts")
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
    split: tuple[dict[str, float], Run, dict[str, int]] | None = None
    profile_entries: list[dict[str, Any]] = []
    model_load: dict[str, float] = {}
    with broker(args.bootstrap, "ingest") as bootstrap, tempfile.TemporaryDirectory() as scratch:
        print(f"broker {bootstrap}; producing the workloads", flush=True)
        if args.headline_only:
            return headline_main(args, bootstrap, base)
        headline = measure_headline(bootstrap, base, args)
        rows += headline.rows
        cat = make_catalogue(args.items, args.seed)
        emb = make_workload(bootstrap, base, "items+embedding", "items", embedding_item_events(cat))
        inter_events = interaction_events(args.interactions, cat, args.seed)
        inter = make_workload(bootstrap, base, "interactions", "interactions", inter_events)
        del inter_events
        text = make_workload(
            bootstrap, base, "items+text", "items", text_item_events(args.text_items, args.seed)
        )
        warm = Path(scratch) / "warm"  # the state once the catalogue is applied (items coded)
        # The bench's own objects (event lists, ...) are frozen out of the garbage
        # collector's reach, so its collections cost the worker what they would in production.
        gc.collect()
        gc.freeze()

        # -- items with embeddings on a fresh state (the codebook bootstrap is part of it);
        #    interactions on the catalogue's state. Raw and applied interleaved per repeat.
        emb_raw = Row(emb, "raw kafka-python")
        emb_applied = Row(emb, "applied sync_writes=True", raw=emb_raw)
        emb_applied.note = (
            "fresh state: the batch that reaches codebook_min_items trains the codebook (boot s)"
        )
        raw = Row(inter, "raw kafka-python")
        synced = Row(inter, "applied sync_writes=True", raw=raw)
        unsynced = Row(inter, "applied sync_writes=False", raw=raw)
        raw_nocrc = Row(inter, "raw, check_crcs=False")
        raw_nocrc.note = "prototype baseline: no CRC check (what a C CRC-32C leaves: ~0)"
        nocrc = Row(inter, "applied, check_crcs=False", raw=raw_nocrc)
        nocrc.note = f"prototype: CRC check off (kafka-python uses a {CRC_IMPL} CRC-32C here)"
        bigger = Row(inter, f"applied, check_crcs=False, {BIG_POLL // 1000}k/poll", raw=raw_nocrc)
        bigger.note = f"prototype: as the row above, with poll_max_records={BIG_POLL}"
        bigger_cfg = AppliedConfig(bigger.path, check_crcs=False, poll_max_records=BIG_POLL)
        for i in range(args.embedding_repeats):
            emb_raw.runs.append(measure_raw(emb, i))
            emb_applied.runs.append(
                measure_applied(
                    emb, AppliedConfig(emb_applied.path), f"#{i}", keep=warm if i == 0 else None
                )
            )
        for i in range(args.repeats):
            raw.runs.append(measure_raw(inter, i))
            synced.runs.append(
                measure_applied(inter, AppliedConfig(synced.path), f"#{i}", initial=warm)
            )
            unsynced.runs.append(
                measure_applied(inter, AppliedConfig(unsynced.path, False), f"#{i}", initial=warm)
            )
        for i in range(args.prototype_repeats):
            raw_nocrc.runs.append(measure_raw(inter, i, check_crcs=False))
            nocrc.runs.append(
                measure_applied(
                    inter, AppliedConfig(nocrc.path, check_crcs=False), f"#{i}", initial=warm
                )
            )
            bigger.runs.append(measure_applied(inter, bigger_cfg, f"#{i}", initial=warm))
        floor = Row(inter, "floor: parse + 1 put/record", raw=raw)
        floor.note = "FloorProcessor: raw event bytes and offsets only (no state): the bound"
        for i in range(args.floor_repeats):
            floor.runs.append(
                measure_applied(inter, AppliedConfig(floor.path, processor=FloorProcessor), f"#{i}")
            )
        cold = Row(inter, "applied, empty state (1 run)", raw=raw)
        cold.note = "no catalogue: every item becomes a placeholder; no codebook yet"
        cold.runs.append(measure_applied(inter, AppliedConfig(cold.path), "cold"))
        rows += [
            r
            for r in (
                emb_raw,
                emb_applied,
                raw,
                synced,
                unsynced,
                cold,
                floor,
                raw_nocrc,
                nocrc,
                bigger,
            )
            if r.runs
        ]

        # -- text items through MiniLM, on the catalogue's state -------------------------
        text_raw = Row(text, "raw kafka-python")
        for i in range(args.repeats):
            text_raw.runs.append(measure_raw(text, i))
        rows.append(text_raw)
        for threads in (1, 2):
            encoder, load_s = load_encoder(threads)
            model_load[f"torch_threads={threads}"] = load_s
            row = Row(text, f"applied MiniLM torch_threads={threads}", raw=text_raw)
            row.note = f"model load {load_s:.1f} s excluded from the rate"
            cfg = AppliedConfig(row.path, encode=encoder.encode)
            for i in range(args.repeats):
                row.runs.append(measure_applied(text, cfg, f"#{i}", initial=warm))
            rows.append(row)

        # -- the split of Processor.process, cProfile, offline prototype check --------------
        if not args.no_profile:
            timing: dict[str, float] = {}
            bytes_put: dict[str, int] = {}
            with process_split(timing) as split_cls:
                run = measure_applied(
                    inter,
                    AppliedConfig("split", processor=split_cls),
                    "split",
                    initial=warm,
                    bytes_put=bytes_put,
                )
            timing["other"] = run.stages["process"] - sum(
                v for k, v in timing.items() if k != "other"
            )
            split = (timing, run, bytes_put)
            profile = cProfile.Profile()
            limit = min(inter.records, 50_000)
            prun = measure_applied(
                inter,
                AppliedConfig("cProfile"),
                "cProfile",
                initial=warm,
                profile=profile,
                limit=limit,
            )
            text_report, profile_entries = profile_top(profile, 15)
            out_path("ingest_profile.txt").write_text(
                f"cProfile of the applied interactions run, first {prun.records:,} records "
                f"({prun.rate:,.0f} records/s under the profiler)\n\n{text_report}"
            )

    scaling = [
        codes_scaling(n, min(args.interactions, 50_000), args.seed) for n in args.codes_scaling
    ]
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - wall
    print()
    print(
        f"Ingest benchmark: {args.interactions:,} interactions, {args.items:,} items with "
        f"embeddings, {args.text_items:,} items with text; {PARTITIONS} partitions; "
        f"{args.repeats} repeats; {os.cpu_count()} cores; load average {load_before[0]:.1f} "
        f"before, {load_after[0]:.1f} after"
    )
    print(f"kafka-python {kafka.__version__}, CRC-32C check of fetched batches: {CRC_IMPL}")
    print(
        f"payload sizes: interactions {inter.payload_bytes:.0f} B, items+embedding "
        f"{emb.payload_bytes:.0f} B, items+text {text.payload_bytes:.0f} B"
    )
    print(
        "median/min/max: records/s over the wall time (partition assignment to last commit); "
        "ratio = applied median / raw median on the same topics; cpu/s = records per CPU "
        "second of this process (robust to other load on the machine); join s = group join, "
        "excluded; boot s = codebook bootstrap batch, included"
    )
    print(render_table(rows))
    print_headline(headline)
    print("model load (excluded): " + ", ".join(f"{k} {v:.1f} s" for k, v in model_load.items()))
    print()
    print(
        "Stage breakdown: share of the median applied run's wall time (read, MiniLM and codes are parts of process)"
    )
    print(render_stages(rows))
    if split is not None:
        print()
        print(
            "Split of Processor.process, interactions on the catalogue state (one extra run, per-record timers)"
        )
        print(render_split(*split))
    if profile_entries:
        print()
        print(
            "cProfile of the applied interactions (top 15 by own time; full: bench/out/ingest_profile.txt)"
        )
        print(render_profile(profile_entries))
    if scaling:
        print()
        print(
            "Codes step vs catalogue size (offline, interactions in batches of 5000; per interaction)"
        )
        print(render_scaling(scaling))

    best = max((r for r in (nocrc, bigger) if r.runs), key=lambda r: r.median, default=None)
    goals = {
        "applied_interactions_per_s": synced.median,
        "applied_interactions_per_cpu_s": synced.cpu_median,
        "goal_applied_per_s": GOAL_APPLIED_PER_S,
        "ratio": synced.ratio,
        "cpu_ratio": synced.cpu_ratio,
        "goal_ratio": GOAL_RATIO,
        "rate_met": synced.median >= GOAL_APPLIED_PER_S,
        "ratio_met": (synced.ratio or 0.0) >= GOAL_RATIO,
        "best_prototype": None if best is None else best.path,
        "best_prototype_rate": None if best is None else best.median,
        "best_prototype_ratio": None if best is None else best.ratio,
        "floor_ratio": floor.ratio if floor.runs else None,
        **headline_goals(headline),
    }
    print()
    print(
        "Issue 5 goals (withdrawn by issue 12: the bound is the peer, see the headline) "
        f"(interactions, sync_writes=True): {fmt_rate(synced.median)}/s applied "
        f"(goal {fmt_rate(GOAL_APPLIED_PER_S)}: {'met' if goals['rate_met'] else 'MISSED'}; "
        f"{fmt_rate(synced.cpu_median)} per CPU second), ratio {fmt_ratio(synced.ratio)} "
        f"(goal {GOAL_RATIO}: {'met' if goals['ratio_met'] else 'MISSED'}; CPU ratio "
        f"{fmt_ratio(synced.cpu_ratio)})"
    )
    if floor.runs:
        print(
            f"floor (parse + one put per interaction, no state): {fmt_rate(floor.median)}/s, "
            f"ratio {fmt_ratio(floor.ratio)} (the worker does all of this, then popularity, "
            "per-user recent items and codes on top)"
        )
    if best is not None:
        print(
            f"best prototype ({best.path}): {fmt_rate(best.median)}/s, ratio "
            f"{fmt_ratio(best.ratio)} against the CRC-free baseline"
        )
    print(f"total wall time {elapsed:.0f} s")

    result = {
        "args": vars(args),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "kafka_python": kafka.__version__,
            "crc32c": CRC_IMPL,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "payload_bytes": {wl.name: wl.payload_bytes for wl in (inter, emb, text)},
        "rows": [r.to_json() for r in rows],
        "stages": {f"{r.workload.name} | {r.path}": r.stage_medians() for r in rows if r.raw},
        "process_split": None
        if split is None
        else {"seconds": split[0], "rate": split[1].rate, "bytes_put": split[2]},
        "codes_scaling": [dataclasses.asdict(c) for c in scaling],
        "model_load_s": model_load,
        "profile_top": profile_entries,
        "goals": goals,
        "wall_s": elapsed,
    }
    out_path("ingest.json").write_text(json.dumps(result, indent=2, default=str))
    plot([r for r in rows if r.runs], out_path("ingest.png"))
    print("wrote bench/out/ingest.json, bench/out/ingest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
