"""Reading a dataset directory: ``items.jsonl`` and ``interactions.csv``.

The format of ../shared/datasets: items are ``{"item_id", "domain", "text"}`` lines;
interactions are ``user_id,item_id,timestamp`` rows sorted by time.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from worker.commands.exceptions import DatasetError


@dataclass(frozen=True, slots=True)
class DatasetItem:
    item_id: str
    domain: str
    text: str


@dataclass(frozen=True, slots=True)
class DatasetInteraction:
    user_id: str
    item_id: str
    ts: int


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(
            f"dataset file {path} is missing; a dataset directory holds items.jsonl and "
            f"interactions.csv (see ../shared/datasets/README.md)"
        )
    return path


def read_items(directory: Path) -> Iterator[DatasetItem]:
    path = _require(directory / "items.jsonl")
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
                yield DatasetItem(
                    str(doc["item_id"]), str(doc["domain"]), str(doc.get("text") or "")
                )
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(f"{path}:{lineno}: malformed item line: {exc}") from exc


def read_interactions(directory: Path) -> Iterator[DatasetInteraction]:
    path = _require(directory / "interactions.csv")
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["user_id", "item_id", "timestamp"]:
            raise DatasetError(
                f"{path}: expected the header user_id,item_id,timestamp, got {header}"
            )
        for lineno, row in enumerate(reader, 2):
            try:
                yield DatasetInteraction(row[0], row[1], int(row[2]))
            except (IndexError, ValueError) as exc:
                raise DatasetError(
                    f"{path}:{lineno}: malformed interaction row {row}: {exc}"
                ) from exc


def dataset_domain(directory: Path) -> str:
    """The domain of a dataset: that of its first item (datasets hold one domain)."""
    for item in read_items(directory):
        return item.domain
    raise DatasetError(f"{directory / 'items.jsonl'} holds no item")
