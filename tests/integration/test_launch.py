"""The worker launcher (``worker.commands.launch``) and ``adacode kafka`` outside a checkout."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.worker_process import REPO, STARTED, start_worker, worker_env
from worker.commands.exceptions import WorkerExitedError, WorkerTimeoutError
from worker.commands.launch import WorkerProcess


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_worker_that_exits_at_once_is_reported_with_its_status_and_log(tmp_path: Path) -> None:
    env = worker_env("127.0.0.1:1", "x.", tmp_path / "state", poll_max_records="zero")
    worker = start_worker(env, tmp_path / "w.log")
    with pytest.raises(WorkerExitedError) as caught:
        worker.wait_http(_free_port(), timeout_s=60)
    assert caught.value.returncode == 2
    assert "exited with status 2 before its HTTP server" in str(caught.value)
    assert "'poll_max_records'" in caught.value.log_tail  # the bad setting's message
    assert caught.value.log_tail in str(caught.value)
    assert worker.stop(timeout_s=5) == 2  # already gone: nothing to signal


def test_a_live_worker_answers_times_out_a_wait_and_stops_cleanly_on_leaving_the_block(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    port = _free_port()
    env = worker_env(kafka_bootstrap, topic_prefix, tmp_path / "state", http_port=port)
    log = tmp_path / "w.log"
    log.write_text("an earlier run\n")
    with WorkerProcess.start(env, log, cwd=REPO) as worker:
        STARTED.append(worker.proc)
        assert worker.wait_http(port, "/healthz", timeout_s=60) in (200, 503)
        with pytest.raises(WorkerTimeoutError) as caught:
            worker.wait_until(lambda: False, 0.5, "something that never happens")
        assert caught.value.returncode is None
        assert "waiting for something that never happens" in str(caught.value)
    assert worker.returncode == 0
    text = log.read_text()
    assert text.startswith("an earlier run\n")  # appended to
    assert "received SIGTERM" in text


@pytest.mark.parametrize("delay_s", [0.0, 0.3, 1.0])
def test_a_sigterm_while_the_fine_tune_warm_up_trains_exits_0_without_an_abort(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, delay_s: float
) -> None:
    """The warm-up trains a tiny model on a thread at start-up; a SIGTERM that lands while it
    is inside torch must still end the process with 0, not with torch's abort when the
    interpreter finalises under it (``terminate called without an active exception``)."""
    env = worker_env(kafka_bootstrap, topic_prefix, tmp_path / "state")
    log = tmp_path / "w.log"
    with WorkerProcess.start(env, log, cwd=REPO) as worker:
        STARTED.append(worker.proc)
        worker.wait_until(
            lambda: "fine-tune warm-up: training" in log.read_text(), 60, "the warm-up"
        )
        time.sleep(delay_s)
        assert worker.stop(timeout_s=30) == 0, worker.log_tail()
    text = log.read_text()
    assert "received SIGTERM" in text
    for sign in ("terminate called", "Traceback", "warm-up failed"):
        assert sign not in text, text[-3000:]


def test_adacode_kafka_outside_a_checkout_says_what_it_needs(tmp_path: Path) -> None:
    missing = tmp_path / "site-packages" / "ops" / "kafka.sh"
    program = (
        "import sys; from pathlib import Path; import worker.commands.cli as cli; "
        f"cli.KAFKA_SCRIPT = Path({str(missing)!r}); sys.exit(cli.main(['kafka', 'status']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"adacode kafka: error: {missing} does not exist"), out.stderr
    for needed in ("checkout", "ops/kafka.sh", "Java", "Maven", "kafka_bootstrap"):
        assert needed in out.stderr, (needed, out.stderr)
