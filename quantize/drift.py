"""Codebook drift: how well a codebook still fits the items coded with it.

A residual codebook is trained once, on a sample of the catalogue of its day. When the
catalogue moves (new categories, a new season), new items land far from every centroid
(their quantization error grows) and crowd into a few first-level cells (the cells whose
rows they then share). Both are measured here from what coding an item already computes
(its full path and the vector), in O(items coded) and O(k) per call, never over the
catalogue:

* the **baseline**: the items coded when the codebook was adopted (the catalogue it was
  trained for), plain sums;
* the **recent** window: the items coded after that, as exponentially decayed sums with a
  half-life of ``half_life`` items (the newest items weigh most; the window forgets).

From both, :func:`drift_report`:

* ``error_ratio``: the recent items' mean squared error over the baseline's;
* ``balance``: the recent items' effective number of first-level cells (``exp`` of the
  entropy of their cell shares) over the baseline's (1: spread like the catalogue the
  codebook was trained for; below 1: crowded into fewer cells);
* ``score = log(error_ratio / balance)``: 0 when the new items look like the catalogue of the
  bootstrap; ``DRIFT_THRESHOLD`` (log 1.5) when their error is 1.5x the baseline's at the same
  balance, or they use two thirds of the cells at the same error;
* ``catalogue_share``: the baseline's items over every item coded since the adoption.

The score is defined (not ``None``) once the recent window weighs ``min_weight(k)`` items:
an entropy over k cells needs several items per cell to mean something.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantize.exceptions import CodebookError

#: a score at or above this is drift (log 1.5: see the module docstring)
DRIFT_THRESHOLD = math.log(1.5)
#: the recent window's default half-life, in coded items
DEFAULT_HALF_LIFE = 10_000.0
#: items per first-level cell the recent window needs before its balance means something
ITEMS_PER_CELL = 4


def min_weight(k: int) -> float:
    """The weight a window needs before :func:`drift_report` scores it."""
    return float(max(100, ITEMS_PER_CELL * k))


@dataclass
class CellSums:
    """Decayed sums over coded items: their weight, squared errors and first-level cells.

    ``half_life`` in items (``inf``: plain sums). :meth:`add` takes items in coding order;
    the i-th of n new items weighs ``g ** (n - 1 - i)`` and the sums before them are scaled
    by ``g ** n`` (``g = 2 ** (-1 / half_life)``), so cutting a stream into calls anywhere
    gives the same sums."""

    k: int
    half_life: float = math.inf
    weight: float = 0.0
    error: float = 0.0
    cells: np.ndarray = field(default_factory=lambda: np.zeros(0))
    items: int = 0  # items added, undecayed

    def __post_init__(self) -> None:
        if self.k < 1:
            raise CodebookError(f"CellSums: k must be at least 1, got {self.k}")
        if not self.half_life > 0:
            raise CodebookError(f"CellSums: half_life must be > 0, got {self.half_life}")
        if self.cells.size == 0:
            self.cells = np.zeros(self.k, dtype=np.float64)
        elif self.cells.shape != (self.k,):
            raise CodebookError(f"CellSums: cells has shape {self.cells.shape}, want ({self.k},)")

    @property
    def _decay(self) -> float:
        return 0.0 if math.isinf(self.half_life) else math.log(2.0) / self.half_life

    def add(self, errors: np.ndarray, cells: np.ndarray) -> None:
        """Add items (in coding order): their squared errors and first-level cells."""
        errors = np.asarray(errors, dtype=np.float64).reshape(-1)
        cells = np.asarray(cells, dtype=np.int64).reshape(-1)
        n = errors.size
        if cells.size != n:
            raise CodebookError(f"CellSums.add: {n} errors but {cells.size} cells")
        if n == 0:
            return
        if cells.min() < 0 or cells.max() >= self.k:
            raise CodebookError(f"CellSums.add: a cell outside 0..{self.k - 1}")
        rate = self._decay
        w = np.exp(-rate * np.arange(n - 1, -1, -1, dtype=np.float64))
        scale = math.exp(-rate * n)
        self.weight = self.weight * scale + float(w.sum())
        self.error = self.error * scale + float(w @ errors)
        self.cells *= scale
        self.cells += np.bincount(cells, weights=w, minlength=self.k)
        self.items += n

    @property
    def mean_error(self) -> float:
        return self.error / self.weight if self.weight > 0 else math.nan

    @property
    def effective_cells(self) -> float:
        """``exp`` of the entropy of the cell shares (1 .. k; ``nan`` when empty)."""
        if self.weight <= 0:
            return math.nan
        p = self.cells[self.cells > 0] / self.cells.sum()
        return float(math.exp(-(p * np.log(p)).sum()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "half_life": None if math.isinf(self.half_life) else self.half_life,
            "weight": self.weight,
            "error": self.error,
            "cells": self.cells.tolist(),
            "items": self.items,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CellSums:
        try:
            half_life = doc["half_life"]
            return cls(
                k=int(doc["k"]),
                half_life=math.inf if half_life is None else float(half_life),
                weight=float(doc["weight"]),
                error=float(doc["error"]),
                cells=np.asarray(doc["cells"], dtype=np.float64),
                items=int(doc["items"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CodebookError(f"CellSums.from_dict: not a saved CellSums ({exc})") from exc


@dataclass(frozen=True)
class DriftReport:
    """What :func:`drift_report` says about a codebook (``None``: not measurable yet)."""

    baseline_items: int
    recent_items: int
    baseline_error: float
    recent_error: float | None
    error_ratio: float | None
    balance: float | None
    catalogue_share: float
    score: float | None
    drifted: bool

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def drift_report(
    baseline: CellSums, recent: CellSums, *, threshold: float = DRIFT_THRESHOLD
) -> DriftReport:
    """The drift of ``recent`` against ``baseline`` (see the module docstring)."""
    if baseline.k != recent.k:
        raise CodebookError(f"drift_report: baseline k={baseline.k}, recent k={recent.k}")
    total = baseline.items + recent.items
    share = baseline.items / total if total else 1.0
    measurable = baseline.weight > 0 and recent.weight >= min_weight(recent.k)
    if not measurable or baseline.mean_error <= 0:
        return DriftReport(
            baseline.items,
            recent.items,
            baseline.mean_error,
            recent.mean_error if recent.weight > 0 else None,
            None,
            None,
            share,
            None,
            False,
        )
    ratio = recent.mean_error / baseline.mean_error
    balance = recent.effective_cells / baseline.effective_cells
    score = math.log(max(ratio, 1e-12) / balance)
    return DriftReport(
        baseline.items,
        recent.items,
        baseline.mean_error,
        recent.mean_error,
        ratio,
        balance,
        share,
        score,
        score >= threshold,
    )


@dataclass
class CodebookDrift:
    """The baseline and recent sums of one codebook, and the rule that routes items.

    Items coded while the codebook is adopted (the catch-up of the catalogue it was trained
    for) go to the baseline; so do the first items coded after it while the baseline holds
    fewer than :func:`min_weight` items (a codebook adopted with an empty catalogue, or a
    state from before drift was measured, takes its first items as the baseline); every
    later item goes to the recent window."""

    codebook_id: str
    baseline: CellSums
    recent: CellSums

    @classmethod
    def new(cls, codebook_id: str, k: int, half_life: float = DEFAULT_HALF_LIFE) -> CodebookDrift:
        return cls(codebook_id, CellSums(k), CellSums(k, half_life))

    @property
    def k(self) -> int:
        return self.baseline.k

    def add(self, errors: np.ndarray, cells: np.ndarray, *, adoption: bool = False) -> None:
        """Items coded, in order: to the baseline during the ``adoption`` (and until it holds
        :func:`min_weight` items), else to the recent window."""
        errors = np.asarray(errors).reshape(-1)
        cells = np.asarray(cells).reshape(-1)
        room = errors.size if adoption else int(min_weight(self.k) - self.baseline.items)
        cut = max(0, min(room, errors.size))
        self.baseline.add(errors[:cut], cells[:cut])
        self.recent.add(errors[cut:], cells[cut:])

    def report(self, threshold: float = DRIFT_THRESHOLD) -> DriftReport:
        return drift_report(self.baseline, self.recent, threshold=threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            "codebook_id": self.codebook_id,
            "baseline": self.baseline.to_dict(),
            "recent": self.recent.to_dict(),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CodebookDrift:
        try:
            return cls(
                str(doc["codebook_id"]),
                CellSums.from_dict(doc["baseline"]),
                CellSums.from_dict(doc["recent"]),
            )
        except (KeyError, TypeError) as exc:
            raise CodebookError(f"CodebookDrift.from_dict: not a saved drift ({exc})") from exc


def squared_errors(x: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Per row, the squared L2 distance between ``x`` and its ``reconstruction``."""
    diff = np.asarray(x, dtype=np.float32) - reconstruction
    return np.einsum("nd,nd->n", diff, diff)
