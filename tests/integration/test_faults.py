"""Faults the worker must survive or refuse clearly: a failing disk, SIGTERM during a
fine-tune, a state directory that is not ours."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from store.rocksdb import RocksDBPartition
from tests.kafka_utils import produce_json
from tests.worker_process import (
    DIM,
    REPO,
    applied_offsets,
    produce_events,
    settings_for,
    start_worker,
    wait_for,
    worker_env,
)
from worker.commands.topics import create_topics
from worker.ingest.events import interaction_payload, item_payload
from worker.state.reads import domain_counters
from worker.state.versions import current_version, list_records

LIMITED_RUN = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["adacode", "run"]
runpy.run_module("worker.commands.cli", run_name="__main__")
"""


def test_a_failing_disk_stops_the_worker_without_committing_and_a_restart_resumes(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused")
    end = produce_events(s, 100, 40_000, partitions=1, seed=7)[2]
    state = tmp_path / "state"
    env = worker_env(kafka_bootstrap, topic_prefix, state, poll_max_records=500)
    log = tmp_path / "w.log"
    with log.open("ab") as out:
        limited = subprocess.run(
            [sys.executable, "-c", LIMITED_RUN, str(1_500_000)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )
    text = log.read_text()
    assert limited.returncode not in (0, -signal.SIGKILL), text[-2000:]
    assert "state store failed" in text and "nothing of it was committed" in text, text[-2000:]
    partial = applied_offsets(state)
    assert sum(partial.values()) < sum(end.values())  # it stopped instead of skipping ahead

    worker = start_worker(env, log)
    try:
        wait_for(lambda: applied_offsets(state) == end, 120, "the restarted worker to finish")
    finally:
        assert worker.stop(timeout_s=30) == 0, worker.log_tail()
    store = RocksDBPartition.open(state, read_only=True)
    try:
        counters = domain_counters(store)
        assert sum(c.interactions for c in counters.values()) == 40_000
        assert store.count("interactions") == 40_000
    finally:
        store.close()


def test_sigterm_during_a_fine_tune_publishes_nothing(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused")
    create_topics(s, partitions=1)
    rng = np.random.default_rng(0)
    items = [
        ("shop", item_payload(f"i{i}", "shop", 1, embedding=rng.normal(size=DIM)))
        for i in range(150)
    ]
    inters = [
        ("shop", interaction_payload(f"u{k % 300}", f"i{int(rng.integers(150))}", "shop", 100 + k))
        for k in range(6000)
    ]
    produce_json(kafka_bootstrap, s.topic("items"), items)
    produce_json(kafka_bootstrap, s.topic("interactions"), inters)
    state = tmp_path / "state"
    env = worker_env(
        kafka_bootstrap,
        topic_prefix,
        state,
        codebook_min_items=100,
        finetune_after_interactions=1000,
        finetune_interval_s=0,
        finetune_epochs=500,
        finetune_retry_s=1,
        finetune_max_seconds=600,
        finetune_hidden=512,  # epochs long enough that the stop lands inside one, not after
    )
    log = tmp_path / "w.log"
    worker = start_worker(env, log)
    worker.wait_until(
        lambda: "fine-tune shop epoch 1" in log.read_text(), 120, "a fine-tune to be training"
    )
    assert worker.stop(timeout_s=60) == 0, worker.log_tail()
    text = log.read_text()
    assert "abandoned" in text, text[-3000:]
    store = RocksDBPartition.open(state, read_only=True)
    try:
        assert current_version(store, "shop") is None
        assert list_records(store, "shop") == []
    finally:
        store.close()


def test_a_state_directory_that_is_not_ours_is_refused_with_the_fix(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "notes.txt").write_text("someone else's files")
    env = worker_env("127.0.0.1:1", "x.", state)
    out = subprocess.run(
        [sys.executable, "-m", "worker.commands.cli", "run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert str(state) in out.stderr and "not a RocksDB database" in out.stderr
    assert "move it away or point state_dir elsewhere" in out.stderr
    assert (state / "notes.txt").read_text() == "someone else's files"  # left untouched
