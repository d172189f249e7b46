"""Per-user recent items: appends in any cuts give the list model's newest entries."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.exceptions import StoreError
from store.memory import MemoryPartition
from worker.state.layout import user_key
from worker.state.users import (
    append_recent,
    decode_recent,
    encode_entries,
    encode_recent,
    recent_items,
)

entries = st.lists(
    st.tuples(st.integers(0, 2**62 - 1), st.text(min_size=1, max_size=30)), max_size=40
)


def _append(raw: bytes | None, new: list[tuple[int, str]], limit: int) -> bytes:
    enc = encode_entries([t for t, _ in new], [i for _, i in new])
    return append_recent(raw, b"".join(enc), len(new), limit)


@settings(max_examples=100, deadline=None)
@given(entries, st.lists(st.integers(1, 10), min_size=1, max_size=8), st.integers(1, 12))
def test_appends_in_any_cuts_keep_the_newest(
    events: list[tuple[int, str]], cuts: list[int], limit: int
) -> None:
    raw: bytes | None = None
    rest, k = list(events), 0
    while rest:
        take = cuts[k % len(cuts)]
        k += 1
        raw = _append(raw, rest[:take], limit)
        del rest[:take]
    whole = _append(None, events, limit) if events else None
    assert raw == whole  # byte-identical whatever the cuts
    assert decode_recent(raw) == events[-limit:]


def test_a_v1_json_value_is_read_and_appended_to() -> None:
    legacy = orjson.dumps([[1, "a"], [2, "b"], [3, "c"]])
    assert decode_recent(legacy) == [(1, "a"), (2, "b"), (3, "c")]
    raw = _append(legacy, [(4, "d")], 3)
    assert decode_recent(raw) == [(2, "b"), (3, "c"), (4, "d")]
    assert raw == encode_recent([(2, "b"), (3, "c"), (4, "d")])


def test_recent_items_reads_the_store() -> None:
    store = MemoryPartition()
    batch = store.batch()
    batch.put("users", user_key("shop", "u"), encode_recent([(5, "x"), (6, "ü")]))
    store.write(batch)
    assert recent_items(store, "shop", "u") == [(5, "x"), (6, "ü")]
    assert recent_items(store, "shop", "nobody") == []


@pytest.mark.parametrize("raw", [b"\x02", b"\x02\x00\x02\x00", b"\x09abc", b"[1, 2"])
def test_corrupt_values_raise_store_errors(raw: bytes) -> None:
    with pytest.raises(StoreError, match="recent-items record"):
        decode_recent(raw)
