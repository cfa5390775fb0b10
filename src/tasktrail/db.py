"""Where the database is, and connections to it."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
import re
import select
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

DEFAULT_DATA_DIR = Path(".tasktrail")
EMBEDDED_DATABASE = "tasktrail"

# Every connection: UTC timestamps, and no statement, lock wait or idle
# transaction that holds a connection for ever (TASKTRAIL_STATEMENT_TIMEOUT and
# TASKTRAIL_LOCK_TIMEOUT override the first two); connect_kwargs() adds the
# search_path of this process's read-model versions.
STATEMENT_TIMEOUT = "30s"
# A write waits on a lock only while another transaction that changed the same
# task (or claimed the same Idempotency-Key) is still open. Ours are one
# statement each and hold their locks for milliseconds, so a wait of seconds
# means a transaction left open elsewhere (a psql session, a stuck batch job):
# better to give the connection back and answer a retryable 503 than to hold
# one of the pool's connections for the whole statement timeout while more
# requests queue behind the same lock and the pool runs dry. 5 s is far above
# any wait between our own writers, even under load.
LOCK_TIMEOUT = "5s"
_SESSION = "-c TimeZone=UTC -c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout=60s"
# The defaults; connect_kwargs() applies the overrides.
SESSION_OPTIONS = _SESSION.format(STATEMENT_TIMEOUT, LOCK_TIMEOUT)
_DURATION = re.compile(r"[1-9][0-9]*(?:ms|s|min)?")

# A request waits this long for a pooled connection, then answers 503: with the
# database down no connection ever comes, and the spec wants an answer within 2 s
# (TASKTRAIL_POOL_TIMEOUT overrides it, in seconds). Unless the pool is busy but
# moving: while other requests give connections back, a request waits on, for
# BUSY_WAIT in all, so a burst of requests queues instead of being refused (a
# thousand concurrent creates on one process got 143 answers 503 under load).
POOL_TIMEOUT = 1.5
BUSY_WAIT = 10.0
# The connections a server process's pool may open (TASKTRAIL_POOL_SIZE overrides it): the requests it serves
# at once; those beyond wait for one, as above.
POOL_SIZE = 16
POOL_SIZE_ENV = "TASKTRAIL_POOL_SIZE"
POOL_KEPT = 2  # connections a pool keeps open while idle
# Opening a connection to an unreachable host gives up after this (libpq's
# minimum); the pool does it in the background, never in a request.
CONNECT_TIMEOUT = 2
# The pool retries a failed connection with a doubling delay; giving up after
# this lets the next request start afresh at 1 s, so a long outage does not
# leave the pool minutes away from its next attempt when the database returns.
RECONNECT_TIMEOUT = 10.0
# A request holds its connection at most the statement timeout and this much more (see Borrowed): the
# server's own timeout ends a slow statement first; this ends a wait on a server that answers nothing.
ANSWER_MARGIN = 2.0
# Over TCP, notice a peer that vanished without closing (a 25 s bound, not for ever).
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

set_json_dumps(msgspec.json.encode)
set_json_loads(msgspec.json.decode)


def start_embedded(data_dir: Path, cleanup_mode: str = "stop") -> Any:
    """Start (or reuse) the embedded PostgreSQL kept in data_dir; stopped at exit by the last process using it."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver then uses /tmp.
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server

        pgdata = data_dir.resolve() / "pgdata"
        if not _SHELL_QUOTABLE.fullmatch(str(pgdata)):  # checked before anything is made there
            raise ValueError(
                f"the embedded PostgreSQL cannot keep its data in {str(pgdata)!r}: its start-up passes the path"
                ' through a shell, which a ", $, ` or \\ would break; choose another --data-dir, or set DATABASE_URL'
            )
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file there, or above it; no permission
            why = "it is a file" if data_dir.is_file() else (exc.strerror or str(exc)).lower()
            raise ValueError(
                f"the embedded PostgreSQL cannot keep its data in {str(data_dir)!r} ({why}): choose another"
                " --data-dir (or TASKTRAIL_DATA_DIR), or set DATABASE_URL"
            ) from exc
        forget_gone_handles(pgdata)
        forget_stale_postmaster(pgdata)
        if pgserver.postgres_server.find_suitable_socket_dir is not _socket_dir:
            _socket_dir.__wrapped__ = pgserver.postgres_server.find_suitable_socket_dir  # type: ignore[attr-defined]
            pgserver.postgres_server.find_suitable_socket_dir = _socket_dir
        server = pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)
        # atexit runs hooks last in, first out: this runs just before pgserver's own, which stops the server.
        atexit.register(forget_gone_handles, pgdata)
        return server


# pg_ctl quotes the data directory for the shell it starts PostgreSQL through ("..."), in which
# these keep a meaning; pgserver hands it the socket's directory unquoted (-o '-k DIR').
_SHELL_QUOTABLE = re.compile(r'[^"$`\\]*')
_SHELL_PLAIN = re.compile(r"[A-Za-z0-9_./+=:@,%-]*")


def _socket_dir(pgdata: Path, runtime_path: Path) -> Path:
    """pgserver's choice of a folder for the server's socket, but never one whose path a shell would split.

    It takes the data folder when the socket's path fits there: a data folder
    under "My Projects" would end PostgreSQL's start (-k '/home/me/My' and a
    stray argument). Then, as pgserver does when the path is too long: a
    folder of its own under the user's runtime folder, named by a hash.
    """
    chosen: Path = _socket_dir.__wrapped__(pgdata, runtime_path)  # type: ignore[attr-defined]
    if _SHELL_PLAIN.fullmatch(str(chosen)):
        return chosen
    own = runtime_path / hashlib.sha256(f"{pgdata}-{pgdata.stat().st_ino}".encode()).hexdigest()[:10]
    if not _SHELL_PLAIN.fullmatch(str(own)):
        raise ValueError(
            f"no folder for the embedded PostgreSQL's socket: {str(chosen)!r} and {str(own)!r} hold spaces"
        )
    own.mkdir(parents=True, exist_ok=True)
    return own


# pgserver stops its server when the last process holding a handle to it
# exits. It keeps the holders' process ids in pgdata/.handle_pids.json, and an
# id leaves the list only through its own process's atexit hook, which a
# SIGKILL, a crash or a signal Python does not handle never runs. One such id
# and the list never empties again: no later process ever stops the server,
# not even after a clean Ctrl-C. So each start and each exit first drops the
# ids of processes that are gone. A process that took an id after its holder
# died is gone too, for this purpose: every holder wrote the list after it
# started, so a process that started after the list's last write (with a
# margin for the coarse clock of process start times) cannot be a holder.
HANDLES = ".handle_pids.json"
_START_MARGIN = 2.0  # seconds


def forget_gone_handles(pgdata: Path) -> list[int]:
    """Remove the ids of gone processes from pgserver's handle list; the ids kept."""
    import psutil
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    path = pgdata / HANDLES
    with PostgresServer._lock:
        if not path.exists():
            return []
        handles = DiskList(path)
        listed = handles.get()
        written = path.stat().st_mtime + _START_MARGIN
        kept = [pid for pid in listed if _holder(psutil, pid, written)]
        if kept != listed:
            handles.put(kept)
        return kept


def _holder(psutil: Any, pid: int, written: float) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= written
    except psutil.NoSuchProcess:
        return False


def forget_stale_postmaster(pgdata: Path) -> bool:
    """Remove a postmaster.pid whose process id is now another process's; whether it did.

    A machine's restart, or a SIGKILL of PostgreSQL, leaves the file behind, and
    its id may be taken since by any process. pgserver takes any live process of
    that id for its server: it failed to connect, then stopped that process at
    exit (SIGTERM, then SIGKILL; another data folder's PostgreSQL, with pg_ctl).
    The server the file names started when the file says (its third line, in
    seconds): a process of that id that started at another time is not it. Any
    user may read a process's start time; when it cannot be told, the file stays.
    """
    import psutil
    from pgserver.postgres_server import PostgresServer

    path = pgdata / "postmaster.pid"
    with PostgresServer._lock:
        try:
            lines = path.read_text().split("\n")
            pid, started = int(lines[0]), int(lines[2])
        except (OSError, ValueError, IndexError):
            return False  # none, or not all written yet
        if pid <= 0:
            return False  # initdb's own backend, for a moment
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False  # as good as gone: pgserver sees that itself
            if abs(process.create_time() - started) <= _SAME_START:
                return False
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False  # gone (PostgreSQL starts over the file), or not ours to judge
        path.unlink(missing_ok=True)
        return True


_SAME_START = 2.0  # seconds: PostgreSQL writes its start time in whole seconds, a moment after the process began


def ensure_database(server_url: str, name: str) -> None:
    """Create the database unless it exists; two processes starting at once may both try, and both succeed."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            # Made by another process since the look: CREATE DATABASE says so as DuplicateDatabase, or, in
            # the same instant, as a UniqueViolation of the catalog's index.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


CONNINFO_EXAMPLE = "(postgresql://user@host:5432/database)"


def is_conninfo(url: str) -> bool:
    """Whether libpq reads url as a connection string; its own words on a refusal can quote a password."""
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return False
    return True


def resolve(data_dir: Path = DEFAULT_DATA_DIR) -> tuple[str, Any]:
    """DATABASE_URL when set, else the embedded server's; and its handle (or None)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        if not is_conninfo(url):
            raise ValueError(f"DATABASE_URL is not a PostgreSQL connection string {CONNINFO_EXAMPLE}")
        return url, None
    server = start_embedded(data_dir)
    ensure_database(server.get_uri(), EMBEDDED_DATABASE)
    return server.get_uri(EMBEDDED_DATABASE), server


def _duration(variable: str, default: str) -> str:
    value = os.environ.get(variable, default)
    if not _DURATION.fullmatch(value):
        raise ValueError(f"{variable}={value!r}: give a duration such as 30s, 500ms or 2min")
    return value


def duration_seconds(duration: str) -> float:
    """A duration as the settings give one (30s, 500ms, 2min; a bare number is ms, as PostgreSQL reads it)."""
    number = int(duration.rstrip("mins"))
    unit = duration[len(str(number)) :]
    return number * {"ms": 0.001, "": 0.001, "s": 1.0, "min": 60.0}[unit]


def seconds(variable: str, default: float) -> float:
    """A setting in seconds from the environment: a positive, finite number (ValueError names it otherwise)."""
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):  # also refuses nan
        raise ValueError(f"{variable}={value!r}: give a number of seconds, such as 5")
    return number


def pool_timeout() -> float:
    return seconds("TASKTRAIL_POOL_TIMEOUT", POOL_TIMEOUT)


def pool_size() -> int:
    """TASKTRAIL_POOL_SIZE, else POOL_SIZE: a whole number from 2 (ValueError names it otherwise)."""
    given = os.environ.get(POOL_SIZE_ENV, "").strip()
    if not given:
        return POOL_SIZE
    if not (given.isascii() and given.isdigit() and int(given) >= POOL_KEPT):
        raise ValueError(f"{POOL_SIZE_ENV}={given!r}: give a whole number of connections, at least {POOL_KEPT}")
    return int(given)


def statement_timeout() -> str:
    return _duration("TASKTRAIL_STATEMENT_TIMEOUT", STATEMENT_TIMEOUT)


def lock_timeout() -> str:
    return _duration("TASKTRAIL_LOCK_TIMEOUT", LOCK_TIMEOUT)


def connect_kwargs() -> dict[str, Any]:
    from tasktrail import projections  # the read models' schemas: see projections.INLINE

    session = _SESSION.format(statement_timeout(), lock_timeout())
    options = f"{session} -c search_path={projections.search_path(projections.INLINE)}"
    return {"autocommit": True, "options": options, "connect_timeout": CONNECT_TIMEOUT} | KEEPALIVES


def hung_up(conn: psycopg.AsyncConnection) -> bool:
    """Whether the server hung up on this idle connection (a restart, pg_terminate_backend), without a round trip.

    An idle connection has nothing to read unless the server went away (it sends
    a FATAL message and closes): a readable socket means a dead connection.
    """
    if conn.closed:
        return True
    poller = select.poll()  # not select.select: it fails on descriptors above 1023, which a busy server has
    poller.register(conn.pgconn.socket, select.POLLIN)
    return bool(poller.poll(0))


class Pool(AsyncConnectionPool):  # type: ignore[type-arg]
    """The pool, counting the connections requests have given back, and how long a request waits on (BUSY_WAIT).

    And the requests waiting for a connection now (`waiting`): psycopg_pool's own
    count (requests_waiting) keeps a request that gave up until a connection
    comes free for it, so in an outage it grew with every request refused; and
    how long a request may hold a connection before it is severed (`answer_within`).
    """

    given_back = 0
    busy_wait = BUSY_WAIT
    waiting = 0
    answer_within = ANSWER_MARGIN + duration_seconds(STATEMENT_TIMEOUT)


def sever(conn: psycopg.AsyncConnection) -> None:
    """Shut the connection's socket down: a query waiting on it fails at once (OperationalError), the server or not.

    The socket's end, not the connection's close: psycopg waits for the socket to
    be readable, which a shutdown makes it (at its end), and a closed one never is.
    """
    with contextlib.suppress(OSError, psycopg.Error), socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class Borrowed:
    """`async with Borrowed(pool) as conn`: one pooled connection, for one request.

    What pool.connection() does for our autocommit connections (putconn rolls
    back whatever was left open), as a plain class: no generator context
    managers, and no lock around a no-op commit.

    And a deadline (`within` seconds, else the pool's answer_within): a server
    that takes the connection and never answers (frozen, or behind a proxy that
    stopped forwarding: TCP keepalives are answered all the same) would hold the
    request for ever, as statement_timeout is the server's own. Past it the
    connection is severed, and the request answers 503.
    """

    __slots__ = ("_timer", "conn", "pool", "severed", "within")

    def __init__(self, pool: Pool, within: float | None = None) -> None:
        self.pool = pool
        self.within = within or pool.answer_within
        self.severed = False

    async def __aenter__(self) -> psycopg.AsyncConnection:
        given_back = self.pool.given_back
        self.pool.waiting += 1
        try:
            self.conn = await self._live()
        except PoolTimeout:
            self.conn = await self._while_moving(given_back)
        finally:
            self.pool.waiting -= 1
        self._timer = asyncio.get_running_loop().call_later(self.within, self._sever)
        return self.conn

    async def _live(self) -> psycopg.AsyncConnection:
        """A pooled connection within the pool's timeout, passing over those the server hung up on while they were idle.

        Each one passed over is closed, and the pool opens another in its place. Not the pool's own
        check: it pauses between failed checks (1 s, then 2 s), so after a restart of the database,
        with every idle connection dead, requests were refused for seconds while it was up again.
        """
        deadline = time.monotonic() + self.pool.timeout
        while True:
            conn = await self.pool.getconn(deadline - time.monotonic())
            if not hung_up(conn):
                return conn
            await conn.close()
            await self.pool.putconn(conn)

    def _sever(self) -> None:
        self.severed = True
        sever(self.conn)

    async def _while_moving(self, given_back: int) -> psycopg.AsyncConnection:
        """A connection, waiting on while others are given back meanwhile (busy_wait in all); else PoolTimeout."""
        waited = self.pool.timeout
        while self.pool.given_back != given_back and waited < self.pool.busy_wait:
            given_back = self.pool.given_back
            try:
                return await self._live()
            except PoolTimeout:
                waited += self.pool.timeout
        raise PoolTimeout(f"no pooled connection came within {waited:g} s")

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, *_: object) -> None:
        self._timer.cancel()
        if not self.conn.broken:  # a connection the database dropped is no sign of a pool that moves
            self.pool.given_back += 1
        await self.pool.putconn(self.conn)
        if self.severed and isinstance(exc, psycopg.OperationalError):
            raise psycopg.OperationalError(f"the database did not answer within {self.within:g} s") from exc


def create_pool(
    conninfo: str,
    *,
    max_size: int | None = None,
    timeout: float | None = None,
    busy_wait: float = BUSY_WAIT,
    settings: dict[str, str] | None = None,
) -> Pool:
    """A pool of up to `max_size` connections (default pool_size()) whose requests wait `timeout` for one
    (default TASKTRAIL_POOL_TIMEOUT, else POOL_TIMEOUT), and on, for `busy_wait` in all, while other requests
    give connections back; `settings` adds to each connection's (an application_name)."""
    pool = Pool(
        conninfo,
        min_size=POOL_KEPT,
        max_size=max_size or pool_size(),
        kwargs=connect_kwargs() | (settings or {}),
        timeout=timeout or pool_timeout(),
        reconnect_timeout=RECONNECT_TIMEOUT,
        open=False,
    )
    pool.busy_wait = busy_wait
    pool.answer_within = duration_seconds(statement_timeout()) + ANSWER_MARGIN
    return pool
