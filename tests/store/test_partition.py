"""The StorePartition contract, run against every implementation (memory, RocksDB)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import store.memory
from store import MemoryPartition, RocksDBPartition, StorePartition, open_partition
from store.exceptions import StoreClosedError, StoreError, StoreWriteError
from store.partition import (
    COLUMN_FAMILIES,
    FORMAT,
    FORMAT_KEY,
    SCAN_CHUNK,
    decode_offset_key,
    key_range,
    offset_key,
    prefix_upper_bound,
)


@pytest.fixture(params=["memory", "rocksdb"])
def partition(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorePartition]:
    opened: StorePartition
    if request.param == "memory":
        opened = MemoryPartition()
    else:
        opened = RocksDBPartition.open(tmp_path / "state")
    yield opened
    opened.close()


def put_all(partition: StorePartition, cf: str, rows: dict[bytes, bytes]) -> None:
    batch = partition.batch()
    for key, value in rows.items():
        batch.put(cf, key, value)
    partition.write(batch)


# ---- point reads and writes ------------------------------------------------------------


def test_put_get_delete(partition: StorePartition) -> None:
    put_all(partition, "items", {b"a": b"1", b"b": b"2"})
    assert partition.get("items", b"a") == b"1"
    assert partition.get("items", b"b") == b"2"
    assert partition.get("items", b"c") is None

    batch = partition.batch()
    batch.delete("items", b"a")
    batch.delete("items", b"never-there")
    batch.put("items", b"b", b"22")
    partition.write(batch)
    assert partition.get("items", b"a") is None
    assert partition.get("items", b"b") == b"22"


def test_column_families_are_separate(partition: StorePartition) -> None:
    batch = partition.batch()
    for i, cf in enumerate(COLUMN_FAMILIES):
        batch.put(cf, b"same-key", cf.encode() + bytes([i]))
    partition.write(batch)
    for i, cf in enumerate(COLUMN_FAMILIES):
        assert partition.get(cf, b"same-key") == cf.encode() + bytes([i])
        marker = [FORMAT_KEY] if cf == "meta" else []
        assert [k for k, _ in partition.items(cf)] == sorted([b"same-key", *marker])


def test_new_partition_holds_only_the_format_marker(partition: StorePartition) -> None:
    assert {cf: list(partition.items(cf)) for cf in COLUMN_FAMILIES} == {
        cf: [(FORMAT_KEY, FORMAT)] if cf == "meta" else [] for cf in COLUMN_FAMILIES
    }


def test_unknown_column_family_is_rejected(partition: StorePartition) -> None:
    with pytest.raises(StoreError, match="unknown column family 'nope'"):
        partition.get("nope", b"k")
    with pytest.raises(StoreError, match="unknown column family"):
        list(partition.items("nope"))
    with pytest.raises(StoreError, match="unknown column family"):
        partition.batch().put("nope", b"k", b"v")


def test_multi_get_keeps_order_and_reports_missing(partition: StorePartition) -> None:
    put_all(partition, "codes", {b"x": b"1", b"y": b"2", b"z": b"3"})
    assert partition.multi_get("codes", [b"z", b"missing", b"x", b"x"]) == [
        b"3",
        None,
        b"1",
        b"1",
    ]
    assert partition.multi_get("codes", []) == []
    assert partition.multi_get("items", [b"x"]) == [None]


def test_empty_key_and_binary_values(partition: StorePartition) -> None:
    put_all(partition, "users", {b"": b"\x00\xff", b"\x00": b""})
    assert partition.get("users", b"") == b"\x00\xff"
    assert partition.get("users", b"\x00") == b""
    assert list(partition.items("users", prefix=b"")) == [(b"", b"\x00\xff"), (b"\x00", b"")]


def test_delete_range_is_half_open_and_per_column_family(partition: StorePartition) -> None:
    rows = {bytes([c]): b"v" for c in b"abcdef"}
    put_all(partition, "users", rows)
    put_all(partition, "items", rows)
    batch = partition.batch()
    batch.delete_range("users", b"b", b"e")
    batch.delete_range("users", b"f", b"a")  # reversed: removes nothing
    partition.write(batch)
    assert [k for k, _ in partition.items("users")] == [b"a", b"e", b"f"]
    assert [k for k, _ in partition.items("items")] == sorted(rows)


def test_batch_operations_apply_in_order(partition: StorePartition) -> None:
    put_all(partition, "items", {b"k1": b"old", b"k3": b"old"})
    batch = partition.batch()
    batch.put("items", b"k1", b"new")
    batch.delete("items", b"k1")  # put then delete: gone
    batch.delete("items", b"k2")
    batch.put("items", b"k2", b"new")  # delete then put: present
    batch.delete_range("items", b"k", b"l")
    batch.put("items", b"k3", b"newest")  # range delete then put: present
    assert len(batch) == 6
    partition.write(batch)
    assert list(partition.items("items")) == [(b"k3", b"newest")]


def test_count(partition: StorePartition) -> None:
    put_all(partition, "popularity", {b"d1\x00a": b"", b"d1\x00b": b"", b"d2\x00a": b""})
    assert partition.count("popularity") == 3
    assert partition.count("popularity", prefix=b"d1\x00") == 2
    assert partition.count("popularity", prefix=b"d3\x00") == 0


# ---- ordered iteration -----------------------------------------------------------------

KEYS = [
    b"",
    b"\x00",
    b"a",
    b"a\x00",
    b"ab",
    b"ab\xff",
    b"ab\xff\xff",
    b"ac",
    b"b",
    b"\xff",
    b"\xff\xff",
]


BOUNDS_CASES: list[tuple[dict[str, Any], list[bytes]]] = [
    ({}, KEYS),
    ({"prefix": b"ab"}, [b"ab", b"ab\xff", b"ab\xff\xff"]),
    ({"prefix": b"ab\xff"}, [b"ab\xff", b"ab\xff\xff"]),
    ({"prefix": b"\xff"}, [b"\xff", b"\xff\xff"]),
    ({"prefix": b"a", "start": b"ab", "end": b"ac"}, [b"ab", b"ab\xff", b"ab\xff\xff"]),
    ({"prefix": b"ab", "start": b"a"}, [b"ab", b"ab\xff", b"ab\xff\xff"]),
    ({"prefix": b"ab", "end": b"zz"}, [b"ab", b"ab\xff", b"ab\xff\xff"]),
    ({"start": b"a\x00", "end": b"ab\xff"}, [b"a\x00", b"ab"]),
    ({"start": b"ab\xff\xff"}, [b"ab\xff\xff", b"ac", b"b", b"\xff", b"\xff\xff"]),
    ({"end": b"a"}, [b"", b"\x00"]),
    ({"start": b"b", "end": b"a"}, []),
    ({"prefix": b"zz"}, []),
    ({"end": b""}, []),
]


def test_items_bounds(partition: StorePartition) -> None:
    put_all(partition, "versions", {k: k + b"!" for k in KEYS})
    put_all(partition, "codes", {b"ab": b"other family"})
    for kwargs, expected in BOUNDS_CASES:
        for reverse in (False, True):
            got = list(partition.items("versions", reverse=reverse, **kwargs))
            want = list(reversed(expected)) if reverse else expected
            assert got == [(k, k + b"!") for k in want], (kwargs, reverse)


def test_scan_is_items_as_two_lists_and_refuses_a_closed_store(partition: StorePartition) -> None:
    put_all(partition, "versions", {k: k + b"!" for k in KEYS})
    put_all(partition, "codes", {b"ab": b"other family"})
    for prefix in (b"", b"a", b"ab", b"b\xff", b"zz", b"\xff"):
        keys, values = partition.scan("versions", prefix=prefix)
        assert list(zip(keys, values, strict=True)) == list(
            partition.items("versions", prefix=prefix)
        ), prefix
    assert partition.scan("codes") == ([b"ab"], [b"other family"])
    assert partition.scan("codes", prefix=b"x") == ([], [])
    partition.close()
    with pytest.raises(StoreClosedError):
        partition.scan("versions")


def test_a_scan_longer_than_its_read_chunk_returns_every_row_once_in_order(
    partition: StorePartition,
) -> None:
    """More rows than the RocksDB scan reads per call (``SCAN_CHUNK``), around a prefix."""
    n = 2 * SCAN_CHUNK + 3
    rows = {b"p" + i.to_bytes(4, "big"): i.to_bytes(4, "little") for i in range(n)}
    put_all(partition, "codes", rows | {b"o": b"before", b"q": b"after"})
    keys, values = partition.scan("codes", prefix=b"p")
    assert list(zip(keys, values, strict=True)) == sorted(rows.items())


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_chunked_scans_give_every_row_once_in_order_from_one_snapshot(
    partition: StorePartition, size: int
) -> None:
    """``scan_chunks``: chunks of at most ``size`` rows, together the scan's rows; rows
    written after the first chunk was read are not in the later ones."""
    rows = {b"p" + i.to_bytes(4, "big"): i.to_bytes(4, "little") for i in range(3 * 7 + 2)}
    put_all(partition, "codes", rows | {b"o": b"before", b"q": b"after"})
    chunks = partition.scan_chunks("codes", size, prefix=b"p")
    first_keys, first_values = next(chunks)
    batch = partition.batch()
    batch.put("codes", b"p\xff", b"later")
    batch.delete("codes", b"p" + (22).to_bytes(4, "big"))
    partition.write(batch)
    rest = list(chunks)
    assert len(first_keys) == min(size, len(rows))
    assert all(0 < len(k) <= size and len(k) == len(v) for k, v in rest)
    keys = first_keys + [k for ks, _ in rest for k in ks]
    values = first_values + [v for _, vs in rest for v in vs]
    assert list(zip(keys, values, strict=True)) == sorted(rows.items())
    assert list(partition.scan_chunks("codes", 3, prefix=b"zz")) == []
    with pytest.raises(ValueError, match="at least 1"):
        next(partition.scan_chunks("codes", 0))


def test_prefix_helpers_match_a_brute_force_scan() -> None:
    alphabet = [b"\x00", b"\x01", b"\xfe", b"\xff"]
    words = [b""] + alphabet + [a + b for a in alphabet for b in alphabet]
    for prefix in words:
        upper = prefix_upper_bound(prefix)
        for key in words:
            in_bounds = key >= prefix and (upper is None or key < upper)
            assert in_bounds == key.startswith(prefix), (prefix, key)
    assert key_range(b"ab", b"a", b"b") == (b"ab", b"ac")
    assert key_range(b"", None, None) == (b"", None)


def test_iteration_is_a_consistent_view(partition: StorePartition) -> None:
    put_all(partition, "interactions", {bytes([i]): b"before" for i in range(10)})
    rows = partition.items("interactions")
    first = next(rows)
    batch = partition.batch()
    batch.delete("interactions", bytes([5]))
    batch.put("interactions", bytes([3]), b"after")
    batch.put("interactions", bytes([20]), b"after")
    partition.write(batch)
    rest = list(rows)
    assert [first, *rest] == [(bytes([i]), b"before") for i in range(10)]
    assert partition.get("interactions", bytes([3])) == b"after"


# Keys from a small alphabet that includes the awkward bytes, so random operations
# collide, share prefixes, and hit the \xff edge of prefix bounds.
_key = st.lists(st.sampled_from([0x00, 0x01, 0x61, 0x62, 0xFE, 0xFF]), max_size=3).map(bytes)
_cf = st.sampled_from(["items", "codes"])
_op = st.one_of(
    st.tuples(st.just("put"), _cf, _key, st.binary(max_size=4)),
    st.tuples(st.just("delete"), _cf, _key, st.just(b"")),
    st.tuples(st.just("delete_range"), _cf, _key, _key),
)
_query = st.tuples(
    _cf,
    _key,  # prefix
    st.one_of(st.none(), _key),  # start
    st.one_of(st.none(), _key),  # end
    st.booleans(),  # reverse
)
_EVERYTHING = b"\xff" * 4  # above every key of at most 3 bytes


def _apply_to_model(
    model: dict[str, dict[bytes, bytes]], op: tuple[str, str, bytes, bytes]
) -> None:
    kind, cf, a, b = op
    rows = model[cf]
    if kind == "put":
        rows[a] = b
    elif kind == "delete":
        rows.pop(a, None)
    else:
        for key in [k for k in rows if a <= k < b]:
            del rows[key]


def _model_items(
    rows: dict[bytes, bytes], prefix: bytes, start: bytes | None, end: bytes | None, reverse: bool
) -> list[tuple[bytes, bytes]]:
    hits = [
        (k, rows[k])
        for k in sorted(rows)
        if k.startswith(prefix) and (start is None or k >= start) and (end is None or k < end)
    ]
    return hits[::-1] if reverse else hits


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    batches=st.lists(st.lists(_op, max_size=8), max_size=5),
    queries=st.lists(_query, min_size=1, max_size=6),
)
def test_random_operations_match_a_sorted_dict_model(
    partition: StorePartition,
    batches: list[list[tuple[str, str, bytes, bytes]]],
    queries: list[tuple[str, bytes, bytes | None, bytes | None, bool]],
) -> None:
    # The fixture is shared by the examples: start each one empty.
    reset = partition.batch()
    for cf in ("items", "codes"):
        reset.delete_range(cf, b"", _EVERYTHING)
    partition.write(reset)

    model: dict[str, dict[bytes, bytes]] = {"items": {}, "codes": {}}
    for ops in batches:
        batch = partition.batch()
        for op in ops:
            kind, cf, a, b = op
            if kind == "put":
                batch.put(cf, a, b)
            elif kind == "delete":
                batch.delete(cf, a)
            else:
                batch.delete_range(cf, a, b)
            _apply_to_model(model, op)
        partition.write(batch)

    for cf, rows in model.items():
        assert list(partition.items(cf)) == sorted(rows.items())
        probe = sorted({*rows, b"", b"a", b"\xff"})
        assert partition.multi_get(cf, probe) == [rows.get(k) for k in probe]
    for cf, prefix, start, end, reverse in queries:
        got = list(partition.items(cf, prefix=prefix, start=start, end=end, reverse=reverse))
        assert got == _model_items(model[cf], prefix, start, end, reverse)


# ---- batches ---------------------------------------------------------------------------


def test_batch_is_invisible_until_written(partition: StorePartition) -> None:
    batch = partition.batch()
    batch.put("items", b"k", b"v")
    batch.set_offset("items", 0, 7)
    assert partition.get("items", b"k") is None
    assert partition.get_offset("items", 0) is None
    assert list(partition.items("items")) == []
    partition.write(batch)
    assert partition.get("items", b"k") == b"v"
    assert partition.get_offset("items", 0) == 7


def test_batch_is_written_once(partition: StorePartition) -> None:
    batch = partition.batch()
    batch.put("items", b"k", b"v")
    partition.write(batch)
    with pytest.raises(StoreError, match="already written"):
        partition.write(batch)
    with pytest.raises(StoreError, match="already written"):
        batch.put("items", b"k2", b"v")
    assert partition.get("items", b"k2") is None


def test_batch_of_another_partition_is_rejected(partition: StorePartition, tmp_path: Path) -> None:
    for other in (MemoryPartition(), RocksDBPartition.open(tmp_path / "other")):
        with other:
            batch = other.batch()
            batch.put("items", b"k", b"v")
            with pytest.raises(StoreError, match="not made by this partition"):
                partition.write(batch)
    assert partition.get("items", b"k") is None


class _FailingRdict:
    """Stands in for a rocksdict database whose next write fails like a full disk."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def write(self, *args: Any, **kwargs: Any) -> None:
        raise Exception("IO error: No space left on device (simulated)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def _break_next_write(partition: StorePartition, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next write fail midway (memory) or in the engine (RocksDB)."""
    if isinstance(partition, RocksDBPartition):
        monkeypatch.setattr(partition, "_db", _FailingRdict(partition._db))
        return
    original: Callable[..., None] = store.memory._Family.set
    calls = {"n": 0}

    def failing_set(self: Any, key: bytes, value: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # after two operations have been applied
            monkeypatch.setattr(store.memory._Family, "set", original)
            raise MemoryError("simulated failure while applying")
        original(self, key, value)

    monkeypatch.setattr(store.memory._Family, "set", failing_set)


def test_failed_write_applies_nothing(
    partition: StorePartition, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = partition.batch()
    first.put("items", b"a", b"1")
    first.put("items", b"c", b"3")
    first.set_offset("items", 0, 10)
    partition.write(first)
    before = {cf: list(partition.items(cf)) for cf in COLUMN_FAMILIES}

    doomed = partition.batch()
    doomed.put("items", b"a", b"changed")
    doomed.delete("items", b"c")
    doomed.put("items", b"b", b"2")
    doomed.delete_range("items", b"", b"z")
    doomed.put("codes", b"x", b"y")
    doomed.set_offset("items", 0, 20)
    _break_next_write(partition, monkeypatch)
    with pytest.raises(StoreWriteError, match=r"nothing of it.*offsets"):
        partition.write(doomed)
    monkeypatch.undo()

    assert {cf: list(partition.items(cf)) for cf in COLUMN_FAMILIES} == before
    assert partition.get_offset("items", 0) == 10
    again = partition.batch()
    again.set_offset("items", 0, 20)
    partition.write(again)
    assert partition.get_offset("items", 0) == 20


# ---- offsets ---------------------------------------------------------------------------


def test_offsets_round_trip(partition: StorePartition) -> None:
    wanted = {("items", 0): 0, ("items", 1): 42, ("interactions", 256): 2**40, ("x", 7): 5}
    batch = partition.batch()
    for (topic, part), offset in wanted.items():
        batch.set_offset(topic, part, offset)
    partition.write(batch)
    assert partition.offsets() == wanted
    for (topic, part), offset in wanted.items():
        assert partition.get_offset(topic, part) == offset
    assert partition.get_offset("items", 2) is None
    assert partition.get_offset("item", 0) is None

    batch = partition.batch()
    batch.set_offset("items", 1, 43)
    partition.write(batch)
    assert partition.offsets() == {**wanted, ("items", 1): 43}


@given(
    topic=st.text(st.characters(codec="utf-8", min_codepoint=1), max_size=20),
    part=st.integers(0, 2**31 - 1),
)
@settings(max_examples=50, deadline=None)
def test_offset_key_round_trip(topic: str, part: int) -> None:
    assert decode_offset_key(offset_key(topic, part)) == (topic, part)


# ---- checkpoints and lifecycle ---------------------------------------------------------


def test_checkpoint_is_a_frozen_read_only_copy(partition: StorePartition, tmp_path: Path) -> None:
    put_all(partition, "items", {b"a": b"1", b"b": b"2"})
    put_all(partition, "codes", {b"a": b"code"})
    batch = partition.batch()
    batch.set_offset("items", 0, 5)
    partition.write(batch)

    with partition.checkpoint(tmp_path / "checkpoint") as frozen:
        later = partition.batch()
        later.put("items", b"a", b"changed")
        later.delete("items", b"b")
        later.put("items", b"c", b"3")
        later.delete_range("codes", b"", b"\xff")
        later.set_offset("items", 0, 9)
        partition.write(later)

        assert list(frozen.items("items")) == [(b"a", b"1"), (b"b", b"2")]
        assert frozen.get("codes", b"a") == b"code"
        assert frozen.offsets() == {("items", 0): 5}
        assert list(partition.items("items")) == [(b"a", b"changed"), (b"c", b"3")]
        assert partition.get_offset("items", 0) == 9

        attempt = frozen.batch()
        attempt.put("items", b"z", b"z")
        with pytest.raises(StoreError):
            frozen.write(attempt)
        assert frozen.get("items", b"z") is None


def test_checkpoint_taken_while_another_thread_writes_is_consistent(
    partition: StorePartition, tmp_path: Path
) -> None:
    # Every batch moves the same counter in two column families and the offset.
    stop = threading.Event()
    started = threading.Event()
    errors: list[BaseException] = []

    def consumer() -> None:
        try:
            for n in range(1, 100_000):
                if stop.is_set():
                    return
                batch = partition.batch()
                value = n.to_bytes(8, "big")
                batch.put("items", b"counter", value)
                batch.put("codes", b"counter", value)
                batch.set_offset("items", 0, n)
                partition.write(batch)
                started.set()
        except BaseException as exc:
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=consumer)
    thread.start()
    try:
        assert started.wait(timeout=10)
        seen = []
        for i in range(3):
            with partition.checkpoint(tmp_path / f"checkpoint-{i}") as frozen:
                items = frozen.get("items", b"counter")
                n = 0 if items is None else int.from_bytes(items, "big")
                assert frozen.get("codes", b"counter") == items
                assert (frozen.get_offset("items", 0) or 0) == n
                seen.append(n)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert seen[0] >= 1
    assert seen == sorted(seen)


def test_close_is_idempotent_and_use_after_close_raises(partition: StorePartition) -> None:
    put_all(partition, "items", {b"a": b"1", b"b": b"2"})
    rows = partition.items("items")
    assert next(rows) == (b"a", b"1")
    batch = partition.batch()
    batch.put("items", b"c", b"3")
    partition.close()
    partition.close()
    with pytest.raises(StoreClosedError):
        next(rows)
    with pytest.raises(StoreClosedError):
        partition.get("items", b"a")
    with pytest.raises(StoreClosedError):
        partition.multi_get("items", [b"a"])
    with pytest.raises(StoreClosedError):
        partition.items("items")
    with pytest.raises(StoreClosedError):
        partition.batch()
    with pytest.raises(StoreClosedError):
        partition.write(batch)
    with pytest.raises(StoreClosedError):
        partition.offsets()


def test_open_partition_picks_the_implementation(tmp_path: Path) -> None:
    with open_partition(None) as memory:
        assert isinstance(memory, MemoryPartition)
    with pytest.raises(StoreError, match="in-memory"):
        open_partition(None, read_only=True)
    with open_partition(tmp_path / "state", sync_writes=False) as rocks:
        assert isinstance(rocks, RocksDBPartition)
        put_all(rocks, "items", {b"k": b"v"})
    with open_partition(str(tmp_path / "state"), read_only=True) as view:
        assert view.get("items", b"k") == b"v"


def test_memory_usage_names_its_parts_and_grows_with_unflushed_writes(
    partition: StorePartition,
) -> None:
    before = partition.memory_usage()
    assert before and all(isinstance(v, int) and v >= 0 for v in before.values())
    put_all(partition, "items", {b"k%05d" % i: b"v" * 200 for i in range(2000)})
    after = partition.memory_usage()
    assert after.keys() == before.keys()
    # the 400 KB just written sit in memory: the values (memory) or the memtables (RocksDB)
    grown = sum(after.values()) - sum(before.values())
    assert grown >= 2000 * 200
    partition.close()
    with pytest.raises(StoreError):
        partition.memory_usage()
