"""Served-code assignment (batch and incremental) and code metrics: properties and
slow references."""

from __future__ import annotations

import base64
import gc
import sys
import zlib
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantize.assign import (
    AssignerState,
    CodeAssigner,
    CodeChange,
    ServedCodes,
    assign_codes,
    group_rows,
    row_ids,
    state_equal,
)
from quantize.code_metrics import code_report, collision_rate, level_balance, level_utilization
from quantize.exceptions import AssignmentError, LengthPolicyError
from quantize.lengths import POLICIES, make_policy
from quantize.prefix_nodes import (
    GIL_CHUNK,
    PrefixNodes,
    code_key,
    join_records,
    row_keys,
    stable_order,
    take_items,
)

POLICY_NAMES = sorted(POLICIES)
GROWING = {"new", "recode", "promote", "deepen", "disambiguate"}
SHRINKING = {"demote"}


def check_served_code(code: tuple[int, ...], path: tuple[int, ...], levels: int) -> None:
    """A served code is a prefix of the full path plus at most one trailing digit."""
    assert 1 <= len(code) <= levels + 1
    if len(code) == levels + 1:
        assert code[:levels] == path and code[levels] >= 0
    else:
        assert code == path[: len(code)]


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    n = draw(st.integers(min_value=1, max_value=50))
    levels = draw(st.integers(min_value=1, max_value=4))
    k = draw(st.integers(min_value=2, max_value=3))
    paths = draw(hnp.arrays(np.int64, (n, levels), elements=st.integers(0, k - 1)))
    pop = draw(hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 1.0, 2.0, 5.0, 9.0])))
    return paths, pop, k


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from(POLICY_NAMES), st.integers(1, 3))
def test_batch_codes_are_prefixes_and_head_is_unique(
    case: tuple[np.ndarray, np.ndarray, int], name: str, min_len: int
) -> None:
    paths, pop, k = case
    levels = paths.shape[1]
    policy = make_policy(name) if name == "fixed" else make_policy(name, min_len=min_len)
    served = assign_codes(paths, pop, policy, k=k, head_fraction=0.3)
    codes = served.codes()
    for i, code in enumerate(codes):
        check_served_code(code, tuple(int(c) for c in paths[i]), levels)
        assert len(code) >= min(min_len, levels)
    head_codes = [codes[i] for i in np.flatnonzero(served.is_head)]
    assert len(set(head_codes)) == len(head_codes)
    # digits are compact (0..m-1), one per disambiguated item, and only on head items
    digits = sorted(int(served.digits[i]) for i in np.flatnonzero(served.uses_digit))
    assert digits == list(range(served.n_digit_rows))
    assert not np.any(served.uses_digit & ~served.is_head)
    # row matrix agrees with row_ids, and a disambiguated item owns its deepest row
    matrix = served.row_matrix()
    for i, code in enumerate(codes):
        rows = row_ids(code, k, levels)
        np.testing.assert_array_equal(matrix[i][matrix[i] >= 0], rows)
        assert rows.max() < served.table_rows
    last_rows = matrix[served.uses_digit, levels]
    assert len(set(last_rows.tolist())) == last_rows.size
    again = assign_codes(paths, pop, policy, k=k, head_fraction=0.3)
    assert again.codes() == codes  # deterministic


def test_disambiguation_of_identical_head_paths() -> None:
    paths = np.array([[1, 2], [1, 2], [1, 2], [0, 0]])
    pop = np.array([5.0, 9.0, 5.0, 1.0])
    served = assign_codes(paths, pop, make_policy("fixed"), k=4, is_head=pop > 2)
    # the most popular keeps the plain path; the others get digits in index order
    assert served.codes() == [(1, 2, 0), (1, 2), (1, 2, 1), (0, 0)]
    assert served.table_rows == 2 * 4 + 2
    np.testing.assert_array_equal(row_ids((1, 2, 1), 4, 2), [1, 4 + 2, 8 + 1])
    raw = assign_codes(paths, pop, make_policy("fixed"), k=4, is_head=pop > 2, unique_head=False)
    assert code_report(raw).collision_head == pytest.approx(2 / 3)
    assert code_report(served).collision_head == 0.0


def test_row_ids_rejects_foreign_codes() -> None:
    with pytest.raises(AssignmentError, match="outside"):
        row_ids((5,), k=4, levels=2)
    with pytest.raises(AssignmentError, match="at most"):
        row_ids((1, 1, 1, 1), k=4, levels=2)


# -- the incremental assigner ---------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(min_value=2, max_value=30))
    levels = draw(st.integers(min_value=1, max_value=3))
    k = draw(st.integers(min_value=2, max_value=3))
    paths = draw(hnp.arrays(np.int64, (n, levels), elements=st.integers(0, k - 1)))
    rounds = draw(
        st.lists(
            hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 1.0, 3.0, 6.0, 10.0])),
            min_size=1,
            max_size=6,
        )
    )
    return {
        "paths": paths,
        "k": k,
        "rounds": rounds,
        "policy": draw(st.sampled_from(POLICY_NAMES)),
        "split": draw(st.integers(1, n)),
        "demote_after": draw(st.integers(1, 3)),
    }


def codes_of(assigner: CodeAssigner) -> dict[str, tuple[int, ...]]:
    return {key: assigner.served_code(key) for key in assigner.keys}


def check_invariants(assigner: CodeAssigner) -> None:
    levels = assigner.levels
    head_codes = []
    for key in assigner.keys:
        code = assigner.served_code(key)
        check_served_code(code, assigner.full_path(key), levels)
        if assigner.is_head(key):
            head_codes.append(code)
    assert len(set(head_codes)) == len(head_codes), "head items share a served code"


def check_changes(
    before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]], changes: list[CodeChange]
) -> None:
    """The change list is exactly the diff, and promotion only appends digits."""
    diff = {key for key in after if before.get(key, ()) != after[key]}
    assert {c.key for c in changes} == diff and len(changes) == len(diff)
    for change in changes:
        assert change.old == before.get(change.key, ())
        assert change.new == after[change.key]
        if change.reason in GROWING - {"recode"}:
            assert len(change.new) > len(change.old)
            assert change.new[: len(change.old)] == change.old  # only appends
        else:
            assert change.reason in SHRINKING
            assert change.old[: len(change.new)] == change.new  # only drops digits


def run_history(h: dict[str, object], assigner: CodeAssigner) -> list[list[CodeChange]]:
    paths = h["paths"]
    assert isinstance(paths, np.ndarray)
    split = int(h["split"])  # type: ignore[call-overload]
    keys = [f"item-{i}" for i in range(len(paths))]
    log = []
    before = codes_of(assigner)
    log.append(assigner.add(keys[:split], paths[:split]))
    after = codes_of(assigner)
    check_changes(before, after, log[-1])
    check_invariants(assigner)
    rounds = h["rounds"]
    assert isinstance(rounds, list)
    for j, pop in enumerate(rounds):
        if j == 1 and split < len(keys):
            before = after
            log.append(assigner.add(keys[split:], paths[split:]))
            after = codes_of(assigner)
            check_changes(before, after, log[-1])
            assert all(c.reason == "new" for c in log[-1])
        live = assigner.keys
        before = codes_of(assigner)
        head_before = {key for key in live if assigner.is_head(key)}
        log.append(assigner.update_popularity(live, pop[: len(live)]))
        after = codes_of(assigner)
        check_changes(before, after, log[-1])
        check_invariants(assigner)
        for change in log[-1]:
            if change.reason == "demote":
                assert not assigner.is_head(change.key), "a head item got shorter"
                if int(h["demote_after"]) > 1:  # type: ignore[call-overload]
                    assert change.key not in head_before, "demotion was not lazy"
    return log


def make_assigner(h: dict[str, object]) -> CodeAssigner:
    paths = h["paths"]
    assert isinstance(paths, np.ndarray)
    return CodeAssigner(
        paths.shape[1],
        int(h["k"]),  # type: ignore[call-overload]
        make_policy(str(h["policy"])),
        enter_threshold=5.0,
        exit_threshold=2.0,
        demote_after=int(h["demote_after"]),  # type: ignore[call-overload]
    )


@settings(max_examples=50, deadline=None)
@given(histories())
def test_incremental_invariants_and_determinism(h: dict[str, object]) -> None:
    first = make_assigner(h)
    log_a = run_history(h, first)
    second = make_assigner(h)
    log_b = run_history(h, second)
    assert log_a == log_b
    assert state_equal(first.state(), second.state())
    new_items = [c for batch in log_a for c in batch if c.reason == "new"]
    assert all(len(c.new) >= 1 for c in new_items)


@settings(max_examples=50, deadline=None)
@given(histories(), hnp.arrays(np.float64, 30, elements=st.sampled_from([0.0, 3.0, 10.0])))
def test_state_round_trip(h: dict[str, object], extra: np.ndarray) -> None:
    original = make_assigner(h)
    run_history(h, original)
    state = original.state()
    rebuilt = CodeAssigner.from_state(AssignerState.from_bytes(state.to_bytes()))
    assert state_equal(state, rebuilt.state())
    assert codes_of(rebuilt) == codes_of(original)
    live = original.keys
    pop = extra[: len(live)]
    assert original.update_popularity(live, pop, ts=99) == rebuilt.update_popularity(
        live, pop, ts=99
    )
    assert state_equal(original.state(), rebuilt.state())


def test_demotion_is_lazy_and_repromotion_restores_the_code() -> None:
    paths = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 3], [1, 0, 0]])
    keys = ["a", "b", "c", "d"]
    assigner = CodeAssigner(
        3, 4, make_policy("entropy"), enter_threshold=5.0, exit_threshold=2.0, demote_after=2
    )
    assert all(len(c.new) == 1 for c in assigner.add(keys, paths))
    changes = assigner.update_popularity(keys, np.array([9.0, 8.0, 0.0, 0.0]))
    assert {c.key: c.reason for c in changes} == {"a": "promote", "b": "promote"}
    assert assigner.served_code("a") == (0, 1, 2)
    assert assigner.served_code("b") == (0, 1, 2, 0)  # identical path: disambiguated
    # b falls between exit and enter: still head (hysteresis), nothing changes
    assert assigner.update_popularity(["b"], np.array([3.0])) == []
    assert assigner.is_head("b")
    # b falls below exit: no longer head, but its code survives demote_after - 1 rounds
    assert assigner.update_popularity(["b"], np.array([1.0])) == []
    assert not assigner.is_head("b")
    changes = assigner.update_popularity(["b"], np.array([1.0]), ts=50)
    assert changes == [CodeChange("b", (0, 1, 2, 0), (0,), "demote", 50)]
    # re-promotion appends again and gets its old disambiguation digit (and row) back
    changes = assigner.update_popularity(["b"], np.array([7.0]))
    assert [(c.key, c.new, c.reason) for c in changes] == [("b", (0, 1, 2, 0), "promote")]
    assert assigner.n_digit_rows == 1


def test_newcomer_yields_to_incumbent_head() -> None:
    assigner = CodeAssigner(
        2, 4, make_policy("reverse"), enter_threshold=5.0, exit_threshold=1.0, demote_after=1
    )
    assigner.add(["old"], np.array([[2, 1]]), np.array([6.0]))
    assert assigner.served_code("old") == (2,)
    # the newcomer is more popular, but the incumbent keeps its code
    changes = assigner.add(["new"], np.array([[2, 3]]), np.array([50.0]))
    assert changes[0].new == (2, 3)
    assert assigner.served_code("old") == (2,)


def test_recode_and_errors() -> None:
    assigner = CodeAssigner(2, 4, make_policy("fixed"), enter_threshold=5.0, exit_threshold=1.0)
    assigner.add(["x"], np.array([[1, 1]]))
    changes = assigner.add(["x"], np.array([[3, 0]]))
    assert [(c.old, c.new, c.reason) for c in changes] == [((1, 1), (3, 0), "recode")]
    assert assigner.add(["x"], np.array([[3, 0]])) == []
    with pytest.raises(AssignmentError, match="unknown item"):
        assigner.served_code("missing")
    with pytest.raises(AssignmentError, match="k=4"):
        assigner.add(["y"], np.array([[4, 0]]))
    with pytest.raises(AssignmentError, match="duplicate"):
        assigner.add(["y", "y"], np.array([[0, 0], [0, 0]]))
    with pytest.raises(AssignmentError, match="hysteresis"):
        assigner.set_thresholds(1.0, 2.0)
    with pytest.raises(AssignmentError, match="not a saved assigner state"):
        AssignerState.from_bytes(b"garbage")


def _assigner_with_x() -> CodeAssigner:
    assigner = CodeAssigner(2, 4, make_policy("fixed"), enter_threshold=5.0, exit_threshold=1.0)
    assigner.add(["x"], np.array([[1, 1]]), np.array([2.0]))
    return assigner


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("keys", "paths", "popularity"),
    [
        pytest.param(["y"], np.array([[0, 0, 0]]), None, id="path-of-3-digits-for-L=2"),
        pytest.param(["y", "z"], np.array([[0, 0]]), None, id="fewer-paths-than-keys"),
        pytest.param(["y"], np.array([0, 0]), None, id="1-d-paths"),
        pytest.param(["y"], np.array([[4, 0]]), None, id="digit>=k"),
        pytest.param(["y"], np.array([[-1, 0]]), None, id="negative-digit"),
        pytest.param(["y"], np.array([[0.0, 1.0]]), None, id="float-paths"),
        pytest.param(["y", "y"], np.array([[0, 0], [0, 0]]), None, id="duplicate-keys"),
        pytest.param(["y"], np.array([[0, 0]]), np.array([NAN]), id="nan-popularity"),
        pytest.param(["y"], np.array([[0, 0]]), np.array([INF]), id="inf-popularity"),
        pytest.param(["y"], np.array([[0, 0]]), np.array([-1.0]), id="negative-popularity"),
        pytest.param(["y"], np.array([[0, 0]]), np.array([1.0, 2.0]), id="popularity-shape"),
        pytest.param(["x"], np.array([[1, 1]]), np.array([NAN]), id="nan-popularity-known-key"),
    ],
)
def test_add_raises_assignment_error_for_every_bad_input(
    keys: list[str], paths: np.ndarray, popularity: np.ndarray | None
) -> None:
    assigner = _assigner_with_x()
    with pytest.raises(AssignmentError):
        assigner.add(keys, paths, popularity)
    assert assigner.keys == ["x"] and assigner.popularity("x") == 2.0  # nothing applied


@pytest.mark.parametrize(
    ("keys", "popularity"),
    [
        pytest.param(["missing"], np.array([1.0]), id="unknown-key"),
        pytest.param(["x"], np.array([NAN]), id="nan"),
        pytest.param(["x"], np.array([INF]), id="inf"),
        pytest.param(["x"], np.array([-1.0]), id="negative"),
        pytest.param(["x"], np.array([1.0, 2.0]), id="more-values-than-keys"),
        pytest.param(["x"], np.array([[1.0]]), id="2-d"),
    ],
)
def test_update_popularity_raises_assignment_error_for_every_bad_input(
    keys: list[str], popularity: np.ndarray
) -> None:
    assigner = _assigner_with_x()
    with pytest.raises(AssignmentError):
        assigner.update_popularity(keys, popularity)
    assert assigner.popularity("x") == 2.0


def test_input_errors_of_lengths_are_chained_as_assignment_errors() -> None:
    assigner = _assigner_with_x()
    with pytest.raises(AssignmentError, match="negative digits") as caught:
        assigner.add(["y"], np.array([[-1, 0]]))
    assert isinstance(caught.value.__cause__, LengthPolicyError)
    with pytest.raises(AssignmentError, match="finite") as caught:
        assigner.update_popularity(["x"], np.array([NAN]))
    assert isinstance(caught.value.__cause__, LengthPolicyError)


@pytest.mark.parametrize(
    ("paths", "popularity", "kwargs"),
    [
        pytest.param(np.array([[0.0, 1.0]]), None, {}, id="float-paths"),
        pytest.param(np.array([[-1, 0]]), None, {}, id="negative-digit"),
        pytest.param(np.array([[4, 0]]), None, {}, id="digit>=k"),
        pytest.param(np.array([[0, 0]]), np.array([NAN]), {}, id="nan-popularity"),
        pytest.param(np.array([[0, 0]]), np.array([1.0, 2.0]), {}, id="popularity-shape"),
        pytest.param(np.array([[0, 0]]), None, {"head_fraction": 2.0}, id="head-fraction"),
        pytest.param(np.array([[0, 0]]), None, {"is_head": np.array([True, False])}, id="is_head"),
    ],
)
def test_assign_codes_raises_assignment_error_for_every_bad_input(
    paths: np.ndarray, popularity: np.ndarray | None, kwargs: dict[str, object]
) -> None:
    with pytest.raises(AssignmentError):
        assign_codes(paths, popularity, make_policy("fixed"), k=4, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"paths": np.array([[0.5, 1.0], [2.0, 2.0]])}, id="float-paths"),
        pytest.param({"paths": np.array([[-1, 1], [2, 2]], dtype=np.int32)}, id="negative-digit"),
        pytest.param({"paths": np.zeros((3, 2), dtype=np.int32)}, id="paths-shape"),
        pytest.param({"lengths": np.zeros(3, dtype=np.int64)}, id="lengths-shape"),
        pytest.param({"keys": ("x", "x")}, id="duplicate-keys"),
        pytest.param({"policy_name": "nope"}, id="unknown-policy"),
        pytest.param({"levels": 0}, id="levels"),
    ],
)
def test_from_state_raises_assignment_error_for_a_corrupt_state(change: dict[str, object]) -> None:
    assigner = _assigner_with_x()
    assigner.add(["y"], np.array([[2, 2]]))
    state = assigner.state()
    assert state_equal(CodeAssigner.from_state(state).state(), state)
    with pytest.raises(AssignmentError):
        CodeAssigner.from_state(replace(state, **change))  # type: ignore[arg-type]


# Saved by the assigner before its per-item arrays were declared once (zlib + base64):
# entropy policy, L=2, K=4; a, b share path (1, 2), a and b head, c tail.
FIRST_FORMAT_STATE = (
    "eNrNVs1rE0EUn03S2qRQLXgQvKx7iR9JcGMLUsR6EiQoURQRkWW6O+ku2S9mJiEhBoQc9GRFBXP3P/AqCOq/oB7F"
    "qxeP0pvOZGfqzqqlbaBkYPcxb99v5/32fW2zkS9UQbJOgctm7ugvsRbAcRAgCmth3NfAMXBbS6ykfHHjzvXmPQ10"
    "waDsIGLj8ppeftgxyxW93IowxTC0Iuwgrr8KfYKYnrgwRmx/um7WK2cq+lA/8CoNjC7CxItCY003K7rhoy7yCdvU"
    "2abN5AqTKKQIW9TFiLiR7zDtau081/c8qqjrE7WDgogiC7YYSrwpRD1qOd6mR8U5th/Z/PUm38SR79l9K4QBYip+"
    "HI7ivvHnSQwxDLhXAyPwQstH0t0A9izUaiGbel2UODAcNpVobFe1m+lotFGfyGhsCSspp4qGuTplMPTSfQNy1hv8"
    "ZhsPVCJP3p17I4kUGZEYUneHyViYjXdjcslb2ROTCxW9PmVe8fTOsUvKvPBLpfT62te3ktISpxTFHR9ij/b3x6t1"
    "cY+8pgyQXkq8MK4k8oSQ39ZVXu+fP/sseS0yXh6xXAQdSWokDEe7pt2GeVikNC0Tl+/r4cu0/6zgNvefbIcWlJzw"
    "Q0rtn8n28XH1hyRVYqQm7WhmOUlPhTtA7lVOP7dvfUoXUIcgkvTZWc01kM21k1+seUlhmVEgLvbCtkUoRrA9q9EB"
    "/1nNhpar5tVfAT7q+bWQsns0SVH5Y5BF8ZG1JcaSinrKcHKAZVF8PozFNyoqqLusMHamRRbGe7CELSmws6xpqx05"
    "i+V9biSSa1HB5gog3fWyQN5g5KEq8AMDptpNFsiLWAJLCvDVHEiVdBbHC0V6qrJsz4NM2WSxPEPlmcsKtnYE/J2v"
    "zcbcPJjEoAgK7MsXJyH8DZXmPw0="
)


def test_a_state_saved_in_the_first_format_loads_and_saves_the_same_bytes() -> None:
    data = zlib.decompress(base64.b64decode(FIRST_FORMAT_STATE))
    assigner = CodeAssigner.from_state(AssignerState.from_bytes(data))
    assert codes_of(assigner) == {"a": (1, 2), "b": (1, 2, 0), "c": (3,)}
    assert [assigner.is_head(key) for key in "abc"] == [True, True, False]
    assert assigner.state().to_bytes() == data


def test_set_thresholds_promotes_and_counts_as_a_round() -> None:
    assigner = CodeAssigner(
        3, 4, make_policy("popularity"), enter_threshold=50.0, exit_threshold=40.0
    )
    assigner.add(["a", "b"], np.array([[0, 1, 2], [3, 2, 1]]), np.array([10.0, 1.0]))
    assert not assigner.is_head("a")
    assigner.set_thresholds(5.0, 4.0)
    assert assigner.is_head("a") and not assigner.is_head("b")


# -- metrics -----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from(POLICY_NAMES))
def test_code_report_matches_reference(case: tuple[np.ndarray, np.ndarray, int], name: str) -> None:
    paths, pop, k = case
    served: ServedCodes = assign_codes(paths, pop, make_policy(name), k=k, unique_head=False)
    report = code_report(served)
    codes = served.codes()
    head = [codes[i] for i in np.flatnonzero(served.is_head)]
    assert report.collision_all == pytest.approx(1 - len(set(codes)) / len(codes))
    expected_head = 1 - len(set(head)) / len(head) if head else 0.0
    assert report.collision_head == pytest.approx(expected_head)
    rows = {int(r) for code in codes for r in row_ids(code, k, paths.shape[1])}
    assert report.rows_used == len(rows)
    assert report.memory_ratio == pytest.approx(served.table_rows / len(codes))
    for level in range(paths.shape[1]):
        counts = np.bincount(paths[:, level], minlength=k)
        assert report.utilization[level] == pytest.approx((counts > 0).sum() / k)
        probs = counts[counts > 0] / counts.sum()
        assert report.balance[level] == pytest.approx(-(probs * np.log(probs)).sum() / np.log(k))


def test_metric_edge_cases() -> None:
    assert collision_rate(np.zeros((0, 3))) == 0.0
    even = np.array([[0], [1], [2], [3]])
    assert level_balance(even, 4)[0] == pytest.approx(1.0)
    assert level_utilization(even, 8)[0] == pytest.approx(0.5)
    skewed = np.array([[0], [0], [0], [1]])
    assert 0 < level_balance(skewed, 4)[0] < level_balance(even, 4)[0]


# -- incremental re-evaluation against the full one ------------------------------------------


@st.composite
def streams(draw: st.DrawFn) -> dict[str, object]:
    """A random stream of calls: adds (sometimes with popularity or a new path for a known
    key), popularity rounds over a few items, threshold moves."""
    levels = draw(st.integers(min_value=1, max_value=4))
    k = draw(st.integers(min_value=2, max_value=4))
    n_keys = draw(st.integers(min_value=2, max_value=40))
    steps = []
    for _ in range(draw(st.integers(min_value=1, max_value=14))):
        kind = draw(st.sampled_from(["add", "add", "pop", "pop", "pop", "thresholds"]))
        if kind == "add":
            keys = draw(st.lists(st.integers(0, n_keys - 1), min_size=1, max_size=8, unique=True))
            paths = draw(hnp.arrays(np.int64, (len(keys), levels), elements=st.integers(0, k - 1)))
            pop = draw(
                st.none()
                | hnp.arrays(np.float64, len(keys), elements=st.sampled_from([0.0, 1.0, 4.0, 7.0]))
            )
            steps.append(("add", keys, paths, pop))
        elif kind == "pop":
            keys = draw(st.lists(st.integers(0, n_keys - 1), min_size=1, max_size=10, unique=True))
            pop = draw(
                hnp.arrays(
                    np.float64, len(keys), elements=st.sampled_from([0.0, 1.0, 2.0, 3.0, 6.0, 12.0])
                )
            )
            steps.append(("pop", keys, pop))
        else:
            enter = draw(st.sampled_from([1.0, 3.0, 5.0, 8.0, float("inf")]))
            steps.append(("thresholds", enter, draw(st.sampled_from([0.5, 0.8, 1.0]))))
    return {
        "levels": levels,
        "k": k,
        "steps": steps,
        "policy": draw(st.sampled_from(POLICY_NAMES)),
        "params": draw(st.sampled_from([{}, {"min_len": 2}])),
        "demote_after": draw(st.integers(1, 3)),
    }


def play(s: dict[str, object], assigner: CodeAssigner) -> list[list[CodeChange]]:
    """Run stream ``s``; keys already known keep their path unless the step re-adds them."""
    log: list[list[CodeChange]] = []
    for step in s["steps"]:  # type: ignore[attr-defined]
        if step[0] == "add":
            _, ids, paths, pop = step
            log.append(assigner.add([f"i{j}" for j in ids], paths, pop, ts=len(log)))
        elif step[0] == "pop":
            _, ids, pop = step
            known = [(f"i{j}", p) for j, p in zip(ids, pop, strict=True) if f"i{j}" in assigner]
            log.append(
                assigner.update_popularity(
                    [key for key, _ in known], np.asarray([p for _, p in known]), ts=len(log)
                )
            )
        else:
            _, enter, ratio = step
            log.append(assigner.set_thresholds(enter, enter * ratio, ts=len(log)))
        check_invariants(assigner)
    return log


def stream_assigner(s: dict[str, object], *, incremental: bool) -> CodeAssigner:
    policy = make_policy(str(s["policy"]), **({} if s["policy"] == "fixed" else s["params"]))  # type: ignore[arg-type]
    return CodeAssigner(
        int(s["levels"]),  # type: ignore[call-overload]
        int(s["k"]),  # type: ignore[call-overload]
        policy,
        enter_threshold=4.0,
        exit_threshold=2.0,
        demote_after=int(s["demote_after"]),  # type: ignore[call-overload]
        incremental=incremental,
    )


@settings(max_examples=300, deadline=None)
@given(streams())
def test_incremental_rounds_equal_a_full_reevaluation(s: dict[str, object]) -> None:
    """Re-evaluating only what moved gives the codes, changes and state of re-evaluating
    every item at every call (the reference), call by call."""
    fast = stream_assigner(s, incremental=True)
    slow = stream_assigner(s, incremental=False)
    assert play(s, fast) == play(s, slow)
    assert state_equal(fast.state(), slow.state())
    assert fast.stats() == CodeAssigner.from_state(slow.state()).stats()


@settings(max_examples=100, deadline=None)
@given(streams())
def test_the_code_dictionaries_hold_keys_the_collector_does_not_track(s: dict[str, object]) -> None:
    """The head codes and code counts live as long as the domain and change with every
    round: their keys are ``bytes`` (:func:`code_key` of the served code), never tuples,
    which the cyclic collector tracks until a pass walks them. Live, re-evaluated in full
    and rebuilt from the state alike."""
    for incremental in (True, False):
        live = stream_assigner(s, incremental=incremental)
        play(s, live)
        rebuilt = CodeAssigner.from_state(live.state())
        for assigner in (live, rebuilt):
            keys = [*assigner._code_count, *assigner._head_codes]
            assert [k for k in keys if gc.is_tracked(k) or not isinstance(k, bytes)] == []
            served = Counter(code_key(assigner.served_code(k)) for k in assigner.keys)
            assert assigner._code_count == served


def _slow_key(row: list[int]) -> bytes:
    return b"".join(int(v).to_bytes(4, sys.byteorder, signed=True) for v in row)


@given(
    hnp.arrays(
        np.int64,
        st.tuples(st.integers(0, 12), st.integers(0, 6)),
        elements=st.integers(0, 2**31 - 1),
    )
)
def test_row_keys_are_the_code_keys_of_the_rows(table: np.ndarray) -> None:
    """Keys made from an array a table at a time equal the keys of single codes and a slow
    byte-by-byte reference; codes of different lengths never share a key."""
    rows = table.tolist()
    assert row_keys(table) == [code_key(tuple(r)) for r in rows] == [_slow_key(r) for r in rows]
    assert len({code_key(tuple(r[:n])) for r in rows[:1] for n in range(len(r) + 1)}) == (
        len(rows[0]) + 1 if rows else 0
    )


def test_row_keys_span_chunks() -> None:
    table = np.random.default_rng(3).integers(0, 300_000, size=(GIL_CHUNK * 2 + 5, 5))
    assert row_keys(table) == [_slow_key(r) for r in table.tolist()]


@settings(max_examples=150, deadline=None)
@given(streams(), st.integers(min_value=0, max_value=13))
def test_saved_rows_rebuild_the_assigner_at_any_point(s: dict[str, object], cut: int) -> None:
    """Rows saved as they change (take_rows after each call) rebuild an assigner equal to
    the live one, which then goes on exactly as the live one does."""
    steps = s["steps"]
    assert isinstance(steps, list)
    live = stream_assigner(s, incremental=True)
    saved: dict[str, bytes] = {}
    play({**s, "steps": steps[:cut]}, live)
    keys, rows = live.take_rows()
    saved.update(zip(keys, rows, strict=True))
    rebuilt, extra = CodeAssigner.from_rows(
        live.header({"ref": 7}), list(saved), list(saved.values())
    )
    assert extra == {"ref": 7}
    assert state_equal(rebuilt.state(), live.state())
    # the counts rebuilt from arrays against a slow reference: one served code per item
    served = [rebuilt.served_code(k) for k in rebuilt.keys]
    assert rebuilt._code_count == Counter(map(code_key, served)) == live._code_count
    heads = {
        code_key(c): i
        for i, (c, k) in enumerate(zip(served, rebuilt.keys, strict=True))
        if rebuilt.is_head(k)
    }
    assert rebuilt._head_codes == heads == live._head_codes
    assert rebuilt._len_sum == live._len_sum
    rest = {**s, "steps": steps[cut:]}
    assert play(rest, rebuilt) == play(rest, live)
    assert state_equal(rebuilt.state(), live.state())
    assert rebuilt.stats() == live.stats()


def test_chunked_loads_equal_the_whole_catalogue_calls() -> None:
    """The helpers that load a million rows a chunk at a time (so other threads get the
    interpreter between chunks) give what one whole-catalogue call gives, at every chunk
    size and cut; a row of the wrong size is an error, as in one join."""
    rng = np.random.default_rng(3)
    dtype = np.dtype([("seq", np.int64), ("paths", np.int16, (3,)), ("pop", np.float64)])
    table = np.zeros(103, dtype=dtype)
    table["seq"] = rng.permutation(103)
    table["paths"] = rng.integers(0, 50, size=(103, 3))
    table["pop"] = rng.random(103)
    records = table.view(np.dtype((np.void, dtype.itemsize))).tolist()
    whole = np.frombuffer(b"".join(records), dtype=dtype)
    keys = [f"k{j}" for j in range(103)]
    order = rng.permutation(103)
    for chunk in (1, 7, 64, 103, 1000):
        assert join_records(records, dtype, chunk).tobytes() == whole.tobytes()
        assert take_items(keys, order, chunk) == [keys[i] for i in order]
        bad = [*records[:50], records[50][:-1], *records[51:]]
        with pytest.raises(ValueError):
            join_records(bad, dtype, chunk)
    assert join_records([], dtype).shape == (0,)
    assert take_items(keys, np.zeros(0, dtype=np.int64)) == []


def test_a_corrupt_saved_row_is_an_assignment_error() -> None:
    assigner = CodeAssigner(2, 4, make_policy("entropy"), enter_threshold=5.0, exit_threshold=2.0)
    assigner.add(["a", "b", "c"], np.array([[0, 1], [1, 2], [3, 3]]))
    keys, rows = assigner.take_rows()
    with pytest.raises(AssignmentError, match="corrupt"):
        CodeAssigner.from_rows(assigner.header(), keys, [rows[0], rows[1][:-2], rows[2]])


def test_a_round_touches_only_the_items_that_moved() -> None:
    """At 20,000 items, a round over 50 items saves about those 50 (plus the head items
    whose codes they contest), not the catalogue."""
    rng = np.random.default_rng(0)
    n, levels, k = 20_000, 3, 16
    assigner = CodeAssigner(
        levels, k, make_policy("entropy"), enter_threshold=50.0, exit_threshold=40.0
    )
    keys = [f"i{j}" for j in range(n)]
    assigner.add(keys, rng.integers(0, k, size=(n, levels)), rng.pareto(1.2, n) * 10)
    assigner.take_rows()
    picked = [keys[j] for j in rng.choice(n, 50, replace=False)]
    assigner.update_popularity(picked, rng.pareto(1.2, 50) * 10)
    moved = assigner.unsaved
    assert 50 <= moved < 200
    stats = assigner.stats()
    report = code_report(assigner.served())
    assert stats.n_head == report.n_head
    assert stats.collision_all == pytest.approx(report.collision_all)
    assert stats.mean_len_head == pytest.approx(report.mean_len_head)
    assert stats.mean_len_tail == pytest.approx(report.mean_len_tail)
    assert stats.utilization == pytest.approx(report.utilization)


def test_prefix_node_members_equal_a_scan_of_every_row() -> None:
    """The rows under given nodes (what a round re-evaluates when a node's crowding flips)
    come from an index of rows by node, built when first needed, that newer rows join by
    a scan until it is rebuilt, and whose re-placed rows are scanned until it is rebuilt:
    always what a scan of every row finds, nodes created after the index included."""
    rng = np.random.default_rng(3)
    levels, k = 3, 8
    nodes = PrefixNodes(levels, k)
    n = 0

    def check() -> None:
        ids = nodes.node_ids[:n]
        for _ in range(4):
            wanted = [np.unique(rng.choice(ids[:, d], 3)) for d in range(levels)]
            wanted[int(rng.integers(levels))] = np.zeros(0, dtype=np.int64)
            hit = np.zeros(n, dtype=bool)
            for d, w in enumerate(wanted):
                hit |= np.isin(ids[:, d], w)
            np.testing.assert_array_equal(nodes.members(wanted), np.flatnonzero(hit))

    for size in (40, 10, 3000, 5000, 20000, 7):  # late rows below, then above the rebuild
        nodes.place(np.arange(n, n + size), rng.integers(0, k, size=(size, levels)))
        n += size
        check()
    # re-placed rows: scanned while few (the same rows twice, too), then a rebuild
    for count in (500, 300, 9000):
        moved = rng.choice(n if count < 9000 else 9000, count, replace=False)
        nodes.remove(moved, np.zeros(moved.size), np.zeros(moved.size, dtype=bool))
        nodes.place(moved, rng.integers(0, k, size=(moved.size, levels)))
        check()
    assert not nodes._stale_rows  # 9,000 re-placed rows outnumbered the slack: rebuilt


def test_prefix_node_index_merged_from_newer_rows_equals_one_built_from_every_row() -> None:
    """Rows placed after the index was built are merged into it (their nodes' runs, new
    nodes included): the same order and offsets as an index built from every row."""
    rng = np.random.default_rng(5)
    levels, k = 3, 40
    grown, fresh = PrefixNodes(levels, k), PrefixNodes(levels, k)
    n = 0
    for size in (300, 1, 50, 2000, 9):
        paths = rng.integers(0, k, size=(size, levels))
        grown.place(np.arange(n, n + size), paths)
        grown.index_members()
        fresh.place(np.arange(n, n + size), paths)
        n += size
    fresh.index_members()
    for d, ((order, offsets), (want_order, want_offsets)) in enumerate(
        zip(grown._members, fresh._members, strict=True)
    ):
        np.testing.assert_array_equal(order, want_order)
        np.testing.assert_array_equal(offsets, want_offsets)
        ids = fresh.node_ids[:n, d]
        np.testing.assert_array_equal(want_order, np.argsort(ids, kind="stable"))
        np.testing.assert_array_equal(np.diff(want_offsets), np.bincount(ids))


@pytest.mark.parametrize("bound", [1, 2, 255, 2**16, 2**16 + 1, 2**33])
def test_stable_order_equals_a_stable_argsort(bound: int) -> None:
    """The radix order of integer keys below any bound (one to three 16-bit passes) is
    numpy's stable argsort: ties keep their positions."""
    rng = np.random.default_rng(bound % 1000)
    for size in (0, 1, 7, 5000):
        keys = rng.integers(0, bound, size=size, dtype=np.int64)
        keys[: size // 3] = keys[size // 2] if size else 0  # many ties
        np.testing.assert_array_equal(stable_order(keys, bound), np.argsort(keys, kind="stable"))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 300),
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 10_000),
)
def test_group_rows_groups_as_unique_along_rows(n: int, m: int, span: int, seed: int) -> None:
    """The groups of ``np.unique(axis=0)`` (few distinct values: many equal rows; negative
    values included): same partition, sizes and first rows, in numeric order."""
    rows = np.random.default_rng(seed).integers(-span, span, size=(n, m))
    inverse, counts, first = group_rows(rows)
    ref, ref_inverse, ref_counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    ref_inverse = ref_inverse.reshape(-1)
    assert len(counts) == len(ref) and counts.sum() == n
    # the same partition: a one-to-one map between the two numberings
    pairs = set(zip(inverse.tolist(), ref_inverse.tolist(), strict=True))
    assert len(pairs) == len(counts)
    assert sorted(counts.tolist()) == sorted(ref_counts.tolist())
    for g, i in enumerate(first.tolist()):
        members = np.flatnonzero(inverse == g)
        assert i == members[0] and counts[g] == members.size
        assert (rows[members] == rows[i]).all()
    # groups in lexicographic order of their rows
    keys = [tuple(rows[i]) for i in first.tolist()]
    assert keys == sorted(keys)
