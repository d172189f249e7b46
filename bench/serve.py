"""Serving latency and throughput of the /v1 API: recommend and similar, 1/8/32 clients.

For each domain size (default 2k, 10k, 100k items) a domain is built in memory the way
the worker builds it: item embeddings -> residual codebook -> served codes (entropy
policy, Zipf popularity, 20 % head) -> a code-table model version -> the serving index
(:class:`worker.serving.Serving`) behind the real HTTP server (``worker.api``). Item
embeddings are synthetic (Gaussian clusters); with ``--dataset DIR`` they are the
dataset's MiniLM item embeddings plus noise, so codes look like real text codes at any
size. The model is freshly initialised: latency does not depend on trained values.

Clients run in a separate process (threads with keep-alive connections), so they do not
share the server's GIL:

* closed loop: 1, 8, 32 clients, each sending its next request when the last one answered
  (latency p50/p99, throughput);
* open loop: ``--rate`` requests/s (default 200) of recommend at scheduled instants,
  latency counted from the scheduled instant (queueing included);
* HNSW against exact search on the largest domain: recall@10 and latency.

Prints tables; writes ``bench/out/serve.json`` and ``bench/out/serve.png``.
Run: ``python -m bench.serve [--sizes 2000,10000,100000] [--dataset DIR]``.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
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
from worker.api import HttpServer, Router
from worker.routes import ApiRoutes
from worker.serving import Serving
from worker.settings import Settings
from worker.versions import PUBLISHED, VersionRecord, VersionTable, add_version

DOMAIN = "bench"


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
    config = ModelConfig(hidden=settings.finetune_hidden)
    model = build_model(config, rows, n_rows=served.table_rows)
    store = MemoryPartition()
    batch = store.batch()
    add_version(
        store,
        batch,
        DOMAIN,
        VersionRecord(0, None, time.time(), codebook.codebook_id, {}, {}, status=PUBLISHED),
        VersionTable(Snapshot(config, export_params(model)), assigner.keys, rows),
        keep=5,
    )
    store.write(batch)
    serving = Serving(store, settings)
    started = time.perf_counter()
    serving.refresh()
    return Domain(n, store, serving, ids, time.perf_counter() - started)


# -- clients (separate process) -----------------------------------------------------------------


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


def client_process(
    address: tuple[str, int],
    kind: str,
    n_items: int,
    clients: int,
    seconds: float,
    rate: float,
    queue: Any,
) -> None:
    """Closed loop (``rate == 0``) or open loop at ``rate`` req/s; puts (latencies, errors, wall)."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    requests = [_paths(kind, n_items, 512, seed=c) for c in range(clients)]
    start = time.perf_counter() + 0.2

    def run(c: int) -> None:
        conn = http.client.HTTPConnection(*address, timeout=30)
        reqs = requests[c]
        i = 0
        while True:
            if rate > 0:
                due = start + (i * clients + c) / rate
                if due - start > seconds:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                t0 = due
            else:
                t0 = time.perf_counter()
                if t0 - start > seconds:
                    break
            method, path, body = reqs[i % len(reqs)]
            i += 1
            try:
                status = _request(conn, method, path, body)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(*address, timeout=30)
                status = 0
            if status != 200:
                errors[c] += 1
            lat[c].append(time.perf_counter() - t0)
        conn.close()

    while time.perf_counter() < start:
        time.sleep(0.01)
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    queue.put((np.concatenate([np.asarray(x) for x in lat]).tolist(), sum(errors), wall))


def measure(
    address: tuple[str, int], kind: str, n: int, clients: int, seconds: float, rate: float = 0.0
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=client_process, args=(address, kind, n, clients, seconds, rate, queue)
    )
    proc.start()
    lat, errors, wall = queue.get(timeout=seconds + 120)
    proc.join(timeout=30)
    ms = np.asarray(lat) * 1000.0
    return {
        "requests": float(len(ms)),
        "errors": float(errors),
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "rps": len(ms) / wall,
    }


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
        "--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (0: default)"
    )
    args = parser.parse_args(argv)
    if args.switch_interval:
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
    extra: dict[str, Any] = {}
    steps = len(sizes) * (2 * len(clients) + 1)
    bar = tqdm(total=steps, desc="serve bench", unit="run")
    for n in sizes:
        domain = build_domain(n, base, settings)
        router = Router()
        ApiRoutes(domain.serving, domain.store, settings, lambda *a: None).register(router)
        server = HttpServer(router, "127.0.0.1", 0)
        server.start()
        try:
            for kind in ("recommend", "similar"):
                for c in clients:
                    r = measure(server.address, kind, n, c, args.seconds)
                    rows.append({"items": n, "endpoint": kind, "clients": c, **r})
                    bar.update()
            r = measure(server.address, "recommend", n, 8, args.seconds, rate=args.rate)
            rows.append({"items": n, "endpoint": "recommend", "clients": f"{args.rate:g}/s", **r})
            bar.update()
        finally:
            server.stop()
        extra[str(n)] = {"index_build_s": domain.build_s}
        if n == max(sizes):
            extra["hnsw_vs_exact"] = {"items": n, **hnsw_recall(domain, settings)}
    bar.close()
    print()
    print(
        f"{'items':>7} {'endpoint':10} {'clients':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>8} {'errors':>6}"
    )
    for r in rows:
        print(
            f"{r['items']:>7} {r['endpoint']:10} {r['clients']!s:>8} {r['p50_ms']:8.2f} "
            f"{r['p99_ms']:8.2f} {r['rps']:8.0f} {int(r['errors']):>6}"
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
