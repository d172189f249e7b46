"""Per-user recent items: appends in any cuts give the list model's newest entries, and the
same stored state; older layouts and rings of another size are re-laid out on the next
append."""

from __future__ import annotations

import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.exceptions import StoreError
from store.memory import MemoryPartition
from worker.state.layout import recent_slot_keys, user_key
from worker.state.users import (
    Ring,
    append_recent,
    decode_row,
    encode_slot_values,
    read_ring,
    recent_items,
)


def encode_row(recent: list[tuple[int, str]]) -> bytes:
    """A v2 value, as earlier versions wrote it (the layout in worker.state.users'
    docstring): ``0x02``, the entry count (``>H``), then per entry ``ts`` (``>q``), the item
    id's UTF-8 length (``>H``) and bytes."""
    parts = [struct.pack(">BH", 2, len(recent))]
    for t, item in recent:
        raw = item.encode()
        parts.append(struct.pack(">qH", t, len(raw)) + raw)
    return b"".join(parts)


entries = st.lists(
    st.tuples(st.integers(0, 2**62 - 1), st.text(min_size=1, max_size=30)), max_size=40
)
user_ids = st.text(min_size=1, max_size=8)  # any id: "\0" included


def _append(store: MemoryPartition, user: str, new: list[tuple[int, str]], limit: int) -> None:
    """What the processor does for one user in one batch."""
    key = user_key("shop", user)
    values = encode_slot_values([t for t, _ in new], [i for _, i in new])
    append = append_recent(
        "shop",
        user,
        store.get("users", key),
        values,
        limit,
        lambda keys: store.multi_get("recent", keys),
    )
    batch = store.batch()
    batch.put("users", key, append.header)
    for slot_key, value in append.slots.items():
        batch.put("recent", slot_key, value)
    for slot_key in append.deletes:
        batch.delete("recent", slot_key)
    store.write(batch)


def _dump(store: MemoryPartition) -> dict[str, list[tuple[bytes, bytes]]]:
    return {cf: list(store.items(cf)) for cf in ("users", "recent")}


def _in_cuts(
    events: list[tuple[int, str]], cuts: list[int], limit: int, user: str
) -> MemoryPartition:
    store = MemoryPartition()
    rest, k = list(events), 0
    while rest:
        take = cuts[k % len(cuts)]
        k += 1
        _append(store, user, rest[:take], limit)
        del rest[:take]
    return store


@settings(max_examples=100, deadline=None)
@given(entries, st.lists(st.integers(1, 10), min_size=1, max_size=8), st.integers(1, 12), user_ids)
def test_appends_in_any_cuts_keep_the_newest(
    events: list[tuple[int, str]], cuts: list[int], limit: int, user: str
) -> None:
    store = _in_cuts(events, cuts, limit, user)
    assert recent_items(store, "shop", user) == events[-limit:]
    whole = _in_cuts(events, [max(1, len(events))], limit, user)
    assert _dump(store) == _dump(whole)  # the same records whatever the cuts
    ring = read_ring(store.get("users", user_key("shop", user)))
    assert (ring is None) == (not events)
    if ring is not None:
        assert ring == Ring(len(events), limit)
        assert len(_dump(store)["recent"]) == min(len(events), limit)  # one slot each


def test_users_whose_ids_extend_each_other_never_share_a_slot() -> None:
    store = MemoryPartition()
    users = ["a", "a\x00", "a\x00\x00", "a\x00\x00\x00", "a\x00\x00\x01"]
    for n, user in enumerate(users):
        _append(store, user, [(n, f"i{n}"), (n + 10, f"j{n}")], 3)
    for n, user in enumerate(users):
        assert recent_items(store, "shop", user) == [(n, f"i{n}"), (n + 10, f"j{n}")]


@pytest.mark.parametrize(
    "legacy",
    [orjson.dumps([[1, "a"], [2, "b"], [3, "c"]]), encode_row([(1, "a"), (2, "b"), (3, "c")])],
    ids=["v1", "v2"],
)
def test_an_older_row_is_read_then_laid_out_as_a_ring(legacy: bytes) -> None:
    store = MemoryPartition()
    batch = store.batch()
    batch.put("users", user_key("shop", "u"), legacy)
    store.write(batch)
    assert recent_items(store, "shop", "u") == [(1, "a"), (2, "b"), (3, "c")]
    _append(store, "u", [(4, "d")], 3)
    assert recent_items(store, "shop", "u") == [(2, "b"), (3, "c"), (4, "d")]
    assert read_ring(store.get("users", user_key("shop", "u"))) == Ring(4, 3)
    _append(store, "u", [(5, "e")], 3)
    assert recent_items(store, "shop", "u") == [(3, "c"), (4, "d"), (5, "e")]


def test_a_ring_of_another_size_is_laid_out_again() -> None:
    store = MemoryPartition()
    events = [(t, f"i{t}") for t in range(7)]
    _append(store, "u", events, 5)
    _append(store, "u", [(7, "i7")], 3)  # user_history_len lowered: slots 3 and 4 go
    assert recent_items(store, "shop", "u") == [*events[-2:], (7, "i7")]
    assert {k for k, _ in store.items("recent")} == set(recent_slot_keys("shop", "u", range(3)))
    _append(store, "u", [(8, "i8")], 6)  # raised: what the ring holds is kept
    assert recent_items(store, "shop", "u") == [*events[-2:], (7, "i7"), (8, "i8")]
    assert read_ring(store.get("users", user_key("shop", "u"))) == Ring(4, 6)


def test_recent_items_of_an_unknown_user_are_empty() -> None:
    assert recent_items(MemoryPartition(), "shop", "nobody") == []


@pytest.mark.parametrize(
    "raw",
    [b"\x02", b"\x02\x00\x02\x00", b"\x09abc", b"[1, 2", b"\x03\x00", Ring(1, 0).encode()],
)
def test_corrupt_values_raise_store_errors(raw: bytes) -> None:
    store = MemoryPartition()
    batch = store.batch()
    batch.put("users", user_key("shop", "u"), raw)
    store.write(batch)
    with pytest.raises(StoreError, match="recent-items record"):
        recent_items(store, "shop", "u")


def test_a_missing_slot_is_a_store_error() -> None:
    store = MemoryPartition()
    batch = store.batch()
    batch.put("users", user_key("shop", "u"), Ring(2, 5).encode())
    batch.put("recent", recent_slot_keys("shop", "u", [0])[0], encode_slot_values([1], ["a"])[0])
    store.write(batch)
    with pytest.raises(StoreError, match="recent-items record"):
        recent_items(store, "shop", "u")


def test_decode_row_reads_both_older_layouts() -> None:
    recent = [(5, "x"), (6, "ü")]
    assert decode_row(encode_row(recent)) == recent
    assert decode_row(orjson.dumps([[5, "x"], [6, "ü"]])) == recent
    assert decode_row(None) == []


class _AppendsMidRead(MemoryPartition):
    """A store whose first ``times`` reads of ring slots let a batch append to the user
    between the reader's header read and its slot read (the consuming thread's race)."""

    def __init__(self, user: str, times: int) -> None:
        super().__init__()
        self.user, self.times, self.t = user, times, 100

    def scan(self, cf: str, *, prefix: bytes = b"") -> tuple[list[bytes], list[bytes]]:
        if cf == "recent" and self.times:
            self.times -= 1
            self.t += 1
            _append(self, self.user, [(self.t, f"n{self.t}")], 3)
        return super().scan(cf, prefix=prefix)


def test_a_read_never_mixes_slots_of_two_appends() -> None:
    store = _AppendsMidRead("u", times=0)
    _append(store, "u", [(1, "a"), (2, "b"), (3, "c")], 3)
    store.times = 2  # two appends land between header and slots, then the reads settle
    assert recent_items(store, "shop", "u") == [(3, "c"), (101, "n101"), (102, "n102")]
    store.times = 10**6  # an append on every read
    with pytest.raises(StoreError, match="changed on each of"):
        recent_items(store, "shop", "u")
