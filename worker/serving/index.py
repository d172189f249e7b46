"""Serving: per-domain item-vector indexes of the current version, live cold-start items.

One :class:`DomainIndex` per domain holds the current version's model, every item's
vector and a faiss index over the normalized vectors (cosine), of a type chosen by rule
from the catalogue size (:class:`IndexRule`, measured in ``bench/index.py``):

* up to ``index_exact_max_items`` items, exact search (``IndexFlatIP``);
* above, an inverted file (``IndexIVFFlat``, inner product): ``nlist ~ sqrt(N)`` cells
  whose coarse quantizer is trained by spherical k-means on a bounded sample
  (``64 * nlist`` vectors, ``10`` iterations), and ``nprobe`` calibrated at each build on
  the domain's own vectors: the smallest power of two whose recall@10 against exact
  search reaches ``index_recall`` on seeded sample queries. At 1M items x 64 this builds
  in well under the 120 s budget (HNSW took 303 s); items are added to the cells live.

A build reads the vectors and adds them in chunks and checks the stop event between
chunks, so a shutdown is honoured within seconds in every phase.

How it follows the state (:class:`Serving`):

* **Versions** (publish, rollback). The index thread sleeps until it is told that some
  domains' current version may have moved (:meth:`Serving.wake` with their names: the
  daemon calls it when a fine-tune announces a publish, after a batch that applied a
  rollback, and after a restore of versions from the group's changelog); only those
  domains' pointers are read, so the cost of a notification does not grow with the
  number of domains. Every ``index_poll_s`` seconds (a slow fallback: 30 s by default)
  it reads every domain's pointer once, for moves nobody announced (an offline
  ``adacode rollback``). When the pointer moved it builds the new index off to the side,
  then swaps one reference: a reader holds the old index or the new one for its whole
  request, never a half-built one.
* **Cached versions.** The indexes a domain served last (``index_cache_versions`` of
  them besides the current one) are kept, and kept current with new items, so a rollback
  to one of them swaps at once, without a build.
* **Item vectors** (:class:`~worker.state.versions.ItemVectorizer`): the sum of the item's
  code rows, plus the text part ``t(e)`` of its frozen embedding when the version projects
  text (``text_dim > 0``; :class:`~worker.state.versions.TextMap`: the text adaptor, or
  ``W @ e`` in versions of a linear map). Items of the version's table use the rows and
  the text parts they were trained with; any other item uses its served code and ``t`` of
  its embedding read from its item record in the store.
* **Borrowed codes** (``serve_borrow_trained``, on by default). An item the version
  did not train (no training interaction) has no row of its own worth anything, so it
  is served the deepest prefix of its own full path that the codes of several trained
  items pass through (never one item's own rows: it would be that item's near-clone in
  every ranking), plus its own text part: the version's untrained items through
  :meth:`~worker.state.versions.VersionTable.served_rows`,
  items coded later through the version's :class:`~worker.state.versions.SharedPrefixes`
  (built with the index; ``O(levels)`` set lookups per new item). An item with no
  shared prefix on its path keeps its own code. Trained items are never changed.
* **New items** (cold start). After each committed batch, the consumer thread
  hands over the served codes that changed (new items included, coded in that very
  batch) with the items' full paths. An item that is not in the version's own table
  gets the vector of its (borrowed, else served) code's rows in the current version's
  table (rows the version never had, e.g. a disambiguation digit handed out later, are
  left out), plus the projection of its stored embedding, and is added to the live
  index at once (to its nearest cell for an inverted file), without a rebuild or any
  training. An item that is re-described (a new embedding or text, the same code) is
  re-vectored the same way, in place. Items of the version's table keep the rows (and
  text part) they were served with at the version until the next one.
* **Builds racing live items.** A build reads the committed code state; codes that
  change while it runs are recorded and replayed on the new index before the swap.

A domain without a published version is not served (409, saying how to get one).
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from worker.core.threads import lower_priority
from worker.ingest.coding import CodeService, CodingResult, KeptCodes
from worker.ingest.processor import BatchResult
from worker.serving.exceptions import (
    IndexBuildingError,
    NotServedError,
    UnknownDomainError,
    UnknownItemError,
)
from worker.state.exceptions import VersionError
from worker.state.layout import CODEBOOK_CURRENT
from worker.state.reads import (
    code_namespaces,
    committed_assigner,
    has_domain,
    known_domains,
    load_codebook_by_id,
    stored_embeddings,
)
from worker.state.versions import (
    ItemVectorizer,
    SharedPrefixes,
    VersionTable,
    current_version,
    domains_with_versions,
    get_record,
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

PathReader = Callable[[str, Sequence[str], str], Mapping[str, np.ndarray]]
"""(domain, item ids, codebook id) -> their full-path rows ``l * K + path[l]`` in that
codebook (unknown items left out; ``""``: the current codebook)."""


def full_path_rows(assigner: CodeAssigner, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The full-path rows ``l * K + path[l]`` (int64 ``[levels]``) of the assigner's ``keys``
    (keys it does not hold are left out)."""
    base = np.arange(assigner.levels, dtype=np.int64) * assigner.k
    return {
        key: base + np.asarray(assigner.full_path(key), dtype=np.int64)
        for key in keys
        if key in assigner
    }


def live_paths(codes: CodeService, kept: KeptCodes | None = None) -> PathReader:
    """A :data:`PathReader` over the processor's live assigners (the current codebook's and
    those ``kept`` for older versions), for :attr:`Serving.paths`: exact and ``O(levels)``
    per item; call it from the consumer thread (``on_applied``)."""

    def read(domain: str, keys: Sequence[str], codebook: str = "") -> Mapping[str, np.ndarray]:
        current = codes.codebook
        if not codebook or (current is not None and codebook == current.codebook_id):
            assigner = codes.assigner(domain)
        else:
            assigner = None if kept is None else kept.assigner(codebook, domain)
        return {} if assigner is None else full_path_rows(assigner, keys)

    return read


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# -- the index type, by rule ------------------------------------------------------------------


class IndexKind(enum.Enum):
    """The faiss index of a domain: exact search, or an inverted file of cells."""

    FLAT = "flat"
    IVF = "ivf"


@dataclass(frozen=True)
class IndexPlan:
    """What to build for a catalogue: the kind and, for an inverted file, its cell count
    and the size of the sample its coarse quantizer is trained on."""

    kind: IndexKind
    nlist: int = 0
    train_items: int = 0


@dataclass(frozen=True)
class IndexRule:
    """The index type and parameters as a function of the catalogue size (see the module
    docstring; ``bench/index.py`` measures the choice against exact search).

    ``exact_max_items``: largest catalogue searched exactly; ``recall``: the recall@10
    against exact search that an inverted file's ``nprobe`` is calibrated to reach;
    ``train_per_cell``: sample vectors per cell for the coarse quantizer (faiss's
    guideline: 30 to 256); ``queries``: sample queries of the calibration; ``chunk``: vectors
    added (or vectored) between two checks of the stop event.
    """

    exact_max_items: int = 20_000
    recall: float = 0.95
    train_per_cell: int = 64
    kmeans_iters: int = 10
    min_cells: int = 16
    queries: int = 256
    chunk: int = 65_536
    seed: int = 0

    @classmethod
    def of(cls, settings: Settings) -> IndexRule:
        return cls(exact_max_items=settings.index_exact_max_items, recall=settings.index_recall)

    def plan(self, n: int) -> IndexPlan:
        """Exact search up to ``exact_max_items``; above, an inverted file of ``~sqrt(n)``
        cells (faiss's guideline is 4 to 16 sqrt(n) for the fastest search at scale, but
        the coarse assignment of every vector costs ``n * nlist``: at 1M x 64 on two cores,
        4 sqrt(n) cells took 136 s to build, sqrt(n) 15 s, and sqrt(n) cells of ~1,000
        vectors are searched in well under a millisecond)."""
        if n <= self.exact_max_items:
            return IndexPlan(IndexKind.FLAT)
        nlist = max(self.min_cells, round(math.sqrt(n)))
        return IndexPlan(IndexKind.IVF, nlist, min(n, self.train_per_cell * nlist))


@dataclass
class SearchIndex:
    """A built faiss index over normalized vectors (ids: positions), with its plan and,
    for an inverted file, the calibrated ``nprobe`` and the recall it measured."""

    index: faiss.Index
    plan: IndexPlan
    nprobe: int = 0
    recall: float = 1.0

    @property
    def kind(self) -> IndexKind:
        return self.plan.kind

    def add(self, normalized: np.ndarray) -> None:
        self.index.add(normalized)

    def overwrite(self, i: int, normalized: np.ndarray) -> None:
        """Replace vector ``i`` (an inverted file moves it to its new nearest cell)."""
        if self.plan.kind is IndexKind.IVF:
            self.index.update_vectors(np.asarray([i], dtype=np.int64), normalized.reshape(1, -1))
            return
        flat: Any = self.index
        stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d)
        stored.reshape(flat.ntotal, flat.d)[i] = normalized

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(q, k)
        return scores, ids


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def build_search_index(
    normalized: np.ndarray,
    rule: IndexRule,
    stop: threading.Event | None = None,
) -> SearchIndex | None:
    """The index of ``normalized`` ``[n, d]`` vectors chosen by ``rule`` (``None``: stopped;
    the stop event is checked between chunks of at most ``rule.chunk`` vectors)."""
    n, d = normalized.shape
    plan = rule.plan(n)
    if plan.kind is IndexKind.FLAT:
        built = SearchIndex(faiss.IndexFlatIP(d), plan)
    else:
        trained = _trained_ivf(normalized, plan, rule, stop)
        if trained is None:
            return None
        built = SearchIndex(trained, plan)
    for start in range(0, n, rule.chunk):
        if _stopped(stop):
            return None
        built.add(normalized[start : start + rule.chunk])
    if plan.kind is IndexKind.IVF:
        calibrated = calibrate_nprobe(built.index, normalized, rule, stop)
        if calibrated is None:
            return None
        built.nprobe, built.recall = calibrated
    return built


def _trained_ivf(
    normalized: np.ndarray, plan: IndexPlan, rule: IndexRule, stop: threading.Event | None
) -> faiss.Index | None:
    """An empty inverted file whose coarse quantizer is trained by spherical k-means on a
    seeded sample of ``plan.train_items`` vectors, one iteration at a time with a check of
    the stop event between them (``None``: stopped); positions map to cells (a direct map),
    so an item's vector can be replaced in place."""
    d = normalized.shape[1]
    n = normalized.shape[0]
    rng = np.random.default_rng(rule.seed)
    sample = np.ascontiguousarray(
        normalized
        if plan.train_items >= n
        else normalized[np.sort(rng.choice(n, plan.train_items, replace=False))]
    )
    kmeans = faiss.Kmeans(d, plan.nlist, niter=1, spherical=True, seed=rule.seed)
    kmeans.train(sample)
    for _ in range(rule.kmeans_iters - 1):
        if _stopped(stop):
            return None
        kmeans.train(sample, init_centroids=kmeans.centroids)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.asarray(kmeans.centroids, dtype=np.float32))
    ivf: Any = faiss.IndexIVFFlat(quantizer, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    direct_map: Any = getattr(faiss, "DirectMap")  # noqa: B009 (missing from the stubs)
    ivf.set_direct_map_type(direct_map.Array)
    return ivf


def sample_queries(normalized: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Seeded queries like the served ones: half are item vectors (similar items), half
    the normalized midpoints of two items (a user state between items)."""
    rng = np.random.default_rng(seed)
    n = normalized.shape[0]
    own = normalized[rng.integers(n, size=count - count // 2)]
    mid = (
        normalized[rng.integers(n, size=count // 2)] + normalized[rng.integers(n, size=count // 2)]
    )
    return _normalized(np.concatenate([own, mid]))


def recall_at(found_scores: np.ndarray, exact_scores: np.ndarray) -> float:
    """Mean recall@k of approximate answers against exact ones, by score: an answer whose
    score reaches the exact k-th score counts as found (items sharing a code tie)."""
    kth = exact_scores[:, -1:]
    return float(np.mean(found_scores >= kth - 1e-5))


def calibrate_nprobe(
    ivf: Any,
    normalized: np.ndarray,
    rule: IndexRule,
    stop: threading.Event | None = None,
    k: int = 10,
) -> tuple[int, float] | None:
    """The smallest power-of-two ``nprobe`` whose recall@``k`` against exact search on
    seeded sample queries reaches ``rule.recall`` (set on ``ivf``), with that recall
    (``None``: stopped). The exact answers are computed chunk by chunk over the vectors."""
    queries = sample_queries(normalized, rule.queries, rule.seed + 1)
    k = min(k, normalized.shape[0])
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start in range(0, normalized.shape[0], rule.chunk):
        if _stopped(stop):
            return None
        block = normalized[start : start + rule.chunk]
        scores = queries @ block.T
        top = min(k, block.shape[0])
        part = -np.partition(-scores, top - 1, axis=1)[:, :top]
        best = -np.sort(-np.concatenate([best, part], axis=1), axis=1)[:, :k]
    nprobe, recall = 1, 0.0
    while True:
        ivf.nprobe = nprobe
        found, _ = ivf.search(queries, k)
        recall = recall_at(found, best)
        if recall >= rule.recall or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, ivf.nlist)


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
        rule: IndexRule | None = None,
        borrow: bool = True,
        levels: int | None = None,
        stop: threading.Event | None = None,
        foreign_codes: str | None = None,
        codebook_id: str = "",
    ) -> None:
        """``rule``: the index type by catalogue size (default :class:`IndexRule`);
        ``borrow``: serve untrained items borrowed codes (see the module docstring);
        ``levels``: the codebook's levels, needed to borrow for new items from a version
        written before borrowing (without full-path rows; ``None``: they keep their own);
        ``stop``: checked between chunks of the build; when it is set the build ends early
        and :attr:`complete` is false (the index must not be served); ``foreign_codes``:
        why the items' live codes do not fit this version (it was trained on another
        codebook than the one they are coded with now): then :meth:`upsert` adds nothing,
        since their rows would stand for another codebook's codewords, and the version
        serves its own items only (``None``: the codes fit). ``codebook_id``: the codebook
        the version was trained on, whose codes :meth:`Serving.apply_codes` brings it
        (``""``: unknown, any codes)."""
        self.domain = domain
        self.version = version
        self.foreign_codes = foreign_codes
        self.codebook_id = codebook_id
        self.rule = rule or IndexRule()
        self.vectorizer = ItemVectorizer(table.snapshot)
        self.model = self.vectorizer.model  # the version's encoder (and code table)
        self.embeddings = embeddings
        self.n_rows = self.vectorizer.n_rows
        self.cosine = table.snapshot.config.score == "cosine"
        self.lock = threading.Lock()
        self.ids: list[str] = list(table.item_ids)
        self.pos: dict[str, int] = {item: i for i, item in enumerate(self.ids)}
        self.n_version = len(self.ids)  # items 0..n_version-1 keep the version's own rows
        self.borrowable: SharedPrefixes | None = None
        if borrow and (table.full_rows is not None or levels is not None):
            self.borrowable = SharedPrefixes.of(table, levels or 0)
        self.dim = self.vectorizer.hidden
        n = len(self.ids)
        self.raw = np.zeros((n + max(16, n // 8), self.dim), dtype=np.float32)
        self.complete = False
        self.built_here = True  # false once served again from a cache (not rebuilt)
        self.searcher: SearchIndex | None = None
        if self._vectorize(table, borrow, stop):
            self.searcher = build_search_index(_normalized(self.raw[:n]), self.rule, stop)
            self.complete = self.searcher is not None

    def _vectorize(self, table: VersionTable, borrow: bool, stop: threading.Event | None) -> bool:
        """The version's item vectors into :attr:`raw`, chunk by chunk (false: stopped)."""
        rows = table.served_rows(borrow)
        text = table.text_vectors
        for start in range(0, len(self.ids), self.rule.chunk):
            if _stopped(stop):
                return False
            end = min(len(self.ids), start + self.rule.chunk)
            part = None if text is None else text[start:end]
            self.raw[start:end] = self.vectorizer.vectors(rows[start:end], part)
        return not _stopped(stop)

    @property
    def index(self) -> SearchIndex:
        if self.searcher is None:
            raise VersionError(
                f"the index of {self.domain!r} version {self.version} was stopped mid-build"
            )
        return self.searcher

    @property
    def kind(self) -> str:
        return self.index.kind.value

    @property
    def params(self) -> dict[str, Any]:
        """The index's type and parameters (for logs, ``/v1/domains`` and benchmarks)."""
        ix = self.index
        if ix.kind is IndexKind.FLAT:
            return {"kind": ix.kind.value}
        return {
            "kind": ix.kind.value,
            "nlist": ix.plan.nlist,
            "nprobe": ix.nprobe,
            "calibrated_recall": round(ix.recall, 4),
        }

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text_dim(self) -> int:
        """Width of the embeddings the version projects (0: none)."""
        return self.vectorizer.text_dim

    def vectors_of(self, rows: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Vectors ``[n, hidden]`` of padded row ids (rows beyond this version's table
        dropped), plus the text parts of ``embeddings`` ``[n, text_dim]`` when the version
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
        """The row ids an item coded after the version is served: the deepest shared prefix
        of its full path ``full_rows`` (see :class:`~worker.state.versions.SharedPrefixes`)
        when the index borrows and there is one, else its own served code ``own``."""
        if self.borrowable is None or full_rows is None:
            return own
        borrowed = self.borrowable.borrow(full_rows)
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
        ``embeddings`` reader. A version of another codebook (``foreign_codes``) adds none.
        """
        if self.foreign_codes is not None:
            return 0
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
                self.index.add(_normalized(block))  # to its nearest cell in an inverted file
                for i, (k, _) in enumerate(new):
                    self.pos[k] = n + i
                self.ids.extend(k for k, _ in new)
        return len(vectors)

    def _overwrite(self, i: int, vector: np.ndarray) -> None:
        """Replace item ``i``'s vector (a live item whose served code changed)."""
        self.raw[i] = vector
        self.index.overwrite(i, _normalized(vector.reshape(1, -1)))

    # -- reads ----------------------------------------------------------------------------

    def vector(self, item_id: str) -> np.ndarray:
        with self.lock:
            i = self.pos.get(item_id)
            if i is None:
                since = (
                    f"; {self.foreign_codes}"
                    if self.foreign_codes is not None
                    else " or since; an item is served once its item event (text or "
                    "embedding) is consumed and coded"
                )
                raise UnknownItemError(
                    f"domain {self.domain!r} has no item {item_id!r} in version "
                    f"{self.version}{since}"
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
    *,
    stop: threading.Event | None = None,
) -> DomainIndex | None:
    """The index of ``domain`` at ``version``: the version's items with their trained rows,
    plus every item coded since (from ``live``, else the committed code state); ``None``
    when ``stop`` was set during the build."""
    table = load_table(store, domain, version)
    codebook_id, ns, foreign = version_codes(store, domain, version)
    assigner = None
    if foreign is None:
        assigner = (
            live if live is not None and ns is None else committed_assigner(store, domain, ns=ns)
        )
    index = DomainIndex(
        domain,
        version,
        table,
        embeddings=lambda keys: stored_embeddings(store, domain, keys),
        rule=IndexRule.of(settings),
        borrow=settings.serve_borrow_trained,
        levels=None if assigner is None else assigner.levels,
        stop=stop,
        foreign_codes=foreign,
        codebook_id=codebook_id,
    )
    if not index.complete:
        return None
    if assigner is not None:
        later = [k for k in assigner.keys if k not in index.pos]
        index.upsert({k: assigner.row_ids(k) for k in later}, full_path_rows(assigner, later))
    return index


def version_codes(
    store: StorePartition, domain: str, version: int
) -> tuple[str, bytes | None, str | None]:
    """Which codes serve ``version``'s later items: ``(codebook id, namespace, foreign)``.
    The namespace is ``None`` for the current codebook's codes, else the prefix of the
    older codebook's codes kept for it (see :class:`~worker.ingest.coding.KeptCodes`).

    ``foreign`` says why no codes fit, else ``None``. A version is trained on the codebook
    its items were coded with (its record's ``codebook_id``); once the state's codebook is
    another (``adacode codebook train``, a migration), a code names that codebook's
    codewords and the version's rows stand for the old ones, so the version serves its own
    items only, unless the old codebook's codes are kept (they are while a published version
    uses them; a version rejected by its gate, or an old state from before they were kept,
    has none). An unknown codebook on either side counts as the same."""
    record = get_record(store, domain, version)
    codebook_id = "" if record is None else record.codebook_id
    raw = store.get("meta", CODEBOOK_CURRENT)
    current = "" if raw is None else raw.decode()
    if not codebook_id or not current or codebook_id == current:
        return codebook_id, None, None
    ns = code_namespaces(store).get(codebook_id)
    if ns is not None:
        return codebook_id, ns, None
    return (
        codebook_id,
        None,
        f"version {version} was trained on codebook {codebook_id} and the items are "
        f"now coded with codebook {current}: it serves its own items only, and "
        f"items that arrived since are served once a fine-tune on the current codebook "
        f"publishes",
    )


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


_Upsert = tuple[dict[str, np.ndarray], Mapping[str, np.ndarray], str]
"""Codes applied while an index was built: (item -> row ids, full-path rows, codebook)."""


def _fits(index: DomainIndex, codebook: str) -> bool:
    """Whether codes of ``codebook`` go to ``index`` (unknown on either side: they do)."""
    return not codebook or not index.codebook_id or index.codebook_id == codebook


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
        # per domain, the indexes it served before (least recently served first), kept
        # current with new items: a rollback to one of them swaps without a build
        self._cached: dict[str, OrderedDict[int, DomainIndex]] = {}
        self._lock = threading.Lock()  # orders live upserts against swaps
        # domain being built -> (codes, full-path rows, codebook) of the batches since its
        # build began
        self._pending: dict[str, list[_Upsert]] = {}
        self._due: set[str] = set()  # domains whose pointer may have moved (notified)
        self._scan = True  # read every domain's pointer at the next refresh (start, poll)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: dict[tuple[str, int], str] = {}
        self._current: str | None = None  # the current codebook's id, once read
        self._shapes: dict[str, tuple[int, int]] = {}  # codebook id -> (levels, k)
        self._rebuild = False  # rebuild every index at the next refresh, version or not
        self.builds = 0
        self.cache_hits = 0
        self.on_swap = on_swap
        self.paths = paths

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serving-index", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the index thread (a build in progress ends within a chunk)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self, domains: Iterable[str] | None = None) -> None:
        """Check these domains' current versions now (after a publish, a rollback or a
        restore of theirs); ``None``: every domain's."""
        with self._lock:
            if domains is None:
                self._scan = True
            else:
                self._due.update(domains)
        self._wake.set()

    def _run(self) -> None:
        """Refresh what is due, then sleep until woken or until the fallback poll is due.
        faiss builds here with ``background_threads`` OpenMP threads (a setting of this
        thread: threads start at one per core): an IVF build on every core starved the
        consumer and the API, /metrics scrapes took 50-225 ms while it ran."""
        lower_priority(self.settings.background_nice)  # before faiss starts its threads
        faiss.omp_set_num_threads(self.settings.background_threads)
        while not self._stop.is_set():
            due = self._take_due()
            try:
                self.refresh(due)
            except Exception:  # a bad version must not stop serving the others
                log.exception("refreshing the serving indexes failed")
            if not self._wake.wait(self.settings.index_poll_s):
                self._scan = True  # the slow fallback: moves nobody announced
            self._wake.clear()

    def _take_due(self) -> list[str] | None:
        """The domains to check (``None``: all), emptied for the next notifications."""
        with self._lock:
            scan, self._scan = self._scan, False
            due, self._due = self._due, set()
        return None if scan else sorted(due)

    # -- following the state --------------------------------------------------------------

    def refresh(self, domains: Iterable[str] | None = None) -> list[str]:
        """Swap in the index of each of ``domains`` (``None``: every domain with a version)
        whose current version moved: a cached one at once, else one built off to the side.

        Returns the domains swapped. Called by the index thread (and by tests).
        """
        rebuild, self._rebuild = self._rebuild, False
        if rebuild:
            domains = None
            with self._lock:
                self._cached.clear()  # their live items may be wrong too
        names = domains_with_versions(self.store) if domains is None else list(domains)
        swapped = []
        for domain in names:
            if self._stop.is_set():
                break
            if self._follow(domain, rebuild):
                swapped.append(domain)
        return swapped

    def _follow(self, domain: str, rebuild: bool) -> bool:
        """Bring ``domain``'s index to its current version; true when it was swapped."""
        version = current_version(self.store, domain)
        held = self._indexes.get(domain)
        if version is None or (not rebuild and held is not None and held.version == version):
            return False
        if (domain, version) in self._failed:
            return False
        started = time.perf_counter()
        index = None if rebuild else self._from_cache(domain, version)
        if index is None:
            index = self._build(domain, version)
            if index is None:
                return False
        old_version = self._swap(domain, index)
        release_free_memory("index")  # an evicted index and the build's buffers: back to the OS
        log.info(
            "serving %s version %d (%d items, %s) %s in %.2f s",
            domain,
            version,
            len(index),
            index.params,
            "built" if index.built_here else "from the cache",
            time.perf_counter() - started,
        )
        if self.on_swap is not None:
            self.on_swap(domain, old_version, version)
        return True

    def _from_cache(self, domain: str, version: int) -> DomainIndex | None:
        with self._lock:
            index = self._cached.get(domain, OrderedDict()).pop(version, None)
        if index is not None:
            index.built_here = False
            self.cache_hits += 1
        return index

    def _build(self, domain: str, version: int) -> DomainIndex | None:
        """Build ``domain`` at ``version`` off to the side (``None``: failed or stopped);
        the codes of batches applied meanwhile are recorded for :meth:`_swap`."""
        with self._lock:
            self._pending[domain] = []  # every earlier batch is committed: the build reads it
        try:
            index = build_index(self.store, domain, version, self.settings, stop=self._stop)
        except (VersionError, WorkerError) as exc:
            self._failed[(domain, version)] = str(exc)
            log.error("cannot serve %s version %d: %s", domain, version, exc)
            index = None
        if index is None:
            with self._lock:
                self._pending.pop(domain, None)
            return None
        index.built_here = True
        return index

    def _swap(self, domain: str, index: DomainIndex) -> int | None:
        """Make ``index`` the domain's served one (one reference) after replaying the codes
        that changed during its build; the one it replaces goes to the domain's cache.
        Returns the version served before."""
        with self._lock:
            for codes, full, codebook in self._pending.pop(domain, []):
                if _fits(index, codebook):
                    index.upsert(codes, full)
            old = self._indexes.get(domain)
            if index.built_here:
                self.builds += 1  # counted first: whoever sees the new index sees the count
            self._indexes[domain] = index  # the swap: one reference
            cache = self._cached.setdefault(domain, OrderedDict())
            cache.pop(index.version, None)
            if old is not None and old.version != index.version:
                cache[old.version] = old
            while len(cache) > self.settings.index_cache_versions:
                cache.popitem(last=False)
            if not cache:
                del self._cached[domain]
        return None if old is None else old.version

    def cached_versions(self, domain: str) -> list[int]:
        """The versions of ``domain`` whose indexes are cached (least recently served first)."""
        with self._lock:
            return list(self._cached.get(domain, ()))

    def apply_codes(
        self,
        domain: str,
        codes: dict[str, np.ndarray],
        full_rows: Mapping[str, np.ndarray] | None = None,
        *,
        codebook: str = "",
    ) -> None:
        """Serve items whose served code is new or changed (from the consumer thread), in
        the domain's index, its cached ones and (replayed at the swap) one being built;
        ``full_rows``: their full-path rows, for borrowed codes (see :meth:`DomainIndex.upsert`);
        ``codebook``: the codebook of ``codes``, which only the indexes of versions trained
        on it take (``""``: every index)."""
        if not codes:
            return
        full = full_rows or {}
        with self._lock:
            building = self._pending.get(domain)
            if building is not None:
                building.append((codes, full, codebook))
            index = self._indexes.get(domain)
            if index is not None and _fits(index, codebook):
                index.upsert(codes, full)
            for cached in self._cached.get(domain, {}).values():
                if _fits(cached, codebook):
                    cached.upsert(codes, full)

    def _full_rows(
        self, domain: str, keys: Sequence[str], codebook: str
    ) -> Mapping[str, np.ndarray]:
        """Full-path rows of ``keys`` in ``codebook`` (none when borrowing is off)."""
        if not self.settings.serve_borrow_trained:
            return {}
        if self.paths is not None:
            return self.paths(domain, keys, codebook)
        if domain not in self._indexes and current_version(self.store, domain) is None:
            return {}  # nothing is served for it: spare the read of its code state
        ns = None
        if codebook != self._current:
            ns = code_namespaces(self.store).get(codebook)
            if ns is None:
                return {}
        assigner = committed_assigner(self.store, domain, ns=ns)
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
        """The batch's codes, the current codebook's and each kept one's, to the indexes of
        the versions trained on that codebook; a wake-up for the domains rolled back."""
        if self._current is None or result.coding.trained:
            current = self.store.get("meta", CODEBOOK_CURRENT)
            self._current = None if current is None else current.decode()
        if self._current is not None:
            self._apply_coding(self._current, result.coding)
        for codebook, coding in result.kept_coding.items():
            self._apply_coding(codebook, coding)
        if result.switches:
            self.wake(str(switch["domain"]) for switch in result.switches)

    def _apply_coding(self, codebook: str, coding: CodingResult) -> None:
        """One codebook's changed codes of a batch, by domain (see :meth:`apply_codes`)."""
        changes, redescribed = coding.changes, coding.redescribed
        if not (changes or redescribed):
            return
        shape = self._shape(codebook)
        if shape is None:
            return
        levels, k = shape
        by_domain: dict[str, dict[str, np.ndarray]] = {}
        for domain, change in changes:
            by_domain.setdefault(domain, {})[change.key] = row_ids(change.new, k, levels)
        for domain, key, code in redescribed:  # same code, new embedding
            by_domain.setdefault(domain, {}).setdefault(key, row_ids(code, k, levels))
        for domain, codes in sorted(by_domain.items()):
            if not self._takes(domain, codebook):
                continue  # e.g. a migration's catch-up: no version of that codebook yet
            full = self._full_rows(domain, list(codes), codebook)
            self.apply_codes(domain, codes, full, codebook=codebook)

    def _takes(self, domain: str, codebook: str) -> bool:
        """Whether an index of ``domain`` (served, cached or being built) takes codes of
        ``codebook``."""
        with self._lock:
            if domain in self._pending:
                return True
            held = [self._indexes.get(domain), *self._cached.get(domain, {}).values()]
        return any(index is not None and _fits(index, codebook) for index in held)

    def _shape(self, codebook: str) -> tuple[int, int] | None:
        """``(levels, k)`` of ``codebook`` (read once; ``None``: not stored)."""
        shape = self._shapes.get(codebook)
        if shape is None:
            found = load_codebook_by_id(self.store, codebook)
            if found is None:
                return None
            shape = self._shapes[codebook] = (found.levels, found.k)
        return shape

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
