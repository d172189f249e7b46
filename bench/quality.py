"""Recommendation quality of per-domain code tables against baselines, on real datasets.

Protocol (``quantize.evaluate``): per user, last interaction = test target, second-last =
validation (early stopping), the rest = training; full ranking over all items; Recall@10
and NDCG@10 averaged over users, overall and on two slices: ``head`` targets (top 20 % of
items by training interactions) and ``cold`` targets (never in a training interaction).

Rows per dataset:

* ``popularity``: training interaction counts.
* ``text zero-shot``: cosine between the mean MiniLM embedding of the history and items.
* ``ID model``: one table row per item, same sequence encoder, from scratch, no text.
* ``fixed codes``: served codes of the ``fixed`` length policy (full paths; colliding head
  items get a disambiguation digit), from scratch.
* ``adaptive codes (<policy>)``: served codes of each adaptive length policy
  (``--policies``). The *primary* policy of a dataset, used below, is the one with the
  best validation NDCG@10 as served on that dataset (chosen on validation, never on
  test; per domain, as the product picks it).
* Serving rule of every code model: items the version never trained (no interaction in
  its training log) borrow the deepest prefix of their path that several trained items'
  codes share (``quantize.table_model.borrow_trained_codes``); ``adaptive codes (<primary>), no
  borrow`` is the ablation (same model, new items keep their own codes), and the summary
  gives the validation evidence (cold validation targets, plain -> borrowed).
* ``adaptive codes (<primary>), no text``: the ablation that justifies the text projection.
* ``v1 on 90%`` / ``incremental +10%``: a version trained on the first 90 % of the log
  (by time), then adapted with ``new_since`` (the newest windows plus a replay sample of
  old ones, ``TrainConfig.incremental_share`` of the epochs), against the full retrain (the
  primary row).
* with two or more datasets, per target and each other dataset as source:
  ``few-shot scratch`` vs ``few-shot warm``: a small share of the target's users
  (``--few-fraction``), trained from scratch vs fine-tuned from the source's primary model
  (one shared codebook, so level rows are comparable); and ``domain fine-tune``: all the
  target's data, the source's encoder frozen, only the domain table trained (the
  product's per-domain fine-tune).

The codebook is trained once on the union of all given datasets' item embeddings (one
codebook for all domains, as in the product); its shape follows the codebook's rule
(``suggest_shape``) unless ``--levels``/``--k`` are given. Model and training settings are
the method's defaults (``quantize.table_model``/``quantize.train``), the same for every
dataset; the text projection is on, with the embedding width.

Run from the repository root::

    python -m bench.quality --dataset ../shared/datasets/office \\
        --dataset ../shared/datasets/movies

Cold-start targets are few and often share a handful of new items, so the summary gives
them as hit counts with 95 % Wilson intervals, and adaptive minus fixed as a paired
difference with a cluster-bootstrap interval over target items. ``--rows`` selects row
groups (e.g. ``--rows incremental`` with ``--policies entropy`` for a quick iteration).

Outputs: a printed table, ``<out>/quality.png`` and ``<out>/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import cast

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from bench.common import Dataset, add_dataset_args, item_embeddings, load_dataset
from quantize.assign import assign_codes
from quantize.codebook import ResidualCodebook, suggest_shape
from quantize.evaluate import (
    Evaluation,
    evaluate_ranking,
    leave_last_split,
    pad_histories,
    paired_difference,
    target_slices,
    user_sequences,
    wilson_interval,
)
from quantize.exceptions import QuantizeError
from quantize.lengths import POLICIES, make_policy
from quantize.table_model import (
    ModelConfig,
    Params,
    Snapshot,
    borrow_trained_codes,
    model_from_params,
    pad_rows,
)
from quantize.train import (
    EpochReport,
    TrainConfig,
    TrainResult,
    score_histories,
    shared_init,
    train_domain,
)

DEFAULT_POLICIES = ("entropy", "popularity", "reverse")
ROW_GROUPS = ("baselines", "id", "fixed", "ablation", "incremental", "transfer")
"""Optional row groups (``--rows``); the adaptive policies are always trained."""
NEW_SHARE = 0.1  # the newest share of the log that the incremental run adapts to


@dataclass(frozen=True)
class Settings:
    """What every training of one bench run shares (``policies[0]`` is the primary)."""

    model: ModelConfig
    train: TrainConfig
    policies: tuple[str, ...]
    few_fraction: float
    seed: int
    groups: frozenset[str] = frozenset(ROW_GROUPS)

    @property
    def primary(self) -> str:
        return self.policies[0]


@dataclass(frozen=True)
class Row:
    """One result line."""

    dataset: str
    method: str
    recall: float
    ndcg: float
    head_recall: float
    head_ndcg: float
    cold_recall: float
    cold_ndcg: float
    val_ndcg: float | None
    wall_s: float | None
    trainable_params: int | None
    table_bytes: int | None
    note: str = ""
    cold_hits: int = 0
    cold_n: int = 0
    cold_ranks: tuple[int, ...] = ()  # per cold-start case, in case order (paired comparisons)


@dataclass(frozen=True)
class Domain:
    """A loaded dataset with its split, test cases and full paths."""

    ds: Dataset
    emb: np.ndarray
    fit: np.ndarray  # bool over the log: what models may see (train + validation)
    train_items: np.ndarray  # items of training interactions (slices, popularity)
    test_items: np.ndarray
    histories: np.ndarray  # [n_test, max_len], left-padded
    full_histories: list[np.ndarray]
    slices: dict[str, np.ndarray]
    paths: np.ndarray
    k: int
    levels: int
    full_rows: np.ndarray  # [n_items, L] level rows of the full paths
    val_histories: np.ndarray  # [n_val, max_len]: training part, left-padded
    val_targets: np.ndarray
    val_cold: np.ndarray  # bool [n_val]: validation target never in a training interaction


def make_domain(ds: Dataset, emb: np.ndarray, codebook: ResidualCodebook, max_len: int) -> Domain:
    split = leave_last_split(ds.users, ds.timestamps)
    fit = ~split.test
    seqs = user_sequences(ds.users[fit], ds.items[fit], ds.timestamps[fit], ds.n_users)
    histories = [seqs[u] for u in ds.users[split.test]]
    train_items = ds.items[split.train]
    test_items = ds.items[split.test]
    paths = codebook.encode(emb)
    train_seqs = user_sequences(
        ds.users[split.train], ds.items[split.train], ds.timestamps[split.train], ds.n_users
    )
    val_targets = ds.items[split.valid]
    counts = np.bincount(train_items, minlength=ds.n_items)
    return Domain(
        ds=ds,
        emb=emb,
        fit=fit,
        train_items=train_items,
        test_items=test_items,
        histories=pad_histories(histories, max_len),
        full_histories=histories,
        slices=target_slices(train_items, test_items, ds.n_items),
        paths=paths,
        k=codebook.k,
        levels=codebook.levels,
        full_rows=np.arange(codebook.levels)[None, :] * codebook.k + paths,
        val_histories=pad_histories([train_seqs[u] for u in ds.users[split.valid]], max_len),
        val_targets=val_targets,
        val_cold=counts[val_targets] == 0,
    )


def served_rows(dom: Domain, policy: str) -> tuple[np.ndarray, int]:
    """Padded row ids and table size under ``policy`` (popularity = training counts)."""
    pop = np.bincount(dom.train_items, minlength=dom.ds.n_items).astype(np.float64)
    served = assign_codes(dom.paths, pop, make_policy(policy), k=dom.k)
    return served.row_matrix(), served.table_rows


def as_row(
    dom: Domain, method: str, ev: Evaluation, result: TrainResult | None = None, note: str = ""
) -> Row:
    s = ev.slices
    return Row(
        dataset=dom.ds.name,
        method=method,
        recall=s["all"].recall,
        ndcg=s["all"].ndcg,
        head_recall=s["head"].recall,
        head_ndcg=s["head"].ndcg,
        cold_recall=s["cold"].recall,
        cold_ndcg=s["cold"].ndcg,
        val_ndcg=None if result is None else result.val_ndcg,
        wall_s=None if result is None else result.wall_s,
        trainable_params=None if result is None else result.trainable_params,
        table_bytes=None
        if result is None
        else Snapshot(result.config, result.params).table_bytes(),
        note=note,
        cold_hits=s["cold"].hits,
        cold_n=s["cold"].n,
        cold_ranks=tuple(int(r) for r in ev.rank[dom.slices["cold"]]),
    )


def train(
    st: Settings,
    dom: Domain,
    rows: np.ndarray,
    n_rows: int,
    label: str,
    *,
    config: TrainConfig | None = None,
    model: ModelConfig | None = None,
    mask: np.ndarray | None = None,
    init_from: Params | None = None,
    new_since: int | None = None,
) -> TrainResult:
    ds = dom.ds
    cfg = config or st.train
    mcfg = model or st.model
    keep = dom.fit if mask is None else dom.fit & mask
    bar = tqdm(total=cfg.epochs, desc=f"{ds.name}: {label}", leave=False, unit="ep")

    def progress(report: EpochReport) -> None:
        bar.total = report.planned_epochs
        bar.set_postfix(loss=f"{report.loss:.3f}", val_ndcg=f"{report.val_ndcg:.4f}")
        bar.update(1)

    try:
        return train_domain(
            rows,
            ds.users[keep],
            ds.items[keep],
            ds.timestamps[keep],
            model_config=mcfg,
            config=cfg,
            text=dom.emb if mcfg.text_dim else None,
            init_from=init_from,
            new_since=new_since,
            n_rows=n_rows,
            progress=progress,
        )
    finally:
        bar.close()


def serving_rows(dom: Domain, rows: np.ndarray, result: TrainResult) -> np.ndarray:
    """Code rows as served by ``result``'s version: items it never trained borrow the
    deepest prefix of their path that trained items share (:func:`borrow_trained_codes`)."""
    if result.seen_items is None:
        return rows
    return borrow_trained_codes(rows, dom.full_rows, result.seen_items)


def val_evaluation(dom: Domain, result: TrainResult, rows: np.ndarray) -> Evaluation:
    """The validation cases (training part as history), with a ``cold`` slice."""
    model = model_from_params(result.config, result.params).eval()
    text = dom.emb if result.config.text_dim else None
    return evaluate_ranking(
        lambda idx: score_histories(model, rows, dom.val_histories[idx], text=text),
        dom.val_targets,
        slices={"cold": dom.val_cold},
    )


def model_row(
    st: Settings,
    dom: Domain,
    method: str,
    result: TrainResult,
    rows: np.ndarray,
    note: str = "",
    *,
    codes: bool = True,
) -> Row:
    model = model_from_params(result.config, result.params).eval()
    text = dom.emb if result.config.text_dim else None
    served = serving_rows(dom, rows, result) if codes else rows
    ev = evaluate_ranking(
        lambda idx: score_histories(model, served, dom.histories[idx], text=text),
        dom.test_items,
        slices=dom.slices,
    )
    default = f"{result.epochs_run} ep (best {result.best_epoch})"
    return as_row(dom, method, ev, result, note or default)


def baseline_rows(dom: Domain) -> list[Row]:
    n_items = dom.ds.n_items
    counts = np.bincount(dom.train_items, minlength=n_items).astype(np.float32)
    pop = evaluate_ranking(
        lambda idx: np.broadcast_to(counts, (len(idx), n_items)), dom.test_items, slices=dom.slices
    )
    emb = torch.from_numpy(dom.emb)

    def text_scores(idx: np.ndarray) -> torch.Tensor:
        means = torch.stack(
            [emb[torch.from_numpy(dom.full_histories[i])].mean(dim=0) for i in idx.tolist()]
        )
        return torch.nn.functional.normalize(means, dim=1) @ emb.T

    text = evaluate_ranking(text_scores, dom.test_items, slices=dom.slices)
    return [as_row(dom, "popularity", pop), as_row(dom, "text zero-shot", text)]


def model_rows(
    st: Settings, dom: Domain, extras: dict[str, object]
) -> tuple[list[Row], dict[str, TrainResult]]:
    """Baselines, the ID model, fixed codes and every adaptive policy (from scratch).

    For each code policy, the validation cases are scored with and without new items
    borrowing trained codes (``extras["<dataset>/validation/<policy>"]``): the evidence, on
    validation, for the serving rule.
    """
    ds = dom.ds
    out = baseline_rows(dom) if "baselines" in st.groups else []
    if "id" in st.groups:
        ids = pad_rows([[i] for i in range(ds.n_items)])
        pure_id = replace(st.model, text_dim=0)
        id_result = train(st, dom, ids, ds.n_items, "ID model", model=pure_id)
        out.append(model_row(st, dom, "ID model", id_result, ids, codes=False))
    results: dict[str, TrainResult] = {}
    fixed = ("fixed",) if "fixed" in st.groups else ()
    for policy in (*fixed, *st.policies):
        rows, n_rows = served_rows(dom, policy)
        label = "fixed codes" if policy == "fixed" else f"adaptive codes ({policy})"
        results[policy] = train(st, dom, rows, n_rows, label)
        mean_len = float((rows >= 0).sum(axis=1).mean())
        note = f"{results[policy].epochs_run} ep, mean len {mean_len:.2f}, {n_rows} rows"
        out.append(model_row(st, dom, label, results[policy], rows, note))
        plain = val_evaluation(dom, results[policy], rows)
        borrowed = val_evaluation(dom, results[policy], serving_rows(dom, rows, results[policy]))
        extras[f"{ds.name}/validation/{policy}"] = {
            name: {
                "ndcg": ev.ndcg,
                "cold_hits": ev.slices["cold"].hits,
                "cold_n": ev.slices["cold"].n,
                "cold_ndcg": ev.slices["cold"].ndcg,
            }
            for name, ev in (("plain", plain), ("borrowed", borrowed))
        }
    return out, results


def pick_primary(name: str, policies: tuple[str, ...], extras: dict[str, object]) -> str:
    """The domain's adaptive policy with the best validation NDCG@10 as served (new items
    borrowing trained codes), as the product would pick it per domain."""

    def served_ndcg(policy: str) -> float:
        value = cast(dict[str, dict[str, float]], extras[f"{name}/validation/{policy}"])
        return float(value["borrowed"]["ndcg"])

    return max(policies, key=served_ndcg)


def primary_rows(
    st: Settings, dom: Domain, full: TrainResult, extras: dict[str, object]
) -> list[Row]:
    """The primary policy without text, and the incremental run against the full one."""
    ds = dom.ds
    out = []
    rows, n_rows = served_rows(dom, st.primary)
    if "ablation" in st.groups:
        label = f"adaptive codes ({st.primary}), no borrow"
        out.append(model_row(st, dom, label, full, rows, "new items keep their codes", codes=False))
    if st.model.text_dim and "ablation" in st.groups:
        label = f"adaptive codes ({st.primary}), no text"
        no_text = train(st, dom, rows, n_rows, label, model=replace(st.model, text_dim=0))
        out.append(model_row(st, dom, label, no_text, rows))
    if "incremental" not in st.groups:
        return out
    cutoff = int(np.quantile(ds.timestamps[dom.fit], 1.0 - NEW_SHARE))
    v1 = train(st, dom, rows, n_rows, "v1 (90%)", mask=ds.timestamps < cutoff)
    inc = train(st, dom, rows, n_rows, "incremental", init_from=v1.params, new_since=cutoff)
    out.append(model_row(st, dom, f"v1 on 90% ({st.primary})", v1, rows))
    note = f"{inc.epochs_run} ep, {inc.n_windows}/{full.n_windows} windows"
    out.append(model_row(st, dom, f"incremental +10% ({st.primary})", inc, rows, note))
    extras[f"{ds.name}/incremental"] = {
        "time_ratio": inc.wall_s / full.wall_s,
        "full_wall_s": full.wall_s,
        "incremental_wall_s": inc.wall_s,
        "full_windows": full.n_windows,
        "incremental_windows": inc.n_windows,
        "fit_interactions": int(dom.fit.sum()),
    }
    return out


def transfer_rows(st: Settings, target: Domain, source_name: str, source: TrainResult) -> list[Row]:
    """Few-shot scratch vs warm start from ``source``, and a domain-only fine-tune."""
    ds = target.ds
    rows, n_rows = served_rows(target, st.primary)
    init = shared_init(source.params, target.levels * target.k)
    chosen = np.random.default_rng(st.seed).random(ds.n_users) < st.few_fraction
    few = chosen[ds.users]
    note = f"{st.few_fraction:.0%} of users, {int((few & target.fit).sum())} interactions"
    scratch = train(st, target, rows, n_rows, "few-shot scratch", mask=few)
    warm = train(
        st, target, rows, n_rows, f"few-shot warm <- {source_name}", mask=few, init_from=init
    )
    tuned = train(
        st,
        target,
        rows,
        n_rows,
        f"domain fine-tune <- {source_name}",
        config=replace(st.train, trainable="domain"),
        init_from=init,
    )
    return [
        model_row(st, target, f"few-shot scratch ({st.primary})", scratch, rows, note),
        model_row(st, target, f"few-shot warm <- {source_name}", warm, rows, note),
        model_row(
            st,
            target,
            f"domain fine-tune <- {source_name}",
            tuned,
            rows,
            f"{tuned.epochs_run} ep, encoder frozen",
        ),
    ]


def fmt(x: float | int | None, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and np.isnan(x):
        return "n/a"
    return format(x, spec)


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'dataset':<8} {'method':<32} {'R@10':>7} {'N@10':>7} {'headR':>7} {'headN':>7} "
        f"{'coldR':>7} {'coldN':>7} {'valN':>7} {'time s':>7} {'params':>8} {'table KB':>9}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        kb = None if r.table_bytes is None else r.table_bytes / 1024
        print(
            f"{r.dataset:<8} {r.method:<32} {fmt(r.recall, '.4f'):>7} {fmt(r.ndcg, '.4f'):>7} "
            f"{fmt(r.head_recall, '.4f'):>7} {fmt(r.head_ndcg, '.4f'):>7} "
            f"{fmt(r.cold_recall, '.4f'):>7} {fmt(r.cold_ndcg, '.4f'):>7} "
            f"{fmt(r.val_ndcg, '.4f'):>7} {fmt(r.wall_s, '.1f'):>7} {fmt(r.trainable_params, 'd'):>8} "
            f"{fmt(kb, '.1f'):>9}  {r.note}"
        )


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r.dataset for r in rows))
    metrics = (("recall", "all targets"), ("head_recall", "head targets"), ("cold_recall", "cold"))
    fig, axes = plt.subplots(len(datasets), 1, figsize=(12, 4.8 * len(datasets)), squeeze=False)
    for ax, name in zip(axes[:, 0], datasets, strict=True):
        sub = [r for r in rows if r.dataset == name]
        x = np.arange(len(sub))
        for j, (attr, label) in enumerate(metrics):
            vals = [float(np.nan_to_num(getattr(r, attr))) for r in sub]
            ax.bar(x + (j - 1) * 0.27, vals, width=0.27, label=label)
        ax.set_xticks(x, [r.method for r in sub], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Recall@10 (full ranking)")
        ax.set_title(f"{name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(rows: list[Row], extras: dict[str, object], primary: dict[str, str]) -> list[str]:
    lines = []
    for key, value in extras.items():
        if not (key.endswith("/incremental") and isinstance(value, dict)):
            continue
        name = key.split("/")[0]
        by_method = {r.method: r for r in rows if r.dataset == name}
        full = by_method[f"adaptive codes ({primary[name]})"]
        inc = by_method[f"incremental +10% ({primary[name]})"]
        lines.append(
            f"{name}: full train of {value['fit_interactions']} interactions "
            f"{value['full_wall_s']:.1f} s; incremental {value['incremental_wall_s']:.1f} s "
            f"(ratio {value['time_ratio']:.2f}); R@10 incremental {inc.recall:.4f} vs full "
            f"{full.recall:.4f}"
        )
    return lines


COLD_METHODS = ("text zero-shot", "ID model", "fixed codes", "adaptive codes")


def cold_lines(
    rows: list[Row], domains: list[Domain], primary: dict[str, str], extras: dict[str, object]
) -> list[str]:
    """Cold-start slice as hit counts with 95 % Wilson intervals, and the paired difference
    of the primary adaptive policy against fixed codes (cluster bootstrap over target items,
    since a slice's cases often share a few new items)."""
    lines = []
    for dom in domains:
        parts = []
        for key, value in extras.items():
            if key.startswith(f"{dom.ds.name}/validation/") and isinstance(value, dict):
                p, b = value["plain"], value["borrowed"]
                parts.append(
                    f"{key.rsplit('/', 1)[1]} cold {p['cold_hits']}/{p['cold_n']} -> "
                    f"{b['cold_hits']}/{b['cold_n']}, N@10 {p['ndcg']:.4f} -> {b['ndcg']:.4f}"
                )
        if parts:
            lines.append(
                f"{dom.ds.name} validation, new items borrowing trained codes (plain -> "
                "borrowed): " + "; ".join(parts)
            )
        cold = dom.slices["cold"]
        n = int(cold.sum())
        if n == 0:
            continue
        targets = dom.test_items[cold]
        sub = {r.method: r for r in rows if r.dataset == dom.ds.name}
        parts = []
        for r in sub.values():
            if r.cold_n and r.method.startswith(COLD_METHODS):
                lo, hi = wilson_interval(r.cold_hits, r.cold_n)
                parts.append(f"{r.method} {r.cold_hits}/{r.cold_n} [{lo:.3f}, {hi:.3f}]")
        lines.append(
            f"{dom.ds.name} cold-start: {n} cases on {len(np.unique(targets))} items; "
            "R@10 hits [95% Wilson]: " + "; ".join(parts)
        )
        fixed = sub.get("fixed codes")
        for r in sub.values():
            if fixed is None or not r.method.startswith("adaptive codes") or "no text" in r.method:
                continue
            a = np.asarray(r.cold_ranks) < 10
            b = np.asarray(fixed.cold_ranks) < 10
            d = paired_difference(a, b, targets)
            mark = " (primary)" if r.method == f"adaptive codes ({primary[dom.ds.name]})" else ""
            lines.append(
                f"  {r.method}{mark} - fixed codes on cold: {d.diff:+.3f} "
                f"[{d.low:+.3f}, {d.high:+.3f}] ({d.n} cases, {d.n_groups} items resampled)"
            )
    return lines


def overrides(config: type, pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as typed keyword arguments of the dataclass ``config`` (each value
    parsed as the type of the field's default; ``none`` for an optional field)."""
    defaults = {f.name: f.default for f in fields(config)}
    parsed: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in defaults:
            raise ValueError(
                f"{config.__name__} override {pair!r}: expected KEY=VALUE with KEY one of "
                f"{sorted(defaults)}"
            )
        try:
            parsed[key] = _typed(defaults[key], raw)
        except ValueError:
            raise ValueError(
                f"{config.__name__} override {pair!r}: {key} takes a value like its default "
                f"{defaults[key]!r}"
            ) from None
    return parsed


def _typed(default: object, raw: str) -> object:
    """``raw`` parsed as the type of ``default`` (``none`` is None)."""
    if raw.lower() == "none":
        return None
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return raw.lower() in ("true", "1", "yes", "on")
    if isinstance(default, int | float):
        return type(default)(raw)
    if default is None:
        return float(raw) if "." in raw or "e" in raw.lower() else int(raw)
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser, multiple=True)
    parser.add_argument(
        "--epochs", type=int, default=None, help="max epochs per model (default: the rule)"
    )
    parser.add_argument("--levels", type=int, default=None, help="code depth (default: rule)")
    parser.add_argument("--k", type=int, default=None, help="codewords per level (default: rule)")
    parser.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"adaptive length policies to compare (from {sorted(POLICIES)})",
    )
    parser.add_argument(
        "--rows",
        default=",".join(ROW_GROUPS),
        help=f"row groups to run, from {list(ROW_GROUPS)} (adaptive policies always run)",
    )
    parser.add_argument("--few-fraction", type=float, default=0.1, help="few-shot user share")
    parser.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ModelConfig default for every row (repeatable), e.g. layers=2",
    )
    parser.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig default for every row (repeatable), e.g. lr=0.001",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    policies = tuple(p for p in args.policies.split(",") if p)
    unknown = [p for p in policies if p not in POLICIES or p == "fixed"]
    if not policies or unknown:
        parser.error(f"--policies: unknown or fixed {unknown}; pick from {sorted(POLICIES)}")
    groups = frozenset(g for g in args.rows.split(",") if g)
    if groups - set(ROW_GROUPS):
        parser.error(f"--rows: unknown {sorted(groups - set(ROW_GROUPS))}; pick from {ROW_GROUPS}")
    try:  # checked before any data is read: a bad override costs nothing
        model_set = overrides(ModelConfig, args.model)
        model_cfg = ModelConfig(**model_set)  # type: ignore[arg-type]
        train_cfg = TrainConfig(
            **{  # type: ignore[arg-type]
                "epochs": args.epochs,
                "threads": args.threads,
                "seed": args.seed,
                **overrides(TrainConfig, args.train),
            }
        )
    except (ValueError, QuantizeError) as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    loaded = [(ds, item_embeddings(ds)) for ds in map(load_dataset, args.dataset)]
    all_emb = np.concatenate([emb for _, emb in loaded])
    if "text_dim" not in model_set:  # the text projection is on, with the embedding width
        model_cfg = replace(model_cfg, text_dim=int(all_emb.shape[1]))
    st = Settings(
        model=model_cfg,
        train=train_cfg,
        policies=policies,
        few_fraction=args.few_fraction,
        seed=args.seed,
        groups=groups,
    )
    rule_levels, rule_k = suggest_shape(len(all_emb))
    levels = args.levels or rule_levels
    k = args.k or rule_k
    started = time.perf_counter()
    codebook = ResidualCodebook.train(all_emb, levels, k, seed=args.seed)
    print(
        f"shared codebook L={levels} K={k} on {len(all_emb)} items "
        f"({time.perf_counter() - started:.1f} s)\nmodel: {st.model}\ntrain: {st.train}"
    )
    domains = [make_domain(ds, emb, codebook, st.model.max_len) for ds, emb in loaded]
    rows: list[Row] = []
    extras: dict[str, object] = {"levels": levels, "k": k}
    results: list[dict[str, TrainResult]] = []
    for dom in domains:
        dom_rows, dom_results = model_rows(st, dom, extras)
        rows.extend(dom_rows)
        results.append(dom_results)
    chosen = {dom.ds.name: pick_primary(dom.ds.name, st.policies, extras) for dom in domains}
    per = {name: replace(st, policies=(policy,)) for name, policy in chosen.items()}
    extras["primary_policy"] = chosen
    print(f"primary adaptive policy per domain (best validation NDCG@10 as served): {chosen}")
    primary = {
        dom.ds.name: res[chosen[dom.ds.name]] for dom, res in zip(domains, results, strict=True)
    }
    for dom in domains:
        rows.extend(primary_rows(per[dom.ds.name], dom, primary[dom.ds.name], extras))
    for target in domains:
        for source in domains:
            if source is not target and "transfer" in st.groups:
                rows.extend(
                    transfer_rows(
                        per[target.ds.name], target, source.ds.name, primary[source.ds.name]
                    )
                )
    order = [d.ds.name for d in domains]
    rows.sort(key=lambda r: order.index(r.dataset))
    print()
    print_table(rows)
    lines = summary_lines(rows, extras, chosen) + cold_lines(rows, domains, chosen, extras)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "quality.png"
    plot(rows, png)
    out_json = args.out / "quality.json"
    payload = {
        "model": st.model.to_dict(),
        "train": asdict(st.train),
        "policies": list(st.policies),
        "extras": extras,
        "summary": lines,
        "rows": [asdict(r) for r in rows],
    }
    out_json.write_text(json.dumps(payload, indent=1))
    print(f"wrote {png} and {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
