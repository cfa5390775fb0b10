"""The `tasks` read model: one row per live task, and the reads it serves."""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import args_row
from psycopg.types.json import Jsonb

from tasktrail.domain.task import Status, Task
from tasktrail.projections import replayed
from tasktrail.projections.replayed import NULL, text

if TYPE_CHECKING:
    from tasktrail.projections import Change

NAME = "tasks"
# 1: migration 0002's table. 2: an index on (task_type, status, id), so a list
# filtered by both is a range of one index, not a scan of every task's row.
VERSION = 2

COLUMNS = (
    "id, task_id, task_type, status, progress, params, result, error, retry_count,"
    " created_at, updated_at, started_at, completed_at, version"
)

# What a rebuild needs: the tables this read model owns, created without their
# indexes (building those once after the bulk load is much faster than
# keeping them up to date row by row), and its rows from the tasks' states.
TABLES = ("tasks",)
CREATE = (
    """
    CREATE TABLE tasks (
        id           bigint           NOT NULL,
        task_id      uuid             NOT NULL,
        task_type    text             NOT NULL,
        status       text             NOT NULL,
        progress     double precision NOT NULL,
        params       jsonb,
        result       jsonb,
        error        text,
        retry_count  integer          NOT NULL,
        created_at   timestamptz      NOT NULL,
        updated_at   timestamptz      NOT NULL,
        started_at   timestamptz,
        completed_at timestamptz,
        version      integer          NOT NULL
    ) WITH (fillfactor = 80)
    """,
)
INDEXES = (  # built at the same time, so the keys first as plain unique indexes
    "CREATE UNIQUE INDEX tasks_pkey ON tasks (id)",
    "CREATE UNIQUE INDEX tasks_task_id_key ON tasks (task_id)",
    "CREATE INDEX tasks_type_id ON tasks (task_type, id)",
    "CREATE INDEX tasks_status_id ON tasks (status, id)",
    "CREATE INDEX tasks_type_status_id ON tasks (task_type, status, id)",
    "CREATE INDEX tasks_completed_at ON tasks (completed_at) WHERE completed_at IS NOT NULL",
)
AFTER_INDEXES = (
    "ALTER TABLE tasks ADD CONSTRAINT tasks_pkey PRIMARY KEY USING INDEX tasks_pkey",
    "ALTER TABLE tasks ADD CONSTRAINT tasks_task_id_key UNIQUE USING INDEX tasks_task_id_key",
    # How often each task type has each status: a list filtered by both is estimated by the pair,
    # not as if the two were independent (which makes a rare pair look common, see list_page).
    "CREATE STATISTICS tasks_type_status (mcv) ON task_type, status FROM tasks",
    # The columns queries filter and sort on; params and result are never searched, and
    # task_id only through its unique index, which tells the planner all it needs.
    "ANALYZE tasks (id, task_type, status, completed_at)",
)
# FREEZE: the rebuild makes the table in the same transaction, so its rows never need freezing later.
COPY = f"COPY tasks ({COLUMNS}) FROM STDIN (FORMAT BINARY, FREEZE)"
COPY_TYPES = (
    "int8", "uuid", "text", "text", "float8", "jsonb", "jsonb", "text", "int4",
    "timestamptz", "timestamptz", "timestamptz", "timestamptz", "int4",
)  # fmt: skip


def rows(tasks: Iterable[Task]) -> Iterator[tuple[Any, ...]]:
    """The COPY rows of the live tasks, in COLUMNS order."""
    for t in tasks:
        yield (
            t.id, t.task_id, t.task_type, t.status.value, t.progress, t.params, t.result, t.error,
            t.retry_count, t.created_at, t.updated_at, t.started_at, t.completed_at, t.version,
        )  # fmt: skip


# The fast rows put the fixed-width columns first, so that each row starts with
# one struct call (the number of fields, then each field's length and value):
# a third fewer instructions than packing each run of them where COLUMNS has it.
REPLAYED_COPY = (
    "COPY tasks (id, task_id, progress, retry_count, created_at, updated_at, version,"
    " task_type, status, params, result, error, started_at, completed_at) FROM STDIN (FORMAT BINARY, FREEZE)"
)
_FIXED = struct.Struct(">hiqi16sidiii8si8sii")
ROWS_PER_BLOCK = 2_000


def replayed_rows(states: Iterable[replayed.State]) -> Iterator[bytes]:
    """`rows` as REPLAYED_COPY's data, in blocks, from the replay's states (see projections.replayed)."""
    # The fast form of `rows`, held equal to it by test_replay.py: change both together.
    types: dict[str, bytes] = {}  # few task types and statuses, many rows
    statuses = {status: text(status.value) for status in Status}
    fixed, length, jsonb, encode = _FIXED.pack, replayed.LENGTH.pack, replayed.JSONB.pack, replayed.encode
    null, time, block = NULL, replayed.TIME, []
    for state in states:
        (id_, task_id, task_type, status, progress, params, result, error, retry_count,
         created_at, updated_at, started_at, completed_at, version) = state  # fmt: skip
        if (type_field := types.get(task_type)) is None:
            type_field = types[task_type] = text(task_type)
        params_json = None if params is None else encode(params)
        result_json = None if result is None else encode(result)
        error_text = None if error is None else error.encode()
        block += (  # a NULL is its length alone (-1), followed here by an empty value
            fixed(14, 8, id_, 16, task_id, 8, progress, 4, retry_count, 8, created_at, 8, updated_at, 4, version),
            type_field, statuses[status],
            null if params_json is None else jsonb(len(params_json) + 1, 1), params_json or b"",
            null if result_json is None else jsonb(len(result_json) + 1, 1), result_json or b"",
            null if error_text is None else length(len(error_text)), error_text or b"",
            null if started_at is None else time, started_at or b"",
            null if completed_at is None else time, completed_at or b"",
        )  # fmt: skip
        if len(block) >= ROWS_PER_BLOCK * 13:
            yield b"".join(block)
            block = []
    if block:
        yield b"".join(block)


# Its parts of a write's statement (see projections.statement): each task's
# state after the write, inserted or updated in place, and the deleted tasks'
# rows removed, for the tasks whose events were appended. A new task's id is
# its creating event's position, which the log assigns in the same statement:
# the state carries a placeholder until then.
PARTS = {
    "tasks": """
tasks_written AS (
    INSERT INTO tasks AS t (id, task_id, task_type, status, progress, params, result, error, retry_count,
                            created_at, updated_at, started_at, completed_at, version)
    SELECT coalesce(a.position, r.id), r.task_id, r.task_type, r.status, r.progress, r.params, r.result,
           r.error, r.retry_count, r.created_at, r.updated_at, r.started_at, r.completed_at, r.version
    FROM jsonb_to_recordset(%(write)s -> 'tasks') AS r(
        id bigint, task_id uuid, task_type text, status text, progress double precision, params jsonb,
        result jsonb, error text, retry_count integer, created_at timestamptz, updated_at timestamptz,
        started_at timestamptz, completed_at timestamptz, version integer)
    LEFT JOIN appended a ON a.stream_id = r.task_id AND a.version = 1
    WHERE EXISTS (SELECT FROM appended w WHERE w.stream_id = r.task_id)
    ON CONFLICT (task_id) DO UPDATE SET
        status = EXCLUDED.status, progress = EXCLUDED.progress, result = EXCLUDED.result,
        error = EXCLUDED.error, retry_count = EXCLUDED.retry_count, updated_at = EXCLUDED.updated_at,
        started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at, version = EXCLUDED.version
)""",
    "deleted": """
tasks_deleted AS (
    DELETE FROM tasks
    WHERE task_id IN (SELECT jsonb_array_elements_text(%(write)s -> 'deleted')::uuid)
      AND EXISTS (SELECT FROM appended w WHERE w.stream_id = tasks.task_id)
)""",
}


def document(changes: Sequence[Change]) -> dict[str, Any]:
    """PARTS' keys of the write document: the live tasks' final states, and the deleted tasks."""
    final: dict[UUID, Task | None] = {}
    for recorded, _, after in changes:
        final[recorded.stream_id] = after
    return {
        "tasks": [task for task in final.values() if task is not None],
        "deleted": [task_id for task_id, task in final.items() if task is None],
    }


_STATUS = {status.value: status for status in Status}  # a dict lookup is cheaper than Status(...) per row


def to_task(row: tuple[Any, ...]) -> Task:
    return Task(
        row[0], row[1], row[2], _STATUS[row[3]], row[4], row[5], row[6], row[7],
        row[8], row[9], row[10], row[11], row[12], row[13],
    )  # fmt: skip


GET = f"SELECT {COLUMNS} FROM tasks WHERE task_id = %(task_id)s"  # noqa: S608 -- COLUMNS is a constant


async def get(conn: psycopg.AsyncConnection, task_id: UUID) -> Task | None:
    cur = await conn.execute(GET, {"task_id": task_id})
    row = await cur.fetchone()
    return None if row is None else to_task(row)


# The list query is put together from these fixed pieces only; values are parameters.
LIST = "SELECT {} FROM tasks WHERE {} ORDER BY id DESC LIMIT %(limit)s OFFSET %(skip)s"
FILTERS = {
    "status": sql.SQL("status = %(status)s"),
    "task_type": sql.SQL("task_type = %(task_type)s"),
    "before": sql.SQL("id < %(before)s"),
}


class Listed(NamedTuple):
    """What the dashboard's list shows of a task (dashboard.routes.task_row): no params, result or error."""

    id: int
    task_id: UUID
    task_type: str
    status: str
    progress: float
    updated_at: datetime
    version: int


LISTED = ", ".join(Listed._fields)


def _list_query(columns: str, params: dict[str, Any]) -> sql.Composed:
    where = [FILTERS[name] for name in FILTERS if params[name] is not None] or [sql.SQL("true")]
    return sql.SQL(LIST).format(sql.SQL(columns), sql.SQL(" AND ").join(where))  # type: ignore[arg-type]


def _prepared(params: dict[str, Any]) -> bool | None:
    """Whether a list query may use a prepared plan: not one filtered by both status and task type.

    A pair the table holds a few of (3 running tasks of a type among 120,000) is found in
    tasks_type_status_id; but a plan made for any pair, as a prepared statement's is, walks
    the newest tasks along tasks_pkey until it has a page, through every task (25-45 ms at
    120,000 tasks, against 0.03 ms). Planned with the values, the pair's statistics choose.
    """
    return False if params["status"] is not None and params["task_type"] is not None else None


async def list_page(
    conn: psycopg.AsyncConnection,
    *,
    status: Status | None = None,
    task_type: str | None = None,
    before: int | None = None,
    skip: int = 0,
    limit: int = 100,
) -> list[Task]:
    """Live tasks newest first; `before` is the keyset cursor (an id)."""
    params = {"status": status, "task_type": task_type, "before": before, "skip": skip, "limit": limit}
    # Rows in the binary format: less converting on both sides (7% less CPU per page of 100).
    cur = await conn.execute(_list_query(COLUMNS, params), params, binary=True, prepare=_prepared(params))
    return [to_task(row) for row in await cur.fetchall()]


async def list_shown(
    conn: psycopg.AsyncConnection,
    *,
    status: Status | None = None,
    task_type: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[Listed]:
    """The same page as list_page, with only what a list shows (the dashboard's: params can be large)."""
    params = {"status": status, "task_type": task_type, "before": before, "skip": 0, "limit": limit}
    cur = conn.cursor(binary=True, row_factory=args_row(Listed))
    await cur.execute(_list_query(LISTED, params), params, prepare=_prepared(params))
    return await cur.fetchall()


# Where the page newer than a keyset page begins, for paging back (the dashboard's "Newer"): the id
# `skip` places above `after` (the newest id shown), the cursor whose page holds the `skip` tasks just
# above it; none when fewer are there, and the newest page is that page.
NEWER = "SELECT id FROM tasks WHERE {} ORDER BY id LIMIT 1 OFFSET %(skip)s"


async def newer_cursor(
    conn: psycopg.AsyncConnection, *, status: Status | None, task_type: str | None, after: int, limit: int
) -> int | None:
    """The `before` of the page of `limit` tasks just newer than `after`, in these filters; None: the newest."""
    params = {"status": status, "task_type": task_type, "after": after, "skip": limit}
    where = [FILTERS[name] for name in ("status", "task_type") if params[name] is not None]
    query = sql.SQL(NEWER).format(sql.SQL(" AND ").join([*where, sql.SQL("id > %(after)s")]))
    cur = await conn.execute(query, params, prepare=_prepared(params))
    row = await cur.fetchone()
    return None if row is None else row[0]


# Keyset-paged by (completed_at, id) along tasks_completed_at, so each page costs
# its own rows, however many are expired.
FINISHED_BEFORE = f"""
SELECT {COLUMNS} FROM tasks
WHERE completed_at < %(cutoff)s AND status = ANY(%(finished)s)
  AND (completed_at, id) > (%(after_at)s, %(after_id)s)
ORDER BY completed_at, id
LIMIT %(limit)s
"""  # noqa: S608 -- COLUMNS is a constant

# Where a page of finished_before starts: (completed_at, id) of the last task of the page before it.
FIRST_PAGE = (datetime.min.replace(tzinfo=UTC), 0)


async def finished_before(
    conn: psycopg.AsyncConnection,
    cutoff: datetime,
    finished: Iterable[Status],
    after: tuple[datetime, int],
    limit: int,
) -> list[Task]:
    """The tasks of these statuses completed before cutoff, oldest first, after `after`: at most `limit`."""
    params = {"cutoff": cutoff, "finished": [status.value for status in finished], "limit": limit}
    cur = await conn.execute(FINISHED_BEFORE, params | {"after_at": after[0], "after_id": after[1]})
    return [to_task(row) for row in await cur.fetchall()]


# The states of many tasks in one query, for a batch of changes; for each one
# not found, whether its stream ends deleted (so its 404 can say so, as a
# single request's does). A deleted stream's last event is its TaskDeleted: one
# step back along the (stream_id, version) index, and only for a task not found.
# (As an EXISTS over the stream's events, the planner may hash every TaskDeleted
# in the log instead.) Each task_id once, in any order.
GET_MANY = f"""
SELECT {COLUMNS}, wanted, last.type = 'TaskDeleted'
FROM (SELECT value::uuid FROM jsonb_array_elements_text(%(task_ids)s)) AS w (wanted)
LEFT JOIN tasks ON task_id = wanted
LEFT JOIN LATERAL (
    SELECT e.type FROM events e
    WHERE e.stream_id = wanted AND tasks.task_id IS NULL
    ORDER BY e.version DESC
    LIMIT 1
) last ON true
"""  # noqa: S608 -- COLUMNS is a constant


async def get_many(conn: psycopg.AsyncConnection, task_ids: Collection[UUID]) -> tuple[dict[UUID, Task], set[UUID]]:
    """The live tasks among task_ids by id, and those that were deleted."""
    # The ids as a JSON array: psycopg dumps a list of UUIDs one by one in Python (1.4 us each), msgspec in C.
    cur = await conn.execute(GET_MANY, {"task_ids": Jsonb(list(task_ids))}, binary=True)
    found, deleted = {}, set()
    for row in await cur.fetchall():
        if row[1] is not None:
            found[row[1]] = to_task(row)
        elif row[-1]:
            deleted.add(row[-2])
    return found, deleted
