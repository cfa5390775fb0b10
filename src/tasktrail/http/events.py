"""The global event feed and the live streams: /events, /events/stream, /tasks/{task_id}/stream."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Annotated, Any
from uuid import UUID

import msgspec
import psycopg
import psycopg_pool
from litestar import Request, Response, get
from litestar.background_tasks import BackgroundTask
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream

from tasktrail import eventstore
from tasktrail.domain.events import type_of
from tasktrail.domain.task import FINISHED
from tasktrail.eventstore import Cursor, FeedEvent
from tasktrail.http import sessions
from tasktrail.http.auth import SECURITY
from tasktrail.http.body import invalid
from tasktrail.http.history import EventView, event_view
from tasktrail.http.problems import problems
from tasktrail.http.tasks import (
    ERRORS,
    JsonReply,
    connection,
    documented,
    json_response,
    not_found,
    parse_task_id,
    read,
)
from tasktrail.live import Listener
from tasktrail.projections import tasks as tasks_view

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("tasktrail")

# The events after which a task's stream has nothing more to say.
FINISHING = frozenset({"TaskCompleted", "TaskFailed", "TaskCanceled", "TaskDeleted"})

# The client's reconnect delay (ms), sent first; it also flushes the headers at once.
RETRY = b"retry: 2000\n\n"
# The last words of a stream whose session ended: reconnect soon, not in 2 s. Signed out, the browser is
# refused (401) and stops; signed in again meanwhile, another page's live updates go on without a gap.
# (The browser keeps this delay until the next stream says RETRY: not so short that a restart is hammered.)
RECONNECT_NOW = b"retry: 500\n\n"
PING = b": ping\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The frames of a batch go out joined (one write for many small events) in pieces of about this size.
CHUNK_BYTES = 256 * 1024

# A cursor is "<transaction id>-<position>": opaque to clients (they only hand
# it back), plain enough for the OpenAPI schema to say exactly which are valid.
# [0-9], not \d: in Python \d is any Unicode digit, and int() reads "١٢" as 12.
CURSOR = r"^[0-9]{1,18}-[0-9]{1,18}$"


AfterParameter = Annotated[str | None, QueryParameter(max_length=100, pattern=CURSOR)]
LastEventId = Annotated[str | None, HeaderParameter(name="Last-Event-ID", max_length=100)]


class FeedItem(EventView):
    """An event as the feed and the streams show it: as in the history, plus its task and cursor."""

    task_id: UUID
    cursor: str


def encode_cursor(cursor: Cursor) -> str:
    return f"{cursor[0]}-{cursor[1]}"


def decode_cursor(field: str, value: str) -> Cursor:
    transaction_id, _, position = value.partition("-")
    if re.fullmatch(CURSOR, value):
        return (int(transaction_id), int(position))
    raise invalid(field, "not a cursor this service gave out")


def item(event: FeedEvent) -> FeedItem:
    shown = event_view(event.stored)
    return FeedItem(*msgspec.structs.astuple(shown), event.stored.recorded.stream_id, encode_cursor(event.cursor))


def render(event: FeedEvent) -> bytes:
    """The Server-Sent Events frame of an event: id its cursor, event its type, data the feed's JSON."""
    shown = item(event)
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (shown.cursor.encode(), shown.type.encode(), _encode(shown))


class Feed(msgspec.Struct):
    events: list[FeedItem]
    next_cursor: str


STREAMED = ResponseSpec(
    str, description="Server-Sent Events: id the cursor, event the type, data the event as in the feed",
    media_type="text/event-stream", generate_examples=False,
)  # fmt: skip


@get(
    "/events",
    security=SECURITY,
    responses={200: documented(Feed, "events after the cursor, and the cursor to read on from")} | problems(*ERRORS),
)
async def feed(
    request: Request, after: AfterParameter = None, limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100
) -> JsonReply:
    """Every event in commit-safe order, after a cursor; next_cursor is there even on an empty page."""
    cursor = decode_cursor("after", after) if after else eventstore.START
    page = await read(request, lambda conn: eventstore.read_feed(conn, cursor, limit=limit))
    if page.ahead:  # on a replica behind the primary, perhaps; else a cursor never given out
        await given_out(request, "after", cursor)
    events = [item(event) for event in page.events]
    return json_response(Feed(events, encode_cursor(page.next_after)))


async def given_out(request: Request, field: str, cursor: Cursor) -> None:
    """422 for a cursor past the primary's head, which no answer gave out.

    Every cursor given out (an event's, a page's next_cursor, the head) is at
    or below the head the primary has when it is given, and the head only
    moves on. One past it (from another database, a restored backup, a typo)
    would otherwise be waited on for ever: a feed polled from it stays empty,
    a stream from it stays silent.
    """
    try:
        async with connection(request) as conn:
            head = await eventstore.head(conn)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout):
        return  # the primary cannot say: read on from the cursor (from a replica), as before the check
    if cursor > head:  # (head's transaction, 0): no event of that transaction or later was given out
        raise invalid(field, "not a cursor this service gave out: it is past the end of the log")


def resume_from(last_event_id: str | None, after: str | None) -> Cursor | None:
    """Where a stream resumes: Last-Event-ID (the browser's reconnect) wins over ?after= (the first URL)."""
    if last_event_id:
        return decode_cursor("Last-Event-ID", last_event_id)
    if after:
        return decode_cursor("after", after)
    return None


# A stream opened with a dashboard session ends when the session does (signed out, or expired): the
# session is checked at each ping, and before sending events at most this long after the last check.
SESSION_CHECK_SECONDS = 2.0


def session_lasts(request: Request) -> Callable[[], Awaitable[bool]] | None:
    """Whether the request's dashboard session still holds, asked again later; None without a session."""
    session = getattr(request.state, "session", None)
    if session is None:
        return None
    pool = request.app.state.pool

    async def lasts() -> bool:
        return session.expires > time.time() and not await sessions.ended(pool, session)

    return lasts


async def frames(
    request: Request,
    after: Cursor,
    *,
    first: bytes = b"",
    stream_id: UUID | None = None,
    skip: Collection[int] = (),
    closes_after: Callable[[FeedEvent], bool] | None = None,
) -> AsyncIterator[bytes]:
    """The bytes of a stream: `first`, then events after the cursor (except positions in `skip`), and pings;
    until the request's session ends, if it has one."""
    listener: Listener = request.app.state.live
    lasts = session_lasts(request)
    checked = time.monotonic()
    yield RETRY + first
    try:
        async with contextlib.aclosing(listener.follow(after, stream_id)) as batches:
            async for batch in batches:
                if lasts is not None and (not batch or time.monotonic() - checked >= SESSION_CHECK_SECONDS):
                    checked = time.monotonic()
                    if not await lasts():
                        yield RECONNECT_NOW
                        return
                if not batch:
                    yield PING
                    continue
                chunk, size = [], 0
                for event, frame in batch:
                    if event.stored.recorded.position in skip:
                        continue
                    chunk.append(frame)
                    size += len(frame)
                    if closes_after is not None and closes_after(event):
                        yield b"".join(chunk)
                        return
                    if size >= CHUNK_BYTES:  # a copy of at most about this much per stream at a time
                        yield b"".join(chunk)
                        chunk, size = [], 0
                if chunk:
                    yield b"".join(chunk)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        # End the response: the client reconnects with its Last-Event-ID and
        # misses nothing, while the headers, long sent, cannot say 503.
        log.warning("event stream ended, database unavailable: %s", exc)


def event_stream(body: AsyncIterator[bytes]) -> Stream:
    # Closing the generator when the response ends, however it ends (the client
    # going away included), takes the stream off the listener at once.
    return Stream(
        body,
        media_type="text/event-stream",
        headers=SSE_HEADERS,
        background=BackgroundTask(body.aclose),  # type: ignore[attr-defined]
    )


@get("/events/stream", security=SECURITY, responses={200: STREAMED} | problems(*ERRORS))
async def stream_all(request: Request, after: AfterParameter = None, last_event_id: LastEventId = None) -> Stream:
    """Every event as it commits; from the head unless resumed."""
    cursor = resume_from(last_event_id, after)
    head = await read(request, eventstore.head)
    if cursor is None:
        cursor = head
    elif cursor > head:  # on a replica behind the primary, perhaps; else a cursor never given out
        await given_out(request, "Last-Event-ID" if last_event_id else "after", cursor)
    return event_stream(frames(request, cursor))


# One statement, one snapshot: the task's state, where the feed's head is, the
# task's events at or above the head that the state already includes (the
# stream must not send those again), and its latest event.
TASK_STREAM_START = f"""
WITH horizon AS MATERIALIZED (SELECT {eventstore.OLDEST_OPEN} AS oldest_open)
SELECT horizon.oldest_open::text,
       ARRAY(SELECT position FROM events WHERE stream_id = %(task_id)s AND transaction_id >= horizon.oldest_open),
       latest.transaction_id::text, latest.position, latest.type,
       {", ".join(f"t.{column}" for column in tasks_view.COLUMNS.split(", "))}
FROM horizon
LEFT JOIN LATERAL (
    SELECT transaction_id, position, type FROM events
    WHERE stream_id = %(task_id)s ORDER BY version DESC LIMIT 1
) latest ON true
LEFT JOIN tasks t ON t.task_id = %(task_id)s
"""  # noqa: S608 -- the columns are constants


@get(
    "/tasks/{task_id:str}/stream",
    security=SECURITY,
    responses={200: STREAMED, 204: ResponseSpec(None, description="resumed after its last event: nothing more")}
    | problems(*ERRORS, 404),
)
async def stream_task(
    request: Request, task_id: FromPath[str], after: AfterParameter = None, last_event_id: LastEventId = None
) -> Response[Any]:
    """The task's current state (event `snapshot`), then its events as they commit; ends after a finished status."""
    uuid = parse_task_id(task_id)
    resume = resume_from(last_event_id, after)

    async def fetch(conn: psycopg.AsyncConnection) -> tuple[Any, ...]:
        cur = await conn.execute(TASK_STREAM_START, {"task_id": uuid})
        row = await cur.fetchone()
        assert row is not None
        if row[4] is None:
            raise await not_found(conn, uuid)
        return row

    row = await read(request, fetch)
    replicas = request.app.state.replicas
    if resume is not None and resume > (int(row[2]), row[3]) and replicas.replicas:
        # The client saw an event of the task (or after it) that this replica has not replayed: ask the
        # primary, lest a stream resumed past the task's end (its finishing event behind the cursor) wait for
        # that end for ever.
        row = await replicas.read_steadily(fetch, primary=True)
    head, seen, latest_txid, latest_position, _latest_type = row[:5]
    task = None if row[5] is None else tasks_view.to_task(row[5:])
    latest = (int(latest_txid), latest_position)
    ended = task is None or task.status in FINISHED

    def closes_after(event: FeedEvent) -> bool:
        # A replay runs up to the latest event before it may end; live events end it at once.
        return event.cursor >= latest and type_of(event.stored.recorded.event) in FINISHING

    if resume is not None:
        if ended and resume >= latest:
            # Nothing more will come: 204 tells EventSource to stop reconnecting. Before the check of the
            # head: a finished task's snapshot gives out its latest event's cursor even while an older
            # transaction holds the feed back below it.
            return Response(content=None, status_code=204, headers=SSE_HEADERS)
        if resume > (int(head), 0):
            await given_out(request, "Last-Event-ID" if last_event_id else "after", resume)
        return event_stream(frames(request, resume, stream_id=uuid, closes_after=closes_after))
    if task is None:
        # Deleted: replay its history and end.
        return event_stream(frames(request, eventstore.START, stream_id=uuid, closes_after=closes_after))
    snapshot = b"event: snapshot\ndata: %s\n\n" % _encode(task)
    if task.status in FINISHED:
        # The id is the latest event's cursor: EventSource reconnects with it and gets the 204 that stops it.
        return event_stream(_once(RETRY + b"id: %s\n" % encode_cursor(latest).encode() + snapshot))
    # The latest event's cursor, where a reconnect resumes (EventSource's, or a client's): a drop before the
    # first event made a client start afresh, from a snapshot that skipped what came meanwhile. Not while a
    # transaction older than that event is open: the cursor is not given out yet (the feed holds it back).
    if latest[0] < int(head):
        snapshot = b"id: %s\n" % encode_cursor(latest).encode() + snapshot
    return event_stream(
        frames(
            request,
            (int(head), 0),
            first=snapshot,
            stream_id=uuid,
            skip=frozenset(seen),
            closes_after=closes_after,
        )
    )


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


ROUTES = [feed, stream_all, stream_task]
