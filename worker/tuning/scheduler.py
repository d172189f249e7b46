"""The fine-tune queue: a bounded pool of fine-tunes, most overdue first, off the consumer thread.

APScheduler fires the schedule; the queue runs it. Each scheduled trigger is an APScheduler job
(a :class:`~apscheduler.schedulers.background.BackgroundScheduler`, one thread) whose only
action is to put the domain into the queue (:meth:`FinetuneScheduler.run_soon`); the queue's
own pool of ``finetune_workers`` threads runs the fine-tunes, most overdue first.

What queues a domain (a domain waits at most once: a later trigger is absorbed by the entry
already waiting; and it runs at most once at a time):

* a ``finetune`` command on the control topic. It is durable (:mod:`worker.state.requests`):
  the batch that consumes the command writes a pending request; the scheduler queues every
  pending request of the domains it owns on start and on every new assignment (in a group,
  the domain's new owner restored the request with the versions), and clears a request once
  the outcome of a run that started after it is final (published, rejected, skipped for want
  of new data, or failed), never when the run was abandoned by a stop or the domain moved;
* ``finetune_after_interactions`` new interactions;
* every ``finetune_interval_s``: an APScheduler interval job per domain (id
  ``interval:<domain>``), added when the domain is first seen and replaced after each of its
  runs, so the next one comes an interval after the last run;
* a retry ``finetune_retry_s`` after a run skipped because the data is not ready yet: an
  APScheduler date job (id ``retry:<domain>``; a later retry replaces it).

The APScheduler jobs coalesce (missed firings run once) and run however late; a firing for a
domain that waits already is absorbed by the queue. Stop: :meth:`FinetuneScheduler.shutdown`
shuts APScheduler down without waiting and stops the pool (a running fine-tune is abandoned
at its next epoch), within seconds.

Order (:class:`FinetuneQueue`): a domain without any version before every domain with one;
then the most overdue first, overdue being ``staleness / finetune_interval_s + new
interactions / finetune_after_interactions`` (staleness: time since the domain's newest
version, or since it was queued when it has none; new interactions: since that version).
Both terms grow together, so the order of two waiting domains changes only when new
interactions arrive: the queue is a heap.

Pool: ``finetune_workers`` fine-tunes at once (default: the cores less one, kept for the
consumer). Metrics (set when the queue changes, so a scrape does no per-domain work): the
queue's length, the fine-tunes running, the age of the oldest waiting entry, and the domains
waiting for their first version (what /readyz waits for, see :meth:`FinetuneScheduler.status`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.executors.pool import ThreadPoolExecutor as JobExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from store.partition import StorePartition
from worker.core.memory import release_free_memory
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.core.threads import lower_priority
from worker.ingest.exceptions import BatchAbandoned, KafkaRefusedError, NotOwnedError
from worker.ingest.processor import BatchResult
from worker.state.layout import CODEBOOK_CURRENT, MIGRATE_STATE
from worker.state.reads import codebook_lineage
from worker.state.requests import (
    FinetuneRequest,
    Standing,
    clear_request,
    domain_standing,
    pending_request,
    pending_requests,
)
from worker.state.versions import current_version, domains_with_versions, get_record
from worker.tuning.finetune import FinetuneStatus, Outcome

#: why a domain whose version is of another codebook than the current one is queued
MIGRATION = "a version of the codebook before the current one"


def behind_codebook(store: StorePartition) -> list[str]:
    """The domains whose current version was trained on a codebook older than the current
    one (earlier in the state's lineage): a migration's (or a retrain's) new codes have no
    version of theirs yet. None while a migration's catch-up still codes the items
    (``migrate/state``). A version of a codebook *newer* than this worker's (restored from
    the group's changelog before this worker followed the group) is not behind: training
    it again on the older codes would take the domain back."""
    current = store.get("meta", CODEBOOK_CURRENT)
    if current is None or store.get("meta", MIGRATE_STATE) is not None:
        return []
    older = set(codebook_lineage(store)) - {current.decode()}
    behind = []
    for domain in domains_with_versions(store):
        version = current_version(store, domain)
        record = None if version is None else get_record(store, domain, version)
        if record is not None and record.codebook_id in older:
            behind.append(domain)
    return behind


log = logging.getLogger(__name__)

#: the dispatcher checks the assignment at least this often
TICK_S = 1.0
#: how long a shutdown waits for the warm-up to notice the stop (it checks between steps)
WARM_UP_GRACE_S = 3.0
#: the overdue rule's units when the setting is 0 (that trigger off): its defaults
DEFAULT_INTERVAL_S = 600.0
DEFAULT_AFTER_INTERACTIONS = 50_000
#: why a pending request is queued again (on start, on assignment)
PENDING = "requested on the control topic (pending)"
REQUESTED = "requested on the control topic"
#: why the APScheduler jobs queue a domain
SCHEDULED = "scheduled"
RETRY = "retry after a skipped run"


class Tuner(Protocol):
    """What the scheduler needs of a :class:`~worker.tuning.finetune.FineTuner`."""

    stop: threading.Event

    def run(self, domain: str) -> Outcome: ...

    def warm_up(self) -> None: ...


@dataclass
class Waiting:
    """A queued domain: why, since when (``queued_at``, wall time), and its standing."""

    domain: str
    why: str
    queued_at: float
    standing: Standing
    new_interactions: int
    seq: int

    def key(self, interval_s: float, after: int) -> tuple[int, float]:
        """Smaller runs first: ``(0 without a version else 1, when the domain became due
        less what its new interactions weigh)``; see the module docstring."""
        since = self.standing.last_version_at
        tier = 0 if since is None else 1
        start = self.queued_at if since is None else since
        return tier, start - interval_s * self.new_interactions / after


class FinetuneQueue:
    """Domains due for a fine-tune, most overdue first; one entry per domain.

    Not thread-safe: :class:`FinetuneScheduler` holds its lock around every call. Heaps with
    lazy deletion: an entry's heap items are valid while its ``seq`` is current.
    """

    def __init__(self, interval_s: float, after_interactions: int) -> None:
        self.interval_s = interval_s or DEFAULT_INTERVAL_S
        self.after = after_interactions or DEFAULT_AFTER_INTERACTIONS
        self.waiting: dict[str, Waiting] = {}
        self._order: list[tuple[tuple[int, float], int, str]] = []
        self._age: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.waiting)

    def __contains__(self, domain: object) -> bool:
        return domain in self.waiting

    def push(self, domain: str, why: str, standing: Standing, queued_at: float) -> bool:
        """Queue ``domain``; ``False`` when it already waits (its entry keeps its place and
        takes the earlier ``queued_at``)."""
        old = self.waiting.get(domain)
        if old is not None:
            if queued_at < old.queued_at:
                old.queued_at = queued_at
                self._index(old)
            return False
        entry = Waiting(domain, why, queued_at, standing, standing.new_interactions, 0)
        self.waiting[domain] = entry
        self._index(entry)
        return True

    def add_interactions(self, domain: str, n: int) -> None:
        """``n`` new interactions of ``domain``: a waiting entry moves up."""
        entry = self.waiting.get(domain)
        if entry is not None:
            entry.new_interactions += n
            self._index(entry)

    def pop(self, skip: Collection[str] = ()) -> Waiting | None:
        """The most overdue entry whose domain is not in ``skip`` (running), removed."""
        held: list[tuple[tuple[int, float], int, str]] = []
        found = None
        while self._order:
            item = heapq.heappop(self._order)
            entry = self.waiting.get(item[2])
            if entry is None or entry.seq != item[1]:
                continue  # stale
            if entry.domain in skip:
                held.append(item)
                continue
            found = self.waiting.pop(entry.domain)
            break
        for item in held:
            heapq.heappush(self._order, item)
        return found

    def remove(self, domain: str) -> Waiting | None:
        return self.waiting.pop(domain, None)

    def oldest_queued_at(self) -> float | None:
        """When the longest-waiting entry was queued (``None``: empty)."""
        while self._age:
            at, seq, domain = self._age[0]
            entry = self.waiting.get(domain)
            if entry is not None and entry.seq == seq:
                return at
            heapq.heappop(self._age)
        return None

    def _index(self, entry: Waiting) -> None:
        entry.seq = next(self._seq)
        key = entry.key(self.interval_s, self.after)
        heapq.heappush(self._order, (key, entry.seq, entry.domain))
        heapq.heappush(self._age, (entry.queued_at, entry.seq, entry.domain))


class FinetuneScheduler:
    """The queue, its dispatcher thread, its pool of ``finetune_workers`` threads, and the
    APScheduler that fires the scheduled triggers into it."""

    def __init__(
        self,
        tuner: Tuner,
        settings: Settings,
        owns: Callable[[str], bool] | None = None,
        *,
        assignment: Callable[[], Collection[Any]] | None = None,
        store: StorePartition | None = None,
        lock: threading.RLock | None = None,
        standing: Callable[[str], Standing] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``owns``: whether this worker owns a domain now (None: every domain);
        ``assignment``: the consumer's assigned partitions, the live collection (None:
        always assigned); nothing is started while it is empty, and a new one (another
        object) re-queues the pending requests. ``store``: where requests are pending (None: requests are not
        durable); ``lock``: the consumer's versions lock, held to clear a request;
        ``standing``: a domain's :class:`Standing` (default: read from ``store``);
        ``metrics``: where the queue is reported."""
        self.tuner = tuner
        self.settings = settings
        self.owns = owns
        self.assignment = assignment
        self.store = store
        self.lock = lock or threading.RLock()
        self.metrics = metrics
        self.clock = clock
        if standing is None:
            standing = (
                (lambda d: Standing(None, 0))
                if store is None
                else (lambda d: domain_standing(store, d))
            )
        self.standing = standing
        self.workers = settings.finetune_workers
        self.queue = FinetuneQueue(
            settings.finetune_interval_s, settings.finetune_after_interactions
        )
        self.running: set[str] = set()
        self.new_interactions: Counter[str] = Counter()
        self.domains: set[str] = set()
        #: domains without a version whose first fine-tune (in this process) waits or runs
        self.first_versions: set[str] = set()
        self.tried: set[str] = set()
        self.runs = 0  # finished runs, for tests and logs
        #: fires the interval and retry triggers; its jobs only queue (one thread is plenty)
        self.apscheduler = BackgroundScheduler(
            executors={"default": JobExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        self._seen: Collection[Any] | None = None
        self._oldest: float | None = None
        self._stopping = False
        self._cond = threading.Condition()
        # background work: each pool thread lowers its own priority when it starts
        self._pool = ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix="finetune",
            initializer=lower_priority,
            initargs=(settings.background_nice,),
        )
        self._thread = threading.Thread(target=self._dispatch, name="finetune-queue", daemon=True)
        # torch's one-time set-up, off to the side: the dispatcher starts nothing before it is
        # done; a shutdown waits for it a bounded time (WARM_UP_GRACE_S: it checks the stop
        # between steps, but its first step may sit in torch's set-up for seconds)
        self._warm_up = threading.Thread(
            target=self._warm_up_in_background, name="finetune-warm-up", daemon=True
        )
        if metrics is not None:
            metrics.watch_finetune_queue(lambda: self._oldest)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start dispatching and firing the schedule; outside a group, queue what is pending
        now."""
        if self.assignment is None:
            self.requeue_pending()
        self.apscheduler.start()
        self._warm_up.start()
        self._thread.start()

    def _warm_up_in_background(self) -> None:
        """The tuner's warm-up, at the background priority of the fine-tunes."""
        lower_priority(self.settings.background_nice)
        self.tuner.warm_up()

    def shutdown(self) -> None:
        """Stop firing and dispatching; a running fine-tune is abandoned at its next epoch (its
        request stays pending) and waited for."""
        self.tuner.stop.set()
        if self.apscheduler.running:
            self.apscheduler.shutdown(wait=False)  # its jobs only queue: nothing to wait for
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._warm_up.is_alive():
            self._warm_up.join(timeout=WARM_UP_GRACE_S)

    @property
    def torch_busy(self) -> bool:
        """Whether a thread of this scheduler is still inside torch after :meth:`shutdown`
        (only the warm-up can be, past its grace): the process must then end without the
        interpreter's finalisation, which torch aborts on (``terminate called without an
        active exception``)."""
        return self._warm_up.is_alive()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing waits or runs (scheduled jobs aside); whether it got there."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.queue and not self.running, timeout_s)

    # -- triggers -----------------------------------------------------------------------

    def on_applied(self, result: BatchResult) -> None:
        """Called by the consumer loop after each committed batch (keep it short)."""
        due: list[str] = []
        seen: list[str] = []
        after = self.settings.finetune_after_interactions
        with self._cond:
            for (kind, domain), n in result.applied.items():
                if domain not in self.domains:
                    self.domains.add(domain)
                    seen.append(domain)
                if kind != "interaction":
                    continue
                self.new_interactions[domain] += n
                self.queue.add_interactions(domain, n)
                if after and self.new_interactions[domain] >= after and domain not in self.queue:
                    due.append(domain)
        for domain in seen:  # outside our lock: APScheduler takes its own
            self._schedule_interval(domain, replace=False)
        for domain in due:
            self.run_soon(domain, "after new interactions")
        for domain in result.finetune_requests:
            self.run_soon(domain, REQUESTED)
        if result.coding.migrated:
            self.queue_behind_codebook()

    def run_soon(
        self, domain: str, why: str, delay_s: float = 0.0, *, queued_at: float | None = None
    ) -> None:
        """Queue a fine-tune of ``domain`` (after ``delay_s``: an APScheduler date job that
        queues it then, replacing one not fired yet); a waiting one absorbs it."""
        if delay_s > 0:
            self._schedule_retry(domain, why, delay_s)
            return
        standing = self.standing(domain)  # store reads, outside the lock
        with self._cond:
            self._push(domain, why, standing, self.clock() if queued_at is None else queued_at)
            self._cond.notify_all()

    def requeue_pending(self) -> int:
        """Queue every pending request of a domain this worker owns, and every domain it owns
        that is behind the codebook (:func:`behind_codebook`); how many requests."""
        if self.store is None:
            return 0
        owned = [r for r in pending_requests(self.store) if self._owned(r.domain)]
        for request in owned:
            at = request.requested_at
            self.run_soon(request.domain, PENDING, queued_at=at)
        if owned:
            log.info("queued %d pending fine-tune request(s)", len(owned))
        self.queue_behind_codebook()
        return len(owned)

    def queue_behind_codebook(self) -> list[str]:
        """Queue the domains this worker owns whose current version was trained on another
        codebook than the current one (after a migration's catch-up, a restart or a new
        assignment); returns them."""
        if self.store is None:
            return []
        behind = [d for d in behind_codebook(self.store) if self._owned(d)]
        for domain in behind:
            self.run_soon(domain, MIGRATION)
        if behind:
            log.info("queued %d domain(s) behind the codebook: %s", len(behind), behind[:10])
        return behind

    # -- what /readyz and the metrics read ----------------------------------------------

    def status(self) -> dict[str, Any]:
        """``{"workers", "queued", "running", "oldest_wait_s", "awaiting_first_version":
        [domains]}`` now."""
        with self._cond:
            oldest = self._oldest
            return {
                "workers": self.workers,
                "queued": len(self.queue),
                "running": sorted(self.running),
                "oldest_wait_s": 0.0 if oldest is None else max(0.0, self.clock() - oldest),
                "awaiting_first_version": sorted(self.first_versions),
            }

    # -- the dispatcher -----------------------------------------------------------------

    def _dispatch(self) -> None:
        """Wait for the tuner's warm-up (nothing runs beside it; a stop ends the wait), then
        until stopped: follow the assignment, start what fits."""
        while self._warm_up.is_alive():
            self._warm_up.join(timeout=0.1)
            with self._cond:
                if self._stopping:
                    return
        while True:
            changed = self._assignment_changed()
            if changed:
                self.requeue_pending()
            with self._cond:
                if self._stopping:
                    return
                self._start_due()
                self._report()
                self._cond.wait(timeout=TICK_S)

    def _assignment_changed(self) -> bool:
        """Whether a new, non-empty assignment came since the last look (the loop replaces
        its collection on every assignment and revocation: a new object is a new one)."""
        if self.assignment is None:
            return False
        current = self.assignment()
        if current is self._seen:
            return False
        self._seen = current
        return bool(current)

    def _start_due(self) -> None:
        """Start the most overdue domains not running, while the pool has room (nothing
        while no partition is assigned: ownership is not known)."""
        if self.assignment is not None and not self.assignment():
            return  # between a revocation and an assignment: hold the queue
        while len(self.running) < self.workers and not self.tuner.stop.is_set():
            entry = self.queue.pop(skip=self.running)
            if entry is None:
                return
            if not self._owned(entry.domain):
                log.info("fine-tune of %s dropped: owned by another worker", entry.domain)
                self.first_versions.discard(entry.domain)
                continue
            self.running.add(entry.domain)
            self._pool.submit(self._job, entry)

    def _push(self, domain: str, why: str, standing: Standing, at: float) -> None:
        """Under the lock: queue ``domain``; one without a version not tried yet in this
        process waits for its first version (what /readyz waits for)."""
        first = standing.last_version_at is None and domain not in self.tried
        if self.queue.push(domain, why, standing, at) and first:
            self.first_versions.add(domain)
        self._report()

    def _report(self) -> None:
        self._oldest = self.queue.oldest_queued_at()
        if self.metrics is not None:
            self.metrics.observe_finetune_queue(
                len(self.queue), len(self.running), len(self.first_versions)
            )

    def _owned(self, domain: str) -> bool:
        return self.owns is None or self.owns(domain)

    # -- the schedule: APScheduler jobs that queue a domain -----------------------------

    def _schedule_interval(self, domain: str, *, replace: bool = True) -> None:
        """Queue ``domain`` every ``finetune_interval_s``, the first an interval from now
        (``replace``: restart an existing job's interval; else keep it)."""
        interval_s = self.settings.finetune_interval_s
        job_id = f"interval:{domain}"
        if interval_s <= 0 or self._stopping:
            return
        if not replace and self.apscheduler.get_job(job_id) is not None:
            return
        trigger = IntervalTrigger(seconds=interval_s, timezone=UTC)
        self._add_job(job_id, trigger, domain, SCHEDULED)

    def _schedule_retry(self, domain: str, why: str, delay_s: float) -> None:
        """Queue ``domain`` once, ``delay_s`` from now."""
        if self._stopping:
            return
        at = datetime.now(UTC) + timedelta(seconds=delay_s)
        self._add_job(f"retry:{domain}", DateTrigger(run_date=at), domain, why)

    def _add_job(self, job_id: str, trigger: Any, domain: str, why: str) -> None:
        self.apscheduler.add_job(
            self.run_soon, trigger, args=[domain, why], id=job_id, replace_existing=True
        )

    # -- one job ------------------------------------------------------------------------

    def _job(self, entry: Waiting) -> None:
        try:
            tried = self._run(entry.domain, entry.why)
        finally:
            # the run's tensors, freed in this thread, back to the OS
            release_free_memory("finetune")
        with self._cond:
            self.running.discard(entry.domain)
            self.runs += 1
            if tried:
                self.tried.add(entry.domain)
                self.first_versions.discard(entry.domain)
            self._report()
            self._cond.notify_all()
        if tried:  # the next scheduled run: an interval after this one
            self._schedule_interval(entry.domain)

    def _run(self, domain: str, why: str) -> bool:
        """Run one fine-tune and settle its request; whether it was tried (an outcome other
        than a stop or a move of the domain)."""
        request = None if self.store is None else pending_request(self.store, domain)
        with self._cond:
            self.new_interactions[domain] = 0
        log.info("fine-tune of %s starts (%s)", domain, why)
        try:
            outcome = self.tuner.run(domain)
        except NotOwnedError as exc:  # the domain moved to another worker during the run
            log.info("fine-tune of %s dropped: %s", domain, exc)
            return False
        except BatchAbandoned as exc:  # stopping while Kafka was away (publish or notice)
            log.warning("fine-tune of %s: %s", domain, exc)
            return False
        except KafkaRefusedError as exc:  # e.g. a version larger than the versions topic takes
            log.error("fine-tune of %s not published: %s", domain, exc)
            self._settle(domain, request)
            return True
        except Exception:  # a failed fine-tune must not stop the scheduler or the worker
            log.exception("fine-tune of %s failed; nothing was published", domain)
            self._settle(domain, request)
            return True
        if outcome.status is FinetuneStatus.ABANDONED:
            log.warning("%s", outcome.reason)
            return False
        if outcome.status.skipped:
            log.info("fine-tune of %s skipped: %s", domain, outcome.reason)
        if outcome.status.retry:  # not enough coded data yet (e.g. no codebook): try again
            self.run_soon(domain, RETRY, delay_s=self.settings.finetune_retry_s)
        else:
            self._settle(domain, request)
        return True

    def _settle(self, domain: str, request: FinetuneRequest | None) -> None:
        """The outcome is final: clear the request pending when the run started (a newer
        one stays, and is queued already)."""
        if request is None or self.store is None:
            return
        try:
            clear_request(self.store, domain, request, self.lock)
        except (NotOwnedError, BatchAbandoned) as exc:  # the next owner runs it again
            log.info("request of %s not cleared: %s", domain, exc)
        except KafkaRefusedError as exc:
            log.error("request of %s not cleared: %s", domain, exc)
