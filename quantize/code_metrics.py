"""Quality and cost of a set of served codes (pure functions over arrays).

* collision rate: ``1 - distinct served codes / items`` (all items, and head items only);
* per level, over the full paths: utilization (distinct codewords used / K) and balance
  (entropy of the codeword use / log K; 1 = perfectly even);
* mean served length of head and tail items (disambiguation digit included);
* table rows: allocated (``L * K`` + disambiguation rows) and actually used by some code;
* table memory against a per-item ID table of the same width: ``rows / n_items``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quantize.assign import ServedCodes, group_rows


def collision_rate(keys: np.ndarray) -> float:
    """``1 - distinct / n`` over rows of ``keys`` (one row per item, equal iff same code)."""
    arr = np.asarray(keys)
    n = arr.shape[0]
    if n == 0:
        return 0.0
    distinct = group_rows(arr.reshape(n, -1))[1].size
    return 1.0 - distinct / n


def code_keys(served: ServedCodes) -> np.ndarray:
    """One int64 row per item, equal for two items iff their served codes are equal."""
    return served.row_matrix()


def level_utilization(paths: np.ndarray, k: int) -> np.ndarray:
    """Distinct codewords used at each level / ``k`` (float64 ``[L]``)."""
    p = np.asarray(paths)
    return np.array([np.unique(p[:, level]).size / k for level in range(p.shape[1])])


def level_balance(paths: np.ndarray, k: int) -> np.ndarray:
    """Normalized entropy of codeword use at each level: ``H / log k`` (float64 ``[L]``)."""
    p = np.asarray(paths)
    out = np.zeros(p.shape[1])
    if p.shape[0] == 0 or k < 2:
        return out
    for level in range(p.shape[1]):
        freq = np.bincount(p[:, level], minlength=k).astype(np.float64)
        prob = freq[freq > 0] / freq.sum()
        out[level] = float(-(prob * np.log(prob)).sum() / math.log(k))
    return out


@dataclass(frozen=True)
class CodeReport:
    """All metrics of one set of served codes."""

    n_items: int
    n_head: int
    levels: int
    k: int
    collision_all: float
    collision_head: float
    utilization: tuple[float, ...]
    balance: tuple[float, ...]
    mean_len_head: float
    mean_len_tail: float
    rows_allocated: int
    rows_used: int
    digit_rows: int

    @property
    def memory_ratio(self) -> float:
        """Allocated code-table rows / per-item ID-table rows (same width)."""
        return self.rows_allocated / self.n_items if self.n_items else 0.0

    @property
    def used_ratio(self) -> float:
        """Used code-table rows / per-item ID-table rows."""
        return self.rows_used / self.n_items if self.n_items else 0.0


def code_report(served: ServedCodes) -> CodeReport:
    keys = code_keys(served)
    head = served.is_head
    lengths = served.served_lengths
    rows = served.row_matrix()
    used = np.unique(rows[rows >= 0]).size
    return CodeReport(
        n_items=served.n_items,
        n_head=int(head.sum()),
        levels=served.levels,
        k=served.k,
        collision_all=collision_rate(keys),
        collision_head=collision_rate(keys[head]),
        utilization=tuple(float(u) for u in level_utilization(served.paths, served.k)),
        balance=tuple(float(b) for b in level_balance(served.paths, served.k)),
        mean_len_head=float(lengths[head].mean()) if head.any() else 0.0,
        mean_len_tail=float(lengths[~head].mean()) if (~head).any() else 0.0,
        rows_allocated=served.table_rows,
        rows_used=int(used),
        digit_rows=served.n_digit_rows,
    )
