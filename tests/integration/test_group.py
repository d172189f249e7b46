"""Several workers in one consumer group, against the real broker and real RocksDB.

Domains map to partitions (key = domain). A worker SIGKILLed mid-stream loses its
partitions to the others, which restore the domains' table versions from the versions
topic and rebuild the derived state by replaying the partitions' events. The final
state must equal a single uninterrupted worker's, item by item, and no version number
may be reused.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from quantize.codebook import ResidualCodebook
from store.rocksdb import RocksDBPartition
from tests.kafka_utils import produce_json
from tests.worker_process import (
    DIM,
    applied_offsets,
    dump_state,
    end_offsets,
    secondary,
    settings_for,
    start_worker,
    wait_for,
    worker_env,
)
from worker.commands.launch import WorkerProcess
from worker.commands.operations import send_control
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.ingest.events import interaction_payload, item_payload
from worker.ingest.group import CodebookLog, domain_partition
from worker.state.layout import ASSIGNER_PREFIX, domain_of_assigner_key, domain_prefix
from worker.state.reads import committed_assigner, domain_counters, load_codebook
from worker.state.versions import current_version, get_record, list_records

PARTITIONS = 3
#: fine-tunes only on request (control topic), small and fast
TUNING: dict[str, object] = {
    "finetune_min_interactions": 100,
    "finetune_after_interactions": 0,
    "finetune_interval_s": 0.0,
    "finetune_epochs": 2,
    "finetune_hidden": 16,
    "gate_tolerance": 1.0,
    "poll_max_records": 100,
    # Codes are compared too. A code round depends on which of its domain's items were
    # coded by then, i.e. on how the worker interleaved the items and interactions
    # topics, which a moved domain replays afresh: no rounds here (see README, "Codes").
    "code_round_share": 0.0,
    "code_round_min_interactions": 10_000,
}
#: derived state, compared key by key with the uninterrupted worker's
DERIVED = ("items", "popularity", "interactions", "users")


def _domains() -> list[str]:
    """Two domains per partition, so that every worker owns some and moves are visible."""
    found: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    k = 0
    while any(len(v) < 2 for v in found.values()):
        name = f"d{k}"
        part = domain_partition(name, PARTITIONS)
        if len(found[part]) < 2:
            found[part].append(name)
        k += 1
    return sorted(d for v in found.values() for d in v)


def _stream(
    domains: list[str], seed: int = 0
) -> tuple[np.ndarray, list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Clustered items with embeddings and users who stay in a cluster (learnable)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, DIM))
    vectors, items, inters = [], [], []
    ts = 10_000
    for d in domains:
        for i in range(60):
            v = centers[i // 10] + 0.1 * rng.normal(size=DIM)
            vectors.append(v)
            items.append((d, item_payload(f"i{i}", d, 1, embedding=v)))
    for step in range(8):
        for d in domains:
            for u in range(40):
                cluster = u % 6
                item = cluster * 10 + (u + step) % 10
                inters.append((d, interaction_payload(f"u{u}", f"i{item}", d, ts)))
                ts += 1
    return np.asarray(vectors, dtype=np.float32), items, inters


def _publish_codebook(settings: Settings, vectors: np.ndarray) -> None:
    CodebookLog(settings).agree(ResidualCodebook.train(vectors, 2, 8, seed=0))


def _load(
    s: Settings,
    vectors: np.ndarray,
    items: list[tuple[str, bytes]],
    inters: list[tuple[str, bytes]],
) -> dict[tuple[str, int], int]:
    """The topics, the group's codebook and the whole stream on the broker; the end
    offsets of the items and interactions topics."""
    create_topics(s, partitions=PARTITIONS)
    _publish_codebook(s, vectors)
    produce_json(s.kafka_bootstrap, s.topic("items"), items)
    produce_json(s.kafka_bootstrap, s.topic("interactions"), inters)
    return end_offsets(s.kafka_bootstrap, [s.topic("items"), s.topic("interactions")])


def _served_codes(state_dir: Path) -> dict[str, dict[str, tuple[tuple[int, ...], bool]]]:
    out: dict[str, dict[str, tuple[tuple[int, ...], bool]]] = {}
    store = RocksDBPartition.open(state_dir, read_only=True)
    try:
        domains = {
            domain_of_assigner_key(key) for key, _ in store.items("codes", prefix=ASSIGNER_PREFIX)
        }
        for domain in sorted(domains):
            assigner = committed_assigner(store, domain)
            assert assigner is not None
            out[domain] = {
                k: (tuple(assigner.served_code(k)), assigner.is_head(k)) for k in assigner.keys
            }
    finally:
        store.close()
    return out


def _domain_state(state_dir: Path, domains: list[str]) -> dict[str, list[tuple[bytes, bytes]]]:
    dumped = dump_state(state_dir, DERIVED)
    prefixes = tuple(domain_prefix(d) for d in domains)
    return {cf: [kv for kv in dumped[cf] if kv[0].startswith(prefixes)] for cf in DERIVED}


def _reference(
    bootstrap: str,
    prefix: str,
    tmp: Path,
    vectors: np.ndarray,
    items: list[tuple[str, bytes]],
    inters: list[tuple[str, bytes]],
) -> Path:
    """One uninterrupted worker over the same events, on its own topics."""
    s = settings_for(bootstrap, prefix, tmp / "ref", **TUNING)
    end = _load(s, vectors, items, inters)
    env = worker_env(bootstrap, prefix, tmp / "ref", **TUNING)
    worker = start_worker(env, tmp / "ref.log")
    try:
        wait_for(lambda: _applied(tmp / "ref", end), 120, "the reference worker")
    finally:
        assert worker.stop(timeout_s=60) == 0, worker.log_tail()
    return tmp / "ref"


def _applied(state_dir: Path, end: dict[tuple[str, int], int]) -> bool:
    got = applied_offsets(state_dir)
    return all(got.get(tp, 0) >= off for tp, off in end.items())


def _combined(dirs: list[Path]) -> dict[tuple[str, int], int]:
    """Per partition, the furthest any worker got."""
    out: dict[tuple[str, int], int] = {}
    for d in dirs:
        for tp, off in applied_offsets(d).items():
            out[tp] = max(out.get(tp, 0), off)
    return out


def _assigned(log_path: Path) -> set[str]:
    """The partitions a worker owns now, from its last assignment log line."""
    lines = [ln for ln in log_path.read_text().splitlines() if "partitions assigned:" in ln]
    if not lines:
        return set()
    listed = lines[-1].split("partitions assigned:", 1)[1]
    return {p.strip(" '[]") for p in listed.split(",") if p.strip(" '[]")}


def _caught_up(state_dir: Path, log_path: Path, end: dict[tuple[str, int], int]) -> bool:
    """Whether a worker applied every assigned partition up to ``end``."""
    got = applied_offsets(state_dir)
    own = _assigned(log_path)
    return all(got.get(tp, 0) >= off for tp, off in end.items() if f"{tp[0]}-{tp[1]}" in own)


def _stop(procs: dict[str, WorkerProcess]) -> dict[str, int]:
    """SIGTERM every running worker at once; their exit codes (a graceful stop exits 0)."""
    running = {n: p for n, p in procs.items() if p.poll() is None}
    for worker in running.values():
        worker.terminate()
    return {n: p.stop(timeout_s=60) for n, p in running.items()}


def _versions(state_dir: Path, domain: str) -> tuple[int | None, list[int]]:
    with secondary(state_dir) as store:
        return current_version(store, domain), [r.version for r in list_records(store, domain)]


def _assert_equal_to_reference(
    final: dict[str, Path], ref: Path, domains: list[str], why: str
) -> None:
    """Each domain's derived state in the worker that owns it now equals the reference's."""
    ref_codes = _served_codes(ref)
    for domain in domains:
        got = _domain_state(final[domain], [domain])
        want = _domain_state(ref, [domain])
        for cf in DERIVED:
            assert got[cf] == want[cf], f"{cf} of {domain} differs ({why})"
        assert _served_codes(final[domain]).get(domain) == ref_codes[domain], (
            f"codes of {domain} differ ({why})"
        )
        assert want["items"], f"{domain} has no items: the stream did not reach the reference"


def _owner_dirs(
    dirs: dict[str, Path], domains: list[str], end: dict[tuple[str, int], int], topic: str
) -> dict[str, Path]:
    """For each domain, a worker whose store applied its partition to the end."""
    out: dict[str, Path] = {}
    for domain in domains:
        part = domain_partition(domain, PARTITIONS)
        for name in sorted(dirs):
            if applied_offsets(dirs[name]).get((topic, part), 0) >= end[(topic, part)]:
                out[domain] = dirs[name]
                break
        assert domain in out, f"no worker applied partition {part} ({domain}) to the end"
    return out


@pytest.mark.parametrize("n_workers", [2, 3])
def test_sigkill_moves_domains_state_equals_one_worker_and_versions_keep_counting(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, n_workers: int
) -> None:
    domains = _domains()
    vectors, items, inters = _stream(domains)
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused", **TUNING)
    create_topics(s, partitions=PARTITIONS)
    _publish_codebook(s, vectors)
    half = len(inters) // 2
    produce_json(kafka_bootstrap, s.topic("items"), items)
    produce_json(kafka_bootstrap, s.topic("interactions"), inters[:half])
    end1 = end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])

    names = [f"w{k}" for k in range(n_workers)]
    dirs = {n: tmp_path / n for n in names}
    procs: dict[str, WorkerProcess] = {}
    for n in names:
        env = worker_env(
            kafka_bootstrap, topic_prefix, dirs[n], kafka_group_instance_id=n, **TUNING
        )
        procs[n] = start_worker(env, tmp_path / f"{n}.log")
    try:
        wait_for(
            lambda: all(_combined(list(dirs.values())).get(tp, 0) >= o for tp, o in end1.items()),
            120,
            "the group to apply the first half",
        )
        # every worker owns something: the assignment spread the partitions
        wait_for(
            lambda: (
                all(_assigned(tmp_path / f"{n}.log") for n in names)
                and len(set().union(*(_assigned(tmp_path / f"{n}.log") for n in names)))
                == 3 * PARTITIONS
            ),
            60,
            f"the partitions to spread over {names}",
        )
        wait_for(
            lambda: all(_caught_up(dirs[n], tmp_path / f"{n}.log", end1) for n in names),
            120,
            "every worker to apply its partitions",
        )

        # v1 of one domain, published by its owner
        target = domains[0]
        part = domain_partition(target, PARTITIONS)
        inter_tp = (s.topic("interactions"), part)
        owner = next(
            n for n in names if f"{inter_tp[0]}-{part}" in _assigned(tmp_path / f"{n}.log")
        )
        send_control(s, "finetune", target)
        wait_for(lambda: _versions(dirs[owner], target)[0] == 1, 180, f"v1 of {target}")

        # the owner dies mid-stream
        produce_json(kafka_bootstrap, s.topic("interactions"), inters[half : half + 200])
        assert procs[owner].kill() == -signal.SIGKILL
        produce_json(kafka_bootstrap, s.topic("interactions"), inters[half + 200 :])
        end = end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])
        survivors = [n for n in names if n != owner]
        wait_for(
            lambda: all(
                _combined([dirs[n] for n in survivors]).get(tp, 0) >= o for tp, o in end.items()
            ),
            180,
            "the survivors to take over and apply everything",
        )
        heir = next(
            n for n in survivors if f"{inter_tp[0]}-{part}" in _assigned(tmp_path / f"{n}.log")
        )
        # the heir restored v1 from the versions topic: the next version is 2, not 1
        assert _versions(dirs[heir], target) == (1, [1])
        send_control(s, "finetune", target)
        wait_for(lambda: _versions(dirs[heir], target) == (2, [1, 2]), 180, f"v2 of {target}")
        # a rollback through the control topic is honoured by the new owner
        send_control(s, "rollback", target, version=1)
        wait_for(lambda: _versions(dirs[heir], target)[0] == 1, 60, "the rollback to v1")
    finally:
        stopped = _stop(procs)
    for n, code in stopped.items():
        assert code == 0, f"{n} exited {code}: " + (tmp_path / f"{n}.log").read_text()[-3000:]

    # rebalance work stays far inside max.poll.interval.ms (600 s): restores are quick
    restores = [
        float(line.rsplit(",", 1)[1].strip().split()[0])
        for n in names
        for line in (tmp_path / f"{n}.log").read_text().splitlines()
        if "restored table versions" in line
    ]
    assert restores and max(restores) < 30, restores
    survivors_dirs = {n: dirs[n] for n in names if n != owner}
    final = _owner_dirs(survivors_dirs, domains, end, s.topic("interactions"))
    ref = _reference(kafka_bootstrap, f"{topic_prefix}ref.", tmp_path, vectors, items, inters)
    _assert_equal_to_reference(final, ref, domains, f"{n_workers} workers, {owner} killed")


def test_workers_killed_and_restarted_repeatedly_apply_every_record_exactly_once(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Kafka Streams' EOS system test, in small: a known stream, three workers started,
    SIGKILLed and restarted at random while it is produced; a verifier checks the final
    state of every domain (counts and content) against one uninterrupted worker."""
    domains = _domains()
    vectors, items, inters = _stream(domains, seed=3)
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused", **TUNING)
    create_topics(s, partitions=PARTITIONS)
    _publish_codebook(s, vectors)
    names = ["w0", "w1", "w2"]
    dirs = {n: tmp_path / n for n in names}
    envs = {
        n: worker_env(kafka_bootstrap, topic_prefix, dirs[n], kafka_group_instance_id=n, **TUNING)
        for n in names
    }
    logs = {n: tmp_path / f"{n}.log" for n in names}
    procs = {n: start_worker(envs[n], logs[n]) for n in names}
    started_at = dict.fromkeys(names, 0)  # log size at each worker's last start
    produce_json(kafka_bootstrap, s.topic("items"), items)

    chunks = [inters[i : i + 150] for i in range(0, len(inters), 150)]

    def produce() -> None:
        for chunk in chunks:
            produce_json(kafka_bootstrap, s.topic("interactions"), chunk)
            threading.Event().wait(0.4)

    producer = threading.Thread(target=produce)
    producer.start()
    rng = random.Random(7)
    kills = 0
    try:
        while producer.is_alive() or kills < 4:
            victim = rng.choice(names)
            # kill it while it works: once it has joined the group since its last start
            wait_for(
                lambda v=victim: "partitions assigned" in logs[v].read_text()[started_at[v] :],  # type: ignore[misc]
                120,
                f"{victim} to join the group",
            )
            threading.Event().wait(rng.uniform(0.2, 1.5))
            assert procs[victim].kill() == -signal.SIGKILL
            kills += 1
            threading.Event().wait(rng.uniform(0.0, 1.0))
            started_at[victim] = len(logs[victim].read_text())
            procs[victim] = start_worker(envs[victim], logs[victim])
        producer.join()
        end = end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])
        wait_for(
            lambda: all(_combined(list(dirs.values())).get(tp, 0) >= o for tp, o in end.items()),
            180,
            "the group to apply every event",
        )
    finally:
        stopped = _stop(procs)
    for n, code in stopped.items():
        assert code == 0, f"{n} exited {code}: " + (tmp_path / f"{n}.log").read_text()[-3000:]
    assert kills >= 4

    final = _owner_dirs(dirs, domains, end, s.topic("interactions"))
    # exactly once: every domain counts what was produced for it, no more, no less
    produced = {d: sum(1 for dd, _ in inters if dd == d) for d in domains}
    for domain in domains:
        with secondary(final[domain]) as store:
            counters = domain_counters(store)[domain]
        assert counters.interactions == produced[domain] == counters.logged, domain
        assert counters.items == 60
    ref = _reference(kafka_bootstrap, f"{topic_prefix}ref.", tmp_path, vectors, items, inters)
    _assert_equal_to_reference(final, ref, domains, f"{kills} kills")


def _owner(tmp_path: Path, names: list[str], topic: str, domain: str) -> str | None:
    """The worker whose last assignment holds ``domain``'s partition of ``topic``."""
    part = f"{topic}-{domain_partition(domain, PARTITIONS)}"
    return next((n for n in names if part in _assigned(tmp_path / f"{n}.log")), None)


def _current_codebook(state_dir: Path, domain: str) -> str | None:
    """The codebook id of ``domain``'s current version in a worker's state (None: none)."""
    with secondary(state_dir) as store:
        version = current_version(store, domain)
        record = None if version is None else get_record(store, domain, version)
        return None if record is None else record.codebook_id


def test_a_migration_reaches_every_worker_of_the_group_and_one_that_joins_midway(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Two workers with a version of every domain; ``adacode codebook migrate`` reaches the
    owner of its key's partition, which trains a candidate and moves the group on; the
    other follows while it runs (``codebook_watch_s``) and a third joins midway (it takes
    the group's codebook at start). In the end every worker codes with the new codebook,
    every domain's owner has coded each of its items with it and serves a version trained
    on it, and the topic's chain is the old codebook, then the new one."""
    over = {**TUNING, "codebook_watch_s": 1}
    domains = _domains()
    vectors, items, inters = _stream(domains, seed=5)
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused", **over)
    end = _load(s, vectors, items, inters)
    topic = s.topic("interactions")
    names = ["w0", "w1", "w2"]
    dirs = {n: tmp_path / n for n in names}
    procs: dict[str, WorkerProcess] = {}

    def start(n: str) -> None:
        env = worker_env(kafka_bootstrap, topic_prefix, dirs[n], kafka_group_instance_id=n, **over)
        procs[n] = start_worker(env, tmp_path / f"{n}.log")

    def settled(running: list[str]) -> bool:
        owners = [_owner(tmp_path, running, topic, d) for d in domains]
        return (
            None not in owners
            and all(_caught_up(dirs[n], tmp_path / f"{n}.log", end) for n in running)
            and {*owners} == {*running}
        )

    def on_codebook(codebook_id: str, running: list[str]) -> bool:
        owners = [_owner(tmp_path, running, topic, d) for d in domains]
        return None not in owners and all(
            _current_codebook(dirs[o], d) == codebook_id  # type: ignore[index]
            for o, d in zip(owners, domains, strict=True)
        )

    old = CodebookLog(s).chain()[-1]
    start("w0")
    start("w1")
    try:
        wait_for(lambda: settled(names[:2]), 180, "two workers to share and apply the stream")
        for d in domains:
            send_control(s, "finetune", d)
        wait_for(lambda: on_codebook(old.codebook_id, names[:2]), 240, "v1 of every domain")

        send_control(s, "migrate", "")
        wait_for(lambda: len(CodebookLog(s).chain()) == 2, 180, "the group's codebook to move")
        new = CodebookLog(s).chain()[-1]
        start("w2")  # joins while the others code their items with the new codebook
        wait_for(lambda: settled(names), 180, "three workers to share the partitions")
        wait_for(lambda: on_codebook(new.codebook_id, names), 300, "versions of the new codebook")
        owners = {d: _owner(tmp_path, names, topic, d) for d in domains}
    finally:
        stopped = _stop(procs)
    for n, code in stopped.items():
        assert code == 0, f"{n} exited {code}: " + (tmp_path / f"{n}.log").read_text()[-3000:]

    assert CodebookLog(s).chain() == [old, new]
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in names}
    migrated = [n for n in names[:2] if "codebook migration: training a candidate" in logs[n]]
    followed = [
        n for n in names[:2] if f"the group's codebook moved on to {new.codebook_id}" in logs[n]
    ]
    assert len(migrated) == 1 and followed == [n for n in names[:2] if n not in migrated], logs
    assert f"using the group's codebook {new.codebook_id}" in logs["w2"]
    by_domain = dict(zip([f"i{i}" for i in range(60)], range(60), strict=True))
    for n in names:
        store = RocksDBPartition.open(dirs[n], read_only=True)
        try:
            assert load_codebook(store) == new, n
        finally:
            store.close()
    for k, d in enumerate(domains):
        store = RocksDBPartition.open(dirs[owners[d]], read_only=True)  # type: ignore[index]
        try:
            assigner = committed_assigner(store, d)
            assert assigner is not None and sorted(assigner.keys) == sorted(by_domain), d
            mine = vectors[60 * k : 60 * (k + 1)]
            for item, path in zip((f"i{i}" for i in range(60)), new.encode(mine), strict=True):
                assert assigner.full_path(item) == tuple(int(c) for c in path), (d, item)
        finally:
            store.close()
