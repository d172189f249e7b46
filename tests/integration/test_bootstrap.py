"""The codebook bootstrap runs in the background while events go on: a SIGKILL in the middle
of it restarts to the state of an uninterrupted run; a SIGTERM in the middle exits 0 at once.

Real broker, real ``adacode run`` processes. The bootstrap is made to last seconds (64-d
items, 8 levels of 256 codewords on 20,000 items) so the signals land inside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from store.rocksdb import RocksDBPartition
from tests.kafka_utils import produce_json
from tests.worker_process import (
    applied_offsets,
    dump_state,
    end_offsets,
    settings_for,
    start_worker,
    wait_for,
    worker_env,
)
from worker.commands.topics import create_topics
from worker.ingest.events import interaction_payload, item_payload
from worker.state.layout import CODEBOOK_CURRENT
from worker.state.reads import committed_assigner

DIM = 64
N_ITEMS = 20_000
TUNING: dict[str, object] = {
    "embedding_dim": DIM,
    "codebook_min_items": 2_000,
    "code_levels": 8,
    "code_k": 256,
    "poll_max_records": 2_000,
}
TRAINING = "codebook bootstrap: training"
DONE = "every item held before the codebook is coded"


def _events(seed: int = 0) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, DIM))
    items = [
        (
            "shop",
            item_payload(
                f"i{i}", "shop", 1, embedding=centers[i % 40] + 0.3 * rng.normal(size=DIM)
            ),
        )
        for i in range(N_ITEMS)
    ]
    hot = rng.zipf(1.3, size=20_000) % N_ITEMS
    inters = [
        ("shop", interaction_payload(f"u{k % 500}", f"i{hot[k]}", "shop", 100 + k))
        for k in range(20_000)
    ]
    return items, inters


def _final(state_dir: Path) -> tuple[bytes | None, dict[str, tuple[int, ...]]]:
    store = RocksDBPartition.open(state_dir, read_only=True)
    try:
        assigner = committed_assigner(store, "shop")
        assert assigner is not None
        return store.get("meta", CODEBOOK_CURRENT), {
            key: assigner.full_path(key) for key in assigner.keys
        }
    finally:
        store.close()


def _run_to_the_end(env: dict[str, str], log: Path, state: Path, end: dict) -> None:
    worker = start_worker(env, log)
    try:
        wait_for(lambda: applied_offsets(state) == end, 180, "every event applied")
        wait_for(lambda: DONE in log.read_text(), 180, "every item coded")
    finally:
        assert worker.stop(timeout_s=30) == 0, worker.log_tail()


def test_a_sigkill_mid_bootstrap_restarts_to_the_uninterrupted_state_and_sigterm_exits_0(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused", **TUNING)
    create_topics(s, partitions=1)
    items, inters = _events()
    produce_json(kafka_bootstrap, s.topic("items"), items)
    produce_json(kafka_bootstrap, s.topic("interactions"), inters)
    end = end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])

    # -- a SIGTERM during the bootstrap: exit 0 within 10 s --------------------------------
    termed = tmp_path / "termed"
    log = tmp_path / "termed.log"
    worker = start_worker(worker_env(kafka_bootstrap, topic_prefix, termed, **TUNING), log)
    wait_for(lambda: TRAINING in log.read_text(), 120, "the bootstrap to start")
    started = time.monotonic()
    assert worker.stop(timeout_s=10) == 0, worker.log_tail()
    assert time.monotonic() - started < 10
    assert "adopted codebook" not in log.read_text(), "the SIGTERM landed after the bootstrap"

    # -- a SIGKILL during the bootstrap, then a restart ------------------------------------
    crashed = tmp_path / "crashed"
    log = tmp_path / "crashed.log"
    env = worker_env(
        kafka_bootstrap, topic_prefix, crashed, kafka_group_id=f"{topic_prefix}crash", **TUNING
    )
    worker = start_worker(env, log)
    wait_for(lambda: TRAINING in log.read_text(), 120, "the bootstrap to start")
    time.sleep(0.5)  # events keep being applied meanwhile
    during = sum(applied_offsets(crashed).values())
    worker.kill()
    assert "adopted codebook" not in log.read_text(), "the SIGKILL landed after the bootstrap"
    _run_to_the_end(env, log, crashed, end)

    # the uninterrupted run: the same events on topics of its own (a worker takes the
    # codebook its topics already hold, so it must not see the first run's)
    other = f"{topic_prefix}clean."
    c = settings_for(kafka_bootstrap, other, tmp_path / "unused", **TUNING)
    create_topics(c, partitions=1)
    produce_json(kafka_bootstrap, c.topic("items"), items)
    produce_json(kafka_bootstrap, c.topic("interactions"), inters)
    clean_end = end_offsets(kafka_bootstrap, [c.topic("items"), c.topic("interactions")])
    clean = tmp_path / "clean"
    log = tmp_path / "clean.log"
    _run_to_the_end(worker_env(kafka_bootstrap, other, clean, **TUNING), log, clean, clean_end)
    assert TRAINING in log.read_text()  # it trained its own

    # the same sample trained again: the same codebook, the same full paths
    codebook, paths = _final(crashed)
    assert (codebook, paths) == _final(clean)
    assert codebook is not None and len(paths) == N_ITEMS
    derived = ("items", "popularity", "interactions", "users")
    got, want = dump_state(crashed, derived), dump_state(clean, derived)
    for cf in derived:
        assert got[cf] == want[cf], f"{cf} differs after a SIGKILL mid-bootstrap"
    assert during > 0  # the consumer went on while the codebook trained
