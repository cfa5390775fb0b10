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


async def project(conn: psycopg.AsyncConnection, changes: Sequence[Change]) -> None:
    """Apply the changes to every inline read model."""
    for projection in INLINE:
        await projection.project(conn, changes)
