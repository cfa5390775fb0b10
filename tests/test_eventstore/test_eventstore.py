"""The event log on a real PostgreSQL: append-only, versioned, atomic with its projections."""

from __future__ import annotations

import multiprocessing
from uuid import UUID, uuid4

import psycopg
import pytest

from tasktrail import db, eventstore, migrations, writer
from tasktrail.domain.events import Event, Recorded, TaskCreated, TaskStarted
from tasktrail.domain.task import CreateTask, Status, TransitionRejected, UpdateTask
from tasktrail.projections import stats
from tasktrail.projections import tasks as tasks_view

pytestmark = pytest.mark.anyio


async def count(conn: psycopg.AsyncConnection, table: str) -> int:
    cur = await conn.execute({"events": "SELECT count(*) FROM events", "tasks": "SELECT count(*) FROM tasks"}[table])
    return (await cur.fetchone())[0]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET type = 'X'",
        "DELETE FROM events",
        "DELETE FROM events WHERE false",
        "TRUNCATE events",
    ],
)
async def test_the_log_refuses_changes(conn: psycopg.AsyncConnection, statement: str) -> None:
    await writer.create(conn, CreateTask(task_type="t"), {})
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        await conn.execute(statement)
    assert await count(conn, "events") == 1


async def test_the_log_refuses_changes_even_as_a_replica(conn: psycopg.AsyncConnection) -> None:
    await conn.execute("SET session_replication_role = replica")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await conn.execute("DELETE FROM events")


async def append(conn: psycopg.AsyncConnection, stream: UUID, version: int, event: Event, **metadata: str) -> None:
    await eventstore.append(conn, [Recorded(stream, version, 0, writer.now(), event)], metadata)


async def test_versions_are_unique_per_stream(conn: psycopg.AsyncConnection) -> None:
    stream = uuid4()
    await append(conn, stream, 1, TaskCreated(task_type="t"), request_id="a")
    with pytest.raises(eventstore.VersionConflict):
        await append(conn, stream, 1, TaskStarted())
    await append(conn, stream, 2, TaskStarted())
    stored = await eventstore.read_stream(conn, stream)
    assert [s.recorded.version for s in stored] == [1, 2]
    assert [type(s.recorded.event) for s in stored] == [TaskCreated, TaskStarted]
    assert stored[0].metadata == {"request_id": "a"}
    assert stored[0].recorded.position < stored[1].recorded.position
    assert [s.recorded.version for s in await eventstore.read_stream(conn, stream, after_version=1)] == [2]
    assert await count(conn, "events") == 2


async def test_the_log_numbers_events_in_append_order(conn: psycopg.AsyncConnection) -> None:
    created = [Recorded(uuid4(), 1, 0, writer.now(), TaskCreated(task_type=f"t{i}")) for i in range(3)]
    first = await eventstore.append(conn, created, {})
    (second,) = await eventstore.append(conn, [Recorded(created[0].stream_id, 2, 0, writer.now(), TaskStarted())], {})
    assert first == sorted(first)
    assert len(set(first)) == 3
    assert second > first[-1]
    stored = [(await eventstore.read_stream(conn, r.stream_id, limit=1))[0].recorded for r in created]
    assert [r.position for r in stored] == first
    assert [r.event for r in stored] == [r.event for r in created]


async def test_an_accepted_write_is_one_event_with_its_projections(conn: psycopg.AsyncConnection) -> None:
    task = await writer.create(conn, CreateTask(task_type="import", params={"a": 1}), {"request_id": "r1"})
    assert (await count(conn, "events"), await count(conn, "tasks")) == (1, 1)
    started = await writer.change(conn, task.task_id, UpdateTask(status=Status.RUNNING), {})
    assert started is not None
    assert started.version == 2
    assert await count(conn, "events") == 2
    assert await tasks_view.get(conn, task.task_id) == started
    assert (await stats.summary(conn))["running"] == 1
    assert (await stats.summary(conn, "import"))["total"] == 1
    assert (await stats.summary(conn, "other"))["total"] == 0


async def test_a_refused_write_appends_nothing(conn: psycopg.AsyncConnection) -> None:
    task = await writer.create(conn, CreateTask(task_type="t"), {})
    await writer.change(conn, task.task_id, UpdateTask(status=Status.COMPLETED), {})
    with pytest.raises(TransitionRejected):
        await writer.change(conn, task.task_id, UpdateTask(status=Status.RUNNING), {})
    no_op = await writer.change(conn, task.task_id, UpdateTask(status=Status.COMPLETED), {})
    assert no_op is not None
    assert no_op.version == 2
    assert await count(conn, "events") == 2


async def test_a_failing_projection_rolls_the_event_back(conn: psycopg.AsyncConnection) -> None:
    task = await writer.create(conn, CreateTask(task_type="t"), {})
    # Break the read model's write so the projection fails inside the append's transaction.
    await conn.execute("ALTER TABLE tasks ADD CONSTRAINT no_running CHECK (status <> 'running')")
    with pytest.raises(psycopg.errors.CheckViolation):
        await writer.change(conn, task.task_id, UpdateTask(status=Status.RUNNING), {})
    assert await count(conn, "events") == 1
    assert (await stats.summary(conn))["pending"] == 1


def _migrate(url: str) -> list[str]:
    return migrations.migrate(url)


def test_migrations_apply_once_even_from_two_processes(server_url: str) -> None:
    name = f"tasktrail_mig_{uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    try:
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            results = pool.map(_migrate, [url, url])
        every = [file_name for _, file_name, _ in migrations.available()]
        assert sorted(results[0] + results[1]) == every  # each file applied by exactly one process
        assert migrations.migrate(url) == []  # and a third run has nothing to do
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))


async def test_writers_on_different_connections_count_on_different_rows(database_url: str) -> None:
    # Open connections until two land on different shards (pids differ modulo the shard count).
    connections: list[psycopg.AsyncConnection] = []
    try:
        while len({c.info.backend_pid % stats.SHARDS for c in connections}) < 2:
            connections.append(await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()))
        first = connections[0]
        second = next(
            c for c in connections if c.info.backend_pid % stats.SHARDS != first.info.backend_pid % stats.SHARDS
        )
        for conn in (first, second):
            await writer.create(conn, CreateTask(task_type="hot"), {})
        cur = await first.execute("SELECT shard, n FROM task_counts WHERE task_type = 'hot' ORDER BY shard")
        rows = await cur.fetchall()
        assert len(rows) == 2  # one row each: neither writer waited on the other's row
        assert [n for _, n in rows] == [1, 1]
        assert (await stats.summary(first, "hot"))["pending"] == 2
    finally:
        for conn in connections:
            await conn.close()


async def versions(conn: psycopg.AsyncConnection, task_id: UUID) -> list[int]:
    return [s.recorded.version for s in await eventstore.read_stream(conn, task_id)]


async def test_a_stale_guess_loses_the_race_and_the_task_is_read_afresh(conn: psycopg.AsyncConnection) -> None:
    task = await writer.create(conn, CreateTask(task_type="t"), {})
    await writer.change(conn, task.task_id, UpdateTask(status=Status.RUNNING), {})
    await writer.change(conn, task.task_id, UpdateTask(progress=10), {})
    # As if another process had written the last two versions: this one's guess is version 1.
    writer._recent[task.task_id] = task
    after = await writer.change(conn, task.task_id, UpdateTask(progress=20), {})
    assert after is not None
    assert (after.version, after.status, after.progress) == (4, Status.RUNNING, 20)
    assert await versions(conn, task.task_id) == [1, 2, 3, 4]
    assert await tasks_view.get(conn, task.task_id) == after


async def test_a_guess_that_refuses_is_checked_against_the_read_model(conn: psycopg.AsyncConnection) -> None:
    task = await writer.create(conn, CreateTask(task_type="t"), {})
    failed = await writer.change(conn, task.task_id, UpdateTask(status=Status.FAILED), {})
    # Stale: another process has since retried the task (failed -> pending).
    await writer.change(conn, task.task_id, UpdateTask(status=Status.PENDING), {})
    writer._recent[task.task_id] = failed
    started = await writer.change(conn, task.task_id, UpdateTask(status=Status.RUNNING), {})
    assert started is not None
    assert (started.version, started.status) == (4, Status.RUNNING)
    # And one that changes nothing by the guess is checked too.
    writer._recent[task.task_id] = failed
    same = await writer.change(conn, task.task_id, UpdateTask(status=Status.RUNNING), {})
    assert same == started
    assert await versions(conn, task.task_id) == [1, 2, 3, 4]


async def test_the_guesses_hold_a_bounded_size_of_documents_not_only_a_number_of_tasks(
    conn: psycopg.AsyncConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit: 10,000 guesses of tasks with 64 KiB params held 700 MB in one process, and never gave it back."""
    monkeypatch.setattr(writer, "RECENT_BYTES", 1 << 20)
    big = {"b": "x" * 60_000}
    made = [await writer.create(conn, CreateTask(task_type="big", params=big), {}) for _ in range(30)]
    assert writer._recent.size <= 1 << 20
    assert [t.task_id in writer._recent for t in made[-16:]] == [True] * 16  # the newest stay
    assert made[0].task_id not in writer._recent  # the oldest made way
    small = await writer.create(conn, CreateTask(task_type="small", params={"n": 1}), {})
    assert small.task_id in writer._recent
    # A task forgotten is read afresh: its update is none the worse.
    after = await writer.change(conn, made[0].task_id, UpdateTask(progress=5, result={"r": "y" * 60_000}), {})
    assert after is not None
    assert (after.version, after.progress, after.params) == (2, 5, big)
    assert writer._recent.size <= 1 << 20
    writer._recent.pop(after.task_id)
    size = writer._recent.size
    writer._recent[after.task_id] = after  # params and result: about 120 KB
    assert 120_000 < writer._recent.size - size < 121_000


async def test_a_write_rolled_back_by_the_caller_is_not_remembered(conn: psycopg.AsyncConnection) -> None:
    task = await writer.create(conn, CreateTask(task_type="t"), {})
    async with conn.transaction(force_rollback=True):
        await writer.change(conn, task.task_id, UpdateTask(status=Status.RUNNING), {})
    after = await writer.change(conn, task.task_id, UpdateTask(progress=5), {})
    assert after is not None
    assert (after.version, after.status) == (2, Status.PENDING)
    assert await versions(conn, task.task_id) == [1, 2]
