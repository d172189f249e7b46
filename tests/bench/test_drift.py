"""bench/drift.py: the stream's stages, its views of the catalogue, and both arms on a small
synthetic catalogue whose categories are far apart (the case a migration is for)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench.drift import (
    ARMS,
    Catalogue,
    _evaluate_once,
    arrivals,
    evaluate,
    plan_stages,
    run_catalogue,
    stage_view,
    synthetic_catalogue,
    train_codebook,
)
from bench.quality import Settings, make_domain
from quantize.codebook import suggest_shape
from quantize.drift import DEFAULT_HALF_LIFE, DRIFT_THRESHOLD
from quantize.table_model import ModelConfig
from quantize.train import TrainConfig


def test_stages_start_with_a_few_categories_and_end_with_all() -> None:
    plan = plan_stages(16, 3, 4, seed=1)
    assert plan.stages == 4
    counts = np.bincount(plan.stage_of, minlength=4)
    assert counts[0] == 3 and counts.sum() == 16 and (counts[1:] >= 4).all()
    assert counts[1:].max() - counts[1:].min() <= 1  # the rest split evenly
    assert not np.array_equal(plan.stage_of, plan_stages(16, 3, 4, seed=2).stage_of)
    for bad in ((4, 0, 2), (4, 4, 2), (4, 3, 3), (4, 1, 1)):
        with pytest.raises(ValueError, match="start"):
            plan_stages(*bad, seed=0)


def _tiny() -> Catalogue:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 4)).astype(np.float32)
    category = np.arange(12) % 4
    users = np.array([0, 1, 0, 2, 1, 0, 2, 2])
    items = np.array([5, 0, 1, 2, 7, 3, 11, 4])
    ts = np.arange(8) * 10
    return Catalogue("tiny", emb, category, users, items, ts)


def test_a_stage_is_its_catalogue_and_the_interactions_with_it_in_time_order() -> None:
    cat = _tiny()
    plan = plan_stages(4, 2, 3, seed=0)
    item_stage = plan.stage_of[cat.category]
    previous: set[int] = set()
    for s in range(plan.stages):
        view = stage_view(cat, plan, s)
        live = set(np.flatnonzero(item_stage <= s).tolist())
        assert set(view.items.tolist()) == live and previous <= live
        previous = live
        keep = np.isin(cat.items, view.items)
        np.testing.assert_array_equal(view.items[view.ds.items], cat.items[keep])
        np.testing.assert_array_equal(view.ds.timestamps, cat.timestamps[keep])
        users = np.array([int(u) for u in view.ds.user_ids])
        np.testing.assert_array_equal(users[view.ds.users], cat.users[keep])
        np.testing.assert_array_equal(view.emb, cat.emb[view.items])
        np.testing.assert_array_equal(view.item_stage, item_stage[view.items])
    assert len(previous) == cat.n_items


def test_items_arrive_by_their_first_interaction_then_by_number() -> None:
    cat = _tiny()
    plan = plan_stages(4, 1, 4, seed=0)
    for s in range(plan.stages):
        got = arrivals(cat, plan, s).tolist()
        mine = [i for i in range(12) if plan.stage_of[cat.category[i]] == s]
        first = {i: min(cat.timestamps[cat.items == i], default=10**9) for i in mine}
        assert got == sorted(mine, key=lambda i: (first[i], i))


def _settings(text_dim: int, train_seed: int = 0) -> Settings:
    """A small model trained one epoch per version (the entropy policy), as tests afford."""
    return Settings(
        model=replace(ModelConfig(), hidden=16, text_dim=text_dim),
        train=TrainConfig(epochs=1, seed=train_seed),
        policies=("entropy",),
        few_fraction=0.1,
        seed=0,
    )


@pytest.mark.parametrize("text", [True, False], ids=["text", "codes-only"])
def test_a_catalogue_that_moves_is_migrated_and_the_arms_split_only_then(text: bool) -> None:
    cat = synthetic_catalogue(900, 9000, 6, seed=0)
    assert sorted(set(cat.category.tolist())) == list(range(6))
    plan = plan_stages(6, 2, 3, seed=0)
    st = _settings(cat.emb.shape[1] if text else 0)
    rows = run_catalogue(
        st, cat, plan, threshold=DRIFT_THRESHOLD, half_life=DEFAULT_HALF_LIFE, seed=0
    )
    assert [(r.stage, r.arm) for r in rows] == [(s, a) for s in range(3) for a in ARMS]
    by = {(r.stage, r.arm): r for r in rows}
    assert by[0, ARMS[0]].metrics == by[0, ARMS[1]].metrics  # one run until a migration
    assert by[0, ARMS[0]].drift_score is None  # nothing arrived after the bootstrap yet
    # far-apart categories: the bootstrap codebook drifts past the threshold at stage 1
    assert by[1, ARMS[0]].drift_score is not None
    assert by[1, ARMS[0]].drift_score >= DRIFT_THRESHOLD
    assert by[1, ARMS[1]].migrated and not by[1, ARMS[0]].migrated
    assert by[1, ARMS[1]].codebook.endswith("@1") and by[2, ARMS[0]].codebook.endswith("@0")
    assert by[1, ARMS[0]].metrics != by[1, ARMS[1]].metrics
    # the no-migration arm's drift only grows as categories keep arriving
    assert by[2, ARMS[0]].drift_score >= by[1, ARMS[0]].drift_score  # type: ignore[operator]
    for r in rows:
        assert r.metrics["new_n"] + r.metrics["old_n"] == r.metrics["n"] > 0
        assert (r.metrics["new_n"] > 0) == (r.stage > 0)
        # the new items' tail and cold parts are parts of the new items (and of the cold)
        assert r.metrics["new_tail_n"] <= r.metrics["new_n"]
        assert r.metrics["new_cold_n"] <= min(r.metrics["new_n"], r.metrics["cold_n"])
    assert any(r.metrics["new_tail_n"] for r in rows)


@pytest.mark.parametrize("keep_shape", [False, True], ids=["rule", "keep-shape"])
def test_a_migration_takes_the_rules_shape_or_keeps_the_bootstraps(keep_shape: bool) -> None:
    """Stage 0 holds 300 items (the rule: 6 x 8), the last stage 900 (the rule: 7 x 8): a
    migration trains the rule's shape for its catalogue, or the bootstrap's with
    ``keep_shape``."""
    cat = synthetic_catalogue(900, 6000, 6, seed=0)
    plan = plan_stages(6, 2, 2, seed=0)
    st = _settings(cat.emb.shape[1])
    rows = run_catalogue(
        st,
        cat,
        plan,
        threshold=DRIFT_THRESHOLD,
        half_life=DEFAULT_HALF_LIFE,
        seed=0,
        keep_shape=keep_shape,
    )
    by = {(r.stage, r.arm): r for r in rows}
    boot = suggest_shape(len(stage_view(cat, plan, 0).items))
    assert by[0, ARMS[1]].codebook == f"{boot[0]}x{boot[1]} @0"
    assert by[1, ARMS[1]].migrated
    levels, k = boot if keep_shape else suggest_shape(cat.n_items)
    assert by[1, ARMS[1]].codebook == f"{levels}x{k} @1"
    assert suggest_shape(cat.n_items) != boot  # the two cases differ here


def test_repeats_average_the_runs_of_successive_training_seeds() -> None:
    cat = synthetic_catalogue(400, 3000, 4, seed=1)
    plan = plan_stages(4, 2, 2, seed=0)
    stage = stage_view(cat, plan, 1)
    codebook = train_codebook(stage.emb, seed=0)
    dom = make_domain(stage.ds, stage.emb, codebook, 20)
    st = _settings(cat.emb.shape[1], train_seed=5)
    runs = [
        _evaluate_once(replace(st, train=replace(st.train, seed=s)), dom, stage, codebook)[0]
        for s in (5, 6)
    ]
    assert runs[0]["recall"] != runs[1]["recall"] or runs[0]["ndcg"] != runs[1]["ndcg"]
    got, _ = evaluate(st, dom, stage, codebook, repeats=2)
    for key in runs[0]:
        assert got[key] == pytest.approx((runs[0][key] + runs[1][key]) / 2)
    assert got["new_recall_sd"] == pytest.approx(
        abs(runs[0]["new_recall"] - runs[1]["new_recall"]) / 2
    )
    assert evaluate(st, dom, stage, codebook)[0]["recall_sd"] == 0.0
