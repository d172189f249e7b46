"""bench/scale.py's pure parts: the generator, the figures from polls, the log parsing.

Fast unit tests: no broker, no worker.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import orjson
import pytest

from bench.broker import free_port
from bench.common import Scrape, gc_pauses_between, longest_batch_bound, trims_between
from bench.scale import (
    _CUT_OVER,
    _MIGRATED,
    DIM,
    KeepAlive,
    LogLine,
    Phase,
    Sample,
    Shot,
    SizeResult,
    Spec,
    SyntheticDomain,
    code_rounds,
    count_statuses,
    crossing_time,
    decile_rates,
    duration_ms,
    find_bootstrap,
    item_value,
    latency_quantiles,
    longest_pause,
    pace_schedule,
    paced_figures,
    paced_stalls,
    parse_log_line,
    poll_until_ok,
    quantiles,
    render_table,
    run_paced,
    slow_scrapes,
)
from worker.ingest.events import EventLimits, parse_interaction, parse_item

SPEC = Spec(items=3000, interactions=20_000, users=500, clusters=20, seed=3)
LIMITS = EventLimits(DIM, 1_000_000, re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$"), 4000)


def _items(domain: SyntheticDomain) -> np.ndarray:
    return np.concatenate([v for _, v in domain.item_chunks()])


def _interactions(domain: SyntheticDomain) -> tuple[np.ndarray, np.ndarray]:
    parts = list(domain.interaction_chunks())
    return np.concatenate([u for u, _, _ in parts]), np.concatenate([i for _, i, _ in parts])


# -- the generator ------------------------------------------------------------------------


def test_generator_is_seeded_and_deterministic() -> None:
    a, b = SyntheticDomain(SPEC), SyntheticDomain(SPEC)
    np.testing.assert_array_equal(_items(a), _items(b))
    for x, y in zip(_interactions(a), _interactions(b), strict=True):
        np.testing.assert_array_equal(x, y)
    other = SyntheticDomain(Spec(**{**SPEC.__dict__, "seed": SPEC.seed + 1}))
    assert not np.array_equal(_interactions(a)[1], _interactions(other)[1])
    assert not np.allclose(_items(a), _items(other))


def test_event_streams_are_the_chunks_and_parse_as_worker_events() -> None:
    domain = SyntheticDomain(SPEC)
    items = list(domain.item_events())
    assert len(items) == SPEC.items
    vectors = _items(domain)
    for k in (0, 1234, SPEC.items - 1):
        key, value = items[k]
        event = parse_item(value, LIMITS)
        assert key == b"scale" and event.item_id == domain.item_id(k)
        assert event.embedding is not None
        np.testing.assert_allclose(np.asarray(event.embedding), vectors[k], rtol=1e-6)
    users, chosen = _interactions(domain)
    interactions = list(domain.interaction_events())
    assert len(interactions) == SPEC.interactions
    for k in (0, 777, SPEC.interactions - 1):
        interaction = parse_interaction(interactions[k][1], LIMITS)
        assert interaction.item_id == domain.item_id(int(chosen[k]))
        assert interaction.user_id == f"u{users[k]:07d}"
    stamps = [orjson.loads(v)["ts"] for _, v in interactions]
    assert stamps == sorted(stamps)


def test_extra_interactions_come_after_the_stream_are_new_and_deterministic() -> None:
    domain = SyntheticDomain(SPEC)
    first = [orjson.loads(v) for _, v in domain.interaction_events()]
    extra = [orjson.loads(v) for _, v in domain.interaction_events(extra=5000)]
    again = [orjson.loads(v) for _, v in SyntheticDomain(SPEC).interaction_events(extra=5000)]
    assert len(extra) == 5000 and extra == again
    assert min(e["ts"] for e in extra) > max(e["ts"] for e in first)
    assert [e["ts"] for e in extra] == sorted(e["ts"] for e in extra)
    assert [(e["user_id"], e["item_id"]) for e in extra[:50]] != [
        (e["user_id"], e["item_id"]) for e in first[:50]
    ]
    known = {e["user_id"] for e in first}
    assert sum(e["user_id"] in known for e in extra) / len(extra) > 0.9


def test_embeddings_are_normalized_and_clustered() -> None:
    domain = SyntheticDomain(SPEC)
    vectors = _items(domain)
    assert vectors.shape == (SPEC.items, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ domain.centres.T
    own = sims[np.arange(SPEC.items), domain.item_cluster]
    assert (sims.argmax(axis=1) == domain.item_cluster).mean() > 0.99
    assert own.mean() > 0.7 > 0.3 > np.partition(sims, -2, axis=1)[:, -2].mean()


def test_popularity_is_zipf_and_users_stay_in_their_clusters() -> None:
    domain = SyntheticDomain(SPEC)
    users, items = _interactions(domain)
    counts = np.sort(np.bincount(items, minlength=SPEC.items))[::-1]
    assert counts[: SPEC.items // 100].sum() > 0.3 * SPEC.interactions  # a heavy head
    assert (counts == 0).sum() > SPEC.items // 10  # and a long, partly unseen tail
    in_favourites = (domain.favourites[users] == domain.item_cluster[items][:, None]).any(axis=1)
    assert in_favourites.mean() > 0.85
    assert users.max() < SPEC.users and items.max() < SPEC.items


def test_item_value_is_the_short_float32_form() -> None:
    vec = np.full(DIM, 0.1, dtype=np.float32)
    value = item_value("a", "d", 5, vec)
    assert b"0.1," in value and len(value) < 6 * DIM
    assert parse_item(value, LIMITS).item_id == "a"


# -- figures from polls -------------------------------------------------------------------


def test_crossing_time_interpolates_between_polls() -> None:
    t, c = [0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 100.0, 200.0]
    assert crossing_time(t, c, 50) == pytest.approx(1.5)
    assert crossing_time(t, c, 200) == pytest.approx(3.0)
    assert crossing_time(t, c, 201) is None


def test_decile_rates_of_a_steady_and_a_slowing_counter() -> None:
    t = [float(x) for x in range(12)]
    steady = [0.0] + [100.0 * k for k in range(1, 11)] + [1000.0]
    assert decile_rates(t, steady, 1000) == pytest.approx([100.0] * 10)
    # the second half at half the rate
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0]
    counts = [0.0] + [100.0 * k for k in range(1, 11)]
    rates = decile_rates(times, counts, 1000)
    assert rates[:5] == pytest.approx([100.0] * 5) and rates[5:] == pytest.approx([50.0] * 5)
    # not finished: the deciles not reached are None
    assert decile_rates(t[:4], steady[:4], 1000)[3:] == [None] * 7


def test_longest_pause_only_counts_while_events_wait() -> None:
    t = [0.0, 0.5, 1.0, 1.5, 4.5, 5.0, 9.0]
    c = [0.0, 10.0, 20.0, 20.0, 30.0, 40.0, 40.0]  # stalled 1.0 -> 4.5; done at 5.0
    assert longest_pause(t, c, 40) == pytest.approx(3.5)
    assert longest_pause(t, c, 1000) == pytest.approx(4.0)  # still waiting at the end


def test_longest_batch_bound_from_the_histogram() -> None:
    buckets = {0.1: 3.0, 0.5: 7.0, 1.0: 9.0, 2.5: 9.0, float("inf"): 9.0}
    assert longest_batch_bound(buckets) == 1.0
    assert longest_batch_bound({float("inf"): 0.0}) is None


# -- the worker's log ---------------------------------------------------------------------


def test_trims_and_collector_passes_between_two_scrapes() -> None:
    """The paced window's heap trims (and collector passes) are the histograms' difference
    between the scrapes before and after it: counts by label, the longest's bucket bound."""
    inf = float("inf")
    before = Scrape(
        0.01,
        {},
        0.0,
        {},
        {"2": {0.1: 3.0, inf: 3.0}},
        {"consumer": {0.01: 4.0, 0.25: 5.0, inf: 5.0}},
    )
    after = Scrape(
        0.01,
        {},
        0.0,
        {},
        {"2": {0.1: 3.0, inf: 3.0}},
        {
            "consumer": {0.01: 4.0, 0.25: 7.0, inf: 7.0},
            "index": {0.01: 1.0, 0.25: 1.0, inf: 1.0},
        },
    )
    assert trims_between(before, after) == {
        "consumer": {"passes": 2.0, "longest_s": 0.25},
        "index": {"passes": 1.0, "longest_s": 0.01},
    }
    assert gc_pauses_between(before, after) == {"2": {"passes": 0.0, "longest_s": None}}


def test_parse_log_line_json_and_other() -> None:
    line = parse_log_line('{"ts":"2026-01-02T03:04:05.250Z","level":"INFO","msg":"hello"}\n')
    assert line.msg == "hello" and line.ts is not None and line.ts % 1 == pytest.approx(0.25)
    other = parse_log_line("12:00:01 INFO    worker.x: code round of 10 items in 3 ms")
    assert other.ts is None and "code round" in other.msg
    assert parse_log_line('{"broken').ts is None


@pytest.mark.parametrize(
    ("msg", "items", "ms"),
    [
        ("code round shop: 1,234 items re-evaluated in 12.5 ms", 1234, 12.5),
        ("code round of shop took 0.25 s (42 items changed)", 42, 250.0),
        ("Code round shop done: 7 changes", None, None),
    ],
)
def test_code_round_lines_in_any_form(msg: str, items: int | None, ms: float | None) -> None:
    rounds = code_rounds([LogLine(1.0, "unrelated 5 ms"), LogLine(2.0, msg)])
    assert len(rounds) == 1
    assert rounds[0].items == items and rounds[0].ms == ms


def test_duration_forms() -> None:
    assert duration_ms("in 3 ms") == 3.0
    assert duration_ms("in 1.5 s") == 1500.0
    assert duration_ms("took 2 seconds") == 2000.0
    assert duration_ms("6 levels x 16 codewords on 2000 items") is None


def _sample(t: float, items: float) -> Sample:
    return Sample(t, 0.01, items, 0.0, 0.0, 100.0, 100.0, 0.0, None)


def test_bootstrap_from_a_logged_duration_a_start_line_or_the_polls() -> None:
    samples = [_sample(10.0, 500), _sample(11.0, 900), _sample(20.0, 2000)]
    done = LogLine(15.0, "trained codebook ab12 (6 levels x 16 codewords) on 2000 items")
    timed = LogLine(15.0, "trained codebook ab12 on 2000 items in 4.0 s")
    start = LogLine(12.5, "training the bootstrap codebook on a sample of 2000 items")
    settings = LogLine(1.0, "starting worker with settings {'codebook_min_items': 1000}")
    assert find_bootstrap([settings, timed], samples, 1000).seconds == pytest.approx(4.0)
    boot = find_bootstrap([settings, start, done], samples, 1000)
    assert boot.how == "start line" and boot.seconds == pytest.approx(2.5)
    boot = find_bootstrap([settings, done], samples, 1000)
    assert boot.how.startswith("~") and boot.seconds == pytest.approx(4.0)  # 11 -> 15
    assert find_bootstrap([settings], samples, 1000).seconds is None


# -- serving: new items, picks, the paced load ------------------------------------------


def test_new_items_are_new_deterministic_and_drawn_like_the_catalogue() -> None:
    domain = SyntheticDomain(SPEC)
    events = domain.new_item_events(40)
    assert events == domain.new_item_events(40)
    catalogue = {domain.item_id(i) for i in range(SPEC.items)}
    ids = [item for item, _, _ in events]
    assert len(set(ids)) == 40 and not catalogue & set(ids)
    vectors = []
    for item, key, value in events:
        event = parse_item(value, LIMITS)
        assert key == b"scale" and event.item_id == item and event.embedding is not None
        vectors.append(np.asarray(event.embedding, dtype=np.float32))
    x = np.stack(vectors)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # as close to their nearest centre as the catalogue's items are to theirs
    own = _items(domain) @ domain.centres.T
    assert (x @ domain.centres.T).max(axis=1).mean() == pytest.approx(
        own.max(axis=1).mean(), abs=0.05
    )


def test_serve_picks_popular_items_and_known_users() -> None:
    domain = SyntheticDomain(SPEC)
    items, users = domain.serve_picks(np.random.default_rng(1), 500)
    popular = {domain.item_id(int(i)) for i in np.argsort(-domain.weight)[: SPEC.items // 10]}
    assert len(items) == len(users) == 500 and set(items) <= popular
    assert all(re.fullmatch(r"u\d{7}", u) and int(u[1:]) < SPEC.users for u in users)


def test_latency_quantiles() -> None:
    q = latency_quantiles([float(x) for x in range(1, 101)])
    assert q["p50"] == pytest.approx(50.5) and q["p90"] == pytest.approx(90.1)
    assert q["p99"] == pytest.approx(99.01) and q["max"] == 100.0 and q["n"] == 100
    assert latency_quantiles([]) == {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}


def test_pace_schedule_is_even_and_ends_before_the_window() -> None:
    offsets = pace_schedule(200, 20)
    assert len(offsets) == 4000 and offsets[0] == 0.0 and offsets[-1] < 20
    np.testing.assert_allclose(np.diff(offsets), 0.005)
    assert len(pace_schedule(3, 2.5)) == 7  # 0, 1/3, ..., 2
    assert len(pace_schedule(0, 10)) == 0 and len(pace_schedule(100, 0)) == 0


def test_paced_stalls_group_the_slow_requests_of_every_kind() -> None:
    """Requests over 50 ms, whatever their kind, due within half a second of the last slow
    one, are one stall: its start, how many it delayed, the slowest."""
    shots = [Shot("a" if k % 2 else "b", 0.005 * k, 0.005 * k + 0.002, 200) for k in range(2000)]
    shots[400] = Shot("a", 2.0, 2.12, 200)  # a stall at 2.0 s: three slow requests
    shots[401] = Shot("b", 2.005, 2.09, 200)
    shots[402] = Shot("a", 2.01, 2.06, 200)
    shots[1600] = Shot("b", 8.0, 8.2, 200)  # another, alone, later
    shots[1601] = Shot("a", 8.005, 8.04, 200)  # 35 ms: not slow
    assert paced_stalls(shots) == [
        {"at_s": 2.0, "requests": 3.0, "max_ms": pytest.approx(120.0)},
        {"at_s": 8.0, "requests": 1.0, "max_ms": pytest.approx(200.0)},
    ]
    assert paced_stalls(shots[:300]) == []


def test_count_statuses_and_paced_figures() -> None:
    assert count_statuses([200, 404, 200, 0]) == {0: 1, 200: 2, 404: 1}
    shots = [Shot("a", 0.01 * k, 0.01 * k + 0.002 * (k + 1), 200) for k in range(10)]
    shots.append(Shot("b", 0.0, 0.5, 503))
    got = paced_figures(shots)
    assert got["a"]["p50"] == pytest.approx(11.0) and got["a"]["max"] == pytest.approx(20.0)
    assert got["a"]["achieved_per_s"] == pytest.approx(10 / 0.11)
    assert got["a"]["statuses"] == {200: 10} and got["a"]["non_200"] == 0
    assert got["b"]["non_200"] == 1 and got["b"]["p99"] == pytest.approx(500.0)


def test_run_paced_counts_the_wait_for_a_busy_pool() -> None:
    """One thread, a 30 ms request every 10 ms: each waits for the last, and its latency
    (from its due instant) grows by ~20 ms a request; with enough threads it does not."""

    def slow(_path: str) -> int:
        time.sleep(0.03)
        return 200

    offsets = pace_schedule(100, 0.1)
    requests = [("x", "/") for _ in offsets]
    queued = run_paced(requests, offsets, slow, threads=1)
    assert [s.due for s in queued] == pytest.approx(list(offsets))
    latency = [s.done - s.due for s in queued]
    assert latency[-1] - latency[0] > 0.15  # 9 x 20 ms of queueing, not hidden
    spread = run_paced(requests, offsets, slow, threads=8)
    assert max(s.done - s.due for s in spread) < 0.1
    assert {s.status for s in spread} == {200} and len(spread) == 10


def test_run_paced_starts_every_thread_before_the_first_shot() -> None:
    """A thread started while shots are due would count its start as their latency: all
    of the pool's threads exist when the first shot is sent."""
    seen: list[int] = []

    def send(_path: str) -> int:
        seen.append(sum(t.name.startswith("scale-paced") for t in threading.enumerate()))
        return 200

    offsets = pace_schedule(200, 0.05)
    shots = run_paced([("x", "/") for _ in offsets], offsets, send, threads=6)
    assert len(shots) == 10 and seen and min(seen) >= 6


def test_poll_until_ok_times_from_the_start_and_gives_up() -> None:
    answers = iter([404, 404, 404, 200])
    started = time.perf_counter()
    seconds = poll_until_ok(lambda: next(answers), started, 0.01, 5.0)
    assert seconds is not None and 0.03 <= seconds < 1.0
    assert poll_until_ok(lambda: 404, time.perf_counter(), 0.005, 0.05) is None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections = 0

    def setup(self) -> None:
        type(self).connections += 1
        super().setup()

    def do_GET(self) -> None:
        body = b"{}"
        self.send_response(200 if self.path == "/ok" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    _Handler.connections = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_keep_alive_reuses_one_connection_per_thread(http_port: int) -> None:
    client = KeepAlive(http_port)
    assert [client.get("/ok") for _ in range(5)] + [client.get("/no")] == [200] * 5 + [404]
    other = threading.Thread(target=lambda: client.get("/ok"))
    other.start()
    other.join()
    client.close()
    assert _Handler.connections == 2
    assert KeepAlive(free_port(), timeout_s=1.0).get("/ok") == 0  # nothing listens: no answer


def test_serve_rows_only_when_serving_ran() -> None:
    plain = render_table(SizeResult(SPEC))
    assert "paced" not in plain and "produce-to-servable" not in plain
    result = SizeResult(SPEC)
    shots = [Shot("user_recommend", 0.0, 0.012, 200), Shot("similar", 0.005, 0.011, 404)]
    result.figures = {
        "paced_latency_ms": paced_figures(shots),
        "paced": {"rate": 200.0, "seconds": 20.0, "threads": 32, "requests": 2},
        "new_item_ms": latency_quantiles([40.0, 60.0])
        | {"produced": 3, "servable": 2, "stopped_early": False, "client": "confluent"},
    }
    table = render_table(result)
    assert "| paced user_recommend p50 / p90 / p99 / max ms | 12.0 / 12.0 / 12.0 / 12.0" in table
    assert "goal p99 < 10 ms" in table and "1 not 200" in table
    assert "| new item produce-to-servable p50 / p99 / max ms | 50.0 / 59.8 / 60.0" in table
    assert "2 of 3 servable" in table


def test_migration_rows_only_when_the_migration_ran_and_its_log_lines_match() -> None:
    assert "codebook migration" not in render_table(SizeResult(SPEC))
    result = SizeResult(SPEC)
    result.figures = {
        "migration": {
            "interactions": 100_000,
            "cut_over_s": 81.25,
            "coded_s": 140.0,
            "served_s": 455.5,
            "longest_pause_s": 1.5,
            "max_batch_bound_s": 2.5,
            "peak_rss_mib": 4321.0,
        }
    }
    table = render_table(result)
    assert "codebook migration (+100,000 interactions meanwhile)" in table
    assert "| 81.2 / 140.0 / 455.5 |" in table and "| 1.50 s, <= 2.5 s, 4,321 MiB |" in table
    assert _CUT_OVER.search("codebook migration: cut over from ab12 to cd34 (4 levels x 256)")
    assert _MIGRATED.search("codebook migration to cd34: every item is coded")
    assert not _MIGRATED.search("codebook migration requested (t.control-0@3)")


def test_slow_scrapes_are_listed_with_their_phase_and_time() -> None:
    """Each scrape over 50 ms is kept with its phase and its time after the phase's worker
    started (to find it in the worker's log); the table names the slowest."""

    def sample(t: float, ms: float) -> Sample:
        return Sample(t, ms / 1000, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)

    result = SizeResult(SPEC)
    items = Phase("items", 3000, started_at=100.0)
    items.samples = [sample(101.0, 3.0), sample(102.0, 75.0)]
    inter = Phase("interactions", 20_000, started_at=200.0)
    inter.samples = [sample(230.0, 120.0), sample(231.0, 50.0)]
    result.phases = {"items": items, "interactions": inter}
    slow = slow_scrapes(result)
    assert [(x["phase"], x["after_start_s"], x["ms"]) for x in slow] == [
        ("items", 2.0, 75.0),
        ("interactions", 30.0, 120.0),
    ]
    result.figures = {"scrape_ms": quantiles([3.0, 75.0, 120.0, 50.0]), "slow_scrapes": slow}
    table = render_table(result)
    assert "2 over 50 ms: 120 ms interactions +30 s, 75 ms items +2 s" in table
    result.figures["slow_scrapes"] = []
    assert "none over 50 ms" in render_table(result)
