"""Test helpers that talk to a real Kafka broker with kafka-python.

Topics are created explicitly (the test broker runs with ``auto.create.topics.enable=false``),
messages are produced with an idempotent producer (per-key order survives retries), and
:func:`consume_all` reads a topic from the beginning without a consumer group, so no rebalance
delays are involved.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from adacode.errors import AdacodeError

CLIENT_ID = "adacode-tests"


class KafkaTestSupportError(AdacodeError):
    """The test broker could not be reached or did not do what a helper asked."""


@dataclass(frozen=True)
class Record:
    """One consumed message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int

    def json(self) -> Any:
        """The value parsed as JSON."""
        return orjson.loads(self.value)


def wait_until_answers(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Block until the broker at ``bootstrap`` answers a cluster metadata request."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap, client_id=CLIENT_ID, request_timeout_ms=5000
            )
        except KafkaError as exc:
            last = exc
            time.sleep(0.5)
            continue
        try:
            cluster = admin.describe_cluster()
            if cluster.get("brokers"):
                return
            last = KafkaTestSupportError(f"broker at {bootstrap} reports no brokers yet")
        except KafkaError as exc:
            last = exc
        finally:
            admin.close()
        time.sleep(0.5)
    raise KafkaTestSupportError(
        f"Kafka broker at {bootstrap} did not answer within {timeout_s:.0f}s (last error: {last!r}); "
        "start one with `ops/kafka.sh up` or fix ADACODE_TEST_BOOTSTRAP"
    ) from last


def create_topics(
    bootstrap: str, names: Sequence[str], partitions: int = 1, timeout_s: float = 30.0
) -> None:
    """Create ``names`` with ``partitions`` partitions each (replication 1) and wait until every
    partition has a leader."""
    if not names:
        raise KafkaTestSupportError("create_topics got no topic names; pass at least one")
    if partitions < 1:
        raise KafkaTestSupportError(
            f"create_topics got partitions={partitions}; a topic needs at least 1 partition"
        )
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=CLIENT_ID)
    try:
        admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1} for name in names},
            timeout_ms=int(timeout_s * 1000),
        )
        admin.wait_for_topics(list(names), timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        raise KafkaTestSupportError(
            f"could not create topics {list(names)} on {bootstrap}: {exc!r}; "
            "use fresh names (the topic_prefix fixture) and check the broker log"
        ) from exc
    finally:
        admin.close()


def _as_bytes(value: Mapping[str, Any] | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return orjson.dumps(value)


def _key_bytes(key: str | bytes | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return key.encode()


def produce_json(
    bootstrap: str,
    topic: str,
    messages: Iterable[tuple[str | bytes | None, Mapping[str, Any] | bytes]],
    timeout_s: float = 30.0,
) -> list[tuple[int, int]]:
    """Produce ``(key, value)`` pairs to ``topic`` in order and wait for every acknowledgement.

    Dict values are JSON-encoded, bytes are sent as they are; str keys are UTF-8 encoded. Returns
    the ``(partition, offset)`` of each message, in input order.
    """
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, client_id=CLIENT_ID, acks="all", linger_ms=5
    )
    try:
        futures = [
            producer.send(topic, key=_key_bytes(key), value=_as_bytes(value))
            for key, value in messages
        ]
        # Wait on each future rather than producer.flush(): get() survives a batch being split
        # and re-sent, where kafka-python's flush() can raise UnknownError('Future not done').
        placed: list[tuple[int, int]] = []
        for future in futures:
            meta = future.get(timeout=timeout_s)
            placed.append((int(meta.partition), int(meta.offset)))
        return placed
    except KafkaError as exc:
        raise KafkaTestSupportError(
            f"producing to topic {topic!r} on {bootstrap} failed: {exc!r}; "
            "create the topic first (create_topics) and check the broker log"
        ) from exc
    finally:
        producer.close(timeout=timeout_s)


def _partitions(consumer: KafkaConsumer, topic: str, deadline: float) -> list[TopicPartition]:
    while True:
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        if time.monotonic() >= deadline:
            raise KafkaTestSupportError(
                f"topic {topic!r} not found on the broker; create it first (create_topics)"
            )
        time.sleep(0.2)


def consume_all(
    bootstrap: str,
    topic: str,
    timeout_s: float = 15.0,
    idle_s: float = 1.5,
    min_count: int = 0,
) -> list[Record]:
    """Read ``topic`` from the beginning of every partition.

    Stops once at least ``min_count`` messages were read and none arrived for ``idle_s``
    seconds, or when ``timeout_s`` runs out (then it raises if fewer than ``min_count`` came).
    Records come back ordered by (partition, offset).
    """
    deadline = time.monotonic() + timeout_s
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=CLIENT_ID,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    records: list[Record] = []
    try:
        partitions = _partitions(consumer, topic, deadline)
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        last_new = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if len(records) >= min_count and now - last_new >= idle_s:
                break
            batch = consumer.poll(timeout_ms=200)
            for polled in batch.values():
                for msg in polled:
                    records.append(
                        Record(
                            topic=msg.topic,
                            partition=msg.partition,
                            offset=msg.offset,
                            key=msg.key,
                            value=msg.value,
                            timestamp_ms=msg.timestamp,
                        )
                    )
                last_new = time.monotonic()
    except KafkaError as exc:
        raise KafkaTestSupportError(
            f"consuming topic {topic!r} from {bootstrap} failed: {exc!r}; check the broker log"
        ) from exc
    finally:
        consumer.close(autocommit=False)
    if len(records) < min_count:
        raise KafkaTestSupportError(
            f"read {len(records)} messages from topic {topic!r} within {timeout_s:.0f}s, "
            f"expected at least {min_count}; the producer may not have written them"
        )
    records.sort(key=lambda r: (r.partition, r.offset))
    return records
