"""Errors: each refusal as an exception carrying the server's problem+json (RFC 9457).

try:
    client.update(task_id, status="running")
except Conflict as exc:          # 409: the task's status does not allow it
    print(exc.current_status, exc.allowed)
except TasktrailError as exc:    # anything else the client raises
    print(exc)
"""

from __future__ import annotations

from typing import Any


class TasktrailError(Exception):
    """Every error this client raises."""


class ConnectionFailed(TasktrailError):
    """The server could not be reached, or the connection broke, and retrying did not help."""


class ApiError(TasktrailError):
    """The server refused the request; the attributes are its problem document's."""

    def __init__(self, status: int, problem: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.problem = problem
        self.headers = headers or {}
        self.type: str = problem.get("type", "about:blank")
        self.title: str = problem.get("title", "")
        self.detail: str = problem.get("detail", "")
        self.errors: list[dict[str, str]] = problem.get("errors") or []
        self.current_status: str | None = problem.get("current_status")
        self.allowed: list[str] | None = problem.get("allowed")
        super().__init__(f"{status} {self.title}: {self.detail}" if self.detail else f"{status} {self.title}")

    @property
    def fields(self) -> dict[str, str]:
        """The offending fields of a 422, field -> message."""
        return {e.get("field", ""): e.get("message", "") for e in self.errors}


class BadRequest(ApiError):
    """400: malformed, e.g. not JSON."""


class Unauthorized(ApiError):
    """401: no API key, or one the server does not know."""


class Forbidden(ApiError):
    """403: the API key's scope is too small."""


class NotFound(ApiError):
    """404: no such task, or it was deleted."""


class Conflict(ApiError):
    """409: the task's status does not allow the change (`current_status`, `allowed`)."""


class PreconditionFailed(ApiError):
    """412: the task is not at the version you expected (someone else changed it)."""


class PayloadTooLarge(ApiError):
    """413: the body is over the server's limit."""


class UnsupportedMediaType(ApiError):
    """415: the body is not JSON."""


class ValidationFailed(ApiError):
    """422: well-formed input that breaks a rule; `fields` names them."""


class ServiceUnavailable(ApiError):
    """503: the database is unreachable or too slow; worth retrying later."""


class ServerError(ApiError):
    """Any other 5xx."""


BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    503: ServiceUnavailable,
}


def from_problem(status: int, problem: dict[str, Any], headers: dict[str, str] | None = None) -> ApiError:
    kind = BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return kind(status, problem, headers)
