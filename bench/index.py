"""The serving index at 100k and 1M items: the rule's choice against exact search.

For each catalogue size (items x the table width ``finetune_hidden``, 64 by default) it
builds the real serving index (:class:`worker.serving.index.DomainIndex`: the items'
vectors from a version's code rows plus their text part, then the faiss index) of a
synthetic version whose items have Zipf-popular 5-level codes of a 256-word residual
codebook (so many items share a code, as served ones do) and their own text part, twice:

* ``exact``: ``IndexFlatIP`` (what serving used up to 1M items before);
* ``ivf``: the inverted file of :class:`~worker.serving.index.IndexRule` (``~sqrt(n)``
  cells trained on a bounded sample, ``nprobe`` calibrated to ``index_recall``);

and marks which one the rule picks with the default settings. Measured: build time (the
whole :class:`DomainIndex`: vectors, training, adds, calibration), memory (item vectors
plus the serialized faiss index), recall@10 against exact search on 1,000 held-out
queries like the served ones (items and midpoints of two items; ties by score count as
found), search latency p50/p99 one query at a time (one OpenMP thread, as an HTTP thread
searches), and p50/p99 at a fixed arrival rate (``--rate``, 200 requests/s: open loop,
latency counted from each request's scheduled arrival, four searching threads).

Run (the 1M build takes a minute or two on two cores)::

    nice .venv/bin/python -m bench.index                 # 100k and 1M
    .venv/bin/python -m bench.index --sizes 20000 100000

Writes ``bench/out/index.json`` and ``bench/out/index.png``; prints a table.
"""

from __future__ import annotations

import argparse
import gc
import queue
import threading
import time
from dataclasses import replace
from typing import Any

import faiss
import numpy as np
import orjson
import torch

from bench.common import out_path
from quantize.table_model import ModelConfig, Snapshot, build_model, export_params
from worker.core.settings import Settings
from worker.serving.index import DomainIndex, IndexRule, recall_at, sample_queries
from worker.state.versions import VersionTable

LEVELS, K = 5, 256
QUERIES = 1000
WORKERS = 4
GOAL_BUILD_S = 120.0
GOAL_RECALL = 0.95


def synthetic_table(n: int, hidden: int, seed: int = 0) -> VersionTable:
    """A version of ``n`` items: Zipf-popular codes (random rows, smaller at deeper
    levels) and a text part ``W @ e`` of their own."""
    rng = np.random.default_rng(seed)
    rows = (rng.zipf(1.2, size=(n, LEVELS)) - 1) % K + np.arange(LEVELS) * K
    config = ModelConfig(hidden=hidden, max_len=8, layers=1, dropout=0.0, text_dim=8)
    torch.manual_seed(seed)
    params = export_params(build_model(config, rows[:16], n_rows=LEVELS * K))
    scale = np.repeat(0.6 ** np.arange(LEVELS), K)[:, None]
    params["table.rows"] = (rng.normal(size=(LEVELS * K, hidden)) * scale).astype(np.float32)
    text = (0.3 * rng.normal(size=(n, hidden))).astype(np.float32)
    ids = [f"i{i}" for i in range(n)]
    return VersionTable(Snapshot(config, params), ids, rows.astype(np.int64), text)


def build(table: VersionTable, rule: IndexRule) -> tuple[DomainIndex, float]:
    gc.collect()
    started = time.perf_counter()
    index = DomainIndex("bench", 1, table, rule=rule)
    return index, time.perf_counter() - started


def memory_mib(index: DomainIndex) -> float:
    faiss_bytes = len(faiss.serialize_index(index.index.index))
    return (index.raw.nbytes + faiss_bytes) / 2**20


def single_latency(index: DomainIndex, queries: np.ndarray) -> tuple[float, float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q, 10, set())
        times.append(time.perf_counter() - t0)
    t = np.asarray(times) * 1000
    return float(np.percentile(t, 50)), float(np.percentile(t, 99))


def rate_latency(
    index: DomainIndex, queries: np.ndarray, rate: float, seconds: float
) -> tuple[float, float, float]:
    """Open loop at ``rate`` requests/s for ``seconds``: p50, p99 (from each request's
    scheduled arrival) and the throughput achieved."""
    jobs: queue.Queue[tuple[float, np.ndarray] | None] = queue.Queue()
    latencies: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        faiss.omp_set_num_threads(1)
        while (job := jobs.get()) is not None:
            due, q = job
            index.search(q, 10, set())
            done = time.perf_counter()
            with lock:
                latencies.append(done - due)

    workers = [threading.Thread(target=work) for _ in range(WORKERS)]
    for w in workers:
        w.start()
    count = int(rate * seconds)
    start = time.perf_counter() + 0.05
    for i in range(count):
        due = start + i / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        jobs.put((due, queries[i % len(queries)]))
    for _ in workers:
        jobs.put(None)
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    t = np.asarray(latencies) * 1000
    return float(np.percentile(t, 50)), float(np.percentile(t, 99)), count / elapsed


def measure(
    n: int, settings: Settings, rate: float, seconds: float, seed: int
) -> list[dict[str, Any]]:
    table = synthetic_table(n, settings.finetune_hidden, seed)
    chosen = IndexRule.of(settings).plan(n).kind.value
    rows = []
    exact_scores: np.ndarray | None = None
    queries: np.ndarray | None = None
    variants = (
        ("exact", IndexRule(exact_max_items=n)),
        ("ivf", replace(IndexRule.of(settings), exact_max_items=0)),
    )
    for name, rule in variants:
        index, build_s = build(table, rule)
        if queries is None:
            vectors = index.raw[:n] / np.linalg.norm(index.raw[:n], axis=1, keepdims=True)
            queries = sample_queries(vectors.astype(np.float32), QUERIES, seed + 7)
        q = queries
        found, _ = index.index.search(q, 10)
        if exact_scores is None:
            exact_scores = found
        faiss.omp_set_num_threads(1)
        p50, p99 = single_latency(index, q)
        r50, r99, achieved = rate_latency(index, q, rate, seconds)
        faiss.omp_set_num_threads(2)
        row = {
            "items": n,
            "index": name,
            "rule_picks": index.params["kind"] == chosen,
            **index.params,
            "build_s": build_s,
            "memory_mib": memory_mib(index),
            "recall@10": recall_at(found, exact_scores),
            "p50_ms": p50,
            "p99_ms": p99,
            "rate": rate,
            "rate_p50_ms": r50,
            "rate_p99_ms": r99,
            "achieved_rps": achieved,
        }
        rows.append(row)
        print(_line(row), flush=True)
        del index
    return rows


HEADER = (
    f"{'items':>9} {'index':>6} {'rule':>4} {'params':>22} {'build s':>8} {'MiB':>7} "
    f"{'R@10':>6} {'p50 ms':>7} {'p99 ms':>7} {'@rate p50':>9} {'@rate p99':>9} {'rps':>6}"
)


def _line(r: dict[str, Any]) -> str:
    params = f"nlist={r['nlist']} nprobe={r['nprobe']}" if r["kind"] == "ivf" else "-"
    return (
        f"{r['items']:>9} {r['index']:>6} {'*' if r['rule_picks'] else '':>4} {params:>22} "
        f"{r['build_s']:>8.1f} {r['memory_mib']:>7.0f} {r['recall@10']:>6.3f} "
        f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['rate_p50_ms']:>9.2f} "
        f"{r['rate_p99_ms']:>9.2f} {r['achieved_rps']:>6.0f}"
    )


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["items"] for r in rows})
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (
        ("build_s", "build s", GOAL_BUILD_S),
        ("recall@10", "recall@10 vs exact", GOAL_RECALL),
        ("p99_ms", "p99 ms, one query at a time", None),
        ("rate_p99_ms", "p99 ms at the rate", None),
    )
    width = 0.38
    for ax, (key, title, goal) in zip(axes, panels, strict=True):
        for j, name in enumerate(("exact", "ivf")):
            vals = [
                next(r[key] for r in rows if r["items"] == n and r["index"] == name) for n in sizes
            ]
            ax.bar(np.arange(len(sizes)) + (j - 0.5) * width, vals, width, label=name)
        if goal is not None:
            ax.axhline(goal, color="grey", linestyle="--", linewidth=1, label="goal")
        ax.set_xticks(np.arange(len(sizes)), [f"{n:,}" for n in sizes])
        ax.set_title(title)
        if key.endswith("_ms"):
            ax.set_yscale("log")
        if key == "recall@10":
            ax.set_ylim(0.8, 1.005)
        ax.legend(fontsize=8)
    fig.suptitle("serving index: exact (flat) vs the rule's inverted file")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the rate run")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the rate run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = Settings()
    faiss.omp_set_num_threads(2)
    torch.set_num_threads(2)
    print(
        f"dimension {settings.finetune_hidden} (finetune_hidden); rule: exact up to "
        f"{settings.index_exact_max_items:,} items, IVF above (nprobe calibrated to recall "
        f"{settings.index_recall}); '*': the rule's pick"
    )
    print(HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        rows.extend(measure(n, settings, args.rate, args.seconds, args.seed))
    out_path("index.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    png = out_path("index.png")
    plot(rows, str(png))
    print()
    for n in args.sizes:
        ex = next(r for r in rows if r["items"] == n and r["index"] == "exact")
        iv = next(r for r in rows if r["items"] == n and r["index"] == "ivf")
        print(
            f"{n:,} items: IVF build {iv['build_s']:.1f} s (goal <= {GOAL_BUILD_S:.0f} s), "
            f"recall@10 {iv['recall@10']:.3f} (goal >= {GOAL_RECALL}), single-query p50 "
            f"{iv['p50_ms']:.2f} ms = {iv['p50_ms'] / ex['p50_ms']:.3f} x exact's "
            f"{ex['p50_ms']:.2f} ms; build {iv['build_s'] / ex['build_s']:.1f} x exact's"
        )
    print(f"wrote {png} and {out_path('index.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
