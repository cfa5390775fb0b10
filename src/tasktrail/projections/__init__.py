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


OUTDATED = "TT001"  # raised by projections_check (migration 0006)
CHECK = "SELECT projections_check(%(names)s::text[], %(versions)s::integer[])"


async def project(conn: psycopg.AsyncConnection, changes: Sequence[Change]) -> None:
    """Apply the changes to every inline read model."""
    # A rebuild can swap in a read model of another version while processes
    # running older (or newer) code keep writing: their rows would have the
    # wrong shape, silently. So each write checks the live versions inside its
    # transaction, after its append: a swap blocks appends, so this check sees
    # either the registry before the swap (and the swap then waits for this
    # transaction and replays its event) or the one after it. The check raises
    # in the database, so in a pipelined transaction it costs no round trip;
    # the writer turns its error into ProjectionOutdated.
    names = [projection.NAME for projection in INLINE]
    await conn.execute(CHECK, {"names": names, "versions": [projection.VERSION for projection in INLINE]})
    for projection in INLINE:
        await projection.project(conn, changes)
