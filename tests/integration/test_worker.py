"""The worker against the real broker and a real RocksDB: exact counts, crashes, poison, SIGTERM."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Collection
from pathlib import Path

import orjson
from kafka import KafkaAdminClient

from store.records import DomainCounters
from store.rocksdb import RocksDBPartition
from tests.kafka_utils import consume_all, produce_json
from tests.worker_process import (
    DIM,
    InProcessWorker,
    applied_offsets,
    dump_state,
    end_offsets,
    make_events,
    produce_events,
    settings_for,
    start_worker,
    wait_for,
    worker_env,
)
from worker.commands.topics import create_topics
from worker.state.reads import domain_counters


def test_counts_in_rocksdb_match_what_was_produced(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "state")
    items, inters, end = produce_events(s, 300, 3000, partitions=3)
    worker = InProcessWorker(s)
    try:
        wait_for(lambda: worker.store.offsets() == end, 60, "the worker to apply every event")
        counters = domain_counters(worker.store)
    finally:
        worker.stop()
    # what was produced, counted independently
    expected_inter: dict[str, int] = {}
    named: dict[str, set[str]] = {}
    for d, raw in inters:
        expected_inter[d] = expected_inter.get(d, 0) + 1
        named.setdefault(d, set()).add(orjson.loads(raw)["item_id"])
    for d in ("shop", "news"):
        produced_items = {orjson.loads(raw)["item_id"] for dd, raw in items if dd == d}
        c = counters[d]
        assert c.interactions == expected_inter[d] == c.logged
        assert c.items == len(produced_items)
        assert c.placeholders == len(named[d] - produced_items)
    assert sum(c.interactions for c in counters.values()) == 3000


class _SlowRestore(RocksDBPartition):
    """A store whose first restore on assignment takes longer than the session timeout
    (as restoring many domains' table versions from the versions topic can)."""

    restore_s = 0.0
    restoring = threading.Event()
    calls = 0

    def restore_owned(self, partitions: Collection[int]) -> list[str]:
        type(self).calls += 1
        if type(self).calls == 1:
            self.restoring.set()
            time.sleep(self.restore_s)
        return []


def _group_members(admin: KafkaAdminClient, group: str) -> list[str]:
    return sorted(m["member_id"] for m in admin.describe_groups([group])[group]["members"])


def test_a_restore_longer_than_the_session_timeout_keeps_the_worker_in_its_group(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, admin: KafkaAdminClient
) -> None:
    """kafka-python 3 calls the rebalance listener on the I/O thread that also heartbeats:
    the listener's work runs beside it, so a restore of 1.5 x the session timeout does not
    get the worker expelled (the coordinator would drop its member id, and the rejoin
    would restore again under a new one), and every event is applied once."""
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "state")
    _items, inters, end = produce_events(s, 60, 600, partitions=2)
    _SlowRestore.restore_s = 1.5 * s.kafka_session_timeout_ms / 1000
    _SlowRestore.restoring.clear()
    _SlowRestore.calls = 0
    worker = InProcessWorker(s, _SlowRestore.open(s.state_path))
    try:
        assert _SlowRestore.restoring.wait(30), "no assignment"
        during = _group_members(admin, s.kafka_group_id)
        wait_for(lambda: worker.store.offsets() == end, 60, "the worker to apply every event")
        after = _group_members(admin, s.kafka_group_id)
        counters = domain_counters(worker.store)
    finally:
        worker.stop()
    assert len(during) == 1
    assert after == during, f"expelled: member {during} during the restore, {after} after it"
    assert sum(c.interactions for c in counters.values()) == len(inters)


def test_kill9_at_random_moments_equals_an_uninterrupted_run(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused")
    end = produce_events(s, 400, 30_000, partitions=3, seed=1)[2]
    total = sum(end.values())

    crashed = tmp_path / "crashed"
    env = worker_env(
        kafka_bootstrap,
        topic_prefix,
        crashed,
        poll_max_records=50,
        kafka_group_instance_id="w1",
        kafka_group_id=f"{topic_prefix}crash",
    )
    rng = random.Random(42)
    kills = 0
    mid_stream = 0
    progress = [0]
    log = tmp_path / "crashed.log"
    while mid_stream < 6:
        worker = start_worker(env, log)
        seen = progress[-1]
        wait_for(
            lambda seen=seen, worker=worker: (
                sum(applied_offsets(crashed).values()) > seen or worker.poll() is not None
            ),
            60,
            "progress before the next kill",
        )
        threading.Event().wait(rng.uniform(0.0, 0.15))  # batches apply in ms now
        assert worker.kill() == -signal.SIGKILL, worker.log_tail()
        kills += 1
        done = sum(applied_offsets(crashed).values())
        progress.append(done)
        mid_stream += done < total
        if done >= total:
            break
    assert mid_stream >= 5, f"only {mid_stream} kills landed mid-stream: {progress}"
    worker = start_worker(env, log)
    try:
        wait_for(lambda: applied_offsets(crashed) == end, 120, "the restarted worker to finish")
    finally:
        assert worker.stop(timeout_s=30) == 0, worker.log_tail()

    clean = tmp_path / "clean"
    env_clean = worker_env(
        kafka_bootstrap, topic_prefix, clean, kafka_group_id=f"{topic_prefix}clean"
    )
    worker = start_worker(env_clean, tmp_path / "clean.log")
    try:
        wait_for(lambda: applied_offsets(clean) == end, 120, "the uninterrupted worker to finish")
    finally:
        assert worker.stop(timeout_s=30) == 0, worker.log_tail()
    got, want = dump_state(crashed), dump_state(clean)
    for cf in want:
        assert got[cf] == want[cf], f"column family {cf} differs after {kills} kills ({progress})"
    assert len(want["items"]) > 400 and len(want["interactions"]) == 30_000


def test_poison_messages_go_to_the_dead_letter_topic_and_the_worker_carries_on(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "state", max_message_bytes=4000)
    create_topics(s, partitions=2)
    items, inters = make_events(40, 400, seed=2)
    bad_items = [
        ("shop", b"{not json"),
        (
            "shop",
            orjson.dumps(
                {"item_id": "x", "domain": "shop", "ts": 1, "embedding": [1.0] * (DIM + 1)}
            ),
        ),
        ("shop", orjson.dumps({"item_id": "x", "domain": "shop", "ts": 1, "text": None})),
        (
            "shop",
            b'{"item_id": "x", "domain": "shop", "ts": 1, "embedding": [NaN, 1, 1, 1, 1, 1, 1, 1]}',
        ),
        ("shop", orjson.dumps({"item_id": "x", "domain": "Not A Domain", "ts": 1, "text": "t"})),
        ("shop", orjson.dumps({"item_id": "x", "domain": "shop", "ts": 1, "text": "y" * 5000})),
    ]
    bad_inters = [
        ("news", b"\xff\xfe binary"),
        ("news", orjson.dumps({"user_id": "u", "domain": "news", "ts": 3})),
        ("news", orjson.dumps({"user_id": "u", "item_id": "i1", "domain": "news", "ts": "soon"})),
        (
            "news",
            orjson.dumps(
                {"user_id": "u", "item_id": "i1", "domain": "news", "ts": 3, "weight": -1}
            ),
        ),
    ]
    mixed_items = items[:20] + bad_items + items[20:]
    mixed_inters = [m for pair in zip(inters[:4], bad_inters, strict=True) for m in pair] + inters[
        4:
    ]
    produce_json(kafka_bootstrap, s.topic("items"), mixed_items)
    produce_json(kafka_bootstrap, s.topic("interactions"), mixed_inters)
    end = end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])
    worker = InProcessWorker(s)
    try:
        wait_for(lambda: worker.store.offsets() == end, 60, "the worker to get through the poison")
        assert worker.thread.is_alive()
        counters = domain_counters(worker.store)
    finally:
        worker.stop()
    assert sum(c.interactions for c in counters.values()) == 400
    assert sum(c.items for c in counters.values()) == 40
    dead = consume_all(kafka_bootstrap, s.topic("deadletter"), timeout_s=20)
    docs = [r.json() for r in dead]
    assert len(docs) == len(bad_items) + len(bad_inters)
    reasons = sorted(d["reason"] for d in docs)
    for needle in (
        "not JSON",
        "embedding_dim",
        "needs 'text' or 'embedding'",
        "domain_pattern",
        "exceeds max_message_bytes",
        "missing field 'item_id'",
        "'ts' must be an integer",
        "'weight'",
    ):
        assert any(needle in r for r in reasons), (needle, reasons)
    for d in docs:
        assert d["topic"] in (s.topic("items"), s.topic("interactions"))
        assert isinstance(d["offset"], int) and isinstance(d["partition"], int)
    binary = next(d for d in docs if d["value_encoding"] == "hex")
    assert bytes.fromhex(binary["value"]) == b"\xff\xfe binary"


def test_sigterm_mid_stream_stops_cleanly_with_consistent_state(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused")
    end = produce_events(s, 200, 20_000, partitions=3, seed=3)[2]
    state = tmp_path / "state"
    env = worker_env(kafka_bootstrap, topic_prefix, state, poll_max_records=50)
    log = tmp_path / "w.log"
    worker = start_worker(env, log)
    worker.wait_until(lambda: sum(applied_offsets(state).values()) > 500, 60, "some progress")
    assert worker.stop(timeout_s=30) == 0, worker.log_tail()
    assert "received SIGTERM" in log.read_text()

    def consistent() -> int:
        store = RocksDBPartition.open(state, read_only=True)
        try:
            offsets = store.offsets()
            counters = domain_counters(store)
            applied = sum(o for (t, _), o in offsets.items() if t == s.topic("interactions"))
            assert sum(c.interactions for c in counters.values()) == applied
            assert store.count("interactions") == applied
            return applied
        finally:
            store.close()

    stopped_at = consistent()
    assert 0 < stopped_at < 20_000
    worker = start_worker(env, log)
    try:
        wait_for(lambda: applied_offsets(state) == end, 120, "the restarted worker to finish")
    finally:
        assert worker.stop(timeout_s=30) == 0, worker.log_tail()
    assert consistent() == 20_000
    final = dump_state(state, ("meta",))
    counters = {k: DomainCounters.decode(v) for k, v in final["meta"] if k.startswith(b"domain/")}
    assert sum(c.items for c in counters.values()) == 200


def test_cli_rejects_a_bad_setting_with_the_key_and_the_fix(tmp_path: Path) -> None:
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.commands.cli",
            "stats",
            "--state-dir",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "worker.commands.cli", "run", "--poll-max-records", "zero"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 2 and "'poll_max_records'" in out.stderr and "integer" in out.stderr
