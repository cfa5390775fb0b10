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
    name = f"rebuild_bench_{uuid.uuid4().hex[:8]}"  # a prefix of its own: other benches drop theirs
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, make_conninfo(server_url, dbname=name)


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def rebuild_once(conninfo: str) -> None:
    """In a child process: rebuild everything, print seconds per step, total and peak RSS as JSON."""
    import resource

    from tasktrail.projections import INLINE
    from tasktrail.projections.rebuild import rebuild

    backends = _count_backend_cpu()
    imported = resource.getrusage(resource.RUSAGE_SELF)  # the imports' CPU is not the rebuild's
    started = time.perf_counter()
    steps: dict[str, float] = {}

    def progress(step: str, done: int, total: int) -> None:
        steps[step] = time.perf_counter() - started

    done = rebuild(conninfo, INLINE, progress)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "seconds": seconds,
        "events": done.events,
        "rss": usage.ru_maxrss * 1024,  # KiB on Linux
        # this process only, from the rebuild's start
        "cpu": usage.ru_utime + usage.ru_stime - imported.ru_utime - imported.ru_stime,
        "pg_cpu": sum(backends.values()) if backends else None,  # the PostgreSQL backends it used
        "load": os.getloadavg()[0],
        "steps": steps,
    }
    print(msgspec.json.encode(result).decode())


def _count_backend_cpu() -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend the rebuild uses, read from /proc as each connection closes.

    On a machine shared with other work, wall time says little; CPU time of
    both sides says what the rebuild costs. Needs PostgreSQL on this host (and
    permission to read its processes' /proc): else it stays empty.
    """
    import psycopg

    seen: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")

    def cpu_of(conn: psycopg.Connection | psycopg.AsyncConnection) -> None:
        try:
            with open(f"/proc/{conn.info.backend_pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            seen[conn.info.backend_pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, psycopg.Error, IndexError, ValueError):
            pass

    close, aclose = psycopg.Connection.close, psycopg.AsyncConnection.close

    def closing(self: psycopg.Connection) -> None:
        if not self.closed:
            cpu_of(self)
        close(self)

    async def aclosing(self: psycopg.AsyncConnection) -> None:
        if not self.closed:
            cpu_of(self)
        await aclose(self)

    psycopg.Connection.close = closing  # type: ignore[method-assign]
    psycopg.AsyncConnection.close = aclosing  # type: ignore[method-assign]
    return seen


def measure(server_url: str, events: int, repeat: int) -> list[dict]:
    name, conninfo = create_database(server_url)
    try:
        migrations.migrate(conninfo)
        started = time.perf_counter()
        load(conninfo, events)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")  # as a database that has been running would be
            # The load's writes on disk before the first rebuild, so that none of them is timed.
            conn.execute("CHECKPOINT")
        loaded = time.perf_counter() - started
        print(f"  loaded {events:,} events in {loaded:.1f} s", flush=True)
        runs = []
        for _ in range(repeat):
            child = subprocess.run([sys.executable, __file__, "--child", conninfo], capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"the rebuild failed:\n{child.stderr}")
            run = msgspec.json.decode(child.stdout.strip().splitlines()[-1])
            steps = ", ".join(f"{step} {at:.2f}" for step, at in run["steps"].items())
            pg_cpu = "n/a" if run["pg_cpu"] is None else f"{run['pg_cpu']:.2f} s"
            print(
                f"  rebuilt in {run['seconds']:.2f} s: {run['events'] / run['seconds']:,.0f} events/s,"
                f" peak RSS {run['rss'] / 2**20:,.0f} MiB, CPU: Python {run['cpu']:.2f} s, PostgreSQL {pg_cpu},"
                f" load average {run['load']:.1f} (steps done at s: {steps})",
                flush=True,
            )
            runs.append(run)
        return runs
    finally:
        drop_database(server_url, name)


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"


def main() -> None:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    top.add_argument(
        "--sizes", default="100k,1m", help=f"comma-separated, of {', '.join(SIZES)} (default: %(default)s)"
    )
    top.add_argument(
        "--repeat", type=int, default=3, help="rebuilds per size; the best is reported (default: %(default)s)"
    )
    top.add_argument("--child", help=argparse.SUPPRESS)
    args = top.parse_args()
    if args.child:
        rebuild_once(args.child)
        return
    server_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    with psycopg.connect(server_url) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    print(f"tasktrail rebuild benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}, PostgreSQL {server}; load average {os.getloadavg()[0]:.1f} at start")
    summary = []
    for size in args.sizes.split(","):
        events = SIZES[size.strip().lower()]
        print(f"{events:,} events ({events // EVENTS_PER_TASK:,} tasks x {EVENTS_PER_TASK}):", flush=True)
        runs = measure(server_url, events, args.repeat)
        best = min(runs, key=lambda run: run["seconds"])
        summary.append((events, best, max(run["rss"] for run in runs)))
    print("\nevents      best rebuild   events/s   peak RSS")
    for events, best, rss in summary:
        print(f"{events:>9,}  {best['seconds']:>9.2f} s  {events / best['seconds']:>9,.0f}  {rss / 2**20:>6,.0f} MiB")


if __name__ == "__main__":
    main()
