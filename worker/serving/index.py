"""Serving: per-domain item-vector indexes of the current version, live cold-start items.

One :class:`DomainIndex` per domain holds the current version's model, every item's
vector and a faiss index over the normalized vectors (cosine): exact
``IndexFlatIP`` below ``index_hnsw_min_items`` items, ``IndexHNSWFlat`` above.

How it follows the state (:class:`Serving`):

* **Versions** (publish, rollback). A background thread checks each domain's
  current-version pointer every ``index_poll_s`` seconds, and at once when woken
  (the daemon wakes it after a batch that applied a rollback and when a fine-tune
  announces a publish). When the pointer moved it builds the new index off to the
  side, then swaps one reference: a reader holds the old index or the new one for
  its whole request, never a half-built one.
* **Item vectors** (:class:`~worker.state.versions.ItemVectorizer`): the sum of the item's
  code rows, plus ``W @ e`` when the version projects text (``text_dim > 0``). Items
  of the version's table use the rows and the ``W @ e`` they were trained with; any
  other item uses its served code and ``W`` times its embedding read from its item
  record in the store.
* **Borrowed codes** (``serve_borrow_trained``, on by default). An item the version
  did not train (no training interaction) has no row of its own worth anything, so it
  is served the code (path prefix, no disambiguation row) of the trained item whose
  code is the deepest prefix of its own full path, plus its own text part: the
  version's untrained items through :meth:`~worker.state.versions.VersionTable.served_rows`,
  items coded later through the version's :class:`~worker.state.versions.TrainedCodes`
  (built with the index; ``O(levels)`` dict lookups per new item). An item with no
  trained code on its path keeps its own code. Trained items are never changed.
* **New items** (cold start). After each committed batch, the consumer thread
  hands over the served codes that changed (new items included, coded in that very
  batch) with the items' full paths. An item that is not in the version's own table
  gets the vector of its (borrowed, else served) code's rows in the current version's
  table (rows the version never had, e.g. a disambiguation digit handed out later, are
  left out), plus the projection of its stored embedding, and is added to the live
  index at once, without a rebuild or any training. An item that is re-described (a
  new embedding or text, the same code) is re-vectored the same way. Items of the
  version's table keep the rows (and text part) they were served with at the version
  until the next one.
* **Builds racing live items.** A build reads the committed code state; codes that
  change while it runs are recorded and replayed on the new index before the swap.

A domain without a published version is not served (409, saying how to get one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from quantize.assign import CodeAssigner, row_ids
from quantize.table_model import pad_rows
from store.partition import StorePartition
from worker.core.exceptions import WorkerError
from worker.core.memory import release_free_memory
from worker.core.settings import Settings
from worker.ingest.coding import CodeService
from worker.ingest.processor import BatchResult
from worker.serving.exceptions import (
    IndexBuildingError,
    NotServedError,
    UnknownDomainError,
    UnknownItemError,
)
from worker.state.exceptions import VersionError
from worker.state.reads import (
    committed_assigner,
    has_domain,
    known_domains,
    load_codebook,
    stored_embeddings,
)
from worker.state.versions import (
    ItemVectorizer,
    TrainedCodes,
    VersionTable,
    current_version,
    domains_with_versions,
    item_vectors,
    load_table,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbour:
    item_id: str
    score: float


EmbeddingReader = Callable[[Sequence[str]], Mapping[str, np.ndarray]]
"""Item ids -> their stored embeddings (items without one are left out)."""

PathReader = Callable[[str, Sequence[str]], Mapping[str, np.ndarray]]
"""(domain, item ids) -> their full-path rows ``l * K + path[l]`` (unknown items left out)."""


def full_path_rows(assigner: CodeAssigner, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The full-path rows ``l * K + path[l]`` (int64 ``[levels]``) of the assigner's ``keys``
    (keys it does not hold are left out)."""
    base = np.arange(assigner.levels, dtype=np.int64) * assigner.k
    return {
        key: base + np.asarray(assigner.full_path(key), dtype=np.int64)
        for key in keys
        if key in assigner
    }


def live_paths(codes: CodeService) -> PathReader:
    """A :data:`PathReader` over the processor's live assigners, for :attr:`Serving.paths`:
    exact and ``O(levels)`` per item; call it from the consumer thread (``on_applied``)."""

    def read(domain: str, keys: Sequence[str]) -> Mapping[str, np.ndarray]:
        assigner = codes.assigner(domain)
        return {} if assigner is None else full_path_rows(assigner, keys)

    return read


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class DomainIndex:
    """One domain at one version: model, item vectors and their faiss index.

    Thread-safe: :meth:`upsert` (consumer thread) and the reads (HTTP threads) take
    the index's lock; searches are short.
    """

    def __init__(
        self,
        domain: str,
        version: int,
        table: VersionTable,
        *,
        embeddings: EmbeddingReader | None = None,
        hnsw_min_items: int,
        ef_search: int,
        borrow: bool = True,
        levels: int | None = None,
    ) -> None:
        """``borrow``: serve untrained items borrowed codes (see the module docstring);
        ``levels``: the codebook's levels, needed to borrow for new items from a version
        written before borrowing (without full-path rows; ``None``: they keep their own)."""
        self.domain = domain
        self.version = version
        self.vectorizer = ItemVectorizer(table.snapshot)
        self.model = self.vectorizer.model  # the version's encoder (and code table)
        self.embeddings = embeddings
        self.n_rows = self.vectorizer.n_rows
        self.cosine = table.snapshot.config.score == "cosine"
        self.lock = threading.Lock()
        self.ids: list[str] = list(table.item_ids)
        self.pos: dict[str, int] = {item: i for i, item in enumerate(self.ids)}
        self.n_version = len(self.ids)  # items 0..n_version-1 keep the version's own rows
        self.trained_codes: TrainedCodes | None = None
        if borrow and (table.full_rows is not None or levels is not None):
            self.trained_codes = TrainedCodes.of(table, levels or 0)
        raw = self.vectorizer.vectors(table.served_rows(borrow), table.text_vectors)
        self.dim = raw.shape[1]
        self.raw = np.zeros((max(16, 2 * len(self.ids)), self.dim), dtype=np.float32)
        self.raw[: len(self.ids)] = raw
        self.hnsw = len(self.ids) >= hnsw_min_items
        if self.hnsw:
            hnsw = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = 80
            hnsw.hnsw.efSearch = ef_search
            self.index: faiss.Index = hnsw
        else:
            self.index = faiss.IndexFlatIP(self.dim)
        if len(self.ids):
            self.index.add(_normalized(raw))

    @property
    def kind(self) -> str:
        return "hnsw" if self.hnsw else "flat"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text_dim(self) -> int:
        """Width of the embeddings the version projects (0: none)."""
        return self.vectorizer.text_dim

    def vectors_of(self, rows: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Vectors ``[n, hidden]`` of padded row ids (rows beyond this version's table
        dropped), plus ``W @ e`` of ``embeddings`` ``[n, text_dim]`` when the version
        projects text (then they are required)."""
        if self.text_dim == 0:
            return self.vectorizer.code_part(rows)
        if embeddings is None:
            raise VersionError(
                f"version {self.version} of {self.domain!r} projects text embeddings "
                f"(text_dim={self.text_dim}); pass the items' embeddings"
            )
        return self.vectorizer.vectors(rows, self.vectorizer.text_part(embeddings))

    def live_rows(self, own: np.ndarray, full_rows: np.ndarray | None) -> np.ndarray:
        """The row ids an item coded after the version is served: the deepest trained code
        on its full path ``full_rows`` when the index borrows and there is one, else its own
        served code ``own``."""
        if self.trained_codes is None or full_rows is None:
            return own
        borrowed = self.trained_codes.borrow(full_rows)
        return own if borrowed is None else np.asarray(borrowed, dtype=np.int64)

    def _live_vectors(
        self, codes: Mapping[str, np.ndarray], keys: list[str]
    ) -> dict[str, np.ndarray]:
        """Vectors of ``keys`` (not in the version's table) from their served codes and, for
        text-projecting versions, their stored embeddings; items without a usable
        embedding are left out (logged): they are served once they are described."""
        if self.text_dim == 0:
            vectors = self.vectors_of(pad_rows([codes[k].tolist() for k in keys]))
            return dict(zip(keys, vectors, strict=True))
        found = {} if self.embeddings is None else self.embeddings(keys)
        usable = [k for k in keys if k in found and found[k].shape == (self.text_dim,)]
        if len(usable) < len(keys):
            missing = [k for k in keys if k not in usable]
            log.warning(
                "%d coded item(s) of %s have no %d-float embedding in the store, so version "
                "%d cannot vector them (not served until described): %s",
                len(missing),
                self.domain,
                self.text_dim,
                self.version,
                missing[:5],
            )
        if not usable:
            return {}
        vectors = self.vectors_of(
            pad_rows([codes[k].tolist() for k in usable]), np.stack([found[k] for k in usable])
        )
        return dict(zip(usable, vectors, strict=True))

    # -- writes ---------------------------------------------------------------------------

    def upsert(
        self,
        codes: Mapping[str, np.ndarray],
        full_rows: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Add (or re-vector) items that are not in the version's table; returns how many.

        ``codes``: item id -> row ids of its current served code; ``full_rows``: item id ->
        its full-path rows (items left out keep their own code, see :meth:`live_rows`).
        Versions that project text read the items' embeddings with the index's
        ``embeddings`` reader.
        """
        keys = [k for k in codes if self.pos.get(k, self.n_version) >= self.n_version]
        if not keys:
            return 0
        paths = full_rows or {}
        served = {k: self.live_rows(codes[k], paths.get(k)) for k in keys}
        vectors = self._live_vectors(served, keys)
        if not vectors:
            return 0
        with self.lock:
            new = [(k, v) for k, v in vectors.items() if k not in self.pos]
            for k, v in vectors.items():
                if k in self.pos:
                    self._overwrite(self.pos[k], v)
            if new:
                n = len(self.ids)
                need = n + len(new)
                if need > self.raw.shape[0]:
                    grown = np.zeros((max(need, 2 * self.raw.shape[0]), self.dim), np.float32)
                    grown[:n] = self.raw[:n]
                    self.raw = grown
                block = np.stack([v for _, v in new])
                self.raw[n:need] = block
                self.index.add(_normalized(block))
                for i, (k, _) in enumerate(new):
                    self.pos[k] = n + i
                self.ids.extend(k for k, _ in new)
        return len(vectors)

    def _overwrite(self, i: int, vector: np.ndarray) -> None:
        """Replace item ``i``'s vector (a live item whose served code changed)."""
        self.raw[i] = vector
        flat: Any = self.index
        if self.hnsw:
            flat = faiss.downcast_index(flat.storage)
        stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * self.dim)
        stored.reshape(flat.ntotal, self.dim)[i] = _normalized(vector)
        # HNSW keeps the item's old graph links until the next build (approximate anyway)

    # -- reads ----------------------------------------------------------------------------

    def vector(self, item_id: str) -> np.ndarray:
        with self.lock:
            i = self.pos.get(item_id)
            if i is None:
                raise UnknownItemError(
                    f"domain {self.domain!r} has no item {item_id!r} in version {self.version} "
                    f"or since; an item is served once its item event (text or embedding) is "
                    f"consumed and coded"
                )
            return self.raw[i].copy()

    def search(self, query: np.ndarray, k: int, exclude: set[str]) -> list[Neighbour]:
        """The ``k`` items closest to ``query`` ``[hidden]`` (cosine), without ``exclude``."""
        q = _normalized(query.reshape(1, -1))
        with self.lock:
            n = len(self.ids)
            want = min(n, k + len(exclude))
            if want <= 0:
                return []
            if self.cosine:
                scores, idx = self.index.search(q, want)
                found = list(zip(idx[0].tolist(), scores[0].tolist(), strict=True))
            else:  # dot-product models rank by the raw vectors: a matrix product
                all_scores = self.raw[:n] @ query.astype(np.float32)
                top = np.argpartition(-all_scores, want - 1)[:want]
                top = top[np.argsort(-all_scores[top])]
                found = [(int(i), float(all_scores[i])) for i in top]
            ids = self.ids
        out = []
        for i, score in found:
            if i < 0 or ids[i] in exclude:
                continue
            out.append(Neighbour(ids[i], float(score)))
            if len(out) == k:
                break
        return out

    def similar(self, item_id: str, k: int) -> list[Neighbour]:
        return self.search(self.vector(item_id), k, {item_id})

    def user_vector(self, history: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """The sequence encoder's state after ``history`` (known items only, the most recent
        ``max_len``); returns it and the items that were not known."""
        with self.lock:
            known = [self.pos[h] for h in history if h in self.pos]
            unknown = [h for h in history if h not in self.pos]
            known = known[-self.model.config.max_len :]
            vecs = self.raw[known].copy() if known else None
        if vecs is None:
            raise UnknownItemError(
                f"none of the {len(history)} history items is known in domain "
                f"{self.domain!r} (version {self.version}): {list(history)[:5]}"
            )
        with torch.no_grad():
            seq = torch.arange(len(known), dtype=torch.int64).view(1, -1)
            state = self.model.encode(seq, torch.as_tensor(vecs))[0, -1]
        return state.numpy().astype(np.float32), unknown

    def recommend(
        self, history: Sequence[str], k: int, exclude_history: bool
    ) -> tuple[list[Neighbour], list[str]]:
        state, unknown = self.user_vector(history)
        return self.search(state, k, set(history) if exclude_history else set()), unknown


def build_index(
    store: StorePartition,
    domain: str,
    version: int,
    settings: Settings,
    live: CodeAssigner | None = None,
) -> DomainIndex:
    """The index of ``domain`` at ``version``: the version's items with their trained rows,
    plus every item coded since (from ``live``, else the committed code state)."""
    table = load_table(store, domain, version)
    assigner = live if live is not None else committed_assigner(store, domain)
    index = DomainIndex(
        domain,
        version,
        table,
        embeddings=lambda keys: stored_embeddings(store, domain, keys),
        hnsw_min_items=settings.index_hnsw_min_items,
        ef_search=settings.index_hnsw_ef_search,
        borrow=settings.serve_borrow_trained,
        levels=None if assigner is None else assigner.levels,
    )
    if assigner is not None:
        later = [k for k in assigner.keys if k not in index.pos]
        index.upsert({k: assigner.row_ids(k) for k in later}, full_path_rows(assigner, later))
    return index


def version_vector(
    store: StorePartition, domain: str, version: int, item_id: str, *, borrow: bool = True
) -> np.ndarray:
    """An item's served vector in an older (or any stored) version: only that version's own
    items (``borrow``: see :meth:`~worker.state.versions.VersionTable.served_rows`)."""
    table = load_table(store, domain, version)
    try:
        i = table.item_ids.index(item_id)
    except ValueError as exc:
        raise UnknownItemError(
            f"item {item_id!r} is not in version {version} of {domain!r} (it arrived later or "
            f"is unknown); leave out ?version= to read the current version"
        ) from exc
    return item_vectors(table, np.asarray([i]), borrow=borrow)[0]


class Serving:
    """Every domain's current :class:`DomainIndex`, kept in step with versions and new items."""

    def __init__(
        self,
        store: StorePartition,
        settings: Settings,
        *,
        paths: PathReader | None = None,
        on_swap: Callable[[str, int | None, int], None] | None = None,
    ) -> None:
        """``paths``: full paths of items whose codes a batch changed (the daemon passes
        :func:`live_paths` of its processor's code service); ``None``: read from the
        committed code state, exact but ``O(items of the domain)`` per batch.
        ``on_swap``: called with ``(domain, old version, new version)`` after each swap.
        """
        self.store = store
        self.settings = settings
        self._indexes: dict[str, DomainIndex] = {}
        self._lock = threading.Lock()  # orders live upserts against swaps
        # (domain, codes, full-path rows) since the poll began
        self._pending: list[tuple[str, dict[str, np.ndarray], Mapping[str, np.ndarray]]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: dict[tuple[str, int], str] = {}
        self._shape: tuple[int, int] | None = None  # (levels, k) of the codebook
        self._rebuild = False  # rebuild every index at the next refresh, version or not
        self.builds = 0
        self.on_swap = on_swap
        self.paths = paths

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serving-index", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self, _event: object = None) -> None:
        """Check the version pointers now (after a publish or a rollback)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # a bad version must not stop serving the others
                log.exception("refreshing the serving indexes failed")
            self._wake.wait(self.settings.index_poll_s)
            self._wake.clear()

    # -- following the state --------------------------------------------------------------

    def refresh(self) -> list[str]:
        """Build and swap in the index of every domain whose current version moved.

        Returns the domains swapped. Called by the index thread (and by tests).
        """
        with self._lock:
            self._pending.clear()  # every earlier batch is committed: a build reads it
        rebuild, self._rebuild = self._rebuild, False
        swapped = []
        for domain in domains_with_versions(self.store):
            version = current_version(self.store, domain)
            held = self._indexes.get(domain)
            if version is None or (not rebuild and held is not None and held.version == version):
                continue
            if (domain, version) in self._failed:
                continue
            started = time.perf_counter()
            try:
                index = build_index(self.store, domain, version, self.settings)
            except (VersionError, WorkerError) as exc:
                self._failed[(domain, version)] = str(exc)
                log.error("cannot serve %s version %d: %s", domain, version, exc)
                continue
            with self._lock:
                for d, codes, full in self._pending:
                    if d == domain:
                        index.upsert(codes, full)
                old = self._indexes.get(domain)
                self.builds += 1  # counted first: whoever sees the new index sees the count
                self._indexes[domain] = index  # the swap: one reference
            old_version = None if old is None else old.version
            old = None  # the previous version's index and the build's buffers: back to the OS
            release_free_memory()
            swapped.append(domain)
            log.info(
                "serving %s version %d (%d items, %s index) built in %.2f s",
                domain,
                version,
                len(index),
                index.kind,
                time.perf_counter() - started,
            )
            if self.on_swap is not None:
                self.on_swap(domain, old_version, version)
        return swapped

    def apply_codes(
        self,
        domain: str,
        codes: dict[str, np.ndarray],
        full_rows: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Serve items whose served code is new or changed (from the consumer thread);
        ``full_rows``: their full-path rows, for borrowed codes (see :meth:`DomainIndex.upsert`)."""
        if not codes:
            return
        full = full_rows or {}
        with self._lock:
            self._pending.append((domain, codes, full))
            index = self._indexes.get(domain)
            if index is not None:
                index.upsert(codes, full)

    def _full_rows(self, domain: str, keys: Sequence[str]) -> Mapping[str, np.ndarray]:
        """Full-path rows of ``keys`` (none when borrowing is off)."""
        if not self.settings.serve_borrow_trained:
            return {}
        if self.paths is not None:
            return self.paths(domain, keys)
        if domain not in self._indexes and current_version(self.store, domain) is None:
            return {}  # nothing is served for it: spare the read of its code state
        assigner = committed_assigner(self.store, domain)
        return {} if assigner is None else full_path_rows(assigner, keys)

    def on_applied(self, result: BatchResult) -> None:
        """The consumer loop's hook: live codes of the batch, and a wake-up on rollbacks.

        Never raises: a serving failure is logged and must not stop ingestion.
        """
        try:
            self._apply_result(result)
        except Exception:
            log.exception("serving could not take a batch's new codes: rebuilding the indexes")
            self._rebuild = True
            self.wake()

    def _apply_result(self, result: BatchResult) -> None:
        changes = result.coding.changes
        redescribed = result.coding.redescribed
        if changes or redescribed:
            if self._shape is None or result.coding.trained:
                codebook = load_codebook(self.store)
                self._shape = None if codebook is None else (codebook.levels, codebook.k)
            if self._shape is not None:
                levels, k = self._shape
                by_domain: dict[str, dict[str, np.ndarray]] = {}
                for domain, change in changes:
                    by_domain.setdefault(domain, {})[change.key] = row_ids(change.new, k, levels)
                for domain, key, code in redescribed:  # same code, new embedding
                    by_domain.setdefault(domain, {}).setdefault(key, row_ids(code, k, levels))
                for domain, codes in sorted(by_domain.items()):
                    self.apply_codes(domain, codes, self._full_rows(domain, list(codes)))
        if result.switches:
            self.wake()

    # -- reads ----------------------------------------------------------------------------

    def domains(self) -> dict[str, DomainIndex]:
        return dict(self._indexes)

    def index(self, domain: str) -> DomainIndex:
        """The domain's current index, or an error saying why there is none."""
        found = self._indexes.get(domain)
        if found is not None:
            return found
        self.require_domain(domain)
        version = current_version(self.store, domain)
        if version is None:
            raise NotServedError(
                f"domain {domain!r} has no published version yet, so nothing is served for "
                f"it; a version is fine-tuned after finetune_min_interactions="
                f"{self.settings.finetune_min_interactions} coded interactions (or run: "
                f"adacode finetune --domain {domain})"
            )
        failed = self._failed.get((domain, version))
        if failed is not None:
            raise NotServedError(f"version {version} of {domain!r} cannot be served: {failed}")
        raise IndexBuildingError(
            f"the index of {domain!r} version {version} is being built; retry in a second"
        )

    def require_domain(self, domain: str) -> None:
        """Raise :class:`UnknownDomainError` unless an event of ``domain`` was consumed."""
        if domain in self._indexes or has_domain(self.store, domain):
            return
        known = known_domains(self.store)
        raise UnknownDomainError(
            f"unknown domain {domain!r}: no event of it was consumed; known domains: "
            f"{known[:20] or 'none'}"
        )
