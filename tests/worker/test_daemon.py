"""The daemon's /readyz: ready only when partitions are assigned AND every domain with a
current version has its serving index loaded; 503 with what is missing otherwise.

No Kafka: :func:`worker.app.daemon.readiness` is checked over an in-memory store and a real
:class:`worker.serving.index.Serving`; the route is checked on a daemon built over an in-memory
store with its consumer loop replaced by a stand-in holding only what readiness reads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import orjson
import pytest
import torch
from kafka import TopicPartition

from quantize.table_model import ModelConfig, Snapshot, build_model, export_params
from store.memory import MemoryPartition
from store.records import DomainCounters
from worker.app import daemon as daemon_module
from worker.app.daemon import Daemon, readiness
from worker.core.settings import Settings
from worker.ingest.consumer import LoopStats
from worker.serving import index as serving_module
from worker.serving.http import Request
from worker.serving.index import Serving
from worker.state.exceptions import VersionError
from worker.state.layout import domain_counters_key
from worker.state.versions import PUBLISHED, VersionRecord, VersionTable, add_version


class _Loop:
    """Stands in for :class:`worker.ingest.consumer.ConsumerLoop` (which connects to Kafka)."""

    def __init__(self, settings: Settings, *_: Any, stop_event: threading.Event, **__: Any) -> None:
        self.settings = settings
        self.assigned: set[TopicPartition] = set()
        self.healthy = False
        self.stats = LoopStats()
        self.versions_lock = threading.RLock()
        self.stop_event = stop_event

    def owned_partitions(self) -> set[int]:
        return {tp.partition for tp in self.assigned}

    def owns(self, domain: str) -> bool:
        return bool(self.assigned)

    def announce(self, event: dict[str, Any]) -> None:
        raise AssertionError(f"nothing is announced in these tests: {event}")


SETTINGS = Settings(http_port=0, topic_prefix="t.", embedding_dim=8)
PARTITIONS = {TopicPartition("t.items", 0), TopicPartition("t.interactions", 0)}


@dataclass
class Parts:
    """What readiness reads, without Kafka: the store, the serving indexes, the loop state."""

    store: MemoryPartition = field(default_factory=MemoryPartition)
    polled: bool = False
    assigned: set[TopicPartition] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.serving = Serving(self.store, SETTINGS)

    def check(self) -> tuple[bool, dict[str, Any]]:
        return readiness(self.polled, self.assigned, self.serving, self.store)

    def assign(self) -> None:
        self.polled, self.assigned = True, set(PARTITIONS)


def _publish(store: MemoryPartition, domain: str, seed: int, n_items: int = 12) -> int:
    """A published version of ``domain`` (random code rows, a fresh model) and its counters."""
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.choice(8, size=2, replace=False) for _ in range(n_items)])
    rows[:, 1] += 8  # second-level rows
    torch.manual_seed(seed)
    config = ModelConfig(hidden=16, max_len=4, layers=1, dropout=0.0)
    model = build_model(config, rows, n_rows=16)
    table = VersionTable(
        Snapshot(config, export_params(model)), [f"{domain}{i}" for i in range(n_items)], rows
    )
    batch = store.batch()
    # the domain's events were consumed (what the worker holds for any domain it serves)
    batch.put("meta", domain_counters_key(domain), DomainCounters(items=n_items).encode())
    record = add_version(
        store,
        batch,
        domain,
        VersionRecord(0, None, 0.0, "cb", {}, {}, status=PUBLISHED),
        table,
        keep=5,
    )
    store.write(batch)
    return record.version


def test_not_ready_before_partitions_are_assigned() -> None:
    parts = Parts()
    ready, doc = parts.check()
    assert not ready and doc["ready"] is False and doc["partitions"] == []
    assert len(doc["missing"]) == 2
    assert "polled" in doc["missing"][0] and "partition" in doc["missing"][1]
    parts.polled = True
    ready, doc = parts.check()
    assert not ready and len(doc["missing"]) == 1 and "partition" in doc["missing"][0]


def test_ready_with_partitions_when_no_domain_has_a_version() -> None:
    parts = Parts()
    parts.assign()
    ready, doc = parts.check()
    assert ready and doc["ready"] is True and doc["missing"] == []
    assert doc["partitions"] == ["t.interactions-0", "t.items-0"] and doc["domains"] == {}


def test_not_ready_until_the_current_versions_index_is_loaded() -> None:
    parts = Parts()
    parts.assign()
    _publish(parts.store, "shop", seed=0)
    _publish(parts.store, "books", seed=1)
    ready, doc = parts.check()
    assert not ready
    assert doc["domains"] == {
        "books": {"current": 1, "served": None, "state": "building"},
        "shop": {"current": 1, "served": None, "state": "building"},
    }
    assert doc["missing"] == [
        "domain 'books': the index of version 1 is being built",
        "domain 'shop': the index of version 1 is being built",
    ]
    assert parts.serving.refresh() == ["books", "shop"]
    ready, doc = parts.check()
    assert ready and doc["missing"] == []
    assert doc["domains"]["shop"] == {"current": 1, "served": 1, "state": "serving"}


def test_a_new_version_being_built_keeps_the_worker_ready() -> None:
    parts = Parts()
    parts.assign()
    _publish(parts.store, "shop", seed=0)
    parts.serving.refresh()
    assert _publish(parts.store, "shop", seed=2) == 2
    ready, doc = parts.check()  # version 1 is still served while 2 is built
    assert ready and doc["domains"]["shop"] == {"current": 2, "served": 1, "state": "stale"}
    parts.serving.refresh()
    assert parts.check()[1]["domains"]["shop"] == {"current": 2, "served": 2, "state": "serving"}


def test_a_version_that_cannot_be_served_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    parts = Parts()
    parts.assign()
    _publish(parts.store, "shop", seed=0)

    def broken(*_: Any, **__: Any) -> Any:
        raise VersionError("the table of version 1 is unreadable")

    monkeypatch.setattr(serving_module, "build_index", broken)
    assert parts.serving.refresh() == []
    ready, doc = parts.check()
    assert not ready and doc["domains"]["shop"]["state"] == "failed"
    assert len(doc["missing"]) == 1 and "unreadable" in doc["missing"][0]


# -- the daemon's route -------------------------------------------------------------------------


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, MemoryPartition]]:
    monkeypatch.setattr(daemon_module, "ConsumerLoop", _Loop)
    local = MemoryPartition()
    d = Daemon(SETTINGS, store=local)
    yield d, local
    d.store.close()


def _readyz(d: Daemon) -> tuple[int, dict[str, Any]]:
    response = d.router.dispatch(Request("GET", "/readyz", {}, {}, b""))
    return response.status, orjson.loads(response.body)


def test_readyz_answers_503_with_what_is_missing_then_200(
    daemon: tuple[Daemon, MemoryPartition],
) -> None:
    d, local = daemon
    loop: Any = d.loop
    status, doc = _readyz(d)
    assert status == 503 and doc["ready"] is False and len(doc["missing"]) == 2
    assert doc["batches"] == 0 and doc["records"] == 0
    loop.healthy, loop.assigned = True, set(PARTITIONS)
    _publish(local, "shop", seed=0)  # into the daemon's local store, as a restore would
    status, doc = _readyz(d)
    assert status == 503 and doc["missing"] == [
        "domain 'shop': the index of version 1 is being built"
    ]
    d.serving.refresh()
    status, doc = _readyz(d)
    assert status == 200 and doc["ready"] is True and doc["domains"]["shop"]["served"] == 1
    loop.healthy = False  # what the loop sets after a store failure
    status, doc = _readyz(d)
    assert status == 503 and "store failure" in doc["missing"][0]


def test_http_handler_threads_search_with_one_openmp_thread(
    daemon: tuple[Daemon, MemoryPartition],
) -> None:
    """OpenMP settings are per thread: a handler thread starts at the default (one thread
    per core, simulated here as 4) whatever the main thread set; the API sets it to one."""
    d, _ = daemon
    seen: list[int] = []

    def handler_thread() -> None:
        faiss.omp_set_num_threads(4)  # the default a new thread gets on a 4-core machine
        response = d.router.dispatch(Request("GET", "/v1/domains", {}, {}, b""))
        assert response.status == 200
        seen.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=handler_thread)
    thread.start()
    thread.join()
    assert seen == [1]


# -- /metrics: what a scrape costs ---------------------------------------------------------------


def test_a_scrape_reads_only_the_domains_whose_versions_or_codes_moved(
    daemon: tuple[Daemon, MemoryPartition], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 40 domains, the first scrape reads each domain's versions once; later scrapes
    read only the domains a publish or rollback named since, and code gauges come from
    the counts the batches left (no assigner is read, no report computed)."""
    d, local = daemon
    domains = [f"d{i:02d}" for i in range(40)]
    for i, domain in enumerate(domains):
        _publish(local, domain, seed=i, n_items=4)
    reads: list[str] = []
    real = daemon_module.list_records

    def counted(store: Any, domain: str) -> Any:
        reads.append(domain)
        return real(store, domain)

    monkeypatch.setattr(daemon_module, "list_records", counted)

    def scrape() -> str:
        response = d.router.dispatch(Request("GET", "/metrics", {}, {}, b""))
        assert response.status == 200
        return response.body.decode()

    def formatted() -> int:  # exposition lines formatted so far, all families
        return sum(f.formatted for f in d.metrics.families)

    body = scrape()
    assert sorted(reads) == domains and 'adacode_current_version{domain="d07"} 1.0' in body
    assert 'adacode_version_created_timestamp_seconds{domain="d07"}' in body
    reads.clear()
    before = formatted()
    for _ in range(3):
        scrape()
    assert reads == [] and formatted() == before  # nothing moved: nothing read or formatted
    d._versions_moved("d07")  # what a publish announcement or a rollback does
    scrape()
    assert reads == ["d07"] and formatted() - before == 3  # version, created, rejected
    codes = d.processor.codes
    assert codes is not None and codes.take_stats() == {}  # no batch ran: nothing to set
