"""Fine-tune requests are state, through the real broker and a real ``adacode run``: a worker
gets ``finetune`` commands for several domains, is stopped with SIGTERM while requests are
still queued, is restarted, and every requested domain ends with exactly one version (each
request ran to a final outcome once: no request lost, none run again after its publish)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from store.exceptions import StateFormatError
from store.rocksdb import RocksDBPartition
from tests.kafka_utils import produce_json
from tests.worker_process import (
    DIM,
    ON_REQUEST,
    secondary,
    settings_for,
    start_worker,
    worker_env,
)
from worker.commands.topics import create_topics
from worker.ingest.events import control_payload, interaction_payload, item_payload
from worker.state.requests import pending_requests
from worker.state.versions import domains_with_versions, list_records

DOMAINS = tuple(f"d{k}" for k in range(5))
SETTINGS = ON_REQUEST  # only the requests trigger fine-tunes


def _events() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    rng = np.random.default_rng(0)
    items, inters = [], []
    for domain in DOMAINS:
        centers = rng.normal(size=(4, DIM))
        for i in range(40):
            emb = centers[i % 4] + 0.1 * rng.normal(size=DIM)
            items.append((domain, item_payload(f"i{i}", domain, 1, embedding=emb)))
        ts = 1000
        for u in range(40):
            pos = int(rng.integers(0, 40))
            for _ in range(8):
                inters.append((domain, interaction_payload(f"u{u}", f"i{pos % 40}", domain, ts)))
                ts += 1
                pos += 4
    return items, inters


def _versioned(state_dir: Path) -> set[str]:
    """The domains with a version in the running worker's state (none before it made it)."""
    if not (state_dir / "CURRENT").exists():
        return set()
    try:
        with secondary(state_dir) as store:
            return set(domains_with_versions(store))
    except StateFormatError:  # half made: the worker is creating it
        return set()


def test_queued_requests_survive_a_sigterm_and_each_runs_once_after_the_restart(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    s = settings_for(kafka_bootstrap, topic_prefix, state_dir, **SETTINGS)
    create_topics(s, partitions=1)
    items, inters = _events()
    produce_json(kafka_bootstrap, s.topic("items"), items)
    produce_json(kafka_bootstrap, s.topic("interactions"), inters)
    produce_json(
        kafka_bootstrap,
        s.topic("control"),
        [(d, control_payload("finetune", d)) for d in DOMAINS],
    )
    env = worker_env(kafka_bootstrap, topic_prefix, state_dir, **SETTINGS)
    log_path = tmp_path / "worker.log"

    # -- 1. the first run: stopped once the first domain has its version -----------------
    worker = start_worker(env, log_path)
    worker.wait_until(lambda: bool(_versioned(state_dir)), 180, "a first version")
    assert worker.stop() == 0, worker.log_tail()
    store = RocksDBPartition.open(state_dir, read_only=True)
    try:
        pending = {r.domain for r in pending_requests(store)}
        versioned = set(domains_with_versions(store))
    finally:
        store.close()
    assert versioned and pending, (versioned, pending)  # stopped in the middle of the queue
    assert pending | versioned == set(DOMAINS) and not pending & versioned

    # -- 2. the restart: every pending request runs, once --------------------------------
    worker = start_worker(env, log_path)
    worker.wait_until(lambda: _versioned(state_dir) == set(DOMAINS), 240, "every version")
    assert worker.stop() == 0, worker.log_tail()
    store = RocksDBPartition.open(state_dir, read_only=True)
    try:
        assert pending_requests(store) == []
        for domain in DOMAINS:
            assert [r.version for r in list_records(store, domain)] == [1], domain
    finally:
        store.close()
    log = log_path.read_text()
    assert f"queued {len(pending)} pending fine-tune request(s)" in log
    for domain in DOMAINS:  # one publish each, and no run again after it
        assert len(re.findall(rf"fine-tune {domain}: version \d+ published", log)) == 1
        # the only skips: requests read before the background codebook was adopted
        # (not ready: kept and retried), never a run after the publish
        skips = re.findall(rf"fine-tune of {domain} skipped: (.*)", log)
        assert all("coded interactions" in why for why in skips), skips
        published_at = log.index(f"fine-tune {domain}: version")
        assert f"fine-tune of {domain} skipped" not in log[published_at:]
