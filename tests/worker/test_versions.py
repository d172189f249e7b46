"""Versions on both store backends: immutability, retention, rollback, pins, atomic switches;
item vectors with and without text projection (against a slow numpy reference), versions
written before text projection, what an export hands a serving system, and borrowed codes
(trained mask and full paths stored, the version's untrained items and later items served
the deepest prefix their trained relatives share, versions written before borrowing)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize.prefix_nodes import GIL_CHUNK
from quantize.table_model import (
    ADDED_KEYS,
    ModelConfig,
    Snapshot,
    borrow_trained_codes,
    build_model,
    export_params,
)
from store.memory import MemoryPartition
from store.partition import StorePartition
from store.rocksdb import RocksDBPartition
from tests.text_reference import slow_text_part
from tests.worker.vector_reference import slow_served_rows, slow_vector
from worker.serving.index import DomainIndex
from worker.state.exceptions import VersionError
from worker.state.layout import version_key, version_key_domain, version_part_key
from worker.state.versions import (
    EXPIRED,
    PART_BYTES,
    PUBLISHED,
    REJECTED,
    STAGED_PART_BYTES,
    TEXT_PARAMS,
    TEXT_PROJ,
    ItemVectorizer,
    SharedPrefixes,
    VersionRecord,
    VersionTable,
    add_version,
    current_version,
    decode_items,
    delete_blob,
    encode_items,
    export_arrays,
    get_blob,
    get_record,
    item_vectors,
    list_records,
    load_table,
    put_blob,
    rollback,
    set_pinned,
    switches,
    utf8_ids,
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


# -- item vectors and text projection -------------------------------------------------------

TEXT_DIM = 6
TEXT_HIDDEN = 5


def _text_config(text_hidden: int, **kw: object) -> ModelConfig:
    """:data:`CONFIG` with text projection: the adaptor of width ``text_hidden`` (0: linear)."""
    return replace(CONFIG, text_dim=TEXT_DIM, text_hidden=text_hidden, **kw)  # type: ignore[arg-type]


ROWS = np.array([[0, 5, -1], [1, -1, -1], [2, 7, 11], [3, 4, -1]], dtype=np.int64)


def _put_version_1(store: StorePartition, snapshot: Snapshot, items_blob: bytes) -> None:
    """Write version 1 of domain ``d`` by hand, byte for byte as an older build stored it
    (its configuration without the keys added since: :data:`ADDED_KEYS`)."""
    assert all(getattr(snapshot.config, k) == v for k, v in ADDED_KEYS.items())
    config = {k: v for k, v in snapshot.config.to_dict().items() if k not in ADDED_KEYS}
    blob = io.BytesIO()
    meta = np.frombuffer(json.dumps(config, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(blob, __config__=meta, **snapshot.params)
    v = (1).to_bytes(8, "big")
    batch = store.batch()
    batch.put("versions", b"table\x00d\x00" + v, blob.getvalue())
    batch.put("versions", b"items\x00d\x00" + v, items_blob)
    batch.put("versions", b"rec\x00d\x00" + v, VersionRecord(1, None, 1.0, "cb", {}, {}).encode())
    batch.put("versions", b"current\x00d", v)
    store.write(batch)


def _random_snapshot(config: ModelConfig, n_rows: int = 12, seed: int = 0) -> Snapshot:
    """A model with every parameter random (level weights and W included), for references."""
    torch.manual_seed(seed)
    params = export_params(build_model(config, ROWS, n_rows=n_rows))
    rng = np.random.default_rng(seed)
    for name in params:
        if name.startswith("table."):
            params[name] = rng.normal(size=params[name].shape).astype(np.float32)
    return Snapshot(config, params)


def _reference_vectors(snapshot: Snapshot, rows: np.ndarray, emb: np.ndarray | None) -> np.ndarray:
    """Slow reference: sum_j w_j * rows[r_j] over valid ids below the table size, plus the
    text part (:func:`~tests.text_reference.slow_text_part`)."""
    table = snapshot.params["table.rows"].astype(np.float64)
    weights = snapshot.params.get("table.level_weight")
    out = np.zeros((len(rows), table.shape[1]))
    for i, code in enumerate(rows):
        for j, r in enumerate(code):
            if 0 <= r < table.shape[0]:
                out[i] += (1.0 if weights is None else float(weights[j])) * table[r]
        if emb is not None:
            out[i] += slow_text_part(snapshot.params, emb[i])
    return out


@pytest.mark.parametrize("text_hidden", [TEXT_HIDDEN, 0])
def test_a_text_projected_version_stores_its_text_parts_and_rebuilds_its_vectors(
    store: StorePartition, text_hidden: int
) -> None:
    config = _text_config(text_hidden)
    snapshot = _random_snapshot(config)
    emb = np.random.default_rng(1).normal(size=(len(ROWS), TEXT_DIM)).astype(np.float32)
    table = VersionTable.build(snapshot, ["a", "b", "c", "d"], ROWS, emb)
    record = VersionRecord(0, None, 1.0, "cb", {"ts": 1}, {})
    batch = store.batch()
    add_version(store, batch, "d", record, table, keep=10)
    store.write(batch)
    items_key = b"items\x00d\x00" + (1).to_bytes(8, "big")
    written = store.get("versions", items_key)
    loaded = load_table(store, "d", 1)
    assert loaded.item_ids == ["a", "b", "c", "d"] and loaded.text_vectors is not None
    np.testing.assert_allclose(
        loaded.text_vectors, _reference_vectors(snapshot, ROWS[:, :0], emb), atol=1e-5
    )
    np.testing.assert_allclose(
        item_vectors(loaded), _reference_vectors(snapshot, ROWS, emb), rtol=1e-5, atol=1e-5
    )
    # the vectors are those of the model's own function of (rows, embedding) at training time
    with torch.no_grad():
        own = snapshot.model().item_vectors(torch.as_tensor(ROWS), torch.as_tensor(emb))
    np.testing.assert_allclose(item_vectors(loaded), own.numpy(), rtol=1e-5, atol=1e-5)
    # a later publish never rewrites the version's bytes
    _publish(store, 2.0)
    assert store.get("versions", items_key) == written


def test_versions_written_before_text_projection_still_load(store: StorePartition) -> None:
    """The exact bytes the worker wrote before text projection: ids and rows only."""
    config = ModelConfig(hidden=8, max_len=4, layers=1, heads=1, text_hidden=0)
    snapshot = _random_snapshot(config, seed=3)
    assert TEXT_PROJ not in snapshot.params
    old_items = io.BytesIO()
    np.savez(old_items, ids=np.asarray(["a", "b", "c", "d"], dtype=str), rows=ROWS)
    _put_version_1(store, snapshot, old_items.getvalue())
    table = load_table(store, "d", 1)
    assert table.text_vectors is None and table.snapshot.config.text_dim == 0
    np.testing.assert_allclose(
        item_vectors(table), _reference_vectors(snapshot, ROWS, None), rtol=1e-5, atol=1e-5
    )
    arrays, described = export_arrays(table)
    assert "text_proj" not in arrays and set(arrays) == set(described)
    assert ItemVectorizer(table.snapshot).text_dim == 0


@pytest.mark.parametrize("text_hidden", [TEXT_HIDDEN, 0])
def test_an_export_holds_what_vectors_a_new_item(text_hidden: int) -> None:
    """From the exported arrays alone: a new item's vector = weighted rows + its text part
    (``text_proj @ gelu(text_in @ e + text_in_bias)``, or ``text_proj @ e``)."""
    config = _text_config(text_hidden, combine="level")
    snapshot = _random_snapshot(config, seed=4)
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(len(ROWS), TEXT_DIM)).astype(np.float32)
    table = VersionTable.build(snapshot, ["a", "b", "c", "d"], ROWS, emb)
    arrays, described = export_arrays(table)
    assert set(arrays) == set(described)
    assert {"text_proj", "item_text_vectors", "level_weight", "rows"} <= set(arrays)
    np.testing.assert_array_equal(arrays["item_vectors"], item_vectors(table))
    new_rows = np.array([[6, 2, 9]])
    new_emb = rng.normal(size=(1, TEXT_DIM)).astype(np.float32)
    weights, rows = arrays["level_weight"], arrays["rows"]
    assert ("text_in" in arrays) == ("text_in_bias" in arrays) == bool(text_hidden)
    text_map = {"table.text_proj.weight": arrays["text_proj"]}
    if text_hidden:
        text_map |= {"table.text_in.weight": arrays["text_in"]}
        text_map |= {"table.text_in.bias": arrays["text_in_bias"]}
    outside = sum(weights[j] * rows[r] for j, r in enumerate(new_rows[0]))
    outside = outside + slow_text_part(text_map, new_emb[0])
    vectorizer = ItemVectorizer(table.snapshot)
    served = vectorizer.vectors(new_rows, vectorizer.text_part(new_emb))
    np.testing.assert_allclose(served[0], outside, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served, _reference_vectors(snapshot, new_rows, new_emb), atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 6),
    width=st.integers(1, 3),
    combine=st.sampled_from(["sum", "level"]),
    text_hidden=st.sampled_from([0, TEXT_HIDDEN]),
)
def test_code_part_plus_text_part_is_the_models_item_vector(
    seed: int, n: int, width: int, combine: str, text_hidden: int
) -> None:
    config = _text_config(text_hidden, combine=combine)
    snapshot = _random_snapshot(config, n_rows=12, seed=seed)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 12, size=(n, width))
    rows[:, 1:][rng.random((n, width - 1)) < 0.4] = -1
    emb = rng.normal(size=(n, TEXT_DIM)).astype(np.float32)
    vectorizer = ItemVectorizer(snapshot)
    got = vectorizer.vectors(rows, vectorizer.text_part(emb))
    with torch.no_grad():
        padded = np.full((n, 3), -1)
        padded[:, :width] = rows
        own = snapshot.model().item_vectors(torch.as_tensor(padded), torch.as_tensor(emb))
    np.testing.assert_allclose(got, own.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text_hidden", [TEXT_HIDDEN, 0])
def test_text_projected_tables_refuse_missing_or_misfit_embeddings(text_hidden: int) -> None:
    config = _text_config(text_hidden)
    snapshot = _random_snapshot(config)
    ids = ["a", "b", "c", "d"]
    with pytest.raises(VersionError, match="pass the embeddings"):
        VersionTable.build(snapshot, ids, ROWS)
    with pytest.raises(VersionError, match="text vectors of shape"):
        VersionTable(snapshot, ids, ROWS)
    with pytest.raises(VersionError, match=r"do not fit the text map"):
        VersionTable.build(snapshot, ids, ROWS, np.zeros((4, TEXT_DIM + 1)))
    plain = _random_snapshot(ModelConfig(hidden=8, max_len=4, layers=1, heads=1))
    with pytest.raises(VersionError, match="without text projection"):
        VersionTable(plain, ids, ROWS, np.zeros((4, 8), dtype=np.float32))
    for part in TEXT_PARAMS if text_hidden else (TEXT_PROJ,):
        broken = Snapshot(config, {k: v for k, v in snapshot.params.items() if k != part})
        with pytest.raises(VersionError, match="corrupt"):
            ItemVectorizer(broken)
    other = _text_config(3)
    with pytest.raises(VersionError, match="corrupt"):  # a map of another width
        ItemVectorizer(Snapshot(other, snapshot.params))


# -- borrowed codes -------------------------------------------------------------------------

LEVELS, K = 3, 3


def _random_version(seed: int, n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Served rows (random path prefixes, some with a disambiguation row), full-path rows
    and a trained mask of ``n`` items on a ``LEVELS x K`` codebook."""
    rng = np.random.default_rng(seed)
    digits = rng.integers(0, K, size=(n, LEVELS))
    full = np.arange(LEVELS)[None, :] * K + digits
    lengths = rng.integers(1, LEVELS + 1, size=n)
    served = np.full((n, LEVELS + 1), -1, dtype=np.int64)
    for i in range(n):
        served[i, : lengths[i]] = full[i, : lengths[i]]
        if lengths[i] == LEVELS and rng.random() < 0.3:
            served[i, LEVELS] = LEVELS * K + i  # a disambiguation row of its own
    return served, full.astype(np.int64), rng.random(n) < 0.5


def _borrowing_table(seed: int, *, text: bool) -> tuple[VersionTable, np.ndarray]:
    served, full, trained = _random_version(seed)
    n = len(served)
    config = replace(CONFIG, text_dim=TEXT_DIM if text else 0, text_hidden=TEXT_HIDDEN)
    snapshot = _random_snapshot(config, n_rows=LEVELS * K + n, seed=seed)
    emb = np.random.default_rng(seed + 1).normal(size=(n, TEXT_DIM)).astype(np.float32)
    ids = [f"i{j}" for j in range(n)]
    table = VersionTable.build(
        snapshot, ids, served, emb if text else None, trained=trained, full_rows=full
    )
    return table, emb


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000))
def test_new_items_borrow_the_deepest_shared_prefix_like_the_slow_reference(seed: int) -> None:
    table, _ = _borrowing_table(seed, text=False)
    assert table.trained is not None and table.full_rows is not None
    trained = np.flatnonzero(table.trained)
    t_rows = [table.item_rows[i].tolist() for i in trained]
    t_full = [table.full_rows[i].tolist() for i in trained]
    codes = SharedPrefixes.of(table, LEVELS)
    rng = np.random.default_rng(seed + 7)
    for _ in range(20):  # brand-new items: random paths, own codes of random length
        path = np.arange(LEVELS) * K + rng.integers(0, K, size=LEVELS)
        own = path[: int(rng.integers(1, LEVELS + 1))]
        borrowed = codes.borrow(path)
        got = own.tolist() if borrowed is None else list(borrowed)
        assert got == slow_served_rows(own.tolist(), path.tolist(), t_rows, t_full)
    # the version's own untrained items: the live rule is the publish rule
    served = table.served_rows()
    for i in np.flatnonzero(~table.trained):
        want = slow_served_rows(table.item_rows[i].tolist(), table.full_rows[i], t_rows, t_full)
        assert [r for r in served[i] if r >= 0] == want
        borrowed = codes.borrow(table.full_rows[i])
        if borrowed is not None:
            assert list(borrowed) == want
    np.testing.assert_array_equal(served[table.trained], table.item_rows[table.trained])


def test_a_version_stores_its_trained_mask_and_serves_untrained_items_borrowed_codes(
    store: StorePartition,
) -> None:
    table, emb = _borrowing_table(3, text=True)
    assert table.trained is not None and table.full_rows is not None
    assert table.trained.any() and not table.trained.all()
    batch = store.batch()
    add_version(store, batch, "d", VersionRecord(0, None, 1.0, "cb", {}, {}), table, keep=5)
    store.write(batch)
    loaded = load_table(store, "d", 1)
    assert loaded.trained is not None and loaded.full_rows is not None
    np.testing.assert_array_equal(loaded.trained, table.trained)
    np.testing.assert_array_equal(loaded.full_rows, table.full_rows)
    np.testing.assert_array_equal(loaded.item_rows, table.item_rows)  # stored as trained
    served = loaded.served_rows()
    np.testing.assert_array_equal(
        served, borrow_trained_codes(table.item_rows, table.full_rows, table.trained)
    )
    assert (served != loaded.item_rows).any()  # some untrained items do borrow
    vecs = item_vectors(loaded)
    for i in range(len(loaded.item_ids)):
        # trained items: their own rows; untrained: the borrowed rows; both + their own W @ e
        rows = loaded.item_rows[i] if loaded.trained[i] else served[i]
        np.testing.assert_allclose(
            vecs[i], slow_vector(loaded.snapshot, rows.tolist(), emb[i]), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_allclose(
        item_vectors(loaded, borrow=False),
        _reference_vectors(loaded.snapshot, loaded.item_rows, emb),
        rtol=1e-5,
        atol=1e-5,
    )
    arrays, described = export_arrays(loaded)
    assert set(arrays) == set(described) and {"item_trained", "item_full_rows"} <= set(arrays)
    np.testing.assert_array_equal(arrays["item_rows"], served)
    np.testing.assert_array_equal(arrays["item_vectors"], vecs)


def test_versions_written_before_borrowing_load_as_all_trained_and_serve(
    store: StorePartition,
) -> None:
    """The exact bytes the worker wrote before borrowing (and before the text adaptor): ids,
    rows and text vectors ``W @ e``."""
    config = _text_config(0)
    served, full, _ = _random_version(5)
    n = len(served)
    snapshot = _random_snapshot(config, n_rows=LEVELS * K + n, seed=5)
    emb = np.random.default_rng(6).normal(size=(n, TEXT_DIM)).astype(np.float32)
    text = (emb @ snapshot.params[TEXT_PROJ].T).astype(np.float32)
    old_items = io.BytesIO()
    ids = [f"i{j}" for j in range(n)]
    np.savez(old_items, ids=np.asarray(ids, dtype=str), rows=served, text_vectors=text)
    _put_version_1(store, snapshot, old_items.getvalue())
    table = load_table(store, "d", 1)
    assert table.snapshot.config.text_hidden == 0  # a linear map, as it was written
    assert table.trained is None and table.full_rows is None and table.trained_mask().all()
    assert table.served_rows() is table.item_rows
    index = DomainIndex(
        "d",
        1,
        table,
        embeddings=lambda keys: {k: emb[0] for k in keys},
        levels=LEVELS,
    )
    for i, item in enumerate(ids):  # every item is served as it was trained
        np.testing.assert_allclose(
            index.vector(item), slow_vector(snapshot, served[i].tolist(), emb[i]), atol=1e-4
        )
    # a brand-new item on the path of item 0 borrows the deepest prefix the version's items share
    path = full[0]
    rows_all = [served[i].tolist() for i in range(n)]
    want = slow_served_rows([int(path[0])], path.tolist(), rows_all, full.tolist())
    assert index.upsert({"new": path[:1]}, {"new": path}) == 1
    np.testing.assert_allclose(
        index.vector("new"), slow_vector(snapshot, want, emb[0]), rtol=1e-4, atol=1e-5
    )
    assert len(want) >= int((served[0, :LEVELS] >= 0).sum())  # item 0's own code at least


def test_tables_refuse_a_trained_mask_without_full_paths_or_of_the_wrong_shape() -> None:
    served, full, trained = _random_version(1)
    snapshot = _random_snapshot(CONFIG, n_rows=LEVELS * K + len(served))
    ids = [f"i{j}" for j in range(len(served))]
    with pytest.raises(VersionError, match="or neither"):
        VersionTable.build(snapshot, ids, served, trained=trained)
    with pytest.raises(VersionError, match="one bool per item"):
        VersionTable.build(snapshot, ids, served, trained=trained[:-1], full_rows=full)
    with pytest.raises(VersionError, match="without -1"):
        VersionTable.build(snapshot, ids, served, trained=trained, full_rows=served)


def test_items_round_trip_in_the_compact_format_and_a_million_fit_one_record() -> None:
    """Ids of any script and length, rows in the smallest integer type (int16, or int32 when
    a row id needs it) come back as written, rows as int64; a version of 1M items at 5 levels
    fits the versions topic's 64 MiB record (it took ~142 MB before: unicode ids, int64)."""
    ids = ["a", "ünï-çødé", "x" * 40, "商品-7", "b\tc"]
    rows = np.array([[0, 5, -1], [3, -1, -1], [1, 2, 40_000], [7, 8, 9], [2, -1, -1]])
    full = np.array([[0, 5], [3, 4], [1, 2], [7, 8], [2, 6]])
    trained = np.array([True, False, True, True, False])
    back = decode_items(encode_items(ids, rows, None, trained, full))
    assert back.item_ids == ids and back.item_rows.dtype == np.int64
    np.testing.assert_array_equal(back.item_rows, rows)
    np.testing.assert_array_equal(back.full_rows, full)
    np.testing.assert_array_equal(back.trained, trained)
    assert back.text_vectors is None
    n, levels, k = 1_000_000, 5, 256
    rng = np.random.default_rng(0)
    paths = rng.integers(0, k, size=(n, levels))
    big_full = paths + np.arange(levels) * k
    big_rows = np.where(rng.random((n, levels + 1)) < 0.5, -1, 1)
    big_rows[:, :levels] = np.where(big_rows[:, :levels] < 0, -1, big_full)
    raw = encode_items(
        [f"item-{i:07d}" for i in range(n)], big_rows, None, rng.random(n) < 0.5, big_full
    )
    assert len(raw) < 40 * 1024 * 1024
    again = decode_items(raw)
    assert again.item_ids[123_456] == "item-0123456"
    np.testing.assert_array_equal(again.full_rows, big_full)


def _big_table(n: int) -> VersionTable:
    """A version table of ``n`` items with long ids (its items blob grows ~35 bytes an item)."""
    ids = [f"item-{i:020d}" for i in range(n)]
    rows = np.tile(np.array([[0, 5]], dtype=np.int64), (n, 1))
    model = build_model(CONFIG, rows[:3], n_rows=12)
    return VersionTable(Snapshot(CONFIG, export_params(model)), ids, rows)


def _part_writer(
    store: StorePartition, log: list[tuple[bytes, bytes]]
) -> Callable[[bytes, bytes], None]:
    """A ``write_part`` as a fine-tune's: each part its own write, logged in ``log``."""

    def write_part(key: bytes, value: bytes) -> None:
        log.append((key, value))
        part = store.batch()
        part.put("versions", key, value)
        store.write(part)

    return write_part


@pytest.mark.parametrize("n", [0, 1, 5, GIL_CHUNK + 7])
def test_utf8_ids_are_what_numpy_encodes_in_one_call(n: int) -> None:
    """Encoded a chunk at a time, the ids array equals np.char.encode's (dtype included):
    ASCII, accented, CJK and emoji ids of varied lengths, across chunk boundaries."""
    alphabet = ["a", "ü", "字", "🙂", "Z9", ""]
    rng = np.random.default_rng(n)
    ids = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 12)))) for _ in range(n)]
    got = utf8_ids(ids)
    want = np.char.encode(np.asarray(ids, dtype=str), "utf-8")
    assert got.dtype == want.dtype and got.tolist() == want.tolist()


def test_a_blob_larger_than_a_part_is_stored_in_parts_read_back_and_deleted_whole(
    store: StorePartition,
) -> None:
    """Each part is one record of the versions topic (whose limit is 64 MiB): a blob of any
    size is written in parts under keys of its domain, read back joined, deleted whole."""
    blob = np.random.default_rng(0).bytes(3500)
    batch = store.batch()
    put_blob(batch, "items", "d", 7, blob, part_bytes=1000)
    put_blob(batch, "table", "d", 7, b"PK small", part_bytes=1000)
    store.write(batch)
    keys = [k for k, _ in store.items("versions")]
    parts = [version_part_key("items", "d", 7, i) for i in range(4)]
    assert set(parts) <= set(keys) and all(version_key_domain(k) == "d" for k in keys)
    assert all(len(store.get("versions", k) or b"") <= 1000 for k in parts)
    assert get_blob(store, "items", "d", 7) == blob
    assert store.get("versions", version_key("table", "d", 7)) == b"PK small"  # as before
    assert get_blob(store, "table", "d", 7) == b"PK small"
    batch = store.batch()
    batch.delete("versions", parts[2])
    store.write(batch)
    with pytest.raises(VersionError, match="1 of 4 parts of its items are missing"):
        get_blob(store, "items", "d", 7)
    batch = store.batch()
    delete_blob(store, batch, "items", "d", 7)
    delete_blob(store, batch, "table", "d", 7)
    store.write(batch)
    assert list(store.items("versions")) == []


def test_staged_parts_are_written_ahead_and_read_only_once_the_version_lands(
    store: StorePartition,
) -> None:
    """With ``write_part``, each part is its own write of at most STAGED_PART_BYTES ahead of
    the version's batch, which holds only the manifest: nothing reads the blob before that
    batch lands. A run that died after some parts (the same number taken again) leaves
    parts past the new blob's: the batch deletes them."""
    written: list[tuple[bytes, bytes]] = []
    write_part = _part_writer(store, written)
    rng = np.random.default_rng(1)
    died = rng.bytes(3 * STAGED_PART_BYTES + 10)  # 4 parts written, then the run died
    batch = store.batch()
    put_blob(batch, "items", "d", 7, died, write_part=write_part, store=store)  # never written
    assert len(written) == 4 and get_blob(store, "items", "d", 7) is None
    written.clear()
    blob = rng.bytes(STAGED_PART_BYTES + 5)  # the retry: 2 parts
    batch = store.batch()
    put_blob(batch, "items", "d", 7, blob, write_part=write_part, store=store)
    assert [k for k, _ in written] == [version_part_key("items", "d", 7, i) for i in (0, 1)]
    assert max(len(v) for _, v in written) <= STAGED_PART_BYTES
    assert len(batch) == 3  # two stale parts deleted, the manifest put
    assert get_blob(store, "items", "d", 7) is None  # the parts alone are not a blob
    store.write(batch)
    assert get_blob(store, "items", "d", 7) == blob
    parts = [k for k, _ in store.items("versions") if k.startswith(b"part\x00")]
    assert parts == [version_part_key("items", "d", 7, i) for i in (0, 1)]
    small = store.batch()  # under a part: one value in the batch, no staged write
    written.clear()
    put_blob(small, "table", "d", 7, b"PK small", write_part=write_part, store=store)
    assert written == [] and len(small) == 1
    # a retry whose blob now fits one value deletes every part the unfinished run left
    batch = store.batch()
    put_blob(batch, "items", "d", 8, died, write_part=write_part, store=store)  # never written
    retry = store.batch()
    put_blob(retry, "items", "d", 8, b"PK fits", write_part=write_part, store=store)
    assert len(retry) == 5  # four stale parts deleted, the value put
    store.write(retry)
    assert get_blob(store, "items", "d", 8) == b"PK fits"
    assert not any(
        k.startswith(version_part_key("items", "d", 8, 0)[:-4]) for k, _ in store.items("versions")
    )


def test_a_published_version_writes_its_parts_ahead_with_write_part() -> None:
    """Through add_version with ``write_part`` (what a fine-tune passes): every part of the
    items blob is written ahead, none is in the version's batch, and the version loads."""
    store = MemoryPartition()
    n = 300_000
    table = _big_table(n)
    ids = table.item_ids
    ahead: list[tuple[bytes, bytes]] = []
    write_part = _part_writer(store, ahead)
    batch = store.batch()
    record = VersionRecord(0, None, 1.0, "cb", {"ts": 1}, {})
    add_version(store, batch, "d", record, table, keep=1, write_part=write_part)
    assert len(ahead) >= 2  # the items blob is over STAGED_PART_BYTES
    assert len(batch) < 10  # manifests, record, pointer and counters: no part
    store.write(batch)
    loaded = load_table(store, "d", 1)
    assert loaded.item_ids[212_345] == ids[212_345] and loaded.item_rows.shape == (n, 2)


def test_a_version_larger_than_a_part_publishes_loads_and_expires() -> None:
    """Through add_version: a table whose items blob is over PART_BYTES (1M-item versions
    with text vectors took 142 MB, refused by Kafka as one record) is stored in parts,
    loads, and its parts go when it expires."""
    store = MemoryPartition()
    n = 800_000
    table = _big_table(n)
    ids = table.item_ids
    record = VersionRecord(0, None, 1.0, "cb", {"ts": 1}, {})
    batch = store.batch()
    add_version(store, batch, "d", record, table, keep=1)
    store.write(batch)
    raw = store.get("versions", version_key("items", "d", 1)) or b""
    assert not raw.startswith(b"PK")  # a manifest: the blob is in parts
    assert max(len(v) for _, v in store.items("versions")) <= PART_BYTES
    loaded = load_table(store, "d", 1)
    assert loaded.item_ids[654_321] == ids[654_321] and loaded.item_rows.shape == (n, 2)
    batch = store.batch()
    add_version(store, batch, "d", replace(record, parent=1), _table(2.0), keep=1)
    store.write(batch)
    assert get_record(store, "d", 1).status == EXPIRED  # type: ignore[union-attr]
    assert not any(k.startswith(b"part\x00") for k, _ in store.items("versions"))
