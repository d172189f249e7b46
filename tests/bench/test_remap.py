"""bench/remap.py: a migration's first version from fresh or fitted rows, on a small
synthetic catalogue."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import bench.remap as remap
from bench.drift import plan_stages, stage_view, synthetic_catalogue
from bench.quality import Settings
from quantize.codebook import suggest_shape
from quantize.table_model import ModelConfig
from quantize.train import TrainConfig


def test_bootstrap_items_are_the_first_by_first_interaction() -> None:
    cat = synthetic_catalogue(300, 2000, 3, seed=0)
    ds = stage_view(cat, plan_stages(3, 1, 2, seed=0), 1).ds
    got = remap.bootstrap_items(ds, 50)
    first = np.full(ds.n_items, np.iinfo(np.int64).max)
    np.minimum.at(first, ds.items, ds.timestamps)
    assert len(got) == 50 and len(set(got.tolist())) == 50
    assert first[got].max() <= np.sort(first)[49]
    assert len(remap.bootstrap_items(ds, 10_000)) == ds.n_items


def test_fitted_rows_start_nearer_the_old_version_than_fresh_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every arm at every budget is measured, beside v1; before any training (budget 0)
    the fitted rows rank nearly as v1 does and far better than fresh ones: they carry what
    v1 learned."""
    monkeypatch.setattr(remap, "BUDGETS", (0, 1))
    cat = synthetic_catalogue(900, 9000, 6, seed=0)
    stage = stage_view(cat, plan_stages(6, 2, 2, seed=0), 1)
    st = Settings(
        model=replace(ModelConfig(), hidden=16, text_dim=int(stage.emb.shape[1])),
        train=TrainConfig(epochs=2, seed=0),
        policies=(remap.POLICY,),
        few_fraction=0.1,
        seed=0,
    )
    cells = remap.run_dataset(st, stage.ds, stage.emb, bootstrap=200)
    assert [(c.arm, c.budget) for c in cells] == [
        ("v1 (A)", "full"),
        *((arm, str(b)) for b in (0, 1) for arm in remap.ARMS),
    ]
    by = {(c.arm, c.budget): c for c in cells}
    # fitted: most of v1's recall before a step (4 catalogue seeds: 0.94-1.19x of v1);
    # fresh rows are noise beside the text (0.03-0.19x)
    assert by["fitted", "0"].recall > 0.7 * by["v1 (A)", "full"].recall > by["fresh", "0"].recall
    assert by["fitted", "0"].epochs == 0 and by["fitted", "1"].epochs == 1
    assert suggest_shape(200) != suggest_shape(stage.ds.n_items)  # A and B differ in shape
