"""Benchmark the adaptive-length residual codes on real datasets.

For every dataset and code depth ``L`` (with ``K`` from the shape rule unless given), and
for fixed-length codes and every adaptive length policy, it reports: collision rate (all
items; head = top 20 % by interactions), per-level utilization and balance, mean served
length of head and tail items, table rows used and allocated, table memory against a
per-item ID table of the same width, and coding throughput (batched encode of ready
embeddings, median of several runs). A second table compares the two codebook trainers
(``rkmeans`` greedy vs ``rq_beam``) at the rule's shape: training time, encode throughput
and reconstruction error per prefix length, the evidence for the default trainer.

A third table checks training on a bounded sample (``points_per_centroid``, the bootstrap's
rule ``sample_size(K) = K * 256`` rows) against training on every item, on synthetic
clustered 384-d items (``--sample-items``): training time, relative quantization error
(MSE over mean squared norm, full depth and after one level) and the share of items whose
full path another item shares. ``--bootstrap-items`` times the worker's bootstrap itself
(:mod:`worker.ingest.bootstrap`, in-process, items in a RocksDB store): choosing the sample
(one streamed pass over ``items``), reading it and training, with the peak resident-memory
growth sampled every 20 ms.

Run from the repository root::

    python -m bench.codes --dataset ../shared/datasets/office \\
        --dataset ../shared/datasets/movies
    python -m bench.codes --sample-items 100000 --bootstrap-items 100000 1000000

Outputs: printed tables, ``bench/out/codes_<dataset>.png`` (served length against
popularity, per policy) and ``bench/out/codes_<dataset>.json`` (all figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss
import numpy as np
from tqdm import tqdm

from bench.common import Dataset, item_embeddings, load_dataset, out_path
from quantize.assign import ServedCodes, assign_codes
from quantize.code_metrics import CodeReport, code_report
from quantize.codebook import POINTS_PER_CENTROID, ResidualCodebook, sample_size, suggest_shape
from quantize.lengths import make_policy
from store.partition import StorePartition

DEFAULT_LEVELS = (3, 4, 5, 6)
POLICY_ROWS = ("fixed-raw", "fixed", "popularity", "entropy", "reverse")
THROUGHPUT_ROWS = 50_000


@dataclass(frozen=True)
class Row:
    dataset: str
    levels: int
    k: int
    policy: str
    rule: bool
    report: CodeReport
    encode_items_per_s: float


def throughput(codebook: ResidualCodebook, x: np.ndarray, runs: int) -> float:
    """Median items/s of ``codebook.encode`` over ``runs`` runs on >= 50k tiled rows."""
    reps = max(1, -(-THROUGHPUT_ROWS // len(x)))
    data = np.ascontiguousarray(np.tile(x, (reps, 1)))
    codebook.encode(data[:1000])  # warm up (builds the per-level indexes)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        codebook.encode(data)
        times.append(time.perf_counter() - start)
    return len(data) / statistics.median(times)


def served_for(
    policy: str, paths: np.ndarray, pop: np.ndarray, head: np.ndarray, k: int, min_len: int
) -> ServedCodes:
    if policy == "fixed-raw":
        return assign_codes(paths, pop, make_policy("fixed"), k=k, is_head=head, unique_head=False)
    if policy == "fixed":
        return assign_codes(paths, pop, make_policy("fixed"), k=k, is_head=head)
    return assign_codes(paths, pop, make_policy(policy, min_len=min_len), k=k, is_head=head)


def fmt_levels(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def print_table(rows: list[Row], n_items: int) -> None:
    header = (
        f"{'L':>2} {'K':>4} {'policy':<11} {'coll_all':>8} {'coll_head':>9} "
        f"{'len_h':>5} {'len_t':>5} {'rows_used':>9} {'rows_alloc':>10} {'mem_vs_id':>9} "
        f"{'enc_items/s':>11}  utilization / balance per level"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rep = r.report
        mark = " *" if r.rule else ""
        print(
            f"{r.levels:>2} {r.k:>4} {r.policy:<11} {rep.collision_all:>8.3f} "
            f"{rep.collision_head:>9.3f} {rep.mean_len_head:>5.2f} {rep.mean_len_tail:>5.2f} "
            f"{rep.rows_used:>9} {rep.rows_allocated:>10} {rep.memory_ratio:>9.3f} "
            f"{r.encode_items_per_s:>11,.0f}  {fmt_levels(rep.utilization)} | "
            f"{fmt_levels(rep.balance)}{mark}"
        )
    print(
        f"mem_vs_id = allocated rows / {n_items} rows of a per-item ID table (same width); "
        "* = the shape rule's (L, K)"
    )


def compare_methods(
    x: np.ndarray, levels: int, k: int, runs: int, seed: int
) -> list[dict[str, object]]:
    """Train both methods at one shape; time and score them."""
    out: list[dict[str, object]] = []
    for method in ("rkmeans", "rq_beam"):
        start = time.perf_counter()
        cb = ResidualCodebook.train(x, levels, k, seed=seed, method=method)  # type: ignore[arg-type]
        train_s = time.perf_counter() - start
        errors = cb.level_errors(x)
        greedy_paths = cb.encode_greedy(x)
        beam_paths = cb.encode(x)
        out.append(
            {
                "method": method,
                "train_s": train_s,
                "encode_items_per_s": throughput(cb, x, runs),
                "errors": [float(e) for e in errors],
                "level0_same_as_greedy": float(np.mean(beam_paths[:, 0] == greedy_paths[:, 0])),
            }
        )
    return out


def print_methods(results: list[dict[str, object]]) -> None:
    base = results[0]
    print(
        f"{'method':<8} {'train_s':>8} {'enc_items/s':>11} {'enc_vs_rkmeans':>14} "
        f"{'l0_greedy':>9}  mean squared error after 1..L levels"
    )
    for res in results:
        errors = res["errors"]
        assert isinstance(errors, list)
        speed = float(res["encode_items_per_s"])  # type: ignore[arg-type]
        ratio = speed / float(base["encode_items_per_s"])  # type: ignore[arg-type]
        print(
            f"{res['method']:<8} {float(res['train_s']):>8.2f} {speed:>11,.0f} "  # type: ignore[arg-type]
            f"{ratio:>14.3f} {float(res['level0_same_as_greedy']):>9.2f}  "  # type: ignore[arg-type]
            + " ".join(f"{e:.4f}" for e in errors[1:])
        )
    print("l0_greedy = share of items whose level-0 digit equals the greedy (nearest) one")


# -- sample training against full training (synthetic) -----------------------------------

SYNTH_DIM = 384


def synthetic_items(n: int, seed: int = 0, dim: int = SYNTH_DIM) -> np.ndarray:
    """Unit-norm clustered items: 64 topics, 16 sub-topics each, Gaussian noise (float32)."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((64, dim))
    subs = topics[:, None, :] + 0.6 * rng.standard_normal((64, 16, dim))
    subs = subs.reshape(-1, dim)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: no float64 copy of all n rows
        m = min(100_000, n - start)
        block = subs[rng.integers(0, len(subs), m)] + 0.5 * rng.standard_normal((m, dim))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def shared_path_share(paths: np.ndarray) -> float:
    """Share of items whose full path at least one other item has too."""
    _, inverse, counts = np.unique(paths, axis=0, return_inverse=True, return_counts=True)
    return float(np.mean(counts[inverse.ravel()] > 1))


def compare_sampling(
    x: np.ndarray, levels: int, k: int, seed: int, per_centroid: list[int]
) -> list[dict[str, object]]:
    """Train at one shape on every row and on samples of ``k * p`` rows; score on every row."""
    power = float(np.mean(np.einsum("nd,nd->n", x, x)))
    out: list[dict[str, object]] = []
    for p in [None, *per_centroid]:
        start = time.perf_counter()
        cb = ResidualCodebook.train(x, levels, k, seed=seed, points_per_centroid=p)
        train_s = time.perf_counter() - start
        paths = cb.encode(x)
        out.append(
            {
                "training": "full" if p is None else f"sample {p}/centroid",
                "rows": len(x) if p is None else min(len(x), sample_size(k, points_per_centroid=p)),
                "train_s": train_s,
                "rel_mse": cb.quantization_error(x, codes=paths) / power,
                "rel_mse_l1": cb.quantization_error(x, length=1, codes=paths) / power,
                "shared_paths": shared_path_share(paths),
                "codebook_id": cb.codebook_id,
            }
        )
    return out


def print_sampling(results: list[dict[str, object]]) -> None:
    base = results[0]
    print(
        f"{'training':<18} {'rows':>9} {'train_s':>8} {'vs_full':>7} {'rel_mse':>8} "
        f"{'mse_vs_full':>11} {'rel_mse_l1':>10} {'shared_paths':>12}"
    )
    for r in results:
        print(
            f"{r['training']!s:<18} {r['rows']:>9,} {r['train_s']:>8.2f} "
            f"{float(r['train_s']) / float(base['train_s']):>7.2f} {r['rel_mse']:>8.4f} "  # type: ignore[arg-type]
            f"{float(r['rel_mse']) / float(base['rel_mse']):>11.4f} "  # type: ignore[arg-type]
            f"{r['rel_mse_l1']:>10.4f} {r['shared_paths']:>12.4f}"
        )
    print(
        "rel_mse = full-depth MSE / mean squared norm (every item, encoded by each codebook); "
        "shared_paths = share of items whose full path another item has too"
    )


def run_sampling(n: int, args: argparse.Namespace) -> list[dict[str, object]]:
    x = synthetic_items(n, seed=args.seed)
    levels, k = suggest_shape(n)
    print(
        f"\n== sample vs full training: {n:,} synthetic clustered items x {SYNTH_DIM}, "
        f"L={levels}, K={k} (rule), faiss threads {args.threads}"
    )
    results = compare_sampling(x, levels, k, args.seed, args.points_per_centroid)
    print_sampling(results)
    out_path(f"codes_sampling_{n}.json").write_text(json.dumps(results, indent=1))
    return results


# -- the worker's bootstrap, in-process ----------------------------------------------------


def run_bootstrap(n: int, args: argparse.Namespace) -> dict[str, object]:
    """Store ``n`` synthetic items in a fresh RocksDB store, then choose the sample and
    train through :class:`worker.ingest.bootstrap.Bootstrap`, sampling RSS every 20 ms."""
    import tempfile

    from store.rocksdb import RocksDBPartition

    with (
        tempfile.TemporaryDirectory(prefix="adacode-bootstrap-") as tmp,
        RocksDBPartition.open(Path(tmp) / "state") as store,
    ):
        store_synthetic(store, n, args.seed)
        result = timed_bootstrap(store)
    print(
        f"bootstrap {n:>9,} items: sample {result['sample']:,}, L x K = {result['shape']}; "
        f"choose sample {result['scan_s']:.1f} s, read + train {result['train_s']:.1f} s, "
        f"total {result['total_s']:.1f} s; peak RSS growth "
        f"{result['peak_rss_growth_mib']:.0f} MiB"
    )
    out_path(f"codes_bootstrap_{n}.json").write_text(json.dumps({"items": n, **result}, indent=1))
    return result


def store_synthetic(store: StorePartition, n: int, seed: int) -> None:
    from store.records import ItemRecord
    from worker.state.layout import item_key

    for start in range(0, n, 50_000):
        block = synthetic_items(min(50_000, n - start), seed=seed + start)
        batch = store.batch()
        for i, vec in enumerate(block, start):
            record = ItemRecord(i, i, b"", vec.tobytes())
            batch.put("items", item_key("shop", f"item{i:08d}"), record.encode())
        store.write(batch)


def timed_bootstrap(store: StorePartition) -> dict[str, Any]:
    """Choose the sample and train it as the worker does; times and peak RSS growth."""
    import threading

    from worker.core.settings import Settings
    from worker.ingest.bootstrap import Bootstrap, resident_bytes, sample_cap, scan_sample

    settings = Settings(embedding_dim=SYNTH_DIM)
    stop, done = threading.Event(), threading.Event()
    base = resident_bytes()
    peak = [base]

    def watch() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], resident_bytes())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    scan = scan_sample(store, sample_cap(settings), stop_event=stop)
    scanned = time.perf_counter()
    boot = Bootstrap(store, settings, stop)
    boot.start(scan.keys, scan.n_items)
    while boot.poll() is None and boot.running:
        time.sleep(0.05)
    codebook = boot.poll()
    ended = time.perf_counter()
    done.set()
    watcher.join()
    if codebook is None:
        raise RuntimeError(f"the bootstrap ended without a codebook ({boot.phase})")
    return {
        "sample": len(scan.keys),
        "shape": [codebook.levels, codebook.k],
        "scan_s": scanned - started,
        "train_s": ended - scanned,
        "total_s": ended - started,
        "peak_rss_growth_mib": (peak[0] - base) / 2**20,
    }


def plot(ds: Dataset, pop: np.ndarray, served: dict[str, ServedCodes], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(served)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), sharey=True)
    rng = np.random.default_rng(0)
    x = np.log10(1.0 + pop)
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        sc = served[name]
        lengths = sc.served_lengths.astype(np.float64)
        jitter = rng.uniform(-0.15, 0.15, size=lengths.shape)
        ax.scatter(
            x[~sc.is_head],
            lengths[~sc.is_head] + jitter[~sc.is_head],
            s=3,
            alpha=0.3,
            label="tail",
        )
        ax.scatter(
            x[sc.is_head], lengths[sc.is_head] + jitter[sc.is_head], s=3, alpha=0.3, label="head"
        )
        edges = np.quantile(x, np.linspace(0, 1, 11))
        bins = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, 9)
        centres = [x[bins == b].mean() for b in range(10) if (bins == b).any()]
        means = [lengths[bins == b].mean() for b in range(10) if (bins == b).any()]
        ax.plot(centres, means, color="black", marker="o", lw=1.5, label="mean per decile")
        ax.set_title(name)
        ax.set_xlabel("log10(1 + interactions)")
    first = np.atleast_1d(axes)[0]
    first.set_ylabel("served code length (digits)")
    first.legend(loc="upper left", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = out_path(f"codes_{ds.name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_dataset(root: Path, args: argparse.Namespace) -> dict[str, object]:
    ds = load_dataset(root)
    x = item_embeddings(ds)
    pop = ds.popularity()
    head = ds.head_mask(args.head_fraction)
    rule_levels, rule_k = suggest_shape(ds.n_items)
    k = args.k if args.k is not None else rule_k
    levels_list = sorted(set(args.levels) | ({rule_levels} if args.k is None else set()))
    print(
        f"\n== {ds.name}: {ds.n_items} items, {len(ds.items)} interactions, "
        f"head = top {args.head_fraction:.0%} ({int(head.sum())} items); "
        f"shape rule -> L={rule_levels}, K={rule_k}; using K={k}"
    )
    rows: list[Row] = []
    rule_served: dict[str, ServedCodes] = {}
    for levels in tqdm(levels_list, desc=f"{ds.name} levels", leave=False):
        cb = ResidualCodebook.train(x, levels, k, seed=args.seed)
        paths = cb.encode(x)
        speed = throughput(cb, x, args.runs)
        is_rule = levels == rule_levels and k == rule_k
        for policy in POLICY_ROWS:
            served = served_for(policy, paths, pop, head, k, args.min_len)
            rows.append(Row(ds.name, levels, k, policy, is_rule, code_report(served), speed))
            if is_rule or (not rule_served and levels == levels_list[-1]):
                rule_served[policy] = served
    print_table(rows, ds.n_items)
    print(f"\n-- codebook trainers at L={rule_levels}, K={rule_k} ({ds.name})")
    methods = compare_methods(x, rule_levels, rule_k, args.runs, args.seed)
    print_methods(methods)
    shown = {p: rule_served[p] for p in ("fixed", "popularity", "entropy", "reverse")}
    shown_levels = next(iter(shown.values())).levels
    png = plot(ds, pop, shown, f"{ds.name}: served length vs popularity (L={shown_levels}, K={k})")
    result = {
        "dataset": ds.name,
        "n_items": ds.n_items,
        "rule": {"levels": rule_levels, "k": rule_k},
        "rows": [
            {
                **{k_: v for k_, v in asdict(r).items() if k_ != "report"},
                **asdict(r.report),
                "memory_ratio": r.report.memory_ratio,
            }
            for r in rows
        ],
        "methods": methods,
    }
    json_path = out_path(f"codes_{ds.name}.json")
    json_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {png} and {json_path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", action="append", default=[], type=Path, help="dataset directory (repeat)"
    )
    parser.add_argument(
        "--sample-items",
        type=int,
        nargs="+",
        default=[],
        help="compare sample- and full-trained codebooks on this many synthetic items",
    )
    parser.add_argument(
        "--points-per-centroid",
        type=int,
        nargs="+",
        default=[64, POINTS_PER_CENTROID],
        help="sample sizes (per centroid) to compare against full training",
    )
    parser.add_argument(
        "--bootstrap-items",
        type=int,
        nargs="+",
        default=[],
        help="time the worker's bootstrap (sample + train) on this many synthetic items",
    )
    parser.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=list(DEFAULT_LEVELS),
        help="code depths to test (the rule's depth is added when --k is not given)",
    )
    parser.add_argument("--k", type=int, default=None, help="codewords per level (default: rule)")
    parser.add_argument("--head-fraction", type=float, default=0.2)
    parser.add_argument("--min-len", type=int, default=1, help="adaptive policies' min length")
    parser.add_argument("--runs", type=int, default=5, help="throughput repetitions (median)")
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.dataset or args.sample_items or args.bootstrap_items):
        parser.error("give --dataset, --sample-items or --bootstrap-items")
    faiss.omp_set_num_threads(args.threads)
    for root in args.dataset:
        run_dataset(root, args)
    for n in args.sample_items:
        run_sampling(n, args)
    for n in args.bootstrap_items:
        run_bootstrap(n, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
