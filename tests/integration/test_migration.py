"""A live codebook migration through the real broker and real ``adacode run`` processes.

A worker with a published version gets ``migrate`` on the control topic, is killed with
SIGKILL as soon as it logs its cut-over to the candidate (wherever the migration is then:
the cut-over batch not yet committed, the catch-up, or the fine-tune it leads to), and is
started again: the migration resumes, every item ends coded with the new codebook, the
version of the old codebook keeps its codes (fed with the items that came since), the
fine-tune the migration requests publishes a version of the new codebook, and the group's
codebook topic moved on with it, so the next start is accepted.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import orjson

from quantize.codebook import ResidualCodebook
from store.exceptions import StateFormatError
from store.rocksdb import RocksDBPartition
from tests.kafka_utils import produce_json
from tests.worker_process import (
    DIM,
    ON_REQUEST,
    applied_offsets,
    end_offsets,
    secondary,
    settings_for,
    start_worker,
    worker_env,
)
from worker.commands.launch import WorkerProcess
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.ingest.events import control_payload, interaction_payload, item_payload
from worker.ingest.group import CodebookLog
from worker.state.layout import MIGRATE_REQUEST, MIGRATE_STATE
from worker.state.reads import (
    code_namespaces,
    codebook_lineage,
    committed_assigner,
    load_codebook,
    load_codebook_by_id,
)
from worker.state.requests import pending_requests
from worker.state.versions import current_version, list_records

SETTINGS = ON_REQUEST  # a request, then the migration, trigger the fine-tunes
CUT_OVER = "codebook migration: cut over from"
STARTING = "starting worker with settings"
CODED = re.compile(r"codebook migration to (\w+): every item is coded")


def _items(start: int, n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, DIM))
    return [
        (
            "shop",
            item_payload(f"i{i}", "shop", 1, embedding=centers[i % 6] + 0.2 * rng.normal(size=DIM)),
        )
        for i in range(start, start + n)
    ]


def _interactions() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(1)
    out, ts = [], 1000
    for u in range(60):
        pos = int(rng.integers(0, 240))
        for _ in range(8):
            out.append(("shop", interaction_payload(f"u{u}", f"i{pos % 240}", "shop", ts)))
            ts += 1
            pos += 6
    return out


def _versions(state_dir: Path) -> list[int]:
    if not (state_dir / "CURRENT").exists():
        return []
    try:
        with secondary(state_dir) as store:
            return [r.version for r in list_records(store, "shop") if r.status == "published"]
    except StateFormatError:  # half made: the worker is creating it
        return []


def _embeddings(events: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    docs = [orjson.loads(value) for _, value in events]
    return {d["item_id"]: np.asarray(d["embedding"], dtype=np.float32) for d in docs}


def _first_version(
    s: Settings, env: dict[str, str], log_path: Path
) -> tuple[WorkerProcess, list[tuple[str, bytes]], ResidualCodebook]:
    """Topics, 240 items, the interactions and a fine-tune request; a worker started and
    waited for until version 1 (of the bootstrap codebook) is published: the worker, the
    item events and that codebook."""
    create_topics(s, partitions=1)
    first = _items(0, 240, seed=0)
    produce_json(s.kafka_bootstrap, s.topic("items"), first)
    produce_json(s.kafka_bootstrap, s.topic("interactions"), _interactions())
    produce_json(
        s.kafka_bootstrap, s.topic("control"), [("shop", control_payload("finetune", "shop"))]
    )
    worker = start_worker(env, log_path)
    state_dir = Path(s.state_dir)
    worker.wait_until(lambda: _versions(state_dir) == [1], 180, "version 1")
    with secondary(state_dir) as store:
        old = load_codebook(store)
    assert old is not None
    return worker, first, old


def _check_migrated(
    state_dir: Path, old: ResidualCodebook, new_id: str, items: list[tuple[str, bytes]]
) -> ResidualCodebook:
    """The state after a migration from ``old`` to ``new_id``: the new codebook current,
    nothing requested or under way, v1 of the old codebook and v2 (current) of the new,
    every item coded with each codebook (the old one's codes kept for v1)."""
    store = RocksDBPartition.open(state_dir, read_only=True)
    try:
        new = load_codebook(store)
        assert new is not None and new.codebook_id == new_id != old.codebook_id
        assert codebook_lineage(store) == [old.codebook_id, new.codebook_id]
        assert (
            store.get("meta", MIGRATE_REQUEST) is None and store.get("meta", MIGRATE_STATE) is None
        )
        assert pending_requests(store) == []
        records = {r.version: r for r in list_records(store, "shop")}
        assert records[1].codebook_id == old.codebook_id
        assert records[2].codebook_id == new.codebook_id and current_version(store, "shop") == 2
        # every item coded with each codebook: the new one's, and the old one's kept for v1
        assert set(code_namespaces(store)) == {old.codebook_id, new.codebook_id}
        assert load_codebook_by_id(store, old.codebook_id) == old
        vectors = _embeddings(items)
        keys = sorted(vectors)
        stacked = np.stack([vectors[k] for k in keys])
        for codebook, ns in ((new, None), (old, code_namespaces(store)[old.codebook_id])):
            assigner = committed_assigner(store, "shop", ns=ns)
            assert assigner is not None and sorted(assigner.keys) == keys
            for key, path in zip(keys, codebook.encode(stacked), strict=True):
                assert assigner.full_path(key) == tuple(int(c) for c in path), key
        return new
    finally:
        store.close()


def test_a_live_migration_killed_after_its_cut_over_resumes_and_publishes_on_the_new_codebook(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    state_dir, log_path = tmp_path / "state", tmp_path / "worker.log"
    s = settings_for(kafka_bootstrap, topic_prefix, state_dir, **SETTINGS)
    env = worker_env(kafka_bootstrap, topic_prefix, state_dir, **SETTINGS)

    # -- 1. a version of the first codebook, then the migration, killed after its cut-over -
    worker, first, old = _first_version(s, env, log_path)
    produce_json(kafka_bootstrap, s.topic("control"), [("", control_payload("migrate", ""))])
    worker.wait_until(lambda: CUT_OVER in log_path.read_text(), 180, "the cut-over")
    worker.kill()

    # -- 2. the restart: the migration resumes; items keep coming --------------------------
    later = _items(240, 20, seed=5)
    produce_json(kafka_bootstrap, s.topic("items"), later)
    end = end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])
    worker = start_worker(env, log_path)
    worker.wait_until(lambda: _versions(state_dir) == [1, 2], 240, "version 2")
    worker.wait_until(
        lambda: all(applied_offsets(state_dir).get(tp) == o for tp, o in end.items()),
        120,
        "every event applied",
    )
    rc = worker.stop()
    assert rc == 0, (rc, worker.log_tail())

    log = log_path.read_text()
    coded = CODED.findall(log)
    # the kill lands before or after the cut-over committed: done once or redone, the same
    targets = set(re.findall(CUT_OVER + r" \w+ to (\w+)", log))
    assert len(targets) == 1 and set(coded) == targets, worker.log_tail()
    new = _check_migrated(state_dir, old, coded[0], first + later)
    assert CodebookLog(s).chain()[-1] == new  # the group's codebook moved with it

    # -- 3. the next start is accepted: the group's codebook is this worker's ----------------
    starts = log_path.read_text().count(STARTING)
    worker = start_worker(env, log_path)

    def third_run() -> str:
        text = log_path.read_text()
        return text.rsplit(STARTING, 1)[-1] if text.count(STARTING) > starts else ""

    worker.wait_until(lambda: "partitions assigned" in third_run(), 120, "the third start")
    assert worker.stop() == 0, worker.log_tail()
    third = third_run()
    assert "CodebookConflictError" not in third and "codebook migration" not in third, third


def test_a_running_worker_follows_a_migration_another_worker_of_the_group_made(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Another worker of the group migrated (its successor record is on the codebook topic);
    this worker, running, reads the topic every ``codebook_watch_s`` and migrates to the
    group's codebook without a restart: the items (also those arriving meanwhile) end coded
    with it, v1 keeps the old codebook's codes, the fine-tune the migration leads to
    publishes v2 on the group's codebook, and the next start is accepted."""
    over = {**SETTINGS, "codebook_watch_s": 1}
    state_dir, log_path = tmp_path / "state", tmp_path / "worker.log"
    s = settings_for(kafka_bootstrap, topic_prefix, state_dir, **over)
    env = worker_env(kafka_bootstrap, topic_prefix, state_dir, **over)
    worker, first, old = _first_version(s, env, log_path)

    # -- another worker moves the group on; items keep coming -------------------------------
    vectors = _embeddings(first)
    theirs = ResidualCodebook.train(np.stack([vectors[k] for k in sorted(vectors)]), 3, 16)
    assert theirs.codebook_id != old.codebook_id
    assert CodebookLog(s).succeed(old.codebook_id, theirs) == theirs
    later = _items(240, 20, seed=5)
    produce_json(kafka_bootstrap, s.topic("items"), later)
    end = end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])
    worker.wait_until(lambda: _versions(state_dir) == [1, 2], 240, "version 2")
    worker.wait_until(
        lambda: all(applied_offsets(state_dir).get(tp) == o for tp, o in end.items()),
        120,
        "every event applied",
    )
    assert worker.stop() == 0, worker.log_tail()
    log = log_path.read_text()
    assert log.count(STARTING) == 1  # followed while running
    assert f"the group's codebook moved on to {theirs.codebook_id}" in log, worker.log_tail()
    assert CODED.findall(log) == [theirs.codebook_id]
    assert _check_migrated(state_dir, old, theirs.codebook_id, first + later) == theirs
    assert CodebookLog(s).chain() == [old, theirs]

    worker = start_worker(env, log_path)
    worker.wait_until(
        lambda: log_path.read_text().count("partitions assigned") >= 2, 120, "the second start"
    )
    assert worker.stop() == 0, worker.log_tail()
    second = log_path.read_text().rsplit(STARTING, 1)[-1]
    assert "CodebookConflictError" not in second and "codebook migration" not in second, second
