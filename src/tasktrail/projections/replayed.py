"""A replayed task: the rebuild's state of one live task, and COPY data written from it.

The rebuild's fold (projections.rebuild.replay) keeps one mutable list per live
task, in the `tasks` table's column order (the indexes below). Values the read
models only pass on stay as the log's COPY sent them, so that nothing converts
them twice: the task id as its 16 bytes (uuid_send), every time as its 8
bytes (timestamptz_send: microseconds since 2000-01-01 UTC, big-endian, two's
complement). The id (a position) and the version are ints, the status a
Status; task type, progress, params, result, error and retry count are
Python values, decoded from the events.

A read model may write its rows from these states straight into a COPY
(FORMAT BINARY) (a module's `replayed_rows`, taken by its REPLAYED_COPY, whose
column order it chooses): ids and times are in that format already, and a
Task per state (`to_task`, about 2.5 us each) and psycopg's dumping of each
field (3 us a row) are the larger part of loading a rebuilt table. Such a
function is the fast form of the module's `rows` and is held equal to it by
tests/test_projections/test_replay.py.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec

from tasktrail.domain.task import Task

State = list[Any]
(
    ID, TASK_ID, TASK_TYPE, STATUS, PROGRESS, PARAMS, RESULT, ERROR, RETRY_COUNT,
    CREATED_AT, UPDATED_AT, STARTED_AT, COMPLETED_AT, VERSION,
) = range(14)  # fmt: skip

# COPY (FORMAT BINARY): a signature, flags and header extension (both zero),
# then per row the number of fields (int16) and each field as its length
# (int32; -1 for NULL) and bytes, and -1 (int16) to end.
SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
TRAILER = b"\xff\xff"
NULL = b"\xff\xff\xff\xff"
INT2 = struct.Struct(">ih")  # length and value
INT8 = struct.Struct(">iq")
TIME = b"\x00\x00\x00\x08"  # the length of a timestamptz, before its eight bytes
LENGTH = struct.Struct(">i")  # a field's length, before its bytes
JSONB = struct.Struct(">ib")  # a jsonb field's length and format version (1), before its JSON text
encode = msgspec.json.encode


def text(value: str | None) -> bytes:
    """A text field."""
    if value is None:
        return NULL
    data = value.encode()
    return len(data).to_bytes(4, "big") + data


_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_datetime(value: bytes) -> datetime:
    return _EPOCH + int.from_bytes(value, "big", signed=True) * _MICROSECOND


def to_task(state: State) -> Task:
    """A replayed state as the Task `fold` gives."""
    (id_, task_id, task_type, status, progress, params, result, error, retry_count,
     created_at, updated_at, started_at, completed_at, version) = state  # fmt: skip
    created = to_datetime(created_at)
    return Task(
        id_, UUID(bytes=task_id), task_type, status, progress, params, result, error, retry_count,
        created,
        created if updated_at is created_at else to_datetime(updated_at),
        None if started_at is None else to_datetime(started_at),
        None if completed_at is None else to_datetime(completed_at),
        version,
    )  # fmt: skip
