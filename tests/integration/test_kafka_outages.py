"""A broker outage at every Kafka call outside the main poll (worker.ingest.kafka_calls).

For each kind of call, a real worker (``adacode run``) is held just before its first call of
that kind (a wrapper around ``KafkaCalls.call``, installed by the runner below before the CLI
starts); the test stops the broker, lets the call go on against no broker, and then either

* waits :data:`OUTAGE_S` (the process must stay alive and answer 503 on /healthz), starts the
  broker again and checks that every event is applied exactly once, the dead letter is on its
  topic and the requested fine-tune is published and announced; or
* sends SIGTERM during the outage: the worker exits 0 within 10 s; a restarted worker then
  applies everything exactly once.

test_outage.py covers an outage between batches (the poll); these cover the inside of one.
Runs its own broker (ops/kafka.sh on free ports), since it stops it.
"""

from __future__ import annotations

import http.client
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest

from store.rocksdb import RocksDBPartition
from tests.integration.test_outage import _Broker
from tests.kafka_utils import consume_all, produce_json
from tests.worker_process import (
    DIM,
    REPO,
    STARTED,
    applied_offsets,
    end_offsets,
    settings_for,
    wait_for,
    worker_env,
)
from worker.commands.launch import WorkerProcess
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.ingest.events import control_payload, interaction_payload, item_payload
from worker.ingest.kafka_calls import KafkaCall
from worker.state.reads import domain_counters
from worker.state.versions import current_version

OUTAGE_S = 20.0
N_ITEMS = 120
N_USERS = 110
PER_USER = 8

#: runs ``adacode run`` with a hold before the first Kafka call of one kind: it writes
#: ``<dir>/held`` and waits for ``<dir>/go``
HOLD_RUN = """
import runpy, sys, time
from pathlib import Path
from worker.ingest import kafka_calls

kind, where = sys.argv[1], Path(sys.argv[2])
original = kafka_calls.KafkaCalls.call
held = []

def call(self, what, action, **kw):
    if what.name == kind and not held:
        held.append(what)
        (where / "held").touch()
        while not (where / "go").exists():
            time.sleep(0.05)
    return original(self, what, action, **kw)

kafka_calls.KafkaCalls.call = call
sys.argv = ["adacode", *sys.argv[3:]]
runpy.run_module("worker.commands.cli", run_name="__main__")
"""

#: the calls of the worker process, in the order a fresh worker makes them
PHASES = [
    KafkaCall.CONNECT,
    KafkaCall.CODEBOOK_READ,
    KafkaCall.VERSIONS_RESTORE,
    KafkaCall.CODEBOOK_OFFER,
    KafkaCall.DEAD_LETTERS,
    KafkaCall.VERSIONS_MIRROR,
    KafkaCall.SNAPSHOT_ANNOUNCE,
]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Broker]:
    b = _Broker(tmp_path_factory.mktemp("kafka"))
    b.up()
    try:
        yield b
    finally:
        b.down()


def _events() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """120 clustered items and 880 interactions of one domain (signal for a fine-tune)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, DIM))
    items = [
        (
            "shop",
            item_payload(
                f"i{i}", "shop", 1, embedding=centers[i // 20] + 0.1 * rng.normal(size=DIM)
            ),
        )
        for i in range(N_ITEMS)
    ]
    inters = []
    ts = 1000
    for u in range(N_USERS):
        cluster, pos = u % 6, int(rng.integers(0, 20))
        for _ in range(PER_USER):
            item = f"i{cluster * 20 + pos % 20}"
            inters.append(("shop", interaction_payload(f"u{u}", item, "shop", ts)))
            ts += 1
            pos += 1
    return items, inters


def _settings(bootstrap: str, prefix: str, state: Path) -> tuple[Settings, dict[str, object]]:
    over: dict[str, object] = {
        "codebook_min_items": 60,
        "finetune_min_interactions": 100,
        "finetune_after_interactions": 0,
        "finetune_interval_s": 0.0,
        "finetune_retry_s": 1.0,
        "finetune_epochs": 2,
        "finetune_hidden": 16,
        "gate_tolerance": 1.0,
        "poll_max_records": 400,
    }
    return settings_for(bootstrap, prefix, state, **over), over


def _produce(bootstrap: str, s: Settings) -> None:
    items, inters = _events()
    produce_json(bootstrap, s.topic("items"), items)
    produce_json(bootstrap, s.topic("interactions"), inters)
    produce_json(bootstrap, s.topic("interactions"), [("shop", b"{not json")])
    produce_json(bootstrap, s.topic("control"), [("shop", control_payload("finetune", "shop"))])


def _health(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status
        finally:
            conn.close()
    except OSError:
        return None  # not listening yet (the HTTP server starts with the daemon)


def _start(env: dict[str, str], log: Path, hold: KafkaCall | None, where: Path) -> WorkerProcess:
    launcher = (
        ("-m", "worker.commands.cli") if hold is None else ("-c", HOLD_RUN, hold.name, str(where))
    )
    worker = WorkerProcess.start(env, log, cwd=REPO, launcher=launcher)
    STARTED.append(worker.proc)
    return worker


def _check_applied_once(state: Path, versions: tuple[int | None, ...] = (1,)) -> None:
    """Every event applied once; the domain's current version one of ``versions`` (the
    requested fine-tune published once: version 1, never 2)."""
    store = RocksDBPartition.open(state, read_only=True)
    try:
        counters = domain_counters(store)
        assert counters["shop"].interactions == N_USERS * PER_USER == counters["shop"].logged
        assert counters["shop"].items == N_ITEMS
        assert store.count("interactions") == N_USERS * PER_USER
        assert current_version(store, "shop") in versions
    finally:
        store.close()


@dataclass
class _Run:
    """One scenario: fresh topics with the events produced, and a worker held before its
    first Kafka call of ``phase``."""

    settings: Settings
    state: Path
    end: dict[tuple[str, int], int]
    port: int
    env: dict[str, str]
    log: Path
    worker: WorkerProcess

    @classmethod
    def start(cls, broker: _Broker, tmp_path: Path, phase: KafkaCall) -> _Run:
        prefix = f"k{uuid.uuid4().hex[:8]}."
        state = tmp_path / "state"
        s, over = _settings(broker.bootstrap, prefix, state)
        create_topics(s, partitions=1)
        _produce(broker.bootstrap, s)
        topics = [s.topic("items"), s.topic("interactions"), s.topic("control")]
        end = end_offsets(broker.bootstrap, topics)
        port = _free_port()
        env = worker_env(broker.bootstrap, prefix, state, http_port=port, **over)
        log = tmp_path / "worker.log"
        return cls(s, state, end, port, env, log, _start(env, log, phase, tmp_path))


def _hold_then_stop_the_broker(broker: _Broker, worker: WorkerProcess, where: Path) -> None:
    wait_for(lambda: (where / "held").exists() or worker.poll() is not None, 180, "the hold")
    assert worker.poll() is None, worker.log_tail()
    broker.down()
    (where / "go").touch()


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES, ids=[p.name.lower() for p in PHASES])
def test_an_outage_inside_a_phase_is_waited_out_and_everything_applied_once(
    broker: _Broker, tmp_path: Path, phase: KafkaCall
) -> None:
    run = _Run.start(broker, tmp_path, phase)
    s, state, end, port, log, worker = (
        run.settings,
        run.state,
        run.end,
        run.port,
        run.log,
        run.worker,
    )
    try:
        _hold_then_stop_the_broker(broker, worker, tmp_path)
        went_down = time.monotonic()
        late: list[int | None] = []
        while time.monotonic() - went_down < OUTAGE_S:
            assert worker.poll() is None, worker.log_tail()
            status = _health(port)
            if time.monotonic() - went_down > 10.0:
                late.append(status)
            time.sleep(1.0)
        assert worker.poll() is None, worker.log_tail()
        assert late and all(status in (503, None) for status in late), late
        assert 503 in late, late
        broker.up()
        wait_for(lambda: applied_offsets(state) == end, 180, "every event after the outage")
        wait_for(lambda: _health(port) == 200, 60, "/healthz to be ok again")
        wait_for(lambda: _published(broker.bootstrap, s), 180, "the fine-tune's notice")
        assert worker.stop(timeout_s=60) == 0, worker.log_tail()
    finally:
        worker.kill()
    text = log.read_text()
    assert not _kafka_tracebacks(text), text[-3000:]
    assert f"did not take the {phase.value}" in text, text[-3000:]
    _check_applied_once(state)
    dead = consume_all(broker.bootstrap, s.topic("deadletter"))
    assert dead and all(orjson.loads(r.value)["topic"] == s.topic("interactions") for r in dead)


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES, ids=[p.name.lower() for p in PHASES])
def test_sigterm_during_an_outage_inside_a_phase_exits_cleanly_and_nothing_is_lost(
    broker: _Broker, tmp_path: Path, phase: KafkaCall
) -> None:
    run = _Run.start(broker, tmp_path, phase)
    state, end, port, env, log, worker = run.state, run.end, run.port, run.env, run.log, run.worker
    try:
        _hold_then_stop_the_broker(broker, worker, tmp_path)
        wait_for(lambda: "did not take the" in log.read_text(), 30, "the call to wait for Kafka")
        assert worker.poll() is None, worker.log_tail()
        signalled = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=30) == 0, worker.log_tail()
        assert time.monotonic() - signalled < 10.0, worker.log_tail()
    finally:
        worker.kill()
        broker.up()
    assert not _kafka_tracebacks(log.read_text()), log.read_text()[-3000:]
    worker = _start(env, log, None, tmp_path)
    try:
        worker.wait_http(port, "/healthz", timeout_s=60)  # its signal handlers are in place
        wait_for(lambda: applied_offsets(state) == end, 180, "every event after the restart")
        assert worker.stop(timeout_s=60) == 0, worker.log_tail()
    finally:
        worker.kill()
    # a fine-tune requested by a batch committed before the stop is not run again after it
    # (requests live in the scheduler until they are made durable), and a notice abandoned
    # by a stop is not sent again: only the events are checked here
    _check_applied_once(state, versions=(None, 1))


def _kafka_tracebacks(text: str) -> list[str]:
    """Tracebacks in a worker log that pass through the worker's code or name a Kafka error
    (kafka-python's own caught socket errors are logged without them; the HTTP server's
    traces of clients that left are another matter)."""
    blocks = text.split("Traceback (most recent call last):")[1:]
    return [
        b[:2000]
        for b in blocks
        if re.search(r'File "[^"]*/worker/(ingest|app|tuning|state|core)/[\w/]+\.py"', b[:4000])
        or "kafka.errors" in b[:4000]
    ]


def _published(bootstrap: str, s: Settings) -> bool:
    notices = [orjson.loads(r.value) for r in consume_all(bootstrap, s.topic("snapshots"))]
    return any(n.get("event") == "published" and n.get("version") == 1 for n in notices)


def _free_port() -> int:
    from tests.conftest import _free_ports

    (port,) = _free_ports(1)
    return port
