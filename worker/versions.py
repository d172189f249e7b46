"""Per-domain table versions: immutable records, an atomic current pointer, rollback.

Layout in the ``versions`` column family (``v`` is a big-endian int64)::

    rec    \\0 <domain> \\0 v     -> VersionRecord (JSON)
    table  \\0 <domain> \\0 v     -> model snapshot (npz bytes, written once)
    items  \\0 <domain> \\0 v     -> item ids and their table-row ids at training time (npz)
    current\\0 <domain>           -> v
    next   \\0 <domain>           -> next version number (numbers are never reused)
    switch \\0 <domain> \\0 seq   -> {"from", "to", "reason", "at"}

A version's rows are written once; switching the current version is one write of
the pointer and its switch record, so a reader sees the old table or the new one,
never a mix. Retention keeps the newest ``versions_keep`` published versions, the
current one and pinned ones; older tables are deleted, their records stay.
"""

from __future__ import annotations

import io
import struct
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import orjson

from quantize.table_model import Snapshot
from store.partition import StorePartition, WriteBatch
from worker.exceptions import WorkerError

_V = struct.Struct(">q")

PUBLISHED, REJECTED, EXPIRED = "published", "rejected", "expired"


class VersionError(WorkerError):
    """A version operation cannot be done (unknown version, no table, nothing to roll back to)."""


def _key(kind: str, domain: str, version: int | None = None) -> bytes:
    base = kind.encode() + b"\x00" + domain.encode()
    return base if version is None else base + b"\x00" + _V.pack(version)


@dataclass(frozen=True)
class VersionRecord:
    version: int
    parent: int | None
    created_at: float
    codebook_id: str
    watermark: dict[str, Any]  # {"offsets": {"topic-partition": next offset}, "ts": event time}
    metrics: dict[str, float]
    status: str = PUBLISHED
    pinned: bool = False
    n_items: int = 0
    table_bytes: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> VersionRecord:
        return cls(**orjson.loads(raw))


@dataclass(frozen=True)
class VersionTable:
    """What serving needs of a version: the model and the items' row ids at training time."""

    snapshot: Snapshot
    item_ids: list[str]
    item_rows: np.ndarray  # int64 [n, width], -1 padded


def encode_items(item_ids: list[str], item_rows: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(item_ids, dtype=str), rows=np.asarray(item_rows, dtype=np.int64))
    return buf.getvalue()


def decode_items(raw: bytes) -> tuple[list[str], np.ndarray]:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return [str(s) for s in z["ids"]], z["rows"]


# --- reads ---------------------------------------------------------------------------------


def current_version(store: StorePartition, domain: str) -> int | None:
    raw = store.get("versions", _key("current", domain))
    return None if raw is None else int(_V.unpack(raw)[0])


def get_record(store: StorePartition, domain: str, version: int) -> VersionRecord | None:
    raw = store.get("versions", _key("rec", domain, version))
    return None if raw is None else VersionRecord.decode(raw)


def list_records(store: StorePartition, domain: str) -> list[VersionRecord]:
    prefix = _key("rec", domain) + b"\x00"
    return [VersionRecord.decode(v) for _, v in store.items("versions", prefix=prefix)]


def switches(store: StorePartition, domain: str) -> list[dict[str, Any]]:
    prefix = _key("switch", domain) + b"\x00"
    return [orjson.loads(v) for _, v in store.items("versions", prefix=prefix)]


def domains_with_versions(store: StorePartition) -> list[str]:
    return sorted(
        k[len(b"current\x00") :].decode() for k, _ in store.items("versions", prefix=b"current\x00")
    )


def load_table(store: StorePartition, domain: str, version: int) -> VersionTable:
    table = store.get("versions", _key("table", domain, version))
    items = store.get("versions", _key("items", domain, version))
    if table is None or items is None:
        record = get_record(store, domain, version)
        status = "unknown" if record is None else record.status
        raise VersionError(
            f"domain {domain!r} has no table for version {version} (status {status}); "
            f"list the versions with: adacode versions --domain {domain}"
        )
    ids, rows = decode_items(items)
    return VersionTable(Snapshot.from_bytes(table), ids, rows)


def item_vectors(table: VersionTable) -> np.ndarray:
    """The version's item vectors ``[n_items, hidden]`` (float32), in ``table.item_ids`` order."""
    import torch

    model = table.snapshot.model()
    with torch.no_grad():
        return model.item_vectors(torch.as_tensor(table.item_rows)).numpy().astype(np.float32)


# --- writes --------------------------------------------------------------------------------


def _next_number(store: StorePartition, domain: str) -> int:
    raw = store.get("versions", _key("next", domain))
    return 1 if raw is None else int(_V.unpack(raw)[0])


def _put_switch(
    store: StorePartition, batch: WriteBatch, domain: str, old: int | None, new: int, reason: str
) -> None:
    prefix = _key("switch", domain) + b"\x00"
    seq = sum(1 for _ in store.items("versions", prefix=prefix))
    batch.put("versions", _key("current", domain), _V.pack(new))
    batch.put(
        "versions",
        prefix + _V.pack(seq),
        orjson.dumps({"from": old, "to": new, "reason": reason, "at": time.time()}),
    )


def add_version(
    store: StorePartition,
    batch: WriteBatch,
    domain: str,
    record: VersionRecord,
    table: VersionTable | None,
    *,
    keep: int,
) -> VersionRecord:
    """Put a new version (numbered here) into ``batch``; switch to it if it is published.

    1. Take the next version number (never reused, even for rejected candidates).
    2. Write the table and the item rows once (published versions only).
    3. Write the record.
    4. Switch the current pointer and log the switch (published versions only).
    5. Expire tables beyond the retention (records stay, with status ``expired``).
    """
    # -- 1. number ------------------------------------------------------------------------
    number = _next_number(store, domain)
    record = replace(record, version=number)
    batch.put("versions", _key("next", domain), _V.pack(number + 1))
    # -- 2. table -------------------------------------------------------------------------
    if record.status == PUBLISHED:
        if table is None:
            raise VersionError(f"version {number} of {domain!r} is published without a table")
        batch.put("versions", _key("table", domain, number), table.snapshot.to_bytes())
        batch.put(
            "versions", _key("items", domain, number), encode_items(table.item_ids, table.item_rows)
        )
    # -- 3. record ------------------------------------------------------------------------
    batch.put("versions", _key("rec", domain, number), record.encode())
    # -- 4. switch ------------------------------------------------------------------------
    if record.status == PUBLISHED:
        _put_switch(store, batch, domain, current_version(store, domain), number, "publish")
    # -- 5. retention ---------------------------------------------------------------------
    if record.status == PUBLISHED:
        published = [r for r in list_records(store, domain) if r.status == PUBLISHED] + [record]
        published.sort(key=lambda r: r.version)
        for old in published[:-keep] if keep > 0 else []:
            if old.pinned or old.version == number:
                continue
            batch.delete("versions", _key("table", domain, old.version))
            batch.delete("versions", _key("items", domain, old.version))
            batch.put(
                "versions", _key("rec", domain, old.version), replace(old, status=EXPIRED).encode()
            )
    return record


def rollback(
    store: StorePartition,
    batch: WriteBatch,
    domain: str,
    *,
    to: int | None = None,
    previous: bool = False,
) -> tuple[int | None, int]:
    """Switch ``domain`` to version ``to`` (or the published one before the current).

    Returns ``(from, to)``. Raises :class:`VersionError` naming what is available.
    """
    current = current_version(store, domain)
    records = {r.version: r for r in list_records(store, domain)}
    servable = sorted(v for v, r in records.items() if r.status == PUBLISHED)
    if previous:
        older = [v for v in servable if current is None or v < current]
        if not older:
            raise VersionError(
                f"domain {domain!r} has no published version before {current}; "
                f"servable versions: {servable or 'none'}"
            )
        to = older[-1]
    if to is None:
        raise VersionError("rollback needs a version (--to V) or --previous")
    if to not in records or records[to].status != PUBLISHED:
        status = records[to].status if to in records else "unknown"
        raise VersionError(
            f"cannot roll domain {domain!r} back to version {to} ({status}); "
            f"servable versions: {servable or 'none'}"
        )
    _put_switch(store, batch, domain, current, to, "rollback")
    return current, to


def set_pinned(
    store: StorePartition, batch: WriteBatch, domain: str, version: int, pinned: bool
) -> None:
    record = get_record(store, domain, version)
    if record is None:
        raise VersionError(f"domain {domain!r} has no version {version}")
    batch.put("versions", _key("rec", domain, version), replace(record, pinned=pinned).encode())
