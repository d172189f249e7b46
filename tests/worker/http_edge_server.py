"""A real API server in its own process, for tests/worker/test_http_edges.py.

``python -m tests.worker.http_edge_server READ_TIMEOUT_S KEEP_ALIVE_S MAX_BODY_BYTES``
serves the /v1 API (an empty store), the daemon's three routes and three test routes
(``/test/slow`` answers after a second, ``/test/big`` answers 16 MB, ``/test/size``
answers the size of the body it got), logging at DEBUG as JSON lines to stderr (the
worker's ``--log-format json``, so every stderr line must parse). It prints its address
on stdout and stops when stdin closes.
"""

from __future__ import annotations

import sys
import time

from store.memory import MemoryPartition
from worker.core.logs import setup_logging
from worker.core.settings import Settings
from worker.serving.http import HttpServer, Request, Response, Router
from worker.serving.index import Serving
from worker.serving.routes import ApiRoutes


def main() -> None:
    read_timeout_s, keep_alive_s, max_body = (
        float(sys.argv[1]),
        float(sys.argv[2]),
        int(sys.argv[3]),
    )
    setup_logging("json", "DEBUG")
    settings = Settings(http_port=0, admin_token="t0ken", embedding_dim=4)
    store = MemoryPartition()
    router = Router()
    router.add("GET", "/healthz", lambda _: Response.json(200, {"status": "ok"}))
    router.add("GET", "/readyz", lambda _: Response.json(503, {"ready": False}))
    router.add("GET", "/metrics", lambda _: Response(200, b"up 1\n", "text/plain; version=0.0.4"))
    ApiRoutes(Serving(store, settings), store, settings, lambda *_: None).register(router)
    router.add("GET", "/test/slow", _slow)
    router.add("GET", "/test/big", lambda _: Response(200, b"x" * (16 << 20), "text/plain"))
    router.add("POST", "/test/size", lambda r: Response.json(200, {"bytes": len(r.body)}))
    server = HttpServer(
        router,
        "127.0.0.1",
        0,
        max_body_bytes=max_body,
        read_timeout_s=read_timeout_s,
        keep_alive_s=keep_alive_s,
    )
    server.start()
    host, port = server.address
    print(f"{host} {port}", flush=True)
    sys.stdin.read()  # until the test closes it
    started = time.monotonic()
    server.stop()
    print(f"stopped {time.monotonic() - started:.3f}", flush=True)


def _slow(_: Request) -> Response:
    time.sleep(1.0)
    return Response.json(200, {"slow": True})


if __name__ == "__main__":
    main()
