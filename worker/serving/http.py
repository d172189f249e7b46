"""The daemon's HTTP server: a router of routes to handlers, served by uvicorn + Starlette.

It knows no route itself: the daemon adds health, readiness and Prometheus metrics
(:mod:`worker.app.daemon`), :mod:`worker.serving.routes` the read API (``/v1``).
Routes are ``(method, path template) -> handler``, a template being a path with
``{name}`` segments; a handler takes a :class:`Request` and returns a :class:`Response`
(synchronous: it runs on the server's thread pool, or, where added ``inline``, on the event
loop itself). :meth:`Router.dispatch` calls the same handlers without HTTP (tests, benchmarks).

HTTP itself is uvicorn's (h11 parser) with Starlette's routing, on a background thread
bound to 127.0.0.1 unless configured. Every answer is JSON, errors
``{"error": "...", "detail": "..."}``:

* unknown path: 404; known path, other method: 405 with ``Allow`` (``HEAD`` is answered
  where ``GET`` is, ``OPTIONS`` with 204 and ``Allow``);
* a malformed request (bad ``Content-Length``, bad request line or header): 400
  ``bad_request``, an incomplete head past :data:`MAX_HEADER_BYTES` 431, then the
  connection is closed (uvicorn also logs a WARNING line, without traceback);
* a body past ``max_body_bytes``: 413 ``body_too_large``, decided from
  ``Content-Length`` before the body is read (or as a chunked body passes the limit),
  then the connection is closed without reading the rest;
* a request not complete ``read_timeout_s`` after its first byte: 408
  ``request_timeout``, closed; an idle connection (a new one too) is closed after
  ``keep_alive_s``;
* a handler that raises: 500 ``internal`` (logged with its traceback);
* more than :data:`MAX_CONNECTIONS` connections at once: uvicorn's own 503 (plain text).

A client that leaves mid-request or mid-response is logged at DEBUG; the server writes
nothing to stderr itself (uvicorn logs through the ``logging`` configuration of the
process: ``log_config=None``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker.core.threads import start_every_thread

log = logging.getLogger(__name__)

#: the largest request body by default (the ``http_max_body_bytes`` setting)
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: how long one request may take to arrive, head and body, from its first byte
DEFAULT_READ_TIMEOUT_S = 10.0
#: how long an idle connection (a new one, or between requests) is kept open
DEFAULT_KEEP_ALIVE_S = 5.0
#: request line + headers larger than this are a malformed request (h11's buffer limit)
MAX_HEADER_BYTES = 16 * 1024
#: connections + requests in flight past which uvicorn answers 503 (``limit_concurrency``)
MAX_CONNECTIONS = 512
#: pending connections the listening socket holds (the default 5 drops bursts)
BACKLOG = 128
#: how long :meth:`HttpServer.stop` lets requests in flight finish
GRACEFUL_STOP_S = 3.0
#: threads that run the request handlers by default (the ``http_threads`` setting)
DEFAULT_HANDLER_THREADS = 16


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, doc: Any) -> Response:
        return cls(status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))

    @classmethod
    def error(
        cls, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> Response:
        return cls(
            status, orjson.dumps({"error": error, "detail": detail}), headers=dict(headers or {})
        )


@dataclass
class Request:
    method: str
    path: str  # as sent (percent-escapes kept: handlers unquote their parameters)
    params: dict[str, str]
    query: dict[str, str]  # as sent, likewise
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # names lower-case over HTTP


Handler = Callable[[Request], Response]


def template_regex(path: str) -> str:
    """The regex of a path template: each ``{name}`` is one non-empty segment."""
    return re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)


class Router:
    """Routes ``(method, path template) -> handler``, in the order they were added."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._paths: dict[str, dict[str, Handler]] = {}
        self._inline: set[tuple[str, str]] = set()

    def add(self, method: str, path: str, handler: Handler, *, inline: bool = False) -> None:
        """``path``: a template such as ``/v1/domains/{domain}/versions``.

        ``inline``: the handler is quick and never blocks (in-memory reads, well under a
        millisecond of work), so the server calls it on its event loop instead of handing it
        to the thread pool. The hand-off there and back is two waits for the interpreter
        lock, each up to the switch interval while the consumer thread runs Python, and the
        pool's thread may first have to be started: what a scrape's tail was made of.
        """
        self.routes.append((method, re.compile(f"^{template_regex(path)}$"), handler))
        self._paths.setdefault(path, {})[method] = handler
        if inline:
            self._inline.add((path, method))

    def inline(self, path: str) -> set[str]:
        """The methods of ``path`` whose handlers run on the event loop."""
        return {method for p, method in self._inline if p == path}

    def paths(self) -> dict[str, dict[str, Handler]]:
        """Each path template with its handlers by method."""
        return {path: dict(methods) for path, methods in self._paths.items()}

    def dispatch(self, request: Request) -> Response:
        """Answer ``request`` as the server would, without HTTP (HEAD and OPTIONS aside)."""
        allowed = []
        for method, regex, handler in self.routes:
            match = regex.match(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            request.params = match.groupdict()
            return self.call(handler, request)
        if allowed:
            return method_not_allowed(request.method, allowed)
        return not_found(request.path)

    @staticmethod
    def call(handler: Handler, request: Request) -> Response:
        """``handler(request)``; a bug in one handler is a 500, not a dead server."""
        try:
            return handler(request)
        except Exception as exc:
            log.exception("handler for %s %s failed", request.method, request.path)
            return Response.error(500, "internal", f"{type(exc).__name__}: {exc}")


def not_found(path: str) -> Response:
    return Response.error(404, "not_found", f"no route for {path}")


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allow_header(methods: list[str]) -> str:
    """``methods`` in one order, whoever lists them (Starlette keeps a set)."""
    known = [m for m in _METHOD_ORDER if m in methods]
    return ", ".join(known + sorted(set(methods) - set(_METHOD_ORDER)))


def method_not_allowed(method: str, allowed: list[str]) -> Response:
    allow = allow_header(allowed)
    return Response.error(
        405, "method_not_allowed", f"{method} not allowed; use {allow}", {"Allow": allow}
    )


# -- the ASGI application -------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


def _starlette(response: Response, *, close: bool = False) -> StarletteResponse:
    headers = dict(response.headers)
    if close:
        headers["Connection"] = "close"
    return StarletteResponse(
        response.body, response.status, headers=headers, media_type=response.content_type
    )


def _query(raw: bytes) -> dict[str, str]:
    query: dict[str, str] = {}
    for part in raw.decode("latin-1").split("&"):
        if part:
            k, _, v = part.partition("=")
            query[k] = v
    return query


async def _read_body(request: StarletteRequest, limit: int) -> bytes:
    """The body, refused from ``Content-Length`` before a byte of it is read, or as soon
    as a chunked body passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:  # h11 has checked it is a number
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class HandlerPool:
    """The threads that run request handlers, every one started with the server.

    Starlette's ``run_in_threadpool`` (AnyIO's worker threads) starts a thread whenever
    every thread it has is busy, and lets a thread go after 10 s idle. Starting one blocks
    the event loop until the new thread runs (``Thread.start`` waits for it), and under load
    that wait is a wait for the interpreter: in the 1M-item bench a short slowdown made
    requests overlap, the loop started ~15 threads one after the other, and every request
    waited behind them (stalls of 250-600 ms at 200 requests/s). Here the threads are
    started once, before the first request, and live as long as the server: a burst waits
    in the pool's queue, never behind a thread start.
    """

    def __init__(self, threads: int = DEFAULT_HANDLER_THREADS) -> None:
        if threads < 1:
            raise ValueError(f"a handler pool needs at least one thread, got {threads}")
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start every thread now (:func:`worker.core.threads.start_every_thread`)."""
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(self.threads, thread_name_prefix="http-handler")
        start_every_thread(executor, self.threads)
        self._executor = executor

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on one of the pool's threads, awaited on the event loop."""
        if self._executor is None:
            raise RuntimeError("the handler pool is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def stop(self) -> None:
        """Let the threads go once the handlers they run return (nothing waits for them)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _endpoint(
    handlers: dict[str, Handler], inline: set[str], max_body_bytes: int, pool: HandlerPool
) -> Callable[[StarletteRequest], Any]:
    allow = allow_header([*handlers, *(["HEAD"] if "GET" in handlers else []), "OPTIONS"])

    async def endpoint(request: StarletteRequest) -> StarletteResponse:
        method = request.method
        if method == "OPTIONS":
            return StarletteResponse(status_code=204, headers={"Allow": allow})
        answering = "GET" if method == "HEAD" else method
        handler = handlers[answering]
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge:
            return _starlette(
                Response.error(
                    413,
                    "body_too_large",
                    f"the request body is larger than {max_body_bytes} bytes "
                    "(the http_max_body_bytes setting)",
                ),
                close=True,  # the rest of the body is not read
            )
        except ClientDisconnect:  # logged by the protocol (_Protocol.connection_lost)
            return StarletteResponse(status_code=400)  # nobody reads it
        scope = request.scope
        ours = Request(
            method,
            scope["path"],
            dict(request.path_params),
            _query(scope["query_string"]),
            body,
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        )
        if answering in inline:
            return _starlette(Router.call(handler, ours))
        return _starlette(await pool.run(Router.call, handler, ours))

    return endpoint


async def _http_error(request: StarletteRequest, exc: Exception) -> StarletteResponse:
    """Starlette's routing errors (404 unknown path, 405 other method) as our JSON."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _starlette(not_found(request.scope["path"]))
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return _starlette(
            method_not_allowed(request.method, [m.strip() for m in allowed.split(",")])
        )
    return _starlette(Response.error(exc.status_code, "http_error", str(exc.detail)))


def build_app(
    router: Router, max_body_bytes: int, pool: HandlerPool
) -> Callable[[Scope, Receive, Send], Any]:
    """The ASGI application serving ``router``'s routes as they are now; handlers that are
    not inline run on ``pool``'s threads."""
    routes = [
        StarletteRoute(
            path,
            _endpoint(handlers, router.inline(path), max_body_bytes, pool),
            methods=[*handlers, "OPTIONS"],
        )
        for path, handlers in router.paths().items()
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.router.redirect_slashes = False  # "/healthz/" is not found, as Router.dispatch says

    async def raw_paths(scope: Scope, receive: Receive, send: Send) -> None:
        # route on the path as sent, as Router.dispatch does: "a%2Fb" is one segment
        if scope["type"] == "http":
            scope["path"] = scope["raw_path"].decode("latin-1")
        await app(scope, receive, send)

    return raw_paths


# -- the HTTP protocol (uvicorn's h11 one, with a read timeout and JSON protocol errors) -----

_CLIENT_STATES = (h11.IDLE, h11.SEND_BODY)  # the client is sending (or about to send) a request


class _Connection(h11.Connection):
    """h11's connection, keeping the protocol error it raised (uvicorn drops it)."""

    error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error = exc
            raise


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus what it lacks:

    * a read timeout: a request must arrive whole within ``read_timeout_s`` of its
      first byte (else 408 and close), and a new connection that sends nothing is closed
      after the keep-alive timeout (uvicorn times out only idle kept-alive connections);
    * a malformed request is answered with our JSON error (uvicorn: plain text);
    * a client that leaves before its answer is complete is logged at DEBUG.
    """

    read_timeout_s = DEFAULT_READ_TIMEOUT_S
    _read_deadline: asyncio.TimerHandle | None = None
    _closed_by_us = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, MAX_HEADER_BYTES)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state in _CLIENT_STATES:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timeout)
        super().data_received(data)
        if self.conn.their_state not in _CLIENT_STATES:  # the request is complete (or bad)
            self._cancel_read_deadline()

    def on_response_complete(self) -> None:
        self._cancel_read_deadline()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        if not self._closed_by_us:
            # an answer is complete once written to the transport, which may still hold
            # (part of) it: writing stays paused until the transport's buffer drains
            unsent = self.flow is not None and self.flow.write_paused
            if unsent or (self.cycle is not None and not self.cycle.response_complete):
                log.debug("http: client %s left before its answer was complete", self._peer())
            elif self.conn.trailing_data[0]:
                log.debug("http: client %s left in the middle of a request", self._peer())
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        error = self.conn.error if isinstance(self.conn, _Connection) else None
        status = 400 if error is None else error.error_status_hint
        reason = str(error or msg).rstrip(".")
        log.debug("http: malformed request from %s: %s", self._peer(), reason)
        detail = f"malformed HTTP request ({reason}): check the request line, Content-Length "
        detail += f"and headers (at most {MAX_HEADER_BYTES} bytes in all)"
        phrase = "Request Header Fields Too Large" if status == 431 else "Bad Request"
        self._answer_and_close(status, phrase, "bad_request", detail)

    def _read_timeout(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in _CLIENT_STATES:
            return
        log.debug("http: client %s sent no complete request in time: 408", self._peer())
        detail = f"the request did not arrive whole within {self.read_timeout_s:g} s"
        self._answer_and_close(408, "Request Timeout", "request_timeout", detail)

    def _answer_and_close(self, status: int, reason: str, error: str, detail: str) -> None:
        """Answer outside the ASGI cycle (the request is unusable) and close."""
        self._closed_by_us = True
        if self.cycle is None or not self.cycle.response_started:
            body = orjson.dumps({"error": error, "detail": detail})
            self.transport.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
        self.transport.close()

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Made with ``IPPROTO_TCP`` (``socket.create_server`` leaves
    the protocol 0): asyncio sets ``TCP_NODELAY`` on accepted sockets only then, and
    without it a response's two writes (head, body) wait out Nagle + delayed ACK: 40 ms."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """Serves ``router`` on a background thread.

    The socket is bound here (so ``port=0`` gets a free port, :attr:`address` says which);
    the routes are read at :meth:`start`, so they may be added after construction.
    """

    def __init__(
        self,
        router: Router,
        host: str,
        port: int,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
        pool: HandlerPool | None = None,
    ) -> None:
        self.router = router
        self.pool = pool if pool is not None else HandlerPool()
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.keep_alive_s = keep_alive_s
        self.socket = _listen(host, port)
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return str(host), int(port)

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve the router's routes; returns once the server accepts connections."""
        protocol = type("Protocol", (_Protocol,), {"read_timeout_s": self.read_timeout_s})
        self.pool.start()
        config = uvicorn.Config(
            build_app(self.router, self.max_body_bytes, self.pool),
            http=protocol,
            loop="asyncio",
            ws="none",
            lifespan="off",
            log_config=None,  # log through the process's logging (our format)
            access_log=False,
            server_header=False,
            backlog=BACKLOG,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=self.keep_alive_s,  # type: ignore[arg-type]  # a float works
            timeout_graceful_shutdown=GRACEFUL_STOP_S,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.address} did not start")
            time.sleep(0.005)
        log.info("http server on http://%s:%d", *self.address)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (``GRACEFUL_STOP_S``), close."""
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=GRACEFUL_STOP_S + 5.0)
        self.pool.stop()
        self.socket.close()
