"""The /v1 read API over real HTTP: status codes and bodies (errors included), answers
against slow references (numpy / the model's own scoring), live cold-start items, the
per-user index, the OpenAPI document, index swaps under concurrent reads, versions that
project the items' text embeddings (vectors against a slow numpy reference), and borrowed
codes (untrained and brand-new items served the deepest prefix their trained relatives share)."""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from quantize.table_model import ModelConfig, Snapshot, build_model, export_params
from quantize.train import score_histories
from store.memory import MemoryPartition
from tests.worker.vector_reference import slow_served_rows, slow_trained_code, slow_vector
from worker.core.settings import Settings
from worker.ingest.events import interaction_payload, item_payload
from worker.ingest.processor import BatchResult, Processor, SourceRecord
from worker.serving import index as serving_module
from worker.serving.http import HttpServer, Router
from worker.serving.index import Serving, full_path_rows, live_paths
from worker.serving.routes import DAEMON_ROUTES, ROUTES, ApiRoutes, openapi_document
from worker.state.reads import stored_embeddings
from worker.state.requests import put_request
from worker.state.users import recent_items
from worker.state.versions import (
    PUBLISHED,
    TEXT_PROJ,
    VersionRecord,
    VersionTable,
    add_version,
    current_version,
    item_vectors,
    load_table,
    rollback,
)

DIM = 8
TOKEN = "s3cret"
N_ITEMS = 60


def _settings(**over: Any) -> Settings:
    base: dict[str, Any] = {
        "embedding_dim": DIM,
        "topic_prefix": "t.",
        "codebook_min_items": 20,
        "http_port": 0,
        "admin_token": TOKEN,
        "user_history_len": 5,
    }
    base.update(over)
    return Settings(**base)


def _key(payload: bytes) -> bytes:
    """Events are keyed by their domain (the worker dead-letters any other key)."""
    return str(orjson.loads(payload)["domain"]).encode()


@dataclass
class Env:
    settings: Settings
    store: MemoryPartition
    processor: Processor
    serving: Serving
    server: HttpServer
    router: Router = field(default_factory=Router)
    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    offset: int = 0

    def feed(self, topic: str, payloads: list[bytes]) -> BatchResult:
        records = [
            SourceRecord(self.settings.topic(topic), 0, self.offset + i, _key(p), p)
            for i, p in enumerate(payloads)
        ]
        self.offset += len(payloads)
        result = self.processor.process(records)
        self.store.write(result.batch)
        self.serving.on_applied(result)
        return result

    def publish(self, seed: int, *, text: bool = False, trained: np.ndarray | None = None) -> int:
        """Publish a random model over the current codes (projecting text when ``text``;
        with a trained mask and the items' full paths when ``trained`` is given)."""
        codes = self.processor.codes
        assert codes is not None
        assigner = codes.assigner("shop")
        assert assigner is not None
        served = assigner.served()
        rows = served.row_matrix()
        torch.manual_seed(seed)
        config = ModelConfig(
            hidden=16, max_len=4, layers=1, dropout=0.0, text_dim=DIM if text else 0
        )
        model = build_model(config, rows, n_rows=served.table_rows)
        embeddings = None
        if text:
            found = stored_embeddings(self.store, "shop", assigner.keys)
            embeddings = np.stack([found[k] for k in assigner.keys])
        snapshot = Snapshot(config, export_params(model))
        full = None
        if trained is not None:
            paths = full_path_rows(assigner, assigner.keys)
            full = np.stack([paths[k] for k in assigner.keys])
        table = VersionTable.build(
            snapshot, assigner.keys, rows, embeddings, trained=trained, full_rows=full
        )
        assert codes.codebook is not None  # the version is of the codebook of its codes
        record = VersionRecord(0, None, 0.0, codes.codebook.codebook_id, {}, {}, status=PUBLISHED)
        batch = self.store.batch()
        record = add_version(self.store, batch, "shop", record, table, keep=10)
        self.store.write(batch)
        return record.version

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        conn = http.client.HTTPConnection(*self.server.address, timeout=30)
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        payload = None if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        _check_documented(method, path, resp.status)
        return resp.status, orjson.loads(raw)


def _check_documented(method: str, path: str, status: int) -> None:
    """Every answer's status is one the OpenAPI document lists for its route."""
    doc = openapi_document()["paths"]
    bare = path.partition("?")[0]
    for template, ops in doc.items():
        regex = re.sub(r"\{(\w+)\}", r"[^/]+", template)
        if re.fullmatch(regex, bare) and method.lower() in ops:
            assert str(status) in ops[method.lower()]["responses"], (method, template, status)
            return
    raise AssertionError(f"{method} {bare} is not described in the OpenAPI document")


def _items(seed: int, start: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(4, DIM))
    return [
        item_payload(f"i{i}", "shop", 1, embedding=centers[i % 4] + 0.2 * rng.normal(size=DIM))
        for i in range(start, start + n)
    ]


@pytest.fixture
def env() -> Iterator[Env]:
    yield from _env(_settings())


def _env(settings: Settings, *, live: bool = False) -> Iterator[Env]:
    """``live``: serving reads new items' full paths from the processor's assigners, as the
    daemon wires it (otherwise from the committed code state)."""
    store = MemoryPartition()
    processor = Processor(store, settings, None)
    codes = processor.codes
    paths = live_paths(codes) if live and codes is not None else None
    serving = Serving(store, settings, paths=paths)
    router = Router()
    e = Env(settings, store, processor, serving, HttpServer(router, "127.0.0.1", 0), router)
    ApiRoutes(serving, store, settings, lambda op, d, f: e.sent.append((op, d, f))).register(router)
    e.feed("items", _items(0, 0, N_ITEMS))
    rng = np.random.default_rng(1)
    e.feed(
        "interactions",
        [
            interaction_payload(f"u{u}", f"i{int(rng.integers(N_ITEMS))}", "shop", 10 + t)
            for t in range(8)
            for u in range(6)
        ],
    )
    e.feed("items", [item_payload("lonely", "other", 1, embedding=np.ones(DIM))])
    e.publish(seed=0)
    assert serving.refresh() == ["shop"]
    e.server.start()
    try:
        yield e
    finally:
        e.server.stop()


def _reference_vectors(e: Env) -> tuple[list[str], np.ndarray]:
    table = load_table(e.store, "shop", current_version(e.store, "shop") or 0)
    return table.item_ids, item_vectors(table)


# -- vectors ------------------------------------------------------------------------------------


def test_vector_is_the_versions_item_vector(env: Env) -> None:
    ids, vecs = _reference_vectors(env)
    status, doc = env.call("GET", "/v1/domains/shop/items/i7/vector")
    assert status == 200 and doc["version"] == 1 and doc["dim"] == 16
    np.testing.assert_allclose(doc["vector"], vecs[ids.index("i7")], rtol=1e-5, atol=1e-6)
    status, again = env.call("GET", "/v1/domains/shop/items/i7/vector?version=1")
    assert status == 200 and again["vector"] == doc["vector"]


def test_vector_errors_name_what_is_wrong(env: Env) -> None:
    status, doc = env.call("GET", "/v1/domains/nope/items/i1/vector")
    assert (status, doc["error"]) == (404, "unknown_domain") and "nope" in doc["detail"]
    status, doc = env.call("GET", "/v1/domains/other/items/lonely/vector")
    assert (status, doc["error"]) == (409, "no_version") and "finetune" in doc["detail"]
    status, doc = env.call("GET", "/v1/domains/shop/items/zzz/vector")
    assert (status, doc["error"]) == (404, "unknown_item") and "zzz" in doc["detail"]
    status, doc = env.call("GET", "/v1/domains/shop/items/i1/vector?version=7")
    assert (status, doc["error"]) == (404, "unknown_version")
    status, doc = env.call("GET", "/v1/domains/shop/items/i1/vector?version=x")
    assert (status, doc["error"]) == (400, "bad_request")


def test_item_ids_are_url_decoded(env: Env) -> None:
    env.feed("items", [item_payload("a b/c", "shop", 2, embedding=np.ones(DIM))])
    status, doc = env.call("GET", "/v1/domains/shop/items/a%20b%2Fc/vector")
    assert status == 200 and doc["item_id"] == "a b/c"


# -- similar ------------------------------------------------------------------------------------


def test_similar_matches_brute_force_cosine(env: Env) -> None:
    ids, vecs = _reference_vectors(env)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    status, doc = env.call("GET", "/v1/domains/shop/items/i3/similar?k=5")
    assert status == 200 and len(doc["items"]) == 5
    cos = unit @ unit[ids.index("i3")]
    cos[ids.index("i3")] = -np.inf
    # items that share a served code share a vector: compare scores, not tie order
    got = [x["item_id"] for x in doc["items"]]
    assert "i3" not in got and len(set(got)) == 5
    np.testing.assert_allclose(
        [x["score"] for x in doc["items"]], np.sort(cos)[::-1][:5], atol=1e-5
    )
    np.testing.assert_allclose([cos[ids.index(i)] for i in got], np.sort(cos)[::-1][:5], atol=1e-5)


@pytest.mark.parametrize("k", ["0", "1001", "x", "-3"])
def test_similar_bad_k_is_400(env: Env, k: str) -> None:
    status, doc = env.call("GET", f"/v1/domains/shop/items/i3/similar?k={k}")
    assert status == 400 and "k=" in doc["detail"] and "1000" in doc["detail"]


# -- recommend ----------------------------------------------------------------------------------


def test_recommend_matches_the_models_own_scoring(env: Env) -> None:
    table = load_table(env.store, "shop", 1)
    history = ["i1", "i5", "i9", "i2", "i8"]
    status, doc = env.call(
        "POST", "/v1/domains/shop/recommend", {"history": history, "k": 7, "exclude_history": True}
    )
    assert status == 200 and doc["unknown_history"] == []
    idx = np.asarray([[table.item_ids.index(h) for h in history]])
    scores = score_histories(table.snapshot.model(), table.item_rows, idx)[0]
    scores = scores * table.snapshot.config.temperature  # the API answers plain cosines
    scores_all = scores.copy()
    scores[idx[0]] = -np.inf
    got = [x["item_id"] for x in doc["items"]]
    assert not set(got) & set(history) and len(set(got)) == 7
    top = np.sort(scores)[::-1][:7]
    np.testing.assert_allclose([x["score"] for x in doc["items"]], top, atol=1e-4)
    np.testing.assert_allclose([scores[table.item_ids.index(i)] for i in got], top, atol=1e-4)
    status, keep = env.call(
        "POST", "/v1/domains/shop/recommend", {"history": history, "k": 7, "exclude_history": False}
    )
    assert status == 200
    unmasked = np.sort(scores_all)[::-1][:7]
    np.testing.assert_allclose([x["score"] for x in keep["items"]], unmasked, atol=1e-4)


def test_recommend_ignores_unknown_history_items_and_says_so(env: Env) -> None:
    status, doc = env.call("POST", "/v1/domains/shop/recommend", {"history": ["i1", "ghost"]})
    assert status == 200 and doc["unknown_history"] == ["ghost"] and len(doc["items"]) == 10
    status, doc = env.call("POST", "/v1/domains/shop/recommend", {"history": ["ghost"]})
    assert (status, doc["error"]) == (404, "unknown_item")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not JSON"),
        (b"[1]", "JSON object"),
        ({"history": []}, "history"),
        ({"history": [1, 2]}, "history"),
        ({"history": ["i1"], "k": 0}, "k"),
        ({"history": ["i1"], "k": True}, "k"),
        ({"history": ["i1"], "exclude_history": "yes"}, "exclude_history"),
    ],
)
def test_recommend_bad_bodies_are_400(env: Env, body: Any, needle: str) -> None:
    status, doc = env.call("POST", "/v1/domains/shop/recommend", body)
    assert status == 400 and needle in doc["detail"]


def test_user_recommend_uses_the_stored_recent_items(env: Env) -> None:
    recent = recent_items(env.store, "shop", "u2")
    assert len(recent) == 5  # user_history_len: the 8 interactions were cut to the last 5
    status, doc = env.call("GET", "/v1/domains/shop/users/u2/recommend?k=4")
    assert status == 200 and doc["history_len"] == 5
    _, direct = env.call(
        "POST", "/v1/domains/shop/recommend", {"history": [i for _, i in recent], "k": 4}
    )
    assert doc["items"] == direct["items"]
    status, doc = env.call("GET", "/v1/domains/shop/users/nobody/recommend")
    assert (status, doc["error"]) == (404, "unknown_item") and "nobody" in doc["detail"]
    status, doc = env.call("GET", "/v1/domains/shop/users/u2/recommend?exclude_history=maybe")
    assert status == 400


def test_users_index_keeps_the_last_items_in_order(env: Env) -> None:
    env.feed(
        "interactions",
        [interaction_payload("fresh", f"i{n}", "shop", 100 + n) for n in range(7)],
    )
    assert recent_items(env.store, "shop", "fresh") == [(100 + n, f"i{n}") for n in range(2, 7)]


# -- cold start ---------------------------------------------------------------------------------


def test_a_new_item_is_served_in_the_batch_that_codes_it(env: Env) -> None:
    before = env.serving.builds
    status, _ = env.call("GET", "/v1/domains/shop/items/newbie/vector")
    assert status == 404
    emb = np.random.default_rng(99).normal(size=(4, DIM))[2]  # at center 2
    env.feed("items", [item_payload("newbie", "shop", 50, embedding=emb)])
    status, doc = env.call("GET", "/v1/domains/shop/items/newbie/vector")
    assert status == 200 and doc["version"] == 1 and env.serving.builds == before  # no rebuild
    # reference: the version's rows of its served code
    codes = env.processor.codes
    assigner = None if codes is None else codes.assigner("shop")
    assert assigner is not None
    table = load_table(env.store, "shop", 1)
    rows = assigner.row_ids("newbie")
    n_rows = table.snapshot.params["table.rows"].shape[0]
    model = table.snapshot.model()
    with torch.no_grad():
        ref = model.item_vectors(torch.as_tensor(np.where(rows < n_rows, rows, -1)[None]))[0]
    np.testing.assert_allclose(doc["vector"], ref.numpy(), rtol=1e-5, atol=1e-6)
    # findable: it is among the similar items of an item sharing its code
    twin = next(k for k in assigner.keys if k != "newbie" and assigner.row_ids(k)[:1] == rows[:1])
    _, sim = env.call("GET", f"/v1/domains/shop/items/{twin}/similar?k={N_ITEMS}")
    assert "newbie" in [x["item_id"] for x in sim["items"]]


def test_items_coded_during_a_build_are_in_the_new_index(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.publish(seed=1)
    real = serving_module.build_index

    def build_then_ingest(*args: Any, **kwargs: Any) -> Any:
        index = real(*args, **kwargs)  # read the state before the batch below
        env.feed("items", _items(5, 1000, 3))  # applied to the old index while building
        return index

    monkeypatch.setattr(serving_module, "build_index", build_then_ingest)
    assert env.serving.refresh() == ["shop"]
    for item in ("i1000", "i1001", "i1002"):
        status, doc = env.call("GET", f"/v1/domains/shop/items/{item}/vector")
        assert status == 200 and doc["version"] == 2


# -- versions and rollback ----------------------------------------------------------------------


def test_versions_lists_records_and_what_is_served(env: Env) -> None:
    env.publish(seed=1)
    env.serving.refresh()
    status, doc = env.call("GET", "/v1/domains/shop/versions")
    assert status == 200 and doc["current"] == 2 and doc["served"]["version"] == 2
    assert doc["served"]["live_codes"] is True and doc["served"]["why"] is None
    assert [v["version"] for v in doc["versions"]] == [1, 2]
    assert [(s["from"], s["to"]) for s in doc["switches"]] == [(None, 1), (1, 2)]
    assert doc["pending_finetune"] is None
    batch = env.store.batch()
    put_request(batch, "shop", 1234.5, "t.control-0@7")  # a finetune command, not run yet
    env.store.write(batch)
    _, doc = env.call("GET", "/v1/domains/shop/versions")
    assert doc["pending_finetune"] == {"requested_at": 1234.5, "source": "t.control-0@7"}
    assert env.call("GET", "/v1/domains/nope/versions")[0] == 404
    status, doc = env.call("GET", "/v1/domains/other/versions")
    assert status == 200 and doc["current"] is None and doc["versions"] == []
    status, doc = env.call("POST", "/v1/domains/other/rollback", {"previous": True}, token=TOKEN)
    assert (status, doc["error"]) == (409, "not_servable")


def test_rollback_needs_the_token_and_sends_a_control_command(env: Env) -> None:
    env.publish(seed=1)
    path = "/v1/domains/shop/rollback"
    status, doc = env.call("POST", path, {"to": 1})
    assert (status, doc["error"]) == (401, "unauthorized")
    assert env.call("POST", path, {"to": 1}, token="wrong")[0] == 401
    status, doc = env.call("POST", path, {"previous": True}, token=TOKEN)
    assert status == 202 and doc["sent"] == {
        "op": "rollback",
        "domain": "shop",
        "version": 1,
        "previous": False,
    }
    assert doc["topic"] == "t.control" and doc["from"] == 2
    assert env.sent == [("rollback", "shop", {"version": 1, "previous": False})]
    status, doc = env.call("POST", path, {"to": 9}, token=TOKEN)
    assert status == 409 and "[1, 2]" in doc["detail"]
    assert env.call("POST", path, {"to": 1, "previous": True}, token=TOKEN)[0] == 400
    assert env.call("POST", path, {"to": "1"}, token=TOKEN)[0] == 400
    assert env.call("POST", "/v1/domains/nope/rollback", {"to": 1}, token=TOKEN)[0] == 404
    assert len(env.sent) == 1


def test_admin_endpoints_are_off_without_a_token() -> None:
    settings = _settings(admin_token="")
    store = MemoryPartition()
    router = Router()
    ApiRoutes(Serving(store, settings), store, settings, lambda *a: None).register(router)
    server = HttpServer(router, "127.0.0.1", 0)
    server.start()
    try:
        e = Env(settings, store, Processor(store, settings, None), Serving(store, settings), server)
        status, doc = e.call("POST", "/v1/domains/shop/rollback", {"to": 1}, token="")
        assert (status, doc["error"]) == (403, "admin_disabled")
        assert "admin_token" in doc["detail"]
    finally:
        server.stop()


def test_a_failing_control_producer_is_a_503(env: Env) -> None:
    env.publish(seed=1)

    def fail(op: str, domain: str, fields: dict[str, Any]) -> None:
        raise RuntimeError("broker down")

    routes = ApiRoutes(env.serving, env.store, env.settings, fail)
    router = Router()
    routes.register(router)
    server = HttpServer(router, "127.0.0.1", 0)
    server.start()
    try:
        e = Env(env.settings, env.store, env.processor, env.serving, server)
        status, doc = e.call("POST", "/v1/domains/shop/rollback", {"to": 1}, token=TOKEN)
        assert status == 503 and "broker down" in doc["detail"]
    finally:
        server.stop()


# -- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_describes_every_route(env: Env) -> None:
    status, doc = env.call("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    declared = {(r.method, r.path) for r in ROUTES} | {("GET", p) for p, _, _ in DAEMON_ROUTES}
    assert described == declared
    for _, ops in doc["paths"].items():
        for op in ops.values():
            assert op["responses"] and all(code.isdigit() for code in op["responses"])
    # every route the router knows is described
    assert env.router.routes
    for method, regex, _ in env.router.routes:
        assert any(regex.fullmatch(p) for m, p in declared if m == method), regex.pattern


def test_unknown_routes_and_methods(env: Env) -> None:
    conn = http.client.HTTPConnection(*env.server.address, timeout=10)
    conn.request("GET", "/v1/nothing")
    assert conn.getresponse().status == 404
    conn.close()
    status, doc = env.call("GET", "/v1/domains")
    assert status == 200 and doc["domains"][0]["domain"] == "shop"
    assert doc["domains"][0]["live_codes"] is True  # a version of the codes' codebook


# -- swaps under load ---------------------------------------------------------------------------


def test_no_request_fails_while_versions_are_published_and_rolled_back(env: Env) -> None:
    stop = threading.Event()
    failures: list[Any] = []
    seen: set[int] = set()

    def reader(n: int) -> None:
        paths = [
            ("GET", "/v1/domains/shop/items/i4/similar?k=5", None),
            ("GET", "/v1/domains/shop/items/i9/vector", None),
            ("POST", "/v1/domains/shop/recommend", {"history": ["i1", "i2"], "k": 5}),
            ("GET", "/v1/domains/shop/users/u1/recommend?k=3", None),
        ]
        i = n
        while not stop.is_set():
            method, path, body = paths[i % len(paths)]
            i += 1
            try:
                status, doc = env.call(method, path, body)
            except Exception as exc:  # a broken connection is a failure too
                failures.append(repr(exc))
                continue
            if status != 200:
                failures.append((path, status, doc))
            else:
                seen.add(doc["version"])

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            env.publish(seed=10 + round_)
            assert env.serving.refresh() == ["shop"]
            env.feed("items", _items(round_, 2000 + 10 * round_, 2))
            batch = env.store.batch()
            rollback(env.store, batch, "shop", previous=True)
            env.store.write(batch)
            assert env.serving.refresh() == ["shop"]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == []
    assert len(seen) >= 2  # the readers saw more than one version
    assert env.serving.index("shop").version == current_version(env.store, "shop")


# -- text projection ----------------------------------------------------------------------------


def test_a_text_projected_version_serves_new_items_from_rows_and_their_embedding(
    env: Env,
) -> None:
    assert env.publish(seed=3, text=True) == 2
    assert env.serving.refresh() == ["shop"]
    table = load_table(env.store, "shop", 2)
    snapshot = table.snapshot
    assert snapshot.config.text_dim == DIM and np.abs(snapshot.params[TEXT_PROJ]).sum() > 0
    codes = env.processor.codes
    assigner = None if codes is None else codes.assigner("shop")
    assert assigner is not None
    # an item of the version: its training-time rows and embedding
    status, doc = env.call("GET", "/v1/domains/shop/items/i7/vector")
    assert status == 200 and doc["version"] == 2 and doc["dim"] == 16
    emb7 = stored_embeddings(env.store, "shop", ["i7"])["i7"]
    i7 = table.item_ids.index("i7")
    ref7 = slow_vector(snapshot, table.item_rows[i7], emb7)
    np.testing.assert_allclose(doc["vector"], ref7, rtol=1e-4, atol=1e-5)
    code_only = slow_vector(snapshot, table.item_rows[i7], np.zeros(DIM))
    assert np.abs(ref7 - code_only).max() > 1e-2  # the text part is really there
    # a brand-new item: no rebuild, no training
    before = env.serving.builds
    emb = np.random.default_rng(7).normal(size=DIM)
    env.feed("items", [item_payload("newbie", "shop", 50, embedding=emb)])
    status, doc = env.call("GET", "/v1/domains/shop/items/newbie/vector")
    assert status == 200 and doc["version"] == 2 and env.serving.builds == before
    ref = slow_vector(snapshot, assigner.row_ids("newbie"), emb.astype(np.float32))
    np.testing.assert_allclose(doc["vector"], ref, rtol=1e-4, atol=1e-5)
    # re-described with a nearby embedding, same code: re-vectored at once, no rebuild
    code = assigner.served_code("newbie")
    emb2 = emb + 0.05 * np.random.default_rng(8).normal(size=DIM)
    env.feed("items", [item_payload("newbie", "shop", 51, embedding=emb2)])
    assert assigner.served_code("newbie") == code  # the case of a code that did not move
    status, doc2 = env.call("GET", "/v1/domains/shop/items/newbie/vector")
    assert status == 200 and env.serving.builds == before
    ref2 = slow_vector(snapshot, assigner.row_ids("newbie"), emb2.astype(np.float32))
    np.testing.assert_allclose(doc2["vector"], ref2, rtol=1e-4, atol=1e-5)
    assert np.abs(ref2 - ref).max() > 1e-3  # the old vector would fail the line above
    emb = emb2
    # similar: brute-force cosine over every served item, the new one included
    ids = list(assigner.keys)
    found = stored_embeddings(env.store, "shop", ids)
    vecs = np.stack(
        [
            slow_vector(snapshot, table.item_rows[table.item_ids.index(k)], found[k])
            if k in table.item_ids
            else slow_vector(snapshot, assigner.row_ids(k), found[k])
            for k in ids
        ]
    )
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    cos = unit @ unit[ids.index("newbie")]
    cos[ids.index("newbie")] = -np.inf
    status, sim = env.call("GET", "/v1/domains/shop/items/newbie/similar?k=5")
    assert status == 200 and "newbie" not in [x["item_id"] for x in sim["items"]]
    np.testing.assert_allclose(
        [x["score"] for x in sim["items"]], np.sort(cos)[::-1][:5], atol=1e-4
    )
    # recommend keeps its contract, and a history with the new item is encoded
    status, rec = env.call(
        "POST", "/v1/domains/shop/recommend", {"history": ["i1", "newbie"], "k": 4}
    )
    assert status == 200 and rec["unknown_history"] == [] and len(rec["items"]) == 4
    assert rec["version"] == 2


def test_versions_with_and_without_text_projection_roll_back_and_forth(env: Env) -> None:
    _, before = env.call("GET", "/v1/domains/shop/items/i3/vector")  # version 1: text_dim=0
    env.publish(seed=4, text=True)
    env.serving.refresh()
    status, text_doc = env.call("GET", "/v1/domains/shop/items/i3/vector")
    assert status == 200 and text_doc["version"] == 2
    status, old = env.call("GET", "/v1/domains/shop/items/i3/vector?version=1")
    assert status == 200 and old["vector"] == before["vector"]
    batch = env.store.batch()
    rollback(env.store, batch, "shop", to=1)
    env.store.write(batch)
    assert env.serving.refresh() == ["shop"]
    status, doc = env.call("GET", "/v1/domains/shop/items/i3/vector")
    assert status == 200 and doc["version"] == 1 and doc["vector"] == before["vector"]
    status, again = env.call("GET", "/v1/domains/shop/items/i3/vector?version=2")
    np.testing.assert_allclose(again["vector"], text_doc["vector"], rtol=1e-6, atol=1e-6)


# -- borrowed codes -----------------------------------------------------------------------------


@pytest.fixture
def deep_env() -> Iterator[Env]:
    """Popularity rounds every 10 interactions: head items get longer codes than the rest."""
    yield from _env(_settings(code_round_interactions=10))


@pytest.fixture
def deep_live_env() -> Iterator[Env]:
    """:func:`deep_env` with full paths read from the live assigners, as the daemon wires it."""
    yield from _env(_settings(code_round_interactions=10), live=True)


def _full(e: Env, key: str) -> list[int]:
    codes = e.processor.codes
    assigner = None if codes is None else codes.assigner("shop")
    assert assigner is not None
    return full_path_rows(assigner, [key])[key].tolist()


@pytest.mark.parametrize("live", [False, True])
def test_untrained_and_new_items_are_served_the_deepest_prefix_trained_relatives_share(
    request: pytest.FixtureRequest, live: bool
) -> None:
    e: Env = request.getfixturevalue("deep_live_env" if live else "deep_env")
    assert (e.serving.paths is not None) is live
    codes = e.processor.codes
    assigner = None if codes is None else codes.assigner("shop")
    assert assigner is not None
    keys = list(assigner.keys)
    depth = np.asarray([len(assigner.served_code(k)) for k in keys])
    assert depth.max() >= 2  # some codes are deeper than others
    trained = np.asarray([int(k[1:]) % 3 != 0 for k in keys])  # i0, i3, ... untrained
    assert e.publish(seed=5, text=True, trained=trained) == 2
    assert e.serving.refresh() == ["shop"]
    table = load_table(e.store, "shop", 2)
    assert table.trained is not None and table.full_rows is not None
    t_rows = [table.item_rows[i].tolist() for i in np.flatnonzero(trained)]
    t_full = [table.full_rows[i].tolist() for i in np.flatnonzero(trained)]
    found = stored_embeddings(e.store, "shop", keys)
    borrowed = 0
    for i, k in enumerate(keys):  # the version's items: trained unchanged, untrained borrow
        own = table.item_rows[i].tolist()
        rows = own if trained[i] else slow_served_rows(own, table.full_rows[i], t_rows, t_full)
        borrowed += rows != [r for r in own if r >= 0]
        status, doc = e.call("GET", f"/v1/domains/shop/items/{k}/vector")
        assert status == 200 and doc["version"] == 2
        np.testing.assert_allclose(
            doc["vector"], slow_vector(table.snapshot, rows, found[k]), rtol=1e-4, atol=1e-5
        )
    assert borrowed > 0

    # a brand-new twin of the trained item with the deepest shared prefix on its path: that
    # prefix's rows + its W @ e (a disambiguation row, off the path, is never lent)
    def shared(i: int) -> list[int]:
        return slow_served_rows([], table.full_rows[i], t_rows, t_full)

    deepest = max(np.flatnonzero(trained), key=lambda i: len(shared(i)))
    assert len(shared(deepest)) >= 2
    emb = found[keys[deepest]] + np.float32(1e-4)
    before = e.serving.builds
    e.feed("items", [item_payload("newbie", "shop", 50, embedding=emb)])
    assert _full(e, "newbie") == table.full_rows[deepest].tolist()
    rows = slow_served_rows(assigner.row_ids("newbie").tolist(), _full(e, "newbie"), t_rows, t_full)
    assert rows == shared(deepest)
    lent = slow_trained_code(table.item_rows[deepest], table.full_rows[deepest])
    assert rows == lent[: len(rows)]  # a prefix of its twin's code, shared with others
    assert rows != assigner.row_ids("newbie").tolist()  # its own code is shorter
    status, doc = e.call("GET", "/v1/domains/shop/items/newbie/vector")
    assert status == 200 and doc["version"] == 2 and e.serving.builds == before
    np.testing.assert_allclose(
        doc["vector"], slow_vector(table.snapshot, rows, emb), rtol=1e-4, atol=1e-5
    )
    # an index built from the committed state (a restart) serves it the same vector
    rebuilt = Serving(e.store, e.settings)
    assert rebuilt.refresh() == ["shop"]
    np.testing.assert_allclose(
        rebuilt.index("shop").vector("newbie"), doc["vector"], rtol=1e-5, atol=1e-6
    )


def test_the_switch_serves_every_item_its_own_code(deep_env: Env) -> None:
    e = deep_env
    codes = e.processor.codes
    assigner = None if codes is None else codes.assigner("shop")
    assert assigner is not None
    keys = list(assigner.keys)
    trained = np.asarray([int(k[1:]) % 3 != 0 for k in keys])
    e.publish(seed=5, text=True, trained=trained)
    plain = Serving(e.store, _settings(code_round_interactions=10, serve_borrow_trained=False))
    assert plain.refresh() == ["shop"]
    table = load_table(e.store, "shop", 2)
    found = stored_embeddings(e.store, "shop", keys)
    index = plain.index("shop")
    for i, k in enumerate(keys):
        np.testing.assert_allclose(
            index.vector(k),
            slow_vector(table.snapshot, table.item_rows[i].tolist(), found[k]),
            rtol=1e-4,
            atol=1e-5,
        )
    emb = found[keys[0]] + np.float32(1e-4)
    result = e.feed("items", [item_payload("newbie", "shop", 50, embedding=emb)])
    plain.on_applied(result)
    np.testing.assert_allclose(
        index.vector("newbie"),
        slow_vector(table.snapshot, assigner.row_ids("newbie").tolist(), emb),
        rtol=1e-4,
        atol=1e-5,
    )
