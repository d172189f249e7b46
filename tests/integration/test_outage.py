"""A Kafka outage: the worker waits it out (alive, logging, /healthz 503), then applies the rest
of the stream exactly once. Runs its own broker (ops/kafka.sh on free ports), never the shared
one, since it stops it; plus the broker watch's verdicts on a fake clock."""

from __future__ import annotations

import http.client
import itertools
import re
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest

from store.rocksdb import RocksDBPartition
from tests.conftest import KAFKA_SH, _free_ports
from tests.kafka_utils import produce_json, wait_until_answers
from tests.worker_process import (
    applied_offsets,
    end_offsets,
    make_events,
    settings_for,
    start_worker,
    wait_for,
    worker_env,
)
from worker.commands.topics import create_topics
from worker.ingest.health import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    BrokerState,
    BrokerWatch,
    broker_connected,
)
from worker.state.reads import domain_counters

OUTAGE_S = 30.0
GRACE_S = 5.0  # worker.ingest.health.BROKER_GRACE_S, the default the worker runs with


# -- the watch on a fake clock ------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_watch_turns_unhealthy_only_after_the_grace_period_and_recovers() -> None:
    clock = _Clock()
    up = [True]
    watch = BrokerWatch(object(), grace_s=5.0, probe=lambda _: up[0], clock=clock)
    assert watch.check().healthy and watch.check().wait_s == 0
    up[0] = False
    waits, verdicts = [], []
    for _ in range(12):  # one check per second
        clock.now += 1.0
        state = watch.check()
        waits.append(state.wait_s)
        verdicts.append((state.connected, state.healthy, state.down_for))
    assert [h for _, h, _ in verdicts] == [True] * 4 + [False] * 8  # unhealthy from 5 s on
    assert [d for _, _, d in verdicts] == [float(s) for s in range(1, 13)]
    assert not any(c for c, _, _ in verdicts)
    # waits double from the minimum up to the cap, never beyond
    assert waits[0] == BACKOFF_MIN_S and waits[-1] == BACKOFF_MAX_S
    assert all(b == min(BACKOFF_MAX_S, 2 * a) for a, b in itertools.pairwise(waits))
    assert watch.outages == 1
    up[0] = True
    clock.now += 1.0
    assert watch.check() == BrokerState(True, True, 0.0, 0.0)  # the wait is reset too
    up[0] = False  # a blip shorter than the grace period is not an outage
    clock.now += 3.0
    assert watch.check().healthy and watch.outages == 1


def test_the_watch_logs_less_and_less_often_during_an_outage() -> None:
    clock = _Clock()
    watch = BrokerWatch(object(), grace_s=2.0, probe=lambda _: False, clock=clock)
    logged = []
    for t in range(200):
        clock.now = 100.0 + t
        watch.check()
        if watch.should_log():
            logged.append(t)
    gaps = [b - a for a, b in itertools.pairwise(logged)]
    assert logged[0] == 2  # the first line when the grace period ends
    assert gaps[:4] == [5, 10, 20, 40] and set(gaps[4:]) == {60}


def test_a_kafka_python_without_the_expected_internals_counts_as_connected() -> None:
    assert broker_connected(object()) is None  # no _client: the probe cannot tell
    clock = _Clock()
    watch = BrokerWatch(object(), grace_s=1.0, clock=clock)
    clock.now += 60.0
    assert watch.check() == BrokerState(True, True, 0.0, 0.0)  # polls decide, as before


# -- a real outage ------------------------------------------------------------------------------


class _Broker:
    """A private broker on free ports, with its own data dir, that a test may stop and restart."""

    def __init__(self, data_dir: Path) -> None:
        self.port, self.controller_port = _free_ports(2)
        self.where = [
            "--port",
            str(self.port),
            "--controller-port",
            str(self.controller_port),
            "--data",
            str(data_dir),
        ]
        self.bootstrap = f"127.0.0.1:{self.port}"

    def _run(self, command: str) -> None:
        out = subprocess.run(
            ["bash", str(KAFKA_SH), command, *self.where],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert out.returncode == 0, f"ops/kafka.sh {command} failed:\n{out.stdout}{out.stderr}"

    def up(self) -> None:
        self._run("up")
        wait_until_answers(self.bootstrap, timeout_s=60)

    def down(self) -> None:
        self._run("down")


def _get(port: int, path: str) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_the_worker_waits_out_a_broker_outage_and_applies_everything_once(
    tmp_path: Path,
) -> None:
    broker = _Broker(tmp_path / "kafka")
    broker.up()
    worker = None
    log = tmp_path / "worker.log"
    try:
        prefix = f"o{uuid.uuid4().hex[:8]}."
        s = settings_for(broker.bootstrap, prefix, tmp_path / "unused")
        create_topics(s, partitions=2)
        items, inters = make_events(300, 12_000, seed=11)
        half = len(inters) // 2
        produce_json(broker.bootstrap, s.topic("items"), items[:200])
        produce_json(broker.bootstrap, s.topic("interactions"), inters[:half])
        first = end_offsets(broker.bootstrap, [s.topic("items"), s.topic("interactions")])
        state = tmp_path / "state"
        (port,) = _free_ports(1)
        env = worker_env(broker.bootstrap, prefix, state, poll_max_records=500, http_port=port)
        worker = start_worker(env, log)
        # the HTTP server starts once the store is open (a half-made store confuses
        # applied_offsets)
        worker.wait_http(port, "/healthz", timeout_s=60)
        wait_for(lambda: applied_offsets(state) == first, 90, "the first half to be applied")
        assert _get(port, "/healthz") == (200, {"status": "ok"})
        assert _get(port, "/readyz")[0] == 200

        broker.down()  # returns once the broker process is gone (it closed its sockets before)
        went_down = time.monotonic()
        samples: list[tuple[float, int]] = []
        while time.monotonic() - went_down < OUTAGE_S:
            assert worker.poll() is None, worker.log_tail()
            samples.append((time.monotonic() - went_down, _get(port, "/healthz")[0]))
            time.sleep(1.0)
        assert worker.poll() is None, worker.log_tail()
        # unhealthy while the broker is away (the grace period itself: the fake-clock tests)
        late = [status for t, status in samples if t > GRACE_S + 3.0]
        assert late and set(late) == {503}, samples
        assert _get(port, "/readyz")[0] == 503
        text = log.read_text()
        assert "no Kafka broker connected" in text, text[-3000:]
        waits = text.count("no Kafka broker connected")
        assert 2 <= waits <= 4, waits  # logged with backoff (5 s, then 10 s, 20 s), not per poll
        # kafka-python logs its own caught socket errors with tracebacks: ours must have none
        assert re.search(r'File "[^"]*/worker/[\w/]+\.py"', text) is None, text[-3000:]
        assert re.search(r"ERROR\s+worker\.", text) is None, text[-3000:]

        broker.up()
        produce_json(broker.bootstrap, s.topic("items"), items[200:])
        produce_json(broker.bootstrap, s.topic("interactions"), inters[half:])
        end = end_offsets(broker.bootstrap, [s.topic("items"), s.topic("interactions")])
        wait_for(lambda: applied_offsets(state) == end, 180, "the rest after the restart")
        wait_for(lambda: _get(port, "/healthz")[0] == 200, 30, "/healthz to be ok again")
        assert "connection is back" in log.read_text()
        assert worker.stop(timeout_s=60) == 0, worker.log_tail()
    finally:
        if worker is not None:
            worker.kill()
        broker.down()

    store = RocksDBPartition.open(state, read_only=True)
    try:
        counters = domain_counters(store)
        stored_interactions = store.count("interactions")
    finally:
        store.close()
    produced_items: dict[str, set[str]] = {}
    produced_inters: dict[str, int] = {}
    for d, raw in items:
        produced_items.setdefault(d, set()).add(orjson.loads(raw)["item_id"])
    for d, _ in inters:
        produced_inters[d] = produced_inters.get(d, 0) + 1
    assert stored_interactions == len(inters)
    for d, n in produced_inters.items():  # each applied once: not lost, not doubled
        assert counters[d].interactions == n == counters[d].logged
        assert counters[d].items == len(produced_items[d])
