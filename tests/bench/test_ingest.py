"""bench/ingest.py's bound rows: the peer's work done in the worker's loop keeps what the Quix
Streams peer keeps (against a plain reference, whatever the batch cuts), the floor keeps one
row per valid interaction, and the timed loop can be made before it connects to Kafka."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

from bench.ingest import (
    PEER_RECENT,
    FloorProcessor,
    PeerWorkProcessor,
    TimedLoop,
    _peer_count,
    open_timed_store,
)
from store.memory import MemoryPartition
from worker.core.settings import Settings
from worker.ingest.events import interaction_payload
from worker.ingest.processor import SourceRecord

SETTINGS = Settings(embedding_dim=8, topic_prefix="t.")
INTER = SETTINGS.topic("interactions")


def _stream(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [
        (rng.choice(["a", "b"]), f"u{rng.randrange(3)}", f"i{rng.randrange(30)}") for _ in range(n)
    ]


def _records(events: list[tuple[str, str, str]]) -> list[SourceRecord]:
    return [
        SourceRecord(INTER, 0, k, d.encode(), interaction_payload(u, i, d, 1_000 + k))
        for k, (d, u, i) in enumerate(events)
    ]


def test_peer_work_keeps_counts_and_recent_items_whatever_the_batches() -> None:
    events = _stream(400, seed=3)
    records = _records(events)
    records.insert(57, SourceRecord(INTER, 0, 10_000, b"a", b"{not json"))  # skipped, counted
    store = MemoryPartition()
    proc = PeerWorkProcessor(store, SETTINGS, None)
    cut, k, applied = random.Random(5), 0, 0
    while k < len(records):
        size = cut.randint(1, 60)
        result = proc.process(records[k : k + size])
        store.write(result.batch)
        applied += result.applied["interaction", "all"]
        k += size
    counts = Counter(f"{d}\0{i}".encode() for d, _, i in events)
    recent: dict[bytes, list[str]] = defaultdict(list)
    for d, u, i in events:
        recent[f"{d}\0{u}".encode()].append(i)
    assert applied == len(events)
    assert {k: _peer_count(v) for k, v in store.items("popularity")} == dict(counts)
    assert {k: v.decode().split("\n") for k, v in store.items("users")} == {
        k: v[-PEER_RECENT:] for k, v in recent.items()
    }
    assert max(len(v) for v in recent.values()) > PEER_RECENT  # the cut was exercised
    assert store.offsets()[INTER, 0] == records[-1].offset + 1


def test_floor_puts_one_row_per_valid_interaction() -> None:
    records = _records(_stream(50, seed=1))
    records.append(SourceRecord(INTER, 0, 50, b"a", b"[]"))
    store = MemoryPartition()
    result = FloorProcessor(store, SETTINGS, None).process(records)
    store.write(result.batch)
    rows = dict(store.items("interactions"))
    assert len(rows) == 50
    assert sorted(rows.values()) == sorted(r.value for r in records[:50])
    assert result.applied["interaction", "all"] == 50


def test_timed_loop_is_made_before_kafka_is_reached(tmp_path) -> None:
    # the loop's clients are made when it runs: building it (and its timers) needs no broker
    settings = Settings(embedding_dim=8, topic_prefix="t.", kafka_bootstrap="127.0.0.1:1")
    store = open_timed_store(tmp_path / "db", sync_writes=False)
    try:
        loop = TimedLoop(settings, store, FloorProcessor(store, settings, None), expected=1)
        assert loop.assigned_at is None and loop.timing["poll"] == 0.0
    finally:
        store.close()
