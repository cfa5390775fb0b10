"""Where tasktrail spends a request: SQL round trips, CPU per request, and a py-spy profile.

    uv run python bench/profile.py                  # create, update, get and mix, 15 s each
    uv run python bench/profile.py --scenarios create --duration 5

1. Round trips: with `log_statement = all` on its own database, a fresh server
   answers a few requests of each kind one at a time; the statements the
   server log shows for that database are counted per request.
2. The Python CPU of one bare round trip through psycopg and the pool.
3. CPU per request: under wrk at 16 connections, the CPU time of the server
   process and of its PostgreSQL backends, divided by the requests served.
4. Profile: py-spy (run with uvx, not a project dependency) samples the server
   under the same load; the collapsed stacks go to bench/.work/profile-<scenario>.txt
   (speedscope.app or flamegraph.pl read them), and the top functions are
   printed by own time and by time including callees.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # bench/ is not a package: its folder is on sys.path above
from run import create_script, wrk

PG_LOG = Path("/var/log/postgresql/postgresql-15-main.log")
DB = apps.DB_PREFIX + "profile"
STATEMENT = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] \S+@(\S+) LOG:  (?:statement|execute [^:]*): (.*)$")


def _requests(server: apps.Server, n: int) -> dict[str, list[tuple[str, str, object]]]:
    running = server.running
    return {
        "create": [("POST", "/tasks/", apps.CREATE_BODY)] * n,
        "update": [("PATCH", f"/tasks/{running[i]}", {"status": "running", "progress": 10.0 + i}) for i in range(n)],
        "get": [("GET", f"/tasks/{server.ids[i]}", None) for i in range(n)],
        "list": [("GET", "/tasks/?status=pending&limit=100", None)] * n,
        "stats": [("GET", "/tasks/stats/summary", None)] * n,
    }


def round_trips(url: str, n: int) -> None:
    """Count the statements each kind of request sends, from the server log."""
    if not PG_LOG.is_file():
        print(f"(no {PG_LOG}: skipping the round-trip count)")
        return
    with psycopg.connect(apps.ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(sql.Identifier(DB)))
    try:
        with apps.running(lambda: apps.start_tasktrail(url, 1)) as (server,):
            apps.load(server, 50, 0.5)
            print(f"\n== SQL statements per request (log_statement = all, {n} requests of each kind, one at a time) ==")
            for kind, calls in _requests(server, n).items():
                offset = PG_LOG.stat().st_size
                for method, path, body in calls:
                    status, _, _ = apps.request(server.port, method, path, body)
                    assert 200 <= status < 300, (kind, status)
                time.sleep(0.3)  # let the server log catch up
                with PG_LOG.open("rb") as f:
                    f.seek(offset)
                    lines = f.read().decode(errors="replace").splitlines()
                statements = [m[3].strip() for line in lines if (m := STATEMENT.match(line)) and m[2] == DB]
                shapes = Counter(" ".join(s.split()[:4]) for s in statements)
                listed = ", ".join(
                    f"{count // n if count % n == 0 else count / n} x {shape}" for shape, count in shapes.items()
                )
                print(f"{kind:7} {len(statements) / n:4.1f} statements/request: {listed}")
    finally:
        with psycopg.connect(apps.ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} RESET log_statement").format(sql.Identifier(DB)))


def _cpu(processes: list[psutil.Process]) -> tuple[float, float]:
    """(user, system) CPU seconds of the processes that are still there."""
    user = system = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        user, system = user + times.user, system + times.system
    return user, system


def _per_request(before: tuple[float, float], after: tuple[float, float], n: int) -> str:
    user, system = (after[0] - before[0]) / n * 1e6, (after[1] - before[1]) / n * 1e6
    return f"{user + system:.0f} us ({user:.0f} user + {system:.0f} system)"


def _backends(url: str) -> list[psutil.Process]:
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (DB,))]
        own = conn.info.backend_pid
    return [psutil.Process(pid) for pid in pids if pid != own]


class WaitSampler(threading.Thread):
    """Samples what the database's backends are doing (pg_stat_activity) every 20 ms while a load runs."""

    def __init__(self, url: str, seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.seconds = url, seconds
        self.seen: Counter[str] = Counter()
        self.shards: set[int] = set()
        self.samples = 0

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline:
                rows = conn.execute(
                    "SELECT pid, state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                ).fetchall()
                self.samples += 1
                for pid, state, kind, event in rows:
                    self.shards.add(pid % 16)
                    self.seen[
                        "idle (waiting for the app)" if state == "idle" else f"{state}: {kind or 'CPU'}:{event or ''}"
                    ] += 1
                time.sleep(0.02)

    def report(self) -> None:
        total = sum(self.seen.values()) or 1
        print(f"   backends ({self.samples} samples of pg_stat_activity; {len(self.shards)} distinct counter shards "
              f"among the connections, pid % 16):")  # fmt: skip
        for what, n in self.seen.most_common(8):
            print(f"   {n / total:6.1%}  {what}")


def ceiling(seconds: int) -> None:
    """The same measure for pgbench running the SQL of one create: the PostgreSQL side's floor."""
    url = apps.create_database(apps.DB_PREFIX + "profile_ceiling")
    try:
        apps.migrate(url)
        command = ["pgbench", "-n", "-M", "prepared", "-c", "16", "-j", "2", "-T", str(seconds)]
        command += ["-f", str(create_script()), url]
        bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        with psycopg.connect(url, autocommit=True) as conn:
            pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench'")]
        backends = [psutil.Process(pid) for pid in pids]
        before, t0 = _cpu(backends), time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            n0 = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        time.sleep(max(1, seconds - 3))
        with psycopg.connect(url, autocommit=True) as conn:
            n1 = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        after, t1 = _cpu(backends), time.monotonic()
        bench.communicate(timeout=seconds + 60)
        print(f"   pgbench create.sql meanwhile: {(n1 - n0) / (t1 - t0):.0f} tx/s, CPU per transaction: "
              f"PostgreSQL backends {_per_request(before, after, n1 - n0)}")  # fmt: skip
    finally:
        apps.drop_database(apps.DB_PREFIX + "profile_ceiling")


class BackendCpu(threading.Thread):
    """CPU of the pool's backends over the middle of a run (they connect after it starts)."""

    def __init__(self, url: str, seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.seconds = url, seconds
        self.before = self.after = (0.0, 0.0)
        self.window = 0.0

    def run(self) -> None:
        time.sleep(1)
        backends = _backends(self.url)
        self.before, t0 = _cpu(backends), time.monotonic()
        time.sleep(max(1.0, self.seconds - 2))
        self.after, self.window = _cpu(backends), time.monotonic() - t0

    def n_writes(self, n: int, elapsed: float) -> float:
        """Writes in the measured window, at the run's average rate."""
        return n / elapsed * self.window


async def _direct(url: str, kind: str, seconds: int, running: list[str]) -> tuple[int, float]:
    """Call tasktrail's writer from 16 tasks on its own pool, with no HTTP: (writes, seconds)."""
    import random
    from uuid import UUID, uuid4

    from tasktrail import db, writer
    from tasktrail.domain.task import CreateTask, UpdateTask

    pool = db.create_pool(url)
    await pool.open(wait=True)
    done = 0
    ids = [UUID(task_id) for task_id in running]
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)  # noqa: S311 -- load data, not secrets
        while time.monotonic() < deadline:
            async with pool.connection() as conn:
                if kind == "create":
                    await writer.create(conn, CreateTask("bench", {"n": done}), {"request_id": uuid4().hex})
                else:
                    command = UpdateTask(status="running", progress=round(rng.uniform(0, 99), 1))
                    await writer.change(conn, rng.choice(ids), command, {"request_id": uuid4().hex})
            done += 1

    import asyncio

    t0 = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(16)))
    elapsed = time.monotonic() - t0
    await pool.close()
    return done, elapsed


def direct(url: str, kind: str, seconds: int, running: list[str]) -> None:
    """The write path without HTTP: how much of a request's CPU is the web stack's."""
    import asyncio

    sampler = BackendCpu(url, seconds)
    sampler.start()
    times0 = psutil.Process().cpu_times()
    n, elapsed = asyncio.run(_direct(url, kind, seconds, running))
    times1 = psutil.Process().cpu_times()
    sampler.join()
    backend_cpu = _per_request(sampler.before, sampler.after, sampler.n_writes(n, elapsed))
    print(f"   without HTTP (tasktrail.writer from 16 asyncio tasks in one process, same pool settings): "
          f"{n / elapsed:.0f} {kind}s/s, CPU per write: Python "
          f"{_per_request((times0.user, times0.system), (times1.user, times1.system), n)}, "
          f"PostgreSQL backends {backend_cpu}")  # fmt: skip


async def _trips(url: str, seconds: float, transaction: bool) -> tuple[int, float]:
    import asyncio

    from tasktrail import db

    pool = db.create_pool(url)
    await pool.open(wait=True)
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with pool.connection() as conn:
                if transaction:
                    async with conn.transaction():
                        await conn.execute("SELECT %(n)s::int", {"n": done})
                else:
                    await conn.execute("SELECT %(n)s::int", {"n": done})
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(16)))
    elapsed = time.monotonic() - t0
    await pool.close()
    return done, elapsed


def trip_cost(url: str, seconds: int) -> None:
    """Python CPU of one round trip through tasktrail's pool and psycopg, with nothing else around it."""
    import asyncio

    print(f"\n== one round trip (psycopg async, tasktrail's pool settings, 16 tasks, {seconds} s) ==")
    for transaction, what in ((False, "SELECT, autocommit (1 round trip)"), (True, "BEGIN; SELECT; COMMIT (3)")):
        before = psutil.Process().cpu_times()
        n, elapsed = asyncio.run(_trips(url, seconds, transaction))
        after = psutil.Process().cpu_times()
        print(f"   {what}: {n / elapsed:.0f}/s, Python CPU per request "
              f"{_per_request((before.user, before.system), (after.user, after.system), n)}")  # fmt: skip


def summarise_stacks(path: Path, top: int) -> None:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        leaf_file = frames[-1].rsplit("(", 1)[-1]
        package = next(
            (
                p
                for p in ("tasktrail", "litestar", "psycopg_pool", "psycopg", "uvicorn", "h11", "msgspec")
                if p in leaf_file
            ),
            "asyncio" if "asyncio" in leaf_file else "other",
        )
        packages[package] += n
    print(f"   {total} samples; own time by package of the innermost frame:")
    print("   " + ", ".join(f"{p} {n / total:.0%}" for p, n in packages.most_common()))
    print(f"   top {top} by own time:")
    for frame, n in own.most_common(top):
        print(f"   {n / total:6.1%}  {frame}")
    print(f"   top {top} by time including callees:")
    for frame, n in inclusive.most_common(top):
        print(f"   {n / total:6.1%}  {frame}")


def profile(url: str, scenarios: list[str], seconds: int, top: int) -> None:
    with apps.running(lambda: apps.start_tasktrail(url, 1)) as (server,):
        apps.load(server, 2000, 0.5)
        files = (apps.ids_file(server, "ids"), apps.ids_file(server, "running"))
        wrk(server.url, "get", 2, 16, files)  # warm up
        root = psutil.Process(server.process.pid)
        pythons = [root, *root.children(recursive=True)]
        for scenario in scenarios:
            print(f"\n== {scenario}: {seconds} s at 16 connections ==")
            backends = _backends(url)
            before = (_cpu(pythons), _cpu(backends), time.monotonic())
            sampler = WaitSampler(url, seconds - 1)
            sampler.start()
            r = wrk(server.url, scenario, seconds, 16, files)
            sampler.join()
            # Backends that started during the run count whole; those there before count from `before`.
            known = {p.pid for p in backends}
            backends += [p for p in _backends(url) if p.pid not in known]
            after = (_cpu(pythons), _cpu(backends), time.monotonic())
            n = r["requests"]
            busy = sum(after[0]) - sum(before[0])
            print(f"   {r['rps']:.0f} req/s, p50 {r['p50_us'] / 1000:.2f} ms, p99 {r['p99_us'] / 1000:.2f} ms, "
                  f"{r['errors']} errors")  # fmt: skip
            print(f"   CPU per request: server process {_per_request(before[0], after[0], n)}, "
                  f"PostgreSQL backends {_per_request(before[1], after[1], n)}; "
                  f"server process busy {busy / (after[2] - before[2]):.0%} of one core")  # fmt: skip
            sampler.report()
            if scenario == "create":
                ceiling(seconds)
            if scenario in ("create", "update"):
                direct(url, scenario, seconds, server.running)
            raw = apps.WORK / f"profile-{scenario}.txt"
            spy = ["uvx", "py-spy", "record", "--pid", str(server.process.pid), "--subprocesses", "--rate", "250"]
            spy += ["--duration", str(seconds), "--nonblocking"]
            recorder = subprocess.Popen(
                [*spy, "--format", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            time.sleep(1)
            r = wrk(server.url, scenario, seconds, 16, files)
            _, err = recorder.communicate(timeout=seconds + 60)
            if recorder.returncode != 0 or not raw.is_file():
                print(f"   py-spy failed: {err.decode()[-500:]}")
                continue
            print(f"   profiled at {r['rps']:.0f} req/s (py-spy running); stacks in {raw.relative_to(apps.ROOT)}")
            summarise_stacks(raw, top)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="create,update,get,mix")
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--per-kind", type=int, default=10, help="requests of each kind for the round-trip count")
    args = p.parse_args()
    apps.WORK.mkdir(parents=True, exist_ok=True)
    url = apps.create_database(DB)
    try:
        round_trips(url, args.per_kind)
        trip_cost(url, max(3, args.duration // 2))
        profile(url, args.scenarios.split(","), args.duration, args.top)
    finally:
        apps.drop_database(DB)
    return 0


if __name__ == "__main__":
    sys.exit(main())
