"""Turns one polled batch of Kafka records into one atomic state change.

:meth:`Processor.process` is pure with respect to the store: it reads committed
state, computes every change of the batch in memory, and returns them as one
:class:`~store.partition.WriteBatch` that also holds the next offset of every
partition the batch touched, plus the dead letters. The consumer loop writes the
dead letters, then the batch (see :mod:`worker.ingest.consumer`).

The result depends only on committed state and the records, never on how the
records were cut into batches: replaying after a crash gives the same state.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby, islice
from operator import attrgetter
from typing import Any, Protocol, TypeVar

import numpy as np

from store.partition import StorePartition, WriteBatch, key_after
from store.records import (
    DomainCounters,
    ItemRecord,
    encode_interactions,
    fold_popularity,
)
from worker.core.settings import Settings
from worker.core.threads import Foreground
from worker.ingest.coding import (
    Arrival,
    CodebookSource,
    CodeService,
    CodingResult,
    KeptCodes,
    PopularityMoves,
    Trainer,
)
from worker.ingest.encoder import text_hash
from worker.ingest.events import (
    ControlCommand,
    EventLimits,
    InteractionColumns,
    ItemEvent,
    check_keys,
    key_fault,
    parse_control,
    parse_interactions,
    parse_item,
)
from worker.ingest.exceptions import EventError
from worker.state.exceptions import VersionError
from worker.state.layout import (
    domain_counters_key,
    domain_prefix,
    interaction_keys,
    item_key,
    user_key,
)
from worker.state.users import append_recent, encode_slot_values
from worker.state.versions import rollback, set_pinned

log = logging.getLogger(__name__)

#: Encodes texts to normalized float32 vectors [n, dim].
Encode = Callable[[list[str]], np.ndarray]


class Record(Protocol):
    """The part of a Kafka record the processor reads (kafka-python's ``ConsumerRecord``
    has it, so polled records can be passed as they are)."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A :class:`Record` built by hand (tests, offline tools)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    record: Record


@dataclass
class BatchResult:
    batch: WriteBatch
    dead: list[DeadLetter] = field(default_factory=list)
    applied: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, domain) -> n
    new_items: list[tuple[str, str]] = field(default_factory=list)  # (domain, item_id)
    texts_encoded: int = 0
    coding: CodingResult = field(default_factory=CodingResult)
    #: codebook id -> the codes of a kept older codebook the batch changed (see KeptCodes)
    kept_coding: dict[str, CodingResult] = field(default_factory=dict)
    finetune_requests: list[str] = field(default_factory=list)  # domains (control topic)
    switches: list[dict[str, object]] = field(default_factory=list)  # rollbacks applied
    #: topic -> records dead-lettered because their key is not their event's domain
    key_mismatches: Counter[str] = field(default_factory=Counter)


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


#: Bounds of :class:`_Committed` (entries; past one, the oldest entries go as new ones come).
COMMITTED_POPULARITY = 262_144
COMMITTED_USERS = 65_536
COMMITTED_ITEMS = 1_048_576


def _bounded(values: dict[bytes, Any], limit: int) -> None:
    """Drop the oldest entries (first inserted) of ``values`` past ``limit``: as many as the
    last batch added, so each batch pays for its own. Dropping a quarter at a time held the
    interpreter ~60 ms every dozen batches at 1M items (65k keys and their values freed in
    one go: a stall of the API's threads)."""
    excess = len(values) - limit
    if excess > 0:
        for key in list(islice(values, excess)):
            del values[key]


class _Committed:
    """Values of recently written batches that later batches read again (hot items' popularity,
    active users' ring headers, which items exist), so they are not read back from RocksDB.

    Only committed values are served: a batch's values wait in ``pending`` until the next
    batch starts and finds the batch's offsets in the store (they are written in the same
    atomic batch as the values). Anything else (a failed or skipped write, a replay) drops
    every value. Items are never deleted, so a key once seen stays valid. Each cache keeps
    at most its bound of entries, dropping its oldest as new ones come (:func:`_bounded`).
    """

    def __init__(
        self,
        *,
        popularity_bound: int = COMMITTED_POPULARITY,
        users_bound: int = COMMITTED_USERS,
        items_bound: int = COMMITTED_ITEMS,
    ) -> None:
        self.bounds = (popularity_bound, users_bound, items_bound)
        self.popularity: dict[bytes, bytes] = {}
        self.users: dict[bytes, bytes] = {}
        #: keys of items known to exist, oldest first (a dict: insertion-ordered, unlike a
        #: set, so the oldest can go; a set cleared whole past its bound freed a million
        #: keys in one call and sent every known item back to RocksDB)
        self.items: dict[bytes, None] = {}
        self.pending: (
            tuple[dict[tuple[str, int], int], dict[bytes, bytes], dict[bytes, bytes], set[bytes]]
            | None
        ) = None

    def settle(self, store: StorePartition) -> None:
        """Adopt the previous batch's values if it was written, else forget everything."""
        if self.pending is None:
            return
        offsets, popularity, users, items = self.pending
        self.pending = None
        if all(store.get_offset(t, p) == off for (t, p), off in offsets.items()):
            self.popularity.update(popularity)
            self.users.update(users)
            self.items.update(dict.fromkeys(items))
            popularity_bound, users_bound, items_bound = self.bounds
            _bounded(self.popularity, popularity_bound)
            _bounded(self.users, users_bound)
            _bounded(self.items, items_bound)
        else:
            self.popularity.clear()
            self.users.clear()
            self.items.clear()

    def read(
        self, store: StorePartition, cf: str, cache: dict[bytes, bytes], keys: Iterable[bytes]
    ) -> dict[bytes, bytes | None]:
        """Committed values of ``keys``: from ``cache``, the others in one multi-get."""
        out: dict[bytes, bytes | None] = {}
        missing = []
        get = cache.get
        for key in keys:
            value = get(key)
            if value is None:
                missing.append(key)
            else:
                out[key] = value
        if missing:
            out.update(zip(missing, store.multi_get(cf, missing), strict=True))
        return out


@dataclass
class _Touched:
    """What a batch's interactions changed, gathered for the batch's one write."""

    popularity: dict[bytes, bytes] = field(default_factory=dict)
    users: dict[bytes, bytes] = field(default_factory=dict)  # the users' ring headers
    recent: dict[bytes, bytes] = field(default_factory=dict)  # the rings' slots written
    stale: list[bytes] = field(default_factory=list)  # slots past a ring that shrank
    items: set[bytes] = field(default_factory=set)  # keys that exist after the batch
    #: the committed popularity of the items the batch's interactions touch (None: none)
    before: dict[bytes, bytes | None] = field(default_factory=dict)


class _Domained(Protocol):
    @property
    def domain(self) -> str: ...


_E = TypeVar("_E", bound=_Domained)
_TOPIC_PARTITION = attrgetter("topic", "partition")
_OFFSET = attrgetter("offset")
_VALUE = attrgetter("value")
_KEY = attrgetter("key")


@dataclass
class _Parsed:
    """A batch's records split by topic and validated (step 1 of :meth:`Processor.process`)."""

    items: list[tuple[Record, ItemEvent]]
    controls: list[tuple[Record, ControlCommand]]
    inter_recs: list[Record]  # the interactions topic's records, valid or not
    inter: InteractionColumns  # the valid ones, as columns (``index`` into ``inter_recs``)
    next_offsets: dict[tuple[str, int], int]  # (topic, partition) -> next offset


@dataclass
class _Work:
    """What a batch read (step 2) and changes in memory until its one write (step 8)."""

    items: _Cache
    meta: _Cache
    domains: set[str]  # every domain the batch's events name
    counters: dict[str, DomainCounters]  # as the batch leaves them
    before: dict[str, DomainCounters]  # as the batch found them
    #: while there is no codebook: every applied item event in offset order
    arrivals: list[Arrival] = field(default_factory=list)


_K = TypeVar("_K")
_V = TypeVar("_V")


def _grouped(keys: Iterable[_K], values: Iterable[_V]) -> dict[_K, list[_V]]:
    """``values`` grouped by their ``keys``, each group in the order given."""
    out: dict[_K, list[_V]] = {}
    for key, value in zip(keys, values, strict=True):
        group = out.get(key)
        if group is None:
            out[key] = [value]
        else:
            group.append(value)
    return out


def _split_by_topic(
    records: Sequence[Record],
) -> tuple[dict[str, list[Record]], dict[tuple[str, int], int]]:
    """``records`` by topic (in the order given), and the next offset of each partition."""
    by_topic: dict[str, list[Record]] = {}
    next_offsets: dict[tuple[str, int], int] = {}
    for tp, run in groupby(records, _TOPIC_PARTITION):
        recs = list(run)
        by_topic.setdefault(tp[0], []).extend(recs)
        last = max(map(_OFFSET, recs)) + 1
        if last > next_offsets.get(tp, -1):
            next_offsets[tp] = last
    return by_topic, next_offsets


class Processor:
    """Validates, encodes and applies batches of item and interaction events."""

    def __init__(
        self,
        store: StorePartition,
        settings: Settings,
        encode: Encode | None,
        *,
        group: CodebookSource | None = None,
        trainer: Callable[[], Trainer] | None = None,
        foreground: Foreground | None = None,
    ) -> None:
        """``encode``: the text encoder (``None``: items must carry embeddings); ``group``:
        where a group of workers agrees on one codebook, and ``trainer``: what trains the
        first codebook in the background, both handed to the :class:`CodeService`
        (``None``: a worker on its own; trained in the batch); ``foreground``: where the
        code rounds say they run (handed to every code service)."""
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
        self.codes = (
            CodeService(store, settings, group=group, trainer=trainer, foreground=foreground)
            if settings.codes_enabled
            else None
        )
        #: the codes of older codebooks kept for their versions (none until a retrain)
        self.kept = (
            KeptCodes(store, settings, foreground=foreground) if settings.codes_enabled else None
        )
        self.committed = _Committed()

    # ------------------------------------------------------------------------------------

    def background_work(self) -> bool:
        """Whether a batch would write something with no records (see
        :meth:`CodeService.background_work`)."""
        return self.codes is not None and self.codes.background_work()

    def process(self, records: Sequence[Record]) -> BatchResult:
        """Compute the state change of ``records``; nothing is written here.

        1. Split the records by topic; parse and validate them (interactions as columns,
           see :func:`~worker.ingest.events.parse_interactions`); a bad one, or one whose key
           is not its domain, becomes a dead letter.
        2. Read the records the batch touches (one multi-get per column family).
        3. Encode the texts of new or changed items in one MiniLM call.
        4. Apply item events in offset order, then the interactions grouped per item and
           per user (each group in offset order): popularity, placeholders, the log, each
           user's recent items (see :mod:`worker.state.users`).
        5. Code new items and re-evaluate code lengths of items whose popularity moved
           (with the current codebook, and with each older one kept for its versions).
        6. Trim each domain's interaction log to its retention.
        7. Apply control commands (rollback, pin) to the version pointers.
        8. Put every change and the next offset of each partition into one batch
           (:meth:`_put_changes`).
        """
        self.committed.settle(self.store)
        result = BatchResult(batch=self.store.batch())
        parsed = self._parse(records, result)
        work = self._read(parsed)
        vectors = self._encode_items([e for _, e in parsed.items], work.items, result)
        self._apply_items(parsed.items, vectors, work, result)
        touched = _Touched()
        if len(parsed.inter):
            self._apply_interactions(parsed, work, touched, result)
        if self.codes is not None:
            self._assign_codes(self.codes, parsed, work, touched, result)
        self._trim_logs(work, result.batch)
        self._apply_controls(parsed.controls, result)
        self._put_changes(parsed.next_offsets, work, touched, result.batch)
        return result

    # -- 1. parse -------------------------------------------------------------------------

    def _parse(self, records: Sequence[Record], result: BatchResult) -> _Parsed:
        """Split ``records`` by topic and parse them; dead letters in the order records came."""
        by_topic, next_offsets = _split_by_topic(records)
        parsed = self._parse_topics(by_topic, next_offsets, result)
        if result.dead and len(by_topic) > 1:  # report them in the order they came
            position = {id(rec): k for k, rec in enumerate(records)}
            result.dead.sort(key=lambda d: position[id(d.record)])
        return parsed

    def _parse_topics(
        self,
        by_topic: dict[str, list[Record]],
        next_offsets: dict[tuple[str, int], int],
        result: BatchResult,
    ) -> _Parsed:
        """Items and control commands one by one, interactions as columns; a record of
        another topic, one that is invalid, or one whose key is not its event's domain
        (:func:`~worker.ingest.events.key_fault`) becomes a dead letter."""
        items: list[tuple[Record, ItemEvent]] = []
        controls: list[tuple[Record, ControlCommand]] = []
        inter_recs: list[Record] = []
        for topic, recs in by_topic.items():
            if topic == self.interactions_topic:
                inter_recs = recs
            elif topic == self.items_topic:
                items = self._parse_each(recs, parse_item, result, self.limits)
            elif topic == self.control_topic:
                controls = self._parse_each(recs, parse_control, result, self.limits)
            else:
                reason = f"no handler for topic {topic!r}"
                result.dead.extend(DeadLetter(reason, rec) for rec in recs)
        inter = parse_interactions(list(map(_VALUE, inter_recs)), self.limits)
        misskeyed = check_keys(inter, list(map(_KEY, inter_recs)))
        if misskeyed:
            result.key_mismatches[self.interactions_topic] += misskeyed
        if inter.bad:
            result.dead.extend(DeadLetter(reason, inter_recs[k]) for k, reason in inter.bad)
        return _Parsed(items, controls, inter_recs, inter, next_offsets)

    # -- 2. read --------------------------------------------------------------------------

    def _read(self, parsed: _Parsed) -> _Work:
        """Prefetch the batch's items and its domains' counters (one multi-get each)."""
        item_cache = _Cache(self.store, "items")
        meta_cache = _Cache(self.store, "meta")
        item_cache.prefetch([item_key(e.domain, e.item_id) for _, e in parsed.items])
        domains = {e.domain for _, e in parsed.items} | set(parsed.inter.domains)
        meta_cache.prefetch([domain_counters_key(d) for d in sorted(domains)])
        counters = {
            d: DomainCounters.decode(raw)
            if (raw := meta_cache.get(domain_counters_key(d)))
            else DomainCounters()
            for d in domains
        }
        return _Work(item_cache, meta_cache, domains, counters, dict(counters))

    # -- 4. apply -------------------------------------------------------------------------

    def _apply_items(
        self,
        items: list[tuple[Record, ItemEvent]],
        vectors: list[bytes | None],
        work: _Work,
        result: BatchResult,
    ) -> None:
        """Apply item events in offset order; an item that needs an encoder there is none
        of becomes a dead letter."""
        arrivals = work.arrivals if self._before_codebook() else None
        for (rec, event), vector in zip(items, vectors, strict=True):
            if vector == b"":
                reason = "item has only text and this worker has no text encoder configured"
                result.dead.append(DeadLetter(reason, rec))
                continue
            record, held = self._apply_item(event, vector, work.items, work.counters, result)
            if arrivals is not None:
                arrivals.append((item_key(event.domain, event.item_id), record.embedding, held))

    def _before_codebook(self) -> bool:
        """Whether the batch may start the codebook's bootstrap (then its item events are
        kept in order: the bootstrap's sample ends at the very event that fills it)."""
        return self.codes is not None and self.codes.codebook is None

    # -- 6. retention, 7. control commands --------------------------------------------------

    def _trim_logs(self, work: _Work, batch: WriteBatch) -> None:
        """Trim each domain's interaction log to its retention (see :meth:`_trim_log`)."""
        counters = work.counters
        for domain in sorted(work.domains):
            counters[domain] = self._trim_log(domain, counters[domain], batch)

    def _apply_controls(
        self, controls: list[tuple[Record, ControlCommand]], result: BatchResult
    ) -> None:
        """Control commands (rollback, pin, finetune), in offset order."""
        for rec, command in controls:
            self._apply_control(rec, command, result)

    # -- 8. the batch ---------------------------------------------------------------------

    def _put_changes(
        self,
        next_offsets: dict[tuple[str, int], int],
        work: _Work,
        touched: _Touched,
        batch: WriteBatch,
    ) -> None:
        """Put every change of the batch, then the offsets, into its one write batch.

        1. The domains' counters go into the meta cache.
        2. The items and meta caches put their changed values (in key order).
        3. The interactions' popularity and the users' recent items (ring headers and
           slots) are put.
        4. The next offset of each partition is put, in order: state and offsets are then
           written together (the consumer loop's one write), so a replay after a crash
           starts exactly after what the state holds.
        5. The batch's values wait in ``committed.pending``: the next batch adopts them once
           it finds these offsets in the store (see :class:`_Committed`).
        """
        for domain, c in work.counters.items():
            work.meta.put(domain_counters_key(domain), c.encode())
        for cache in (work.items, work.meta):
            cache.flush(batch)
        put = batch.put
        for key, value in touched.popularity.items():
            put("popularity", key, value)
        for key, value in touched.users.items():
            put("users", key, value)
        for key, value in touched.recent.items():
            put("recent", key, value)
        for key in touched.stale:
            batch.delete("recent", key)
        for (topic, partition), offset in sorted(next_offsets.items()):
            batch.set_offset(topic, partition, offset)
        touched.items.update(k for k, v in work.items.values.items() if v is not None)
        self.committed.pending = (next_offsets, touched.popularity, touched.users, touched.items)

    # ------------------------------------------------------------------------------------

    @staticmethod
    def _parse_each(
        recs: list[Record],
        parse: Callable[[bytes | None, EventLimits], _E],
        result: BatchResult,
        limits: EventLimits,
    ) -> list[tuple[Record, _E]]:
        """Parse each record; a bad one, or one whose key is not its event's domain, becomes
        a dead letter."""
        out: list[tuple[Record, _E]] = []
        for rec in recs:
            try:
                event = parse(rec.value, limits)
            except EventError as exc:
                result.dead.append(DeadLetter(exc.reason, rec))
                continue
            wrong_key = key_fault(rec.key, event.domain)
            if wrong_key is not None:
                result.dead.append(DeadLetter(wrong_key, rec))
                result.key_mismatches[rec.topic] += 1
                continue
            out.append((rec, event))
        return out

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
    ) -> tuple[ItemRecord, bool]:
        """Apply one item event: the item's record now, and whether the event made it held
        (new, or a placeholder filled in)."""
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
        return record, stored is None or stored.placeholder

    def _apply_interactions(
        self, parsed: _Parsed, work: _Work, touched: _Touched, result: BatchResult
    ) -> None:
        """Apply the batch's valid interactions (columns, in offset order).

        1. Group the events per item, in offset order.
        2. Read the items' committed popularity, and whether the items without one exist.
        3. Fold each item's popularity in offset order with :meth:`Popularity.add_many` (the
           same float operations as one :meth:`Popularity.add` per event, so the bits do not
           depend on batch boundaries). An item that has neither a popularity record nor an
           item record gets a placeholder at its first interaction's time.
        4. Count each domain's interactions, placeholders and newest event time.
        5. Put the log, one row per interaction.
        6. Append each user's new items to their recent items.
        """
        inter = parsed.inter
        per_item = _grouped(
            zip(inter.domains, inter.item_ids, strict=True),
            zip(inter.ts, inter.weights, strict=True),
        )
        keys = [item_key(d, i) for d, i in per_item]
        pops = self._read_popularity(keys, work.items)
        touched.before = pops
        placeholders, last_ts = self._fold_popularity(per_item, keys, pops, work.items, touched)
        self._count_interactions(inter, placeholders, last_ts, work.counters, result)
        self._log_interactions(parsed, result.batch)
        self._append_recent(inter, touched)

    def _read_popularity(self, keys: list[bytes], item_cache: _Cache) -> dict[bytes, bytes | None]:
        """The committed popularity of ``keys``; the items without one are looked up in the
        item cache (an item with a popularity record exists; big values: rarely read)."""
        committed = self.committed
        pops = committed.read(self.store, "popularity", committed.popularity, keys)
        batch_items = item_cache.values
        unknown = [
            k
            for k in keys
            if pops[k] is None and k not in committed.items and batch_items.get(k) is None
        ]
        if unknown:
            batch_items.update(zip(unknown, self.store.multi_get("items", unknown), strict=True))
        return pops

    def _fold_popularity(
        self,
        per_item: dict[tuple[str, str], list[tuple[int, float]]],
        keys: list[bytes],
        pops: dict[bytes, bytes | None],
        item_cache: _Cache,
        touched: _Touched,
    ) -> tuple[Counter[str], dict[str, int]]:
        """Each item's new popularity into ``touched``, placeholders into the item cache;
        returns the placeholders added and the newest event time, per domain."""
        placeholders: Counter[str] = Counter()
        last_ts: dict[str, int] = {}
        half_life = self.half_life_s
        batch_items = item_cache.values
        new_pops = touched.popularity
        for (domain, _), key, events in zip(per_item, keys, per_item.values(), strict=True):
            raw = pops[key]
            if raw is None and key in batch_items and batch_items[key] is None:
                first = events[0][0]  # out of order: no item event yet
                item_cache.put(key, ItemRecord(first, first, placeholder=True).encode())
                placeholders[domain] += 1
            new_pops[key], last = fold_popularity(raw, events, half_life)
            if last > last_ts.get(domain, -1):
                last_ts[domain] = last
        return placeholders, last_ts

    @staticmethod
    def _count_interactions(
        inter: InteractionColumns,
        placeholders: Counter[str],
        last_ts: dict[str, int],
        counters: dict[str, DomainCounters],
        result: BatchResult,
    ) -> None:
        """Each domain's counters after its interactions."""
        for domain, n in Counter(inter.domains).items():
            c = counters[domain]
            counters[domain] = DomainCounters(
                c.items,
                c.placeholders + placeholders[domain],
                c.interactions + n,
                c.logged + n,
                max(c.last_ts, last_ts[domain]),
            )
            result.applied["interaction", domain] += n

    @staticmethod
    def _log_interactions(parsed: _Parsed, batch: WriteBatch) -> None:
        """One ``interactions`` row per valid interaction, keyed by time and origin."""
        inter, inter_recs = parsed.inter, parsed.inter_recs
        offsets = [inter_recs[k].offset for k in inter.index]
        partitions = [inter_recs[k].partition for k in inter.index]
        put = batch.put
        log_keys = interaction_keys(inter.domains, inter.ts, partitions, offsets)
        log_values = encode_interactions(inter.user_ids, inter.item_ids, inter.weights)
        for key, value in zip(log_keys, log_values, strict=True):
            put("interactions", key, value)

    def _append_recent(self, inter: InteractionColumns, touched: _Touched) -> None:
        """Each user's recent items, with the batch's appended (none kept: nothing): the
        users' ring headers are read, their new slots written (see :mod:`worker.state.users`)."""
        limit = self.settings.user_history_len
        if not limit:
            return
        values = encode_slot_values(inter.ts, inter.item_ids)
        per_user = _grouped(zip(inter.domains, inter.user_ids, strict=True), values)
        ukeys = [user_key(d, u) for d, u in per_user]
        committed = self.committed
        stored = committed.read(self.store, "users", committed.users, ukeys)
        new_users, slots = touched.users, touched.recent
        for ukey, (domain, user), mine in zip(ukeys, per_user, per_user.values(), strict=True):
            append = append_recent(domain, user, stored[ukey], mine, limit, self._read_slots)
            new_users[ukey] = append.header
            slots.update(append.slots)
            touched.stale += append.deletes

    def _read_slots(self, keys: list[bytes]) -> list[bytes | None]:
        return self.store.multi_get("recent", keys)

    def _assign_codes(
        self,
        codes: CodeService,
        parsed: _Parsed,
        work: _Work,
        touched: _Touched,
        result: BatchResult,
    ) -> None:
        """Code new items and run the code rounds that are due (see
        :meth:`CodeService.apply`): the embeddings of the batch's new or changed items, per
        domain, the batch's interactions (in offset order) with the popularity they found
        and left, and the domains' counters before and after the batch."""
        new = self._new_embeddings(parsed.items, work.items)
        moves = PopularityMoves(
            parsed.inter.domains,
            parsed.inter.item_ids,
            parsed.inter.ts,
            parsed.inter.weights,
            touched.before,
            touched.popularity,
        )
        result.coding = codes.apply(
            result.batch, new, moves, work.before, work.counters, arrivals=work.arrivals
        )
        if codes.handed_over is not None and self.kept is not None:  # a migration cut over
            self.kept.adopt(codes.handed_over)
            codes.handed_over = None
        if self.kept is not None and self.kept.services:
            result.kept_coding = self.kept.apply(
                result.batch, new, moves, work.before, work.counters
            )

    @staticmethod
    def _new_embeddings(
        items: list[tuple[Record, ItemEvent]], item_cache: _Cache
    ) -> dict[str, dict[str, bytes]]:
        """Domain -> item -> embedding of the items the batch added or changed."""
        new: dict[str, dict[str, bytes]] = {}
        for _, event in items:
            key = item_key(event.domain, event.item_id)
            raw = item_cache.values.get(key)
            if raw is not None and key in item_cache.dirty:
                rec = ItemRecord.decode(raw)
                if rec.embedding:
                    new.setdefault(event.domain, {})[event.item_id] = rec.embedding
        return new

    def _apply_control(self, rec: Record, command: ControlCommand, result: BatchResult) -> None:
        if command.op == "migrate":
            if self.codes is None or self.codes.codebook is None:
                why = "codes are off" if self.codes is None else "there is no codebook yet"
                result.dead.append(DeadLetter(f"control command refused: {why}", rec))
            else:
                self.codes.request_migration(
                    result.batch, f"{rec.topic}-{rec.partition}@{rec.offset}"
                )
            return
        if command.op == "finetune":  # durable: pending until its outcome is final
            from worker.state.requests import put_request  # (kept inside this method)

            ts = getattr(rec, "timestamp", None)  # the record's own time: a replay is equal
            at = ts / 1000 if isinstance(ts, int) and ts >= 0 else None
            source = f"{rec.topic}-{rec.partition}@{rec.offset}"
            put_request(result.batch, command.domain, at, source)
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
        batch.delete_range("interactions", prefix, key_after(last_key))
        return DomainCounters(
            c.items, c.placeholders, c.interactions, c.logged - removed, c.last_ts
        )
