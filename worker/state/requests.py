"""Pending fine-tune requests: durable state, and what the fine-tune queue reads of a domain.

A ``finetune`` command on the control topic is written as a request (key
:func:`~worker.state.layout.finetune_request_key`, in the ``versions`` column family) by the
batch that consumes the command, so the request and the control offset commit together; a
group mirrors both to the versions topic, so the domain's next owner restores the request.
The fine-tune scheduler clears a request once the outcome of a run that started after it is
final (:func:`clear_request`); on start and on every assignment it queues what is pending
(:func:`pending_requests`). A second request while one is pending replaces it (one per
domain: the latest).

The value is JSON ``{"requested_at": seconds | null, "source": "topic-partition@offset"}``,
taken from the control record alone, so a replay writes the same bytes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import orjson

from store.partition import StorePartition, WriteBatch
from store.records import DomainCounters
from worker.state.layout import (
    REQUEST_PREFIX,
    domain_counters_key,
    domain_of_request_key,
    finetune_request_key,
    version_prefix,
)
from worker.state.versions import VersionRecord


@dataclass(frozen=True)
class FinetuneRequest:
    """A pending request: ``raw`` is the stored value (a clear compares it)."""

    domain: str
    requested_at: float | None
    source: str
    raw: bytes

    def to_json(self) -> dict[str, Any]:
        return {"requested_at": self.requested_at, "source": self.source}

    @classmethod
    def decode(cls, domain: str, raw: bytes) -> FinetuneRequest:
        doc = orjson.loads(raw)
        at = doc.get("requested_at")
        return cls(domain, None if at is None else float(at), str(doc.get("source", "")), raw)


def put_request(batch: WriteBatch, domain: str, requested_at: float | None, source: str) -> None:
    """Record a pending request of ``domain`` in ``batch`` (the batch of its control record)."""
    value = orjson.dumps({"requested_at": requested_at, "source": source})
    batch.put("versions", finetune_request_key(domain), value)


def pending_request(store: StorePartition, domain: str) -> FinetuneRequest | None:
    """``domain``'s pending request, or ``None``."""
    raw = store.get("versions", finetune_request_key(domain))
    return None if raw is None else FinetuneRequest.decode(domain, raw)


def pending_requests(store: StorePartition) -> list[FinetuneRequest]:
    """Every pending request, in domain order (one read per pending request)."""
    return [
        FinetuneRequest.decode(domain_of_request_key(k), v)
        for k, v in store.items("versions", prefix=REQUEST_PREFIX)
    ]


def pending_request_doc(store: StorePartition, domain: str) -> dict[str, Any] | None:
    """What ``adacode versions`` and the API's versions route show of a pending request:
    ``{"requested_at", "source"}`` or ``None``."""
    request = pending_request(store, domain)
    return None if request is None else request.to_json()


def clear_request(
    store: StorePartition, domain: str, seen: FinetuneRequest, lock: threading.RLock
) -> bool:
    """Delete ``domain``'s request if it is still ``seen`` (the one pending when the run
    started); a newer request stays pending. Under ``lock`` (the consumer's versions lock:
    a batch with control commands holds it). Returns whether it was deleted."""
    key = finetune_request_key(domain)
    with lock:
        if store.get("versions", key) != seen.raw:
            return False
        batch = store.batch()
        batch.delete("versions", key)
        store.write(batch)
    return True


@dataclass(frozen=True)
class Standing:
    """What the fine-tune queue orders domains by: when the domain's newest version was made
    (``None``: it has none) and about how many interactions it got since."""

    last_version_at: float | None
    new_interactions: int


def domain_standing(store: StorePartition, domain: str) -> Standing:
    """``domain``'s :class:`Standing` (two reads). New interactions are the domain's
    interaction counter less those its newest version trained and held out (an estimate: a
    log trimmed to ``interaction_retention`` counts fewer)."""
    raw = store.get("meta", domain_counters_key(domain))
    total = DomainCounters.decode(raw).interactions if raw else 0
    newest = next(store.items("versions", prefix=version_prefix("rec", domain), reverse=True), None)
    if newest is None:
        return Standing(None, total)
    record = VersionRecord.decode(newest[1])
    seen = int(record.metrics.get("train_interactions", 0) + record.metrics.get("holdout_users", 0))
    return Standing(record.created_at, max(0, total - seen))
