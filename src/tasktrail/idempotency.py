"""Idempotency keys: one key, one create request (a task, or a batch of them), for 24 hours."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg.types.json import Jsonb

TTL = timedelta(hours=24)


class KeyReused(Exception):
    """The key was used within its TTL for a request with another body."""


def fingerprint(command: msgspec.Struct) -> bytes:
    """The same for the same body, whatever its key order or spacing."""
    return hashlib.sha256(msgspec.json.encode(command, order="sorted")).digest()


# A single create's body encodes as a JSON object, so no batch's fingerprint
# input (this prefix, then the list) can be one: a key used for a single create
# and then for a batch, or the reverse, is always a different body.
_BATCH = b"batch:"


def batch_fingerprint(commands: Sequence[msgspec.Struct]) -> bytes:
    """A batch's fingerprint: the same for the same tasks in the same order, never a single create's."""
    return hashlib.sha256(_BATCH + msgspec.json.encode(commands, order="sorted")).digest()


# A fresh key is inserted; an expired one is taken over; a live one is left
# alone and nothing is returned. A concurrent claim of the same key waits on
# the primary key until the first commits, then finds it live. A single
# create's claim names its task in task_id, a batch's its tasks in task_ids
# (migration 0010); the other column is NULL.
CLAIM = """
INSERT INTO idempotency_keys AS k (key, fingerprint, task_id, task_ids, created_at)
VALUES (%(key)s, %(fingerprint)s, %(task_id)s,
        (SELECT array_agg(id::uuid ORDER BY n) FROM jsonb_array_elements_text(%(task_ids)s::jsonb)
             WITH ORDINALITY AS ids (id, n)),
        %(now)s)
ON CONFLICT (key) DO UPDATE
    SET fingerprint = EXCLUDED.fingerprint, task_id = EXCLUDED.task_id, task_ids = EXCLUDED.task_ids,
        created_at = EXCLUDED.created_at
    WHERE k.created_at < %(expired_before)s
RETURNING key
"""


async def claim(conn: psycopg.AsyncConnection, key: str, print_: bytes, task_id: UUID, now: datetime) -> bool:
    """Take the key for task_id; False when a live claim on it exists already."""
    return await _claim(conn, key, print_, now, task_id=task_id)


async def claim_batch(
    conn: psycopg.AsyncConnection, key: str, print_: bytes, task_ids: Sequence[UUID], now: datetime
) -> bool:
    """Take the key for a batch's tasks, in its order; False when a live claim on it exists already."""
    return await _claim(conn, key, print_, now, task_ids=list(task_ids))


async def _claim(
    conn: psycopg.AsyncConnection,
    key: str,
    print_: bytes,
    now: datetime,
    task_id: UUID | None = None,
    task_ids: list[UUID] | None = None,
) -> bool:
    # The ids as a JSON array: psycopg dumps a list of UUIDs one by one in Python (1.4 us each), msgspec in C.
    ids = None if task_ids is None else Jsonb(task_ids)
    params = {"key": key, "fingerprint": print_, "task_id": task_id, "task_ids": ids, "now": now}
    cur = await conn.execute(CLAIM, params | {"expired_before": now - TTL})
    return await cur.fetchone() is not None


FIND = "SELECT fingerprint, task_id, task_ids FROM idempotency_keys WHERE key = %(key)s"


async def find(conn: psycopg.AsyncConnection, key: str, print_: bytes) -> UUID | None:
    """The task a live claim on key created; KeyReused if it was for another body."""
    row = await _find(conn, key, print_)
    return None if row is None else row[1]


async def find_batch(conn: psycopg.AsyncConnection, key: str, print_: bytes) -> list[UUID] | None:
    """The tasks, in order, that a live claim on key created in a batch; KeyReused if it was for another body."""
    row = await _find(conn, key, print_)
    return None if row is None else row[2]


async def _find(conn: psycopg.AsyncConnection, key: str, print_: bytes) -> tuple[Any, ...] | None:
    cur = await conn.execute(FIND, {"key": key})
    row = await cur.fetchone()
    if row is not None and bytes(row[0]) != print_:
        raise KeyReused(f"Idempotency-Key {key!r} was used for a request with another body")
    return row


FORGET = "DELETE FROM idempotency_keys WHERE created_at < %(expired_before)s"


async def forget_expired(conn: psycopg.AsyncConnection, now: datetime) -> None:
    await conn.execute(FORGET, {"expired_before": now - TTL})
