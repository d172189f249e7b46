"""A table's rows for the codes of a new codebook, fitted from a version of the old one.

A codebook migration (or a retrain) codes every item again: a version trained on the old
codes has rows that stand for the old codewords, meaningless under the new codes. What does
carry over is each item's *code vector* in that version, the weighted sum of its old rows.
The items that moved together into one new cell learned something together; so the new
rows are fitted to give every item (trained by the old version and coded by both) a new
code vector as close as it can to its old one:

    minimise  sum_i || sum_j w_j R[r_ij] - v_i ||^2     over the rows R

(``r_ij``: item ``i``'s row at code position ``j``, padding ``-1`` skipped; ``w_j``: the
model's weight of position ``j``; ``v_i``: the old code vector). A row id appears at one
position only (a level's rows, or an item's own disambiguation row), so this is an additive
model in the positions, solved by *backfitting* (block coordinate descent): each position's
rows in turn become the mean residual, divided by ``w_j``, of the items whose code uses
them, the other positions held. Each pass can only lower the error. Rows no such item uses
keep their fresh initialisation (``init``).

:func:`code_vectors`, :func:`fit_rows` and :func:`refit` (a whole table from an old one)
are plain numpy over arrays; the fine-tune (``worker.tuning.finetune``) joins the two
versions' items and calls :func:`refit`, as ``bench/remap.py`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantize.exceptions import QuantizeError

#: passes over the code positions: the error falls fast over the first few
SWEEPS = 3


def code_vectors(
    rows: np.ndarray, item_rows: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """``float32 [n, hidden]``: each item's ``sum_j w_j rows[item_rows[i, j]]`` over its
    valid positions (``item_rows >= 0``); ``weights`` per position (``None``: all 1)."""
    item_rows = np.asarray(item_rows)
    out = np.zeros((item_rows.shape[0], rows.shape[1]), dtype=np.float32)
    for j in range(item_rows.shape[1]):
        ids = item_rows[:, j]
        valid = ids >= 0
        w = 1.0 if weights is None else float(weights[j])
        out[valid] += w * rows[ids[valid]]
    return out


@dataclass(frozen=True)
class _Position:
    """The items of one code position grouped by row: ``order`` sorts the position's valid
    items by row, ``starts`` opens each group, ``rows`` names it."""

    items: np.ndarray  # the valid items' numbers
    order: np.ndarray
    starts: np.ndarray
    rows: np.ndarray
    counts: np.ndarray


def _position(ids: np.ndarray) -> _Position:
    items = np.flatnonzero(ids >= 0)
    order = np.argsort(ids[items], kind="stable")
    sorted_ids = ids[items][order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(items) else items
    counts = np.diff(np.r_[starts, len(items)])
    return _Position(items, order, starts, sorted_ids[starts], counts)


@dataclass(frozen=True)
class FittedRows:
    """What :func:`fit_rows` returns: the rows, which of them were fitted, and the mean over
    the items of ``||code vector - target||^2`` with the ``init`` rows and after the fit."""

    rows: np.ndarray  # float32 [n_rows, hidden]
    fitted: np.ndarray  # bool [n_rows]
    error_before: float
    error_after: float


def fit_rows(
    targets: np.ndarray,
    item_rows: np.ndarray,
    init: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    sweeps: int = SWEEPS,
    check: Callable[[], None] | None = None,
) -> FittedRows:
    """Rows ``[len(init), hidden]`` whose code vectors for ``item_rows`` come closest to
    ``targets`` (``float [n, hidden]``), by backfitting (see the module docstring).

    ``init``: the fresh rows, kept where no item's code uses the row; ``weights``: the
    model's weight per code position (``None``: all 1); ``check``: called between positions
    (raise from it to stop). Memory: two ``[n, hidden]`` float32 arrays beside the inputs.
    """
    item_rows = np.asarray(item_rows, dtype=np.int64)
    n, hidden = targets.shape
    if item_rows.ndim != 2 or item_rows.shape[0] != n:
        raise QuantizeError(
            f"fit_rows: {n} targets but item rows of shape {item_rows.shape}; pass one padded "
            "row-id list per target"
        )
    if init.ndim != 2 or init.shape[1] != hidden or item_rows.max(initial=-1) >= len(init):
        raise QuantizeError(
            f"fit_rows: init of shape {init.shape} for targets of width {hidden} and row ids "
            f"up to {item_rows.max(initial=-1)}; pass [n_rows, hidden] rows covering every id"
        )
    w = np.ones(item_rows.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    rows = np.array(init, dtype=np.float32, copy=True)
    targets = np.asarray(targets, dtype=np.float32)
    before = _mse(targets - code_vectors(rows, item_rows, w))
    positions = [_position(item_rows[:, j]) for j in range(item_rows.shape[1])]
    # the rows the items use start at zero, so the first pass is the greedy fit
    fitted = np.zeros(len(rows), dtype=bool)
    for pos in positions:
        fitted[pos.rows] = True
    rows[fitted] = 0.0
    residual = targets.copy()
    for _ in range(sweeps):
        for j, pos in enumerate(positions):
            if check is not None:
                check()
            if not len(pos.items) or abs(w[j]) < 1e-6:
                continue
            ids = item_rows[pos.items, j]
            # the residual without this position: what its rows should explain
            part = residual[pos.items] + np.float32(w[j]) * rows[ids]
            sums = np.add.reduceat(part[pos.order], pos.starts, axis=0)
            rows[pos.rows] = sums / (pos.counts[:, None] * np.float32(w[j]))
            residual[pos.items] = part - np.float32(w[j]) * rows[ids]
    return FittedRows(rows, fitted, before, _mse(residual))


def _mse(residual: np.ndarray) -> float:
    """Mean over the items of the squared norm of their residual."""
    return float(np.square(residual).sum(axis=1).mean()) if len(residual) else 0.0


def refit(
    rows: np.ndarray,
    old_item_rows: np.ndarray,
    new_item_rows: np.ndarray,
    n_rows: int,
    weights: np.ndarray | None = None,
    *,
    init: np.ndarray | None = None,
    seed: int = 0,
    check: Callable[[], None] | None = None,
) -> FittedRows:
    """A table of ``n_rows`` rows for the new codes ``new_item_rows`` of the items an old
    table (``rows``, its codes ``old_item_rows``, one item per row of both) trained: their
    old code vectors are the targets of :func:`fit_rows`. ``weights``: the old model's per
    position weights, kept by the new model (positions beyond them weigh 1). ``init``: the
    fresh rows (default: normal, scaled by ``1 / sqrt(hidden)`` as a new table's, seeded)."""
    hidden = rows.shape[1]
    if init is None:
        rng = np.random.default_rng(seed)
        init = (rng.standard_normal((n_rows, hidden)) / np.sqrt(hidden)).astype(np.float32)
    width = new_item_rows.shape[1]
    new_weights = np.ones(width)
    if weights is not None:
        n = min(width, len(weights))
        new_weights[:n] = weights[:n]
    targets = code_vectors(rows, old_item_rows, weights)
    return fit_rows(targets, new_item_rows, init, new_weights, check=check)
