"""Through the real broker: the daemon publishes v1, then a brand-new item produced while it
runs is served by the HTTP API (vector, similar, recommend) without a rebuild, its vector
being its code rows plus the version's projection of its stored embedding, and an admin
rollback goes through the control topic and swaps the served version."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tests.kafka_utils import produce_json
from tests.text_reference import slow_text_part
from tests.worker_process import DIM, settings_for, wait_for
from worker.app.daemon import Daemon
from worker.commands.topics import create_topics
from worker.ingest.events import interaction_payload, item_payload
from worker.serving.index import full_path_rows
from worker.serving.routes import DAEMON_ROUTES, ROUTES
from worker.state.reads import committed_assigner, stored_embeddings
from worker.state.versions import current_version, load_table

TOKEN = "t0ken"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _interactions(start_ts: int, seed: int) -> list[tuple[str, bytes]]:
    """90 users, 8 interactions each, within one cluster of items (items i % 6 == cluster)."""
    rng = np.random.default_rng(seed)
    return [
        (
            "shop",
            interaction_payload(
                f"u{u}", f"i{(u % 6) + 6 * int(rng.integers(20))}", "shop", start_ts + 8 * u + t
            ),
        )
        for u in range(90)
        for t in range(8)
    ]


def _call(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    assert daemon.http is not None
    conn = http.client.HTTPConnection(*daemon.http.address, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    conn.request(method, path, body=None if body is None else orjson.dumps(body), headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, orjson.loads(raw) if raw.startswith((b"{", b"[")) else raw


def test_a_cold_start_item_is_served_by_the_api_while_the_worker_runs(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(
        kafka_bootstrap,
        topic_prefix,
        tmp_path / "state",
        codebook_min_items=60,
        finetune_min_interactions=100,
        finetune_after_interactions=600,
        finetune_interval_s=0.0,
        finetune_epochs=2,
        finetune_hidden=16,
        gate_tolerance=1.0,
        http_port=_free_port(),
        admin_token=TOKEN,
        index_poll_s=0.2,
    )
    create_topics(s, partitions=1)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, DIM))
    items = [
        (
            "shop",
            item_payload(f"i{i}", "shop", 1, embedding=centers[i % 6] + 0.1 * rng.normal(size=DIM)),
        )
        for i in range(120)
    ]
    produce_json(kafka_bootstrap, s.topic("items"), items)
    produce_json(kafka_bootstrap, s.topic("interactions"), _interactions(1000, seed=1))
    daemon = Daemon(s)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        assert daemon.http is not None
        for method, regex, _ in daemon.router.routes:  # the daemon's routes are all described
            described = [(r.method, r.path) for r in ROUTES] + [
                ("GET", p) for p, _, _ in DAEMON_ROUTES
            ]
            assert any(regex.fullmatch(p) for m, p in described if m == method), regex.pattern
        wait_for(
            lambda: _call(daemon, "GET", "/v1/domains/shop/items/i0/vector")[0] == 200,
            120,
            "v1 served",
        )
        assert current_version(daemon.store, "shop") == 1
        builds = daemon.serving.builds

        # a brand-new item, near cluster 2, produced while the worker runs
        emb = centers[2] + 0.05 * rng.normal(size=DIM)
        produced = time.monotonic()
        produce_json(
            kafka_bootstrap,
            s.topic("items"),
            [("shop", item_payload("fresh", "shop", 9, embedding=emb))],
        )
        wait_for(
            lambda: _call(daemon, "GET", "/v1/domains/shop/items/fresh/vector")[0] == 200,
            30,
            "fresh served",
        )
        latency = time.monotonic() - produced
        status, doc = _call(daemon, "GET", "/v1/domains/shop/items/fresh/vector")
        assert status == 200 and doc["version"] == 1 and len(doc["vector"]) == 16
        assert daemon.serving.builds == builds  # added live, not rebuilt
        assert latency < 10, latency
        # its vector: the version's rows of its served code + the text part of its stored
        # embedding (the text adaptor)
        v1 = load_table(daemon.store, "shop", 1).snapshot
        assert v1.config.text_dim == DIM
        assigner = committed_assigner(daemon.store, "shop")
        assert assigner is not None
        table_rows = v1.params["table.rows"]
        # served rows: its own code, or the deepest prefix its trained relatives share
        served = daemon.serving.index("shop").live_rows(
            assigner.row_ids("fresh"), full_path_rows(assigner, ["fresh"])["fresh"]
        )
        code_part = sum(table_rows[r] for r in served if 0 <= r < len(table_rows))
        stored = stored_embeddings(daemon.store, "shop", ["fresh"])["fresh"]
        np.testing.assert_allclose(stored, emb, rtol=1e-6)
        assert v1.config.text_hidden > 0
        expected = code_part + slow_text_part(v1.params, stored)
        np.testing.assert_allclose(doc["vector"], expected, rtol=1e-4, atol=1e-5)

        status, sim = _call(daemon, "GET", "/v1/domains/shop/items/fresh/similar?k=10")
        assert status == 200 and len(sim["items"]) == 10
        # items that share its first code row are its nearest neighbours; and it is findable
        twin = sim["items"][0]["item_id"]
        status, back = _call(daemon, "GET", f"/v1/domains/shop/items/{twin}/similar?k=130")
        assert "fresh" in [x["item_id"] for x in back["items"]]

        status, rec = _call(
            daemon, "POST", "/v1/domains/shop/recommend", {"history": ["fresh", twin], "k": 5}
        )
        assert status == 200 and len(rec["items"]) == 5
        status, urec = _call(daemon, "GET", "/v1/domains/shop/users/u3/recommend?k=5")
        assert status == 200 and urec["history_len"] == 8

        # a second version, then an admin rollback through the control topic
        produce_json(kafka_bootstrap, s.topic("interactions"), _interactions(9000, seed=2))
        wait_for(lambda: current_version(daemon.store, "shop") == 2, 120, "version 2")
        wait_for(lambda: daemon.serving.index("shop").version == 2, 30, "v2 served")
        status, doc = _call(daemon, "POST", "/v1/domains/shop/rollback", {"previous": True})
        assert status == 202 and doc["sent"]["version"] == 1
        wait_for(
            lambda: _call(daemon, "GET", "/v1/domains/shop/items/fresh/vector")[1]["version"] == 1,
            60,
            "rollback served",
        )
        status, versions = _call(daemon, "GET", "/v1/domains/shop/versions")
        assert versions["current"] == 1 and versions["switches"][-1]["reason"] == "rollback"
        status, metrics = _call(daemon, "GET", "/metrics")
        assert status == 200 and b"adacode_up" in metrics
    finally:
        daemon.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
