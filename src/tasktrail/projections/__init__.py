"""Read models kept from the event log, inline in each write's one statement."""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from tasktrail.domain.events import Recorded
from tasktrail.domain.task import Task
from tasktrail.projections import stats, tasks

if TYPE_CHECKING:
    import psycopg

# One change: an event and the state it took its task from and to.
Change = tuple[Recorded, Task | None, Task | None]

# Versioned read models, and why a rolling deploy refuses no write.
#
# Each read model (a module here: tasks, stats) has a NAME and a VERSION, and
# each version has tables of its own, in the schema rm_<name>_v<version>
# (`schema`): version 2 of tasks is rm_tasks_v2.tasks, and version 1 (of
# releases before it) rm_tasks_v1.tasks. A process's connections put its versions' schemas first
# on the search_path (`search_path`, through db.connect_kwargs), then public
# (the log, the registry), so every query keeps saying `tasks` and reads the
# shape its code knows. Two releases whose read models differ therefore run
# side by side on one database without ever seeing each other's rows.
#
# Each version is kept current two ways. A write's one statement projects its
# events into the versions of the writing process (inline, as before), and
# records which versions it wrote in the event itself (events.projected,
# "stats:1,tasks:2"). Every server process also follows the log for each of its
# versions (projections/follow.py): from that version's checkpoint in the
# registry (a snapshot: every event visible in it is applied), it applies the
# events whose `projected` does not name that version, i.e. exactly those
# written by a process of another release, and moves the checkpoint in the same
# transaction; so each event reaches each version once, inline or by a
# follower. A writer that decided on a row the other release had changed
# meanwhile loses the version race in the log (UNIQUE (stream_id, version)),
# like any overtaken writer; the writer then runs a follow round (which applies
# that event) and decides again, so no write is refused and none is lost.
#
# A new version is built from the log before its release serves
# (projections/rebuild.py, started by `serve`, one process at a time), while
# the older release keeps serving and writing its own version; a version goes
# only when no process holds its liveness lock (`projections prune`,
# projections/versions.py).
#
# Weighed and not taken: one table with a version column (every query and
# index would change, and a version's rows are not droppable in one step); a
# version check in every write that refuses the other release's writes (what
# this replaces: a rolling deploy was a write outage); followers that compare
# row versions with the log instead of reading `projected` (exact for `tasks`,
# whose rows carry a version, but a counter cannot tell whether an event was
# already counted, and must be exactly once).
DEFAULT = (tasks, stats)
# The read-model modules a process uses, by module name: what a release runs
# (the code's own by default; a test runs another version beside it).
MODULES_ENV = "TASKTRAIL_READ_MODELS"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,40}")


def _modules() -> tuple[ModuleType, ...]:
    names = [name.strip() for name in os.environ.get(MODULES_ENV, "").split(",") if name.strip()]
    if not names:
        return DEFAULT
    modules = tuple(importlib.import_module(name) for name in names)
    for module in modules:
        if not (_NAME.fullmatch(getattr(module, "NAME", "")) and isinstance(getattr(module, "VERSION", None), int)):
            raise ValueError(f"{MODULES_ENV}: {module.__name__} is not a read model (NAME, VERSION, ...)")
    names = sorted(module.NAME for module in modules)
    if names != sorted(module.NAME for module in DEFAULT):
        raise ValueError(f"{MODULES_ENV}: give one module for each read model ({', '.join(m.NAME for m in DEFAULT)})")
    return modules


INLINE = _modules()


def schema(name: str, version: int) -> str:
    """The schema holding one version's tables."""
    return f"rm_{name}_v{version}"


def search_path(modules: Sequence[ModuleType]) -> str:
    """The search_path of a process using these versions: theirs first, then the default (the log's)."""
    return ",".join([*(schema(module.NAME, module.VERSION) for module in modules), '"$user"', "public"])


def projected(modules: Sequence[ModuleType]) -> str:
    """events.projected for a write by these versions: "name:version", sorted, comma-separated."""
    return ",".join(sorted(f"{module.NAME}:{module.VERSION}" for module in modules))


class ProjectionOutdated(Exception):
    """This process's read-model tables are gone (pruned): it must restart, which rebuilds them."""

    @classmethod
    def missing(cls, exc: psycopg.Error) -> ProjectionOutdated:
        """From the error of a statement that found no table, or no column, where this process's should be."""
        return cls(f"this process's read-model tables are missing ({exc.diag.message_primary or exc}): restart it")


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
def statement(appended: str, modules: tuple[ModuleType, ...], write: dict[str, Any]) -> str:
    """The one statement of a write: `appended`, then the parts the write document fills."""
    return _statement(appended, modules, frozenset(key for key, value in write.items() if value))


@functools.cache
def _statement(appended: str, modules: tuple[ModuleType, ...], keys: frozenset[str]) -> str:
    parts = [sql for module in modules for key, sql in module.PARTS.items() if key in keys]
    body = ",\n".join([f"appended AS ({appended})", *parts])
    return f"WITH {body}\nSELECT stream_id, position FROM appended"


def document(changes: Sequence[Change], modules: Sequence[ModuleType]) -> dict[str, Any]:
    """The modules' keys of the write document, and which read-model versions it writes (events.projected)."""
    write: dict[str, Any] = {"projected": projected(modules)}
    for module in modules:
        write |= module.document(changes)
    return write
