"""Per-step training time and peak memory against the catalogue size, same interactions.

One synthetic domain per catalogue size (default 10k, 100k and 1M items): clustered 384-d
item embeddings (L2-normalised), residual codes from a random codebook assigned by
:func:`quantize.assign.assign_codes` (full paths; colliding head items get a
disambiguation row), and the SAME number of interactions at every size (default 200k, 20k
users), items drawn from a Zipf law over the catalogue. Each (size, loss) cell runs in a
fresh subprocess (so its peak RSS is its own) through :func:`quantize.train.train_domain`
with the product's model (hidden 64, text projection 384 -> 64, one thread): the
``check`` callback, which training calls before every step, timestamps the steps and stops
the run after ``--steps`` of them. Reported: the median CPU time of a step (one torch
thread; CPU time, not wall time, because this 2-core machine is shared: the wall median is
in the JSON; the first steps are warm-up and skipped), the training's own peak RSS above the data it was given, and the
process peak.

``loss=full`` is the full softmax (every item's vector, every step); ``sampled`` the
logQ-corrected sampled softmax (``TrainConfig.negatives`` uniform draws plus the batch's
targets). The crossover of the two curves justifies ``finetune_full_softmax_max_items``
(the rule: full softmax while it costs at most ``--ratio`` times a sampled step). The
full softmax at 1M items runs only ``--full-steps`` steps (seconds each).

Run from the repository root (about 10 minutes on 2 cores)::

    python -m bench.train_scale
    python -m bench.train_scale --sizes 2000,5000,10000,20000,50000,100000,1000000

Outputs: a printed table, ``bench/out/train_scale.png`` and ``bench/out/train_scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import out_path

DIM = 384
CLUSTERS = 256
LEVELS = 3
K = 256


class _Enough(Exception):
    """Raised from the step callback once the wanted steps are timed."""


def synthetic_domain(
    n_items: int, n_interactions: int, n_users: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """``(item_rows, text, users, items, timestamps, n_rows)`` of one synthetic domain."""
    from quantize.assign import assign_codes
    from quantize.lengths import FixedLength

    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, CLUSTERS, n_items)
    centers = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    text = np.empty((n_items, DIM), dtype=np.float32)
    for a in range(0, n_items, 1 << 16):  # bounded temporaries
        b = min(a + (1 << 16), n_items)
        x = centers[cluster[a:b]] + 0.5 * rng.standard_normal((b - a, DIM), dtype=np.float32)
        text[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    paths = np.empty((n_items, LEVELS), dtype=np.int64)  # a random codebook's paths:
    paths[:, 0] = cluster % K  # the first level follows the cluster, the rest is noise
    paths[:, 1:] = rng.integers(0, K, (n_items, LEVELS - 1))
    weights = 1.0 / np.arange(1, n_items + 1) ** 1.05  # Zipf over a random item order
    order = rng.permutation(n_items)
    items = order[rng.choice(n_items, size=n_interactions, p=weights / weights.sum())]
    popularity = np.bincount(items, minlength=n_items).astype(np.float64)
    served = assign_codes(paths, popularity, FixedLength(), k=K)
    users = rng.integers(0, n_users, n_interactions)
    stamps = np.arange(n_interactions, dtype=np.int64)
    return served.row_matrix(), text, users, items, stamps, served.table_rows


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(n_items: int, loss: str, steps: int, n_interactions: int, n_users: int) -> dict:
    """One cell, in this process: time ``steps`` training steps."""
    from quantize.table_model import ModelConfig
    from quantize.train import TrainConfig, train_domain

    rows, text, users, items, stamps, n_rows = synthetic_domain(n_items, n_interactions, n_users)
    data_rss = _peak_rss_mib()
    stamps_at: list[float] = []
    cpu_at: list[float] = []

    def check() -> None:
        stamps_at.append(time.perf_counter())
        cpu_at.append(time.process_time())
        if len(stamps_at) > steps + 1:  # the call before setup, then one per step
            raise _Enough

    started = time.perf_counter()
    with contextlib.suppress(_Enough):
        train_domain(
            rows,
            users,
            items,
            stamps,
            model_config=ModelConfig(text_dim=DIM),
            config=TrainConfig(softmax=loss, threads=1, epochs=1),  # type: ignore[arg-type]
            text=text,
            n_rows=n_rows,
            check=check,
        )
    step_s = np.diff(stamps_at[1:])  # intervals between step starts
    step_cpu = np.diff(cpu_at[1:])
    warm = min(2, max(len(step_s) - 1, 0))
    return {
        "n_items": n_items,
        "loss": loss,
        "steps": len(step_s),
        "step_ms": float(np.median(step_cpu[warm:]) * 1000) if len(step_s) else float("nan"),
        "step_wall_ms": float(np.median(step_s[warm:]) * 1000) if len(step_s) else float("nan"),
        "setup_s": stamps_at[1] - started if len(stamps_at) > 1 else float("nan"),
        "data_rss_mib": data_rss,
        "peak_rss_mib": _peak_rss_mib(),
        "train_rss_mib": _peak_rss_mib() - data_rss,
    }


def _cell(args: argparse.Namespace, n_items: int, loss: str) -> dict:
    steps = args.full_steps if (loss == "full" and n_items >= 500_000) else args.steps
    cmd = [
        sys.executable,
        "-m",
        "bench.train_scale",
        "--one",
        f"{n_items},{loss},{steps}",
        "--interactions",
        str(args.interactions),
        "--users",
        str(args.users),
    ]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"n_items": n_items, "loss": loss, "error": out.stderr.strip()[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def threshold(rows: list[dict], ratio: float) -> int | None:
    """The largest measured size where a full step costs at most ``ratio`` sampled steps."""
    by: dict[tuple[int, str], float] = {
        (r["n_items"], r["loss"]): float(r["step_ms"]) for r in rows if "step_ms" in r
    }
    ok = [
        n
        for (n, loss), ms in by.items()
        if loss == "full" and (n, "sampled") in by and ms <= ratio * by[(n, "sampled")]
    ]
    return max(ok) if ok else None


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for loss, style in (("full", "o--"), ("sampled", "s-")):
        pts = sorted((r["n_items"], r) for r in rows if r["loss"] == loss and "step_ms" in r)
        xs = [n for n, _ in pts]
        a.plot(xs, [r["step_ms"] for _, r in pts], style, label=f"{loss} softmax")
        b.plot(xs, [r["train_rss_mib"] for _, r in pts], style, label=f"{loss}: training")
        if loss == "sampled":
            b.plot(xs, [r["peak_rss_mib"] for _, r in pts], ":", label="sampled: process peak")
    for ax, title in ((a, "median step time (ms)"), (b, "RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items in the catalogue (same interactions)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="catalogue sizes")
    parser.add_argument("--losses", default="full,sampled", help="losses to time")
    parser.add_argument("--interactions", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=25, help="steps timed per cell")
    parser.add_argument("--full-steps", type=int, default=4, help="steps of full at >= 500k")
    parser.add_argument("--ratio", type=float, default=1.5, help="the rule's cost ratio")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        n, loss, steps = args.one.split(",")
        print(json.dumps(run_one(int(n), loss, int(steps), args.interactions, args.users)))
        return 0
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for loss in args.losses.split(","):
            row = _cell(args, n, loss)
            rows.append(row)
            if "error" in row:
                print(f"{n:>9} {loss:>8}  failed: {row['error']}", flush=True)
            else:
                print(
                    f"{n:>9} {loss:>8}  step {row['step_ms']:8.1f} ms CPU  setup {row['setup_s']:6.1f} s"
                    f"  train RSS {row['train_rss_mib']:7.0f} MiB  peak {row['peak_rss_mib']:7.0f} MiB",
                    flush=True,
                )
    sampled = [r for r in rows if r["loss"] == "sampled" and "step_ms" in r]
    if len(sampled) >= 2:
        spread = max(r["step_ms"] for r in sampled) / min(r["step_ms"] for r in sampled)
        print(f"sampled step time, largest / smallest over the sizes: {spread:.2f}x")
    cut = threshold(rows, args.ratio)
    print(f"largest size where full <= {args.ratio}x sampled: {cut}")
    out_path("train_scale.json").write_text(json.dumps({"rows": rows, "threshold": cut}, indent=1))
    _plot(rows, out_path("train_scale.png"))
    print(f"wrote {out_path('train_scale.png')} and {out_path('train_scale.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
