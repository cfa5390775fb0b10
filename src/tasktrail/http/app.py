"""The application: pool, dependencies, routes, and every error as problem+json."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import msgspec
import psycopg
import psycopg_pool
from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from tasktrail import db, eventstore
from tasktrail.domain.task import TaskNotFound, TransitionRejected
from tasktrail.http import health, tasks
from tasktrail.http.body import MAX_BODY_BYTES, InvalidInput, MalformedBody
from tasktrail.projections import ProjectionOutdated

log = logging.getLogger("tasktrail")

PROBLEM = "application/problem+json"


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] | None = None
    current_status: str | None = None
    allowed: list[str] | None = None


def problem(status: int, detail: str, **extra: Any) -> Response[bytes]:
    title = HTTPStatus(status).phrase
    body = Problem(
        type=f"/problems/{title.lower().replace(' ', '-')}", title=title, status=status, detail=detail, **extra
    )
    return Response(msgspec.json.encode(body), status_code=status, media_type=PROBLEM)


def _not_found(_: Request, exc: TaskNotFound) -> Response[bytes]:
    return problem(404, str(exc))


def _rejected(_: Request, exc: TransitionRejected) -> Response[bytes]:
    return problem(409, str(exc), current_status=exc.current.value, allowed=[s.value for s in exc.allowed])


def _conflict(_: Request, exc: eventstore.VersionConflict) -> Response[bytes]:
    return problem(409, str(exc))


def _malformed(_: Request, exc: MalformedBody) -> Response[bytes]:
    return problem(400, str(exc))


def _invalid(_: Request, exc: InvalidInput) -> Response[bytes]:
    return problem(422, str(exc), errors=exc.errors)


def _invalid_parameter(_: Request, exc: ValidationException) -> Response[bytes]:
    errors = [
        {"field": str(item.get("key", "?")), "message": str(item.get("message", ""))}
        for item in (exc.extra if isinstance(exc.extra, list) else [])
        if isinstance(item, dict)
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or exc.detail
    return problem(422, detail, errors=errors)


def _http(_: Request, exc: HTTPException) -> Response[bytes]:
    response = problem(exc.status_code, exc.detail)
    response.headers.update(exc.headers or {})
    return response


def _unavailable(_: Request, exc: Exception) -> Response[bytes]:
    log.warning("database unavailable: %s", exc)
    return problem(503, "the database is unavailable; try again shortly")


def _outdated(_: Request, exc: ProjectionOutdated) -> Response[bytes]:
    log.error("refusing a write: %s", exc)
    return problem(503, "the service is being upgraded; try again shortly")


def _unexpected(request: Request, exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "an unexpected error occurred; it has been logged")


class RequestId(ASGIMiddleware):
    """Give each request an id (the caller's X-Request-ID if sane), echoed back."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given.decode() if 0 < len(given) <= 128 and given.isascii() and given.isalnum() else None
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await next_app(scope, receive, send_with_id)


async def provide_connection(state: State) -> AsyncIterator[psycopg.AsyncConnection]:
    async with state.pool.connection() as conn:
        yield conn


def create_app(database_url: str | None = None) -> Litestar:
    """The app, on DATABASE_URL unless given another (migrations are the caller's)."""
    conninfo = database_url or os.environ["DATABASE_URL"]

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = db.create_pool(conninfo)
        await app.state.pool.open(wait=False)
        try:
            yield
        finally:
            await app.state.pool.close()

    return Litestar(
        route_handlers=[*tasks.ROUTES, *health.ROUTES],
        dependencies={"conn": Provide(provide_connection)},
        lifespan=[lifespan],
        middleware=[RequestId()],
        request_max_body_size=MAX_BODY_BYTES,
        exception_handlers={
            TaskNotFound: _not_found,
            TransitionRejected: _rejected,
            eventstore.VersionConflict: _conflict,
            MalformedBody: _malformed,
            InvalidInput: _invalid,
            ValidationException: _invalid_parameter,
            HTTPException: _http,
            psycopg.OperationalError: _unavailable,
            psycopg_pool.PoolTimeout: _unavailable,
            ProjectionOutdated: _outdated,
            Exception: _unexpected,
        },
    )
