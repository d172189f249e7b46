"""Dead letters through the real broker: a record too large for the worker is dead-lettered
cut to a bounded size (never refused by Kafka), and an event keyed by anything but its
domain is dead-lettered with the rule."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from tests.kafka_utils import CLIENT_ID, consume_all, produce_json
from tests.worker_process import (
    DIM,
    InProcessWorker,
    end_offsets,
    settings_for,
    wait_for,
)
from worker.commands.topics import create_topics
from worker.ingest.consumer import DEAD_LETTER_MAX_BYTES, DEAD_LETTER_VALUE_BYTES
from worker.ingest.events import interaction_payload, item_payload
from worker.state.reads import domain_counters


def _item(item_id: str, ts: int) -> bytes:
    return item_payload(item_id, "shop", ts, embedding=np.ones(DIM))


def _produce_large(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> list:
    """Produce in order with requests of up to 4 MiB (the topic's max.message.bytes, set by
    ``adacode topics create``, lets such a record in); returns each record's metadata."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=CLIENT_ID,
        acks="all",
        max_request_size=4 * 1024 * 1024,
        max_in_flight_requests_per_connection=1,
    )
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in messages]
        return [f.get(timeout=30) for f in futures]
    finally:
        producer.close(timeout=30)


def test_a_2mb_event_is_dead_lettered_cut_with_its_coordinates_and_digest(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "state")  # max_message_bytes: 1e6
    create_topics(s, partitions=1)
    huge = item_payload("huge", "shop", 2, text="y" * 2_000_000)
    assert len(huge) > 2 * s.max_message_bytes
    placed = _produce_large(
        kafka_bootstrap,
        s.topic("items"),
        [(b"shop", _item("a", 1)), (b"shop", huge), (b"shop", _item("b", 3))],
    )
    end = end_offsets(kafka_bootstrap, [s.topic("items")])
    worker = InProcessWorker(s)
    try:
        wait_for(lambda: worker.store.offsets() == end, 60, "the worker to pass the 2 MB event")
        counters = domain_counters(worker.store)
        refused = worker.loop.metrics.dead_letters_refused.labels(s.topic("items"))._value.get()
    finally:
        worker.stop()
    assert counters["shop"].items == 2  # the events after the large one are applied
    assert refused == 0
    (letter,) = consume_all(kafka_bootstrap, s.topic("deadletter"), timeout_s=20, min_count=1)
    assert len(letter.value) <= DEAD_LETTER_MAX_BYTES and letter.key == b"shop"
    doc = letter.json()
    assert "exceeds max_message_bytes" in doc["reason"]
    assert (doc["topic"], doc["partition"], doc["offset"], doc["key"]) == (
        s.topic("items"),
        placed[1].partition,
        placed[1].offset,
        "shop",
    )
    assert doc["truncated"] is True and doc["value_bytes"] == len(huge)
    assert doc["value_sha256"] == hashlib.sha256(huge).hexdigest()
    assert doc["value"].encode() == huge[:DEAD_LETTER_VALUE_BYTES]


def test_events_not_keyed_by_their_domain_are_dead_lettered_with_the_rule(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    s = settings_for(kafka_bootstrap, topic_prefix, tmp_path / "state")
    create_topics(s, partitions=2)
    produce_json(
        kafka_bootstrap,
        s.topic("items"),
        [("shop", _item("a", 1)), ("news", _item("b", 2)), ("shop", _item("c", 3))],
    )
    produce_json(
        kafka_bootstrap,
        s.topic("interactions"),
        [
            ("shop", interaction_payload("u", "a", "shop", 10)),
            ("news", interaction_payload("u", "a", "shop", 11)),
            (None, interaction_payload("u", "a", "shop", 12)),
            ("shop", interaction_payload("u", "c", "shop", 13)),
        ],
    )
    end = end_offsets(kafka_bootstrap, [s.topic("items"), s.topic("interactions")])
    worker = InProcessWorker(s)
    try:
        wait_for(lambda: worker.store.offsets() == end, 60, "the worker to apply every record")
        counters = domain_counters(worker.store)
        mismatches = {
            t: worker.loop.metrics.key_mismatches.labels(t)._value.get()
            for t in (s.topic("items"), s.topic("interactions"))
        }
        rendered = worker.loop.metrics.render().decode()
    finally:
        worker.stop()
    assert (counters["shop"].items, counters["shop"].interactions) == (2, 2)
    assert mismatches == {s.topic("items"): 1, s.topic("interactions"): 2}
    assert "adacode_key_mismatch_events_total" in rendered
    docs = [r.json() for r in consume_all(kafka_bootstrap, s.topic("deadletter"), min_count=3)]
    assert len(docs) == 3
    wrong = [d for d in docs if d["key"] == "news"]
    assert len(wrong) == 2 and {d["topic"] for d in wrong} == {
        s.topic("items"),
        s.topic("interactions"),
    }
    for d in wrong:
        assert d["reason"].startswith("key 'news' is not the event's domain 'shop'")
        assert "produce it with key='shop'" in d["reason"]
    (nokey,) = [d for d in docs if d["key"] is None]
    assert nokey["reason"].startswith("no key") and nokey["topic"] == s.topic("interactions")
