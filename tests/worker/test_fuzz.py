"""Fuzzing the worker's two untrusted inputs: event payloads and HTTP requests.

Events: raw bytes, JSON-ish documents and near-valid events with one field mutated go through
:func:`parse_item`, :func:`parse_interaction`, :func:`parse_control` (and the batch parser
:func:`parse_interactions`). A slow reference written from the schema in
:mod:`worker.ingest.events` lists the fields each payload violates: a payload must be accepted
exactly when it violates nothing (and then parse to the reference's values), otherwise be
rejected with :class:`EventError` whose reason names a violated field. Anything else (another
exception) is a crash.

HTTP: random methods, paths, query strings, headers and bodies are dispatched in-process by
the daemon's router over the ``/v1`` routes of ``tests/worker/test_api.py``'s fixture. Every
answer is a JSON object, never 5xx; a matched route answers a status its OpenAPI entry lists,
an unknown path 404 and a known path with another method 405; errors carry ``error`` and
``detail``.

Hypothesis runs derandomized (the same examples every run, no example database); each test
counts its payloads and checks that both acceptance and rejection were exercised. In all,
more than 10,000 payloads.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.worker.test_api import TOKEN, Env, env  # noqa: F401  (env: the fixture)
from worker.ingest.events import (
    CONTROL_OPS,
    MAX_ID_CHARS,
    ControlCommand,
    EventLimits,
    InteractionEvent,
    ItemEvent,
    parse_control,
    parse_interaction,
    parse_interactions,
    parse_item,
)
from worker.ingest.exceptions import EventError
from worker.serving.http import Request
from worker.serving.routes import ROUTES, openapi_document

#: the parser computes the float32 norm and relies on its overflow to inf to reject huge vectors
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

DIM = 4
DOMAIN_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
LIMITS = EventLimits(
    embedding_dim=DIM,
    max_bytes=700,
    domain_re=re.compile(DOMAIN_PATTERN),
    max_text_chars=40,
)
F32_MAX = float(np.finfo(np.float32).max)
MAX_TS = 1 << 62


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the reference ------------------------------------------------------------------------------

#: what a rejection of the payload as a whole must say
PAYLOAD_REASONS = re.compile(
    r"empty message|exceeds max_message_bytes|not JSON|expected a JSON object"
)


class Violations(Exception):
    """The payload breaks the schema; ``fields`` are the fields it breaks (``payload``: the
    message as a whole)."""

    def __init__(self, fields: set[str]) -> None:
        super().__init__(sorted(fields))
        self.fields = fields


def _ref_load(raw: bytes | None) -> dict[str, Any]:
    if raw is None or len(raw) > LIMITS.max_bytes:
        raise Violations({"payload"})
    try:
        data = orjson.loads(raw)  # the JSON grammar is orjson's; the rules are checked here
    except orjson.JSONDecodeError:
        raise Violations({"payload"}) from None
    if not isinstance(data, dict):
        raise Violations({"payload"})
    return data


def _ref_id(data: dict[str, Any], name: str, bad: set[str]) -> str:
    value = data.get(name)
    if type(value) is not str or not 1 <= len(value) <= MAX_ID_CHARS:
        bad.add(name)
        return ""
    return value


def _ref_domain(data: dict[str, Any], bad: set[str]) -> str:
    domain = _ref_id(data, "domain", bad)
    # the whole name must match: a trailing newline is not part of a valid domain
    if domain and re.fullmatch(DOMAIN_PATTERN.strip("^$"), domain) is None:
        bad.add("domain")
    return domain


def _ref_ts(data: dict[str, Any], bad: set[str]) -> int:
    ts = data.get("ts")
    if type(ts) is not int or not 0 <= ts < MAX_TS:
        bad.add("ts")
        return 0
    return ts


def _ref_embedding(value: Any, bad: set[str]) -> np.ndarray | None:
    if value is None:
        return None
    if (
        type(value) is not list
        or len(value) != DIM
        or not all(type(v) in (int, float) for v in value)
    ):
        bad.add("embedding")
        return None
    wide = [float(v) for v in value]
    if not all(math.isfinite(v) and abs(v) <= F32_MAX for v in wide):
        bad.add("embedding")
        return None
    narrow = np.asarray(wide, dtype=np.float32)
    squares = sum(float(v) ** 2 for v in narrow)  # in float64: the float32 norm overflows above
    if not narrow.any() or squares > F32_MAX:
        bad.add("embedding")
        return None
    return narrow


def ref_item(raw: bytes | None) -> ItemEvent:
    data = _ref_load(raw)
    bad: set[str] = set()
    item_id = _ref_id(data, "item_id", bad)
    domain = _ref_domain(data, bad)
    ts = _ref_ts(data, bad)
    text = data.get("text")
    if text is not None and type(text) is not str:
        bad.add("text")
        text = None
    text = (text.strip()[: LIMITS.max_text_chars] or None) if text is not None else None
    embedding = _ref_embedding(data.get("embedding"), bad)
    if text is None and data.get("embedding") is None:
        bad |= {"text", "embedding"}
    if bad:
        raise Violations(bad)
    return ItemEvent(item_id, domain, text, embedding, ts)


def ref_interaction(raw: bytes | None) -> InteractionEvent:
    data = _ref_load(raw)
    bad: set[str] = set()
    user_id = _ref_id(data, "user_id", bad)
    item_id = _ref_id(data, "item_id", bad)
    domain = _ref_domain(data, bad)
    ts = _ref_ts(data, bad)
    weight = data.get("weight")
    weight = 1.0 if weight is None else weight
    if type(weight) not in (int, float) or not 0 < float(weight) <= 1e6:
        bad.add("weight")
        weight = 1.0
    if bad:
        raise Violations(bad)
    return InteractionEvent(user_id, item_id, domain, ts, float(weight))


def ref_control(raw: bytes | None) -> ControlCommand:
    data = _ref_load(raw)
    bad: set[str] = set()
    op = data.get("op")
    if type(op) is not str or op not in CONTROL_OPS:
        bad.add("op")
    # migrate is for the worker's codebook: no domain needed
    no_domain = op == "migrate" and data.get("domain") in (None, "")
    domain = "" if no_domain else _ref_domain(data, bad)
    version = data.get("version")
    if version is not None and (type(version) is not int or version < 1):
        bad.add("version")
        version = None
    previous = data.get("previous", False)
    if type(previous) is not bool:
        bad.add("previous")
        previous = False
    if not bad:  # the rules between fields
        if op == "rollback" and (version is None) == (not previous):
            bad |= {"version", "previous"}
        if op in ("pin", "unpin") and version is None:
            bad.add("version")
    if bad:
        raise Violations(bad)
    return ControlCommand(str(op), domain, version, previous)


def _names(reason: str, field: str) -> bool:
    if field == "payload":
        return PAYLOAD_REASONS.search(reason) is not None
    return re.search(rf"\b{field}\b", reason) is not None


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, ItemEvent) and isinstance(want, ItemEvent):
        emb_same = (got.embedding is None and want.embedding is None) or (
            got.embedding is not None
            and want.embedding is not None
            and got.embedding.dtype == np.float32
            and np.array_equal(got.embedding, want.embedding)
        )
        return emb_same and (got.item_id, got.domain, got.text, got.ts) == (
            want.item_id,
            want.domain,
            want.text,
            want.ts,
        )
    return bool(got == want) and type(got) is type(want)


Parser = Callable[[bytes | None, EventLimits], Any]
Reference = Callable[[bytes | None], Any]
KINDS: dict[str, tuple[Parser, Reference]] = {
    "item": (parse_item, ref_item),
    "interaction": (parse_interaction, ref_interaction),
    "control": (parse_control, ref_control),
}


def check_event(kind: str, raw: bytes | None) -> str:
    """Parse ``raw`` as ``kind`` and compare with the reference; returns the outcome."""
    parse, reference = KINDS[kind]
    try:
        want = reference(raw)
    except Violations as exc:
        violated = exc.fields
    else:
        violated = set()
    try:
        got = parse(raw, LIMITS)
    except EventError as exc:
        assert violated, f"{kind} rejected a valid payload {raw!r}: {exc.reason}"
        assert exc.reason and exc.reason == str(exc), (raw, exc.reason)
        assert any(_names(exc.reason, f) for f in violated), (
            f"{kind} reason {exc.reason!r} names none of the violated fields {violated} of {raw!r}"
        )
        return "rejected"
    assert not violated, f"{kind} accepted {raw!r} that violates {violated}: {got!r}"
    assert _same(got, want), (raw, got, want)
    return "accepted"


# -- payload strategies -------------------------------------------------------------------------

FIELDS = {
    "item": ("item_id", "domain", "ts", "text", "embedding"),
    "interaction": ("user_id", "item_id", "domain", "ts", "weight"),
    "control": ("op", "domain", "version", "previous"),
}
ALL_FIELDS = sorted({f for fs in FIELDS.values() for f in fs})

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
domains = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,12}", fullmatch=True)
ids = st.text(min_size=1, max_size=30)
timestamps = st.integers(min_value=0, max_value=MAX_TS - 1)
components = st.floats(min_value=-100, max_value=100, allow_nan=False).filter(lambda v: v != 0)


def _dumps(doc: Any) -> bytes:
    """Serialize like a careless producer: NaN, huge integers and lone surrogates included."""
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def valid_docs(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    if kind == "item":
        doc: dict[str, Any] = {
            "item_id": draw(ids),
            "domain": draw(domains),
            "ts": draw(timestamps),
        }
        shape = draw(st.sampled_from(["text", "embedding", "both"]))
        doc["text"] = (
            draw(st.text(min_size=1, max_size=60).filter(str.strip))
            if (shape != "embedding")
            else None
        )
        doc["embedding"] = (
            draw(st.lists(components, min_size=DIM, max_size=DIM)) if shape != "text" else None
        )
        return doc
    if kind == "interaction":
        doc = {
            "user_id": draw(ids),
            "item_id": draw(ids),
            "domain": draw(domains),
            "ts": draw(timestamps),
        }
        if draw(st.booleans()):
            doc["weight"] = draw(st.floats(min_value=1e-3, max_value=1e6) | st.integers(1, 10**6))
        return doc
    op = draw(st.sampled_from(CONTROL_OPS))
    doc = {"op": op, "domain": draw(domains)}
    version = draw(st.integers(min_value=1, max_value=10**6))
    if op == "rollback":
        if draw(st.booleans()):
            doc |= {"version": version, "previous": False}
        else:
            doc |= {"version": None, "previous": True}
    elif op in ("pin", "unpin"):
        doc["version"] = version
    return doc


#: values that sit on or just past a rule's edge, per field
EDGES: dict[str, list[Any]] = {
    "item_id": ["", "x" * MAX_ID_CHARS, "x" * (MAX_ID_CHARS + 1), 7, ["a"], True],
    "user_id": ["", "u" * (MAX_ID_CHARS + 1), 0, {"id": "u"}],
    "domain": ["", "Shop", "shop\n", "-shop", "a" * 64, "a" * 63, "shop/x", " shop", 3],
    "ts": [-1, 0, MAX_TS - 1, MAX_TS, 2**64, 1.0, "1", True, False, None],
    "text": ["", "   ", "\n", 5, ["t"], "t" * 1000, None],
    "embedding": [
        [],
        [1.0] * (DIM - 1),
        [1.0] * (DIM + 1),
        [0.0] * DIM,
        [1e-46] * DIM,
        [F32_MAX] * DIM,
        [1e20] * DIM,
        [1e19] + [0.0] * (DIM - 1),
        [3.5e38] + [1.0] * (DIM - 1),
        [True] * DIM,
        ["1"] * DIM,
        [1, 2, 3, 4],
        [[1.0]] * DIM,
        "1,2,3,4",
        {"0": 1.0},
    ],
    "weight": [0, -1, 1e-300, 1e6, 1e6 + 1, 10**6, True, "1", None, [1], float("nan")],
    "op": ["ROLLBACK", "", None, 1, ["pin"], "delete"],
    "version": [0, -1, 1, True, 1.5, "2", None, 2**63],
    "previous": [None, 0, 1, "true", True, False],
}


@st.composite
def mutated_docs(draw: st.DrawFn, kind: str) -> tuple[str, bytes]:
    """A valid event with one field deleted, nulled, replaced by an edge value or by any JSON."""
    doc = draw(valid_docs(kind))
    name = draw(st.sampled_from([*FIELDS[kind], "extra"]))
    how = draw(st.sampled_from(["delete", "null", "edge", "edge", "any"]))
    if how == "delete":
        doc.pop(name, None)
    elif how == "null":
        doc[name] = None
    elif how == "edge" and name in EDGES:
        doc[name] = draw(st.sampled_from(EDGES[name]))
    else:
        doc[name] = draw(json_values)
    return name, _dumps(doc)


json_docs = st.one_of(
    st.dictionaries(st.sampled_from([*ALL_FIELDS, "x"]), json_values, max_size=7),
    json_values,
).map(_dumps)
raw_payloads = st.one_of(st.none(), st.binary(max_size=120), json_docs)


# -- a fast seeded mutator: volume on top of hypothesis' structured examples ------------------

#: tokens a careless or hostile producer might put anywhere in a payload
TOKENS = [
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"-0",
    b"null",
    b"true",
    b"{}",
    b"[]",
    b'""',
    b'"\\ud800"',
    b"18446744073709551616",
    b"-9223372036854775809",
    b"0.0",
    b"1e-400",
    b'"\\u0000"',
    b"\\",
    b"\xff\xfe",
    b"\x00",
    b",",
    b":",
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b"\n",
]
CHARS = "az09 _-.:/\\\n\t\x00\x7f\u00e9\u2028\ud800\U0001f4a5"


def rand_text(rng: random.Random) -> str:
    return "".join(rng.choice(CHARS) for _ in range(rng.choice([0, 1, 3, 8, 40])))


def rand_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth >= 2 or roll < 0.7:
        return rng.choice(
            [
                None,
                True,
                False,
                rng.randint(-(10**6), 10**6),
                rng.choice([0, 1, -1, 2**31, 2**62, 2**63, 2**64, -(2**63) - 1, 10**30]),
                rng.uniform(-1e6, 1e6),
                rng.choice([0.0, -0.0, 1e308, 5e-324, 3.5e38, math.nan, math.inf, -math.inf]),
                rand_text(rng),
                rng.choice(["shop", "i1", "u1", "rollback", "pin", ""]),
            ]
        )
    if roll < 0.85:
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, DIM + 1))]
    return {rand_text(rng): rand_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    """One to three byte-level edits: flips, inserted tokens, cuts, duplicated ranges."""
    out = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(out))
        op = rng.randrange(6)
        if op == 0 and out and at < len(out):
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at:at] = rng.choice(TOKENS)
        elif op == 2:
            del out[at : at + rng.randint(1, 8)]
        elif op == 3:
            del out[at:]
        elif op == 4:
            out[at:at] = out[max(0, at - 16) : at]
        else:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(out)


def mutate_field(rng: random.Random, doc: dict[str, Any], kind: str) -> bytes:
    """One field deleted, nulled, set to an edge value or to random JSON."""
    doc = dict(doc)
    name = rng.choice([*FIELDS[kind], "extra"])
    how = rng.randrange(4)
    if how == 0:
        doc.pop(name, None)
    elif how == 1:
        doc[name] = None
    elif how == 2 and name in EDGES:
        doc[name] = rng.choice(EDGES[name])
    else:
        doc[name] = rand_json(rng)
    return _dumps(doc)


def variants(rng: random.Random, doc: dict[str, Any], kind: str, n: int) -> list[bytes]:
    """``n`` payloads derived from a valid ``doc``: field mutations and byte mutations."""
    raw = _dumps(doc)
    return [mutate_field(rng, doc, kind) if i % 2 else mutate_bytes(rng, raw) for i in range(n)]


seeds = st.integers(min_value=0, max_value=2**32 - 1)


# -- event tests --------------------------------------------------------------------------------


def test_raw_bytes_and_json_ish_payloads_never_crash_a_parser() -> None:
    seen: Counter[str] = Counter()

    @fuzz(200)
    @given(raw_payloads, seeds)
    def run(raw: bytes | None, seed: int) -> None:
        rng = random.Random(seed)
        more = [_dumps(rand_json(rng)) for _ in range(8)]
        more += [
            _dumps({rng.choice(ALL_FIELDS): rand_json(rng) for _ in range(5)}) for _ in range(4)
        ]
        more += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 30))) for _ in range(2)]
        for payload in [raw, *more]:
            seen["payloads"] += 1
            for kind in KINDS:
                seen[check_event(kind, payload)] += 1

    run()
    print(f"raw and JSON-ish payloads: {dict(seen)}")
    assert seen["payloads"] >= 2800 and seen["rejected"] > 8000, seen


@pytest.mark.parametrize("kind", list(KINDS))
def test_near_valid_events_are_accepted_or_rejected_naming_the_field(kind: str) -> None:
    seen: Counter[str] = Counter()

    @fuzz(150)
    @given(valid_docs(kind), mutated_docs(kind), seeds)
    def run(valid: dict[str, Any], mutated: tuple[str, bytes], seed: int) -> None:
        assert check_event(kind, _dumps(valid)) == "accepted"
        seen[check_event(kind, mutated[1])] += 1
        for payload in variants(random.Random(seed), valid, kind, 24):
            seen[check_event(kind, payload)] += 1

    run()
    print(f"near-valid {kind} payloads: {dict(seen)}")
    assert sum(seen.values()) >= 3500, seen
    assert min(seen["accepted"], seen["rejected"]) > 300, seen


def test_the_batch_interaction_parser_agrees_with_the_one_by_one_parser() -> None:
    seen: Counter[str] = Counter()

    @fuzz(200)
    @given(st.lists(valid_docs("interaction"), max_size=6), seeds, st.booleans())
    def run(docs: list[dict[str, Any]], seed: int, all_valid: bool) -> None:
        rng = random.Random(seed)
        raws: list[bytes | None] = [_dumps(d) for d in docs]
        if not all_valid:  # the slow path: some records break the rules
            raws += [rng.choice([None, b"", *variants(rng, d, "interaction", 1)]) for d in docs]
            raws += [_dumps(rand_json(rng)) for _ in range(rng.randint(0, 2))]
            rng.shuffle(raws)
        cols = parse_interactions(raws, LIMITS)
        want_index, want_bad, want = [], [], []
        for position, raw in enumerate(raws):
            try:
                event = parse_interaction(raw, LIMITS)
            except EventError as exc:
                want_bad.append((position, exc.reason))
            else:
                want_index.append(position)
                want.append((event.user_id, event.item_id, event.domain, event.ts, event.weight))
        assert cols.index == want_index and cols.bad == want_bad
        got = zip(cols.user_ids, cols.item_ids, cols.domains, cols.ts, cols.weights, strict=True)
        assert list(got) == want
        assert all(type(w) is float for w in cols.weights)
        seen["accepted"] += len(want_index)
        seen["rejected"] += len(want_bad)

    run()
    print(f"records in interaction batches: {dict(seen)}")
    assert sum(seen.values()) >= 1000 and min(seen.values()) > 200, seen


# -- HTTP -----------------------------------------------------------------------------------------

OPENAPI = openapi_document()["paths"]
TEMPLATES = [(re.compile(re.sub(r"\{(\w+)\}", "[^/]+", r.path)), r) for r in ROUTES]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "get", "BREW"]
SAFE = string.ascii_letters + string.digits + "-._~"


def expected_statuses(method: str, path: str) -> set[int]:
    """What the OpenAPI document allows for ``method path``; 404/405 for what it lacks."""
    matched = [route for regex, route in TEMPLATES if regex.fullmatch(path)]
    for route in matched:
        if route.method == method:
            return {int(s) for s in OPENAPI[route.path][method.lower()]["responses"]}
    return {405} if matched else {404}


segments = st.one_of(
    st.sampled_from(["shop", "other", "nope", "i1", "i7", "u2", "lonely", "ghost", "i1000"]),
    st.sampled_from(["%", "%zz", "%ff", "%00", "%2F", "..", ".", "a%20b%2Fc", "%0A", "~"]),
    st.text(max_size=12).map(lambda s: quote(s, safe="")),
    st.text(SAFE, min_size=1, max_size=300),
)


@st.composite
def paths(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 3)):  # mostly the routes' own shapes
        route = draw(st.sampled_from(ROUTES))
        path = re.sub(r"\{\w+\}", lambda _: draw(segments), route.path)
        return path + draw(st.sampled_from(["", "", "", "/", "//", "/x"]))
    parts = draw(st.lists(segments, max_size=6))
    prefix = draw(st.sampled_from(["", "/v1", "/v1/domains", "/v2", "/healthz", "/"]))
    return prefix + "".join("/" + p for p in parts)


query_values = st.one_of(
    st.sampled_from(["", "0", "1", "5", "-3", "1000", "1001", "1e3", "9" * 40, "x", "+"]),
    st.sampled_from(["true", "false", "TRUE", "no", "maybe", "%ff", "%", "1%00", " 2"]),
    st.integers().map(str),
    st.text(max_size=10).map(lambda s: quote(s, safe="")),
)
queries = st.dictionaries(
    st.sampled_from(["k", "version", "exclude_history", "x", ""]) | st.text(SAFE, max_size=5),
    query_values,
    max_size=4,
)
history = st.lists(
    st.sampled_from(["i1", "i2", "i5", "ghost", "lonely", ""]) | st.text(max_size=5), max_size=6
)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=60),
    json_values.map(_dumps),
    st.fixed_dictionaries(
        {},
        optional={
            "history": history | json_values,
            "k": st.integers(-5, 1005) | json_values,
            "exclude_history": st.booleans() | json_values,
        },
    ).map(_dumps),
    st.fixed_dictionaries(
        {},
        optional={
            "to": st.integers(-2, 4) | json_values,
            "previous": st.booleans() | json_values,
        },
    ).map(_dumps),
)
auth: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}),
    st.sampled_from(
        [f"Bearer {TOKEN}", f"bearer  {TOKEN} ", "Bearer wrong", "Basic eDp5", "Bearer", "", "Ü"]
    ).map(lambda v: {"Authorization": v}),
    st.text(max_size=20).map(lambda v: {"authorization": v}),
)
random_requests = st.builds(
    lambda method, path, query, body, headers: Request(
        method, path, {}, query, body or b"", headers
    ),
    st.sampled_from(METHODS) | st.text(string.ascii_uppercase, min_size=1, max_size=7),
    paths(),
    queries,
    bodies,
    auth,
)

KNOWN = {
    "domain": ["shop", "shop", "shop", "other", "nope"],
    "item_id": ["i1", "i7", "i33", "lonely", "ghost", "a%20b%2Fc"],
    "user_id": ["u1", "u2", "u5", "nobody"],
}


@st.composite
def plausible_requests(draw: st.DrawFn) -> Request:
    """A request a client of the route might send, give or take one odd value."""
    route = draw(st.sampled_from(ROUTES))
    path = re.sub(r"\{(\w+)\}", lambda m: draw(st.sampled_from(KNOWN[m.group(1)])), route.path)
    usual = st.sampled_from(["1", "2", "3", "10", "true", "false"])
    odd = st.sampled_from(["0", "-1", "1001", "x", "", "9" * 30, str(2**63), "1.5", "no", "%"])
    query = {name: draw(usual | odd) for name, _, _ in route.query if draw(st.integers(0, 3))}
    body = b""
    if route.body == "RecommendRequest":
        doc: dict[str, Any] = {
            "history": draw(st.lists(st.sampled_from(KNOWN["item_id"]), max_size=4))
        }
        if draw(st.booleans()):
            doc["k"] = draw(st.integers(0, 12))
        if draw(st.booleans()):
            doc["exclude_history"] = draw(st.booleans())
        body = _dumps(doc)
    elif route.body == "RollbackRequest":
        body = _dumps(
            draw(
                st.sampled_from(
                    [{"to": 1}, {"to": 2}, {"previous": True}, {"to": 1, "previous": True}, {}]
                )
            )
        )
    token = draw(st.sampled_from([TOKEN, TOKEN, TOKEN, "wrong", None]))
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return Request(route.method, path, {}, query, body, headers)


requests = st.one_of(plausible_requests(), plausible_requests(), random_requests)


def _escape(text: str) -> str:
    """Percent-encoded as a client would send it (lone surrogates as their UTF-8 bytes)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _vary(rng: random.Random, request: Request) -> Request:
    """The same request with its method, a path segment, a query value or the body changed."""
    method, path, query, body = request.method, request.path, dict(request.query), request.body
    op = rng.randrange(4)
    if op == 0:
        method = rng.choice(METHODS)
    elif op == 1:
        parts = path.split("/")
        at = rng.randrange(len(parts))
        parts[at] = _escape(rand_text(rng)) if rng.random() < 0.7 else ""
        path = "/".join(parts)
    elif op == 2:
        query[rng.choice(["k", "version", "exclude_history"])] = _escape(str(rand_json(rng)))
    else:
        body = mutate_bytes(rng, body or b'{"history": ["i1", "i2"], "k": 5, "to": 1}')
    return Request(method, path, {}, query, body, dict(request.headers))


def check_answer(env: Env, request: Request) -> int:  # noqa: F811
    """Dispatch ``request`` and check the answer against the OpenAPI document; its status."""
    method, path = request.method, request.path
    response = env.router.dispatch(request)
    where = f"{method} {path} ?{request.query} body={request.body[:80]!r}"
    assert response.status < 500, (where, response.body[:300])
    assert response.status in expected_statuses(method, path), (where, response.status)
    assert response.content_type == "application/json", where
    doc = orjson.loads(response.body)
    assert isinstance(doc, dict), where
    if response.status >= 400:
        assert {"error", "detail"} <= doc.keys(), (where, doc)
        assert isinstance(doc["error"], str) and doc["error"], (where, doc)
        assert isinstance(doc["detail"], str) and doc["detail"], (where, doc)
    return response.status


def test_random_requests_get_documented_json_answers_and_never_a_5xx(env: Env) -> None:  # noqa: F811
    seen: Counter[int] = Counter()

    @fuzz(400)
    @given(requests, seeds)
    def run(request: Request, seed: int) -> None:
        rng = random.Random(seed)
        seen[check_answer(env, request)] += 1
        for _ in range(6):
            seen[check_answer(env, _vary(rng, request))] += 1

    run()
    print(f"HTTP requests by answer: {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 2800
    # every kind of answer was reached, not only the router's 404/405
    assert {200, 202, 400, 401, 404, 405, 409} <= seen.keys(), seen


#: query values on and past the edges of what the routes accept
ODD_QUERY = ["", "0", "1", "-1", "1000", "1001", "9" * 30, str(2**63), str(-(2**63) - 1), "1.5"]
ODD_QUERY += ["x", "%", "%ff", "true", "TRUE", "no", "maybe", "1%00"]
ODD_BODIES = [b"", b"{", b"null", b"[]", b'"x"', b"{}", b'{"history": null}', b'{"to": 1e999}']
ODD_BODIES += [_dumps(d) for d in ({"history": ["i1"], "k": 2**64}, {"to": 2**63}, {"to": -1})]
ODD_BODIES += [_dumps(d) for d in ({"history": ["i1"] * 5000}, {"previous": "yes"})]


def test_every_route_answers_edge_parameters_and_bodies_within_its_document(
    env: Env,  # noqa: F811
) -> None:
    """A sweep, not a draw: every route, domain and query parameter with every edge value."""
    seen: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for route in ROUTES:
        for domain in ("shop", "other", "nope"):
            path = re.sub(r"\{\w+\}", "i1", route.path.replace("{domain}", domain))
            requests_ = [
                Request(route.method, path, {}, {name: value}, b"", dict(headers))
                for name, _, _ in route.query
                for value in ODD_QUERY
            ]
            if route.body is not None:
                requests_ += [
                    Request(route.method, path, {}, {}, b, dict(headers)) for b in ODD_BODIES
                ]
            for request in requests_:
                seen[check_answer(env, request)] += 1
    assert sum(seen.values()) > 250 and {200, 400, 404, 409} <= seen.keys(), seen
