"""History paging: the first page of a 10,000-event task against a 10-event one.

    uv run python bench/history.py [--requests 500]

Creates its own database on DATABASE_URL's server (default: the local
PostgreSQL on 127.0.0.1:5432), writes the two tasks through the real write
path, serves them with a real `tasktrail serve` process and times
GET /tasks/{id}/history?limit=100 for each, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tasktrail import db, migrations, writer
from tasktrail.domain.task import CreateTask, UpdateTask

SERVER = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
RESULTS = Path(__file__).parent / "results"


async def make_task(conninfo: str, events: int) -> str:
    async with await psycopg.AsyncConnection.connect(conninfo, **db.connect_kwargs()) as conn:
        task = await writer.create(conn, CreateTask(task_type="history-bench"), {})
        for i in range(events - 1):
            await writer.change(conn, task.task_id, UpdateTask(progress=float(i % 100) + 0.5), {})
    return str(task.task_id)


def timed(client: httpx.Client, url: str) -> float:
    start = time.perf_counter()
    response = client.get(url)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text
    return elapsed * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per task (default %(default)s)")
    args = parser.parse_args()

    name = f"tasktrail_bench_history_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conninfo = make_conninfo(SERVER, dbname=name)
    server = None
    try:
        migrations.migrate(conninfo)
        small, big = asyncio.run(make_task(conninfo, 10)), asyncio.run(make_task(conninfo, 10_000))
        port = 8765
        env = os.environ | {"DATABASE_URL": conninfo}
        command = [sys.executable, "-m", "tasktrail", "serve", "--port", str(port)]
        server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(100):
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            # Same page size for both (10 events), so only the stream's length differs.
            urls = {
                "10-event task, first page": f"/tasks/{small}/history?limit=10",
                "10,000-event task, first page": f"/tasks/{big}/history?limit=10",
                "10,000-event task, page at 9,990": f"/tasks/{big}/history?after_version=9990&limit=10",
            }
            times: dict[str, list[float]] = {label: [] for label in urls}
            for _ in range(50):
                for url in urls.values():
                    timed(client, url)
            for _ in range(args.requests):  # alternate, so drift hits all alike
                for label, url in urls.items():
                    times[label].append(timed(client, url))
        lines = [f"history page of 10 events, {args.requests} requests each, {datetime.now(UTC):%Y-%m-%d}"]
        for label, samples in times.items():
            samples.sort()
            p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99) - 1]
            lines.append(f"  {label:<34} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
        medians = {label: statistics.median(samples) for label, samples in times.items()}
        ratio = medians["10,000-event task, first page"] / medians["10-event task, first page"]
        lines.append(f"  first page, 10,000-event / 10-event task (medians): {ratio:.2f}")
        report = "\n".join(lines)
        print(report)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"history-{datetime.now(UTC):%Y-%m-%d}.txt").write_text(report + "\n")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
