"""Per-domain training of a :class:`~quantize.table_model.CodeTableRecommender`.

:func:`train_domain` trains next-item prediction over a domain's interaction log (parallel
arrays: user index, item index, timestamp). Every user's time-ordered sequence is cut into
windows of ``max_len`` inputs from the end (numpy only, no per-interaction objects); every
position predicts the next item (SASRec-style). The last interaction of every user is held
out as the validation target for early stopping; the parameters of the best validation
epoch are returned.

The loss, by rule (``TrainConfig.softmax="auto"``): a full softmax over the domain's items
while the catalogue has at most ``full_softmax_max_items`` items (every step computes every
item's vector: exact, and as cheap as sampling at that size); above it a sampled softmax
whose cost per step does not depend on the catalogue (:func:`sampled_softmax_loss`): the
candidates are the batch's own targets (in-batch negatives, drawn by popularity) plus
``negatives`` items drawn uniformly, shared by the batch; each candidate's logit is
corrected by ``-log q`` (its probability of being in the pool; Yi et al. 2019,
"Sampling-bias-corrected neural modeling for large corpus item recommendations"), so the
popular items that in-batch sampling over-represents are not over-penalised; item vectors
are computed only for the pool and the batch's inputs, and the code rows get sparse
gradients (lazy Adam), so no step touches every item or row. Validation and the gate rank
all items (:func:`~quantize.evaluate.evaluate_ranking_chunked`, bounded memory).

Budget and stop: ``max_seconds`` is checked before every step and every validation batch;
``check`` (a callback) likewise, and raising from it stops training at once.

Warm starts: ``init_from`` loads a previous version or a cross-domain pretrained model
(shapes that grew, e.g. more table rows, keep their fresh initialisation beyond the copied
overlap). With ``new_since`` only windows holding interactions at or after that timestamp
are trained, plus a replay sample of older windows (incremental adaptation).
``trainable="domain"`` freezes the shared encoder so only the domain table moves.

Deterministic for a seed on a given device and thread count; the global torch RNG and
thread count are restored on return.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from quantize.evaluate import (
    DEFAULT_SCORE_BUDGET,
    ChunkScoreFn,
    ChunkScorer,
    evaluate_ranking_chunked,
    pad_slices,
    time_order,
)
from quantize.exceptions import QuantizeError
from quantize.table_model import (
    DOMAIN_PREFIX,
    CodeTableRecommender,
    ModelConfig,
    Params,
    Snapshot,
    build_model,
    check_item_rows,
    count_parameters,
    export_params,
    history_pairs,
    load_params,
)

EPOCH_BUDGET_SHARE = 0.25
"""An epoch ends once it has taken this share of ``max_seconds``, so a budgeted run reaches
a validation whatever the log's size and the machine's speed (as long as one validation
takes less than the rest of the budget: at 1M items it took ~75 s of 300 s)."""

Trainable = Literal["all", "domain"]
SoftmaxItems = Literal["seen", "all"]
SoftmaxKind = Literal["auto", "full", "sampled"]
IncrementalValidation = Literal["new", "all"]
LogitsPrecision = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the same rule for every domain).

    Length of training:

    * ``epochs``: passes over the training windows; ``None`` sets it by rule from the data
      size, ``ceil(position_budget / trained positions per epoch)`` clipped to
      ``[min_epochs, max_epochs]``, so small domains get more passes and large ones fewer.
    * ``patience``: epochs without a validation NDCG@10 gain before stopping (0 = never).
    * ``max_seconds``: stop after the epoch that crosses this wall time, or before one that
      would cross it (as long as the last epoch, validation included): a cut epoch is
      dropped, so beginning it would spend the time for nothing.
    * ``epoch_steps``: at most this many steps per epoch (``None``: a whole pass). A log
      of millions of interactions takes thousands of steps per pass; capped, each epoch is
      the first ``epoch_steps`` batches of a fresh shuffle (a random part of the log), so
      validation, early stopping and the best-epoch choice happen every so many steps and a
      run cut by ``max_seconds`` still has validated epochs to keep. An epoch also ends
      once it has taken ``EPOCH_BUDGET_SHARE`` (a quarter) of ``max_seconds``: a step's
      cost varies with the model and the machine, so a step count alone cannot promise a
      validation within the budget (only runs whose epochs take over a quarter of their
      budget are cut, so their result then depends on timing, as the budget's cut does).

    Optimisation: ``batch_tokens`` positions per step (windows of similar length are packed
    up to this many, padding included); AdamW with ``lr`` and ``weight_decay``; with
    ``lr_decay`` the rate falls linearly over the planned epochs to ``lr_floor * lr``.

    What is trained: ``trainable="all"``, or ``"domain"`` (shared encoder frozen).
    ``softmax_items="seen"`` ranks targets against the items of the training log only, so
    items without any interaction (new items) are never pushed down as negatives and keep
    the score their codes and text give them; ``"all"`` uses every item.

    The loss: ``softmax="full"`` (every candidate item, every step), ``"sampled"`` (the
    batch's targets plus ``negatives`` uniformly drawn candidates, logQ-corrected; see the
    module docstring) or ``"auto"``: full while the domain has at most
    ``full_softmax_max_items`` items, sampled above (the threshold is measured by
    ``bench/train_scale.py``). In sampled mode ``weight_decay`` applies to the dense
    parameters only (code rows are updated lazily, with sparse Adam).

    Incremental runs (``new_since``): ``replay_ratio`` old windows are sampled per new
    window; with ``epochs=None`` they get ``incremental_share`` of the epochs the rule
    gives the whole log. With ``incremental_validation="new"`` the epoch is chosen on the
    validation targets at/after ``new_since`` (the behaviour the version adapts to; also
    cheaper, in proportion to the new data) when there are at least ``min_val_users`` of
    them, else on all; ``"all"`` always validates on every user.

    ``logits_precision``: the dtype the training loss multiplies user states by candidate
    vectors in (the step's largest product, forward and backward; float32 accumulation,
    the logits and every parameter stay float32): ``"auto"`` takes ``"bfloat16"`` when
    :func:`bfloat16_pays` measured it at least ``BFLOAT16_MIN_SPEEDUP`` times faster on the
    training device, else ``"float32"``. Validation, the gate and serving always score in
    float32.

    Runtime: ``threads`` torch CPU threads while training (restored after); ``device``
    ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; ``val_users`` caps the
    validation users (a seeded sample), ``None`` = all, and ``val_item_scores`` caps
    validation users x items (large catalogues validate on fewer users, at least
    ``min_val_users``), so one validation costs at most that many scores.
    """

    epochs: int | None = None
    position_budget: int = 1_500_000
    min_epochs: int = 5
    max_epochs: int = 40
    batch_tokens: int = 800
    lr: float = 3e-3
    weight_decay: float = 0.0
    lr_decay: bool = True
    lr_floor: float = 0.1
    patience: int = 4
    trainable: Trainable = "all"
    replay_ratio: float = 1.0
    incremental_share: float = 0.5
    softmax: SoftmaxKind = "auto"
    full_softmax_max_items: int = 5_000
    negatives: int = 2048
    softmax_items: SoftmaxItems = "seen"
    incremental_validation: IncrementalValidation = "new"
    min_val_users: int = 100
    seed: int = 0
    threads: int = 1
    device: str = "auto"
    max_seconds: float | None = None
    epoch_steps: int | None = None
    val_users: int | None = 10_000
    val_item_scores: int = 2_000_000_000
    logits_precision: LogitsPrecision = "auto"

    def loss_for(self, n_items: int) -> Literal["full", "sampled"]:
        """The loss a domain of ``n_items`` items trains with (the rule of ``softmax``)."""
        if self.softmax == "auto":
            return "full" if n_items <= self.full_softmax_max_items else "sampled"
        return self.softmax

    def epochs_for(self, n_targets: int) -> int:
        """``epochs`` when set, else ``position_budget / n_targets`` clipped to the bounds."""
        if self.epochs is not None:
            return self.epochs
        wanted = -(-self.position_budget // max(n_targets, 1))
        return int(min(self.max_epochs, max(self.min_epochs, wanted)))

    def __post_init__(self) -> None:
        problems = []
        if (self.epochs is not None and self.epochs < 1) or self.batch_tokens < 1:
            problems.append("epochs and batch_tokens must be >= 1")
        if self.threads < 1 or self.position_budget < 1:
            problems.append("threads and position_budget must be >= 1")
        if self.epoch_steps is not None and self.epoch_steps < 1:
            problems.append(f"epoch_steps={self.epoch_steps} must be >= 1 (or None: a whole pass)")
        if not 1 <= self.min_epochs <= self.max_epochs:
            problems.append(f"need 1 <= min_epochs ({self.min_epochs}) <= max_epochs")
        if not 0.0 <= self.lr_floor <= 1.0:
            problems.append(f"lr_floor={self.lr_floor} is outside [0, 1]")
        if self.lr <= 0 or self.weight_decay < 0 or self.patience < 0:
            problems.append("lr must be > 0, weight_decay and patience >= 0")
        if self.trainable not in ("all", "domain"):
            problems.append(f"trainable={self.trainable!r} is not 'all' or 'domain'")
        if not 0.0 < self.incremental_share <= 1.0:
            problems.append(f"incremental_share={self.incremental_share} is outside (0, 1]")
        if self.replay_ratio < 0 or self.negatives < 1 or self.full_softmax_max_items < 0:
            problems.append("replay_ratio and full_softmax_max_items must be >= 0, negatives >= 1")
        if self.softmax not in ("auto", "full", "sampled"):
            problems.append(f"softmax={self.softmax!r} is not 'auto', 'full' or 'sampled'")
        if self.val_item_scores < 1:
            problems.append(f"val_item_scores={self.val_item_scores} must be >= 1")
        if self.incremental_validation not in ("new", "all") or self.min_val_users < 0:
            problems.append(
                f"incremental_validation={self.incremental_validation!r} must be 'new' or "
                f"'all' and min_val_users={self.min_val_users} >= 0"
            )
        if self.softmax_items not in ("seen", "all"):
            problems.append(f"softmax_items={self.softmax_items!r} is not 'seen' or 'all'")
        if self.logits_precision not in ("auto", "float32", "bfloat16"):
            problems.append(
                f"logits_precision={self.logits_precision!r} is not 'auto', 'float32' or 'bfloat16'"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r} is not 'auto', 'cpu' or 'cuda'")
        if problems:
            raise QuantizeError(
                "invalid TrainConfig: " + "; ".join(problems) + "; fix the training settings"
            )


@dataclass(frozen=True)
class EpochReport:
    """Progress after one epoch (passed to the ``progress`` callback)."""

    epoch: int
    loss: float
    val_recall: float
    val_ndcg: float
    elapsed_s: float
    best_epoch: int
    planned_epochs: int


@dataclass(frozen=True)
class TrainResult:
    """Trained parameters (best validation epoch) and how training went."""

    params: Params
    config: ModelConfig
    epochs_run: int
    best_epoch: int
    wall_s: float
    trainable_params: int
    n_windows: int
    n_targets: int
    val_recall: float
    val_ndcg: float
    history: list[EpochReport] = field(default_factory=list)
    seen_items: np.ndarray | None = None
    """bool ``[n_items]``: items of the training log (inputs or targets of a training window),
    the items whose code rows this version trained; pass ``~seen_items`` as the new items
    to :func:`~quantize.table_model.borrow_trained_codes` when serving."""
    loss: str = "full"
    """The loss the rule chose: ``"full"`` or ``"sampled"``."""
    out_of_time: bool = False
    """``max_seconds`` ran out during training (the epoch under way was dropped). With
    ``best_epoch == 0`` no epoch was validated in time: ``params`` are a partly trained,
    unvalidated model that must not be served (see :attr:`validated`)."""
    steps: int = 0
    """Optimiser steps taken."""

    @property
    def validated(self) -> bool:
        """Whether ``params`` come from a validated epoch (always, unless out of time)."""
        return self.best_epoch > 0

    def snapshot(self) -> Snapshot:
        """The trained version as a :class:`~quantize.table_model.Snapshot` (bytes-ready)."""
        return Snapshot(self.config, self.params)

    @property
    def metrics(self) -> dict[str, float]:
        """Flat summary for logs and benchmarks."""
        return {
            "val_recall": self.val_recall,
            "val_ndcg": self.val_ndcg,
            "epochs_run": float(self.epochs_run),
            "best_epoch": float(self.best_epoch),
            "wall_s": self.wall_s,
            "trainable_params": float(self.trainable_params),
            "n_windows": float(self.n_windows),
            "n_targets": float(self.n_targets),
            "steps": float(self.steps),
            "sampled_loss": float(self.loss == "sampled"),
        }


@dataclass(frozen=True)
class _Windows:
    """Training windows as slices of one array: window ``w`` has ``lengths[w]`` pairs,
    inputs ``items[at[w] : at[w] + lengths[w]]`` and targets one position later. Nothing
    is padded until a step asks for its windows (:meth:`inputs`, :meth:`targets`: left-padded
    to the step's width), so memory follows the log, not ``n_windows x max_len`` (at 1M
    items and 10M interactions of 500k users, two padded int32 matrices at ``max_len`` 200
    were 800 MB, 90 % of it padding)."""

    # int32 [n interactions]: the users' time-ordered sequences, one after another
    items: np.ndarray
    at: np.ndarray  # int64 [n_windows]: where each window's inputs begin in items
    lengths: np.ndarray  # int64 [n_windows]: its (input, target) pairs, 1..max_len
    is_new: np.ndarray  # bool [n_windows]: holds a target at/after new_since

    def __len__(self) -> int:
        return len(self.at)

    def inputs(self, idx: np.ndarray, width: int) -> np.ndarray:
        """The inputs of windows ``idx``, int32 ``[len(idx), width]``, left-padded with -1."""
        return pad_slices(self.items, self.at[idx], self.lengths[idx], width)

    def targets(self, idx: np.ndarray, width: int) -> np.ndarray:
        """The targets of windows ``idx``, int32 ``[len(idx), width]``, left-padded with -1."""
        return pad_slices(self.items, self.at[idx] + 1, self.lengths[idx], width)

    def item_counts(self, idx: np.ndarray | None, n_items: int, *, inputs: bool) -> np.ndarray:
        """How often each item is a target of windows ``idx`` (all with ``None``), or with
        ``inputs`` an input or a target (int64 ``[n_items]``), from a difference array over
        the positions of :attr:`items` (no per-window copies)."""
        at = self.at if idx is None else self.at[idx]
        lengths = self.lengths if idx is None else self.lengths[idx]
        first = at if inputs else at + 1
        size = len(self.items) + 1
        depth = np.cumsum(
            np.bincount(first, minlength=size) - np.bincount(at + lengths + 1, minlength=size)
        )[:-1]
        return np.bincount(self.items, weights=depth, minlength=n_items).astype(np.int64)


@dataclass(frozen=True)
class _Data:
    windows: _Windows
    val_histories: np.ndarray  # int64 [n_val, max_len]
    val_targets: np.ndarray  # int64 [n_val]
    val_times: np.ndarray  # int64 [n_val]: timestamps of the validation targets


def _prepare(
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    n_items: int,
    max_len: int,
    new_since: int | None,
    validate: bool,
) -> _Data:
    """Every user's time-ordered sequence, its last item held out for validation (with
    ``validate``, when it has two or more), the rest cut into windows (:func:`_cut`);
    arrays throughout, no per-user or per-interaction Python objects."""
    u, it, ts = _check_log_columns(users, items, timestamps, n_items)
    order = time_order(u, ts)
    su, si, st = u[order], it[order], ts[order]
    n = len(su)
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]]) if n else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, n]).astype(np.int64)
    held = (lengths >= 2) if validate else np.zeros(len(starts), dtype=bool)
    val = np.flatnonzero(held)
    val_at = starts[val] + lengths[val] - 1  # the held-out (last) interaction
    windows = _cut(si, st, starts, lengths - held, max_len, new_since)
    return _Data(
        windows,
        pad_slices(si, starts[val], lengths[val] - 1, max_len).astype(np.int64),
        si[val_at].astype(np.int64),
        st[val_at].astype(np.int64),
    )


def _check_log_columns(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The log's columns as parallel int64 arrays, item indices in ``[0, n_items)``."""
    u = np.asarray(users, dtype=np.int64)
    it = np.asarray(items, dtype=np.int64)
    ts = np.asarray(timestamps, dtype=np.int64)
    if not (u.shape == it.shape == ts.shape) or u.ndim != 1:
        raise QuantizeError(
            f"users {u.shape}, items {it.shape} and timestamps {ts.shape} must be parallel 1-D "
            "arrays; pass the interaction log column by column"
        )
    if it.size and (it.min() < 0 or it.max() >= n_items):
        raise QuantizeError(
            f"item indices must be in [0, {n_items}) (rows of item_rows), got "
            f"[{it.min()}, {it.max()}]; map item ids to table rows first"
        )
    return u, it, ts


def _cut(
    items: np.ndarray,
    stamps: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    max_len: int,
    new_since: int | None,
) -> _Windows:
    """Windows of every user's training sequence ``items[starts[u] : starts[u] + lengths[u]]``,
    cut from its end, users in order and each user's last window first.

    The pairs (input ``seq[i]``, target ``seq[i + 1]``) go in windows of at most
    ``max_len``, left-padded with -1; a window is new when it holds a target stamped at or
    after ``new_since``.
    """
    pairs = np.maximum(lengths - 1, 0)
    per_user = -(-pairs // max_len)
    owner = np.repeat(np.arange(len(starts)), per_user)
    first = np.r_[0, np.cumsum(per_user)[:-1]] if len(per_user) else per_user
    nth = np.arange(len(owner)) - np.repeat(first, per_user)  # 0 = the user's last window
    end = pairs[owner] - nth * max_len  # pairs [begin, end) of the user's sequence
    begin = np.maximum(0, end - max_len)
    at = starts[owner] + begin
    if new_since is None:
        is_new = np.zeros(len(owner), dtype=bool)
    else:
        last_stamp = np.full(len(owner), np.iinfo(np.int64).min, dtype=np.int64)
        if len(owner):
            # the newest target of a window: its targets are time-ordered, so the last one
            last_stamp = stamps[at + (end - begin)]
        is_new = last_stamp >= new_since
    return _Windows(items.astype(np.int32), at, end - begin, is_new)


def _select_windows(
    windows: _Windows, new_since: int | None, replay_ratio: float, rng: np.random.Generator
) -> np.ndarray:
    if new_since is None:
        return np.arange(len(windows))
    new = np.flatnonzero(windows.is_new)
    old = np.flatnonzero(~windows.is_new)
    n_replay = min(len(old), round(replay_ratio * len(new)))
    replay = rng.choice(old, size=n_replay, replace=False) if n_replay else old[:0]
    return np.sort(np.concatenate([new, replay]))


def _batches(lengths: np.ndarray, batch_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of windows of similar length, in random order.

    Windows are sorted by length (random tie-break) and packed so that a batch holds at
    most ``batch_tokens`` positions, padding to its longest window included (at least one
    window per batch): short windows travel in large batches, long ones in small batches,
    so every step sees a similar number of positions.
    """
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end + 1 - start) * int(lengths[order[end]]) > batch_tokens:
            batches.append(order[start:end])
            start = end
    return [batches[i] for i in rng.permutation(len(batches))]


def _seen(windows: _Windows, n_items: int) -> np.ndarray:
    """Items that are an input or a target of some training window."""
    return windows.item_counts(None, n_items, inputs=True) > 0


def _candidates(
    windows: _Windows, n_items: int, softmax_items: SoftmaxItems, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax candidates (sorted item ids) and each item's slot among them (-1: none)."""
    if softmax_items == "all":
        ids = np.arange(n_items)
    else:
        ids = np.flatnonzero(_seen(windows, n_items)).astype(np.int64)
    slot = np.full(n_items, -1, dtype=np.int64)
    slot[ids] = np.arange(len(ids))
    return torch.as_tensor(ids, device=device), torch.as_tensor(slot, device=device)


def shared_init(params: Mapping[str, np.ndarray], shared_rows: int) -> Params:
    """Params of another domain's model reduced to what a new domain can reuse.

    With one codebook for all domains, the first ``shared_rows`` table rows (the level rows,
    ``L * K``) mean the same codewords everywhere; rows beyond them (disambiguation rows)
    belong to that domain's items, so they are dropped and start fresh in the new domain.
    Everything else (encoder, text projection, level weights, repeat bias) is kept. Pass
    the result as ``init_from``. ``shared_rows=0``: a model of another codebook, whose rows
    stand for other codewords: every row starts fresh.
    """
    key = DOMAIN_PREFIX + "rows"
    if key not in params:
        raise QuantizeError(f"params lack {key!r}; pass a full export from export_params")
    if not 0 <= shared_rows <= params[key].shape[0]:
        raise QuantizeError(
            f"shared_rows={shared_rows} must be in [0, {params[key].shape[0]}] (the table's "
            "rows); pass levels * k of the shared codebook, or 0 for another codebook's model"
        )
    out = {name: np.array(value, copy=True) for name, value in params.items()}
    out[key] = out[key][:shared_rows].copy()
    return out


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise QuantizeError(
                "device='cuda' was asked but CUDA is not available; use 'auto' or 'cpu'"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def text_tensor(text: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Frozen text embeddings as a tensor on ``device``, without a copy where one can be
    avoided: float16 stays float16 (a large catalogue's embeddings held at half the memory;
    the model widens the rows each call uses), anything else becomes float32."""
    tensor = torch.as_tensor(text)
    if tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.float()
    return tensor.to(device)


def score_histories(
    model: CodeTableRecommender,
    item_rows: np.ndarray | torch.Tensor,
    histories: np.ndarray,
    *,
    text: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 512,
) -> np.ndarray:
    """Scores ``[n, n_items]`` of every item after each left-padded history ``[n, T]``."""
    device = next(model.parameters()).device
    rows = torch.as_tensor(np.asarray(item_rows, dtype=np.int64), device=device)
    txt = None if text is None else text_tensor(text, device)
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        vecs = model.item_vectors(rows, txt)
        for start in range(0, len(histories), batch_size):
            batch = torch.as_tensor(histories[start : start + batch_size], device=device)
            batch = _trim(batch[:, -model.config.max_len :])
            out.append(model.score_last(batch, vecs).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, rows.shape[0]), dtype=np.float32)


def _trim(histories: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row (outputs do not change)."""
    width = int((histories >= 0).sum(dim=1).max()) if len(histories) else 0
    return histories[:, histories.shape[1] - max(width, 1) :]


def rank_histories(
    model: CodeTableRecommender,
    item_rows: np.ndarray | torch.Tensor,
    histories: np.ndarray,
    targets: np.ndarray,
    *,
    text: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 512,
    score_budget: int = DEFAULT_SCORE_BUDGET,
    check: Callable[[], None] | None = None,
) -> np.ndarray:
    """0-based full-ranking rank of each target after its left-padded history: the ranks
    of :func:`score_histories`, computed in item chunks (at most ``score_budget`` scores at
    once, whatever the catalogue). ``check`` is called before each chunk (raise to stop)."""
    device = next(model.parameters()).device
    rows = torch.as_tensor(np.asarray(item_rows, dtype=np.int64), device=device)
    txt = None if text is None else text_tensor(text, device)
    hist = torch.as_tensor(np.asarray(histories, dtype=np.int64)[:, -model.config.max_len :])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            vecs = _all_item_vectors(model, rows, txt, check)
            result = evaluate_ranking_chunked(
                _chunk_scorer(model, vecs, hist.to(device)),
                np.asarray(targets, dtype=np.int64),
                len(rows),
                batch_size=batch_size,
                score_budget=score_budget,
                check=check,
            )
    finally:
        model.train(was_training)
    return result.rank


_VECTOR_CHUNK = 1 << 16
"""Item vectors computed at once for ranking (a stop is honoured between chunks)."""


def _all_item_vectors(
    model: CodeTableRecommender,
    rows: torch.Tensor,
    text: torch.Tensor | None,
    check: Callable[[], None] | None,
) -> torch.Tensor:
    """Every item's vector (no grad); a large catalogue in chunks, ``check`` between them,
    written into one tensor (chunks joined by ``torch.cat`` held the vectors twice: +256 MB
    at the peak of a 1M-item validation)."""
    if len(rows) <= _VECTOR_CHUNK:
        return model.item_vectors(rows, text)

    def chunk(a: int) -> torch.Tensor:
        if check is not None:
            check()
        b = a + _VECTOR_CHUNK
        return model.item_vectors(rows[a:b], None if text is None else text[a:b])

    first = chunk(0)
    out = first.new_empty((len(rows), first.shape[1]))
    out[: len(first)] = first
    for a in range(_VECTOR_CHUNK, len(rows), _VECTOR_CHUNK):
        part = chunk(a)
        out[a : a + len(part)] = part
    return out


def _chunk_scorer(
    model: CodeTableRecommender, vecs: torch.Tensor, histories: torch.Tensor
) -> ChunkScoreFn:
    """Per batch of cases: their states once, then scores against any item range."""

    def prepare(idx: np.ndarray) -> ChunkScorer:
        batch = _trim(histories[torch.as_tensor(idx, device=histories.device)])
        states = model.last_states(batch, vecs)
        return lambda start, stop: model.score_chunk(states, batch, vecs[start:stop], start)

    return prepare


def _validate(
    model: CodeTableRecommender,
    rows: torch.Tensor,
    text: torch.Tensor | None,
    histories: torch.Tensor,
    targets: np.ndarray,
    check: Callable[[], None] | None = None,
) -> tuple[float, float]:
    if len(targets) == 0:
        return float("nan"), float("nan")
    model.eval()
    try:
        with torch.no_grad():
            vecs = _all_item_vectors(model, rows, text, check)
            result = evaluate_ranking_chunked(
                _chunk_scorer(model, vecs, histories),
                targets,
                len(rows),
                batch_size=512,
                check=check,
            )
    finally:
        model.train()
    return result.recall, result.ndcg


def _loss(
    model: CodeTableRecommender,
    vecs: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    candidates: torch.Tensor,
    slot: torch.Tensor,
    precision: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Full softmax: cross-entropy of the next item against every one of ``candidates``.

    ``vecs``: every item's vector; ``slot[item]`` is the item's position in ``candidates``
    (every target is a candidate); ``precision``: of the logits' product.
    """
    states = model.encode(inputs, vecs)
    keep = targets >= 0
    states = states[keep]
    logits = model.logits(states, vecs[candidates], precision=precision)
    offset = model.repeat_offset()
    if offset is not None:
        rows, hist_cols = history_pairs(inputs, keep, slot, len(candidates))
        logits = logits.index_put_((rows, hist_cols), offset.expand(len(rows)), accumulate=True)
    return F.cross_entropy(logits, slot[targets[keep]])


def sampled_softmax_loss(
    model: CodeTableRecommender,
    item_rows: torch.Tensor,
    text: torch.Tensor | None,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    pool: torch.Tensor,
    log_q: torch.Tensor,
    precision: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cross-entropy of the next item against a candidate ``pool``, logQ-corrected.

    ``inputs``/``targets`` ``[batch, T]`` item indices (``-1``: padding / no loss);
    ``pool``: sorted unique item indices holding every target (the batch's targets plus
    sampled negatives); ``log_q[j]``: log probability that ``pool[j]`` is in a pool, whose
    subtraction from the logits makes the sampled softmax an unbiased stand-in for the
    full one (Yi et al. 2019); a pool of every item with a uniform ``log_q`` gives the
    full softmax exactly. Item vectors are computed for the pool and the inputs only;
    ``precision``: of the logits' product.
    """
    keep = targets >= 0
    tgt = targets[keep]
    cols = torch.searchsorted(pool, tgt)
    if len(tgt) and not torch.equal(pool[cols.clamp(max=len(pool) - 1)], tgt):
        raise QuantizeError("every target must be in the sampled pool; add the targets to it")
    needed = torch.unique(torch.cat([pool, inputs[inputs >= 0]]))
    vecs = model.item_vectors(item_rows[needed], None if text is None else text[needed])
    local = torch.where(inputs >= 0, torch.searchsorted(needed, inputs.clamp(min=0)), -1)
    pool_local = torch.searchsorted(needed, pool)
    states = model.encode(local, vecs)[keep]
    logits = model.logits(states, vecs[pool_local], precision=precision)
    offset = model.repeat_offset()
    if offset is not None:
        col_of = torch.full((len(needed),), -1, dtype=torch.long, device=needed.device)
        col_of[pool_local] = torch.arange(len(pool), device=needed.device)
        rows, hist_cols = history_pairs(local, keep, col_of, len(pool))
        logits = logits.index_put_((rows, hist_cols), offset.expand(len(rows)), accumulate=True)
    return F.cross_entropy(logits - log_q, cols)


def pool_log_q(
    target_share: torch.Tensor, n_positions: int, n_sampled: int, n_candidates: int
) -> torch.Tensor:
    """Log probability that each item is in a pool of ``n_positions`` targets (each drawn
    with the item's ``target_share`` of the training targets) and ``n_sampled`` uniform
    draws among ``n_candidates`` items: ``log(1 - (1 - 1/N)^S (1 - share)^P)``."""
    miss = n_sampled * math.log1p(-1.0 / n_candidates) if n_candidates > 1 else -math.inf
    absent = miss + n_positions * torch.log1p(-target_share.clamp(max=1.0))
    return torch.log(-torch.expm1(absent)).clamp(min=-80.0)


def train_domain(
    item_rows: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    *,
    model_config: ModelConfig | None = None,
    config: TrainConfig | None = None,
    text: np.ndarray | None = None,
    init_from: Mapping[str, np.ndarray] | None = None,
    new_since: int | None = None,
    n_rows: int | None = None,
    progress: Callable[[EpochReport], None] | None = None,
    check: Callable[[], None] | None = None,
) -> TrainResult:
    """Train (or fine-tune) a domain model on its interaction log; see the module docstring.

    ``item_rows``: ``[n_items, max_code_len]`` table row ids per item (``-1`` padding);
    ``items`` index its rows. ``text``: ``[n_items, text_dim]`` frozen text embeddings when
    ``model_config.text_dim > 0``. ``init_from``: params to start from (a previous version,
    or a pretrained model of another domain sharing the codebook). ``new_since``: train on
    windows with targets at/after this timestamp plus a replay sample of older windows.
    ``n_rows``: table size (default ``item_rows.max() + 1``). ``check``: called before every
    step and every validation batch; an exception raised from it stops training and
    propagates (e.g. a shutdown). ``max_seconds`` is checked as often (see
    :attr:`TrainResult.out_of_time`).
    """
    mcfg = model_config or ModelConfig()
    cfg = config or TrainConfig()
    rows_np = check_item_rows(item_rows)
    _check_call(mcfg, cfg, rows_np.shape[0], text, init_from, new_since)
    started = time.perf_counter()
    data = _prepare(
        users, items, timestamps, rows_np.shape[0], mcfg.max_len, new_since, validate=True
    )
    if check is not None:
        check()
    run = _Run(
        rows_np, data, mcfg, cfg, text, init_from, new_since, n_rows, _device(cfg.device), check
    )
    with _seeded_torch(run.device, cfg):
        return _train(run, progress, started)


def _check_call(
    mcfg: ModelConfig,
    cfg: TrainConfig,
    n_items: int,
    text: np.ndarray | None,
    init_from: Mapping[str, np.ndarray] | None,
    new_since: int | None,
) -> None:
    """Reject the combinations of arguments that :func:`train_domain` cannot train."""
    if mcfg.text_dim and (text is None or np.asarray(text).shape != (n_items, mcfg.text_dim)):
        got = None if text is None else np.asarray(text).shape
        raise QuantizeError(
            f"model_config.text_dim={mcfg.text_dim} needs text embeddings of shape "
            f"({n_items}, {mcfg.text_dim}), got {got}; pass the items' frozen embeddings"
        )
    if cfg.trainable == "domain" and init_from is None:
        raise QuantizeError(
            "trainable='domain' freezes the shared encoder, so init_from must give trained "
            "shared parameters; pass a pretrained model or use trainable='all'"
        )
    if new_since is not None and init_from is None:
        raise QuantizeError(
            "incremental training (new_since) adapts a previous version; pass it as init_from"
        )


@contextmanager
def _seeded_torch(device: torch.device, cfg: TrainConfig) -> Iterator[None]:
    """The global torch RNG seeded with ``cfg.seed`` and ``cfg.threads`` CPU threads; both
    are restored on exit."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            yield
    finally:
        torch.set_num_threads(previous_threads)


@dataclass(frozen=True)
class _Run:
    """The checked inputs of one :func:`train_domain` run."""

    item_rows: np.ndarray  # int64 [n_items, max_code_len]
    data: _Data
    model_config: ModelConfig
    config: TrainConfig
    text: np.ndarray | None
    init_from: Mapping[str, np.ndarray] | None
    new_since: int | None
    n_rows: int | None
    device: torch.device
    check: Callable[[], None] | None = None

    @property
    def n_items(self) -> int:
        return int(self.item_rows.shape[0])

    @property
    def loss(self) -> Literal["full", "sampled"]:
        """The loss of this run, by the config's rule on the catalogue size."""
        return self.config.loss_for(self.n_items)

    def planned_epochs(self) -> int:
        """Epochs by the config's rule; an incremental run gets its share of them."""
        cfg = self.config
        epochs = cfg.epochs_for(int(self.data.windows.lengths.sum()))
        if self.new_since is not None and cfg.epochs is None:
            epochs = max(1, round(cfg.incremental_share * epochs))
        return epochs


@dataclass(frozen=True)
class _TrainingSet:
    """The chosen training windows (padded a step at a time: :meth:`batch`)."""

    windows: _Windows
    chosen: np.ndarray  # window indices
    lengths: np.ndarray  # pairs per chosen window
    device: torch.device

    @property
    def n_targets(self) -> int:
        return int(self.lengths.sum())

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, on the device) of the chosen windows ``idx``, padded
        to their longest."""
        width = int(self.lengths[idx].max())
        windows = self.chosen[idx]
        inputs = self.windows.inputs(windows, width)
        targets = self.windows.targets(windows, width)
        return (
            torch.as_tensor(inputs, device=self.device).long(),
            torch.as_tensor(targets, device=self.device).long(),
        )

    def target_counts(self, n_items: int) -> np.ndarray:
        """How often each item is a target of the chosen windows."""
        return self.windows.item_counts(self.chosen, n_items, inputs=False)


@dataclass(frozen=True)
class _ValidationSet:
    """Validation histories (on the device) and their targets, shortest histories first."""

    histories: torch.Tensor
    targets: np.ndarray


@dataclass(frozen=True)
class _Best:
    """The best validation epoch so far: its score (NDCG, or ``-epoch`` when NaN), metrics
    and parameters."""

    score: float
    epoch: int
    recall: float
    ndcg: float
    params: Params


def _train(
    run: _Run, progress: Callable[[EpochReport], None] | None, started: float
) -> TrainResult:
    """One training run; the random numbers are drawn in this order for a given seed.

    1. Build the model (warm-started, frozen where asked).
    2. Choose the training windows (new ones plus a replay sample when incremental).
    3. Choose the validation users.
    4. Train epochs of shuffled batches, validating after each, until the plan, the
       patience or the time budget ends.
    5. Return the parameters of the best validation epoch.
    """
    rng = np.random.default_rng(run.config.seed)
    model, params = _build(run)
    train = _training_set(run, rng)
    val = _validation_set(run, rng)
    trainer = _Trainer(run, model, params, train, val, rng, started)
    fit = _fit(trainer, progress, started)
    best = fit.best
    return TrainResult(
        params=export_params(model) if best is None else best.params,
        config=run.model_config,
        epochs_run=len(fit.history),
        best_epoch=0 if best is None else best.epoch,
        wall_s=time.perf_counter() - started,
        trainable_params=count_parameters(params),
        n_windows=len(train.chosen),
        n_targets=train.n_targets,
        val_recall=float("nan") if best is None else best.recall,
        val_ndcg=float("nan") if best is None else best.ndcg,
        history=fit.history,
        seen_items=_seen(run.data.windows, run.n_items),
        loss=run.loss,
        out_of_time=fit.out_of_time,
        steps=trainer.steps_done,
    )


def _build(run: _Run) -> tuple[CodeTableRecommender, list[torch.nn.Parameter]]:
    """The model on the device, loaded from ``init_from``, and its trained parameters (the
    domain's only, the shared ones frozen, when ``trainable="domain"``); with the sampled
    loss the code rows get sparse gradients."""
    model = build_model(run.model_config, run.item_rows, run.n_rows)
    if run.init_from is not None:
        load_params(model, run.init_from, partial=True)
    model.to(run.device)
    model.table.sparse_rows = run.loss == "sampled"
    if run.config.trainable == "domain":
        for p in model.shared_parameters():
            p.requires_grad_(False)
        return model, model.domain_parameters()
    return model, list(model.parameters())


def _training_set(run: _Run, rng: np.random.Generator) -> _TrainingSet:
    """All windows, or the new ones plus a replay sample of old ones; none is an error."""
    windows = run.data.windows
    chosen = _select_windows(windows, run.new_since, run.config.replay_ratio, rng)
    if len(chosen) == 0:
        raise QuantizeError(
            "no training windows: every user has at most one interaction besides the "
            "validation target (or none is new); collect more interactions before training"
        )
    return _TrainingSet(windows, chosen, windows.lengths[chosen], run.device)


def _validation_set(run: _Run, rng: np.random.Generator) -> _ValidationSet:
    """The users to validate on: those with a new target when an incremental run validates
    on them and has ``min_val_users`` of them, capped at ``val_users`` and at
    ``val_item_scores / n_items`` (at least ``min_val_users``; a seeded sample)."""
    cfg = run.config
    targets, histories = run.data.val_targets, run.data.val_histories
    if run.new_since is not None and cfg.incremental_validation == "new":
        recent = run.data.val_times >= run.new_since
        if recent.sum() >= cfg.min_val_users:
            targets, histories = targets[recent], histories[recent]
    cap = max(cfg.min_val_users, cfg.val_item_scores // run.n_items)
    if cfg.val_users is not None:
        cap = min(cap, cfg.val_users)
    if len(targets) > cap:
        keep = np.sort(rng.choice(len(targets), size=cap, replace=False))
        targets, histories = targets[keep], histories[keep]
    by_length = np.argsort((histories >= 0).sum(axis=1), kind="stable")  # cheap batches
    return _ValidationSet(
        histories=torch.as_tensor(histories[by_length], device=run.device),
        targets=targets[by_length],
    )


class _OutOfTime(QuantizeError):
    """Internal: ``max_seconds`` ran out (raised between steps, caught by :func:`_fit`)."""


class _Trainer:
    """The optimisation of one run: epochs of steps over shuffled batches, with the
    learning rate decaying over the planned steps, and validation; the budget and the
    ``check`` callback are honoured before every step and validation batch."""

    def __init__(
        self,
        run: _Run,
        model: CodeTableRecommender,
        params: list[torch.nn.Parameter],
        train: _TrainingSet,
        val: _ValidationSet,
        rng: np.random.Generator,
        started: float,
    ) -> None:
        cfg = run.config
        self.config = cfg
        self.run = run
        self.model = model
        self.train = train
        self.val = val
        self.rng = rng
        self.started = started
        self.sampled = run.loss == "sampled"
        self.optimizers = _optimizers(model, params, cfg, self.sampled)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.rows = torch.as_tensor(run.item_rows, device=run.device)
        self.text = None if run.text is None else text_tensor(run.text, run.device)
        self.candidates, self.slot = _candidates(
            run.data.windows, run.n_items, cfg.softmax_items, run.device
        )
        self.target_share = _target_share(train.target_counts(run.n_items), run.device)
        self.precision = logits_precision(cfg, run.device)
        self.planned_epochs = run.planned_epochs()
        self.total_steps = self.planned_epochs * len(self._batches())
        if cfg.epoch_steps is not None:
            self.total_steps = min(self.total_steps, self.planned_epochs * cfg.epoch_steps)
        self.steps_done = 0
        model.train()

    def _batches(self) -> list[np.ndarray]:
        """One epoch's batches: a shuffled pass, cut to ``epoch_steps``."""
        batches = _batches(self.train.lengths, self.config.batch_tokens, self.rng)
        return batches if self.config.epoch_steps is None else batches[: self.config.epoch_steps]

    def check(self) -> None:
        """Raise when asked to stop (the run's ``check``) or out of time."""
        if self.run.check is not None:
            self.run.check()
        limit = self.config.max_seconds
        if limit is not None and time.perf_counter() - self.started >= limit:
            raise _OutOfTime

    def epoch(self) -> float:
        """One pass over the training windows, cut to ``epoch_steps`` steps and to
        ``EPOCH_BUDGET_SHARE`` of ``max_seconds``; returns the mean batch loss."""
        total = 0.0
        steps = 0
        began = time.perf_counter()
        limit = self.config.max_seconds
        for idx in self._batches():
            self.check()
            total += self._step(idx)
            steps += 1
            if limit is not None and time.perf_counter() - began >= EPOCH_BUDGET_SHARE * limit:
                break
        return total / max(steps, 1)

    def _step(self, idx: np.ndarray) -> float:
        """One optimiser step on the windows ``idx`` (padded to their longest input)."""
        inputs, targets = self.train.batch(idx)
        loss = self._sampled(inputs, targets) if self.sampled else self._full(inputs, targets)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        self.steps_done += 1
        if self.config.lr_decay:
            self._decay_lr()
        return float(loss.detach())

    def _full(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The full softmax: every item's vector, every candidate scored."""
        vecs = self.model.item_vectors(self.rows, self.text)
        return _loss(self.model, vecs, inputs, targets, self.candidates, self.slot, self.precision)

    def _sampled(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The sampled softmax over the batch's targets and ``negatives`` uniform draws."""
        tgt = targets[targets >= 0]
        n = len(self.candidates)
        draw = torch.randint(0, n, (self.config.negatives,), generator=self.generator)
        pool = torch.unique(torch.cat([tgt, self.candidates[draw.to(tgt.device)]]))
        log_q = pool_log_q(self.target_share[pool], len(tgt), self.config.negatives, n)
        return sampled_softmax_loss(
            self.model, self.rows, self.text, inputs, targets, pool, log_q, self.precision
        )

    def _decay_lr(self) -> None:
        """Linear decay from ``lr`` to ``lr_floor * lr`` over the planned steps."""
        cfg = self.config
        share = min(1.0, self.steps_done / self.total_steps)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * (1.0 - (1.0 - cfg.lr_floor) * share)

    def validate(self) -> tuple[float, float]:
        """Recall@10 and NDCG@10 on the validation users."""
        return _validate(
            self.model, self.rows, self.text, self.val.histories, self.val.targets, self.check
        )


BFLOAT16_MIN_SPEEDUP = 1.3
"""``logits_precision="auto"`` multiplies in bfloat16 when that is at least this much faster."""

_BFLOAT16_PAYS: dict[tuple[str, int], bool] = {}


def logits_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype of the training logits' product under ``cfg.logits_precision``."""
    if cfg.logits_precision == "auto":
        return torch.bfloat16 if bfloat16_pays(device) else torch.float32
    return torch.bfloat16 if cfg.logits_precision == "bfloat16" else torch.float32


def bfloat16_pays(device: torch.device) -> bool:
    """Whether a logits-shaped product (800 states x 2,048 candidates x 64) runs at least
    :data:`BFLOAT16_MIN_SPEEDUP` times faster in bfloat16 than in float32 on ``device`` with
    the current thread count: measured once per process and thread count (best of five,
    ~0.1 s), then cached. CPUs that multiply bfloat16 natively (AVX512-BF16, AMX) gain about
    2.5x; others emulate it and lose. CUDA keeps float32 (not measured)."""
    if device.type != "cpu":
        return False
    key = (device.type, torch.get_num_threads())
    if key not in _BFLOAT16_PAYS:
        gen = torch.Generator().manual_seed(0)  # not the training run's random numbers
        a, b = torch.rand(800, 64, generator=gen), torch.rand(2048, 64, generator=gen)
        single = _best_seconds(lambda: a @ b.T)
        a16, b16 = a.bfloat16(), b.bfloat16()
        half = _best_seconds(lambda: a16 @ b16.T)
        _BFLOAT16_PAYS[key] = single >= BFLOAT16_MIN_SPEEDUP * half
    return _BFLOAT16_PAYS[key]


def _best_seconds(fn: Callable[[], object], repeats: int = 5, calls: int = 3) -> float:
    """The best of ``repeats`` timings of ``calls`` calls of ``fn`` (after one warm-up)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - began)
    return best


def _optimizers(
    model: CodeTableRecommender,
    params: list[torch.nn.Parameter],
    cfg: TrainConfig,
    sparse: bool,
) -> list[torch.optim.Optimizer]:
    """AdamW over ``params``; with sparse rows, the code rows apart under sparse Adam (only
    the rows a step used move; no weight decay on them)."""
    rows = model.table.rows
    if not sparse or not any(p is rows for p in params):
        return [torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    dense = [p for p in params if p is not rows]
    out: list[torch.optim.Optimizer] = [torch.optim.SparseAdam([rows], lr=cfg.lr)]
    if dense:
        out.append(torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return out


def _target_share(counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """Each item's share of the training targets (float64 ``[n_items]``) from their counts."""
    share = torch.as_tensor(counts, dtype=torch.float64, device=device)
    return share / max(int(counts.sum()), 1)


@dataclass(frozen=True)
class _Fit:
    best: _Best | None
    history: list[EpochReport]
    out_of_time: bool


def _fit(trainer: _Trainer, progress: Callable[[EpochReport], None] | None, started: float) -> _Fit:
    """Train the planned epochs, keeping the best validation epoch; stop early when the
    patience or the time budget runs out (an epoch cut by the budget is dropped, and one
    that the budget's rest cannot fit, judged by the last epoch's length, is not begun). Returns
    the best epoch (``None`` when none was validated in time) and every epoch's report."""
    cfg = trainer.config
    history: list[EpochReport] = []
    best: _Best | None = None
    last_epoch_s = 0.0
    for epoch in range(1, trainer.planned_epochs + 1):
        if best is not None and not _fits(cfg.max_seconds, started, last_epoch_s):
            return _Fit(best, history, out_of_time=True)
        epoch_began = time.perf_counter()
        try:
            loss = trainer.epoch()
            recall, ndcg = trainer.validate()
        except _OutOfTime:
            return _Fit(best, history, out_of_time=True)
        last_epoch_s = time.perf_counter() - epoch_began
        score = ndcg if not np.isnan(ndcg) else -float(epoch)
        if best is None or score > best.score:
            best = _Best(score, epoch, recall, ndcg, export_params(trainer.model))
        report = EpochReport(
            epoch=epoch,
            loss=loss,
            val_recall=recall,
            val_ndcg=ndcg,
            elapsed_s=time.perf_counter() - started,
            best_epoch=best.epoch,
            planned_epochs=trainer.planned_epochs,
        )
        history.append(report)
        if progress is not None:
            progress(report)
        if cfg.patience and epoch - best.epoch >= cfg.patience:
            break
        if cfg.max_seconds is not None and report.elapsed_s >= cfg.max_seconds:
            return _Fit(best, history, out_of_time=True)
    return _Fit(best, history, out_of_time=False)


def _fits(max_seconds: float | None, started: float, epoch_s: float) -> bool:
    """Whether another epoch, as long as the last one (its validation included), ends
    within ``max_seconds`` of ``started``. One that would not is not begun: the budget would
    cut it and drop it, so its time would be spent for nothing (at 1M items an epoch and its
    validation take about half of a 300 s budget)."""
    return max_seconds is None or time.perf_counter() - started + epoch_s <= max_seconds
