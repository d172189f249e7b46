"""The worker daemon (``python -m worker.commands.cli run``) in its own process.

One helper for everything that starts a worker it then watches: the demo, the
benches and the tests. :meth:`WorkerProcess.start` appends the worker's output to a
log file (closed in this process at once: the worker holds its own copy);
:meth:`~WorkerProcess.wait_http` and :meth:`~WorkerProcess.wait_until` wait while
watching that the worker is still alive, and fail with its exit status and the end of
its log if it is not; :meth:`~WorkerProcess.stop` asks it to stop (SIGTERM), waits,
and kills it if it outlives the timeout. As a context manager it is stopped on leaving
the block, on every path::

    with WorkerProcess.start(env, Path("worker.log"), cwd=repo) as worker:
        worker.wait_http(port, "/healthz", timeout_s=60)
        ...
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from worker.commands.exceptions import WorkerExitedError, WorkerTimeoutError

#: how much of the log an error quotes
LOG_TAIL_CHARS = 3000


class WorkerProcess:
    """A started worker process and its log file; see the module docstring."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self._stop_sent = False

    @classmethod
    def start(
        cls,
        env: Mapping[str, str],
        log_path: Path,
        *,
        args: Sequence[str] = (),
        cwd: Path | None = None,
        append: bool = True,
        launcher: Sequence[str] = ("-m", "worker.commands.cli"),
    ) -> WorkerProcess:
        """Start ``adacode run`` with ``env`` (its whole environment) and extra ``args``.

        Its stdout and stderr go to ``log_path``, appended to (or truncated first with
        ``append=False``); this process closes its handle once the worker has its own.
        ``launcher``: the interpreter arguments that run the CLI (a test may pass
        ``("-c", code, ...)`` to run code of its own first).
        """
        command = [sys.executable, *launcher, "run", *args]
        with log_path.open("ab" if append else "wb") as log:
            proc = subprocess.Popen(
                command, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT
            )
        return cls(proc, log_path)

    # -- the process ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        """The exit status if the worker has exited, else ``None``."""
        return self.proc.poll()

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM) without waiting; sent once, and only to a live one."""
        if not self._stop_sent and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._stop_sent = True

    def stop(self, timeout_s: float = 60.0) -> int:
        """Stop the worker and return its exit status (0: a clean stop).

        1. SIGTERM, unless it has exited or was already asked.
        2. Wait up to ``timeout_s`` seconds for it to exit.
        3. Still running: SIGKILL, and wait for that (the status is then ``-SIGKILL``).
        """
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL the worker (if it still runs) and return its exit status."""
        self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- waiting on it -------------------------------------------------------------------

    def wait_until(
        self, predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.25
    ) -> None:
        """Return once ``predicate()`` is true; fail if the worker exits or time runs out.

        Raises :class:`WorkerExitedError` or :class:`WorkerTimeoutError`, naming ``what``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise WorkerExitedError(
                    f"the worker exited with status {self.proc.returncode} before {what}",
                    self.proc.returncode,
                    self.log_tail(),
                )
            if predicate():
                return
            if time.monotonic() >= deadline:
                raise WorkerTimeoutError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}", None, self.log_tail()
                )
            time.sleep(poll_s)

    def wait_http(
        self, port: int, path: str = "/healthz", timeout_s: float = 120.0, host: str = "127.0.0.1"
    ) -> int:
        """Wait until the worker's HTTP server answers ``GET path`` with any status; that status.

        Fails like :meth:`wait_until` if the worker exits first or does not answer in time.
        """
        answered: list[int] = []

        def answers() -> bool:
            status = http_status(host, port, path)
            if status is not None:
                answered.append(status)
            return status is not None

        self.wait_until(answers, timeout_s, f"its HTTP server to answer GET {path} on port {port}")
        return answered[-1]

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters of the worker's log ("" if it has none yet)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


def http_status(host: str, port: int, path: str, timeout_s: float = 10.0) -> int | None:
    """The status of ``GET path``, or ``None`` if no HTTP server answered."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
