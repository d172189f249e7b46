"""The standard offline evaluation protocol for next-item recommendation, over arrays.

Per user, interactions are ordered by timestamp (ties: log order); the last one is the
test target, the second-last the validation target, the rest is training history
(:func:`leave_last_split`). Every target is ranked against ALL items (full ranking, nothing
excluded) and Recall@k / NDCG@k are averaged over users (:func:`evaluate_ranking`). Ties
count against the target (pessimistic rank), so constant scores never look lucky.

Slices (:func:`target_slices`): ``head`` = targets among the top 20% items by training
interactions, ``cold`` = targets that never appear in any training interaction.

:func:`holdout_split` is the publish gate's split: the latest interaction of the most recent
users, never trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from quantize.exceptions import QuantizeError

ScoreFn = Callable[[np.ndarray], "np.ndarray | torch.Tensor"]
"""Given case indices ``[b]`` returns scores ``[b, n_items]`` for those evaluation cases."""


def _check_log(users: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(users)
    t = np.asarray(timestamps)
    if u.ndim != 1 or t.shape != u.shape:
        raise QuantizeError(
            f"users {u.shape} and timestamps {t.shape} must be parallel 1-D arrays (one entry "
            "per interaction); pass the interaction log column by column"
        )
    if u.size and (not np.issubdtype(u.dtype, np.integer) or u.min() < 0):
        raise QuantizeError("users must be non-negative integer indices; map user ids first")
    return u.astype(np.int64), t.astype(np.int64)


def time_order(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Permutation sorting the log by (user, timestamp, log position)."""
    u, t = _check_log(users, timestamps)
    return np.lexsort((np.arange(len(u)), t, u))


@dataclass(frozen=True)
class LeaveLastSplit:
    """Boolean masks over the interaction log: exactly one of them is set per interaction.

    Users with >= 3 interactions get a test and a validation target; users with 2 a test
    target only; users with 1 keep it as training history.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def leave_last_split(users: np.ndarray, timestamps: np.ndarray) -> LeaveLastSplit:
    """Per user: last interaction -> test, second-last -> validation, the rest -> train."""
    u, _ = _check_log(users, timestamps)
    order = time_order(users, timestamps)
    su = u[order]
    n = len(su)
    last = np.ones(n, dtype=bool)
    if n:
        last[:-1] = su[1:] != su[:-1]
    first = np.ones(n, dtype=bool)
    if n:
        first[1:] = su[1:] != su[:-1]
    second_last = np.zeros(n, dtype=bool)
    if n > 1:
        second_last[:-1] = last[1:] & ~last[:-1] & (su[:-1] == su[1:])
    test_sorted = last & ~first
    # A user with exactly two interactions gives its second to test, keeps the first.
    valid_sorted = second_last & ~first
    test = np.zeros(n, dtype=bool)
    valid = np.zeros(n, dtype=bool)
    test[order] = test_sorted
    valid[order] = valid_sorted
    return LeaveLastSplit(train=~(test | valid), valid=valid, test=test)


def user_sequences(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_users: int | None = None
) -> list[np.ndarray]:
    """Per user index, the item indices in time order (empty arrays for absent users)."""
    order = time_order(users, timestamps)
    su = np.asarray(users, dtype=np.int64)[order]
    si = np.asarray(items, dtype=np.int64)[order]
    count = int(su.max()) + 1 if su.size else 0
    total = count if n_users is None else n_users
    if total < count:
        raise QuantizeError(f"n_users={total} but the log has user index {count - 1}; raise it")
    bounds = np.searchsorted(su, np.arange(total + 1))
    return [si[bounds[i] : bounds[i + 1]] for i in range(total)]


def pad_histories(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """The last ``max_len`` items of each sequence, left-padded with ``-1`` to ``[n, max_len]``."""
    out = np.full((len(sequences), max_len), -1, dtype=np.int64)
    for i, seq in enumerate(sequences):
        tail = np.asarray(seq, dtype=np.int64)[-max_len:]
        if len(tail):
            out[i, max_len - len(tail) :] = tail
    return out


def ranks(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> np.ndarray:
    """0-based rank of each target among all items; ties count against the target.

    ``rank = #(score > s_t) + #(score == s_t) - 1`` where ``s_t`` is the target's score.
    """
    s = torch.as_tensor(scores)
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=s.device)
    if s.ndim != 2 or t.shape != (s.shape[0],):
        raise QuantizeError(
            f"scores {tuple(s.shape)} and targets {tuple(t.shape)} do not match: pass scores "
            "[n_cases, n_items] and one target per case"
        )
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= s.shape[1]):
        raise QuantizeError(
            f"a target item index is outside [0, {s.shape[1]}); score every item of the domain"
        )
    target_scores = s.gather(1, t.view(-1, 1))
    if torch.isnan(s).any():
        raise QuantizeError("scores contain NaN; the model diverged: lower the learning rate")
    return ((s >= target_scores).sum(dim=1) - 1).cpu().numpy().astype(np.int64)


def recall_ndcg(rank: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-case Recall@k (hit) and NDCG@k (one relevant item) from 0-based ranks."""
    r = np.asarray(rank, dtype=np.int64)
    hit = r < k
    ndcg = np.where(hit, 1.0 / np.log2(r.astype(np.float64) + 2.0), 0.0)
    return hit.astype(np.float64), ndcg


@dataclass(frozen=True)
class SliceMetrics:
    """Mean Recall@k and NDCG@k over the ``n`` cases of one slice (NaN when empty).

    ``hits``: cases with the target in the top ``k`` (``recall * n``), so small slices can be
    reported as counts with an interval (:meth:`recall_interval`).
    """

    recall: float
    ndcg: float
    n: int
    hits: int = 0

    def recall_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson score interval of the slice's Recall@k (``(nan, nan)`` when empty)."""
        return wilson_interval(self.hits, self.n, confidence)


def _z_value(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise QuantizeError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    return float(torch.special.ndtri(torch.tensor((1.0 + confidence) / 2.0, dtype=torch.float64)))


def wilson_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion of ``hits`` successes in ``n`` cases.

    Unlike the normal approximation it stays inside ``[0, 1]`` and is not empty at 0 or
    ``n`` hits, which matters for small slices (a few dozen cold-start cases).
    """
    if n < 0 or not 0 <= hits <= max(n, 0):
        raise QuantizeError(f"need 0 <= hits ({hits}) <= n ({n}); count hits within the slice")
    z = _z_value(confidence)
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if hits == 0 else max(0.0, centre - half)  # exact ends, no rounding residue
    high = 1.0 if hits == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired cases with a bootstrap interval."""

    diff: float
    low: float
    high: float
    n: int
    n_groups: int


def paired_difference(
    a: np.ndarray,
    b: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """Mean per-case difference of two methods on the same cases, with a percentile interval.

    ``a`` and ``b`` hold one value per case (e.g. hits). With ``groups`` (e.g. the target
    item of each case) whole groups are resampled (cluster bootstrap): cases that share a
    target are not independent, and a slice whose cases come from a handful of items must
    not look more certain than it is.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise QuantizeError(
            f"paired values have shapes {x.shape} and {y.shape}; pass one value per case for "
            "both methods, in the same case order"
        )
    g = np.arange(len(x)) if groups is None else np.asarray(groups)
    if g.shape != x.shape:
        raise QuantizeError(f"groups has shape {g.shape}, expected {x.shape}: one per case")
    if n_boot < 1:
        raise QuantizeError(f"n_boot={n_boot} must be >= 1")
    _z_value(confidence)
    if len(x) == 0:
        nan = float("nan")
        return PairedDifference(nan, nan, nan, 0, 0)
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_groups = int(inverse.max()) + 1
    sums = np.bincount(inverse, weights=x - y, minlength=n_groups)
    sizes = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, n_groups, size=(n_boot, n_groups))
    boot = sums[draw].sum(axis=1) / sizes[draw].sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return PairedDifference(float((x - y).mean()), float(low), float(high), len(x), n_groups)


@dataclass(frozen=True)
class Evaluation:
    """Metrics per slice (``"all"`` always present) and the per-case ranks."""

    k: int
    slices: dict[str, SliceMetrics]
    rank: np.ndarray

    @property
    def recall(self) -> float:
        return self.slices["all"].recall

    @property
    def ndcg(self) -> float:
        return self.slices["all"].ndcg

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"recall", "ndcg", "<slice>_recall", "<slice>_ndcg", "<slice>_n"}``."""
        out: dict[str, float] = {}
        for name, m in self.slices.items():
            prefix = "" if name == "all" else f"{name}_"
            out[f"{prefix}recall"] = m.recall
            out[f"{prefix}ndcg"] = m.ndcg
            out[f"{prefix}n"] = float(m.n)
        return out


def summarize(
    rank: np.ndarray, k: int = 10, slices: Mapping[str, np.ndarray] | None = None
) -> Evaluation:
    """Average Recall@k / NDCG@k over all cases and over each boolean slice mask."""
    recall, ndcg = recall_ndcg(rank, k)
    masks: dict[str, np.ndarray] = {"all": np.ones(len(rank), dtype=bool)}
    for name, mask in (slices or {}).items():
        m = np.asarray(mask, dtype=bool)
        if m.shape != (len(rank),):
            raise QuantizeError(
                f"slice {name!r} has shape {m.shape} but there are {len(rank)} cases; pass one "
                "flag per evaluation case"
            )
        masks[name] = m
    out = {}
    for name, m in masks.items():
        n = int(m.sum())
        out[name] = SliceMetrics(
            recall=float(recall[m].mean()) if n else float("nan"),
            ndcg=float(ndcg[m].mean()) if n else float("nan"),
            n=n,
            hits=int(recall[m].sum()),
        )
    return Evaluation(k=k, slices=out, rank=np.asarray(rank, dtype=np.int64))


def evaluate_ranking(
    score_fn: ScoreFn,
    targets: np.ndarray,
    *,
    k: int = 10,
    slices: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 1024,
) -> Evaluation:
    """Full-ranking evaluation of ``len(targets)`` cases, scored in batches by ``score_fn``."""
    t = np.asarray(targets, dtype=np.int64)
    if t.ndim != 1:
        raise QuantizeError(f"targets must be 1-D (one item per case), got shape {t.shape}")
    if batch_size < 1 or k < 1:
        raise QuantizeError(f"batch_size={batch_size} and k={k} must be >= 1")
    parts = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(t), batch_size):
        idx = np.arange(start, min(start + batch_size, len(t)))
        parts.append(ranks(score_fn(idx), t[idx]))
    return summarize(np.concatenate(parts), k, slices)


def target_slices(
    train_items: np.ndarray, targets: np.ndarray, n_items: int, *, head_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """``head`` and ``cold`` masks over ``targets`` given the training interactions' items.

    Head items: the top ``head_fraction`` of all ``n_items`` by training count (ties: lower
    index first). Cold: never in a training interaction.
    """
    if not 0.0 < head_fraction <= 1.0:
        raise QuantizeError(f"head_fraction={head_fraction} must be in (0, 1]")
    counts = np.bincount(np.asarray(train_items, dtype=np.int64), minlength=n_items)
    if len(counts) != n_items:
        raise QuantizeError(
            f"training items reach index {len(counts) - 1} but n_items={n_items}; pass the "
            "domain's item count"
        )
    order = np.lexsort((np.arange(n_items), -counts))
    head = np.zeros(n_items, dtype=bool)
    head[order[: round(head_fraction * n_items)]] = True
    t = np.asarray(targets, dtype=np.int64)
    return {"head": head[t], "cold": counts[t] == 0}


@dataclass(frozen=True)
class Holdout:
    """Indices into the log: ``train`` (everything else) and ``holdout`` (one per chosen user)."""

    train: np.ndarray
    holdout: np.ndarray


def holdout_split(
    users: np.ndarray,
    timestamps: np.ndarray,
    *,
    max_users: int = 1000,
    min_history: int = 1,
) -> Holdout:
    """The publish gate's split: the latest interaction of the most recently active users.

    Users are ranked by the time of their last interaction (most recent first; ties: later
    log position first); among those with at least ``min_history`` earlier interactions, the
    first ``max_users`` give their last interaction to the holdout. The model that is
    gated must be trained on ``train`` only.
    """
    if max_users < 0 or min_history < 0:
        raise QuantizeError(f"max_users={max_users} and min_history={min_history} must be >= 0")
    u, t = _check_log(users, timestamps)
    order = time_order(u, t)
    su = u[order]
    n = len(su)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Holdout(train=empty, holdout=empty)
    last = np.ones(n, dtype=bool)
    last[:-1] = su[1:] != su[:-1]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
    ends = np.flatnonzero(last)
    history = ends - starts  # interactions before the last one
    candidates = order[ends][history >= min_history]
    recency = np.lexsort((candidates, t[candidates]))[::-1]
    held = np.sort(candidates[recency[:max_users]])
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return Holdout(train=np.flatnonzero(mask), holdout=held)


ChunkScorer = Callable[[int, int], "np.ndarray | torch.Tensor"]
"""Scores ``[b, stop - start]`` of a batch of cases against the items ``[start, stop)``."""

ChunkScoreFn = Callable[[np.ndarray], ChunkScorer]
"""Given case indices ``[b]`` returns a :data:`ChunkScorer` for those cases (the costly part,
e.g. encoding the histories, is done once per batch, not once per item chunk)."""

DEFAULT_SCORE_BUDGET = 1 << 24
"""Scores held at once by :func:`evaluate_ranking_chunked` (64 MiB of float32)."""


def item_chunk_for(batch_size: int, score_budget: int = DEFAULT_SCORE_BUDGET) -> int:
    """Items per chunk so that ``batch_size`` cases hold at most ``score_budget`` scores."""
    if batch_size < 1 or score_budget < 1:
        raise QuantizeError(f"batch_size={batch_size} and score_budget={score_budget} must be >= 1")
    return max(1, score_budget // batch_size)


def chunked_ranks(
    scorer: ChunkScorer,
    targets: np.ndarray,
    n_items: int,
    item_chunk: int,
    check: Callable[[], None] | None = None,
) -> np.ndarray:
    """:func:`ranks` of a batch of cases computed over item chunks, never all scores at once.

    The target's score is read from the chunk that holds it (the same float as in its own
    chunk, so ties count exactly as in one pass), then every chunk counts the items scoring
    at least as high. When all the batch's targets lie in one chunk (as
    :func:`evaluate_ranking_chunked` batches them), that chunk is counted as it is read, so
    each chunk is scored once; otherwise the chunks holding targets are scored twice.
    ``check`` is called before each chunk (raise from it to stop). A target whose score is
    NaN (a diverged model) raises :class:`QuantizeError`.
    """
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    if t.ndim != 1 or item_chunk < 1:
        raise QuantizeError(f"targets must be 1-D and item_chunk={item_chunk} >= 1")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_items):
        raise QuantizeError(
            f"a target item index is outside [0, {n_items}); score every item of the domain"
        )
    bounds = [(a, min(a + item_chunk, n_items)) for a in range(0, n_items, item_chunk)]

    def scores(c: int) -> torch.Tensor:
        if check is not None:
            check()
        s = torch.as_tensor(scorer(*bounds[c]))
        if s.shape != (len(t), bounds[c][1] - bounds[c][0]):
            raise QuantizeError(
                f"a chunk scorer returned {tuple(s.shape)} for {len(t)} cases and items "
                f"{bounds[c]}; return one score per case and item of the chunk"
            )
        return s

    target_scores = torch.empty(len(t), dtype=torch.float64)
    count = torch.zeros(len(t), dtype=torch.int64)
    chunk_of = t // item_chunk
    holding = torch.unique(chunk_of).tolist()
    counted: set[int] = set()
    for c in holding:
        s = scores(c)
        mask = chunk_of == c
        local = (t[mask] - bounds[c][0]).to(s.device)
        rows = torch.nonzero(mask).view(-1).to(s.device)
        target_scores[mask] = s[rows, local].double().cpu()
        if len(holding) == 1:  # every target known: count this chunk now, not again
            count += _at_least(s, target_scores)
            counted.add(c)
    if torch.isnan(target_scores).any():
        raise QuantizeError("scores contain NaN; the model diverged: lower the learning rate")
    for c in range(len(bounds)):
        if c not in counted:
            count += _at_least(scores(c), target_scores)
    return (count - 1).numpy().astype(np.int64)


def _at_least(s: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Per case, how many of the chunk's scores ``s`` are at least its target's score."""
    return (s >= target_scores.to(s.device, s.dtype).view(-1, 1)).sum(dim=1).cpu()


def evaluate_ranking_chunked(
    score_fn: ChunkScoreFn,
    targets: np.ndarray,
    n_items: int,
    *,
    k: int = 10,
    slices: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 1024,
    score_budget: int = DEFAULT_SCORE_BUDGET,
    check: Callable[[], None] | None = None,
) -> Evaluation:
    """:func:`evaluate_ranking` (full ranking, same ranks) with bounded memory: cases in
    batches of at most ``batch_size`` whose targets lie in one item chunk, items in chunks,
    at most ``score_budget`` scores at once (see :func:`chunked_ranks`: each chunk is
    scored once per batch). ``check`` is called before each chunk (raise to stop)."""
    t = np.asarray(targets, dtype=np.int64)
    if t.ndim != 1:
        raise QuantizeError(f"targets must be 1-D (one item per case), got shape {t.shape}")
    if batch_size < 1 or k < 1 or n_items < 1:
        raise QuantizeError(f"batch_size={batch_size}, k={k} and n_items={n_items} must be >= 1")
    item_chunk = item_chunk_for(batch_size, score_budget)
    rank = np.zeros(len(t), dtype=np.int64)
    for idx in _batches_by_target_chunk(t, item_chunk, batch_size):
        rank[idx] = chunked_ranks(score_fn(idx), t[idx], n_items, item_chunk, check)
    return summarize(rank, k, slices)


def _batches_by_target_chunk(
    targets: np.ndarray, item_chunk: int, batch_size: int
) -> list[np.ndarray]:
    """Case indices in batches of at most ``batch_size`` whose targets lie in one item chunk
    (so :func:`chunked_ranks` scores each chunk once per batch, not twice), in case order
    within a chunk."""
    chunk_of = targets // item_chunk
    order = np.argsort(chunk_of, kind="stable")
    cuts = np.flatnonzero(np.diff(chunk_of[order])) + 1
    return [
        group[a : a + batch_size]
        for group in np.split(order, cuts)
        for a in range(0, len(group), batch_size)
    ]


def pad_slices(
    values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int
) -> np.ndarray:
    """``[n, width]`` int32: the last ``width`` of ``values[starts[i] : starts[i] + lengths[i]]``
    per row, left-padded with -1: :func:`pad_histories` of slices of one array, built with
    numpy in bounded chunks of rows (no per-row Python objects)."""
    s_all = np.asarray(starts, dtype=np.int64)
    n_all = np.asarray(lengths, dtype=np.int64)
    if s_all.shape != n_all.shape or s_all.ndim != 1 or width < 1:
        raise QuantizeError(
            f"starts {s_all.shape} and lengths {n_all.shape} must be parallel 1-D arrays and "
            f"width={width} >= 1"
        )
    out = np.full((len(s_all), width), -1, dtype=np.int32)
    cols = np.arange(width, dtype=np.int64)[None, :]
    step = 1 << 16
    for a in range(0, len(s_all), step):
        s = s_all[a : a + step, None]
        ln = n_all[a : a + step, None]
        pos = s + ln - width + cols  # where column c of the row comes from
        valid = cols >= width - np.minimum(ln, width)
        out[a : a + step] = np.where(valid, values[np.where(valid, pos, 0)], -1)
    return out


def user_histories(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, wanted: np.ndarray, max_len: int
) -> np.ndarray:
    """The last ``max_len`` items of each ``wanted`` user, in time order, left-padded:
    ``pad_histories([user_sequences(...)[u] for u in wanted], max_len)`` with arrays only."""
    order = time_order(users, timestamps)
    su = np.asarray(users, dtype=np.int64)[order]
    si = np.asarray(items, dtype=np.int64)[order]
    w = np.asarray(wanted, dtype=np.int64)
    starts = np.searchsorted(su, w, side="left")
    ends = np.searchsorted(su, w, side="right")
    return pad_slices(si, starts, ends - starts, max_len).astype(np.int64)
