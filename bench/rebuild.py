"""Rebuild speed: load N events with COPY into a fresh database, then time `projections rebuild`.

    uv run python bench/rebuild.py                 # 100k and 1M events
    uv run python bench/rebuild.py --sizes 100k,1m,5m

Each size gets its own database on the server at DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/test), created and dropped here; the
database named in the URL is only used to create them. Each rebuild runs in a
fresh child process so its peak RSS is the rebuild's alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tasktrail import migrations
from tasktrail.domain.events import (
    Event,
    ProgressReported,
    TaskCanceled,
    TaskCompleted,
    TaskCreated,
    TaskDeleted,
    TaskFailed,
    TaskRetried,
    TaskStarted,
    to_data,
    type_of,
)

EVENTS_PER_TASK = 5
# Tasks are written in waves of this many, their events interleaved the way
# concurrent workers interleave them in a real log.
WAVE = 1_000
TYPES = ("document_process", "data_import", "report_build", "thumbnail", "email_send")
SIZES = {"100k": 100_000, "1m": 1_000_000, "5m": 5_000_000}

COPY_EVENTS = "COPY events (stream_id, version, type, data, metadata, occurred_at) FROM STDIN"
_encode = msgspec.json.encode


def history(i: int) -> list[Event]:
    """Five events for task number i: created, started, progress, and an ending."""
    created = TaskCreated(task_type=TYPES[i % len(TYPES)], params={"file_path": f"/data/in/{i}.pdf", "priority": i % 5})
    ending: list[Event]
    match i % 20:
        case 0:
            ending = [TaskFailed(error="worker lost"), TaskRetried()]
        case 1:
            ending = [TaskCanceled(), TaskDeleted()]
        case 2:
            ending = [ProgressReported(progress=75.0), TaskDeleted(reason="retention")]
        case _:
            ending = [ProgressReported(progress=80.0), TaskCompleted(progress=100.0, result={"pages": i % 97})]
    return [created, TaskStarted(), ProgressReported(progress=25.0), *ending]


def load(conninfo: str, events: int) -> None:
    """Append `events` events (events / 5 tasks) with one COPY."""
    tasks = events // EVENTS_PER_TASK
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur, cur.copy(COPY_EVENTS) as copy:
        for first in range(0, tasks, WAVE):
            wave = range(first, min(first + WAVE, tasks))
            ids = {i: uuid.uuid4() for i in wave}
            histories = {i: history(i) for i in wave}
            for version in range(1, EVENTS_PER_TASK + 1):
                for i in wave:
                    event = histories[i][version - 1]
                    at = start + timedelta(seconds=i, milliseconds=version * 250)
                    data = _encode(to_data(event)).decode()
                    copy.write_row((ids[i], version, type_of(event), data, '{"actor": "bench"}', at))


def create_database(server_url: str) -> tuple[str, str]:
    name = f"tasktrail_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, make_conninfo(server_url, dbname=name)


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
