"""The codebook bootstrap, off the consumer thread and on a bounded sample.

Two steps, each bounded whatever the catalogue size:

1. :func:`choose_sample` (or :func:`scan_sample`, which also counts) streams the ``items``
   column family once, in chunks, and keeps the keys of the ``cap`` items with embeddings
   whose :func:`sample_rank` (an 8-byte blake2b of the key) is smallest, in a bounded heap.
   The choice depends only on the *set* of stored items: not on the order they arrived in,
   nor on the chunk size, nor on the store. Memory: ``cap`` keys, never every item. (The
   worker's own bootstrap fixes that set at the item event that fills
   ``codebook_min_items``, see ``CodeService._choose_sample``; these scans serve tools,
   benches, and a state already past the threshold without a sample.)
2. :class:`Bootstrap` reads the sample's embeddings with ``multi_get`` in chunks into one
   float32 array and trains :meth:`ResidualCodebook.train` (``seed=0``,
   ``points_per_centroid=POINTS_PER_CENTROID``) in one daemon thread, while the caller
   (the consumer) goes on; :meth:`Bootstrap.poll` hands over the codebook once it is ready.
   :meth:`Bootstrap.start_scan` does step 1 in that thread too. Given a
   :class:`~worker.core.threads.Foreground`, both steps wait between chunks while a code
   round or a scrape runs (a Python loop beside them made them convoy on the interpreter).

Measured (``python -m bench.codes --bootstrap-items 100000 1000000``, 384-d, 2 busy cores,
L=5, K=256 by rule): 100k items: sample 65,536, choose 0.8 s, read + train 95 s, peak RSS
growth 389 MiB; 1M items: choose 16.8 s, read + train 82 s, peak RSS growth 301 MiB (the
same sample size, so the same cost but the scan). Session 20, the scan in bulk, 1M items,
quiet machine: choose 1.9 s, read + train 13.4 s, peak RSS growth 391 MiB.

The cap rule is :func:`sample_cap`: ``sample_size(K) = K * 256`` rows (65,536 for the
largest ``K``), so one level's k-means takes a few seconds and the sample's array is at most
``65,536 * d * 4`` bytes (100 MB at ``d = 384``). Up to the cap every item is in the sample,
in key order, so a small catalogue gets exactly the codebook that training on every item
gives.

The same sample keys and the same stored embeddings give a bit-identical codebook (same
``codebook_id``). A stop is honoured within seconds: between chunks while scanning and
reading, and between levels while training (one level's faiss k-means cannot be
interrupted; the cap bounds it).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import logging
import operator
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import faiss
import numpy as np

from quantize.codebook import (
    MAX_K,
    POINTS_PER_CENTROID,
    ResidualCodebook,
    sample_size,
    suggest_shape,
)
from store.partition import StorePartition
from store.records import ItemRecord, hold_embeddings
from worker.core.settings import Settings
from worker.core.threads import Foreground, lower_priority
from worker.ingest.coding import CodebookSource
from worker.ingest.exceptions import BootstrapError, BootstrapStopped

log = logging.getLogger(__name__)

#: items read per chunk, while scanning and while reading the sample's embeddings
CHUNK_ITEMS = 4096
#: items a scan reads, checks and hashes per call. Each call holds the interpreter (rocksdict
#: reads the rows without letting it go), and every thread that wants it meanwhile waits:
#: 1,024 rows of 384 floats held it 1.4-4.4 ms a call, and beside a scan of 300k items the
#: p99 of a scrape (an HTTP request on the server's thread) was 70-93 ms; 256 rows (~0.5 ms)
#: 32-37 ms, the scan as fast
SCAN_ITEMS = 256


def sample_cap(settings: Settings) -> int:
    """How many items a bootstrap trains on at most: ``sample_size(K)``, ``K`` the configured
    ``code_k`` or, when the shape is left to the rule, the largest ``K`` it can pick."""
    return sample_size(settings.code_k or MAX_K, points_per_centroid=POINTS_PER_CENTROID)


def sample_rank(key: bytes) -> int:
    """An item's place in the sample order: the first 8 bytes of blake2b of its key
    (stable across processes and platforms, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def sample_ranks(keys: list[bytes]) -> np.ndarray:
    """:func:`sample_rank` of every key, as ``uint64``, hashed without a Python call per
    key (``map`` over C callables)."""
    hashes = map(functools.partial(hashlib.blake2b, digest_size=8), keys)
    digests = b"".join(map(operator.methodcaller("digest"), hashes))
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


@dataclass(frozen=True)
class SampleScan:
    """What one pass over ``items`` found."""

    keys: list[bytes]  # the sample's item keys, ascending
    n_items: int  # items with an embedding (placeholders and items without one excluded)


def scan_sample(
    store: StorePartition,
    cap: int,
    *,
    stop_event: threading.Event,
    chunk: int = SCAN_ITEMS,
    foreground: Foreground | None = None,
) -> SampleScan:
    """One streamed pass over ``items``: the sample of at most ``cap`` keys, and the count.

    Each chunk is read, checked (:func:`~store.records.hold_embeddings`) and hashed
    (:func:`sample_ranks`) in bulk; only the items that can still enter the sample (rank
    at most the worst kept one) are looked at one by one, about ``cap * (1 + ln(n / cap))``
    of ``n``; each chunk is one call that holds the interpreter about half a millisecond.
    Measured at 300k items alone: 0.54 s (1.03 s decoding every record one by one); at 1M
    items beside a thread that wants the interpreter all the time (the worst a consumer
    does): 12.8 s (57.8 s), that thread's rounds p99 4.1 ms (2.5 ms), their median unchanged
    (a migration's candidate scans on a thread beside the consumer).

    With a ``foreground``, each chunk waits while a latency-bound step runs (see
    :class:`~worker.core.threads.Foreground`). Raises :class:`BootstrapStopped` when
    ``stop_event`` is set (checked between chunks).
    """
    if cap < 1 or chunk < 1:
        raise ValueError(f"scan_sample: cap={cap}, chunk={chunk}; both must be at least 1")
    # the worst kept entry is on top: order by (rank ascending, key descending), negated
    heap: list[tuple[int, bytes]] = []
    n_items = 0
    chunks = store.scan_chunks("items", chunk)
    while True:
        if foreground is not None:
            foreground.wait_idle()
        if stop_event.is_set():
            raise BootstrapStopped("the codebook bootstrap was stopped while scanning items")
        part = next(chunks, None)
        if part is None:
            break
        keys, values = part
        held = hold_embeddings(values)
        del values
        n_items += int(held.sum())
        ranks = sample_ranks(keys)
        if len(heap) >= cap:
            held &= ranks <= np.uint64(-heap[0][0])
        for i in np.flatnonzero(held).tolist():
            entry = (-int(ranks[i]), keys[i])
            if len(heap) < cap:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
    return SampleScan(sorted(key for _, key in heap), n_items)


def choose_sample(
    store: StorePartition,
    cap: int,
    *,
    stop_event: threading.Event,
    chunk: int = SCAN_ITEMS,
) -> list[bytes]:
    """The item keys (ascending) of a deterministic sample of at most ``cap`` of the stored
    items with embeddings: those with the smallest :func:`sample_rank`."""
    return scan_sample(store, cap, stop_event=stop_event, chunk=chunk).keys


# -- resident memory ------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _RssPeak:
    """Resident-memory growth over a baseline, sampled at each step boundary."""

    def __init__(self) -> None:
        self.base = resident_bytes()
        self.peak = self.base

    def note(self) -> None:
        self.peak = max(self.peak, resident_bytes())

    @property
    def growth_mib(self) -> float:
        return max(0, self.peak - self.base) / 2**20


# -- the background job -----------------------------------------------------------------------


class BootstrapPhase(Enum):
    """Where a :class:`Bootstrap` is."""

    IDLE = "idle"  # not started
    RUNNING = "running"  # its thread reads or trains
    READY = "ready"  # trained: poll() returns the codebook
    FAILED = "failed"  # poll() raises the BootstrapError
    STOPPED = "stopped"  # the stop event ended it; no codebook


class Bootstrap:
    """Trains the first codebook on a sample in one daemon thread, while the caller goes on.

    One use: :meth:`start` once, then :meth:`poll` (non-blocking) after each batch until it
    returns the codebook. With a ``group``, the group's codebook is taken when it has one
    (asked first, from the bootstrap thread), and a trained one is offered to it
    (:meth:`CodebookSource.agree`), so :meth:`poll` hands over the group's codebook.
    """

    def __init__(
        self,
        store: StorePartition,
        settings: Settings,
        stop_event: threading.Event,
        *,
        group: CodebookSource | None = None,
        foreground: Foreground | None = None,
        chunk: int = CHUNK_ITEMS,
        points_per_centroid: int = POINTS_PER_CENTROID,
    ) -> None:
        self.store = store
        self.settings = settings
        self.stop_event = stop_event
        self.group = group
        self.foreground = foreground
        self.chunk = chunk
        self.points_per_centroid = points_per_centroid
        self._phase = BootstrapPhase.IDLE
        self._result: ResidualCodebook | None = None
        self._error: BootstrapError | None = None
        self._thread: threading.Thread | None = None
        self._agree = True  # take / offer the group's codebook (see start_scan)

    # -- the caller's side ----------------------------------------------------------------

    def start(
        self,
        sample_keys: list[bytes],
        n_items_total: int,
        *,
        vectors: np.ndarray | None = None,
    ) -> None:
        """Start the thread that trains on ``sample_keys`` (from :func:`choose_sample`);
        ``n_items_total`` (items with embeddings) picks the shape by rule. ``vectors``:
        the sample's embeddings when the caller has them (items of a batch not written yet),
        else they are read from ``store`` in the thread."""
        keys = list(sample_keys)
        self._given = vectors
        self._start(lambda: SampleScan(keys, n_items_total))

    def start_scan(self, cap: int, *, agree: bool = True) -> None:
        """Like :meth:`start`, but the thread also chooses the sample (:func:`scan_sample`
        of at most ``cap`` items) from ``store``: nothing is read on the caller's thread
        (measured: 17 s for 1M items). For a result that does not depend on timing, give
        the Bootstrap a store that no longer changes, e.g. a checkpoint taken at the batch
        that decided to bootstrap. ``agree=False``: train a codebook of its own even when
        the group has one (a migration's candidate, offered to the group by the caller)."""
        self._agree = agree
        self._start(
            lambda: scan_sample(
                self.store, cap, stop_event=self.stop_event, foreground=self.foreground
            )
        )

    def _start(self, sample: Callable[[], SampleScan]) -> None:
        if self._thread is not None:
            raise BootstrapError("Bootstrap.start: already started; make a new Bootstrap")
        self._phase = BootstrapPhase.RUNNING
        self._thread = threading.Thread(
            target=self._run, args=(sample,), name="adacode-bootstrap", daemon=True
        )
        self._thread.start()

    def poll(self) -> ResidualCodebook | None:
        """The codebook once trained, else ``None``; a failure raises its BootstrapError."""
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def phase(self) -> BootstrapPhase:
        return self._phase

    @property
    def error(self) -> BootstrapError | None:
        return self._error

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (at most ``timeout`` s); whether it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def shape(self, n_items_total: int, n_sample: int) -> tuple[int, int]:
        """``(levels, k)``: the rule's for ``n_items_total`` unless ``code_levels`` /
        ``code_k`` are set; ``k`` no more than the sample holds."""
        levels, k = suggest_shape(max(n_items_total, 1))
        levels = self.settings.code_levels or levels
        k = min(self.settings.code_k or k, n_sample)
        return levels, k

    # -- the thread -----------------------------------------------------------------------

    def _run(self, sample: Callable[[], SampleScan]) -> None:
        # k-means on every core starved the consumer and the API (OpenMP threads are set
        # per thread: this one starts at one per core); background work yields the CPU
        lower_priority(self.settings.background_nice)
        faiss.omp_set_num_threads(self.settings.background_threads)
        try:
            scan = sample()
            codebook = self._bootstrap(scan.keys, scan.n_items)
        except BootstrapStopped as exc:
            log.info("codebook bootstrap stopped: %s", exc)
            self._phase = BootstrapPhase.STOPPED
        except Exception as exc:
            if self.stop_event.is_set():
                log.info("codebook bootstrap stopped (%s)", exc)
                self._phase = BootstrapPhase.STOPPED
                return
            log.exception("codebook bootstrap failed")
            if isinstance(exc, BootstrapError):
                self._error = exc
            else:
                self._error = BootstrapError(f"the codebook bootstrap failed: {exc}")
                self._error.__cause__ = exc
            self._phase = BootstrapPhase.FAILED
        else:
            self._result = codebook
            self._phase = BootstrapPhase.READY

    def _bootstrap(self, keys: list[bytes], n_items_total: int) -> ResidualCodebook:
        """Take the group's codebook if it has one; else read the sample, train on it and
        agree with the group."""
        if self.group is not None and self._agree:
            found = self.group.current()
            if found is not None:
                log.info("codebook bootstrap: using the group's codebook %s", found.codebook_id)
                return found
        started = time.perf_counter()
        rss = _RssPeak()
        given = getattr(self, "_given", None)
        vectors = given if given is not None else self._read(keys, rss)
        levels, k = self.shape(n_items_total, len(vectors))
        log.info(
            "codebook bootstrap: training %d levels x %d codewords on a sample of %d of %d items",
            levels,
            k,
            len(vectors),
            n_items_total,
        )
        codebook = self._train(vectors, levels, k, rss)
        log.info(
            "codebook bootstrap: trained %s (%d levels x %d codewords) on a sample of %d of %d "
            "items in %.1f s, peak RSS growth %.0f MiB",
            codebook.codebook_id,
            levels,
            k,
            len(vectors),
            n_items_total,
            time.perf_counter() - started,
            rss.growth_mib,
        )
        if self.group is not None and self._agree:
            codebook = self.group.agree(codebook)
        return codebook

    def _read(self, keys: list[bytes], rss: _RssPeak) -> np.ndarray:
        """The sample's embeddings, in key order, as one float32 ``[n, d]`` array; keys that
        no longer hold an embedding are left out."""
        dim = self.settings.embedding_dim
        out = np.empty((len(keys), dim), dtype=np.float32)
        filled = 0
        for start in range(0, len(keys), self.chunk):
            if self.foreground is not None:
                self.foreground.wait_idle()
            if self.stop_event.is_set():
                raise BootstrapStopped("the codebook bootstrap was stopped while reading")
            part = keys[start : start + self.chunk]
            for key, raw in zip(part, self.store.multi_get("items", part), strict=True):
                if raw is None:
                    continue
                record = ItemRecord.decode(raw)
                if record.placeholder or not record.embedding:
                    continue
                if len(record.embedding) != 4 * dim:
                    raise BootstrapError(
                        f"item {key!r} has a {len(record.embedding) // 4}-float embedding but "
                        f"embedding_dim is {dim}; set ADACODE_EMBEDDING_DIM to the model's "
                        "dimension or rebuild the state"
                    )
                out[filled] = record.vector()
                filled += 1
            rss.note()
        return out[:filled]

    def _train(self, vectors: np.ndarray, levels: int, k: int, rss: _RssPeak) -> ResidualCodebook:
        if self.stop_event.is_set():
            raise BootstrapStopped("the codebook bootstrap was stopped before training")

        def after_level(level: int, total: int) -> None:
            rss.note()
            if self.stop_event.is_set():
                raise BootstrapStopped(
                    f"the codebook bootstrap was stopped after level {level + 1} of {total}"
                )

        return ResidualCodebook.train(
            vectors,
            levels,
            k,
            seed=0,
            points_per_centroid=self.points_per_centroid,
            after_level=after_level,
        )
