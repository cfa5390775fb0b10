"""Stats counters per task type and status, kept without counting rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import psycopg

from tasktrail.domain.task import Status

if TYPE_CHECKING:
    from tasktrail.projections import Change

NAME = "stats"
VERSION = 1
SHARDS = 16

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
