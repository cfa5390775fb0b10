"""The write path: load state, decide, append, project; one transaction each."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from tasktrail import eventstore, idempotency, metrics, projections
from tasktrail.domain.events import Recorded
from tasktrail.domain.task import (
    FINISHED,
    Command,
    CreateTask,
    DeleteTask,
    Task,
    TaskNotFound,
    TransitionRejected,
    decide,
    evolve,
)
from tasktrail.projections import Change, follow
from tasktrail.projections import tasks as tasks_view

# A writer that loses a race re-reads and decides again. Each lost race means
# another writer committed, so the loop always makes progress overall; the cap
# only guards against a pathological pile-up.
MAX_ATTEMPTS = 100


class PreconditionFailed(Exception):
    """The task is not at the version the caller said it expected (If-Match)."""


def now() -> datetime:
    return datetime.now(UTC)


def _decide(
    commands: Sequence[tuple[UUID, Task | None, Command]], at: datetime
) -> tuple[list[Change], list[Task | None]]:
    """Decide each command on its state: the changes to write, and every task's state after them.

    The log numbers events as it appends them, so until then a change's
    position is 0, and a new task's id (its creating event's position) too.
    """
    changes, afters = [], []
    for stream_id, before, command in commands:
        event = decide(command, before)
        if event is None:
            afters.append(before)
            continue
        recorded = Recorded(stream_id, 1 if before is None else before.version + 1, 0, at, event)
        after = evolve(before, recorded)
        changes.append((recorded, before, after))
        afters.append(after)
    return changes, afters


async def _write(conn: psycopg.AsyncConnection, changes: Sequence[Change], metadata: dict[str, Any]) -> dict[UUID, int]:
    """Append the events and project them in one statement; the new events' positions by stream.

    VersionConflict when another writer took one of the versions: then nothing
    was written for it (inside a transaction, the caller's rollback undoes the rest).
    """
    modules = projections.INLINE
    write = eventstore.document([recorded for recorded, _, _ in changes], metadata)
    write |= projections.document(changes, modules)
    cur = await conn.execute(projections.statement(eventstore.APPEND, modules, write), {"write": Jsonb(write)})
    positions = dict(await cur.fetchall())
    if len(positions) < len(changes):
        # The winner may be a process of another release, which does not write
        # this process's read-model versions: apply its events to them before
        # the caller reads the task again (projections/follow.py).
        await follow.catch_up(conn, modules, streams=[recorded.stream_id for recorded, _, _ in changes])
        raise eventstore.VersionConflict("another writer changed the task first")
    metrics.appended(changes)
    return positions


@asynccontextmanager
async def _refused(conn: psycopg.AsyncConnection) -> AsyncIterator[None]:
    """A write to read-model tables that are gone (a pruned version) as ProjectionOutdated."""
    try:
        yield
    except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable) as exc:
        raise projections.ProjectionOutdated(
            f"this process's read-model tables are missing ({exc.diag.message_primary}): restart it"
        ) from exc


# The state this process last wrote of each recently written task, as a guess
# for the next change of it: deciding on the guess spares reading the read
# model first (an update is one round trip instead of two). A guess is only a
# guess. The append refuses a version that is taken, so a stale one loses like
# any overtaken writer and the task is read afresh; a guess that refuses the
# command or changes nothing is checked by a read before that is the answer;
# and only states that committed are remembered (a caller's transaction may
# still roll back). A client's requests arrive on its keep-alive connection,
# so with several server processes the same process mostly serves them.
RECENT = 10_000
_recent: OrderedDict[UUID, Task] = OrderedDict()


def _remember(task_id: UUID, task: Task | None) -> None:
    if task is None:
        _recent.pop(task_id, None)
        return
    _recent[task_id] = task
    _recent.move_to_end(task_id)
    if len(_recent) > RECENT:
        _recent.popitem(last=False)


def _written(conn: psycopg.AsyncConnection, task_id: UUID, task: Task | None) -> None:
    """Remember a task's state after a write that has committed; forget it while a caller's transaction is open."""
    committed = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    _remember(task_id, task if committed else None)


def _numbered(task: Task, positions: dict[UUID, int]) -> Task:
    """A new task with its id, the position the log gave its creating event."""
    return msgspec.structs.replace(task, id=positions[task.task_id])


async def create(
    conn: psycopg.AsyncConnection, command: CreateTask, metadata: dict[str, Any], idempotency_key: str | None = None
) -> Task:
    """Create a task; with a key, a repeat of the same request returns the task the first one created."""
    if idempotency_key is None:
        changes, (task,) = _decide([(uuid4(), None, command)], now())
        assert task is not None
        async with _refused(conn):
            task = _numbered(task, await _write(conn, changes, metadata))
        _written(conn, task.task_id, task)
        return task
    print_ = idempotency.fingerprint(command)
    for _ in range(MAX_ATTEMPTS):
        task_id, at = uuid4(), now()
        changes, (task,) = _decide([(task_id, None, command)], at)
        assert task is not None
        # The claim and the write commit together: a key is never claimed for a task that was not created.
        async with _refused(conn), conn.pipeline(), conn.transaction():
            if await idempotency.claim(conn, idempotency_key, print_, task_id, at):
                return _numbered(task, await _write(conn, changes, metadata))
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
    guess = _recent.get(task_id) if expected is None else None
    for _ in range(MAX_ATTEMPTS):
        before, guessed, guess = guess, guess is not None, None
        if before is None:
            before = await tasks_view.get(conn, task_id)
            if before is None:
                # Perhaps created by another release a moment ago: apply its events here, and look again.
                await follow.catch_up(conn, streams=[task_id])
                before = await tasks_view.get(conn, task_id)
            if before is None:
                _remember(task_id, None)
                raise TaskNotFound(f"task {task_id} not found")
            if expected is not None and before.version not in expected:
                raise PreconditionFailed(f"task {task_id} is at version {before.version}, not {_versions(expected)}")
        try:
            changes, (after,) = _decide([(task_id, before, command)], now())
        except TransitionRejected:
            if guessed:
                continue  # perhaps only the guess refuses it: decide on the read model
            raise
        if not changes:
            if guessed:
                continue  # nothing to change, by the guess: make sure on the read model
            return after
        try:
            async with _refused(conn):
                await _write(conn, changes, metadata)
        except eventstore.VersionConflict:
            _remember(task_id, None)
            if expected is not None:
                raise PreconditionFailed(f"task {task_id} changed after version {before.version}") from None
            if not guessed:
                # A lost race. (A guess that lost was a stale cache entry, not a race: it is read afresh.)
                metrics.WRITE_CONFLICTS.inc()
            continue
        _written(conn, task_id, after)
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
        changes, _ = _decide([(task.task_id, task, retention) for task in expired], at)
        try:
            async with _refused(conn), conn.pipeline(), conn.transaction():
                if changes:
                    await _write(conn, changes, metadata)
                await idempotency.forget_expired(conn, at)
        except eventstore.VersionConflict:
            metrics.WRITE_CONFLICTS.inc()
            continue  # one of them changed meanwhile: look again
        for task in expired:
            _remember(task.task_id, None)
        return len(expired)
    raise eventstore.VersionConflict("tasks are changing too fast to clean up; try again")
