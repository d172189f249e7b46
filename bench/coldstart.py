"""Cold start end to end: from producing a new item's event to the API serving its vector.

1. A broker (``ops/kafka.sh up`` on free ports, or ``--bootstrap``), topics, and the real
   worker (``python -m worker.commands.cli run``) in its own process with its HTTP API.
2. A base catalogue (items with embeddings: the dataset's MiniLM embeddings with
   ``--dataset DIR``, else clustered random vectors) and interactions; a fine-tune is
   requested on the control topic and the bench waits until version 1 is served.
3. While a background producer sends interactions (``--load`` per second), ``--n`` new
   items are produced at ``--rate`` per second, first items carrying embeddings, then
   items carrying only text (encoded by MiniLM in the worker). For each item the bench
   polls ``GET /v1/domains/{d}/items/{id}/vector`` (every ``--poll-ms``) until it answers
   200: produce-to-servable latency (resolution: the poll interval). One text item is
   served first, so MiniLM's one-time load is not counted. An item served by
   ``/vector`` is in the live index, hence findable by ``/similar``, in the same step.
   Before the load starts, ``--baseline-n`` items per kind are measured the same way
   with no background traffic: the baseline of the ``vs no load`` ratios.

Prints p50/p95/p99/max per kind against the goals (250 ms with embeddings, 1 s with
text) and against the no-load baseline; writes ``bench/out/coldstart.json`` and ``bench/out/coldstart.png``.
Run: ``python -m bench.coldstart [--dataset DIR] [--n 1000] [--rate 10]``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaProducer
from tqdm import tqdm

from adacode.errors import AdacodeError
from bench.broker import broker, free_port
from bench.common import OUT_DIR
from worker.commands.launch import WorkerProcess
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.ingest.events import control_payload, interaction_payload, item_payload

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "cold"
DIM = 384
GOALS_MS = {"embedding": 250.0, "text": 1000.0}


class ColdstartBenchError(AdacodeError):
    """The cold-start benchmark could not set up or observe the worker."""


class Api:
    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def get(self, path: str) -> tuple[int, Any]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.local.conn = None
            return 0, None
        return resp.status, orjson.loads(raw) if raw[:1] in (b"{", b"[") else raw


def _catalogue(n: int, dataset: str | None, seed: int) -> tuple[np.ndarray, list[str]]:
    """Embeddings (normalized, [n, 384]) and texts for base and new items."""
    rng = np.random.default_rng(seed)
    if dataset:
        from bench.common import item_embeddings, load_dataset

        ds = load_dataset(dataset)
        base = item_embeddings(ds)
        pick = rng.integers(len(base), size=n)
        x = base[pick] + 0.02 * rng.normal(size=(n, base.shape[1]))
        texts = [f"{ds.texts[i]} (edition {j})" for j, i in enumerate(pick)]
    else:
        centers = rng.normal(size=(50, DIM))
        x = centers[rng.integers(50, size=n)] + 0.5 * rng.normal(size=(n, DIM))
        words = ["pen", "paper", "desk", "lamp", "chair", "ink", "tape", "stapler", "folder"]
        texts = [" ".join(rng.choice(words, size=6)) + f" model {j}" for j in range(n)]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), texts


def _interactions(n: int, n_items: int, start_ts: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    items = np.minimum(rng.zipf(1.2, size=n) - 1, n_items - 1)
    users = rng.integers(max(50, n // 20), size=n)
    return [
        interaction_payload(f"u{u}", f"b{i}", DOMAIN, start_ts + k)
        for k, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True))
    ]


def measure(
    api: Api,
    producer: KafkaProducer,
    topic: str,
    payloads: list[tuple[str, bytes]],
    rate: float,
    poll_s: float,
    desc: str,
) -> np.ndarray:
    """Produce ``payloads`` at ``rate``/s; latency of each until /vector answers 200 (s)."""
    produced: dict[str, float] = {}
    done: dict[str, float] = {}
    lock = threading.Lock()
    finished = threading.Event()

    def poll() -> None:
        while not finished.is_set() or len(done) < len(produced):
            with lock:
                pending = [k for k in produced if k not in done]
            for item in pending:
                status, _ = api.get(f"/v1/domains/{DOMAIN}/items/{item}/vector")
                if status == 200:
                    done[item] = time.perf_counter()
            if finished.is_set() and pending and time.perf_counter() > deadline:
                break
            time.sleep(poll_s)

    deadline = float("inf")
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    for j, (item, value) in enumerate(tqdm(payloads, desc=desc, unit="item")):
        wait = start + j / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        with lock:
            produced[item] = time.perf_counter()
        producer.send(topic, key=DOMAIN.encode(), value=value)
    deadline = time.perf_counter() + 30
    finished.set()
    poller.join(timeout=60)
    missing = [k for k in produced if k not in done]
    if missing:
        raise ColdstartBenchError(
            f"{len(missing)} of {len(produced)} new items were never served within 30 s "
            f"(e.g. {missing[:3]}); check the worker log"
        )
    return np.asarray([done[k] - produced[k] for k in produced])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default=None, help="a running broker (else one is started)")
    parser.add_argument("--dataset", default=None, help="dataset whose MiniLM embeddings to use")
    parser.add_argument("--base", type=int, default=2000, help="base catalogue items")
    parser.add_argument("--n", type=int, default=1000, help="new items per kind")
    parser.add_argument("--rate", type=float, default=10.0, help="new items per second")
    parser.add_argument("--load", type=float, default=2000.0, help="background interactions/s")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="poll interval per item")
    parser.add_argument(
        "--baseline-n", type=int, default=200, help="new items per kind with no load (0: none)"
    )
    parser.add_argument("--kinds", default="embedding,text", help="embedding, text or both")
    parser.add_argument("--out", default=str(OUT_DIR), help="output directory")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in GOALS_MS]
    if unknown:
        parser.error(f"--kinds {args.kinds!r}: unknown {unknown}; allowed: embedding, text")
    if args.n < 1 or args.baseline_n < 0:
        parser.error("--n must be at least 1 and --baseline-n at least 0")
    per_kind = args.n + args.baseline_n
    x, texts = _catalogue(args.base + per_kind * len(kinds), args.dataset, seed=0)
    results: dict[str, np.ndarray] = {}
    with broker(args.bootstrap, "coldstart") as bootstrap, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        prefix = f"cold{int(time.time())}."
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADACODE_")}
        env.update(
            {
                "ADACODE_KAFKA_BOOTSTRAP": bootstrap,
                "ADACODE_TOPIC_PREFIX": prefix,
                "ADACODE_KAFKA_GROUP_ID": f"{prefix}worker",
                "ADACODE_STATE_DIR": str(Path(tmp) / "state"),
                "ADACODE_HTTP_PORT": str(port),
                "ADACODE_FINETUNE_INTERVAL_S": "0",
                "ADACODE_FINETUNE_AFTER_INTERACTIONS": "0",
                "ADACODE_FINETUNE_EPOCHS": "2",
                "ADACODE_LOG_LEVEL": "WARNING",
                "HF_HUB_OFFLINE": "1",
            }
        )
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
        create_topics(settings, partitions=1)
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
        base = [
            item_payload(f"b{i}", DOMAIN, 1, embedding=x[i].astype(np.float64))
            for i in range(args.base)
        ]
        for value in base:
            producer.send(settings.topic("items"), key=DOMAIN.encode(), value=value)
        for value in _interactions(20_000, args.base, 1000, seed=1):
            producer.send(settings.topic("interactions"), key=DOMAIN.encode(), value=value)
        producer.flush()
        log_path = Path(args.out) / "coldstart_worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with WorkerProcess.start(env, log_path, cwd=REPO, append=False) as worker:
            results = _run(args, kinds, x, texts, settings, producer, Api(port), worker)
        producer.close()
    _report(results, args)
    return 0


def _run(
    args: argparse.Namespace,
    kinds: list[str],
    x: np.ndarray,
    texts: list[str],
    settings: Settings,
    producer: KafkaProducer,
    api: Api,
    worker: WorkerProcess,
) -> dict[str, np.ndarray]:
    started = time.perf_counter()
    worker.wait_until(lambda: api.get("/readyz")[0] == 200, 180, "the base catalogue")
    total = args.base + 20_000

    def consumed() -> bool:
        status, doc = api.get("/readyz")
        return status == 200 and isinstance(doc, dict) and doc["records"] >= total

    worker.wait_until(consumed, 300, f"the worker to apply the {total} base events")
    producer.send(
        settings.topic("control"), key=DOMAIN.encode(), value=control_payload("finetune", DOMAIN)
    ).get(timeout=30)
    worker.wait_until(
        lambda: api.get(f"/v1/domains/{DOMAIN}/items/b0/vector")[0] == 200,
        300,
        "version 1 to be served",
    )
    # the worker loads MiniLM at its first text item: load it before measuring
    producer.send(
        settings.topic("items"),
        key=DOMAIN.encode(),
        value=item_payload("warmup-text", DOMAIN, 2, text="warm up the text encoder"),
    )
    worker.wait_until(
        lambda: api.get(f"/v1/domains/{DOMAIN}/items/warmup-text/vector")[0] == 200,
        120,
        "the text encoder to load",
    )
    print(
        f"set-up (ingest, codebook, fine-tune v1, index) took {time.perf_counter() - started:.1f} s"
    )
    results: dict[str, np.ndarray] = {}

    def new_items(kind: str, tag: str, first: int, n: int) -> list[tuple[str, bytes]]:
        payloads = []
        for j in range(n):
            i = first + j
            item = f"{tag}-{kind}-{j}"
            if kind == "embedding":
                payloads.append(
                    (item, item_payload(item, DOMAIN, 2, embedding=x[i].astype(np.float64)))
                )
            else:
                payloads.append((item, item_payload(item, DOMAIN, 2, text=texts[i])))
        return payloads

    offset = args.base
    if args.baseline_n:
        for kind in kinds:
            results[f"{kind}, no load"] = measure(
                api,
                producer,
                settings.topic("items"),
                new_items(kind, "quiet", offset, args.baseline_n),
                args.rate,
                args.poll_ms / 1000.0,
                f"no load ({kind})",
            )
            offset += args.baseline_n
    stop = threading.Event()

    def background() -> None:
        k, ts = 0, 10_000_000
        batch = _interactions(50_000, args.base, ts, seed=7)
        t0 = time.perf_counter()
        while not stop.is_set():
            producer.send(
                settings.topic("interactions"), key=DOMAIN.encode(), value=batch[k % len(batch)]
            )
            k += 1
            ahead = t0 + k / args.load - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)

    load = threading.Thread(target=background, daemon=True)
    load.start()
    try:
        for kind in kinds:
            payloads = new_items(kind, "new", offset, args.n)
            offset += args.n
            results[kind] = measure(
                api,
                producer,
                settings.topic("items"),
                payloads,
                args.rate,
                args.poll_ms / 1000.0,
                f"new items ({kind})",
            )
    finally:
        stop.set()
        load.join(timeout=10)
    return results


def _report(results: dict[str, np.ndarray], args: argparse.Namespace) -> None:
    print()
    print(
        f"produce-to-servable latency, {args.n} new items per kind at {args.rate:g}/s, "
        f"background {args.load:g} interactions/s, poll every {args.poll_ms:g} ms"
    )
    print(
        f"{'kind':20} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'goal p99':>9} {'p99/goal':>8} {'p50, p99 vs no load':>20}"
    )
    doc: dict[str, Any] = {"args": vars(args), "kinds": {}}
    for kind, lat in results.items():
        ms = lat * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        goal = GOALS_MS[kind.split(",")[0]]
        quiet = results.get(f"{kind}, no load")
        vs = ""
        entry: dict[str, Any] = {}
        if quiet is not None:
            q50, q99 = np.percentile(quiet * 1000.0, [50, 99])
            vs = f"{p50 / q50:.2f}x, {p99 / q99:.2f}x"
            entry = {"p50_vs_no_load": p50 / q50, "p99_vs_no_load": p99 / q99}
        print(
            f"{kind:20} {len(ms):>5} {p50:8.1f} {p95:8.1f} {p99:8.1f} {ms.max():8.1f} "
            f"{goal:9.0f} {p99 / goal:8.2f} {vs:>20}"
        )
        doc["kinds"][kind] = {
            "n": len(ms),
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "max_ms": float(ms.max()),
            "goal_p99_ms": goal,
            **entry,
            "latencies_ms": ms.round(2).tolist(),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coldstart.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, lat in results.items():
        ms = np.sort(lat * 1000.0)
        goal = GOALS_MS[kind.split(",")[0]]
        ax.plot(
            ms,
            np.arange(1, len(ms) + 1) / len(ms),
            label=f"{kind} (goal {goal:.0f} ms)",
            linestyle="--" if "no load" in kind else "-",
        )
        ax.axvline(goal, linestyle=":", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("produce-to-servable latency (ms)")
    ax.set_ylabel("fraction of new items")
    ax.set_title("cold start: new item to /vector 200")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "coldstart.png", dpi=110)
    print(f"wrote {out / 'coldstart.json'} and {out / 'coldstart.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
