"""Live codes through the real broker: coded in the batch that stores the item; promotion."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantize.assign import AssignerState
from tests.kafka_utils import produce_json
from tests.worker_process import DIM, InProcessWorker, end_offsets, settings_for, wait_for
from worker.commands.topics import create_topics
from worker.core.settings import Settings
from worker.ingest.events import interaction_payload, item_payload
from worker.state.reads import committed_assigner


def _state(worker: InProcessWorker, domain: str) -> AssignerState | None:
    assigner = committed_assigner(worker.store, domain)
    return None if assigner is None else assigner.state()


def test_new_item_is_coded_in_its_batch_and_interactions_promote_it(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(
        kafka_bootstrap,
        topic_prefix,
        tmp_path / "state",
        codebook_min_items=60,
        code_head_fraction=0.05,
        code_round_interactions=100,
    )
    create_topics(s, partitions=1)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, DIM))
    items = [
        (
            "shop",
            item_payload(f"i{i}", "shop", i, embedding=centers[i % 6] + 0.2 * rng.normal(size=DIM)),
        )
        for i in range(80)
    ]
    produce_json(kafka_bootstrap, s.topic("items"), items)
    worker = InProcessWorker(s)
    try:
        topics = [s.topic("items")]
        wait_for(
            lambda: worker.store.offsets() == end_offsets(kafka_bootstrap, topics), 60, "items"
        )
        state = _state(worker, "shop")
        assert state is not None and len(state.keys) == 80  # bootstrap codebook coded all

        # a brand-new item: whenever its record is visible, so is its code (same batch)
        fresh = centers[2] + 0.2 * rng.normal(size=DIM)
        produce_json(
            kafka_bootstrap,
            s.topic("items"),
            [("shop", item_payload("new", "shop", 500, embedding=fresh))],
        )

        def stored() -> bool:
            return worker.store.get("items", b"shop\x00new") is not None

        wait_for(stored, 30, "the new item")
        state = _state(worker, "shop")
        assert state is not None and "new" in state.keys
        idx = state.keys.index("new")
        assert int(state.lengths[idx]) == s.code_min_len and not state.is_head[idx]

        # a stream of interactions makes it head: its code only grows, by appending
        inters = [
            (
                "shop",
                interaction_payload(f"u{j}", "new" if j % 3 else f"i{j % 80}", "shop", 1000 + j),
            )
            for j in range(600)
        ]
        produce_json(kafka_bootstrap, s.topic("interactions"), inters)
        wait_for(
            lambda: (
                worker.store.offsets()
                == end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])
            ),
            60,
            "interactions",
        )
        state = _state(worker, "shop")
        assert state is not None
        idx = state.keys.index("new")
        assert state.is_head[idx]
        assigner = worker.loop.processor.codes.assigner("shop")  # type: ignore[union-attr]
        served = assigner.served_code("new")
        assert served[: s.code_min_len] == tuple(int(d) for d in state.paths[idx][: s.code_min_len])
        heads = [
            assigner.served_code(k) for k, h in zip(state.keys, state.is_head, strict=True) if h
        ]
        assert len(set(heads)) == len(heads)  # head items never share a code
    finally:
        worker.stop()


def test_a_small_domain_gets_rounds_and_serves_its_head_items_longer_codes(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """A domain of 300 items and 3,000 interactions with the round settings as shipped (a
    round every code_round_share x items interactions, not every 10,000): code rounds run,
    head items exist, and they are served longer codes than the tail (the mechanism was
    off for every small domain when rounds came only every 10,000 interactions)."""
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "state", codebook_min_items=200)
    defaults = Settings()
    assert (s.code_round_share, s.code_round_interactions) == (
        defaults.code_round_share,
        defaults.code_round_interactions,
    )
    create_topics(s, partitions=1)
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(10, DIM))
    items = [
        (
            "small",
            item_payload(
                f"i{i}", "small", i, embedding=centers[i % 10] + 0.3 * rng.normal(size=DIM)
            ),
        )
        for i in range(300)
    ]
    hot = rng.zipf(1.3, size=3000) % 300
    inters = [
        ("small", interaction_payload(f"u{j % 400}", f"i{hot[j]}", "small", 10_000 + j))
        for j in range(3000)
    ]
    produce_json(kafka_bootstrap, s.topic("items"), items)
    worker = InProcessWorker(s)
    try:
        wait_for(
            lambda: worker.store.offsets() == end_offsets(kafka_bootstrap, [s.topic("items")]),
            60,
            "items",
        )
        produce_json(kafka_bootstrap, s.topic("interactions"), inters)
        topics = [s.topic("items"), s.topic("interactions")]
        wait_for(
            lambda: worker.store.offsets() == end_offsets(kafka_bootstrap, topics), 60, "events"
        )
        assigner = committed_assigner(worker.store, "small")
        assert assigner is not None and len(assigner) == 300
        stats = assigner.stats()
        assert assigner.rounds >= 10  # 3,000 interactions / (0.5 x 300) per round
        assert stats.n_head > 0 and stats.mean_len_head > stats.mean_len_tail
        heads = [assigner.served_code(k) for k in assigner.keys if assigner.is_head(k)]
        assert max(len(c) for c in heads) > 1 and len(set(heads)) == len(heads)
    finally:
        worker.stop()
