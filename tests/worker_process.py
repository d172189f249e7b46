"""Running the real worker (``python -m worker.commands.cli run``) as a subprocess in tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from store.exceptions import StateFormatError
from store.partition import COLUMN_FAMILIES
from store.rocksdb import RocksDBPartition
from worker.commands.launch import WorkerProcess
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.ingest.consumer import ConsumerLoop
from worker.ingest.events import interaction_payload, item_payload
from worker.ingest.processor import Processor

REPO = Path(__file__).resolve().parent.parent
DIM = 8
#: a small worker that fine-tunes on requests only (no interval, no interaction trigger)
ON_REQUEST: dict[str, object] = {
    "codebook_min_items": 60,
    "finetune_min_interactions": 50,
    "finetune_interval_s": 0,
    "finetune_after_interactions": 0,
    "finetune_workers": 1,
    "finetune_epochs": 20,
    "finetune_hidden": 16,
    "gate_tolerance": 1.0,
}


def worker_env(bootstrap: str, prefix: str, state_dir: Path, **over: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADACODE_")}
    env.update(
        {
            "ADACODE_KAFKA_BOOTSTRAP": bootstrap,
            "ADACODE_TOPIC_PREFIX": prefix,
            "ADACODE_KAFKA_GROUP_ID": f"{prefix}workers",
            "ADACODE_STATE_DIR": str(state_dir),
            "ADACODE_EMBEDDING_DIM": str(DIM),
            "ADACODE_HTTP_PORT": "0",
            "ADACODE_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "ADACODE_ENCODER_PRELOAD": "false",  # these tests send embeddings, not texts
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"ADACODE_{k.upper()}": str(v) for k, v in over.items()})
    return env


#: every worker process a test started; tests/conftest.py kills what a test left running
STARTED: list[subprocess.Popen[bytes]] = []


def start_worker(env: dict[str, str], log_path: Path) -> WorkerProcess:
    """``adacode run`` from the repository, its output appended to ``log_path``."""
    worker = WorkerProcess.start(env, log_path, cwd=REPO)
    STARTED.append(worker.proc)
    return worker


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s; on timeout, fail with where every other thread of this
    process stands (an in-process worker that stopped making progress shows where)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{thread_stacks()}")


def thread_stacks(depth: int = 12) -> str:
    """The innermost ``depth`` frames of every thread but the caller's, by thread name."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        stack = "".join(traceback.format_stack(frame)[-depth:])
        parts.append(f"--- thread {names.get(ident, ident)}\n{stack}")
    return "".join(parts) or "(no other threads)"


@contextmanager
def secondary(state_dir: Path) -> Iterator[RocksDBPartition]:
    with tempfile.TemporaryDirectory() as tmp:
        store = RocksDBPartition.open(state_dir, secondary_path=Path(tmp))
        try:
            store.catch_up()
            yield store
        finally:
            store.close()


def applied_offsets(state_dir: Path) -> dict[tuple[str, int], int]:
    if not (state_dir / "CURRENT").exists():
        return {}
    try:
        with secondary(state_dir) as store:
            return store.offsets()
    except StateFormatError as exc:
        # a worker killed while creating the store leaves it half made; the next
        # primary open finishes it, a secondary cannot: nothing is applied yet
        # (a secondary may see some column families and not others, "meta" included)
        assert "column families" in str(exc), exc
        return {}


def dump_state(
    state_dir: Path, families: tuple[str, ...] = COLUMN_FAMILIES
) -> dict[str, list[tuple[bytes, bytes]]]:
    store = RocksDBPartition.open(state_dir, read_only=True)
    try:
        return {cf: list(store.items(cf)) for cf in families}
    finally:
        store.close()


def make_events(
    n_items: int, n_interactions: int, domains: tuple[str, ...] = ("shop", "news"), seed: int = 0
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Keyed item and interaction payloads; interactions also name a few unknown items."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_items):
        d = domains[i % len(domains)]
        emb = rng.normal(size=DIM).astype(np.float32)
        items.append((d, item_payload(f"i{i}", d, 1000 + i, embedding=emb)))
    inters = []
    for k in range(n_interactions):
        i = int(rng.integers(n_items + 5))  # a few items that never get an item event
        d = domains[i % len(domains)]
        inters.append((d, interaction_payload(f"u{rng.integers(50)}", f"i{i}", d, 2000 + k)))
    return items, inters


def produce_events(
    settings: Settings,
    n_items: int,
    n_interactions: int,
    *,
    partitions: int,
    seed: int = 0,
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], dict[tuple[str, int], int]]:
    """Create the topics, produce :func:`make_events`' stream (items first) and wait for it;
    returns the items, the interactions and the end offsets of both topics."""
    from tests.kafka_utils import produce_json
    from worker.commands.topics import create_topics

    bootstrap = settings.kafka_bootstrap
    create_topics(settings, partitions=partitions)
    items, inters = make_events(n_items, n_interactions, seed=seed)
    produce_json(bootstrap, settings.topic("items"), items)
    produce_json(bootstrap, settings.topic("interactions"), inters)
    end = end_offsets(bootstrap, [settings.topic("items"), settings.topic("interactions")])
    return items, inters, end


def settings_for(bootstrap: str, prefix: str, state_dir: Path, **over: object) -> Settings:
    base: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "topic_prefix": prefix,
        "kafka_group_id": f"{prefix}g",
        "state_dir": str(state_dir),
        "embedding_dim": DIM,
        "http_port": 0,
        "kafka_session_timeout_ms": 6000,
        "encoder_preload": False,
    }
    base.update(over)
    return Settings(**base)  # type: ignore[arg-type]


def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    # no group, so nothing to commit (kafka-python warns about auto-commit otherwise)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.topics()  # fetch metadata, so partitions_for_topic knows every topic
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        ends = {
            (tp.topic, tp.partition): off for tp, off in consumer.end_offsets(tps).items() if off
        }
        assert ends, f"no records found in {topics}"
        return ends
    finally:
        consumer.close()


class InProcessWorker:
    """The consumer loop on a thread, with its own RocksDB (no encoder: items carry embeddings)."""

    def __init__(self, settings: Settings, store: RocksDBPartition | None = None) -> None:
        self.store = store if store is not None else RocksDBPartition.open(settings.state_path)
        self.loop = ConsumerLoop(
            settings, self.store, Processor(self.store, settings, None), Metrics()
        )
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        self.store.close()
