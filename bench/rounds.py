"""Code-round cost against the catalogue: the incremental assigner beside a full re-evaluation.

One domain of N items (random paths of the rule's shape for N, Pareto popularity, head
thresholds for the top 20 %), then rounds that each move the popularity of M random items;
the median time of a round (and of saving its rows) for each N, with the incremental
assigner and with one that re-evaluates every item (``CodeAssigner(incremental=False)``, what
a round cost before); and the cost of re-coding R items (an item sent again with an
embedding that moves its path: until session 14 every re-code re-evaluated, and saved, every
item). One command, a table and a PNG::

    python -m bench.rounds                     # N = 10k, 100k, 1M; M = 1,000 and 5,000
    python -m bench.rounds --sizes 10000 100000 --moved 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from quantize.assign import CodeAssigner
from quantize.codebook import suggest_shape
from quantize.lengths import make_policy, thresholds_for_fraction

OUT = Path(__file__).resolve().parent / "out"


def _assigner(n: int, *, incremental: bool, seed: int = 0) -> tuple[CodeAssigner, list[str]]:
    rng = np.random.default_rng(seed)
    levels, k = suggest_shape(n)
    a = CodeAssigner(
        levels,
        k,
        make_policy("entropy", min_len=1),
        enter_threshold=float("inf"),
        exit_threshold=float("inf"),
        incremental=incremental,
    )
    keys = [f"i{j}" for j in range(n)]
    pop = rng.pareto(1.1, n)
    a.add(keys, rng.integers(0, k, size=(n, levels)), pop)
    enter, exit_ = thresholds_for_fraction(pop, 0.2)
    a.set_thresholds(enter, exit_)
    a.take_rows()
    return a, keys


def _rounds(a: CodeAssigner, keys: list[str], moved: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    times, saves, changes, touched = [], [], [], []
    for _ in range(repeats):
        picked = rng.choice(len(keys), moved, replace=False)
        values = a.popularity_of([keys[j] for j in picked]) * rng.uniform(0.5, 3.0, moved)
        started = time.perf_counter()
        out = a.update_popularity([keys[j] for j in picked], values)
        times.append(time.perf_counter() - started)
        touched.append(a.unsaved)
        started = time.perf_counter()
        a.take_rows()
        saves.append(time.perf_counter() - started)
        changes.append(len(out))
    return {
        "round_ms": 1000 * statistics.median(times),
        "round_max_ms": 1000 * max(times),
        "save_ms": 1000 * statistics.median(saves),
        "changes": statistics.median(changes),
        "rows_saved": statistics.median(touched),
    }


def _recodes(a: CodeAssigner, keys: list[str], count: int, repeats: int, seed: int) -> dict:
    """Re-code ``count`` random items (new random paths) ``repeats`` times: the call and the
    rows it leaves to save."""
    rng = np.random.default_rng(seed)
    times, touched = [], []
    for _ in range(repeats):
        picked = [keys[j] for j in rng.choice(len(keys), count, replace=False)]
        paths = rng.integers(0, a.k, size=(count, a.levels))
        started = time.perf_counter()
        a.add(picked, paths)
        times.append(time.perf_counter() - started)
        touched.append(a.unsaved)
        a.take_rows()
    return {
        "recode_ms": 1000 * statistics.median(times),
        "recode_max_ms": 1000 * max(times),
        "recode_rows_saved": statistics.median(touched),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--moved", type=int, nargs="+", default=[1_000, 5_000])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--recoded", type=int, default=10, help="items re-coded per call")
    parser.add_argument(
        "--full-max", type=int, default=1_000_000, help="largest N re-evaluated in full"
    )
    args = parser.parse_args(argv)
    rows: list[dict] = []
    recodes: list[dict] = []
    for n in args.sizes:
        for incremental in (True, False):
            if not incremental and n > args.full_max:
                continue
            a, keys = _assigner(n, incremental=incremental)
            for moved in args.moved:
                repeats = args.repeats if incremental else max(1, min(3, args.repeats))
                got = _rounds(a, keys, min(moved, n), repeats, seed=moved)
                rows.append({"items": n, "moved": moved, "incremental": incremental, **got})
                print(rows[-1], flush=True)
            repeats = args.repeats if incremental else max(1, min(3, args.repeats))
            got = _recodes(a, keys, min(args.recoded, n), repeats, seed=n)
            recodes.append({"items": n, "recoded": args.recoded, "incremental": incremental, **got})
            print(recodes[-1], flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "rounds.json").write_text(json.dumps({"rounds": rows, "recodes": recodes}, indent=2))
    lines = [
        "| items | moved | assigner | round ms (median / max) | rows saved | code changes | save ms |",
        "|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        kind = "incremental" if r["incremental"] else "full re-evaluation"
        lines.append(
            f"| {r['items']:,} | {r['moved']:,} | {kind} | {r['round_ms']:.1f} / "
            f"{r['round_max_ms']:.1f} | {r['rows_saved']:,.0f} | {r['changes']:,.0f} | "
            f"{r['save_ms']:.1f} |"
        )
    lines += [
        "",
        "| items | items re-coded per call | assigner | call ms (median / max) | rows saved |",
        "|---:|---:|---|---|---:|",
    ]
    for r in recodes:
        kind = "incremental" if r["incremental"] else "full re-evaluation"
        lines.append(
            f"| {r['items']:,} | {r['recoded']:,} | {kind} | {r['recode_ms']:.1f} / "
            f"{r['recode_max_ms']:.1f} | {r['recode_rows_saved']:,.0f} |"
        )
    table = "\n".join(lines)
    (OUT / "rounds.md").write_text(table + "\n")
    print(table)
    fig, ax = plt.subplots(figsize=(7, 4))
    for incremental in (True, False):
        for moved in args.moved:
            pts = [r for r in rows if r["incremental"] is incremental and r["moved"] == moved]
            if pts:
                ax.plot(
                    [r["items"] for r in pts],
                    [r["round_ms"] for r in pts],
                    marker="o",
                    label=f"{'incremental' if incremental else 'full'}, {moved:,} moved",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items in the domain")
    ax.set_ylabel("median round (ms)")
    ax.set_title("code round cost against the catalogue")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "rounds.png", dpi=120)
    print(f"wrote {OUT / 'rounds.md'}, rounds.json, rounds.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
