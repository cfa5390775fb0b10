"""The next version of the `tasks` read model, for the rebuild tests: this code's plus `duration_seconds`.

Derived from the events: the time from the task's start to its finish.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec

from tasktrail.domain.task import Task
from tasktrail.projections import Change
from tasktrail.projections import tasks as now

NAME = "tasks"
VERSION = now.VERSION + 1
TABLES = now.TABLES
CREATE = (*now.CREATE, "ALTER TABLE tasks ADD COLUMN duration_seconds double precision")
INDEXES = now.INDEXES
AFTER_INDEXES = now.AFTER_INDEXES
COLUMNS = f"{now.COLUMNS}, duration_seconds"
COPY = f"COPY tasks ({COLUMNS}) FROM STDIN (FORMAT BINARY, FREEZE)"
COPY_TYPES = (*now.COPY_TYPES, "float8")


def _with_duration(part: str) -> str:
    """this code's part of a write's statement for the tasks' states, writing duration_seconds too."""
    for old, new in [
        ("completed_at, version)", "completed_at, version, duration_seconds)"),
        ("r.completed_at, r.version", "r.completed_at, r.version, r.duration_seconds"),
        ("version integer)", "version integer, duration_seconds double precision)"),
        ("version = EXCLUDED.version", "version = EXCLUDED.version, duration_seconds = EXCLUDED.duration_seconds"),
    ]:
        assert part.count(old) == 1, old
        part = part.replace(old, new)
    return part


PARTS = now.PARTS | {"tasks": _with_duration(now.PARTS["tasks"])}


def duration(task: Task) -> float | None:
    if task.started_at is None or task.completed_at is None:
        return None
    return (task.completed_at - task.started_at).total_seconds()


def rows(tasks: Iterable[Task]) -> Iterator[tuple[Any, ...]]:
    for task in tasks:
        (row,) = now.rows([task])
        yield (*row, duration(task))


def document(changes: Sequence[Change]) -> dict[str, Any]:
    write = now.document(changes)
    write["tasks"] = [msgspec.structs.asdict(task) | {"duration_seconds": duration(task)} for task in write["tasks"]]
    return write
