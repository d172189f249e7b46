"""Tests of per-domain training on a small synthetic log with a planted structure."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quantize.train as train_module
from quantize.evaluate import (
    evaluate_ranking,
    leave_last_split,
    pad_histories,
    ranks,
    user_sequences,
)
from quantize.exceptions import QuantizeError
from quantize.table_model import (
    ModelConfig,
    Snapshot,
    model_from_params,
    pad_rows,
    shared_names,
)
from quantize.train import (
    EpochReport,
    TrainConfig,
    _all_item_vectors,
    _candidates,
    _loss,
    _prepare,
    bfloat16_pays,
    logits_precision,
    pool_log_q,
    rank_histories,
    sampled_softmax_loss,
    score_histories,
    shared_init,
    train_domain,
)

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
    tolerance only absorbs float differences between CPUs; float32 logits, which every CPU
    computes alike)."""
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

    pinned = replace(TRAIN, logits_precision="float32")  # the same on every CPU
    base = train_domain(_codes(), u, it, ts, model_config=MODEL, config=replace(pinned, epochs=3))
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
    # incremental: replay sample and validation sample draw in turn (the rule keeps this
    # small catalogue on the full softmax, so `negatives` draws nothing)
    incremental = train_domain(
        _codes(),
        u,
        it,
        ts,
        model_config=MODEL,
        config=replace(
            pinned,
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
        config=replace(TRAIN, softmax="sampled", negatives=8, epochs=6),
    )
    assert result.loss == "sampled"
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
    # the budget is checked before every step: no step, no validated epoch, nothing to serve
    assert seen == [] and result.epochs_run == 0 and result.steps == 0
    assert result.out_of_time and not result.validated and result.best_epoch == 0
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("text_hidden", [0, 7])
def test_text_projection_model_trains(log, text_hidden: int) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    text = np.random.default_rng(0).normal(size=(N_ITEMS, 5)).astype(np.float32)
    result = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=replace(MODEL, text_dim=5, combine="level", text_hidden=text_hidden),
        config=replace(TRAIN, epochs=3),
        text=text,
    )
    assert result.params["table.text_proj.weight"].shape == (16, text_hidden or 5)
    assert ("table.text_in.weight" in result.params) == bool(text_hidden)
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


# -- scale: numpy windows, sampled loss, stop and budget inside epochs -----------------------


def _slow_prepare(users, items, stamps, max_len, new_since):
    """Reference: the per-user Python loop the numpy windows replace."""
    order = np.lexsort((np.arange(len(users)), stamps, users))
    su, si, st = users[order], items[order], stamps[order]
    inputs, targets, is_new, val_h, val_t, val_ts = [], [], [], [], [], []
    for u in np.unique(su):
        seq, ts = si[su == u], st[su == u]
        if len(seq) >= 2:
            val_h.append(seq[:-1])
            val_t.append(seq[-1])
            val_ts.append(ts[-1])
            seq, ts = seq[:-1], ts[:-1]
        end = len(seq) - 1
        while end > 0:
            begin = max(0, end - max_len)
            inp = np.full(max_len, -1)
            tgt = np.full(max_len, -1)
            inp[max_len - (end - begin) :] = seq[begin:end]
            tgt[max_len - (end - begin) :] = seq[begin + 1 : end + 1]
            inputs.append(inp)
            targets.append(tgt)
            is_new.append(
                new_since is not None and bool((ts[begin + 1 : end + 1] >= new_since).any())
            )
            end = begin
    return inputs, targets, is_new, pad_histories(val_h, max_len), val_t, val_ts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_windows_equal_the_per_user_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    users = rng.integers(0, 40, n)
    items = rng.integers(0, 30, n)
    stamps = rng.integers(0, 50, n)  # ties on purpose
    since = None if seed == 0 else 25
    data = _prepare(users, items, stamps, 30, 7, since, validate=True)
    inputs, targets, is_new, val_h, val_t, val_ts = _slow_prepare(users, items, stamps, 7, since)
    every = np.arange(len(data.windows))
    np.testing.assert_array_equal(data.windows.inputs(every, 7), np.array(inputs))
    np.testing.assert_array_equal(data.windows.targets(every, 7), np.array(targets))
    np.testing.assert_array_equal(data.windows.is_new, np.array(is_new))
    # each window padded to a narrower width keeps its last positions (a step's padding)
    width = int(data.windows.lengths.max())
    np.testing.assert_array_equal(data.windows.inputs(every, width), np.array(inputs)[:, -width:])
    # item counts from the slices: the targets, and every item a window uses
    np.testing.assert_array_equal(
        data.windows.item_counts(None, 30, inputs=False),
        np.bincount(np.array(targets)[np.array(targets) >= 0], minlength=30),
    )
    some = every[::3]
    used = np.concatenate([np.array(inputs)[some].ravel(), np.array(targets)[some].ravel()])
    np.testing.assert_array_equal(
        data.windows.item_counts(some, 30, inputs=True) > 0,
        np.bincount(used[used >= 0], minlength=30) > 0,
    )
    np.testing.assert_array_equal(data.val_histories, val_h)
    np.testing.assert_array_equal(data.val_targets, val_t)
    np.testing.assert_array_equal(data.val_times, val_ts)


def _loss_setup(seed: int = 0):
    torch.manual_seed(seed)
    text = torch.randn(N_ITEMS, 5)
    model = model_from_params(
        replace(MODEL, text_dim=5),
        train_domain(
            _codes(),
            *_planted_log(seed, n_users=10)[:3],
            model_config=replace(MODEL, text_dim=5),
            config=replace(TRAIN, epochs=1),
            text=text.numpy(),
        ).params,
    )
    model.eval()  # no dropout: both sides see the same network
    rng = np.random.default_rng(seed)
    inputs = torch.as_tensor(rng.integers(-1, N_ITEMS, (5, MODEL.max_len)))
    inputs[:, -1] = torch.as_tensor(rng.integers(0, N_ITEMS, 5))
    targets = torch.as_tensor(rng.integers(0, N_ITEMS, (5, MODEL.max_len)))
    targets[inputs < 0] = -1
    return model, torch.as_tensor(_codes()), text, inputs, targets


def _grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [
        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for p in model.parameters()
    ]


def _slow_sampled_loss(model, rows, text, inputs, targets, pool, log_q) -> torch.Tensor:
    """Reference: every item's vector, then one position at a time."""
    vecs = model.item_vectors(rows, text)
    states = model.encode(inputs, vecs)
    offset = model.repeat_offset()
    losses = []
    for b in range(inputs.shape[0]):
        for t in range(inputs.shape[1]):
            if targets[b, t] < 0:
                continue
            seen = set(inputs[b, : t + 1][inputs[b, : t + 1] >= 0].tolist())
            logits = []
            for j, item in enumerate(pool.tolist()):
                s = torch.nn.functional.cosine_similarity(states[b, t], vecs[item], dim=0)
                s = s / model.config.temperature + (offset if item in seen else 0.0)
                logits.append(s - log_q[j])
            stacked = torch.stack(logits)
            at = pool.tolist().index(int(targets[b, t]))
            losses.append(torch.logsumexp(stacked, 0) - stacked[at])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_loss_and_gradient_equal_a_slow_reference(seed: int) -> None:
    model, rows, text, inputs, targets = _loss_setup(seed)
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, N_ITEMS, (6,), generator=g)
    pool = torch.unique(torch.cat([targets[targets >= 0], extra]))
    log_q = torch.log(torch.rand(len(pool), generator=g) * 0.9 + 0.05)
    fast = sampled_softmax_loss(model, rows, text, inputs, targets, pool, log_q)
    fast_grads = _grads(model, fast)
    slow = _slow_sampled_loss(model, rows, text, inputs, targets, pool, log_q)
    slow_grads = _grads(model, slow)
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_every_item_sampled_once_with_uniform_q_is_the_full_softmax() -> None:
    model, rows, text, inputs, targets = _loss_setup(3)
    pool = torch.arange(N_ITEMS)
    share = torch.full((N_ITEMS,), 1.0 / N_ITEMS, dtype=torch.float64)
    log_q = pool_log_q(share, int((targets >= 0).sum()), N_ITEMS, N_ITEMS).float()
    assert torch.allclose(log_q, log_q[0].expand(N_ITEMS))  # uniform q: a constant shift
    sampled = sampled_softmax_loss(model, rows, text, inputs, targets, pool, log_q)
    sampled_grads = _grads(model, sampled)
    windows = type("W", (), {"inputs": inputs.numpy(), "targets": targets.numpy()})
    candidates, slot = _candidates(windows, N_ITEMS, "all", torch.device("cpu"))  # type: ignore[arg-type]
    full = _loss(model, model.item_vectors(rows, text), inputs, targets, candidates, slot)
    full_grads = _grads(model, full)
    assert float(sampled.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
    for a, b in zip(sampled_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_logits_follow_the_float32_loss_and_gradient(seed: int) -> None:
    """The training loss with its logits' product in bfloat16 stays within bfloat16's
    rounding of the float32 loss, and every gradient points the same way."""
    model, rows, text, inputs, targets = _loss_setup(seed)
    windows = type("W", (), {"inputs": inputs.numpy(), "targets": targets.numpy()})
    candidates, slot = _candidates(windows, N_ITEMS, "all", torch.device("cpu"))  # type: ignore[arg-type]

    def loss(precision: torch.dtype) -> torch.Tensor:
        vecs = model.item_vectors(rows, text)
        return _loss(model, vecs, inputs, targets, candidates, slot, precision)

    single, half = loss(torch.float32), loss(torch.bfloat16)
    single_grads, half_grads = _grads(model, single), _grads(model, half)
    assert float(half.detach()) == pytest.approx(float(single.detach()), rel=2e-2)
    assert float(half.detach()) != float(single.detach())  # the bfloat16 path did run
    for a, b in zip(single_grads, half_grads, strict=True):
        if a.abs().max() > 0:
            assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_bfloat16_logits_train_as_well_as_float32(log) -> None:
    """Forced either way, training learns the planted log: the same validation ranking
    quality within a few points, both far above popularity."""
    users, items, stamps, split = log
    keep = ~split.test
    results = {
        precision: train_domain(
            _codes(),
            users[keep],
            items[keep],
            stamps[keep],
            model_config=MODEL,
            config=replace(TRAIN, logits_precision=precision),
        )
        for precision in ("float32", "bfloat16")
    }
    single, half = results["float32"], results["bfloat16"]
    assert half.val_recall >= single.val_recall - 0.05
    assert _test_recall(half.params, log) >= _test_recall(single.params, log) - 0.05
    assert not np.array_equal(half.params["table.rows"], single.params["table.rows"])


def test_logits_precision_auto_takes_bfloat16_only_where_measured_faster() -> None:
    cpu = torch.device("cpu")
    auto = TrainConfig(logits_precision="auto")
    assert logits_precision(auto, cpu) == (torch.bfloat16 if bfloat16_pays(cpu) else torch.float32)
    assert logits_precision(replace(auto, logits_precision="float32"), cpu) == torch.float32
    assert logits_precision(replace(auto, logits_precision="bfloat16"), cpu) == torch.bfloat16
    assert not bfloat16_pays(torch.device("cuda"))  # not measured there: float32
    with pytest.raises(QuantizeError, match="logits_precision='half'"):
        TrainConfig(logits_precision="half")  # type: ignore[arg-type]


def test_pool_log_q_is_the_inclusion_probability() -> None:
    share = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    got = pool_log_q(share, n_positions=3, n_sampled=4, n_candidates=10).exp()
    want = 1 - (1 - 1 / 10) ** 4 * (1 - share) ** 3
    torch.testing.assert_close(got, want)
    assert (got.diff() > 0).all()  # popular items are likelier in the pool


def test_the_rule_picks_full_softmax_up_to_the_threshold() -> None:
    cfg = TrainConfig(full_softmax_max_items=100)
    assert (cfg.loss_for(100), cfg.loss_for(101)) == ("full", "sampled")
    assert replace(cfg, softmax="full").loss_for(10**6) == "full"
    assert replace(cfg, softmax="sampled").loss_for(5) == "sampled"
    with pytest.raises(QuantizeError, match="softmax="):
        TrainConfig(softmax="nope")  # type: ignore[arg-type]


def test_sampled_training_ranks_like_full_training(log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    sampled = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=MODEL,
        config=replace(TRAIN, full_softmax_max_items=N_ITEMS - 1, negatives=6),
    )
    full = train_domain(
        _codes(), users[keep], items[keep], stamps[keep], model_config=MODEL, config=TRAIN
    )
    assert (sampled.loss, full.loss) == ("sampled", "full")
    assert _test_recall(sampled.params, log) >= 0.9 * _test_recall(full.params, log)


class _Stopped(Exception):
    pass


class _StopAfter:
    """A ``check`` that raises on its ``n``-th call."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls >= self.n:
            raise _Stopped


def test_check_stops_training_mid_epoch(log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    reports: list[EpochReport] = []
    stop = _StopAfter(3)  # the call before the run, then before the first two steps
    with pytest.raises(_Stopped):
        train_domain(
            _codes(),
            users[keep],
            items[keep],
            stamps[keep],
            model_config=MODEL,
            config=replace(TRAIN, batch_tokens=32),  # several steps per epoch
            progress=reports.append,
            check=stop,
        )
    assert stop.calls == 3 and reports == []  # stopped inside the first epoch


def test_budget_cut_keeps_the_best_validated_epoch(log) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    probe = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=MODEL,
        config=replace(TRAIN, epochs=2),
    )
    per_epoch = probe.wall_s / 2
    result = train_domain(
        _codes(),
        users[keep],
        items[keep],
        stamps[keep],
        model_config=MODEL,
        config=replace(TRAIN, epochs=200, max_seconds=3.5 * per_epoch),
    )
    assert result.out_of_time and result.validated
    assert 1 <= result.best_epoch <= result.epochs_run < 200
    assert result.wall_s < 10 * per_epoch  # stopped within a step, not after many epochs


class _StepClock:
    """A clock for the trainer that moves only when the run's ``check`` is called (before
    every step and validation batch): each call is ``tick`` seconds, so epochs of a fixed
    number of steps have an exact, noise-free length."""

    def __init__(self, tick: float) -> None:
        self.now = 0.0
        self.tick = tick

    def perf_counter(self) -> float:
        return self.now

    def __call__(self) -> None:
        self.now += self.tick


def test_an_epoch_the_rest_of_the_budget_cannot_fit_is_not_begun(log, monkeypatch) -> None:
    """Epochs of a fixed length (a fixed number of steps on a clock that moves per step,
    well under the quarter of the budget that would cut an epoch) and a budget with room
    for five epochs and a half: the run stops after the fifth (a sixth would end past the
    budget and be dropped), so every step it took belongs to a validated epoch. Before this
    rule the sixth was begun, cut at the budget and thrown away."""
    users, items, stamps, split = log
    keep = ~split.test
    args = (_codes(), users[keep], items[keep], stamps[keep])
    steps = 10
    fixed = replace(TRAIN, batch_tokens=16, epoch_steps=steps)
    clock = _StepClock(tick=1.0)
    monkeypatch.setattr(train_module, "time", clock)
    probe: list[EpochReport] = []
    config = replace(fixed, epochs=2)
    train_domain(*args, model_config=MODEL, config=config, progress=probe.append, check=clock)
    per_epoch = probe[1].elapsed_s - probe[0].elapsed_s
    assert per_epoch > steps  # the steps and the validation batches
    result = train_domain(
        *args,
        model_config=MODEL,
        config=replace(fixed, epochs=50, max_seconds=5.5 * per_epoch),
        check=clock,
    )
    assert result.out_of_time and result.validated and result.epochs_run == 5
    assert result.steps == 5 * steps  # no step spent on a dropped epoch


@pytest.mark.parametrize("budget", [1, 7, 10_000])
def test_chunked_rank_histories_equal_ranks_of_full_scores(trained, log, budget: int) -> None:
    users, items, stamps, split = log
    keep = ~split.test
    seqs = user_sequences(users[keep], items[keep], stamps[keep])
    hist = pad_histories([seqs[u] for u in users[split.test]], MODEL.max_len)
    model = model_from_params(MODEL, trained.params)
    full = ranks(score_histories(model, _codes(), hist), items[split.test])
    chunked = rank_histories(
        model, _codes(), hist, items[split.test], batch_size=8, score_budget=8 * budget
    )
    np.testing.assert_array_equal(chunked, full)


class _Count:
    """A ``check`` that counts its calls (one before the run, one per step and per
    validation batch)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_epoch_steps_caps_the_steps_between_two_validations(log) -> None:
    """With ``epoch_steps``, each epoch is that many steps (a random part of the log): the
    same number of validations as epochs, far fewer steps than whole passes; a cap above
    the pass changes nothing (same parameters, bit for bit)."""
    users, items, stamps, split = log
    keep = ~split.test
    args = (_codes(), users[keep], items[keep], stamps[keep])
    small = replace(TRAIN, epochs=3, batch_tokens=16)  # many steps per pass
    counts = {}
    for cap in (None, 2):
        count = _Count()
        reports: list[EpochReport] = []
        train_domain(
            *args,
            model_config=MODEL,
            config=replace(small, epoch_steps=cap),
            progress=reports.append,
            check=count,
        )
        assert len(reports) == 3  # a validation after each epoch, capped or not
        counts[cap] = count.calls
    capped, whole = counts[2], counts[None]
    assert capped < whole / 3  # 2 steps an epoch instead of a pass of many
    base = train_domain(*args, model_config=MODEL, config=small)
    same = train_domain(*args, model_config=MODEL, config=replace(small, epoch_steps=10**6))
    for name, value in base.params.items():
        np.testing.assert_array_equal(value, same.params[name])
    with pytest.raises(QuantizeError, match="epoch_steps"):
        replace(small, epoch_steps=0)


def test_an_epoch_longer_than_the_budget_is_cut_so_the_run_still_validates(log) -> None:
    """A budget shorter than one pass: each epoch ends at a quarter of the budget, so the
    run has validated epochs to keep (without the cut, none would be)."""
    users, items, stamps, split = log
    keep = ~split.test
    args = (_codes(), users[keep], items[keep], stamps[keep])
    slow = replace(TRAIN, epochs=2, batch_tokens=16)  # many small steps per pass
    per_epoch = train_domain(*args, model_config=MODEL, config=slow).wall_s / 2
    result = train_domain(
        *args, model_config=MODEL, config=replace(slow, epochs=50, max_seconds=0.8 * per_epoch)
    )
    assert result.out_of_time and result.validated and result.epochs_run >= 2


def test_item_vectors_in_chunks_are_the_vectors_of_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every item's vector computed a chunk at a time (a last chunk shorter), written into
    one tensor, equals one call over every item (to the last bits of the products of
    other sizes); ``check`` runs before each chunk."""
    model, rows, text, _, _ = _loss_setup(0)
    monkeypatch.setattr("quantize.train._VECTOR_CHUNK", 7)
    calls: list[int] = []
    with torch.no_grad():
        chunked = _all_item_vectors(model, rows, text, lambda: calls.append(1))
        whole = model.item_vectors(rows, text)
    assert len(calls) == -(-N_ITEMS // 7) and N_ITEMS % 7
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)  # matmul sizes differ
