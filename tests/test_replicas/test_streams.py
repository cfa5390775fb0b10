"""The feed and the live streams read from a replica: nothing missed, nothing repeated (SPEC §6, §13)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasktrail import db, eventstore, writer
from tasktrail.domain.task import CreateTask
from tasktrail.http.app import create_app
from tasktrail.replicas import HEADER, ON_PRIMARY
from tests.conftest import Server
from tests.replication import Pair
from tests.sse import Message, messages, parse
from tests.test_eventstore.test_feed import read_until
from tests.test_replicas.conftest import Database, replicated_database, until_serving

TIMEOUT = httpx.Timeout(30)


def feed_read_on_standby(pair: Pair, database: Database) -> bool:
    """Whether a session on the standby last ran the feed's query (pg_stat_activity: live, unlike the statistics)."""
    return any("AS held_back" in backend["query"] for backend in pair.standby_backends(database.name))


@pytest.fixture(scope="module")
def served(pair: Pair, template: str) -> Iterator[Database]:
    """One database for the module's server: its tests read only what they write after the feed's head."""
    with replicated_database(pair, template) as database:
        yield database


@pytest.fixture(scope="module")
def server(served: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server reading from the standby; it polls rarely, so the primary's notifications must wake it."""
    env = os.environ | {
        "DATABASE_URL": served.primary,
        "TASKTRAIL_POLL_SECONDS": "30",
        "TASKTRAIL_SSE_PING_SECONDS": "0.5",
    }
    serve_args = ("--replica", served.replica, "--replica-max-lag", "30")
    process = Server(env, log_dir=tmp_path_factory.mktemp("server"), serve_args=serve_args)
    wait_until_the_replica_serves(process.url)
    yield process.url
    assert process.stop(signal.SIGINT) == 0, process.log()


def wait_until_the_replica_serves(url: str) -> None:
    """Until the server's first health check of its replica: before it, every read goes to the primary."""
    deadline = time.monotonic() + 30
    while True:
        scraped = httpx.get(f"{url}/metrics").text
        states = {
            sample.labels["state"]
            for family in text_string_to_metric_families(scraped)
            for sample in family.samples
            if sample.name == "tasktrail_replica_state" and sample.value == 1
        }
        if states == {"serving"}:
            return
        assert time.monotonic() < deadline, f"the replica does not serve reads: {states}"
        time.sleep(0.05)


def test_a_task_stream_sees_every_event_while_the_standby_replays_or_pauses(
    server: str, pair: Pair, served: Database
) -> None:
    with httpx.Client(base_url=server, timeout=TIMEOUT) as http:
        made = http.post("/tasks/", json={"task_type": "streamed"})
        task_id = made.json()["task_id"]
        token = {HEADER: made.headers[HEADER]}
        with http.stream("GET", f"/tasks/{task_id}/stream", headers=token) as stream:
            lines = stream.iter_lines()
            (snapshot,) = messages(lines, 1)
            assert (snapshot.event, snapshot.json()["version"]) == ("snapshot", 1)
            for progress in range(1, 11):
                assert http.patch(f"/tasks/{task_id}", json={"progress": progress}).status_code == 200
            live = messages(lines, 10)
            # Looked at more than once: a session's last query may be another read's by the end.
            read_there = [feed_read_on_standby(pair, served)]
            with pair.paused():
                for progress in range(11, 16):
                    assert http.patch(f"/tasks/{task_id}", json={"progress": progress}).status_code == 200
            for progress in range(16, 21):
                assert http.patch(f"/tasks/{task_id}", json={"progress": progress}).status_code == 200
            http.patch(f"/tasks/{task_id}", json={"status": "completed"})
            rest = messages(lines)  # to the end: the server closes the stream after the finished status
            read_there.append(feed_read_on_standby(pair, served))
    got = live + rest
    assert [m.json()["version"] for m in got] == list(range(2, 23))
    assert [m.json()["data"].get("progress") for m in got[:20]] == list(range(1, 21))
    assert got[-1].event == "TaskCompleted"
    assert any(read_there), "no standby session ran the feed's query"  # the stream's events were read there


def test_a_stream_waits_for_no_paused_replica_longer_than_a_moment(server: str, pair: Pair) -> None:
    # The listener read the first replica until it was max_lag (here 30 s) behind: a paused replay kept
    # every stream silent that long, though the primary had the events. It now reads them there.
    with httpx.Client(base_url=server, timeout=TIMEOUT) as http, http.stream("GET", "/events/stream") as stream:
        items = parse(stream.iter_lines())

        def arrives(task_id: str) -> None:
            deadline = time.monotonic() + 10  # pings come every 0.5 s: the loop looks at the clock
            for item in items:
                if isinstance(item, Message) and item.json()["task_id"] == task_id:
                    return
                assert time.monotonic() < deadline, "the stream waited for the paused replica"

        arrives(http.post("/tasks/", json={"task_type": "before-the-pause"}).json()["task_id"])
        with pair.paused():
            for _ in range(3):
                arrives(http.post("/tasks/", json={"task_type": "paused-standby"}).json()["task_id"])


def test_the_global_stream_resumes_from_any_server_with_nothing_missed_or_repeated(server: str, pair: Pair) -> None:
    with httpx.Client(base_url=server, timeout=TIMEOUT) as http:
        start = http.get("/events", headers={HEADER: ON_PRIMARY}).json()["next_cursor"]
        made = http.post("/tasks/", json={"task_type": "resumed"}).json()
        with http.stream("GET", "/events/stream", params={"after": start}) as stream:
            lines = stream.iter_lines()
            for progress in (1, 2, 3):
                http.patch(f"/tasks/{made['task_id']}", json={"progress": progress})
            before = messages(lines, 3)
        with pair.paused():
            for progress in (4, 5, 6):
                http.patch(f"/tasks/{made['task_id']}", json={"progress": progress})
        with http.stream("GET", "/events/stream", headers={"Last-Event-ID": before[-1].id}) as stream:
            after = messages(stream.iter_lines(), 4)
        every = http.get("/events", params={"after": start}, headers={HEADER: ON_PRIMARY}).json()["events"]
    assert [m.json() for m in before + after] == every
    assert [e["data"].get("progress") for e in every] == [None, 1, 2, 3, 4, 5, 6]


@pytest.mark.anyio
async def test_feed_pages_from_the_replica_and_the_primary_join_without_gaps(pair: Pair, database: Database) -> None:
    from litestar.testing import AsyncTestClient

    app = create_app(database.primary, replica_urls=[database.replica], replica_max_lag=60)
    async with AsyncTestClient(app=app) as client:
        await until_serving(client)
        task = (await client.post("/tasks/", json={"task_type": "paged"})).json()
        for progress in (1, 2):
            await client.patch(f"/tasks/{task['task_id']}", json={"progress": progress})
        pair.wait_replayed()
        with pair.paused():
            for progress in (3, 4):
                written = await client.patch(f"/tasks/{task['task_id']}", json={"progress": progress})
            # The replica's feed ends before the paused writes; its cursor goes on at the primary.
            first = (await client.get("/events")).json()
            second = (
                await client.get("/events", params={"after": first["next_cursor"]}, headers={HEADER: ON_PRIMARY})
            ).json()
            # And a cursor from the primary, read at the lagging replica, waits there: no event twice.
            behind = (await client.get("/events", params={"after": second["next_cursor"]})).json()
            token = {HEADER: written.headers[HEADER]}
            whole = (await client.get("/events", headers=token)).json()
        assert [e["data"].get("progress") for e in first["events"]] == [None, 1, 2]
        assert [e["data"].get("progress") for e in second["events"]] == [3, 4]
        assert first["events"] + second["events"] == whole["events"]
        assert (behind["events"], behind["next_cursor"]) == ([], second["next_cursor"])


@pytest.mark.anyio
async def test_a_transaction_open_on_the_primary_holds_the_standby_feed_back(pair: Pair, database: Database) -> None:
    """A standby's snapshot lists no open transaction by id: its horizon is its xmin, never past one still open."""
    slow = await psycopg.AsyncConnection.connect(database.primary, **db.connect_kwargs())
    fast = await psycopg.AsyncConnection.connect(database.primary, **db.connect_kwargs())
    standby = await psycopg.AsyncConnection.connect(database.replica, **db.connect_kwargs())
    async with slow, fast, standby:
        async with slow.transaction():
            early = await writer.create(slow, CreateTask(task_type="early"), {})  # stays open
            late = await writer.create(fast, CreateTask(task_type="late"), {})
            pair.wait_replayed()
            page = await eventstore.read_feed(standby)
            assert (page.events, page.held_back) == ([], True)
            assert await eventstore.head(standby) <= page.next_after
        pair.wait_replayed()
        seen = await read_until(standby, 2, page.next_after)
    assert [event.stored.recorded.stream_id for event in seen] == [early.task_id, late.task_id]


def test_a_task_stream_resumed_past_its_end_is_told_so_though_the_replica_has_not_seen_the_end(
    server: str, pair: Pair
) -> None:
    """EventSource reconnects after the end with the finishing event's id, and no read-after token."""
    with httpx.Client(base_url=server, timeout=TIMEOUT) as http:
        head = http.get("/events", headers={HEADER: ON_PRIMARY}).json()["next_cursor"]
        task_id = http.post("/tasks/", json={"task_type": "ended"}).json()["task_id"]
        with pair.paused():  # the standby still serves (max lag 30 s), and sees the task unfinished
            done = http.patch(f"/tasks/{task_id}", json={"status": "completed"})
            events = http.get("/events", params={"after": head}, headers={HEADER: done.headers[HEADER]}).json()
            last = [event for event in events["events"] if event["task_id"] == task_id][-1]
            assert last["type"] == "TaskCompleted"
            with http.stream("GET", f"/tasks/{task_id}/stream", headers={"Last-Event-ID": last["cursor"]}) as resumed:
                assert resumed.status_code == 204  # not a stream that waits for an end already past
