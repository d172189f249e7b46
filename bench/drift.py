"""Does a codebook migration pay? A catalogue that starts in a few categories and ends in many.

The stream. The items are grouped into ``--categories`` categories: k-means clusters of their
embeddings (faiss), so the bench runs unchanged on any dataset in the event format; a
synthetic catalogue (``--synthetic N``) uses its mixture's clusters. The categories arrive in
a seeded order: stage 0 holds ``--start`` of them (the catalogue the codebook is bootstrapped
on), each later stage adds an equal share of the rest, the last holds them all. A stage's log
is every interaction with an item of its catalogue, in time order: each user's real
sequence, restricted to the catalogue of the day. Within a stage, items arrive in the order
of their first interaction.

Two arms, one version trained per stage from scratch with the same seed and settings (the
method's defaults, text projection on unless ``--no-text``, the product's ``entropy`` length
policy):

* ``no migration``: the codebook trained on stage 0's items (the bootstrap) codes every item
  ever after, as adacode does today;
* ``migration``: the codebook's drift is measured as the product measures it
  (:mod:`quantize.drift`: the items coded at adoption are the baseline, later items the
  recent window, the worker's default half-life and threshold); when a stage's arrivals
  take the score past the threshold, a new codebook is trained on a sample of that stage's
  catalogue (the rule's shape and sample, as the bootstrap; with ``--keep-shape``, the
  bootstrap codebook's levels and width, so the new codebook has as many rows to train),
  every item is re-coded, and its drift starts again from that catalogue. Until the first
  migration both arms are the same run (trained once).

Per stage and arm: Recall@10 / NDCG@10 with the standard protocol (per user of the stage's
log: last interaction = test, second-last = validation; full ranking over the stage's
catalogue; items the version never trained borrow the deepest prefix their trained relatives
share, as served), on every test case (``all``), on targets from the categories that arrived after the
bootstrap (``new``), from the bootstrap's categories (``old``), and never in a training
interaction (``cold``); and the drift score of each arm's codebook before its migration.
The issue's goal, read off the last stage: ``new`` R@10 with migration at least 1.2x
without, and no loss on ``old``.

What this measures is the quality side of a migration, done here in process (train, re-code,
fine-tune) and not the daemon's live job. Run::

    python -m bench.drift --dataset ../shared/datasets/office --dataset ../shared/datasets/movies \\
        [--synthetic 20000]

Outputs: a table per catalogue, ``<out>/drift.png`` and ``<out>/drift.json``
(``drift_no_text.*`` with ``--no-text``, ``*_keep_shape.*`` with ``--keep-shape``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss
import numpy as np
import torch

from bench.common import Dataset, item_embeddings, load_dataset
from bench.quality import Domain, Settings, make_domain, served_rows, serving_rows, train
from bench.scale import Spec, SyntheticDomain
from quantize.codebook import POINTS_PER_CENTROID, ResidualCodebook, suggest_shape
from quantize.drift import DEFAULT_HALF_LIFE, DRIFT_THRESHOLD, CodebookDrift, squared_errors
from quantize.evaluate import Evaluation, evaluate_ranking
from quantize.table_model import ModelConfig, model_from_params
from quantize.train import TrainConfig, score_histories

ARMS = ("no migration", "migration")
POLICY = "entropy"  # the worker's default code_policy
GOAL_NEW_RATIO = 1.2


@dataclass(frozen=True)
class Catalogue:
    """One domain as arrays: embeddings, a category per item, the log in time order."""

    name: str
    emb: np.ndarray  # float32 [n_items, d]
    category: np.ndarray  # int64 [n_items]
    users: np.ndarray  # int64 [n_interactions]
    items: np.ndarray
    timestamps: np.ndarray

    @property
    def n_items(self) -> int:
        return int(self.emb.shape[0])


@dataclass(frozen=True)
class Plan:
    """When each category arrives: ``stage_of[c]`` in ``0 .. stages - 1``."""

    stage_of: np.ndarray
    stages: int

    def item_stage(self, category: np.ndarray) -> np.ndarray:
        return self.stage_of[category]


@dataclass
class StageRow:
    """One arm at one stage."""

    catalogue: str
    stage: int
    arm: str
    items: int
    categories: int
    interactions: int
    codebook: str  # "L x K, trained at stage s"
    drift_score: float | None  # the arm's codebook after the stage's arrivals, before migrating
    migrated: bool
    metrics: dict[str, float] = field(default_factory=dict)  # all/new/old/cold recall, ndcg, n
    train_s: float = 0.0


def categorize(emb: np.ndarray, n_categories: int, seed: int) -> np.ndarray:
    """Each item's category: its k-means cluster (faiss) among ``n_categories``."""
    x = np.ascontiguousarray(emb, dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], n_categories, niter=20, seed=seed, verbose=False)
    kmeans.train(x)
    _, labels = kmeans.index.search(x, 1)
    return labels[:, 0].astype(np.int64)


def plan_stages(n_categories: int, start: int, stages: int, seed: int) -> Plan:
    """``start`` categories at stage 0, the rest split evenly over stages ``1 .. stages-1``
    (in a seeded random order)."""
    if not 1 <= start < n_categories or stages < 2 or stages - 1 > n_categories - start:
        raise ValueError(
            f"need 1 <= start ({start}) < categories ({n_categories}) and 2 <= stages "
            f"({stages}) <= categories - start + 1"
        )
    order = np.random.default_rng(seed).permutation(n_categories)
    stage_of = np.zeros(n_categories, dtype=np.int64)
    for s, group in enumerate(np.array_split(order[start:], stages - 1), start=1):
        stage_of[group] = s
    return Plan(stage_of, stages)


def dataset_catalogue(root: Path, n_categories: int, seed: int) -> Catalogue:
    ds = load_dataset(root)
    emb = item_embeddings(ds)
    return Catalogue(
        ds.name, emb, categorize(emb, n_categories, seed), ds.users, ds.items, ds.timestamps
    )


def synthetic_catalogue(items: int, interactions: int, n_categories: int, seed: int) -> Catalogue:
    """``bench/scale.py``'s generator with one mixture cluster per category."""
    spec = Spec(items, interactions, max(1, items // 4), n_categories, seed, "synthetic")
    domain = SyntheticDomain(spec)
    emb = np.concatenate([vectors for _, vectors in domain.item_chunks()])
    parts = list(domain.interaction_chunks())
    users, its, ts = (np.concatenate([p[j] for p in parts]) for j in range(3))
    return Catalogue(
        f"synthetic {items // 1000}k", emb, domain.item_cluster.astype(np.int64), users, its, ts
    )


@dataclass(frozen=True)
class Stage:
    """A stage's catalogue as a dataset (local item and user numbers) and what it maps."""

    ds: Dataset
    items: np.ndarray  # the catalogue's global item numbers, in local order
    emb: np.ndarray
    item_stage: np.ndarray  # per local item: the stage its category arrived in


def stage_view(cat: Catalogue, plan: Plan, stage: int) -> Stage:
    """The catalogue of ``stage`` and its log (interactions with its items, time order)."""
    item_stage = plan.item_stage(cat.category)
    live = np.flatnonzero(item_stage <= stage)
    local = np.full(cat.n_items, -1, dtype=np.int64)
    local[live] = np.arange(len(live))
    keep = local[cat.items] >= 0
    users, inverse = np.unique(cat.users[keep], return_inverse=True)
    ds = Dataset(
        name=f"{cat.name}@{stage}",
        root=Path("."),
        domain=cat.name,
        item_ids=[str(i) for i in live],
        texts=[""] * len(live),
        user_ids=[str(u) for u in users],
        users=inverse.astype(np.int64),
        items=local[cat.items[keep]],
        timestamps=cat.timestamps[keep],
        n_listed_items=len(live),
    )
    return Stage(ds, live, cat.emb[live], item_stage[live])


def arrivals(cat: Catalogue, plan: Plan, stage: int) -> np.ndarray:
    """The items whose category arrives at ``stage``, by first interaction (then by number)."""
    new = np.flatnonzero(plan.item_stage(cat.category) == stage)
    first = np.full(cat.n_items, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, cat.items, cat.timestamps)
    return new[np.lexsort((new, first[new]))]


def train_codebook(
    emb: np.ndarray, seed: int, shape: tuple[int, int] | None = None
) -> ResidualCodebook:
    """The product's codebook for a catalogue: the rule's shape (or ``shape``, levels x k),
    a bounded sample."""
    levels, k = shape or suggest_shape(len(emb))
    return ResidualCodebook.train(
        emb, levels, k, seed=seed, points_per_centroid=POINTS_PER_CENTROID
    )


def measure(
    drift: CodebookDrift, codebook: ResidualCodebook, emb: np.ndarray, *, adoption: bool
) -> None:
    """Add items (in arrival order) to ``drift`` as the worker does when it codes them."""
    if not len(emb):
        return
    paths = codebook.encode(emb)
    drift.add(squared_errors(emb, codebook.decode(paths)), paths[:, 0], adoption=adoption)


@dataclass
class Arm:
    """One arm's codebook and drift, and the stage its codebook was trained at."""

    name: str
    codebook: ResidualCodebook
    drift: CodebookDrift
    trained_at: int = 0

    def label(self) -> str:
        return f"{self.codebook.levels}x{self.codebook.k} @{self.trained_at}"


def adopt(codebook: ResidualCodebook, emb: np.ndarray, half_life: float) -> CodebookDrift:
    drift = CodebookDrift.new(codebook.codebook_id, codebook.k, half_life)
    measure(drift, codebook, emb, adoption=True)
    return drift


def evaluate(
    st: Settings, dom: Domain, stage: Stage, codebook: ResidualCodebook, repeats: int = 1
) -> tuple[dict[str, float], float]:
    """Metrics of versions trained on ``dom``'s codes, averaged over ``repeats`` training
    seeds (``st.train.seed`` on), with the standard deviation of each recall across them
    (``<slice>recall_sd``), and the mean training time."""
    runs = [
        _evaluate_once(
            replace(st, train=replace(st.train, seed=st.train.seed + r)), dom, stage, codebook
        )
        for r in range(repeats)
    ]
    metrics = {key: float(np.mean([m[key] for m, _ in runs])) for key in runs[0][0]}
    for key in [k for k in runs[0][0] if k.endswith("recall")]:
        metrics[f"{key}_sd"] = float(np.std([m[key] for m, _ in runs]))
    return metrics, float(np.mean([wall for _, wall in runs]))


def _evaluate_once(
    st: Settings, dom: Domain, stage: Stage, codebook: ResidualCodebook
) -> tuple[dict[str, float], float]:
    """Train a version on ``dom``'s codes and score its test cases (as served)."""
    rows, n_rows = served_rows(dom, POLICY)
    result = train(st, dom, rows, n_rows, f"{codebook.levels}x{codebook.k}")
    model = model_from_params(result.config, result.params).eval()
    served = serving_rows(dom, rows, result)
    text = dom.emb if result.config.text_dim else None
    target_stage = stage.item_stage[dom.test_items]
    ev: Evaluation = evaluate_ranking(
        lambda idx: score_histories(model, served, dom.histories[idx], text=text),
        dom.test_items,
        slices={
            "new": target_stage > 0,
            "old": target_stage == 0,
            "cold": dom.slices["cold"],
            # the "why": new items outside the head, and those never trained
            "new_tail": (target_stage > 0) & ~dom.slices["head"],
            "new_cold": (target_stage > 0) & dom.slices["cold"],
        },
    )
    return ev.as_dict(), result.wall_s


def run_catalogue(
    st: Settings,
    cat: Catalogue,
    plan: Plan,
    *,
    threshold: float,
    half_life: float,
    seed: int,
    repeats: int = 1,
    keep_shape: bool = False,
) -> list[StageRow]:
    """Every stage of ``cat``'s stream, both arms (see the module docstring); each version
    trained ``repeats`` times (training seeds), its metrics averaged; with ``keep_shape`` a
    migration trains its codebook in the bootstrap codebook's shape."""
    base = stage_view(cat, plan, 0)
    first = train_codebook(base.emb, seed)
    arms = {name: Arm(name, first, adopt(first, base.emb, half_life)) for name in ARMS}
    rows: list[StageRow] = []
    for s in range(plan.stages):
        stage = stage_view(cat, plan, s)
        scores: dict[str, float | None] = {}
        migrated: dict[str, bool] = {}
        for arm in arms.values():
            measure(
                arm.drift,
                arm.codebook,
                cat.emb[arrivals(cat, plan, s)] if s else cat.emb[:0],
                adoption=False,
            )
            report = arm.drift.report(threshold)
            scores[arm.name] = report.score
            migrated[arm.name] = arm.name == "migration" and report.drifted
            if migrated[arm.name]:
                shape = (first.levels, first.k) if keep_shape else None
                arm.codebook = train_codebook(stage.emb, seed + s, shape)
                arm.drift = adopt(arm.codebook, stage.emb, half_life)
                arm.trained_at = s
        done: dict[str, tuple[dict[str, float], float]] = {}
        for arm in arms.values():
            twin = next((a for a in done if arms[a].codebook == arm.codebook), None)
            if twin is not None:
                done[arm.name] = done[twin]
            else:
                dom = make_domain(stage.ds, stage.emb, arm.codebook, st.model.max_len)
                done[arm.name] = evaluate(st, dom, stage, arm.codebook, repeats)
            metrics, wall = done[arm.name]
            rows.append(
                StageRow(
                    cat.name,
                    s,
                    arm.name,
                    len(stage.items),
                    int((plan.stage_of <= s).sum()),
                    len(stage.ds.items),
                    arm.label(),
                    scores[arm.name],
                    migrated[arm.name],
                    metrics,
                    wall,
                )
            )
            print(_line(rows[-1]), flush=True)
    return rows


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _sd(x: float | None) -> str:
    return "" if x is None or not x or math.isnan(x) else f" ±{x:.4f}"


def _line(r: StageRow) -> str:
    m = r.metrics
    return (
        f"| {r.catalogue} | {r.stage} | {r.arm} | {r.items:,} | {r.categories} | "
        f"{r.codebook}{' (migrated)' if r.migrated else ''} | {_f(r.drift_score, '.3f')} | "
        f"{_f(m.get('recall'))} | {_f(m.get('new_recall'))}{_sd(m.get('new_recall_sd'))} "
        f"({int(m.get('new_n', 0))}) | "
        f"{_f(m.get('old_recall'))} ({int(m.get('old_n', 0))}) | "
        f"{_f(m.get('cold_recall'))} ({int(m.get('cold_n', 0))}) | "
        f"{_f(m.get('new_tail_recall'))} ({int(m.get('new_tail_n', 0))}) | "
        f"{_f(m.get('new_cold_recall'))} ({int(m.get('new_cold_n', 0))}) | {r.train_s:.1f} |"
    )


HEADER = (
    "| catalogue | stage | arm | items | categories | codebook | drift score | R@10 all | "
    "R@10 new (n) | R@10 old (n) | R@10 cold (n) | R@10 new tail (n) | R@10 new cold (n) | "
    "train s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _ratio_line(keep: dict[str, float], move: dict[str, float], part: str) -> str:
    """``part``'s R@10 without -> with migration, its ratio and its number of cases."""
    before, after = keep.get(f"{part}_recall"), move.get(f"{part}_recall")
    n = int(keep.get(f"{part}_n", 0))
    if before is None or after is None or not n:
        return "n/a (no case)"
    ratio = f"{after / before:.2f}x" if before > 0 else "n/a"
    return f"{before:.4f} -> {after:.4f} ({ratio}, {n} cases)"


def verdict(rows: list[StageRow]) -> list[str]:
    """Per catalogue, the last stage's new/old R@10 ratio and difference against the goal."""
    out = []
    for name in dict.fromkeys(r.catalogue for r in rows):
        last = max(r.stage for r in rows if r.catalogue == name)
        by = {r.arm: r.metrics for r in rows if r.catalogue == name and r.stage == last}
        keep, move = by["no migration"], by["migration"]
        migrations = sum(r.migrated for r in rows if r.catalogue == name)
        if migrations == 0:
            out.append(f"{name}: the drift score never reached the threshold: no migration")
            continue
        ratio = move["new_recall"] / keep["new_recall"] if keep["new_recall"] > 0 else math.inf
        old = move["old_recall"] - keep["old_recall"]
        out.append(
            f"{name}: {migrations} migration(s); last stage new-items R@10 "
            f"{keep['new_recall']:.4f} -> {move['new_recall']:.4f} ({ratio:.2f}x; sd over "
            f"seeds {keep['new_recall_sd']:.4f} / {move['new_recall_sd']:.4f}; goal "
            f">= {GOAL_NEW_RATIO}x: {'met' if ratio >= GOAL_NEW_RATIO else 'not met'}); old "
            f"items {keep['old_recall']:.4f} -> {move['old_recall']:.4f} ({old:+.4f}); all "
            f"{keep['recall']:.4f} -> {move['recall']:.4f}; new tail items "
            f"{_ratio_line(keep, move, 'new_tail')}; new cold items "
            f"{_ratio_line(keep, move, 'new_cold')}"
        )
    return out


def plot(rows: list[StageRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.catalogue for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for arm, style in zip(ARMS, ("--", "-"), strict=True):
            mine = sorted(
                (r for r in rows if r.catalogue == name and r.arm == arm), key=lambda r: r.stage
            )
            stages = [r.stage for r in mine]
            for key, colour in (
                ("new_recall", "tab:red"),
                ("old_recall", "tab:blue"),
                ("recall", "black"),
            ):
                ax.plot(
                    stages,
                    [r.metrics.get(key, math.nan) for r in mine],
                    style,
                    color=colour,
                    marker="o",
                    label=f"{key.replace('_recall', '') if key != 'recall' else 'all'} ({arm})",
                )
        twin = ax.twinx()
        fixed = sorted(
            (r for r in rows if r.catalogue == name and r.arm == ARMS[0]), key=lambda r: r.stage
        )
        twin.plot(
            [r.stage for r in fixed],
            [math.nan if r.drift_score is None else r.drift_score for r in fixed],
            ":",
            color="grey",
            label="drift score (no migration)",
        )
        twin.axhline(DRIFT_THRESHOLD, color="grey", linewidth=0.5)
        twin.set_ylabel("drift score")
        ax.set_title(name)
        ax.set_xlabel("stage (categories arriving)")
        ax.set_ylabel("Recall@10")
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", action="append", default=[], type=Path, help="dataset directory (repeatable)"
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="also a synthetic catalogue of N items (0: none)",
    )
    parser.add_argument(
        "--synthetic-interactions",
        type=int,
        default=0,
        metavar="M",
        help="its interactions (default 10 per item)",
    )
    parser.add_argument("--categories", type=int, default=16, help="categories of a catalogue")
    parser.add_argument(
        "--start", type=int, default=3, help="categories at stage 0 (the bootstrap)"
    )
    parser.add_argument(
        "--stages", type=int, default=4, help="stages of the stream, the bootstrap included"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="max epochs per version (default: the rule)"
    )
    parser.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch threads")
    parser.add_argument(
        "--no-text",
        action="store_true",
        help="the ablation without the text projection: item vectors from their codes alone",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="versions trained per stage and arm (training seeds), their metrics averaged",
    )
    parser.add_argument(
        "--keep-shape",
        action="store_true",
        help="a migration keeps the bootstrap codebook's levels x k (default: the rule's shape)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threshold",
        type=float,
        default=DRIFT_THRESHOLD,
        help="drift score that migrates (the worker's default)",
    )
    parser.add_argument(
        "--half-life",
        type=float,
        default=DEFAULT_HALF_LIFE,
        help="drift window half-life in items (the worker's default)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    if not args.dataset and not args.synthetic:
        parser.error("give at least one --dataset DIR or --synthetic N")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: train at least once")
    try:
        plan = plan_stages(args.categories, args.start, args.stages, args.seed)
        train_cfg = TrainConfig(epochs=args.epochs, threads=args.threads, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    catalogues = [dataset_catalogue(root, args.categories, args.seed) for root in args.dataset]
    if args.synthetic:
        m = args.synthetic_interactions or 10 * args.synthetic
        catalogues.append(synthetic_catalogue(args.synthetic, m, args.categories, args.seed))
    started = time.perf_counter()
    rows: list[StageRow] = []
    print(HEADER)
    for cat in catalogues:
        st = Settings(
            model=replace(ModelConfig(), text_dim=0 if args.no_text else int(cat.emb.shape[1])),
            train=train_cfg,
            policies=(POLICY,),
            few_fraction=0.1,
            seed=args.seed,
        )
        rows += run_catalogue(
            st,
            cat,
            plan,
            threshold=args.threshold,
            half_life=args.half_life,
            seed=args.seed,
            repeats=args.repeats,
            keep_shape=args.keep_shape,
        )
    lines = verdict(rows)
    print("\n" + HEADER)
    print("\n".join(_line(r) for r in rows))
    print("\n".join(lines))
    print(f"total {time.perf_counter() - started:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    name = ("drift_no_text" if args.no_text else "drift") + (
        "_keep_shape" if args.keep_shape else ""
    )
    png, out_json = args.out / f"{name}.png", args.out / f"{name}.json"
    plot(rows, png)
    payload = {
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "dataset"
        },
        "datasets": [str(d) for d in args.dataset],
        "summary": lines,
        "rows": [asdict(r) for r in rows],
    }
    out_json.write_text(json.dumps(payload, indent=1))
    print(f"wrote {png} and {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
