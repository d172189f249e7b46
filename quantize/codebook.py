"""Residual codebooks: train, encode to full-depth paths, decode, (de)serialize.

A :class:`ResidualCodebook` holds ``L`` levels of ``K`` centroids in ``d`` dimensions
(``centroids`` float32 ``[L, K, d]``). An item's *full path* is ``L`` codeword indices:
level 0 quantizes the embedding, level ``i`` quantizes what levels ``< i`` left over. A
prefix of the path of length ``l`` reconstructs the embedding as the sum of its ``l``
centroids, which is what makes variable-length (prefix) codes meaningful.

Two trainers:

* ``"rkmeans"`` (default): plain residual k-means, one ``faiss.Kmeans`` per level on the
  residuals of the previous levels, greedy encoding (nearest centroid per level).
* ``"rq_beam"``: ``faiss.ResidualQuantizer`` trained with beam search, encoded with the
  same beam (``beam_size``) at serving time. ``K`` must be a power of two.

Why ``rkmeans`` is the default (measured by ``bench/codes.py`` on both datasets, MiniLM
embeddings, at the rule's shapes L=6/K=16 and L=8/K=8): greedy residual k-means has the
lower reconstruction error at *every* prefix length (e.g. office after 1 level 0.527 vs
0.574, after 6 levels 0.350 vs 0.369), trains >10x faster and encodes >25x faster
(one faiss thread: ~300k vs ~12k items/s, below the 20k items/s target). Beam
paths are also not prefix-stable: beam search picks a level-0 codeword other than the
nearest one for 20-50 % of items, because a deeper combination fits better, and the beam
codebook's error can even *rise* from one prefix length to the next. Adaptive-length
codes serve prefixes, so greedy prefixes (each the best at its depth given the previous
ones) are the right fit; ``rq_beam`` stays available for fixed full-depth codes.

Training on a bounded sample: k-means needs a few hundred points per centroid, not the
whole catalogue. ``train(..., points_per_centroid=P)`` trains every level on the same
:func:`sample_rows` of ``sample_size(K, P) = K * P`` rows (drawn with the seed; all rows when
there are no more), and faiss's own ``max_points_per_centroid`` is ``P`` too, so one level's
k-means costs ``O(K * P * K * d * niter)`` whatever the catalogue size. ``P = 256``
(:data:`POINTS_PER_CENTROID`, faiss's default) is the rule: measured by ``python -m
bench.codes --sample-items 100000`` (clustered 384-d items, the rule's L=5, K=256, scored on
every item), the sample-trained codebook's full-depth relative MSE is 1.014x full
training's (0.1749 vs 0.1725; 1.000x after one level), the share of items sharing their
full path 0.706 vs 0.702, at 0.42x the training time (65,536 of 100k rows; at 1M items
the same 65,536 rows); ``P = 64`` gives 1.065x. ``points_per_centroid=None`` trains on
every row (faiss's cap raised to ``ceil(n / K)``), the behaviour before the cap.

``n < K`` at training is an error (:class:`CodebookError`) rather than a silent shrink:
``K`` fixes the embedding-table layout (rows ``level * K + code``), so it must not depend
on which items happened to be present at training time. :func:`suggest_shape` gives the
rule that callers use to pick ``(L, K)`` from the item count.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import faiss
import numpy as np

from quantize.exceptions import CodebookError

Method = Literal["rkmeans", "rq_beam"]
METHODS: tuple[str, ...] = ("rkmeans", "rq_beam")
FORMAT_VERSION = 1
DEFAULT_BATCH_SIZE = 2048
DEFAULT_BEAM_SIZE = 8
MAX_K = 256
MIN_K = 8
DEFAULT_CODE_BUDGET = 0.05
#: training points per centroid of a sample-trained codebook (faiss's own default cap)
POINTS_PER_CENTROID = 256

#: called after each trained level with ``(level, levels)``; raising from it stops training
LevelCallback = Callable[[int, int], None]


def levels_for(n_items: int, k: int) -> int:
    """Levels by the birthday bound: the fewest ``L >= 2`` with ``k ** L >= n_items ** 2``.

    ``n`` uniformly spread paths are likely collision-free only when there are about
    ``n**2`` possible paths; real paths are clustered, so this is a floor, not a promise
    (head collisions left at full depth get disambiguation digits).
    """
    if n_items < 1 or k < 2:
        raise CodebookError(f"levels_for: n_items={n_items}, k={k}; use n_items >= 1, k >= 2")
    return max(2, math.ceil(2.0 * math.log(max(n_items, 2)) / math.log(k) - 1e-9))


def suggest_k(n_items: int, levels: int, *, code_budget: float = DEFAULT_CODE_BUDGET) -> int:
    """The largest power of two ``K <= 256`` with ``levels * K <= code_budget * n_items``.

    Clipped below at ``MIN_K`` and above at ``n_items`` (training needs ``n >= K``).
    """
    if n_items < 1 or levels < 1:
        raise CodebookError(
            f"suggest_k: n_items={n_items}, levels={levels}; both must be at least 1"
        )
    k = MAX_K
    while k > MIN_K and levels * k > code_budget * n_items:
        k //= 2
    return _clip_k(k, n_items)


def _clip_k(k: int, n_items: int) -> int:
    while k > 2 and k > n_items:
        k //= 2
    return k


def suggest_shape(n_items: int, *, code_budget: float = DEFAULT_CODE_BUDGET) -> tuple[int, int]:
    """Default ``(levels, k)`` for a domain of ``n_items`` items, by rule.

    The code table has ``L * K`` level rows plus one row per disambiguation digit; a
    per-item ID table has ``n`` rows. The rule spends at most ``code_budget`` (5 %) of
    ``n`` on level rows, leaving as much again for disambiguation rows within a 10 %
    target: it takes the largest power of two ``K <= 256`` (one byte per digit) whose
    birthday-bound depth ``L = levels_for(n, K)`` fits ``L * K <= code_budget * n``.
    Smaller ``K`` with more levels is preferred over the reverse only when the budget
    forces it, because deep levels of a small codebook quantize little. When even
    ``MIN_K`` does not fit (tiny domains), ``(levels_for(n, MIN_K), MIN_K)`` is returned.
    """
    if n_items < 1:
        raise CodebookError(f"suggest_shape: n_items={n_items}; it must be at least 1")
    k = MAX_K
    while k > MIN_K:
        if levels_for(n_items, k) * k <= code_budget * n_items:
            break
        k //= 2
    k = _clip_k(k, n_items)
    return levels_for(n_items, max(k, 2)), k


def sample_size(k: int, *, points_per_centroid: int = POINTS_PER_CENTROID) -> int:
    """Rows a codebook of ``k`` codewords per level trains on: ``k * points_per_centroid``.

    The same for every level (each level trains on the sample's residuals), so it does not
    depend on the depth; with ``k <= MAX_K`` and the default it is at most 65,536 rows.
    """
    if k < 1 or points_per_centroid < 1:
        raise CodebookError(
            f"sample_size: k={k}, points_per_centroid={points_per_centroid}; both must be >= 1"
        )
    return k * points_per_centroid


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Indices (ascending int64) of ``min(n, size)`` of ``n`` rows, drawn without replacement.

    Every row when ``n <= size``; otherwise a uniform draw fixed by ``seed``, so the same
    input and seed always give the same sample.
    """
    if n < 0 or size < 1:
        raise CodebookError(f"sample_rows: n={n}, size={size}; use n >= 0 and size >= 1")
    if n <= size:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False).astype(np.int64))


def _as_matrix(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise CodebookError(
            f"{what}: expected a 2-D array [n, d] of embeddings, got shape {arr.shape}; "
            "reshape the input to one row per item"
        )
    if dim is not None and arr.shape[1] != dim:
        raise CodebookError(
            f"{what}: embeddings have {arr.shape[1]} dimensions but the codebook has {dim}; "
            "encode with the same embedding model the codebook was trained on"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise CodebookError(f"{what}: embeddings hold NaN or inf; clean the input first")
    return arr


def _greedy_level(residual: np.ndarray, index: faiss.IndexFlatL2) -> np.ndarray:
    _, ids = index.search(residual, 1)
    return ids[:, 0].astype(np.int32)


@dataclass(frozen=True, eq=False)
class ResidualCodebook:
    """``L`` levels of ``K`` centroids; immutable, identified by :attr:`codebook_id`.

    ``beam_size`` is the encoding beam: 1 = greedy (``rkmeans``), > 1 = beam search
    (``rq_beam``). It is part of the identity because it changes the paths.
    """

    centroids: np.ndarray
    method: str = "rkmeans"
    beam_size: int = 1
    _indexes: list[faiss.IndexFlatL2] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        c = np.asarray(self.centroids)
        if c.ndim != 3 or 0 in c.shape:
            raise CodebookError(
                f"ResidualCodebook: centroids must be a non-empty [L, K, d] array, got shape "
                f"{c.shape}; build it with ResidualCodebook.train"
            )
        if not np.isfinite(c).all():
            raise CodebookError("ResidualCodebook: centroids hold NaN or inf; retrain")
        if self.method not in METHODS:
            raise CodebookError(
                f"ResidualCodebook: unknown method {self.method!r}; use one of {METHODS}"
            )
        if self.beam_size < 1:
            raise CodebookError(
                f"ResidualCodebook: beam_size={self.beam_size}; it must be at least 1"
            )
        c = np.array(c, dtype=np.float32, order="C", copy=True)
        c.setflags(write=False)
        object.__setattr__(self, "centroids", c)
        object.__setattr__(self, "_indexes", None)

    # -- identity -----------------------------------------------------------------------

    @property
    def levels(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def k(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[2])

    @property
    def codebook_id(self) -> str:
        """Short stable content hash (16 hex digits) of shape, centroids and encoding."""
        h = hashlib.sha256()
        h.update(
            f"v{FORMAT_VERSION}|{self.centroids.shape}|{self.method}|{self.beam_size}|".encode()
        )
        h.update(self.centroids.tobytes())
        return h.hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResidualCodebook):
            return NotImplemented
        return self.codebook_id == other.codebook_id

    def __hash__(self) -> int:
        return hash(self.codebook_id)

    def __repr__(self) -> str:
        return (
            f"ResidualCodebook(levels={self.levels}, k={self.k}, dim={self.dim}, "
            f"method={self.method!r}, beam_size={self.beam_size}, id={self.codebook_id})"
        )

    # -- training -----------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        x: np.ndarray,
        levels: int,
        k: int = 256,
        *,
        seed: int = 0,
        method: Method = "rkmeans",
        niter: int = 20,
        beam_size: int = DEFAULT_BEAM_SIZE,
        points_per_centroid: int | None = None,
        after_level: LevelCallback | None = None,
    ) -> ResidualCodebook:
        """Train ``levels`` levels of ``k`` centroids on embeddings ``x`` [n, d].

        Deterministic for a given ``seed`` and input. ``n < k`` raises
        :class:`CodebookError` (pick ``k`` with :func:`suggest_shape`). ``beam_size`` is used
        by ``rq_beam`` only (training and encoding beam).

        ``points_per_centroid``: train on a bounded sample of ``sample_size(k,
        points_per_centroid)`` rows of ``x`` (drawn with ``seed``; see the module docstring);
        ``None`` trains on every row. ``after_level(level, levels)`` is called after each
        level (``rkmeans``; ``rq_beam`` trains all levels in one call and reports them after
        it); an exception it raises stops training and propagates.
        """
        data = _as_matrix(x, None, "ResidualCodebook.train")
        if points_per_centroid is not None:
            if points_per_centroid < 1:
                raise CodebookError(
                    f"ResidualCodebook.train: points_per_centroid={points_per_centroid}; "
                    "use at least 1, or None to train on every row"
                )
            chosen = sample_rows(
                data.shape[0], sample_size(max(k, 1), points_per_centroid=points_per_centroid), seed
            )
            if len(chosen) < data.shape[0]:
                data = data[chosen]
        n = data.shape[0]
        if levels < 1:
            raise CodebookError(f"ResidualCodebook.train: levels={levels}; use at least 1")
        if k < 2:
            raise CodebookError(f"ResidualCodebook.train: k={k}; use at least 2")
        if n < k:
            raise CodebookError(
                f"ResidualCodebook.train: {n} training vectors for k={k} centroids per level; "
                f"train on at least k vectors or pick (levels, k) with suggest_shape({n})"
            )
        cap = max(256, -(-n // k)) if points_per_centroid is None else points_per_centroid
        if method == "rkmeans":
            cents = _train_rkmeans(
                data, levels, k, seed=seed, niter=niter, cap=cap, after_level=after_level
            )
            return cls(cents, "rkmeans", 1)
        if method == "rq_beam":
            if k & (k - 1):
                raise CodebookError(
                    f"ResidualCodebook.train: method 'rq_beam' needs k to be a power of two, "
                    f"got k={k}; pick a power of two or use method 'rkmeans'"
                )
            if beam_size < 1:
                raise CodebookError(f"ResidualCodebook.train: beam_size={beam_size}; use >= 1")
            cents = _train_rq_beam(data, levels, k, seed=seed, niter=niter, beam=beam_size, cap=cap)
            if after_level is not None:
                for level in range(levels):
                    after_level(level, levels)
            return cls(cents, "rq_beam", beam_size)
        raise CodebookError(
            f"ResidualCodebook.train: unknown method {method!r}; use one of {METHODS}"
        )

    # -- encoding / decoding ------------------------------------------------------------

    def _level_indexes(self) -> list[faiss.IndexFlatL2]:
        cached = self._indexes
        if cached is None:
            cached = []
            for level in range(self.levels):
                index = faiss.IndexFlatL2(self.dim)
                index.add(np.ascontiguousarray(self.centroids[level]))
                cached.append(index)
            object.__setattr__(self, "_indexes", cached)
        return cached

    def encode(self, x: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Full-depth paths of ``x`` [n, d]: int32 ``[n, L]``, greedy or beam per ``beam_size``."""
        data = _as_matrix(x, self.dim, "ResidualCodebook.encode")
        if batch_size < 1:
            raise CodebookError(f"ResidualCodebook.encode: batch_size={batch_size}; use >= 1")
        out = np.empty((data.shape[0], self.levels), dtype=np.int32)
        for start in range(0, data.shape[0], batch_size):
            chunk = data[start : start + batch_size]
            if self.beam_size == 1:
                out[start : start + len(chunk)] = self._encode_greedy(chunk)
            else:
                out[start : start + len(chunk)] = self._encode_beam(chunk, self.beam_size)
        return out

    def encode_greedy(self, x: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Greedy paths whatever ``beam_size`` is (nearest centroid per level)."""
        return ResidualCodebook(self.centroids, self.method, 1).encode(x, batch_size)

    def _encode_greedy(self, chunk: np.ndarray) -> np.ndarray:
        residual = chunk.copy()
        codes = np.empty((chunk.shape[0], self.levels), dtype=np.int32)
        for level, index in enumerate(self._level_indexes()):
            ids = _greedy_level(residual, index)
            codes[:, level] = ids
            residual -= self.centroids[level][ids]
        return codes

    def _encode_beam(self, chunk: np.ndarray, beam: int) -> np.ndarray:
        n = chunk.shape[0]
        k = self.k
        residual = chunk[:, None, :].copy()  # [n, b, d]
        err = np.einsum("nbd,nbd->nb", residual, residual)  # [n, b]
        paths = np.zeros((n, 1, 0), dtype=np.int32)
        norms = np.einsum("lkd,lkd->lk", self.centroids, self.centroids)
        for level in range(self.levels):
            cents = self.centroids[level]
            b = residual.shape[1]
            # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2, for every beam entry and codeword
            cand = err[:, :, None] - 2.0 * (residual @ cents.T) + norms[level][None, None, :]
            flat = cand.reshape(n, b * k)
            keep = min(beam, b * k)
            if keep < b * k:
                top = np.argpartition(flat, keep - 1, axis=1)[:, :keep]
            else:
                top = np.broadcast_to(np.arange(b * k), (n, b * k))
            top_d = np.take_along_axis(flat, top, axis=1)
            # stable order: distance, then flat index, so ties resolve deterministically
            order = np.lexsort((top, top_d), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            src, code = np.divmod(top, k)
            rows = np.arange(n)[:, None]
            residual = residual[rows, src] - cents[code]
            err = np.einsum("nbd,nbd->nb", residual, residual)
            paths = np.concatenate([paths[rows, src], code[:, :, None].astype(np.int32)], axis=2)
        best = np.argmin(err, axis=1)
        return np.ascontiguousarray(paths[np.arange(n), best], dtype=np.int32)

    def _check_codes(self, codes: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.shape[1] > self.levels:
            raise CodebookError(
                f"{what}: codes must be [n, <= {self.levels}] level digits, got shape "
                f"{arr.shape}; pass full paths from encode() or their prefixes"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise CodebookError(f"{what}: codes have dtype {arr.dtype}; pass integer digits")
        if arr.size and (arr.min() < 0 or arr.max() >= self.k):
            raise CodebookError(
                f"{what}: codes outside [0, {self.k}); they were not produced by this codebook "
                f"({self.codebook_id})"
            )
        return arr

    def decode(self, codes: np.ndarray, length: int | np.ndarray | None = None) -> np.ndarray:
        """Reconstruct from paths ``codes`` [n, l<=L]: float32 [n, d].

        ``length`` limits the levels used: an int for all items, an int array [n] per item,
        or ``None`` for every column of ``codes``. Length 0 reconstructs the zero vector.
        """
        arr = self._check_codes(codes, "ResidualCodebook.decode")
        n, width = arr.shape
        if length is None:
            lengths = np.full(n, width, dtype=np.int64)
        else:
            try:
                lengths = np.broadcast_to(np.asarray(length, dtype=np.int64), (n,))
            except ValueError as exc:
                raise CodebookError(
                    f"ResidualCodebook.decode: length has shape {np.shape(length)}; pass an int "
                    f"or one length per code row ({n})"
                ) from exc
        if lengths.size and (lengths.min() < 0 or lengths.max() > width):
            raise CodebookError(
                f"ResidualCodebook.decode: lengths must lie in [0, {width}] (the code width); "
                "pass longer codes or shorter lengths"
            )
        out = np.zeros((n, self.dim), dtype=np.float32)
        for level in range(width):
            used = lengths > level
            if used.all():
                out += self.centroids[level][arr[:, level]]
            elif used.any():
                out[used] += self.centroids[level][arr[used, level]]
        return out

    def quantization_error(
        self,
        x: np.ndarray,
        length: int | np.ndarray | None = None,
        codes: np.ndarray | None = None,
    ) -> float:
        """Mean squared L2 reconstruction error of ``x`` (encoded here unless ``codes``)."""
        data = _as_matrix(x, self.dim, "ResidualCodebook.quantization_error")
        paths = self.encode(data) if codes is None else codes
        recon = self.decode(paths, length)
        if recon.shape[0] != data.shape[0]:
            raise CodebookError(
                f"ResidualCodebook.quantization_error: {data.shape[0]} vectors but "
                f"{recon.shape[0]} codes; pass one code row per vector"
            )
        diff = data - recon
        return float(np.mean(np.einsum("nd,nd->n", diff, diff)))

    def level_errors(self, x: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
        """Mean squared error after using 0, 1, ..., L levels: float64 ``[L + 1]``."""
        data = _as_matrix(x, self.dim, "ResidualCodebook.level_errors")
        paths = self.encode(data) if codes is None else codes
        return np.array(
            [self.quantization_error(data, length=lv, codes=paths) for lv in range(self.levels + 1)]
        )

    # -- serialization ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Exact, self-describing bytes (``np.savez``, format version included)."""
        buf = io.BytesIO()
        np.savez(
            buf,
            format_version=np.array(FORMAT_VERSION, dtype=np.int64),
            centroids=self.centroids,
            method=np.array(self.method),
            beam_size=np.array(self.beam_size, dtype=np.int64),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ResidualCodebook:
        """Inverse of :meth:`to_bytes`; corrupt or foreign bytes raise :class:`CodebookError`."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                version = int(npz["format_version"])
                if version != FORMAT_VERSION:
                    raise CodebookError(
                        f"ResidualCodebook.from_bytes: format version {version} is not "
                        f"supported (this build reads {FORMAT_VERSION}); re-export the codebook "
                        "with a matching adacode version"
                    )
                centroids = np.array(npz["centroids"])
                method = str(npz["method"])
                beam_size = int(npz["beam_size"])
        except CodebookError:
            raise
        except (ValueError, KeyError, OSError, EOFError, TypeError, zipfile.BadZipFile) as exc:
            raise CodebookError(
                f"ResidualCodebook.from_bytes: {len(data)} bytes are not a serialized codebook "
                f"({exc}); pass bytes produced by ResidualCodebook.to_bytes"
            ) from exc
        if centroids.dtype != np.float32:
            raise CodebookError(
                f"ResidualCodebook.from_bytes: centroids have dtype {centroids.dtype}, expected "
                "float32; pass bytes produced by ResidualCodebook.to_bytes"
            )
        return cls(centroids, method, beam_size)


def _train_rkmeans(
    x: np.ndarray,
    levels: int,
    k: int,
    *,
    seed: int,
    niter: int,
    cap: int,
    after_level: LevelCallback | None = None,
) -> np.ndarray:
    d = x.shape[1]
    residual = x.copy()
    cents = np.empty((levels, k, d), dtype=np.float32)
    for level in range(levels):
        km = faiss.Kmeans(
            d,
            k,
            niter=niter,
            seed=seed + 7919 * level,
            max_points_per_centroid=cap,
            min_points_per_centroid=1,
            verbose=False,
        )
        km.train(residual)
        cents[level] = km.centroids
        index = faiss.IndexFlatL2(d)
        index.add(cents[level])
        ids = _greedy_level(residual, index)
        residual -= cents[level][ids]
        if after_level is not None:
            after_level(level, levels)
    return cents


def _train_rq_beam(
    x: np.ndarray, levels: int, k: int, *, seed: int, niter: int, beam: int, cap: int
) -> np.ndarray:
    d = x.shape[1]
    nbits = int(k).bit_length() - 1
    rq = faiss.ResidualQuantizer(d, levels, nbits)
    rq.max_beam_size = beam
    rq.cp.niter = niter
    rq.cp.seed = seed
    rq.cp.max_points_per_centroid = cap
    rq.cp.min_points_per_centroid = 1
    rq.verbose = False
    rq.train(x)
    return faiss.vector_to_array(rq.codebooks).astype(np.float32).reshape(levels, k, d)
