"""Rows fitted for a new codebook's codes from an old version's code vectors (quantize.remap):
against a slow item-by-item reference, round trips, and the fit as a relation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from quantize.codebook import ResidualCodebook
from quantize.exceptions import QuantizeError
from quantize.remap import code_vectors, fit_rows, refit


def _codes(paths: np.ndarray, k: int, lengths: np.ndarray, own_from: int | None = None):
    """Row ids ``level * k + digit`` of each item's prefix of ``lengths[i]`` digits (``-1``
    padded); with ``own_from``, items at full length get a row of their own after them."""
    n, levels = paths.shape
    width = levels + (own_from is not None)
    out = np.full((n, width), -1, dtype=np.int64)
    for i in range(n):
        for j in range(lengths[i]):
            out[i, j] = j * k + paths[i, j]
        if own_from is not None and lengths[i] == levels:
            out[i, levels] = own_from + i
    return out


def _slow_fit(targets, item_rows, init, weights, sweeps):
    """Backfitting item by item, row by row, in plain Python."""
    rows = init.astype(np.float64).copy()
    used = sorted({int(r) for r in item_rows.ravel() if r >= 0})
    for r in used:
        rows[r] = 0.0
    n, width = item_rows.shape
    for _ in range(sweeps):
        for j in range(width):
            sums: dict[int, np.ndarray] = {}
            counts: dict[int, int] = {}
            for i in range(n):
                r = int(item_rows[i, j])
                if r < 0:
                    continue
                others = sum(
                    (
                        weights[q] * rows[item_rows[i, q]]
                        for q in range(width)
                        if q != j and item_rows[i, q] >= 0
                    ),
                    np.zeros(init.shape[1]),
                )
                sums[r] = sums.get(r, 0.0) + (targets[i] - others)
                counts[r] = counts.get(r, 0) + 1
            for r, total in sums.items():
                rows[r] = total / counts[r] / weights[j]
    return rows


def _case(seed: int, n: int = 150, levels: int = 3, k: int = 6, hidden: int = 5):
    rng = np.random.default_rng(seed)
    paths = rng.integers(0, k, size=(n, levels))
    lengths = rng.integers(1, levels + 1, size=n)
    n_rows = levels * k + n
    item_rows = _codes(paths, k, lengths, own_from=levels * k)
    init = rng.normal(size=(n_rows, hidden)).astype(np.float32)
    targets = rng.normal(size=(n, hidden)).astype(np.float32)
    weights = rng.uniform(0.5, 1.5, size=item_rows.shape[1])
    return targets, item_rows, init, weights


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sweeps", [1, 3])
def test_fit_rows_equals_the_slow_reference(seed: int, sweeps: int) -> None:
    targets, item_rows, init, weights = _case(seed)
    fast = fit_rows(targets, item_rows, init, weights, sweeps=sweeps)
    slow = _slow_fit(targets, item_rows, init, weights, sweeps)
    np.testing.assert_allclose(fast.rows, slow, rtol=1e-4, atol=1e-5)
    residual = targets - code_vectors(fast.rows, item_rows, weights)
    assert fast.error_after == pytest.approx(
        float(np.square(residual).sum(axis=1).mean()), rel=1e-4
    )


def test_rows_no_item_uses_keep_their_init_and_padding_is_skipped() -> None:
    targets, item_rows, init, weights = _case(3)
    item_rows[:, 0] = np.where(item_rows[:, 0] == 0, 1, item_rows[:, 0])  # row 0: unused
    fit = fit_rows(targets, item_rows, init, weights)
    used = np.unique(item_rows[item_rows >= 0])
    assert not fit.fitted[0] and fit.fitted[used].all() and fit.fitted.sum() == len(used)
    np.testing.assert_array_equal(fit.rows[~fit.fitted], init[~fit.fitted])


def test_the_error_never_rises_from_pass_to_pass_and_falls_below_fresh_rows() -> None:
    targets, item_rows, init, weights = _case(4)
    errors = [
        fit_rows(targets, item_rows, init, weights, sweeps=s).error_after for s in range(1, 8)
    ]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors))
    fresh = fit_rows(targets, item_rows, init, weights, sweeps=1).error_before
    assert errors[-1] < 0.5 * fresh


def test_the_same_codes_give_back_the_old_code_vectors() -> None:
    """Round trip: an old version's rows and codes give code vectors; fitting rows for the
    very same codes gives those vectors back (the rows themselves only up to a shift between
    levels, which the vectors do not see)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    codebook = ResidualCodebook.train(x, 3, 8, seed=0)
    paths = codebook.encode(x)
    lengths = np.full(len(x), 3)
    lengths[::3] = 2  # a third of the items served a shorter prefix
    item_rows = _codes(paths, 8, lengths)
    old_rows = rng.normal(size=(24, 6)).astype(np.float32)
    targets = code_vectors(old_rows, item_rows)
    init = rng.normal(size=old_rows.shape).astype(np.float32)
    fit = fit_rows(targets, item_rows, init, sweeps=40)
    np.testing.assert_allclose(code_vectors(fit.rows, item_rows), targets, atol=2e-3)
    assert fit.error_after < 1e-4 * fit.error_before


def test_items_that_moved_together_carry_what_they_learned_to_a_new_codebook() -> None:
    """Old rows that make similar items' code vectors similar (they were trained that way);
    a new codebook of another shape codes the same items: the fitted rows give each item a
    code vector far closer to its old one than fresh rows do, and closer the deeper the new
    codes go (more rows to fit with)."""
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(12, 16))
    x = (centers[rng.integers(0, 12, 900)] + 0.3 * rng.normal(size=(900, 16))).astype(np.float32)
    old = ResidualCodebook.train(x, 2, 8, seed=0)
    old_rows_ids = _codes(old.encode(x), 8, np.full(len(x), 2))
    old_rows = rng.normal(size=(16, 4)).astype(np.float32)
    targets = code_vectors(old_rows, old_rows_ids) + x[:, :4]  # what training put there
    new = ResidualCodebook.train(x, 3, 16, seed=1)
    paths = new.encode(x)
    errors = []
    for depth in (1, 2, 3):
        item_rows = _codes(paths, 16, np.full(len(x), depth))
        init = (rng.normal(size=(48, 4)) / 2).astype(np.float32)
        fit = fit_rows(targets, item_rows, init)
        assert fit.error_after < 0.5 * fit.error_before
        errors.append(fit.error_after)
    assert errors[0] > errors[1] > errors[2]


def test_bad_shapes_are_named() -> None:
    targets, item_rows, init, _ = _case(0)
    with pytest.raises(QuantizeError, match="one padded row-id list per target"):
        fit_rows(targets[:-1], item_rows, init)
    with pytest.raises(QuantizeError, match="covering every id"):
        fit_rows(targets, item_rows, init[:10])


def test_refit_fits_the_old_tables_code_vectors_with_its_weights_then_ones() -> None:
    """``refit`` = the old code vectors as targets, the old weights for the positions they
    cover and 1 beyond, fresh rows seeded and scaled as a new table's."""
    _, new_rows, _, _ = _case(7, n=120, levels=3)
    rng = np.random.default_rng(8)
    old_rows = rng.normal(size=(30, 5)).astype(np.float32)
    old_item_rows = rng.integers(-1, 30, size=(120, 2))
    weights = np.array([0.5, 2.0])
    got = refit(old_rows, old_item_rows, new_rows, 200, weights, seed=3)
    init = (np.random.default_rng(3).standard_normal((200, 5)) / np.sqrt(5)).astype(np.float32)
    want = fit_rows(
        code_vectors(old_rows, old_item_rows, weights),
        new_rows,
        init,
        np.r_[weights, np.ones(new_rows.shape[1] - 2)],
    )
    np.testing.assert_array_equal(got.rows, want.rows)
    assert got.error_after == want.error_after < got.error_before
