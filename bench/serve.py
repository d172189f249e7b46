"""Serving latency and throughput of the /v1 API: recommend and similar, 1/8/32 clients.

For each domain size (default 2k, 10k, 100k items) a domain is built in memory the way
the worker builds it: item embeddings -> residual codebook -> served codes (entropy
policy, Zipf popularity, 20 % head) -> a code-table model version -> the serving index
(:class:`worker.serving.index.Serving`) behind the real HTTP server (``worker.serving.http``). Item
embeddings are synthetic (Gaussian clusters); with ``--dataset DIR`` they are the
dataset's MiniLM item embeddings plus noise, so codes look like real text codes at any
size. The version projects the embeddings into the item vectors (``text_dim``), as the
worker's fine-tunes do. The model is freshly initialised: latency does not depend on
trained values.

Clients run in one separate process, spawned once (threads with keep-alive connections),
so they do not share the server's GIL:

* closed loop: 1, 8, 32 clients, each sending its next request when the last one answered
  (latency p50/p99, throughput);
* open loop: ``--rate`` requests/s (default 200) of recommend at scheduled instants,
  latency counted from the scheduled instant (queueing included), medians of
  ``--repeats`` runs (a load spike of another process hits single runs); the goal is
  p99 under 20 ms at 200 requests/s;
* with ``--busy-thread``, the open loop again beside a thread that holds the GIL (pure
  Python work, the worst case of a worker that ingests while it serves);
* where the time goes: the recommend handler and its parts in the server process, without
  HTTP (user vector from the history, faiss search, the whole handler);
* HNSW against exact search on the largest domain: recall@10 and latency.

Every run starts clean, so runs at several sizes in one process measure the same thing:
each client first sends ``--warmup`` seconds of uncounted requests (connections, handler
threads, first touches), the server process collects garbage and waits for the previous
run's handler threads to end, and its garbage-collection pauses during the run are
reported (``gc ms``). OpenMP settings are per thread: faiss searches in the HTTP handler
threads ran with one OpenMP thread per core until :mod:`worker.serving.routes` set one per
handler thread: a single flat search then woke a second OpenMP thread and cost tens of
ms at p99 on a busy 2-core machine from about 8k items up (2k items did not show it,
which is why a later, larger size looked slower at 1 client than at 8).

Prints tables; writes ``bench/out/serve.json`` and ``bench/out/serve.png``.
Run: ``python -m bench.serve [--sizes 2000,10000,100000] [--dataset DIR] [--busy-thread]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import multiprocessing as mp
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import orjson
import torch
from tqdm import tqdm

from bench.common import OUT_DIR
from quantize.assign import CodeAssigner
from quantize.codebook import ResidualCodebook, suggest_shape
from quantize.lengths import make_policy, thresholds_for_fraction
from quantize.table_model import ModelConfig, Snapshot, build_model, export_params
from store.memory import MemoryPartition
from worker.app.daemon import SWITCH_INTERVAL_S
from worker.core.settings import Settings
from worker.serving.http import HttpServer, Request, Router
from worker.serving.index import Serving
from worker.serving.routes import ApiRoutes
from worker.state.versions import PUBLISHED, VersionRecord, VersionTable, add_version

DOMAIN = "bench"
GOAL_P99_MS = 20.0  # the goal: recommend p99 at --rate requests/s


@dataclass
class Domain:
    n: int
    store: MemoryPartition
    serving: Serving
    item_ids: list[str]
    build_s: float


def _embeddings(n: int, dim: int, base: np.ndarray | None, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if base is None:
        centers = rng.normal(size=(max(8, n // 50), dim)).astype(np.float32)
    else:
        centers = base.astype(np.float32)
    x = centers[rng.integers(len(centers), size=n)]
    x = x + 0.3 * np.std(centers) * rng.normal(size=x.shape).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build_domain(n: int, base: np.ndarray | None, settings: Settings, seed: int = 0) -> Domain:
    """Embeddings -> codes -> a published version -> the serving index."""
    dim = 64 if base is None else base.shape[1]
    x = _embeddings(n, dim, base, seed)
    levels, k = suggest_shape(n)
    codebook = ResidualCodebook.train(x[: min(n, 20_000)], levels, min(k, n), seed=seed)
    rng = np.random.default_rng(seed + 1)
    pop = rng.zipf(1.3, size=n).astype(np.float64)
    enter, exit_ = thresholds_for_fraction(pop, 0.2)
    assigner = CodeAssigner(
        codebook.levels,
        codebook.k,
        make_policy("entropy", min_len=1),
        enter_threshold=enter,
        exit_threshold=exit_,
    )
    ids = [f"i{i}" for i in range(n)]
    assigner.add(ids, codebook.encode(x), pop)
    served = assigner.served()
    rows = served.row_matrix()
    torch.manual_seed(seed)
    # like the worker's fine-tunes: the version projects the items' embeddings (text_dim)
    config = ModelConfig(hidden=settings.finetune_hidden, text_dim=dim)
    model = build_model(config, rows, n_rows=served.table_rows)
    store = MemoryPartition()
    batch = store.batch()
    add_version(
        store,
        batch,
        DOMAIN,
        VersionRecord(0, None, time.time(), codebook.codebook_id, {}, {}, status=PUBLISHED),
        VersionTable.build(Snapshot(config, export_params(model)), assigner.keys, rows, x),
        keep=5,
    )
    store.write(batch)
    serving = Serving(store, settings)
    started = time.perf_counter()
    serving.refresh()
    return Domain(n, store, serving, ids, time.perf_counter() - started)


# -- clients (one separate process for the whole run) ------------------------------------------


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None) -> int:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def _paths(kind: str, n: int, count: int, seed: int) -> list[tuple[str, str, bytes | None]]:
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str, bytes | None]] = []
    for _ in range(count):
        if kind == "similar":
            out.append(("GET", f"/v1/domains/{DOMAIN}/items/i{rng.integers(n)}/similar?k=10", None))
        else:
            hist = [f"i{i}" for i in rng.integers(n, size=int(rng.integers(5, 30)))]
            body = orjson.dumps({"history": hist, "k": 10, "exclude_history": True})
            out.append(("POST", f"/v1/domains/{DOMAIN}/recommend", body))
    return out


@dataclass(frozen=True)
class Job:
    """One measurement: ``clients`` threads with keep-alive connections to ``address``.

    Closed loop when ``rate == 0`` (each client sends its next request when the last one
    answered), else open loop at ``rate`` requests/s in all (scheduled instants; latency
    counts from the scheduled instant, so queueing is included). Every client first sends
    requests for ``warmup_s`` (not counted: connection set-up, the server's handler thread
    start, first-touch costs); the measured window starts for all clients at once.
    """

    address: tuple[str, int]
    kind: str
    n_items: int
    clients: int
    seconds: float
    rate: float
    warmup_s: float


def run_job(job: Job) -> tuple[list[float], int, float]:
    """Run one job in this process; returns (latencies s, errors, measured wall s)."""
    lat: list[list[float]] = [[] for _ in range(job.clients)]
    errors = [0] * job.clients
    requests = [_paths(job.kind, job.n_items, 512, seed=c) for c in range(job.clients)]
    window = {"start": 0.0}

    def begin() -> None:
        window["start"] = time.perf_counter() + 0.02

    barrier = threading.Barrier(job.clients, action=begin)

    def run(c: int) -> None:
        conn = http.client.HTTPConnection(*job.address, timeout=30)
        reqs = requests[c]
        i = 0

        def send() -> int:
            nonlocal conn, i
            method, path, body = reqs[i % len(reqs)]
            i += 1
            try:
                return _request(conn, method, path, body)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(*job.address, timeout=30)
                return 0

        warm_until = time.perf_counter() + job.warmup_s
        while time.perf_counter() < warm_until:
            send()
        barrier.wait()
        start = window["start"]
        n = 0
        while True:
            if job.rate > 0:
                due = start + (n * job.clients + c) / job.rate
                if due - start > job.seconds:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                t0 = due
            else:
                t0 = time.perf_counter()
                if t0 < start:
                    time.sleep(start - t0)
                    t0 = time.perf_counter()
                if t0 - start > job.seconds:
                    break
            n += 1
            if send() != 200:
                errors[c] += 1
            lat[c].append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in range(job.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - window["start"]
    return np.concatenate([np.asarray(x) for x in lat]).tolist(), sum(errors), wall


def client_process(jobs: Any, results: Any) -> None:
    """The client process: runs each :class:`Job` from ``jobs`` until ``None`` arrives."""
    while (job := jobs.get()) is not None:
        results.put(run_job(job))


class _GcClock:
    """Collections of the server process and the time they took, while installed."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._t0 = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._t0)


class Clients:
    """One long-lived client process (spawned once: its imports are not paid per run).

    Clients run in a separate process so they do not share the server's GIL. Before
    each run the server process collects garbage and waits until the previous run's
    handler threads have ended, so runs do not overlap or inherit each other's heap.
    """

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.jobs = ctx.Queue()
        self.results = ctx.Queue()
        self.proc = ctx.Process(target=client_process, args=(self.jobs, self.results), daemon=True)
        self.proc.start()

    def measure(
        self,
        address: tuple[str, int],
        kind: str,
        n: int,
        clients: int,
        seconds: float,
        *,
        rate: float = 0.0,
        warmup_s: float = 0.5,
    ) -> dict[str, float]:
        _wait_for_handler_threads()
        gc.collect()
        clock = _GcClock()
        gc.callbacks.append(clock)
        try:
            self.jobs.put(Job(address, kind, n, clients, seconds, rate, warmup_s))
            lat, errors, wall = self.results.get(timeout=seconds + warmup_s + 300)
        finally:
            gc.callbacks.remove(clock)
        ms = np.asarray(lat) * 1000.0
        return {
            "requests": float(len(ms)),
            "errors": float(errors),
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "rps": len(ms) / wall,
            "gc_ms": 1000.0 * float(sum(clock.pauses)),
            "gc_max_ms": 1000.0 * float(max(clock.pauses, default=0.0)),
        }

    def close(self) -> None:
        self.jobs.put(None)
        self.proc.join(timeout=30)


def _wait_for_handler_threads(timeout_s: float = 10.0) -> None:
    """Wait until the HTTP handler threads of earlier runs have ended (their clients closed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if "process_request_thread" in t.name]:
            return
        time.sleep(0.01)


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians over repeated runs of the same measurement, with the range of their p99s."""
    out = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    out["p99_min_ms"] = min(r["p99_ms"] for r in runs)
    out["p99_max_ms"] = max(r["p99_ms"] for r in runs)
    out["runs"] = float(len(runs))
    return out


class BusyThread:
    """A thread of pure-Python work that holds the GIL (released only at switch intervals),
    in the server process while it runs: the worst case of the consumer thread processing
    batches while the worker serves (the real one also waits on I/O, RocksDB and torch)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="busy", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            table = {i: str(i) for i in range(2000)}
            sum(len(v) for v in table.values())

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# -- where the time goes, in the server process ---------------------------------------------------


def breakdown(domain: Domain, router: Router, requests: int = 400) -> dict[str, float]:
    """Median and p99 (ms) of the recommend handler and its parts, without HTTP.

    Runs on a fresh thread, as the HTTP handlers do (OpenMP settings are per thread).
    ``history``: the user vector (the sequence encoder over the history's item vectors);
    ``search``: the faiss search; ``handler``: the whole route (parsing, both, JSON).
    """
    out: dict[str, float] = {}

    def run() -> None:
        index = domain.serving.index(DOMAIN)
        times: dict[str, list[float]] = {"history": [], "search": [], "handler": []}
        for i, (method, path, body) in enumerate(_paths("recommend", domain.n, requests, seed=7)):
            history = orjson.loads(body or b"{}")["history"]
            t0 = time.perf_counter()
            router.dispatch(Request(method, path, {}, {}, body or b""))
            t1 = time.perf_counter()
            state, _ = index.user_vector(history)
            t2 = time.perf_counter()
            index.search(state, 10, set(history))
            t3 = time.perf_counter()
            if i >= 20:  # the first calls warm up
                times["handler"].append(t1 - t0)
                times["history"].append(t2 - t1)
                times["search"].append(t3 - t2)
        for name, t in times.items():
            out[f"{name}_p50_ms"] = float(np.percentile(t, 50) * 1000)
            out[f"{name}_p99_ms"] = float(np.percentile(t, 99) * 1000)

    thread = threading.Thread(target=run, name="breakdown")
    thread.start()
    thread.join()
    return out


# -- HNSW vs exact ------------------------------------------------------------------------------


def hnsw_recall(domain: Domain, settings: Settings, queries: int = 500) -> dict[str, float]:
    index = domain.serving.index(DOMAIN)
    x = index.raw[: len(index)]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(x)
    build_s = time.perf_counter() - started
    hnsw.hnsw.efSearch = settings.index_hnsw_ef_search
    q = x[np.random.default_rng(3).integers(len(x), size=queries)]
    out: dict[str, float] = {"hnsw_build_s": build_s}
    for name, ix in (("exact", flat), ("hnsw", hnsw)):
        t = []
        res = []
        for row in q:
            t0 = time.perf_counter()
            scores, ids = ix.search(row[None], 10)
            t.append(time.perf_counter() - t0)
            res.append((ids[0], scores[0]))
        out[f"{name}_ms"] = float(np.median(t) * 1000)
        if name == "exact":
            exact = res
    # recall by score: ties (items sharing a code) count as found
    hits = [float(np.mean(h[1] >= e[1][-1] - 1e-6)) for h, e in zip(res, exact, strict=True)]
    out["recall@10"] = float(np.mean(hits))
    return out


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,10000,100000", help="domain sizes (items)")
    parser.add_argument("--clients", default="1,8,32", help="closed-loop client counts")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop recommend req/s")
    parser.add_argument(
        "--dataset", default=None, help="dataset whose MiniLM embeddings seed items"
    )
    parser.add_argument("--out", default=str(OUT_DIR), help="output directory")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="seconds of uncounted requests before each run"
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=SWITCH_INTERVAL_S,
        help="sys.setswitchinterval of the server process (default: the daemon's)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="open-loop runs per size; the table shows their medians (other processes' load "
        "spikes hit single runs)",
    )
    parser.add_argument(
        "--busy-thread",
        action="store_true",
        help="also run the open loop beside a GIL-holding thread (a worker that ingests)",
    )
    args = parser.parse_args(argv)
    sys.setswitchinterval(args.switch_interval)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    settings = Settings(http_port=0, finetune_hidden=64)
    base = None
    if args.dataset:
        from bench.common import item_embeddings, load_dataset

        base = item_embeddings(load_dataset(args.dataset))
    sizes = [int(s) for s in args.sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"switch_interval_s": args.switch_interval}
    steps = len(sizes) * (2 * len(clients) + 1 + int(args.busy_thread))
    bar = tqdm(total=steps, desc="serve bench", unit="run")
    load_before = os.getloadavg()[0]
    pool = Clients()
    try:
        for n in sizes:
            domain = build_domain(n, base, settings)
            router = Router()
            ApiRoutes(domain.serving, domain.store, settings, lambda *a: None).register(router)
            server = HttpServer(router, "127.0.0.1", 0)
            server.start()
            try:
                for kind in ("recommend", "similar"):
                    for c in clients:
                        r = pool.measure(
                            server.address, kind, n, c, args.seconds, warmup_s=args.warmup
                        )
                        rows.append({"items": n, "endpoint": kind, "clients": c, **r})
                        bar.update()
                open_loop = [(f"{args.rate:g}/s", False)]
                if args.busy_thread:
                    open_loop.append((f"{args.rate:g}/s+busy", True))
                for label, busy in open_loop:
                    runs = []
                    for _ in range(args.repeats):
                        with BusyThread() if busy else contextlib.nullcontext():
                            runs.append(
                                pool.measure(
                                    server.address,
                                    "recommend",
                                    n,
                                    8,
                                    args.seconds,
                                    rate=args.rate,
                                    warmup_s=args.warmup,
                                )
                            )
                    rows.append(
                        {"items": n, "endpoint": "recommend", "clients": label, **_median_run(runs)}
                    )
                    bar.update()
            finally:
                server.stop()
            extra[str(n)] = {"index_build_s": domain.build_s, **breakdown(domain, router)}
            if n == max(sizes):
                extra["hnsw_vs_exact"] = {"items": n, **hnsw_recall(domain, settings)}
            del domain, router, server
    finally:
        pool.close()
    bar.close()
    print()
    print(
        f"{'items':>7} {'endpoint':10} {'clients':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>8} {'errors':>6} {'gc ms':>6}"
    )
    for r in rows:
        print(
            f"{r['items']:>7} {r['endpoint']:10} {r['clients']!s:>8} {r['p50_ms']:8.2f} "
            f"{r['p99_ms']:8.2f} {r['rps']:8.0f} {int(r['errors']):>6} {r['gc_ms']:6.1f}"
        )
    print(
        f"(closed loop: one run of {args.seconds:g} s each; open loop (N/s): medians of "
        f"{args.repeats} runs)"
    )
    print()
    print("recommend in the server process, without HTTP (ms, p50 / p99):")
    print(
        f"{'items':>7} {'history':>13} {'search':>13} {'handler':>13} {'HTTP 1 client':>14} "
        f"{'HTTP/handler':>12}"
    )
    for n in sizes:
        e = extra[str(n)]
        http_1 = next(
            (
                r
                for r in rows
                if r["items"] == n and r["endpoint"] == "recommend" and r["clients"] == 1
            ),
            None,
        )
        http_p50 = float("nan") if http_1 is None else http_1["p50_ms"]
        print(
            f"{n:>7} {e['history_p50_ms']:6.3f}/{e['history_p99_ms']:6.2f} "
            f"{e['search_p50_ms']:6.3f}/{e['search_p99_ms']:6.2f} "
            f"{e['handler_p50_ms']:6.3f}/{e['handler_p99_ms']:6.2f} {http_p50:14.3f} "
            f"{http_p50 / e['handler_p50_ms']:12.2f}"
        )
    print()
    for n in sizes:
        print(f"index build, {n} items: {extra[str(n)]['index_build_s']:.2f} s")
    hv = extra["hnsw_vs_exact"]
    print(
        f"HNSW vs exact on {hv['items']} items: recall@10 {hv['recall@10']:.4f}, "
        f"median search {hv['hnsw_ms']:.3f} ms vs exact {hv['exact_ms']:.3f} ms "
        f"(ratio {hv['hnsw_ms'] / hv['exact_ms']:.2f}), HNSW build {hv['hnsw_build_s']:.1f} s"
    )
    for r in rows:
        if r["clients"] == f"{args.rate:g}/s":  # the goal is for the API alone
            verdict = "met" if r["p99_ms"] < GOAL_P99_MS else "NOT met"
            print(
                f"goal (recommend p99 < {GOAL_P99_MS:g} ms at {args.rate:g} req/s), "
                f"{r['items']} items: p99 {r['p99_ms']:.1f} ms (median of {int(r['runs'])} "
                f"runs of {args.seconds:g} s, range {r['p99_min_ms']:.1f}-{r['p99_max_ms']:.1f}),"
                f" {verdict}"
            )
    extra["load_average"] = [load_before, os.getloadavg()[0]]
    print(
        f"machine load (1-min average) at start / end: {load_before:.1f} / "
        f"{extra['load_average'][1]:.1f} on {os.cpu_count()} cores: other processes' load "
        "shows in the p99s"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_bytes(
        orjson.dumps({"rows": rows, "extra": extra}, option=orjson.OPT_INDENT_2)
    )
    _plot(rows, sizes, clients, out / "serve.png")
    print(f"wrote {out / 'serve.json'} and {out / 'serve.png'}")
    return 0


def _plot(rows: list[dict[str, Any]], sizes: list[int], clients: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("recommend", "similar"), strict=True):
        for n in sizes:
            sel = [
                r
                for r in rows
                if r["items"] == n and r["endpoint"] == kind and r["clients"] in clients
            ]
            ax.plot([r["rps"] for r in sel], [r["p99_ms"] for r in sel], "o-", label=f"{n} items")
            for r in sel:
                ax.annotate(str(r["clients"]), (r["rps"], r["p99_ms"]), fontsize=7)
        ax.set_title(f"{kind}: p99 vs throughput (labels: clients)")
        ax.set_xlabel("requests/s")
        ax.set_ylabel("p99 latency (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
