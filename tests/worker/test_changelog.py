"""The versions mirror (worker.ingest.group) over the in-memory store: what is mirrored,
in which partition, before the local write, and only for owned partitions."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner import murmur2

from store.memory import MemoryPartition
from store.partition import COLUMN_FAMILIES
from worker.core.exceptions import WorkerError
from worker.core.settings import Settings
from worker.ingest.exceptions import KafkaUnavailableError, NotOwnedError
from worker.ingest.group import (
    MIRRORED_FAMILIES,
    MirroredStore,
    MirrorOp,
    VersionsLog,
    domain_partition,
)
from worker.state.layout import version_key_domain

SETTINGS = Settings(topic_prefix="t.", state_dir="/nonexistent")


class RecordingLog(VersionsLog):
    """The versions topic replaced by a list (the broker side is tested in integration)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(SETTINGS, partitions=3)
        self.sent: list[list[MirrorOp]] = []
        self.fail = fail

    def send(self, ops: Iterable[MirrorOp], timeout_s: float = 60.0) -> None:
        if self.fail:
            raise KafkaUnavailableError("broker away")
        self.sent.append(list(ops))


def _store(owned: set[int] | None = None, fail: bool = False) -> tuple[MirroredStore, RecordingLog]:
    log = RecordingLog(fail=fail)
    return MirroredStore(MemoryPartition(), log, owned=lambda: owned), log


def test_the_partition_of_a_domain_is_kafkas_default_partitioner_on_the_domain_key() -> None:
    for domain in ("shop", "news", "d1", "a.b-c"):
        want = (murmur2(domain.encode()) & 0x7FFFFFFF) % 5
        assert domain_partition(domain, 5) == want


def test_versions_and_control_offsets_are_mirrored_other_state_is_not() -> None:
    store, log = _store()
    batch = store.batch()
    batch.put("versions", b"rec\x00shop\x00" + (1).to_bytes(8, "big"), b"r1")
    batch.delete("versions", b"table\x00news\x00" + (1).to_bytes(8, "big"))
    batch.put("items", b"shop\x00i1", b"item")
    batch.set_offset("t.control", 2, 17)
    batch.set_offset("t.items", 2, 99)
    store.write(batch)
    (ops,) = log.sent
    assert [(op.partition, op.value) for op in ops] == [
        (domain_partition("shop", 3), b"r1"),
        (domain_partition("news", 3), None),
        (2, (17).to_bytes(8, "big", signed=True)),
    ]
    assert store.get("items", b"shop\x00i1") == b"item"
    assert store.get_offset("t.items", 2) == 99


@given(
    cf=st.sampled_from(sorted(COLUMN_FAMILIES)),
    key=st.binary(max_size=40),
    value=st.none() | st.binary(max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_only_the_mirrored_families_have_operations_to_mirror(
    cf: str, key: bytes, value: bytes | None
) -> None:
    """A batch skips the mirror for every family outside ``MIRRORED_FAMILIES``: none of them
    has an operation to mirror, whatever the key (the skip changes nothing)."""
    store, _ = _store()
    if cf not in MIRRORED_FAMILIES:
        assert store.mirror_op(cf, key, value) is None


def test_a_batch_without_versions_sends_nothing() -> None:
    store, log = _store()
    batch = store.batch()
    batch.put("items", b"shop\x00i1", b"item")
    store.write(batch)
    assert log.sent == []


def test_a_failed_send_writes_nothing_locally() -> None:
    store, _ = _store(fail=True)
    batch = store.batch()
    batch.put("versions", b"current\x00shop", b"\x00" * 8)
    batch.put("items", b"shop\x00i1", b"item")
    with pytest.raises(KafkaUnavailableError):
        store.write(batch)
    assert store.get("versions", b"current\x00shop") is None
    assert store.get("items", b"shop\x00i1") is None


def test_writes_for_a_partition_owned_elsewhere_are_refused_and_not_sent() -> None:
    part = domain_partition("shop", 3)
    store, log = _store(owned={p for p in range(3) if p != part})
    batch = store.batch()
    batch.put("versions", b"current\x00shop", b"\x00" * 8)
    with pytest.raises(NotOwnedError, match=rf"partition\(s\) \[{part}\]"):
        store.write(batch)
    assert log.sent == [] and store.get("versions", b"current\x00shop") is None
    # the owner of the partition writes it
    owner, owner_log = _store(owned={part})
    batch = owner.batch()
    batch.put("versions", b"current\x00shop", b"\x00" * 8)
    owner.write(batch)
    assert len(owner_log.sent) == 1


def test_range_deletes_of_versions_are_refused_with_the_fix() -> None:
    store, _ = _store()
    with pytest.raises(WorkerError, match="one by one"):
        store.batch().delete_range("versions", b"a", b"z")


def test_a_foreign_batch_is_refused() -> None:
    store, _ = _store()
    with pytest.raises(WorkerError, match="batch\\(\\)"):
        store.write(MemoryPartition().batch())


def test_reads_and_checkpoints_go_to_the_local_store(tmp_path: Path) -> None:
    store, _ = _store()
    batch = store.batch()
    batch.put("versions", b"next\x00shop", b"x")
    store.write(batch)
    assert list(store.items("versions")) == [(b"next\x00shop", b"x")]
    assert store.multi_get("versions", [b"next\x00shop", b"no"]) == [b"x", None]
    copy = store.checkpoint(tmp_path / "cp")
    assert copy.get("versions", b"next\x00shop") == b"x"


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(lambda d: "\x00" not in d), st.integers(0, 2**40))
def test_version_keys_name_their_domain(domain: str, version: int) -> None:
    key = b"rec\x00" + domain.encode() + b"\x00" + version.to_bytes(8, "big")
    assert version_key_domain(key) == domain
    assert version_key_domain(b"current\x00" + domain.encode()) == domain
    assert 0 <= domain_partition(domain, 7) < 7


def test_a_key_without_domain_is_an_error() -> None:
    with pytest.raises(WorkerError, match="names no domain"):
        version_key_domain(b"garbage")
