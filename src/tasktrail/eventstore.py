"""The event log: append with an expected version, read a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
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


# Positions are reserved before the append's transaction, so the whole
# transaction (append, projections, commit) goes to the server in one round
# trip, and the projections already know the creating event's position (a
# task's `id`). Positions are handed out before commit either way; a reserved
# position that is never used is a gap, as a rolled-back insert would leave.
RESERVE = "SELECT nextval('events_position_seq') FROM generate_series(1, %(n)s)"


async def reserve(conn: psycopg.AsyncConnection, n: int) -> list[int]:
    """n fresh log positions, in increasing order."""
    cur = await conn.execute(RESERVE, {"n": n})
    return [position for (position,) in await cur.fetchall()]


APPEND = """
INSERT INTO events (position, stream_id, version, type, data, metadata, occurred_at)
OVERRIDING SYSTEM VALUE
VALUES (%(position)s, %(stream_id)s, %(version)s, %(type)s, %(data)s, %(metadata)s, %(occurred_at)s)
"""


async def append(conn: psycopg.AsyncConnection, recorded: Sequence[Recorded], metadata: dict[str, Any]) -> None:
    """Queue the events' insert; a taken (stream, version) fails the transaction (see `transaction`)."""
    shared = Jsonb(metadata)
    params = [
        {
            "position": r.position,
            "stream_id": r.stream_id,
            "version": r.version,
            "type": type_of(r.event),
            "data": Jsonb(to_data(r.event)),
            "metadata": shared,
            "occurred_at": r.occurred_at,
        }
        for r in recorded
    ]
    cur = conn.cursor()
    if len(params) == 1:
        await cur.execute(APPEND, params[0])
    else:
        await cur.executemany(APPEND, params)


@asynccontextmanager
async def transaction(conn: psycopg.AsyncConnection) -> AsyncIterator[None]:
    """One pipelined transaction; VersionConflict when another writer took a version first."""
    try:
        async with conn.pipeline(), conn.transaction():
            yield
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name != "events_stream_id_version_key":
            raise
        raise VersionConflict(str(exc.diag.message_detail)) from exc


def _stored(stream_id: UUID, rows: list[tuple[Any, ...]]) -> list[Stored]:
    return [
        Stored(Recorded(stream_id, version, position, at, from_data(type_, data)), metadata)
        for version, position, at, type_, data, metadata in rows
    ]


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


# Time travel: the stream as it stood at a version or a moment.
READ_STREAM_UNTIL = """
SELECT version, position, occurred_at, type, data, metadata
FROM events
WHERE stream_id = %(stream_id)s AND version <= %(version)s AND occurred_at <= %(as_of)s
ORDER BY version
"""

FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


async def read_stream_until(
    conn: psycopg.AsyncConnection, stream_id: UUID, *, version: int | None = None, as_of: datetime | None = None
) -> list[Stored]:
    params = {"stream_id": stream_id, "version": version or 2**31 - 1, "as_of": as_of or FAR_FUTURE}
    cur = await conn.execute(READ_STREAM_UNTIL, params)
    return _stored(stream_id, await cur.fetchall())
