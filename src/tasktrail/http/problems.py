"""Errors as RFC 9457 problem details, and how the OpenAPI schema describes them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Response
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import Send

from tasktrail.domain.task import TaskNotFound, TransitionRejected
from tasktrail.writer import PreconditionFailed

PROBLEM = "application/problem+json"
_PROBLEM = PROBLEM.encode()


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] | None = None  # [{field, message}]
    current_status: str | None = None
    allowed: list[str] | None = None
    # "unknown" on a 503 to a write cut off while under way (the database connection lost mid-statement, a
    # stop): it may have been applied. Any other 503 made no change, and sending the request again is safe.
    outcome: str | None = None


def details(status: int, detail: str, **extra: Any) -> Problem:
    title = HTTPStatus(status).phrase
    kind = f"/problems/{title.lower().replace(' ', '-')}"
    # What the request sent is quoted back (an id, a value, a header): never an API key in it.
    detail = unkeyed(detail)
    if errors := extra.get("errors"):
        extra["errors"] = [{name: unkeyed(text) for name, text in error.items()} for error in errors]
    return Problem(type=kind, title=title, status=status, detail=detail, **extra)


# A key, or the start of one, wherever it begins: what a detail quotes may follow other text
# (`retry-<key>`). Text of another kind that looks so (a field `watt_hours_total`) is shown redacted too: a
# refusal's words, never what is stored. What quotes a part of a value (`shown`) redacts before it cuts,
# so that the cut leaves no start of a key either. (A key's secret part sent without its `tt_` is not
# told from the long ids and Idempotency-Keys a refusal must quote to be understood.)
_KEY_OR_PART = re.compile(r"tt_[0-9A-Za-z_-]{4,}")


def unkeyed(text: str) -> str:
    return _KEY_OR_PART.sub("tt_(a key)", text)


def shown(text: str, most: int) -> str:
    """Text a refusal quotes, redacted, and cut to `most` characters (and "...") when longer."""
    text = unkeyed(text)
    return text if len(text) <= most else text[:most] + "..."


def problem_body(status: int, detail: str, **extra: Any) -> bytes:
    return msgspec.json.encode(details(status, detail, **extra))


async def send_problem(
    send: Send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = (), **extra: Any
) -> None:
    """Answer with a problem document from plain ASGI code (a middleware's refusal)."""
    body = problem_body(status, detail, **extra)
    headers = [(b"content-type", _PROBLEM), (b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> Response[bytes]:
    return answer(details(status, detail, **extra), headers)


def answer(body: Problem, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(msgspec.json.encode(body), status_code=body.status, media_type=PROBLEM, headers=headers)


def refusal(exc: Exception) -> Problem:
    """What a write the task's state refuses answers: as the whole answer, or as one item's of a batch."""
    match exc:
        case TaskNotFound():
            return details(404, str(exc))
        case TransitionRejected(current=current, allowed=allowed):
            return details(409, str(exc), current_status=current.value, allowed=[s.value for s in allowed])
        case PreconditionFailed():
            return details(412, str(exc))
    raise TypeError(f"not a refusal: {exc!r}")


# What each error means on any route; a route lists the ones it can answer.
MEANINGS = {
    400: "the request is malformed: e.g. the body is not JSON",
    401: "no API key, or not one this service knows (when keys are configured)",
    403: "the API key's scope is too small for this route",
    404: "no such task, or it was deleted",
    409: "the task's status does not allow the change",
    412: "the task is not at the version If-Match names",
    413: "the body is over 1 MiB",
    415: "the body is not sent as JSON: give `Content-Type: application/json` (charset, if any, utf-8)",
    422: "well-formed input that breaks a rule; `errors` names the fields",
    503: "the database is unreachable or too slow, or the task is locked by another transaction; try again shortly",
}


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses: a problem document for each status."""
    return {
        status: ResponseSpec(Problem, description=MEANINGS[status], media_type=PROBLEM, generate_examples=False)
        for status in statuses
    }
