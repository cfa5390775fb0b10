"""Read models kept from the event log, inline in each append's transaction."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from tasktrail.domain.events import Recorded
from tasktrail.domain.task import Task
from tasktrail.projections import stats, tasks

# One change: an event and the state it took its task from and to.
Change = tuple[Recorded, Task | None, Task | None]

INLINE = (tasks, stats)


class ProjectionOutdated(Exception):
    """The live read model is of another version than the one this code writes."""


LIVE_VERSIONS = "SELECT name, version FROM projections"


async def project(conn: psycopg.AsyncConnection, changes: Sequence[Change]) -> None:
    """Apply the changes to every inline read model."""
    # A rebuild can swap in a read model of another version while processes
    # running older (or newer) code keep writing: their rows would have the
    # wrong shape, silently. So each write checks the live versions inside its
    # transaction, after its append: a swap blocks appends, so this read sees
    # either the registry before the swap (and the swap then waits for this
    # transaction and replays its event) or the one after it.
    cur = await conn.execute(LIVE_VERSIONS)
    live = dict(await cur.fetchall())
    for projection in INLINE:
        if live.get(projection.NAME) != projection.VERSION:
            raise ProjectionOutdated(
                f"the live {projection.NAME} read model is version {live.get(projection.NAME, 'none')}, this code"
                f" writes version {projection.VERSION}: run `tasktrail projections rebuild {projection.NAME}`,"
                " or restart on the release that matches it"
            )
    for projection in INLINE:
        await projection.project(conn, changes)
