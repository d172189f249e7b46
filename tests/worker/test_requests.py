"""Fine-tune requests as state and what /readyz promises while domains wait for their first
version.

1. A ``finetune`` command is written as a pending request by the batch that consumes it, with
   the control offset; a replay writes the same bytes; ``adacode versions`` shows it.
2. /readyz answers 503 while an owned domain without a version waits for its first
   fine-tune (queued or running), and 200 once that fine-tune has an outcome."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from kafka import TopicPartition

from store.memory import MemoryPartition
from store.rocksdb import RocksDBPartition
from worker.app.daemon import readiness
from worker.commands.operations import format_versions, versions_report
from worker.core.settings import Settings
from worker.ingest.events import control_payload
from worker.ingest.processor import Processor, SourceRecord
from worker.serving.index import Serving
from worker.state.requests import (
    Standing,
    domain_standing,
    pending_request,
    pending_requests,
    put_request,
)
from worker.tuning.finetune import FinetuneStatus, Outcome
from worker.tuning.scheduler import FinetuneScheduler

SETTINGS = Settings(embedding_dim=8, topic_prefix="t.", finetune_interval_s=0)
CONTROL = SETTINGS.topic("control")


@dataclass(frozen=True)
class TimedRecord:
    """A control record as kafka-python gives it: with its timestamp (ms)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


def _consume(store: MemoryPartition, records: list[TimedRecord]) -> None:
    result = Processor(store, SETTINGS, None).process(records)
    assert not result.dead
    store.write(result.batch)


def test_a_finetune_command_is_a_pending_request_committed_with_its_offset() -> None:
    store = MemoryPartition()
    record = TimedRecord(CONTROL, 0, 7, b"shop", control_payload("finetune", "shop"), 1_700_000)
    _consume(store, [record])
    request = pending_request(store, "shop")
    assert request is not None
    assert request.requested_at == 1_700.0 and request.source == "t.control-0@7"
    assert store.offsets()[(CONTROL, 0)] == 8  # the same write
    replay = MemoryPartition()
    _consume(replay, [record])
    assert list(replay.items("versions")) == list(store.items("versions"))  # same bytes
    later = TimedRecord(CONTROL, 0, 8, b"shop", control_payload("finetune", "shop"), 1_800_000)
    _consume(store, [later])  # one request per domain: the latest
    assert [(r.domain, r.source) for r in pending_requests(store)] == [("shop", "t.control-0@8")]


def test_a_record_without_a_timestamp_gives_a_request_without_a_time() -> None:
    store = MemoryPartition()
    result = Processor(store, SETTINGS, None).process(
        [SourceRecord(CONTROL, 0, 0, b"shop", control_payload("finetune", "shop"))]
    )
    store.write(result.batch)
    request = pending_request(store, "shop")
    assert request is not None and request.requested_at is None


def test_a_domain_without_versions_stands_with_all_its_interactions() -> None:
    store = MemoryPartition()
    assert domain_standing(store, "shop") == Standing(None, 0)


def test_adacode_versions_shows_a_pending_request(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path / "state"))
    store = RocksDBPartition.open(settings.state_path)
    batch = store.batch()
    put_request(batch, "shop", 1_700_000_000.0, "t.control-0@7")
    store.write(batch)
    store.close()
    doc = versions_report(settings, "shop")
    assert doc["pending_finetune"] == {"requested_at": 1_700_000_000.0, "source": "t.control-0@7"}
    assert "pending fine-tune: requested " in format_versions(doc)
    assert "t.control-0@7" in format_versions(doc)
    assert versions_report(settings, "news")["pending_finetune"] is None


# -- readiness ------------------------------------------------------------------------------


class HeldTuner:
    """Publishes nothing and waits for :attr:`gate` (the test looks at /readyz meanwhile)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.gate = threading.Event()

    def run(self, domain: str) -> Outcome:
        self.gate.wait(30)
        return Outcome(domain, FinetuneStatus.SKIPPED_NOT_READY, "too few interactions")

    def warm_up(self) -> None:
        """Nothing to set up."""


def test_readyz_waits_for_the_first_fine_tune_of_every_domain_without_a_version() -> None:
    store = MemoryPartition()
    serving = Serving(store, SETTINGS)
    assigned = {TopicPartition("t.items", 0)}
    tuner = HeldTuner()
    scheduler = FinetuneScheduler(
        tuner, Settings(finetune_interval_s=0, finetune_workers=1, finetune_retry_s=3600)
    )
    scheduler.start()
    try:
        ready, doc = readiness(True, assigned, serving, store, scheduler.status())
        assert ready and doc["finetune"]["awaiting_first_version"] == 0
        for domain in ("a", "b", "c"):
            scheduler.run_soon(domain, "requested")
        ready, doc = readiness(True, assigned, serving, store, scheduler.status())
        assert not ready
        (line,) = doc["missing"]
        assert line.startswith("3 domain(s) wait for their first fine-tune ('a', 'b', 'c')")
        assert doc["finetune"]["awaiting_first_version"] == 3
        assert doc["finetune"]["queued"] + doc["finetune"]["running"] == 3
        tuner.gate.set()  # every first fine-tune gets an outcome (skipped: too little data)
        assert scheduler.wait_idle(10)
        ready, doc = readiness(True, assigned, serving, store, scheduler.status())
        assert ready and doc["finetune"]["awaiting_first_version"] == 0
        scheduler.run_soon("a", "again")  # tried already: a later run does not hold readiness
        assert readiness(True, assigned, serving, store, scheduler.status())[0]
    finally:
        tuner.gate.set()
        scheduler.shutdown()
