"""Group commit: single creates and updates that queue up share one statement and one commit.

A single write costs PostgreSQL about 400 us of CPU, nearly all of it per
statement and per commit (the triggers, the executor's start, the WAL flush),
against about 50 us a task in a batch of many. So, when TASKTRAIL_WRITE_SLOTS
is set (it is off by default), while this process has that many writes in
flight, a create or an update that comes meanwhile waits in a queue instead of
taking a connection of its own, and when a write ends, the whole queue is
written together: one statement (writer.write_together), in one transaction.
Under light load nothing queues and a write goes alone, as it always did; under
load the groups grow as the writes take longer, which is what makes them cheap.

Each request's write stays atomic and is decided as a single request's: on
the state its process last wrote of the task (writer's guess; writes of one
task in the order they queued), and the event it appends is the one a single
request would append, with that request's own metadata. A group either
commits as a whole or changes nothing, and then each of its writes runs again
on its own, as a single request does, with a connection of its own: after a
lost race (a stale guess), a lock waited for longer than IMPATIENT, any error
of the database. So a group never answers an error that its writes alone would
not have (but for a connection that breaks with no answer: see _together).

Only what is decided without reading is grouped: creates without an
Idempotency-Key, and updates without If-Match of a task this process wrote
last. Everything else takes a slot and goes alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from litestar.types import Scope

from tasktrail import eventstore, projections, replicas, writer
from tasktrail.domain.task import Command, Task

# Writes in flight before the next ones queue, set by TASKTRAIL_WRITE_SLOTS;
# 0, the default, never queues (no group commit). With 2, PostgreSQL stays busy
# while one commits; more make smaller groups. Off by default because it trades
# latency for throughput: measured on 2 cores (docs/benchmarks.md), 2 slots
# took creates to 1.4-1.5x and updates to 1.2x, but the mixed workload only to
# 1.05x, with its p99 up by half (a queued write waits for a group).
SLOTS = 0
SLOTS_ENV = "TASKTRAIL_WRITE_SLOTS"


def configured_slots() -> int:
    """TASKTRAIL_WRITE_SLOTS, else SLOTS; ValueError unless a whole number (0: no group commit)."""
    given = os.environ.get(SLOTS_ENV, "").strip()
    if not given:
        return SLOTS
    if not (given.isascii() and given.isdigit()):
        raise ValueError(f"{SLOTS_ENV} must be a whole number (0: no group commit), not {given!r}")
    return int(given)


# The largest group, so that one statement stays short (a batch's is 1,000 tasks
# in one body; a group's bodies are single requests', up to 1 MiB each).
MOST = 32
# Writes of a group that runs them alone (its own rolled back) that run at once:
# each takes a pooled connection, and the pool is shared with every request.
ALONE_AT_ONCE = 4

log = logging.getLogger(__name__)


class _Queued:
    """One request's write, waiting for its group."""

    __slots__ = ("command", "done", "lost_at", "metadata", "scope", "task_id")

    def __init__(self, task_id: UUID | None, command: Command, metadata: dict[str, Any], scope: Scope) -> None:
        self.task_id, self.command, self.metadata, self.scope = task_id, command, metadata, scope
        self.done: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        # When its group decided it, on a guess, before the group lost a race (see writer.change's lost_at).
        self.lost_at: datetime | None = None


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
        """Whether a write that may go in a group queues now (never, with no slots set)."""
        return 0 < self.slots <= self.in_flight

    def slot(self) -> _Slot:
        """`async with writes.slot()`: around a write that goes alone, which counts as in flight."""
        return self._slot

    async def write(self, task_id: UUID | None, command: Command, metadata: dict[str, Any], scope: Scope) -> Task:
        """Queue a create (no task id) or an update of a task this process wrote last, and wait for its group.

        Call it only when busy. A request that goes away leaves its write to the group.
        """
        item = _Queued(task_id, command, metadata, scope)
        self.queue.append(item)
        task = await asyncio.shield(item.done)
        assert task is not None
        return task

    def _next(self) -> None:
        """Start writing the queue, if it waits and a slot is free, or no group is being written.

        Writes that are never grouped (a keyed create, a conditional update)
        take slots too, and may hold all of them one after another; a queue
        that waited for a free slot might then wait for ever. So when no group
        is being written, the queue goes at once.
        """
        if self.queue and (not self.busy or not self.groups):
            group, self.queue = self.queue[:MOST], self.queue[MOST:]
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._write(group))
            self.groups.add(task)
            task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self.groups.discard(task)
        self.in_flight -= 1
        self._next()

    async def stop(self) -> None:
        """Wait until every queued write has been written (before the pool closes)."""
        while self.groups:
            await asyncio.gather(*self.groups, return_exceptions=True)

    async def _write(self, group: list[_Queued]) -> None:
        try:
            if len(group) == 1:
                await self._alone(group)
            else:
                await self._together(group)
        except Exception as exc:  # e.g. no pooled connection: every request still waiting hears it
            for item in group:
                if not item.done.done():
                    item.done.set_exception(exc)
        except asyncio.CancelledError:
            for item in group:
                item.done.cancel()
            raise

    async def _together(self, group: list[_Queued]) -> None:
        """Write the group in one transaction; what it leaves out, or all of it if it fails, goes alone."""
        decided = writer.decide_together([(item.task_id, item.command, item.metadata) for item in group])
        if decided.changes:
            try:
                async with self.replicas.writing(group[0].scope) as conn:
                    await writer.write_together(conn, decided)
            except (eventstore.VersionConflict, projections.ProjectionOutdated, psycopg.Error) as exc:
                if not isinstance(exc, psycopg.Error) or exc.sqlstate is not None:
                    # Rolled back: a stale guess, a lock waited for, a table gone, any refusal. Alone, each
                    # write reads its task, waits as long as a single one, and answers its own error.
                    log.debug("a group of %d writes rolled back (%s): each goes alone", len(group), exc)
                    if isinstance(exc, eventstore.VersionConflict):  # a race lost, or a stale guess: see lost_at
                        for item, outcome in zip(group, decided.outcomes, strict=True):
                            if outcome is not None and item.task_id is not None:
                                item.lost_at = decided.at
                    await self._alone(group)
                    return
                # No answer from the database (the connection broke): the group may have committed, so
                # what it held is not written again; each of those requests answers the error, as a
                # single one would. The writes it left out go alone.
                for item, outcome in zip(group, decided.outcomes, strict=True):
                    if outcome is not None:
                        item.done.set_exception(exc)
            else:
                token = group[0].scope["state"].get(replicas.STATE)  # the group's read-after token, for each
                for item, outcome in zip(group, decided.outcomes, strict=True):
                    if outcome is not None:
                        if token is not None:
                            item.scope["state"][replicas.STATE] = token
                        item.done.set_result(outcome)
        await self._alone([item for item in group if not item.done.done()])

    async def _alone(self, items: list[_Queued]) -> None:
        """Each write as a single request makes it: one task's one after another, in the order they came."""
        by_task: dict[object, list[_Queued]] = {}
        for item in items:
            by_task.setdefault(item.task_id or item, []).append(item)
        at_once = asyncio.Semaphore(ALONE_AT_ONCE)

        async def in_turn(writes: list[_Queued]) -> None:
            async with at_once:
                for item in writes:
                    await self._one(item)

        await asyncio.gather(*(in_turn(writes) for writes in by_task.values()))

    async def _one(self, item: _Queued) -> None:
        """One write alone, on a connection of its own; its outcome, or its error, to its request."""
        try:
            async with self.replicas.writing(item.scope) as conn:
                if item.task_id is None:
                    outcome = await writer.create(conn, item.command, item.metadata)  # type: ignore[arg-type]
                else:
                    outcome = await writer.change(conn, item.task_id, item.command, item.metadata, lost_at=item.lost_at)
        except Exception as exc:  # the request's own error, raised where it waits
            item.done.set_exception(exc)
        else:
            item.done.set_result(outcome)
