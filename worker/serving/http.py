"""The daemon's HTTP server: a router of routes to handlers, served on a background thread.

It knows no route itself: the daemon adds health, readiness and Prometheus metrics
(:mod:`worker.app.daemon`), :mod:`worker.serving.routes` the read API (``/v1``).
Standard library only (``http.server``), bound to 127.0.0.1 unless configured.
Routes are ``(method, regex) -> handler``; a handler returns a :class:`Response`.
Errors are JSON: ``{"error": "...", "detail": "..."}``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

log = logging.getLogger(__name__)


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, doc: Any) -> Response:
        return cls(status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))

    @classmethod
    def error(cls, status: int, error: str, detail: str) -> Response:
        return cls.json(status, {"error": error, "detail": detail})


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, re.compile(f"^{pattern}$"), handler))

    def dispatch(self, request: Request) -> Response:
        allowed = []
        for method, regex, handler in self.routes:
            match = regex.match(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            request.params = match.groupdict()
            try:
                return handler(request)
            except Exception as exc:  # a bug in one handler must not kill the server
                log.exception("handler for %s %s failed", request.method, request.path)
                return Response.error(500, "internal", f"{type(exc).__name__}: {exc}")
        if allowed:
            return Response.error(
                405, "method_not_allowed", f"{request.method} not allowed; use {', '.join(allowed)}"
            )
        return Response.error(404, "not_found", f"no route for {request.path}")


def _handler_class(router: Router) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body are two writes: without TCP_NODELAY, Nagle + delayed ACK add 40 ms
        disable_nagle_algorithm = True

        def _serve(self, method: str) -> None:
            path, _, qs = self.path.partition("?")
            query: dict[str, str] = {}
            for part in qs.split("&"):
                if part:
                    k, _, v = part.partition("=")
                    query[k] = v
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            request = Request(method, path, {}, query, body, dict(self.headers.items()))
            response = router.dispatch(request)
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return _Handler


class _Server(ThreadingHTTPServer):
    # the default listen backlog (5) drops connections when many clients connect at once
    request_queue_size = 128


class HttpServer:
    """Serves ``router`` on a background thread."""

    def __init__(self, router: Router, host: str, port: int) -> None:
        self.server = _Server((host, port), _handler_class(router))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()
        log.info("http server on http://%s:%d", *self.address)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
