"""The session broker really stores and serves messages: keyed, partitioned, in order."""

from __future__ import annotations

import random
import time
from collections import defaultdict

import pytest
from kafka import KafkaAdminClient

from tests.kafka_utils import KafkaTestSupportError, consume_all, create_topics, produce_json


def test_keyed_messages_round_trip_in_per_key_order(
    kafka_bootstrap: str, topic_prefix: str, admin: KafkaAdminClient
) -> None:
    topic = f"{topic_prefix}roundtrip"
    create_topics(kafka_bootstrap, [topic], partitions=3)
    described = admin.describe_topics([topic])
    assert [len(t["partitions"]) for t in described] == [3]

    rng = random.Random(7)
    keys = [f"user-{i}" for i in range(10)]
    sent = [(rng.choice(keys), {"seq": seq, "payload": rng.random()}) for seq in range(100)]
    placed = produce_json(kafka_bootstrap, topic, sent)
    assert len(placed) == len(sent)

    records = consume_all(kafka_bootstrap, topic, timeout_s=30.0, min_count=len(sent))

    assert len(records) == len(sent)
    got = sorted(((r.key, r.json()) for r in records), key=lambda kv: kv[1]["seq"])
    assert got == [(key.encode(), value) for key, value in sent]
    # Keys hash to partitions; each key lives in one partition, in the order it was sent.
    partition_of: dict[bytes | None, set[int]] = defaultdict(set)
    seqs_by_key: dict[bytes | None, list[int]] = defaultdict(list)
    for r in records:
        partition_of[r.key].add(r.partition)
        seqs_by_key[r.key].append(r.json()["seq"])
    assert all(len(parts) == 1 for parts in partition_of.values())
    assert len({p for parts in partition_of.values() for p in parts}) > 1
    for key, seqs in seqs_by_key.items():
        assert seqs == sorted(seqs), f"key {key!r} came back out of order: {seqs}"
    # The producer's acknowledged offsets are exactly where the consumer found the messages.
    assert sorted(placed) == [(r.partition, r.offset) for r in records]


def test_consume_all_reports_a_missing_topic(kafka_bootstrap: str, topic_prefix: str) -> None:
    with pytest.raises(KafkaTestSupportError, match="not found"):
        consume_all(kafka_bootstrap, f"{topic_prefix}absent", timeout_s=2.0)


def test_a_bench_drops_its_own_topics_and_no_other(
    kafka_bootstrap: str, topic_prefix: str, admin: KafkaAdminClient
) -> None:
    """``bench.common.drop_topics`` deletes the topics of its prefix (a 1M-item bench leaves
    ~6 GB) and leaves a topic of another prefix that starts the same way."""
    from bench.common import drop_topics

    mine = [f"{topic_prefix}bench.items", f"{topic_prefix}bench.interactions"]
    other = f"{topic_prefix}benchmark-other"
    create_topics(kafka_bootstrap, [*mine, other], partitions=1)

    assert drop_topics(kafka_bootstrap, f"{topic_prefix}bench.") == sorted(mine)

    deadline = time.monotonic() + 30.0
    while set(mine) & set(admin.list_topics()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = set(admin.list_topics())
    assert not set(mine) & left
    assert other in left
