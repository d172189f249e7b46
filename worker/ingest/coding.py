"""Live code assignment: the worker's bridge between state and :mod:`quantize`.

One residual codebook per worker state (shared by every domain, so table rows are
comparable across domains), and one :class:`~quantize.assign.CodeAssigner` per
domain, kept in memory and saved item by item in the ``codes`` column family in the
same batch as the events that changed it.

Keys in ``codes`` (built by :mod:`worker.state.layout`)::

    state \\0 <domain>                      -> the assigner's header (JSON; the first format
                                              held the whole state there, read once)
    row   \\0 <domain> \\0 <item_id>          -> one item's assigner row
    pend  \\0 <domain> \\0 <item_id>          -> b"": the item's popularity moved since the
                                              domain's last code round
    hist  \\0 <domain> \\0 ts(>q) <item_id>  -> {"old", "new", "reason"} (audit trail)

and in ``meta``: ``codebook/current`` -> id, ``codebook/<id>`` -> codebook bytes.

Codebooks after the first (``adacode codebook train``) code into their own namespace
(the same keys behind ``ns \\0 <id> \\0``, named by ``codes/ns/<id>`` in ``meta``; see
:mod:`worker.state.layout`). The codes of an older codebook are kept, and fed by every
batch like the current one's (:class:`KeptCodes`), while a published version trained on it
may be served: a rollback to it serves what it served, and the items that came since with
its codebook's codes. Once no published version of any domain names it, the next batch
deletes its namespace.

Bootstrap: while there is no codebook, items are stored uncoded. Once
``codebook_min_items`` items have embeddings, a bounded sample of them is chosen and
saved, and :class:`~worker.ingest.bootstrap.Bootstrap` trains the codebook on it in the
background while batches go on; the first batch after it is done adopts it, and the
items held so far are coded in chunks of ``CATCH_UP_ITEMS`` per batch in key order
(new items are coded as they come). A restart resumes the same sample.
Retraining is explicit (``adacode codebook train``), never a silent change of codes.

Popularity rounds (cost: the items whose popularity moved, see
:class:`~quantize.assign.CodeAssigner`): every batch marks the items whose popularity
moved; a round runs in a domain once it has had ``code_round_share`` interactions per
item since its last round (within ``code_round_min_interactions`` and
``code_round_interactions``), takes the marked items' popularity (kept in memory beside
the marks, read from the store once, when the domain loads) and hands it to
:meth:`CodeAssigner.update_popularity`. Popularity is expressed at a fixed reference
time of the domain (:func:`store.records.popularity_since`): an item's value changes
only with its own interactions, and ratios are those of the decayed counts at any
time. The head thresholds follow ``code_head_fraction`` of the domain's items: they
are moved (:meth:`CodeAssigner.set_thresholds`) when the head count drifts by more than
a quarter from its target, by at most as many head flags as the round moved items
(:func:`follow_head_fraction`), so a move is spread over a few rounds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

import numpy as np
import orjson

from quantize.assign import Code, CodeAssigner, CodeChange, CodeStats
from quantize.codebook import POINTS_PER_CENTROID, ResidualCodebook, suggest_shape
from quantize.drift import CodebookDrift, DriftReport, squared_errors
from quantize.lengths import make_policy, thresholds_for_fraction
from store.partition import StorePartition, WriteBatch, prefix_upper_bound
from store.records import DomainCounters, ItemRecord, fold_popularity, popularity_since
from worker.core.exceptions import WorkerError
from worker.core.settings import Settings
from worker.core.threads import Foreground
from worker.state.layout import (
    BOOTSTRAP_CURSOR,
    BOOTSTRAP_SAMPLE,
    CODEBOOK_CURRENT,
    CODEBOOK_DRIFT,
    CODEBOOK_LINEAGE,
    MIGRATE_REQUEST,
    MIGRATE_STATE,
    UNPREFIXED_CODE_PREFIXES,
    assigner_key,
    code_namespace_key,
    code_row_key,
    codebook_key,
    domain_counters_key,
    history_key,
    item_key,
    namespace_prefix,
    round_pending_key,
    round_pending_prefix,
    split_item_key,
)
from worker.state.reads import (
    code_namespaces,
    codebook_lineage,
    committed_codes,
    current_namespace,
    domain_counters,
    load_codebook,
    load_codebook_by_id,
    load_drift,
    round_pending,
)
from worker.state.requests import put_request
from worker.state.versions import codebooks_in_use, domains_with_versions

log = logging.getLogger(__name__)

#: items coded per batch while the items held before the codebook catch up
CATCH_UP_ITEMS = 20_000
#: a domain's popularity is expressed at a reference time on this grid (half-lives);
#: moved by whole steps (an exact power of two) once values would grow past 2 ** REBASE_AT
REFERENCE_GRID = 32
REBASE_AT = 512
#: the head thresholds move once the head count is this far (relative) from its target
HEAD_DRIFT = 0.25
#: a round's threshold move may flip as many head flags per side as the round moved items,
#: and at least this many
MIN_FLIPS = 1000


def round_codes(
    assigner: CodeAssigner,
    keys: Sequence[str],
    popularity: np.ndarray,
    ts: int,
    head_fraction: float,
) -> list[CodeChange]:
    """One code round on ``assigner``: the new popularity of ``keys`` (at the domain's
    reference time), then the head thresholds (:func:`follow_head_fraction`), which may flip
    as many head flags as the round moved items (at least ``MIN_FLIPS``)."""
    changes = assigner.update_popularity(list(keys), popularity, ts=ts) if len(keys) else []
    budget = max(len(keys), MIN_FLIPS)
    return changes + follow_head_fraction(assigner, head_fraction, ts, budget)


def follow_head_fraction(
    assigner: CodeAssigner, head_fraction: float, ts: int, budget: int
) -> list[CodeChange]:
    """Move the head thresholds towards ``head_fraction`` of the items once the head count
    is more than ``HEAD_DRIFT`` from it (or there are none yet), flipping at most about
    ``budget`` head flags per side.

    With popularity taken at a fixed reference time, new traffic outgrows old, so heads
    accumulate and the thresholds must rise; at a million items one jump to the target
    flipped ~50,000 items in one round (1.9 s). A move is cut instead: the exit threshold
    rises at most to the popularity of the ``budget``-th least popular head (so at most
    ``budget`` heads leave), the enter threshold falls at most to that of the
    ``budget``-th most popular other item. The next rounds go on from there, so the head
    count reaches the target over a few rounds, each bounded (one O(items) numpy pass).
    Deterministic: a function of the state at the round."""
    target = round(head_fraction * len(assigner))
    if target == 0:
        return []
    drift = abs(assigner.n_head - target)
    if math.isfinite(assigner.enter_threshold) and drift <= HEAD_DRIFT * target:
        return []
    pop = assigner.all_popularity()
    enter, exit_ = thresholds_for_fraction(pop, head_fraction)
    if not math.isfinite(enter):
        return []
    old_enter, old_exit = assigner.enter_threshold, assigner.exit_threshold
    head = assigner.head_mask()
    if exit_ > old_exit:  # heads below the new exit leave: at most budget of them
        heads = pop[head]
        if np.count_nonzero(heads < exit_) > budget:
            exit_ = float(np.partition(heads, budget)[budget])
    if enter < old_enter:  # non-heads at or above the new enter come in: at most budget
        others = pop[~head & (pop > 0)]
        if np.count_nonzero(others >= enter) > budget:
            cut = others.size - 1 - budget
            enter = max(enter, float(np.partition(others, cut)[cut]))
    if enter == old_enter and exit_ == old_exit:
        return []
    return assigner.set_thresholds(enter, exit_, ts=ts)


def popularity_at_reference(
    store: StorePartition,
    domain: str,
    keys: Sequence[str],
    ref_ts: int,
    half_life_s: float,
    popularity: Mapping[bytes, bytes | None] | None = None,
) -> np.ndarray:
    """The popularity of ``keys`` at the domain's reference time ``ref_ts``: the records in
    ``popularity`` (this batch's, by item key), else the committed ones (0 for items without
    interactions)."""
    given = popularity or {}
    ikeys = [item_key(domain, k) for k in keys]
    missing = [k for k in ikeys if k not in given]
    stored = dict(zip(missing, store.multi_get("popularity", missing), strict=True))
    raws = [given[k] if k in given else stored.get(k) for k in ikeys]
    have = [j for j, raw in enumerate(raws) if raw is not None]
    out = np.zeros(len(keys), dtype=np.float64)
    if have:
        out[have] = popularity_since([raws[j] for j in have], ref_ts, half_life_s)  # type: ignore[misc]
    return out


@dataclass(frozen=True)
class RoundedCodes:
    """A domain's codes as its next round would leave them (see :func:`codes_after_round`)."""

    assigner: CodeAssigner
    moved: int  # items whose popularity moved since the last round (read for this one)
    changes: list[CodeChange]


def codes_after_round(
    store: StorePartition, domain: str, settings: Settings
) -> RoundedCodes | None:
    """The domain's committed codes with the round its marked items wait for applied, in
    memory (``None``: no codes yet). What a fine-tune reads: a round falls at an exact
    interaction of the stream (so replays give the same codes), which leaves up to a round's
    worth of interactions not yet rounded when a fine-tune reads the domain; this applies
    the same round (:func:`round_codes`, the popularity as committed) to the fine-tune's
    copy, so head items are trained and published with their long codes at once. The
    state itself is left as it is: its round still falls at its interaction."""
    ns = current_namespace(store)
    committed = committed_codes(store, domain, ns=ns)
    if committed is None:
        return None
    assigner, extra, _ = committed
    keys = sorted(k for k in round_pending(store, domain, ns=ns) if k in assigner)
    raw_counters = store.get("meta", domain_counters_key(domain)) if keys else None
    ts = DomainCounters.decode(raw_counters).last_ts if raw_counters else 0
    half_life = settings.popularity_half_life_hours * 3600.0
    ref_ts = int(extra.get("ref_ts", 0))
    pops = popularity_at_reference(store, domain, keys, ref_ts, half_life)
    changes = round_codes(assigner, keys, pops, ts, settings.code_head_fraction)
    return RoundedCodes(assigner, len(keys), changes)


#: an applied item event, while there is no codebook: (item key, its embedding after the
#: event, whether it made the item held: new, or a placeholder filled in)
Arrival = tuple[bytes, bytes, bool]


def _poll(trainer: Trainer, what: str) -> tuple[bool, ResidualCodebook | None]:
    """``(failed, the codebook once trained)``; a failure is logged (the trainer logged its
    cause) and the next batch starts a new training."""
    try:
        return False, trainer.poll()
    except WorkerError as exc:
        log.error("%s failed (%s); trying again", what, exc)
        return True, None


def _trained(trainer: Trainer | None) -> bool:
    """Whether ``trainer`` has a codebook for the next batch, or failed (the next batch
    logs it and starts again)."""
    try:
        return trainer is not None and trainer.poll() is not None
    except WorkerError:
        return True


def _by_rank(keys: Iterable[bytes], cap: int) -> list[bytes]:
    """At most ``cap`` of ``keys``, those of smallest ``sample_rank``; ascending."""
    from worker.ingest.bootstrap import sample_rank

    return sorted(sorted(keys, key=lambda k: (sample_rank(k), k))[:cap])


def _stacked(vectors: list[np.ndarray], dim: int) -> np.ndarray:
    return np.stack(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)


def _upper(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (a ``\\0``-ended one)."""
    bound = prefix_upper_bound(prefix)
    assert bound is not None  # our prefixes end with a zero byte
    return bound


def put_codebook(
    batch: WriteBatch,
    codebook: ResidualCodebook,
    store: StorePartition | None = None,
    *,
    ancestors: Sequence[str] = (),
) -> None:
    """Make ``codebook`` the current one in ``batch``; with the ``store`` it is added to the
    state's lineage of codebooks (:func:`~worker.state.reads.codebook_lineage`), after
    ``ancestors`` (the group's chain before it) when the state has no lineage yet."""
    cid = codebook.codebook_id.encode()
    batch.put("meta", codebook_key(cid), codebook.to_bytes())
    batch.put("meta", CODEBOOK_CURRENT, cid)
    if store is not None:
        lineage = codebook_lineage(store) or list(ancestors)
        if not lineage or lineage[-1] != codebook.codebook_id:
            lineage.append(codebook.codebook_id)
        batch.put("meta", CODEBOOK_LINEAGE, orjson.dumps(lineage))


class CodebookSource(Protocol):
    """Where a group of workers agrees on one codebook (see :mod:`worker.ingest.group`)."""

    def current(self) -> ResidualCodebook | None:
        """The group's codebook (read now), or ``None`` while there is none."""

    def agree(self, candidate: ResidualCodebook) -> ResidualCodebook:
        """Offer ``candidate``; returns the group's codebook."""

    def succeed(self, old_id: str, new: ResidualCodebook) -> ResidualCodebook | None:
        """Offer ``new`` as the successor of ``old_id``; returns the group's codebook."""

    def seen(self) -> Sequence[ResidualCodebook] | None:
        """The group's chain of codebooks as last read, oldest first (no call to the group;
        ``None`` before the first read)."""


class Trainer(Protocol):
    """Trains the first codebook in the background (:class:`~worker.ingest.bootstrap.Bootstrap`)."""

    def start(
        self,
        sample_keys: list[bytes],
        n_items_total: int,
        *,
        vectors: np.ndarray | None = None,
    ) -> None: ...

    def start_scan(self, cap: int, *, agree: bool = True) -> None: ...

    def poll(self) -> ResidualCodebook | None: ...


#: how often a worker without a codebook asks the group whether one exists
GROUP_CODEBOOK_POLL_S = 5.0


@dataclass
class CodingResult:
    changes: list[tuple[str, CodeChange]] = field(default_factory=list)  # (domain, change)
    trained: str | None = None  # id of a codebook adopted in this batch
    #: items that had a code and came again with an embedding: (domain, item, served code);
    #: serving re-vectors them even when the code stayed (a text-projecting version's
    #: vector follows the item's embedding)
    redescribed: list[tuple[str, str, Code]] = field(default_factory=list)
    #: code rounds run: (domain, items re-evaluated, seconds)
    rounds: list[tuple[str, int, float]] = field(default_factory=list)
    #: id of the codebook whose migration's catch-up ended in this batch (every item coded)
    migrated: str | None = None


@dataclass(frozen=True)
class PopularityMoves:
    """A batch's valid interactions in offset order (as columns) and the popularity records
    of the items they touch: as committed before the batch (``None``: none yet) and as the
    batch leaves them."""

    domains: Sequence[str]
    item_ids: Sequence[str]
    ts: Sequence[int]
    weights: Sequence[float]
    before: Mapping[bytes, bytes | None]
    after: Mapping[bytes, bytes]

    @classmethod
    def none(cls) -> PopularityMoves:
        return cls([], [], [], [], {}, {})

    def by_domain(self) -> dict[str, list[int]]:
        """Positions of each domain's interactions, in offset order."""
        out: dict[str, list[int]] = {}
        for j, domain in enumerate(self.domains):
            out.setdefault(domain, []).append(j)
        return out


@dataclass
class _Domain:
    """A domain's assigner and what its header keeps beside it."""

    assigner: CodeAssigner
    ref_ts: int  # the popularity reference time (see the module docstring)
    last_round: int  # the domain's interaction count at its last round
    resave: bool = False  # read in the first format: save every row once
    #: the marked items (moved since the last round) -> their popularity record as the
    #: batch that marked them left it: what the ``pend`` keys and the ``popularity`` rows
    #: say, kept so that a round reads neither (read once, when the domain is loaded)
    marked: dict[str, bytes | None] = field(default_factory=dict)


class CodeService:
    """Codes items as they arrive and re-evaluates lengths as popularity moves."""

    def __init__(
        self,
        store: StorePartition,
        settings: Settings,
        *,
        group: CodebookSource | None = None,
        trainer: Callable[[], Trainer] | None = None,
        kept: tuple[ResidualCodebook, bytes] | None = None,
        foreground: Foreground | None = None,
    ) -> None:
        """``group``: where a group of workers agrees on one codebook (``None``: a worker
        on its own, which trains and keeps its own); ``trainer``: trains the first codebook
        in the background, a new one per try (``None``: in the batch that has enough items,
        for tools and tests).

        ``kept``: an older codebook and the prefix of its namespace, kept for the versions
        trained on it (see :class:`KeptCodes`): the service codes new items and runs the
        rounds in that namespace, and leaves the bootstrap, the catch-up, the drift and the
        code history to the current codebook's service.

        ``foreground``: where the code rounds say they run, so that background loops (the
        codebook's sample scan) step aside meanwhile (see :class:`Foreground`)."""
        self.store = store
        self.foreground = foreground or Foreground()
        self.settings = settings
        self.current = kept is None
        self.codebook = load_codebook(store) if kept is None else kept[0]
        #: the prefix of this codebook's code keys (``b""``: the unprefixed ones)
        self.ns = current_namespace(store) if kept is None else kept[1]
        self.domains: dict[str, _Domain] = {}
        #: held while a batch changes the assigners; readers on other threads take it
        self.lock = threading.Lock()
        self._dirty: set[str] = set()
        self.group = group
        self.make_trainer = trainer
        self.trainer: Trainer | None = None
        self._group_checked = 0.0
        self._half_life = settings.popularity_half_life_hours * 3600.0
        #: per domain, the :class:`CodeStats` after the last batch that changed it, and
        #: those not yet taken by :meth:`take_stats` (under their own small lock: a reader
        #: never waits for a batch)
        self.stats: dict[str, CodeStats] = {}
        self._fresh_stats: dict[str, CodeStats] = {}
        self._stats_lock = threading.Lock()
        self._training = False
        #: the next item key the catch-up after a bootstrap codes (None: nothing to catch up)
        self._cursor: bytes | None = None
        self._cursor_loaded = False
        #: the codebook's drift sums (see quantize.drift), saved with the items coded; the
        #: last report is read by scrapes under the stats lock
        self.drift: CodebookDrift | None = None
        self._drift_report: DriftReport | None = None
        self._drift_dirty = False
        #: a requested migration (``None``: none), read once; its candidate's trainer; and
        #: the service of the codebook cut over from, for the processor to keep
        self._migration: dict[str, str] | None = None
        self._migration_loaded = False
        self._candidate_trainer: Trainer | None = None
        self.handed_over: CodeService | None = None
        #: a migration cut over, while its catch-up runs (read once; see _migration_state)
        self._cut: dict[str, str] | None = None
        self._cut_loaded = False
        #: group codebooks not to follow: of another lineage (logged once each), or older
        #: than this worker's (it is ahead); see _follow_group
        self._not_followed: set[str] = set()
        if self.codebook is not None and self.current:
            self.drift = load_drift(store, self.codebook)
            if self.drift is not None:
                self._drift_report = self._report_drift(self.drift)

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

    def _domain(self, domain: str, ts: int = 0) -> _Domain | None:
        if self.codebook is None:
            return None
        found = self.domains.get(domain)
        if found is None:
            found = self._load(domain, ts)
            self.domains[domain] = found
        return found

    def _load(self, domain: str, ts: int) -> _Domain:
        committed = committed_codes(self.store, domain, ns=self.ns)
        if committed is None:
            return self._load_fresh(domain, ts)
        assigner, extra, first_format = committed
        marked = round_pending(self.store, domain, ns=self.ns)
        records = self.store.multi_get("popularity", [item_key(domain, i) for i in marked])
        return _Domain(
            assigner,
            int(extra.get("ref_ts", 0)),
            int(extra.get("last_round", 0)),
            resave=first_format,
            marked=dict(zip(marked, records, strict=True)),
        )

    def _load_fresh(self, domain: str, ts: int) -> _Domain:
        """A domain without codes yet; its reference time is the grid point before ``ts``."""
        assert self.codebook is not None
        grid = REFERENCE_GRID * self._half_life
        return _Domain(self._new_assigner(self.codebook), int(ts // grid * grid), 0)

    def assigner(self, domain: str) -> CodeAssigner | None:
        found = self._domain(domain)
        return None if found is None else found.assigner

    def background_work(self) -> bool:
        """Whether the next batch has work even without events: a bootstrap codebook to
        adopt once trained, items held from before the codebook still to code, a
        migration's candidate to start training or to cut over to, or a group codebook
        that moved past this worker's to follow."""
        if self.codebook is None:
            if not self._training:  # a sample saved before a restart: resume its training
                return self.store.get("meta", BOOTSTRAP_SAMPLE) is not None
            return self._ready()
        return (
            self._catching_up()
            or self._candidate_ready()
            or self._candidate_to_start()
            or self._group_moved_on() is not None
        )

    def _ready(self) -> bool:
        return _trained(self.trainer)

    def take_stats(self) -> dict[str, CodeStats]:
        """The :class:`CodeStats` of the domains whose codes changed since the last call
        (safe from any thread; never waits for a batch in progress)."""
        with self._stats_lock:
            taken, self._fresh_stats = self._fresh_stats, {}
        return taken

    # -- per batch ------------------------------------------------------------------------

    def apply(
        self,
        batch: WriteBatch,
        new_items: dict[str, dict[str, bytes]],
        moves: PopularityMoves,
        before: Mapping[str, DomainCounters],
        counters: Mapping[str, DomainCounters],
        *,
        arrivals: Sequence[Arrival] = (),
    ) -> CodingResult:
        """Code ``new_items`` (domain -> item -> float32 bytes), follow the popularity the
        batch's interactions ``moves``, and run the code rounds that fall in the batch
        (``before`` / ``counters``: the domains as the batch found and leaves them;
        ``arrivals``: while there is no codebook, the batch's item events in offset order,
        see :meth:`_choose_sample`).

        1. Without a codebook: start or resume its bootstrap, or adopt it once trained.
        2. Code the batch's new items (cold), and a chunk of the items held from before
           the codebook (with their popularity).
        3. Each round that falls in the batch runs at its very interaction (see
           :meth:`_rounds`); the items moved after the last one are marked.
        4. Save the changed rows, headers and the history.

        A requested migration cuts over before step 2, once its candidate is trained (see
        :meth:`_migrate`): from then on this service codes with the candidate, and the
        service of the codebook before it is in :attr:`handed_over`. A group whose codebook
        moved past this worker's is followed the same way (:meth:`_follow_group`).
        """
        with self.lock:
            result = CodingResult()
            if self.codebook is None and not self._adopt(
                batch, new_items, counters, arrivals, result
            ):
                return result
            self._migrate(batch, result)
            for domain, items in sorted(new_items.items()):
                ts = counters[domain].last_ts if domain in counters else 0
                self._code_items(domain, items, ts, None, result)
            self._catch_up(batch, result)
            self._rounds(batch, moves, before, counters, result)
            self._flush(batch, result)
            self._migrate_on_drift(batch)
            self._follow_group(batch)
            return result

    # -- 1. bootstrap ---------------------------------------------------------------------

    def _adopt(
        self,
        batch: WriteBatch,
        new_items: dict[str, dict[str, bytes]],
        counters: Mapping[str, DomainCounters],
        arrivals: Sequence[Arrival],
        result: CodingResult,
    ) -> bool:
        """Whether a codebook is adopted in this batch (then the items held so far are
        coded from the first key on, in chunks)."""
        codebook = self._group_codebook() or self._trained(batch, new_items, counters, arrivals)
        if codebook is None:
            return False
        self.adopt(batch, codebook)
        result.trained = codebook.codebook_id
        log.info(
            "adopted codebook %s (%d levels x %d)",
            codebook.codebook_id,
            codebook.levels,
            codebook.k,
        )
        return True

    def adopt(self, batch: WriteBatch, codebook: ResidualCodebook) -> None:
        """Use ``codebook`` from this batch on; the items held so far are coded from the
        first key on, ``CATCH_UP_ITEMS`` per batch. A state's first codebook taken from the
        group descends from the group's chain before it (its lineage)."""
        put_codebook(batch, codebook, self.store, ancestors=self._ancestors(codebook))
        batch.delete("meta", BOOTSTRAP_SAMPLE)
        batch.put("meta", BOOTSTRAP_CURSOR, b"")
        self._cursor, self._cursor_loaded = b"", True
        self.codebook = codebook

    def _ancestors(self, codebook: ResidualCodebook) -> list[str]:
        """The group's codebooks before ``codebook`` in its chain as last read (none when
        ``codebook`` is not in it)."""
        ids = [c.codebook_id for c in (self.group.seen() or [])] if self.group else []
        return ids[: ids.index(codebook.codebook_id)] if codebook.codebook_id in ids else []

    def _trained(
        self,
        batch: WriteBatch,
        new_items: dict[str, dict[str, bytes]],
        counters: Mapping[str, DomainCounters],
        arrivals: Sequence[Arrival],
    ) -> ResidualCodebook | None:
        """The bootstrap codebook once trained; starts (or resumes) its training when enough
        items are held. Without a trainer, it trains here (tools, tests)."""
        if self._training and self.trainer is not None:
            failed, codebook = _poll(self.trainer, "codebook bootstrap")
            self._training = not failed
            return codebook
        saved = self.store.get("meta", BOOTSTRAP_SAMPLE)
        if saved is None:
            chosen = self._choose_sample(counters, arrivals, new_items)
            if chosen is None:
                return None
            keys, vectors, n = chosen
            doc = {"n": n, "keys": [k.decode() for k in keys]}
            batch.put("meta", BOOTSTRAP_SAMPLE, orjson.dumps(doc))
        else:
            doc = orjson.loads(saved)
            keys, n = [k.encode() for k in doc["keys"]], int(doc["n"])
            vectors = self._sample_vectors(keys, new_items)  # a batch's items: not written yet
        if self.make_trainer is None:
            return self._train_here(vectors, n)
        self.trainer = self.make_trainer()
        self.trainer.start(keys, n, vectors=vectors)
        self._training = True
        return None

    def _held_items(self, counters: Mapping[str, DomainCounters]) -> int:
        total = {d: c.items for d, c in domain_counters(self.store).items()}
        total.update((d, c.items) for d, c in counters.items())
        return sum(total.values())

    def _choose_sample(
        self,
        counters: Mapping[str, DomainCounters],
        arrivals: Sequence[Arrival],
        new_items: dict[str, dict[str, bytes]],
    ) -> tuple[list[bytes], np.ndarray, int] | None:
        """The bootstrap's sample, once ``codebook_min_items`` items are held: ``(keys
        ascending, their embeddings, items it stands for)``, else ``None``.

        The sample is the items held at the very item event that makes ``codebook_min_items``
        (each with its embedding as of that event), whatever batch that event falls in: so a
        run replayed after a crash, or fed by other fetch sizes, trains the same codebook.
        Of those, at most :func:`~worker.ingest.bootstrap.sample_cap` are kept, by
        :func:`~worker.ingest.bootstrap.sample_rank`. (Only a state kept from before this
        rule, already past the threshold without a sample, samples every held item.)
        """
        from worker.ingest.bootstrap import choose_sample, sample_cap

        wanted, cap = self.settings.codebook_min_items, sample_cap(self.settings)
        n_after = self._held_items(counters)
        if n_after < wanted:
            return None
        n_before = n_after - sum(1 for _, _, held in arrivals if held)
        if n_before >= wanted:
            keys = choose_sample(self.store, cap, stop_event=threading.Event())
            fresh = [item_key(d, i) for d, items in new_items.items() for i in items]
            keys = _by_rank(set(keys) | set(fresh), cap)
            return keys, self._sample_vectors(keys, new_items), n_after
        sample = self._stored_embeddings()  # fewer than ``wanted``: the batch did not start
        count = n_before
        for key, embedding, held in arrivals:
            if held or key in sample:
                sample[key] = embedding
            count += held
            if count == wanted:
                break
        keys = _by_rank(sample, cap)
        vectors = [np.frombuffer(sample[key], dtype="<f4") for key in keys]
        return keys, _stacked(vectors, self.settings.embedding_dim), wanted

    def _stored_embeddings(self) -> dict[bytes, bytes]:
        """Every stored item's embedding (placeholders left out): only called while fewer
        than ``codebook_min_items`` are held."""
        out: dict[bytes, bytes] = {}
        for key, raw in self.store.items("items"):
            record = ItemRecord.decode(raw)
            if not record.placeholder and record.embedding:
                out[key] = record.embedding
        return out

    def _sample_vectors(
        self, keys: list[bytes], new_items: dict[str, dict[str, bytes]]
    ) -> np.ndarray:
        """The embeddings of the sample ``keys``: this batch's, else the stored ones."""
        fresh = {item_key(d, i): v for d, items in new_items.items() for i, v in items.items()}
        stored = dict(zip(keys, self.store.multi_get("items", keys), strict=True))
        vectors = []
        for key in keys:
            if key in fresh:
                vectors.append(np.frombuffer(fresh[key], dtype="<f4"))
            elif (raw := stored[key]) is not None and (rec := ItemRecord.decode(raw)).embedding:
                vectors.append(np.frombuffer(rec.embedding, dtype="<f4"))
        return _stacked(vectors, self.settings.embedding_dim)

    def _train_here(self, data: np.ndarray, n: int, *, agree: bool = True) -> ResidualCodebook:
        levels, k = suggest_shape(n)
        levels = self.settings.code_levels or levels
        k = min(self.settings.code_k or k, data.shape[0])
        codebook = ResidualCodebook.train(
            data, levels, k, seed=0, points_per_centroid=POINTS_PER_CENTROID
        )
        if self.group is not None and agree:
            codebook = self.group.agree(codebook)
        log.info(
            "trained codebook %s (%d levels x %d codewords) on %d of %d items",
            codebook.codebook_id,
            levels,
            k,
            data.shape[0],
            n,
        )
        return codebook

    def _group_codebook(self) -> ResidualCodebook | None:
        """The group's codebook if there is one (asked at most every few seconds)."""
        if self.group is None:
            return None
        now = time.monotonic()
        if now - self._group_checked < GROUP_CODEBOOK_POLL_S:
            return None
        self._group_checked = now
        found = self.group.current()
        if found is not None:
            log.info("using the group's codebook %s", found.codebook_id)
        return found

    # -- 2. coding --------------------------------------------------------------------------

    def _code_items(
        self,
        domain: str,
        items: Mapping[str, bytes],
        ts: int,
        popularity: Mapping[bytes, bytes] | None,
        result: CodingResult,
    ) -> None:
        state = self._domain(domain, ts)
        if state is None or not items or self.codebook is None:
            return
        assigner = state.assigner
        self._rebase(state, ts)
        keys = sorted(items)
        known = [k for k in keys if k in assigner]
        vectors = np.stack([np.frombuffer(items[k], dtype="<f4") for k in keys])
        paths = self.codebook.encode(vectors)
        # held items (catch-up, retraining) and anything coded before the catch-up ends
        # are the catalogue the codebook was adopted for
        if self.current:
            adoption = popularity is not None or self._catching_up()
            self._measure_drift(vectors, paths, adoption=adoption)
        # items of a batch start cold (their interactions are marked for the next round);
        # items held from before the codebook come with the popularity they have
        pops = None if popularity is None else self._popularity(state, domain, keys, popularity)
        result.changes += [(domain, c) for c in assigner.add(keys, paths, pops, ts=ts)]
        result.redescribed += [(domain, k, assigner.served_code(k)) for k in known]
        self._dirty.add(domain)

    def _measure_drift(self, vectors: np.ndarray, paths: np.ndarray, *, adoption: bool) -> None:
        """Add the items just coded to the codebook's drift sums (their error and first
        cell); the items coded until the catch-up is done (``adoption``) form the
        baseline."""
        assert self.codebook is not None
        drift = self.drift
        if drift is None or drift.codebook_id != self.codebook.codebook_id:
            drift = self.drift = CodebookDrift.new(
                self.codebook.codebook_id, self.codebook.k, self.settings.codebook_drift_window
            )
        errors = squared_errors(vectors, self.codebook.decode(paths))
        drift.add(errors, paths[:, 0], adoption=adoption)
        self._drift_dirty = True

    def _catching_up(self) -> bool:
        """Whether items held from before the codebook are still being coded (the items
        coded until then are the catalogue the codebook was adopted for)."""
        if not self.current:
            return False
        if not self._cursor_loaded:
            self._cursor = self.store.get("meta", BOOTSTRAP_CURSOR)
            self._cursor_loaded = True
        return self._cursor is not None

    def _report_drift(self, drift: CodebookDrift) -> DriftReport:
        return drift.report(self.settings.codebook_drift_threshold)

    def drift_report(self) -> DriftReport | None:
        """The codebook's drift after the last batch that coded items (safe from any
        thread; never waits for a batch in progress)."""
        with self._stats_lock:
            return self._drift_report

    def _popularity(
        self,
        state: _Domain,
        domain: str,
        keys: list[str],
        popularity: Mapping[bytes, bytes | None],
    ) -> np.ndarray:
        """The popularity of ``keys`` at the domain's reference time (see
        :func:`popularity_at_reference`)."""
        return popularity_at_reference(
            self.store, domain, keys, state.ref_ts, self._half_life, popularity
        )

    def _catch_up(self, batch: WriteBatch, result: CodingResult) -> None:
        """Code the next chunk of the items held from before the codebook (key order)."""
        if not self._catching_up():
            return
        cursor = self._cursor
        assert cursor is not None
        # the scan starts at the cursor (the last key coded) itself: one row more, dropped
        ahead = islice(self.store.items("items", start=cursor or None), CATCH_UP_ITEMS + 2)
        rows = [(k, v) for k, v in ahead if k != cursor][: CATCH_UP_ITEMS + 1]
        chunk = rows[:CATCH_UP_ITEMS]
        per_domain: dict[str, dict[str, bytes]] = {}
        newest: dict[str, int] = {}
        for key, raw in chunk:
            rec = ItemRecord.decode(raw)
            domain, item_id = split_item_key(key)
            if rec.embedding:
                per_domain.setdefault(domain, {})[item_id] = rec.embedding
                newest[domain] = max(newest.get(domain, 0), rec.last_seen)
        for domain, items in sorted(per_domain.items()):
            state = self._domain(domain, newest[domain])
            if state is not None:
                todo = {k: v for k, v in items.items() if k not in state.assigner}
                self._code_items(domain, todo, newest[domain], {}, result)
        if len(rows) > CATCH_UP_ITEMS:
            self._cursor = chunk[-1][0]
            batch.put("meta", BOOTSTRAP_CURSOR, self._cursor)
        else:
            self._cursor = None
            batch.delete("meta", BOOTSTRAP_CURSOR)
            log.info("every item held before the codebook is coded")
            result.migrated = self._migrated(batch)

    # -- 5. migration ------------------------------------------------------------------------

    def request_migration(
        self, batch: WriteBatch, source: str, *, target: ResidualCodebook | None = None
    ) -> bool:
        """Ask for a live migration to a codebook trained on today's catalogue (``adacode
        codebook migrate``, or a drift past its threshold with ``codebook_migrate_on_drift``)
        or to ``target`` (the group's, which moved on: no training): saved in ``batch``; the
        candidate trains from the next batch on (see :meth:`_migrate`). A request while one
        is pending or cutting over is the same request (false), but a ``target`` replaces a
        pending request (the group's codebook is where this worker goes)."""
        pending = self._pending_migration() is not None and target is None
        if pending or self._migration_state() is not None:
            log.info("codebook migration requested (%s): one is already under way", source)
            return False
        self._migration = {"source": source}
        self._candidate_trainer = None  # a candidate in training is not needed any more
        if target is not None:
            batch.put("meta", codebook_key(target.codebook_id.encode()), target.to_bytes())
            self._migration["codebook"] = target.codebook_id
        batch.put("meta", MIGRATE_REQUEST, orjson.dumps(self._migration))
        log.info("codebook migration requested (%s)", source)
        return True

    def _follow_group(self, batch: WriteBatch) -> None:
        """The group's codebook moved past this worker's while it runs (another worker
        migrated; the daemon re-reads the codebook topic every ``codebook_watch_s``): request
        a migration to it, as a worker that starts behind the group does (a migration with a
        target: no training; it replaces a migration of this worker's own not cut over yet).

        Nothing to do while this worker's own cut-over catches up (it follows afterwards, if
        the group moved on meanwhile) or when the group's codebook is in this worker's
        lineage (this worker is ahead: its next start offers its own); a codebook of
        another lineage is logged once (the next start refuses it)."""
        head = self._group_moved_on()
        if head is None or self.codebook is None:
            return
        chain = self.group.seen() if self.group is not None else None
        if self.codebook.codebook_id in {c.codebook_id for c in chain or ()}:
            self.request_migration(
                batch, f"the group's codebook moved on to {head.codebook_id}", target=head
            )
        elif head.codebook_id not in codebook_lineage(self.store):
            self._not_followed.add(head.codebook_id)
            log.error(
                "the group's codebook is %s, of another lineage than this worker's %s: not "
                "followed; the next start of this worker refuses it",
                head.codebook_id,
                self.codebook.codebook_id,
            )
        else:
            self._not_followed.add(head.codebook_id)  # this worker is ahead: nothing to follow

    def _group_moved_on(self) -> ResidualCodebook | None:
        """The group's codebook as last read, when it is not this worker's and nothing is
        under way towards it (no catch-up running, no request for it pending, not seen
        already as one not to follow); else ``None``. No Kafka call, no store read once
        loaded: asked before every batch (:meth:`background_work`)."""
        if self.group is None or self.codebook is None or not self.current:
            return None
        chain = self.group.seen()
        if not chain or chain[-1].codebook_id == self.codebook.codebook_id:
            return None
        head = chain[-1]
        pending = self._pending_migration() or {}
        if (
            head.codebook_id in self._not_followed
            or self._catching_up()
            or pending.get("codebook") == head.codebook_id
        ):
            return None
        return head

    def _migrate_on_drift(self, batch: WriteBatch) -> None:
        """With ``codebook_migrate_on_drift``, a drift past its threshold requests a
        migration (once: the new codebook measures its drift from its own catch-up on)."""
        report = self._drift_report
        if not self.settings.codebook_migrate_on_drift or report is None or not report.drifted:
            return
        if self._pending_migration() is None and not self._catching_up():
            self.request_migration(batch, f"drift score {report.score or 0.0:.3f}")

    def _pending_migration(self) -> dict[str, str] | None:
        if not self._migration_loaded:
            raw = self.store.get("meta", MIGRATE_REQUEST)
            self._migration = None if raw is None else orjson.loads(raw)
            self._migration_loaded = True
        return self._migration

    def _migration_state(self) -> dict[str, str] | None:
        """The migration cut over and still catching up (``migrate/state``), if any."""
        if not self._cut_loaded:
            raw = self.store.get("meta", MIGRATE_STATE)
            self._cut = None if raw is None else dict(orjson.loads(raw))
            self._cut_loaded = True
        return self._cut

    def _migrate(self, batch: WriteBatch, result: CodingResult) -> None:
        """A requested migration: train a candidate codebook on a sample of today's items
        in the background (the trainer scans the store in its own thread), then cut over in
        the first batch after it is trained (:meth:`_cut_over`). Waits while items held
        from before the codebook are still being coded."""
        if not self.current:
            return  # a kept codebook's service follows; the current one migrates
        request = self._pending_migration()
        if request is None or self.codebook is None or self._catching_up():
            return
        candidate = self._candidate(request)
        if candidate is not None and self.group is not None and "codebook" not in request:
            candidate = self._agree_successor(batch, candidate)
        if candidate is not None:
            self._cut_over(batch, candidate, request, result)

    def _agree_successor(
        self, batch: WriteBatch, candidate: ResidualCodebook
    ) -> ResidualCodebook | None:
        """Offer the trained candidate to the group as its codebook's successor; returns
        what to cut over to: the group's codebook after the offer (another worker's
        successor if it came first), ``None`` (request dropped) if the group's codebook is
        not the one this worker migrates from."""
        assert self.group is not None and self.codebook is not None
        old = self.codebook.codebook_id
        head = self.group.succeed(old, candidate)
        if head is None or head.codebook_id == old:
            log.error(
                "codebook migration dropped: the group's codebook is %s, not %s; restart the "
                "worker to follow the group",
                None if head is None else head.codebook_id,
                old,
            )
            self._drop_request(batch)
            self._candidate_trainer = None
            return None
        if head.codebook_id != candidate.codebook_id:
            log.info("codebook migration: the group moved to %s first; following it", head)
        return head

    def _candidate(self, request: dict[str, str]) -> ResidualCodebook | None:
        """The request's codebook (the group's) or the trained candidate, or ``None`` while
        it trains (started here on first call; without a trainer it trains in this batch:
        tools and tests)."""
        from worker.ingest.bootstrap import choose_sample, sample_cap

        if "codebook" in request:
            return load_codebook_by_id(self.store, request["codebook"])
        cap = sample_cap(self.settings)
        if self.make_trainer is None:
            keys = choose_sample(self.store, cap, stop_event=threading.Event())
            n = sum(c.items for c in domain_counters(self.store).values())
            vectors = self._sample_vectors(keys, {})
            return self._train_here(vectors, max(n, len(keys)), agree=False)
        if self._candidate_trainer is None:
            self._candidate_trainer = self.make_trainer()
            self._candidate_trainer.start_scan(cap, agree=False)
            log.info("codebook migration: training a candidate on a sample of the items")
        failed, codebook = _poll(self._candidate_trainer, "codebook migration: the candidate")
        if failed:
            self._candidate_trainer = None
        return codebook

    def _candidate_to_start(self) -> bool:
        """A migration was requested and its candidate's training is not started yet."""
        return (
            self.current
            and self._candidate_trainer is None
            and self._pending_migration() is not None
        )

    def _candidate_ready(self) -> bool:
        return _trained(self._candidate_trainer)

    def _cut_over(
        self,
        batch: WriteBatch,
        codebook: ResidualCodebook,
        request: dict[str, str],
        result: CodingResult,
    ) -> None:
        """Code with ``codebook`` from this batch on, in its own namespace; the codebook
        before it goes on in :attr:`handed_over` (its loaded assigners with it), kept while
        a published version was trained on it. The items held so far are coded in chunks,
        as after a bootstrap; the batch whose chunk ends that catch-up reports it
        (:meth:`_migrated`), and the scheduler then fine-tunes the domains behind the
        codebook."""
        old = self.codebook
        assert old is not None
        self._drop_request(batch)
        self._candidate_trainer = None
        if codebook.codebook_id == old.codebook_id:
            log.info("codebook migration: the candidate is the current codebook; nothing to do")
            return
        new_ns = namespace_prefix(codebook.codebook_id)
        batch.put("meta", code_namespace_key(old.codebook_id), self.ns)
        batch.put("meta", code_namespace_key(codebook.codebook_id), new_ns)
        state = {"from": old.codebook_id, "to": codebook.codebook_id, **request}
        batch.put("meta", MIGRATE_STATE, orjson.dumps(state))
        self._cut, self._cut_loaded = state, True
        self.handed_over = CodeService(
            self.store, self.settings, kept=(old, self.ns), foreground=self.foreground
        )
        self.handed_over.domains = self.domains
        self.codebook, self.ns, self.domains = codebook, new_ns, {}
        self.adopt(batch, codebook)
        self.drift = None
        with self._stats_lock:
            self._drift_report = None
        result.trained = codebook.codebook_id
        log.info(
            "codebook migration: cut over from %s to %s (%d levels x %d); coding the items "
            "held before it in chunks of %d",
            old.codebook_id,
            codebook.codebook_id,
            codebook.levels,
            codebook.k,
            CATCH_UP_ITEMS,
        )

    def _drop_request(self, batch: WriteBatch) -> None:
        batch.delete("meta", MIGRATE_REQUEST)
        self._migration, self._migration_loaded = None, True

    def _migrated(self, batch: WriteBatch) -> str | None:
        """The catch-up after a cut-over ended in this batch: the migration is done; returns
        the new codebook's id. The fine-tune scheduler then queues every domain it owns
        whose version was trained on another codebook (the new codes' first versions, each
        gated against the domain's version of the old codebook; see
        :func:`worker.tuning.scheduler.behind_codebook`)."""
        state = self._migration_state()
        if state is None:
            return None
        batch.delete("meta", MIGRATE_STATE)
        self._cut = None
        log.info("codebook migration to %s: every item is coded", state["to"])
        return state["to"]

    # -- 3. rounds --------------------------------------------------------------------------

    def _rounds(
        self,
        batch: WriteBatch,
        moves: PopularityMoves,
        before: Mapping[str, DomainCounters],
        counters: Mapping[str, DomainCounters],
        result: CodingResult,
    ) -> None:
        """The rounds that fall in this batch, domain by domain (see :meth:`_domain_rounds`)."""
        for domain, positions in sorted(moves.by_domain().items()):
            state = self._domain(domain, counters[domain].last_ts)
            if state is not None:
                self._domain_rounds(batch, domain, state, moves, positions, before[domain], result)

    def _next_round(self, state: _Domain) -> int:
        """The domain's interaction count at which its next round falls."""
        return state.last_round + self._round_every(len(state.assigner))

    def _round_every(self, n_items: int) -> int:
        """Interactions between two rounds of a domain of ``n_items`` coded items."""
        s = self.settings
        share = math.ceil(s.code_round_share * n_items)
        return min(s.code_round_interactions, max(s.code_round_min_interactions, share))

    def _domain_rounds(
        self,
        batch: WriteBatch,
        domain: str,
        state: _Domain,
        moves: PopularityMoves,
        positions: list[int],
        found: DomainCounters,
        result: CodingResult,
    ) -> None:
        """Each round at the interaction that reaches ``next_round``, with the popularity as
        of that interaction, so rounds do not depend on how the stream was cut into
        batches; the items moved after the last round are marked for the next.

        1. Fold the interactions up to the round into the moved items' popularity.
        2. Run the round on them and on the items marked by earlier batches.
        3. Mark the items moved after the last round (in the store and in ``state.marked``,
           with their popularity as this batch leaves it).
        """
        current: dict[bytes, bytes | None] = {}
        moved: set[str] = set()
        newest = [found.last_ts]
        cursor = 0
        while self._next_round(state) - found.interactions <= len(positions):
            stop = max(cursor, self._next_round(state) - found.interactions)
            self._fold(moves, positions[cursor:stop], current, moved, newest)
            cursor = stop
            with self.foreground.busy():  # background scans wait (see Foreground)
                self._round(batch, domain, state, moved, current, newest[0], result)
            moved.clear()
            state.last_round = found.interactions + cursor
        moved.update(moves.item_ids[j] for j in positions[cursor:])
        for item_id in sorted(moved):
            batch.put("codes", round_pending_key(domain, item_id, ns=self.ns), b"")
            state.marked[item_id] = moves.after[item_key(domain, item_id)]

    def _fold(
        self,
        moves: PopularityMoves,
        positions: list[int],
        current: dict[bytes, bytes | None],
        moved: set[str],
        newest: list[int],
    ) -> None:
        """Fold the interactions at ``positions`` into ``current`` (item key -> popularity
        record, from the committed one), with the same float operations as the batch."""
        per_item: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for j in positions:
            key = (moves.domains[j], moves.item_ids[j])
            per_item.setdefault(key, []).append((moves.ts[j], moves.weights[j]))
            newest[0] = max(newest[0], moves.ts[j])
        for (domain, item_id), events in per_item.items():
            ikey = item_key(domain, item_id)
            raw = current[ikey] if ikey in current else moves.before.get(ikey)
            current[ikey], _ = fold_popularity(raw, events, self._half_life)
            moved.add(item_id)

    def _round(
        self,
        batch: WriteBatch,
        domain: str,
        state: _Domain,
        moved: set[str],
        current: Mapping[bytes, bytes | None],
        ts: int,
        result: CodingResult,
    ) -> None:
        """One code round: the popularity of the items ``moved`` in this batch so far (their
        records in ``current``) and of those marked by earlier batches (``state.marked``),
        then the thresholds; the marks are cleared."""
        started = time.perf_counter()
        assigner = state.assigner
        self._rebase(state, ts)
        keys = sorted(k for k in state.marked.keys() | moved if k in assigner)
        records = {item_key(domain, k): v for k, v in state.marked.items()}
        records.update(current)
        popularity_started = time.perf_counter()
        pops = self._popularity(state, domain, keys, records)
        read_s = time.perf_counter() - popularity_started
        changes = round_codes(assigner, keys, pops, ts, self.settings.code_head_fraction)
        prefix = round_pending_prefix(domain, ns=self.ns)
        batch.delete_range("codes", prefix, _upper(prefix))
        state.marked.clear()
        result.changes += [(domain, change) for change in changes]
        self._dirty.add(domain)
        seconds = time.perf_counter() - started
        result.rounds.append((domain, len(keys), seconds))
        log.info(
            "code round in %s%s: %d items moved, %d code changes, %d heads of %d items, %.1f ms "
            "(reading popularity %.1f ms)",
            domain,
            "" if self.current or self.codebook is None else f" (kept {self.codebook.codebook_id})",
            len(keys),
            len(changes),
            assigner.n_head,
            len(assigner),
            seconds * 1000,
            read_s * 1000,
        )

    def _rebase(self, state: _Domain, ts: int) -> None:
        """Move the reference time by whole grid steps once values would grow too large."""
        grid = REFERENCE_GRID * self._half_life
        if (ts - state.ref_ts) / self._half_life <= REBASE_AT:
            return
        steps = int((ts - state.ref_ts) // grid)
        state.ref_ts += int(steps * grid)
        state.assigner.rescale_popularity(2.0 ** (-REFERENCE_GRID * steps))

    # -- 4. saving --------------------------------------------------------------------------

    def _flush(self, batch: WriteBatch, result: CodingResult) -> None:
        if self._drift_dirty and self.drift is not None:
            batch.put("meta", CODEBOOK_DRIFT, orjson.dumps(self.drift.to_dict()))
            report = self._report_drift(self.drift)
            with self._stats_lock:
                self._drift_report = report
            self._drift_dirty = False
        for domain in sorted(self._dirty):
            state = self.domains[domain]
            assigner = state.assigner
            keys, rows = assigner.take_rows(everything=state.resave)
            state.resave = False
            for key, row in zip(keys, rows, strict=True):
                batch.put("codes", code_row_key(domain, key, ns=self.ns), row)
            extra = {"ref_ts": state.ref_ts, "last_round": state.last_round}
            batch.put("codes", assigner_key(domain, ns=self.ns), assigner.header(extra))
            stats = assigner.stats()
            self.stats[domain] = stats
            with self._stats_lock:
                self._fresh_stats[domain] = stats
        self._dirty.clear()
        if not self.current:
            return  # an item's history is that of its codes in the current codebook
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


class KeptCodes:
    """The codes of older codebooks, each in its namespace, kept while a published version
    trained on one may be served (see the module docstring).

    Built from the namespace registry when the processor starts; :meth:`apply` runs in each
    batch after the current codebook's service, with the same new items, moves and
    counters, so every namespace holds every item and follows its popularity as the current
    one does. :meth:`versions_moved` (a publish, a rollback, a restore) has the next batch
    check which namespaces are still used and delete the others in that batch.
    """

    def __init__(
        self, store: StorePartition, settings: Settings, *, foreground: Foreground | None = None
    ) -> None:
        self.store = store
        self.services: dict[str, CodeService] = {}
        current = store.get("meta", CODEBOOK_CURRENT)
        for codebook_id, prefix in sorted(code_namespaces(store).items()):
            if current is not None and codebook_id == current.decode():
                continue
            codebook = load_codebook_by_id(store, codebook_id)
            if codebook is None:
                log.warning(
                    "the codes of codebook %s are kept but the codebook is not", codebook_id
                )
                continue
            self.services[codebook_id] = CodeService(
                store, settings, kept=(codebook, prefix), foreground=foreground
            )
        self._check_use = bool(self.services)

    def versions_moved(self) -> None:
        """Versions were published, rolled back or restored: the next batch checks which
        kept codebooks a published version still uses (safe from any thread)."""
        self._check_use = bool(self.services)

    def adopt(self, service: CodeService) -> None:
        """Keep the codes of the codebook a migration cut over from (its service, with the
        assigners it has loaded); the next batch checks whether a version uses them."""
        assert service.codebook is not None
        self.services[service.codebook.codebook_id] = service
        self._check_use = True

    def assigner(self, codebook_id: str, domain: str) -> CodeAssigner | None:
        service = self.services.get(codebook_id)
        return None if service is None else service.assigner(domain)

    def apply(
        self,
        batch: WriteBatch,
        new_items: dict[str, dict[str, bytes]],
        moves: PopularityMoves,
        before: Mapping[str, DomainCounters],
        counters: Mapping[str, DomainCounters],
    ) -> dict[str, CodingResult]:
        """1. Delete the namespaces that no published version uses any more (once versions
        moved). 2. Code the batch in every kept namespace; returns each one's result."""
        if self._check_use:
            self._check_use = False
            self._retire_unused(batch)
        return {
            codebook_id: service.apply(batch, new_items, moves, before, counters)
            for codebook_id, service in self.services.items()
        }

    def _retire_unused(self, batch: WriteBatch) -> None:
        used = codebooks_in_use(self.store)
        for codebook_id in [c for c in self.services if c not in used]:
            service = self.services.pop(codebook_id)
            retire_namespace(batch, codebook_id, service.ns)
            log.info(
                "codes of codebook %s deleted: no published version was trained on it",
                codebook_id,
            )


def retire_namespace(batch: WriteBatch, codebook_id: str, prefix: bytes) -> None:
    """Delete the codes of codebook ``codebook_id`` (its namespace ``prefix``), its entry in
    the registry and the codebook itself (the code history is the current codebook's)."""
    for start in [prefix] if prefix else UNPREFIXED_CODE_PREFIXES:
        batch.delete_range("codes", start, _upper(start))
    batch.delete("meta", code_namespace_key(codebook_id))
    batch.delete("meta", codebook_key(codebook_id.encode()))


def retrain_codebook(
    store: StorePartition,
    settings: Settings,
    vectors: np.ndarray | None = None,
    *,
    levels: int = 0,
    k: int = 0,
    seed: int = 0,
) -> tuple[ResidualCodebook, int]:
    """Train a new codebook and code every stored item with it, in one atomic batch.

    ``vectors`` defaults to the stored items' embeddings. Every item gets a new full
    path and starts again from the short code of its length policy (reason
    ``recode`` in its history); popularity is kept. The new codes go to the new codebook's
    own namespace; the old codebook's codes are kept while a published version was trained
    on it (see :class:`KeptCodes`: such a version goes on serving its items, and those that
    come later, with the old codes), and deleted in this batch otherwise. Every domain with
    a version gets a pending fine-tune request in the same batch, so the worker trains one
    on the new codes when it starts. Returns the codebook and the number of items coded.
    The caller holds the store as primary (worker stopped).
    """
    held: dict[str, dict[str, bytes]] = {}
    newest: dict[str, int] = {}
    for key, raw in store.items("items"):
        rec = ItemRecord.decode(raw)
        if rec.embedding:
            domain, item_id = split_item_key(key)
            held.setdefault(domain, {})[item_id] = rec.embedding
            newest[domain] = max(newest.get(domain, 0), rec.last_seen)
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
    old = load_codebook(store)
    service = CodeService(store, settings)  # reads the old codes (their history's "old")
    old_ns, new_ns = service.ns, namespace_prefix(codebook.codebook_id)
    batch = store.batch()
    result = CodingResult(trained=codebook.codebook_id)
    for domain in sorted(held):
        before = service.assigner(domain) if old is not None else None
        old_codes = {} if before is None else {key: before.served_code(key) for key in before.keys}
        service.codebook, service.ns = codebook, new_ns
        service.domains[domain] = service._load_fresh(domain, newest[domain])
        service._code_items(domain, held[domain], newest[domain], {}, result)
        service.domains[domain].resave = True
        service.codebook, service.ns = old, old_ns
        result.changes = [
            (d, CodeChange(c.key, old_codes.get(c.key, ()), c.new, "recode", c.ts))
            if d == domain
            else (d, c)
            for d, c in result.changes
        ]
    service.codebook, service.ns = codebook, new_ns
    _register_namespaces(store, batch, codebook)
    put_codebook(batch, codebook, store)
    service._flush(batch, result)
    for domain in domains_with_versions(store):
        put_request(batch, domain, time.time(), f"codebook {codebook.codebook_id}")
    store.write(batch)
    return codebook, sum(len(v) for v in held.values())


def _register_namespaces(
    store: StorePartition, batch: WriteBatch, codebook: ResidualCodebook
) -> None:
    """Name the new codebook's namespace in the registry, beside those of the older
    codebooks that a published version still uses; the others are deleted."""
    used = codebooks_in_use(store)
    for codebook_id, prefix in code_namespaces(store).items():
        if codebook_id in used and codebook_id != codebook.codebook_id:
            batch.put("meta", code_namespace_key(codebook_id), prefix)  # a first registry entry
        else:
            retire_namespace(batch, codebook_id, prefix)
    new = codebook.codebook_id
    batch.put("meta", code_namespace_key(new), namespace_prefix(new))
