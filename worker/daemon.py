"""The worker daemon: wires the store, the consumer loop and the HTTP server.

``adacode run`` calls :func:`run_daemon`. SIGTERM and SIGINT stop it gracefully:
the batch in progress is finished and committed, then everything is closed. A
store failure (e.g. a full disk) stops consuming without committing and exits
non-zero; a restart resumes from the last committed batch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import faiss

from quantize.code_metrics import code_report
from store.exceptions import StoreError
from store.partition import StorePartition
from store.rocksdb import RocksDBPartition
from worker.api import HttpServer, Request, Response, Router
from worker.consumer import ConsumerLoop
from worker.encoder import TextEncoder
from worker.events import control_payload
from worker.exceptions import EncoderError
from worker.finetune import FineTuner
from worker.metrics import Metrics
from worker.processor import BatchResult, Processor
from worker.routes import ApiRoutes
from worker.scheduler import FinetuneScheduler
from worker.serving import Serving
from worker.settings import Settings
from worker.versions import REJECTED, current_version, domains_with_versions, list_records

log = logging.getLogger(__name__)


class Daemon:
    """One worker process: state, consumer loop, HTTP endpoints."""

    def __init__(self, settings: Settings, store: StorePartition | None = None) -> None:
        self.settings = settings
        # batched code search is fastest single-threaded on small batches, and leaves
        # the other core to kafka-python's I/O thread
        faiss.omp_set_num_threads(1)
        self.metrics = Metrics()
        self.store = store or RocksDBPartition.open(
            settings.state_path, sync_writes=settings.sync_writes
        )
        self.encoder = TextEncoder(settings.text_batch_size, settings.torch_threads)
        self.processor = Processor(self.store, settings, self.encoder.encode)
        self.loop = ConsumerLoop(settings, self.store, self.processor, self.metrics)
        self.serving = Serving(self.store, settings)
        self.tuner = FineTuner(
            self.store, settings, lock=self.loop.versions_lock, announce=self._announce
        )
        self.scheduler = FinetuneScheduler(self.tuner, settings)
        self.loop.on_applied = self._on_applied
        self.router = Router()
        self.router.add("GET", "/healthz", self._healthz)
        self.router.add("GET", "/readyz", self._readyz)
        self.router.add("GET", "/metrics", self._metrics)
        ApiRoutes(self.serving, self.store, settings, self._send_control).register(self.router)
        self.http: HttpServer | None = None
        if settings.http_port:
            self.http = HttpServer(self.router, settings.http_host, settings.http_port)

    def _on_applied(self, result: BatchResult) -> None:
        self.serving.on_applied(result)  # new items servable at once; rollbacks wake it
        self.scheduler.on_applied(result)

    def _announce(self, event: dict[str, Any]) -> None:
        self.loop.announce(event)
        self.serving.wake()  # a publish: build and swap the new version's index now

    def _send_control(self, op: str, domain: str, fields: dict[str, Any]) -> None:
        """What ``adacode rollback`` sends while the worker runs, on the loop's producer."""
        self.loop.producer.send(
            self.settings.topic("control"),
            key=domain.encode(),
            value=control_payload(op, domain, **fields),
        ).get(timeout=10)

    def _healthz(self, _: Request) -> Response:
        ok = self.loop.healthy or not self.loop.stats.batches
        return Response.json(200 if ok else 503, {"status": "ok" if ok else "unhealthy"})

    def _readyz(self, _: Request) -> Response:
        ready = self.loop.healthy and bool(self.loop.assigned)
        return Response.json(
            200 if ready else 503,
            {
                "ready": ready,
                "partitions": sorted(f"{tp.topic}-{tp.partition}" for tp in self.loop.assigned),
                "batches": self.loop.stats.batches,
                "records": self.loop.stats.records,
            },
        )

    def _metrics(self, _: Request) -> Response:
        self.metrics.up.set(1 if self.loop.healthy else 0)
        codes = self.processor.codes
        if codes is not None:
            for domain, assigner in list(codes.assigners.items()):
                self.metrics.observe_codes(domain, code_report(assigner.served()))
        now = time.time()
        for domain in domains_with_versions(self.store):
            version = current_version(self.store, domain)
            records = list_records(self.store, domain)
            if version is not None:
                self.metrics.version.labels(domain).set(version)
                created = next((r.created_at for r in records if r.version == version), now)
                self.metrics.staleness.labels(domain).set(now - created)
            self.metrics.rejected_versions.labels(domain).set(
                sum(r.status == REJECTED for r in records)
            )
        for domain, outcome in list(self.tuner.last.items()):
            if outcome.record is not None:
                self.metrics.finetune_seconds.labels(domain).set(outcome.seconds)
                self.metrics.finetune_recall.labels(domain).set(outcome.metrics.get("recall@10", 0))
        return Response(200, self.metrics.render(), "text/plain; version=0.0.4")

    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        if self.http is not None:
            self.http.start()
        started = time.monotonic()
        code = 0
        self.scheduler.start()
        self.serving.start()
        if self.settings.encoder_preload:
            # in the background: start-up and items with embeddings don't wait for it;
            # the first batch with texts waits for the load to finish
            threading.Thread(
                target=self._preload_encoder, name="encoder-preload", daemon=True
            ).start()
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
        log.info(
            "stopped after %.1f s: %d batches, %d records, %d dead-lettered",
            time.monotonic() - started,
            self.loop.stats.batches,
            self.loop.stats.records,
            self.loop.stats.dead,
        )
        return code

    def _preload_encoder(self) -> None:
        try:
            self.encoder.encode(["warm-up"])
        except EncoderError as exc:  # items with text will be dead-lettered with the reason
            log.error("%s", exc)

    def stop(self) -> None:
        self.loop.stop()


def run_daemon(settings: Settings) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; returns the exit code.

    The signal handlers are installed first, so a signal during start-up also
    stops the daemon cleanly (it then stops before its first poll).
    """
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    log.info("starting worker with settings %s", settings.redacted())
    daemon = Daemon(settings)
    daemon.loop.stop_event = stop
    return daemon.run()
