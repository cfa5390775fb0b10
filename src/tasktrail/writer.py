"""The write path: load state, decide, append, project; one transaction each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg

from tasktrail import eventstore, idempotency, projections
from tasktrail.domain.events import Recorded
from tasktrail.domain.task import FINISHED, Command, CreateTask, DeleteTask, Task, TaskNotFound, decide, evolve
from tasktrail.projections import Change
from tasktrail.projections import tasks as tasks_view

# A writer that loses a race re-reads and decides again. Each lost race means
# another writer committed, so the loop always makes progress overall; the cap
# only guards against a pathological pile-up.
MAX_ATTEMPTS = 100


class PreconditionFailed(Exception):
    """The task is not at the version the caller said it expected (If-Match)."""


def now() -> datetime:
    return datetime.now(UTC)


async def _decide(
    conn: psycopg.AsyncConnection, commands: Sequence[tuple[UUID, Task | None, Command]], at: datetime
) -> tuple[list[Change], list[Task | None]]:
    """Decide each command on its state: the changes to write, and every task's state after them."""
    decided = [(stream_id, before, decide(command, before)) for stream_id, before, command in commands]
    pending = [(stream_id, before, event) for stream_id, before, event in decided if event is not None]
    if not pending:
        return [], [before for _, before, _ in decided]
    positions = await eventstore.reserve(conn, len(pending))
    changes = []
    for (stream_id, before, event), position in zip(pending, positions, strict=True):
        recorded = Recorded(stream_id, 1 if before is None else before.version + 1, position, at, event)
        changes.append((recorded, before, evolve(before, recorded)))
    afters = {recorded.stream_id: after for recorded, _, after in changes}
    return changes, [afters.get(stream_id, before) for stream_id, before, _ in decided]


@asynccontextmanager
async def _transaction(conn: psycopg.AsyncConnection) -> AsyncIterator[None]:
    """The append's pipelined transaction; an outdated read model refuses it."""
    try:
        async with eventstore.transaction(conn):
            yield
    except psycopg.Error as exc:
        if exc.sqlstate != projections.OUTDATED:
            raise
        raise projections.ProjectionOutdated(exc.diag.message_primary) from exc


async def _write(conn: psycopg.AsyncConnection, changes: Sequence[Change], metadata: dict[str, Any]) -> None:
    """Append the events and project them (inside the caller's _transaction)."""
    await eventstore.append(conn, [recorded for recorded, _, _ in changes], metadata)
    await projections.project(conn, changes)


async def create(
    conn: psycopg.AsyncConnection, command: CreateTask, metadata: dict[str, Any], idempotency_key: str | None = None
) -> Task:
    """Create a task; with a key, a repeat of the same request returns the task the first one created."""
    print_ = idempotency.fingerprint(command) if idempotency_key else b""
    for _ in range(MAX_ATTEMPTS):
        task_id, at = uuid4(), now()
        changes, (task,) = await _decide(conn, [(task_id, None, command)], at)
        assert task is not None
        async with _transaction(conn):
            if idempotency_key is None or await idempotency.claim(conn, idempotency_key, print_, task_id, at):
                await _write(conn, changes, metadata)
                return task
        assert idempotency_key is not None
        original = await idempotency.find(conn, idempotency_key, print_)
        if original is None:
            continue  # the claim expired and was cleaned up meanwhile: claim it now
        found = await tasks_view.get(conn, original)
        if found is None:
            raise TaskNotFound(f"task {original}, created with this Idempotency-Key, has been deleted")
        return found
    raise eventstore.VersionConflict("could not claim the Idempotency-Key; try again")


async def change(
    conn: psycopg.AsyncConnection,
    task_id: UUID,
    command: Command,
    metadata: dict[str, Any],
    expected: Collection[int] | None = None,
) -> Task | None:
    """Apply an update or delete to a live task, deciding again on a lost race unless versions were expected."""
    for _ in range(MAX_ATTEMPTS):
        before = await tasks_view.get(conn, task_id)
        if before is None:
            raise TaskNotFound(f"task {task_id} not found")
        if expected is not None and before.version not in expected:
            raise PreconditionFailed(f"task {task_id} is at version {before.version}, not {_versions(expected)}")
        changes, (after,) = await _decide(conn, [(task_id, before, command)], now())
        if not changes:
            return after
        try:
            async with _transaction(conn):
                await _write(conn, changes, metadata)
        except eventstore.VersionConflict:
            if expected is not None:
                raise PreconditionFailed(f"task {task_id} changed after version {before.version}") from None
            continue
        return after
    raise eventstore.VersionConflict(f"task {task_id} is changing too fast; try again")


def _versions(expected: Collection[int]) -> str:
    return " or ".join(map(str, sorted(expected))) or "any version If-Match named"


async def cleanup(conn: psycopg.AsyncConnection, days: int, metadata: dict[str, Any]) -> int:
    """Delete (reason: retention) every finished task completed more than `days` ago."""
    retention = DeleteTask(reason="retention")
    for _ in range(MAX_ATTEMPTS):
        at = now()
        expired = await tasks_view.finished_before(conn, at - timedelta(days=days), FINISHED)
        changes, _ = await _decide(conn, [(task.task_id, task, retention) for task in expired], at)
        try:
            async with _transaction(conn):
                await _write(conn, changes, metadata)
                await idempotency.forget_expired(conn, at)
        except eventstore.VersionConflict:
            continue  # one of them changed meanwhile: look again
        return len(expired)
    raise eventstore.VersionConflict("tasks are changing too fast to clean up; try again")
