"""The fine-tune outcome's retry rule, and the scheduler acting on it: a run skipped because
the data is not ready yet is queued again after ``finetune_retry_s``; one skipped for want of
new data, published, rejected or abandoned is not.

The scheduler is real (APScheduler, one executor thread); the tuner is a stand-in passed to
its constructor that answers a fixed :class:`~worker.tuning.finetune.Outcome`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent

from worker.core.settings import Settings
from worker.ingest.exceptions import BatchAbandoned, KafkaRefusedError
from worker.tuning.finetune import FinetuneStatus, Outcome
from worker.tuning.scheduler import FinetuneScheduler

RETRIED = {FinetuneStatus.SKIPPED_NOT_READY}


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
    """Answers ``status`` for every domain; counts the runs."""

    def __init__(self, status: FinetuneStatus) -> None:
        self.status = status
        self.stop = threading.Event()
        self.calls: list[str] = []

    def run(self, domain: str) -> Outcome:
        self.calls.append(domain)
        return Outcome(domain, self.status, f"fixed {self.status.value}")


class Jobs:
    """A started scheduler over a :class:`FixedTuner`; :meth:`wait_runs` waits until the
    scheduler has finished handling ``n`` runs (the job returned, retries queued)."""

    def __init__(
        self, status: FinetuneStatus, retry_s: float, tuner: FixedTuner | None = None
    ) -> None:
        self.tuner = tuner or FixedTuner(status)
        settings = Settings(finetune_interval_s=0, finetune_retry_s=retry_s)
        self.scheduler = FinetuneScheduler(self.tuner, settings)
        self.done = 0
        self.errors: list[BaseException] = []
        self._cond = threading.Condition()
        self.scheduler.scheduler.add_listener(self._on_done, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)

    def _on_done(self, event: JobExecutionEvent) -> None:
        with self._cond:
            self.done += 1
            if event.exception is not None:
                self.errors.append(event.exception)
            self._cond.notify_all()

    def wait_runs(self, n: int, timeout_s: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.done >= n, timeout_s), self.done
        assert not self.errors, self.errors

    def queued(self) -> list[str]:
        return [job.id for job in self.scheduler.scheduler.get_jobs()]


@pytest.fixture
def jobs() -> Iterator[list[Jobs]]:
    made: list[Jobs] = []
    yield made
    for j in made:
        j.scheduler.shutdown()


@pytest.mark.parametrize("status", list(FinetuneStatus))
def test_the_scheduler_requeues_exactly_the_runs_whose_status_says_retry(
    status: FinetuneStatus, jobs: list[Jobs]
) -> None:
    j = Jobs(status, retry_s=3600)
    jobs.append(j)
    j.scheduler.start()
    j.scheduler.run_soon("shop", "test")
    j.wait_runs(1)
    assert j.tuner.calls == ["shop"]
    if status.retry:
        assert j.queued() == ["now:shop"]
        job = j.scheduler.scheduler.get_job("now:shop")
        wait = job.next_run_time.timestamp() - time.time()
        assert 3500 < wait <= 3600  # after finetune_retry_s, not now
    else:
        assert j.queued() == []


def test_a_not_ready_skip_runs_again_and_a_no_new_data_skip_does_not(jobs: list[Jobs]) -> None:
    not_ready = Jobs(FinetuneStatus.SKIPPED_NOT_READY, retry_s=0.05)
    no_new = Jobs(FinetuneStatus.SKIPPED_NO_NEW_DATA, retry_s=0.05)
    jobs.extend([not_ready, no_new])
    for j in (not_ready, no_new):
        j.scheduler.start()
        j.scheduler.run_soon("shop", "test")
    not_ready.wait_runs(3)  # the first run and two retries
    assert len(not_ready.tuner.calls) >= 3 and set(not_ready.tuner.calls) == {"shop"}
    no_new.wait_runs(1)
    time.sleep(0.2)  # several retry periods: no second run comes
    assert no_new.tuner.calls == ["shop"] and no_new.queued() == []


class FailingTuner(FixedTuner):
    """Its run raises ``exc`` (a Kafka fault the run could not wait out)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(FinetuneStatus.PUBLISHED)
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
    exc: BaseException, level: str, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = Jobs(FinetuneStatus.PUBLISHED, retry_s=0.05, tuner=FailingTuner(exc))
    jobs.scheduler.start()
    try:
        jobs.scheduler.run_soon("shop", "test")
        jobs.wait_runs(1)
        jobs.scheduler.run_soon("shop", "again")
        jobs.wait_runs(2)  # the scheduler still runs jobs
    finally:
        jobs.scheduler.shutdown()
    records = [r for r in caplog.records if r.name == "worker.tuning.scheduler"]
    assert any(r.levelname == level and words in r.getMessage() for r in records), records
    assert not any(r.exc_info for r in records)
    assert jobs.tuner.calls == ["shop", "shop"]
