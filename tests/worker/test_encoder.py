"""The traced MiniLM graph against sentence-transformers' own encode (the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.ingest.encoder import MINILM_DIM, TextEncoder

TEXTS = [
    "Nordvik Compact Bamboo Desk Lamp 750 ml, Blue",
    "x",
    "ümlaut café — 日本語",
    "the quick brown fox jumps over the lazy dog " * 60,  # longer than the model's limit
    "Acme Wireless Keyboard",
]


@pytest.fixture(scope="module")
def encoders() -> tuple[TextEncoder, TextEncoder]:
    traced, eager = TextEncoder(batch_size=2), TextEncoder(batch_size=2, traced=False)
    traced.encode(["load"])
    eager.encode(["load"])
    return traced, eager


def test_the_traced_graph_is_used_and_matches_encode(
    encoders: tuple[TextEncoder, TextEncoder],
) -> None:
    traced, eager = encoders
    assert traced.is_traced and not eager.is_traced
    got, want = traced.encode(TEXTS), eager.encode(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), MINILM_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_rows_keep_the_input_order_across_batches(
    encoders: tuple[TextEncoder, TextEncoder],
) -> None:
    traced, _ = encoders
    together = traced.encode(TEXTS)  # sorted by length and cut into batches of 2
    alone = np.concatenate([traced.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert traced.encode([]).shape == (0, MINILM_DIM)
