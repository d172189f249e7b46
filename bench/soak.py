"""Soak: one worker process under a steady event rate for a long time, with scheduled fine-tunes.

One command::

    python -m bench.soak [--duration-min 30] [--rate 200] [--finetune-interval-s 300]
                         [--dataset DIR] [--sample-s 10] [--warmup-min M] [--bootstrap HOST:PORT]

Without ``--bootstrap`` it starts its own broker (``ops/kafka.sh up`` on free ports, stopped at
the end). The worker is the real daemon (``python -m worker.commands.cli run``) with its own RocksDB in a
temporary directory, fine-tuning every domain each ``--finetune-interval-s`` seconds; its log
is ``bench/out/soak_worker.log``.

The stream, produced at ``--rate`` events/s by a paced producer in this process:

* synthetic (default): a catalogue of items with ``--dim``-float embeddings in two domains, then
  an endless mix of interactions (Zipf popularity, plus some traffic on the newest items) and a
  trickle of new items (``--new-item-share``), so state, codes and the user index keep growing;
* ``--dataset DIR`` (items.jsonl + interactions.csv): its items with their texts (the worker
  encodes them with MiniLM), then its interactions in time order, replayed again and again with
  the timestamps moved forward on each pass.

Every ``--sample-s`` seconds: events applied (``/metrics``: ``adacode_applied_events_total``),
consumer lag, the worker's RSS (``/proc/<pid>/status``), ERROR lines and fine-tune outcomes in
its log. A table row per minute; at the end a summary (applied events per minute: min, median,
max and the median against the offered rate; RSS after the warm-up against the end, growth %
and slope; ERROR lines; fine-tunes started, published, rejected), ``bench/out/soak.json`` and
``bench/out/soak.png`` (RSS and throughput over time, publishes marked). Exits 1 if the worker
died or did not stop cleanly.

The warm-up lasts at least ``--warmup-min`` and until every domain has finished its first
fine-tune with none running (torch's training state and the first index builds are one-time
costs). RSS is compared like for like: the warm-up's last sample and the run's last sample
with no fine-tune running (*idle to idle*), and the median of each stretch between fine-tunes
(a round's training peak is freed at its end: it is neither growth nor a leak). The worker's
``adacode_state_memory_bytes`` (RocksDB memtables, block cache, table readers) is sampled
beside RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from adacode.errors import AdacodeError
from bench.broker import broker, free_port
from bench.common import out_path
from worker.commands.dataset import dataset_domain, read_interactions, read_items
from worker.commands.launch import WorkerProcess
from worker.commands.replay import make_producer
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.ingest.events import interaction_payload, item_payload

REPO = Path(__file__).resolve().parents[1]
BASE_TS = 1_700_000_000
SYNTHETIC_DOMAINS = ("shop", "news")
MIB = 1024 * 1024

#: one event for the producer: (topic name without prefix, key, value)
Event = tuple[str, bytes, bytes]


class SoakError(AdacodeError):
    """The soak could not start its worker or talk to it."""


# -- streams ------------------------------------------------------------------------------------


def synthetic_stream(
    seed: int, n_items: int, n_users: int, dim: int, new_item_share: float
) -> Iterator[Event]:
    """Endless: the catalogue, then interactions with a trickle of new items."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(32, dim))
    clock = BASE_TS

    def new_item(i: int) -> Event:
        domain = SYNTHETIC_DOMAINS[i % len(SYNTHETIC_DOMAINS)]
        emb = centers[i % len(centers)] + 0.35 * rng.normal(size=dim)
        return "items", domain.encode(), item_payload(f"i{i}", domain, clock, embedding=emb)

    for i in range(n_items):
        yield new_item(i)
    total = n_items
    order = rng.permutation(1 << 20)  # popularity rank -> item, fixed for the run
    while True:
        block = 1000
        news = rng.random(block) < new_item_share
        ranks = np.minimum(rng.zipf(1.15, size=block) - 1, (1 << 20) - 1)
        recent = rng.random(block) < 0.1
        users = rng.integers(n_users, size=block)
        for k in range(block):
            clock += 1
            if news[k]:
                yield new_item(total)
                total += 1
                continue
            if recent[k]:  # some traffic on the newest items: tail items turn head
                item = total - 1 - int(rng.integers(max(1, total // 20)))
            else:
                item = int(order[ranks[k]] % total)
            domain = SYNTHETIC_DOMAINS[item % len(SYNTHETIC_DOMAINS)]
            payload = interaction_payload(f"u{users[k]}", f"i{item}", domain, clock)
            yield "interactions", domain.encode(), payload


def dataset_stream(directory: Path) -> Iterator[Event]:
    """Endless: the dataset's items (texts), then its interactions, replayed pass after pass."""
    domains: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    start, end = None, 0
    for it in read_interactions(directory):
        first_seen.setdefault(it.item_id, it.ts)
        start = it.ts if start is None else start
        end = it.ts
    if start is None:
        raise SoakError(f"{directory / 'interactions.csv'} holds no interaction; pick a dataset")
    for item in read_items(directory):
        domains[item.item_id] = item.domain
        ts = first_seen.get(item.item_id, start)
        payload = item_payload(item.item_id, item.domain, ts, text=item.text or item.item_id)
        yield "items", item.domain.encode(), payload
    default = dataset_domain(directory)
    shift, span = 0, end - start + 1
    while True:
        for it in read_interactions(directory):
            domain = domains.get(it.item_id, default)
            payload = interaction_payload(it.user_id, it.item_id, domain, it.ts + shift)
            yield "interactions", domain.encode(), payload
        shift += span


class PacedProducer(threading.Thread):
    """Sends ``stream`` at ``rate`` events/s until stopped; counts what was sent."""

    def __init__(self, settings: Settings, stream: Iterator[Event], rate: float) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self.settings = settings
        self.stream = stream
        self.rate = rate
        self.sent = 0
        self.failed = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def _count_failure(self, _exc: BaseException) -> None:
        self.failed += 1

    def run(self) -> None:
        try:
            producer = make_producer(self.settings)
            try:
                started = time.perf_counter()
                for topic, key, value in self.stream:
                    if self.stop_event.is_set():
                        break
                    future = producer.send(self.settings.topic(topic), key=key, value=value)
                    future.add_errback(self._count_failure)
                    self.sent += 1
                    ahead = self.sent / self.rate - (time.perf_counter() - started)
                    if ahead > 0.005:
                        self.stop_event.wait(ahead)
                producer.flush(timeout=60)
            finally:
                producer.close(timeout=30)
        except (KafkaError, AdacodeError) as exc:
            self.error = exc


# -- observing the worker -----------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the stream started
    sent: int
    applied: float
    lag: float
    rss_mib: float
    errors: int
    started: int
    published: int
    rejected: int
    state_mib: float = 0.0  # adacode_state_memory_bytes, all parts (memtables, block cache, ...)
    domains_tuned: int = 0  # domains with a finished fine-tune so far


ERROR_LINE = re.compile(rb"^\S+ (ERROR|CRITICAL)\b")
FINETUNE_START = re.compile(rb"fine-tune of (\S+) starts")
FINETUNE_DONE = re.compile(rb"fine-tune (\S+): version (\d+) (published|rejected)")


@dataclass
class LogScan:
    """Counts in the worker's log, read incrementally."""

    path: Path
    offset: int = 0
    errors: int = 0
    tracebacks: int = 0
    started: int = 0
    published: int = 0
    rejected: int = 0
    first_errors: list[str] = field(default_factory=list)
    domains_started: set[bytes] = field(default_factory=set)
    domains_done: set[bytes] = field(default_factory=set)  # a fine-tune published or rejected

    def update(self) -> None:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        cut = chunk.rfind(b"\n") + 1  # whole lines only
        self.offset += cut
        for line in chunk[:cut].splitlines():
            if ERROR_LINE.match(line):
                self.errors += 1
                if len(self.first_errors) < 5:
                    self.first_errors.append(line.decode(errors="replace")[:300])
            elif line.startswith(b"Traceback"):
                self.tracebacks += 1
            elif started := FINETUNE_START.search(line):
                self.started += 1
                self.domains_started.add(started.group(1))
            elif found := FINETUNE_DONE.search(line):
                self.domains_done.add(found.group(1))
                if found.group(3) == b"published":
                    self.published += 1
                else:
                    self.rejected += 1


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else 0.0


def scrape(port: int) -> dict[str, float]:
    """Applied events and lag summed over their labels, from the worker's /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {"applied": 0.0, "lag": 0.0, "state_mib": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "adacode_applied_events_total":
                out["applied"] += sample.value
            elif sample.name == "adacode_consumer_lag":
                out["lag"] += sample.value
            elif sample.name == "adacode_state_memory_bytes":
                out["state_mib"] += sample.value / MIB
    return out


# -- the run ------------------------------------------------------------------------------------


def worker_env(
    args: argparse.Namespace, bootstrap: str, prefix: str, state: Path, port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADACODE_")}
    dim = 384 if args.dataset else args.dim
    settings = {
        "kafka_bootstrap": bootstrap,
        "topic_prefix": prefix,
        "kafka_group_id": f"{prefix}worker",
        "state_dir": str(state),
        "http_port": port,
        "embedding_dim": dim,
        "encoder_preload": bool(args.dataset),
        "finetune_interval_s": args.finetune_interval_s,
        "finetune_after_interactions": 0,
        "finetune_max_seconds": max(30.0, min(300.0, 0.8 * args.finetune_interval_s)),
        "codebook_min_items": min(1000, args.items) if not args.dataset else 1000,
        "log_level": "INFO",
    }
    for extra in args.worker_setting:
        key, _, value = extra.partition("=")
        settings[key.strip().lower()] = value
    env.update(
        {
            f"ADACODE_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in settings.items()
        }
    )
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def minute_rows(samples: list[Sample], rate: float) -> list[dict[str, Any]]:
    """One row per full minute: what was sent and applied in it, and the state at its end."""
    rows = []
    last = int(samples[-1].t // 60)
    prev = samples[0]
    for minute in range(1, last + 1):
        inside = [s for s in samples if s.t <= 60 * minute]
        end = inside[-1]
        span = end.t - prev.t
        if span <= 0:
            continue
        rows.append(
            {
                "minute": minute,
                "sent": end.sent - prev.sent,
                "applied": end.applied - prev.applied,
                "applied_per_min": (end.applied - prev.applied) * 60.0 / span,
                "offered_per_min": rate * 60.0,
                "lag": end.lag,
                "rss_mib": end.rss_mib,
                "state_mib": end.state_mib,
                "errors": end.errors,
                "published": end.published,
                "rejected": end.rejected,
            }
        )
        prev = end
    return rows


HEADER = (
    f"{'min':>4} {'sent':>8} {'applied':>8} {'applied/min':>11} {'lag':>7} {'RSS MiB':>8} "
    f"{'state MiB':>9} {'errors':>6} {'published':>9} {'rejected':>8}"
)


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['minute']:>4} {row['sent']:>8} {row['applied']:>8.0f} {row['applied_per_min']:>11.0f} "
        f"{row['lag']:>7.0f} {row['rss_mib']:>8.1f} {row['state_mib']:>9.1f} {row['errors']:>6} "
        f"{row['published']:>9} "
        f"{row['rejected']:>8}"
    )


def idle_windows(samples: list[Sample], after_s: float) -> list[tuple[float, float]]:
    """``(start s, median RSS MiB)`` of each stretch of samples after ``after_s`` with no
    fine-tune running: the resident size of the same phase of every round, so a round's
    training peak does not read as growth (nor its release as shrinkage)."""
    out: list[tuple[float, float]] = []
    run: list[Sample] = []
    for sample in [*samples, None]:
        idle = (
            sample is not None
            and sample.t >= after_s
            and sample.started == sample.published + sample.rejected
        )
        if idle:
            run.append(sample)  # type: ignore[arg-type]
            continue
        if len(run) >= 2:
            out.append((run[0].t, statistics.median(s.rss_mib for s in run)))
        run = []
    return out


def warmup_end(samples: list[Sample], at_least_s: float, n_domains: int) -> float:
    """End of the warm-up (s): the first sample, not before ``at_least_s``, at which every
    domain that was ever fine-tuned has finished one fine-tune and none is running, so the
    one-time costs (torch's training state, the first index builds) are behind; without
    such a sample, ``at_least_s``."""
    for s in samples:
        if (
            s.t >= at_least_s
            and n_domains
            and s.domains_tuned >= n_domains
            and s.started == s.published + s.rejected
        ):
            return s.t
    return at_least_s


def summarize(
    samples: list[Sample], rows: list[dict[str, Any]], scan: LogScan, args: argparse.Namespace
) -> dict[str, Any]:
    warm_s = warmup_end(samples, args.warmup_min * 60.0, len(scan.domains_started))
    after = [r for r in rows if r["minute"] * 60 > warm_s] or rows
    per_min = [r["applied_per_min"] for r in after]
    warm = next((s for s in samples if s.t >= warm_s), samples[-1])
    end = samples[-1]
    # like for like: the last sample with no fine-tune running (the warm-up ends on one too)
    idle_end = next(
        (s for s in reversed(samples) if s.t > warm.t and s.started == s.published + s.rejected),
        end,
    )
    tail = [s for s in samples if s.t >= warm_s]
    slope = 0.0
    if len(tail) >= 3:
        hours = np.asarray([s.t for s in tail]) / 3600.0
        slope = float(np.polyfit(hours, np.asarray([s.rss_mib for s in tail]), 1)[0])
    offered = args.rate * 60.0
    median = statistics.median(per_min) if per_min else 0.0
    # the first fine-tune loads torch's training state: steady state starts after it
    tuned = next((s for s in samples if s.published or s.rejected), None)
    since_tuned = (
        (end.rss_mib - tuned.rss_mib) / tuned.rss_mib * 100 if tuned and tuned.rss_mib else None
    )
    # between rounds, from the first idle stretch after the warm-up and the first fine-tune
    windows = idle_windows(samples, max(warm_s, tuned.t if tuned else warm_s))
    between = (windows[-1][1] - windows[0][1]) / windows[0][1] * 100 if len(windows) >= 2 else None
    return {
        "warmup_end_s": warm_s,
        "minutes_measured": len(after),
        "applied_per_min": {
            "min": min(per_min, default=0.0),
            "median": median,
            "max": max(per_min, default=0.0),
            "offered": offered,
            "median_vs_offered": median / offered if offered else 0.0,
        },
        "rss_mib": {
            "after_warmup": warm.rss_mib,
            "at_warmup_s": warm.t,
            "end": end.rss_mib,
            "growth_pct": (end.rss_mib - warm.rss_mib) / warm.rss_mib * 100 if warm.rss_mib else 0,
            "idle_end": idle_end.rss_mib,
            "idle_end_s": idle_end.t,
            "idle_growth_pct": (
                (idle_end.rss_mib - warm.rss_mib) / warm.rss_mib * 100 if warm.rss_mib else 0
            ),
            "slope_mib_per_hour": slope,
            "max": max(s.rss_mib for s in samples),
            "state_after_warmup": warm.state_mib,
            "state_end": end.state_mib,
            "after_first_finetune": tuned.rss_mib if tuned else None,
            "first_finetune_s": tuned.t if tuned else None,
            "growth_since_first_finetune_pct": since_tuned,
            "between_rounds": [{"from_s": t, "median": m} for t, m in windows],
            "between_rounds_growth_pct": between,
        },
        "errors": scan.errors,
        "tracebacks": scan.tracebacks,
        "first_errors": scan.first_errors,
        "finetunes": {
            "started": scan.started,
            "published": scan.published,
            "rejected": scan.rejected,
        },
        "applied": end.applied,
    }


def plot(samples: list[Sample], args: argparse.Namespace, path: Path, warm_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray([s.t for s in samples]) / 60.0
    rss = np.asarray([s.rss_mib for s in samples])
    applied = np.asarray([s.applied for s in samples])
    dt = np.diff(np.asarray([s.t for s in samples]))
    rate = np.diff(applied) / np.where(dt > 0, dt, 1) * 60.0
    publishes = [s.t / 60.0 for p, s in itertools.pairwise(samples) if s.published > p.published]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, rss, color="tab:blue", label="RSS")
    state = np.asarray([s.state_mib for s in samples])
    top.plot(t, state, color="tab:orange", label="of which RocksDB (memtables, cache, readers)")
    top.axvline(warm_s / 60.0, color="grey", linestyle=":", label="end of warm-up")
    top.set_ylabel("worker RSS (MiB)")
    bottom.plot(t[1:], rate, color="tab:green", label="applied events / min")
    bottom.axhline(args.rate * 60, color="grey", linestyle="--", label="offered")
    for x in publishes:
        for ax in (top, bottom):
            ax.axvline(x, color="tab:red", alpha=0.4)
    bottom.plot([], [], color="tab:red", alpha=0.4, label="fine-tune published")
    bottom.set_ylabel("events / min")
    bottom.set_ylim(0, max(float(rate.max(initial=0.0)), args.rate * 60) * 1.15)
    bottom.set_xlabel("minutes")
    bottom.legend(loc="lower right", fontsize=8)
    top.legend(loc="upper left", fontsize=8)
    source = args.dataset or f"synthetic ({args.items} items, dim {args.dim})"
    fig.suptitle(
        f"soak: {args.rate:g} events/s, fine-tune every {args.finetune_interval_s:g} s, {source}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    duration_s = args.duration_min * 60.0
    with (
        broker(args.bootstrap, "soak") as bootstrap,
        tempfile.TemporaryDirectory(prefix="adacode-soak-") as tmp,
    ):
        prefix = f"soak{uuid.uuid4().hex[:6]}."
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
        create_topics(settings, partitions=args.partitions)
        port = free_port()
        log_path = out_path("soak_worker.log")
        env = worker_env(args, bootstrap, prefix, Path(tmp) / "state", port)
        worker = WorkerProcess.start(env, log_path, cwd=REPO, append=False)
        try:
            worker.wait_http(port, "/metrics", timeout_s=120)
            stream = (
                dataset_stream(Path(args.dataset))
                if args.dataset
                else synthetic_stream(
                    args.seed, args.items, args.users, args.dim, args.new_item_share
                )
            )
            producer = PacedProducer(settings, stream, args.rate)
            scan = LogScan(log_path)
            samples: list[Sample] = []
            began = time.monotonic()
            producer.start()
            print(HEADER)
            printed = 0
            died = False
            with tqdm(
                total=int(duration_s),
                unit="s",
                desc="soak",
                leave=False,
                disable=not sys.stderr.isatty(),
            ) as bar:
                while True:
                    elapsed = time.monotonic() - began
                    if worker.poll() is not None:
                        died = True
                        break
                    scan.update()
                    try:
                        metrics = scrape(port)
                    except (OSError, urllib.error.URLError):
                        metrics = {
                            "applied": samples[-1].applied if samples else 0.0,
                            "lag": -1,
                            "state_mib": samples[-1].state_mib if samples else 0.0,
                        }
                    samples.append(
                        Sample(
                            elapsed,
                            producer.sent,
                            metrics["applied"],
                            metrics["lag"],
                            rss_mib(worker.pid),
                            scan.errors,
                            scan.started,
                            scan.published,
                            scan.rejected,
                            metrics["state_mib"],
                            len(scan.domains_done),
                        )
                    )
                    rows = minute_rows(samples, args.rate)
                    for row in rows[printed:]:
                        tqdm.write(format_row(row))
                    printed = len(rows)
                    bar.update(int(elapsed) - bar.n)
                    if elapsed >= duration_s:
                        break
                    time.sleep(max(0.0, min(args.sample_s, duration_s - elapsed)))
            producer.stop_event.set()
            producer.join(timeout=90)
            drained = False
            deadline = time.monotonic() + args.drain_s
            while not died and time.monotonic() < deadline:
                try:
                    if scrape(port)["applied"] >= producer.sent:
                        drained = True
                        break
                except (OSError, urllib.error.URLError):
                    break
                time.sleep(1.0)
            final_applied = samples[-1].applied
            if not died:
                with contextlib.suppress(OSError, urllib.error.URLError):
                    final_applied = scrape(port)["applied"]
        finally:
            worker.stop(timeout_s=120)
        scan.update()
    rows = minute_rows(samples, args.rate)
    summary = summarize(samples, rows, scan, args)
    summary |= {
        "worker_died": died,
        "worker_exit_code": worker.returncode,
        "drained": drained,
        "sent": producer.sent,
        "applied_after_drain": final_applied,
        "producer_failures": producer.failed,
        "producer_error": repr(producer.error) if producer.error else None,
    }
    report(summary, args)
    doc = {
        "args": vars(args),
        "summary": summary,
        "minutes": rows,
        "samples": [asdict(s) for s in samples],
    }
    out_path("soak.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    plot(samples, args, out_path("soak.png"), summary["warmup_end_s"])
    print(f"wrote {out_path('soak.json')}, {out_path('soak.png')} and {log_path}")
    ok = not died and worker.returncode == 0 and producer.error is None
    return 0 if ok else 1


def report(s: dict[str, Any], args: argparse.Namespace) -> None:
    a, r, f = s["applied_per_min"], s["rss_mib"], s["finetunes"]
    print()
    print(
        f"summary over {s['minutes_measured']} minute(s) after a {s['warmup_end_s'] / 60:.1f}-minute "
        f"warm-up (at least {args.warmup_min:g} min, and until every domain was fine-tuned once)"
    )
    print(
        f"{'applied events/min':<28} min {a['min']:.0f}  median {a['median']:.0f}  max {a['max']:.0f}"
    )
    print(
        f"{'  median vs offered':<28} {a['median_vs_offered']:.3f} (offered {a['offered']:.0f}/min)"
    )
    print(
        f"{'worker RSS MiB':<28} after warm-up {r['after_warmup']:.1f}  end {r['end']:.1f}  "
        f"growth {r['growth_pct']:+.1f} %  slope {r['slope_mib_per_hour']:+.1f} MiB/h  max {r['max']:.1f}"
    )
    print(
        f"{'  idle to idle':<28} after warm-up {r['after_warmup']:.1f} -> "
        f"{r['idle_end']:.1f} at {r['idle_end_s'] / 60:.1f} min (no fine-tune running)  "
        f"growth {r['idle_growth_pct']:+.1f} %"
    )
    print(
        f"{'  of which RocksDB':<28} after warm-up {r['state_after_warmup']:.1f}  "
        f"end {r['state_end']:.1f}  (memtables, block cache, table readers: all bounded)"
    )
    if r["after_first_finetune"] is not None:
        print(
            f"{'  since first fine-tune':<28} {r['after_first_finetune']:.1f} at "
            f"{r['first_finetune_s'] / 60:.1f} min -> {r['end']:.1f}  "
            f"growth {r['growth_since_first_finetune_pct']:+.1f} %"
        )
    if r["between_rounds_growth_pct"] is not None:
        medians = "  ".join(f"{w['median']:.0f}" for w in r["between_rounds"])
        print(
            f"{'  between fine-tunes':<28} medians {medians}  "
            f"growth {r['between_rounds_growth_pct']:+.1f} % (first to last)"
        )
    print(f"{'ERROR lines / tracebacks':<28} {s['errors']} / {s['tracebacks']}")
    for line in s["first_errors"]:
        print(f"    {line}")
    print(
        f"{'fine-tunes':<28} started {f['started']}  published {f['published']}  rejected {f['rejected']}"
    )
    print(
        f"{'sent / applied after drain':<28} {s['sent']} / {s['applied_after_drain']:.0f}"
        f"  (drained: {s['drained']}, producer failures {s['producer_failures']})"
    )
    print(
        f"{'worker':<28} {'DIED' if s['worker_died'] else 'alive'}, exit code {s['worker_exit_code']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration-min", type=float, default=30.0, help="how long to stream")
    p.add_argument("--rate", type=float, default=200.0, help="events per second offered")
    p.add_argument("--finetune-interval-s", type=float, default=300.0, help="fine-tune schedule")
    p.add_argument("--dataset", default=None, help="dataset dir (items.jsonl, interactions.csv)")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup-min", type=float, default=None, help="default: max(1, duration/10)")
    p.add_argument("--bootstrap", default=None, help="a running broker (default: start one)")
    p.add_argument("--partitions", type=int, default=3, help="partitions of the event topics")
    p.add_argument("--items", type=int, default=3000, help="synthetic catalogue size")
    p.add_argument("--users", type=int, default=5000, help="synthetic user count")
    p.add_argument("--dim", type=int, default=32, help="synthetic embedding dimension")
    p.add_argument("--new-item-share", type=float, default=0.02, help="synthetic new-item share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drain-s", type=float, default=60.0, help="wait for the backlog at the end")
    p.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra worker setting, e.g. finetune_epochs=5 (repeatable)",
    )
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration_min <= 0 or args.sample_s <= 0:
        p.error("--rate, --duration-min and --sample-s must be positive")
    if args.warmup_min is None:
        args.warmup_min = max(1.0, args.duration_min / 10)
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
