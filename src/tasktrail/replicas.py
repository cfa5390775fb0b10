"""Which connection a read uses, and why it is fresh enough.

With streaming replicas configured (`serve --replica URL`, DATABASE_REPLICA_URLS),
reads (a task, lists, stats, history, time travel, the feed, streams) go to a
replica; writes, and every read a write makes (the state it decides on, the
Idempotency-Key check), go to the primary, through `writing`. A replica never
answers with data older than the client has written:

Tokens. Every 2xx answer to a write carries `Tasktrail-Read-After` (put there
by http/app.py's `observed`): with replicas, the primary's WAL insert
position taken on the write's connection after the write committed (`_Written`). The commit record is inserted before
COMMIT returns, so that position is at or after the record's end, whatever
synchronous_commit says (the flush position is not, with synchronous_commit
off). A position taken inside the write's statement would come before the commit
record, and a replica at exactly that position would not show the write yet;
and the writer cannot take it in `writer._write`, since a write in an explicit
transaction (an Idempotency-Key create, cleanup, a batch) commits after it, and
a no-op writes nothing. The price is one more statement after each write (on
the connection the write already holds): +60-100 us of app CPU and a round trip
(tests/replication.py's pair, 4 x 2,000 creates, A/B in one process: 203-238 us
of app CPU per create plain, 281-383 us with it), which only a process with
replicas pays. Without replicas no read is routed, so the token needs no
position: it is ON_PRIMARY, "read this from the primary", which costs nothing
and stays correct if it reaches a process that has replicas (a rolling change
of configuration). A token names at most a position; a replica is fresh enough
for it when its replay position (`pg_last_wal_replay_lsn()`) is at or past it,
and a statement on the replica takes its snapshot after that replay, so it sees
the commit. A request that sends a token this service did not give out (or
ON_PRIMARY) cannot prove any replica fresh enough: it is answered from the
primary, never refused (a client that wants fresh reads can always have them;
a forged high position only costs the primary a read it could be asked for
anyway).

Health. Each process checks its replicas in the background, never in a
request: every `interval` it samples the primary's flushed WAL position, and
asks each replica how far it has replayed (each on its own clock: one that does
not answer holds back no other's check). The replay positions the checks see
serve the tokens: on one connection they only grow, so a replica seen past a
token is past it now; a new connection (perhaps to another standby behind the
same address) starts from nothing. A replica's lag is how long it has been behind the primary's positions:
the time since the health checks first saw the oldest position it has not
replayed (`PrimaryPositions`). An idle primary does not move, so a replica that
has replayed everything has no lag however long ago the last write was, which
`now() - pg_last_xact_replay_timestamp()` would count. A replica that does not
answer, lags more than `max_lag`, has not yet been seen level with a position
of the primary (just after start), is not in recovery (promoted), or belongs to
another cluster or database gets no reads until a check finds it serving again.

Failures. A read that fails on a replica for any database reason (the replica
died mid-request, its pool has no connection for REPLICA_POOL_TIMEOUT, a query
cancelled by a conflict with recovery) runs again on the primary: no request
fails because of a replica. A dead connection also takes the replica out of
service at once; the next check that reaches it puts it back.

Streams. NOTIFY does not reach a standby, so the process's live.Listener
listens on the primary; when woken it asks the primary where its WAL is and
reads the feed from the freshest replica in one round trip together with its
replay position (`read_caught_up`), reading again (with backoff) until a
replica has replayed what the primary had flushed when woken, or from the
primary once none has for STREAM_PATIENCE. That position
only decides how soon the listener reads again, never what a stream may miss:
the feed itself is gap-free on any server (why its order holds on a standby is
said beside the feed, in eventstore.py), and polling picks up whatever a
notification did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tasktrail import db, projections
from tasktrail.domain.task import PreconditionFailed, TaskNotFound, TransitionRejected
from tasktrail.projections import versions

log = logging.getLogger("tasktrail.replicas")
T = TypeVar("T")

HEADER = "Tasktrail-Read-After"
_HEADER = HEADER.lower().encode()
# Where a write handler's connection leaves the token, in the request's state dict.
STATE = "read_after"
ON_PRIMARY = "primary"
# A position no replica reaches: what a token names when it cannot be read.
EVERYTHING = 1 << 64
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

URLS_ENV = "DATABASE_REPLICA_URLS"
GIVEN_ENV = "TASKTRAIL_REPLICAS_GIVEN"  # serve's --replica values, for its workers (see `configured`)
MAX_LAG_ENV = "TASKTRAIL_REPLICA_MAX_LAG"
DEFAULT_MAX_LAG = 5.0
# A request waits this long for a replica's pooled connection before it reads from the primary.
REPLICA_POOL_TIMEOUT = 0.5
# A health check that takes longer than this finds the replica down (or the primary not answering).
CHECK_TIMEOUT = 2.0
# How long the streams wait for a replica to replay a commit before they read it from the primary.
STREAM_PATIENCE = 1.0

SERVING = "serving"
STARTING = "starting"
LAGGING = "lagging"
DOWN = "down"
NOT_A_STANDBY = "not a standby"
FOREIGN = "not a replica of the primary"
NO_ACCESS = "no access"
STATES = (SERVING, STARTING, LAGGING, DOWN, NOT_A_STANDBY, FOREIGN, NO_ACCESS)

INSERTED = "SELECT pg_current_wal_insert_lsn()::text"
FLUSHED = "SELECT pg_current_wal_flush_lsn()::text"
# NULL on a server that is not in recovery: a promoted standby keeps its last replay position until it
# restarts, and it takes writes of its own, which the primary's readers must never see.
REPLAYED = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END"
IDENTITY = "SELECT system_identifier, current_database() FROM pg_control_system()"
# Servers of one replication family share a system identifier, also one that took a history of its own: a
# standby of a promoted sibling (a failover the primary's URL did not follow) has replayed WAL positions the
# primary's tokens compare with, but of another timeline. So a replica must be on the primary's timeline.
# The primary's, from the name of the WAL file it writes; the replica's, what it receives (NULL where the
# role may not see pg_stat_wal_receiver's details). While it receives nothing (no receiver at all; audit: a
# standby of a stopped, promoted sibling, replayed past the primary, served stale reads with lag 0), the
# newest timeline its control file knows (of its last restartpoint or minimum recovery point): one newer
# than the primary's is another history. An older one says nothing (a standby that followed the primary
# through a failover keeps the old one there until its next restartpoint), and is not held against it.
TIMELINE = """
SELECT CASE WHEN NOT pg_is_in_recovery()
            THEN ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int END
"""
# A health check's one round trip: REPLAYED's position, the timeline the replica receives, and the one its
# control file names while it has no receiver.
CHECKED = (
    REPLAYED  # noqa: S608 -- constants
    + """, (SELECT received_tli FROM pg_stat_wal_receiver),
    CASE WHEN pg_is_in_recovery() AND NOT EXISTS (SELECT FROM pg_stat_wal_receiver) THEN greatest(
        (pg_control_checkpoint()).timeline_id, nullif((pg_control_recovery()).min_recovery_end_timeline, 0)) END"""
)
# What of the tables reads use on a replica its role cannot read (NULL: none): the log, and every table and
# view of this process's read-model schemas (given), a schema that is not there, or one it may not use. A
# new version's schema (a rebuild, a release) does not come with the grants an operator gave a role of its
# own on the old one's (audit): every read there failed, and was read again on the primary, while the
# replica showed as serving. Grants seldom change: asked on each new check connection, and every
# ACCESS_EVERY seconds.
UNREADABLE = """
SELECT string_agg(name, ', ' ORDER BY name) FROM (
    SELECT wanted || ' (no such schema)' FROM unnest(%(schemas)s::text[]) AS wanted
    WHERE to_regnamespace(wanted) IS NULL
    UNION ALL
    SELECT 'events (not found on the search_path)' WHERE to_regclass('events') IS NULL
    UNION ALL
    SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE (n.nspname = ANY(%(schemas)s::text[]) AND c.relkind IN ('r', 'v', 'm', 'p') OR c.oid = to_regclass('events'))
      AND NOT (has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'))
) AS unreadable (name)
"""
ACCESS_EVERY = 10.0

_LSN = re.compile(rb"\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*")


def lsn(text: str) -> int:
    """A WAL position from PostgreSQL's text form (`16/B374D848`)."""
    high, _, low = text.partition("/")
    return int(high, 16) << 32 | int(low, 16)


def wanted(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The WAL position a request's Tasktrail-Read-After asks a replica to have replayed; None when it asks none.

    Several tokens (repeated headers, or a comma-separated list) ask for the
    latest of them; one this service did not give out asks for EVERYTHING.
    """
    position = None
    for name, value in headers:
        if name != _HEADER:
            continue
        for token in value.split(b","):
            if not token.strip():
                continue
            m = _LSN.fullmatch(token)
            at = int(m[1], 16) << 32 | int(m[2], 16) if m else EVERYTHING
            position = at if position is None else max(position, at)
    return position


def split_urls(value: str) -> list[str]:
    """DATABASE_REPLICA_URLS' connection strings: comma-separated, though a multi-host URL has commas of its own.

    A piece starts a new connection string when it starts with a URL scheme or
    a `keyword=`; any other piece (`h2:5433/db` of `postgresql://h1,h2:5433/db`)
    continues the one before.
    """
    urls: list[str] = []
    for piece in value.split(","):
        if not piece.strip():
            continue
        if urls and not re.match(r"\s*(?:postgres(?:ql)?://|\w+\s*=)", piece):
            urls[-1] += "," + piece
        else:
            urls.append(piece.strip())
    return urls


def describe(conninfo: str) -> str:
    """host:port/dbname of a connection string, without its credentials (for logs and metrics)."""
    parts = conninfo_to_dict(conninfo)
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    where = f"{host}:{parts['port']}" if parts.get("port") else str(host)
    return f"{where}/{parts['dbname']}" if parts.get("dbname") else where


def max_lag_from(value: str | float) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= 86_400):
        raise ValueError(f"the replica max lag must be a number of seconds above 0 (up to 86400), not {value!r}")
    return seconds


def configured(environ: Mapping[str, str] = os.environ) -> tuple[list[str], float]:
    """The replica connection strings and max lag the environment names (what `serve` hands its workers).

    `serve --replica` hands its values on as a JSON list (GIVEN_ENV): joined
    with commas, a password with ",a=" in it would read as two connection strings.
    """
    given = environ.get(GIVEN_ENV)
    urls = msgspec.json.decode(given, type=list[str]) if given else split_urls(environ.get(URLS_ENV, ""))
    for url in urls:
        check_url(url)
    return urls, max_lag_from(environ.get(MAX_LAG_ENV, DEFAULT_MAX_LAG))


def check_url(url: str) -> None:
    if not db.is_conninfo(url):
        shown = _PASSWORD.sub(lambda found: (found[1] or found[2]) + "***", url)  # it goes to the log
        raise ValueError(f"replica {shown!r} is not a PostgreSQL connection string {db.CONNINFO_EXAMPLE}")


# A password in a URL (user:password@) or in key=value form (password=...).
_PASSWORD = re.compile(r"(://[^:/@?#]*:)[^@]*(?=@)|(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


class PrimaryPositions:
    """The primary's WAL positions as the health checks saw them, each with when it was first seen."""

    def __init__(self, keep: float) -> None:
        # Positions older than `keep` are forgotten, except the newest of them:
        # a replica behind that one has been behind for at least `keep`.
        self.keep = keep
        self.seen: deque[tuple[float, int]] = deque()

    def add(self, at: float, position: int) -> None:
        if self.seen and position <= self.seen[-1][1]:
            return  # the primary has not moved: it is the first sighting that counts
        if self.seen and at - self.seen[-1][0] < self.keep / 1000:
            # Sightings closer than this share one: a replica between the two counts
            # as behind since the first (a little early), and `seen` holds at most a
            # thousand or so whatever the max lag.
            self.seen[-1] = (self.seen[-1][0], position)
            return
        self.seen.append((at, position))
        while len(self.seen) > 1 and self.seen[1][0] < at - self.keep:
            self.seen.popleft()

    def behind(self, replayed: int, now: float) -> tuple[float, bool]:
        """How long a replica at `replayed` has been behind the primary, and whether that is exact.

        Not exact when it is behind every position remembered: then it has been
        behind at least since the oldest (or since before the checks began), and
        with no position seen yet nothing is known.
        """
        if not self.seen or replayed < self.seen[0][1]:
            return (now - self.seen[0][0] if self.seen else math.nan), False
        for at, position in self.seen:
            if position > replayed:
                return now - at, True
        return 0.0, True


class Replica:
    """One standby: its pool for reads, and what the health checks found."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.name = describe(conninfo)
        # Opened when a check finds the replica serving, closed when one finds it
        # down: a replica that comes back gets fresh connections, and one that
        # is away costs no reconnection attempts beyond the checks'.
        self.pool: AsyncConnectionPool | None = None
        self.state = STARTING
        self.replayed = 0
        self.lag = math.nan  # unknown until a check reaches it, and again while one cannot
        self.identity: tuple[Any, ...] | None = None
        self.check_conn: psycopg.AsyncConnection | None = None
        self.unreadable: str | None = None  # what of the tables reads use it cannot read, as last asked
        self.access_checked = -math.inf  # when that was (time.monotonic())


class Replicas:
    """The process's read routing: the primary's pool, and its replicas' pools and health."""

    def __init__(
        self, conninfo: str, primary: AsyncConnectionPool, urls: Sequence[str] = (), max_lag: float = DEFAULT_MAX_LAG
    ) -> None:
        self.conninfo = conninfo
        self.primary = primary
        self.replicas = [Replica(url) for url in urls]
        self.max_lag = max_lag
        self.interval = max(0.05, min(0.25, max_lag / 10))
        self.positions = PrimaryPositions(keep=2 * max_lag + 1)
        self.serving: list[Replica] = []
        self._turn = 0
        self._behind_since: float | None = None  # since when no replica read by read_caught_up had its target
        self._identity: tuple[Any, ...] | None = None
        self._timeline: int | None = None
        # The schemas of this process's read-model versions, which its reads on a replica need to read.
        self.schemas = [projections.schema(module.NAME, module.VERSION) for module in projections.INLINE]
        self._primary_conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.replicas:
            return
        self._task = asyncio.create_task(self._watch(), name="tasktrail-replicas")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in [self._primary_conn, *(r.check_conn for r in self.replicas)]:
            if conn is not None:
                await conn.close()
        for replica in self.replicas:
            await _close_pool(replica)

    def status(self) -> list[tuple[str, str, float]]:
        """Each replica's name, state (one of STATES) and lag in seconds: what /metrics shows of them."""
        return [(replica.name, replica.state, replica.lag) for replica in self.replicas]

    # --- writes ---------------------------------------------------------------

    def writing(self, scope: Mapping[str, Any]) -> db.Borrowed:
        """A primary connection for a handler; for a write (with replicas) it leaves the token in the state."""
        if not self.replicas or scope["method"] in SAFE_METHODS:
            return db.Borrowed(self.primary)
        return _Written(self.primary, scope["state"])

    # --- reads ----------------------------------------------------------------

    async def read(self, scope: Mapping[str, Any], fetch: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """fetch(conn) on a serving replica fresh enough for the request's token, else on the primary."""
        if not self.replicas:
            async with db.Borrowed(self.primary) as conn:
                return await fetch(conn)
        return await self._on(self._choose(wanted(scope["headers"])), fetch)

    async def read_steadily(
        self, fetch: Callable[[psycopg.AsyncConnection], Awaitable[T]], *, primary: bool = False
    ) -> T:
        """fetch(conn) on the freshest serving replica (as the listener reads), else (or if asked) the primary."""
        return await self._on(None if primary else self._freshest(), fetch)

    def _freshest(self) -> Replica | None:
        """The serving replica that has replayed the most, as far as is known (the first of equals).

        One whose replay is paused, or slow, stays where it was; the checks move
        the others on within `interval`, so a stream reads from one of them.
        """
        return max(self.serving, key=lambda replica: replica.replayed, default=None)

    async def _on(self, replica: Replica | None, fetch: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """fetch(conn) on the replica; on the primary when there is none, or when the read fails there.

        A task the replica does not know (yet), or a version it has not
        replayed, is asked of the primary too: a replica may answer older
        data, but never "no such task" for one the primary has.
        """
        if replica is not None and replica.pool is not None:
            try:
                async with db.Borrowed(replica.pool) as conn:
                    return await fetch(conn)
            except TaskNotFound:
                pass
            except (psycopg.Error, PoolTimeout) as exc:
                self._failed(replica, exc)
        async with db.Borrowed(self.primary) as conn:
            return await fetch(conn)

    async def read_caught_up(
        self, fetch: Callable[[psycopg.AsyncConnection], Awaitable[T]], target: int
    ) -> tuple[T, bool]:
        """fetch(conn) on the freshest serving replica, and whether that replica had replayed `target` before it.

        The replay position is asked first, in the same round trip: the fetch's
        statement takes its snapshot after it, so it sees every commit up to it.
        With no replica serving, fetch runs on the primary, which has everything;
        and so it does once no replica has replayed a target for STREAM_PATIENCE:
        the streams wait no longer for replicas whose replay is paused, though
        they serve reads until they are max_lag behind.
        """
        replica = self._freshest()
        now = time.monotonic()
        if self._behind_since is not None and now - self._behind_since > STREAM_PATIENCE:
            replica = self._behind_since = None
        if replica is not None and replica.pool is not None:
            try:
                async with db.Borrowed(replica.pool) as conn:
                    async with conn.pipeline():
                        cur = await conn.execute(REPLAYED)
                        result = await fetch(conn)
                    (replayed,) = await cur.fetchone()  # type: ignore[misc]
                if replayed is None:
                    raise psycopg.OperationalError("the replica is not in recovery")
                replica.replayed = max(replica.replayed, lsn(replayed))
                caught_up = replica.replayed >= target
                self._behind_since = None if caught_up else self._behind_since or now
                return result, caught_up
            except (psycopg.Error, PoolTimeout) as exc:
                self._failed(replica, exc)
        async with db.Borrowed(self.primary) as conn:
            return await fetch(conn), True

    async def position(self, conn: psycopg.AsyncConnection) -> int:
        """The primary's flushed WAL position, on a connection to it."""
        cur = await conn.execute(FLUSHED)
        return lsn((await cur.fetchone())[0])  # type: ignore[index]

    def _choose(self, after: int | None) -> Replica | None:
        serving = self.serving
        if after is not None:
            serving = [replica for replica in serving if replica.replayed >= after]
        if not serving:
            return None
        self._turn += 1
        return serving[self._turn % len(serving)]

    def _failed(self, replica: Replica, exc: BaseException) -> None:
        log.warning("replica %s: a read failed (%s); read from the primary instead", replica.name, exc)
        if isinstance(exc, psycopg.OperationalError | PoolTimeout):
            self._set(replica, DOWN, str(exc))
        elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
            # Out of service until a check finds it can read again: the next one asks (then each second).
            replica.access_checked = -math.inf
            self._set(replica, NO_ACCESS, str(exc))

    # --- health ---------------------------------------------------------------

    async def _watch(self) -> None:
        """Where the primary's WAL is, and how far each replica has replayed it, each on a clock of its own.

        A replica that takes connections and never answers makes its check wait
        CHECK_TIMEOUT: it must not hold back the checks of the others (a lagging
        one would serve for that long past max_lag).
        """
        checks = [self._primary_check, *(functools.partial(self._check, replica) for replica in self.replicas)]
        await asyncio.gather(*(self._every(check) for check in checks))

    async def _every(self, check: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await check()
            except Exception:  # a bug here must not stop the checks (reads then keep their last routing)
                log.exception("replica health check failed")
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - began)))

    async def _primary_check(self) -> None:
        now = time.monotonic()
        position = await self._primary_position()
        if position is not None:
            self.positions.add(now, position)

    async def _primary_position(self) -> int | None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                if self._primary_conn is None or self._primary_conn.closed:
                    kwargs = db.connect_kwargs() | versions.application_name()  # named as the process's pool is
                    self._primary_conn = await psycopg.AsyncConnection.connect(self.conninfo, **kwargs)
                    self._identity = await _identity(self._primary_conn)
                    self._timeline = (await (await self._primary_conn.execute(TIMELINE)).fetchone())[0]  # type: ignore[index]
                return await self.position(self._primary_conn)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            # Replicas keep the positions seen so far: with the primary down they can still serve reads.
            log.debug("replica check: the primary's position is unknown: %s", exc)
            await _close(self._primary_conn)
            self._primary_conn = None
            return None

    async def _check(self, replica: Replica) -> None:
        now = time.monotonic()
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                if replica.check_conn is None or replica.check_conn.closed:
                    # Perhaps another standby behind the same address (a failover), which may have
                    # replayed less than the last one: what that one had replayed no longer holds.
                    replica.replayed = 0
                    replica.check_conn = await psycopg.AsyncConnection.connect(replica.conninfo, **db.connect_kwargs())
                    replica.identity = await _identity(replica.check_conn)
                    replica.access_checked = -math.inf
                # Asked more often while it is out of service for it, to serve again soon after a grant.
                if now - replica.access_checked >= (1.0 if replica.state == NO_ACCESS else ACCESS_EVERY):
                    cur = await replica.check_conn.execute(UNREADABLE, {"schemas": self.schemas})
                    (replica.unreadable,) = await cur.fetchone()  # type: ignore[misc]
                    replica.access_checked = now
                cur = await replica.check_conn.execute(CHECKED)
                replayed, timeline, stored = await cur.fetchone()  # type: ignore[misc]
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await _close(replica.check_conn)
            replica.check_conn = None
            replica.replayed, replica.lag = 0, math.nan  # unknown, until a check reaches it again
            self._set(replica, DOWN, str(exc) or type(exc).__name__)
            await _close_pool(replica)
            return
        replica.lag = math.nan  # a lag behind this primary, only once the replica is found to be its standby
        if self._identity is not None and replica.identity != self._identity:
            self._set(replica, FOREIGN, f"it is {replica.identity}, the primary {self._identity}")
            return
        if timeline is None and None not in (stored, self._timeline) and stored > self._timeline:
            timeline = stored  # no receiver: only a newer timeline than the primary's tells (CHECKED)
        if None not in (timeline, self._timeline) and timeline != self._timeline:
            self._set(replica, FOREIGN, f"it is on timeline {timeline}, the primary on {self._timeline}")
            return
        if replayed is None:
            self._set(replica, NOT_A_STANDBY, "pg_is_in_recovery() is false")
            return
        replica.replayed = max(replica.replayed, lsn(replayed))
        replica.lag, exact = self.positions.behind(replica.replayed, now)
        if replica.unreadable is not None and exact:
            self._set(replica, NO_ACCESS, f"it cannot read {replica.unreadable} (see docs/scaling.md)")
            await _close_pool(replica)
        elif not exact:
            self._set(replica, STARTING if replica.state == STARTING else LAGGING, "not yet level with the primary")
        elif replica.lag > self.max_lag:
            self._set(replica, LAGGING, f"{replica.lag:.1f} s behind the primary")
        elif await _open_pool(replica):
            self._set(replica, SERVING, "")
        else:
            self._set(replica, DOWN, "no connection for its pool")

    def _set(self, replica: Replica, state: str, why: str) -> None:
        if state != replica.state:
            if state == SERVING:
                log.info("replica %s: serving reads", replica.name)
            else:
                log.warning("replica %s: %s (%s): its reads go elsewhere", replica.name, state, why)
            replica.state = state
            self.serving = [r for r in self.replicas if r.state == SERVING]


# A write the log refused (no such task, a move it does not allow, another version than If-Match): decided
# on the primary's data, so its answer carries a token too. A client whose first attempt's answer was lost
# meets this refusal on its retry, and reads the task back to see whether the first one was applied: with
# the token, from data that has it (a replica behind would say it was not).
REFUSED = (TaskNotFound, TransitionRejected, PreconditionFailed)


class _Written(db.Borrowed):
    """A primary connection for a write handler: once the handler is done with it, the token of what it wrote."""

    __slots__ = ("state",)

    def __init__(self, pool: AsyncConnectionPool, state: dict[str, Any]) -> None:
        super().__init__(pool)
        self.state = state

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            answered = kind is None or issubclass(kind, REFUSED)
            if answered and self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                cur = await self.conn.execute(INSERTED)
                self.state[STATE] = (await cur.fetchone())[0]  # type: ignore[index]
        except psycopg.Error as exc:
            # The write committed; without its position the answer says ON_PRIMARY, which is never stale.
            log.warning("no WAL position for the read-after token: %s", exc)
        finally:
            await super().__aexit__(kind, *rest)


async def _identity(conn: psycopg.AsyncConnection) -> tuple[Any, ...]:
    """The cluster (its system identifier) and database a connection reaches: a replica's must be the primary's."""
    cur = await conn.execute(IDENTITY)
    return tuple(await cur.fetchone())  # type: ignore[arg-type]


async def _open_pool(replica: Replica) -> bool:
    """Give a replica a pool with its first connections open, unless it has one; whether it has."""
    if replica.pool is None:
        pool = db.create_pool(replica.conninfo, timeout=REPLICA_POOL_TIMEOUT, busy_wait=0)  # else: the primary
        try:
            await pool.open(wait=True, timeout=CHECK_TIMEOUT)
        except (PoolTimeout, psycopg.Error) as exc:
            log.debug("replica %s: no pool: %s", replica.name, exc)
            await pool.close()
            return False
        replica.pool = pool
    return True


async def _close_pool(replica: Replica) -> None:
    pool, replica.pool = replica.pool, None
    if pool is not None:
        await pool.close()


async def _close(conn: psycopg.AsyncConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(psycopg.Error, OSError):
            await conn.close()
