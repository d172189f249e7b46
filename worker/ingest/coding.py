"""Live code assignment: the worker's bridge between state and :mod:`quantize`.

One residual codebook per worker state (shared by every domain, so table rows are
comparable across domains), and one :class:`~quantize.assign.CodeAssigner` per
domain, kept in memory and persisted in the ``codes`` column family in the same
batch as the events that changed it.

Keys in ``codes`` (built by :mod:`worker.state.layout`)::

    state \\0 <domain>                      -> AssignerState bytes
    hist  \\0 <domain> \\0 ts(>q) <item_id>  -> {"old", "new", "reason"} (audit trail)

and in ``meta``: ``codebook/current`` -> id, ``codebook/<id>`` -> codebook bytes.

Bootstrap: while there is no codebook, items are stored uncoded; once
``codebook_min_items`` items have embeddings, a codebook is trained on all of them
(shape by :func:`quantize.codebook.suggest_shape` unless configured) and every
item is coded in that same batch. Retraining is explicit (``adacode codebook
train``), never a silent change of codes.

Popularity rounds: after each batch, the touched items' time-decayed counts (at
the domain's newest event time) go to :meth:`CodeAssigner.update_popularity`;
promotions only append digits; demotions are lazy. The head threshold follows
``code_head_fraction`` of the domain's items and is moved when it drifts by more
than 25 %.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import orjson

from quantize.assign import Code, CodeAssigner, CodeChange, ServedCodes
from quantize.codebook import ResidualCodebook, suggest_shape
from quantize.lengths import make_policy, thresholds_for_fraction
from store.partition import StorePartition, WriteBatch
from store.records import ItemRecord
from worker.core.settings import Settings
from worker.state.layout import (
    CODEBOOK_CURRENT,
    assigner_key,
    codebook_key,
    history_key,
    split_item_key,
)
from worker.state.reads import committed_assigner, load_codebook

log = logging.getLogger(__name__)


def put_codebook(batch: WriteBatch, codebook: ResidualCodebook) -> None:
    cid = codebook.codebook_id.encode()
    batch.put("meta", codebook_key(cid), codebook.to_bytes())
    batch.put("meta", CODEBOOK_CURRENT, cid)


class CodebookSource(Protocol):
    """Where a group of workers agrees on one codebook (see :mod:`worker.ingest.group`)."""

    def first(self) -> ResidualCodebook | None:
        """The group's codebook, or ``None`` while there is none."""

    def agree(self, candidate: ResidualCodebook) -> ResidualCodebook:
        """Offer ``candidate``; returns the group's codebook."""


#: how often a worker without a codebook asks the group whether one exists
GROUP_CODEBOOK_POLL_S = 5.0


@dataclass
class CodingResult:
    changes: list[tuple[str, CodeChange]] = field(default_factory=list)  # (domain, change)
    trained: str | None = None  # id of a codebook trained in this batch
    #: items that had a code and came again with an embedding: (domain, item, served code);
    #: serving re-vectors them even when the code stayed (a text-projecting version's
    #: vector follows the item's embedding)
    redescribed: list[tuple[str, str, Code]] = field(default_factory=list)


class CodeService:
    """Codes items as they arrive and re-evaluates lengths as popularity moves."""

    def __init__(
        self,
        store: StorePartition,
        settings: Settings,
        *,
        group: CodebookSource | None = None,
    ) -> None:
        """``group``: where a group of workers agrees on one codebook (``None``: a worker
        on its own, which trains and keeps its own)."""
        self.store = store
        self.settings = settings
        self.codebook = load_codebook(store)
        self.assigners: dict[str, CodeAssigner] = {}
        #: held while a batch changes the assigners; readers on other threads (``/metrics``)
        #: take it for a consistent snapshot (:meth:`served_snapshots`)
        self.lock = threading.Lock()
        self._dirty: set[str] = set()
        #: the group's codebook source; None = a worker on its own
        self.group = group
        self._group_checked = 0.0

    # -- assigners ------------------------------------------------------------------------

    def _new_assigner(self, codebook: ResidualCodebook) -> CodeAssigner:
        params: dict[str, object] = {}
        if self.settings.code_policy != "fixed":
            params["min_len"] = self.settings.code_min_len
        return CodeAssigner(
            codebook.levels,
            codebook.k,
            make_policy(self.settings.code_policy, **params),
            enter_threshold=float("inf"),
            exit_threshold=float("inf"),
        )

    def assigner(self, domain: str) -> CodeAssigner | None:
        if self.codebook is None:
            return None
        found = self.assigners.get(domain)
        if found is None:
            found = committed_assigner(self.store, domain)
            if found is None:
                found = self._new_assigner(self.codebook)
            self.assigners[domain] = found
        return found

    # -- per batch ------------------------------------------------------------------------

    def served_snapshots(self) -> dict[str, ServedCodes]:
        """Every domain's served codes, copied between batches (safe from any thread)."""
        with self.lock:
            return {domain: assigner.served() for domain, assigner in self.assigners.items()}

    def apply(
        self,
        batch: WriteBatch,
        new_items: dict[str, dict[str, bytes]],
        popularity: dict[str, dict[str, float]],
        domain_ts: dict[str, int],
        held_items: Iterable[tuple[bytes, bytes]],
    ) -> CodingResult:
        """Code ``new_items`` (domain -> item -> float32 bytes) and run a popularity round.

        ``held_items`` yields every stored (key, ItemRecord bytes) as of this batch,
        used only to bootstrap the codebook.
        """
        with self.lock:
            result = CodingResult()
            if self.codebook is None:
                if not self._maybe_bootstrap(batch, new_items, held_items, result):
                    return result
            else:
                for domain, items in sorted(new_items.items()):
                    self._code_items(domain, items, domain_ts.get(domain, 0), result)
            self._popularity_round(popularity, domain_ts, result)
            self._flush(batch, result)
            return result

    def _popularity_round(
        self,
        popularity: dict[str, dict[str, float]],
        domain_ts: dict[str, int],
        result: CodingResult,
    ) -> None:
        for domain, pops in sorted(popularity.items()):
            assigner = self.assigner(domain)
            if assigner is None:
                continue
            known = [k for k in sorted(pops) if k in assigner]
            if not known:
                continue
            ts = domain_ts.get(domain, 0)
            changes = assigner.update_popularity(
                known, np.asarray([pops[k] for k in known], dtype=np.float64), ts=ts
            )
            changes += self._follow_threshold(assigner, ts)
            result.changes += [(domain, c) for c in changes]
            self._dirty.add(domain)

    def _code_items(
        self, domain: str, items: dict[str, bytes], ts: int, result: CodingResult
    ) -> None:
        assigner = self.assigner(domain)
        if assigner is None or not items or self.codebook is None:
            return
        keys = sorted(items)
        known = [k for k in keys if k in assigner]
        vectors = np.stack([np.frombuffer(items[k], dtype="<f4") for k in keys])
        paths = self.codebook.encode(vectors)
        result.changes += [(domain, c) for c in assigner.add(keys, paths, ts=ts)]
        result.redescribed += [(domain, k, assigner.served_code(k)) for k in known]
        self._dirty.add(domain)

    def _follow_threshold(self, assigner: CodeAssigner, ts: int) -> list[CodeChange]:
        pops = assigner.state().popularity
        enter, exit_ = thresholds_for_fraction(pops, self.settings.code_head_fraction)
        if not np.isfinite(enter):
            return []
        current = assigner.enter_threshold
        if np.isfinite(current) and abs(enter - current) <= 0.25 * current:
            return []
        return assigner.set_thresholds(enter, exit_, ts=ts)

    def _maybe_bootstrap(
        self,
        batch: WriteBatch,
        new_items: dict[str, dict[str, bytes]],
        held_items: Iterable[tuple[bytes, bytes]],
        result: CodingResult,
    ) -> bool:
        everything: dict[str, dict[str, bytes]] = {}
        for key, raw in held_items:
            rec = ItemRecord.decode(raw)
            if rec.embedding:
                domain, item_id = split_item_key(key)
                everything.setdefault(domain, {})[item_id] = rec.embedding
        for domain, items in new_items.items():
            everything.setdefault(domain, {}).update(items)
        n = sum(len(v) for v in everything.values())
        codebook = self._group_codebook()
        if codebook is None:
            if n < self.settings.codebook_min_items:
                return False
            codebook = self._train(everything, n)
            if self.group is not None:
                codebook = self.group.agree(codebook)
        put_codebook(batch, codebook)
        self.codebook = codebook
        result.trained = codebook.codebook_id
        ts = 0
        for domain in sorted(everything):
            self._code_items(domain, everything[domain], ts, result)
        return True

    def _group_codebook(self) -> ResidualCodebook | None:
        """The group's codebook if there is one (asked at most every few seconds)."""
        if self.group is None:
            return None
        now = time.monotonic()
        if now - self._group_checked < GROUP_CODEBOOK_POLL_S:
            return None
        self._group_checked = now
        found = self.group.first()
        if found is not None:
            log.info("using the group's codebook %s", found.codebook_id)
        return found

    def _train(self, everything: dict[str, dict[str, bytes]], n: int) -> ResidualCodebook:
        vectors = np.stack(
            [
                np.frombuffer(v, dtype="<f4")
                for d in sorted(everything)
                for _, v in sorted(everything[d].items())
            ]
        )
        levels, k = suggest_shape(n)
        levels = self.settings.code_levels or levels
        k = min(self.settings.code_k or k, n)
        codebook = ResidualCodebook.train(vectors, levels, k, seed=0)
        log.info(
            "trained codebook %s (%d levels x %d codewords) on %d items",
            codebook.codebook_id,
            levels,
            k,
            n,
        )
        return codebook

    def _flush(self, batch: WriteBatch, result: CodingResult) -> None:
        for domain in sorted(self._dirty):
            batch.put("codes", assigner_key(domain), self.assigners[domain].state().to_bytes())
        self._dirty.clear()
        for domain, change in result.changes:
            batch.put(
                "codes",
                history_key(domain, change.ts, change.key, change.reason),
                orjson.dumps(
                    {
                        "item": change.key,
                        "old": change.old,
                        "new": change.new,
                        "reason": change.reason,
                    }
                ),
            )


def retrain_codebook(
    store: StorePartition,
    settings: Settings,
    vectors: np.ndarray | None = None,
    *,
    levels: int = 0,
    k: int = 0,
    seed: int = 0,
) -> tuple[ResidualCodebook, int]:
    """Train a new codebook and re-code every stored item with it, in one atomic batch.

    ``vectors`` defaults to the stored items' embeddings. Every item gets a new full
    path and starts again from the short code of its length policy (reason
    ``recode`` in its history); popularity is kept. Returns the codebook and the
    number of items re-coded. The caller holds the store as primary (worker stopped).
    """
    held: dict[str, dict[str, bytes]] = {}
    for key, raw in store.items("items"):
        rec = ItemRecord.decode(raw)
        if rec.embedding:
            domain, item_id = split_item_key(key)
            held.setdefault(domain, {})[item_id] = rec.embedding
    if vectors is None:
        vectors = (
            np.stack(
                [np.frombuffer(v, dtype="<f4") for d in sorted(held) for v in held[d].values()]
            )
            if held
            else np.zeros((0, settings.embedding_dim), dtype=np.float32)
        )
    n = vectors.shape[0]
    rule_levels, rule_k = suggest_shape(max(n, 1))
    levels = levels or settings.code_levels or rule_levels
    k = min(k or settings.code_k or rule_k, max(n, 2))
    codebook = ResidualCodebook.train(vectors.astype(np.float32), levels, k, seed=seed)
    service = CodeService(store, settings)
    service.codebook = codebook
    batch = store.batch()
    put_codebook(batch, codebook)
    result = CodingResult(trained=codebook.codebook_id)
    for domain in sorted(held):
        old = service.assigner(domain) if load_codebook(store) is not None else None
        old_codes = {} if old is None else {key: old.served_code(key) for key in old.keys}
        service.assigners[domain] = service._new_assigner(codebook)
        service._code_items(domain, held[domain], 0, result)
        result.changes = [
            (d, CodeChange(c.key, old_codes.get(c.key, ()), c.new, "recode", c.ts))
            if d == domain
            else (d, c)
            for d, c in result.changes
        ]
    service._flush(batch, result)
    store.write(batch)
    return codebook, sum(len(v) for v in held.values())
