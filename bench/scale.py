"""Load N tasks fast, straight into tasktrail's tables with COPY (not through HTTP).

The rows are what tasktrail itself would have written: each task's events in
`events` (TaskCreated, then TaskStarted / TaskCompleted / TaskFailed /
TaskCanceled as its final status needs), its row in `tasks` folded from them
(id = position of TaskCreated, version = number of events, times from the
events), and the counters in `task_counts` spread over the 16 shards, so
`tasktrail verify` finds nothing to report.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import psycopg

from tasktrail import projections

TASK_TYPES = ("document_process", "email_send", "image_resize", "report_build")
SHARDS = 16  # projections/stats.py SHARDS
# Final status of a task and how often; 40% stay pending so status=pending lists are long.
STATUSES = (("pending", 40), ("running", 20), ("completed", 30), ("failed", 7), ("canceled", 3))
CHUNK = 20_000
METADATA = json.dumps({"request_id": "bench-load"})


def _ts(at: datetime) -> str:
    return at.isoformat()


def _rows(n: int, seed: int):
    """Yield (event lines, task line, (task_type, status)) per task, oldest first."""
    rng = random.Random(seed)  # noqa: S311 -- load data, not secrets
    statuses = [s for s, _ in STATUSES]
    weights = [w for _, w in STATUSES]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    step = timedelta(seconds=30 * 86400 / max(n, 1))  # a month of tasks
    position = 0
    for i in range(n):
        task_id = str(UUID(int=rng.getrandbits(128), version=4))
        task_type = TASK_TYPES[i % len(TASK_TYPES)]
        status = rng.choices(statuses, weights)[0]
        params = {"file_path": f"/data/{i}.pdf", "pages": i % 50}
        created = start + step * i
        events = [("TaskCreated", {"task_type": task_type, "params": params}, created)]
        progress, result, error, started, completed = 0.0, None, None, None, None
        if status in ("running", "completed", "failed"):
            started = created + timedelta(seconds=2)
            progress = round(rng.uniform(0, 99), 1)
            events.append(("TaskStarted", {"progress": progress}, started))
        if status == "completed":
            completed = started + timedelta(seconds=60)
            progress, result = 100.0, {"pages": i % 50}
            events.append(("TaskCompleted", {"progress": progress, "result": result}, completed))
        elif status == "failed":
            completed, error = started + timedelta(seconds=30), "worker crashed"
            events.append(("TaskFailed", {"error": error}, completed))
        elif status == "canceled":
            completed = created + timedelta(seconds=5)
            events.append(("TaskCanceled", {}, completed))
        lines = []
        for version, (type_, data, at) in enumerate(events, 1):
            position += 1
            if version == 1:
                task_position = position
            lines.append(f"{position}\t{task_id}\t{version}\t{type_}\t{json.dumps(data)}\t{METADATA}\t{_ts(at)}\n")
        null = "\\N"
        task = "\t".join(
            [
                str(task_position),
                task_id,
                task_type,
                status,
                repr(progress),
                json.dumps(params),
                null if result is None else json.dumps(result),
                null if error is None else error,
                "0",
                _ts(created),
                _ts(events[-1][2]),
                null if started is None else _ts(started),
                null if completed is None else _ts(completed),
                str(len(events)),
            ]
        )
        yield lines, task + "\n", (task_type, status)


# The read models' tables are found through this code's search_path (rm_tasks_v2, ...): see projections.
SEARCH_PATH = f"-c search_path={projections.search_path(projections.INLINE)}"
COPY_EVENTS = "COPY events (position, stream_id, version, type, data, metadata, occurred_at) FROM STDIN"
COPY_TASKS = (
    "COPY tasks (id, task_id, task_type, status, progress, params, result, error, retry_count,"
    " created_at, updated_at, started_at, completed_at, version) FROM STDIN"
)
COPY_COUNTS = "COPY task_counts (task_type, status, shard, n) FROM STDIN"
SET_POSITION = "SELECT setval(pg_get_serial_sequence('events', 'position'), (SELECT max(position) FROM events))"


def load(url: str, n: int, spool: Path, seed: int = 11) -> int:
    """COPY n tasks into an empty tasktrail database (schema applied), in one transaction; returns the event count.

    One connection runs one COPY at a time, so the task rows wait in `spool` while the events stream in.
    """
    counts: Counter[tuple[str, str]] = Counter()
    n_events = 0
    with psycopg.connect(url, options=SEARCH_PATH) as conn, conn.cursor() as cur:
        with spool.open("w") as tasks_out, cur.copy(COPY_EVENTS) as copy:
            buf: list[str] = []
            for lines, task, key in _rows(n, seed):
                buf += lines
                tasks_out.write(task)
                counts[key] += 1
                if len(buf) >= CHUNK:
                    copy.write("".join(buf))
                    n_events += len(buf)
                    buf = []
            copy.write("".join(buf))
            n_events += len(buf)
        with spool.open("rb") as tasks_in, cur.copy(COPY_TASKS) as copy:
            while block := tasks_in.read(1 << 20):
                copy.write(block)
        with cur.copy(COPY_COUNTS) as copy:
            for (task_type, status), total in sorted(counts.items()):
                for shard in range(SHARDS):
                    share = total // SHARDS + (1 if shard < total % SHARDS else 0)
                    copy.write_row((task_type, status, shard, share))
        cur.execute(SET_POSITION)
        conn.commit()
    spool.unlink()
    with psycopg.connect(url, autocommit=True, options=SEARCH_PATH) as conn:
        conn.execute("VACUUM (ANALYZE) events, tasks, task_counts")
    return n_events
