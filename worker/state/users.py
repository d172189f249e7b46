"""Per-user recent items: the ``users`` column family, read by ``/users/{u}/recommend``.

Key ``domain \\0 user_id`` (:func:`worker.state.layout.user_key`); value: the user's
last ``user_history_len`` interactions, oldest first, as ``(ts, item_id)``. The processor
appends a batch's interactions in offset order and writes each touched user once, in the
batch's one write (so the index is exactly as committed as the log itself, and it does not depend on how
records were cut into batches).

Layouts (the first byte tells them apart, both are read):

* v2 (written): ``0x02``, entry count (``>H``), then per entry ``ts`` (``>q``), the
  item id's UTF-8 length (``>H``) and the id. Appending concatenates bytes and
  trimming skips whole entries from the front, so a batch never decodes a list;
* v1 (read only): a JSON list of ``[ts, item_id]`` pairs (its first byte is ``[``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import orjson

from store.exceptions import StoreError
from store.partition import StorePartition
from worker.state.layout import user_key

Recent = list[tuple[int, str]]

_V2 = 2
_HEAD = struct.Struct(">BH")  # layout version, entry count
_ENTRY = struct.Struct(">qH")  # ts, item id length (UTF-8 bytes)
_LEN = struct.Struct(">H")


def _corrupt(raw: bytes) -> StoreError:
    return StoreError(
        f"recent-items record of {len(raw)} bytes is malformed or of an unknown layout "
        f"(first byte {raw[:1]!r}); the state directory may be corrupted or written by a newer "
        "adacode: restore it from a backup or rebuild it by replaying the topics"
    )


def encode_entries(ts: Sequence[int], item_ids: Sequence[str]) -> list[bytes]:
    """One encoded entry per ``(ts, item_id)``; concatenate them in order for
    :func:`append_recent`."""
    pack = _ENTRY.pack
    out = []
    for t, item in zip(ts, item_ids, strict=True):
        raw = item.encode()
        out.append(pack(t, len(raw)) + raw)
    return out


def _body(raw: bytes | None) -> tuple[int, bytes]:
    """Entry count and v2 entry bytes of a stored value (a v1 value is converted)."""
    if not raw:
        return 0, b""
    if raw[0] == _V2:
        if len(raw) < _HEAD.size:
            raise _corrupt(raw)
        return _HEAD.unpack_from(raw)[1], raw[_HEAD.size :]
    if raw[:1] == b"[":
        recent = _decode_v1(raw)
        return len(recent), b"".join(encode_entries([t for t, _ in recent], [i for _, i in recent]))
    raise _corrupt(raw)


def append_recent(raw: bytes | None, entries: bytes, n_new: int, limit: int) -> bytes:
    """The stored value ``raw`` with ``n_new`` encoded ``entries`` appended, cut to the
    newest ``limit`` (``limit >= 1``)."""
    count, body = _body(raw)
    body += entries
    count += n_new
    if count > limit:
        off = 0
        unpack = _LEN.unpack_from
        for _ in range(count - limit):
            off += _ENTRY.size + unpack(body, off + 8)[0]
        body = body[off:]
        count = limit
    return _HEAD.pack(_V2, count) + body


def _decode_v1(raw: bytes) -> Recent:
    try:
        return [(int(ts), str(item)) for ts, item in orjson.loads(raw)]
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise _corrupt(raw) from exc


def decode_recent(raw: bytes | None) -> Recent:
    if not raw:
        return []
    if raw[:1] == b"[":
        return _decode_v1(raw)
    count, body = _body(raw)
    out: Recent = []
    off = 0
    try:
        for _ in range(count):
            ts, n = _ENTRY.unpack_from(body, off)
            off += _ENTRY.size
            out.append((ts, body[off : off + n].decode()))
            off += n
    except (struct.error, UnicodeDecodeError) as exc:
        raise _corrupt(raw) from exc
    if off != len(body):
        raise _corrupt(raw)
    return out


def encode_recent(recent: Recent) -> bytes:
    entries = encode_entries([t for t, _ in recent], [i for _, i in recent])
    return _HEAD.pack(_V2, len(recent)) + b"".join(entries)


def recent_items(store: StorePartition, domain: str, user_id: str) -> Recent:
    """The user's stored recent items (``[]`` when the user is unknown)."""
    return decode_recent(store.get("users", user_key(domain, user_id)))
