"""Read-only inspection of a worker's state, safe while the daemon runs.

Opens the RocksDB as a *secondary* instance and catches up with the primary, so it
sees every committed batch without taking the primary's lock.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantize.code_metrics import code_report
from quantize.drift import DRIFT_THRESHOLD
from store.partition import StorePartition
from store.rocksdb import RocksDBPartition
from worker.core.exceptions import WorkerError
from worker.core.settings import Settings
from worker.state.reads import (
    code_changes,
    code_history,
    code_namespaces,
    committed_assigner,
    domain_counters,
    item_popularity,
    item_record,
    load_codebook,
    load_drift,
)
from worker.state.versions import PUBLISHED, domains_with_versions, list_records


@contextmanager
def open_state_readonly(settings: Settings) -> Iterator[StorePartition]:
    path = settings.state_path
    if not path.exists():
        raise WorkerError(
            f"state directory {path} does not exist; run the worker first "
            f"(adacode run) or point --state-dir / ADACODE_STATE_DIR at its state"
        )
    with tempfile.TemporaryDirectory(prefix="adacode-secondary-") as secondary:
        store = RocksDBPartition.open(path, secondary_path=Path(secondary))
        try:
            store.catch_up()
            yield store
        finally:
            store.close()


def stats(store: StorePartition, drift_threshold: float = DRIFT_THRESHOLD) -> dict[str, Any]:
    """Per-domain counts, code metrics, the codebook's drift and stored consumer offsets."""
    codebook = load_codebook(store)
    drift = None if codebook is None else load_drift(store, codebook)
    return {
        "codebook": None
        if codebook is None
        else {
            "id": codebook.codebook_id,
            "levels": codebook.levels,
            "k": codebook.k,
            "drift": None if drift is None else drift.report(drift_threshold).to_dict(),
            "kept": kept_codebooks(store),
        },
        "codes": {d: code_stats(store, d) for d in sorted(domain_counters(store))},
        "domains": {
            d: {
                "items": c.items,
                "placeholders": c.placeholders,
                "interactions": c.interactions,
                "logged_interactions": c.logged,
                "last_event_ts": c.last_ts,
            }
            for d, c in sorted(domain_counters(store).items())
        },
        "offsets": {f"{t}-{p}": o for (t, p), o in sorted(store.offsets().items())},
    }


def kept_codebooks(store: StorePartition) -> dict[str, list[str]]:
    """The older codebooks whose codes are kept (see :class:`worker.ingest.coding.KeptCodes`),
    each with the published versions trained on it (``domain@version``)."""
    current = load_codebook(store)
    kept: dict[str, list[str]] = {
        c: [] for c in code_namespaces(store) if current is None or c != current.codebook_id
    }
    for domain in domains_with_versions(store):
        for record in list_records(store, domain):
            if record.status == PUBLISHED and record.codebook_id in kept:
                kept[record.codebook_id].append(f"{domain}@{record.version}")
    return kept


def code_stats(store: StorePartition, domain: str) -> dict[str, Any] | None:
    """Code metrics of a domain: utilization, collisions, lengths, changes by reason."""
    assigner = committed_assigner(store, domain)
    if assigner is None:
        return None
    report = code_report(assigner.served())
    changes: dict[str, int] = {}
    for _, change in code_changes(store, domain):
        reason = change["reason"]
        changes[reason] = changes.get(reason, 0) + 1
    return {
        "items": report.n_items,
        "head_items": report.n_head,
        "levels": report.levels,
        "k": report.k,
        "collision_rate_all": round(report.collision_all, 4),
        "collision_rate_head": round(report.collision_head, 4),
        "utilization_per_level": [round(u, 3) for u in report.utilization],
        "balance_per_level": [round(b, 3) for b in report.balance],
        "mean_length_head": round(report.mean_len_head, 3),
        "mean_length_tail": round(report.mean_len_tail, 3),
        "table_rows": report.rows_allocated,
        "table_memory_vs_id_table": round(report.memory_ratio, 4),
        "changes": changes,
    }


def find_item(
    store: StorePartition, item_id: str, domain: str | None = None
) -> list[dict[str, Any]]:
    """Everything stored about ``item_id`` (in every domain unless ``domain`` is given)."""
    domains = [domain] if domain else sorted(domain_counters(store))
    out = []
    for d in domains:
        rec = item_record(store, d, item_id)
        if rec is None:
            continue
        pop = item_popularity(store, d, item_id)
        out.append(
            {
                "domain": d,
                "item_id": item_id,
                "placeholder": rec.placeholder,
                "first_seen": rec.first_seen,
                "last_seen": rec.last_seen,
                "text_hash": rec.text_hash.hex(),
                "embedding_dim": len(rec.embedding) // 4,
                "interactions": pop.count,
                "weight_sum": pop.weight_sum,
                "decayed_count": round(pop.decayed, 6),
                "decayed_at": pop.decay_ts,
                **_item_code(store, d, item_id),
            }
        )
    return out


def _item_code(store: StorePartition, domain: str, item_id: str) -> dict[str, Any]:
    assigner = committed_assigner(store, domain)
    if assigner is None or item_id not in assigner:
        return {"code": None}
    served = assigner.served_code(item_id)
    return {
        "code": {
            "full_path": list(assigner.full_path(item_id)),
            "served": list(served),
            "served_length": len(served),
            "head": assigner.is_head(item_id),
            "history": code_history(store, domain, item_id),
        }
    }
