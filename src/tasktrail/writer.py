"""The write path: load state, decide, append, project; one transaction each."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg

from tasktrail import eventstore, projections
from tasktrail.domain.task import FINISHED, Command, CreateTask, DeleteTask, Task, TaskNotFound, decide, evolve
from tasktrail.projections import tasks as tasks_view

# A writer that loses a race re-reads and decides again. Each lost race means
# another writer committed, so the loop always makes progress overall; the cap
# only guards against a pathological pile-up.
MAX_ATTEMPTS = 100


def now() -> datetime:
    return datetime.now(UTC)


async def _commit(
    conn: psycopg.AsyncConnection,
    commands: Sequence[tuple[UUID, Task | None, Command]],
    metadata: dict[str, Any],
) -> list[Task | None]:
    """Decide each command on its state; append and project what changed, atomically."""
    decided = [(stream_id, before, decide(command, before)) for stream_id, before, command in commands]
    pending = [
        (stream_id, 1 if before is None else before.version + 1, event)
        for stream_id, before, event in decided
        if event is not None
    ]
    if not pending:
        return [before for _, before, _ in decided]
    befores = {stream_id: before for stream_id, before, _ in decided}
    async with conn.transaction():
        recorded = await eventstore.append(conn, pending, metadata, now())
        changes = [(r, befores[r.stream_id], evolve(befores[r.stream_id], r)) for r in recorded]
        await projections.project(conn, changes)
    afters = {r.stream_id: after for r, _, after in changes}
    return [afters.get(stream_id, before) for stream_id, before, _ in decided]


async def create(conn: psycopg.AsyncConnection, command: CreateTask, metadata: dict[str, Any]) -> Task:
    (task,) = await _commit(conn, [(uuid4(), None, command)], metadata)
    assert task is not None
    return task


async def change(
    conn: psycopg.AsyncConnection, task_id: UUID, command: Command, metadata: dict[str, Any]
) -> Task | None:
    """Apply an update or delete to a live task, deciding again on a lost race."""
    for _ in range(MAX_ATTEMPTS):
        before = await tasks_view.get(conn, task_id)
        if before is None:
            raise TaskNotFound(f"task {task_id} not found")
        try:
            (after,) = await _commit(conn, [(task_id, before, command)], metadata)
        except eventstore.VersionConflict:
            continue
        return after
    raise eventstore.VersionConflict(f"task {task_id} is changing too fast; try again")


async def cleanup(conn: psycopg.AsyncConnection, days: int, metadata: dict[str, Any]) -> int:
    """Delete (reason: retention) every finished task completed more than `days` ago."""
    retention = DeleteTask(reason="retention")
    for _ in range(MAX_ATTEMPTS):
        expired = await tasks_view.finished_before(conn, now() - timedelta(days=days), FINISHED)
        if not expired:
            return 0
        try:
            await _commit(conn, [(task.task_id, task, retention) for task in expired], metadata)
        except eventstore.VersionConflict:
            continue  # one of them changed meanwhile: look again
        return len(expired)
    raise eventstore.VersionConflict("tasks are changing too fast to clean up; try again")
