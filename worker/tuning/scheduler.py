"""The fine-tune scheduler: APScheduler inside the daemon, off the consumer thread.

Each domain gets an interval job (``finetune_interval_s``) and a run-now trigger
after ``finetune_after_interactions`` new interactions (or a ``finetune`` control
message). One executor thread runs the jobs, so at most one fine-tune runs at a
time (per domain and overall, which keeps a core for ingestion); a job already
waiting for a domain absorbs later triggers (missed runs coalesce).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from worker.core.memory import release_free_memory
from worker.core.settings import Settings
from worker.ingest.exceptions import BatchAbandoned, KafkaRefusedError, NotOwnedError
from worker.ingest.processor import BatchResult
from worker.tuning.finetune import FinetuneStatus, Outcome

log = logging.getLogger(__name__)


class Tuner(Protocol):
    """What the scheduler needs of a :class:`~worker.tuning.finetune.FineTuner`."""

    stop: threading.Event

    def run(self, domain: str) -> Outcome: ...


class FinetuneScheduler:
    def __init__(
        self,
        tuner: Tuner,
        settings: Settings,
        owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.tuner = tuner
        self.settings = settings
        #: whether this worker owns a domain now (in a group, domains move between workers)
        self.owns = owns
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        self.new_interactions: Counter[str] = Counter()
        self.domains: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        """Stop scheduling; a running fine-tune is abandoned at its next epoch."""
        self.tuner.stop.set()
        self.scheduler.shutdown(wait=True)

    def on_applied(self, result: BatchResult) -> None:
        """Called by the consumer loop after each committed batch (keep it short)."""
        for (kind, domain), n in result.applied.items():
            if domain not in self.domains:
                self._add_domain(domain)
            if kind == "interaction":
                with self._lock:
                    self.new_interactions[domain] += n
                    due = (
                        self.settings.finetune_after_interactions
                        and self.new_interactions[domain]
                        >= self.settings.finetune_after_interactions
                    )
                if due:
                    self.run_soon(domain, "after new interactions")
        for domain in result.finetune_requests:
            self.run_soon(domain, "requested on the control topic")

    def _add_domain(self, domain: str) -> None:
        self.domains.add(domain)
        if self.settings.finetune_interval_s > 0:
            self.scheduler.add_job(
                self._job,
                "interval",
                seconds=self.settings.finetune_interval_s,
                args=[domain, "scheduled"],
                id=f"interval:{domain}",
                replace_existing=True,
            )

    def run_soon(self, domain: str, why: str, delay_s: float = 0.01) -> None:
        """Queue a fine-tune of ``domain``; a queued one for it absorbs this trigger."""
        self.scheduler.add_job(
            self._job,
            "date",
            run_date=datetime.now().astimezone() + timedelta(seconds=delay_s),
            args=[domain, why],
            id=f"now:{domain}",
            replace_existing=True,
        )

    def _job(self, domain: str, why: str) -> None:
        try:
            self._run(domain, why)
        finally:
            release_free_memory()  # the run's tensors, freed in this thread, back to the OS

    def _run(self, domain: str, why: str) -> None:
        with self._lock:
            self.new_interactions[domain] = 0
        if self.owns is not None and not self.owns(domain):
            log.info("fine-tune of %s skipped: its partition is owned by another worker", domain)
            return
        log.info("fine-tune of %s starts (%s)", domain, why)
        try:
            outcome = self.tuner.run(domain)
        except NotOwnedError as exc:  # the domain moved to another worker during the run
            log.info("fine-tune of %s dropped: %s", domain, exc)
            return
        except BatchAbandoned as exc:  # stopping while Kafka was away (publish or notice)
            log.warning("fine-tune of %s: %s", domain, exc)
            return
        except KafkaRefusedError as exc:  # e.g. a version larger than the versions topic takes
            log.error("fine-tune of %s not published: %s", domain, exc)
            return
        except Exception:  # a failed fine-tune must not stop the scheduler or the worker
            log.exception("fine-tune of %s failed; nothing was published", domain)
            return
        if outcome.status is FinetuneStatus.ABANDONED:
            log.warning("%s", outcome.reason)
        elif outcome.status.skipped:
            log.info("fine-tune of %s skipped: %s", domain, outcome.reason)
        if outcome.status.retry:  # not enough coded data yet (e.g. no codebook): try again
            self.run_soon(
                domain, "retry after a skipped run", delay_s=self.settings.finetune_retry_s
            )
