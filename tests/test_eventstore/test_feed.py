"""The global feed on a real PostgreSQL: commit-safe order when writers commit out of position order."""

from __future__ import annotations

import asyncio
import time
from uuid import UUID, uuid4

import psycopg
import pytest

from tasktrail import db, eventstore, writer
from tasktrail.domain.events import Event, Recorded, TaskCreated, TaskStarted
from tasktrail.domain.task import CreateTask, UpdateTask
from tests.conftest import fresh_database

pytestmark = pytest.mark.anyio


async def read_until(
    conn: psycopg.AsyncConnection, count: int, after: eventstore.Cursor = eventstore.START, **kwargs: object
) -> list[eventstore.FeedEvent]:
    """Follow the feed until `count` events have come (other transactions in the database may delay them)."""
    seen: list[eventstore.FeedEvent] = []
    deadline = time.monotonic() + 30
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {len(seen)} of {count} events came"
        page = await eventstore.read_feed(conn, after, **kwargs)  # type: ignore[arg-type]
        seen += page.events
        after = page.next_after
        if not page.events:
            await asyncio.sleep(0.02)
    return seen


async def append_one(
    conn: psycopg.AsyncConnection, stream_id: UUID | None = None, version: int = 1, event: Event | None = None
) -> int:
    event = event or TaskCreated(task_type="t")
    (position,) = await eventstore.append(conn, [Recorded(stream_id or uuid4(), version, 0, writer.now(), event)], {})
    return position


async def test_an_event_that_commits_late_is_not_skipped(conn: psycopg.AsyncConnection, database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as slow:
        async with slow.transaction():
            early = await append_one(slow)  # takes the lower position, commits last
            late = await append_one(conn)  # committed at once
            assert early < late
            # A reader that remembers the highest position it has seen would now
            # move past `early` for ever. The feed holds `late` back instead.
            page = await eventstore.read_feed(conn)
            assert page.events == []
            assert page.held_back
        seen = await read_until(conn, 2)
    assert [event.stored.recorded.position for event in seen] == [early, late]
    assert seen[0].cursor < seen[1].cursor


async def test_an_open_write_transaction_in_another_database_holds_nothing_back(
    conn: psycopg.AsyncConnection, server_url: str, template_db: str
) -> None:
    """Transaction ids are server-wide, but another database's transaction can never append here."""
    with fresh_database(server_url, template_db) as next_door:
        other = await psycopg.AsyncConnection.connect(next_door, **db.connect_kwargs())
        async with other, other.transaction():
            await append_one(other)  # open, and older than anything written here
            mine = await append_one(conn)
            page = await eventstore.read_feed(conn)
            assert [event.stored.recorded.position for event in page.events] == [mine]
            assert not page.held_back
            assert await eventstore.head(conn) > page.events[0].cursor
            tail = await eventstore.read_feed_tail(conn)
            assert [event.stored.recorded.position for event in tail.events] == [mine]
            assert await eventstore.held_back_seconds(conn) == 0.0
            # An open transaction of this database's own still holds the feed back, and is timed.
            slow = await psycopg.AsyncConnection.connect(conn.info.dsn, **db.connect_kwargs())
            async with slow, slow.transaction():
                await append_one(slow)
                later = await append_one(conn)
                page = await eventstore.read_feed(conn, page.next_after)
                assert page.events == []
                assert page.held_back
                assert await eventstore.held_back_seconds(conn) > 0.0
            seen = await read_until(conn, 2, page.next_after)
            assert later in [event.stored.recorded.position for event in seen]


async def test_a_rolled_back_event_never_shows_and_holds_nothing_back(
    conn: psycopg.AsyncConnection, database_url: str
) -> None:
    doomed = await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs())
    async with doomed, doomed.transaction():
        await append_one(doomed)
        kept = await append_one(conn)
        assert (await eventstore.read_feed(conn)).events == []
        raise psycopg.Rollback  # the transaction block swallows it, after rolling back
    seen = await read_until(conn, 1)
    assert (await eventstore.read_feed(conn, seen[-1].cursor)).events == []
    assert [event.stored.recorded.position for event in seen] == [kept]


async def test_pages_follow_the_cursor_and_the_cursor_moves_past_an_empty_page(conn: psycopg.AsyncConnection) -> None:
    for _ in range(5):
        await append_one(conn)
    first = await read_until(conn, 3, limit=3)
    page = await eventstore.read_feed(conn, first[-1].cursor, limit=3)
    assert [e.stored.recorded.position for e in first + page.events] == [1, 2, 3, 4, 5]
    assert page.next_after >= page.events[-1].cursor  # not full: may move up to the head
    empty = await eventstore.read_feed(conn, page.next_after)
    assert empty.events == []
    assert empty.next_after >= page.next_after
    # The head is a cursor too: what commits after it comes after it.
    head = await eventstore.head(conn)
    position = await append_one(conn)
    assert [e.stored.recorded.position for e in await read_until(conn, 1, head)] == [position]


async def test_one_streams_feed(conn: psycopg.AsyncConnection) -> None:
    task = await writer.create(conn, CreateTask(task_type="mine"), {"request_id": "r1"})
    await writer.create(conn, CreateTask(task_type="other"), {})
    await writer.change(conn, task.task_id, UpdateTask(status="running"), {})  # type: ignore[arg-type]
    seen = await read_until(conn, 2, stream_id=task.task_id)
    assert [(e.stored.recorded.version, type(e.stored.recorded.event)) for e in seen] == [
        (1, TaskCreated),
        (2, TaskStarted),
    ]
    assert seen[0].stored.metadata == {"request_id": "r1"}
    assert (await eventstore.read_feed(conn, seen[-1].cursor, stream_id=task.task_id)).events == []


async def test_a_streams_versions_are_in_feed_order(conn: psycopg.AsyncConnection, database_url: str) -> None:
    stream = uuid4()
    await append_one(conn, stream)
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as old:
        async with old.transaction():
            await old.execute("SELECT pg_current_xact_id()")  # takes its transaction id now
            await append_one(conn, stream, 2, TaskStarted())
            # Version 3 from a transaction older than version 2's would come first in the feed.
            with pytest.raises(psycopg.errors.SerializationFailure, match="newer than this one"):
                await append_one(old, stream, 3, TaskStarted(progress=1))
        await append_one(old, stream, 3, TaskStarted(progress=1))  # a new one may
    seen = await read_until(conn, 3, stream_id=stream)
    assert [event.stored.recorded.version for event in seen] == [1, 2, 3]


def rows_read(plan: dict) -> list[int]:
    """The rows each executed scan of the events table read (index and heap rows, and those its filter removed)."""
    found = []
    if plan.get("Relation Name") == "events" and plan.get("Actual Loops", 0) > 0:
        found.append(plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0))
    for child in plan.get("Plans", []):
        found += rows_read(child)
    return found


async def test_a_page_of_one_streams_feed_reads_its_own_rows_however_long_the_stream(
    conn: psycopg.AsyncConnection,
) -> None:
    # Audit: each page of a task's stream read every event of the task after the cursor (and the held-back
    # check every one): a replay of 50,000 events took 15 s, of 100,000 over a minute.
    task = await writer.create(conn, CreateTask(task_type="long"), {})
    for _ in range(3):
        changes = [(task.task_id, UpdateTask(progress=float(n % 90 + 1)), None) for n in range(1000)]
        await writer.change_many(conn, changes, {})
    seen = await read_until(conn, 3001, stream_id=task.task_id)
    assert [e.stored.recorded.version for e in seen] == list(range(1, 3002))
    for n in range(2):  # other streams, then statistics: a planner that knows the table chose a scan (review)
        await writer.change_many(conn, [(task.task_id, UpdateTask(progress=50.5 + n), None)], {})
        await writer.create_many(conn, [CreateTask(task_type="other")] * 1000, {})
    await conn.execute("ANALYZE events")
    cursors = {"middle": seen[1499].cursor, "head": (10**15, 0)}
    for where, (txid, position) in cursors.items():
        params = {"transaction_id": str(txid), "position": position, "limit": 100, "stream_id": task.task_id}
        explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + eventstore.READ_STREAM_FEED
        ((plan,),) = await (await conn.execute(explain, params, prepare=False)).fetchall()
        assert max(rows_read(plan[0]["Plan"])) <= 100, (where, rows_read(plan[0]["Plan"]))
    page = await eventstore.read_feed(conn, seen[1499].cursor, limit=100, stream_id=task.task_id)
    assert [e.stored.recorded.version for e in page.events] == list(range(1501, 1601))
