"""Prometheus metrics of the worker, in a registry of its own (served at /metrics).

The registry also holds prometheus_client's process collector (``process_resident_memory_bytes``,
``process_cpu_seconds_total``, ``process_open_fds``, ...; Linux only): the "memory near a limit"
alert in ``ops/prometheus/alerts.yml`` reads the worker's RSS from it.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from store.exceptions import StoreError
from worker.core.memory import watch_trims

if TYPE_CHECKING:
    from quantize.assign import CodeStats
    from quantize.code_metrics import CodeReport
    from quantize.drift import DriftReport

log = logging.getLogger(__name__)

#: a collector pass or a heap trim at least this long is logged as well as timed (every
#: thread waits for a pass; those of the trimmed arena for a trim): where a tail came from
LONG_PAUSE_S = 0.05


class _StateMemory(Collector):
    """``adacode_state_memory_bytes{part}``, read from the store at each scrape."""

    def __init__(self, usage: Callable[[], dict[str, int]]) -> None:
        self.usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "adacode_state_memory_bytes",
            "bytes the state store holds in memory, by part (memtables, block cache, ...)",
            labels=["part"],
        )
        try:
            parts = self.usage()
        except StoreError:  # closed while the daemon stops: nothing to report
            parts = {}
        for part, n in sorted(parts.items()):
            family.add_metric([part], n)
        yield family


def _escape(value: str) -> str:
    """A label value as the text format writes it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Series:
    """One series of a :class:`TextFamily`: its value, and its line once formatted."""

    __slots__ = ("family", "key", "value")

    def __init__(self, family: TextFamily, key: tuple[str, ...]) -> None:
        self.family = family
        self.key = key
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0 and self.family.kind == "counter":
            raise ValueError(f"{self.family.name}: a counter only goes up (inc by {amount})")
        self.family.changed(self, self.value + amount)

    def set(self, value: float) -> None:
        if self.family.kind == "counter":
            raise ValueError(f"{self.family.name}: a counter is not set, it goes up with inc()")
        self.family.changed(self, float(value))

    def get(self) -> float:
        return self.value


class TextFamily:
    """A labelled counter or gauge kept as its exposition text (one series per domain, ...).

    A change marks its one series; a scrape formats only the series marked since the last
    scrape and joins the others' lines as they were. prometheus_client's own families format
    every series at every scrape (about 14 us each here: 70 ms for the 5,000 per-domain series
    of 1,000 domains, several times that while the consumer holds the GIL), so the scrape's
    work grew with the number of domains; here it grows with what changed since the last one.
    Series are written as prometheus_client writes them (label names sorted; counters as
    ``<name>_total`` with HELP and TYPE on that name), without the ``_created`` series.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        kind: Literal["counter", "gauge"],
    ) -> None:
        self.name = name
        self.kind = kind
        self.labelnames = tuple(labelnames)
        sample = f"{name}_total" if kind == "counter" else name
        doc = documentation.replace("\\", "\\\\").replace("\n", "\\n")
        self._head = f"# HELP {sample} {doc}\n# TYPE {sample} {kind}\n"
        self._sample = sample
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        self._lines: dict[tuple[str, ...], str] = {}
        self._marked: set[tuple[str, ...]] = set()
        self._text: str | None = ""
        #: lines formatted so far (tests count them: a scrape formats what changed)
        self.formatted = 0

    def labels(self, *values: str) -> _Series:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values!r}")
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, _Series(self, key))
        return series

    def changed(self, series: _Series, value: float) -> None:
        with self._lock:
            series.value = value
            self._marked.add(series.key)
            self._text = None

    def text(self) -> str:
        """The family's exposition: the marked series formatted, the others as they were."""
        with self._lock:
            if self._text is None:
                for key in self._marked:
                    labels = ",".join(
                        f'{n}="{_escape(v)}"'
                        for n, v in sorted(zip(self.labelnames, key, strict=True))
                    )
                    value = floatToGoString(self._series[key].value)
                    self._lines[key] = f"{self._sample}{{{labels}}} {value}\n"
                self.formatted += len(self._marked)
                self._marked.clear()
                self._text = self._head + "".join(self._lines.values()) if self._lines else ""
            return self._text


class Metrics:
    """Counters of consumed/applied/rejected events, batch latency and consumer lag."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "adacode_consumed_records", "records polled from Kafka", ["topic"], registry=r
        )
        # per-domain families: exposition text kept per series (see TextFamily)
        self.applied = TextFamily(
            "adacode_applied_events", "events applied to state", ["kind", "domain"], "counter"
        )
        self.rejected = Counter(
            "adacode_rejected_events", "events sent to the dead-letter topic", ["topic"], registry=r
        )
        self.texts = Counter("adacode_texts_encoded", "item texts encoded by MiniLM", registry=r)
        self.batch_seconds = Histogram(
            "adacode_batch_seconds",
            "time to process and commit one polled batch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.lag = Gauge(
            "adacode_consumer_lag", "records behind the log end", ["topic", "partition"], registry=r
        )
        self.gc_pause = Histogram(
            "adacode_gc_pause_seconds",
            "cyclic garbage-collector passes, by generation (every thread waits for one)",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        for generation in ("0", "1", "2"):  # every series from the first scrape, at 0
            self.gc_pause.labels(generation)
        self.memory_trim = Histogram(
            "adacode_memory_trim_seconds",
            "returns of free heap pages to the OS (malloc_trim), by caller; threads that "
            "allocate from the arena being trimmed wait for it",
            ["where"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        for where in ("consumer", "finetune", "index"):
            self.memory_trim.labels(where)
        self.code_changes = TextFamily(
            "adacode_code_changes",
            "served-code changes (new, promote, deepen, disambiguate, demote, recode)",
            ["domain", "reason"],
            "counter",
        )
        self.code_utilization = TextFamily(
            "adacode_code_utilization", "codewords used / K", ["domain", "level"], "gauge"
        )
        self.code_collisions = TextFamily(
            "adacode_code_collision_rate",
            "1 - distinct served codes / items",
            ["domain", "scope"],
            "gauge",
        )
        self.code_length = TextFamily(
            "adacode_code_mean_length", "mean served code length", ["domain", "group"], "gauge"
        )
        self.version = TextFamily(
            "adacode_current_version", "the domain's current table version", ["domain"], "gauge"
        )
        # a creation time, not an age: it changes only with a publish or rollback, so a scrape
        # formats nothing for a domain whose version stayed (the age: time() - this in PromQL)
        self.version_created = TextFamily(
            "adacode_version_created_timestamp_seconds",
            "unix time the current version was created (its age: time() - this)",
            ["domain"],
            "gauge",
        )
        self.finetune_seconds = TextFamily(
            "adacode_last_finetune_seconds", "wall time of the last fine-tune", ["domain"], "gauge"
        )
        self.finetune_recall = TextFamily(
            "adacode_last_finetune_recall_at_10",
            "holdout Recall@10 of the last candidate",
            ["domain"],
            "gauge",
        )
        self.rejected_versions = TextFamily(
            "adacode_rejected_candidates", "candidates the gate rejected", ["domain"], "gauge"
        )
        self.families = (
            self.applied,
            self.code_changes,
            self.code_utilization,
            self.code_collisions,
            self.code_length,
            self.version,
            self.version_created,
            self.finetune_seconds,
            self.finetune_recall,
            self.rejected_versions,
        )
        self.dead_letters_refused = Counter(
            "adacode_dead_letters_refused",
            "dead letters Kafka refused for good (logged with their source coordinates)",
            ["topic"],
            registry=r,
        )
        self.key_mismatches = Counter(
            "adacode_key_mismatch_events",
            "events dead-lettered because their record key is not their domain (or is null)",
            ["topic"],
            registry=r,
        )
        # the fine-tune queue: set when it changes (the age is read from its oldest entry,
        # O(1)), so a scrape costs the same whatever the number of domains
        self.finetune_queue_length = Gauge(
            "adacode_finetune_queue_length",
            "domains waiting for a fine-tune (due, not running)",
            registry=r,
        )
        self.finetune_running = Gauge(
            "adacode_finetune_running", "fine-tunes running now", registry=r
        )
        self.finetune_oldest_wait = Gauge(
            "adacode_finetune_oldest_wait_seconds",
            "seconds the longest-waiting domain of the fine-tune queue has waited (0: none)",
            registry=r,
        )
        self.finetune_first_versions_waiting = Gauge(
            "adacode_finetune_awaiting_first_version",
            "domains without a version whose first fine-tune is queued or running",
            registry=r,
        )
        self.up = Gauge("adacode_up", "1 while the consumer loop is healthy", registry=r)
        # the codebook's drift (quantize.drift): set from the last batch's report at a scrape
        self.drift_score = Gauge(
            "adacode_codebook_drift_score",
            "log(error ratio / balance) of recently coded items (NaN: too few yet)",
            registry=r,
        )
        self.drifted = Gauge(
            "adacode_codebook_drifted", "1 when the drift score passed its threshold", registry=r
        )
        self.drift_error_ratio = Gauge(
            "adacode_codebook_error_ratio",
            "mean quantization error of recent items / of the catalogue at adoption",
            registry=r,
        )
        self.drift_balance = Gauge(
            "adacode_codebook_balance",
            "effective first-level cells of recent items / of the catalogue at adoption",
            registry=r,
        )
        self.drift_share = Gauge(
            "adacode_codebook_catalogue_share",
            "items coded at the codebook's adoption / every item coded with it",
            registry=r,
        )
        self.drift_items = Gauge(
            "adacode_codebook_coded_items",
            "items coded with the current codebook, at its adoption (baseline) and after",
            ["window"],
            registry=r,
        )
        # the group's chain of codebooks (worker.ingest.group): set at a scrape from the last read
        self.codebook_generation = Gauge(
            "adacode_codebook_generation",
            "place of this worker's codebook in the group's chain of codebooks (1: the first; "
            "0: not in it)",
            registry=r,
        )
        self.group_codebook_generation = Gauge(
            "adacode_group_codebook_generation",
            "codebooks in the group's chain as last read: a worker whose generation is lower "
            "is behind the group (it follows within codebook_watch_s and a migration)",
            registry=r,
        )
        # process_* (RSS, CPU, open fds) of this process, read at each scrape
        ProcessCollector(registry=r)

    def watch_state_memory(self, usage: Callable[[], dict[str, int]]) -> None:
        """Report ``usage()`` (e.g. :meth:`StorePartition.memory_usage`) at each scrape."""
        self.registry.register(_StateMemory(usage))

    def watch_finetune_queue(self, oldest_queued_at: Callable[[], float | None]) -> None:
        """Report the age of the queue's oldest entry: ``time.time() - oldest_queued_at()``
        at each scrape (``None``: the queue is empty, 0)."""

        def age() -> float:
            at = oldest_queued_at()
            return 0.0 if at is None else max(0.0, time.time() - at)

        self.finetune_oldest_wait.set_function(age)

    def observe_drift(self, report: DriftReport) -> None:
        """The codebook's drift as the last batch left it (O(1))."""
        nan = math.nan
        self.drift_score.set(nan if report.score is None else report.score)
        self.drifted.set(1 if report.drifted else 0)
        self.drift_error_ratio.set(nan if report.error_ratio is None else report.error_ratio)
        self.drift_balance.set(nan if report.balance is None else report.balance)
        self.drift_share.set(report.catalogue_share)
        self.drift_items.labels("baseline").set(report.baseline_items)
        self.drift_items.labels("recent").set(report.recent_items)

    def observe_codebook_chain(self, chain: Sequence[str], current: str) -> None:
        """The group's chain of codebook ids as last read, and this worker's codebook."""
        self.group_codebook_generation.set(len(chain))
        self.codebook_generation.set(chain.index(current) + 1 if current in chain else 0)

    def observe_finetune_queue(self, waiting: int, running: int, first_versions: int) -> None:
        """The queue changed: ``waiting`` domains due, ``running`` fine-tunes, and
        ``first_versions`` domains waiting for their first version."""
        self.finetune_queue_length.set(waiting)
        self.finetune_running.set(running)
        self.finetune_first_versions_waiting.set(first_versions)

    def observe_batch(
        self,
        *,
        applied: Mapping[tuple[str, str], int],
        dead_topics: Iterable[str],
        texts_encoded: int,
        code_changes: Iterable[tuple[str, str]],
        seconds: float,
        key_mismatches: Mapping[str, int] | None = None,
    ) -> None:
        """One committed batch: events applied by ``(kind, domain)``, the source topic of each
        dead letter, texts encoded, ``(domain, reason)`` of each code change, its duration,
        and per topic the dead letters whose key was not their event's domain."""
        for (kind, domain), n in applied.items():
            self.applied.labels(kind, domain).inc(n)
        for topic in dead_topics:
            self.rejected.labels(topic).inc()
        for topic, n in (key_mismatches or {}).items():
            self.key_mismatches.labels(topic).inc(n)
        if texts_encoded:
            self.texts.inc(texts_encoded)
        for domain, reason in code_changes:
            self.code_changes.labels(domain, reason).inc()
        self.batch_seconds.observe(seconds)

    def count_consumed(self, topic: str, n: int) -> None:
        self.consumed.labels(topic).inc(n)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.lag.labels(topic, str(partition)).set(lag)

    def observe_codes(self, domain: str, report: CodeReport | CodeStats) -> None:
        for level, u in enumerate(report.utilization):
            self.code_utilization.labels(domain, str(level)).set(u)
        self.code_collisions.labels(domain, "all").set(report.collision_all)
        self.code_collisions.labels(domain, "head").set(report.collision_head)
        self.code_length.labels(domain, "head").set(report.mean_len_head)
        self.code_length.labels(domain, "tail").set(report.mean_len_tail)

    def watch_gc(self) -> Callable[[], None]:
        """Time every pass of the cyclic collector into :attr:`gc_pause` (a pause of the
        whole process, so a request's tail shows here when the heap holds many tracked
        objects); returns the function that stops watching."""
        began = [0.0]

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                seconds = time.perf_counter() - began[0]
                self.gc_pause.labels(str(info["generation"])).observe(seconds)
                if seconds >= LONG_PAUSE_S:
                    log.info(
                        "collector pass of generation %d took %.0f ms (%d objects collected, "
                        "%d uncollectable)",
                        info["generation"],
                        1000 * seconds,
                        info.get("collected", 0),
                        info.get("uncollectable", 0),
                    )

        gc.callbacks.append(callback)
        return lambda: gc.callbacks.remove(callback)

    def watch_trims(self) -> Callable[[], None]:
        """Time every return of free heap pages to the OS into :attr:`memory_trim`
        (:func:`worker.core.memory.watch_trims`); returns the function that stops it."""

        def observe(where: str, seconds: float) -> None:
            self.memory_trim.labels(where).observe(seconds)
            if seconds >= LONG_PAUSE_S:
                log.info("heap trim (%s) took %.0f ms", where, 1000 * seconds)

        return watch_trims(observe)

    def render(self) -> bytes:
        """The exposition: the registry's (process, batch, Kafka: a fixed size) and the
        per-domain families' text (formatted where it changed since the last scrape)."""
        return generate_latest(self.registry) + "".join(f.text() for f in self.families).encode()
