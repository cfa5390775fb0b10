"""Fan-out of Server-Sent Events: N concurrent /events/stream clients on one server process.

Reports the delay from a write's commit to its delivery to each client (p50,
p99, max over every client and event) and the server's memory per idle client
(RSS growth from opening the streams, divided by their number).

    uv run python bench/sse_fanout.py                      # 1,000 clients, 20 events: under a minute
    uv run python bench/sse_fanout.py --clients 2000 --events 50

Uses DATABASE_URL's server when set (in a fresh database it drops afterwards),
else an embedded PostgreSQL in a temporary directory (better: other databases'
open transactions on a shared server hold the feed's horizon back). Writes go
through tasktrail's own write path in a separate process; "commit" is the
moment COMMIT returned there, so a delay understates the true one by the
commit's return trip. The clients share this process's event loop, which only
records the arrival time of each chunk (parsing comes later), so the client
side adds little; what it adds is included. Raw output is appended to
bench/results/sse-<date>.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path

import httpx
import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tasktrail import db, migrations, writer
from tasktrail.domain.task import CreateTask, UpdateTask

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
POSITION = re.compile(rb'"position":(\d+)')


class Client(asyncio.Protocol):
    """One SSE connection; keeps (arrival time, bytes) and parses only at the end."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.began = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.chunks.append((time.monotonic(), data))
        if not self.began.done() and b"retry:" in data:
            self.began.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.began.done():
            self.began.set_exception(ConnectionError(f"stream closed before it began: {exc}"))

    def arrivals(self) -> dict[int, float]:
        """Position of each event -> when the chunk that completed its frame arrived."""
        seen: dict[int, float] = {}
        buffer = b""
        for at, data in self.chunks:
            buffer += data
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                match = POSITION.search(frame)
                if match:
                    seen.setdefault(int(match[1]), at)
        return seen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A fresh database URL: on DATABASE_URL's server (dropped afterwards), else an embedded PostgreSQL."""
    server_url = os.environ.get("DATABASE_URL")
    if server_url:
        name = f"tasktrail_bench_sse_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield make_conninfo(server_url, dbname=name)
        finally:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        return
    with tempfile.TemporaryDirectory(prefix="tasktrail-bench-") as data_dir:
        server = db.start_embedded(Path(data_dir), cleanup_mode="delete")
        db.ensure_database(server.get_uri(), "bench")
        try:
            yield server.get_uri("bench")
        finally:
            server.cleanup()


def start_server(url: str, port: int, log_path: Path) -> subprocess.Popen:
    env = os.environ | {"DATABASE_URL": url}
    command = [sys.executable, "-m", "tasktrail", "serve", "--port", str(port), "--log-level", "warning"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        time.sleep(0.1)
    process.kill()
    raise SystemExit("server did not come up")


async def open_streams(port: int, after: str, count: int) -> list[tuple[asyncio.Transport, Client]]:
    loop = asyncio.get_running_loop()
    request = (
        f"GET /events/stream?after={after} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    streams = []
    for start in range(0, count, 100):  # in batches, so the listen backlog never overflows
        batch = [await loop.create_connection(Client, "127.0.0.1", port) for _ in range(min(100, count - start))]
        for transport, _ in batch:
            transport.write(request)
        await asyncio.gather(*(client.began for _, client in batch))
        streams += batch
    return streams


POSITIONS = "SELECT version, position FROM events WHERE stream_id = %(stream_id)s AND version > 1"


def write_events(url: str, task_id: uuid.UUID, count: int, interval: float) -> list[tuple[int, float, float]]:
    """Report progress `count` times through the write path; (version, time before, time COMMIT returned) each."""

    async def write() -> list[tuple[int, float, float]]:
        times = []
        async with await psycopg.AsyncConnection.connect(url, **db.connect_kwargs()) as conn:
            for i in range(count):
                before = time.monotonic()
                changed = await writer.change(conn, task_id, UpdateTask(progress=float(i % 99 + 1)), {})
                times.append((changed.version, before, time.monotonic()))  # type: ignore[union-attr]
                await asyncio.sleep(interval)
        return times

    return asyncio.run(write())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run(args: argparse.Namespace, url: str, log: list[str]) -> None:
    def say(line: str) -> None:
        print(line, flush=True)
        log.append(line)

    port = free_port()
    migrations.migrate(url)
    log_path = Path(tempfile.gettempdir()) / f"tasktrail-bench-sse-{port}.log"
    process = start_server(url, port, log_path)
    server = psutil.Process(process.pid)
    try:
        async with await psycopg.AsyncConnection.connect(url, **db.connect_kwargs()) as conn:
            task = await writer.create(conn, CreateTask(task_type="bench"), {})
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                for _ in range(20):  # warm the server: imports, pool, a stream
                    await http.get("/events")
                after = (await http.get("/events")).json()["next_cursor"]
            warm = await open_streams(port, after, 1)
            await asyncio.sleep(0.5)
            rss_before = server.memory_info().rss
            started = time.monotonic()
            streams = await open_streams(port, after, args.clients)
            opened = time.monotonic() - started
            await asyncio.sleep(1.0)
            gc.collect()
            rss_after = server.memory_info().rss
            say(f"clients: {args.clients} streams opened in {opened:.1f}s on one server process (pid {process.pid})")
            say(
                f"server RSS: {rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} MiB with the streams idle; "
                f"{(rss_after - rss_before) / args.clients / 1024:.1f} KiB per idle client"
            )

            # Written from another process, so that this one's busy event loop
            # does not delay noticing that a commit returned.
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                times = await asyncio.to_thread(
                    pool.apply, write_events, (url, task.task_id, args.events, args.interval)
                )
            committed = {version: done for version, _, done in times}
            write_times = [done - before for _, before, done in times]
            await asyncio.sleep(max(1.0, args.interval * 5))

        # The events' positions, by version (each update appends one event).
        async with await psycopg.AsyncConnection.connect(url, **db.connect_kwargs()) as conn:
            cur = await conn.execute(POSITIONS, {"stream_id": task.task_id})
            position_of = dict(await cur.fetchall())
        commit_at = {position_of[version]: at for version, at in committed.items()}
        delays, missing = [], 0
        per_event: dict[int, list[float]] = {position: [] for position in commit_at}
        for _, client in streams:
            arrivals = client.arrivals()
            for position, at in commit_at.items():
                if position in arrivals:
                    delays.append(arrivals[position] - at)
                    per_event[position].append((arrivals[position] - at) * 1000)
                else:
                    missing += 1
        ms = [d * 1000 for d in delays]
        say(
            f"events: {args.events}, {args.interval * 1000:.0f} ms apart; deliveries: {len(delays)} "
            f"(missing {missing}); write (append + commit) p50 {statistics.median(write_times) * 1000:.1f} ms"
        )
        say(
            f"commit -> delivery: p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms, "
            f"max {max(ms):.1f} ms, min {min(ms):.1f} ms"
        )
        say(
            "per event, median over events: first client "
            f"{statistics.median(min(d) for d in per_event.values()):.1f} ms, last client "
            f"{statistics.median(max(d) for d in per_event.values()):.1f} ms (the spread is the fan-out itself)"
        )
        for transport, _ in streams + warm:
            transport.close()
        await asyncio.sleep(0.5)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between writes (default %(default)s)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.clients + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients + 1000), hard))

    log = [
        f"# bench/sse_fanout.py {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"# args: clients={args.clients} events={args.events} interval={args.interval}",
        f"# host: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}",
        f"# server: uvicorn, http {'httptools' if find_spec('httptools') else 'h11'}, "
        f"loop {'uvloop' if find_spec('uvloop') else 'asyncio'}",
    ]
    with database() as url:
        where = conninfo_to_dict(url)
        log.append(
            f"# database: {'DATABASE_URL' if os.environ.get('DATABASE_URL') else 'embedded'} {where.get('host')}"
        )
        print("\n".join(log), flush=True)
        asyncio.run(run(args, url, log))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sse-{datetime.now(UTC):%Y-%m-%d}.txt"
    with out.open("a") as file:
        file.write("\n".join(log) + "\n\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
