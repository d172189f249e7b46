"""The versions and codebook topics on the real broker: restore and agreement."""

from __future__ import annotations

import threading
import time

import numpy as np
import orjson
import pytest

from quantize.codebook import ResidualCodebook
from store.memory import MemoryPartition
from tests.worker_process import settings_for
from worker.commands.topics import create_topics
from worker.ingest.coding import CodeService, put_codebook
from worker.ingest.exceptions import CodebookConflictError
from worker.ingest.group import (
    CodebookLog,
    MirroredStore,
    VersionsLog,
    adopt_group_codebook,
    domain_partition,
)
from worker.state.layout import MIGRATE_REQUEST
from worker.state.reads import load_codebook_by_id


def _put(store: MirroredStore, cf: str, key: bytes, value: bytes | None) -> None:
    batch = store.batch()
    if value is None:
        batch.delete(cf, key)
    else:
        batch.put(cf, key, value)
    store.write(batch)


def test_a_new_owner_restores_versions_and_control_offsets_of_its_partitions(
    kafka_bootstrap: str, topic_prefix: str, tmp_path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused")
    create_topics(s, partitions=3)
    first = MirroredStore(MemoryPartition(), VersionsLog(s), owned=lambda: None)
    domains = ["shop", "news", "books", "music"]
    for d in domains:
        _put(first, "versions", b"rec\x00" + d.encode() + b"\x00\x01", f"v1 {d}".encode())
        _put(first, "versions", b"next\x00" + d.encode(), b"2")
    _put(first, "versions", b"rec\x00news\x00\x01", None)  # retention: a tombstone
    batch = first.batch()
    batch.set_offset(s.topic("control"), domain_partition("shop", 3), 41)
    first.write(batch)

    heir = MemoryPartition()
    log = VersionsLog(s)
    part = domain_partition("shop", 3)
    report = log.restore(heir, [part])
    mine = sorted(d for d in domains if domain_partition(d, 3) == part)
    want = [(k, v) for k, v in first.items("versions") if k.split(b"\x00")[1].decode() in mine]
    assert list(heir.items("versions")) == want and want
    assert report.domains == set(mine)
    assert heir.get_offset(s.topic("control"), part) == 41
    # only the partitions asked for
    others = {d for d in domains if domain_partition(d, 3) != part}
    assert not any(k.split(b"\x00")[1].decode() in others for k, _ in heir.items("versions"))

    # a later restore reads only what came since, and honours tombstones and newer values
    assert log.restore(heir, [part]).records == 0
    _put(first, "versions", b"next\x00shop", b"3")
    _put(first, "versions", b"rec\x00shop\x00\x01", None)
    again = log.restore(heir, [part])
    assert again.records == 2
    assert heir.get("versions", b"next\x00shop") == b"3"
    assert heir.get("versions", b"rec\x00shop\x00\x01") is None
    # a control offset behind the heir's own is not moved back
    batch = first.batch()
    batch.set_offset(s.topic("control"), part, 5)
    first.write(batch)
    log.restore(heir, [part])
    assert heir.get_offset(s.topic("control"), part) == 41
    log.close()


def test_the_first_codebook_on_the_topic_is_the_groups(
    kafka_bootstrap: str, topic_prefix: str, tmp_path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused")
    create_topics(s, partitions=3)
    rng = np.random.default_rng(0)
    a = ResidualCodebook.train(rng.normal(size=(200, 8)).astype(np.float32), 2, 8, seed=0)
    b = ResidualCodebook.train(rng.normal(size=(200, 8)).astype(np.float32), 2, 8, seed=1)
    assert a.codebook_id != b.codebook_id
    assert CodebookLog(s).current() is None
    assert CodebookLog(s).agree(a).codebook_id == a.codebook_id
    # a second worker's candidate loses to the first, whoever reads
    assert CodebookLog(s).agree(b).codebook_id == a.codebook_id
    assert CodebookLog(s).current() == CodebookLog(s).chain()[0] == a


def _codebook(seed: int) -> ResidualCodebook:
    rng = np.random.default_rng(seed)
    return ResidualCodebook.train(rng.normal(size=(200, 8)).astype(np.float32), 2, 8, seed=seed)


def test_a_successor_moves_the_groups_codebook_and_the_first_one_of_a_head_wins(
    kafka_bootstrap: str, topic_prefix: str, tmp_path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused")
    create_topics(s, partitions=1)
    a, b, c, d = (_codebook(seed) for seed in range(4))
    assert CodebookLog(s).chain() == [] and CodebookLog(s).succeed(a.codebook_id, b) is None
    CodebookLog(s).agree(a)
    assert CodebookLog(s).succeed(a.codebook_id, b) == b
    assert CodebookLog(s).succeed(a.codebook_id, c) == b  # a's successor came first
    assert CodebookLog(s).succeed(c.codebook_id, d) == b  # c is nobody's codebook
    assert CodebookLog(s).succeed(b.codebook_id, d) == d
    assert [x.codebook_id for x in CodebookLog(s).chain()] == [
        a.codebook_id,
        b.codebook_id,
        d.codebook_id,
    ]
    assert CodebookLog(s).chain()[0] == a  # the bootstrap's agreement is unchanged
    # a worker that bootstraps now takes where the group went, not where it started
    group = CodebookLog(s)
    assert group.seen() is None  # nothing read yet
    assert group.agree(c) == d == group.current() and group.seen() == [a, b, d]


def test_the_watch_follows_the_topic_until_stopped(
    kafka_bootstrap: str, topic_prefix: str, tmp_path
) -> None:
    """``CodebookLog.watch`` re-reads the chain on its thread: a successor another worker
    offers shows in :meth:`seen` within the interval; the thread ends with the stop event."""
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused")
    create_topics(s, partitions=1)
    a, b = _codebook(0), _codebook(1)
    CodebookLog(s).agree(a)
    group, stop = CodebookLog(s), threading.Event()
    assert group.watch(0, stop) is None
    thread = group.watch(0.2, stop)
    assert thread is not None
    deadline = time.monotonic() + 30
    while group.seen() != [a] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group.seen() == [a]
    CodebookLog(s).succeed(a.codebook_id, b)
    while group.seen() != [a, b] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group.seen() == [a, b]
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_workers_follow_a_group_codebook_that_moved_on_and_move_it_on(
    kafka_bootstrap: str, topic_prefix: str, tmp_path
) -> None:
    """At start: a worker whose state migrated past the group's codebook moves the group on
    (its lineage holds the group's); a worker whose codebook the group moved past migrates
    to the group's; an unrelated one is refused."""
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "unused", embedding_dim=8)
    create_topics(s, partitions=1)
    a, b, c = (_codebook(seed) for seed in range(3))
    log = CodebookLog(s)
    log.agree(a)

    def worker_on(*lineage: ResidualCodebook) -> tuple[MemoryPartition, CodeService]:
        store = MemoryPartition()
        for codebook in lineage:  # each made current in turn (lineage: oldest first)
            batch = store.batch()
            put_codebook(batch, codebook, store)
            store.write(batch)
        return store, CodeService(store, s)

    ahead, codes = worker_on(a, b)  # migrated a -> b while alone
    adopt_group_codebook(ahead, codes, CodebookLog(s))
    assert CodebookLog(s).chain()[-1] == b
    behind, codes = worker_on(a)
    adopt_group_codebook(behind, codes, CodebookLog(s))
    assert orjson.loads(behind.get("meta", MIGRATE_REQUEST) or b"{}")["codebook"] == b.codebook_id
    assert load_codebook_by_id(behind, b.codebook_id) == b
    other, codes = worker_on(c)
    with pytest.raises(CodebookConflictError, match=b.codebook_id):
        adopt_group_codebook(other, codes, CodebookLog(s))
