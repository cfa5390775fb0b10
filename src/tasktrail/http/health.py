"""Liveness and readiness."""

from __future__ import annotations

import msgspec
from litestar import Request, get

from tasktrail.http.auth import PUBLIC
from tasktrail.http.problems import problems
from tasktrail.http.tasks import JsonReply, connection, documented, json_response


class Health(msgspec.Struct):
    status: str


@get("/health", opt=PUBLIC, responses={200: documented(Health, "the process is up")})
async def health() -> JsonReply:
    """The process is up (says nothing of the database)."""
    return json_response(Health("ok"))


@get("/health/ready", opt=PUBLIC, responses={200: documented(Health, "the database answers")} | problems(503))
async def ready(request: Request) -> JsonReply:
    """The database answers: 200, else 503."""
    async with connection(request) as conn:
        await conn.execute("SELECT 1")
    return json_response(Health("ready"))


ROUTES = [health, ready]
