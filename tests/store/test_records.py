"""Item records read in bulk (store.records.hold_embeddings) against decoding them one by one."""

from __future__ import annotations

import numpy as np
import pytest

from store.exceptions import StoreError
from store.records import ItemRecord, hold_embeddings


def _records(seed: int, n: int = 300) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = int(rng.integers(0, 4))
        embedding = b"" if kind == 0 else rng.normal(size=int(rng.integers(1, 9))).astype("<f4")
        text_hash = bytes(rng.integers(0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8))
        record = ItemRecord(
            int(rng.integers(0, 10**9)),
            int(rng.integers(0, 10**9)),
            text_hash=text_hash if kind != 1 else b"",
            embedding=bytes(embedding),
            placeholder=kind == 2,
        )
        out.append(record.encode())
        if i % 50 == 0:  # a placeholder with a vector left in it still counts as one
            out.append(ItemRecord(1, 2, embedding=b"\0" * 8, placeholder=True).encode())
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hold_embeddings_equals_decoding_each_record(seed: int) -> None:
    raws = _records(seed)
    want = [not (r.placeholder or not r.embedding) for r in (ItemRecord.decode(x) for x in raws)]
    got = hold_embeddings(raws)
    assert got.dtype == bool and got.tolist() == want
    assert 0 < sum(want) < len(want)
    assert hold_embeddings([]).shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [
        b"\x01\x00",  # shorter than the head
        b"\x02" + ItemRecord(1, 1, embedding=b"\0" * 4).encode()[1:],  # unknown layout
        ItemRecord(1, 1, text_hash=b"ab", embedding=b"\0" * 4).encode()[:-1],  # torn vector
        ItemRecord(1, 1, text_hash=b"abc").encode()[:-2],  # shorter than its text hash
    ],
    ids=["short", "layout", "torn", "text-hash"],
)
def test_a_record_decode_refuses_is_refused_in_bulk_too(bad: bytes) -> None:
    with pytest.raises(StoreError):
        ItemRecord.decode(bad)
    with pytest.raises(StoreError, match="malformed"):
        hold_embeddings([*_records(3, 20), bad])
