"""Server-Sent Events from real server processes: /events/stream and /tasks/{task_id}/stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from psycopg_pool import AsyncConnectionPool

from tasktrail import db, live, writer
from tasktrail.domain.task import CreateTask, UpdateTask
from tasktrail.http.app import create_app
from tests.conftest import Server, assert_verifies, free_port, fresh_database
from tests.sse import Comment, Message, aparse, messages, parse

TIMEOUT = httpx.Timeout(30)


@pytest.fixture(scope="module")
def server_database(server_url: str, template_db: str) -> Iterator[str]:
    """One database for the module's server: its tests read only what they write after the feed's head."""
    with fresh_database(server_url, template_db) as url:
        yield url


@pytest.fixture(scope="module")
def server(server_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server that pings idle streams every 0.3 s and polls every 0.2 s."""
    env = os.environ | {
        "DATABASE_URL": server_database,
        "TASKTRAIL_SSE_PING_SECONDS": "0.3",
        "TASKTRAIL_POLL_SECONDS": "0.2",
    }
    process = Server(env, log_dir=tmp_path_factory.mktemp("server"))
    yield process.url
    assert process.stop(signal.SIGINT) == 0  # Ctrl-C
    assert_verifies(server_database)


def head(base: str) -> str:
    return httpx.get(f"{base}/events").json()["next_cursor"]


def feed(base: str, count: int, after: str | None = None) -> list[dict]:
    """The next `count` events of the feed (the horizon may hold them back a moment)."""
    events: list[dict] = []
    deadline = time.monotonic() + 30
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} of {count} events in the feed"
        page = httpx.get(f"{base}/events", params={} if after is None else {"after": after}).json()
        events += page["events"]
        after = page["next_cursor"]
    return events


def create(base: str, task_type: str = "t") -> dict:
    response = httpx.post(f"{base}/tasks/", json={"task_type": task_type})
    assert response.status_code == 201, response.text
    return response.json()


def patch(base: str, task_id: str, **body: object) -> dict:
    response = httpx.patch(f"{base}/tasks/{task_id}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_global_stream_sends_each_event_as_the_feed_shows_it(server: str) -> None:
    start = head(server)
    with httpx.stream("GET", f"{server}/events/stream", params={"after": start}, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        task = create(server)
        patch(server, task["task_id"], status="running", progress=10)
        patch(server, task["task_id"], progress=20)
        got = messages(response.iter_lines(), 3)
    shown = feed(server, 3, start)
    assert [m.json() for m in got] == shown
    assert [m.id for m in got] == [e["cursor"] for e in shown]
    assert [m.event for m in got] == ["TaskCreated", "TaskStarted", "ProgressReported"]


def test_an_idle_stream_is_pinged(server: str) -> None:
    with httpx.stream("GET", f"{server}/events/stream", timeout=TIMEOUT) as response:
        first = next(item for item in parse(response.iter_lines()) if isinstance(item, Comment))
    assert first == Comment("ping")


def test_last_event_id_resumes_with_nothing_missed_or_repeated(server: str) -> None:
    start = head(server)
    task = create(server)
    for progress in (1, 2, 3):
        patch(server, task["task_id"], progress=progress)
    with httpx.stream("GET", f"{server}/events/stream", params={"after": start}, timeout=TIMEOUT) as response:
        before = messages(response.iter_lines(), 2)
    # Gone for a while: more events commit.
    for progress in (4, 5):
        patch(server, task["task_id"], progress=progress)
    # The browser reconnects to the same URL, saying the last id it saw; the header wins over ?after=.
    headers = {"Last-Event-ID": before[-1].id}
    with httpx.stream(
        "GET", f"{server}/events/stream", params={"after": start}, headers=headers, timeout=TIMEOUT
    ) as response:
        after = messages(response.iter_lines(), 4)
    every = feed(server, 6, start)
    assert [m.json() for m in before + after] == every
    assert [e["data"].get("progress") for e in every[1:]] == [1, 2, 3, 4, 5]


def test_a_task_stream_sends_the_state_then_its_events_and_ends_after_a_finished_status(server: str) -> None:
    task = create(server, "document_process")
    other = create(server, "other")
    with httpx.stream("GET", f"{server}/tasks/{task['task_id']}/stream", timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        (snapshot,) = messages(lines, 1)
        patch(server, other["task_id"], status="running")
        patch(server, task["task_id"], status="running", progress=50)
        patch(server, task["task_id"], status="completed", result={"files_processed": 10})
        rest = messages(lines)  # to the end of the response: the server closes it
    assert (snapshot.event, snapshot.json()) == ("snapshot", task)
    assert [(m.event, m.json()["version"], m.json()["task_id"]) for m in rest] == [
        ("TaskStarted", 2, task["task_id"]),
        ("TaskCompleted", 3, task["task_id"]),
    ]
    assert rest[-1].json()["data"] == {"result": {"files_processed": 10}, "progress": 100.0}
    # Resuming after the end: nothing more will come, and 204 tells EventSource to stop.
    resumed = httpx.get(f"{server}/tasks/{task['task_id']}/stream", headers={"Last-Event-ID": rest[-1].id})
    assert resumed.status_code == 204
    # Resuming from the snapshot (its id is its latest event's): every event after it, none it had.
    with httpx.stream(
        "GET", f"{server}/tasks/{task['task_id']}/stream", headers={"Last-Event-ID": snapshot.id}, timeout=TIMEOUT
    ) as response:
        assert messages(response.iter_lines()) == rest
    # Resuming in the middle: the rest, then the end.
    with httpx.stream(
        "GET", f"{server}/tasks/{task['task_id']}/stream", params={"after": rest[0].id}, timeout=TIMEOUT
    ) as response:
        assert messages(response.iter_lines()) == rest[1:]
    # A finished task's stream: its state, and the end.
    with httpx.stream("GET", f"{server}/tasks/{task['task_id']}/stream", timeout=TIMEOUT) as response:
        (final,) = messages(response.iter_lines())
    assert (final.event, final.json()["status"], final.json()["version"]) == ("snapshot", "completed", 3)
    # Its id is the last event's, so the reconnect an EventSource makes then gets the 204 that stops it.
    assert final.id == rest[-1].id
    again = httpx.get(f"{server}/tasks/{task['task_id']}/stream", headers={"Last-Event-ID": final.id})
    assert again.status_code == 204


def test_a_deleted_tasks_stream_replays_its_history_and_ends(server: str) -> None:
    task = create(server)
    patch(server, task["task_id"], status="failed", error="disk full")
    patch(server, task["task_id"], status="pending")
    assert httpx.delete(f"{server}/tasks/{task['task_id']}").status_code == 200
    with httpx.stream("GET", f"{server}/tasks/{task['task_id']}/stream", timeout=TIMEOUT) as response:
        replay = messages(response.iter_lines())
    assert [m.event for m in replay] == ["TaskCreated", "TaskFailed", "TaskRetried", "TaskDeleted"]


def test_stream_errors_are_problems(server: str) -> None:
    unknown = httpx.get(f"{server}/tasks/0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f/stream")
    assert (unknown.status_code, unknown.headers["content-type"]) == (404, "application/problem+json")
    assert httpx.get(f"{server}/tasks/abc-123/stream").status_code == 404
    task = create(server)
    for path in ("/events/stream", f"/tasks/{task['task_id']}/stream"):
        bad = httpx.get(f"{server}{path}", headers={"Last-Event-ID": "garbage"})
        assert (bad.status_code, bad.json()["errors"][0]["field"]) == (422, "Last-Event-ID")
        bad = httpx.get(f"{server}{path}", params={"after": "garbage"})
        assert (bad.status_code, bad.json()["errors"][0]["field"]) == (422, "after")


def read_each(streams: list[httpx.Response], count: int) -> list[list[Message]]:
    return [messages(stream.iter_lines(), count) for stream in streams]


def test_every_worker_process_delivers_every_event_woken_by_notify(database_url: str, tmp_path: Path) -> None:
    # Polling is all but off: only the notifications can wake these listeners.
    env = os.environ | {"DATABASE_URL": database_url, "TASKTRAIL_POLL_SECONDS": "3600"}
    server = Server(env, log_dir=tmp_path, serve_args=("--workers", "2"))
    try:
        start = head(server.url)
        with contextlib.ExitStack() as stack:
            streams = [
                stack.enter_context(
                    httpx.stream("GET", f"{server.url}/events/stream", params={"after": start}, timeout=TIMEOUT)
                )
                for _ in range(6)
            ]
            made = [create(server.url, f"w{i}") for i in range(10)]  # each write lands on either process
            seen = read_each(streams, 10)
        for got in seen:
            assert [m.json()["task_id"] for m in got] == [t["task_id"] for t in made]
    finally:
        assert server.stop() == 0
    assert_verifies(database_url)


@pytest.mark.anyio
async def test_events_written_without_a_notification_arrive_by_polling(server: str, server_database: str) -> None:
    start = head(server)
    with httpx.stream("GET", f"{server}/events/stream", params={"after": start}, timeout=TIMEOUT) as stream:
        async with await psycopg.AsyncConnection.connect(server_database, **db.connect_kwargs()) as conn:
            # Triggers that are not ENABLE ALWAYS (the notify trigger) do not fire for a replica.
            await conn.execute("SET session_replication_role = replica")
            task = await writer.create(conn, CreateTask(task_type="quiet"), {})
            await writer.change(conn, task.task_id, UpdateTask(progress=7), {})
        got = messages(stream.iter_lines(), 2)
    assert [(m.event, m.json()["task_id"]) for m in got] == [
        ("TaskCreated", str(task.task_id)),
        ("ProgressReported", str(task.task_id)),
    ]


@pytest.mark.anyio
async def test_a_client_that_goes_away_frees_its_stream_and_idle_streams_hold_no_connection(
    database_url: str,
) -> None:
    app = create_app(database_url)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)
    serving = asyncio.create_task(uvicorn_server.serve())
    base = f"http://127.0.0.1:{config.port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as client:
            await wait_for(lambda: uvicorn_server.started)
            task = (await client.post("/tasks/", json={"task_type": "t"})).json()
            paths = ["/events/stream"] * 5 + [f"/tasks/{task['task_id']}/stream"] * 5
            async with contextlib.AsyncExitStack() as stack:
                streams = [await stack.enter_async_context(client.stream("GET", path)) for path in paths]
                lines = [stream.aiter_lines() for stream in streams]
                for stream_lines in lines:
                    assert await anext(stream_lines) == "retry: 2000"  # the stream has begun
                await wait_for(lambda: len(app.state.live) == 10)
                # Idle: ten open streams, and not one database connection in use.
                await wait_for(lambda: in_use(app.state.pool) == 0)
                # The listener is registered, so writes notify.
                await until_listeners(database_url, 1)
                await client.patch(f"/tasks/{task['task_id']}", json={"progress": 5})
                for stream_lines in lines:
                    # (The global streams began at the head, which the task's
                    # creation may not have passed yet if another transaction
                    # on the server was open: then it comes first.)
                    got = [item.event async for item in take_messages(stream_lines, until="ProgressReported")]
                    assert set(got) <= {"snapshot", "TaskCreated", "ProgressReported"}
            # The clients went away: their streams are gone from the listener,
            # which no longer listens, so writes no longer notify.
            await wait_for(lambda: len(app.state.live) == 0)
            await until_listeners(database_url, 0)
    finally:
        uvicorn_server.should_exit = True
        await serving
    assert_verifies(database_url)


@pytest.mark.anyio
async def test_a_stream_that_does_not_read_holds_a_bounded_backlog_and_then_misses_nothing(database_url: str) -> None:
    """Large events and a client that stops reading: what waits for it is capped, then read from the database."""
    app = create_app(database_url)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)
    serving = asyncio.create_task(uvicorn_server.serve())
    base = f"http://127.0.0.1:{config.port}"
    params = {"blob": "x" * 60_000}  # an event of about 60 KB; 300 of them are 18 MB
    try:
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as client:
            await wait_for(lambda: uvicorn_server.started)
            async with client.stream("GET", "/events/stream") as stream:
                lines = stream.aiter_lines()
                assert await anext(lines) == "retry: 2000"
                await wait_for(lambda: len(app.state.live) == 1)
                (subscriber,) = app.state.live.subscribers[None]
                await until_listeners(database_url, 1)
                made = []
                most = 0
                for _ in range(20):  # the client reads nothing meanwhile
                    batch = await client.post(
                        "/tasks/batch", json={"tasks": [{"task_type": "big", "params": params}] * 15}
                    )
                    made += [task["task_id"] for task in batch.json()["tasks"]]
                    await asyncio.sleep(0.05)  # the listener fans the batch out
                    most = max(most, subscriber.pending_bytes)
                assert most <= live.MAX_PENDING_BYTES + 15 * 61_000  # one page past the cap, at most
                assert subscriber.lagging  # it gave up buffering: it reads the database when the client reads again
                seen = [item.json()["task_id"] async for item in take_messages(lines, until="TaskCreated", count=300)]
                assert seen == made  # every event, in order, once
    finally:
        uvicorn_server.should_exit = True
        await serving
    assert_verifies(database_url)


async def until_listeners(database_url: str, n: int) -> None:
    """Wait (5 s at most) until n listeners are registered for notifications."""
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        for _ in range(100):
            cur = await conn.execute("SELECT count(*) FROM live_listeners")
            if (registered := (await cur.fetchone())[0]) == n:  # type: ignore[index]
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{registered} listeners registered, not {n}")


def in_use(pool: AsyncConnectionPool) -> int:
    stats = pool.get_stats()
    return stats["pool_size"] - stats["pool_available"]


async def take_messages(lines: AsyncIterator[str], until: str, count: int = 1) -> AsyncIterator[Message]:
    """Messages up to the `count`th of type `until`."""
    async for item in aparse(lines):
        if isinstance(item, Message):
            yield item
            if item.event == until:
                count -= 1
                if not count:
                    return


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll until the condition holds (within 10 s): the server works on its own schedule."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        await asyncio.sleep(0.02)
