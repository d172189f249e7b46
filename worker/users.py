"""Per-user recent items: the ``users`` column family, read by ``/users/{u}/recommend``.

Key ``domain \\0 user_id``; value: a JSON list of ``[ts, item_id]`` pairs, oldest
first, at most ``user_history_len`` long. The processor appends a batch's
interactions in offset order and writes each touched user once, in the batch's
one write (so the index is exactly as committed as the log itself, and it does not
depend on how records were cut into batches).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from store.partition import StorePartition, WriteBatch
from store.records import item_key

Recent = list[tuple[int, str]]


def user_key(domain: str, user_id: str) -> bytes:
    return item_key(domain, user_id)  # the same ``domain \0 id`` layout


def decode_recent(raw: bytes | None) -> Recent:
    if not raw:
        return []
    return [(int(ts), str(item)) for ts, item in orjson.loads(raw)]


def encode_recent(recent: Recent) -> bytes:
    return orjson.dumps(recent)


def recent_items(store: StorePartition, domain: str, user_id: str) -> Recent:
    """The user's stored recent items (``[]`` when the user is unknown)."""
    return decode_recent(store.get("users", user_key(domain, user_id)))


class RecentItems:
    """The users a batch touches, with their lists; written once per user at the end."""

    def __init__(self, store: StorePartition, limit: int) -> None:
        self.store = store
        self.limit = limit
        self.lists: dict[bytes, Recent] = {}

    def prefetch(self, keys: Sequence[bytes]) -> None:
        missing = [k for k in dict.fromkeys(keys) if k not in self.lists]
        if missing:
            for key, raw in zip(missing, self.store.multi_get("users", missing), strict=True):
                self.lists[key] = decode_recent(raw)

    def append(self, domain: str, user_id: str, ts: int, item_id: str) -> None:
        key = user_key(domain, user_id)
        recent = self.lists.get(key)
        if recent is None:
            recent = self.lists[key] = recent_items(self.store, domain, user_id)
        recent.append((ts, item_id))

    def flush(self, batch: WriteBatch) -> None:
        for key in sorted(self.lists):
            batch.put("users", key, encode_recent(self.lists[key][-self.limit :]))
