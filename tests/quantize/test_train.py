"""Tests of per-domain training on a small synthetic log with a planted structure."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from quantize.evaluate import evaluate_ranking, leave_last_split, pad_histories, user_sequences
from quantize.exceptions import QuantizeError
from quantize.table_model import (
    ModelConfig,
    Snapshot,
    model_from_params,
    pad_rows,
    shared_names,
)
from quantize.train import EpochReport, TrainConfig, score_histories, shared_init, train_domain

N_CLUSTERS = 4
PER_CLUSTER = 6
N_ITEMS = N_CLUSTERS * PER_CLUSTER
MODEL = ModelConfig(hidden=16, max_len=8, layers=1, heads=2, dropout=0.0)
TRAIN = TrainConfig(epochs=12, batch_tokens=256, lr=1e-2, patience=0, threads=1, seed=0)


def _planted_log(seed: int = 0, n_users: int = 60, length: int = 10):
    """Each user walks one cluster cyclically: the next item is fully determined."""
    rng = np.random.default_rng(seed)
    users, items, stamps = [], [], []
    for u in range(n_users):
        cluster = int(rng.integers(N_CLUSTERS))
        start = int(rng.integers(PER_CLUSTER))
        t0 = int(rng.integers(0, 1000))
        for t in range(length):
            users.append(u)
            items.append(cluster * PER_CLUSTER + (start + t) % PER_CLUSTER)
            stamps.append(t0 + t)
    return np.array(users), np.array(items), np.array(stamps)


def _codes() -> np.ndarray:
    """Two-level codes: a shared cluster row, then an item row."""
    return pad_rows([[i // PER_CLUSTER, N_CLUSTERS + i] for i in range(N_ITEMS)])


@pytest.fixture(scope="module")
def log():
    users, items, stamps = _planted_log()
    split = leave_last_split(users, stamps)
    return users, items, stamps, split


@pytest.fixture(scope="module")
def trained(log):
    users, items, stamps, split = log
    keep = ~split.test
    return train_domain(
        _codes(), users[keep], items[keep], stamps[keep], model_config=MODEL, config=TRAIN
    )


def _test_recall(params, log) -> float:
    users, items, stamps, split = log
    keep = ~split.test
    seqs = user_sequences(users[keep], items[keep], stamps[keep])
    hist = pad_histories([seqs[u] for u in users[split.test]], MODEL.max_len)
    model = model_from_params(MODEL, params)
    return evaluate_ranking(
        lambda idx: score_histories(model, _codes(), hist[idx]), items[split.test]
    ).recall


def test_training_reduces_loss_and_beats_popularity(trained, log) -> None:
    _users, items, _stamps, split = log
    assert trained.history[-1].loss < trained.history[0].loss
    counts = np.bincount(items[split.train], minlength=N_ITEMS).astype(float)
    popularity = evaluate_ranking(
        lambda idx: np.tile(counts, (len(idx), 1)), items[split.test]
    ).recall
    assert _test_recall(trained.params, log) > popularity
    assert trained.val_recall > popularity


def test_result_snapshot_round_trips_through_bytes(trained) -> None:
    back = Snapshot.from_bytes(trained.snapshot().to_bytes())
    assert back.config == MODEL
    assert all(np.array_equal(back.params[n], trained.params[n]) for n in trained.params)


def test_same_seed_gives_identical_params(trained, log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    again = train_domain(
        _codes(), users[keep], items[keep], stamps[keep], model_config=MODEL, config=TRAIN
    )
    assert all(np.array_equal(trained.params[n], again.params[n]) for n in trained.params)
    other = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=MODEL,
        config=replace(TRAIN, seed=1, epochs=2),
    )
    assert not np.array_equal(trained.params["table.rows"], other.params["table.rows"])


def test_seeded_runs_reproduce_the_pinned_losses_and_params(log) -> None:
    """Pinned from the code before `_run` was split into steps: a refactor of the training
    loop must keep the order of the random draws (same device and thread count; the
    tolerance only absorbs float differences between CPUs)."""
    users, items, stamps, split = log
    keep = ~split.test
    u, it, ts = users[keep], items[keep], stamps[keep]

    def check(result, losses, ndcgs, best, n_windows, n_targets, rows_l1, all_l1) -> None:
        assert [r.loss for r in result.history] == pytest.approx(losses, rel=1e-4)
        assert [r.val_ndcg for r in result.history] == pytest.approx(ndcgs, rel=1e-4)
        assert (result.best_epoch, result.n_windows, result.n_targets) == (
            best,
            n_windows,
            n_targets,
        )
        assert float(np.abs(result.params["table.rows"]).sum()) == pytest.approx(rows_l1, rel=1e-4)
        total = float(sum(np.abs(v).sum() for v in result.params.values()))
        assert total == pytest.approx(all_l1, rel=1e-4)

    base = train_domain(_codes(), u, it, ts, model_config=MODEL, config=replace(TRAIN, epochs=3))
    check(
        base,
        [6.890487194061279, 3.999786138534546, 2.7937142848968506],
        [0.34985222201044996, 0.48749353303012233, 0.5632307488826787],
        3,
        60,
        420,
        87.59538269042969,
        398.22882080078125,
    )
    # incremental: replay sample, validation sample and sampled negatives draw in turn
    incremental = train_domain(
        _codes(),
        u,
        it,
        ts,
        model_config=MODEL,
        config=replace(
            TRAIN,
            epochs=2,
            negatives=8,
            replay_ratio=0.5,
            val_users=20,
            incremental_validation="all",
        ),
        init_from=base.params,
        new_since=int(np.quantile(ts, 0.7)),
    )
    check(
        incremental,
        [2.5004723072052, 1.8541390895843506],
        [0.5904820221771485, 0.6919083469538604],
        2,
        27,
        189,
        87.59660339355469,
        401.6480712890625,
    )


def test_domain_fine_tune_leaves_shared_params_bitwise_unchanged(trained, log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    tuned = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=MODEL,
        config=replace(TRAIN, trainable="domain", epochs=3, seed=5),
        init_from=trained.params,
    )
    names = shared_names(trained.params)
    assert names
    for name in names:
        assert np.array_equal(tuned.params[name], trained.params[name]), name
    assert not np.array_equal(tuned.params["table.rows"], trained.params["table.rows"])
    n_table = sum(trained.params[n].size for n in trained.params if n.startswith("table."))
    assert tuned.trainable_params == n_table


def test_warm_start_starts_at_the_given_params(trained, log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    frozen_lr = replace(TRAIN, epochs=1, lr=1e-12)
    warm = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=MODEL,
        config=frozen_lr,
        init_from=trained.params,
    )
    cold = train_domain(
        _codes(), users[keep], items[keep], stamps[keep], model_config=MODEL, config=frozen_lr
    )
    for name in trained.params:
        np.testing.assert_allclose(warm.params[name], trained.params[name], atol=1e-6)
    assert not np.allclose(cold.params["table.rows"], trained.params["table.rows"], atol=1e-3)
    assert warm.val_ndcg == pytest.approx(trained.val_ndcg, abs=1e-6)


def test_warm_start_into_a_grown_table_copies_the_overlap(trained, log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    grown_rows = trained.params["table.rows"].shape[0] + 5
    warm = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=MODEL,
        config=replace(TRAIN, epochs=1, lr=1e-12),
        init_from=trained.params,
        n_rows=grown_rows,
    )
    rows = warm.params["table.rows"]
    assert rows.shape[0] == grown_rows
    np.testing.assert_allclose(rows[: grown_rows - 5], trained.params["table.rows"], atol=1e-6)


def test_incremental_trains_fewer_windows_and_keeps_quality(trained, log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    u, it, ts = users[keep], items[keep], stamps[keep]
    cutoff = int(np.quantile(ts, 0.9))
    inc = train_domain(
        _codes(),
        u,
        it,
        ts,
        model_config=MODEL,
        config=replace(TRAIN, epochs=3, replay_ratio=0.5),
        init_from=trained.params,
        new_since=cutoff,
    )
    assert 0 < inc.n_windows < trained.n_windows
    assert _test_recall(inc.params, log) >= 0.9 * _test_recall(trained.params, log)


def test_sampled_negatives_reduce_loss(log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    result = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=MODEL,
        config=replace(TRAIN, negatives=8, epochs=6),
    )
    assert result.history[-1].loss < result.history[0].loss


def test_progress_time_budget_and_threads(log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    seen: list[EpochReport] = []
    before = torch.get_num_threads()
    result = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=replace(MODEL, encoder="attention"),
        config=replace(TRAIN, max_seconds=0.0, threads=1),
        progress=seen.append,
    )
    assert [r.epoch for r in seen] == [1]
    assert result.epochs_run == 1
    assert torch.get_num_threads() == before


def test_text_projection_model_trains(log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    text = np.random.default_rng(0).normal(size=(N_ITEMS, 5)).astype(np.float32)
    result = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=replace(MODEL, text_dim=5, combine="level"),
        config=replace(TRAIN, epochs=3),
        text=text,
    )
    assert result.params["table.text_proj.weight"].shape == (16, 5)
    assert result.history[-1].loss < result.history[0].loss


def test_invalid_calls_raise_quantize_error(log) -> None:
    users, items, stamps, _split = log
    with pytest.raises(QuantizeError):
        train_domain(_codes(), users, items, stamps, config=replace(TRAIN, trainable="domain"))
    with pytest.raises(QuantizeError):
        train_domain(_codes(), users, items, stamps, new_since=5)
    with pytest.raises(QuantizeError):
        train_domain(_codes(), users, items + N_ITEMS, stamps)
    with pytest.raises(QuantizeError):
        train_domain(_codes(), users, items, stamps, model_config=replace(MODEL, text_dim=3))
    with pytest.raises(QuantizeError):
        TrainConfig(lr=0.0)
    empty = np.zeros(0, dtype=np.int64)
    with pytest.raises(QuantizeError, match="no training windows"):
        train_domain(_codes(), empty, empty, empty, model_config=MODEL, config=TRAIN)


def test_shared_init_keeps_level_rows_and_drops_domain_rows(trained) -> None:
    init = shared_init(trained.params, N_CLUSTERS)
    assert np.array_equal(init["table.rows"], trained.params["table.rows"][:N_CLUSTERS])
    for name in trained.params:
        if name != "table.rows":
            assert np.array_equal(init[name], trained.params[name]), name
    init["table.rows"][0, 0] += 1.0  # a copy: the source params are untouched
    assert not np.array_equal(init["table.rows"][0], trained.params["table.rows"][0])
    with pytest.raises(QuantizeError):
        shared_init(trained.params, 10_000)


def test_batches_pack_windows_by_token_budget() -> None:
    from quantize.train import _batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=200)
    batches = _batches(lengths, 24, np.random.default_rng(1))
    flat = np.sort(np.concatenate(batches))
    assert np.array_equal(flat, np.arange(200))  # every window exactly once
    for batch in batches:
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 24
    # short windows travel in larger batches than long ones
    sizes = {int(lengths[b].max()): len(b) for b in batches}
    assert sizes[min(sizes)] > sizes[max(sizes)]


def test_seen_items_are_the_items_of_training_windows(log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    held_out = items == 0  # item 0 never appears in training
    mask = keep & ~held_out
    result = train_domain(
        _codes(),
        users[mask],
        items[mask],
        stamps[mask],
        model_config=MODEL,
        config=replace(TRAIN, epochs=1),
    )
    assert result.seen_items is not None
    expected = np.zeros(N_ITEMS, dtype=bool)  # reference: each user's log minus its last item
    for seq in user_sequences(users[mask], items[mask], stamps[mask]):
        rest = seq[:-1] if len(seq) >= 2 else seq
        if len(rest) >= 2:
            expected[rest] = True
    assert not result.seen_items[0]
    assert result.seen_items.tolist() == expected.tolist()


def test_incremental_run_validates_on_the_new_targets(trained, log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    u, it, ts = users[keep], items[keep], stamps[keep]
    cutoff = int(np.quantile(ts, 0.7))
    frozen = replace(TRAIN, epochs=1, lr=1e-12, min_val_users=1)

    def run(mode: str):
        return train_domain(
            _codes(),
            u,
            it,
            ts,
            model_config=MODEL,
            config=replace(frozen, incremental_validation=mode),  # type: ignore[arg-type]
            init_from=trained.params,
            new_since=cutoff,
        )

    # reference: each user's last interaction is its validation target, the rest its history
    model = model_from_params(MODEL, trained.params)
    hist, targets, recent = [], [], []
    for user in np.unique(u):
        idx = np.flatnonzero(u == user)
        idx = idx[np.lexsort((idx, ts[idx]))]
        if len(idx) >= 2:
            hist.append(it[idx[:-1]])
            targets.append(it[idx[-1]])
            recent.append(ts[idx[-1]] >= cutoff)
    padded = pad_histories(hist, MODEL.max_len)
    ev = evaluate_ranking(
        lambda i: score_histories(model, _codes(), padded[i]),
        np.array(targets),
        slices={"new": np.array(recent)},
    )
    assert 0 < ev.slices["new"].n < len(targets)
    assert run("new").val_ndcg == pytest.approx(ev.slices["new"].ndcg, abs=1e-6)
    assert run("all").val_ndcg == pytest.approx(ev.ndcg, abs=1e-6)
