"""The read API (``/v1``): HTTP handlers over :mod:`worker.serving.index` and its OpenAPI document.

Every route is declared once in :data:`ROUTES` (method, path template, handler, the
status codes it may answer); the router and the OpenAPI document are both made
from it, so they cannot disagree. Errors are ``{"error": name, "detail": text}``.

Admin routes (rollback) need ``Authorization: Bearer <admin_token>``; with an empty
``admin_token`` they answer 403. A rollback is not applied here: the daemon's
consumer owns the state, so the command goes to the control topic (as ``adacode
rollback`` does while the worker runs) and is applied in order with the next
batch; the answer is 202 with what was sent.
"""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import faiss
import orjson

from store.partition import StorePartition
from worker.core.settings import Settings
from worker.serving.exceptions import BadRequestError, ServingError, UnknownItemError
from worker.serving.http import Request, Response, Router
from worker.serving.index import DomainIndex, Neighbour, Serving, version_vector
from worker.state.exceptions import VersionError
from worker.state.requests import pending_request_doc
from worker.state.users import recent_items
from worker.state.versions import PUBLISHED, current_version, list_records, switches

MAX_K = 1000
DEFAULT_K = 10

#: Sends a control command: ``(op, domain, fields)``; raises on failure.
SendControl = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI template, e.g. /v1/domains/{domain}/versions
    handler: str  # method name of ApiRoutes
    summary: str
    statuses: tuple[int, ...]
    query: tuple[tuple[str, str, str], ...] = ()  # (name, type, description)
    body: str | None = None  # schema name of the JSON body
    admin: bool = False


_K = ("k", "integer", f"how many items, 1..{MAX_K} (default {DEFAULT_K})")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/openapi.json", "openapi", "this document", (200,)),
    Route("GET", "/v1/domains", "list_domains", "domains served now", (200,)),
    Route(
        "GET",
        "/v1/domains/{domain}/items/{item_id}/vector",
        "vector",
        "an item's vector in the current version (or ?version=V)",
        (200, 400, 404, 409, 503),
        query=(("version", "integer", "a stored version (default: the current one)"),),
    ),
    Route(
        "GET",
        "/v1/domains/{domain}/items/{item_id}/similar",
        "similar",
        "the items closest to an item (cosine)",
        (200, 400, 404, 409, 503),
        query=(_K,),
    ),
    Route(
        "POST",
        "/v1/domains/{domain}/recommend",
        "recommend",
        "the next items for a history of item ids",
        (200, 400, 404, 409, 503),
        body="RecommendRequest",
    ),
    Route(
        "GET",
        "/v1/domains/{domain}/users/{user_id}/recommend",
        "user_recommend",
        "the next items for a user, from the user's stored recent items",
        (200, 400, 404, 409, 503),
        query=(_K, ("exclude_history", "boolean", "leave out items the user had (default true)")),
    ),
    Route(
        "GET",
        "/v1/domains/{domain}/versions",
        "versions",
        "the domain's versions, the current one and every switch",
        (200, 404),
    ),
    Route(
        "POST",
        "/v1/domains/{domain}/rollback",
        "rollback",
        "switch to an earlier published version (admin; applied with the worker's next batch)",
        (202, 400, 401, 403, 404, 409, 503),
        body="RollbackRequest",
        admin=True,
    ),
)

#: Routes the daemon serves itself (described in the same document).
DAEMON_ROUTES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("/healthz", "liveness: the consumer loop is running", (200, 503)),
    (
        "/readyz",
        "readiness: partitions are assigned and every domain with a current version has "
        "its serving index loaded (503 with what is missing otherwise)",
        (200, 503),
    ),
    ("/metrics", "Prometheus metrics", (200,)),
)


_thread_state = threading.local()


def _single_threaded_search() -> None:
    """Make faiss search with one OpenMP thread in the calling (HTTP handler) thread.

    OpenMP settings are per thread: ``faiss.omp_set_num_threads(1)`` in the daemon's main
    thread leaves every thread started later at the default (one OpenMP thread per core).
    A single query then wakes a second OpenMP thread that competes with the other requests
    for the cores; on a busy 2-core machine that wake-up was the p99 (tens of ms for a
    0.1 ms search). Called with every request; only a thread's first call sets it.
    """
    if not getattr(_thread_state, "ready", False):
        faiss.omp_set_num_threads(1)
        _thread_state.ready = True


def _k(query: dict[str, str]) -> int:
    raw = query.get("k", str(DEFAULT_K))
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        raise BadRequestError(f"k={raw!r} is not valid; give an integer from 1 to {MAX_K}")
    return k


def _flag(query: dict[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise BadRequestError(f"{name}={raw!r} is not valid; give true or false")


def _json_body(request: Request) -> dict[str, Any]:
    try:
        doc = orjson.loads(request.body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the request body is not JSON ({exc}); send a JSON object") from exc
    if not isinstance(doc, dict):
        raise BadRequestError("the request body must be a JSON object")
    return doc


def _items(found: list[Neighbour]) -> list[dict[str, Any]]:
    return [{"item_id": n.item_id, "score": round(n.score, 6)} for n in found]


class ApiRoutes:
    """The ``/v1`` handlers of one daemon."""

    def __init__(
        self,
        serving: Serving,
        store: StorePartition,
        settings: Settings,
        send_control: SendControl,
    ) -> None:
        self.serving = serving
        self.store = store
        self.settings = settings
        self.send_control = send_control

    def register(self, router: Router) -> None:
        for route in ROUTES:
            router.add(route.method, route.path, self._wrap(route))

    def _wrap(self, route: Route) -> Callable[[Request], Response]:
        handler: Callable[[Request], Response] = getattr(self, route.handler)

        def serve(request: Request) -> Response:
            _single_threaded_search()
            request.params = {k: unquote(v) for k, v in request.params.items()}
            request.query = {k: unquote(v.replace("+", " ")) for k, v in request.query.items()}
            try:
                if route.admin:
                    denied = self._authorize(request)
                    if denied is not None:
                        return denied
                return handler(request)
            except ServingError as exc:
                return Response.error(exc.status, exc.code, str(exc))

        return serve

    def _authorize(self, request: Request) -> Response | None:
        token = self.settings.admin_token
        if not token:
            return Response.error(
                403,
                "admin_disabled",
                "admin endpoints are off: set the admin_token setting (ADACODE_ADMIN_TOKEN or "
                "--admin-token) and send 'Authorization: Bearer <token>'",
            )
        given = request.headers.get("Authorization") or request.headers.get("authorization") or ""
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
            return Response.error(
                401, "unauthorized", "send 'Authorization: Bearer <admin_token>' with this request"
            )
        return None

    # -- handlers -------------------------------------------------------------------------

    def openapi(self, _: Request) -> Response:
        return Response.json(200, openapi_document())

    def list_domains(self, _: Request) -> Response:
        return Response.json(
            200,
            {
                "domains": [
                    {
                        "domain": d,
                        "version": ix.version,
                        "items": len(ix),
                        "index": ix.kind,
                        "live_codes": ix.foreign_codes is None,
                    }
                    for d, ix in sorted(self.serving.domains().items())
                ]
            },
        )

    def vector(self, request: Request) -> Response:
        domain, item = request.params["domain"], request.params["item_id"]
        index = self.serving.index(domain)
        raw = request.query.get("version")
        if raw is not None and raw != str(index.version):
            try:
                version = int(raw)
            except ValueError as exc:
                raise BadRequestError(f"version={raw!r} is not an integer") from exc
            if not 1 <= version < 2**63:
                raise BadRequestError(
                    f"version={raw!r} is out of range; versions are numbered from 1 "
                    "(see GET /v1/domains/{domain}/versions)"
                )
            try:
                vec = version_vector(
                    self.store, domain, version, item, borrow=self.settings.serve_borrow_trained
                )
            except VersionError as exc:
                return Response.error(404, "unknown_version", str(exc))
        else:
            version, vec = index.version, index.vector(item)
        return Response.json(
            200,
            {
                "domain": domain,
                "item_id": item,
                "version": version,
                "dim": int(vec.shape[0]),
                "vector": vec,
            },
        )

    def similar(self, request: Request) -> Response:
        domain, item = request.params["domain"], request.params["item_id"]
        k = _k(request.query)
        index = self.serving.index(domain)
        found = index.similar(item, k)
        return self._answer(index, {"item_id": item, "k": k, "items": _items(found)})

    def recommend(self, request: Request) -> Response:
        domain = request.params["domain"]
        doc = _json_body(request)
        history = doc.get("history")
        if (
            not isinstance(history, list)
            or not history
            or not all(isinstance(h, str) for h in history)
        ):
            raise BadRequestError('"history" must be a non-empty list of item ids (strings)')
        k = doc.get("k", DEFAULT_K)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise BadRequestError(f'"k"={k!r} is not valid; give an integer from 1 to {MAX_K}')
        exclude = doc.get("exclude_history", True)
        if not isinstance(exclude, bool):
            raise BadRequestError('"exclude_history" must be true or false')
        index = self.serving.index(domain)
        found, unknown = index.recommend(history, k, exclude)
        return self._answer(index, {"k": k, "items": _items(found), "unknown_history": unknown})

    def user_recommend(self, request: Request) -> Response:
        domain, user = request.params["domain"], request.params["user_id"]
        k = _k(request.query)
        exclude = _flag(request.query, "exclude_history", True)
        index = self.serving.index(domain)
        recent = recent_items(self.store, domain, user)
        if not recent:
            hint = (
                "the per-user index is off (user_history_len=0)"
                if not self.settings.user_history_len
                else "no interaction of this user was consumed"
            )
            raise UnknownItemError(f"user {user!r} has no stored items in {domain!r}: {hint}")
        history = [item for _, item in recent]
        found, unknown = index.recommend(history, k, exclude)
        return self._answer(
            index,
            {
                "user_id": user,
                "k": k,
                "history_len": len(history),
                "items": _items(found),
                "unknown_history": unknown,
            },
        )

    def versions(self, request: Request) -> Response:
        domain = request.params["domain"]
        self.serving.require_domain(domain)
        records = list_records(self.store, domain)
        served = self.serving.domains().get(domain)
        return Response.json(
            200,
            {
                "domain": domain,
                "current": current_version(self.store, domain),
                "served": None
                if served is None
                else {
                    "version": served.version,
                    "items": len(served),
                    "index": served.kind,
                    # false after a codebook retrain, until a version of the new one is
                    # published: the version serves its own items only (see "why")
                    "live_codes": served.foreign_codes is None,
                    "why": served.foreign_codes,
                },
                "versions": [r.__dict__ for r in records],
                "switches": switches(self.store, domain),
                "pending_finetune": pending_request_doc(self.store, domain),
            },
        )

    def rollback(self, request: Request) -> Response:
        domain = request.params["domain"]
        doc = _json_body(request)
        to, previous = doc.get("to"), doc.get("previous", False)
        if not isinstance(previous, bool) or (
            to is not None and (isinstance(to, bool) or not isinstance(to, int))
        ):
            raise BadRequestError('give {"to": <version number>} or {"previous": true}')
        if (to is None) == (not previous):
            raise BadRequestError('give exactly one of {"to": <version>} or {"previous": true}')
        self.serving.require_domain(domain)
        records = list_records(self.store, domain)
        current = current_version(self.store, domain)
        servable = sorted(r.version for r in records if r.status == PUBLISHED)
        target = to
        if previous:
            older = [v for v in servable if current is None or v < current]
            target = older[-1] if older else None
        if target is None or target not in servable:
            return Response.error(
                409,
                "not_servable",
                f"cannot roll {domain!r} back to {to if to is not None else 'the previous version'}"
                f"; servable versions: {servable or 'none'} (current {current})",
            )
        fields = {"version": target, "previous": False}
        try:
            self.send_control("rollback", domain, fields)
        except Exception as exc:
            return Response.error(
                503, "control_unavailable", f"could not send the rollback command: {exc}"
            )
        return Response.json(
            202,
            {
                "sent": {"op": "rollback", "domain": domain, **fields},
                "topic": self.settings.topic("control"),
                "from": current,
                "detail": "applied with the worker's next batch; follow it at "
                f"/v1/domains/{domain}/versions",
            },
        )

    @staticmethod
    def _answer(index: DomainIndex, doc: dict[str, Any]) -> Response:
        return Response.json(200, {"domain": index.domain, "version": index.version, **doc})


# -- OpenAPI ----------------------------------------------------------------------------------

_ERROR = {"$ref": "#/components/schemas/Error"}
_REASONS = {
    200: "OK",
    202: "accepted: sent to the control topic",
    400: "bad request (k, body, version)",
    401: "missing or wrong bearer token",
    403: "admin endpoints are disabled (admin_token is empty)",
    404: "unknown domain, item, user or version",
    409: "the domain has no servable version",
    413: "the request body is larger than the http_max_body_bytes setting",
    503: "not available yet (index being built, Kafka down)",
}


def route_statuses(route: Route) -> tuple[int, ...]:
    """What ``route`` may answer: its own statuses, and 413 where it takes a body."""
    return (*route.statuses, 413) if route.body is not None else route.statuses


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 description of every route (``/v1`` and the daemon's own)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        params = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in re.findall(r"\{(\w+)\}", route.path)
        ] + [
            {"name": n, "in": "query", "required": False, "schema": {"type": t}, "description": d}
            for n, t, d in route.query
        ]
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler,
            "parameters": params,
            "responses": {
                str(s): {
                    "description": _REASONS[s],
                    "content": {"application/json": {"schema": _ERROR if s >= 400 else {}}},
                }
                for s in route_statuses(route)
            },
        }
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}
                },
            }
        if route.admin:
            op["security"] = [{"bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = op
    for path, summary, statuses in DAEMON_ROUTES:
        paths[path] = {
            "get": {
                "summary": summary,
                "operationId": path.strip("/"),
                "responses": {str(s): {"description": _REASONS[s]} for s in statuses},
            }
        }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "adacode worker API",
            "version": "1",
            "description": "Item vectors, similar items and recommendations from each "
            "domain's current version; new items are served as soon as they are coded.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                },
                "RecommendRequest": {
                    "type": "object",
                    "required": ["history"],
                    "properties": {
                        "history": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
                        "exclude_history": {"type": "boolean", "default": True},
                    },
                },
                "RollbackRequest": {
                    "type": "object",
                    "properties": {
                        "to": {"type": "integer"},
                        "previous": {"type": "boolean"},
                    },
                },
            },
        },
    }
