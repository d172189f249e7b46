"""One domain's fine-tune: snapshot, train, gate, publish (or record the rejection).

Runs off the consumer thread (see :mod:`worker.tuning.scheduler`), on a RocksDB
checkpoint of the state: a consistent copy at one instant, so ingestion never
stalls and the job never sees half a batch. The text encoder is never trained:
items enter the model through their residual codes and a learned map of their frozen
embedding (``text_dim = embedding_dim``; the text adaptor ``W @ gelu(A @ e + b)`` of
``finetune_text_hidden`` width, or one linear map ``W @ e`` with 0), read from the same
checkpoint; the version keeps the text parts of its items (see :mod:`worker.state.versions`).

Warm starts: from the domain's current version (incremental), else from another
domain's current version on the same codebook through :func:`quantize.train.shared_init`
(its level rows, encoder and projection; its disambiguation rows are dropped), else
from scratch. A start without the model's text map (a version trained with ``text_dim =
0``, a linear one under the adaptor, or of another width) gets ``W = 0``: the candidate
starts as that version and learns the map from there, on the whole log.

Borrowed codes (``serve_borrow_trained``): the version stores which items its training
windows used (``TrainResult.seen_items``) and every item's full-path rows, and serves an
untrained item the deepest prefix of its path that several trained items' codes share (see
:mod:`worker.state.versions`). The gate scores the candidate and the current version with
that same rule, so what is gated is what is served.

Scale: the domain is read in chunks straight into arrays (:func:`read_log`,
:func:`read_embeddings`: no per-interaction objects); training picks its loss by rule
(:mod:`quantize.train`: full softmax on small catalogues, sampled above
``finetune_full_softmax_max_items``); the gate ranks every item in bounded chunks. The stop
event is checked between read chunks, training steps, validation and gate chunks (a
shutdown abandons the run within a step), and ``finetune_max_seconds`` before every
training step: a run with no validated epoch within the budget publishes nothing.
"""

from __future__ import annotations

import enum
import logging
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantize.evaluate import holdout_split, recall_ndcg, user_histories
from quantize.remap import FittedRows, refit
from quantize.table_model import (
    ModelConfig,
    Params,
    Snapshot,
    borrow_trained_codes,
    text_param_shapes,
)
from quantize.train import (
    EpochReport,
    SoftmaxKind,
    TrainConfig,
    rank_histories,
    shared_init,
    train_domain,
)
from store.partition import StorePartition
from worker.core.memory import freeze_long_lived
from worker.core.settings import Settings
from worker.ingest.coding import codes_after_round
from worker.state.layout import MIGRATE_STATE, domain_prefix, interaction_key_ts
from worker.state.reads import (
    committed_assigner,
    load_codebook,
    stored_embeddings,
)
from worker.state.versions import (
    PUBLISHED,
    REJECTED,
    TEXT_PARAMS,
    TEXT_PROJ,
    VersionRecord,
    VersionTable,
    add_version,
    current_version,
    domains_with_versions,
    get_record,
    load_table,
    utf8_ids,
)
from worker.tuning.exceptions import Abandoned, FineTuneDataError

log = logging.getLogger(__name__)

WARM_UP_LOSSES: tuple[SoftmaxKind, ...] = ("full", "sampled")
"""The losses the start-up warm-up trains with: every one ``softmax="auto"`` can pick."""

OUTCOME_LINE = "fine-tune %s: version %d %s (%s) in %.1f s (%s)"
"""The INFO line of a fine-tune that made a version: domain, version, status (published or
rejected), the gate's reason, seconds, and where they went (benchmarks read it)."""


@dataclass
class DomainData:
    """A domain's training material, read from one consistent snapshot."""

    item_ids: list[str]
    item_rows: np.ndarray  # [n_items, width] row ids, -1 padded
    text: np.ndarray  # float16 or float32 [n_items, embedding_dim]: frozen embeddings
    n_rows: int
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    offsets: dict[str, int]
    codebook_id: str
    full_rows: np.ndarray  # int64 [n_items, levels]: full-path rows l * K + path[l]

    @property
    def watermark_ts(self) -> int:
        return int(self.timestamps.max()) if self.timestamps.size else 0

    def drop_text(self) -> None:
        """Let go of the embeddings (a new empty array of the same width, not a view that
        would keep them alive): the largest array of a run (1M items x 384 float16 = 0.77 GB),
        needed until the version's table is projected from them, not by the write after."""
        self.text = np.zeros((0, self.text.shape[1]), self.text.dtype)


@dataclass
class Candidate:
    """A trained candidate version: its model, training metrics and which items it trained
    (bool ``[n_items]``, in :class:`DomainData` order)."""

    snapshot: Snapshot
    metrics: dict[str, float]
    trained: np.ndarray


class FinetuneStatus(enum.Enum):
    """How a fine-tune ended; :attr:`retry` says whether the scheduler tries again."""

    PUBLISHED = "published"
    """A new version passed the gate and is current."""
    REJECTED = "rejected"
    """A new version failed the gate: recorded, not served."""
    SKIPPED_NO_NEW_DATA = "skipped-no-new-data"
    """No interaction newer than the current version: nothing to learn until new data."""
    SKIPPED_NOT_READY = "skipped-not-ready"
    """Not enough coded data yet (no codebook, or too few coded interactions)."""
    ABANDONED = "abandoned"
    """Stopped by a shutdown (the stop event): nothing was published."""

    @property
    def skipped(self) -> bool:
        return self in (FinetuneStatus.SKIPPED_NO_NEW_DATA, FinetuneStatus.SKIPPED_NOT_READY)

    @property
    def retry(self) -> bool:
        """Whether to run again after ``finetune_retry_s``: only when the data is not
        ready yet (new data triggers a run by itself; a stop is final)."""
        return self is FinetuneStatus.SKIPPED_NOT_READY

    @property
    def word(self) -> str:
        """What the CLI prints: ``published``, ``rejected``, ``skipped`` or ``abandoned``."""
        return "skipped" if self.skipped else self.value


@dataclass
class Holdout:
    """The gate's held-out next items: ``targets`` after ``histories`` (padded), and the
    rows of the log left to ``train`` on."""

    train: np.ndarray
    histories: np.ndarray
    targets: np.ndarray


@dataclass
class Verdict:
    """The gate's answer on a candidate: whether it ``passed``, why (``reason``, for people)
    and the version's ``metrics``."""

    passed: bool
    reason: str
    metrics: dict[str, float]


@dataclass
class Outcome:
    """What a fine-tune did; ``reason`` is for people (never parsed), ``status`` for code."""

    domain: str
    status: FinetuneStatus
    reason: str
    record: VersionRecord | None = None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


Check = Callable[[], None]
"""Called between chunks of long work; raises to stop it (e.g. :class:`Abandoned`)."""

LOG_CHUNK = 1 << 16
"""Interactions decoded at once by :func:`read_log`."""

EMBEDDING_CHUNK = 1 << 12
"""Item records read at once by :func:`read_embeddings`."""

_LOG_HEAD = 9  # a logged interaction's value: version byte, float64 weight, then user\0item


def read_domain(
    store: StorePartition,
    domain: str,
    check: Check | None = None,
    *,
    settings: Settings | None = None,
) -> DomainData | None:
    """Coded items and the interaction log of ``domain`` (None: no codes yet), read in
    chunks into arrays; ``check`` is called between chunks. With ``settings``, the codes
    are those the domain's next round leaves (:func:`~worker.ingest.coding.codes_after_round`:
    the round its moved items wait for, applied to this copy); without, as committed."""
    codebook = load_codebook(store)
    if settings is None:
        assigner = committed_assigner(store, domain)
    else:
        rounded = codes_after_round(store, domain, settings)
        assigner = None if rounded is None else rounded.assigner
        if rounded is not None and rounded.moved:
            log.info(
                "fine-tune %s reads its codes after the round %d moved items waited for "
                "(%d code changes)",
                domain,
                rounded.moved,
                len(rounded.changes),
            )
    if codebook is None or assigner is None:
        return None
    served = assigner.served()
    item_ids = list(assigner.keys)
    text = read_embeddings(store, domain, item_ids, check)
    users, items, timestamps = read_log(store, domain, item_ids, check)
    offsets = {f"{t}-{p}": o for (t, p), o in sorted(store.offsets().items())}
    levels = served.levels
    full_rows = np.arange(levels, dtype=np.int64)[None, :] * served.k + served.paths
    return DomainData(
        item_ids,
        served.row_matrix(),
        text,
        served.table_rows,
        users,
        items,
        timestamps,
        offsets,
        codebook.codebook_id,
        full_rows.astype(np.int64, copy=False),
    )


def read_log(
    store: StorePartition,
    domain: str,
    item_ids: list[str],
    check: Check | None = None,
    *,
    chunk: int = LOG_CHUNK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The domain's interaction log in time order as int64 arrays ``(users, items,
    timestamps)``: users numbered by first appearance, items as indices into ``item_ids``
    (interactions of other items, not coded yet, are left out). Keys and values are
    decoded ``chunk`` at a time with numpy; ``check`` is called between chunks."""
    catalogue = utf8_ids(item_ids)  # in chunks: one np.array of 1M ids held ~60 ms
    by_id = np.argsort(catalogue, kind="stable")
    known = catalogue[by_id]
    prefix = domain_prefix(domain)
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    keys: list[bytes] = []
    values: list[bytes] = []

    def flush() -> None:
        if check is not None:
            check()
        u, it, ts = _decode_log_chunk(domain, len(prefix), keys, values, known, by_id)
        users.append(u)
        items.append(it)
        stamps.append(ts)
        keys.clear()
        values.clear()

    for key, value in store.items("interactions", prefix=prefix):
        keys.append(key)
        values.append(value)
        if len(keys) >= chunk:
            flush()
    if keys:
        flush()
    if not users:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return _number_users(np.concatenate(users)), np.concatenate(items), np.concatenate(stamps)


def _decode_log_chunk(
    domain: str,
    prefix_len: int,
    keys: list[bytes],
    values: list[bytes],
    known: np.ndarray,
    by_id: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk of log records as arrays: user ids (bytes), item indices, timestamps
    (rows of items outside the catalogue dropped)."""
    n = len(keys)
    key_len = len(keys[0])
    raw_keys = np.frombuffer(b"".join(keys), dtype=np.uint8)
    if raw_keys.size != n * key_len:
        raise FineTuneDataError(f"domain {domain!r}: interaction keys of unequal length; " + _FIX)
    ts_bytes = raw_keys.reshape(n, key_len)[:, prefix_len : prefix_len + 8]
    ts = np.ascontiguousarray(ts_bytes).view(">i8").reshape(n).astype(np.int64)
    if ts[0] != interaction_key_ts(keys[0]) or ts[-1] != interaction_key_ts(keys[-1]):
        raise FineTuneDataError(f"domain {domain!r}: interaction keys of another layout; " + _FIX)
    body = np.array(values, dtype=bytes)
    width = body.dtype.itemsize
    raw = body.view(np.uint8).reshape(n, width)
    if width <= _LOG_HEAD or (raw[:, 0] != 1).any():
        raise FineTuneDataError(f"domain {domain!r}: unreadable interaction records; " + _FIX)
    text = raw[:, _LOG_HEAD:]
    cols = np.arange(text.shape[1])[None, :]
    sep = np.argmax(text == 0, axis=1)[:, None]
    if (text[np.arange(n), sep[:, 0]] != 0).any():
        raise FineTuneDataError(f"domain {domain!r}: interaction without an item id; " + _FIX)
    user = np.where(cols < sep, text, 0)
    shifted = np.minimum(cols + sep + 1, text.shape[1] - 1)
    item = np.where(cols + sep + 1 < text.shape[1], np.take_along_axis(text, shifted, 1), 0)
    user_ids = np.ascontiguousarray(user).view(f"S{text.shape[1]}").reshape(n)
    item_ids = np.ascontiguousarray(item).view(f"S{text.shape[1]}").reshape(n)
    at = np.minimum(np.searchsorted(known, item_ids), max(len(known) - 1, 0))
    found = known[at] == item_ids if len(known) else np.zeros(n, dtype=bool)
    return user_ids[found], by_id[at[found]].astype(np.int64), ts[found]


_FIX = "the state is corrupt or of another version: restore it from a backup"


def _number_users(user_ids: np.ndarray, chunk: int = LOG_CHUNK) -> np.ndarray:
    """User indices ``0..`` in order of first appearance, numbered through a dict a chunk at
    a time. ``np.unique`` over the byte ids did it in one call that held the interpreter up
    to ~0.4 s at 10M interactions (the HTTP thread waited that long); this loop lets other
    threads in at every switch interval, for about the same total time."""
    number: dict[bytes, int] = {}
    out = np.empty(len(user_ids), dtype=np.int64)
    for start in range(0, len(user_ids), chunk):
        part = user_ids[start : start + chunk].tolist()
        out[start : start + len(part)] = [number.setdefault(u, len(number)) for u in part]
    return out


HALF_MAX = 65504.0
"""float16's largest finite value."""
HALF_MIN_NORMAL = 2.0**-14
"""float16's smallest normal value."""


def fits_half(vectors: np.ndarray) -> bool:
    """Whether every row fits float16 with each component within ``2 ** -11`` (float16's
    precision, ~0.05 %) of the row's largest ``|component|`` ``M``: true when ``M`` is 0 or
    in ``[2 ** -14, 65504]`` (a normal component is rounded within ``2 ** -11`` of itself, a
    subnormal one within ``2 ** -25``, and nothing overflows)."""
    if not vectors.size:
        return True
    peak = np.abs(vectors).max(axis=1)
    return bool(((peak == 0) | ((peak >= HALF_MIN_NORMAL) & (peak <= HALF_MAX))).all())


def read_embeddings(
    store: StorePartition, domain: str, item_ids: list[str], check: Check | None = None
) -> np.ndarray:
    """The frozen embeddings ``[n, dim]`` of coded items, from their item records, read
    :data:`EMBEDDING_CHUNK` records at a time into one array: float16 when every one fits it
    (:func:`fits_half`; half the memory: 0.77 GB instead of 1.5 GB for 1M items of 384
    floats, the largest array of a fine-tune), else float32 (read again from the start)."""
    half = _read_embeddings(store, domain, item_ids, check, np.dtype(np.float16))
    if half is not None:
        return half
    full = _read_embeddings(store, domain, item_ids, check, np.dtype(np.float32))
    assert full is not None  # float32 holds every stored (float32) embedding
    return full


def _read_embeddings(
    store: StorePartition,
    domain: str,
    item_ids: list[str],
    check: Check | None,
    dtype: np.dtype,
) -> np.ndarray | None:
    """The embeddings as ``dtype``; ``None`` when one does not fit float16 (:func:`fits_half`)."""
    out: np.ndarray | None = None
    missing: list[str] = []
    widths: set[int] = set()
    for start in range(0, len(item_ids), EMBEDDING_CHUNK):
        if check is not None:
            check()
        chunk = item_ids[start : start + EMBEDDING_CHUNK]
        found = stored_embeddings(store, domain, chunk)
        widths.update(len(v) for v in found.values())
        missing.extend(item for item in chunk if item not in found)
        if len(widths) != 1 or missing:
            continue  # an error below; keep counting what is wrong
        if out is None:
            out = np.zeros((len(item_ids), next(iter(widths))), dtype=dtype)
        block = np.stack([found[item] for item in chunk])
        if dtype == np.float16 and not fits_half(block):
            return None
        out[start : start + len(chunk)] = block
    if missing or len(widths) > 1:
        raise FineTuneDataError(
            f"domain {domain!r}: coded items need one embedding each of one width, but "
            f"{len(missing)} have none (e.g. {missing[:3]}) and the widths are {sorted(widths)}; "
            "the state is inconsistent: restore it from a backup or rebuild it by replaying "
            "the topics"
        )
    return np.zeros((0, 0), dtype=dtype) if out is None else out


def serving_rows(
    item_rows: np.ndarray, full_rows: np.ndarray | None, trained: np.ndarray | None
) -> np.ndarray:
    """The rows a version serves items with: untrained items borrow the deepest prefix
    their trained relatives share (:func:`~quantize.table_model.borrow_trained_codes`) when
    ``full_rows`` and ``trained`` are given, else ``item_rows`` unchanged."""
    if full_rows is None or trained is None or not len(item_rows) or trained.all():
        return item_rows
    return borrow_trained_codes(item_rows, full_rows, trained)


def recall_at_10(
    snapshot: Snapshot,
    item_rows: np.ndarray,
    histories: np.ndarray,
    targets: np.ndarray,
    text: np.ndarray | None = None,
    *,
    full_rows: np.ndarray | None = None,
    trained: np.ndarray | None = None,
    check: Check | None = None,
) -> tuple[float, float]:
    """Recall@10 and NDCG@10 of a version on held-out next items (full ranking, in item
    chunks of bounded memory; ``check`` is called before each chunk).

    ``text``: the items' embeddings, used when the version projects text. ``full_rows``
    and ``trained`` (the items' full-path rows and the version's trained mask): score the
    items as served, untrained ones with borrowed codes (see :func:`serving_rows`).
    """
    if not len(targets):
        return 0.0, 0.0
    width = snapshot.params["table.rows"].shape[0]
    served = serving_rows(item_rows, full_rows, trained)
    rows = np.where(served < width, served, -1)  # rows the version never had
    model = snapshot.model()
    rank = rank_histories(
        model,
        rows,
        histories,
        targets,
        text=text if snapshot.config.text_dim else None,
        check=check,
    )
    hit, ndcg = recall_ndcg(rank, 10)
    return float(hit.mean()), float(ndcg.mean())


def trained_by(table: VersionTable, item_ids: list[str]) -> np.ndarray:
    """Which of ``item_ids`` the version ``table`` trained (bool, in ``item_ids`` order):
    items it holds and trained (all it holds for versions without a trained mask); items
    coded after it are untrained."""
    trained = {i for i, t in zip(table.item_ids, table.trained_mask(), strict=True) if t}
    return np.fromiter((i in trained for i in item_ids), dtype=bool, count=len(item_ids))


def own_rows(table: VersionTable, item_ids: list[str], borrow: bool = True) -> np.ndarray:
    """The rows the version ``table`` serves each of ``item_ids`` with (its own, in
    ``item_ids`` order; ``borrow``: see :meth:`VersionTable.served_rows`); ``-1`` rows for
    items it does not hold, which it cannot serve from rows (a version of another codebook
    than the items' codes)."""
    served = table.served_rows(borrow)
    out = np.full((len(item_ids), served.shape[1]), -1, dtype=np.int64)
    pos = {item: i for i, item in enumerate(table.item_ids)}
    for j, item in enumerate(item_ids):
        i = pos.get(item)
        if i is not None:
            out[j] = served[i]
    return out


class _Phases:
    """Wall time and the process's peak resident memory at the end of each phase of a run,
    for its log line ("reading 41.2 s to 3,012 MiB peak, training ...")."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.last = started
        self.parts: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.parts.append(f"{phase} {now - self.last:.1f} s to {peak_mib:,.0f} MiB peak")
        self.last = now

    def __str__(self) -> str:
        return ", ".join(self.parts)


class FineTuner:
    """Fine-tunes and publishes one domain at a time; thread-safe."""

    def __init__(
        self,
        store: StorePartition,
        settings: Settings,
        *,
        lock: threading.RLock | None = None,
        announce: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        """``announce``: sends a published or rejected version's event (the snapshots topic);
        ``on_outcome``: told each settled outcome (the daemon's gauges); ``stop``: abandons
        a run at its next step."""
        self.store = store
        self.settings = settings
        self.lock = lock or threading.RLock()
        self.announce = announce
        self.stop = stop or threading.Event()
        self.on_outcome = on_outcome
        self.model_config = ModelConfig(
            hidden=settings.finetune_hidden,
            encoder="transformer" if settings.finetune_encoder == "transformer" else "attention",
            text_dim=settings.embedding_dim if settings.finetune_text_projection else 0,
            text_hidden=settings.finetune_text_hidden,
        )
        self.last: dict[str, Outcome] = {}

    def warm_up(self) -> None:
        """Train a tiny model on made-up data, once per loss (one epoch; nothing kept or written).

        The first training step of a process pays torch's one-time set-up (about 2 s here,
        up to 8 s on a busy machine); done here at start-up, it no longer falls on the first
        domain's fine-tune (nor after every restart). It trains once with each loss the rule
        can pick (:data:`WARM_UP_LOSSES`): the sampled loss's sparse rows and sparse Adam load
        modules of their own, which took ~250 ms holding the interpreter when the first large
        domain's fine-tune loaded them, and every other thread (the consumer, the API) waited.
        A failure is logged and otherwise ignored: the first real run pays the set-up instead."""
        started = time.perf_counter()
        log.info("fine-tune warm-up: training a tiny model once with each loss")
        rng = np.random.default_rng(0)
        n_items, n_events = 64, 240
        rows = np.stack([rng.integers(0, 8, n_items), 8 + rng.integers(0, 8, n_items)], axis=1)
        text_dim = self.model_config.text_dim
        text = rng.normal(size=(n_items, text_dim)).astype(np.float32) if text_dim else None
        users = np.repeat(np.arange(n_events // 8), 8)
        items = rng.integers(0, n_items, n_events)
        try:
            for loss in WARM_UP_LOSSES:
                config = TrainConfig(
                    epochs=1,
                    softmax=loss,
                    negatives=16,
                    threads=self.settings.finetune_threads,
                    seed=0,
                )
                train_domain(
                    rows,
                    users,
                    items,
                    np.arange(n_events),
                    model_config=self.model_config,
                    config=config,
                    text=text,
                    check=self._stopper("warm-up", "warming up"),
                )
        except Abandoned:
            return
        except Exception as exc:  # only a warm-up: the first run pays the set-up instead
            log.warning("fine-tune warm-up failed (%s: %s); going on", type(exc).__name__, exc)
            return
        log.info("fine-tunes warmed up in %.1f s", time.perf_counter() - started)
        freeze_long_lived("the fine-tune warm-up")  # the torch modules its first step loaded

    def run(self, domain: str) -> Outcome:
        """Fine-tune ``domain`` now: snapshot -> read -> train -> gate -> publish or record.

        1. Checkpoint the state (a consistent copy) and read the domain from it
           (:meth:`_read`); too few coded interactions: skipped, retried later.
        2. Hold out the latest interaction of recent users, never trained on
           (:meth:`_hold_out`).
        3. Train from the current version (incremental), else from another domain's
           current version (shared warm start), else from scratch
           (:meth:`train_candidate`); nothing new since the current version: skipped.
        4. Gate: score candidate and current version on the holdout (:meth:`_gate`).
        5. Project the version's table (:meth:`_table`, a passed candidate only), then
           let go of the embeddings (:meth:`DomainData.drop_text`), so the write does not
           hold them beside the table and its bytes.
        6. Publish (new version, atomic pointer switch) or record the rejection
           (:meth:`_record`).
        7. Announce on the snapshots topic (:meth:`_announce`).

        A stop (shutdown) at any point before step 5 abandons the run within a training
        step or a chunk of reading or ranking: nothing is written and the outcome is
        :attr:`FinetuneStatus.ABANDONED`; so is a run whose budget (``finetune_max_seconds``,
        an incremental run ``finetune_incremental_share`` of it) ran out before any epoch
        was validated (the budget is checked before every step).
        """
        started = time.perf_counter()
        try:
            return self._fine_tune(domain, started)
        except Abandoned as exc:  # unwound from the training loop or before publishing
            elapsed = time.perf_counter() - started
            return Outcome(domain, FinetuneStatus.ABANDONED, str(exc), seconds=elapsed)

    def _fine_tune(self, domain: str, started: float) -> Outcome:
        """The steps of :meth:`run`; a stop raises :class:`Abandoned` out of step 3 or 4."""
        if self.store.get("meta", MIGRATE_STATE) is not None:
            reason = "a codebook migration is still coding the items with its new codebook"
            return self._settle(Outcome(domain, FinetuneStatus.SKIPPED_NOT_READY, reason))
        data = self._read(domain)
        if data is None or len(data.items) < self.settings.finetune_min_interactions:
            n = 0 if data is None else len(data.items)
            reason = f"{n} coded interactions (< finetune_min_interactions)"
            return self._settle(Outcome(domain, FinetuneStatus.SKIPPED_NOT_READY, reason))
        holdout = self._hold_out(data)
        parent = current_version(self.store, domain)
        init, mode, new_since = self._warm_start(domain, parent, data)
        if new_since is not None and not (data.timestamps[holdout.train] >= new_since).any():
            reason = f"no new interactions since version {parent}"
            return self._settle(Outcome(domain, FinetuneStatus.SKIPPED_NO_NEW_DATA, reason))
        phases = _Phases(started)
        phases.done("reading")
        budget = self._budget_s(new_since) - phases.elapsed()
        candidate = self.train_candidate(
            domain, data, holdout.train, init, new_since, budget_s=max(budget, 0.0)
        )
        phases.done("training")
        verdict = self._gate(domain, data, holdout, parent, candidate)
        self._check_stop(domain)
        phases.done("gate")
        table = self._table(data, candidate) if verdict.passed else None
        data.drop_text()
        record = self._record(domain, data, parent, mode, candidate, verdict, table)
        phases.done("writing")
        outcome = self._settle(
            Outcome(
                domain,
                FinetuneStatus.PUBLISHED if verdict.passed else FinetuneStatus.REJECTED,
                verdict.reason,
                record,
                phases.elapsed(),
                verdict.metrics,
            )
        )
        log.info(
            OUTCOME_LINE,
            domain,
            record.version,
            record.status,
            outcome.reason,
            outcome.seconds,
            phases,
        )
        self._announce(domain, record)
        return outcome

    def _budget_s(self, new_since: int | None) -> float:
        """The run's wall-time budget: ``finetune_max_seconds``, and for an incremental run
        (``new_since`` set) its ``finetune_incremental_share`` of it."""
        full = self.settings.finetune_max_seconds
        return full if new_since is None else full * self.settings.finetune_incremental_share

    def _read(self, domain: str) -> DomainData | None:
        """Step 1: the domain's data, read from a checkpoint of the state (None: no codes
        yet); its embeddings must have the width the model projects."""
        tmp = Path(tempfile.mkdtemp(prefix="adacode-ft-"))
        try:
            snap = self.store.checkpoint(tmp / "checkpoint")
            try:
                check = self._stopper(domain, "reading")
                data = read_domain(snap, domain, check, settings=self.settings)
            finally:
                snap.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        text_dim = self.model_config.text_dim
        if data is not None and text_dim and data.text.shape[1] not in (0, text_dim):
            raise FineTuneDataError(
                f"domain {domain!r}: stored embeddings have {data.text.shape[1]} floats but the "
                f"model projects embedding_dim={self.model_config.text_dim}; set embedding_dim "
                "to the width of the stored embeddings"
            )
        return data

    def _hold_out(self, data: DomainData) -> Holdout:
        """Step 2: the latest interaction of up to ``gate_users`` users, with the history
        before it; the other rows of the log are trained on."""
        split = holdout_split(data.users, data.timestamps, max_users=self.settings.gate_users)
        train = split.train
        histories = user_histories(
            data.users[train],
            data.items[train],
            data.timestamps[train],
            data.users[split.holdout],
            self.model_config.max_len,
        )
        return Holdout(train, histories, data.items[split.holdout])

    def _gate(
        self,
        domain: str,
        data: DomainData,
        holdout: Holdout,
        parent: int | None,
        candidate: Candidate,
    ) -> Verdict:
        """Step 4: recall@10 of the candidate and of the current version (``parent``) on the
        holdout, items scored as each serves them; the candidate passes unless it is more
        than ``gate_tolerance`` below the current version."""
        full = data.full_rows if self.settings.serve_borrow_trained else None
        cand_recall, cand_ndcg = recall_at_10(
            candidate.snapshot,
            data.item_rows,
            holdout.histories,
            holdout.targets,
            data.text,
            full_rows=full,
            trained=candidate.trained,
            check=self._stopper(domain, "gating"),
        )
        base_recall = base_ndcg = None
        if parent is not None:
            current = load_table(self.store, domain, parent)
            record = get_record(self.store, domain, parent)
            rows, base_full = data.item_rows, full
            if record is not None and record.of_another_codebook(data.codebook_id):
                # trained on another codebook: scored with the rows it serves its own
                # items with (the items' codes now name other codewords)
                rows = own_rows(current, data.item_ids, self.settings.serve_borrow_trained)
                base_full = None
            base_recall, base_ndcg = recall_at_10(
                current.snapshot,
                rows,
                holdout.histories,
                holdout.targets,
                data.text,
                full_rows=base_full,
                trained=trained_by(current, data.item_ids),
                check=self._stopper(domain, "gating"),
            )
        passed = base_recall is None or cand_recall >= base_recall - self.settings.gate_tolerance
        metrics = {
            "recall@10": cand_recall,
            "ndcg@10": cand_ndcg,
            "holdout_users": float(len(holdout.targets)),
            "train_interactions": float(len(holdout.train)),
            **candidate.metrics,
        }
        if base_recall is not None:
            metrics["current_recall@10"] = base_recall
            metrics["current_ndcg@10"] = base_ndcg or 0.0
        reason = f"recall@10 {cand_recall:.4f} vs current {base_recall if base_recall is not None else 'none'}"
        return Verdict(passed, reason, metrics)

    def _stopper(self, domain: str, phase: str) -> Check:
        """A :data:`Check` that abandons the run when a stop was requested."""

        def check() -> None:
            if self.stop.is_set():
                raise Abandoned(f"fine-tune of {domain!r} abandoned while {phase}: stopping")

        return check

    def _check_stop(self, domain: str) -> None:
        """Abandon before anything is written when a stop was requested."""
        if self.stop.is_set():
            raise Abandoned(f"fine-tune of {domain!r} abandoned before publishing: stopping")

    def _table(self, data: DomainData, candidate: Candidate) -> VersionTable:
        """Step 5: the version's table, item vectors projected from the embeddings."""
        return VersionTable.build(
            candidate.snapshot,
            data.item_ids,
            data.item_rows,
            data.text,
            trained=candidate.trained,
            full_rows=data.full_rows,
        )

    def _record(
        self,
        domain: str,
        data: DomainData,
        parent: int | None,
        mode: str,
        candidate: Candidate,
        verdict: Verdict,
        table: VersionTable | None,
    ) -> VersionRecord:
        """Step 6: write the new version in one batch under :attr:`lock`: published (its
        ``table``, the current-version pointer switched) if it passed the gate, else its
        record only, as rejected, with ``table`` None (step 5 builds none for it; see
        :func:`~worker.state.versions.add_version`). The parts of its large blobs are
        written ahead of that batch, one small write each (:meth:`_write_part`); they are
        read only once the batch lands."""
        record = VersionRecord(
            version=0,
            parent=parent,
            created_at=time.time(),
            codebook_id=data.codebook_id,
            watermark={"offsets": data.offsets, "ts": data.watermark_ts},
            metrics=verdict.metrics,
            status=PUBLISHED if verdict.passed else REJECTED,
            n_items=len(data.item_ids),
            table_bytes=candidate.snapshot.table_bytes(),
            note=mode,
        )
        with self.lock:
            batch = self.store.batch()
            record = add_version(
                self.store,
                batch,
                domain,
                record,
                table,
                keep=self.settings.versions_keep,
                write_part=self._write_part,
            )
            self.store.write(batch)
        return record

    def _write_part(self, key: bytes, value: bytes) -> None:
        """One part of a version's blob, in its own write ahead of the version's batch (see
        :func:`~worker.state.versions.put_blob`), not synced: nothing reads it before the
        version's batch, whose synced write makes it durable with it."""
        part = self.store.batch()
        part.put("versions", key, value)
        self.store.write(part, durable=False)

    def _settle(self, outcome: Outcome) -> Outcome:
        """Keep ``outcome`` as the domain's last (for /metrics): one per domain."""
        self.last[outcome.domain] = outcome
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    def _announce(self, domain: str, record: VersionRecord) -> None:
        """Step 6: the new version (published or rejected) on the snapshots topic."""
        if self.announce is not None:
            self.announce(
                {
                    "event": record.status,
                    "domain": domain,
                    "version": record.version,
                    "parent": record.parent,
                    "metrics": record.metrics,
                    "at": record.created_at,
                }
            )

    def train_candidate(
        self,
        domain: str,
        data: DomainData,
        train: np.ndarray,
        init: Snapshot | None,
        new_since: int | None,
        *,
        budget_s: float | None = None,
    ) -> Candidate:
        """Train a candidate on the ``train`` rows of the log; shared parts stay frozen
        whenever there is a model to start from (see :meth:`start_params`).

        ``budget_s`` (default ``finetune_max_seconds``) is checked before every step, the
        stop event too; either raises :class:`Abandoned` when no epoch was validated yet
        (a budget that runs out later keeps the best validated epoch)."""
        cfg = TrainConfig(
            epochs=self.settings.finetune_epochs
            if new_since is None
            else max(2, self.settings.finetune_epochs // 3),
            threads=self.settings.finetune_threads,
            trainable="all" if init is None else "domain",
            max_seconds=self.settings.finetune_max_seconds if budget_s is None else budget_s,
            epoch_steps=self.settings.finetune_epoch_steps,
            patience=2,
            seed=0,
            full_softmax_max_items=self.settings.finetune_full_softmax_max_items,
        )

        def progress(report: EpochReport) -> None:
            log.info(
                "fine-tune %s epoch %d: loss %.4f, val recall@10 %.4f (%.1f s)",
                domain,
                report.epoch,
                report.loss,
                report.val_recall,
                report.elapsed_s,
            )

        result = train_domain(
            data.item_rows,
            data.users[train],
            data.items[train],
            data.timestamps[train],
            model_config=self.model_config,
            config=cfg,
            text=data.text if self.model_config.text_dim else None,
            init_from=None if init is None else self.start_params(init),
            new_since=new_since,
            n_rows=data.n_rows,
            progress=progress,
            check=self._stopper(domain, "training"),
        )
        if not result.validated:
            raise Abandoned(
                f"fine-tune of {domain!r} over budget: no epoch validated within "
                f"{cfg.max_seconds:.0f} s (finetune_max_seconds"
                f"{'' if new_since is None else ' x finetune_incremental_share'}) after "
                f"{result.steps} steps; "
                "nothing published"
            )
        metrics = {
            "train_s": result.wall_s,
            "epochs": float(result.epochs_run),
            "val_recall@10": result.val_recall,
            "trainable_params": float(result.trainable_params),
            "steps": float(result.steps),
            "sampled_loss": float(result.loss == "sampled"),
            "out_of_time": float(result.out_of_time),
        }
        seen = result.seen_items
        if seen is None or seen.shape != (len(data.item_ids),):
            seen = np.ones(len(data.item_ids), dtype=bool)  # no mask: every item counts
        metrics["trained_items"] = float(seen.sum())
        return Candidate(Snapshot(result.config, result.params), metrics, seen.astype(bool))

    def start_params(self, init: Snapshot) -> Params:
        """``init``'s params made to fit :attr:`model_config`'s text map: kept when ``init``'s
        has the same shape (:meth:`_same_text_map`), else ``W = 0`` (the candidate starts as
        ``init``; a text adaptor's hidden layer starts as drawn); dropped when the model
        projects no text."""
        params = {k: v for k, v in init.params.items() if k not in TEXT_PARAMS}
        cfg = self.model_config
        if cfg.text_dim == 0:
            return params
        if self._same_text_map(init):
            params.update({k: init.params[k] for k in TEXT_PARAMS if k in init.params})
        else:
            width = cfg.text_hidden or cfg.text_dim
            params[TEXT_PROJ] = np.zeros((cfg.hidden, width), dtype=np.float32)
        return params

    def _same_text_map(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot``'s text map has :attr:`model_config`'s shape (a linear map or
        an adaptor of the same width)."""
        have = snapshot.params
        expected = text_param_shapes(self.model_config)
        return all(n in have and have[n].shape == shape for n, shape in expected.items())

    def _fits(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot``'s shared parts and rows can seed :attr:`model_config`."""
        mine, theirs = self.model_config, snapshot.config
        return (mine.hidden, mine.encoder, mine.layers, mine.heads, mine.combine) == (
            theirs.hidden,
            theirs.encoder,
            theirs.layers,
            theirs.heads,
            theirs.combine,
        )

    def _warm_start(
        self, domain: str, parent: int | None, data: DomainData
    ) -> tuple[Snapshot | None, str, int | None]:
        """Where a run starts: ``(init, mode, new_since)``.

        1. The domain's current version (``parent``), incrementally (the log since its
           watermark), when it has the settings' model shape and was trained on the
           codebook the items are coded with now (``data.codebook_id``); on the whole log
           when only its text map differs (a linear version under the text adaptor: the map
           starts at ``W = 0`` and has every interaction to learn from). A version of
           another codebook (a migration or ``adacode codebook train`` re-coded the items)
           seeds what does not depend on codes (encoder, text projection, level weights)
           as it is, and the rows fitted to its items' code vectors
           (:func:`mapped_rows`): its rows stand for the old codewords, the items that
           moved together into a new cell carry over what they learned; the whole log is
           trained.
        2. Else another domain's current version of the same codebook (shared parts and
           level rows: one codebook means the same codewords everywhere).
        3. Else from scratch.
        """
        if parent is not None:
            record = get_record(self.store, domain, parent)
            table = load_table(self.store, domain, parent)
            fits = self._fits(table.snapshot)
            if fits and record is not None and record.of_another_codebook(data.codebook_id):
                params = shared_init(table.snapshot.params, 0)
                fit = mapped_rows(table, data, check=self._stopper(domain, "mapping the rows"))
                params[ROWS] = fit.rows
                return (
                    replace(table.snapshot, params=params),
                    f"scratch (v{parent} was trained on codebook {record.codebook_id}; "
                    f"shared parts kept, {int(fit.fitted.sum())} of {len(fit.rows)} rows fitted "
                    f"to its items' code vectors, error {fit.error_before:.3g} -> "
                    f"{fit.error_after:.3g})",
                    None,
                )
            if fits and self.model_config.text_dim and not self._same_text_map(table.snapshot):
                return (
                    table.snapshot,
                    f"full log (v{parent}'s text map has another shape; it is learned anew)",
                    None,
                )
            if fits:
                since = None if record is None else int(record.watermark.get("ts", 0)) + 1
                return table.snapshot, "incremental", since
            log.warning(
                "fine-tune %s: version %d has another model shape than the settings; "
                "training from scratch",
                domain,
                parent,
            )
            return None, f"scratch (v{parent} has another model shape)", None
        codebook = load_codebook(self.store)
        for other in domains_with_versions(self.store):
            v = current_version(self.store, other)
            rec = None if v is None else get_record(self.store, other, v)
            if rec is None or codebook is None or rec.codebook_id != codebook.codebook_id:
                continue
            snapshot = load_table(self.store, other, rec.version).snapshot
            if not self._fits(snapshot):
                continue
            level_rows = min(codebook.levels * codebook.k, snapshot.params["table.rows"].shape[0])
            return (
                replace(snapshot, params=shared_init(snapshot.params, level_rows)),
                f"warm start from {other} v{rec.version}",
                None,
            )
        return None, "scratch", None


#: the table's rows in a snapshot's params
ROWS = "table.rows"


def mapped_rows(table: VersionTable, data: DomainData, *, check: Check | None = None) -> FittedRows:
    """Rows for ``data``'s codes (a codebook other than ``table``'s), fitted so that each
    item the version trained gets a code vector as close as it can to the one it had in the
    version (:func:`quantize.remap.refit`); rows no such item uses start fresh (seeded).
    The level weights are the version's (the warm start keeps them)."""
    params = table.snapshot.params
    trained = np.ones(len(table.item_ids), bool) if table.trained is None else table.trained
    position = {item: i for i, item in enumerate(table.item_ids)}
    pairs = np.asarray(
        [(i, position[item]) for i, item in enumerate(data.item_ids) if item in position],
        dtype=np.int64,
    ).reshape(-1, 2)
    pairs = pairs[trained[pairs[:, 1]]]
    del position
    return refit(
        params[ROWS],
        table.item_rows[pairs[:, 1]],
        data.item_rows[pairs[:, 0]],
        data.n_rows,
        params.get("table.level_weight"),
        check=check,
    )
