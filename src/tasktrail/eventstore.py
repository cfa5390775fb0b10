"""The event log: append with an expected version, read a stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from tasktrail.domain.events import Recorded, from_data, to_data, type_of


class VersionConflict(Exception):
    """Another writer appended this version of the stream first."""


class Stored(msgspec.Struct, frozen=True):
    """A recorded event with its metadata, as the history shows it."""

    recorded: Recorded
    metadata: dict[str, Any]


# The append, for a write's one statement (see projections.statement), where
# the log numbers the events as it inserts them; also a statement of its own.
# Its one parameter is the write document (jsonb, built by `document`), and it
# yields each new event's stream, version and position. An event whose (stream,
# version) is taken is not inserted and not yielded: the writer lost a race.
# (ON CONFLICT rather than an error: a lost race is routine, not a failure in
# the server's log, and a racing insert of the same version waits for the
# first one's transaction, then yields nothing.) `projected` names the read-model
# versions the same statement writes (see projections: a follower applies the
# event to every other version); none when appended alone.
APPEND = """
INSERT INTO events (stream_id, version, type, data, metadata, occurred_at, projected)
SELECT e.stream_id, e.version, e.type, e.data, coalesce(e.metadata, %(write)s -> 'metadata'), e.occurred_at,
       %(write)s ->> 'projected'
FROM jsonb_to_recordset(%(write)s -> 'events')
    AS e(stream_id uuid, version integer, type text, data jsonb, occurred_at timestamptz, metadata jsonb)
ON CONFLICT (stream_id, version) DO NOTHING
RETURNING stream_id, version, position
"""


def document(recorded: Sequence[Recorded], metadata: dict[str, Any] | Sequence[dict[str, Any]]) -> dict[str, Any]:
    """APPEND's keys of the write document: the events (position 0 if not yet appended) and their metadata.

    The metadata is one for all the events, or one for each (a group of single requests, grouped.py).
    """
    events = [
        {
            "stream_id": r.stream_id,
            "version": r.version,
            "position": r.position,
            "type": type_of(r.event),
            "data": to_data(r.event),
            "occurred_at": r.occurred_at,
        }
        for r in recorded
    ]
    if isinstance(metadata, dict):
        return {"events": events, "metadata": metadata}
    for event, each in zip(events, metadata, strict=True):
        event["metadata"] = each
    return {"events": events, "metadata": None}


async def append(conn: psycopg.AsyncConnection, recorded: Sequence[Recorded], metadata: dict[str, Any]) -> list[int]:
    """Append events alone (no read model sees them); their positions, in order."""
    cur = await conn.execute(APPEND, {"write": Jsonb(document(recorded, metadata))})
    positions = [position for _, _, position in await cur.fetchall()]
    if len(positions) < len(recorded):
        raise VersionConflict("another writer appended one of these versions first")
    return positions


def _stored(stream_id: UUID, rows: list[tuple[Any, ...]]) -> list[Stored]:
    return [_one(stream_id, *row) for row in rows]


def _one(
    stream_id: UUID, version: int, position: int, at: datetime, type_: str, data: Any, metadata: dict[str, Any]
) -> Stored:
    return Stored(recorded(stream_id, version, position, at, type_, data), metadata)


def recorded(stream_id: UUID, version: int, position: int, at: datetime, type_: str, data: Any) -> Recorded:
    """A stored row as the event it holds (upcast to the current shape)."""
    return Recorded(stream_id, version, position, at, from_data(type_, data))


READ_STREAM = """
SELECT version, position, occurred_at, type, data, metadata
FROM events
WHERE stream_id = %(stream_id)s AND version > %(after_version)s
ORDER BY version
LIMIT %(limit)s
"""


async def read_stream(
    conn: psycopg.AsyncConnection, stream_id: UUID, *, after_version: int = 0, limit: int = 1_000_000
) -> list[Stored]:
    cur = await conn.execute(READ_STREAM, {"stream_id": stream_id, "after_version": after_version, "limit": limit})
    return _stored(stream_id, await cur.fetchall())


# Time travel: the stream as it stood at a version or a moment. At a moment, the versions before the
# first one that occurred after it: a stream's times go forward (writer._decide), but a log written
# before they had to, by hosts whose clocks disagreed, may have a version earlier than the one before it,
# and the stream as it stood is a beginning of it all the same, never v2 without v1.
READ_STREAM_UNTIL = """
SELECT version, position, occurred_at, type, data
FROM events
WHERE stream_id = %(stream_id)s AND version <= %(version)s
ORDER BY version
"""
READ_STREAM_AS_OF = """
SELECT version, position, occurred_at, type, data
FROM events
WHERE stream_id = %(stream_id)s AND version < coalesce(
    (SELECT min(version) FROM events WHERE stream_id = %(stream_id)s AND occurred_at > %(as_of)s), 2147483647
)
ORDER BY version
"""


async def read_stream_until(
    conn: psycopg.AsyncConnection,
    stream_id: UUID,
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    chunk: int = 1_000,
) -> AsyncIterator[list[Recorded]]:
    """The stream's events up to a version or a moment, `chunk` at a time.

    Rows are decoded as they are taken from the result, and a long stream
    (100,000 progress reports) took the event loop for half a second at once;
    between chunks other requests run.
    """
    if as_of is None:
        cur = await conn.execute(READ_STREAM_UNTIL, {"stream_id": stream_id, "version": version or 2**31 - 1})
    else:
        cur = await conn.execute(READ_STREAM_AS_OF, {"stream_id": stream_id, "as_of": as_of})
    while rows := await cur.fetchmany(chunk):
        yield [recorded(stream_id, *row) for row in rows]
        await asyncio.sleep(0)


# The global feed: every event in commit-safe order.
#
# Positions come from a sequence when a row is inserted, not when its
# transaction commits, so position order is not commit order: a writer can take
# position 7, stay open, and commit after another writer's position 8 is already
# visible. A reader that remembered "8" would never see 7. So the feed orders by
# (transaction_id, position) and shows only events whose transaction id is below
# the xmin of the reading statement's snapshot: no transaction older than that
# is still running, so every event that will ever exist below that line is
# visible now, and the feed is a prefix in cursor order that only grows at the
# end. A reader that follows the cursor misses nothing and sees nothing twice.
# The price: a write transaction in this database that stays open holds back
# events committed after it began, until it ends; sessions time out idle
# transactions after 60 s. Transaction ids (and xmin) are server-wide, but a
# transaction of another database can never append here, so OLDEST_OPEN leaves
# out the open transactions that pg_stat_activity (or pg_prepared_xacts) shows
# belong to another database: an import or a long migration in a neighbour
# database does not freeze this feed. An open transaction it cannot place (its
# backend gone since the snapshot, its row hidden) still counts: the line may
# only ever be lower than it could be, never higher. Rows are matched on the
# 32-bit xid, which names one transaction among those open at once. On a
# standby the snapshot keeps the transactions it has seen begin apart from its
# list (pg_snapshot_xip shows none there) and no activity row names them: its
# xmin is the horizon, as below.
#
# Alternatives weighed: a table lock on every append serialises all writers; a
# gap-detecting reader that waits for missing positions must guess how long a
# rolled-back position may stay missing; xid8 is exact and costs writers nothing
# (the column defaults to pg_current_xact_id()).
#
# On a streaming replica (replicas.py) the horizon is the standby's own:
# pg_current_snapshot() there is built from the WAL it has replayed, and its
# xmin is the oldest transaction that, as far as replay has got, may still be
# running. A transaction leaves that set only when its commit or abort record
# is replayed, or when a replayed running-xacts record (logged after it ended,
# so after its commit record) says it is gone; a transaction the standby has
# not heard of yet is counted as running from the first record of any later
# one. So below the standby's horizon every transaction has finished and its
# events are exactly those the primary has there, and no more can come: a
# standby's feed is a prefix of the same (transaction_id, position) order, only
# a shorter one. A cursor from any server is a place in that one order, and a
# client (or the listener) may read its next page from another server: one that
# is behind shows nothing after the cursor and gives the cursor back, never an
# event twice, never a gap.
#
# One statement, so the events, the horizon and the held-back check share one
# snapshot. Returns one row with NULL event columns when there is nothing new.
# The held-back check is ordered by transaction_id so that it walks the index
# from the horizon (a few in-flight rows), never the table.
OLDEST_OPEN = """(
    SELECT CASE WHEN pg_is_in_recovery() THEN pg_snapshot_xmin(taken.snap) ELSE coalesce(
        (SELECT min(xip.xid) FROM pg_snapshot_xip(taken.snap) AS xip (xid)
         WHERE NOT EXISTS (SELECT FROM pg_stat_get_activity(NULL) AS s
                           WHERE s.backend_xid = xid(xip.xid)
                             AND s.datid <> (SELECT oid FROM pg_database WHERE datname = current_database()))
           AND NOT EXISTS (SELECT FROM pg_prepared_xacts AS p
                           WHERE p.transaction = xid(xip.xid) AND p.database <> current_database())),
        pg_snapshot_xmax(taken.snap)) END
    FROM (SELECT pg_current_snapshot() AS snap) taken
)"""
READ_FEED = f"""
WITH horizon AS MATERIALIZED (
    SELECT oldest_open,
           (SELECT transaction_id FROM events WHERE transaction_id >= oldest_open
            ORDER BY transaction_id LIMIT 1) IS NOT NULL AS held_back
    FROM (SELECT {OLDEST_OPEN} AS oldest_open) now
)
SELECT horizon.oldest_open::text, horizon.held_back,
       e.transaction_id::text, e.position, e.stream_id, e.version, e.occurred_at, e.type, e.data, e.metadata
FROM horizon
LEFT JOIN LATERAL (
    SELECT * FROM events
    WHERE (transaction_id, position) > (%(transaction_id)s::xid8, %(position)s)
      AND transaction_id < horizon.oldest_open
    ORDER BY transaction_id, position
    LIMIT %(limit)s
) e ON true
ORDER BY e.transaction_id, e.position
"""  # noqa: S608 -- constants
# The same for one stream (a task's events), along its (stream_id, version) index. A task's versions are in
# commit order (the log refuses a version whose transaction is older than its predecessor's: migrations
# 0005, 0011; one transaction's rows have rising positions), so the events after a cursor are the versions
# after the last one at or before it, found from the cursor's own event (a catch-up page's, through the
# commit-order index) or, for another place (the head), from the newest version down. A page then reads its
# own rows (versions have no gaps: the next `limit` of them), and the held-back check the newest row: both
# read every event of the task after the cursor before (audit: each page of a resumed 50,000-event stream
# took 18 ms, a replay 15 s).
READ_STREAM_FEED = f"""
WITH horizon AS MATERIALIZED (
    SELECT oldest_open,
           (SELECT transaction_id FROM events WHERE stream_id = %(stream_id)s
            ORDER BY version DESC LIMIT 1) >= oldest_open IS TRUE AS held_back
    FROM (SELECT {OLDEST_OPEN} AS oldest_open) now
), since AS MATERIALIZED (
    SELECT coalesce(
        (SELECT version FROM events WHERE transaction_id = %(transaction_id)s::xid8 AND position = %(position)s
           AND stream_id = %(stream_id)s),
        (SELECT max(version) FROM events WHERE stream_id = %(stream_id)s
           AND (transaction_id, position) <= (%(transaction_id)s::xid8, %(position)s)),
        0) AS version
)
SELECT horizon.oldest_open::text, horizon.held_back,
       e.transaction_id::text, e.position, e.stream_id, e.version, e.occurred_at, e.type, e.data, e.metadata
FROM horizon
LEFT JOIN LATERAL (
    SELECT * FROM events
    -- Scalar subqueries, so the range is the index scan's own condition (a join with `since` was planned
    -- as a scan of the stream filtered after it, once the table had statistics: review).
    WHERE stream_id = %(stream_id)s AND version > (SELECT version FROM since)
      AND version <= (SELECT version FROM since) + %(limit)s  -- versions have no gaps: one page's range
      AND transaction_id < horizon.oldest_open
    ORDER BY version
    LIMIT %(limit)s
) e ON true
ORDER BY e.transaction_id, e.position
"""  # noqa: S608 -- constants

# A place in the feed: (transaction id, position). (0, 0) is before everything.
Cursor = tuple[int, int]
START: Cursor = (0, 0)


class FeedEvent(msgspec.Struct, frozen=True):
    """An event in the feed, with its cursor."""

    cursor: Cursor
    stored: Stored


class FeedPage(msgspec.Struct, frozen=True):
    """Events after a cursor, where to read from next, and whether more wait behind an open transaction."""

    events: list[FeedEvent]
    next_after: Cursor
    held_back: bool
    ahead: bool = False  # the cursor was past the horizon: see http/events.py's `given_out`


async def read_feed(
    conn: psycopg.AsyncConnection, after: Cursor = START, *, limit: int = 100, stream_id: UUID | None = None
) -> FeedPage:
    """The committed events after a cursor in commit-safe order (of one stream if given)."""
    params = {"transaction_id": str(after[0]), "position": after[1], "limit": limit, "stream_id": stream_id}
    cur = await conn.execute(READ_FEED if stream_id is None else READ_STREAM_FEED, params)
    rows = await cur.fetchall()
    events = [
        FeedEvent((int(txid), position), _one(stream, version, position, at, type_, data, metadata))
        for _, _, txid, position, stream, version, at, type_, data, metadata in rows
        if txid is not None
    ]
    horizon, held_back = int(rows[0][0]), rows[0][1]
    next_after = events[-1].cursor if events else after
    if len(events) < limit:
        # Everything below the horizon has been read, and whatever commits
        # later has a transaction id at or above it: skip straight there.
        next_after = max(next_after, (horizon, 0))
    # Every event shown is below the horizon, which only moves on: a cursor past (horizon, 0) was never given
    # out (or comes from a server further on, such as the primary when this is a replica).
    return FeedPage(events, next_after, held_back, ahead=after > (horizon, 0))


HEAD = f"SELECT {OLDEST_OPEN}::text"


async def head(conn: psycopg.AsyncConnection) -> Cursor:
    """The cursor after every event read_feed can show now: only events committed later follow it."""
    cur = await conn.execute(HEAD)
    return (int((await cur.fetchone())[0]), 0)  # type: ignore[index]


# The price of the commit-safe feed, as an operator sees it (SPEC §11): how
# long the oldest transaction still open that began before events the feed
# cannot show yet (committed, at or above the horizon) has been open; no row
# when the feed shows every committed event. Such a transaction has an id below
# the newest held-back event's (age() compares the 32-bit ids pg_stat_activity
# shows, across wraparound); a prepared transaction (two-phase commit) counts
# from when it was prepared. pg_stat_activity hides other roles' xact_start
# from a role without pg_read_all_stats: then the oldest held-back event's time
# stands in, a lower bound. The held-back events are found from both ends of
# the index on (transaction_id, position): a few entries, however many wait.
HELD_BACK_SECONDS = f"""
WITH held AS MATERIALIZED (
    SELECT (SELECT transaction_id FROM events WHERE transaction_id >= oldest_open
            ORDER BY transaction_id DESC LIMIT 1) AS newest,
           (SELECT occurred_at FROM events WHERE transaction_id >= oldest_open
            ORDER BY transaction_id LIMIT 1) AS oldest_at
    FROM (SELECT {OLDEST_OPEN} AS oldest_open) now
)
SELECT greatest(0, extract(epoch FROM now() - coalesce(
    (SELECT min(started) FROM (
        SELECT xact_start FROM pg_stat_activity
        WHERE datname = current_database() AND age(backend_xid) > age(held.newest::xid)
        UNION ALL
        SELECT prepared FROM pg_prepared_xacts
        WHERE database = current_database() AND age(transaction) > age(held.newest::xid)
    ) AS holders (started)),
    held.oldest_at
)))::float8
FROM held
WHERE held.newest IS NOT NULL
"""  # noqa: S608 -- OLDEST_OPEN is a constant


async def held_back_seconds(conn: psycopg.AsyncConnection) -> float:
    """How long the feed has been held back (0: it shows every committed event); see HELD_BACK_SECONDS."""
    cur = await conn.execute(HELD_BACK_SECONDS)
    row = await cur.fetchone()
    return 0.0 if row is None else row[0]


# The newest committed events, for a page that shows the feed newest first and
# then follows it: the last `limit` events below the horizon, newest first, and
# the horizon as the cursor to follow from (everything below it is committed;
# everything that commits later lies above it). Walks the commit-order index backwards.
READ_FEED_TAIL = f"""
WITH horizon AS MATERIALIZED (SELECT {OLDEST_OPEN} AS oldest_open)
SELECT horizon.oldest_open::text,
       e.transaction_id::text, e.position, e.stream_id, e.version, e.occurred_at, e.type, e.data, e.metadata
FROM horizon
LEFT JOIN LATERAL (
    SELECT * FROM events
    WHERE transaction_id < horizon.oldest_open
    ORDER BY transaction_id DESC, position DESC
    LIMIT %(limit)s
) e ON true
ORDER BY e.transaction_id DESC, e.position DESC
"""  # noqa: S608 -- OLDEST_OPEN is a constant


async def read_feed_tail(conn: psycopg.AsyncConnection, *, limit: int = 100) -> FeedPage:
    """The newest committed events, newest first, and the cursor that follows on after them."""
    cur = await conn.execute(READ_FEED_TAIL, {"limit": limit})
    rows = await cur.fetchall()
    events = [
        FeedEvent((int(txid), position), _one(stream, version, position, at, type_, data, metadata))
        for _, txid, position, stream, version, at, type_, data, metadata in rows
        if txid is not None
    ]
    return FeedPage(events, (int(rows[0][0]), 0), held_back=False)
