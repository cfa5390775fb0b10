"""Version 2 of the `tasks` read model, for the rebuild tests: v1 plus `duration_seconds`.

Derived from the events: the time from the task's start to its finish.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg

from tasktrail.domain.task import Task
from tasktrail.projections import Change
from tasktrail.projections import tasks as v1

NAME = "tasks"
VERSION = 2
TABLES = v1.TABLES
CREATE = (*v1.CREATE, "ALTER TABLE tasks ADD COLUMN duration_seconds double precision")
INDEXES = v1.INDEXES
AFTER_INDEXES = v1.AFTER_INDEXES
COPY = f"COPY tasks ({v1.COLUMNS}, duration_seconds) FROM STDIN (FORMAT BINARY, FREEZE)"
COPY_TYPES = (*v1.COPY_TYPES, "float8")

SET_DURATION = "UPDATE tasks SET duration_seconds = %(duration)s WHERE task_id = %(task_id)s"


def duration(task: Task) -> float | None:
    if task.started_at is None or task.completed_at is None:
        return None
    return (task.completed_at - task.started_at).total_seconds()


def rows(tasks: Iterable[Task]) -> Iterator[tuple[Any, ...]]:
    for task in tasks:
        (row,) = v1.rows([task])
        yield (*row, duration(task))


async def project(conn: psycopg.AsyncConnection, changes: Sequence[Change]) -> None:
    await v1.project(conn, changes)
    params = [{"task_id": after.task_id, "duration": duration(after)} for _, _, after in changes if after is not None]
    if params:
        await conn.cursor().executemany(SET_DURATION, params)
