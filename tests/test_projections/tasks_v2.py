"""Version 2 of the `tasks` read model, for the rebuild tests: v1 plus `duration_seconds`.

Derived from the events: the time from the task's start to its finish.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec

from tasktrail.domain.task import Task
from tasktrail.projections import Change
from tasktrail.projections import tasks as v1

NAME = "tasks"
VERSION = 2
TABLES = v1.TABLES
CREATE = (*v1.CREATE, "ALTER TABLE tasks ADD COLUMN duration_seconds double precision")
INDEXES = v1.INDEXES
AFTER_INDEXES = v1.AFTER_INDEXES
COLUMNS = f"{v1.COLUMNS}, duration_seconds"
COPY = f"COPY tasks ({COLUMNS}) FROM STDIN (FORMAT BINARY, FREEZE)"
COPY_TYPES = (*v1.COPY_TYPES, "float8")


def _with_duration(part: str) -> str:
    """v1's part of a write's statement for the tasks' states, writing duration_seconds too."""
    for old, new in [
        ("completed_at, version)", "completed_at, version, duration_seconds)"),
        ("r.completed_at, r.version", "r.completed_at, r.version, r.duration_seconds"),
        ("version integer)", "version integer, duration_seconds double precision)"),
        ("version = EXCLUDED.version", "version = EXCLUDED.version, duration_seconds = EXCLUDED.duration_seconds"),
    ]:
        assert part.count(old) == 1, old
        part = part.replace(old, new)
    return part


PARTS = v1.PARTS | {"tasks": _with_duration(v1.PARTS["tasks"])}


def duration(task: Task) -> float | None:
    if task.started_at is None or task.completed_at is None:
        return None
    return (task.completed_at - task.started_at).total_seconds()


def rows(tasks: Iterable[Task]) -> Iterator[tuple[Any, ...]]:
    for task in tasks:
        (row,) = v1.rows([task])
        yield (*row, duration(task))


def document(changes: Sequence[Change]) -> dict[str, Any]:
    write = v1.document(changes)
    write["tasks"] = [msgspec.structs.asdict(task) | {"duration_seconds": duration(task)} for task in write["tasks"]]
    return write
