"""Group commit: single creates and updates that queue up share one statement and one commit.

A single write costs PostgreSQL about 400 us of CPU, nearly all of it per
statement and per commit (the triggers, the executor's start, the WAL flush),
against about 50 us a task in a batch of many. So while this process has
SLOTS writes in flight, a create or an update that comes meanwhile waits in a
queue instead of taking a connection of its own, and when a write ends, the
whole queue is written together: one `_write` (writer.py), in one transaction.
Under light load nothing queues and a write goes alone, as it always did; under
load the groups grow as the writes take longer, which is what makes them cheap.

Each request's write stays atomic and is decided as a single request's: on
the state its process last wrote of the task (writer's guess; writes of one
task in the order they queued), and the event it appends is the one a single
request would append, with that request's own metadata. A group either commits as a
whole or changes nothing, and then each of its writes runs again on its own,
as a single request does, with a connection of its own: a lost race (a stale
guess), a lock waited for longer than IMPATIENT, any error of the database.
So a group never answers an error that its writes alone would not have.

Only what is decided without reading is grouped: creates without an
Idempotency-Key, and updates without If-Match of a task this process wrote
last. Everything else takes a slot and goes alone.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from uuid import UUID

import psycopg
from litestar.types import Scope

from tasktrail import eventstore, projections, replicas, writer
from tasktrail.domain.task import Command, CreateTask, Task

# Writes in flight before the next ones queue (TASKTRAIL_WRITE_SLOTS overrides
# it). Two keep PostgreSQL busy while one commits; more make smaller groups,
# and a group's statement costs about what a single write's does.
SLOTS = 2
SLOTS_ENV = "TASKTRAIL_WRITE_SLOTS"


def configured_slots() -> int:
    """TASKTRAIL_WRITE_SLOTS, else SLOTS; ValueError unless a whole number from 1."""
    given = os.environ.get(SLOTS_ENV, "").strip()
    if not given:
        return SLOTS
    if not (given.isascii() and given.isdigit()) or int(given) < 1:
        raise ValueError(f"{SLOTS_ENV} must be a whole number of 1 or more, not {given!r}")
    return int(given)


# The largest group, so that one statement stays short.
MOST = 100


class _Queued:
    """One request's write, waiting for its group."""

    __slots__ = ("command", "done", "metadata", "scope", "task_id")

    def __init__(self, task_id: UUID | None, command: Command, metadata: dict[str, Any], scope: Scope) -> None:
        self.task_id, self.command, self.metadata, self.scope = task_id, command, metadata, scope
        self.done: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()


class _Slot:
    """A write slot, taken by a write that goes alone."""

    __slots__ = ("writes",)

    def __init__(self, writes: Writes) -> None:
        self.writes = writes

    async def __aenter__(self) -> None:
        self.writes.in_flight += 1

    async def __aexit__(self, *_: object) -> None:
        self.writes.in_flight -= 1
        self.writes._next()


class Writes:
    """The single writes of one process: each alone, or queued and written with the others (see above)."""

    def __init__(self, replicas_: replicas.Replicas, slots: int | None = None) -> None:
        self.replicas = replicas_
        self.slots = configured_slots() if slots is None else slots
        self.in_flight = 0
        self.queue: list[_Queued] = []
        self.groups: set[asyncio.Task[None]] = set()  # referenced until done
        self._slot = _Slot(self)

    @property
    def busy(self) -> bool:
        return self.in_flight >= self.slots

    def slot(self) -> _Slot:
        """`async with writes.slot()`: around a write that goes alone, which counts as in flight."""
        return self._slot

    async def create(self, command: CreateTask, metadata: dict[str, Any], scope: Scope) -> Task:
        """Queue a create (call only when busy) and wait for its group."""
        task = await self._queued(_Queued(None, command, metadata, scope))
        assert task is not None
        return task

    async def change(self, task_id: UUID, command: Command, metadata: dict[str, Any], scope: Scope) -> Task:
        """Queue an update of a task this process wrote last (call only when busy) and wait for its group."""
        task = await self._queued(_Queued(task_id, command, metadata, scope))
        assert task is not None
        return task

    async def _queued(self, item: _Queued) -> Task | None:
        self.queue.append(item)
        return await asyncio.shield(item.done)  # a request that goes away leaves its write to the group

    def _next(self) -> None:
        """Start writing the queue, if it waits and a slot is free."""
        if self.queue and not self.busy:
            group, self.queue = self.queue[:MOST], self.queue[MOST:]
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._write(group))
            self.groups.add(task)
            task.add_done_callback(self.groups.discard)

    async def _write(self, group: list[_Queued]) -> None:
        try:
            if len(group) == 1 or not await self._together(group):
                await asyncio.gather(*(self._alone(item) for item in group))
        except Exception as exc:  # e.g. no pooled connection: every request waiting hears it
            for item in group:
                if not item.done.done():
                    item.done.set_exception(exc)
        except asyncio.CancelledError:  # the server stops
            for item in group:
                item.done.cancel()
            raise
        finally:
            self.in_flight -= 1
            self._next()

    async def _alone(self, item: _Queued) -> None:
        """One write as a single request makes it, on a connection of its own; its outcome to its request."""
        try:
            async with self.replicas.writing(item.scope) as conn:
                if item.task_id is None:
                    outcome = await writer.create(conn, item.command, item.metadata)  # type: ignore[arg-type]
                else:
                    outcome = await writer.change(conn, item.task_id, item.command, item.metadata)
        except Exception as exc:  # the request's own error, raised where it waits
            item.done.set_exception(exc)
        else:
            item.done.set_result(outcome)

    async def _together(self, group: list[_Queued]) -> bool:
        """Write the group in one transaction; False when it wrote nothing and each must go alone."""
        first = group[0].scope["state"]
        try:
            async with self.replicas.writing(group[0].scope) as conn:
                outcomes = await writer.together(conn, [(i.task_id, i.command, i.metadata) for i in group])
        except (eventstore.VersionConflict, projections.ProjectionOutdated):
            return False  # a stale guess, or a table gone: each write alone reads, or says why
        except psycopg.Error as exc:
            if exc.sqlstate is None:
                # No answer from the database (the connection broke): the group may have committed,
                # so it is not written again; each request answers the error, as a single one would.
                for item in group:
                    item.done.set_exception(exc)
                return True
            return False  # refused by the database, so rolled back: e.g. a lock waited for too long
        token = first.get(replicas.STATE)
        alone = []
        for item, outcome in zip(group, outcomes, strict=True):
            if outcome is None:
                alone.append(item)
                continue
            if token is not None:
                item.scope["state"][replicas.STATE] = token
            item.done.set_result(outcome)
        await asyncio.gather(*(self._alone(item) for item in alone))
        return True
