"""The worker daemon: wires the store, the consumer loop and the HTTP server.

``adacode run`` calls :func:`run_daemon`. SIGTERM and SIGINT stop it gracefully:
the batch in progress is finished and committed, then everything is closed. A
store failure (e.g. a full disk) stops consuming without committing and exits
non-zero; a restart resumes from the last committed batch.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Collection
from typing import Any

import faiss
from kafka import TopicPartition

from store.exceptions import StoreError
from store.partition import StorePartition
from store.rocksdb import RocksDBPartition
from worker.core.memory import (
    cap_mmap_threshold,
    freeze_long_lived,
    space_young_collections,
    thaw,
)
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.core.signals import install_stop_handlers
from worker.core.threads import Foreground
from worker.ingest.bootstrap import Bootstrap
from worker.ingest.consumer import ConsumerLoop
from worker.ingest.encoder import TextEncoder
from worker.ingest.events import control_payload
from worker.ingest.exceptions import EncoderError
from worker.ingest.group import CodebookLog, MirroredStore, VersionsLog, adopt_group_codebook
from worker.ingest.kafka_calls import KafkaCall, KafkaCalls
from worker.ingest.processor import BatchResult, Processor
from worker.serving.exceptions import NotServedError, ServingError
from worker.serving.http import HandlerPool, HttpServer, Request, Response, Router
from worker.serving.index import Serving, live_paths
from worker.serving.routes import ApiRoutes
from worker.state.versions import REJECTED, current_version, domains_with_versions, list_records
from worker.tuning.finetune import FineTuner, Outcome
from worker.tuning.scheduler import FinetuneScheduler

log = logging.getLogger(__name__)

#: the interpreter's thread switch interval in the daemon process: an HTTP request waiting
#: for the GIL asks the holder (e.g. the consumer thread processing a batch in Python) to
#: drop it after this long; at the default 5 ms such waits added up in the serving p99
#: while the worker ingested (bench/serve.py --busy-thread measures it)
SWITCH_INTERVAL_S = 0.001
#: how long the API's control command (a rollback) waits out a broker outage before 503
CONTROL_WAIT_S = 10.0


def readiness(
    healthy: bool,
    assigned: Collection[TopicPartition],
    serving: Serving,
    store: StorePartition,
    finetunes: dict[str, Any] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Whether the worker can serve, and a JSON document saying what is missing if not.

    Ready when (1) the consumer loop is ``healthy`` (it has polled, its broker is connected
    and its store writes succeed), (2) it has partitions assigned, and (3) every domain
    with a current version has a serving index loaded. A domain whose index is at an older
    version while the current one is being built still serves (the previous version), so
    a publish or a rollback does not take the worker out of rotation; a domain with no
    index at all (at start-up, or whose current version cannot be built) does.

    ``domains`` maps each such domain to ``{"current", "served", "state"}``, ``state``
    being ``serving`` (index of the current version), ``stale`` (an older version is served
    while the current one is built or could not be), ``building`` or ``failed`` (nothing
    served); ``missing`` lists, in words, each reason the worker is not ready.

    ``finetunes``: the fine-tune queue's :meth:`~worker.tuning.scheduler.FinetuneScheduler.status`.
    With it, (4) no owned domain may be waiting for its first version: a domain without any
    version whose fine-tune is queued or running and was not tried yet in this process (a
    request on the control topic, restored pending ones included, or a trigger). Once its
    first fine-tune has an outcome (published, or skipped for too little data, or failed) it
    no longer holds readiness. The document then carries ``finetune`` (queue counts).
    """
    missing: list[str] = []
    if not healthy:
        missing.append(
            "the consumer loop is not healthy: it has not polled Kafka yet, has had no broker "
            "connection for a while, or stopped after a store failure (see /healthz and the "
            "worker log)"
        )
    if not assigned:
        missing.append(
            "no partition of the event topics is assigned to this worker yet (the consumer "
            "group is joining, or every partition is held by other workers)"
        )
    held = serving.domains()
    domains: dict[str, dict[str, Any]] = {}
    for domain in domains_with_versions(store):
        version = current_version(store, domain)
        if version is None:
            continue
        index = held.get(domain)
        served = None if index is None else index.version
        if served == version:
            state = "serving"
        elif served is not None:
            state = "stale"
        else:
            try:
                served = serving.index(domain).version  # a swap since domains() was read
                state = "serving" if served == version else "stale"
            except NotServedError as exc:  # the build failed: its reason
                state = "failed"
                missing.append(f"domain {domain!r}: {exc}")
            except ServingError:  # not built yet (the index thread builds every version)
                state = "building"
                missing.append(f"domain {domain!r}: the index of version {version} is being built")
        domains[domain] = {"current": version, "served": served, "state": state}
    if finetunes is not None and finetunes["awaiting_first_version"]:
        first = finetunes["awaiting_first_version"]
        named = ", ".join(repr(d) for d in first[:5]) + (", ..." if len(first) > 5 else "")
        missing.append(
            f"{len(first)} domain(s) wait for their first fine-tune ({named}): queued or "
            f"running, {len(finetunes['running'])} running now"
        )
    ready = not missing
    doc: dict[str, Any] = {
        "ready": ready,
        "missing": missing,
        "partitions": sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
        "domains": domains,
    }
    if finetunes is not None:
        doc["finetune"] = {
            "workers": finetunes["workers"],
            "queued": finetunes["queued"],
            "running": len(finetunes["running"]),
            "oldest_wait_s": round(finetunes["oldest_wait_s"], 1),
            "awaiting_first_version": len(finetunes["awaiting_first_version"]),
        }
    return ready, doc


class Daemon:
    """One worker process: state, consumer loop, HTTP endpoints.

    Built in dependency order, every collaborator handed to its constructor:

    1. the metrics, the Kafka policy of every call outside the poll (on the stop event:
       see :mod:`worker.ingest.kafka_calls`) and the store (a local RocksDB, mirrored to
       the versions topic);
    2. the group's codebook log, the text encoder and the processor (which codes items
       with the group's codebook);
    3. serving (reading the processor's live code paths);
    4. the consumer loop, with the daemon's stop event and its callbacks;
    5. the fine-tuner (the loop's versions lock, the same stop event) and its scheduler;
    6. the HTTP routes.

    The callbacks handed to earlier parts are bound methods of the daemon that use later
    ones (the store's ownership asks the loop, the loop's ``on_applied`` feeds the
    scheduler): none is called before the constructor has built every part.
    """

    def __init__(
        self,
        settings: Settings,
        store: StorePartition | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """``stop``: the event that stops the daemon (e.g. set by a signal handler); by
        default its own, set by :meth:`stop`."""
        self.settings = settings
        # one stop event for the loop and the fine-tunes: a SIGTERM abandons a running
        # fine-tune at its next epoch while the loop still finishes its batch and closes
        self.stop_event = stop if stop is not None else threading.Event()
        # batched code search is fastest single-threaded on small batches, and leaves
        # the other core to kafka-python's I/O thread. OpenMP settings are per thread: this
        # covers the consumer loop (run on this thread); the HTTP handler threads set their
        # own (worker.serving.routes)
        faiss.omp_set_num_threads(1)
        # -- 1. metrics and store ---------------------------------------------------------
        self.metrics = Metrics()
        #: scrapes read versions only of the domains whose versions moved (see _metrics)
        self._gauges_lock = threading.Lock()
        self._versions_changed: set[str] = set()
        self._versions_read = False
        local = store or RocksDBPartition.open(
            settings.state_path, sync_writes=settings.sync_writes
        )
        # table versions travel between the workers of a group on the versions topic;
        # writes to them are refused for domains this worker does not own now
        self.kafka = KafkaCalls(self.stop_event, settings.kafka_bootstrap)
        versions_log = VersionsLog(settings, calls=self.kafka)
        self.store = MirroredStore(local, versions_log, owned=self._owned_partitions)
        self.metrics.watch_state_memory(self.store.memory_usage)
        # -- 2. codebook, encoder, processor ----------------------------------------------
        self.codebooks = CodebookLog(settings, calls=self.kafka)
        #: code rounds and scrapes mark themselves here; the codebook's scans step aside
        self.foreground = Foreground()
        self.encoder = TextEncoder(settings.text_batch_size, settings.torch_threads)
        self.processor = Processor(
            self.store,
            settings,
            self.encoder.encode,
            group=self.codebooks,
            trainer=self._bootstrap,
            foreground=self.foreground,
        )
        # -- 3. serving (full paths of new items, without a re-read) ---------------------
        codes = self.processor.codes
        self.serving = Serving(
            self.store,
            settings,
            paths=None if codes is None else live_paths(codes, self.processor.kept),
        )
        # -- 4. the consumer loop ---------------------------------------------------------
        self.loop = ConsumerLoop(
            settings,
            self.store,
            self.processor,
            self.metrics,
            stop_event=self.stop_event,
            on_applied=self._on_applied,
            on_restored=self._on_restored,
            before_subscribe=self._join_group_codebook,
            shared_topics=[versions_log.topic, self.codebooks.topic],
            kafka_calls=self.kafka,
        )
        # -- 5. fine-tunes ---------------------------------------------------------------
        self.tuner = FineTuner(
            self.store,
            settings,
            lock=self.loop.versions_lock,
            announce=self._announce,
            stop=self.stop_event,
            on_outcome=self._observe_outcome,
        )
        # the queue: requests pending in the store, re-queued on each assignment
        self.scheduler = FinetuneScheduler(
            self.tuner,
            settings,
            owns=self.loop.owns,
            assignment=self._assignment,
            store=self.store,
            lock=self.loop.versions_lock,
            metrics=self.metrics,
        )
        # -- 6. HTTP ---------------------------------------------------------------------
        self.router = Router()
        # the probe and the scrape answer from memory: on the server's event loop, so the
        # consumer's Python does not stretch them by two more waits for the interpreter
        self.router.add("GET", "/healthz", self._healthz, inline=True)
        self.router.add("GET", "/readyz", self._readyz)
        self.router.add("GET", "/metrics", self._metrics, inline=True)
        ApiRoutes(self.serving, self.store, settings, self._send_control).register(self.router)
        self.http: HttpServer | None = None
        if settings.http_port:
            self.http = HttpServer(
                self.router,
                settings.http_host,
                settings.http_port,
                max_body_bytes=settings.http_max_body_bytes,
                pool=HandlerPool(settings.http_threads),
            )

    # -- callbacks of the parts (called once the daemon runs) -----------------------------

    def _owned_partitions(self) -> set[int]:
        """The store's ownership check: the partitions the loop holds now."""
        return self.loop.owned_partitions()

    def _assignment(self) -> Collection[TopicPartition]:
        """The loop's assignment, the live collection (a new one at each rebalance)."""
        return self.loop.assigned

    def _bootstrap(self) -> Bootstrap:
        """What trains the first codebook, in the background (see worker.ingest.coding)."""
        return Bootstrap(
            self.store,
            self.settings,
            self.stop_event,
            group=self.codebooks,
            foreground=self.foreground,
        )

    def _on_applied(self, result: BatchResult) -> None:
        self.serving.on_applied(result)  # new items servable at once; rollbacks wake it
        self.scheduler.on_applied(result)
        for switch in result.switches:
            self._versions_moved(str(switch["domain"]))

    def _on_restored(self, domains: list[str]) -> None:
        self.serving.wake(domains)  # restored versions: build and swap their indexes now
        for domain in domains:
            self._versions_moved(domain)

    def _versions_moved(self, domain: str) -> None:
        """The next scrape reads ``domain``'s versions again (published, rolled back), and
        the next batch checks which older codebooks' codes a version still needs."""
        with self._gauges_lock:
            self._versions_changed.add(domain)
        if self.processor.kept is not None:
            self.processor.kept.versions_moved()

    def _join_group_codebook(self) -> None:
        """Agree on the group's codebook before the first batch (see worker.ingest.group)."""
        codes = self.processor.codes
        if codes is not None:
            adopt_group_codebook(self.store, codes, self.codebooks)

    def _announce(self, event: dict[str, Any]) -> None:
        if isinstance(event.get("domain"), str):
            self._versions_moved(event["domain"])
        self.loop.announce(event)
        # a publish: build and swap the new version's index now (only that domain is read)
        self.serving.wake([str(event["domain"])])

    def _send_control(self, op: str, domain: str, fields: dict[str, Any]) -> None:
        """What ``adacode rollback`` sends while the worker runs, on the loop's producer
        (an HTTP request: waits out an outage for at most ``CONTROL_WAIT_S``)."""

        def send() -> None:
            self.loop.producer.send(
                self.settings.topic("control"),
                key=domain.encode(),
                value=control_payload(op, domain, **fields),
            ).get(timeout=CONTROL_WAIT_S)

        self.kafka.call(KafkaCall.CONTROL_SEND, send, max_wait_s=CONTROL_WAIT_S)

    def _healthz(self, _: Request) -> Response:
        # before the first batch the loop has not polled yet: ok unless a Kafka call waits
        ok = self.loop.healthy or (not self.loop.stats.batches and not self.kafka.waiting)
        return Response.json(200 if ok else 503, {"status": "ok" if ok else "unhealthy"})

    def _readyz(self, _: Request) -> Response:
        ready, doc = readiness(
            self.loop.healthy,
            self.loop.assigned,
            self.serving,
            self.store,
            self.scheduler.status(),
        )
        doc["batches"] = self.loop.stats.batches
        doc["records"] = self.loop.stats.records
        return Response.json(200 if ready else 503, doc)

    def _metrics(self, _: Request) -> Response:
        with self.foreground.busy():  # background scans wait (see Foreground)
            return self._scrape()

    def _scrape(self) -> Response:
        self.metrics.up.set(1 if self.loop.healthy else 0)
        codes = self.processor.codes
        if codes is not None:  # kept by the batches that changed them: no lock, no recount
            for domain, stats in codes.take_stats().items():
                self.metrics.observe_codes(domain, stats)
            drift = codes.drift_report()
            if drift is not None:
                self.metrics.observe_drift(drift)
            chain, current = self.codebooks.seen(), codes.codebook
            if chain is not None and current is not None:
                self.metrics.observe_codebook_chain(
                    [c.codebook_id for c in chain], current.codebook_id
                )
        self._observe_versions()
        return Response(200, self.metrics.render(), "text/plain; version=0.0.4")

    def _observe_outcome(self, outcome: Outcome) -> None:
        """A fine-tune that made a candidate: its time and holdout recall (set once, here)."""
        if outcome.record is not None:
            self.metrics.finetune_seconds.labels(outcome.domain).set(outcome.seconds)
            recall = outcome.metrics.get("recall@10", 0)
            self.metrics.finetune_recall.labels(outcome.domain).set(recall)

    def _observe_versions(self) -> None:
        """Version gauges: the domains whose versions moved since the last scrape are read
        again (all of them on the first scrape); the others' series stay as they were."""
        with self._gauges_lock:
            moved, self._versions_changed = self._versions_changed, set()
            first, self._versions_read = not self._versions_read, True
        for domain in domains_with_versions(self.store) if first else sorted(moved):
            version = current_version(self.store, domain)
            records = list_records(self.store, domain)
            if version is not None:
                self.metrics.version.labels(domain).set(version)
                created = next((r.created_at for r in records if r.version == version), None)
                if created is not None:
                    self.metrics.version_created.labels(domain).set(created)
            self.metrics.rejected_versions.labels(domain).set(
                sum(r.status == REJECTED for r in records)
            )

    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        if self.http is not None:
            self.http.start()
        started = time.monotonic()
        code = 0
        self.scheduler.start()
        self.serving.start()
        # a migration another worker of the group makes is followed while this one runs
        self.codebooks.watch(self.settings.codebook_watch_s, self.stop_event)
        if self.settings.encoder_preload:
            # in the background: start-up and items with embeddings don't wait for it;
            # the first batch with texts waits for the load to finish
            threading.Thread(
                target=self._preload_encoder, name="encoder-preload", daemon=True
            ).start()
        freeze_long_lived("start-up")
        space_young_collections()
        unwatch_gc = self.metrics.watch_gc()
        unwatch_trims = self.metrics.watch_trims()
        try:
            self.loop.run()
        except StoreError as exc:
            log.error("state store failed, stopping without committing: %s", exc)
            code = 3
        finally:
            self.scheduler.shutdown()
            self.serving.stop()
            if self.http is not None:
                self.http.stop()
            self.store.close()
            unwatch_gc()
            unwatch_trims()
            thaw()
        log.info(
            "stopped after %.1f s: %d batches, %d records, %d dead-lettered",
            time.monotonic() - started,
            self.loop.stats.batches,
            self.loop.stats.records,
            self.loop.stats.dead,
        )
        return code

    @property
    def torch_busy(self) -> bool:
        """Whether torch still runs on a thread after :meth:`run` returned (see
        :attr:`FinetuneScheduler.torch_busy`)."""
        return self.scheduler.torch_busy

    def _preload_encoder(self) -> None:
        try:
            self.encoder.encode(["warm-up"])
        except EncoderError as exc:  # items with text will be dead-lettered with the reason
            log.error("%s", exc)

    def stop(self) -> None:
        self.loop.stop()


def run_daemon(
    settings: Settings, stop: threading.Event | None = None, *, exit_process: bool = False
) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; returns the exit code.

    The signal handlers are installed first (by ``adacode run`` before the slow
    imports, or here), so a signal during start-up also stops the daemon cleanly
    (it then stops before its first poll). With ``exit_process`` (``adacode run``), a
    process whose torch set-up is still running on a thread after everything is closed
    ends with ``os._exit``: the state is closed and committed by then, and the interpreter's
    finalisation under a running torch thread aborts the process (exit -6).
    """
    if stop is None:
        stop = install_stop_handlers()
    log.info("starting worker with settings %s", settings.redacted())
    cap_mmap_threshold()  # before the big allocations: see worker.core.memory
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    daemon = Daemon(settings, stop=stop)
    code = daemon.run()
    if exit_process and daemon.torch_busy:
        log.info("torch's set-up is still running on a thread: exiting without finalisation")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
