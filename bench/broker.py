"""A Kafka broker for a benchmark run: the one given, or ``ops/kafka.sh up`` on free ports."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from adacode.errors import AdacodeError

log = logging.getLogger(__name__)

KAFKA_SH = Path(__file__).resolve().parent.parent / "ops" / "kafka.sh"


class BrokerStartError(AdacodeError):
    """ops/kafka.sh could not start a broker for the benchmark."""


class ProduceError(AdacodeError):
    """The broker did not take every record a benchmark produced."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def broker(bootstrap: str | None, name: str = "bench") -> Iterator[str]:
    """Yield a bootstrap address: ``bootstrap`` as given, or a broker started for this run
    (on free ports, data in a temp dir; stopped and removed afterwards)."""
    if bootstrap:
        yield bootstrap
        return
    port = free_port()
    controller = free_port()
    while controller == port:
        controller = free_port()
    data = Path(tempfile.mkdtemp(prefix=f"adacode-{name}-kafka-"))
    flags = ["--port", str(port), "--controller-port", str(controller), "--data", str(data)]
    started = time.perf_counter()
    up = subprocess.run(
        ["bash", str(KAFKA_SH), "up", *flags], capture_output=True, text=True, check=False
    )
    if up.returncode != 0:
        subprocess.run(["bash", str(KAFKA_SH), "down", *flags], capture_output=True, check=False)
        shutil.rmtree(data, ignore_errors=True)
        raise BrokerStartError(
            f"ops/kafka.sh up {' '.join(flags)} failed with exit code {up.returncode}: "
            f"{(up.stdout + up.stderr).strip()[-2000:]}; fix the broker setup (ops/kafka.sh "
            "fetch, java) or pass --bootstrap HOST:PORT of a running broker"
        )
    log.info("broker up on 127.0.0.1:%d in %.1f s", port, time.perf_counter() - started)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        down = subprocess.run(
            ["bash", str(KAFKA_SH), "down", *flags], capture_output=True, text=True, check=False
        )
        if down.returncode != 0:
            print(f"warning: ops/kafka.sh down failed: {down.stderr.strip()}", file=sys.stderr)
        shutil.rmtree(data, ignore_errors=True)


def produce_stream(
    bootstrap: str,
    topic: str,
    events: Iterable[tuple[bytes, bytes]],
    *,
    desc: str | None = None,
    total: int | None = None,
    client: str = "kafka-python",
) -> tuple[int, int]:
    """Send every ``(key, value)`` of ``events`` to ``topic`` and wait until the broker has
    them all; returns ``(records, bytes of values)``.

    Streams: ``events`` may be a generator of any length, and only the client's bounded
    send buffer is held (no future per record is kept; a failed send is counted by its
    errback and fails the whole call at the end). ``client``: ``kafka-python`` (the
    project's client) or ``confluent`` (confluent-kafka, when installed: about 10x the
    rate for small records, for producing large backlogs).
    """
    if client == "confluent":
        return _produce_confluent(bootstrap, topic, events)
    from kafka import KafkaProducer
    from tqdm import tqdm

    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="adacode-bench",
        acks=1,
        linger_ms=20,
        batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    failed: list[BaseException] = []
    count = size = 0
    try:
        bar = tqdm(total=total, desc=desc or f"produce {topic}", unit="msg", leave=False)
        for key, value in events:
            producer.send(topic, key=key, value=value).add_errback(failed.append)
            count += 1
            size += len(value)
            if count % 10_000 == 0:
                bar.update(10_000)
        bar.close()
        producer.flush(timeout=300)
    finally:
        producer.close(timeout=30)
    if failed:
        raise ProduceError(
            f"{len(failed)} of {count} records sent to {topic} failed (first: {failed[0]!r}); "
            "check the broker log"
        )
    return count, size


def confluent_available() -> bool:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return False
    return True


def _produce_confluent(
    bootstrap: str, topic: str, events: Iterable[tuple[bytes, bytes]]
) -> tuple[int, int]:
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "adacode-bench",
            "acks": 1,
            "linger.ms": 20,
            "batch.size": 1024 * 1024,
            "message.max.bytes": 8 * 1024 * 1024,
            "queue.buffering.max.kbytes": 128 * 1024,  # bounds this process's memory
        }
    )
    failed: list[object] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(err)

    count = size = 0
    for key, value in events:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)
        count += 1
        size += len(value)
        if count % 1000 == 0:
            producer.poll(0)
    left = producer.flush(300)
    if left or failed:
        raise ProduceError(
            f"{len(failed)} of {count} records sent to {topic} failed and {left} were never "
            f"delivered (first error: {failed[0] if failed else None!r}); check the broker log"
        )
    return count, size
