"""Replay a dataset directory into Kafka: items first, then interactions in time order."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from worker.commands.dataset import read_interactions, read_items
from worker.core.settings import Settings
from worker.ingest.events import interaction_payload, item_payload
from worker.ingest.exceptions import KafkaUnavailableError

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    items: int = 0
    interactions: int = 0
    seconds: float = 0.0


class _Pacer:
    """Keeps a steady ``rate`` (events/s); ``rate <= 0`` means as fast as possible."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.perf_counter()
        self.sent = 0

    def tick(self) -> None:
        self.sent += 1
        if self.rate > 0 and self.sent % 50 == 0:
            ahead = self.sent / self.rate - (time.perf_counter() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def make_producer(settings: Settings) -> KafkaProducer:
    try:
        return KafkaProducer(
            **settings.kafka_common(),
            acks="all",
            linger_ms=20,
            batch_size=512 * 1024,
            max_request_size=max(1_048_576, settings.max_message_bytes * 2),
        )
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"Kafka at {settings.kafka_bootstrap} did not answer: {exc}; start a broker "
            f"(adacode kafka up) or set --kafka-bootstrap / ADACODE_KAFKA_BOOTSTRAP"
        ) from exc


def replay(
    settings: Settings,
    dataset: Path,
    *,
    rate: float = 0.0,
    limit: int | None = None,
    skip: int = 0,
    items: bool = True,
    progress: bool = True,
) -> ReplayReport:
    """Produce the dataset's items, then interactions ``skip .. skip+limit`` in time order.

    An item's event time is that of its first interaction (or the first event time
    of the dataset), so the stream is plausible for time-decayed popularity.
    """
    started = time.perf_counter()
    report = ReplayReport()
    producer = make_producer(settings)
    items_topic, inter_topic = settings.topic("items"), settings.topic("interactions")
    domains: dict[str, str] = {}
    try:
        if items:
            first_seen: dict[str, int] = {}
            for it in read_interactions(dataset):
                first_seen.setdefault(it.item_id, it.ts)
            t0 = min(first_seen.values(), default=0)
            pacer = _Pacer(rate)
            for item in tqdm(read_items(dataset), desc="items", unit="ev", disable=not progress):
                domains[item.item_id] = item.domain
                payload = item_payload(
                    item.item_id, item.domain, first_seen.get(item.item_id, t0), text=item.text
                )
                producer.send(items_topic, key=item.domain.encode(), value=payload)
                report.items += 1
                pacer.tick()
            producer.flush()
        else:
            domains = {item.item_id: item.domain for item in read_items(dataset)}
        default_domain = next(iter(domains.values()), "default")
        pacer = _Pacer(rate)
        bar = tqdm(desc="interactions", unit="ev", total=limit, disable=not progress)
        for n, it in enumerate(read_interactions(dataset)):
            if n < skip:
                continue
            if limit is not None and report.interactions >= limit:
                break
            domain = domains.get(it.item_id, default_domain)
            producer.send(
                inter_topic,
                key=domain.encode(),
                value=interaction_payload(it.user_id, it.item_id, domain, it.ts),
            )
            report.interactions += 1
            bar.update()
            pacer.tick()
        bar.close()
        producer.flush()
    finally:
        producer.close()
    report.seconds = time.perf_counter() - started
    return report
