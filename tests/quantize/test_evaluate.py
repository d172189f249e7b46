"""Tests of the offline evaluation protocol against slow reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize.evaluate import (
    evaluate_ranking,
    evaluate_ranking_chunked,
    holdout_split,
    leave_last_split,
    pad_histories,
    pad_slices,
    paired_difference,
    ranks,
    recall_ndcg,
    summarize,
    target_slices,
    user_histories,
    user_sequences,
    wilson_interval,
)
from quantize.exceptions import QuantizeError


def _random_log(seed: int, n: int = 60, n_users: int = 8, n_items: int = 12):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, size=n)
    items = rng.integers(0, n_items, size=n)
    stamps = rng.integers(0, 10, size=n)  # many ties on purpose
    return users, items, stamps


def _reference_split(users, stamps):
    """Slow reference: per user, sort (timestamp, log position); label the last two."""
    label = ["train"] * len(users)
    for u in set(users.tolist()):
        idx = sorted(np.flatnonzero(users == u).tolist(), key=lambda i: (stamps[i], i))
        if len(idx) >= 2:
            label[idx[-1]] = "test"
        if len(idx) >= 3:
            label[idx[-2]] = "valid"
    return label


def _reference_rank(row: np.ndarray, target: int) -> int:
    """Slow reference: sort descending with the target after its ties; its position."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i == target))
    return order.index(target)


def test_leave_last_split_by_hand() -> None:
    # user 0: times 5, 1, 3 -> order (1, 3, 5): test = index 0, valid = index 2, train = 1
    # user 1: two interactions -> test = the later, the earlier stays in train
    # user 2: one interaction -> train
    users = np.array([0, 0, 1, 0, 1, 2])
    stamps = np.array([5, 1, 7, 3, 2, 4])
    split = leave_last_split(users, stamps)
    assert split.test.tolist() == [True, False, True, False, False, False]
    assert split.valid.tolist() == [False, False, False, True, False, False]
    assert split.train.tolist() == [False, True, False, False, True, True]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000))
def test_leave_last_split_matches_reference(seed: int) -> None:
    users, _, stamps = _random_log(seed)
    split = leave_last_split(users, stamps)
    label = _reference_split(users, stamps)
    assert split.test.tolist() == [x == "test" for x in label]
    assert split.valid.tolist() == [x == "valid" for x in label]
    assert split.train.tolist() == [x == "train" for x in label]


def test_user_sequences_and_padding() -> None:
    users = np.array([1, 0, 1, 1])
    items = np.array([7, 3, 5, 6])
    stamps = np.array([2, 0, 1, 2])
    seqs = user_sequences(users, items, stamps, n_users=3)
    assert [s.tolist() for s in seqs] == [[3], [5, 7, 6], []]
    padded = pad_histories(seqs, 2)
    assert padded.tolist() == [[-1, 3], [7, 6], [-1, -1]]


def test_ranks_by_hand() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    # row 0, target 2: one better (0.9), one tie (index 3) -> rank 2
    # row 1, target 0: three ties -> rank 3 (ties count against the target)
    assert ranks(scores, np.array([2, 0])).tolist() == [2, 3]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000))
def test_ranks_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(6, 9)).astype(np.float32)  # coarse values: many ties
    targets = rng.integers(0, 9, size=6)
    expected = [_reference_rank(scores[i], int(targets[i])) for i in range(6)]
    assert ranks(scores, targets).tolist() == expected
    assert ranks(torch.from_numpy(scores), targets).tolist() == expected


def test_recall_ndcg_by_hand() -> None:
    recall, ndcg = recall_ndcg(np.array([0, 1, 9, 10]), k=10)
    assert recall.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert ndcg[0] == 1.0
    assert ndcg[1] == pytest.approx(1.0 / math.log2(3.0))
    assert ndcg[2] == pytest.approx(1.0 / math.log2(11.0))
    assert ndcg[3] == 0.0


def test_evaluate_ranking_batches_equal_one_pass() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(37, 15))
    targets = rng.integers(0, 15, size=37)
    slices = {"odd": np.arange(37) % 2 == 1}
    batched = evaluate_ranking(lambda idx: scores[idx], targets, k=5, slices=slices, batch_size=4)
    whole = summarize(ranks(scores, targets), k=5, slices=slices)
    assert batched.as_dict() == whole.as_dict()
    # reference average computed by hand from the slow rank
    ref = [_reference_rank(scores[i], int(targets[i])) for i in range(37)]
    hits = [r < 5 for r in ref]
    assert batched.recall == pytest.approx(sum(hits) / 37)
    odd_hits = [h for i, h in enumerate(hits) if i % 2 == 1]
    assert batched.slices["odd"].recall == pytest.approx(sum(odd_hits) / len(odd_hits))
    assert batched.slices["odd"].n == len(odd_hits)


def test_empty_slice_is_nan_not_zero() -> None:
    result = summarize(np.array([0, 3]), slices={"none": np.array([False, False])})
    assert math.isnan(result.slices["none"].recall)
    assert result.slices["none"].n == 0


def test_target_slices_by_hand() -> None:
    # counts: item0=3, item1=1, item2=2, item3=0, item4=0 -> head (top 20% of 5 = 1): item0
    train_items = np.array([0, 0, 0, 1, 2, 2])
    slices = target_slices(train_items, np.array([0, 2, 3, 4]), n_items=5)
    assert slices["head"].tolist() == [True, False, False, False]
    assert slices["cold"].tolist() == [False, False, True, True]


def test_holdout_split_takes_latest_of_recent_users() -> None:
    users = np.array([0, 1, 0, 2, 1, 2, 3])
    stamps = np.array([1, 2, 3, 4, 5, 6, 7])
    # last interactions: u0 @3 (idx 2), u1 @5 (idx 4), u2 @6 (idx 5), u3 @7 (idx 6, no history)
    split = holdout_split(users, stamps, max_users=2, min_history=1)
    assert split.holdout.tolist() == [4, 5]
    assert split.train.tolist() == [0, 1, 2, 3, 6]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10), st.integers(0, 3))
def test_holdout_split_matches_reference(seed: int, max_users: int, min_history: int) -> None:
    users, _, stamps = _random_log(seed)
    split = holdout_split(users, stamps, max_users=max_users, min_history=min_history)
    lasts = []
    for u in set(users.tolist()):
        idx = sorted(np.flatnonzero(users == u).tolist(), key=lambda i: (stamps[i], i))
        if len(idx) - 1 >= min_history:
            lasts.append(idx[-1])
    lasts.sort(key=lambda i: (stamps[i], i), reverse=True)
    assert sorted(split.holdout.tolist()) == sorted(lasts[:max_users])
    assert sorted(split.train.tolist() + split.holdout.tolist()) == list(range(len(users)))


def test_bad_inputs_raise_quantize_error() -> None:
    with pytest.raises(QuantizeError):
        ranks(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(QuantizeError):
        leave_last_split(np.array([0, 1]), np.array([1]))
    with pytest.raises(QuantizeError):
        target_slices(np.array([0]), np.array([0]), n_items=1, head_fraction=0.0)


def _reference_wilson(hits: int, n: int, z: float) -> tuple[float, float]:
    """Slow reference: the proportions p whose score test does not reject hits / n."""
    grid = np.linspace(0.0, 1.0, 200_001)
    inside = np.abs(hits / n - grid) <= z * np.sqrt(grid * (1 - grid) / n) + 1e-12
    return float(grid[inside].min()), float(grid[inside].max())


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.data())
def test_wilson_interval_matches_reference(n: int, data: st.DataObject) -> None:
    hits = data.draw(st.integers(0, n))
    low, high = wilson_interval(hits, n)
    ref_low, ref_high = _reference_wilson(hits, n, 1.959963984540054)
    assert low == pytest.approx(ref_low, abs=2e-5)
    assert high == pytest.approx(ref_high, abs=2e-5)
    assert 0.0 <= low <= hits / n <= high <= 1.0


def test_wilson_interval_narrows_with_more_cases() -> None:
    small = wilson_interval(3, 66)
    large = wilson_interval(30, 660)
    assert small[0] < large[0] < large[1] < small[1]
    assert wilson_interval(0, 10)[1] > 0.0  # zero hits is not certainty
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(QuantizeError):
        wilson_interval(5, 4)
    with pytest.raises(QuantizeError):
        wilson_interval(1, 4, confidence=1.0)


def test_slice_hits_count_cases_in_the_top_k() -> None:
    rank = np.array([0, 9, 10, 3, 50])
    ev = summarize(rank, k=10, slices={"odd": np.array([False, True, False, True, False])})
    assert ev.slices["all"].hits == 3
    assert ev.slices["odd"].hits == 2
    assert ev.slices["odd"].recall_interval() == wilson_interval(2, 2)


def test_paired_difference_cluster_bootstrap() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 6)
    a = (rng.random(len(groups)) < 0.3).astype(float)
    b = (rng.random(len(groups)) < 0.3).astype(float)
    iid = paired_difference(a, b, seed=1)
    clustered = paired_difference(a, b, groups, seed=1)
    assert iid.diff == clustered.diff == pytest.approx(float((a - b).mean()))
    assert iid.low <= iid.diff <= iid.high
    assert (iid.n, iid.n_groups, clustered.n_groups) == (72, 72, 12)
    same = paired_difference(a, a, groups)
    assert same.diff == same.low == same.high == 0.0
    # a method that wins on every case is ahead with the whole interval
    ahead = paired_difference(np.ones(20), np.zeros(20), np.arange(20) % 4)
    assert ahead.low == ahead.high == 1.0
    with pytest.raises(QuantizeError):
        paired_difference(a, b[:-1])


# -- chunked full ranking (bounded memory) ----------------------------------------------------


@pytest.mark.parametrize("budget", [1, 3, 7, 12, 1000])
def test_chunked_ranking_equals_one_pass(budget: int) -> None:
    rng = np.random.default_rng(budget)
    scores = rng.integers(0, 4, size=(23, 12)).astype(np.float32)  # many ties
    targets = rng.integers(0, 12, size=23)
    slices = {"odd": np.arange(23) % 2 == 1}
    one = evaluate_ranking(lambda idx: scores[idx], targets, k=3, slices=slices)
    chunked = evaluate_ranking_chunked(
        lambda idx: lambda a, b: scores[idx, a:b],
        targets,
        12,
        k=3,
        slices=slices,
        batch_size=5,
        score_budget=budget * 5,  # item chunks of `budget` items
    )
    np.testing.assert_array_equal(chunked.rank, one.rank)
    assert chunked.slices == one.slices


def test_chunked_ranking_never_holds_more_than_the_budget() -> None:
    held: list[int] = []
    scores = np.random.default_rng(0).normal(size=(10, 100)).astype(np.float32)

    def prepare(idx):
        def chunk(a, b):
            held.append(len(idx) * (b - a))
            return scores[idx, a:b]

        return chunk

    evaluate_ranking_chunked(prepare, np.arange(10), 100, batch_size=4, score_budget=40)
    assert max(held) <= 40


def test_chunked_ranking_calls_check_and_stops() -> None:
    class Stop(Exception):
        pass

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        evaluate_ranking_chunked(
            lambda idx: lambda a, b: np.zeros((len(idx), b - a), dtype=np.float32),
            np.zeros(4, dtype=np.int64),
            50,
            batch_size=4,
            score_budget=40,
            check=check,
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_user_histories_equal_pad_histories_of_sequences(seed: int) -> None:
    users, items, stamps = _random_log(seed, n=80, n_users=9)
    wanted = np.array([3, 0, 8, 3, 5])
    seqs = user_sequences(users, items, stamps, n_users=9)
    np.testing.assert_array_equal(
        user_histories(users, items, stamps, wanted, 4), pad_histories([seqs[u] for u in wanted], 4)
    )
    values = np.arange(20)
    np.testing.assert_array_equal(
        pad_slices(values, np.array([0, 5, 19]), np.array([0, 3, 1]), 2),
        [[-1, -1], [6, 7], [-1, 19]],
    )
