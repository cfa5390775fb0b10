"""A task's audit history, from the log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
import psycopg
from litestar import Request, get
from litestar.params import FromPath, QueryParameter

from tasktrail import eventstore
from tasktrail.domain.events import to_data, type_of
from tasktrail.domain.task import TaskNotFound
from tasktrail.http.auth import SECURITY
from tasktrail.http.problems import problems
from tasktrail.http.tasks import ERRORS, JsonReply, documented, json_response, parse_task_id, past_a_page, read


class EventView(msgspec.Struct):
    """An event as the API shows it (in the current shape, upcast if stored older)."""

    version: int
    position: int
    type: str
    occurred_at: datetime
    data: dict[str, Any]
    metadata: dict[str, Any]


def event_view(stored: eventstore.Stored) -> EventView:
    recorded = stored.recorded
    return EventView(
        recorded.version,
        recorded.position,
        type_of(recorded.event),
        recorded.occurred_at,
        to_data(recorded.event),
        stored.metadata,
    )


class History(msgspec.Struct):
    task_id: str
    events: list[EventView]


@get(
    "/tasks/{task_id:str}/history",
    security=SECURITY,
    responses={200: documented(History, "the events; a Link to the next page if any")} | problems(*ERRORS, 404),
)
async def history(
    request: Request,
    task_id: FromPath[str],
    after_version: Annotated[int, QueryParameter(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> JsonReply:
    """The task's events in version order, deleted tasks included; the next page is in the Link header."""
    uuid = parse_task_id(task_id)

    async def fetch(conn: psycopg.AsyncConnection) -> list[eventstore.Stored]:
        page = await eventstore.read_stream(conn, uuid, after_version=after_version, limit=limit + 1)
        # An empty page past the last event is a page; of a task that never was, a 404.
        if not page and (after_version == 0 or not await eventstore.read_stream(conn, uuid, limit=1)):
            raise TaskNotFound(f"task {task_id} not found")
        return page

    page = await read(request, fetch)
    headers = {}
    if past_a_page(page, limit):  # one more than a page was read: a Link only when the next page has events
        last = page[-1].recorded.version
        headers["Link"] = f'</tasks/{uuid}/history?after_version={last}&limit={limit}>; rel="next"'
    return json_response(History(str(uuid), [event_view(s) for s in page]), headers=headers)


ROUTES = [history]
