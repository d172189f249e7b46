"""The fine-tune queue: the outcome's retry rule, the order (most overdue first, domains
without a version before all), the bounded pool (``finetune_workers`` at once, one run per
domain at a time), durable requests (cleared only by a final outcome), the assignment rule,
the schedule (APScheduler jobs that queue a domain: an interval after its last run, a retry
once), the stop, and the queue's metrics.

The scheduler is real (its APScheduler, dispatcher thread and pool); the tuner is a stand-in passed to its
constructor that answers a fixed :class:`~worker.tuning.finetune.Outcome`, optionally held
until the test releases it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from store.memory import MemoryPartition
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.core.threads import lower_priority, thread_nice
from worker.ingest.exceptions import BatchAbandoned, KafkaRefusedError
from worker.ingest.processor import BatchResult
from worker.state.requests import Standing, pending_request, put_request
from worker.tuning.finetune import FinetuneStatus, Outcome
from worker.tuning.scheduler import WARM_UP_GRACE_S, FinetuneQueue, FinetuneScheduler

RETRIED = {FinetuneStatus.SKIPPED_NOT_READY}
NOW = 1_700_000_000.0


@pytest.mark.parametrize("status", list(FinetuneStatus))
def test_only_a_run_skipped_for_data_not_ready_is_retried(status: FinetuneStatus) -> None:
    assert status.retry is (status in RETRIED)


def test_the_cli_words_stay_published_rejected_skipped() -> None:
    assert [s.word for s in FinetuneStatus] == [
        "published",
        "rejected",
        "skipped",
        "skipped",
        "abandoned",
    ]


class FixedTuner:
    """Answers ``status`` for every domain; records the runs; with ``hold``, each run waits
    for :meth:`release` (the test sees what is running meanwhile)."""

    def __init__(
        self, status: FinetuneStatus = FinetuneStatus.PUBLISHED, hold: bool = False
    ) -> None:
        self.status = status
        self.stop = threading.Event()
        self.calls: list[str] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.lock = threading.Lock()
        self.active: Counter[str] = Counter()
        self.most_at_once = 0
        self.overlapped: list[str] = []  # a domain run twice at once
        self.seconds = 0.0
        self.warmed_before: list[str] | None = None  # the runs made before the warm-up

    def run(self, domain: str) -> Outcome:
        with self.lock:
            self.calls.append(domain)
            if self.active[domain]:
                self.overlapped.append(domain)
            self.active[domain] += 1
            self.most_at_once = max(self.most_at_once, sum(self.active.values()))
        try:
            self.gate.wait(30)
            time.sleep(self.seconds)
            return Outcome(domain, self.status, f"fixed {self.status.value}")
        finally:
            with self.lock:
                self.active[domain] -= 1

    def warm_up(self) -> None:
        self.warmed_before = list(self.calls)

    def release(self) -> None:
        self.gate.set()

    def running(self) -> int:
        with self.lock:
            return sum(self.active.values())


def _wait(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def made() -> Iterator[list[FinetuneScheduler]]:
    schedulers: list[FinetuneScheduler] = []
    yield schedulers
    for s in schedulers:
        s.tuner.stop.set()
        s.tuner.release()  # type: ignore[attr-defined]
        s.shutdown()


def _scheduler(
    made: list[FinetuneScheduler],
    tuner: FixedTuner,
    *,
    workers: int = 1,
    retry_s: float = 3600.0,
    interval_s: float = 0.0,
    **kwargs: Any,
) -> FinetuneScheduler:
    settings = Settings(
        finetune_interval_s=interval_s, finetune_retry_s=retry_s, finetune_workers=workers
    )
    s = FinetuneScheduler(tuner, settings, **kwargs)
    made.append(s)
    return s


# -- retry rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(FinetuneStatus))
def test_the_scheduler_runs_again_exactly_the_runs_whose_status_says_retry(
    status: FinetuneStatus, made: list[FinetuneScheduler]
) -> None:
    tuner = FixedTuner(status)
    s = _scheduler(made, tuner, retry_s=0.1)
    s.start()
    s.run_soon("shop", "test")
    _wait(lambda: s.runs >= 1)
    time.sleep(0.5)  # several retry periods
    if status.retry:
        assert len(tuner.calls) >= 3 and set(tuner.calls) == {"shop"}
    else:
        assert tuner.calls == ["shop"] and s.status()["queued"] == 0
    assert tuner.warmed_before == []  # warmed up once, before the first run


def test_a_retry_waits_finetune_retry_s(made: list[FinetuneScheduler]) -> None:
    tuner = FixedTuner(FinetuneStatus.SKIPPED_NOT_READY)
    s = _scheduler(made, tuner, retry_s=3600)
    s.start()
    s.run_soon("shop", "test")
    _wait(lambda: s.runs == 1)
    time.sleep(0.3)
    assert tuner.calls == ["shop"]  # not now: after an hour
    job = s.apscheduler.get_job("retry:shop")  # APScheduler fires it, into the queue
    assert job is not None
    in_s = (job.next_run_time - datetime.now(UTC)).total_seconds()
    assert 3590 < in_s <= 3600


# -- the schedule (APScheduler) ---------------------------------------------------------------


def _seen(domain: str, kind: str = "item") -> BatchResult:
    """A batch that applied one ``kind`` event of ``domain``."""
    return BatchResult(MemoryPartition().batch(), applied=Counter({(kind, domain): 1}))


def test_a_seen_domain_is_queued_every_interval_by_apscheduler(
    made: list[FinetuneScheduler],
) -> None:
    tuner = FixedTuner()
    s = _scheduler(made, tuner, interval_s=0.6)
    s.start()
    s.on_applied(_seen("shop"))
    s.on_applied(_seen("shop"))  # seen already: its interval job is kept, not restarted
    assert s.apscheduler.get_job("interval:shop") is not None
    time.sleep(0.2)
    assert tuner.calls == []  # the first an interval from when it was seen
    _wait(lambda: s.runs >= 3)
    assert set(tuner.calls) == {"shop"} and not tuner.overlapped


def test_the_next_scheduled_run_comes_an_interval_after_the_last_run(
    made: list[FinetuneScheduler],
) -> None:
    tuner = FixedTuner()
    s = _scheduler(made, tuner, interval_s=3600)
    s.start()
    s.on_applied(_seen("shop"))
    time.sleep(0.5)
    s.run_soon("shop", "test")  # a run for another reason restarts the interval
    _wait(lambda: s.runs == 1)
    ran_at = datetime.now(UTC)
    job = s.apscheduler.get_job("interval:shop")
    assert job is not None
    assert abs((job.next_run_time - ran_at).total_seconds() - 3600) < 0.3


def test_the_stop_ends_the_schedule_within_seconds(made: list[FinetuneScheduler]) -> None:
    tuner = FixedTuner(FinetuneStatus.SKIPPED_NOT_READY)
    s = _scheduler(made, tuner, interval_s=0.2, retry_s=0.2)
    s.start()
    s.on_applied(_seen("shop"))
    s.run_soon("news", "test")
    _wait(lambda: s.runs >= 2)  # interval and retry jobs armed and firing
    started = time.monotonic()
    s.shutdown()
    assert time.monotonic() - started < 3
    assert not s.apscheduler.running
    runs = len(tuner.calls)
    time.sleep(0.6)  # several intervals and retry periods
    assert len(tuner.calls) == runs  # nothing fires, nothing runs


class SlowWarmUp(FixedTuner):
    """A warm-up that takes ``after_stop_s`` to notice the stop (a step inside torch)."""

    def __init__(self, after_stop_s: float) -> None:
        super().__init__()
        self.after_stop_s = after_stop_s
        self.warming = threading.Event()
        self.finished = threading.Event()

    def warm_up(self) -> None:
        self.warming.set()
        self.stop.wait(60)
        time.sleep(self.after_stop_s)
        self.finished.set()


def test_a_shutdown_waits_for_a_warm_up_that_stops_within_its_grace(
    made: list[FinetuneScheduler],
) -> None:
    tuner = SlowWarmUp(after_stop_s=0.5)
    s = _scheduler(made, tuner)
    s.start()
    assert tuner.warming.wait(10)
    s.shutdown()
    assert tuner.finished.is_set()  # torch is done before the interpreter may finalise
    assert not s.torch_busy


def test_a_shutdown_does_not_wait_past_the_grace_and_says_torch_is_busy(
    made: list[FinetuneScheduler],
) -> None:
    tuner = SlowWarmUp(after_stop_s=WARM_UP_GRACE_S + 2)
    s = _scheduler(made, tuner)
    s.start()
    assert tuner.warming.wait(10)
    started = time.monotonic()
    s.shutdown()
    assert time.monotonic() - started < WARM_UP_GRACE_S + 1
    assert s.torch_busy and not tuner.finished.is_set()  # adacode run then exits hard
    assert tuner.finished.wait(10)
    assert not s.torch_busy


class FailingTuner(FixedTuner):
    """Its run raises ``exc`` (a Kafka fault the run could not wait out)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    def run(self, domain: str) -> Outcome:
        self.calls.append(domain)
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "level", "words"),
    [
        (BatchAbandoned("stopping while Kafka at h:1 does not take the x"), "WARNING", "stopping"),
        (
            KafkaRefusedError("mirror", "Kafka refused the mirror for good"),
            "ERROR",
            "not published",
        ),
    ],
)
def test_a_kafka_fault_of_a_run_is_logged_without_a_traceback_and_the_scheduler_goes_on(
    exc: BaseException,
    level: str,
    words: str,
    caplog: pytest.LogCaptureFixture,
    made: list[FinetuneScheduler],
) -> None:
    tuner = FailingTuner(exc)
    s = _scheduler(made, tuner, retry_s=0.05)
    s.start()
    s.run_soon("shop", "test")
    _wait(lambda: s.runs == 1)
    s.run_soon("shop", "again")
    _wait(lambda: s.runs == 2)  # the scheduler still runs jobs
    records = [r for r in caplog.records if r.name == "worker.tuning.scheduler"]
    assert any(r.levelname == level and words in r.getMessage() for r in records), records
    assert not any(r.exc_info for r in records)
    assert tuner.calls == ["shop", "shop"]


# -- order ------------------------------------------------------------------------------------


def test_the_queue_orders_domains_without_a_version_first_then_the_most_overdue() -> None:
    q = FinetuneQueue(interval_s=600, after_interactions=50_000)
    q.push("fresh", "t", Standing(NOW - 10, 0), NOW)
    q.push("old", "t", Standing(NOW - 5000, 0), NOW)
    # 100,000 new interactions weigh two intervals (1,200 s): overdue by 1,210 s
    q.push("busy", "t", Standing(NOW - 10, 100_000), NOW)
    q.push("new", "t", Standing(None, 10), NOW)
    q.push("newer", "t", Standing(None, 10), NOW + 1)
    assert not q.push("fresh", "again", Standing(NOW - 10, 0), NOW + 2)  # absorbed
    assert len(q) == 5 and q.oldest_queued_at() == NOW
    order = [e.domain for e in iter(q.pop, None)]
    assert order == ["new", "newer", "old", "busy", "fresh"]
    assert len(q) == 0 and q.oldest_queued_at() is None


def test_new_interactions_move_a_waiting_domain_up_and_running_ones_are_skipped() -> None:
    q = FinetuneQueue(interval_s=600, after_interactions=1000)
    q.push("a", "t", Standing(NOW - 100, 0), NOW)
    q.push("b", "t", Standing(NOW - 50, 0), NOW)
    q.add_interactions("b", 500)  # half an interval: 300 s
    entry = q.pop(skip={"b"})
    assert entry is not None and entry.domain == "a"  # b runs already
    q.push("a", "t", Standing(NOW - 100, 0), NOW)
    assert [e.domain for e in iter(q.pop, None)] == ["b", "a"]


def test_the_scheduler_runs_the_queue_in_its_order(made: list[FinetuneScheduler]) -> None:
    standings = {
        "blocker": Standing(NOW, 0),
        "fresh": Standing(NOW - 10, 0),
        "old": Standing(NOW - 5000, 0),
        "busy": Standing(NOW - 10, 100_000),
        "new": Standing(None, 5),
    }
    tuner = FixedTuner(hold=True)
    s = _scheduler(made, tuner, standing=standings.__getitem__)
    s.start()
    s.run_soon("blocker", "test")
    _wait(lambda: tuner.running() == 1)
    for domain in ("fresh", "old", "busy", "new", "fresh", "old"):
        s.run_soon(domain, "test")
    assert s.status()["queued"] == 4  # each domain once
    tuner.release()
    assert s.wait_idle(10)
    assert tuner.calls == ["blocker", "new", "old", "busy", "fresh"]


# -- the pool ---------------------------------------------------------------------------------


def test_the_pool_runs_finetune_workers_at_once_and_a_domain_once_at_a_time(
    made: list[FinetuneScheduler],
) -> None:
    tuner = FixedTuner()
    tuner.seconds = 0.15
    s = _scheduler(made, tuner, workers=3)
    s.start()
    for k in range(7):
        s.run_soon(f"d{k}", "test")
    _wait(lambda: tuner.running() == 3)
    s.run_soon("d0", "again while it runs")  # queued behind its own run, not beside it
    assert s.wait_idle(20)
    assert tuner.most_at_once == 3
    assert not tuner.overlapped
    assert sorted(tuner.calls) == sorted([f"d{k}" for k in range(7)] + ["d0"])


def test_the_default_pool_leaves_a_core_for_the_consumer() -> None:
    import os

    assert Settings().finetune_workers == max(1, (os.cpu_count() or 2) - 1)


# -- durable requests -------------------------------------------------------------------------


def _request(store: MemoryPartition, domain: str, offset: int) -> None:
    batch = store.batch()
    put_request(batch, domain, NOW, f"t.control-0@{offset}")
    store.write(batch)


@pytest.mark.parametrize("status", list(FinetuneStatus))
def test_a_request_is_cleared_only_by_a_final_outcome(
    status: FinetuneStatus, made: list[FinetuneScheduler]
) -> None:
    store = MemoryPartition()
    _request(store, "shop", 1)
    tuner = FixedTuner(status)
    s = _scheduler(made, tuner, store=store)
    s.start()  # outside a group: what is pending is queued at start
    _wait(lambda: s.runs == 1)
    final = status not in (FinetuneStatus.ABANDONED, FinetuneStatus.SKIPPED_NOT_READY)
    assert (pending_request(store, "shop") is None) is final
    assert tuner.calls == ["shop"]


def test_a_request_made_while_its_domain_runs_stays_pending_and_runs_after(
    made: list[FinetuneScheduler],
) -> None:
    store = MemoryPartition()
    _request(store, "shop", 1)
    tuner = FixedTuner(hold=True)
    s = _scheduler(made, tuner, store=store)
    s.start()
    _wait(lambda: tuner.running() == 1)
    _request(store, "shop", 2)  # what the consumer writes, then hands on
    s.on_applied(BatchResult(store.batch(), finetune_requests=["shop"]))
    tuner.release()
    _wait(lambda: s.runs == 2)
    assert s.wait_idle(10)
    assert tuner.calls == ["shop", "shop"] and pending_request(store, "shop") is None


def test_requests_wait_for_an_assignment_and_only_owned_domains_run(
    made: list[FinetuneScheduler],
) -> None:
    store = MemoryPartition()
    for k, domain in enumerate(("mine", "theirs")):
        _request(store, domain, k)
    assigned: list[set[int]] = [set()]
    tuner = FixedTuner()
    s = _scheduler(
        made,
        tuner,
        store=store,
        owns=lambda d: d == "mine",
        assignment=lambda: assigned[0],
    )
    s.start()
    time.sleep(0.3)
    assert tuner.calls == []  # nothing assigned yet: ownership unknown
    assigned[0] = {0}  # what the consumer does on assignment: a new collection
    _wait(lambda: s.runs == 1)
    assert s.wait_idle(10)
    assert tuner.calls == ["mine"]
    assert pending_request(store, "mine") is None
    assert pending_request(store, "theirs") is not None  # its owner runs it


# -- metrics and readiness --------------------------------------------------------------------


def _gauge(metrics: Metrics, name: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_queue_metrics_and_the_domains_awaiting_a_first_version(
    made: list[FinetuneScheduler],
) -> None:
    metrics = Metrics()
    standings = {"blocker": Standing(None, 0), "a": Standing(None, 0), "b": Standing(NOW, 0)}
    tuner = FixedTuner(hold=True)
    s = _scheduler(made, tuner, standing=standings.__getitem__, metrics=metrics)
    s.start()
    s.run_soon("blocker", "test")
    _wait(lambda: tuner.running() == 1)
    s.run_soon("a", "test", queued_at=time.time() - 100)
    s.run_soon("b", "test")
    assert _gauge(metrics, "adacode_finetune_queue_length") == 2
    assert _gauge(metrics, "adacode_finetune_running") == 1
    assert 100 <= _gauge(metrics, "adacode_finetune_oldest_wait_seconds") < 120
    assert _gauge(metrics, "adacode_finetune_awaiting_first_version") == 2
    status = s.status()
    assert status["awaiting_first_version"] == ["a", "blocker"] and status["queued"] == 2
    tuner.release()
    assert s.wait_idle(10)
    assert _gauge(metrics, "adacode_finetune_queue_length") == 0
    assert _gauge(metrics, "adacode_finetune_oldest_wait_seconds") == 0
    assert s.status()["awaiting_first_version"] == []


# -- background priority ------------------------------------------------------------------------


class NiceTuner(FixedTuner):
    """Records the nice value of the threads its warm-up and runs are called in."""

    def __init__(self) -> None:
        super().__init__()
        self.nice: dict[str, int] = {}

    def run(self, domain: str) -> Outcome:
        self.nice[domain] = thread_nice()
        return super().run(domain)

    def warm_up(self) -> None:
        self.nice["warm-up"] = thread_nice()
        super().warm_up()


@pytest.mark.parametrize("increment", [0, 7])
def test_fine_tunes_and_their_warm_up_run_at_the_background_priority(
    increment: int, made: list[FinetuneScheduler]
) -> None:
    """The consumer and the API keep their priority; the fine-tune threads yield by
    ``background_nice`` (0: nothing changes)."""
    base = thread_nice()
    tuner = NiceTuner()
    s = FinetuneScheduler(tuner, Settings(background_nice=increment, finetune_workers=2))
    made.append(s)
    s.start()
    s.run_soon("shop", "test")
    s.run_soon("home", "test")
    _wait(lambda: s.runs >= 2)
    want = min(19, base + increment)
    assert tuner.nice == {"warm-up": want, "shop": want, "home": want}
    assert thread_nice() == base  # the caller's thread (here: the consumer's) is untouched


def test_lower_priority_is_per_thread_and_inherited_by_the_threads_it_starts() -> None:
    base = thread_nice()
    seen: dict[str, int | bool] = {}

    def child() -> None:
        seen["child"] = thread_nice()

    def background() -> None:
        seen["changed"] = lower_priority(3)
        seen["background"] = thread_nice()
        started = threading.Thread(target=child)
        started.start()
        started.join()
        seen["unchanged"] = lower_priority(0)

    worker = threading.Thread(target=background)
    worker.start()
    worker.join()
    want = min(19, base + 3)
    assert seen == {
        "changed": want != base,
        "background": want,
        "child": want,
        "unchanged": False,
    }
    assert thread_nice() == base
