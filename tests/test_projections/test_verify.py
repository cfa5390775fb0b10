"""`verify` folds the log and names the first place the read model or counters disagree."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import types
from datetime import UTC, datetime
from uuid import uuid4

import anyio
import psycopg
import pytest
from psycopg import sql

from tasktrail import db, projections, writer
from tasktrail import verify as verifying
from tasktrail.domain.events import Recorded, TaskCreated
from tasktrail.domain.task import CreateTask, Status, UpdateTask, evolve
from tasktrail.projections import INLINE, follow, stats, tasks
from tasktrail.projections.rebuild import prepare, rebuild
from tasktrail.verify import verify
from tests.test_projections import tasks_next

pytestmark = pytest.mark.anyio


async def seed(conn: psycopg.AsyncConnection) -> list:
    made = [await writer.create(conn, CreateTask(task_type=f"t{i % 2}", params={"i": i}), {}) for i in range(5)]
    await writer.change(conn, made[0].task_id, UpdateTask(status=Status.RUNNING, progress=10), {})
    await writer.change(conn, made[1].task_id, UpdateTask(status=Status.COMPLETED, result={"ok": True}), {})
    await writer.change(conn, made[2].task_id, UpdateTask(status=Status.FAILED, error="x"), {})
    await writer.change(conn, made[2].task_id, UpdateTask(status=Status.PENDING), {})
    await writer.change(conn, made[3].task_id, writer.DeleteTask(), {})
    return made


async def test_a_consistent_database_verifies(conn: psycopg.AsyncConnection, database_url: str) -> None:
    await seed(conn)
    report = verify(database_url)
    assert report.ok, report.summary()
    assert (report.events, report.streams, report.live) == (10, 5, 4)
    assert "match" in report.summary()


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        ("UPDATE tasks SET progress = 99 WHERE task_type = 't0' AND status = 'running'", "progress: read model 99.0"),
        ("UPDATE task_counts SET n = n + 1 WHERE status = 'completed'", "counter t1/completed is 2, the log says 1"),
        # As the API shows them (audit: <Status.RUNNING: 'running'>, datetime.datetime(2026, 12, 5, ...)).
        ("UPDATE tasks SET status = 'pending' WHERE status = 'running'", 'status: read model "pending", log "running"'),
        (
            "UPDATE tasks SET completed_at = '2001-02-03 04:05:06+00' WHERE status = 'completed'",
            'completed_at: read model "2001-02-03T04:05:06Z", log "20',
        ),
        ("DELETE FROM tasks WHERE status = 'completed'", "missing from the read model"),
        # Equal to Python's ==, three values to a reader of the API.
        (
            """UPDATE tasks SET params = '{"i": 1.0}' WHERE params = '{"i": 1}'""",
            'params: read model {"i":1.0}, log {"i":1}',
        ),
        ("""UPDATE tasks SET params = '{"i": true}' WHERE params = '{"i": 1}'""", 'params: read model {"i":true}'),
        ("""UPDATE tasks SET result = '{"ok": 1}' WHERE status = 'completed'""", 'result: read model {"ok":1}'),
    ],
)
async def test_a_difference_is_named(conn: psycopg.AsyncConnection, database_url: str, tamper: str, named: str) -> None:
    await seed(conn)
    await conn.execute(tamper)
    report = verify(database_url)
    assert not report.ok
    assert named in report.summary()


async def test_a_task_the_log_deleted_is_a_difference(conn: psycopg.AsyncConnection, database_url: str) -> None:
    made = await seed(conn)
    await conn.execute(
        "INSERT INTO tasks SELECT 999, %s, 't1', 'pending', 0, NULL, NULL, NULL, 0, now(), now(), NULL, NULL, 2",
        (made[3].task_id,),
    )
    assert "was deleted in the log" in verify(database_url).summary()


async def test_the_verify_command_exits_non_zero_on_a_difference(
    conn: psycopg.AsyncConnection, database_url: str
) -> None:
    await seed(conn)
    code, out = await run_verify(database_url)
    assert (code, "match" in out) == (0, True)
    await conn.execute("UPDATE tasks SET retry_count = 7")
    code, out = await run_verify(database_url)
    assert code == 1
    assert "first difference" in out
    assert "retry_count" in out
    # A version with no tables: nothing is compared, and the summary does not count a log it never read.
    code, out = await run_verify(database_url, "--version", "tasks=9")
    assert code == 1
    assert out.startswith("nothing compared: read model tasks version 9 has no tables"), out
    assert "events in" not in out


async def run_verify(database_url: str, *args: str) -> tuple[int, str]:
    env = os.environ | {"DATABASE_URL": database_url}
    done = await anyio.run_process([sys.executable, "-m", "tasktrail", "verify", *args], env=env, check=False)
    return done.returncode, done.stdout.decode()


async def test_a_rebuild_that_swaps_while_verify_runs_is_no_difference(
    conn: psycopg.AsyncConnection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: verify during a rebuild named a false difference (the swap's new tables, loaded frozen, are
    visible to verify's older snapshot, and newer than the log it folded)."""
    made = await seed(conn)
    folds = []

    fold = verifying.fold_kept

    def fold_then_write_and_swap(connection: psycopg.Connection, versions: dict[str, int]) -> object:
        folded = fold(connection, versions)
        if not folds:  # the first comparison only: a write after its snapshot, then a rebuild's swap

            def write_and_rebuild() -> None:
                async def change() -> None:
                    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as other:
                        await writer.change(other, made[0].task_id, UpdateTask(progress=55), {})

                asyncio.run(change())
                rebuild(database_url, INLINE)

            thread = threading.Thread(target=write_and_rebuild)
            thread.start()
            thread.join()
        folds.append(folded)
        return folded

    monkeypatch.setattr(verifying, "fold_kept", fold_then_write_and_swap)
    report = verify(database_url)
    assert report.ok, report.summary()
    assert len(folds) == 2  # compared again after the swap
    assert report.events == 11


async def test_a_version_is_compared_with_the_log_as_far_as_its_followers_have_applied_it(
    database_url: str,
) -> None:
    # Audit: during a deploy, verify of a version the other release feeds named its last milliseconds of
    # writes as differences (missing, or another status), and after the old release stopped, its version
    # (followed by no one) as "missing ... (and 546 more)", not as behind.
    await asyncio.to_thread(prepare, database_url, [tasks_next, stats])
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        await seed(conn)  # this release: the next version has none of it until its followers run
    report = verify(database_url, {"tasks": tasks_next.VERSION})
    assert report.ok, report.summary()
    assert report.behind == {f"tasks version {tasks_next.VERSION}": 10}
    assert f"(events not yet: tasks version {tasks_next.VERSION} 10)" in report.summary()
    assert report.events == 10
    assert verify(database_url).ok  # this code's version: every event, written inline
    assert verify(database_url).behind == {}
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        await conn.execute(f"SET search_path = {projections.search_path([tasks_next, stats])}")
        assert await follow.catch_up(conn, [tasks_next, stats]) == 10
    report = verify(database_url, {"tasks": tasks_next.VERSION})
    assert (report.ok, report.behind, report.live) == (True, {}, 4)
    # A difference is still one: a row of an applied event, changed.
    table = sql.Identifier(projections.schema("tasks", tasks_next.VERSION), "tasks")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET progress = 12.5").format(table))
    assert "progress: read model 12.5" in verify(database_url, {"tasks": tasks_next.VERSION}).summary()


async def test_a_column_a_new_version_adds_is_compared_too(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The next tasks version adds duration_seconds: verify compared this version's columns only, so a
    # wrong duration verified. With the next version's code (a process of release N+1), its own count too.
    monkeypatch.setattr(projections, "INLINE", (tasks_next, stats))
    await asyncio.to_thread(prepare, database_url, [tasks_next, stats])
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        await seed(conn)
        timed = await writer.create(conn, CreateTask(task_type="timed"), {})
        await writer.change(conn, timed.task_id, UpdateTask(status=Status.RUNNING), {})
        await writer.change(conn, timed.task_id, UpdateTask(status=Status.COMPLETED), {})
    report = verify(database_url)
    assert report.ok, report.summary()
    assert report.versions == {"tasks": tasks_next.VERSION, "stats": 1}
    with psycopg.connect(database_url, autocommit=True) as conn:
        table = sql.Identifier(projections.schema("tasks", tasks_next.VERSION), "tasks")
        conn.execute(sql.SQL("UPDATE {} SET duration_seconds = 987654 WHERE task_type = 'timed'").format(table))
    report = verify(database_url)
    assert not report.ok
    assert f"task {timed.task_id}: duration_seconds: read model 987654.0" in report.summary()
    # Without the next version's code nothing says what the column should hold: this one's columns are compared.
    monkeypatch.setattr(projections, "INLINE", (tasks, stats))
    assert verify(database_url, {"tasks": tasks_next.VERSION}).ok


def test_an_added_column_compares_as_sql_has_it_and_json_as_json() -> None:
    """A whole number a version's rows() gives for a double precision column reads back as 0.0: no difference."""
    version = types.SimpleNamespace(
        COLUMNS=f"{tasks.COLUMNS}, seconds, extra",
        rows=lambda given: [(*next(tasks.rows(given)), 0, {"n": 1})],
    )
    task = evolve(None, Recorded(uuid4(), 1, 1, datetime.now(UTC), TaskCreated(task_type="t")))
    assert verifying._added_diff(version, verifying.columns(version), task, {"seconds": 0.0, "extra": {"n": 1}}) == ""
    assert verifying._added_diff(version, verifying.columns(version), task, {"seconds": 0.5, "extra": {"n": 1.0}}) == (
        'seconds: read model 0.5, log 0, extra: read model {"n":1.0}, log {"n":1}'
    )
