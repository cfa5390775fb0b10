"""The registry of read-model versions: which exist, which processes use them, and pruning the unused.

A version is `building` while a rebuild fills its schema, `live` once it is
complete and followed (projections/follow.py), and `retired` once pruned.
Whether a process uses a version is not a row that a crash could leave
behind: every server process holds a shared advisory lock per version it
uses, on its follower's connection (and `serve` on its own while it starts),
so a process that dies lets go of it with its connection. `prune` drops a
version's schema only in a transaction that holds the same lock exclusively,
which PostgreSQL grants only while no process holds it shared; a process that
starts meanwhile waits for the prune to commit, finds the version retired,
and (in `serve`) builds it again.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import ModuleType

import psycopg
from psycopg import sql

from tasktrail import db, projections

# Advisory lock keys are pairs: a space per purpose, and the version as "name:version".
USES = "tasktrail.uses"  # held shared by each process using a version; exclusively by prune
FOLLOWS = "tasktrail.follows"  # held by the one transaction applying the log to a version
REBUILDS = "tasktrail.rebuild"  # held by the one rebuild running (projections/rebuild.py)


def key(space: str, name: str, version: int) -> dict[str, str]:
    return {"space": space, "version": f"{name}:{version}"}


HOLD = "SELECT pg_advisory_lock_shared(hashtext(%(space)s), hashtext(%(version)s))"
LIVE = "SELECT state = 'live' FROM projection_versions WHERE name = %(name)s AND version = %(version)s"


class NotBuilt(Exception):
    """A version this process uses has no tables: `serve` builds it."""


def hold(conn: psycopg.Connection, modules: Sequence[ModuleType]) -> None:
    """Mark the versions as in use for as long as this connection lives (waits while one is being pruned)."""
    for module in modules:
        conn.execute(HOLD, key(USES, module.NAME, module.VERSION))


async def hold_async(conn: psycopg.AsyncConnection, modules: Sequence[ModuleType]) -> None:
    """`hold` on an async connection; NotBuilt if a version is not live."""
    for module in modules:
        await conn.execute(HOLD, key(USES, module.NAME, module.VERSION))
        cur = await conn.execute(LIVE, {"name": module.NAME, "version": module.VERSION})
        row = await cur.fetchone()
        if row is None or not row[0]:
            raise NotBuilt(
                f"read model {module.NAME} version {module.VERSION} has no tables (never built, or pruned):"
                " restart with `tasktrail serve`, which builds it from the log"
            )


OTHERS = """
SELECT EXISTS (
    SELECT FROM projection_versions
    WHERE name = ANY(%(names)s) AND state <> 'retired' AND NOT (name || ':' || version) = ANY(%(mine)s)
)
"""


async def others(conn: psycopg.AsyncConnection, modules: Sequence[ModuleType]) -> bool:
    """Whether another version of any of these read models exists (so another release may be writing)."""
    params = {"names": [m.NAME for m in modules], "mine": [f"{m.NAME}:{m.VERSION}" for m in modules]}
    cur = await conn.execute(OTHERS, params)
    return (await cur.fetchone())[0]  # type: ignore[index]


# --- status -----------------------------------------------------------------

# Per version: its state, how many committed events it lacks (after its
# checkpoint, and written by another release: its own release's are in it
# already, by their writers), and how many processes hold its liveness lock.
STATUS = """
SELECT v.name, v.version, v.state, v.since,
       (SELECT count(*) FROM events
        WHERE v.checkpoint IS NOT NULL
          AND transaction_id >= pg_snapshot_xmin(v.checkpoint)
          AND NOT pg_visible_in_snapshot(transaction_id, v.checkpoint)
          AND strpos(',' || coalesce(projected, '') || ',', ',' || v.name || ':' || v.version || ',') = 0) AS behind,
       (SELECT count(DISTINCT coalesce(nullif(a.application_name, ''), l.pid::text))
        FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = hashtext(%(uses)s)::oid AND l.objid = hashtext(v.name || ':' || v.version)::oid) AS processes
FROM projection_versions v
ORDER BY v.name, v.version
"""
HEAD = "SELECT coalesce(max(position), 0) FROM events"
LEFT_OVER = r"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'rm\_%%\_new' ORDER BY 1"
# Taken and let go at once: false while a rebuild runs (whose new tables are not left over, but being filled).
NO_REBUILD = f"SELECT pg_try_advisory_xact_lock(hashtext('{REBUILDS}'))"


def application_name(modules: Sequence[ModuleType] | None = None) -> dict[str, str]:
    """Connection settings naming the process and the versions it serves, "tasktrail[pid] tasks:1,stats:1".

    The pid tells the processes holding a version apart (one may hold it on two
    connections); the versions let prune see a process whose liveness lock
    went with a dropped connection while its pool is still connected.
    """
    served = projections.projected(projections.INLINE if modules is None else modules)
    return {"application_name": f"tasktrail[{os.getpid()}] {served}"[:NAMEDATALEN]}


NAMEDATALEN = 63  # what PostgreSQL keeps of an application_name


@dataclass
class Version:
    name: str
    version: int
    state: str
    since: datetime
    behind: int  # events of other releases committed after its checkpoint (0 when not live)
    processes: int  # server processes using it now
    code: bool  # this code's version


def status(conninfo: str, modules: Sequence[ModuleType]) -> tuple[list[Version], int, list[str]]:
    """Every version in the registry, and each of the code's that is not there yet; the log head; the
    schemas interrupted builds left."""
    mine = {(m.NAME, m.VERSION) for m in modules}
    with psycopg.connect(conninfo, **db.connect_kwargs()) as conn:
        rows = conn.execute(STATUS, {"uses": USES}).fetchall()
        head = conn.execute(HEAD).fetchone()[0]  # type: ignore[index]
        left = [name for (name,) in conn.execute(LEFT_OVER).fetchall()]
        if left and not conn.execute(NO_REBUILD).fetchone()[0]:  # type: ignore[index]
            left = []  # a rebuild is filling them now
    found = [Version(*row, code=(row[0], row[1]) in mine) for row in rows]
    missing = mine - {(v.name, v.version) for v in found}
    found += [Version(name, version, "missing", None, 0, 0, True) for name, version in sorted(missing)]  # type: ignore[arg-type]
    return found, head, left


# --- prune ------------------------------------------------------------------

TRY_EXCLUSIVE = "SELECT pg_try_advisory_xact_lock(hashtext(%(space)s), hashtext(%(version)s))"
STATE = "SELECT state FROM projection_versions WHERE name = %(name)s AND version = %(version)s FOR UPDATE"
DROP_SCHEMA = sql.SQL("DROP SCHEMA {} CASCADE")
SCHEMAS = "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%(schemas)s) ORDER BY nspname"
RETIRE = """
UPDATE projection_versions SET state = 'retired', checkpoint = NULL, since = now()
WHERE name = %(name)s AND version = %(version)s
"""
VIEWS = "SELECT projection_views(%(name)s)"  # migration 0014: views of the newest live version, for psql
PRUNABLE = "SELECT name, version, state FROM projection_versions WHERE state <> 'retired' ORDER BY name, version"
# Connections of a server process serving the version ("tasktrail[pid] a:1,b:2", see application_name), but this one.
CONNECTED = """
SELECT count(DISTINCT split_part(application_name, ' ', 1)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'tasktrail[%%] %%'
  AND strpos(',' || split_part(application_name, ' ', 2) || ',', ',' || %(version)s || ',') > 0
"""


class InUse(Exception):
    """A process uses the version: it cannot be pruned now."""


class Kept(Exception):
    """The version is what the log's views show, and the one that would take its place is stale: not now."""


def _views_refusal(conn: psycopg.Connection, name: str, version: int) -> str | None:
    """Why pruning this live version would leave the log's views with nothing, or with stale rows; None if not.

    A release from before versioned read models reads and writes through the views, and holds no liveness
    lock (prune cannot see it); psql users read them too. The views move to the next newest live version:
    one that lacks events and that no process keeps current would be served stale (audit: a pre-0014
    release, rolled back to, then refused every write to a task it read as older: "changing too fast").
    """
    # Its live versions, newest first: the views show the first (migration 0014), and then the second.
    found = [Version(*row, code=False) for row in conn.execute(STATUS, {"uses": USES}).fetchall()]
    live = sorted((v for v in found if v.name == name and v.state == "live"), key=lambda v: -v.version)
    if live[0].version != version or len(live) == 1:
        return None  # the views show a newer one and go on doing so; or, named, the last one goes (serve rebuilds)
    fallback = live[1]
    if fallback.behind == 0 or fallback.processes > 0:
        return None  # current, or being made so by the process that serves it
    return (
        f"the log's views would show {name} version {fallback.version} instead, which lacks {fallback.behind:,}"
        " events and is kept current by no process: start a release that serves it (it catches up), then prune"
    )


def prune(conninfo: str, name: str, version: int) -> str:
    """Drop one version's tables and retire it, unless a process uses it (InUse); what was done, in words."""
    schema = projections.schema(name, version)
    with psycopg.connect(conninfo, **db.connect_kwargs()) as conn, conn.transaction():
        found = conn.execute(STATE, {"name": name, "version": version}).fetchone()
        if found is None:
            raise LookupError(f"there is no version {version} of read model {name!r}")
        if found[0] == "retired":
            return f"{name} version {version} was pruned already"
        marker = key(USES, name, version)
        # Its lock says a process uses it; a process whose locking connection dropped a moment ago (it
        # takes the lock again as it reconnects) is still connected through its pool.
        held = not conn.execute(TRY_EXCLUSIVE, marker).fetchone()[0]  # type: ignore[index]
        if held or conn.execute(CONNECTED, marker).fetchone()[0]:  # type: ignore[index]
            raise InUse(
                f"{name} version {version} is in use by a running process; stop every process of that release first"
            )
        if found[0] == "live" and (refusal := _views_refusal(conn, name, version)) is not None:
            raise Kept(refusal)
        # Held until this commits: a process starting on this version meanwhile waits, then finds it retired.
        dropped = [s for (s,) in conn.execute(SCHEMAS, {"schemas": [schema, f"{schema}_new"]}).fetchall()]
        for name_of in dropped:
            conn.execute(DROP_SCHEMA.format(sql.Identifier(name_of)))
        conn.execute(RETIRE, {"name": name, "version": version})
        conn.execute(VIEWS, {"name": name})
    what = f"dropped schema {' and '.join(dropped)}" if dropped else "it had no tables left"
    return f"pruned {name} version {version}: {what}"


NAMES = "SELECT DISTINCT name FROM projection_versions"


def names(conninfo: str) -> set[str]:
    """Every read model the registry has had a version of."""
    with psycopg.connect(conninfo, **db.connect_kwargs()) as conn:
        return {name for (name,) in conn.execute(NAMES).fetchall()}


def unused(conninfo: str, modules: Sequence[ModuleType]) -> list[tuple[str, int]]:
    """The versions `prune` without a version considers: every one that exists, except this code's and a read
    model's last live one (audit: a release of another version, rolled back to, lost its read model to it)."""
    mine = {(m.NAME, m.VERSION) for m in modules}
    with psycopg.connect(conninfo, **db.connect_kwargs()) as conn:
        found = conn.execute(PRUNABLE).fetchall()
    live = Counter(n for n, _, state in found if state == "live")
    return [(n, v) for n, v, state in found if (n, v) not in mine and not (state == "live" and live[n] == 1)]
