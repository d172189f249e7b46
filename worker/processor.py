"""Turns one polled batch of Kafka records into one atomic state change.

:meth:`Processor.process` is pure with respect to the store: it reads committed
state, computes every change of the batch in memory, and returns them as one
:class:`~store.partition.WriteBatch` that also holds the next offset of every
partition the batch touched, plus the dead letters. The consumer loop writes the
dead letters, then the batch (see :mod:`worker.consumer`).

The result depends only on committed state and the records, never on how the
records were cut into batches: replaying after a crash gives the same state.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from store.partition import StorePartition, WriteBatch
from store.records import (
    DomainCounters,
    ItemRecord,
    LoggedInteraction,
    Popularity,
    domain_counters_key,
    domain_prefix,
    interaction_key,
    item_key,
)
from worker.coding import CodeService, CodingResult
from worker.encoder import text_hash
from worker.events import (
    ControlCommand,
    EventLimits,
    InteractionEvent,
    ItemEvent,
    parse_control,
    parse_interaction,
    parse_item,
)
from worker.exceptions import EventError
from worker.settings import Settings
from worker.users import RecentItems, user_key
from worker.versions import VersionError, rollback, set_pinned

log = logging.getLogger(__name__)

#: Encodes texts to normalized float32 vectors [n, dim].
Encode = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """The part of a Kafka record the processor needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    record: SourceRecord


@dataclass
class BatchResult:
    batch: WriteBatch
    dead: list[DeadLetter] = field(default_factory=list)
    applied: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, domain) -> n
    new_items: list[tuple[str, str]] = field(default_factory=list)  # (domain, item_id)
    texts_encoded: int = 0
    coding: CodingResult = field(default_factory=CodingResult)
    finetune_requests: list[str] = field(default_factory=list)  # domains (control topic)
    switches: list[dict[str, object]] = field(default_factory=list)  # rollbacks applied


class _Cache:
    """Read-through cache of the records a batch touches; holds the batch's new values."""

    def __init__(self, store: StorePartition, cf: str) -> None:
        self.store = store
        self.cf = cf
        self.values: dict[bytes, bytes | None] = {}
        self.dirty: set[bytes] = set()

    def prefetch(self, keys: Sequence[bytes]) -> None:
        missing = [k for k in dict.fromkeys(keys) if k not in self.values]
        if missing:
            self.values.update(zip(missing, self.store.multi_get(self.cf, missing), strict=True))

    def get(self, key: bytes) -> bytes | None:
        if key not in self.values:
            self.values[key] = self.store.get(self.cf, key)
        return self.values[key]

    def put(self, key: bytes, value: bytes) -> None:
        self.values[key] = value
        self.dirty.add(key)

    def flush(self, batch: WriteBatch) -> None:
        for key in sorted(self.dirty):
            value = self.values[key]
            if value is not None:
                batch.put(self.cf, key, value)


class Processor:
    """Validates, encodes and applies batches of item and interaction events."""

    def __init__(self, store: StorePartition, settings: Settings, encode: Encode | None) -> None:
        self.store = store
        self.settings = settings
        self.encode = encode
        self.items_topic = settings.topic("items")
        self.control_topic = settings.topic("control")
        self.interactions_topic = settings.topic("interactions")
        self.limits = EventLimits(
            embedding_dim=settings.embedding_dim,
            max_bytes=settings.max_message_bytes,
            domain_re=re.compile(settings.domain_pattern),
            max_text_chars=settings.max_text_chars,
        )
        self.half_life_s = settings.popularity_half_life_hours * 3600.0
        self.codes = CodeService(store, settings) if settings.codes_enabled else None

    # ------------------------------------------------------------------------------------

    def process(self, records: Sequence[SourceRecord]) -> BatchResult:
        """Compute the state change of ``records``; nothing is written here.

        1. Parse and validate every record; a bad one becomes a dead letter.
        2. Read the records the batch touches (one multi-get per column family).
        3. Encode the texts of new or changed items in one MiniLM call.
        4. Apply item events, then interactions, in offset order, in memory (interactions
           also go to each user's recent items, see :mod:`worker.users`).
        5. Code new items and re-evaluate code lengths of items whose popularity moved.
        6. Trim each domain's interaction log to its retention.
        7. Apply control commands (rollback, pin) to the version pointers.
        8. Put every change and the next offset of each partition into one batch.
        """
        result = BatchResult(batch=self.store.batch())
        # -- 1. parse ----------------------------------------------------------------------
        items: list[tuple[SourceRecord, ItemEvent]] = []
        interactions: list[tuple[SourceRecord, InteractionEvent]] = []
        next_offsets: dict[tuple[str, int], int] = {}
        controls: list[tuple[SourceRecord, ControlCommand]] = []
        for rec in records:
            tp = (rec.topic, rec.partition)
            if rec.offset + 1 > next_offsets.get(tp, -1):
                next_offsets[tp] = rec.offset + 1
            try:
                if rec.topic == self.interactions_topic:
                    interactions.append((rec, parse_interaction(rec.value, self.limits)))
                elif rec.topic == self.items_topic:
                    items.append((rec, parse_item(rec.value, self.limits)))
                elif rec.topic == self.control_topic:
                    controls.append((rec, parse_control(rec.value, self.limits)))
                else:
                    raise EventError(f"no handler for topic {rec.topic!r}")
            except EventError as exc:
                result.dead.append(DeadLetter(exc.reason, rec))

        # -- 2. read -----------------------------------------------------------------------
        item_cache = _Cache(self.store, "items")
        pop_cache = _Cache(self.store, "popularity")
        meta_cache = _Cache(self.store, "meta")
        item_cache.prefetch(
            [item_key(e.domain, e.item_id) for _, e in items]
            + [item_key(e.domain, e.item_id) for _, e in interactions]
        )
        pop_cache.prefetch([item_key(e.domain, e.item_id) for _, e in interactions])
        recent = RecentItems(self.store, self.settings.user_history_len)
        if recent.limit:
            recent.prefetch([user_key(e.domain, e.user_id) for _, e in interactions])
        domains = {e.domain for _, e in items} | {e.domain for _, e in interactions}
        meta_cache.prefetch([domain_counters_key(d) for d in sorted(domains)])
        counters = {
            d: DomainCounters.decode(raw)
            if (raw := meta_cache.get(domain_counters_key(d)))
            else DomainCounters()
            for d in domains
        }
        counters_before = dict(counters)
        popularity: dict[bytes, Popularity] = {}  # decoded once per item and batch

        # -- 3. encode ---------------------------------------------------------------------
        vectors = self._encode_items([e for _, e in items], item_cache, result)

        # -- 4. apply ----------------------------------------------------------------------
        for (rec, event), vector in zip(items, vectors, strict=True):
            if vector == b"":
                reason = "item has only text and this worker has no text encoder configured"
                result.dead.append(DeadLetter(reason, rec))
                continue
            self._apply_item(event, vector, item_cache, counters, result)
        for rec, ievent in interactions:
            self._apply_interaction(
                rec, ievent, item_cache, pop_cache, popularity, counters, result
            )
            if recent.limit:
                recent.append(ievent.domain, ievent.user_id, ievent.ts, ievent.item_id)

        for key, pop in popularity.items():
            pop_cache.put(key, pop.encode())

        # -- 5. codes ---------------------------------------------------------------------
        if self.codes is not None:
            self._assign_codes(
                self.codes, items, item_cache, pop_cache, counters_before, counters, result
            )

        # -- 6. retention ------------------------------------------------------------------
        for domain in sorted(domains):
            counters[domain] = self._trim_log(domain, counters[domain], result.batch)

        # -- 7. control commands (rollback, pin, finetune), in offset order ---------------
        for rec, command in controls:
            self._apply_control(rec, command, result)

        # -- 8. batch ----------------------------------------------------------------------
        for domain, c in counters.items():
            meta_cache.put(domain_counters_key(domain), c.encode())
        for cache in (item_cache, pop_cache, meta_cache):
            cache.flush(result.batch)
        recent.flush(result.batch)
        for (topic, partition), offset in sorted(next_offsets.items()):
            result.batch.set_offset(topic, partition, offset)
        return result

    # ------------------------------------------------------------------------------------

    def _encode_items(
        self, items: list[ItemEvent], cache: _Cache, result: BatchResult
    ) -> list[bytes | None]:
        """Embedding bytes per item event (``None``: keep the stored one)."""
        out: list[bytes | None] = [None] * len(items)
        todo: list[int] = []
        for i, event in enumerate(items):
            if event.embedding is not None:
                out[i] = event.embedding.astype("<f4").tobytes()
                continue
            raw = cache.get(item_key(event.domain, event.item_id))
            stored = ItemRecord.decode(raw) if raw else None
            if stored and stored.embedding and stored.text_hash == text_hash(event.text or ""):
                continue  # same text as stored: keep its embedding
            todo.append(i)
        if todo:
            if self.encode is None:
                for i in todo:
                    out[i] = b""  # marked below as dead: no encoder configured
            else:
                texts = [items[i].text or "" for i in todo]
                vecs = self.encode(texts)
                for i, vec in zip(todo, vecs, strict=True):
                    out[i] = vec.astype("<f4").tobytes()
                result.texts_encoded += len(todo)
        return out

    def _apply_item(
        self,
        event: ItemEvent,
        vector: bytes | None,
        cache: _Cache,
        counters: dict[str, DomainCounters],
        result: BatchResult,
    ) -> None:
        key = item_key(event.domain, event.item_id)
        raw = cache.get(key)
        stored = ItemRecord.decode(raw) if raw else None
        if vector is None:  # unchanged text: keep the stored embedding
            vector = stored.embedding if stored is not None else b""
        thash = text_hash(event.text) if event.text else b""
        c = counters[event.domain]
        if stored is None or stored.placeholder:
            record = ItemRecord(event.ts, event.ts, thash, vector)
            c = DomainCounters(
                c.items + 1,
                c.placeholders - (1 if stored is not None else 0),
                c.interactions,
                c.logged,
                max(c.last_ts, event.ts),
            )
            result.new_items.append((event.domain, event.item_id))
        else:
            record = ItemRecord(
                min(stored.first_seen, event.ts), max(stored.last_seen, event.ts), thash, vector
            )
            c = DomainCounters(
                c.items, c.placeholders, c.interactions, c.logged, max(c.last_ts, event.ts)
            )
        counters[event.domain] = c
        cache.put(key, record.encode())
        result.applied["item", event.domain] += 1

    def _apply_interaction(
        self,
        rec: SourceRecord,
        event: InteractionEvent,
        items: _Cache,
        pops: _Cache,
        popularity: dict[bytes, Popularity],
        counters: dict[str, DomainCounters],
        result: BatchResult,
    ) -> None:
        key = item_key(event.domain, event.item_id)
        c = counters[event.domain]
        placeholders = c.placeholders
        if items.get(key) is None:  # out of order: the item event has not arrived yet
            items.put(key, ItemRecord(event.ts, event.ts, placeholder=True).encode())
            placeholders += 1
        pop = popularity.get(key)
        if pop is None:
            raw = pops.get(key)
            pop = Popularity.decode(raw) if raw else Popularity()
        popularity[key] = pop.add(event.ts, event.weight, self.half_life_s)
        result.batch.put(
            "interactions",
            interaction_key(event.domain, event.ts, rec.partition, rec.offset),
            LoggedInteraction(event.user_id, event.item_id, event.weight).encode(),
        )
        counters[event.domain] = DomainCounters(
            c.items, placeholders, c.interactions + 1, c.logged + 1, max(c.last_ts, event.ts)
        )
        result.applied["interaction", event.domain] += 1

    def _assign_codes(
        self,
        codes: CodeService,
        items: list[tuple[SourceRecord, ItemEvent]],
        item_cache: _Cache,
        pop_cache: _Cache,
        before: dict[str, DomainCounters],
        counters: dict[str, DomainCounters],
        result: BatchResult,
    ) -> None:
        """Code new items; run a popularity round in each domain whose interaction count
        crossed a multiple of ``code_round_interactions`` in this batch.

        A round re-evaluates every item of the domain anyway, so it reads the popularity of
        all of them (at the domain's newest event time) instead of tracking which changed.
        """
        new: dict[str, dict[str, bytes]] = {}
        for _, event in items:
            key = item_key(event.domain, event.item_id)
            raw = item_cache.values.get(key)
            if raw is not None and key in item_cache.dirty:
                rec = ItemRecord.decode(raw)
                if rec.embedding:
                    new.setdefault(event.domain, {})[event.item_id] = rec.embedding
        domain_ts = {d: c.last_ts for d, c in counters.items()}
        every = self.settings.code_round_interactions
        pops: dict[str, dict[str, float]] = {}
        for domain, c in counters.items():
            if c.interactions // every == before[domain].interactions // every:
                continue
            at = domain_ts[domain]
            prefix = domain_prefix(domain)
            values = {k: v for k, v in self.store.items("popularity", prefix=prefix)}
            values.update(
                (k, v)
                for k, v in pop_cache.values.items()
                if v is not None and k.startswith(prefix)
            )
            pops[domain] = {
                k[len(prefix) :].decode(): Popularity.decode(v).at(at, self.half_life_s)
                for k, v in values.items()
            }
        held: list[tuple[bytes, bytes]] = []
        if codes.codebook is None and self._enough_items(counters):
            held = list(self.store.items("items"))
        result.coding = codes.apply(result.batch, new, pops, domain_ts, held)

    def _enough_items(self, counters: dict[str, DomainCounters]) -> bool:
        """Whether the items held (after this batch) can train the bootstrap codebook."""
        total = {
            k[len(b"domain/") :].decode(): DomainCounters.decode(v).items
            for k, v in self.store.items("meta", prefix=b"domain/")
        }
        total.update((d, c.items) for d, c in counters.items())
        return sum(total.values()) >= self.settings.codebook_min_items

    def _apply_control(
        self, rec: SourceRecord, command: ControlCommand, result: BatchResult
    ) -> None:
        if command.op == "finetune":
            result.finetune_requests.append(command.domain)
            return
        try:
            if command.op == "rollback":
                old, new = rollback(
                    self.store,
                    result.batch,
                    command.domain,
                    to=command.version,
                    previous=command.previous,
                )
                result.switches.append({"domain": command.domain, "from": old, "to": new})
            else:
                if command.version is None:
                    raise VersionError(f"{command.op} needs a version")
                set_pinned(
                    self.store, result.batch, command.domain, command.version, command.op == "pin"
                )
        except VersionError as exc:
            result.dead.append(DeadLetter(f"control command refused: {exc}", rec))

    def _trim_log(self, domain: str, c: DomainCounters, batch: WriteBatch) -> DomainCounters:
        """Delete the oldest logged interactions beyond the retention (in chunks of 10%)."""
        limit = self.settings.interaction_retention
        if c.logged <= limit:
            return c
        excess = c.logged - limit + limit // 10
        prefix = domain_prefix(domain)
        removed = 0
        last_key = None
        for k, _ in self.store.items("interactions", prefix=prefix):
            last_key = k
            removed += 1
            if removed >= excess:
                break
        if last_key is None:
            return c
        batch.delete_range("interactions", prefix, last_key + b"\x00")
        return DomainCounters(
            c.items, c.placeholders, c.interactions, c.logged - removed, c.last_ts
        )
