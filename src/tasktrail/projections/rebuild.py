"""Build a read-model version from the whole log while the service runs, and put it live.

A version's tables are built in a schema of their own next to the live ones
(rm_tasks_v2_new beside rm_tasks_v1, or beside rm_tasks_v2 itself when the
same version is rebuilt from scratch), in four steps; until the last one
commits, nothing any process reads or writes changes: interrupt it anywhere
and the service never notices; run it again and it drops what the last run
left and starts over.

1. Replay: in one REPEATABLE READ snapshot, stream the whole log (binary COPY,
   a row per chunk of events) and fold it in memory, one state per live task
   (a projections.replayed.State); remember the snapshot.
2. Load: create each read model's tables in its new schema and COPY its rows
   from the folded states (each read model on a connection of its own, at the
   same time), then build its indexes (two at a time) and ANALYZE.
3. Catch up: apply the events committed since the last snapshot, through each
   read model's own part of a write's statement, with the new schemas first
   on the search_path; repeat while writers keep appending.
4. Go live, in one short transaction: apply the last stragglers, rename the
   new schema into place and record the version live, its checkpoint the
   snapshot those stragglers came from; from there the version's followers
   (projections/follow.py) keep it current. Only when the same version is
   live already (a rebuild from scratch, whose processes write its tables
   inline) does this transaction also hold off appends, so that none lands in
   the tables it drops.

`serve` builds every version of its release that is not live (`prepare`), one
process at a time, under the rebuild lock, while the other release keeps
serving; `tasktrail projections rebuild` rebuilds the code's versions from
scratch.

A read model's module (projections.tasks, projections.stats) gives the
rebuild: NAME, VERSION; TABLES, the tables it owns; CREATE, statements making
them without indexes; INDEXES, index builds that may run at the same time;
AFTER_INDEXES, statements to finish with (constraints, ANALYZE); COPY and
COPY_TYPES, to load them; rows(tasks), their rows from the live tasks' states;
optionally replayed_rows(states) and REPLAYED_COPY, the same rows as COPY
(FORMAT BINARY) data straight from the replayed states, skipping a Task per
state, and the COPY that takes them (see projections.replayed); and PARTS and
document(changes), its parts of a write's statement (see
projections.statement), used to catch up. These are the one definition of a
version's tables: no migration makes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType

import msgspec
import psycopg
from msgspec import UNSET
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from tasktrail import db, eventstore, projections
from tasktrail.domain import events as ev
from tasktrail.domain.events import from_data
from tasktrail.domain.task import TARGET, Status, Task, evolve
from tasktrail.projections import follow, replayed, versions

log = logging.getLogger("tasktrail.rebuild")

NEW = "{}_new"  # the schema a version is built in, beside its live one
# Called as progress(step, done, total) while a rebuild runs.
Progress = Callable[[str, int, int], None]

# A catch-up round that finds fewer events than this goes straight on to the swap.
SMALL_ROUND = 1_000
CATCH_UP_ROUNDS = 10
SWAP_ATTEMPTS = 5
# How long the swap may wait for a lock before it gives up (and tries again
# after another catch-up): it holds off every append while it waits, and a
# long-running reader of a live table must not turn that into an outage.
SWAP_LOCK_TIMEOUT = "2s"
# What ends a try of the swap with nothing changed, to catch up again and try once more.
SWAP_RETRIES = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)


class RebuildBusy(Exception):
    """Another rebuild holds the rebuild lock."""


class SwapFailed(Exception):
    """The swap could not take its locks in time; the live read models are untouched."""


# --- step 1: replay ---------------------------------------------------------

# The log leaves PostgreSQL in chunks of a few thousand events (an index range
# scan of positions each, in order), each chunk one row of a binary COPY with a
# column per field: per-row overhead in the client is what limits a replay, and
# this makes it per chunk. The stream ids, versions, positions and times are
# aggregated in their binary form (uuid_send, int4send, ...), fixed-width, cut
# apart by one struct call per chunk and column; the types are joined by \x1f,
# the data (jsonb text, straight to a typed msgspec decoder) by \x1e, which no
# type name and no jsonb text can hold (jsonb escapes every control
# character). Ids and times stay in that binary form, which is what the binary
# COPY of the new tables takes back (projections.replayed): no time is parsed
# or formatted on either side. Against one text row per chunk, built with
# concat_ws, this costs PostgreSQL about 30% less (no text output of uuids,
# times and numbers, no concatenation per event, no COPY escaping) and Python
# no split per event. The aggregates take their rows in position order from a
# sorted subquery (the index scan's order) rather than sorting each chunk again
# with ORDER BY in each aggregate. (PostgreSQL keeps a sorted subquery's order
# into plain aggregates; REPLAY_OPTIONS rule out parallel plans, the case that
# would not.)
READ_LOG = r"""
COPY (
    SELECT c.*
    FROM generate_series(%(first)s, %(last)s, %(step)s) AS lo,
    LATERAL (
        SELECT string_agg(uuid_send(stream_id), ''), string_agg(int4send(version), ''),
               string_agg(int8send(position), ''), string_agg(timestamptz_send(occurred_at), ''),
               string_agg(type, E'\x1f'), string_agg(data::text, E'\x1e')
        FROM (SELECT * FROM events WHERE position > lo AND position <= lo + %(chunk)s ORDER BY position) AS e
    ) AS c
) TO STDOUT (FORMAT BINARY)
"""
READ_LOG_TYPES = ["bytea"] * 6  # the text columns too: their binary form is their UTF-8, kept as bytes
# A chunk as READ_LOG sends it: stream ids (16 bytes each), versions (int4),
# positions (int8), times (int8), types (\x1f between), data (\x1e between);
# all None for a range of positions without an event (all rolled back).
Chunk = tuple[bytes | None, ...]
# Turning the log into chunks is most of what a replay costs PostgreSQL, about
# as much as the fold costs Python. With cores to spare, READERS connections
# share it, each sending every READERS-th chunk (an empty one as NULLs, which
# keeps them in step), all in the replay's one snapshot (exported by the
# first); the fold takes their chunks in turn. On two cores one reader is
# faster: a second one only takes CPU from the fold, which is what a replay
# waits for (1M events: 0.92 s against 1.06 s, medians of 8 runs each,
# alternated). Each connection is held back by a short queue, so memory stays
# a few chunks per reader, not the log.
READERS = 2 if (os.cpu_count() or 1) > 2 else 1
READ_AHEAD = 4  # chunks a reader may have waiting
EXPORT = "SELECT pg_export_snapshot()"
IMPORT = sql.SQL("SET TRANSACTION SNAPSHOT {}")
CHUNK = 4_000
SNAPSHOT = "SELECT pg_current_snapshot()::text, coalesce(max(position), 0) FROM events"
# The jsonb text must be the UTF-8 that the replay decodes.
REPLAY_OPTIONS = " -c client_encoding=UTF8 -c statement_timeout=0 -c jit=off -c max_parallel_workers_per_gather=0"

# What an event does to a state, by kind; see `replay`.
CREATED, DELETED, STARTED, FINISHED, REQUEUED, RETRIED, CHANGED = range(7)
KINDS: dict[type[ev.Event], int] = {
    ev.TaskCreated: CREATED,
    ev.TaskDeleted: DELETED,
    ev.TaskStarted: STARTED,
    ev.TaskCompleted: FINISHED,
    ev.TaskFailed: FINISHED,
    ev.TaskCanceled: FINISHED,
    ev.TaskRequeued: REQUEUED,
    ev.TaskRetried: RETRIED,
    ev.ProgressReported: CHANGED,
    ev.TaskUpdated: CHANGED,
}
if KINDS.keys() != set(ev.EVENT_TYPES.values()):  # a new event type: teach `replay` (and test_fold.py) what it does
    raise ImportError(f"rebuild.KINDS does not know {set(ev.EVENT_TYPES.values()) ^ KINDS.keys()}")
EMPTY = b"{}"


def _decoder(type_: str) -> Callable[[bytes], ev.Event]:
    """Stored jsonb text to an Event, as `from_data` does, without the dict in between."""
    if type_ in ev.UPCASTERS:
        return lambda data: from_data(type_, msgspec.json.decode(data))
    return msgspec.json.Decoder(ev.EVENT_TYPES[type_]).decode


def _rules() -> dict[bytes, tuple[int, Status | None, Callable[[bytes], ev.Event], bool]]:
    """Per stored type: its kind, the status it moves to, its decoder, and whether `{}` may skip decoding."""
    return {
        type_.encode(): (KINDS[cls], TARGET.get(cls), _decoder(type_), type_ not in ev.UPCASTERS)
        for type_, cls in ev.EVENT_TYPES.items()  # built per replay: UPCASTERS may have changed
    }


@functools.lru_cache(maxsize=32)
def _columns(n: int) -> tuple[struct.Struct, struct.Struct, struct.Struct, struct.Struct]:
    """Structs cutting a chunk of n events into stream ids, versions, positions and times."""
    return (
        struct.Struct("16s" * n), struct.Struct(f">{n}i"), struct.Struct(f">{n}q"), struct.Struct("8s" * n)
    )  # fmt: skip


def replay(
    chunks: Iterable[Chunk], progress: Callable[[int], None] | None = None
) -> tuple[dict[bytes, replayed.State], int]:
    """Fold the log, as READ_LOG's chunks, into one state per live stream (keyed by stream id bytes); and count it."""
    # This is `evolve`, unrolled for speed: the same rules, on a mutable list
    # per stream (a replayed.State: [id, task_id, task_type, status, progress,
    # params, result, error, retry_count, created_at, updated_at, started_at,
    # completed_at, version], task id and times in their binary form) instead
    # of a new frozen Task per event, which costs several times more.
    # test_fold.py and test_replay.py hold it equal to `fold` on every kind of
    # history: change both together.
    rules = _rules()
    states: dict[bytes, replayed.State] = {}
    pending = Status.PENDING
    done = 0
    for streams, numbers, positions, times, types, data in chunks:
        if streams is None:  # a range of positions with no event (all rolled back)
            continue
        n = len(numbers) // 4  # type: ignore[arg-type]
        cut_streams, cut_versions, cut_positions, cut_times = _columns(n)
        for stream, version, position, at, type_, datum in zip(
            cut_streams.unpack(streams),
            cut_versions.unpack(numbers),  # type: ignore[arg-type]
            cut_positions.unpack(positions),  # type: ignore[arg-type]
            cut_times.unpack(times),  # type: ignore[arg-type]
            types.split(b"\x1f"),  # type: ignore[union-attr]
            data.split(b"\x1e"),  # type: ignore[union-attr]
            strict=True,
        ):
            kind, status, decode, plain = rules[type_]
            if kind == CREATED:
                created: ev.TaskCreated = decode(datum)  # type: ignore[assignment]
                states[stream] = [
                    position, stream, created.task_type, pending, 0.0, created.params, None, None, 0,
                    at, at, None, None, version,
                ]  # fmt: skip
                continue
            if kind == DELETED:
                states.pop(stream, None)
                continue
            state = states[stream]  # a KeyError where evolve asserts: an event before TaskCreated
            state[10] = at
            state[13] = version
            if status is not None:
                state[3] = status
            if kind == STARTED:
                if state[11] is None:
                    state[11] = at
            elif kind == FINISHED:
                state[12] = at
            elif kind == REQUEUED:
                state[8] += 1
            elif kind == RETRIED:
                state[8] += 1
                state[7] = state[11] = state[12] = None
            if datum != EMPTY or not plain:
                change: ev.TaskStarted = decode(datum)  # type: ignore[assignment]
                if change.progress is not UNSET:
                    state[4] = change.progress
                if change.result is not UNSET:
                    state[6] = change.result
                if change.error is not UNSET:
                    state[7] = change.error
        done += n
        if progress is not None:
            progress(done)
    return states, done


class _Stop(Exception):
    """The fold has stopped taking chunks."""


def _read_log(conninfo: str, conn: psycopg.Connection, last: int) -> Iterator[Chunk]:
    """READ_LOG's chunks in order, READERS connections sending them at once; `conn` is in the replay's snapshot."""
    exported = conn.execute(EXPORT).fetchone()[0]  # type: ignore[index]
    queues: list[queue.Queue[Chunk | BaseException | None]] = [queue.Queue(READ_AHEAD) for _ in range(READERS)]
    stopping = threading.Event()

    def read(i: int) -> None:
        def put(item: Chunk | BaseException | None) -> None:
            while not stopping.is_set():
                with contextlib.suppress(queue.Full):
                    queues[i].put(item, timeout=0.1)
                    return
            raise _Stop

        params = {"first": i * CHUNK, "last": last, "step": READERS * CHUNK, "chunk": CHUNK}
        try:
            with contextlib.ExitStack() as stack:
                reader = conn
                if i:
                    options = db.SESSION_OPTIONS + REPLAY_OPTIONS
                    reader = stack.enter_context(psycopg.connect(conninfo, options=options))
                    reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                    reader.read_only = True
                    reader.execute(IMPORT.format(exported))
                with reader.cursor() as cur, cur.copy(READ_LOG, params) as copy:
                    copy.set_types(READ_LOG_TYPES)
                    for chunk in copy.rows():
                        put(chunk)
            put(None)
        except _Stop:
            pass
        except BaseException as exc:
            with contextlib.suppress(_Stop):
                put(exc)

    threads = [threading.Thread(target=read, args=(i,), name=f"tasktrail-replay-{i}") for i in range(READERS)]
    for thread in threads:
        thread.start()
    try:
        for turn in itertools.cycle(queues):
            item = turn.get()
            if item is None:
                return  # the last chunk came from the reader before: the others are done too
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopping.set()
        for thread in threads:
            thread.join()


# --- step 2: load -----------------------------------------------------------

DROP_SCHEMA = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
CREATE_SCHEMA = sql.SQL("CREATE SCHEMA {}")
USE = sql.SQL('SET search_path = {}, "$user", public')
INDEX_MEMORY = "SET maintenance_work_mem = '256MB'"
# Index builds of the fresh tables run on this many connections at once: the
# tables are in no one's way yet, and each build is mostly one core's work.
INDEX_BUILDERS = 2
# The first ANALYZE of the fresh tables samples 3,000 rows (statistics target
# 10, the middle stage of `vacuumdb --analyze-in-stages`) rather than 30,000:
# 15 ms against 90 ms for 180,000 tasks, while nothing else can run (ANALYZE
# and CREATE INDEX lock each other out). That is enough to plan this
# service's queries, which filter on a few statuses and task types and page by
# id; autovacuum's next analysis (once a tenth of the rows have changed)
# uses the server's own target.
STATISTICS = "SET LOCAL default_statistics_target = 10"


def _new(module: ModuleType) -> str:
    return NEW.format(projections.schema(module.NAME, module.VERSION))


def _use(schemas: Sequence[str]) -> sql.Composed:
    return USE.format(sql.SQL(", ").join(map(sql.Identifier, schemas)))


def _configure_worker(conn: psycopg.Connection) -> None:
    conn.execute(INDEX_MEMORY)


def _build_indexes(workers: ConnectionPool, statements: list[tuple[str, str]]) -> None:
    """Run the index builds (schema, statement), each on its own, INDEX_BUILDERS at a time."""
    todo = list(reversed(statements))

    def build() -> None:
        with workers.connection() as conn:
            while True:
                try:
                    schema, statement = todo.pop()  # atomic under the GIL
                except IndexError:
                    return
                conn.execute(_use([schema]))
                conn.execute(statement)

    with ThreadPoolExecutor(INDEX_BUILDERS) as pool:
        for done in [pool.submit(build) for _ in range(min(INDEX_BUILDERS, len(statements)))]:
            done.result()


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector off for the block, and back on after it if it was on."""
    # The replay makes millions of objects and no reference cycles: the
    # collector would only walk them again and again, and once more (70 ms for
    # a million events) at its first run after being enabled while they live.
    # So `rebuild` keeps it off until they are gone.
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


@dataclass
class Loaded:
    """Where the replay left off: the live tasks' states, and the snapshot whose events they hold."""

    # By task id bytes: hashing UUIDs is slow in Python. A replayed.State
    # until the catch-up moves its task, a Task from then on (`_task`).
    states: dict[bytes, replayed.State | Task]
    snapshot: str
    events: int


def _task(state: replayed.State | Task | None) -> Task | None:
    return replayed.to_task(state) if type(state) is list else state  # type: ignore[arg-type, return-value]


def _copy(
    conn: psycopg.Connection, module: ModuleType, states: dict[bytes, replayed.State], stop: threading.Event
) -> None:
    """COPY the module's rows of the replayed states into its table (in the current search_path)."""
    fast = getattr(module, "replayed_rows", None)
    with conn.cursor() as cur, cur.copy(module.COPY if fast is None else module.REPLAYED_COPY) as copy:
        if fast is not None:  # COPY (FORMAT BINARY) data straight from the states
            copy.write(replayed.SIGNATURE)
            for block in fast(states.values()):
                if stop.is_set():
                    raise _Stop  # ends the COPY with an error: nothing of it stays
                copy.write(block)
            copy.write(replayed.TRAILER)
            return
        # Each Task is made as its row is written, so memory holds one at a
        # time, and while PostgreSQL is busy with the rows already sent.
        copy.set_types(list(module.COPY_TYPES))
        for row in module.rows(map(replayed.to_task, states.values())):
            if stop.is_set():
                raise _Stop
            copy.write_row(row)


def _load(
    workers: ConnectionPool, module: ModuleType, states: dict[bytes, replayed.State], stop: threading.Event
) -> None:
    """Make the module's tables in its new schema (dropping what a last run left) and COPY its rows in."""
    new = _new(module)
    with workers.connection() as conn, conn.transaction():
        conn.execute(DROP_SCHEMA.format(sql.Identifier(new)))
        conn.execute(CREATE_SCHEMA.format(sql.Identifier(new)))
        conn.execute(_use([new]))
        for statement in module.CREATE:
            conn.execute(statement)
        _copy(conn, module, states, stop)  # in the transaction that made the table, as COPY (FREEZE) needs


def load(conninfo: str, modules: Sequence[ModuleType], progress: Progress | None = None) -> Loaded:
    """Steps 1 and 2: replay the log and write fresh copies of the modules' read models in their new schemas."""
    # The connections that load the tables and build their indexes, opened while the replay runs.
    workers = ConnectionPool(
        conninfo,
        min_size=max(len(modules), INDEX_BUILDERS),
        kwargs={"autocommit": True, "options": db.SESSION_OPTIONS + REPLAY_OPTIONS},
        configure=_configure_worker,
        open=False,
        name="tasktrail-rebuild",
    )
    with (
        psycopg.connect(conninfo, autocommit=True, options=db.SESSION_OPTIONS + REPLAY_OPTIONS) as conn,
        contextlib.closing(workers),
    ):
        workers.open()
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        # One snapshot for the log and the catch-up that follows: every event
        # visible in it is replayed, and only those.
        snapshot, last = conn.execute(SNAPSHOT).fetchone()  # type: ignore[misc]
        # Positions have gaps (rolled back appends) so the last one is only an
        # estimate of the number of events; good enough for time left.
        step = None if progress is None else (lambda done: progress("replay", done, max(done, last)))
        with _without_cyclic_gc():
            # Closed however the replay ends, so the readers stop before their connections close.
            with contextlib.closing(_read_log(conninfo, conn, last)) as chunks:
                states, total = replay(chunks, step)
            if progress is not None:
                progress("replay", total, total)  # the events there were: the bar ends full, not at the estimate
            conn.rollback()
            conn.read_only = False
            conn.isolation_level = None
            # Each read model on a connection of its own, at the same time: the
            # small ones load while the tasks' COPY keeps PostgreSQL busy.
            stop = threading.Event()
            with ThreadPoolExecutor(max(1, len(modules))) as pool:
                try:
                    for done in [pool.submit(_load, workers, module, states, stop) for module in modules]:
                        done.result()
                finally:
                    stop.set()  # after an error or an interrupt, the other loads stop at their next block
            if progress is not None:
                progress("load", len(states), len(states))
        _build_indexes(workers, [(_new(module), statement) for module in modules for statement in module.INDEXES])
        with conn.transaction():
            conn.execute(STATISTICS)
            for module in modules:
                conn.execute(_use([_new(module)]))
                for statement in module.AFTER_INDEXES:
                    conn.execute(statement)
        if progress is not None:
            progress("indexes", len(states), len(states))
    return Loaded(states, snapshot, total)  # type: ignore[arg-type]


# --- steps 3 and 4: catch up, go live ---------------------------------------

# Positions are handed out before commit, so a transaction holding a lower
# position can commit after one holding a higher: "position > last seen" would
# miss it for ever. Instead, each catch-up takes the events that are visible
# in its snapshot but were not in the snapshot the previous step read in, by
# the xid8 of the transaction that wrote them (indexed on events
# (transaction_id, position)). Within a stream this is still version order: a
# writer appends version n + 1 only after reading version n committed.
CHANGES_SINCE = """
SELECT stream_id, version, position, occurred_at, type, data
FROM events
WHERE transaction_id >= pg_snapshot_xmin(%(seen)s::pg_snapshot)
  AND NOT pg_visible_in_snapshot(transaction_id, %(seen)s::pg_snapshot)
  AND pg_visible_in_snapshot(transaction_id, %(now)s::pg_snapshot)
ORDER BY position
"""
CURRENT_SNAPSHOT = "SELECT pg_current_snapshot()::text"
# SHARE ROW EXCLUSIVE waits for every transaction that has appended and not
# yet ended, and blocks new appends until the swap commits (readers go on):
# once it is held, every event that will ever precede the swap is committed,
# and the tables the swap puts in place have applied all of them.
BLOCK_APPENDS = "LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE"
LOCK_TIMEOUT = sql.SQL("SET LOCAL lock_timeout = {}")
RENAME = sql.SQL("ALTER SCHEMA {} RENAME TO {}")
# The schema whose grants a version's new tables take: its own live one (a rebuild), else the newest live
# version of its read model in the registry (a new version). A role of its own that an operator granted a
# version's schema and tables (a replica's reader: docs/scaling.md) keeps them across rebuilds and
# releases, which each make a new schema (audit: it lost them, and its replica could read nothing). Only
# what reading needs is taken (USAGE on the schema, SELECT on a table or view of the same name and kind),
# and only from a version the registry names: not from any schema whose name looks like one.
GRANTS_FROM = """
SELECT n.nspname FROM projection_versions v
JOIN pg_namespace n ON n.nspname = 'rm_' || v.name || '_v' || v.version
WHERE v.name = %(name)s AND v.state = 'live'
ORDER BY v.version = %(version)s DESC, v.version DESC LIMIT 1
"""
GRANTS = """
WITH source AS (SELECT oid, nspacl, nspowner FROM pg_namespace WHERE nspname = %(source)s)
SELECT format('GRANT USAGE ON SCHEMA %%I TO %%s', %(target)s::text,
              CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END)
FROM source s, aclexplode(s.nspacl) a WHERE a.grantee <> s.nspowner AND a.privilege_type = 'USAGE'
UNION ALL
SELECT format('GRANT SELECT ON TABLE %%I.%%I TO %%s', %(target)s::text, c.relname,
              CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END)
FROM source s JOIN pg_class c ON c.relnamespace = s.oid, aclexplode(c.relacl) a
WHERE a.grantee <> c.relowner AND a.privilege_type = 'SELECT' AND EXISTS (
    SELECT FROM pg_class t
    WHERE t.relname = c.relname AND t.relkind = c.relkind AND t.relnamespace = to_regnamespace(%(target)s)
)
"""


async def _copy_grants(conn: psycopg.AsyncConnection, module: ModuleType, target: str) -> None:
    """Give the schema `target` (a version of `module` being built) the reading grants its version's has.

    Best effort, each in a savepoint: a grant this role may not give costs the new version that grant
    (said in the log), never the swap, whose own lock waits it leaves to the swap to try again.
    """
    statements = []
    try:
        async with conn.transaction():
            found = await (await conn.execute(GRANTS_FROM, {"name": module.NAME, "version": module.VERSION})).fetchone()
            if found is not None:
                statements = await (await conn.execute(GRANTS, {"source": found[0], "target": target})).fetchall()
    except SWAP_RETRIES:
        raise
    except psycopg.Error as exc:
        log.warning("%s: the grants of the version before were not looked up: %s", target, exc)
    for (statement,) in statements:
        try:
            async with conn.transaction():
                await conn.execute(statement)
        except SWAP_RETRIES:
            raise
        except psycopg.Error as exc:
            log.warning("%s (as on %s) was not given: %s", statement, found[0], exc)


LIVE_STATES = "SELECT name, version, state FROM projection_versions"
BUILDING = """
INSERT INTO projection_versions (name, version, state) VALUES (%(name)s, %(version)s, 'building')
ON CONFLICT (name, version) DO UPDATE SET state = 'building', checkpoint = NULL, since = now()
"""
GO_LIVE = """
INSERT INTO projection_versions (name, version, state, checkpoint)
VALUES (%(name)s, %(version)s, 'live', %(checkpoint)s::pg_snapshot)
ON CONFLICT (name, version) DO UPDATE SET state = 'live', checkpoint = EXCLUDED.checkpoint, since = now()
"""


async def _catch_up(
    conn: psycopg.AsyncConnection,
    modules: Sequence[ModuleType],
    states: dict[bytes, replayed.State | Task],
    seen: str,
    now: str,
) -> tuple[dict[bytes, Task | None], int]:
    """Apply the events visible in `now` and not in `seen` to the new tables; the states moved, and how many."""
    # The caller keeps the moved states only once its transaction commits: a
    # go-live that fails rolls the new tables back, and the states must go with them.
    cur = await conn.execute(CHANGES_SINCE, {"seen": seen, "now": now})
    moved: dict[bytes, Task | None] = {}
    changes = []
    for row in await cur.fetchall():
        recorded = eventstore.recorded(*row)
        key = recorded.stream_id.bytes
        before = moved[key] if key in moved else _task(states.get(key))
        moved[key] = after = evolve(before, recorded)
        changes.append((recorded, before, after))
    if changes:
        write = eventstore.document([recorded for recorded, _, _ in changes], {})
        write |= projections.document(changes, modules)
        statement = projections.statement(follow.APPENDED, tuple(modules), write)
        await conn.execute(statement, {"write": Jsonb(write)})
    return moved, len(changes)


def _keep(states: dict[bytes, replayed.State | Task], moved: dict[bytes, Task | None]) -> None:
    for stream_id, task in moved.items():
        if task is None:
            states.pop(stream_id, None)
        else:
            states[stream_id] = task


@dataclass
class Rebuilt:
    names: list[str]
    events: int  # replayed in the snapshot
    caught_up: int  # applied after it, while catching up and going live
    position: int  # the log head when it went live


LOCK_KEY = versions.REBUILDS
UNLOCK_ALL = "SELECT pg_advisory_unlock_all()"
TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(%(key)s))"
WAIT_LOCK = "SELECT pg_advisory_lock(hashtext(%(key)s))"
NO_TIMEOUT = " -c statement_timeout=0 -c lock_timeout=0"  # waiting for another rebuild may take a while
HEAD = "SELECT coalesce(max(position), 0) FROM events"


def rebuild(
    conninfo: str,
    modules: Sequence[ModuleType],
    progress: Progress | None = None,
    *,
    wait: bool = False,
    missing_only: bool = False,
) -> Rebuilt:
    """Build the modules' versions from the whole log and put them live while the service runs."""
    # One rebuild at a time: RebuildBusy, or with `wait` wait for the other.
    # `missing_only` (what `serve` asks) is checked once the lock is held, so
    # that processes starting together build once.
    # The lock is a session lock, held by this connection for the whole rebuild.
    with psycopg.connect(conninfo, autocommit=True, options=db.SESSION_OPTIONS + NO_TIMEOUT) as guard:
        try:
            lock = {"key": LOCK_KEY}
            if not guard.execute(TRY_LOCK, lock).fetchone()[0]:  # type: ignore[index]
                if not wait:
                    raise RebuildBusy("another rebuild is running; try again when it has finished")
                log.info("another process is building read models; waiting for it to finish")
                guard.execute(WAIT_LOCK, lock)
            states = {(name, version): state for name, version, state in guard.execute(LIVE_STATES).fetchall()}
            if missing_only:
                modules = [m for m in modules if states.get((m.NAME, m.VERSION)) != "live"]
            if not modules:
                return Rebuilt([], 0, 0, 0)
            # The versions built are in use while this runs: `projections prune` refuses them (it dropped the
            # schema under a rebuild of the `projections` command, which then failed or put nothing live).
            versions.hold(guard, modules)
            for module in modules:
                if states.get((module.NAME, module.VERSION)) != "live":
                    guard.execute(BUILDING, {"name": module.NAME, "version": module.VERSION})
            replacing = [m for m in modules if states.get((m.NAME, m.VERSION)) == "live"]
            with _without_cyclic_gc():  # the states are gone once the swap is done
                return asyncio.run(_go_live(conninfo, modules, replacing, load(conninfo, modules, progress), progress))
        finally:
            # Let go of its locks now: closed, the connection's would go only once its backend has ended,
            # after this returns (a rebuild right after this one was refused as busy: CI).
            with contextlib.suppress(psycopg.Error):
                guard.execute(UNLOCK_ALL)


def prepare(conninfo: str, modules: Sequence[ModuleType], progress: Progress | None = None) -> Rebuilt:
    """Build every one of the modules' versions that is not live (waiting for a rebuild in progress)."""
    return rebuild(conninfo, modules, progress, wait=True, missing_only=True)


REPEATABLE_READ = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"


async def _go_live(
    conninfo: str,
    modules: Sequence[ModuleType],
    replacing: Sequence[ModuleType],
    loaded: Loaded,
    progress: Progress | None,
) -> Rebuilt:
    """Steps 3 and 4: catch up with the log, then put the new schemas in place."""
    async with await psycopg.AsyncConnection.connect(conninfo, **db.connect_kwargs()) as conn:
        # The modules' parts write to the new tables, found first;
        # everything else (events, the registry) resolves to the default schema.
        await conn.execute(_use([_new(module) for module in modules]))
        seen, caught_up = loaded.snapshot, 0
        for _ in range(SWAP_ATTEMPTS):
            for _ in range(CATCH_UP_ROUNDS):
                async with conn.transaction():
                    await conn.execute(REPEATABLE_READ)
                    now = (await (await conn.execute(CURRENT_SNAPSHOT)).fetchone())[0]  # type: ignore[index]
                    moved, found = await _catch_up(conn, modules, loaded.states, seen, now)
                _keep(loaded.states, moved)
                seen, caught_up = now, caught_up + found
                if progress is not None:
                    progress("catch up", caught_up, caught_up)
                if found < SMALL_ROUND:
                    break
            try:
                async with conn.transaction():
                    # No follower round of these versions runs meanwhile: the
                    # checkpoint this records is the one they go on from.
                    for module in modules:
                        await conn.execute(follow.LOCK, versions.key(versions.FOLLOWS, module.NAME, module.VERSION))
                    if replacing:
                        await conn.execute(LOCK_TIMEOUT.format(SWAP_LOCK_TIMEOUT))
                        await conn.execute(BLOCK_APPENDS)
                    now = (await (await conn.execute(CURRENT_SNAPSHOT)).fetchone())[0]  # type: ignore[index]
                    moved, found = await _catch_up(conn, modules, loaded.states, seen, now)
                    head = (await (await conn.execute(HEAD)).fetchone())[0]  # type: ignore[index]
                    for module in modules:
                        live = projections.schema(module.NAME, module.VERSION)
                        await _copy_grants(conn, module, _new(module))
                        await conn.execute(DROP_SCHEMA.format(sql.Identifier(live)))
                        await conn.execute(RENAME.format(sql.Identifier(_new(module)), sql.Identifier(live)))
                        await conn.execute(GO_LIVE, {"name": module.NAME, "version": module.VERSION, "checkpoint": now})
                        await conn.execute(versions.VIEWS, {"name": module.NAME})
                caught_up += found
                break
            except SWAP_RETRIES:
                continue  # nothing changed: catch up again and retry
        else:
            for module in modules:  # built for nothing now, and as big as the live ones
                await conn.execute(DROP_SCHEMA.format(sql.Identifier(_new(module))))
            raise SwapFailed(
                f"could not take the swap's locks in {SWAP_ATTEMPTS} tries (a transaction held the live tables:"
                " see pg_stat_activity); the live read models are untouched, the copies built are dropped"
            )
    if progress is not None:
        progress("swap", 1, 1)
    return Rebuilt([m.NAME for m in modules], loaded.events, caught_up, head)
