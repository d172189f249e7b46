"""Event parsing: valid events round-trip, every malformed one is rejected with a reason."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.ingest.events import (
    EventLimits,
    check_keys,
    interaction_payload,
    item_payload,
    key_fault,
    parse_interaction,
    parse_interactions,
    parse_item,
)
from worker.ingest.exceptions import EventError

LIMITS = EventLimits(
    embedding_dim=4,
    max_bytes=2000,
    domain_re=re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$"),
    max_text_chars=100,
)

ids = st.text(min_size=1, max_size=40)
domains = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,10}", fullmatch=True)
timestamps = st.integers(min_value=0, max_value=2**40)
finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(ids, domains, timestamps, st.lists(finite, min_size=4, max_size=4))
def test_item_with_embedding_round_trips(
    item_id: str, domain: str, ts: int, emb: list[float]
) -> None:
    if not np.asarray(emb, dtype=np.float32).any():
        emb[0] = 1.0
    ev = parse_item(item_payload(item_id, domain, ts, embedding=emb), LIMITS)
    assert (ev.item_id, ev.domain, ev.ts, ev.text) == (item_id, domain, ts, None)
    assert ev.embedding is not None
    np.testing.assert_allclose(ev.embedding, np.asarray(emb, dtype=np.float32))


@settings(max_examples=100, deadline=None)
@given(ids, ids, domains, timestamps, st.floats(min_value=0.001, max_value=1e6))
def test_interaction_round_trips(user: str, item: str, domain: str, ts: int, w: float) -> None:
    ev = parse_interaction(interaction_payload(user, item, domain, ts, w), LIMITS)
    assert (ev.user_id, ev.item_id, ev.domain, ev.ts, ev.weight) == (user, item, domain, ts, w)


def test_weight_defaults_to_one() -> None:
    raw = orjson.dumps({"user_id": "u", "item_id": "i", "domain": "d", "ts": 1})
    assert parse_interaction(raw, LIMITS).weight == 1.0


def _item(**over: object) -> bytes:
    doc: dict[str, object] = {
        "item_id": "i",
        "domain": "d",
        "text": "hello",
        "embedding": None,
        "ts": 1,
    }
    doc.update(over)
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (None, "empty message"),
        (_item(item_id=None), "missing field 'item_id'"),
        (_item(item_id=5), "must be a string"),
        (_item(domain="Bad Domain!"), "does not match domain_pattern"),
        (_item(ts="yesterday"), "'ts' must be an integer"),
        (_item(ts=-1), "out of range"),
        (_item(text=None, embedding=None), "needs 'text' or 'embedding'"),
        (_item(text=None, embedding=[1.0, 2.0]), "has 2 values, expected embedding_dim=4"),
        (_item(text=None, embedding=[1.0, "x", 2.0, 3.0]), "only numbers"),
        (_item(text=None, embedding=[0.0, 0.0, 0.0, 0.0]), "all zeros"),
        (_item(text=None, embedding=[1e39, 1.0, 1.0, 1.0]), "NaN or infinite"),
        (_item(text=7), "'text' must be a string"),
        (
            b'{"item_id": "i", "domain": "d", "text": "' + b"x" * 3000 + b'", "ts": 1}',
            "exceeds max_message_bytes",
        ),
    ],
)
def test_bad_items_are_rejected_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(EventError) as info:
        parse_item(raw, LIMITS)
    assert reason in info.value.reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_embedding_is_rejected_with_a_reason_that_names_it(value: float) -> None:
    """Python's json writes NaN / Infinity / -Infinity, which are no JSON numbers: the
    reason names them and the field, not orjson's "unexpected character" at a column."""
    doc = {"item_id": "i", "domain": "d", "text": None, "embedding": [0.5, value, 1.0, 1.0]}
    raw = json.dumps({**doc, "ts": 1}).encode()
    with pytest.raises(EventError) as info:
        parse_item(raw, LIMITS)
    reason = info.value.reason
    assert "field 'embedding' holds NaN or Infinity (not JSON numbers)" in reason, reason
    assert repr(json.dumps(value)) in reason and "column" not in reason, reason


@pytest.mark.parametrize("token", ["nan", "inf", "-inf", "+Infinity", "NaN"])
def test_every_spelling_of_a_non_finite_value_is_named(token: str) -> None:
    raw = b'{"item_id":"i","domain":"d","embedding":[1, 2, ' + token.encode() + b', 3],"ts":1}'
    with pytest.raises(EventError) as info:
        parse_item(raw, LIMITS)
    assert "field 'embedding' holds NaN or Infinity" in info.value.reason, info.value.reason
    assert repr(token) in info.value.reason


@pytest.mark.parametrize("token", ["None", "undefined", "0x1f", "1.", ".5", "True"])
def test_a_non_numeric_bare_value_in_the_embedding_is_named(token: str) -> None:
    raw = b'{"item_id":"i","domain":"d","embedding":[1, 2, ' + token.encode() + b', 3],"ts":1}'
    with pytest.raises(EventError) as info:
        parse_item(raw, LIMITS)
    reason = info.value.reason
    assert f"field 'embedding' holds {token!r}, not a JSON value" in reason, reason


def test_a_non_finite_weight_names_its_field_and_broken_json_keeps_orjsons_reason() -> None:
    raw = b'{"user_id":"u","item_id":"i","domain":"d","ts":1,"weight":Infinity}'
    with pytest.raises(EventError) as info:
        parse_interaction(raw, LIMITS)
    assert "field 'weight' holds NaN or Infinity" in info.value.reason
    cols = parse_interactions([raw], LIMITS)  # the batch path gives the same reason
    assert cols.bad and "field 'weight' holds NaN or Infinity" in cols.bad[0][1]
    # NaN inside a string is no fault of a number: orjson's own reason
    with pytest.raises(EventError) as info:
        parse_item(b'{"item_id":"i","text":"a NaN', LIMITS)
    assert "NaN or Infinity" not in info.value.reason and "not JSON" in info.value.reason


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"item_id": "i", "domain": "d", "ts": 1}, "missing field 'user_id'"),
        (
            {"user_id": "u", "item_id": "i", "domain": "d", "ts": 1, "weight": "1"},
            "'weight' must be a number",
        ),
        ({"user_id": "u", "item_id": "i", "domain": "d", "ts": 1, "weight": -2}, "> 0"),
        ({"user_id": "u", "item_id": "i", "domain": "d", "ts": True}, "'ts' must be an integer"),
        ({"user_id": "", "item_id": "i", "domain": "d", "ts": 1}, "1 to 256 characters"),
    ],
)
def test_bad_interactions_are_rejected(doc: dict[str, object], reason: str) -> None:
    with pytest.raises(EventError) as info:
        parse_interaction(orjson.dumps(doc), LIMITS)
    assert reason in info.value.reason


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=5)
                | st.dictionaries(st.text(max_size=10), children, max_size=6)
            ),
            max_leaves=20,
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_arbitrary_payloads_never_crash(raw: bytes) -> None:
    """Any payload is either a valid event or an EventError with a non-empty reason."""
    for parse in (parse_item, parse_interaction):
        try:
            ev = parse(raw, LIMITS)
        except EventError as exc:
            assert exc.reason
        else:
            assert ev.domain and ev.item_id and ev.ts >= 0
            weight = getattr(ev, "weight", 1.0)
            assert math.isfinite(weight)


# --- many interactions at once -------------------------------------------------------


def _per_record(raws: list[bytes | None]) -> tuple[list[tuple[object, ...]], list[tuple[int, str]]]:
    """The slow reference: parse_interaction on each record."""
    good, bad = [], []
    for k, raw in enumerate(raws):
        try:
            ev = parse_interaction(raw, LIMITS)
        except EventError as exc:
            bad.append((k, exc.reason))
        else:
            good.append((k, ev.user_id, ev.item_id, ev.domain, ev.ts, ev.weight))
    return good, bad


def _interaction_doc() -> st.SearchStrategy[bytes | None]:
    valid = st.builds(
        interaction_payload,
        ids,
        ids,
        domains,
        timestamps,
        st.one_of(st.just(1.0), st.floats(min_value=0.001, max_value=1e6)),
    )
    int_weight = st.builds(
        lambda u, i, d, t, w: orjson.dumps(
            {"user_id": u, "item_id": i, "domain": d, "ts": t, "weight": w}
        ),
        ids,
        ids,
        domains,
        timestamps,
        st.integers(min_value=-3, max_value=2_000_000),
    )
    no_weight = st.builds(
        lambda u, i, d, t: orjson.dumps({"user_id": u, "item_id": i, "domain": d, "ts": t}),
        ids,
        ids,
        domains,
        timestamps,
    )
    broken = st.sampled_from(
        [
            None,
            b"{broken",
            b"[1, 2]",
            b'"just a string"',
            b"7",
            orjson.dumps({"user_id": "u", "domain": "d", "ts": 1}),
            orjson.dumps({"user_id": "u", "item_id": "i", "domain": "Bad!", "ts": 1}),
            orjson.dumps({"user_id": "u", "item_id": "i", "domain": "d", "ts": True}),
            orjson.dumps({"user_id": "u", "item_id": "i", "domain": "d", "ts": -5}),
            orjson.dumps({"user_id": "u", "item_id": "i", "domain": "d", "ts": 2**62}),
            orjson.dumps({"user_id": "u", "item_id": "", "domain": "d", "ts": 1}),
            orjson.dumps({"user_id": "u" * 257, "item_id": "i", "domain": "d", "ts": 1}),
            orjson.dumps({"user_id": 5, "item_id": "i", "domain": "d", "ts": 1}),
            orjson.dumps({"user_id": "u", "item_id": "i", "domain": "d", "ts": 1, "weight": None}),
            orjson.dumps({"user_id": "u", "item_id": "i", "domain": "d", "ts": 1, "weight": True}),
            orjson.dumps({"user_id": "u", "item_id": "i", "domain": "d", "ts": 1, "weight": 0}),
            b'{"user_id":"u","item_id":"i","domain":"d","ts":1,"pad":"' + b"x" * 2000 + b'"}',
        ]
    )
    return st.one_of(valid, int_weight, no_weight, broken)


@settings(max_examples=150, deadline=None)
@given(st.lists(_interaction_doc(), max_size=30))
def test_parse_interactions_agrees_with_parse_interaction(raws: list[bytes | None]) -> None:
    cols = parse_interactions(raws, LIMITS)
    good, bad = _per_record(raws)
    got = list(
        zip(
            cols.index,
            cols.user_ids,
            cols.item_ids,
            cols.domains,
            cols.ts,
            cols.weights,
            strict=True,
        )
    )
    assert got == good
    assert [type(w) for w in cols.weights] == [float] * len(cols)
    assert cols.bad == bad
    assert len(cols) + len(cols.bad) == len(raws)


def test_parse_interactions_fast_path_keeps_every_valid_record() -> None:
    raws = [
        interaction_payload(f"u{k}", f"i{k % 7}", "shop", 100 + k, 1 + k % 3) for k in range(50)
    ]
    cols = parse_interactions(raws, LIMITS)
    assert cols.index == list(range(50)) and not cols.bad
    assert cols.weights[:3] == [1.0, 2.0, 3.0] and cols.ts[-1] == 149
    assert parse_interactions([], LIMITS).index == []


# --- keys -----------------------------------------------------------------------------


def test_key_fault_names_the_rule_and_the_fix() -> None:
    assert key_fault(b"shop", "shop") is None
    wrong = key_fault(b"news", "shop")
    assert wrong is not None and wrong.startswith("key 'news' is not the event's domain 'shop'")
    assert wrong.endswith("produce it with key='shop'")
    missing = key_fault(None, "shop")
    assert missing is not None and missing.startswith("no key") and "key='shop'" in missing
    assert key_fault(b"", "shop") is not None


def test_check_keys_moves_misskeyed_rows_to_bad_in_input_order() -> None:
    raws = [
        interaction_payload("u", "a", "shop", 1),
        interaction_payload("u", "b", "news", 2),
        b"{broken",
        interaction_payload("u", "c", "shop", 3),
        interaction_payload("u", "d", "shop", 4),
    ]
    keys: list[bytes | None] = [b"shop", b"shop", b"shop", None, b"shop"]
    cols = parse_interactions(raws, LIMITS)
    assert check_keys(cols, keys) == 2
    assert cols.index == [0, 4] and cols.item_ids == ["a", "d"] and cols.ts == [1, 4]
    assert cols.domains == ["shop", "shop"] and len(cols.weights) == len(cols.user_ids) == 2
    assert [k for k, _ in cols.bad] == [1, 2, 3]
    assert "key 'shop' is not the event's domain 'news'" in cols.bad[0][1]
    assert cols.bad[2][1].startswith("no key")


def test_check_keys_leaves_a_well_keyed_batch_as_it_is() -> None:
    raws = [interaction_payload("u", f"i{k}", ("a", "b")[k % 2], k) for k in range(100)]
    cols = parse_interactions(raws, LIMITS)
    assert check_keys(cols, [("a", "b")[k % 2].encode() for k in range(100)]) == 0
    assert cols.index == list(range(100)) and not cols.bad
    assert check_keys(parse_interactions([], LIMITS), []) == 0
