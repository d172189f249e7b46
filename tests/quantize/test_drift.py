"""Codebook drift: the decayed sums against a slow item-by-item reference, any batch cut,
the score as a relation on seeded data (the catalogue of the bootstrap vs items from new
clusters vs items crowded into one), routing, and round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from quantize.codebook import ResidualCodebook
from quantize.drift import (
    DRIFT_THRESHOLD,
    CellSums,
    CodebookDrift,
    drift_report,
    min_weight,
    squared_errors,
)
from quantize.exceptions import CodebookError


def reference_sums(errors: list[float], cells: list[int], k: int, half_life: float) -> CellSums:
    """Slow reference: one item at a time, every sum scaled by 2 ** (-1 / half_life) first."""
    g = 0.5 ** (1.0 / half_life)
    weight, error, hist = 0.0, 0.0, [0.0] * k
    for e, c in zip(errors, cells, strict=True):
        weight, error = weight * g + 1.0, error * g + e
        hist = [h * g for h in hist]
        hist[c] += 1.0
    return CellSums(k, half_life, weight, error, np.array(hist), len(errors))


@pytest.mark.parametrize("half_life", [1.0, 37.5, 1e4, math.inf])
def test_decayed_sums_equal_the_item_by_item_reference_for_any_batch_cut(half_life: float) -> None:
    rng = np.random.default_rng(3)
    k, n = 7, 400
    errors = rng.random(n) * 2
    cells = rng.integers(0, k, n)
    fast = CellSums(k, half_life)
    cuts = np.sort(rng.choice(np.arange(1, n), size=15, replace=False))
    for part_e, part_c in zip(np.split(errors, cuts), np.split(cells, cuts), strict=True):
        fast.add(part_e, part_c)
    ref = reference_sums(errors.tolist(), cells.tolist(), k, half_life)
    assert fast.items == ref.items == n
    assert fast.weight == pytest.approx(ref.weight, rel=1e-9)
    assert fast.error == pytest.approx(ref.error, rel=1e-9)
    np.testing.assert_allclose(fast.cells, ref.cells, rtol=1e-9, atol=1e-12)
    assert fast.cells.sum() == pytest.approx(fast.weight, rel=1e-9)


def test_effective_cells_is_the_number_of_equally_used_cells() -> None:
    sums = CellSums(10)
    sums.add(np.ones(300), np.tile([1, 4, 7], 100))
    assert sums.effective_cells == pytest.approx(3.0)
    sums.add(np.ones(10_000), np.full(10_000, 2))  # one cell takes nearly everything
    assert 1.0 < sums.effective_cells < 1.5


def test_a_short_window_forgets_the_old_items() -> None:
    sums = CellSums(4, half_life=50.0)
    sums.add(np.full(1000, 9.0), np.zeros(1000, dtype=int))
    sums.add(np.full(1000, 1.0), np.ones(1000, dtype=int))
    assert sums.mean_error == pytest.approx(1.0, rel=1e-4)
    assert sums.cells[0] / sums.weight < 1e-5


def _clusters(centres: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _coded(codebook: ResidualCodebook, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = codebook.encode(x)
    return squared_errors(x, codebook.decode(codes)), codes[:, 0]


def test_the_score_stays_low_for_the_catalogue_it_was_trained_for_and_passes_the_threshold_for_new_clusters() -> (
    None
):
    rng = np.random.default_rng(0)
    old_centres = rng.standard_normal((8, 32))
    new_centres = rng.standard_normal((8, 32))
    catalogue = _clusters(old_centres, 4000, rng)
    codebook = ResidualCodebook.train(catalogue, levels=2, k=32, seed=0)

    def drift_after(items: np.ndarray) -> CodebookDrift:
        drift = CodebookDrift.new(codebook.codebook_id, codebook.k, half_life=2000)
        drift.add(*_coded(codebook, catalogue), adoption=True)
        drift.add(*_coded(codebook, items))
        return drift

    same = drift_after(_clusters(old_centres, 3000, rng)).report()
    moved = drift_after(_clusters(new_centres, 3000, rng)).report()
    crowded = drift_after(_clusters(old_centres[:1], 3000, rng)).report()
    assert same.score is not None and moved.score is not None and crowded.score is not None
    assert abs(same.score) < 0.15 < DRIFT_THRESHOLD and not same.drifted
    assert moved.score > DRIFT_THRESHOLD and moved.drifted
    assert moved.error_ratio is not None and moved.error_ratio > 1.3
    assert crowded.balance is not None and crowded.balance < 0.5 and crowded.drifted
    assert same.catalogue_share == pytest.approx(4000 / 7000)


def test_the_score_waits_for_enough_recent_items() -> None:
    drift = CodebookDrift.new("c", k=16)
    drift.add(np.ones(500), np.arange(500) % 16, adoption=True)
    drift.add(np.ones(16), np.arange(16))
    report = drift.report()
    assert report.score is None and not report.drifted and report.recent_items == 16
    more = 16 * math.ceil(min_weight(16) / 16)  # every cell equally often
    drift.add(np.ones(more), np.arange(more) % 16)
    assert drift.report().score == pytest.approx(0.0, abs=0.01)


def test_without_an_adoption_the_first_items_form_the_baseline() -> None:
    drift = CodebookDrift.new("c", k=8)
    first = int(min_weight(8))
    drift.add(np.ones(first + 30), np.zeros(first + 30, dtype=int))
    assert drift.baseline.items == first and drift.recent.items == 30
    drift.add(np.ones(5), np.zeros(5, dtype=int), adoption=True)  # a catch-up chunk
    assert drift.baseline.items == first + 5 and drift.recent.items == 30


def test_round_trip_through_json() -> None:
    drift = CodebookDrift.new("abc", k=5, half_life=123.0)
    rng = np.random.default_rng(1)
    drift.add(rng.random(200), rng.integers(0, 5, 200), adoption=True)
    drift.add(rng.random(300), rng.integers(0, 5, 300))
    back = CodebookDrift.from_dict(json.loads(json.dumps(drift.to_dict())))
    assert back.codebook_id == "abc" and back.recent.half_life == 123.0
    assert math.isinf(back.baseline.half_life)
    assert back.report() == drift.report()
    np.testing.assert_array_equal(back.recent.cells, drift.recent.cells)


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(CodebookError, match=r"cell outside 0\.\.3"):
        CellSums(4).add(np.ones(2), np.array([0, 4]))
    with pytest.raises(CodebookError, match="3 errors but 2 cells"):
        CellSums(4).add(np.ones(3), np.array([0, 1]))
    with pytest.raises(CodebookError, match="not a saved drift"):
        CodebookDrift.from_dict({"codebook_id": "x"})
    with pytest.raises(CodebookError, match="baseline k=4, recent k=5"):
        drift_report(CellSums(4), CellSums(5))
