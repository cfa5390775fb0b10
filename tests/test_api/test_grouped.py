"""Group commit (grouped.py): single writes that queue share a statement, and each stays its own write."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable

import httpx
import psycopg
import pytest

from tasktrail import db, grouped, replicas, writer
from tasktrail.domain.task import CreateTask, Status, Task, UpdateTask
from tests.conftest import Server, assert_verifies, holding

pytestmark = pytest.mark.anyio

N = 12
POST = {"method": "POST", "state": {}}  # what the writes use of a request's scope


@contextlib.asynccontextmanager
async def writes_on(database_url: str) -> AsyncIterator[grouped.Writes]:
    """The writes of a process with one slot, on a pool of the test's database."""
    pool = db.create_pool(database_url)
    await pool.open()
    try:
        yield grouped.Writes(replicas.Replicas(database_url, pool), slots=1)
    finally:
        await pool.close()


async def queued_together(writes: grouped.Writes, calls: list[Awaitable[Task]]) -> list[Task | BaseException]:
    """Start the writes while the one slot is held, so that all of them queue; then let them go as one group."""
    async with writes.slot():
        sent = [asyncio.ensure_future(call) for call in calls]
        for _ in range(100):
            await asyncio.sleep(0)
        assert len(writes.queue) == len(calls), "the writes did not queue"
    return await asyncio.gather(*sent, return_exceptions=True)


def transactions(database_url: str) -> list[tuple[int, list[str]]]:
    """Each transaction that appended events, in order: how many, and their request ids."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT count(*), array_agg(metadata ->> 'request_id' ORDER BY position) "
            "FROM events GROUP BY transaction_id ORDER BY transaction_id"
        ).fetchall()
    return [(n, ids) for n, ids in rows]


async def created(writes: grouped.Writes, n: int) -> list[Task]:
    """n tasks, created alone (so this process knows them: their updates may go in a group)."""
    async with writes.replicas.writing(POST) as conn:
        return [await writer.create(conn, CreateTask("grouped"), {"request_id": f"setup-{i}"}) for i in range(n)]


async def test_queued_creates_and_updates_commit_together_each_as_its_own_request(database_url: str) -> None:
    async with writes_on(database_url) as writes:
        tasks = await created(writes, N)
        running = UpdateTask(status=Status.RUNNING, progress=10.0)
        calls = [
            writes.write(None, CreateTask("grouped", {"n": n}), {"request_id": f"create-{n}"}, POST) for n in range(N)
        ]
        calls += [writes.write(t.task_id, running, {"request_id": f"update-{t.task_id}"}, POST) for t in tasks]
        # One task twice: decided in the order they came, the second on the first's outcome.
        calls.append(writes.write(tasks[0].task_id, UpdateTask(progress=20.0), {"request_id": "again"}, POST))
        outcomes = await queued_together(writes, calls)

    new, updated, again = outcomes[:N], outcomes[N : 2 * N], outcomes[-1]
    assert [t.params for t in new] == [{"n": n} for n in range(N)]
    assert len({t.id for t in new}) == N  # each its own id, its creating event's position
    assert [(t.task_id, t.version, t.status) for t in updated] == [(t.task_id, 2, Status.RUNNING) for t in tasks]
    assert (again.version, again.progress, again.status) == (3, 20.0, Status.RUNNING)
    # One transaction holds all of them, and each event the metadata of the request that made it.
    size, request_ids = transactions(database_url)[-1]
    assert size == 2 * N + 1
    assert sorted(request_ids) == sorted(
        [f"create-{n}" for n in range(N)] + [f"update-{t.task_id}" for t in tasks] + ["again"]
    )
    with psycopg.connect(database_url) as conn:
        for n, task in enumerate(new):
            row = conn.execute("SELECT position, metadata FROM events WHERE stream_id = %s", (task.task_id,)).fetchone()
            assert row == (task.id, {"request_id": f"create-{n}"})
        for task in tasks:
            events = conn.execute(
                "SELECT metadata ->> 'request_id', data FROM events WHERE stream_id = %s ORDER BY version",
                (task.task_id,),
            ).fetchall()
            wanted = [("setup", None), (f"update-{task.task_id}", 10.0)] + [("again", 20.0)] * (task == tasks[0])
            assert [(r.split("-")[0] if r.startswith("setup") else r, d.get("progress")) for r, d in events] == wanted
    assert_verifies(database_url)


async def test_one_tasks_writes_keep_their_order_when_one_of_them_goes_alone(database_url: str) -> None:
    async with writes_on(database_url) as writes:
        (task,) = await created(writes, 1)
        # The first changes nothing by the guess, so it goes alone; the second must wait for it, not pass it.
        calls = [writes.write(task.task_id, UpdateTask(progress=0.0), {"request_id": "same"}, POST)]
        calls.append(writes.write(task.task_id, UpdateTask(progress=20.0), {"request_id": "next"}, POST))
        first, second = await queued_together(writes, calls)
    assert (first.version, first.progress, second.version, second.progress) == (1, 0.0, 2, 20.0)
    with psycopg.connect(database_url) as conn:
        final = conn.execute("SELECT version, progress FROM tasks WHERE task_id = %s", (task.task_id,)).fetchone()
    assert final == (2, 20.0)
    assert_verifies(database_url)


async def test_a_queue_goes_even_while_writes_that_go_alone_keep_every_slot(database_url: str) -> None:
    async with writes_on(database_url) as writes:
        held = writes.slot()
        async with writes.slot():  # e.g. a keyed create: never grouped, but it takes a slot
            queued = asyncio.ensure_future(writes.write(None, CreateTask("grouped"), {"request_id": "queued"}, POST))
            for _ in range(100):
                await asyncio.sleep(0)
            assert writes.queue
            await held.__aenter__()  # another takes the slot before the first gives it back
        try:
            task = await asyncio.wait_for(queued, 10)  # no group was being written: the queue went
        finally:
            await held.__aexit__(None, None, None)
    assert task.version == 1
    assert_verifies(database_url)


async def test_a_group_whose_guess_is_stale_writes_nothing_and_each_write_goes_alone(database_url: str) -> None:
    async with writes_on(database_url) as writes:
        (task,) = await created(writes, 1)
        async with writes.replicas.writing(POST) as conn:
            await writer.change(conn, task.task_id, UpdateTask(progress=5.0), {"request_id": "meanwhile"})
        writer._recent[task.task_id] = task  # as if another process had written version 2

        calls = [writes.write(task.task_id, UpdateTask(progress=7.0), {"request_id": "stale"}, POST)]
        calls += [writes.write(None, CreateTask("grouped"), {"request_id": f"create-{n}"}, POST) for n in range(3)]
        outcomes = await queued_together(writes, calls)

    assert (outcomes[0].version, outcomes[0].progress) == (3, 7.0)
    assert [t.version for t in outcomes[1:]] == [1, 1, 1]
    # The group rolled back whole (no event, no counter twice); then each committed alone.
    assert [n for n, _ in transactions(database_url)] == [1] * 6
    assert_verifies(database_url)


async def test_a_group_that_waits_for_a_lock_gives_up_and_each_write_waits_alone(database_url: str) -> None:
    async with writes_on(database_url) as writes:
        held, free = await created(writes, 2)
        # Another transaction holds one task's row for longer than IMPATIENT.
        with holding(database_url, "SELECT FROM tasks WHERE task_id = %s FOR UPDATE", [held.task_id]):
            progress = UpdateTask(progress=9.0)
            calls = [writes.write(t.task_id, progress, {"request_id": "x"}, POST) for t in (held, free)]
            sending = asyncio.ensure_future(queued_together(writes, calls))
            # The group gives up after 100 ms (IMPATIENT), and each write goes alone: the free task's
            # commits at once, well within the 5 s a write waits otherwise; the held one's waits on.
            for _ in range(200):
                if len(transactions(database_url)) == 3:
                    break
                await asyncio.sleep(0.01)
            assert not sending.done()
            assert [n for n, _ in transactions(database_url)] == [1, 1, 1]
        outcomes = await sending
    assert [(t.task_id, t.version) for t in outcomes] == [(held.task_id, 2), (free.task_id, 2)]
    assert [n for n, _ in transactions(database_url)] == [1, 1, 1, 1]
    assert_verifies(database_url)


async def test_under_load_a_real_server_groups_writes_and_loses_none(database_url: str, tmp_path) -> None:
    env = os.environ | {"DATABASE_URL": database_url, grouped.SLOTS_ENV: "1"}
    server = Server(env, log_dir=tmp_path)
    try:
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=32)) as http:
            created = await asyncio.gather(
                *(
                    http.post("/tasks/", json={"task_type": "load"}, headers={"X-Request-Id": f"c{k}"})
                    for k in range(64)
                )
            )
            assert {r.status_code for r in created} == {201}
            ids = [r.json()["task_id"] for r in created]
            updated = await asyncio.gather(
                *(
                    http.patch(
                        f"/tasks/{i}", json={"status": "running", "progress": p}, headers={"X-Request-Id": f"u{p}"}
                    )
                    for p in (1, 2)
                    for i in ids
                )
            )
            assert {r.status_code for r in updated} == {200}
            for k, task_id in enumerate(ids):
                events = (await http.get(f"/tasks/{task_id}/history")).json()["events"]
                assert [e["version"] for e in events] == [1, 2, 3]
                # Each event with its own request's id, its progress the one that request sent.
                assert events[0]["metadata"]["request_id"] == f"c{k}"
                assert sorted((e["metadata"]["request_id"], e["data"]["progress"]) for e in events[1:]) == [
                    ("u1", 1.0),
                    ("u2", 2.0),
                ]
            stats = (await http.get("/tasks/stats/summary")).json()
            assert (stats["total"], stats["running"]) == (64, 64)
    finally:
        assert server.stop() == 0
    assert max(n for n, _ in transactions(database_url)) > 1, "no writes were grouped"
    assert_verifies(database_url)


async def test_by_default_nothing_queues(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(grouped.SLOTS_ENV, raising=False)
    async with writes_on(database_url) as writes:
        writes = grouped.Writes(writes.replicas)  # as the app makes it
        assert writes.slots == 0
        async with writes.slot(), writes.slot():
            assert not writes.busy  # every write goes alone, as before group commit
