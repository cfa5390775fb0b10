"""Liveness and readiness."""

from __future__ import annotations

from litestar import Request, Response, get

from tasktrail.http.tasks import json_response


@get("/health")
async def health() -> Response[bytes]:
    """The process is up (says nothing of the database)."""
    return json_response({"status": "ok"})


@get("/health/ready")
async def ready(request: Request) -> Response[bytes]:
    """The database answers: 200, else 503."""
    async with request.app.state.pool.connection() as conn:
        await conn.execute("SELECT 1")
    return json_response({"status": "ready"})


ROUTES = [health, ready]
