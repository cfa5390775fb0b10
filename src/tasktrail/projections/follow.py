"""Follow the log for this process's read-model versions: apply what other releases wrote.

Why each version needs this (see projections/__init__.py): a write projects its
events only into the versions of the process that wrote it, and says which in
events.projected. While two releases run side by side, each version's tables
would therefore miss the other release's writes. So every server process runs
a Follower that, for each of its versions, applies the events committed since
that version's checkpoint whose `projected` does not name it, and moves the
checkpoint in the same transaction. Events its own release wrote are skipped:
their writers put them in already. Each event thus reaches each version exactly
once, which the counters need (a counter cannot tell whether it has seen an
event; a row can, by its version, and the tasks upsert never goes backwards).

The checkpoint is a snapshot ("every event visible in it is applied"), not a
position: positions are taken before commit, so a lower one can commit after a
higher one (see eventstore's feed comment). A round takes the current snapshot
and applies the events visible in it but not in the checkpoint, found through
the (transaction_id, position) index, as the rebuild's catch-up does; every
query of the round filters by that snapshot, so what it applies is exactly
what the new checkpoint says.

One round per version at a time, by an advisory transaction lock: processes of
one release share the work, and the one that finds the lock taken skips the
round (the holder is doing it). The before-state of each task an event changes
comes from the log (its stream folded up to the event), not from the tables,
so a version whose tables lag, or a read model without per-task rows
(counters), is handled alike.

Rounds run on a timer (TASKTRAIL_POLL_SECONDS) and, while another version of
one of this process's read models exists, also on every commit: the follower
then LISTENs and registers as a listener (0008), so writes notify. With one
version per read model nothing needs following quickly (every writer writes
every version), and writes stay free of notifications.

A writer whose append lost the version race may have decided on a row the
other release changed meanwhile; it calls `catch_up` (a round on its own,
idle connection, waiting for the lock), then decides again on the fresh row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tasktrail import db, eventstore, live, projections
from tasktrail.domain.task import Task, evolve
from tasktrail.projections import versions

log = logging.getLogger("tasktrail.follow")

# The events a round applies are in the log already, with their positions: the
# read models' parts take them from the write document instead of an append.
APPENDED = """
SELECT e.stream_id, e.version, e.position
FROM jsonb_to_recordset(%(write)s -> 'events') AS e(stream_id uuid, version integer, position bigint)
"""
LOCK = "SELECT pg_advisory_xact_lock(hashtext(%(space)s), hashtext(%(version)s))"
TRY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext(%(space)s), hashtext(%(version)s))"
CHECKPOINT = """
SELECT checkpoint::text, pg_current_snapshot()::text FROM projection_versions
WHERE name = %(name)s AND version = %(version)s AND state = 'live'
"""
# Committed after the checkpoint, visible in the round's snapshot (SINCE), and
# not written into this version by the writer (`mine` is ",name:version,").
SINCE = """
FROM events
WHERE transaction_id >= pg_snapshot_xmin(%(seen)s::pg_snapshot)
  AND NOT pg_visible_in_snapshot(transaction_id, %(seen)s::pg_snapshot)
  AND pg_visible_in_snapshot(transaction_id, %(now)s::pg_snapshot)
"""
NEW = f"SELECT stream_id, version {SINCE} AND strpos(',' || coalesce(projected, '') || ',', %(mine)s) = 0"
ANY = f"SELECT EXISTS (SELECT {SINCE})"
HISTORIES = """
SELECT stream_id, version, position, occurred_at, type, data FROM events
WHERE stream_id = ANY(%(streams)s) AND pg_visible_in_snapshot(transaction_id, %(now)s::pg_snapshot)
ORDER BY stream_id, version
"""
ADVANCE = """
UPDATE projection_versions SET checkpoint = %(now)s::pg_snapshot
WHERE name = %(name)s AND version = %(version)s
"""


async def _round(conn: psycopg.AsyncConnection, module: ModuleType, *, wait: bool) -> int | None:
    """Apply to one version what other releases wrote since its checkpoint; how many events (None: busy)."""
    lock = versions.key(versions.FOLLOWS, module.NAME, module.VERSION)
    async with conn.transaction():
        if wait:
            await conn.execute(LOCK, lock)
        elif not (await (await conn.execute(TRY_LOCK, lock)).fetchone())[0]:  # type: ignore[index]
            return None
        cur = await conn.execute(CHECKPOINT, {"name": module.NAME, "version": module.VERSION})
        found = await cur.fetchone()
        if found is None:
            raise projections.ProjectionOutdated(
                f"read model {module.NAME} version {module.VERSION} is not live (pruned?): restart to rebuild it"
            )
        seen, now = found
        if seen == now:
            return 0
        mine = f",{module.NAME}:{module.VERSION},"
        cur = await conn.execute(NEW, {"seen": seen, "now": now, "mine": mine})
        new = {(stream_id, version) for stream_id, version in await cur.fetchall()}
        if new:
            await _apply(conn, module, new, now)
        elif not (await (await conn.execute(ANY, {"seen": seen, "now": now})).fetchone())[0]:  # type: ignore[index]
            # No event since the checkpoint: only transactions that wrote none (the followers' own moves of
            # their checkpoints among them). Moving it would take a transaction id, and so change the next
            # round's snapshot: an idle service would write to the log's server twice a second, for ever,
            # and a paused replica would look behind an idle primary.
            return 0
        await conn.execute(ADVANCE, {"now": now, "name": module.NAME, "version": module.VERSION})
    return len(new)


async def _apply(conn: psycopg.AsyncConnection, module: ModuleType, new: set[tuple[Any, int]], now: str) -> None:
    """Write the new events into the version, each with its task's state before and after it."""
    streams = sorted({stream_id for stream_id, _ in new})
    cur = await conn.execute(HISTORIES, {"streams": streams, "now": now})
    changes: list[projections.Change] = []
    state: Task | None = None
    stream = None
    for row in await cur.fetchall():
        recorded = eventstore.recorded(*row)
        stream_id, version = recorded.stream_id, recorded.version
        if stream_id != stream:
            stream, state = stream_id, None
        after = evolve(state, recorded)
        if (stream_id, version) in new:
            changes.append((recorded, state, after))
        state = after
    write = eventstore.document([recorded for recorded, _, _ in changes], {})
    write |= projections.document(changes, [module])
    await conn.execute(projections.statement(APPENDED, (module,), write), {"write": Jsonb(write)})


# Whether this process's tasks rows lag the log for any of these streams: the
# log has a later version than the row, or the row is missing and the log's
# last event is not a deletion. A lost race against a writer of the same
# release never lags (that writer wrote the row), so only a race against
# another release pays for a round, and a flood of conflicts, of unknown ids or
# of writes to deleted tasks does not queue up on the follow lock.
BEHIND = """
SELECT EXISTS (
    SELECT FROM unnest(%(streams)s::uuid[]) AS s (stream_id)
    CROSS JOIN LATERAL (
        SELECT version, type FROM events e WHERE e.stream_id = s.stream_id ORDER BY version DESC LIMIT 1
    ) last
    LEFT JOIN tasks t ON t.task_id = s.stream_id
    WHERE CASE WHEN t.task_id IS NULL THEN last.type <> 'TaskDeleted' ELSE last.version > t.version END
)
"""


async def catch_up(
    conn: psycopg.AsyncConnection, modules: Sequence[ModuleType] | None = None, *, streams: Sequence[Any] = ()
) -> int:
    """A round for each version, waiting for a round in progress elsewhere; events applied.

    With `streams`, only if this process's rows of one of them lag the log.
    Only on a connection with no transaction open: a round in a caller's
    transaction would hold the follow lock until the caller ends (none then).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return 0
    if streams and not (await (await conn.execute(BEHIND, {"streams": list(streams)})).fetchone())[0]:  # type: ignore[index]
        return 0
    applied = 0
    for module in projections.INLINE if modules is None else modules:
        applied += await _round(conn, module, wait=True) or 0
    return applied


# Whether the log has a later version of one of these streams than a version read of it.
NEWER = """
SELECT EXISTS (
    SELECT FROM unnest(%(streams)s::uuid[], %(versions)s::integer[]) AS s (stream_id, version)
    WHERE EXISTS (SELECT FROM events e WHERE e.stream_id = s.stream_id AND e.version > s.version)
)
"""


async def outdated(conn: psycopg.AsyncConnection, read: dict[Any, int]) -> bool:
    """Whether the log has moved past a version read of a stream (task id -> version; in a transaction too)."""
    cur = await conn.execute(NEWER, {"streams": list(read), "versions": list(read.values())})
    return bool((await cur.fetchone())[0])  # type: ignore[index]


# The running followers of this process (one per app), to ask whether a rolling deploy is on.
_followers: weakref.WeakSet[Follower] = weakref.WeakSet()


def deploying() -> bool:
    """Whether another version of one of this process's read models exists, as its follower last looked.

    Then another release's writes reach this process's rows a few ms late. A
    write decided on such a row is caught by the log's version check when it
    appends; one that appends nothing (a refusal, a no-op) is not, so a writer
    asks `outdated` before it answers so (writer.change, writer.change_many).
    """
    return any(follower.others for follower in _followers)


class Follower:
    """The process's follower: one connection that holds its versions' liveness locks and runs rounds."""

    def __init__(
        self, conninfo: str, modules: Sequence[ModuleType] | None = None, *, poll_interval: float | None = None
    ) -> None:
        self.conninfo = conninfo
        self.modules = tuple(projections.INLINE if modules is None else modules)
        self.poll_interval = poll_interval or live.poll_seconds()
        self.holding = asyncio.Event()  # set while this process's liveness locks are held
        self.problem = "starting"  # why they are not, while they are not (said to anyone: /health/ready)
        self._again = asyncio.Event()  # cuts a back-off short: see try_now
        self._settled = asyncio.Event()  # the first round after the start is done, or an attempt failed
        self._unreachable = False  # whether the last attempt could not reach the database
        self._tried = 0.0  # when it began (the loop's clock)
        # Whether another version of one of this process's read models exists (a rolling deploy): then
        # other releases' writes reach this process's versions only through the follower.
        self.others = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        _followers.add(self)
        self._task = asyncio.create_task(self._run(), name="tasktrail-follower")

    async def stop(self) -> None:
        _followers.discard(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.5
        while True:
            self._again.clear()  # a try_now from here on is for this attempt's failure
            self._tried = asyncio.get_running_loop().time()
            try:
                kwargs = db.connect_kwargs() | versions.application_name(self.modules)
                async with await psycopg.AsyncConnection.connect(self.conninfo, **kwargs) as conn:
                    await versions.hold_async(conn, self.modules)
                    self.holding.set()
                    self.problem = ""
                    delay = 0.5
                    await self._follow(conn)
            except (psycopg.Error, OSError, versions.NotBuilt, projections.ProjectionOutdated) as exc:
                self.holding.clear()
                self._settled.set()  # nothing to wait for at the start: /health/ready says why
                # Not the driver's words for a connection, which name the database's host and port, to whoever asks.
                self._unreachable = isinstance(exc, psycopg.OperationalError | OSError)
                self.problem = "the database is unavailable" if self._unreachable else str(exc)
                log.warning("follower: %s; trying again in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._again.wait(), delay)
                delay = min(delay * 2, 5.0)

    def try_now(self) -> None:
        """Reconnect now rather than at the end of the back-off: the database answers again (/health/ready).

        Only after it was unreachable (a pruned version stays so), and at most twice a second, however
        many probes ask: they need no key, and a server out of connections is not helped by more tries.
        """
        if self._unreachable and asyncio.get_running_loop().time() - self._tried >= 0.5:
            self._again.set()

    async def settled(self, seconds: float) -> None:
        """Wait (at most `seconds`) for the first round after the start, or for the first attempt to fail.

        A server that starts beside another release, just after building its versions, has not yet
        applied what that release wrote since the build: it serves once a round has (audit: a new
        release's first lists missed the old one's last 0.5-1 s of creates).
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), seconds)

    async def _follow(self, conn: psycopg.AsyncConnection) -> None:
        listening = False
        first = True
        while True:
            for module in self.modules:
                # The first round waits for one in progress elsewhere (another --workers process, another
                # instance of this release): passed over, this process would serve without what it applies.
                await _round(conn, module, wait=first)
            first = False
            self._settled.set()
            wanted = self.others = await versions.others(conn, self.modules)
            if wanted != listening:
                for statement in (live.LISTEN, live.REGISTER) if wanted else (live.UNREGISTER, live.UNLISTEN):
                    await conn.execute(statement)
                listening = wanted
            async for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
                pass
            async for _ in conn.notifies(timeout=0.0):  # one round answers every commit notified so far
                pass
