"""Batch forms of the record layouts give the same bits as the one-at-a-time forms."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from store.records import (
    LoggedInteraction,
    Popularity,
    encode_interactions,
    fold_popularity,
    popularity_at,
    popularity_since,
)
from worker.state.layout import interaction_key, interaction_keys

HALF_LIFE = 3600.0
events = st.lists(
    st.tuples(st.integers(0, 10**7), st.floats(min_value=0.001, max_value=1e6)), max_size=40
)


def _add_each(events: list[tuple[int, float]]) -> Popularity:
    pop = Popularity()
    for ts, w in events:
        pop = pop.add(ts, w, HALF_LIFE)
    return pop


@settings(max_examples=100, deadline=None)
@given(events, st.integers(0, 40))
def test_fold_equals_one_add_per_event_in_any_cut(
    events: list[tuple[int, float]], cut: int
) -> None:
    want = _add_each(events)
    whole, last = fold_popularity(None, events, HALF_LIFE)
    assert whole == want.encode() and last == want.last_ts
    first, _ = fold_popularity(None, events[:cut], HALF_LIFE)
    split, _ = fold_popularity(first, events[cut:], HALF_LIFE)
    assert split == whole  # the same bits, wherever the batch was cut


@settings(max_examples=50, deadline=None)
@given(st.lists(events, max_size=10), st.integers(0, 10**7))
def test_popularity_at_equals_at(histories: list[list[tuple[int, float]]], ts: int) -> None:
    pops = [_add_each(h) for h in histories]
    got = popularity_at([p.encode() for p in pops], ts, HALF_LIFE)
    assert got == [p.at(ts, HALF_LIFE) for p in pops]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.integers(0, int(200 * HALF_LIFE)), st.floats(min_value=0.001, max_value=1e6)
            ),
            max_size=40,
        ),
        min_size=1,
        max_size=10,
    ),
    st.integers(0, int(400 * HALF_LIFE)),
)
def test_popularity_since_is_at_any_later_time_up_to_one_factor(
    histories: list[list[tuple[int, float]]], ts: int
) -> None:
    """At a reference time before the events, values are not clamped: each is the decayed
    count at any time ``ts`` after every event times one factor ``2 ** ((ts - ref) / h)``,
    the same for every item (so ranks and ratios are those of the decayed counts). Within a
    few hundred half-lives of the reference (the worker moves it before values overflow)."""
    pops = [_add_each(h) for h in histories]
    ref = 0
    late = max([ts, *(p.last_ts for p in pops)])
    got = popularity_since([p.encode() for p in pops], ref, HALF_LIFE)
    factor = 2.0 ** ((late - ref) / HALF_LIFE)
    for value, pop in zip(got.tolist(), pops, strict=True):
        assert math.isclose(value, pop.at(late, HALF_LIFE) * factor, rel_tol=1e-9, abs_tol=0)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["shop", "books"]),
            st.integers(0, 2**62 - 1),
            st.integers(0, 2**31 - 1),
            st.integers(0, 2**62 - 1),
            st.text(min_size=1, max_size=20),
            st.text(min_size=1, max_size=20),
            st.floats(min_value=0.001, max_value=1e6),
        ),
        max_size=30,
    )
)
def test_the_log_columns_equal_the_row_encoders(rows: list[tuple]) -> None:  # type: ignore[type-arg]
    cols = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(7)]
    keys = interaction_keys(*cols[:4])
    values = encode_interactions(*cols[4:])
    assert keys == [interaction_key(d, t, p, o) for d, t, p, o, *_ in rows]
    assert values == [LoggedInteraction(u, i, w).encode() for *_, u, i, w in rows]
