"""A slow, loop-by-loop reference of a served item vector, for tests of the fast paths."""

from __future__ import annotations

import numpy as np

from quantize.table_model import Snapshot
from worker.versions import TEXT_PROJ


def slow_vector(snapshot: Snapshot, rows: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """The sum of the item's code rows the version has, plus W @ e, in plain loops."""
    table = snapshot.params["table.rows"].astype(np.float64)
    w = snapshot.params[TEXT_PROJ].astype(np.float64)
    out = np.zeros(table.shape[1])
    for r in rows:
        if 0 <= r < table.shape[0]:
            out += table[r]
    for h in range(w.shape[0]):
        out[h] += sum(w[h, d] * float(emb[d]) for d in range(w.shape[1]))
    return out
