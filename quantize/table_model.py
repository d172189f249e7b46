"""The per-domain code-table recommender: code-row item vectors plus a shared sequence encoder.

An item is represented by its *served code*, mapped to table rows by the caller (see
:mod:`quantize.assign`): a padded row-id matrix ``[n_items, max_code_len]`` with ``-1`` as
padding, so any length policy (fixed, adaptive, one row per item for an ID baseline) plugs in.
The item vector is the (optionally per-level weighted) sum of its code rows, optionally plus a
trainable projection of the frozen text embedding. A user is the sequence of recent items,
encoded by a small causal transformer (SASRec-like) or a single causal attention-pooling layer.
Scores are cosine similarity over a temperature (VQ-Rec) or a plain dot product.

Parameters are split in two groups, by name:

* ``table.*``: the *domain* part (code rows, level weights, text projection, repeat bias),
  fine-tuned per domain;
* ``encoder.*``: the *shared* part (sequence encoder), trained across domains and frozen in a
  per-domain fine-tune.

Serving new items: an item without training interactions has no trained vector of its own;
:func:`borrow_trained_codes` serves it the deepest prefix of its path that several trained
items' codes share, so its vector is made of rows trained by a group of its relatives, plus
its own text.

:func:`export_params` / :func:`load_params` convert to and from plain numpy arrays (exact round
trip), and :class:`Snapshot` packs the arrays with their :class:`ModelConfig` into bytes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantize.exceptions import QuantizeError

Params = dict[str, np.ndarray]
"""Model parameters as plain arrays, keyed by ``state_dict`` name."""

DOMAIN_PREFIX = "table."
"""Name prefix of the per-domain parameters (everything else is shared)."""

SHARED_PREFIX = "encoder."
"""Name prefix of the shared (cross-domain) parameters."""

PAD = -1
"""Padding value in row-id and item-id matrices."""

_CONFIG_KEY = "__config__"

EncoderKind = Literal["transformer", "attention"]
Combine = Literal["sum", "level"]
ScoreKind = Literal["cosine", "dot"]


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a :class:`CodeTableRecommender` (the same for every domain).

    ``hidden``: width of the rows and of the encoder. ``max_len``: the number of most recent
    items a user is encoded from. ``encoder``: ``"transformer"`` (causal, SASRec-like) or
    ``"attention"`` (one causal attention-pooling layer with recency biases). ``combine``:
    ``"sum"`` of the code rows, or ``"level"`` (a learned weight per code position).
    ``text_dim``: width of the frozen text embedding projected into item vectors (0 = off).
    ``text_hidden``: width of the text adaptor's hidden layer: the embedding is mapped by
    ``W @ gelu(A @ e + b)`` (``A`` ``[text_hidden, text_dim]``), or by one linear map ``W @ e``
    with ``0`` (configurations written before the adaptor existed read as ``0``).
    ``score``: ``"cosine"`` (divided by ``temperature``) or ``"dot"``. ``repeat_bias``: a
    learned per-domain score offset for items already in the encoded history (how likely
    users are to consume an item again: negative where they never do, positive where they
    re-buy); learned from the data, never imposed.
    """

    hidden: int = 64
    max_len: int = 200
    encoder: EncoderKind = "transformer"
    layers: int = 1
    heads: int = 2
    dropout: float = 0.2
    combine: Combine = "sum"
    text_dim: int = 0
    score: ScoreKind = "cosine"
    temperature: float = 0.07
    repeat_bias: bool = True
    text_hidden: int = 128

    def __post_init__(self) -> None:
        problems = []
        if self.hidden < 1 or self.max_len < 1 or self.layers < 1 or self.heads < 1:
            problems.append("hidden, max_len, layers and heads must be >= 1")
        elif self.hidden % self.heads:
            problems.append(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} is outside [0, 1)")
        if self.encoder not in ("transformer", "attention"):
            problems.append(f"encoder={self.encoder!r} is not 'transformer' or 'attention'")
        if self.combine not in ("sum", "level"):
            problems.append(f"combine={self.combine!r} is not 'sum' or 'level'")
        if self.score not in ("cosine", "dot"):
            problems.append(f"score={self.score!r} is not 'cosine' or 'dot'")
        if self.text_dim < 0 or self.text_hidden < 0 or self.temperature <= 0:
            problems.append("text_dim and text_hidden must be >= 0 and temperature > 0")
        if problems:
            raise QuantizeError(
                "invalid ModelConfig: " + "; ".join(problems) + "; fix the model configuration"
            )

    def to_dict(self) -> dict[str, object]:
        """The configuration as JSON-compatible values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ModelConfig:
        """Rebuild a configuration written by :meth:`to_dict` (unknown keys are an error;
        keys added since take the value that means what was built before them:
        :data:`ADDED_KEYS`)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QuantizeError(
                f"model configuration has unknown keys {unknown}; it was written by an "
                "incompatible version: retrain the domain or drop those keys"
            )
        return cls(**{**ADDED_KEYS, **data})  # type: ignore[arg-type]


ADDED_KEYS: dict[str, object] = {"text_hidden": 0}
""":class:`ModelConfig` keys added after snapshots were first written, with the value a
snapshot written before a key existed was built with (a linear text map)."""


def text_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shapes of the text map's parameters, by snapshot name (none for ``text_dim=0``):
    ``table.text_proj.weight`` ``W``, and for the adaptor ``table.text_in.weight`` ``A`` and
    ``table.text_in.bias`` ``b``."""
    if config.text_dim == 0:
        return {}
    width = config.text_hidden or config.text_dim
    shapes: dict[str, tuple[int, ...]] = {
        DOMAIN_PREFIX + "text_proj.weight": (config.hidden, width)
    }
    if config.text_hidden:
        shapes[DOMAIN_PREFIX + "text_in.weight"] = (config.text_hidden, config.text_dim)
        shapes[DOMAIN_PREFIX + "text_in.bias"] = (config.text_hidden,)
    return shapes


class CodeTable(nn.Module):
    """The domain part: item vectors from code rows (and optionally the text embedding).

    ``rows``: ``[n_rows, hidden]``. An item whose row ids are ``r_0..r_{m-1}`` (padding ``-1``)
    gets ``sum_j w_j * rows[r_j]`` (``w_j = 1`` for ``combine="sum"``), plus
    ``text_proj(gelu(text_in(text)))`` when ``text_dim > 0`` (``text_proj(text)`` with
    ``text_hidden=0``). ``max_code_len`` bounds the code length only
    for ``combine="level"`` (one weight per code position); sums take any length.
    """

    def __init__(self, n_rows: int, max_code_len: int, config: ModelConfig) -> None:
        super().__init__()
        if n_rows < 1 or max_code_len < 1:
            raise QuantizeError(
                f"a code table needs n_rows >= 1 and max_code_len >= 1, got {n_rows} and "
                f"{max_code_len}; build it from a non-empty row-id matrix"
            )
        self.n_rows = n_rows
        self.max_code_len = max_code_len
        self.rows = nn.Parameter(
            torch.randn(n_rows, config.hidden) * (1.0 / math.sqrt(config.hidden))
        )
        self.level_weight: nn.Parameter | None = None
        if config.combine == "level":
            self.level_weight = nn.Parameter(torch.ones(max_code_len))
        self.repeat: nn.Parameter | None = None
        if config.repeat_bias:
            self.repeat = nn.Parameter(torch.zeros(()))
        self.sparse_rows = False
        """With ``True`` the rows get sparse gradients (only the rows a step used), for
        optimisers that update only those (:class:`torch.optim.SparseAdam`)."""
        self.text_in: nn.Linear | None = None
        self.text_proj: nn.Linear | None = None
        if config.text_dim > 0 and config.text_hidden > 0:
            self.text_in = nn.Linear(config.text_dim, config.text_hidden)
            self.text_proj = nn.Linear(config.text_hidden, config.hidden, bias=False)
        elif config.text_dim > 0:
            self.text_proj = nn.Linear(config.text_dim, config.hidden, bias=False)
            nn.init.normal_(self.text_proj.weight, std=1.0 / math.sqrt(config.text_dim))

    def forward(self, item_rows: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors ``[n_items, hidden]`` from row ids ``[n_items, m]`` (``m <= max_code_len``)."""
        if self.level_weight is not None and item_rows.shape[1] > self.max_code_len:
            raise QuantizeError(
                f"row-id matrix has {item_rows.shape[1]} columns but the table was built for "
                f"codes of at most {self.max_code_len}; rebuild the model with a larger "
                "max_code_len (warm starts copy the overlap)"
            )
        valid = item_rows >= 0
        if self.sparse_rows:
            looked_up = F.embedding(item_rows.clamp(min=0), self.rows, sparse=True)
        else:
            looked_up = self.rows[item_rows.clamp(min=0)]
        gathered = looked_up * valid.unsqueeze(-1)
        if self.level_weight is not None:
            gathered = gathered * self.level_weight[: item_rows.shape[1]].view(1, -1, 1)
        vectors = gathered.sum(dim=1)
        if self.text_proj is not None:
            if text is None:
                raise QuantizeError(
                    "the code table projects text embeddings (text_dim > 0) but no text was "
                    "given; pass the items' frozen text embeddings"
                )
            vectors = vectors + self.text_part(text)
        return vectors

    def text_part(self, text: torch.Tensor) -> torch.Tensor:
        """The text part of item vectors ``[n, hidden]`` from frozen embeddings ``[n, text_dim]``
        (``text_dim > 0`` only)."""
        assert self.text_proj is not None
        # text held in float16 (a large catalogue's embeddings, half the memory) is widened
        # here, for the rows of this call only
        features = text.to(self.text_proj.weight.dtype)
        if self.text_in is not None:
            features = F.gelu(self.text_in(features))
        return self.text_proj(features)


class _Dropout(nn.Module):
    """Inverted dropout whose mask is drawn with ``uniform_``: the same distribution as
    :class:`torch.nn.Dropout`, about twice as fast on CPU (its ``bernoulli_`` draw took a
    tenth of a training step)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty_like(x, requires_grad=False).uniform_() >= self.p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


class _Block(nn.Module):
    """Pre-norm transformer block with a boolean attention mask."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ff1 = nn.Linear(hidden, hidden)
        self.ff2 = nn.Linear(hidden, hidden)
        self.dropout = _Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.training and self.dropout.p > 0.0:
            # what scaled_dot_product_attention computes with dropout on CPU, with the
            # faster mask: softmax(q k^T / sqrt(d) + mask), dropped out, times v
            scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            weights = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), -1)
            attn = self.dropout(weights) @ v
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, t, h)))
        return x + self.dropout(self.ff2(self.dropout(F.gelu(self.ff1(self.norm2(x))))))


class SequenceEncoder(nn.Module):
    """The shared part: encodes every prefix of a left-padded item-vector sequence.

    Input ``[batch, T, hidden]`` (``T <= max_len``, the last column is the most recent item)
    and a validity mask ``[batch, T]``; output ``[batch, T, hidden]`` where position ``t``
    depends on positions ``<= t`` only (so every position can predict the next item).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden
        self.kind = config.encoder
        self.max_len = config.max_len
        self.position = nn.Embedding(config.max_len, h)
        nn.init.normal_(self.position.weight, std=0.02)
        self.in_norm = nn.LayerNorm(h)
        self.dropout = _Dropout(config.dropout)
        self.blocks = nn.ModuleList()
        self.score: nn.Linear | None = None
        self.recency: nn.Embedding | None = None
        if config.encoder == "transformer":
            self.blocks.extend(
                _Block(h, config.heads, config.dropout) for _ in range(config.layers)
            )
        else:
            self.score = nn.Linear(h, 1)
            self.recency = nn.Embedding(config.max_len, 1)
            nn.init.zeros_(self.recency.weight)
        self.proj = nn.Linear(h, h)
        self.out_norm = nn.LayerNorm(h)

    def forward(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        _, t, _ = items.shape
        if t > self.max_len:
            raise QuantizeError(
                f"sequence of length {t} is longer than the encoder's max_len={self.max_len}; "
                "keep only the most recent max_len items"
            )
        positions = torch.arange(self.max_len - t, self.max_len, device=items.device)
        x = self.dropout(self.in_norm(items + self.position(positions)))
        idx = torch.arange(t, device=items.device)
        causal = idx.view(1, -1) <= idx.view(-1, 1)  # [query, key]
        # A key is visible when it is causal and real; every query also sees itself, so rows
        # of padded queries are never fully masked (their outputs are ignored anyway).
        mask = causal.unsqueeze(0) & (
            valid.unsqueeze(1) | torch.eye(t, dtype=torch.bool, device=items.device)
        )
        if self.score is not None and self.recency is not None:
            distance = (idx.view(-1, 1) - idx.view(1, -1)).clamp(0, self.max_len - 1)
            logits = self.score(x).transpose(1, 2) + self.recency(distance).squeeze(-1).unsqueeze(0)
            weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            x = torch.bmm(self.dropout(weights), x)
        else:
            for block in self.blocks:
                x = block(x, mask)
        return self.out_norm(self.proj(x))


class CodeTableRecommender(nn.Module):
    """A :class:`CodeTable` (domain) and a :class:`SequenceEncoder` (shared) with scoring."""

    def __init__(self, config: ModelConfig, n_rows: int, max_code_len: int) -> None:
        super().__init__()
        self.config = config
        self.table = CodeTable(n_rows, max_code_len, config)
        self.encoder = SequenceEncoder(config)

    def item_vectors(
        self, item_rows: torch.Tensor, text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vectors of all items ``[n_items, hidden]`` from their row ids."""
        return self.table(item_rows, text)

    def encode(self, sequences: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Encode left-padded item-index sequences ``[batch, T]`` (``-1`` = padding).

        Returns ``[batch, T, hidden]``: position ``t`` summarises items up to ``t``.
        """
        valid = sequences >= 0
        items = item_vecs[sequences.clamp(min=0)] * valid.unsqueeze(-1)
        return self.encoder(items, valid)

    def logits(
        self,
        states: torch.Tensor,
        item_vecs: torch.Tensor,
        *,
        precision: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Scores ``[..., n_items]`` of user states ``[..., hidden]`` against all items.

        ``precision=torch.bfloat16`` multiplies in bfloat16 (float32 accumulation, result
        and gradients back in float32): a training loss's largest product, about 2.5x
        faster where the CPU multiplies bfloat16 natively; scoring for ranking keeps
        float32."""
        if self.config.score == "cosine":
            a, b = F.normalize(states, dim=-1), F.normalize(item_vecs, dim=-1)
            return _product(a, b, precision) / self.config.temperature
        return _product(states, item_vecs, precision)

    def repeat_offset(self) -> torch.Tensor | None:
        """Score added to items already in the history (``None`` when disabled)."""
        if self.table.repeat is None:
            return None
        scale = 1.0 / self.config.temperature if self.config.score == "cosine" else 1.0
        return self.table.repeat * scale

    def score_last(self, sequences: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Scores ``[batch, n_items]`` for the next item after each left-padded sequence."""
        scores = self.logits(self.encode(sequences, item_vecs)[:, -1], item_vecs)
        offset = self.repeat_offset()
        if offset is None:
            return scores
        # padding maps to item 0 with weight 0; scatter_add keeps real occurrences of item 0
        seen = torch.zeros_like(scores)
        seen.scatter_add_(1, sequences.clamp(min=0), (sequences >= 0).to(scores.dtype))
        return scores + offset * (seen > 0)

    def last_states(self, sequences: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """User states ``[batch, hidden]`` after each left-padded sequence."""
        return self.encode(sequences, item_vecs)[:, -1]

    def score_chunk(
        self, states: torch.Tensor, sequences: torch.Tensor, chunk_vecs: torch.Tensor, start: int
    ) -> torch.Tensor:
        """:meth:`score_last` restricted to the items ``[start, start + len(chunk_vecs))``:
        scores ``[batch, len(chunk_vecs)]`` from :meth:`last_states` (same floats as
        :meth:`score_last` when the chunk holds every item)."""
        scores = self.logits(states, chunk_vecs)
        offset = self.repeat_offset()
        if offset is None:
            return scores
        # the offset lands only on the (case, item) pairs of the histories inside the chunk:
        # a few per case, not a pass over the chunk; a repeated item gets it once (each
        # duplicate writes the same sum)
        local = sequences - start
        case, pos = torch.nonzero(
            (sequences >= 0) & (local >= 0) & (local < scores.shape[1]), as_tuple=True
        )
        item = local[case, pos]
        scores[case, item] = scores[case, item] + offset
        return scores

    def domain_parameters(self) -> list[nn.Parameter]:
        """The per-domain parameters (``table.*``)."""
        return list(self.table.parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared parameters (``encoder.*``)."""
        return list(self.encoder.parameters())


#: rows of both operands of a reduced-precision product are zero-padded to a multiple of this
PRODUCT_PAD = 128


def _product(a: torch.Tensor, b: torch.Tensor, precision: torch.dtype) -> torch.Tensor:
    """``a @ b.T`` (``a``: ``[..., d]``, ``b``: ``[m, d]``), multiplied in ``precision`` and
    returned in ``a``'s dtype.

    In a precision other than ``a``'s, the rows of ``a`` (leading dimensions flattened) and of
    ``b`` are zero-padded to a multiple of :data:`PRODUCT_PAD` and the padding is cut from
    the result: torch multiplies bfloat16 on the CPU through oneDNN, which builds and keeps
    a kernel (and its buffers) per operand shape, and a sampled loss's pool changes size at
    every step, so unpadded a 1M-item fine-tune held ~2 MB more per step (+600 MB in 300
    steps, the training peak of the incremental run at 1M items); padded, a few dozen
    shapes. Every entry is the same dot product over ``d``, padded or not."""
    if precision == a.dtype:
        return a @ b.T
    lead, m = a.shape[:-1], b.shape[0]
    left = a.reshape(-1, a.shape[-1]).to(precision)
    rows = left.shape[0]
    left = F.pad(left, (0, 0, 0, -rows % PRODUCT_PAD))
    right = F.pad(b.to(precision), (0, 0, 0, -m % PRODUCT_PAD))
    return (left @ right.T)[:rows, :m].to(a.dtype).reshape(*lead, m)


def history_pairs(
    sequences: torch.Tensor, keep: torch.Tensor, slot: torch.Tensor, n_cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidates each kept position has already seen, as unique (row, column) pairs.

    ``sequences`` ``[batch, T]`` (``-1`` padding), ``keep`` ``[batch, T]`` marks the positions
    whose rows are wanted (row ``r`` = the ``r``-th kept position in row-major order),
    ``slot[item]`` is the item's column among ``n_cols`` candidates (``-1``: none). Row ``r``
    (position ``t`` of sequence ``b``) pairs with the columns of the items at positions
    ``<= t`` of sequence ``b``; each pair appears once even if the item repeats.
    """
    b, t = sequences.shape
    device = sequences.device
    row = torch.full((b, t), -1, dtype=torch.long, device=device)
    row[keep] = torch.arange(int(keep.sum()), device=device)
    idx = torch.arange(t, device=device)
    earlier = idx.view(1, -1) <= idx.view(-1, 1)  # [query, key]
    col = slot[sequences.clamp(min=0)]
    usable = (sequences >= 0) & (col >= 0)
    pairs = earlier.unsqueeze(0) & keep.unsqueeze(2) & usable.unsqueeze(1)
    bi, qi, ki = pairs.nonzero(as_tuple=True)
    flat = torch.unique(row[bi, qi] * n_cols + col[bi, ki])
    return flat // n_cols, flat % n_cols


def history_mask(
    sequences: torch.Tensor, keep: torch.Tensor, slot: torch.Tensor, n_cols: int
) -> torch.Tensor:
    """:func:`history_pairs` as a dense bool matrix ``[keep.sum(), n_cols]``."""
    rows, cols = history_pairs(sequences, keep, slot, n_cols)
    mask = torch.zeros(int(keep.sum()), n_cols, dtype=torch.bool, device=sequences.device)
    mask[rows, cols] = True
    return mask


def build_model(
    config: ModelConfig, item_rows: np.ndarray, n_rows: int | None = None
) -> CodeTableRecommender:
    """A freshly initialised model sized for ``item_rows`` (``[n_items, max_code_len]``).

    ``n_rows`` defaults to ``item_rows.max() + 1``; pass more to leave room for future rows.
    """
    rows = check_item_rows(item_rows)
    needed = int(rows.max()) + 1 if rows.size else 0
    n = needed if n_rows is None else n_rows
    if n < max(needed, 1):
        raise QuantizeError(
            f"n_rows={n} is smaller than the largest row id + 1 ({needed}); pass a larger "
            "n_rows or omit it"
        )
    return CodeTableRecommender(config, n, rows.shape[1])


def check_item_rows(item_rows: np.ndarray) -> np.ndarray:
    """Validate a padded row-id matrix and return it as ``int64``."""
    rows = np.asarray(item_rows)
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < 1:
        raise QuantizeError(
            f"item row ids must be a non-empty 2-D matrix [n_items, max_code_len], got shape "
            f"{rows.shape}; pad served codes with -1 (see pad_rows)"
        )
    if not np.issubdtype(rows.dtype, np.integer):
        raise QuantizeError(f"item row ids must be integers, got dtype {rows.dtype}; convert them")
    rows = rows.astype(np.int64)
    if (rows < PAD).any():
        raise QuantizeError("item row ids contain values below -1; use -1 for padding only")
    if (rows[:, 0] < 0).any():
        bad = int(np.flatnonzero(rows[:, 0] < 0)[0])
        raise QuantizeError(
            f"item {bad} has no row ids (its first column is padding); every item needs a code"
        )
    return rows


def pad_rows(codes: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """Pack per-item row-id lists into a ``[n_items, width]`` matrix padded with ``-1``."""
    longest = max((len(c) for c in codes), default=0)
    w = longest if width is None else width
    if w < longest:
        raise QuantizeError(f"width={w} is smaller than the longest code ({longest}); widen it")
    out = np.full((len(codes), max(w, 1)), PAD, dtype=np.int64)
    for i, code in enumerate(codes):
        out[i, : len(code)] = code
    return out


def served_depth(item_rows: np.ndarray, full_rows: np.ndarray) -> np.ndarray:
    """Per item, how many leading row ids of its served code follow its full path.

    ``full_rows`` ``[n, L]``: the row ids of every item's full path (level rows only).
    A served code is a path prefix, possibly followed by an id that is not on the path (a
    disambiguation row), which is not counted.
    """
    rows = check_item_rows(item_rows)
    full = check_item_rows(full_rows)
    if full.shape[0] != rows.shape[0] or (full < 0).any():
        raise QuantizeError(
            f"full_rows {full.shape} must give an unpadded full path for each of the "
            f"{rows.shape[0]} items; pass the level row ids of the full paths"
        )
    width = min(rows.shape[1], full.shape[1])
    same = rows[:, :width] == full[:, :width]
    return np.cumprod(same, axis=1).sum(axis=1).astype(np.int64)


class _PrefixGroups:
    """The items' path prefixes, one depth deeper per :meth:`deeper` call, numbered as int64
    ids: the prefix of depth ``d`` is the pair (id at depth ``d - 1``, row at ``d``), folded
    into one integer and numbered by :func:`numpy.unique` on it. The same groups as
    ``np.unique(full[:, :d], axis=0)``, whose row-wise compares of a million items held
    the interpreter for seconds (every other thread, the HTTP server's included, waited);
    integers sort in tens of milliseconds."""

    def __init__(self, full: np.ndarray) -> None:
        self.full = full
        self.width = int(full.max()) + 1 if full.size else 1  # row ids are below it
        self.depth = 0
        self.ids = np.zeros(full.shape[0], dtype=np.int64)

    def deeper(self) -> np.ndarray:
        """The ids of the prefixes one row longer than the last call's."""
        pairs = self.ids * self.width + self.full[:, self.depth]
        self.ids = np.unique(pairs, return_inverse=True)[1].reshape(-1)
        self.depth += 1
        return self.ids


BORROW_MIN_SHARE = 2
"""How many trained items' served codes must pass through a path prefix before an untrained
item is served it (:func:`borrow_trained_codes`): more than one, so the prefix's rows were
trained as a group, never as one item's own vector."""


def _shared_groups(
    full: np.ndarray, depth: np.ndarray, trained: np.ndarray, min_share: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per depth ``d`` (1, 2, ...): ``(d, group, shared)``, where ``group`` numbers every
    item's path prefix of depth ``d`` and ``shared`` marks the items whose prefix at least
    ``min_share`` trained items' served codes (``depth``: their served depth) pass through.
    Stops at the first depth with none (a prefix shared at ``d`` is shared at ``d - 1``)."""
    if min_share < 1:
        raise QuantizeError(f"min_share must be at least 1 (got {min_share})")
    prefix = _PrefixGroups(full)
    for d in range(1, full.shape[1] + 1):
        through = trained & (depth >= d)
        if int(through.sum()) < min_share:
            return  # no prefix this deep is trained by enough items
        group = prefix.deeper()
        counts = np.bincount(group[through], minlength=int(group.max()) + 1)
        shared = counts[group] >= min_share
        if not shared.any():
            return
        yield d, group, shared


def shared_prefixes(
    full_rows: np.ndarray,
    depth: np.ndarray,
    trained: np.ndarray,
    min_share: int = BORROW_MIN_SHARE,
) -> list[np.ndarray]:
    """The path prefixes an untrained item may borrow (see :func:`borrow_trained_codes`):
    per depth ``d`` = 1, 2, ..., the distinct prefixes ``[m_d, d]`` of ``full_rows`` that at
    least ``min_share`` trained items' served codes (served depth ``depth``) pass through;
    the list ends at the first depth with none."""
    full = check_item_rows(full_rows)
    mask = np.asarray(trained, dtype=bool)
    depth = np.asarray(depth)
    out = []
    for d, group, shared in _shared_groups(full, depth, mask, min_share):
        owners = np.flatnonzero(shared & mask & (depth >= d))
        first = np.unique(group[owners], return_index=True)[1]
        out.append(full[owners[first], :d])
    return out


def borrow_trained_codes(
    item_rows: np.ndarray,
    full_rows: np.ndarray,
    trained: np.ndarray,
    min_share: int = BORROW_MIN_SHARE,
) -> np.ndarray:
    """Serve every untrained item the deepest prefix of its own path that trained items share.

    An item without training interactions (a new item) has no row of its own worth
    anything: its vector is only as good as the rows it shares. Here it is served the
    deepest prefix of its full path that the served codes of at least ``min_share`` trained
    items pass through, so every row it sums was trained by a group of its relatives, and
    its text embedding (when projected) tells it apart. One trained item is not enough:
    with a fine codebook a head item's served code is often a prefix that no other trained
    item reaches, and an untrained neighbour served those rows is the head item's
    near-clone in every ranking (at 1M items such neighbours pushed the targets out of the
    top 10; see the README's migration figures). An untrained item with no shared prefix on
    its path keeps its code. Trained items never change. Returns a new row-id matrix of the
    same width.
    """
    rows = check_item_rows(item_rows)
    full = check_item_rows(full_rows)
    mask = np.asarray(trained, dtype=bool)
    if mask.shape != (rows.shape[0],):
        raise QuantizeError(
            f"trained has shape {mask.shape}, expected ({rows.shape[0]},): one flag per item"
        )
    depth = served_depth(rows, full)
    levels = min(full.shape[1], rows.shape[1])
    borrow = np.zeros(rows.shape[0], dtype=np.int64)
    for d, _, shared in _shared_groups(full[:, :levels], depth, mask, min_share):
        borrow[shared & ~mask] = d  # the deepest shared prefix is the last one marked
    out = rows.copy()
    take = np.flatnonzero(borrow > 0)
    path = np.full((len(take), rows.shape[1]), PAD, dtype=np.int64)
    path[:, :levels] = full[take, :levels]
    cols = np.arange(rows.shape[1])[None, :]
    out[take] = np.where(cols < borrow[take, None], path, PAD)
    return out


def export_params(model: nn.Module) -> Params:
    """All parameters and buffers as numpy arrays (copies), keyed by ``state_dict`` name."""
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def load_params(
    model: nn.Module, params: Mapping[str, np.ndarray], *, partial: bool = False
) -> list[str]:
    """Load arrays into ``model`` in place; returns the names that were loaded.

    With ``partial=False`` every name must be present with the exact shape (an exact restore).
    With ``partial=True`` (warm starts) missing names keep their initial values and, for
    shape mismatches along the first axis (a table that grew or shrank), the overlapping
    leading slice is copied; names not in the model are ignored.
    """
    state = model.state_dict()
    loaded = []
    with torch.no_grad():
        for name, target in state.items():
            if name not in params:
                if partial:
                    continue
                raise QuantizeError(
                    f"parameter {name!r} is missing from the given params; pass a complete "
                    "export of the same model configuration, or use partial=True for a warm start"
                )
            source = torch.from_numpy(np.array(params[name], order="C")).to(target.dtype)
            if tuple(source.shape) == tuple(target.shape):
                target.copy_(source)
            elif partial and source.ndim == target.ndim and source.shape[1:] == target.shape[1:]:
                n = min(source.shape[0], target.shape[0])
                target[:n].copy_(source[:n])
            else:
                raise QuantizeError(
                    f"parameter {name!r} has shape {tuple(source.shape)} but the model expects "
                    f"{tuple(target.shape)}; the params come from a different configuration"
                )
            loaded.append(name)
    if not partial:
        extra = sorted(set(params) - set(state) - {_CONFIG_KEY})
        if extra:
            raise QuantizeError(
                f"params have names the model lacks: {extra[:5]}; they come from a different "
                "model configuration"
            )
    return loaded


def model_from_params(
    config: ModelConfig, params: Mapping[str, np.ndarray]
) -> CodeTableRecommender:
    """Rebuild a model from an export (shapes of the domain part are read from the arrays)."""
    try:
        rows = params[DOMAIN_PREFIX + "rows"]
    except KeyError as exc:
        raise QuantizeError(
            "params lack 'table.rows'; pass a full export from export_params"
        ) from exc
    width = 1
    if config.combine == "level":
        if DOMAIN_PREFIX + "level_weight" not in params:
            raise QuantizeError(
                "params lack 'table.level_weight' but combine='level'; pass the config the "
                "params were trained with"
            )
        width = int(params[DOMAIN_PREFIX + "level_weight"].shape[0])
    model = CodeTableRecommender(config, int(rows.shape[0]), width)
    load_params(model, params)
    return model


def domain_names(params: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the per-domain parameters in an export."""
    return sorted(n for n in params if n.startswith(DOMAIN_PREFIX))


def shared_names(params: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the shared parameters in an export."""
    return sorted(n for n in params if not n.startswith(DOMAIN_PREFIX) and n != _CONFIG_KEY)


@dataclass(frozen=True)
class Snapshot:
    """A model version: its configuration and parameter arrays, convertible to bytes."""

    config: ModelConfig
    params: Params

    def to_bytes(self) -> bytes:
        """Serialize to ``.npz`` bytes (no pickle); :meth:`from_bytes` restores it exactly."""
        buf = io.BytesIO()
        meta = np.frombuffer(
            json.dumps(self.config.to_dict(), sort_keys=True).encode(), dtype=np.uint8
        )
        if _CONFIG_KEY in self.params:
            raise QuantizeError(
                f"a parameter is named {_CONFIG_KEY!r}, which snapshots reserve; rename it"
            )
        arrays: dict[str, Any] = {_CONFIG_KEY: meta, **self.params}
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Snapshot:
        """Restore a snapshot written by :meth:`to_bytes`."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            meta = arrays.pop(_CONFIG_KEY)
            config = ModelConfig.from_dict(json.loads(meta.tobytes().decode()))
        except (OSError, ValueError, KeyError) as exc:
            raise QuantizeError(
                f"cannot decode a model snapshot of {len(data)} bytes ({exc}); the stored "
                "version is corrupt or not a snapshot: roll back to an earlier version"
            ) from exc
        return cls(config, arrays)

    def model(self) -> CodeTableRecommender:
        """The model with these parameters, in eval mode."""
        return model_from_params(self.config, self.params).eval()

    def table_bytes(self) -> int:
        """Bytes of the per-domain parameters (what a domain adds to storage)."""
        return int(sum(self.params[n].nbytes for n in domain_names(self.params)))


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    """Number of scalars in a collection of torch parameters."""
    return int(sum(p.numel() for p in params))
