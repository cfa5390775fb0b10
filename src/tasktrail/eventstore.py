"""The event log: append with an expected version, read a stream."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from tasktrail.domain.events import Event, Recorded, from_data, to_data, type_of


class VersionConflict(Exception):
    """Another writer appended this version of the stream first."""


class Stored(msgspec.Struct, frozen=True):
    """A recorded event with its metadata, as the history shows it."""

    recorded: Recorded
    metadata: dict[str, Any]


APPEND = """
INSERT INTO events (stream_id, version, type, data, metadata, occurred_at)
VALUES (%(stream_id)s, %(version)s, %(type)s, %(data)s, %(metadata)s, %(occurred_at)s)
RETURNING position
"""


async def append(
    conn: psycopg.AsyncConnection,
    pending: Sequence[tuple[UUID, int, Event]],
    metadata: dict[str, Any],
    occurred_at: datetime,
) -> list[Recorded]:
    """Append each (stream, version, event); VersionConflict if a version exists already."""
    shared = {"metadata": Jsonb(metadata), "occurred_at": occurred_at}
    params = [
        {"stream_id": stream_id, "version": version, "type": type_of(event), "data": Jsonb(to_data(event))} | shared
        for stream_id, version, event in pending
    ]
    cur = conn.cursor()
    try:
        if len(params) == 1:
            await cur.execute(APPEND, params[0])
        else:
            await cur.executemany(APPEND, params, returning=True)
        positions = []
        while True:
            positions.append((await cur.fetchone())[0])  # type: ignore[index]
            if not cur.nextset():
                break
    except psycopg.errors.UniqueViolation as exc:
        raise VersionConflict(str(exc.diag.message_detail)) from exc
    return [
        Recorded(stream_id, version, position, occurred_at, event)
        for (stream_id, version, event), position in zip(pending, positions, strict=True)
    ]


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
