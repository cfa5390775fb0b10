"""Read models kept from the event log, inline in each write's one statement."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tasktrail.domain.events import Recorded
from tasktrail.domain.task import Task
from tasktrail.projections import stats, tasks

# One change: an event and the state it took its task from and to.
Change = tuple[Recorded, Task | None, Task | None]

INLINE = (tasks, stats)


class ProjectionOutdated(Exception):
    """The live read model is of another version than the one this code writes."""


# A write is one statement, so one round trip and, in autocommit, a
# transaction of its own. It starts with the append, a CTE named `appended`
# that yields (stream_id, version, position) of each new event; then the
# inline read models' PARTS: each module maps keys of the write document (the
# statement's one parameter, %(write)s, jsonb: the modules' `document(changes)`)
# to a CTE that writes its tables from that key and, for a new task's id, the
# positions in `appended`. A write includes only the parts whose keys it fills
# (a progress report touches no counter), so there are a few statements, each
# prepared once per connection. All parts see the same snapshot, so a module
# gets one final state per task. An event whose version another writer took is
# not appended, and the parts write only for the appended ones, so a lost race
# writes nothing.
#
# A rebuild can swap in a read model of another version while processes
# running older (or newer) code keep writing: their rows would have the wrong
# shape, silently. So each write checks the live versions in its statement:
# PostgreSQL takes the statement's locks before its snapshot, and a swap blocks
# appends, so the check sees either the registry before the swap (and the swap
# then waits for this write and replays its event) or the one after it. The
# check raises TT001 in the database (migration 0007), so it costs no round
# trip; the writer turns that into ProjectionOutdated.
OUTDATED = "TT001"
_CHECK = "projections_check(%(write)s -> 'projections')"


def statement(appended: str, modules: tuple[ModuleType, ...], write: dict[str, Any], *, checked: bool = True) -> str:
    """The one statement of a write: `appended`, then the parts the write document fills."""
    return _statement(appended, modules, frozenset(key for key, value in write.items() if value), checked)


@functools.cache
def _statement(appended: str, modules: tuple[ModuleType, ...], keys: frozenset[str], checked: bool) -> str:
    parts = [sql for module in modules for key, sql in module.PARTS.items() if key in keys]
    body = ",\n".join([f"appended AS ({appended})", *parts])
    check = f" WHERE {_CHECK}" if checked else ""
    return f"WITH {body}\nSELECT stream_id, position FROM appended{check}"


def document(changes: Sequence[Change], modules: Sequence[ModuleType]) -> dict[str, Any]:
    """The modules' keys of the write document, and the versions they write (for the check)."""
    write: dict[str, Any] = {"projections": {module.NAME: module.VERSION for module in modules}}
    for module in modules:
        write |= module.document(changes)
    return write


async def check(conn: psycopg.AsyncConnection, modules: Sequence[ModuleType]) -> None:
    """The version check alone; raises psycopg's error with SQLSTATE TT001 when a read model is outdated."""
    await conn.execute(f"SELECT {_CHECK}", {"write": Jsonb(document([], modules))})
