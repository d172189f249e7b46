"""The reads of committed state every wing shares (keys: :mod:`worker.state.layout`).

Each takes a :class:`~store.partition.StorePartition` (the live store, a checkpoint or a
secondary view) and reads what is committed there; none writes. Table versions are read
through :mod:`worker.state.versions`, a user's recent items through
:mod:`worker.state.users`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import orjson

from quantize.assign import AssignerState, CodeAssigner
from quantize.codebook import ResidualCodebook
from quantize.drift import CodebookDrift
from store.exceptions import StoreError
from store.partition import StorePartition
from store.records import DomainCounters, ItemRecord, LoggedInteraction, Popularity
from worker.state.layout import (
    CODE_NAMESPACES_PREFIX,
    CODEBOOK_CURRENT,
    CODEBOOK_DRIFT,
    CODEBOOK_LINEAGE,
    DOMAIN_COUNTERS_PREFIX,
    assigner_key,
    code_row_prefix,
    codebook_key,
    codebook_of_namespace_key,
    domain_counters_key,
    domain_of_counters_key,
    domain_prefix,
    history_key_ts,
    history_prefix,
    interaction_key_ts,
    item_key,
    round_pending_prefix,
    split_item_key,
)

log = logging.getLogger(__name__)

# --- domains ---------------------------------------------------------------------------------


def domain_counters(store: StorePartition) -> dict[str, DomainCounters]:
    """Every consumed domain's counters, by domain (in key order)."""
    return {
        domain_of_counters_key(k): DomainCounters.decode(v)
        for k, v in store.items("meta", prefix=DOMAIN_COUNTERS_PREFIX)
    }


def known_domains(store: StorePartition) -> list[str]:
    """The names of every consumed domain, sorted (their counters are not decoded)."""
    return sorted(
        domain_of_counters_key(k) for k, _ in store.items("meta", prefix=DOMAIN_COUNTERS_PREFIX)
    )


def has_domain(store: StorePartition, domain: str) -> bool:
    """Whether an event of ``domain`` was consumed (it has counters)."""
    return bool(store.get("meta", domain_counters_key(domain)))


# --- items -----------------------------------------------------------------------------------


def item_record(store: StorePartition, domain: str, item_id: str) -> ItemRecord | None:
    """The item's record, or ``None`` when the domain has no such item."""
    raw = store.get("items", item_key(domain, item_id))
    return None if raw is None else ItemRecord.decode(raw)


def item_popularity(store: StorePartition, domain: str, item_id: str) -> Popularity:
    """The item's interaction counts (all zero when it has none)."""
    raw = store.get("popularity", item_key(domain, item_id))
    return Popularity.decode(raw) if raw else Popularity()


def iter_popularity(store: StorePartition, domain: str) -> Iterator[tuple[str, Popularity]]:
    """Every item of ``domain`` with interactions and its counts, in item id order."""
    for key, raw in store.items("popularity", prefix=domain_prefix(domain)):
        yield split_item_key(key)[1], Popularity.decode(raw)


def stored_embeddings(
    store: StorePartition, domain: str, item_ids: Sequence[str]
) -> dict[str, np.ndarray]:
    """The embeddings of ``item_ids`` from their item records (placeholders and unknown or
    unreadable records are left out)."""
    raws = store.multi_get("items", [item_key(domain, i) for i in item_ids])
    out: dict[str, np.ndarray] = {}
    for item, raw in zip(item_ids, raws, strict=True):
        if raw is None:
            continue
        try:
            record = ItemRecord.decode(raw)
        except StoreError:
            log.warning("item %r of %s has an unreadable record: not served", item, domain)
            continue
        if record.embedding and not record.placeholder:
            out[item] = record.vector()
    return out


# --- interactions ----------------------------------------------------------------------------


def iter_interactions(
    store: StorePartition, domain: str
) -> Iterator[tuple[int, LoggedInteraction]]:
    """The domain's logged interactions in time order: ``(ts, interaction)``."""
    for k, v in store.items("interactions", prefix=domain_prefix(domain)):
        yield interaction_key_ts(k), LoggedInteraction.decode(v)


# --- codes -----------------------------------------------------------------------------------


def load_codebook(store: StorePartition) -> ResidualCodebook | None:
    """The current codebook, or ``None`` while there is none."""
    current = store.get("meta", CODEBOOK_CURRENT)
    if current is None:
        return None
    return load_codebook_by_id(store, current.decode())


def codebook_lineage(store: StorePartition) -> list[str]:
    """The ids of every codebook the state was coded with, oldest first (see
    :data:`~worker.state.layout.CODEBOOK_LINEAGE`)."""
    raw = store.get("meta", CODEBOOK_LINEAGE)
    if raw is not None:
        return [str(c) for c in orjson.loads(raw)]
    current = store.get("meta", CODEBOOK_CURRENT)
    return [] if current is None else [current.decode()]


def load_codebook_by_id(store: StorePartition, codebook_id: str) -> ResidualCodebook | None:
    """The stored codebook ``codebook_id`` (the current one or one kept for its versions),
    or ``None`` when it is not stored."""
    raw = store.get("meta", codebook_key(codebook_id.encode()))
    return None if raw is None else ResidualCodebook.from_bytes(raw)


def code_namespaces(store: StorePartition) -> dict[str, bytes]:
    """Codebook id -> the prefix of its codes, for every codebook whose codes are kept (see
    :mod:`worker.state.layout`'s code namespaces): a state that has only had one codebook
    has no registry, and its current codebook's codes are the unprefixed ones."""
    found = {
        codebook_of_namespace_key(k): v
        for k, v in store.items("meta", prefix=CODE_NAMESPACES_PREFIX)
    }
    if found:
        return found
    current = store.get("meta", CODEBOOK_CURRENT)
    return {} if current is None else {current.decode(): b""}


def current_namespace(store: StorePartition) -> bytes:
    """The prefix of the current codebook's codes (``b""`` without a codebook)."""
    current = store.get("meta", CODEBOOK_CURRENT)
    if current is None:
        return b""
    return code_namespaces(store).get(current.decode(), b"")


def load_drift(store: StorePartition, codebook: ResidualCodebook) -> CodebookDrift | None:
    """The drift sums of ``codebook`` as committed (``None``: none yet, or of another
    codebook)."""
    raw = store.get("meta", CODEBOOK_DRIFT)
    if raw is None:
        return None
    drift = CodebookDrift.from_dict(orjson.loads(raw))
    return drift if drift.codebook_id == codebook.codebook_id else None


def committed_assigner(
    store: StorePartition, domain: str, *, ns: bytes | None = None
) -> CodeAssigner | None:
    """The domain's code assigner as committed, or ``None`` when it has no codes yet
    (``ns``: the namespace's prefix; ``None``: the current codebook's)."""
    found = committed_codes(store, domain, ns=ns)
    return None if found is None else found[0]


def committed_codes(
    store: StorePartition, domain: str, *, ns: bytes | None = None
) -> tuple[CodeAssigner, dict[str, Any], bool] | None:
    """The domain's code assigner as committed, the extra fields of its header, and whether
    it was saved in the first format (one state for the whole domain, to be saved again
    row by row); ``None`` when the domain has no codes yet. ``ns``: the namespace's prefix
    (``None``: the current codebook's)."""
    ns = current_namespace(store) if ns is None else ns
    raw = store.get("codes", assigner_key(domain, ns=ns))
    if raw is None:
        return None
    if not raw.startswith(b"{"):
        return CodeAssigner.from_state(AssignerState.from_bytes(raw)), {}, True
    prefix = code_row_prefix(domain, ns=ns)
    cut = len(prefix)
    raw_keys, rows = store.scan("codes", prefix=prefix)  # 1M rows: one bulk read
    keys = [key[cut:].decode() for key in raw_keys]
    del raw_keys
    assigner, extra = CodeAssigner.from_rows(raw, keys, rows)
    return assigner, extra, False


def round_pending(store: StorePartition, domain: str, *, ns: bytes | None = None) -> list[str]:
    """The items of ``domain`` whose popularity moved since its last code round (``ns``: as
    for :func:`committed_codes`)."""
    ns = current_namespace(store) if ns is None else ns
    prefix = round_pending_prefix(domain, ns=ns)
    cut = len(prefix)
    return [key[cut:].decode() for key, _ in store.items("codes", prefix=prefix)]


def code_changes(store: StorePartition, domain: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every recorded code change of ``domain``, oldest first: ``(ts, {"item", "old",
    "new", "reason"})``."""
    for key, value in store.items("codes", prefix=history_prefix(domain)):
        yield history_key_ts(domain, key), orjson.loads(value)


def code_history(store: StorePartition, domain: str, item_id: str) -> list[dict[str, object]]:
    """Every recorded code change of one item, oldest first."""
    return [{"ts": ts, **doc} for ts, doc in code_changes(store, domain) if doc["item"] == item_id]
