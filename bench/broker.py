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
from collections.abc import Iterator
from pathlib import Path

from adacode.errors import AdacodeError

log = logging.getLogger(__name__)

KAFKA_SH = Path(__file__).resolve().parent.parent / "ops" / "kafka.sh"


class BrokerStartError(AdacodeError):
    """ops/kafka.sh could not start a broker for the benchmark."""


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
