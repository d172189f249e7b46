"""End to end through the real broker: events, scheduled fine-tune, v1, more events, v2,
rollback to v1 through the control topic while the worker runs, vectors equal v1's (both
versions project the items' frozen embeddings)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from tests.kafka_utils import consume_all, produce_json
from tests.worker_process import DIM, REPO, settings_for, wait_for, worker_env
from worker.app.daemon import Daemon
from worker.commands.topics import create_topics
from worker.ingest.events import interaction_payload, item_payload
from worker.serving.http import Request
from worker.state.versions import current_version, item_vectors, list_records, load_table


def _interactions(n_users: int, start_ts: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    ts = start_ts
    for u in range(n_users):
        cluster, pos = u % 6, int(rng.integers(0, 20))
        for _ in range(8):
            out.append(
                ("shop", interaction_payload(f"u{u}", f"i{cluster * 20 + pos % 20}", "shop", ts))
            )
            ts += 1
            pos += 1
    return out


def test_scheduled_fine_tunes_publish_and_a_live_rollback_restores_v1_vectors(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(
        kafka_bootstrap,
        topic_prefix,
        tmp_path / "state",
        codebook_min_items=60,
        finetune_min_interactions=100,
        finetune_after_interactions=800,
        finetune_interval_s=0.0,
        finetune_epochs=3,
        finetune_hidden=16,
        gate_tolerance=1.0,
    )
    create_topics(s, partitions=1)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, DIM))
    items = [
        (
            "shop",
            item_payload(
                f"i{i}", "shop", 1, embedding=centers[i // 20] + 0.1 * rng.normal(size=DIM)
            ),
        )
        for i in range(120)
    ]
    produce_json(kafka_bootstrap, s.topic("items"), items)
    produce_json(kafka_bootstrap, s.topic("interactions"), _interactions(110, 1000, 1))
    daemon = Daemon(s)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: current_version(daemon.store, "shop") == 1, 120, "version 1")
        v1_table = load_table(daemon.store, "shop", 1)
        assert v1_table.snapshot.config.text_dim == DIM  # the frozen embeddings are projected
        v1_vectors = item_vectors(v1_table)

        produce_json(kafka_bootstrap, s.topic("interactions"), _interactions(110, 5000, 2))
        wait_for(lambda: current_version(daemon.store, "shop") == 2, 120, "version 2")
        assert not np.array_equal(item_vectors(load_table(daemon.store, "shop", 2)), v1_vectors)

        env = worker_env(kafka_bootstrap, topic_prefix, tmp_path / "state")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "worker.commands.cli",
                "rollback",
                "--domain",
                "shop",
                "--to",
                "1",
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "sent on" in out.stdout  # the worker holds the state: through the control topic
        wait_for(lambda: current_version(daemon.store, "shop") == 1, 60, "the rollback")
        np.testing.assert_array_equal(
            item_vectors(
                load_table(daemon.store, "shop", current_version(daemon.store, "shop") or 0)
            ),
            v1_vectors,
        )
        metrics = daemon.router.dispatch(Request("GET", "/metrics", {}, {}, b"")).body.decode()
        assert 'adacode_current_version{domain="shop"} 1.0' in metrics
        assert 'adacode_code_collision_rate{domain="shop",scope="head"} 0.0' in metrics
        assert 'adacode_code_utilization{domain="shop",level="0"}' in metrics
        assert 'adacode_applied_events_total{domain="shop",kind="interaction"} 1760.0' in metrics
        state_memory = dict(
            re.findall(r'adacode_state_memory_bytes\{part="(\w+)"\} (\S+)', metrics)
        )
        assert state_memory.keys() == {"memtables", "block_cache", "table_readers"}
        assert float(state_memory["memtables"]) > 0  # what the daemon applied, not yet flushed
        records = list_records(daemon.store, "shop")
        assert [r.version for r in records] == [1, 2] and records[1].parent == 1
        assert records[1].note == "incremental"
    finally:
        daemon.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
    events = [r.json() for r in consume_all(kafka_bootstrap, s.topic("snapshots"), timeout_s=20)]
    assert [(e["event"], e.get("version", e.get("to"))) for e in events] == [
        ("published", 1),
        ("published", 2),
        ("rollback", 1),
    ]
