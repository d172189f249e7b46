"""A slow, loop-by-loop reference of a model's text part (the text adaptor or the linear
map), for tests of the torch and numpy fast paths."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

TEXT_PROJ, TEXT_IN, TEXT_IN_BIAS = (
    "table.text_proj.weight",
    "table.text_in.weight",
    "table.text_in.bias",
)


def slow_text_part(params: Mapping[str, np.ndarray], emb: np.ndarray) -> np.ndarray:
    """``W @ gelu(A @ e + b)`` when ``params`` hold the adaptor's layer, else ``W @ e``, in
    float64 loops with the exact (erf) GELU."""
    features = [float(x) for x in emb]
    if TEXT_IN in params:
        a = params[TEXT_IN].astype(np.float64)
        b = params[TEXT_IN_BIAS].astype(np.float64)
        pre = [sum(a[j, d] * features[d] for d in range(a.shape[1])) + b[j] for j in range(len(b))]
        features = [0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in pre]
    w = params[TEXT_PROJ].astype(np.float64)
    return np.array(
        [sum(w[h, d] * features[d] for d in range(w.shape[1])) for h in range(w.shape[0])]
    )


_erf = np.vectorize(math.erf, otypes=[np.float64])


def numpy_text_part(params: Mapping[str, np.ndarray], emb: np.ndarray) -> np.ndarray:
    """:func:`slow_text_part` of every row of ``emb`` ``[n, text_dim]`` at once, in float64
    numpy (no torch), for tests over many items."""
    features = np.asarray(emb, dtype=np.float64)
    if TEXT_IN in params:
        pre = features @ params[TEXT_IN].astype(np.float64).T + params[TEXT_IN_BIAS]
        features = 0.5 * pre * (1.0 + _erf(pre / math.sqrt(2.0)))
    return features @ params[TEXT_PROJ].astype(np.float64).T
