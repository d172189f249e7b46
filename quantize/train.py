"""Per-domain training of a :class:`~quantize.table_model.CodeTableRecommender`.

:func:`train_domain` trains next-item prediction over a domain's interaction log (parallel
arrays: user index, item index, timestamp). Every user's time-ordered sequence is cut into
windows of ``max_len`` inputs from the end; every position predicts the next item
(SASRec-style), with a full softmax over the domain's items (or shared sampled negatives
for very large domains). The last interaction of every user is held out as the validation
target for early stopping; the parameters of the best validation epoch are returned.

Warm starts: ``init_from`` loads a previous version or a cross-domain pretrained model
(shapes that grew, e.g. more table rows, keep their fresh initialisation beyond the copied
overlap). With ``new_since`` only windows holding interactions at or after that timestamp
are trained, plus a replay sample of older windows (incremental adaptation).
``trainable="domain"`` freezes the shared encoder so only the domain table moves.

Deterministic for a seed on a given device and thread count; the global torch RNG and
thread count are restored on return.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from quantize.evaluate import evaluate_ranking, pad_histories, time_order
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

Trainable = Literal["all", "domain"]
SoftmaxItems = Literal["seen", "all"]
IncrementalValidation = Literal["new", "all"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the same rule for every domain).

    Length of training:

    * ``epochs``: passes over the training windows; ``None`` sets it by rule from the data
      size, ``ceil(position_budget / trained positions per epoch)`` clipped to
      ``[min_epochs, max_epochs]``, so small domains get more passes and large ones fewer.
    * ``patience``: epochs without a validation NDCG@10 gain before stopping (0 = never).
    * ``max_seconds``: stop after the epoch that crosses this wall time.

    Optimisation: ``batch_tokens`` positions per step (windows of similar length are packed
    up to this many, padding included); AdamW with ``lr`` and ``weight_decay``; with
    ``lr_decay`` the rate falls linearly over the planned epochs to ``lr_floor * lr``.

    What is trained: ``trainable="all"``, or ``"domain"`` (shared encoder frozen).
    ``softmax_items="seen"`` ranks targets against the items of the training log only, so
    items without any interaction (new items) are never pushed down as negatives and keep
    the score their codes and text give them; ``"all"`` uses every item. ``negatives``: 0 =
    full softmax, else that many uniformly sampled candidates shared by a batch.

    Incremental runs (``new_since``): ``replay_ratio`` old windows are sampled per new
    window; with ``epochs=None`` they get ``incremental_share`` of the epochs the rule
    gives the whole log. With ``incremental_validation="new"`` the epoch is chosen on the
    validation targets at/after ``new_since`` (the behaviour the version adapts to; also
    cheaper, in proportion to the new data) when there are at least ``min_val_users`` of
    them, else on all; ``"all"`` always validates on every user.

    Runtime: ``threads`` torch CPU threads while training (restored after); ``device``
    ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; ``val_users`` caps the
    validation users (a seeded sample), ``None`` = all.
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
    negatives: int = 0
    softmax_items: SoftmaxItems = "seen"
    incremental_validation: IncrementalValidation = "new"
    min_val_users: int = 100
    seed: int = 0
    threads: int = 1
    device: str = "auto"
    max_seconds: float | None = None
    val_users: int | None = 10_000

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
        if self.replay_ratio < 0 or self.negatives < 0:
            problems.append("replay_ratio and negatives must be >= 0")
        if self.incremental_validation not in ("new", "all") or self.min_val_users < 0:
            problems.append(
                f"incremental_validation={self.incremental_validation!r} must be 'new' or "
                f"'all' and min_val_users={self.min_val_users} >= 0"
            )
        if self.softmax_items not in ("seen", "all"):
            problems.append(f"softmax_items={self.softmax_items!r} is not 'seen' or 'all'")
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
        }


@dataclass(frozen=True)
class _Windows:
    inputs: np.ndarray  # int64 [n_windows, max_len], left-padded with -1
    targets: np.ndarray  # int64 [n_windows, max_len], -1 = no loss at this position
    is_new: np.ndarray  # bool [n_windows]: holds a target at/after new_since


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
    order = time_order(u, ts)
    su, si, st = u[order], it[order], ts[order]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]]) if su.size else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(su)].astype(np.int64)
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    is_new: list[bool] = []
    val_hist: list[np.ndarray] = []
    val_tgt: list[int] = []
    val_ts: list[int] = []
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        seq = si[a:b]
        stamps = st[a:b]
        if validate and len(seq) >= 2:
            val_hist.append(seq[:-1])
            val_tgt.append(int(seq[-1]))
            val_ts.append(int(stamps[-1]))
            seq, stamps = seq[:-1], stamps[:-1]
        # pairs (input seq[i], target seq[i + 1]) for i < len(seq) - 1, cut from the end
        end = len(seq) - 1
        while end > 0:
            begin = max(0, end - max_len)
            inp = np.full(max_len, -1, dtype=np.int64)
            tgt = np.full(max_len, -1, dtype=np.int64)
            inp[max_len - (end - begin) :] = seq[begin:end]
            tgt[max_len - (end - begin) :] = seq[begin + 1 : end + 1]
            inputs.append(inp)
            targets.append(tgt)
            is_new.append(
                new_since is not None and bool((stamps[begin + 1 : end + 1] >= new_since).any())
            )
            end = begin
    shape = (len(inputs), max_len)
    windows = _Windows(
        inputs=np.stack(inputs) if inputs else np.zeros(shape, np.int64),
        targets=np.stack(targets) if targets else np.zeros(shape, np.int64),
        is_new=np.asarray(is_new, dtype=bool),
    )
    return _Data(
        windows,
        pad_histories(val_hist, max_len),
        np.asarray(val_tgt, dtype=np.int64),
        np.asarray(val_ts, dtype=np.int64),
    )


def _select_windows(
    windows: _Windows, new_since: int | None, replay_ratio: float, rng: np.random.Generator
) -> np.ndarray:
    if new_since is None:
        return np.arange(len(windows.inputs))
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
    used = np.concatenate([windows.inputs.ravel(), windows.targets.ravel()])
    seen = np.zeros(n_items, dtype=bool)
    seen[used[used >= 0]] = True
    return seen


def _candidates(
    windows: _Windows, n_items: int, softmax_items: SoftmaxItems, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax candidates (sorted item ids) and each item's slot among them (-1: none)."""
    if softmax_items == "all":
        ids = np.arange(n_items)
    else:
        used = np.concatenate([windows.inputs.ravel(), windows.targets.ravel()])
        ids = np.unique(used[used >= 0])
    slot = np.full(n_items, -1, dtype=np.int64)
    slot[ids] = np.arange(len(ids))
    return torch.as_tensor(ids, device=device), torch.as_tensor(slot, device=device)


def shared_init(params: Mapping[str, np.ndarray], shared_rows: int) -> Params:
    """Params of another domain's model reduced to what a new domain can reuse.

    With one codebook for all domains, the first ``shared_rows`` table rows (the level rows,
    ``L * K``) mean the same codewords everywhere; rows beyond them (disambiguation rows)
    belong to that domain's items, so they are dropped and start fresh in the new domain.
    Everything else (encoder, text projection, level weights, repeat bias) is kept. Pass
    the result as ``init_from``.
    """
    key = DOMAIN_PREFIX + "rows"
    if key not in params:
        raise QuantizeError(f"params lack {key!r}; pass a full export from export_params")
    if not 0 < shared_rows <= params[key].shape[0]:
        raise QuantizeError(
            f"shared_rows={shared_rows} must be in [1, {params[key].shape[0]}] (the table's "
            "rows); pass levels * k of the shared codebook"
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
    txt = (
        None if text is None else torch.as_tensor(np.asarray(text, dtype=np.float32), device=device)
    )
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


def _validate(
    model: CodeTableRecommender,
    rows: torch.Tensor,
    text: torch.Tensor | None,
    histories: torch.Tensor,
    targets: np.ndarray,
) -> tuple[float, float]:
    if len(targets) == 0:
        return float("nan"), float("nan")
    model.eval()
    with torch.no_grad():
        vecs = model.item_vectors(rows, text)

        def score(idx: np.ndarray) -> torch.Tensor:
            batch = histories[torch.as_tensor(idx, device=histories.device)]
            return model.score_last(_trim(batch), vecs)

        result = evaluate_ranking(score, targets, batch_size=512)
    model.train()
    return result.recall, result.ndcg


def _loss(
    model: CodeTableRecommender,
    vecs: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    candidates: torch.Tensor,
    slot: torch.Tensor,
    negatives: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Cross-entropy of the next item against ``candidates`` (all of them, or a sample).

    ``slot[item]`` is the item's position in ``candidates`` (every target is a candidate).
    """
    states = model.encode(inputs, vecs)
    keep = targets >= 0
    states = states[keep]
    tgt = targets[keep]
    if negatives <= 0 or negatives >= len(candidates):
        cols, col_of, target_cols = candidates, slot, slot[tgt]
    else:
        draw = torch.randint(0, len(candidates), (negatives,), generator=generator)
        sampled = candidates[draw.to(candidates.device)]
        cols, inverse = torch.unique(torch.cat([tgt, sampled]), return_inverse=True)
        col_of = torch.full_like(slot, -1)
        col_of[cols] = torch.arange(len(cols), device=cols.device)
        target_cols = inverse[: len(tgt)]
    logits = model.logits(states, vecs[cols])
    offset = model.repeat_offset()
    if offset is not None:
        rows, hist_cols = history_pairs(inputs, keep, col_of, len(cols))
        logits = logits.index_put_((rows, hist_cols), offset.expand(len(rows)), accumulate=True)
    return F.cross_entropy(logits, target_cols)


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
) -> TrainResult:
    """Train (or fine-tune) a domain model on its interaction log; see the module docstring.

    ``item_rows``: ``[n_items, max_code_len]`` table row ids per item (``-1`` padding);
    ``items`` index its rows. ``text``: ``[n_items, text_dim]`` frozen text embeddings when
    ``model_config.text_dim > 0``. ``init_from``: params to start from (a previous version,
    or a pretrained model of another domain sharing the codebook). ``new_since``: train on
    windows with targets at/after this timestamp plus a replay sample of older windows.
    ``n_rows``: table size (default ``item_rows.max() + 1``).
    """
    mcfg = model_config or ModelConfig()
    cfg = config or TrainConfig()
    rows_np = check_item_rows(item_rows)
    n_items = rows_np.shape[0]
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
    started = time.perf_counter()
    data = _prepare(users, items, timestamps, n_items, mcfg.max_len, new_since, validate=True)
    device = _device(cfg.device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            return _run(
                rows_np,
                data,
                mcfg,
                cfg,
                text,
                init_from,
                new_since,
                n_rows,
                device,
                progress,
                started,
            )
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    rows_np: np.ndarray,
    data: _Data,
    mcfg: ModelConfig,
    cfg: TrainConfig,
    text: np.ndarray | None,
    init_from: Mapping[str, np.ndarray] | None,
    new_since: int | None,
    n_rows: int | None,
    device: torch.device,
    progress: Callable[[EpochReport], None] | None,
    started: float,
) -> TrainResult:
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_model(mcfg, rows_np, n_rows)
    if init_from is not None:
        load_params(model, init_from, partial=True)
    model.to(device)
    if cfg.trainable == "domain":
        for p in model.shared_parameters():
            p.requires_grad_(False)
        params = model.domain_parameters()
    else:
        params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = torch.as_tensor(rows_np, device=device)
    txt = (
        None if text is None else torch.as_tensor(np.asarray(text, dtype=np.float32), device=device)
    )
    chosen = _select_windows(data.windows, new_since, cfg.replay_ratio, rng)
    inputs = torch.as_tensor(data.windows.inputs[chosen], device=device)
    targets = torch.as_tensor(data.windows.targets[chosen], device=device)
    lengths_np = (data.windows.inputs[chosen] >= 0).sum(axis=1)
    val_targets = data.val_targets
    val_hist_np = data.val_histories
    if new_since is not None and cfg.incremental_validation == "new":
        recent = data.val_times >= new_since
        if recent.sum() >= cfg.min_val_users:
            val_targets, val_hist_np = val_targets[recent], val_hist_np[recent]
    if cfg.val_users is not None and len(val_targets) > cfg.val_users:
        keep = np.sort(rng.choice(len(val_targets), size=cfg.val_users, replace=False))
        val_targets, val_hist_np = val_targets[keep], val_hist_np[keep]
    by_length = np.argsort((val_hist_np >= 0).sum(axis=1), kind="stable")
    val_targets, val_hist_np = val_targets[by_length], val_hist_np[by_length]  # cheap batches
    val_hist = torch.as_tensor(val_hist_np, device=device)
    n_targets = int((targets >= 0).sum())
    candidates, slot = _candidates(data.windows, rows_np.shape[0], cfg.softmax_items, device)
    history: list[EpochReport] = []
    best = (-1.0, 0, float("nan"), float("nan"))  # ndcg, epoch, recall, ndcg
    best_params: Params | None = None
    if len(chosen) == 0:
        raise QuantizeError(
            "no training windows: every user has at most one interaction besides the "
            "validation target (or none is new); collect more interactions before training"
        )
    model.train()
    done = 0
    epochs = cfg.epochs_for(int((data.windows.targets >= 0).sum()))
    if new_since is not None and cfg.epochs is None:
        epochs = max(1, round(cfg.incremental_share * epochs))
    total_steps = epochs * len(_batches(lengths_np, cfg.batch_tokens, rng))
    for epoch in range(1, epochs + 1):
        total = 0.0
        steps = 0
        for idx in _batches(lengths_np, cfg.batch_tokens, rng):
            batch = torch.as_tensor(idx, device=device)
            width = int(lengths_np[idx].max())
            vecs = model.item_vectors(rows, txt)
            loss = _loss(
                model,
                vecs,
                inputs[batch, -width:],
                targets[batch, -width:],
                candidates,
                slot,
                cfg.negatives,
                generator,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if cfg.lr_decay:
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * (
                        1.0 - (1.0 - cfg.lr_floor) * min(1.0, done / total_steps)
                    )
            total += float(loss.detach())
            steps += 1
        recall, ndcg = _validate(model, rows, txt, val_hist, val_targets)
        score = ndcg if not np.isnan(ndcg) else -float(epoch)
        if best_params is None or score > best[0]:
            best = (score, epoch, recall, ndcg)
            best_params = export_params(model)
        report = EpochReport(
            epoch=epoch,
            loss=total / max(steps, 1),
            val_recall=recall,
            val_ndcg=ndcg,
            elapsed_s=time.perf_counter() - started,
            best_epoch=best[1],
            planned_epochs=epochs,
        )
        history.append(report)
        if progress is not None:
            progress(report)
        if cfg.patience and epoch - best[1] >= cfg.patience:
            break
        if cfg.max_seconds is not None and report.elapsed_s >= cfg.max_seconds:
            break
    if best_params is None:  # unreachable: epochs >= 1 always sets it
        raise QuantizeError("training ran no epoch; set epochs >= 1")
    trainable = count_parameters(params)
    return TrainResult(
        params=best_params,
        config=mcfg,
        epochs_run=len(history),
        best_epoch=best[1],
        wall_s=time.perf_counter() - started,
        trainable_params=trainable,
        n_windows=len(chosen),
        n_targets=n_targets,
        val_recall=best[2],
        val_ndcg=best[3],
        history=history,
        seen_items=_seen(data.windows, rows_np.shape[0]),
    )
