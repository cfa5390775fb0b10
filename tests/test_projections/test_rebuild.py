"""Rebuilding read models from the log while the service keeps writing, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from litestar.testing import AsyncTestClient
from psycopg import sql

from tasktrail import db, eventstore, projections, writer
from tasktrail.domain import events
from tasktrail.domain.events import ProgressReported
from tasktrail.domain.task import CreateTask, DeleteTask, Status, UpdateTask
from tasktrail.http.app import create_app
from tasktrail.projections import INLINE, ProjectionOutdated, follow, stats, tasks, versions
from tasktrail.projections import rebuild as rebuilding
from tasktrail.projections.rebuild import RebuildBusy, SwapFailed, prepare, rebuild
from tasktrail.verify import fold_log, verify
from tests.conftest import holding
from tests.test_projections import tasks_next

NOW, NEXT = tasks.VERSION, tasks_next.VERSION  # this code's version of tasks, the test-only next one

# Text that COPY and JSON both escape, and the separators the replay uses.
AWKWARD = 'C:\\dir\\"quoted"\tü€ \x1e\x1f\n end'


def connect(database_url: str, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection that sees this code's read-model versions, as a server process's do."""
    return psycopg.connect(database_url, **(db.connect_kwargs() | {"autocommit": autocommit}))


async def seed(database_url: str, n: int) -> list[UUID]:
    """n tasks through the real write path, with every kind of history."""
    made = []
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        for i in range(n):
            task = await writer.create(conn, CreateTask(task_type=f"t{i % 3}", params={"i": i, "path": AWKWARD}), {})
            made.append(task.task_id)
            moves: list[Any] = {
                0: [],
                1: [UpdateTask(status=Status.RUNNING, progress=30)],
                2: [UpdateTask(status=Status.RUNNING), UpdateTask(status=Status.COMPLETED, result={"ok": AWKWARD})],
                3: [
                    UpdateTask(status=Status.FAILED, error=AWKWARD),
                    UpdateTask(status=Status.PENDING),
                    UpdateTask(status=Status.RUNNING, progress=5),
                ],
                4: [
                    UpdateTask(status=Status.RUNNING),
                    UpdateTask(status=Status.PENDING),
                    UpdateTask(result={"partial": [1, 2]}),
                    UpdateTask(status=Status.CANCELED, error="stop"),
                ],
                5: [UpdateTask(status=Status.COMPLETED), DeleteTask()],
            }[i % 6]
            for move in moves:
                await writer.change(conn, task.task_id, move, {})
    return made


ROWS = "SELECT * FROM tasks ORDER BY id"
COUNTS = "SELECT task_type, status, sum(n) FROM task_counts GROUP BY 1, 2 HAVING sum(n) <> 0 ORDER BY 1, 2"
COLUMNS = """
SELECT column_name, data_type, is_nullable FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = %(table)s ORDER BY ordinal_position
"""
INDEXES = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = %(table)s"
CONSTRAINTS = "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %(table)s::regclass"
OPTIONS = "SELECT reloptions FROM pg_class WHERE oid = %(table)s::regclass"
TRIGGERS = "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = %(table)s::regclass AND NOT tgisinternal"
STATISTICS = """
SELECT stxname, stxnamespace = current_schema()::regnamespace, stxkind, stxkeys::text
FROM pg_statistic_ext WHERE stxrelid = %(table)s::regclass
"""
REGISTRY = "SELECT name, version, state FROM projection_versions ORDER BY name, version"
SCHEMA_EXISTS = "SELECT to_regnamespace(%(schema)s) IS NOT NULL"


def read_model(database_url: str) -> tuple[list[Any], list[Any]]:
    with connect(database_url) as conn:
        return conn.execute(ROWS).fetchall(), conn.execute(COUNTS).fetchall()


def schema(database_url: str) -> dict[str, Any]:
    with connect(database_url) as conn:
        return {
            (table, query): sorted(conn.execute(query, {"table": table}).fetchall(), key=repr)
            for table in ("tasks", "task_counts")
            for query in (COLUMNS, INDEXES, CONSTRAINTS, OPTIONS, TRIGGERS, STATISTICS)
        }


def registry(database_url: str) -> list[Any]:
    with connect(database_url) as conn:
        return conn.execute(REGISTRY).fetchall()


def new_schema_left(database_url: str, name: str = f"rm_tasks_v{NOW}_new") -> bool:
    with connect(database_url) as conn:
        return conn.execute(SCHEMA_EXISTS, {"schema": name}).fetchone()[0]


def test_a_fresh_database_gets_this_codes_versions_from_their_modules(database_url: str) -> None:
    """No migration makes a read model's tables: the modules' definitions do, once per version."""
    assert registry(database_url) == [("stats", 1, "live"), ("tasks", NOW, "live")]
    with connect(database_url) as conn:
        where = "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = %s::regclass"
        assert [conn.execute(where, (table,)).fetchone()[0] for table in ("tasks", "task_counts")] == [
            f"rm_tasks_v{NOW}",
            "rm_stats_v1",
        ]
    with psycopg.connect(database_url) as conn:  # without a version's search_path: views of the newest
        kinds = "SELECT relname, relkind FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'v'"
        assert sorted(conn.execute(kinds).fetchall()) == [("task_counts", "v"), ("tasks", "v")]
    # The pair statistics of a list filtered by status and task type, in the version's own schema.
    assert schema(database_url)[("tasks", STATISTICS)] == [("tasks_type_status", True, ["m"], "3 4")]


def test_a_rebuild_of_the_same_version_reproduces_the_read_model(database_url: str) -> None:
    asyncio.run(seed(database_url, 24))
    before, built = read_model(database_url), schema(database_url)

    done = rebuild(database_url, INLINE)

    assert (done.names, done.events, done.caught_up, done.position) == (["tasks", "stats"], 72, 0, 72)
    assert read_model(database_url) == before
    assert schema(database_url) == built, "the rebuilt tables differ from the ones first built"
    assert registry(database_url) == [("stats", 1, "live"), ("tasks", NOW, "live")]
    assert not new_schema_left(database_url)
    report = verify(database_url)
    assert report.ok, report.summary()


def test_a_rebuild_and_a_new_version_keep_what_a_role_of_its_own_was_granted(database_url: str) -> None:
    # Audit: a replica's reader role granted a version's schema lost it with the next schema (a rebuild, a
    # release), and its replica could read nothing. Each new schema now takes the grants of the one before.
    asyncio.run(seed(database_url, 3))
    role = f"reader_{uuid4().hex[:8]}"
    live, stats_schema = projections.schema(tasks.NAME, NOW), projections.schema(stats.NAME, stats.VERSION)
    with connect(database_url) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(live), sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT ON {}.tasks TO {}").format(sql.Identifier(live), sql.Identifier(role)))
    try:
        rebuild(database_url, INLINE)
        prepare(database_url, [tasks_next, stats])
        granted = """SELECT has_schema_privilege(%(role)s, %(schema)s, 'USAGE'),
                            has_table_privilege(%(role)s, %(schema)s || '.tasks', 'SELECT'),
                            has_table_privilege(%(role)s, %(schema)s || '.tasks', 'INSERT')"""
        with connect(database_url) as conn:
            for schema in (live, projections.schema(tasks.NAME, NEXT)):
                assert conn.execute(granted, {"role": role, "schema": schema}).fetchone() == (True, True, False)
            # What it was not granted, it does not get.
            never = "SELECT has_schema_privilege(%s, %s, 'USAGE')"
            assert conn.execute(never, (role, stats_schema)).fetchone() == (False,)
    finally:
        with connect(database_url) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_grants_that_cannot_be_copied_cost_no_rebuild(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(seed(database_url, 3))
    monkeypatch.setattr(rebuilding, "GRANTS", "SELECT 1 / 0")  # a refusal as they are looked up
    assert rebuild(database_url, INLINE).names == ["tasks", "stats"]
    assert "the grants of the version before were not looked up" in caplog.text
    # A grant refused costs that grant alone: the others are given, and the swap goes on.
    monkeypatch.setattr(rebuilding, "GRANTS", "SELECT unnest(ARRAY['GRANT NOTHING', 'SELECT 1'])")
    assert rebuild(database_url, INLINE).names == ["tasks", "stats"]
    assert "GRANT NOTHING (as on rm_tasks" in caplog.text
    assert verify(database_url).ok


def test_status_shows_every_version_its_state_and_who_uses_it(database_url: str) -> None:
    asyncio.run(seed(database_url, 3))
    found, head, _ = versions.status(database_url, [tasks_next, stats])
    assert [(v.name, v.version, v.state, v.behind, v.processes, v.code) for v in found] == [
        ("stats", 1, "live", 0, 0, True),
        ("tasks", NOW, "live", 0, 0, False),
        ("tasks", NEXT, "missing", 0, 0, True),
    ]
    assert head == 6
    with connect(database_url) as holder:
        versions.hold(holder, INLINE)
        found, _, _ = versions.status(database_url, INLINE)
        assert [v.processes for v in found] == [1, 1]
    found, _, _ = versions.status(database_url, INLINE)
    assert [v.processes for v in found] == [0, 0]


def test_only_the_named_read_model_is_rebuilt(database_url: str) -> None:
    asyncio.run(seed(database_url, 6))
    with connect(database_url) as conn:
        conn.execute("UPDATE task_counts SET n = n + 5")  # a broken counter: the rebuild must mend it
        tasks_oid = conn.execute("SELECT 'tasks'::regclass::oid").fetchone()
    assert not verify(database_url).ok

    rebuild(database_url, [stats])

    assert verify(database_url).ok
    with connect(database_url) as conn:
        assert conn.execute("SELECT 'tasks'::regclass::oid").fetchone() == tasks_oid


def test_the_replay_ends_at_the_number_of_events_though_positions_have_gaps(database_url: str) -> None:
    asyncio.run(seed(database_url, 6))
    with connect(database_url) as conn:  # as appends that lost a race leave them
        conn.execute("SELECT nextval(pg_get_serial_sequence('events', 'position')) FROM generate_series(1, 50)")
    asyncio.run(seed(database_url, 6))
    with connect(database_url) as conn:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    replayed: list[tuple[int, int]] = []

    def progress(step: str, done: int, total: int) -> None:
        if step == "replay":
            replayed.append((done, total))

    rebuild(database_url, INLINE, progress)
    assert replayed[-1] == (count, count)  # the bar ends full, at the events there were
    assert all(done <= total for done, total in replayed)


def test_catching_up_a_deleted_or_unknown_task_waits_for_no_round(database_url: str) -> None:
    """A worker reporting on a task an operator deleted must not queue on the follow lock: nothing can lag there."""
    (deleted,) = asyncio.run(seed(database_url, 1))

    async def catch_up() -> int:
        async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
            await writer.change(conn, deleted, DeleteTask(), {})
            await conn.execute("SET lock_timeout = '1s'")  # a round would wait for the lock held below
            return await follow.catch_up(conn, streams=[deleted, uuid4()])

    with holding(database_url, follow.LOCK, versions.key(versions.FOLLOWS, "tasks", NOW)):
        assert asyncio.run(catch_up()) == 0


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("step", ["replay", "load", "catch up"])
def test_an_interrupted_rebuild_leaves_the_live_model_alone_and_the_next_starts_over(
    database_url: str, step: str
) -> None:
    asyncio.run(seed(database_url, 12))
    before, migrated, registered = read_model(database_url), schema(database_url), registry(database_url)

    def interrupt(at: str, done: int, total: int) -> None:
        if at == step:
            raise Interrupted

    with pytest.raises(Interrupted):
        rebuild(database_url, INLINE, interrupt)

    assert (read_model(database_url), schema(database_url), registry(database_url)) == (before, migrated, registered)
    assert new_schema_left(database_url) == (step != "replay")  # the new schemas are committed once loaded

    rebuild(database_url, INLINE)
    assert not new_schema_left(database_url)
    assert read_model(database_url) == before
    assert verify(database_url).ok


def test_one_rebuild_at_a_time(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('tasktrail.rebuild'))")
        with pytest.raises(RebuildBusy):
            rebuild(database_url, INLINE)
        # Let go here: a closed connection's backend lets go of it a moment later (CI once saw it still held).
        other.execute("SELECT pg_advisory_unlock(hashtext('tasktrail.rebuild'))")
    assert rebuild(database_url, INLINE).names == ["tasks", "stats"]


def test_a_start_that_waits_for_another_process_s_rebuild_says_so(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Audit: a second N+1 process waited 13 s for the first one's build without a word."""
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('tasktrail.rebuild'))")
        with caplog.at_level("INFO", logger="tasktrail.rebuild"):
            waiting = threading.Thread(target=prepare, args=(database_url, INLINE))
            waiting.start()
            deadline = time.monotonic() + 30
            while "waiting for it to finish" not in caplog.text:
                assert time.monotonic() < deadline, "no word of the wait"
                time.sleep(0.02)
            assert waiting.is_alive()
    waiting.join(30)  # the lock went with the connection
    assert not waiting.is_alive()


def test_an_event_committed_late_with_a_lower_position_is_not_missed(database_url: str) -> None:
    """Positions are taken before commit: the swap must still wait for, and apply, the earlier one."""
    first, second, *_ = asyncio.run(seed(database_url, 6))  # both still pending
    with connect(database_url, autocommit=False) as late:
        # What a writer does in its transaction: append (position taken), then project.
        late_position = late.execute(
            "INSERT INTO events (stream_id, version, type, data, occurred_at)"
            " VALUES (%s, 2, 'TaskStarted', '{}', now()) RETURNING position",
            (first,),
        ).fetchone()[0]
        late.execute(
            "UPDATE tasks SET status = 'running', version = 2, started_at = now() WHERE task_id = %s", (first,)
        )
        asyncio.run(change(database_url, second, UpdateTask(status=Status.COMPLETED)))  # a later position, committed

        result: dict[str, Any] = {}
        rebuilding = threading.Thread(target=lambda: result.update(done=rebuild(database_url, INLINE)))
        rebuilding.start()
        wait_for_swap_to_block(database_url)
        late.commit()
        rebuilding.join()

    assert result["done"].caught_up == 1
    with connect(database_url) as conn:
        assert conn.execute("SELECT max(position) FROM events").fetchone()[0] > late_position
        row = conn.execute("SELECT status, version FROM tasks WHERE task_id = %s", (first,)).fetchone()
    assert row == ("running", 2)
    report = verify(database_url)
    assert report.ok, report.summary()


WAITING = "SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass AND mode = %(mode)s AND NOT granted"


def wait_for_swap_to_block(database_url: str) -> None:
    """Until the rebuild's swap waits for the lock on events (held by an append in flight)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        for _ in range(1200):
            if conn.execute(WAITING, {"mode": "ShareRowExclusiveLock"}).fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the swap never waited for the append in flight")


def test_a_swap_that_cannot_take_its_locks_rolls_back_and_tries_again(database_url: str) -> None:
    first, *_ = asyncio.run(seed(database_url, 6))  # still pending
    rounds: list[int] = []
    retrying = threading.Event()

    def on_progress(step: str, done: int, total: int) -> None:
        if step != "catch up":
            return
        rounds.append(done)
        if len(rounds) == 1:  # after the last catch-up round, so the (first) swap applies it
            with connect(database_url) as conn:
                conn.execute(START_FIRST, (first,))
        else:
            retrying.set()  # a second round comes only after a swap gave up

    with connect(database_url, autocommit=False) as reader:
        reader.execute("SELECT count(*) FROM tasks")  # a long read keeps the live table from being dropped
        result: dict[str, Any] = {}
        rebuilding = threading.Thread(target=lambda: result.update(done=rebuild(database_url, INLINE, on_progress)))
        rebuilding.start()
        assert retrying.wait(120), "the swap never gave up"
        reader.commit()
        rebuilding.join()

    assert rounds == [0, 1]
    assert result["done"].caught_up == 1
    with connect(database_url) as conn:
        assert conn.execute("SELECT status FROM tasks WHERE task_id = %s", (first,)).fetchone() == ("running",)
    report = verify(database_url)
    assert report.ok, report.summary()


def test_a_swap_that_never_takes_its_locks_gives_up_and_drops_what_it_built(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(seed(database_url, 6))
    before, registered = read_model(database_url), registry(database_url)
    monkeypatch.setattr(rebuilding, "SWAP_ATTEMPTS", 2)
    monkeypatch.setattr(rebuilding, "SWAP_LOCK_TIMEOUT", "50ms")
    held = holding(database_url, "SELECT * FROM tasks FOR UPDATE", seconds=60)  # an open transaction's locks
    with held, pytest.raises(SwapFailed, match="in 2 tries"):
        rebuild(database_url, INLINE)
    assert not new_schema_left(database_url)
    assert not new_schema_left(database_url, "rm_stats_v1_new")
    assert (read_model(database_url), registry(database_url)) == (before, registered)
    assert rebuild(database_url, INLINE).names == ["tasks", "stats"]
    assert verify(database_url).ok


START_FIRST = (
    "INSERT INTO events (stream_id, version, type, data, occurred_at)"
    " VALUES (%s, 2, 'TaskStarted', '{}', now()) RETURNING position"
)


async def change(database_url: str, task_id: UUID, command: Any) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        await writer.change(conn, task_id, command, {})


def upcast_progress(data: dict[str, Any]) -> dict[str, Any]:
    """ProgressReported once stored {"percent": 40}; it is {"progress": 40.0} now."""
    if "percent" in data:
        data = {k: v for k, v in data.items() if k != "percent"} | {"progress": float(data["percent"])}
    return data


def test_an_old_shape_event_is_upcast_when_replayed(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(events.UPCASTERS, "ProgressReported", upcast_progress)
    (task_id,) = asyncio.run(seed(database_url, 2))[:1]
    with connect(database_url) as conn:
        conn.execute(
            "INSERT INTO events (stream_id, version, type, data, occurred_at)"
            """ VALUES (%s, 2, 'ProgressReported', '{"percent": 40}', now())""",
            (task_id,),
        )

    rebuild(database_url, INLINE)

    with connect(database_url) as conn:
        assert conn.execute("SELECT progress, version FROM tasks WHERE task_id = %s", (task_id,)).fetchone() == (40, 2)
    stored = asyncio.run(read_stream(database_url, task_id))
    assert stored[-1].recorded.event == ProgressReported(progress=40.0)
    report = verify(database_url)
    assert report.ok, report.summary()


async def read_stream(database_url: str, task_id: UUID) -> list[eventstore.Stored]:
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        return await eventstore.read_stream(conn, task_id)


@pytest.mark.anyio
async def test_code_of_a_version_without_tables_is_refused_as_outdated_not_as_an_error(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process of a release whose version was never built (or was pruned):
    # its statement names tables that do not exist; nothing is appended.
    monkeypatch.setattr(projections, "INLINE", (tasks_next, stats))
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        with pytest.raises(ProjectionOutdated, match="restart"):
            await writer.create(conn, CreateTask(task_type="t"), {})
        cur = await conn.execute("SELECT count(*) FROM events")
        assert await cur.fetchone() == (0,)


class Writer(threading.Thread):
    """A process of release N writing through the real write path, until told to stop."""

    def __init__(self, database_url: str) -> None:
        super().__init__()
        self.database_url = database_url
        self.stop, self.written = threading.Event(), 0
        self.created: list[UUID] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc

    async def _run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url, **db.connect_kwargs()) as conn:
            while not self.stop.is_set():
                i = len(self.created)
                task = await writer.create(conn, CreateTask(task_type=f"w{i % 2}"), {})
                self.created.append(task.task_id)
                for status in (Status.RUNNING, Status.COMPLETED if i % 3 else Status.FAILED):
                    await writer.change(conn, task.task_id, UpdateTask(status=status), {})
                if i % 5 == 0:
                    await writer.change(conn, task.task_id, DeleteTask(), {})
                self.written += 1

    def wait_for(self, writes: int) -> None:
        target = self.written + writes
        while self.written < target:
            assert self.error is None, self.error
            time.sleep(0.01)


def test_a_new_version_is_built_while_the_old_release_writes_and_then_follows_it(database_url: str) -> None:
    """The next version of tasks adds duration_seconds; it is built beside this one, which stays as it was."""
    asyncio.run(seed(database_url, 30))
    service = Writer(database_url)
    service.start()
    try:
        service.wait_for(5)

        def hold_the_replay(step: str, done: int, total: int) -> None:
            if step in ("replay", "catch up"):
                service.wait_for(3)  # so events arrive after the replay's snapshot, and during the catch-up

        done = prepare(database_url, [tasks_next, stats], hold_the_replay)
        service.wait_for(5)  # this version keeps being written; the next one only follows
    finally:
        service.stop.set()
        service.join()
    assert service.error is None, service.error
    assert done.names == ["tasks"]
    assert done.caught_up > 0
    assert registry(database_url) == [("stats", 1, "live"), ("tasks", NOW, "live"), ("tasks", NEXT, "live")]

    with psycopg.connect(database_url, **db.connect_kwargs()) as conn:
        conn.execute(f"SET search_path = {projections.search_path([tasks_next, stats])}")
        before = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
    applied = asyncio.run(catch_up(database_url, [tasks_next, stats]))
    assert applied > 0  # what release N wrote since the next version went live; stats version 1 had it already

    report = verify(database_url, {"tasks": NEXT})
    assert report.ok, report.summary()
    assert verify(database_url).ok  # this version too
    with connect(database_url, autocommit=False) as conn:
        _, states = fold_log(conn)
        conn.execute(f"SET search_path = {projections.search_path([tasks_next, stats])}")
        durations = dict(conn.execute("SELECT task_id, duration_seconds FROM tasks").fetchall())
    live = {task_id: task for task_id, task in states.items() if task is not None}
    assert durations.keys() == live.keys()
    assert len(live) > before > 0
    assert {task_id: tasks_next.duration(task) for task_id, task in live.items()} == durations
    assert sum(d is not None for d in durations.values()) > len(service.created) // 2
    # This version's tables were left as they were: no duration there.
    with connect(database_url) as conn:
        assert "duration_seconds" not in [c.name for c in conn.execute("SELECT * FROM tasks LIMIT 0").description]


@pytest.mark.anyio
async def test_a_release_serves_once_its_version_has_what_the_other_release_wrote_since_the_build(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Audit: release N+1's first lists missed what release N wrote between the build and the start (0.5-1 s).
    await asyncio.to_thread(prepare, database_url, [tasks_next, stats])  # N+1's version, built
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        made = [await writer.create(conn, CreateTask(task_type="meanwhile"), {}) for _ in range(5)]  # release N
    monkeypatch.setattr(projections, "INLINE", (tasks_next, stats))
    async with AsyncTestClient(app=create_app(database_url)) as client:  # release N+1
        listed = await client.get("/tasks/", params={"task_type": "meanwhile"})
        assert [task["task_id"] for task in listed.json()] == [str(task.task_id) for task in made[::-1]]
        assert (await client.get("/tasks/stats/summary")).json()["total"] == 5
        assert (await client.get("/health/ready")).status_code == 200


async def catch_up(database_url: str, modules: tuple[Any, ...]) -> int:
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        await conn.execute(f"SET search_path = {projections.search_path(modules)}")
        return await follow.catch_up(conn, modules)


def test_a_round_with_no_event_since_its_checkpoint_writes_nothing(database_url: str) -> None:
    # Moving the checkpoint takes a transaction id, which changes the next round's snapshot: an idle
    # service wrote to the server twice a second for ever, and a paused replica looked behind it.
    asyncio.run(seed(database_url, 2))
    moved = "SELECT name, xmin::text, checkpoint::text FROM projection_versions ORDER BY name"

    async def rounds() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
            for _ in range(3):
                assert await follow.catch_up(conn) == 0

    asyncio.run(rounds())  # moves the checkpoints past the seed's events (the writer's own)
    with connect(database_url) as conn:
        before = conn.execute(moved).fetchall()
    asyncio.run(rounds())
    with connect(database_url) as conn:
        assert conn.execute(moved).fetchall() == before
    asyncio.run(seed(database_url, 1))  # an event: the next round moves past it
    asyncio.run(rounds())
    with connect(database_url) as conn:
        after = conn.execute(moved).fetchall()
    assert [row[2] for row in after] != [row[2] for row in before]


def test_a_version_being_rebuilt_is_in_use_so_prune_leaves_it_alone(database_url: str) -> None:
    # prune dropped the schema a `projections rebuild` was filling: the rebuild then failed on a view,
    # or put live a version that had no tables. Now the rebuild holds the version in use while it runs.
    asyncio.run(seed(database_url, 10))
    during = []

    def prune_meanwhile(step: str, done: int, total: int) -> None:
        if step == "replay" and not during:
            with pytest.raises(versions.InUse):
                versions.prune(database_url, "tasks", NEXT)
            during.append(versions.status(database_url, [tasks_next, stats])[2])

    assert prepare(database_url, [tasks_next, stats], prune_meanwhile).names == ["tasks"]
    assert during == [[]]  # the new tables being filled are not "left from an interrupted rebuild"
    assert ("tasks", NEXT, "live") in registry(database_url)
    assert verify(database_url, {"tasks": NEXT}).ok
    pruned = f"pruned tasks version {NEXT}: dropped schema rm_tasks_v{NEXT}"
    assert versions.prune(database_url, "tasks", NEXT) == pruned
    assert versions.prune(database_url, "tasks", NEXT) == f"tasks version {NEXT} was pruned already"
