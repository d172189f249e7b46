"""Scale: one domain of N items and M interactions, through the real broker and the real daemon.

One command::

    python bench/scale.py [--items 100000 [N ...]] [--interactions 1000000 [M ...]]
                          [--users U] [--clusters C] [--bootstrap HOST:PORT]
                          [--finetune] [--serve [--serve-rate 200] [--serve-seconds 20]
                          [--new-items 50]] [--worker-setting KEY=VALUE ...]

Without ``--bootstrap`` it starts its own broker (``ops/kafka.sh up`` on free ports, stopped at
the end). For each catalogue size (``--items`` may take several values; ``--interactions`` and
``--users`` one value for all or one per size):

1. **Generate** one domain, seeded and streamed in chunks (no list of every event, no matrix
   of every embedding is ever held): items carry 384-float embeddings drawn from a Gaussian
   mixture (``--clusters`` centres, L2-normalized), so codes mean something; item popularity
   is Zipf (exponent 1.1 over a shuffled rank); each user walks within a few favourite
   clusters (``USER_CLUSTERS``, 90 %; otherwise anywhere), picking items by popularity, so
   sequences carry signal.
2. **Items**: every item event is produced (the produce rate is timed), then the worker
   (``adacode run`` as a subprocess, ``WorkerProcess``, its own RocksDB in a temp dir, a free
   HTTP port, JSON logs in ``bench/out/scale_worker_<N>.log``) applies them and trains its
   codebook; the bench waits for the codebook's log line, then stops the worker (SIGTERM).
3. **Interactions**: every interaction is produced while no worker runs (so the producer does
   not share the 2 cores with it), then the worker is started again on the same state and
   applies the backlog. Restarting is what separates "items, then interactions" on two topics:
   a worker reading both backlogs at once would interleave them.
4. Optional: ``--finetune`` asks for a fine-tune on the control topic (as ``adacode
   finetune`` does with a worker running) and times it until ``/v1/domains/<d>/versions``
   shows the version served; ``--serve`` measures serving (issue 13's goals at 1M items:
   recommend p99 < 20 ms and similar p99 < 10 ms at 200 requests/s; a new item servable
   within 250 ms p99), in three steps:

   * sequential samples: ``--serve-requests`` pairs of ``/similar`` and
     ``/users/<u>/recommend`` one after the other (p50, p99);
   * paced load: open loop at ``--serve-rate`` requests/s for ``--serve-seconds``, recommend
     and similar in turn (items among the most popular tenth, users by activity, as the
     samples), fired on schedule from ``--serve-threads`` threads with keep-alive
     connections; each latency counts from its scheduled instant, so a request that waited
     for a busy thread counts its wait (no coordinated omission);
   * new items: ``--new-items`` items not in the catalogue (embeddings drawn like the
     catalogue's), produced one at a time with the bench's producer client (acks=1, no
     linger); for each, ``/items/<new>/similar`` is asked every ~5 ms until it answers 200
     (produce-to-servable; after 10 s the item counts as not servable, and after 3 such in a
     row the step stops).

While a worker runs, a thread polls ``/metrics`` every ``--poll-s`` seconds (after the previous
scrape returned) and ``/proc/<pid>/status``. The table per size:

* produce rate (records/s and MB/s, acks=1; confluent-kafka when installed, else
  kafka-python: ``--producer``);
* applied interactions/s overall and per decile (the time the ``adacode_applied_events_total``
  interaction counter took to cross each tenth, interpolated between polls);
* longest consumer pause: the longest gap between two polls at which the applied counter moved
  with events still waiting (an upper bound: it includes up to one poll interval); beside it
  the ``adacode_batch_seconds`` histogram's bound on the longest batch (the daemon's own
  figure);
* bootstrap: the codebook's training time, from its log line (``... in X s`` when the worker
  logs its duration; else from a start line; else from the last poll with fewer items applied
  than ``codebook_min_items`` to the "trained codebook" line, marked ``~``) and the RSS growth
  during it (the kernel's peak ``VmHWM`` after it minus ``VmRSS`` before it);
* code rounds: median and max of the worker's INFO lines ``code round ... N items ... X ms``
  (any order; ``n/a`` when the worker does not log them);
* ``/metrics`` scrape time (median, max) of the bench's own scrapes;
* worker RSS after ingest and its peak (``VmHWM``), RocksDB size on disk after the stop;
* fine-tune time, index build (from the worker's log lines) and latency, when asked: the
  sequential samples' p50 / p99; per kind of the paced load p50 / p90 / p99 / max, the
  achieved rate and the HTTP statuses (non-200 counted); new items' produce-to-servable
  p50 / p99 / max and how many were servable.

Writes ``bench/out/scale.md`` (the tables), ``bench/out/scale.json`` and ``bench/out/scale.png``
(applied interactions/s over time with the deciles, and RSS over time with the bootstrap
shaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import http.client
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adacode.errors import AdacodeError
from bench.broker import broker, confluent_available, free_port, produce_stream
from bench.common import (
    dir_size_mib,
    drop_topics,
    gc_pauses_between,
    longest_batch_bound,
    out_path,
    proc_cpu_s,
    proc_memory_mib,
    scrape_metrics,
    trims_between,
    worker_env,
)
from worker.commands.launch import WorkerProcess
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.core.threads import start_every_thread
from worker.ingest.events import interaction_payload

REPO = Path(__file__).resolve().parents[1]
DIM = 384
BASE_TS = 1_700_000_000  # seconds, as the worker's popularity decay reads them
SPAN_S = 30 * 86_400  # the interactions' timestamps cover 30 days
ZIPF_EXPONENT = 1.1
USER_CLUSTERS = 3  # favourite clusters per user
EXPLORE = 0.1  # share of a user's interactions outside its favourites
CLUSTER_SPREAD = 0.6  # noise norm / centre norm of the Gaussian mixture
ITEM_CHUNK = 2_000
INTERACTION_CHUNK = 100_000
# issue 13's goals at 1M items: paced p99 per kind, and produce-to-servable p99 of a new item
PACED_GOAL_P99_MS = {"user_recommend": 20.0, "similar": 10.0}
NEW_ITEM_GOAL_P99_MS = 250.0
NEW_ITEM_POLL_S = 0.005  # the new item's /similar is asked every ~5 ms ...
NEW_ITEM_TIMEOUT_S = 10.0  # ... until it answers 200, or this long: not servable
NEW_ITEM_GIVE_UP = 3  # stop producing new items after this many in a row were not servable


class ScaleBenchError(AdacodeError):
    """The scale benchmark could not produce its events or drive the worker."""


# ======================================================================================
# the generated domain
# ======================================================================================


@dataclass(frozen=True)
class Spec:
    """What to generate; ``seed`` fixes every draw."""

    items: int
    interactions: int
    users: int
    clusters: int
    seed: int = 0
    domain: str = "scale"


def auto_clusters(n_items: int) -> int:
    """Mixture components for a catalogue: about sqrt(N)/2, within 16..512."""
    return int(min(512, max(16, round(math.sqrt(n_items) / 2))))


class SyntheticDomain:
    """The structure of one generated domain, held as small arrays (O(items + users) numbers,
    never the embeddings); events come out of :meth:`item_chunks` and
    :meth:`interaction_chunks` a chunk at a time, each chunk from its own seeded generator,
    so the output depends only on the spec."""

    def __init__(self, spec: Spec) -> None:
        if spec.items < 1 or spec.interactions < 0 or spec.users < 1 or spec.clusters < 1:
            raise ScaleBenchError(f"{spec}: items, users and clusters must be at least 1")
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        centres = rng.standard_normal((spec.clusters, DIM))
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        self.item_cluster = rng.integers(0, spec.clusters, size=spec.items).astype(np.int32)
        # Zipf popularity: rank r weighs r^-s; ranks shuffled over the items
        self.weight = (np.arange(1, spec.items + 1, dtype=np.float64) ** -ZIPF_EXPONENT)[
            rng.permutation(spec.items)
        ]
        # items grouped by cluster; cumulative popularity inside each group
        self.members = np.argsort(self.item_cluster, kind="stable").astype(np.int64)
        self.bounds = np.searchsorted(
            self.item_cluster[self.members], np.arange(spec.clusters + 1)
        ).astype(np.int64)
        self.cum = np.cumsum(self.weight[self.members])
        mass = np.array(
            [
                self.weight[self.members[a:b]].sum()
                for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)
            ]
        )
        self.cluster_cdf = np.cumsum(mass) / mass.sum()
        # users: a few favourite clusters (drawn by cluster mass), Pareto activity
        self.favourites = np.searchsorted(
            self.cluster_cdf, rng.random((spec.users, USER_CLUSTERS)), side="right"
        ).clip(max=spec.clusters - 1)
        activity = rng.pareto(1.5, size=spec.users) + 1.0
        self.user_cdf = np.cumsum(activity) / activity.sum()

    def item_id(self, i: int) -> str:
        return f"i{i:07d}"

    def item_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first item index, float32 [m, DIM] L2-normalized embeddings)`` per chunk of
        ``ITEM_CHUNK`` items (a fixed size: each chunk has its own generator)."""
        chunk = ITEM_CHUNK
        for c, start in enumerate(range(0, self.spec.items, chunk)):
            stop = min(start + chunk, self.spec.items)
            rng = np.random.default_rng([self.spec.seed, 1, c])
            yield start, self.mixture_vectors(self.item_cluster[start:stop], rng)

    def mixture_vectors(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float32 [len(clusters), DIM]: each cluster's centre plus noise of norm
        ``CLUSTER_SPREAD``, L2-normalized (how every generated item's embedding is drawn)."""
        noise = rng.standard_normal((len(clusters), DIM)).astype(np.float32)
        noise *= CLUSTER_SPREAD / np.linalg.norm(noise, axis=1, keepdims=True)
        vectors = self.centres[clusters] + noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def new_item_events(self, n: int) -> list[tuple[str, bytes, bytes]]:
        """``(item id, key, value)`` of ``n`` items that are not in the catalogue (ids
        ``n0000000``...; the catalogue's are ``i...``), their embeddings drawn like the
        catalogue's (a uniform cluster, the same noise), from their own seeded generator."""
        rng = np.random.default_rng([self.spec.seed, 3])
        clusters = rng.integers(0, self.spec.clusters, size=n)
        vectors = self.mixture_vectors(clusters, rng)
        key, domain = self.spec.domain.encode(), self.spec.domain
        ts = BASE_TS + SPAN_S  # after every catalogue event
        return [
            (f"n{j:07d}", key, item_value(f"n{j:07d}", domain, ts, vec))
            for j, vec in enumerate(vectors)
        ]

    def serve_picks(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        """``n`` items (uniform over the most popular tenth) and ``n`` users (by activity)
        to ask ``/similar`` and ``/users/<u>/recommend`` about."""
        popular = np.argsort(-self.weight)[: max(1, self.spec.items // 10)]
        users = np.searchsorted(self.user_cdf, rng.random(n), side="right")
        items = rng.choice(popular, size=n)
        return (
            [self.item_id(int(i)) for i in items],
            [f"u{min(int(u), self.spec.users - 1):07d}" for u in users],
        )

    def interaction_chunks(
        self, extra: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(users, items, ts)`` int64 arrays per chunk of ``INTERACTION_CHUNK``, in time order;
        with ``extra``, that many more interactions of the same users, after every one of the
        stream (their own generators: the incremental fine-tune's new data)."""
        n, chunk = extra or self.spec.interactions, INTERACTION_CHUNK
        for c, start in enumerate(range(0, n, chunk)):
            m = min(start + chunk, n) - start
            rng = np.random.default_rng([self.spec.seed, 3 if extra else 2, c])
            users = np.searchsorted(self.user_cdf, rng.random(m), side="right").clip(
                max=self.spec.users - 1
            )
            favourite = self.favourites[users, rng.integers(0, USER_CLUSTERS, size=m)]
            anywhere = np.searchsorted(self.cluster_cdf, rng.random(m), side="right").clip(
                max=self.spec.clusters - 1
            )
            clusters = np.where(rng.random(m) < EXPLORE, anywhere, favourite)
            lo, hi = self.bounds[clusters], self.bounds[clusters + 1]
            base = np.where(lo > 0, self.cum[np.maximum(lo - 1, 0)], 0.0)
            target = base + rng.random(m) * (self.cum[hi - 1] - base)
            pos = np.searchsorted(self.cum, target, side="right").clip(lo, hi - 1)
            items = self.members[pos]
            ts = BASE_TS + (np.arange(start, start + m, dtype=np.int64) * SPAN_S) // max(1, n)
            if extra:  # the span again, after the first one
                ts = ts + SPAN_S
            yield users.astype(np.int64), items, ts

    # -- events ---------------------------------------------------------------------------

    def item_events(self) -> Iterator[tuple[bytes, bytes]]:
        """Item events with their embedding (the float32 values, shortest repr)."""
        key = self.spec.domain.encode()
        for start, vectors in self.item_chunks():
            for j, vec in enumerate(vectors):
                i = start + j
                yield key, item_value(self.item_id(i), self.spec.domain, BASE_TS + i % 1000, vec)

    def interaction_events(self, extra: int = 0) -> Iterator[tuple[bytes, bytes]]:
        key = self.spec.domain.encode()
        domain = self.spec.domain
        for users, items, ts in self.interaction_chunks(extra):
            for u, i, t in zip(users.tolist(), items.tolist(), ts.tolist(), strict=True):
                yield key, interaction_payload(f"u{u:07d}", self.item_id(i), domain, t)


def item_value(item_id: str, domain: str, ts: int, vector: np.ndarray) -> bytes:
    """An item event as ``worker.ingest.events.item_payload`` writes it, but with the float32
    values in their shortest form (orjson's numpy support): half the bytes of the float64 repr,
    as a producer holding float32 embeddings would send them."""
    return orjson.dumps(
        {"item_id": item_id, "domain": domain, "text": None, "embedding": vector, "ts": ts},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


# ======================================================================================
# the worker's log
# ======================================================================================


@dataclass(frozen=True)
class LogLine:
    ts: float | None  # epoch seconds (JSON logs); None for a line without a full timestamp
    msg: str


def read_log(path: Path, offset: int = 0) -> list[LogLine]:
    """The worker's log lines from byte ``offset``: JSON lines with their time, other lines
    (human format, tracebacks) with ``ts=None``."""
    out: list[LogLine] = []
    with path.open("rb") as fh:
        fh.seek(offset)
        for raw in fh:
            out.append(parse_log_line(raw.decode(errors="replace")))
    return out


def parse_log_line(line: str) -> LogLine:
    line = line.strip()
    if line.startswith("{"):
        try:
            doc = orjson.loads(line)
            ts = datetime.fromisoformat(str(doc["ts"]).replace("Z", "+00:00")).timestamp()
            return LogLine(ts, str(doc.get("msg", "")))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            pass
    return LogLine(None, line)


_DURATION = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*)\s*(ms|s|sec|seconds?)\b", re.IGNORECASE)
_ITEMS = re.compile(r"(\d[\d,_]*)\s+items?\b", re.IGNORECASE)
_CODE_ROUND = re.compile(r"\bcode[- ]round\b", re.IGNORECASE)
_CODEBOOK_DONE = re.compile(
    r"\btrained\b.*\bcodebook\b|\bcodebook\b.*\b(trained|ready)\b", re.IGNORECASE
)
_CODEBOOK_START = re.compile(
    r"\b(training|bootstrapping|starts?|started)\b.*\bcodebook\b|\bcodebook\b.*\b(starts?|started|training)\b",
    re.IGNORECASE,
)


_FINETUNE_VERSION = re.compile(r"fine-tune \S+: version \d+")
_CUT_OVER = re.compile(r"codebook migration: cut over from")
_MIGRATED = re.compile(r"codebook migration to \S+: every item is coded")
_FINETUNE_OUTCOME = re.compile(
    r"fine-tune \S+: version (\d+) (published|rejected) \((.*)\) in ([\d.]+) s"
)
_FINETUNE_FAILED = re.compile(
    r"fine-tune.*\b(over budget|rejected|skipped|abandoned|dropped|failed|not published)\b",
    re.IGNORECASE,
)


def _number(text: str) -> float:
    return float(text.replace(",", "").replace("_", ""))


def duration_ms(msg: str) -> float | None:
    """The first duration in a message (``12 ms``, ``0.4 s``, ``1.2 seconds``) in ms."""
    found = _DURATION.search(msg)
    if found is None:
        return None
    value = _number(found.group(1))
    return value if found.group(2).lower() == "ms" else value * 1000.0


@dataclass(frozen=True)
class CodeRound:
    ts: float | None
    items: int | None
    ms: float | None


def code_rounds(lines: Sequence[LogLine]) -> list[CodeRound]:
    """Every ``code round`` log line, with the item count and duration it names (if any)."""
    out = []
    for line in lines:
        if _CODE_ROUND.search(line.msg):
            items = _ITEMS.search(line.msg)
            out.append(
                CodeRound(
                    line.ts,
                    None if items is None else int(_number(items.group(1))),
                    duration_ms(line.msg),
                )
            )
    return out


@dataclass(frozen=True)
class Bootstrap:
    start: float | None  # epoch seconds
    end: float | None
    seconds: float | None
    how: str  # "logged", "start line", "~ last poll below codebook_min_items", "not seen"


def find_bootstrap(
    lines: Sequence[LogLine], samples: Sequence[Sample], min_items: int
) -> Bootstrap:
    """The codebook training, from the worker's log (see the module docstring)."""
    done = next((ln for ln in lines if _CODEBOOK_DONE.search(ln.msg)), None)
    if done is None:
        return Bootstrap(None, None, None, "not seen")
    logged = duration_ms(done.msg)
    if logged is not None and done.ts is not None:
        return Bootstrap(done.ts - logged / 1000, done.ts, logged / 1000, "logged")
    start = next(
        (
            ln
            for ln in lines
            if ln.ts is not None
            and not ln.msg.startswith("starting worker with settings")
            and _CODEBOOK_START.search(ln.msg)
            and not _CODEBOOK_DONE.search(ln.msg)
            and (done.ts is None or ln.ts <= done.ts)
        ),
        None,
    )
    if start is not None and start.ts is not None and done.ts is not None:
        return Bootstrap(start.ts, done.ts, done.ts - start.ts, "start line")
    if done.ts is None:
        return Bootstrap(None, None, None, "line without a time")
    before = [s.t for s in samples if s.t <= done.ts and s.items < min_items]
    if not before:
        return Bootstrap(None, done.ts, None, "no poll before it")
    return Bootstrap(before[-1], done.ts, done.ts - before[-1], "~ last poll below min items")


# ======================================================================================
# watching the worker
# ======================================================================================


@dataclass(frozen=True)
class Sample:
    t: float  # epoch seconds, the middle of the scrape
    scrape_s: float
    items: float
    interactions: float
    lag: float
    rss_mib: float
    hwm_mib: float
    cpu_s: float
    batch_bound_s: float | None


class Monitor(threading.Thread):
    """Polls the worker's ``/metrics`` and ``/proc`` every ``poll_s`` seconds until stopped."""

    def __init__(self, worker: WorkerProcess, port: int, poll_s: float) -> None:
        super().__init__(daemon=True, name="scale-monitor")
        self.worker, self.port, self.poll_s = worker, port, poll_s
        self.samples: list[Sample] = []
        self.failures = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.worker.poll() is None:
            started = time.time()
            try:
                got = scrape_metrics(self.port)
            except (OSError, urllib.error.URLError, ValueError):
                self.failures += 1
                self.done.wait(self.poll_s)
                continue
            rss, hwm = proc_memory_mib(self.worker.pid)
            self.samples.append(
                Sample(
                    t=started + got.seconds / 2,
                    scrape_s=got.seconds,
                    items=got.applied.get("item", 0.0),
                    interactions=got.applied.get("interaction", 0.0),
                    lag=got.lag,
                    rss_mib=rss,
                    hwm_mib=hwm,
                    cpu_s=proc_cpu_s(self.worker.pid),
                    batch_bound_s=longest_batch_bound(got.batch_buckets),
                )
            )
            self.done.wait(self.poll_s)

    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None


# ======================================================================================
# figures from the samples
# ======================================================================================


def crossing_time(t: Sequence[float], counts: Sequence[float], level: float) -> float | None:
    """When ``counts`` (non-decreasing, sampled at ``t``) first reached ``level``, linearly
    interpolated between the two samples around it; ``None`` if it never did."""
    for k, c in enumerate(counts):
        if c >= level:
            if k == 0 or counts[k - 1] >= c:
                return t[k]
            c0 = counts[k - 1]
            return t[k - 1] + (t[k] - t[k - 1]) * (level - c0) / (c - c0)
    return None


def start_time(t: Sequence[float], counts: Sequence[float]) -> float | None:
    """The last sample before the counter first moved (the work began after it)."""
    for k, c in enumerate(counts):
        if c > 0:
            return t[k - 1] if k > 0 else t[0]
    return None


def decile_rates(t: Sequence[float], counts: Sequence[float], total: int) -> list[float | None]:
    """Records/s over each tenth of ``total``: tenth k took from the crossing of (k-1)/10 to
    that of k/10 (the first from :func:`start_time`); ``None`` for a tenth not reached."""
    begin = start_time(t, counts)
    edges: list[float | None] = [begin] + [
        crossing_time(t, counts, total * k / 10) for k in range(1, 11)
    ]
    out: list[float | None] = []
    for a, b in itertools.pairwise(edges):
        out.append(None if a is None or b is None or b <= a else total / 10 / (b - a))
    return out


def longest_pause(t: Sequence[float], counts: Sequence[float], total: float) -> float:
    """The longest time between two samples at which ``counts`` moved, while it was below
    ``total`` (events waiting): an upper bound of the longest stall, within one poll."""
    moved = [k for k in range(1, len(counts)) if counts[k] > counts[k - 1]]
    longest = 0.0
    for a, b in itertools.pairwise(moved):
        if counts[a] < total:
            longest = max(longest, t[b] - t[a])
    if moved and counts[moved[-1]] < total and len(t) > moved[-1] + 1:
        longest = max(longest, t[-1] - t[moved[-1]])  # stuck at the end
    return longest


def quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p99": None, "max": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(arr)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
        "n": len(values),
    }


#: a /metrics scrape slower than this is listed with when it happened
SLOW_SCRAPE_MS = 50.0


def slow_scrapes(result: SizeResult) -> list[dict[str, Any]]:
    """The scrapes over :data:`SLOW_SCRAPE_MS`, each with its phase, its time (epoch
    seconds, to find it in the worker's log) and seconds since the phase's worker start."""
    return [
        {"phase": name, "t": s.t, "after_start_s": s.t - p.started_at, "ms": 1000 * s.scrape_s}
        for name, p in result.phases.items()
        for s in p.samples
        if 1000 * s.scrape_s > SLOW_SCRAPE_MS
    ]


def latency_quantiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 / max (and n) of latencies in ms; ``None`` each when there are none."""
    if not values_ms:
        return {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    arr = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(arr.max()),
        "n": len(values_ms),
    }


def pace_schedule(rate: float, seconds: float) -> np.ndarray:
    """Send instants (s from the start) of an open-loop run: ``rate`` per second, evenly
    spaced, ``floor(rate * seconds)`` of them, all before ``seconds``."""
    if rate <= 0 or seconds <= 0:
        return np.zeros(0)
    n = math.floor(rate * seconds + 1e-9)
    return np.arange(n, dtype=np.float64) / rate


def count_statuses(statuses: Sequence[int]) -> dict[int, int]:
    """HTTP status -> how many (0: no answer: the connection failed or timed out)."""
    out: dict[int, int] = {}
    for status in statuses:
        out[status] = out.get(status, 0) + 1
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Shot:
    """One request of a paced run: its kind, when it was due and answered (s from the
    start), its status."""

    kind: str
    due: float
    done: float
    status: int


#: a paced request slower than this is part of a stall (:func:`paced_stalls`)
STALL_MS = 50.0


def paced_stalls(shots: Sequence[Shot], gap_s: float = 0.5) -> list[dict[str, float]]:
    """The stalls of a paced run: requests over :data:`STALL_MS`, every kind, grouped while
    each was due within ``gap_s`` of the last; per stall its first due instant (s from the
    start), how many requests it delayed and the slowest (ms). Where in the window the tail
    came from, to set beside the worker's log."""
    slow = sorted((s for s in shots if 1000 * (s.done - s.due) > STALL_MS), key=lambda s: s.due)
    stalls: list[dict[str, float]] = []
    last = -math.inf
    for shot in slow:
        ms = 1000 * (shot.done - shot.due)
        if shot.due - last > gap_s:
            stalls.append({"at_s": shot.due, "requests": 0.0, "max_ms": 0.0})
        stall = stalls[-1]
        stall["requests"] += 1
        stall["max_ms"] = max(stall["max_ms"], ms)
        last = shot.due
    return stalls


def paced_figures(shots: Sequence[Shot]) -> dict[str, dict[str, Any]]:
    """Per kind: latency quantiles from each request's scheduled instant (so queueing,
    in the bench's pool or in the worker, counts: no coordinated omission), the achieved
    rate (requests answered / the time from the first due instant to the last answer),
    the statuses and the non-200 count."""
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(s.kind for s in shots):
        mine = [s for s in shots if s.kind == kind]
        span = max(s.done for s in mine) - min(s.due for s in mine)
        out[kind] = latency_quantiles([1000 * (s.done - s.due) for s in mine]) | {
            "achieved_per_s": len(mine) / span if span > 0 else None,
            "statuses": count_statuses([s.status for s in mine]),
            "non_200": sum(1 for s in mine if s.status != 200),
        }
    return out


class ClientGc:
    """The bench's own collector during a measured load: its long-lived objects (the
    generated domain and the run's records) frozen out of the collector's reach, so a full
    pass over them does not stall the client's threads and count as the worker's latency
    (a load generator must not measure itself), and every pass that still runs timed by
    generation. ``freeze=False`` (``--client-gc as-is``) only times them."""

    def __init__(self, *, freeze: bool = True) -> None:
        self.freeze = freeze
        self.pauses: dict[int, list[float]] = {}
        self.frozen = 0
        self._began = 0.0

    def __enter__(self) -> ClientGc:
        if self.freeze:
            gc.collect()
            gc.freeze()
            self.frozen = gc.get_freeze_count()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)
        if self.freeze:
            gc.unfreeze()

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            gen = self.pauses.setdefault(info["generation"], [])
            gen.append(time.perf_counter() - self._began)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            str(gen): {"passes": float(len(p)), "longest_s": max(p)}
            for gen, p in sorted(self.pauses.items())
        }


class KeepAlive:
    """One keep-alive ``http.client.HTTPConnection`` per thread to the worker's API."""

    def __init__(self, port: int, timeout_s: float = 10.0) -> None:
        self.port, self.timeout_s = port, timeout_s
        self.local = threading.local()
        self.every: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()

    def get(self, path: str) -> int:
        """The status of ``GET path`` (body read and dropped); 0 when it got no answer."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
            self.local.conn = conn
            with self.lock:
                self.every.append(conn)
        for attempt in (1, 2):
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                return resp.status
            except (OSError, http.client.HTTPException):
                conn.close()  # the server may have closed an idle keep-alive connection:
                if attempt == 2:  # one retry (request() opens a new connection), as
                    self.local.conn = None  # HTTP clients do for an idempotent GET
                    return 0
        return 0

    def close(self) -> None:
        with self.lock:
            for conn in self.every:
                conn.close()


def run_paced(
    requests: Sequence[tuple[str, str]],
    offsets: np.ndarray,
    send: Callable[[str], int],
    threads: int,
) -> list[Shot]:
    """Fire ``requests[k]`` (kind, path) at ``offsets[k]`` s from now on a pool of
    ``threads``; each shot's latency counts from its due instant, whether it left late
    (the pool was busy) or not.

    Every thread of the pool is started before the first shot: a ``ThreadPoolExecutor``
    starts one at a submit that finds none idle, and ``Thread.start`` waits for the new
    thread to run, so a short delay of the worker made the scheduling loop start threads
    one after the other, every shot due meanwhile counted late (the client measuring
    itself, as the worker's server did before its handler threads were started up front)."""
    shots: list[Shot | None] = [None] * len(offsets)

    def fire(k: int, due: float) -> None:
        kind, path = requests[k]
        status = send(path)
        shots[k] = Shot(kind, due - start, time.perf_counter() - start, status)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="scale-paced") as pool:
        start_every_thread(pool, threads)
        start = time.perf_counter() + 0.05
        for k, offset in enumerate(offsets.tolist()):
            due = start + offset
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            pool.submit(fire, k, due)
    return [s for s in shots if s is not None]


def poll_until_ok(
    ask: Callable[[], int], started: float, every_s: float, timeout_s: float
) -> float | None:
    """Call ``ask`` every ``every_s`` (from the start of one call to the next) until it
    returns 200: seconds from ``started`` (``time.perf_counter()``) to that answer; ``None``
    when ``timeout_s`` after ``started`` passed first."""
    deadline = started + timeout_s
    while True:
        asked = time.perf_counter()
        if ask() == 200:
            return time.perf_counter() - started
        if time.perf_counter() >= deadline:
            return None
        time.sleep(max(0.0, min(asked + every_s, deadline) - time.perf_counter()))


class OneByOneProducer:
    """The bench's producer client (``--producer``), sending one record at a time and
    waiting for the broker's ack (acks=1, no linger): what a catalogue service does when
    one new item appears."""

    def __init__(self, bootstrap: str, client: str) -> None:
        self.client = client
        if client == "confluent":
            from confluent_kafka import Producer

            self.confluent = Producer({"bootstrap.servers": bootstrap, "acks": 1, "linger.ms": 0})
        else:
            from kafka import KafkaProducer

            self.kafka = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        if self.client == "confluent":
            failed: list[object] = []
            self.confluent.produce(
                topic, value=value, key=key, on_delivery=lambda err, _m: failed.append(err)
            )
            left = self.confluent.flush(30)
            if left or any(err is not None for err in failed):
                raise ScaleBenchError(f"a new item was not delivered to {topic}: {failed}")
        else:
            self.kafka.send(topic, key=key, value=value).get(timeout=30)

    def __enter__(self) -> OneByOneProducer:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.client == "confluent":
            self.confluent.flush(30)
        else:
            self.kafka.close(timeout=30)


# ======================================================================================
# one catalogue size
# ======================================================================================


@dataclass
class Phase:
    """One worker run (items, or interactions) and what was seen of it."""

    name: str
    expected: int
    samples: list[Sample] = field(default_factory=list)
    started_at: float = 0.0  # epoch seconds the process was started
    finished_at: float | None = None  # when the expected count was reached
    exit_code: int | None = None
    stop_s: float = 0.0
    scrape_failures: int = 0
    note: str = ""
    log: list[LogLine] = field(default_factory=list)

    def counts(self) -> list[float]:
        key = "items" if self.name == "items" else "interactions"
        return [getattr(s, key) for s in self.samples]

    def times(self) -> list[float]:
        return [s.t for s in self.samples]


@dataclass
class SizeResult:
    spec: Spec
    produce: dict[str, dict[str, float]] = field(default_factory=dict)
    phases: dict[str, Phase] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


class ScaleRun:
    """Steps of one catalogue size (see the module docstring), in order."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, spec: Spec) -> None:
        self.args, self.bootstrap, self.spec = args, bootstrap, spec
        self.prefix = f"bench-scale-{uuid.uuid4().hex[:8]}."
        self.settings = dataclasses.replace(
            Settings(), kafka_bootstrap=bootstrap, topic_prefix=self.prefix
        )
        self.scratch = Path(tempfile.mkdtemp(prefix="adacode-scale-"))
        self.state = self.scratch / "state"
        self.port = free_port()
        self.log_path = out_path(f"scale_worker_{spec.items}.log")
        self.result = SizeResult(spec)
        self.domain = SyntheticDomain(spec)

    def run(self) -> SizeResult:
        """Topics; items produced, applied and coded; interactions produced and applied
        (plus fine-tune and serving when asked); figures."""
        try:
            create_topics(self.settings, partitions=self.settings.topic_partitions)
            self.produce("items", self.domain.item_events(), self.spec.items)
            self.worker_phase("items", self.spec.items)
            self.produce("interactions", self.domain.interaction_events(), self.spec.interactions)
            self.worker_phase("interactions", self.spec.interactions)
            self.result.figures = figures(self.result, self.args.min_items)
            return self.result
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
            if not self.args.keep_topics:
                drop_topics(self.bootstrap, self.prefix)

    def produce(
        self,
        topic: str,
        events: Iterator[tuple[bytes, bytes]],
        total: int,
        label: str | None = None,
    ) -> None:
        """Produce ``events`` to ``topic``; figures under ``label`` (default: the topic)."""
        label = label or topic
        started = time.perf_counter()
        count, size = produce_stream(
            self.bootstrap,
            self.settings.topic(topic),
            events,
            total=total,
            client=self.args.producer,
        )
        seconds = time.perf_counter() - started
        self.result.produce[label] = {
            "records": count,
            "bytes": size,
            "seconds": seconds,
            "per_s": count / seconds if seconds else math.inf,
            "mb_per_s": size / 1e6 / seconds if seconds else math.inf,
            "client": self.args.producer,
        }
        print(
            f"  produced {count:,} {label} ({size / 1e6:,.0f} MB) in {seconds:.1f} s: "
            f"{count / max(seconds, 1e-9):,.0f}/s",
            flush=True,
        )

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

    def worker_phase(self, name: str, expected: int) -> None:
        """Start the worker on the state, watch it until ``expected`` events of this phase
        are applied (and, for items, the codebook is trained), run the optional stages,
        stop it."""
        phase = Phase(name, expected)
        self.result.phases[name] = phase
        fresh = name == "items"  # the items phase starts the log; interactions append
        offset = 0 if fresh or not self.log_path.exists() else self.log_path.stat().st_size
        phase.started_at = time.time()
        worker = WorkerProcess.start(
            worker_env(self.worker_settings()), self.log_path, cwd=REPO, append=not fresh
        )
        monitor = Monitor(worker, self.port, self.args.poll_s)
        try:
            worker.wait_http(self.port, "/metrics", timeout_s=300)
            monitor.start()
            self.wait_applied(worker, monitor, phase)
            if name == "items" and phase.finished_at is not None:
                self.wait_codebook(worker, offset, phase)
            if name == "interactions" and phase.finished_at is not None:
                self.optional_stages(worker, monitor)
        finally:
            monitor.done.set()
            if monitor.is_alive():  # not started when the worker died before answering
                monitor.join(timeout=120)
            stopping = time.perf_counter()
            phase.exit_code = worker.stop(timeout_s=120)
            phase.stop_s = time.perf_counter() - stopping
            phase.samples = list(monitor.samples)
            phase.scrape_failures = monitor.failures
            phase.log = read_log(self.log_path, offset)
        if name == "interactions":
            self.result.figures["rocksdb_mib"] = dir_size_mib(self.state)

    def wait_applied(self, worker: WorkerProcess, monitor: Monitor, phase: Phase) -> None:
        key = "items" if phase.name == "items" else "interactions"
        deadline = time.monotonic() + self.args.timeout_s
        last_value, last_move = -1.0, time.monotonic()
        bar_every, next_print = 10.0, time.monotonic() + 10.0
        while True:
            if worker.poll() is not None:
                phase.note = f"the worker exited with status {worker.returncode}"
                return
            sample = monitor.last()
            value = 0.0 if sample is None else getattr(sample, key)
            now = time.monotonic()
            if value != last_value:
                last_value, last_move = value, now
            if value >= phase.expected:
                phase.finished_at = time.time()
                return
            if now > deadline or now - last_move > self.args.stall_s:
                why = "timeout" if now > deadline else f"no progress for {self.args.stall_s:.0f} s"
                phase.note = f"stopped: {value:,.0f} of {phase.expected:,} {key} applied ({why})"
                print(f"  {phase.note}", flush=True)
                return
            if now >= next_print:
                rss = 0.0 if sample is None else sample.rss_mib
                print(
                    f"  {phase.name}: {value:,.0f}/{phase.expected:,} applied, RSS {rss:,.0f} MiB",
                    flush=True,
                )
                next_print = now + bar_every
            time.sleep(0.2)

    def wait_codebook(self, worker: WorkerProcess, offset: int, phase: Phase) -> None:
        """After the items: wait for the codebook's log line (the bootstrap may run after
        the last item was applied, in the background)."""
        deadline = time.monotonic() + self.args.timeout_s
        while time.monotonic() < deadline and worker.poll() is None:
            if any(_CODEBOOK_DONE.search(ln.msg) for ln in read_log(self.log_path, offset)):
                return
            time.sleep(0.5)
        phase.note += "; no codebook line before the timeout"

    # -- optional stages (the fine-tuning / serving issue) ---------------------------------

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, orjson.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def request_finetune(
        self, worker: WorkerProcess, served_now: Callable[[dict[str, Any]], bool]
    ) -> tuple[Any, str | None, float, int]:
        """Send a ``finetune`` command and poll the versions route until ``served_now(doc)``
        or the worker logs an outcome that serves nothing; returns what the route says is
        served (``None``: nothing), that log line, the seconds waited and the log offset of
        the request."""
        from worker.commands.operations import send_control

        d = self.spec.domain
        offset = self.log_path.stat().st_size
        started = time.perf_counter()
        send_control(self.settings, "finetune", d)
        deadline = time.monotonic() + self.args.finetune_timeout_s
        served, ended = None, None
        while time.monotonic() < deadline and worker.poll() is None:
            status, doc = self.api("GET", f"/v1/domains/{d}/versions")
            if status == 200 and doc and served_now(doc):
                served = doc.get("served")
                break
            lines = read_log(self.log_path, offset)
            ended = next((ln.msg for ln in lines if _FINETUNE_FAILED.search(ln.msg)), None)
            if ended is not None:  # over budget, rejected, skipped, ...: nothing will be served
                break
            time.sleep(1.0)
        return served, ended, time.perf_counter() - started, offset

    def finetune(self, worker: WorkerProcess) -> None:
        served, ended, seconds, _ = self.request_finetune(
            worker, lambda doc: bool(doc.get("current") and doc.get("served"))
        )
        self.result.figures["finetune_wall_s"] = seconds if served else None
        self.result.figures["served"] = served
        if ended is not None:
            self.result.figures["finetune_outcome"] = ended

    def optional_stages(self, worker: WorkerProcess, monitor: Monitor) -> None:
        """Fine-tune, serving and the incremental fine-tune, as asked; a stage that fails is
        noted in the table and the ones after it are skipped (the figures so far are kept)."""
        stages = [
            ("fine-tune", self.args.finetune, lambda: self.finetune(worker)),
            ("serving", self.args.serve, self.serve),
            (
                "incremental fine-tune",
                self.args.incremental,
                lambda: self.incremental(worker, monitor),
            ),
            ("codebook migration", self.args.migrate, lambda: self.migrate(worker, monitor)),
        ]
        for name, asked, stage in stages:
            if not asked:
                continue
            if name != "fine-tune" and name != "serving" and not self.result.figures.get("served"):
                self.result.figures.setdefault("notes", []).append(
                    f"{name} not run: the first fine-tune served nothing"
                )
                continue
            try:
                stage()
            except Exception as exc:  # a bench stage: keep what was measured, say what failed
                self.result.figures.setdefault("notes", []).append(
                    f"{name} failed: {type(exc).__name__}: {exc}"
                )
                print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
                return

    def incremental(self, worker: WorkerProcess, monitor: Monitor) -> None:
        """``--incremental`` more interactions produced and applied, then a fine-tune
        requested and timed until its version is served (it warm-starts from the current
        version and reads what came since: the incremental case)."""

        d, extra = self.spec.domain, self.args.incremental
        _, doc = self.api("GET", f"/v1/domains/{d}/versions")
        before = (doc or {}).get("current")
        events = self.domain.interaction_events(extra)
        self.produce("interactions", events, extra, label="incremental interactions")
        target = self.spec.interactions + extra
        deadline = time.monotonic() + self.args.timeout_s
        while time.monotonic() < deadline and worker.poll() is None:
            sample = monitor.last()
            if sample is not None and sample.interactions >= target:
                break
            time.sleep(0.5)
        served, ended, seconds, offset = self.request_finetune(
            worker, lambda doc: doc.get("current") not in (None, before)
        )
        f = self.result.figures
        f["incremental_interactions"] = extra
        f["incremental_wall_s"] = seconds if served else None
        runs = [
            ln.msg for ln in read_log(self.log_path, offset) if _FINETUNE_VERSION.search(ln.msg)
        ]
        f["incremental_finetune_s"] = (
            (duration_ms(runs[-1]) or 0.0) / 1000 or None if runs else None
        )
        f["incremental_line"] = runs[-1] if runs else None
        if ended is not None:
            f["incremental_outcome"] = ended

    def migrate(self, worker: WorkerProcess, monitor: Monitor) -> None:
        """``--migrate N``: ``adacode codebook migrate`` sent while ``N`` more interactions
        are produced; its steps timed from the worker's log (the candidate trained and cut
        over to, every item coded with it) and the versions route (the domain's version of
        the new codebook served), with the longest consumer pause and the peak RSS from the
        command until every item was coded."""
        from worker.commands.operations import send_control

        d, extra = self.spec.domain, self.args.migrate
        _, doc = self.api("GET", f"/v1/domains/{d}/versions")
        before = (doc or {}).get("current")
        offset = self.log_path.stat().st_size
        sample = monitor.last()
        target = (sample.interactions if sample is not None else 0.0) + extra
        started = time.time()
        send_control(self.settings, "migrate", "")
        self.produce(
            "interactions", self.domain.interaction_events(extra), extra, label="migration"
        )
        m: dict[str, Any] = {"interactions": extra}
        self.result.figures["migration"] = m
        deadline = time.monotonic() + self.args.finetune_timeout_s
        while time.monotonic() < deadline and worker.poll() is None:
            for line in read_log(self.log_path, offset):
                if line.ts is not None and _CUT_OVER.search(line.msg):
                    m.setdefault("cut_over_s", line.ts - started)
                if line.ts is not None and _MIGRATED.search(line.msg):
                    m.setdefault("coded_s", line.ts - started)
                outcome = _FINETUNE_OUTCOME.search(line.msg)
                if outcome and "coded_s" in m and "verdict" not in m:
                    m["new_version"], m["verdict"] = int(outcome[1]), outcome[2]
                    m["gate"], m["finetune_s"] = outcome[3], float(outcome[4])
            if m.get("verdict") == "rejected":
                break  # the domain stays on the old codebook: nothing more to wait for
            status, doc = self.api("GET", f"/v1/domains/{d}/versions")
            moved = status == 200 and doc and doc.get("current") not in (None, before)
            if moved and doc.get("served"):
                m["served_s"] = time.time() - started
                break
            time.sleep(1.0)
        until = started + (m.get("coded_s") or (time.time() - started))
        window = [x for x in monitor.samples if started <= x.t <= until + 1.0]
        if window:
            m["longest_pause_s"] = longest_pause(
                [x.t for x in window], [x.interactions for x in window], target
            )
            m["peak_rss_mib"] = max(x.rss_mib for x in window)
            m["max_batch_bound_s"] = max((x.batch_bound_s or 0.0) for x in window)

    def serve(self) -> None:
        """Sequential samples, then the paced load, then new items to servable."""
        self.sequential_latency()
        self.paced_latency()
        self.new_items_servable()

    def sequential_latency(self) -> None:
        d = self.spec.domain
        rng = np.random.default_rng(self.spec.seed + 99)
        latencies: dict[str, list[float]] = {"similar": [], "user_recommend": []}
        statuses: dict[str, dict[int, int]] = {k: {} for k in latencies}
        items, users = self.domain.serve_picks(rng, self.args.serve_requests)
        for item, user in zip(items, users, strict=True):
            for kind, path in (
                ("similar", f"/v1/domains/{d}/items/{item}/similar?k=10"),
                ("user_recommend", f"/v1/domains/{d}/users/{user}/recommend?k=10"),
            ):
                started = time.perf_counter()
                status, _ = self.api("GET", path)
                latencies[kind].append(1000 * (time.perf_counter() - started))
                statuses[kind][status] = statuses[kind].get(status, 0) + 1
        self.result.figures["latency_ms"] = {
            k: quantiles(v) | {"statuses": statuses[k]} for k, v in latencies.items()
        }

    def paced_latency(self) -> None:
        """Open loop: ``--serve-rate`` requests/s for ``--serve-seconds``, recommend and
        similar in turn, on a pool of keep-alive connections (see :func:`run_paced`)."""
        d = self.spec.domain
        offsets = pace_schedule(self.args.serve_rate, self.args.serve_seconds)
        if not len(offsets):
            return
        rng = np.random.default_rng(self.spec.seed + 98)
        items, users = self.domain.serve_picks(rng, len(offsets))
        requests = [
            ("user_recommend", f"/v1/domains/{d}/users/{users[k]}/recommend?k=10")
            if k % 2 == 0
            else ("similar", f"/v1/domains/{d}/items/{items[k]}/similar?k=10")
            for k in range(len(offsets))
        ]
        client = KeepAlive(self.port)
        before = scrape_metrics(self.port)
        started_at = time.time()
        try:
            with ClientGc(freeze=self.args.client_gc == "freeze") as client_gc:
                shots = run_paced(requests, offsets, client.get, self.args.serve_threads)
        finally:
            client.close()
        self.result.figures["paced_latency_ms"] = paced_figures(shots)
        self.result.figures["paced_stalls"] = paced_stalls(shots)
        after = scrape_metrics(self.port)
        self.result.figures["paced_gc"] = gc_pauses_between(before, after)
        self.result.figures["paced_trims"] = trims_between(before, after)
        self.result.figures["paced_client_gc"] = client_gc.summary()
        self.result.figures["paced_client_frozen"] = client_gc.frozen
        self.result.figures["paced"] = {
            "rate": self.args.serve_rate,
            "seconds": self.args.serve_seconds,
            "threads": self.args.serve_threads,
            "requests": len(offsets),
            "started_at": started_at,
        }

    def new_items_servable(self) -> None:
        """``--new-items`` new items produced one at a time; for each, the time from its
        send to the first 200 of its ``/similar`` (asked every ~5 ms, up to 10 s)."""
        n = self.args.new_items
        if n <= 0:
            return
        d = self.spec.domain
        events = self.domain.new_item_events(n)
        rng = np.random.default_rng(self.spec.seed + 97)
        client = KeepAlive(self.port, timeout_s=NEW_ITEM_TIMEOUT_S)
        latencies: list[float] = []
        missed: list[str] = []
        in_a_row = 0
        with OneByOneProducer(self.bootstrap, self.args.producer) as producer:
            for item, key, value in events:
                time.sleep(float(rng.uniform(0.0, 0.1)))  # off the worker's poll cycle
                started = time.perf_counter()
                producer.send(self.settings.topic("items"), key, value)
                seconds = poll_until_ok(
                    functools.partial(client.get, f"/v1/domains/{d}/items/{item}/similar?k=10"),
                    started,
                    NEW_ITEM_POLL_S,
                    NEW_ITEM_TIMEOUT_S,
                )
                if seconds is None:
                    missed.append(item)
                    in_a_row += 1
                    if in_a_row >= NEW_ITEM_GIVE_UP:
                        break
                else:
                    latencies.append(1000 * seconds)
                    in_a_row = 0
        client.close()
        tried = len(latencies) + len(missed)
        self.result.figures["new_item_ms"] = latency_quantiles(latencies) | {
            "produced": tried,
            "asked": n,
            "servable": len(latencies),
            "not_servable": missed,
            "stopped_early": tried < n,
            "client": self.args.producer,
        }


# ======================================================================================
# figures, table, JSON, chart
# ======================================================================================


def _slow_text(slow: list[dict[str, Any]]) -> str:
    """How many scrapes were slow, and where (phase, seconds after its worker started)."""
    if not slow:
        return f"none over {SLOW_SCRAPE_MS:.0f} ms"
    where = ", ".join(
        f"{x['ms']:.0f} ms {x['phase']} +{x['after_start_s']:.0f} s"
        for x in sorted(slow, key=lambda x: -x["ms"])[:5]
    )
    return f"{len(slow)} over {SLOW_SCRAPE_MS:.0f} ms: {where}"


def figures(result: SizeResult, min_items: int) -> dict[str, Any]:
    """The table's numbers from the phases' samples and logs."""
    out = dict(result.figures)
    items, inter = result.phases.get("items"), result.phases.get("interactions")
    every = [s for p in (items, inter) if p for s in p.samples]
    lines = [ln for p in (items, inter) if p for ln in p.log]
    if inter is not None and inter.samples:
        t, c = inter.times(), inter.counts()
        begin, end = start_time(t, c), crossing_time(t, c, inter.expected)
        last = min(c[-1], float(inter.expected)) if c else 0.0  # not the --incremental ones
        if begin is not None:
            stop = end if end is not None else t[-1]
            out["applied_per_s"] = last / (stop - begin) if stop > begin else None
            out["apply_s"] = stop - begin
            out["restart_s"] = begin - inter.started_at
        out["applied"] = last
        out["deciles"] = decile_rates(t, c, inter.expected)
        out["pause_interactions_s"] = longest_pause(t, c, inter.expected)
        done = [x for x in inter.samples if x.interactions >= inter.expected]
        # at the end of the ingest (the stages after it, a fine-tune and its index, grow it)
        out["rss_after_mib"] = (done[0] if done else inter.samples[-1]).rss_mib
        out["rss_end_mib"] = inter.samples[-1].rss_mib
    if items is not None and items.samples:
        t, c = items.times(), items.counts()
        out["pause_items_s"] = longest_pause(t, c, items.expected)
        begin, end = start_time(t, c), crossing_time(t, c, items.expected)
        if begin is not None and end is not None and end > begin:
            out["items_per_s"] = items.expected / (end - begin)
        boot = find_bootstrap(items.log, items.samples, min_items)
        out["bootstrap"] = dataclasses.asdict(boot)
        if boot.start is not None and boot.end is not None:
            before = [s.rss_mib for s in items.samples if s.t <= boot.start]
            after = [s.hwm_mib for s in items.samples if s.t >= boot.end]
            if before and after:
                out["bootstrap_rss_growth_mib"] = after[0] - before[-1]
    bounds = [s.batch_bound_s for s in every if s.batch_bound_s is not None]
    out["longest_batch_bound_s"] = max(bounds) if bounds else None
    out["peak_rss_mib"] = max((s.hwm_mib for s in every), default=None)
    out["scrape_ms"] = quantiles([1000 * s.scrape_s for s in every])
    out["slow_scrapes"] = slow_scrapes(result)
    rounds = code_rounds(lines)
    out["code_rounds"] = {
        "n": len(rounds),
        "ms": quantiles([r.ms for r in rounds if r.ms is not None]),
        "items_max": max((r.items for r in rounds if r.items is not None), default=None),
    }
    finetune = [ln for ln in lines if _FINETUNE_VERSION.search(ln.msg)]
    if finetune:  # the first run's (an --incremental run's comes after it)
        out["finetune_s"] = (duration_ms(finetune[0].msg) or 0.0) / 1000 or None
        out["finetune_line"] = finetune[0].msg
    built = [ln for ln in lines if re.search(r"\bserving\b.*\bbuilt in\b", ln.msg)]
    builds = [re.search(r"built in\s+(\d+(?:\.\d+)?)\s*s", ln.msg) for ln in built]
    seconds = [float(found.group(1)) for found in builds if found]
    if seconds:  # the first version's, then the incremental version's (when it ran)
        out["index_build_s"] = seconds[0]
        out["index_builds_s"] = seconds
    out["notes"] = [p.note for p in (items, inter) if p and p.note] + list(out.get("notes") or [])
    out["exit_codes"] = {p.name: p.exit_code for p in (items, inter) if p}
    return out


def _f(value: float | None, fmt: str = "{:,.0f}", none: str = "n/a") -> str:
    return (
        none
        if value is None or (isinstance(value, float) and math.isnan(value))
        else fmt.format(value)
    )


def render_table(result: SizeResult) -> str:
    """One markdown table for one catalogue size."""
    f, spec = result.figures, result.spec
    p_items = result.produce.get("items", {})
    p_inter = result.produce.get("interactions", {})
    boot = f.get("bootstrap") or {}
    rounds = f.get("code_rounds") or {}
    scrape = f.get("scrape_ms") or {}
    deciles = f.get("deciles") or []
    lat = f.get("latency_ms") or {}
    boot_s = boot.get("seconds")
    boot_cell = (
        "not seen"
        if boot_s is None
        else f"{'~' if boot.get('how', '').startswith('~') else ''}{boot_s:.1f} s"
    )
    rows = [
        (
            "items / interactions / users",
            f"{spec.items:,} / {spec.interactions:,} / {spec.users:,} ({spec.clusters} clusters)",
        ),
        (
            "produce rate",
            f"items {_f(p_items.get('per_s'))}/s ({_f(p_items.get('mb_per_s'), '{:.1f}')} MB/s); "
            f"interactions {_f(p_inter.get('per_s'))}/s ({p_items.get('client', 'n/a')}, acks=1)",
        ),
        ("items applied/s", _f(f.get("items_per_s"))),
        (
            "interactions applied/s (overall)",
            f"{_f(f.get('applied_per_s'))} ({_f(f.get('applied'))} of {spec.interactions:,} in "
            f"{_f(f.get('apply_s'), '{:.1f}')} s; restart to first applied "
            f"{_f(f.get('restart_s'), '{:.1f}')} s)",
        ),
        ("interactions/s by decile", " / ".join(_f(d) for d in deciles) or "n/a"),
        (
            "last decile / first",
            _f(deciles[-1] / deciles[0], "{:.2f}")
            if len(deciles) == 10 and deciles[0] and deciles[-1]
            else "n/a",
        ),
        (
            "longest consumer pause (polls)",
            f"items {_f(f.get('pause_items_s'), '{:.2f}')} s, interactions "
            f"{_f(f.get('pause_interactions_s'), '{:.2f}')} s; longest batch "
            f"<= {_f(f.get('longest_batch_bound_s'), '{:g}')} s (adacode_batch_seconds)",
        ),
        (
            "codebook bootstrap",
            f"{boot_cell} ({boot.get('how', 'n/a')}); RSS growth "
            f"{_f(f.get('bootstrap_rss_growth_mib'))} MiB",
        ),
        (
            "code round ms (median / max)",
            f"{_f((rounds.get('ms') or {}).get('median'), '{:.1f}')} / "
            f"{_f((rounds.get('ms') or {}).get('max'), '{:.1f}')} ({rounds.get('n', 0)} rounds logged)",
        ),
        (
            "/metrics scrape ms (median / p99 / max)",
            f"{_f(scrape.get('median'), '{:.1f}')} / {_f(scrape.get('p99'), '{:.1f}')} / "
            f"{_f(scrape.get('max'), '{:.1f}')} ({scrape.get('n', 0)} scrapes; "
            f"{_slow_text(f.get('slow_scrapes') or [])})",
        ),
        (
            "worker RSS after ingest / at the end / peak",
            f"{_f(f.get('rss_after_mib'))} MiB / {_f(f.get('rss_end_mib'))} MiB / "
            f"{_f(f.get('peak_rss_mib'))} MiB",
        ),
        ("RocksDB on disk", f"{_f(f.get('rocksdb_mib'))} MiB"),
        (
            "fine-tune (worker log) / request to served",
            f"{_f(f.get('finetune_s'), '{:.1f} s', 'not run')} / "
            f"{_f(f.get('finetune_wall_s'), '{:.1f} s', 'not run')}",
        ),
        (
            "incremental fine-tune (+interactions): worker log / request to served",
            f"+{_f(f.get('incremental_interactions'))}: "
            f"{_f(f.get('incremental_finetune_s'), '{:.1f} s', 'not run')} / "
            f"{_f(f.get('incremental_wall_s'), '{:.1f} s', 'not run')}",
        ),
        (
            "index build (each published version)",
            " / ".join(f"{b:.2f} s" for b in f.get("index_builds_s") or []) or "not run",
        ),
        (
            "latency p50 / p99 ms",
            "; ".join(
                f"{k} {_f(v.get('median'), '{:.1f}')} / {_f(v.get('p99'), '{:.1f}')} "
                f"(HTTP {v.get('statuses')})"
                for k, v in lat.items()
            )
            or "not run",
        ),
    ]
    rows += serve_rows(f)
    rows += migration_rows(f)
    notes = list(f.get("notes") or [])
    if f.get("finetune_outcome"):
        notes.append(f"fine-tune: {f['finetune_outcome']}")
    if f.get("incremental_outcome"):
        notes.append(f"incremental fine-tune: {f['incremental_outcome']}")
    if notes:
        rows.append(("notes", "; ".join(notes)))
    lines = [f"### {spec.items:,} items", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def migration_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``--migrate`` stage's rows (none when it did not run)."""
    m = f.get("migration")
    if not m:
        return []
    return [
        (
            f"codebook migration (+{_f(m.get('interactions'))} interactions meanwhile): "
            "cut over / every item coded / new version served, s after the command",
            f"{_f(m.get('cut_over_s'), '{:.1f}')} / {_f(m.get('coded_s'), '{:.1f}')} / "
            f"{_f(m.get('served_s'), '{:.1f}')}",
        ),
        (
            "the new codebook's first version: fine-tune, gate",
            f"v{_f(m.get('new_version'))} {m.get('verdict', 'n/a')} after "
            f"{_f(m.get('finetune_s'), '{:.1f} s')} ({m.get('gate', 'n/a')})",
        ),
        (
            "during the migration (command to every item coded): longest consumer pause, "
            "longest batch, peak RSS",
            f"{_f(m.get('longest_pause_s'), '{:.2f} s')}, "
            f"<= {_f(m.get('max_batch_bound_s'), '{:.1f} s')}, "
            f"{_f(m.get('peak_rss_mib'), '{:,.0f} MiB')}",
        ),
    ]


def serve_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    """The paced load's and the new items' rows, when they ran (against issue 13's goals)."""
    rows: list[tuple[str, str]] = []
    paced, run = f.get("paced_latency_ms") or {}, f.get("paced") or {}
    for kind, v in paced.items():
        goal = PACED_GOAL_P99_MS.get(kind)
        seconds = run.get("seconds")
        asked = v.get("n", 0) / seconds if seconds else None
        rows.append(
            (
                f"paced {kind} p50 / p90 / p99 / max ms",
                f"{_f(v.get('p50'), '{:.1f}')} / {_f(v.get('p90'), '{:.1f}')} / "
                f"{_f(v.get('p99'), '{:.1f}')} / {_f(v.get('max'), '{:.1f}')} "
                f"(goal p99 < {_f(goal, '{:g}')} ms; {v.get('n', 0)} requests, achieved "
                f"{_f(v.get('achieved_per_s'), '{:.1f}')}/s of {_f(asked, '{:g}')}/s asked "
                f"({_f(run.get('rate'), '{:g}')}/s in all for {_f(seconds, '{:g}')} s, "
                f"{run.get('threads')} threads); HTTP {v.get('statuses')}, "
                f"{v.get('non_200', 0)} not 200)",
            )
        )
    frozen = f.get("paced_client_frozen")
    for key, who in (
        ("paced_gc", "worker (longest: its histogram's bound)"),
        ("paced_client_gc", f"bench client ({_f(frozen, '{:,}')} objects frozen before)"),
    ):
        gc_passes = f.get(key) or {}
        if gc_passes:
            rows.append(
                (
                    f"GC passes during the paced load, {who} (generation: passes, longest)",
                    "; ".join(
                        f"{gen}: {v.get('passes', 0):.0f}, {_f(v.get('longest_s'), '{:.3f}')} s"
                        for gen, v in gc_passes.items()
                    ),
                )
            )
    stalls = f.get("paced_stalls")
    if stalls is not None:
        began = (f.get("paced") or {}).get("started_at")
        clock = time.strftime("%H:%M:%S", time.gmtime(began)) + " UTC" if began else "its start"
        rows.append(
            (
                f"paced stalls (requests over {STALL_MS:g} ms, grouped; s after {clock})",
                "; ".join(
                    f"+{st['at_s']:.2f} s: {st['requests']:.0f} requests, max {st['max_ms']:.0f} ms"
                    for st in stalls
                )
                or "none",
            )
        )
    trims = f.get("paced_trims") or {}
    if trims:
        rows.append(
            (
                "heap trims during the paced load, worker (caller: trims, longest: its "
                "histogram's bound)",
                "; ".join(
                    f"{where}: {v.get('passes', 0):.0f}, {_f(v.get('longest_s'), '{:.3f}')} s"
                    for where, v in trims.items()
                ),
            )
        )
    new = f.get("new_item_ms")
    if new:
        stopped = (
            f"; stopped after {NEW_ITEM_GIVE_UP} in a row were not servable"
            if new.get("stopped_early")
            else ""
        )
        rows.append(
            (
                "new item produce-to-servable p50 / p99 / max ms",
                f"{_f(new.get('p50'), '{:.1f}')} / {_f(new.get('p99'), '{:.1f}')} / "
                f"{_f(new.get('max'), '{:.1f}')} (goal p99 < {NEW_ITEM_GOAL_P99_MS:g} ms; "
                f"{new.get('servable', 0)} of {new.get('produced', 0)} servable within "
                f"{NEW_ITEM_TIMEOUT_S:g} s, /similar 200 polled every "
                f"{1000 * NEW_ITEM_POLL_S:g} ms; {new.get('client')}, one at a time{stopped})",
            )
        )
    return rows


def plot(results: Sequence[SizeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(15, 4.5 * len(results)), squeeze=False)
    for (ax1, ax2), res in zip(axes, results, strict=True):
        inter = res.phases.get("interactions")
        if inter is not None and len(inter.samples) > 1:
            t = np.asarray(inter.times())
            c = np.asarray(inter.counts())
            t0 = start_time(list(t), list(c)) or t[0]
            mid = (t[1:] + t[:-1]) / 2 - t0
            rate = np.diff(c) / np.maximum(np.diff(t), 1e-6)
            ax1.plot(mid, rate, lw=0.8, color="#1f77b4", label="between polls")
            deciles = res.figures.get("deciles") or []
            edges = [t0] + [
                crossing_time(list(t), list(c), inter.expected * k / 10) for k in range(1, 11)
            ]
            for k, d in enumerate(deciles):
                a, b = edges[k], edges[k + 1]
                if d is not None and a is not None and b is not None:
                    ax1.hlines(d, a - t0, b - t0, color="#d62728", lw=2.5)
            ax1.plot([], [], color="#d62728", lw=2.5, label="per decile")
            ax1.legend(fontsize=8)
        ax1.set_title(f"{res.spec.items:,} items: applied interactions/s")
        ax1.set_xlabel("s since the first applied interaction")
        ax1.set_ylabel("interactions/s")
        t_first = min((p.samples[0].t for p in res.phases.values() if p.samples), default=0.0)
        for name, phase in res.phases.items():
            if phase.samples:
                ts = np.array([s.t for s in phase.samples]) - t_first
                ax2.plot(ts, [s.rss_mib for s in phase.samples], label=f"RSS ({name})")
        boot = res.figures.get("bootstrap") or {}
        if boot.get("start") is not None and boot.get("end") is not None:
            ax2.axvspan(
                boot["start"] - t_first,
                boot["end"] - t_first,
                color="orange",
                alpha=0.3,
                label="bootstrap",
            )
        ax2.set_title("worker RSS (MiB); the gap is the produce of the interactions")
        ax2.set_xlabel("s since the worker started on the items")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(result: SizeResult) -> dict[str, Any]:
    return {
        "spec": dataclasses.asdict(result.spec),
        "produce": result.produce,
        "figures": result.figures,
        "phases": {
            name: {
                "expected": p.expected,
                "exit_code": p.exit_code,
                "stop_s": p.stop_s,
                "note": p.note,
                "scrape_failures": p.scrape_failures,
                "samples": [dataclasses.asdict(s) for s in p.samples],
            }
            for name, p in result.phases.items()
        },
    }


# ======================================================================================
# main
# ======================================================================================


def _per_size(values: list[int], n: int, name: str, parser: argparse.ArgumentParser) -> list[int]:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        parser.error(f"--{name}: give one value or one per --items value ({n})")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100_000], help="catalogue sizes")
    parser.add_argument(
        "--interactions", type=int, nargs="+", default=[1_000_000], help="one, or one per size"
    )
    parser.add_argument(
        "--users",
        type=int,
        nargs="+",
        default=[0],
        help="one, or one per size (0: interactions/20)",
    )
    parser.add_argument("--clusters", type=int, default=0, help="mixture components (0: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", help="HOST:PORT of a running broker (default: start one)")
    parser.add_argument("--min-items", type=int, default=1000, help="codebook_min_items")
    parser.add_argument("--poll-s", type=float, default=0.5, help="seconds between /metrics polls")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="most seconds per phase")
    parser.add_argument(
        "--keep-topics",
        action="store_true",
        help="keep the run's topics on the broker (default: deleted at the end, ~6 GB at 1M items)",
    )
    parser.add_argument(
        "--stall-s",
        type=float,
        default=900.0,
        help="give a phase up after this long without progress",
    )
    parser.add_argument(
        "--producer",
        choices=("auto", "kafka-python", "confluent"),
        default="auto",
        help="client that produces the events (auto: confluent-kafka when installed, it "
        "produces a 10M backlog ~10x faster; else kafka-python)",
    )
    parser.add_argument("--finetune", action="store_true", help="time a fine-tune after ingest")
    parser.add_argument("--finetune-timeout-s", type=float, default=1800.0)
    parser.add_argument(
        "--incremental",
        type=int,
        default=0,
        help="after serving: produce this many more interactions and time the fine-tune "
        "that follows (0: none)",
    )
    parser.add_argument(
        "--migrate",
        type=int,
        default=0,
        help="after the other stages: request a live codebook migration while producing this "
        "many more interactions, and time it until the new codebook's version is served "
        "(0: none)",
    )
    parser.add_argument("--serve", action="store_true", help="sample API latencies after ingest")
    parser.add_argument("--serve-requests", type=int, default=200, help="sequential samples")
    parser.add_argument(
        "--serve-rate", type=float, default=200.0, help="paced load: requests/s (0: none)"
    )
    parser.add_argument("--serve-seconds", type=float, default=20.0, help="paced load: seconds")
    parser.add_argument(
        "--serve-threads", type=int, default=32, help="paced load: client threads (connections)"
    )
    parser.add_argument(
        "--client-gc",
        choices=("freeze", "as-is"),
        default="freeze",
        help="the bench client's collector during the paced load: its long-lived objects "
        "frozen first (default), or as they are (to see what its own passes cost)",
    )
    parser.add_argument(
        "--new-items", type=int, default=50, help="new items timed to servable (0: none)"
    )
    parser.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra worker setting (repeatable), e.g. code_round_interactions=20000",
    )
    args = parser.parse_args(argv)
    n = len(args.items)
    args.interactions = _per_size(args.interactions, n, "interactions", parser)
    args.users = _per_size(args.users, n, "users", parser)
    if args.producer == "auto":
        args.producer = "confluent" if confluent_available() else "kafka-python"
    if min(args.items) < args.min_items:
        parser.error(f"--items must be at least --min-items ({args.min_items}) to train a codebook")
    if min(args.interactions) < 10:
        parser.error("--interactions must be at least 10 (one per decile)")
    return args


def specs(args: argparse.Namespace) -> list[Spec]:
    return [
        Spec(
            items=n,
            interactions=m,
            users=u or max(1, m // 20),
            clusters=args.clusters or auto_clusters(n),
            seed=args.seed,
        )
        for n, m, u in zip(args.items, args.interactions, args.users, strict=True)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wall = time.perf_counter()
    load_before = os.getloadavg()
    results: list[SizeResult] = []
    with broker(args.bootstrap, "scale") as bootstrap:
        for spec in specs(args):
            print(
                f"{spec.items:,} items, {spec.interactions:,} interactions, {spec.users:,} users "
                f"on {bootstrap}",
                flush=True,
            )
            result = ScaleRun(args, bootstrap, spec).run()
            results.append(result)
            print(render_table(result), flush=True)
    load_after = os.getloadavg()
    header = (
        f"## bench/scale.py: one domain through the broker and `adacode run`\n\n"
        f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; total wall {time.perf_counter() - wall:.0f} s; command: "
        f"`python bench/scale.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n"
    )
    text = header + "\n" + "\n\n".join(render_table(r) for r in results) + "\n"
    print()
    print(text)
    out_path("scale.md").write_text(text)
    out_path("scale.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "loadavg": [load_before, load_after],
                "sizes": [to_json(r) for r in results],
            },
            indent=1,
            default=str,
        )
    )
    plot(results, out_path("scale.png"))
    print("wrote bench/out/scale.md, bench/out/scale.json, bench/out/scale.png")
    failed = [r for r in results if any(p.exit_code not in (0, None) for p in r.phases.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
