"""Slow, loop-by-loop references of served item vectors and borrowed codes, for tests of
the fast paths."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quantize.table_model import Snapshot
from tests.text_reference import slow_text_part
from worker.state.versions import TEXT_PROJ

Rows = Sequence[int] | np.ndarray


def slow_vector(snapshot: Snapshot, rows: Rows, emb: np.ndarray | None) -> np.ndarray:
    """The sum of the item's code rows the version has, plus the text part of ``emb`` (when
    the version projects text: :func:`~tests.text_reference.slow_text_part`), in plain loops."""
    table = snapshot.params["table.rows"].astype(np.float64)
    out = np.zeros(table.shape[1])
    for r in rows:
        if 0 <= r < table.shape[0]:
            out += table[r]
    if TEXT_PROJ in snapshot.params and emb is not None:
        out += slow_text_part(snapshot.params, emb)
    return out


def slow_trained_code(rows: Rows, full: Rows) -> list[int]:
    """A trained item's code as others borrow it: the leading rows of its served code that
    follow its full path (a disambiguation row is not on the path)."""
    code: list[int] = []
    for r, f in zip(rows, full, strict=False):
        if r != f:
            break
        code.append(int(f))
    return code


def slow_served_rows(
    own: Rows,
    path: Rows,
    trained_rows: Sequence[Rows],
    trained_full: Sequence[Rows],
    min_share: int = 2,
) -> list[int]:
    """The rows an untrained item with served rows ``own`` and full-path rows ``path`` is
    served: the deepest prefix of ``path`` that the codes of at least ``min_share`` trained
    items pass through, else ``own`` (pads dropped)."""
    codes = [
        slow_trained_code(rows, full) for rows, full in zip(trained_rows, trained_full, strict=True)
    ]
    best: list[int] = []
    for d in range(1, len(path) + 1):
        through = sum(
            1 for code in codes if len(code) >= d and all(code[j] == path[j] for j in range(d))
        )
        if through >= min_share:
            best = [int(r) for r in path[:d]]
    return best if best else [int(r) for r in own if r >= 0]
