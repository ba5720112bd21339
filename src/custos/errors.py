"""Domain errors that services raise; the server maps each to an HTTP status."""

from __future__ import annotations


class DomainError(Exception):
    """A refusal with a stable machine-readable code and a human reason."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code


class Invalid(DomainError):
    """The request is well-formed but its content is not acceptable."""

    status = 422
    code = "invalid"


class Unauthorized(DomainError):
    """No valid credentials."""

    status = 401
    code = "unauthorized"


class Forbidden(DomainError):
    """Valid credentials, but the action is refused."""

    status = 403
    code = "forbidden"


class NotFound(DomainError):
    """The thing named does not exist."""

    status = 404
    code = "not_found"


class Conflict(DomainError):
    """The request contradicts the current state."""

    status = 409
    code = "conflict"


class TooLarge(DomainError):
    """A size limit was exceeded."""

    status = 413
    code = "too_large"


class Unavailable(DomainError):
    """The server is overloaded for the moment (e.g. no database connection free): retry later."""

    status = 503
    code = "busy"

    def __init__(self, detail: str, *, code: str | None = None, retry_after: int = 2) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class TooManyRequests(DomainError):
    """Too many attempts (e.g. failed logins): wait `retry_after` seconds."""

    status = 429
    code = "rate_limited"

    def __init__(self, detail: str, *, code: str | None = None, retry_after: int = 60) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after
