"""HTTP edge cases against a real server in its own process, with raw sockets: every method
on known and unknown paths, malformed requests, oversized bodies, clients that leave or
dawdle; and the server's stderr, which must hold log lines only (no traceback). Then the
OpenAPI document: valid, and describing exactly the routes the daemon serves."""

from __future__ import annotations

import asyncio
import http.client
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from openapi_spec_validator import validate

from store.memory import MemoryPartition
from worker.app import daemon as daemon_module
from worker.app.daemon import Daemon
from worker.core.settings import Settings
from worker.ingest.consumer import LoopStats
from worker.serving.http import HandlerPool, HttpServer, Request, Response, Router
from worker.serving.routes import openapi_document

READ_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1.0
MAX_BODY = 4096
ROOT = Path(__file__).resolve().parents[2]
SERVER_ARGS = (READ_TIMEOUT_S, KEEP_ALIVE_S, MAX_BODY)
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def doc(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class EdgeServer:
    """The server process (tests/worker/http_edge_server.py) and its stderr file."""

    proc: subprocess.Popen[str]
    address: tuple[str, int]
    stderr: Path
    seen: int = 0  # stderr lines already checked
    debug: list[str] = field(default_factory=list)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every stderr line so far, each one of our JSON log lines (else the test fails)."""
        lines = self.stderr.read_text().splitlines()
        docs = []
        for line in lines:
            try:
                docs.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                raise AssertionError(f"stderr line outside the log format: {line!r}") from None
        return docs

    def check_stderr(self) -> list[dict[str, Any]]:
        """The new log lines since the last check; none is a traceback."""
        time.sleep(0.2)  # the server logs after it answered
        docs = self.log_lines()
        new = docs[self.seen :]
        self.seen = len(docs)
        for doc in new:
            assert "exc" not in doc and "Traceback" not in doc["msg"], doc
            assert doc["level"] in ("DEBUG", "INFO", "WARNING"), doc
        return new


def _start(tmp: Path) -> EdgeServer:
    stderr = tmp / "server.stderr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.worker.http_edge_server", *map(str, SERVER_ARGS)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr.open("w"),
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the server did not start: {stderr.read_text()[-2000:]}"
    host, port = line.split()
    return EdgeServer(proc, (host, int(port)), stderr)


def _stop(server: EdgeServer) -> float:
    """Close the server's stdin; returns how long its stop took (as it measured)."""
    assert server.proc.stdin is not None and server.proc.stdout is not None
    server.proc.stdin.close()
    out = server.proc.stdout.read()
    assert server.proc.wait(timeout=30) == 0
    return float(out.split()[-1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeServer]:
    s = _start(tmp_path_factory.mktemp("http-edges"))
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            _stop(s)


def _ask(sock: socket.socket, method: str, raw: bytes) -> Answer:
    """Send ``raw`` and read one answer (no body for HEAD, as HTTP says)."""
    sock.sendall(raw)
    return _read(sock, method)


def _read(sock: socket.socket, method: str = "GET") -> Answer:
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    body = resp.read()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def _request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Length: {len(body)}\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _assert_error(answer: Answer, status: int, error: str) -> dict[str, Any]:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["content-type"] == "application/json"
    doc = answer.doc
    assert doc["error"] == error and isinstance(doc["detail"], str) and doc["detail"], doc
    return dict(doc)


# -- methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_get_route_an_unknown_path_and_a_post_route(
    server: EdgeServer, method: str
) -> None:
    with server.connect() as sock:  # one keep-alive connection: none of these closes it
        known = _ask(sock, method, _request(method, "/healthz"))
        unknown = _ask(sock, method, _request(method, "/v1/nothing/here"))
        post_route = _ask(sock, method, _request(method, "/v1/domains/shop/recommend", b"{}"))
    if method in ("GET", "HEAD"):
        assert known.status == 200 and known.headers["content-type"] == "application/json"
        assert int(known.headers["content-length"]) == len(b'{"status":"ok"}')
        assert known.body == (b"" if method == "HEAD" else b'{"status":"ok"}')
    elif method == "OPTIONS":
        assert known.status == 204 and known.headers["allow"] == "GET, HEAD, OPTIONS"
        assert known.body == b""
    else:
        assert known.status == 405 and known.headers["allow"] == "GET, HEAD, OPTIONS"
        assert _assert_error(known, 405, "method_not_allowed")["detail"].startswith(method)
    if method == "HEAD":  # the same status and headers, no body
        assert unknown.status == 404 and unknown.body == b""
        assert post_route.status == 405 and post_route.headers["allow"] == "POST, OPTIONS"
    else:
        assert _assert_error(unknown, 404, "not_found")["detail"] == "no route for /v1/nothing/here"
    if method == "POST":  # the real handler: no such domain (the store is empty)
        assert _assert_error(post_route, 400, "bad_request")
    elif method == "OPTIONS":
        assert post_route.status == 204 and post_route.headers["allow"] == "POST, OPTIONS"
    elif method != "HEAD":
        _assert_error(post_route, 405, "method_not_allowed")
        assert post_route.headers["allow"] == "POST, OPTIONS"
    server.check_stderr()


def test_escaped_slashes_stay_in_their_segment_and_metrics_stay_prometheus_text(
    server: EdgeServer,
) -> None:
    with server.connect() as sock:
        answer = _ask(sock, "GET", _request("GET", "/v1/domains/a%2Fb/versions"))
        assert _assert_error(answer, 404, "unknown_domain")["detail"].count("a/b") == 1
        for path in ("/healthz/", "//healthz", "/v1/domains/", "*"):  # no redirect: not found
            _assert_error(_ask(sock, "GET", _request("GET", path)), 404, "not_found")
        metrics = _ask(sock, "GET", _request("GET", "/metrics"))
    assert metrics.status == 200 and metrics.body == b"up 1\n"
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    server.check_stderr()


# -- malformed requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /test/size HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        b"POST /test/size HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        b"POST /test/size HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"HELLO\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 needs Host
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS
    ],
)
def test_a_malformed_request_is_a_json_400_and_the_connection_closes(
    server: EdgeServer, raw: bytes
) -> None:
    with server.connect() as sock:
        answer = _ask(sock, "GET", raw)
        assert _closed(sock)
    assert "malformed HTTP request" in _assert_error(answer, 400, "bad_request")["detail"]
    logged = server.check_stderr()
    assert any("malformed request" in d["msg"] and d["level"] == "DEBUG" for d in logged)


def test_headers_past_the_limit_are_a_431(server: EdgeServer) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000)
        answer = _read(sock)
    _assert_error(answer, 431, "bad_request")
    server.check_stderr()


# -- bodies ---------------------------------------------------------------------------------------


def test_a_body_within_the_limit_is_read_whole_chunked_or_not(server: EdgeServer) -> None:
    body = b"x" * MAX_BODY
    with server.connect() as sock:
        assert _ask(sock, "POST", _request("POST", "/test/size", body)).doc == {"bytes": MAX_BODY}
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:1000], body[1000:]))
        raw = _request("POST", "/test/size", Transfer_Encoding="chunked") + chunked + b"0\r\n\r\n"
        raw = raw.replace(b"Content-Length: 0\r\n", b"")
        assert _ask(sock, "POST", raw).doc == {"bytes": MAX_BODY}
    server.check_stderr()


def test_a_body_over_the_limit_is_a_413_before_it_is_read(server: EdgeServer) -> None:
    """10 MB declared, 1 KB sent: the 413 comes at once (the server did not wait for the
    body), the connection is closed, and the rest cannot be sent."""
    head = b"POST /test/size HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n"
    with server.connect() as sock:
        started = time.monotonic()
        answer = _ask(sock, "POST", head + b"x" * 1024)
        assert time.monotonic() - started < READ_TIMEOUT_S / 2
        doc = _assert_error(answer, 413, "body_too_large")
        assert str(MAX_BODY) in doc["detail"] and answer.headers["connection"] == "close"
        with pytest.raises(OSError):  # closed: 10 MB do not go through
            for _ in range(10 * 16):
                sock.sendall(b"x" * 65536)
    server.check_stderr()


def test_a_chunked_body_over_the_limit_is_a_413_as_it_passes_the_limit(
    server: EdgeServer,
) -> None:
    raw = b"POST /test/size HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    with server.connect() as sock:
        sock.sendall(raw + b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(5)))
        _assert_error(_read(sock, "POST"), 413, "body_too_large")
        assert _closed(sock)
    server.check_stderr()


# -- clients that leave or dawdle ---------------------------------------------------------------


def test_clients_that_leave_mid_request_or_mid_response_are_a_debug_line(
    server: EdgeServer,
) -> None:
    with server.connect() as sock:  # mid-request: half the declared body
        sock.sendall(b"POST /test/size HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nhalf")
        time.sleep(0.1)
    with server.connect() as sock:  # mid-head
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        time.sleep(0.1)
    with server.connect() as sock:  # before the answer: the handler takes a second
        sock.sendall(_request("GET", "/test/slow"))
        time.sleep(0.1)
    with server.connect() as sock:  # mid-response: 16 MB, 64 KB read
        sock.sendall(_request("GET", "/test/big"))
        sock.recv(65536)
    time.sleep(1.5)  # the slow handler answers to nobody
    with server.connect() as sock:  # with a reset (SO_LINGER 0) instead of a close
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(_request("GET", "/test/big"))
        sock.recv(1024)
    deadline = time.monotonic() + 10  # the last one is logged once the server sees the reset
    while len(_left(server.log_lines()[server.seen :])) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _left(server.check_stderr())  # and no traceback, no line outside the log format
    # one line per client gone; under load the slow handler's client can be seen gone before
    # its answer is due, and uvicorn then drops the answer without a write to log about
    assert 4 <= len(left) <= 5 and all(d["level"] == "DEBUG" for d in left), left
    with server.connect() as sock:  # and the server still answers
        assert _ask(sock, "GET", _request("GET", "/healthz")).status == 200


def _left(logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in logged if "left" in d["msg"]]


def test_a_slow_request_is_a_408_after_the_read_timeout(server: EdgeServer) -> None:
    for partial in (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n",  # the head never ends
        b"POST /test/size HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n1234",  # nor body
    ):
        with server.connect() as sock:
            started = time.monotonic()
            answer = _ask(sock, "GET", partial)
            waited = time.monotonic() - started
            assert _closed(sock)
        _assert_error(answer, 408, "request_timeout")
        assert READ_TIMEOUT_S * 0.9 < waited < READ_TIMEOUT_S + 2, waited
    server.check_stderr()


def test_a_dribbling_client_is_timed_out_from_its_first_byte(server: EdgeServer) -> None:
    """A byte every 0.2 s keeps no deadline alive: the request must be whole in time."""
    with server.connect() as sock:
        started = time.monotonic()
        sock.settimeout(0.2)
        got = b""
        for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"z" * 100:
            try:
                sock.sendall(bytes([byte]))
                got += sock.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        waited = time.monotonic() - started
    assert b"408 Request Timeout" in got and waited < READ_TIMEOUT_S + 2, (got, waited)
    server.check_stderr()


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(server: EdgeServer) -> None:
    for used in (False, True):
        with server.connect() as sock:
            if used:
                assert _ask(sock, "GET", _request("GET", "/healthz")).status == 200
            started = time.monotonic()
            sock.settimeout(KEEP_ALIVE_S + 5)
            assert sock.recv(1) == b""  # closed without an answer
            assert KEEP_ALIVE_S * 0.8 < time.monotonic() - started < KEEP_ALIVE_S + 2
    server.check_stderr()


def test_the_server_stops_within_seconds_with_requests_in_flight(tmp_path: Path) -> None:
    s = _start(tmp_path)
    socks = [s.connect() for _ in range(3)]
    socks[0].sendall(_request("GET", "/test/slow"))  # in flight: answered before the stop
    socks[1].sendall(b"GET /healthz HTTP/1.1\r\n")  # half a request
    time.sleep(0.2)
    took = _stop(s)
    assert took < 5.0, took
    assert _read(socks[0]).status == 200
    for sock in socks:
        assert _closed(sock)
        sock.close()
    s.check_stderr()


def test_inline_routes_answer_on_the_event_loop_while_the_pool_is_taken(
    tmp_path: Path,
) -> None:
    """An inline handler (the daemon's /metrics and /healthz) runs on the server's own
    thread: it answers while every thread of the pool waits in a slow handler, a pool route
    waits with them, and HEAD and a failing inline handler are answered as everywhere."""
    release = threading.Event()
    router = Router()

    def held(_: Request) -> Response:
        release.wait(30)
        return Response.json(200, {"thread": threading.current_thread().name})

    def where(_: Request) -> Response:
        return Response.json(200, {"thread": threading.current_thread().name})

    def broken(_: Request) -> Response:
        raise RuntimeError("inline bug")

    router.add("GET", "/held", held)
    router.add("GET", "/pool", where)
    router.add("GET", "/inline", where, inline=True)
    router.add("GET", "/broken", broken, inline=True)
    server = HttpServer(router, "127.0.0.1", 0)
    server.start()
    host, port = server.address
    pool = server.pool.threads  # every handler thread, started with the server

    def get(path: str, method: str = "GET", timeout: float = 10.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            connection.request(method, path)
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()

    holders = [
        threading.Thread(target=get, args=("/held",), kwargs={"timeout": 30}) for _ in range(pool)
    ]
    waiting: list[tuple[int, bytes]] = []
    try:
        for holder in holders:
            holder.start()
        time.sleep(0.5)  # every thread of the pool now waits in /held
        behind = threading.Thread(target=lambda: waiting.append(get("/pool", timeout=30)))
        behind.start()
        status, body = get("/inline", timeout=5)
        assert status == 200
        assert orjson.loads(body)["thread"] == "http"  # the server's thread, not the pool's
        assert get("/inline", "HEAD", timeout=5) == (200, b"")
        status, body = get("/broken", timeout=5)
        assert status == 500 and orjson.loads(body)["error"] == "internal"
        time.sleep(0.2)
        assert not waiting  # the pool route waits for a thread of the pool
    finally:
        release.set()
        for holder in holders:
            holder.join(30)
        server.stop()
    behind.join(30)
    assert waiting and waiting[0][0] == 200
    assert orjson.loads(waiting[0][1])["thread"] != "http"


def _handler_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("http-handler")}


def test_handler_threads_all_start_with_the_server_and_a_burst_starts_none() -> None:
    """Every handler thread exists once the server has started; a burst of more slow
    requests than threads queues for them and starts no thread (a thread started on the
    event loop blocks it until the thread runs: every request waited behind such starts);
    the handlers ran on the pool's threads, and a stop lets them go."""
    router = Router()
    ran: set[threading.Thread] = set()
    lock = threading.Lock()

    def slow(_: Request) -> Response:
        with lock:
            ran.add(threading.current_thread())
        time.sleep(0.05)
        return Response.json(200, {})

    router.add("GET", "/slow", slow)
    before = _handler_threads()
    server = HttpServer(router, "127.0.0.1", 0, pool=HandlerPool(4))
    server.start()
    try:
        started = _handler_threads() - before
        assert len(started) == 4
        host, port = server.address

        def get() -> int:
            connection = http.client.HTTPConnection(host, port, timeout=30)
            try:
                connection.request("GET", "/slow")
                answer = connection.getresponse()
                answer.read()
                return answer.status
            finally:
                connection.close()

        statuses: list[int] = []
        burst = [threading.Thread(target=lambda: statuses.append(get())) for _ in range(24)]
        for client in burst:
            client.start()
        for client in burst:
            client.join(30)
        assert statuses == [200] * 24
        assert _handler_threads() - before == started  # the same four, no other started
        assert ran == started
    finally:
        server.stop()
    deadline = time.monotonic() + 5
    while _handler_threads() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _handler_threads() - before


def test_a_handler_pool_needs_a_thread_and_runs_nothing_before_it_starts() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        HandlerPool(0)

    async def call() -> object:
        return await HandlerPool(2).run(lambda: 1)

    with pytest.raises(RuntimeError, match="not started"):
        asyncio.run(call())


# -- the OpenAPI document -----------------------------------------------------------------------


class _Loop:
    """Stands in for the consumer loop (which connects to Kafka): the daemon's routes only."""

    def __init__(self, settings: Settings, *_: Any, stop_event: threading.Event, **__: Any) -> None:
        self.assigned: set[Any] = set()
        self.healthy = True
        self.stats = LoopStats()
        self.versions_lock = threading.RLock()
        self.owns = lambda _domain: False


def test_the_openapi_document_is_valid_and_describes_every_route_the_daemon_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(daemon_module, "ConsumerLoop", _Loop)
    daemon = Daemon(Settings(http_port=0, embedding_dim=8), store=MemoryPartition())
    server = HttpServer(daemon.router, "127.0.0.1", 0)
    server.start()
    try:
        conn = http.client.HTTPConnection(*server.address, timeout=10)
        conn.request("GET", "/v1/openapi.json")
        resp = conn.getresponse()
        doc = orjson.loads(resp.read())
        conn.close()
    finally:
        server.stop()
        daemon.store.close()
    assert resp.status == 200 and doc == openapi_document()
    validate(doc)  # raises on an invalid document
    served = {(m, p) for p, methods in daemon.router.paths().items() for m in methods}
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == described
    for path, ops in doc["paths"].items():  # a body can always be too large
        for method, op in ops.items():
            if "requestBody" in op:
                assert "413" in op["responses"], (method, path)
