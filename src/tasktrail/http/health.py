"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from litestar import Request, get
from litestar.exceptions import ServiceUnavailableException

from tasktrail import db
from tasktrail.http.auth import PUBLIC
from tasktrail.http.problems import problems
from tasktrail.http.tasks import JsonReply, documented, json_response


class Health(msgspec.Struct):
    status: str


@get("/health", opt=PUBLIC, responses={200: documented(Health, "the process is up")})
async def health() -> JsonReply:
    """The process is up (says nothing of the database)."""
    return json_response(Health("ok"))


# How long readiness waits for the database's answer: a probe must hear of one that no longer answers
# (frozen, or behind a proxy that stopped) at once, not after a statement timeout.
READY_WITHIN = 2.0
# A read of the log, not `SELECT 1`: a lock that holds every write up (LOCK TABLE events, as a migration's
# ALTER takes) makes it wait too, so readiness says what every write meets.
READS_THE_LOG = "SELECT FROM events LIMIT 1"


@get(
    "/health/ready",
    opt=PUBLIC,
    responses={200: documented(Health, "the database answers and this process holds its read models")} | problems(503),
)
async def ready(request: Request) -> JsonReply:
    """The log can be read and this process holds its read-model versions (each within READY_WITHIN): 200, else 503.

    The versions are held by the follower's connection (projections/versions.py): while it reconnects,
    or when the version was pruned under this process (which then refuses writes until restarted), 503.
    """
    async with db.Borrowed(request.app.state.pool, within=READY_WITHIN) as conn:
        await conn.execute(READS_THE_LOG)
    follower = request.app.state.follower
    if not follower.holding.is_set():
        follower.try_now()  # the database just answered: up to 5 s of its back-off would be 503s for nothing
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(follower.holding.wait(), READY_WITHIN)
        if not follower.holding.is_set():
            detail = f"this process's read models are not ready: {follower.problem}"
            raise ServiceUnavailableException(detail=detail, headers={"Retry-After": "1"})
    return json_response(Health("ready"))


ROUTES = [health, ready]
