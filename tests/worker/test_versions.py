"""Versions on both store backends: immutability, retention, rollback, pins, atomic switches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quantize.table_model import ModelConfig, Snapshot, build_model, export_params
from store.memory import MemoryPartition
from store.partition import StorePartition
from store.rocksdb import RocksDBPartition
from worker.versions import (
    EXPIRED,
    PUBLISHED,
    REJECTED,
    VersionError,
    VersionRecord,
    VersionTable,
    add_version,
    current_version,
    get_record,
    list_records,
    load_table,
    rollback,
    set_pinned,
    switches,
)

CONFIG = ModelConfig(hidden=8, max_len=4, layers=1, heads=1)


@pytest.fixture(params=["memory", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorePartition]:
    s: StorePartition = (
        MemoryPartition() if request.param == "memory" else RocksDBPartition.open(tmp_path / "db")
    )
    yield s
    s.close()


def _table(marker: float, n_rows: int = 12) -> VersionTable:
    rows = np.array([[0, 5], [1, -1], [2, 7]], dtype=np.int64)
    model = build_model(CONFIG, rows, n_rows=n_rows)
    params = export_params(model)
    params["table.rows"] = np.full_like(params["table.rows"], marker)
    return VersionTable(Snapshot(CONFIG, params), ["a", "b", "c"], rows)


def _publish(
    store: StorePartition, marker: float, *, status: str = PUBLISHED, keep: int = 10
) -> VersionRecord:
    record = VersionRecord(
        0, current_version(store, "d"), 1.0, "cb", {"ts": int(marker)}, {"marker": marker}, status
    )
    batch = store.batch()
    out = add_version(
        store, batch, "d", record, _table(marker) if status == PUBLISHED else None, keep=keep
    )
    store.write(batch)
    return out


def test_versions_are_numbered_once_and_never_rewritten(store: StorePartition) -> None:
    v1 = _publish(store, 1.0)
    before = store.get("versions", b"table\x00d\x00" + (1).to_bytes(8, "big"))
    rejected = _publish(store, 2.0, status=REJECTED)
    v3 = _publish(store, 3.0)
    assert (v1.version, rejected.version, v3.version) == (1, 2, 3)
    assert current_version(store, "d") == 3
    assert store.get("versions", b"table\x00d\x00" + (1).to_bytes(8, "big")) == before
    assert float(load_table(store, "d", 1).snapshot.params["table.rows"][0, 0]) == 1.0
    assert get_record(store, "d", 2).status == REJECTED  # type: ignore[union-attr]
    with pytest.raises(VersionError, match="no table for version 2"):
        load_table(store, "d", 2)
    assert [s["reason"] for s in switches(store, "d")] == ["publish", "publish"]


def test_retention_keeps_the_newest_and_pinned(store: StorePartition) -> None:
    _publish(store, 1.0, keep=2)
    batch = store.batch()
    set_pinned(store, batch, "d", 1, True)
    store.write(batch)
    for m in (2.0, 3.0, 4.0):
        _publish(store, m, keep=2)
    status = {r.version: r.status for r in list_records(store, "d")}
    assert status == {1: PUBLISHED, 2: EXPIRED, 3: PUBLISHED, 4: PUBLISHED}
    load_table(store, "d", 1)  # pinned: kept
    with pytest.raises(VersionError):
        load_table(store, "d", 2)


def test_rollback_to_a_version_and_to_the_previous(store: StorePartition) -> None:
    for m in (1.0, 2.0, 3.0):
        _publish(store, m)
    batch = store.batch()
    assert rollback(store, batch, "d", previous=True) == (3, 2)
    store.write(batch)
    batch = store.batch()
    assert rollback(store, batch, "d", to=1) == (2, 1)
    store.write(batch)
    assert current_version(store, "d") == 1
    with pytest.raises(VersionError, match="no published version before 1"):
        rollback(store, store.batch(), "d", previous=True)
    with pytest.raises(VersionError, match="servable versions: \\[1, 2, 3\\]"):
        rollback(store, store.batch(), "d", to=7)
    assert [s["reason"] for s in switches(store, "d")][-2:] == ["rollback", "rollback"]
    # a new version after a rollback has the rolled-back version as its parent
    assert _publish(store, 4.0).parent == 1


def test_readers_during_publishes_see_a_whole_version(store: StorePartition) -> None:
    _publish(store, 1.0)
    stop = threading.Event()
    seen: list[tuple[int, float]] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                v = current_version(store, "d")
                assert v is not None
                table = load_table(store, "d", v)
                rows = table.snapshot.params["table.rows"]
                assert np.all(rows == rows[0, 0])  # one version's rows, never a mix
                seen.append((v, float(rows[0, 0])))
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    for m in range(2, 30):
        _publish(store, float(m), keep=100)
    stop.set()
    thread.join()
    assert not errors, errors[0]
    assert seen and all(v == m for v, m in seen)
