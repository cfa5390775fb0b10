"""EXPERIMENT, not tasktrail code: one statement per write, patched in at interpreter start.

With this folder on PYTHONPATH, tasktrail.writer._commit sends a single-command
write as ONE statement in autocommit (data-modifying CTEs: the event, the tasks
row, the counter deltas) instead of BEGIN; INSERT; INSERT/UPDATE; INSERT; COMMIT.
It measures what that change would gain before it is made in src/:

    uv run python bench/ab.py --b-env PYTHONPATH=$PWD/bench/experiments/one_statement
"""

import msgspec
import psycopg
from psycopg.types.json import Jsonb

import tasktrail.writer as writer
from tasktrail import eventstore
from tasktrail.domain.events import Recorded, to_data, type_of
from tasktrail.domain.task import decide, evolve
from tasktrail.projections import stats
from tasktrail.projections import tasks as tasks_view

_original = writer._commit

EVENT = """e AS (
  INSERT INTO events (stream_id, version, type, data, metadata, occurred_at)
  VALUES (%(stream_id)s, %(version)s, %(type)s, %(data)s, %(metadata)s, %(occurred_at)s)
  RETURNING position)"""
COUNTS = """c AS (
  INSERT INTO task_counts AS c (task_type, status, shard, n)
  SELECT d.task_type, d.status, %(shard)s, d.n
  FROM e, unnest(%(task_types)s::text[], %(statuses)s::text[], %(deltas)s::bigint[]) AS d(task_type, status, n)
  ON CONFLICT (task_type, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n)"""
ROW = {
    "insert": f"""t AS (INSERT INTO tasks ({tasks_view.COLUMNS})
  SELECT e.position, %(task_id)s, %(task_type)s, %(status)s, %(progress)s, %(params)s, %(result)s, %(error)s,
         %(retry_count)s, %(created_at)s, %(updated_at)s, %(started_at)s, %(completed_at)s, %(version)s FROM e)""",  # noqa: S608 -- COLUMNS is a constant
    "update": """t AS (UPDATE tasks SET status = %(status)s, progress = %(progress)s, result = %(result)s,
    error = %(error)s, retry_count = %(retry_count)s, updated_at = %(updated_at)s,
    started_at = %(started_at)s, completed_at = %(completed_at)s, version = %(version)s
  FROM e WHERE task_id = %(task_id)s)""",
    "delete": "t AS (DELETE FROM tasks USING e WHERE task_id = %(task_id)s)",
}
SQL = {kind: f"WITH {EVENT}, {row}, {COUNTS} SELECT position FROM e" for kind, row in ROW.items()}  # noqa: S608 -- constants


async def _commit(conn, commands, metadata):
    if len(commands) != 1:
        return await _original(conn, commands, metadata)
    ((stream_id, before, command),) = commands
    event = decide(command, before)
    if event is None:
        return [before]
    version = 1 if before is None else before.version + 1
    at = writer.now()
    after = evolve(before, Recorded(stream_id, version, 0, at, event))
    delta = {}
    if before is not None:
        delta[before.task_type, before.status.value] = delta.get((before.task_type, before.status.value), 0) - 1
    if after is not None:
        delta[after.task_type, after.status.value] = delta.get((after.task_type, after.status.value), 0) + 1
    keys = sorted(k for k, n in delta.items() if n)
    params = {
        "stream_id": stream_id,
        "version": version,
        "type": type_of(event),
        "data": Jsonb(to_data(event)),
        "metadata": Jsonb(metadata),
        "occurred_at": at,
        "task_id": stream_id,
        "shard": conn.info.backend_pid % stats.SHARDS,
        "task_types": [k[0] for k in keys],
        "statuses": [k[1] for k in keys],
        "deltas": [delta[k] for k in keys],
    }
    if after is not None:
        params |= tasks_view._params(after)
    kind = "insert" if before is None else ("delete" if after is None else "update")
    try:
        cur = await conn.execute(SQL[kind], params)
        (position,) = await cur.fetchone()
    except psycopg.errors.UniqueViolation as exc:
        raise eventstore.VersionConflict(str(exc.diag.message_detail)) from exc
    if kind == "insert":
        after = msgspec.structs.replace(after, id=position)
    return [after]


writer._commit = _commit
