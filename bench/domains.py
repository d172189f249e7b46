"""Many domains: D small domains through the real broker and the real daemon, a fine-tune
requested for every one of them.

One command::

    python bench/domains.py [--domains 30 300 1000] [--items 300] [--interactions 3000]
                            [--bootstrap HOST:PORT] [--restart] [--worker-setting KEY=VALUE ...]

Without ``--bootstrap`` it starts its own broker (``ops/kafka.sh up``, stopped at the end). For
each D (``--domains`` takes several values, run in order):

1. **Items**: D domains ``d0000`` .. of ``--items`` items each, from bench/scale.py's
   generator (:class:`~bench.scale.SyntheticDomain`: clustered 384-float embeddings, Zipf
   popularity), produced round-robin by blocks of domains; the worker (``adacode run``,
   :class:`~worker.commands.launch.WorkerProcess`, its own RocksDB in a temp dir, JSON logs in
   ``bench/out/domains_worker_<D>.log``) applies them and trains its codebook.
2. **Interactions**: ``--interactions`` per domain (users walking within favourite clusters,
   so sequences carry signal), produced round-robin while the worker runs, applied.
3. **Fine-tunes**: one ``{"op": "finetune", "domain": d}`` record per domain on the control
   topic (the format of ``adacode finetune`` / ``send_control``; one producer for all). The
   worker's log lines ``fine-tune <d>: version N <status> (...) in X s`` give when each domain
   got its version and how long its fine-tune took. With ``--restart``, once about 10 % of
   the domains have a version the worker is stopped (SIGTERM) with the rest still queued and
   started again on the same state; the run then checks that every domain ends with exactly
   one published version (none lost, none run twice).
4. **After**: one last ``/metrics`` scrape (its line count), the worker stopped, and its state
   read back read-only: per domain, :func:`~worker.state.versions.list_records` and the
   committed code assigner's :meth:`~quantize.assign.CodeAssigner.stats` (do head items get
   longer served codes than the tail?).

A thread (bench/scale.py's :class:`~bench.scale.Monitor`) scrapes ``/metrics`` every
``--poll-s`` seconds and reads ``/proc/<pid>/status`` throughout. The table per D: ingest
time, worker RSS after ingest and its growth per domain, time until every domain has a version
(and the count over time, plotted), median fine-tune time, the bound D x median / pool + 10 %
(pool: the worker's ``finetune_workers`` from its start-up settings line) and whether it held,
``/metrics`` scrape time during ingest and during the fine-tunes, the ``/metrics`` line count,
the share of domains whose head items are served longer codes than their tail, and the
restart check.

Writes ``bench/out/domains.md``, ``bench/out/domains.json`` and ``bench/out/domains.png``.
"""

from __future__ import annotations

import argparse
import calendar
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adacode.errors import AdacodeError
from bench.broker import broker, confluent_available, free_port, produce_stream
from bench.common import dir_size_mib, drop_topics, out_path, worker_env
from bench.scale import (
    _CODEBOOK_DONE,
    DIM,
    LogLine,
    Monitor,
    Sample,
    ScaleBenchError,
    Spec,
    SyntheticDomain,
    auto_clusters,
    crossing_time,
    parse_log_line,
    quantiles,
    start_time,
)
from worker.commands.launch import WorkerProcess
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.ingest.events import control_payload

REPO = Path(__file__).resolve().parents[1]
BLOCK = 50  # events of one domain produced before the next domain's
RESTART_SHARE = 0.1  # the worker is stopped once this share of domains has a version
BOUND_SLACK = 0.1  # the goal: every domain with a version within D x median / pool + 10 %

# ======================================================================================
# pure parts (tests/bench/test_domains.py)
# ======================================================================================


def domain_name(k: int) -> str:
    return f"d{k:04d}"


def domain_specs(n_domains: int, items: int, interactions: int, seed: int = 0) -> list[Spec]:
    """One :class:`~bench.scale.Spec` per domain, each with its own seed (distinct draws)."""
    return [
        Spec(
            items=items,
            interactions=interactions,
            users=max(1, interactions // 20),
            clusters=auto_clusters(items),
            seed=seed * 100_003 + k,
            domain=domain_name(k),
        )
        for k in range(n_domains)
    ]


def round_robin(streams: Sequence[Iterable[Any]], block: int = BLOCK) -> Iterator[Any]:
    """Up to ``block`` elements of each stream in turn until every stream is spent (each
    stream's own order kept)."""
    live = [iter(s) for s in streams]
    while live:
        still = []
        for it in live:
            chunk = list(itertools.islice(it, block))
            yield from chunk
            if len(chunk) == block:
                still.append(it)
        live = still


_FINETUNE = re.compile(r"^fine-tune (\S+): version (\d+) (\w+) \(.*?\) in ([\d.]+) s\b")
_FINETUNE_ENDED = re.compile(
    r"^fine-tune of (\S+) (skipped|dropped|not published|failed)\b", re.IGNORECASE
)
_POOL = re.compile(r"['\"]finetune_workers['\"]\s*:\s*(\d+)")
_REQUEUED = re.compile(r"queued (\d+) pending fine-tune request")


@dataclass(frozen=True)
class FinetuneLine:
    """One fine-tune outcome from the worker's log."""

    ts: float | None
    domain: str
    version: int | None  # None: ended without a version (skipped, dropped, failed)
    status: str  # published, rejected, skipped, dropped, not published, failed
    seconds: float | None


def finetune_line(line: LogLine) -> FinetuneLine | None:
    """The outcome a log line states (``fine-tune d: version 1 published (...) in 0.9 s``,
    ``fine-tune of d skipped: ...``), else ``None``."""
    found = _FINETUNE.match(line.msg)
    if found:
        return FinetuneLine(
            line.ts, found.group(1), int(found.group(2)), found.group(3), float(found.group(4))
        )
    ended = _FINETUNE_ENDED.match(line.msg)
    if ended:
        return FinetuneLine(line.ts, ended.group(1), None, ended.group(2).lower(), None)
    return None


def pool_size(lines: Iterable[LogLine]) -> int | None:
    """``finetune_workers`` from the worker's ``starting worker with settings`` line."""
    for line in lines:
        if line.msg.startswith("starting worker with settings"):
            found = _POOL.search(line.msg)
            if found:
                return int(found.group(1))
    return None


def published_over_time(outcomes: Iterable[FinetuneLine], t0: float) -> list[tuple[float, int]]:
    """``(seconds since t0, domains with a published version)`` at each first publish."""
    seen: set[str] = set()
    out: list[tuple[float, int]] = []
    for o in sorted((o for o in outcomes if o.ts is not None), key=lambda o: o.ts or 0.0):
        if o.status == "published" and o.domain not in seen:
            seen.add(o.domain)
            out.append(((o.ts or 0.0) - t0, len(seen)))
    return out


def bound_s(n_domains: int, median_s: float, pool: int, slack: float = BOUND_SLACK) -> float:
    """D x median fine-tune time / pool size, plus ``slack``."""
    return n_domains * median_s / max(1, pool) * (1.0 + slack)


def head_longer_share(stats: Sequence[tuple[float, float, int]]) -> float | None:
    """Share of domains whose head items' mean served code length is above the tail's, over
    ``(mean_len_head, mean_len_tail, n_head)`` per domain (a domain without head items
    counts as "no"); ``None`` for no domain."""
    if not stats:
        return None
    return sum(1 for head, tail, n in stats if n > 0 and head > tail) / len(stats)


def exactly_once(published: dict[str, int], domains: Sequence[str]) -> dict[str, Any]:
    """From the published versions per domain: how many domains have exactly one, none
    (a lost request) and more than one (a request run twice), with a few names of each."""
    lost = [d for d in domains if published.get(d, 0) == 0]
    twice = [d for d in domains if published.get(d, 0) > 1]
    return {
        "exactly_one": len(domains) - len(lost) - len(twice),
        "none": len(lost),
        "more": len(twice),
        "none_examples": lost[:5],
        "more_examples": twice[:5],
        "held": not lost and not twice,
    }


def tail_log(path: Path, offset: int) -> tuple[list[LogLine], int]:
    """Complete lines of ``path`` from byte ``offset`` and the offset after the last one."""
    if not path.exists():
        return [], offset
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    lines = [parse_log_line(raw.decode(errors="replace")) for raw in data[:end].splitlines()]
    return lines, offset + end


# ======================================================================================
# one D
# ======================================================================================


@dataclass
class Run:
    """What was seen of one D."""

    n_domains: int
    produce: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    outcomes: list[FinetuneLine] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # epoch seconds of the steps
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class DomainsRun:
    """The steps of one D (see the module docstring), in order."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, n_domains: int) -> None:
        self.args, self.bootstrap, self.n = args, bootstrap, n_domains
        self.prefix = f"bench-domains-{uuid.uuid4().hex[:8]}."
        self.settings = dataclasses.replace(
            Settings(), kafka_bootstrap=bootstrap, topic_prefix=self.prefix
        )
        self.scratch = Path(tempfile.mkdtemp(prefix="adacode-domains-"))
        self.state = self.scratch / "state"
        self.port = free_port()
        self.log_path = out_path(f"domains_worker_{n_domains}.log")
        self.specs = domain_specs(n_domains, args.items, args.interactions, args.seed)
        self.names = [s.domain for s in self.specs]
        self.run_ = Run(n_domains)
        self.log_offset = 0
        self.log_lines: list[LogLine] = []
        self.worker: WorkerProcess | None = None
        self.monitor: Monitor | None = None

    def run(self) -> Run:
        """Topics; items; interactions; fine-tunes (with the restart); read back; figures."""
        try:
            create_topics(self.settings, partitions=self.settings.topic_partitions)
            self.produce("items", (SyntheticDomain(s).item_events() for s in self.specs))
            self.start_worker(fresh=True)
            self.ingest()
            self.finetunes()
            self.last_scrape()
            self.stop_worker()
            self.read_back()
            self.run_.figures.update(figures(self.run_, self.args))
            return self.run_
        finally:
            if self.worker is not None and self.worker.poll() is None:
                self.stop_worker()
            shutil.rmtree(self.scratch, ignore_errors=True)
            if not self.args.keep_topics:
                drop_topics(self.bootstrap, self.prefix)

    # -- steps ----------------------------------------------------------------------------

    def produce(self, topic: str, streams: Iterable[Iterable[tuple[bytes, bytes]]]) -> None:
        started = time.perf_counter()
        count, size = produce_stream(
            self.bootstrap,
            self.settings.topic(topic),
            round_robin(list(streams)),
            client=self.args.producer,
        )
        seconds = time.perf_counter() - started
        self.run_.produce[topic] = {"records": count, "bytes": size, "seconds": seconds}
        print(f"  produced {count:,} {topic} in {seconds:.1f} s", flush=True)

    def ingest(self) -> None:
        """Items applied and the codebook trained; then the interactions produced and applied."""
        items, inter = self.n * self.args.items, self.n * self.args.interactions
        self.wait("items applied", lambda s: s.items >= items)
        self.wait("codebook", lambda _s: any(_CODEBOOK_DONE.search(ln.msg) for ln in self.log()))
        self.run_.marks["items_done"] = time.time()
        self.produce("interactions", (SyntheticDomain(s).interaction_events() for s in self.specs))
        self.wait("interactions applied", lambda s: s.interactions >= inter)
        self.run_.marks["ingest_done"] = time.time()

    def finetunes(self) -> None:
        """One fine-tune request per domain on the control topic; wait for every outcome,
        stopping and restarting the worker once when ``--restart``."""
        from kafka import KafkaProducer

        self.run_.marks["requests_start"] = time.time()
        producer = KafkaProducer(**self.settings.kafka_common(), acks="all", linger_ms=20)
        try:
            for d in self.names:
                producer.send(
                    self.settings.topic("control"),
                    key=d.encode(),
                    value=control_payload("finetune", d),
                )
            producer.flush(timeout=60)
        finally:
            producer.close(timeout=10)
        self.run_.marks["requests_sent"] = time.time()
        print(f"  {self.n} fine-tune requests sent", flush=True)
        if self.args.restart:
            target = max(1, math.ceil(RESTART_SHARE * self.n))
            self.wait(
                f"{target} domains with a version",
                lambda _s: self.published() >= target,
                timeout_s=self.args.finetune_timeout_s,
            )
            self.run_.marks["sigterm"] = time.time()
            self.run_.figures["published_at_sigterm"] = self.published()
            code = self.stop_worker()
            self.run_.figures["sigterm_exit_code"] = code
            print(
                f"  SIGTERM with {self.published()} of {self.n} published: exit {code}", flush=True
            )
            self.start_worker(fresh=False)
            self.run_.marks["restarted"] = time.time()
        self.wait(
            "every domain's outcome",
            lambda _s: self.ended() >= self.n,
            timeout_s=self.args.finetune_timeout_s,
        )
        self.run_.marks["finetunes_done"] = time.time()

    def last_scrape(self) -> None:
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=120) as r:
            text = r.read().decode()
        self.run_.figures["last_scrape_ms"] = 1000 * (time.perf_counter() - started)
        lines = text.splitlines()
        self.run_.figures["metrics_lines"] = len(lines)
        self.run_.figures["metrics_samples"] = sum(1 for ln in lines if ln and ln[0] != "#")

    def read_back(self) -> None:
        """Versions and code stats per domain, from the stopped worker's state."""
        from store.rocksdb import RocksDBPartition
        from worker.state.reads import committed_assigner
        from worker.state.versions import PUBLISHED, list_records

        store = RocksDBPartition.open(self.state, read_only=True)
        try:
            published: dict[str, int] = {}
            stats: list[tuple[float, float, int]] = []
            codes: list[float] = []
            for d in self.names:
                published[d] = sum(1 for r in list_records(store, d) if r.status == PUBLISHED)
                assigner = committed_assigner(store, d)
                if assigner is None:
                    stats.append((0.0, 0.0, 0))
                    continue
                st = assigner.stats()
                stats.append((st.mean_len_head, st.mean_len_tail, st.n_head))
                codes.append(st.distinct_codes / max(1, st.n_items))
        finally:
            store.close()
        f = self.run_.figures
        f["published_per_domain"] = published
        f["exactly_once"] = exactly_once(published, self.names)
        f["head_longer_share"] = head_longer_share(stats)
        f["n_head_median"] = statistics.median(s[2] for s in stats) if stats else None
        f["mean_len_head_median"] = statistics.median(s[0] for s in stats) if stats else None
        f["mean_len_tail_median"] = statistics.median(s[1] for s in stats) if stats else None
        f["distinct_codes_per_item_median"] = statistics.median(codes) if codes else None
        f["rocksdb_mib"] = dir_size_mib(self.state)

    # -- the worker -----------------------------------------------------------------------

    def worker_settings(self) -> dict[str, object]:
        settings: dict[str, object] = {
            "kafka_bootstrap": self.bootstrap,
            "topic_prefix": self.prefix,
            "kafka_group_id": f"{self.prefix}worker",
            "state_dir": str(self.state),
            "http_port": self.port,
            "embedding_dim": DIM,
            "encoder_preload": False,
            "finetune_interval_s": 0,
            "finetune_after_interactions": 0,
            "codebook_min_items": self.args.min_items,
            "log_format": "json",
            "log_level": "INFO",
        }
        for extra in self.args.worker_setting:
            key, _, value = extra.partition("=")
            settings[key.strip().lower()] = value
        return settings

    def start_worker(self, *, fresh: bool) -> None:
        self.worker = WorkerProcess.start(
            worker_env(self.worker_settings()), self.log_path, cwd=REPO, append=not fresh
        )
        self.worker.wait_http(self.port, "/metrics", timeout_s=300)
        self.monitor = Monitor(self.worker, self.port, self.args.poll_s)
        self.monitor.start()

    def stop_worker(self) -> int | None:
        if self.monitor is not None:
            self.monitor.done.set()
            self.monitor.join(timeout=120)
            self.run_.samples.extend(self.monitor.samples)
            self.monitor = None
        code = None if self.worker is None else self.worker.stop(timeout_s=120)
        self.log()
        return code

    def log(self) -> list[LogLine]:
        """Every worker log line so far (read incrementally)."""
        new, self.log_offset = tail_log(self.log_path, self.log_offset)
        self.log_lines.extend(new)
        for line in new:
            outcome = finetune_line(line)
            if outcome is not None:
                self.run_.outcomes.append(outcome)
        return self.log_lines

    def published(self) -> int:
        self.log()
        return len({o.domain for o in self.run_.outcomes if o.status == "published"})

    def ended(self) -> int:
        """Domains with a final outcome: a version (published or rejected) or a failure."""
        self.log()
        return len({o.domain for o in self.run_.outcomes if o.status != "dropped"})

    def wait(
        self,
        what: str,
        done: Callable[[Sample], bool],
        timeout_s: float | None = None,
    ) -> None:
        deadline = time.monotonic() + (timeout_s or self.args.timeout_s)
        if self.args.stop_by is not None:
            deadline = min(deadline, time.monotonic() + self.args.stop_by - time.time())
        next_print = time.monotonic() + 15
        while True:
            assert self.worker is not None and self.monitor is not None
            if self.worker.poll() is not None:
                raise ScaleBenchError(
                    f"waiting for {what}: the worker exited {self.worker.returncode}"
                )
            sample = self.monitor.last()
            if sample is not None and done(sample):
                return
            if time.monotonic() > deadline:
                note = f"gave up waiting for {what}"
                self.run_.notes.append(note)
                print(f"  {note}", flush=True)
                return
            if time.monotonic() > next_print and sample is not None:
                print(
                    f"  [{what}] items {sample.items:,.0f} interactions {sample.interactions:,.0f}"
                    f" published {self.published()}/{self.n} RSS {sample.rss_mib:,.0f} MiB",
                    flush=True,
                )
                next_print = time.monotonic() + 15
            time.sleep(0.5)


# ======================================================================================
# figures, table, chart
# ======================================================================================


def figures(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """The table's numbers from the samples, the marks and the log outcomes."""
    m, s = run.marks, run.samples
    out: dict[str, Any] = {}
    t = [x.t for x in s]
    items = [x.items for x in s]
    n_items = run.n_domains * args.items
    n_inter = run.n_domains * args.interactions
    first = [x for x in s if x.t < m.get("items_done", math.inf)]
    items_begin = start_time(t[: len(first)], items[: len(first)])
    items_end = crossing_time(t, items, n_items)
    inter_t = [x.t for x in s if x.t >= m.get("items_done", math.inf)]
    inter_c = [x.interactions for x in s if x.t >= m.get("items_done", math.inf)]
    inter_begin = start_time(inter_t, inter_c)
    inter_end = crossing_time(inter_t, inter_c, n_inter)
    out["items_s"] = _span(items_begin, items_end)
    out["interactions_s"] = _span(inter_begin, inter_end)
    out["codebook_wait_s"] = _span(items_end, m.get("items_done"))
    ingest = [x for x in s if x.t <= m.get("ingest_done", math.inf)]
    if ingest:
        out["rss_before_mib"] = ingest[0].rss_mib
        out["rss_after_ingest_mib"] = ingest[-1].rss_mib
        out["rss_growth_per_domain_mib"] = (ingest[-1].rss_mib - ingest[0].rss_mib) / run.n_domains
    out["peak_rss_mib"] = max((x.hwm_mib for x in s), default=None)
    out["scrape_ingest_ms"] = quantiles([1000 * x.scrape_s for x in ingest])
    tuning = [x for x in s if x.t >= m.get("requests_start", math.inf)]
    out["scrape_finetune_ms"] = quantiles([1000 * x.scrape_s for x in tuning])
    after = [o for o in run.outcomes if o.ts is not None and o.ts >= m.get("requests_start", 0)]
    secs = [o.seconds for o in after if o.seconds is not None]
    out["finetune_s"] = quantiles(secs)
    out["outcomes"] = {k: sum(1 for o in after if o.status == k) for k in {o.status for o in after}}
    curve = published_over_time(after, m.get("requests_start", 0.0))
    out["published_curve"] = curve
    out["published_domains"] = curve[-1][1] if curve else 0
    out["all_published_s"] = curve[-1][0] if curve and curve[-1][1] >= run.n_domains else None
    out["finetune_busy_s"] = sum(secs)
    gap = m["restarted"] - m["sigterm"] if "sigterm" in m and "restarted" in m else 0.0
    out["restart_gap_s"] = gap or None
    out["all_published_less_gap_s"] = (
        None if out["all_published_s"] is None else out["all_published_s"] - gap
    )
    return out


def _span(begin: float | None, end: float | None) -> float | None:
    return None if begin is None or end is None else end - begin


def summarize_pool(run: Run, pool: int | None) -> None:
    f = run.figures
    f["pool"] = pool
    median = (f.get("finetune_s") or {}).get("median")
    if pool and median:
        f["bound_s"] = bound_s(run.n_domains, median, pool)
        took = f.get("all_published_less_gap_s")
        f["bound_held"] = took is not None and took <= f["bound_s"]
    if pool and f.get("finetune_busy_s") and run.n_domains:
        f["mean_bound_s"] = bound_s(
            run.n_domains,
            f["finetune_busy_s"] / max(1, (f.get("finetune_s") or {}).get("n") or 1),
            pool,
        )


def _f(value: float | None, fmt: str = "{:,.0f}", none: str = "n/a") -> str:
    return (
        none
        if value is None or (isinstance(value, float) and math.isnan(value))
        else fmt.format(value)
    )


def render_table(run: Run, args: argparse.Namespace) -> str:
    f = run.figures
    si, sf = f.get("scrape_ingest_ms") or {}, f.get("scrape_finetune_ms") or {}
    ft = f.get("finetune_s") or {}
    once = f.get("exactly_once") or {}
    rows = [
        (
            "domains x (items / interactions)",
            f"{run.n_domains:,} x ({args.items:,} / {args.interactions:,})",
        ),
        (
            "ingest (applied)",
            f"{_f(_sum(f.get('items_s'), f.get('interactions_s')), '{:.1f} s')}: items "
            f"{_f(f.get('items_s'), '{:.1f} s')}, interactions {_f(f.get('interactions_s'), '{:.1f} s')}"
            f" (codebook after the last item {_f(f.get('codebook_wait_s'), '{:.1f} s')})",
        ),
        (
            "worker RSS before / after ingest (growth per domain)",
            f"{_f(f.get('rss_before_mib'))} / {_f(f.get('rss_after_ingest_mib'))} MiB "
            f"({_f(f.get('rss_growth_per_domain_mib'), '{:.2f}')} MiB); peak {_f(f.get('peak_rss_mib'))} MiB",
        ),
        (
            "time until every domain has a version",
            f"{_f(f.get('all_published_s'), '{:.1f} s', 'not reached')}"
            + (
                f" ({_f(f.get('all_published_less_gap_s'), '{:.1f} s')} less the "
                f"{_f(f.get('restart_gap_s'), '{:.1f} s')} from SIGTERM to restarted)"
                if f.get("restart_gap_s")
                else ""
            )
            + f" "
            f"({f.get('published_domains', 0)} of {run.n_domains} published; outcomes {f.get('outcomes')})",
        ),
        (
            "fine-tune s (median / max, worker log)",
            f"{_f(ft.get('median'), '{:.2f}')} / {_f(ft.get('max'), '{:.2f}')} ({ft.get('n', 0)} runs)",
        ),
        (
            "bound D x median / pool + 10 %",
            f"{_f(f.get('bound_s'), '{:.1f} s')} (pool {f.get('pool')}): "
            f"{'held' if f.get('bound_held') else 'NOT held'}"
            f" (with the mean fine-tune time instead: {_f(f.get('mean_bound_s'), '{:.1f} s')})",
        ),
        (
            "/metrics scrape ms during ingest (median / max)",
            f"{_f(si.get('median'), '{:.1f}')} / {_f(si.get('max'), '{:.1f}')} ({si.get('n', 0)} scrapes)",
        ),
        (
            "/metrics scrape ms during fine-tunes (median / max)",
            f"{_f(sf.get('median'), '{:.1f}')} / {_f(sf.get('max'), '{:.1f}')} ({sf.get('n', 0)} scrapes)",
        ),
        (
            "/metrics lines (samples), last scrape",
            f"{_f(f.get('metrics_lines'))} ({_f(f.get('metrics_samples'))}), {_f(f.get('last_scrape_ms'), '{:.1f} ms')}",
        ),
        (
            "head items served longer codes than the tail",
            f"{_f(f.get('head_longer_share'), '{:.0%}')} of domains (median head items "
            f"{_f(f.get('n_head_median'), '{:g}')}; mean length head {_f(f.get('mean_len_head_median'), '{:.2f}')}"
            f" / tail {_f(f.get('mean_len_tail_median'), '{:.2f}')}; distinct codes per item "
            f"{_f(f.get('distinct_codes_per_item_median'), '{:.3f}')})",
        ),
        (
            "published versions per domain (store)",
            f"exactly one: {once.get('exactly_one')}, none: {once.get('none')} "
            f"{once.get('none_examples') or ''}, more: {once.get('more')} {once.get('more_examples') or ''}",
        ),
    ]
    if "sigterm_exit_code" in f:
        rows.append(
            (
                "restart check (SIGTERM mid-queue)",
                f"SIGTERM with {f.get('published_at_sigterm')} of {run.n_domains} published, exit "
                f"{f.get('sigterm_exit_code')}; re-queued on start: {f.get('requeued')}; every domain "
                f"exactly one published version: {'yes' if once.get('held') else 'NO'}",
            )
        )
    if run.notes:
        rows.append(("notes", "; ".join(run.notes)))
    lines = [f"### {run.n_domains:,} domains", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def plot(runs: Sequence[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(14, 4 * len(runs)), squeeze=False)
    for (ax1, ax2), run in zip(axes, runs, strict=True):
        curve = run.figures.get("published_curve") or []
        t0 = run.marks.get("requests_start", 0.0)
        if curve:
            ax1.step([0.0] + [c[0] for c in curve], [0] + [c[1] for c in curve], where="post")
        bound = run.figures.get("bound_s")
        if bound:
            ax1.axvline(bound, color="#d62728", ls="--", label="D x median / pool + 10 %")
        if "sigterm" in run.marks:
            ax1.axvspan(
                run.marks["sigterm"] - t0,
                run.marks.get("restarted", t0) - t0,
                color="orange",
                alpha=0.3,
                label="SIGTERM .. restarted",
            )
        ax1.axhline(run.n_domains, color="grey", lw=0.8)
        ax1.set_title(f"{run.n_domains:,} domains: domains with a published version")
        ax1.set_xlabel("s since the fine-tune requests")
        ax1.legend(fontsize=8)
        if run.samples:
            s0 = run.samples[0].t
            ax2.plot(
                [x.t - s0 for x in run.samples], [1000 * x.scrape_s for x in run.samples], lw=0.8
            )
            for key, colour in (
                ("items_done", "green"),
                ("ingest_done", "purple"),
                ("requests_start", "red"),
            ):
                if key in run.marks:
                    ax2.axvline(run.marks[key] - s0, color=colour, ls=":", label=key)
        ax2.set_title("/metrics scrape ms")
        ax2.set_xlabel("s since the worker started")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(run: Run) -> dict[str, Any]:
    return {
        "n_domains": run.n_domains,
        "produce": run.produce,
        "marks": run.marks,
        "figures": run.figures,
        "notes": run.notes,
        "outcomes": [dataclasses.asdict(o) for o in run.outcomes],
        "samples": [dataclasses.asdict(x) for x in run.samples],
    }


# ======================================================================================
# main
# ======================================================================================


def _utc_today(text: str) -> float:
    """``HH:MM`` (UTC, today) as epoch seconds."""
    hour, _, minute = text.partition(":")
    now = time.gmtime()
    return float(
        calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, int(hour), int(minute), 0, 0, 0, 0))
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--domains", type=int, nargs="+", default=[30, 300, 1000])
    parser.add_argument("--items", type=int, default=300, help="items per domain")
    parser.add_argument("--interactions", type=int, default=3000, help="interactions per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", help="HOST:PORT of a running broker (default: start one)")
    parser.add_argument("--min-items", type=int, default=1000, help="codebook_min_items")
    parser.add_argument("--poll-s", type=float, default=1.0, help="seconds between /metrics polls")
    parser.add_argument(
        "--timeout-s", type=float, default=1800.0, help="most seconds per ingest wait"
    )
    parser.add_argument("--finetune-timeout-s", type=float, default=1800.0)
    parser.add_argument("--restart", action="store_true", help="SIGTERM and restart mid-queue")
    parser.add_argument(
        "--start-by", type=_utc_today, help="HH:MM UTC: start no further D after it"
    )
    parser.add_argument(
        "--stop-by",
        type=_utc_today,
        help="HH:MM UTC: every wait gives up at it (the D is reported with what it reached)",
    )
    parser.add_argument(
        "--keep-topics", action="store_true", help="keep the run's topics on the broker"
    )
    parser.add_argument("--producer", choices=("auto", "kafka-python", "confluent"), default="auto")
    parser.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra worker setting (repeatable), e.g. finetune_workers=2",
    )
    args = parser.parse_args(argv)
    if args.producer == "auto":
        args.producer = "confluent" if confluent_available() else "kafka-python"
    if min(args.domains) * args.items < args.min_items:
        parser.error(f"--domains x --items must be at least --min-items ({args.min_items})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    wall = time.perf_counter()
    runs: list[Run] = []
    with broker(args.bootstrap, "domains") as bootstrap:
        for n in args.domains:
            if runs and args.start_by is not None and time.time() > args.start_by:
                print(f"{n:,} domains skipped: past --start-by", flush=True)
                continue
            print(f"{n:,} domains on {bootstrap}", flush=True)
            dr = DomainsRun(args, bootstrap, n)
            try:
                run = dr.run()
            except AdacodeError as exc:  # the worker exited: report what was seen
                run = dr.run_
                run.notes.append(str(exc))
                run.figures.update(figures(run, args))
            run.figures["requeued"] = [
                int(g.group(1)) for ln in dr.log_lines if (g := _REQUEUED.search(ln.msg))
            ]
            summarize_pool(run, pool_size(dr.log_lines))
            runs.append(run)
            print(render_table(run, args), flush=True)
            write(runs, args, argv, load_before, wall)
    return 0 if all(r.figures.get("exactly_once", {}).get("held") for r in runs) else 1


def write(
    runs: Sequence[Run],
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    load_before: tuple[float, float, float],
    wall: float,
) -> None:
    """The markdown, JSON and PNG of the runs so far (rewritten after each D)."""
    load = os.getloadavg()
    growth = ""
    if len(runs) > 1:
        a, b = runs[0], runs[-1]
        ra, rb = a.figures.get("rss_after_ingest_mib"), b.figures.get("rss_after_ingest_mib")
        if ra and rb and b.n_domains != a.n_domains:
            growth = (
                f"\nRSS growth per domain between D={a.n_domains} and D={b.n_domains}: "
                f"{(rb - ra) / (b.n_domains - a.n_domains):.2f} MiB.\n"
            )
    header = (
        "## bench/domains.py: many small domains through the broker and `adacode run`\n\n"
        f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, {load[0]:.1f} now; "
        f"wall {time.perf_counter() - wall:.0f} s; command: "
        f"`python bench/domains.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n"
    )
    text = header + growth + "\n" + "\n\n".join(render_table(r, args) for r in runs) + "\n"
    out_path("domains.md").write_text(text)
    out_path("domains.json").write_text(
        json.dumps({"args": vars(args), "runs": [to_json(r) for r in runs]}, indent=1, default=str)
    )
    plot(runs, out_path("domains.png"))
    print(f"wrote bench/out/domains.md, domains.json, domains.png ({len(runs)} D)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
