"""Errors of the serving wing: reads that cannot be answered, each with its HTTP answer.

Each class carries the HTTP ``status`` and the ``error`` code of the JSON body the API
answers with (``{"error": code, "detail": message}``), so a route never decides a status
by reading a message::

    AdacodeError
    └── WorkerError
        └── ServingError               400 bad_request
            ├── BadRequestError        400 bad_request
            ├── UnknownDomainError     404 unknown_domain
            ├── UnknownItemError       404 unknown_item
            ├── NotServedError         409 no_version
            └── IndexBuildingError     503 index_building
"""

from __future__ import annotations

from worker.core.exceptions import WorkerError


class ServingError(WorkerError):
    """A read cannot be answered; ``status`` and ``code`` are its HTTP status and error name."""

    status = 400
    code = "bad_request"


class BadRequestError(ServingError):
    """A parameter or body of the request is invalid; the message names it."""

    status, code = 400, "bad_request"


class UnknownDomainError(ServingError):
    """No event of the domain has been applied on this worker."""

    status, code = 404, "unknown_domain"


class UnknownItemError(ServingError):
    """The item is not in the domain (or has no code yet)."""

    status, code = 404, "unknown_item"


class NotServedError(ServingError):
    """The domain exists but has no published version (or no index yet)."""

    status, code = 409, "no_version"


class IndexBuildingError(ServingError):
    """The index of the domain's current version is being built; retry shortly."""

    status, code = 503, "index_building"
