"""Idempotency keys: one key, one created task, for 24 hours."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from uuid import UUID

import msgspec
import psycopg

TTL = timedelta(hours=24)


class KeyReused(Exception):
    """The key was used within its TTL for a request with another body."""


def fingerprint(command: msgspec.Struct) -> bytes:
    """The same for the same body, whatever its key order or spacing."""
    return hashlib.sha256(msgspec.json.encode(command, order="sorted")).digest()


# A fresh key is inserted; an expired one is taken over; a live one is left
# alone and nothing is returned. A concurrent claim of the same key waits on
# the primary key until the first commits, then finds it live.
CLAIM = """
INSERT INTO idempotency_keys AS k (key, fingerprint, task_id, created_at)
VALUES (%(key)s, %(fingerprint)s, %(task_id)s, %(now)s)
ON CONFLICT (key) DO UPDATE
    SET fingerprint = EXCLUDED.fingerprint, task_id = EXCLUDED.task_id, created_at = EXCLUDED.created_at
    WHERE k.created_at < %(expired_before)s
RETURNING task_id
"""


async def claim(conn: psycopg.AsyncConnection, key: str, print_: bytes, task_id: UUID, now: datetime) -> bool:
    """Take the key for task_id; False when a live claim on it exists already."""
    params = {"key": key, "fingerprint": print_, "task_id": task_id, "now": now, "expired_before": now - TTL}
    cur = await conn.execute(CLAIM, params)
    return await cur.fetchone() is not None


FIND = "SELECT fingerprint, task_id FROM idempotency_keys WHERE key = %(key)s"


async def find(conn: psycopg.AsyncConnection, key: str, print_: bytes) -> UUID | None:
    """The task a live claim on key created; KeyReused if it was for another body."""
    cur = await conn.execute(FIND, {"key": key})
    row = await cur.fetchone()
    if row is None:
        return None
    if bytes(row[0]) != print_:
        raise KeyReused(f"Idempotency-Key {key!r} was used for a request with another body")
    return row[1]


FORGET = "DELETE FROM idempotency_keys WHERE created_at < %(expired_before)s"


async def forget_expired(conn: psycopg.AsyncConnection, now: datetime) -> None:
    await conn.execute(FORGET, {"expired_before": now - TTL})
