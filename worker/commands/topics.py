"""Topic names and their creation (``adacode topics create``)."""

from __future__ import annotations

import logging

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from worker.core.settings import Settings
from worker.ingest.exceptions import KafkaUnavailableError
from worker.ingest.group import MAX_RECORD_BYTES

log = logging.getLogger(__name__)

#: Topics partitioned by domain key, all with the same partition count (co-partitioned:
#: partition p of each belongs to one worker): events, commands, table versions.
EVENT_TOPICS = ("items", "interactions", "control", "versions")
#: Service topics (one partition, ordered); ``codebook``: the first codebook wins.
SERVICE_TOPICS = ("deadletter", "snapshots", "codebook")
#: Topics that hold state (compacted: the latest value of each key is kept forever).
STATE_TOPICS = ("versions", "codebook")


def topic_configs(settings: Settings, name: str) -> dict[str, str]:
    retention_ms = (
        "-1"
        if settings.topic_retention_hours < 0
        else str(settings.topic_retention_hours * 3600_000)
    )
    # Larger than the worker's payload limit, so oversized events reach it and get
    # dead-lettered with a reason instead of failing at the producer.
    max_bytes = max(4 * settings.max_message_bytes, 4 * 1024 * 1024)
    conf = {"retention.ms": retention_ms, "max.message.bytes": str(max_bytes)}
    if name == "control":
        conf["retention.ms"] = "-1"  # rollbacks and pins must never expire
    if name in STATE_TOPICS:
        conf = {
            "cleanup.policy": "compact",
            "retention.ms": "-1",
            "max.message.bytes": str(MAX_RECORD_BYTES),
        }
    return conf


def create_topics(settings: Settings, partitions: int | None = None) -> dict[str, str]:
    """Create every adacode topic that does not exist yet; returns ``{name: status}``."""
    parts = partitions or settings.topic_partitions
    wanted = [
        NewTopic(settings.topic(n), parts, 1, topic_configs=topic_configs(settings, n))
        for n in EVENT_TOPICS
    ] + [
        NewTopic(settings.topic(n), 1, 1, topic_configs=topic_configs(settings, n))
        for n in SERVICE_TOPICS
    ]
    try:
        admin = KafkaAdminClient(**settings.kafka_common(), request_timeout_ms=15_000)
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"Kafka at {settings.kafka_bootstrap} did not answer: {exc}; start a broker "
            f"(adacode kafka up) or set --kafka-bootstrap / ADACODE_KAFKA_BOOTSTRAP"
        ) from exc
    status: dict[str, str] = {}
    try:
        existing = set(admin.list_topics())
        for topic in wanted:
            if topic.name in existing:
                status[topic.name] = "exists"
                continue
            try:
                admin.create_topics([topic])
                status[topic.name] = f"created ({topic.num_partitions} partitions)"
            except TopicAlreadyExistsError:
                status[topic.name] = "exists"
    finally:
        admin.close()
    return status
