"""Shared fixtures: one real Kafka broker per test session, never a mock.

Where the broker comes from, first match wins:

1. ``ADACODE_TEST_BOOTSTRAP`` is set (``ops/test.sh`` sets it): use that broker.
2. A Docker engine answers: start testcontainers' ``KafkaContainer`` (KRaft mode).
3. Otherwise: ``ops/kafka.sh up`` on free ports with a temporary data dir (needs Java; the jars
   are fetched once by ``ops/kafka.sh fetch``), stopped at session end.

If none works the fixture fails with the reasons; integration tests are never skipped.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient

from tests.kafka_utils import CLIENT_ID, KafkaTestSupportError, wait_until_answers

REPO_DIR = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO_DIR / "ops" / "kafka.sh"
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
# Confluent Platform 7.9 ships Apache Kafka 3.9, the version ops/kafka.sh runs.
DEFAULT_KAFKA_IMAGE = "confluentinc/cp-kafka:7.9.1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration as ``integration``."""
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


def _docker_answers() -> bool:
    try:
        probe = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _log(message: str) -> None:
    print(f"[kafka fixture] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a running Kafka 3.9 broker, shared by the whole session."""
    given = os.environ.get("ADACODE_TEST_BOOTSTRAP", "").strip()
    if given:
        problem = ""
        try:
            wait_until_answers(given, timeout_s=30.0)
        except KafkaTestSupportError as exc:
            problem = str(exc)
        if problem:
            pytest.fail(
                f"ADACODE_TEST_BOOTSTRAP={given} does not answer: {problem}. Start that broker "
                "or unset ADACODE_TEST_BOOTSTRAP to let the tests start one.",
                pytrace=False,
            )
        yield given
        return

    failures: list[str] = []
    started = time.monotonic()
    if _docker_answers():
        container: Any = None
        try:
            try:
                from testcontainers.community.kafka import KafkaContainer
            except ImportError:  # testcontainers < 4.10 kept it at the top level
                from testcontainers.kafka import KafkaContainer

            image = os.environ.get("ADACODE_TEST_KAFKA_IMAGE", DEFAULT_KAFKA_IMAGE)
            container = KafkaContainer(image).with_kraft().start(timeout=180)
            bootstrap = str(container.get_bootstrap_server())
            wait_until_answers(bootstrap, timeout_s=30.0)
        except Exception as exc:
            failures.append(f"testcontainers KafkaContainer: {exc!r}")
            if container is not None:
                container.stop()
        else:
            _log(f"docker broker {bootstrap} up in {time.monotonic() - started:.1f}s")
            try:
                yield bootstrap
            finally:
                container.stop()
            return
    else:
        failures.append("docker: no Docker engine answers `docker info`")

    port, controller_port = _free_ports(2)
    data_dir = tmp_path_factory.mktemp("kafka")
    where = [
        "--port",
        str(port),
        "--controller-port",
        str(controller_port),
        "--data",
        str(data_dir),
    ]
    up = subprocess.run(
        ["bash", str(KAFKA_SH), "up", *where],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        if up.returncode != 0:
            failures.append(
                f"ops/kafka.sh up exited {up.returncode}:\n{up.stdout}{up.stderr}".rstrip()
            )
            pytest.fail(
                "no Kafka broker for the tests. Tried:\n- "
                + "\n- ".join(failures)
                + "\nFix: run ./ops/test.sh (starts one), or `./ops/kafka.sh up` and set "
                "ADACODE_TEST_BOOTSTRAP=127.0.0.1:9092, or install Java 11+ (and Maven for the "
                "first `ops/kafka.sh fetch`).",
                pytrace=False,
            )
        bootstrap = f"127.0.0.1:{port}"
        _log(f"ops/kafka.sh broker {bootstrap} up in {time.monotonic() - started:.1f}s")
        yield bootstrap
    finally:
        subprocess.run(
            ["bash", str(KAFKA_SH), "down", *where],
            capture_output=True,
            timeout=120,
            check=False,
        )


@pytest.fixture
def topic_prefix() -> str:
    """A prefix unique to this test, e.g. ``t1a2b3c4d.``: topic names never collide."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    """A kafka-python admin client on the session broker, closed after the test."""
    client = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id=CLIENT_ID)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _no_worker_left_behind() -> Iterator[None]:
    """Kill worker processes a failed test left running (they would outlive the broker)."""
    from tests.worker_process import STARTED

    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def _worker_info_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """In integration tests the worker's INFO lines (assignments, code rounds, fine-tunes)
    are kept with the test's captured log, so a failure's report says what the worker did
    (the root logger passes only warnings; kafka-python's INFO lines stay out)."""
    if request.node.get_closest_marker("integration") is None:
        yield
        return
    logger = logging.getLogger("worker")
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(before)
