"""Stats counters per task type and status, kept without counting rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import psycopg

from tasktrail.domain.task import Status, Task

if TYPE_CHECKING:
    from tasktrail.projections import Change

NAME = "stats"
VERSION = 1
SHARDS = 16

# What a rebuild needs (see projections.tasks); the same table as migration 0002.
TABLES = ("task_counts",)
CREATE = (
    """
    CREATE TABLE task_counts (
        task_type text     NOT NULL,
        status    text     NOT NULL,
        shard     smallint NOT NULL,
        n         bigint   NOT NULL,
        PRIMARY KEY (task_type, status, shard)
    )
    """,
)
INDEXES = ()
AFTER_INDEXES = ("ANALYZE task_counts",)
COPY = "COPY task_counts (task_type, status, shard, n) FROM STDIN (FORMAT BINARY, FREEZE)"
COPY_TYPES = ("text", "text", "int2", "int8")


def rows(tasks: Iterable[Task]) -> Iterator[tuple[str, str, int, int]]:
    """One counter row per task type and status, all in shard 0."""
    counts = Counter((task.task_type, task.status.value) for task in tasks)
    for (task_type, status), n in sorted(counts.items()):
        yield task_type, status, 0, n


# Deltas arrive sorted by key, so two writers sharing a shard lock its rows in
# the same order and cannot deadlock.
ADD = """
INSERT INTO task_counts AS c (task_type, status, shard, n)
SELECT task_type, status, %(shard)s, n
FROM unnest(%(task_types)s::text[], %(statuses)s::text[], %(deltas)s::bigint[]) AS d(task_type, status, n)
ON CONFLICT (task_type, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n
"""


async def project(conn: psycopg.AsyncConnection, changes: Sequence[Change]) -> None:
    delta: Counter[tuple[str, str]] = Counter()
    for _, before, after in changes:
        if before is not None:
            delta[before.task_type, before.status.value] -= 1
        if after is not None:
            delta[after.task_type, after.status.value] += 1
    keys = sorted(key for key, n in delta.items() if n)
    if not keys:
        return
    await conn.execute(
        ADD,
        {
            "shard": conn.info.backend_pid % SHARDS,
            "task_types": [task_type for task_type, _ in keys],
            "statuses": [status for _, status in keys],
            "deltas": [delta[key] for key in keys],
        },
    )


SUMMARY = """
SELECT status, sum(n)::bigint FROM task_counts
WHERE %(task_type)s::text IS NULL OR task_type = %(task_type)s
GROUP BY status
"""


async def summary(conn: psycopg.AsyncConnection, task_type: str | None = None) -> dict[str, int]:
    """{total, pending, running, completed, failed, canceled}, optionally for one task type."""
    cur = await conn.execute(SUMMARY, {"task_type": task_type})
    counts = dict.fromkeys(Status, 0) | {Status(status): n for status, n in await cur.fetchall()}
    return {"total": sum(counts.values())} | {status.value: n for status, n in counts.items()}
