"""What rows fitted across codebooks buy: a new codebook's first version, from fresh rows or
from rows fitted to the previous version's code vectors (:mod:`quantize.remap`).

The scenario of a live migration, on any dataset in the event format. Codebook A is the
bootstrap's: trained on the first ``--bootstrap`` items by first interaction (the worker's
``codebook_min_items``), the rule's shape for that many; version v1 is trained on A's codes
(the product's ``entropy`` length policy, the method's defaults, text projection on).
Codebook B is the migration's: the rule's shape for the whole catalogue, trained on it.
B's first version starts, as the fine-tune does, from v1's shared parts (encoder, text
projection, level weights) and either

* ``fresh``: rows freshly initialised (what the product did until session 20), or
* ``fitted``: rows fitted so that each item v1 trained keeps, as near as the new codes
  allow, the code vector it had in v1 (the product's warm start since session 20),

trained for a budget of 0 (the starting point itself), 1, 2, 4 epochs, and the rule's
(``full``, early-stopped). Test Recall@10 / NDCG@10 with the standard protocol (per user:
last interaction = test, second-last = validation; full ranking; items a version did not
train served the deepest prefix their trained relatives share), beside v1's own on A's codes (what
was served before the migration). The gate compares the new version with v1 on held-out
cases: a new version that starts below v1 and has one epoch in its budget (a 1M-item
domain's fine-tune has about one) is rejected, and the domain stays on the old codebook.

Run::

    python -m bench.remap --dataset ../shared/datasets/office --dataset ../shared/datasets/movies

Outputs: a table, ``<out>/remap.png`` (R@10 by budget, per dataset) and ``<out>/remap.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.common import Dataset, add_dataset_args, item_embeddings, load_dataset
from bench.quality import Domain, Settings, make_domain, served_rows, serving_rows, train
from quantize.codebook import POINTS_PER_CENTROID, ResidualCodebook, suggest_shape
from quantize.evaluate import evaluate_ranking
from quantize.remap import refit
from quantize.table_model import ModelConfig, Params, model_from_params
from quantize.train import TrainConfig, TrainResult, score_histories, shared_init

POLICY = "entropy"  # the worker's default code_policy
BUDGETS: tuple[int | None, ...] = (0, 1, 2, 4, None)  # epochs; None: the rule's, early-stopped
ARMS = ("fresh", "fitted")


@dataclass(frozen=True)
class Cell:
    """One arm at one budget on one dataset."""

    dataset: str
    arm: str
    budget: str
    recall: float
    ndcg: float
    epochs: int
    wall_s: float


def budget_label(epochs: int | None) -> str:
    return "full" if epochs is None else str(epochs)


def bootstrap_items(ds: Dataset, n: int) -> np.ndarray:
    """The first ``n`` items by first interaction (then by number): what a bootstrap sees."""
    first = np.full(ds.n_items, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, ds.items, ds.timestamps)
    order = np.lexsort((np.arange(ds.n_items), first))
    return order[: min(n, ds.n_items)]


def codebook_on(emb: np.ndarray, seed: int) -> ResidualCodebook:
    """The product's codebook for a catalogue: the rule's shape, a bounded sample."""
    levels, k = suggest_shape(len(emb))
    return ResidualCodebook.train(
        emb, levels, k, seed=seed, points_per_centroid=POINTS_PER_CENTROID
    )


def test_metrics(
    dom: Domain, config: ModelConfig, params: Params, rows: np.ndarray
) -> tuple[float, float]:
    """Test R@10 / N@10 of a model with ``rows`` as served."""
    model = model_from_params(config, params).eval()
    text = dom.emb if config.text_dim else None
    ev = evaluate_ranking(
        lambda idx: score_histories(model, rows, dom.histories[idx], text=text), dom.test_items
    )
    return ev.slices["all"].recall, ev.slices["all"].ndcg


def fitted_rows(v1: TrainResult, rows_a: np.ndarray, rows_b: np.ndarray, init: np.ndarray):
    """B's rows fitted to the code vectors of the items v1 trained (as the fine-tune does);
    rows no such item uses keep ``init``."""
    trained = np.ones(len(rows_a), bool) if v1.seen_items is None else v1.seen_items
    return refit(
        v1.params["table.rows"],
        rows_a[trained],
        rows_b[trained],
        len(init),
        v1.params.get("table.level_weight"),
        init=init,
    )


def run_dataset(st: Settings, ds: Dataset, emb: np.ndarray, bootstrap: int) -> list[Cell]:
    seed = st.seed
    a = codebook_on(emb[bootstrap_items(ds, bootstrap)], seed)
    b = codebook_on(emb, seed + 1)
    print(
        f"{ds.name}: codebook A {a.levels}x{a.k} on {min(bootstrap, ds.n_items)} items, "
        f"B {b.levels}x{b.k} on {ds.n_items}"
    )
    dom_a = make_domain(ds, emb, a, st.model.max_len)
    rows_a, n_rows_a = served_rows(dom_a, POLICY)
    started = time.perf_counter()
    v1 = train(st, dom_a, rows_a, n_rows_a, "v1 on A")
    recall, ndcg = test_metrics(dom_a, v1.config, v1.params, serving_rows(dom_a, rows_a, v1))
    cells = [
        Cell(ds.name, "v1 (A)", "full", recall, ndcg, v1.epochs_run, time.perf_counter() - started)
    ]
    dom_b = make_domain(ds, emb, b, st.model.max_len)
    rows_b, n_rows_b = served_rows(dom_b, POLICY)
    hidden = v1.params["table.rows"].shape[1]
    rng = np.random.default_rng(seed)
    fresh = (rng.standard_normal((n_rows_b, hidden)) / np.sqrt(hidden)).astype(np.float32)
    fit = fitted_rows(v1, rows_a, rows_b, fresh)
    print(
        f"{ds.name}: {int(fit.fitted.sum())} of {n_rows_b} rows fitted, code-vector error "
        f"{fit.error_before:.3g} (fresh) -> {fit.error_after:.3g}"
    )
    shared = shared_init(v1.params, 0)
    starts = {
        "fresh": {**shared, "table.rows": fresh},
        "fitted": {**shared, "table.rows": fit.rows},
    }
    for epochs in BUDGETS:
        for arm in ARMS:
            started = time.perf_counter()
            if epochs == 0:
                recall, ndcg = test_metrics(dom_b, v1.config, starts[arm], rows_b)
                run_epochs = 0
            else:
                config = st.train if epochs is None else replace(st.train, epochs=epochs)
                result = train(
                    st,
                    dom_b,
                    rows_b,
                    n_rows_b,
                    f"B {arm} {budget_label(epochs)}",
                    config=config,
                    init_from=starts[arm],
                )
                served = serving_rows(dom_b, rows_b, result)
                recall, ndcg = test_metrics(dom_b, result.config, result.params, served)
                run_epochs = result.epochs_run
            cells.append(
                Cell(
                    ds.name,
                    arm,
                    budget_label(epochs),
                    recall,
                    ndcg,
                    run_epochs,
                    time.perf_counter() - started,
                )
            )
            print(f"  {arm:>6} {budget_label(epochs):>4} ep: R@10 {recall:.4f} N@10 {ndcg:.4f}")
    return cells


def print_table(cells: list[Cell]) -> None:
    print(
        "\n| dataset | v1 on A: R@10 / N@10 | budget (epochs) | fresh rows: R@10 / N@10 | "
        "fitted rows: R@10 / N@10 | fitted / fresh R@10 |"
    )
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(c.dataset for c in cells):
        mine = [c for c in cells if c.dataset == name]
        v1 = next(c for c in mine if c.arm == "v1 (A)")
        for budget in dict.fromkeys(c.budget for c in mine if c.arm in ARMS):
            fresh = next(c for c in mine if c.arm == "fresh" and c.budget == budget)
            fitted = next(c for c in mine if c.arm == "fitted" and c.budget == budget)
            ratio = fitted.recall / fresh.recall if fresh.recall else float("inf")
            print(
                f"| {name} | {v1.recall:.4f} / {v1.ndcg:.4f} | {budget} ({fitted.epochs}) | "
                f"{fresh.recall:.4f} / {fresh.ndcg:.4f} | {fitted.recall:.4f} / "
                f"{fitted.ndcg:.4f} | {ratio:.2f}x |"
            )


def plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(c.dataset for c in cells))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [c for c in cells if c.dataset == name]
        budgets = list(dict.fromkeys(c.budget for c in mine if c.arm in ARMS))
        for arm in ARMS:
            ys = [next(c.recall for c in mine if c.arm == arm and c.budget == b) for b in budgets]
            ax.plot(budgets, ys, marker="o", label=f"{arm} rows")
        v1 = next(c for c in mine if c.arm == "v1 (A)")
        ax.axhline(v1.recall, color="grey", linestyle="--", label="v1 on codebook A")
        ax.set_title(name)
        ax.set_xlabel("epochs of B's first version")
        ax.set_ylabel("test Recall@10")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser, multiple=True)
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="items codebook A is trained on (the worker's codebook_min_items)",
    )
    parser.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    if args.bootstrap < 16:
        parser.error(f"--bootstrap {args.bootstrap}: at least 16 items")
    torch.set_num_threads(args.threads)
    loaded = [(ds, item_embeddings(ds)) for ds in map(load_dataset, args.dataset)]
    dim = int(loaded[0][1].shape[1])
    st = Settings(
        model=ModelConfig(text_dim=dim),
        train=TrainConfig(threads=args.threads, seed=args.seed),
        policies=(POLICY,),
        few_fraction=0.1,
        seed=args.seed,
        groups=frozenset(),
    )
    started = time.perf_counter()
    cells = [c for ds, emb in loaded for c in run_dataset(st, ds, emb, args.bootstrap)]
    print_table(cells)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(cells, args.out / "remap.png")
    (args.out / "remap.json").write_text(
        json.dumps({"cells": [asdict(c) for c in cells]}, indent=2) + "\n"
    )
    print(f"\n{time.perf_counter() - started:.0f} s; {args.out / 'remap.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
