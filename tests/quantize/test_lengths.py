"""Length policies, prefix statistics and head detection against slow references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantize.exceptions import LengthPolicyError
from quantize.lengths import (
    POLICIES,
    EntropyLength,
    FixedLength,
    LengthPolicy,
    PopularityLength,
    PrefixStats,
    ReverseLength,
    head_flags,
    make_policy,
    policy_lengths,
    register_policy,
    thresholds_for_fraction,
)


@st.composite
def item_sets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small random (paths, popularity, is_head); few codewords so prefixes are shared."""
    n = draw(st.integers(min_value=1, max_value=40))
    levels = draw(st.integers(min_value=1, max_value=4))
    k = draw(st.integers(min_value=2, max_value=4))
    paths = draw(hnp.arrays(np.int64, (n, levels), elements=st.integers(0, k - 1)))
    pop = draw(hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 10.0])))
    head = draw(hnp.arrays(np.bool_, n)) & (pop > 0)
    return paths, pop, head


def reference_stats(
    paths: np.ndarray, pop: np.ndarray, head: np.ndarray, prefix: tuple[int, ...]
) -> tuple[int, float, float, int]:
    members = [i for i in range(len(paths)) if tuple(paths[i, : len(prefix)]) == prefix]
    mass = float(sum(pop[i] for i in members))
    if mass > 0:
        probs = [pop[i] / mass for i in members if pop[i] > 0]
        entropy = -sum(p * math.log(p) for p in probs)
    else:
        entropy = math.log(len(members))
    return len(members), mass, entropy, sum(int(head[i]) for i in members)


@settings(max_examples=50, deadline=None)
@given(item_sets())
def test_prefix_stats_match_reference(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    paths, pop, head = case
    stats = PrefixStats.compute(paths, pop, head)
    for depth in range(1, paths.shape[1] + 1):
        counts = stats.item_count(depth)
        entropies = stats.item_entropy(depth)
        for i in range(len(paths)):
            prefix = tuple(int(c) for c in paths[i, :depth])
            count, mass, entropy, heads = reference_stats(paths, pop, head, prefix)
            node = stats.node(prefix)
            assert node.count == count == counts[i]
            assert node.mass == pytest.approx(mass)
            assert node.entropy == pytest.approx(entropy, abs=1e-9)
            assert entropies[i] == pytest.approx(entropy, abs=1e-9)
            assert node.head_count == heads == stats.item_head_count(depth)[i]


def test_absent_prefix_is_empty() -> None:
    stats = PrefixStats.compute(np.array([[0, 1], [1, 1]]), np.array([1.0, 2.0]))
    assert stats.node((2,)).count == 0
    with pytest.raises(LengthPolicyError, match="depth"):
        stats.node((0, 1, 1))


def test_head_flags_hysteresis() -> None:
    pop = np.array([10.0, 6.0, 6.0, 2.0, 0.0])
    prev = np.array([False, True, False, True, True])
    flags = head_flags(pop, prev, enter_threshold=8.0, exit_threshold=4.0)
    # enters at >= 8; between exit and enter only a previous head item stays; below exit
    # nobody is head; zero popularity never is
    np.testing.assert_array_equal(flags, [True, True, False, False, False])
    with pytest.raises(LengthPolicyError, match="exit_threshold"):
        head_flags(pop, prev, enter_threshold=1.0, exit_threshold=2.0)


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 60), elements=st.floats(0, 100)),
    st.floats(0.05, 0.9),
)
def test_thresholds_for_fraction(pop: np.ndarray, fraction: float) -> None:
    enter, exit_ = thresholds_for_fraction(pop, fraction)
    assert exit_ <= enter
    flags = head_flags(pop, None, enter, exit_)
    target = round(fraction * len(pop))
    positive = int((pop > 0).sum())
    # at least the target (or every positive item), more only through ties at the cut
    assert flags.sum() >= min(target, positive)
    if flags.any():
        assert pop[flags].min() >= pop[~flags].max(initial=0.0)
    if len(np.unique(pop)) == len(pop) and target <= positive:
        assert flags.sum() == target


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 80), elements=st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.5])),
    st.floats(0.0, 1.0),
)
def test_thresholds_for_fraction_equal_a_sort_of_every_item(
    pop: np.ndarray, fraction: float
) -> None:
    """The enter threshold is the m-th largest popularity of all items (zeros included),
    never below the smallest positive one: a full sort gives the same value, ties and
    catalogues with fewer positive items than m included."""
    m = round(fraction * len(pop))
    positive = pop[pop > 0]
    if m == 0 or positive.size == 0:
        assert thresholds_for_fraction(pop, fraction) == (math.inf, math.inf)
        return
    want = max(float(np.sort(pop)[::-1][m - 1]), float(positive.min()))
    assert thresholds_for_fraction(pop, fraction, 0.5) == (want, want * 0.5)


def reference_entropy_lengths(
    paths: np.ndarray, pop: np.ndarray, head: np.ndarray, min_len: int, max_effective: float
) -> np.ndarray:
    n, levels = paths.shape
    out = np.full(n, min(min_len, levels))
    for i in np.flatnonzero(head):
        depth = min(min_len, levels)
        while depth < levels:
            prefix = tuple(int(c) for c in paths[i, :depth])
            _, _, entropy, heads = reference_stats(paths, pop, head, prefix)
            if heads <= 1 and math.exp(entropy) <= max_effective + 1e-12:
                break
            depth += 1
        out[i] = depth
    return out


@settings(max_examples=50, deadline=None)
@given(item_sets(), st.integers(1, 3), st.sampled_from([1.0, 1.5, 2.0, 4.0]))
def test_entropy_policy_matches_reference(
    case: tuple[np.ndarray, np.ndarray, np.ndarray], min_len: int, max_effective: float
) -> None:
    paths, pop, head = case
    policy = EntropyLength(min_len=min_len, max_effective=max_effective)
    got = policy_lengths(policy, paths, pop, head)
    want = reference_entropy_lengths(paths, pop, head, min_len, max_effective)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=50, deadline=None)
@given(item_sets(), st.integers(1, 3), st.sampled_from(sorted(POLICIES)))
def test_every_policy_stays_within_bounds(
    case: tuple[np.ndarray, np.ndarray, np.ndarray], min_len: int, name: str
) -> None:
    paths, pop, head = case
    levels = paths.shape[1]
    policy = make_policy(name) if name == "fixed" else make_policy(name, min_len=min_len)
    lengths = policy_lengths(policy, paths, pop, head)
    assert lengths.dtype == np.int64 and lengths.shape == (len(paths),)
    low = levels if name == "fixed" else min(min_len, levels)
    assert lengths.min() >= low and lengths.max() <= levels
    if name == "entropy":
        assert np.all(lengths[~head] == min(min_len, levels))
    if name == "reverse":
        assert np.all(lengths[head] == min(min_len, levels))
        assert np.all(lengths[~head] == levels)


@settings(max_examples=50, deadline=None)
@given(item_sets())
def test_popularity_policy_is_monotone(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    paths, pop, head = case
    lengths = policy_lengths(PopularityLength(min_len=1), paths, pop, head)
    order = np.argsort(pop, kind="stable")
    assert np.all(np.diff(lengths[order]) >= 0)
    if pop.max() > 0:
        assert lengths[np.argmax(pop)] == paths.shape[1]


def test_fixed_policy_clips_to_levels() -> None:
    paths = np.zeros((3, 4), dtype=np.int64)
    pop = np.zeros(3)
    head = np.zeros(3, dtype=bool)
    np.testing.assert_array_equal(policy_lengths(FixedLength(2), paths, pop, head), [2, 2, 2])
    np.testing.assert_array_equal(policy_lengths(FixedLength(9), paths, pop, head), [4, 4, 4])


def test_registry_errors_and_extension() -> None:
    with pytest.raises(LengthPolicyError, match="unknown length policy"):
        make_policy("nope")
    with pytest.raises(LengthPolicyError, match="bad parameters"):
        make_policy("fixed", min_len=2)
    with pytest.raises(LengthPolicyError, match="min_len"):
        make_policy("reverse", min_len=0)
    with pytest.raises(LengthPolicyError, match="exists"):
        register_policy("fixed", FixedLength)
    policy: LengthPolicy = ReverseLength()
    assert isinstance(policy, LengthPolicy)


def test_policy_inputs_are_checked() -> None:
    with pytest.raises(LengthPolicyError, match="paths"):
        policy_lengths(FixedLength(), np.zeros(3, dtype=np.int64), np.zeros(3), None)  # type: ignore[arg-type]
    with pytest.raises(LengthPolicyError, match="popularity"):
        policy_lengths(
            FixedLength(), np.zeros((3, 2), dtype=np.int64), -np.ones(3), np.zeros(3, dtype=bool)
        )
