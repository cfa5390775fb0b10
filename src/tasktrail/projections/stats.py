"""Stats counters per task type and status, kept without counting rows."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from tasktrail.domain.task import Status, Task
from tasktrail.projections import replayed
from tasktrail.projections.replayed import INT2, INT8, text

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
REPLAYED_COPY = COPY  # replayed_rows writes the same columns
COPY_TYPES = ("text", "text", "int2", "int8")


def rows(tasks: Iterable[Task]) -> Iterator[tuple[str, str, int, int]]:
    """One counter row per task type and status, all in shard 0."""
    counts = Counter((task.task_type, task.status.value) for task in tasks)
    for (task_type, status), n in sorted(counts.items()):
        yield task_type, status, 0, n


def replayed_rows(states: Iterable[replayed.State]) -> Iterator[bytes]:
    """`rows` as COPY (FORMAT BINARY) data from the replay's states (see projections.replayed)."""
    # The fast form of `rows`, held equal to it by test_replay.py: change both together.
    counts = Counter(map(_TYPE_AND_STATUS, states))  # counted in C: 3x faster than a generator
    for (task_type, status), n in sorted(counts.items()):
        yield b"".join((b"\x00\x04", text(task_type), text(status.value), INT2.pack(2, 0), INT8.pack(8, n)))


_TYPE_AND_STATUS = operator.itemgetter(replayed.TASK_TYPE, replayed.STATUS)


# Its part of a write's statement (see projections.statement): add each
# (task type, status) delta to the writing connection's shard, if the write's
# events were appended (a write of several is all-or-nothing in the writer).
# Deltas arrive sorted by key, so two writers sharing a shard lock its rows in
# the same order and cannot deadlock.
PARTS = {
    "counts": f"""
counts_added AS (
    INSERT INTO task_counts AS c (task_type, status, shard, n)
    SELECT d.task_type, d.status, pg_backend_pid() %% {SHARDS}, d.n
    FROM jsonb_to_recordset(%(write)s -> 'counts') AS d(task_type text, status text, n bigint)
    WHERE EXISTS (SELECT FROM appended)
    ON CONFLICT (task_type, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n
)"""  # noqa: S608 -- SHARDS is a constant
}


def document(changes: Sequence[Change]) -> dict[str, Any]:
    """PARTS' key of the write document: the counters' nonzero deltas, sorted by key."""
    delta: Counter[tuple[str, str]] = Counter()
    for _, before, after in changes:
        if before is not None:
            delta[before.task_type, before.status.value] -= 1
        if after is not None:
            delta[after.task_type, after.status.value] += 1
    counts = [{"task_type": task_type, "status": status, "n": n} for (task_type, status), n in sorted(delta.items())]
    return {"counts": [count for count in counts if count["n"]]}


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
