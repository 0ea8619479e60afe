"""The directory's error tree: what went wrong, with the status and code the contract gives it.

Plain exceptions (no HTTP framework): the domain, the stores and the
operations raise them; the HTTP edge (``directory.http.edge.error_response``)
turns one into the contract's body ``{"error": {"code", "message"}}`` with
the status carried by the exception::

    ApiError(status, code, message, retry_after=None)
      Unauthorized          401  credentials missing or wrong
      BadRequest            400  invalid input (ids, JSON, fields, types)
      Forbidden             403  authenticated but not allowed
      NotFound              404
      Conflict              409
      Unavailable           503  always with Retry-After

Database driver errors are translated to ``Unavailable("database_unavailable")``
at the HTTP boundary (see ``directory.http.edge``), never shown as a traceback.
"""

from __future__ import annotations

RETRY_AFTER_S = 1


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, code: str | None = None, message: str = "", *,
                 status: int | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.message = message or self.code.replace("_", " ")
        self.retry_after = retry_after


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class TooManyRequests(ApiError):
    """429 ``rate_limited`` with ``Retry-After``: over a budget (the room-creation budget)."""

    status = 429
    code = "rate_limited"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"

    def __init__(self, code: str | None = None, message: str = "", *,
                 retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(code, message, retry_after=retry_after)


class Overloaded(Unavailable):
    """503 ``overloaded``: the directory sheds load (a connect that waited too long for its
    turn, too many connects at once, SQLite's one write lock busy for too long)."""

    code = "overloaded"

    def __init__(self, message: str) -> None:
        super().__init__(message=message)
