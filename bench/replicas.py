"""Reads with one streaming replica beside none, on this machine (SPEC §13).

    uv run python bench/replicas.py            # 3 rounds x 8 s per scenario
    uv run python bench/replicas.py --quick    # 1 round x 3 s, to check the harness

A private primary and its streaming standby (tests/replication.py: initdb,
pg_basebackup -R, pgserver's binaries, fsync off) hold one database; two
`tasktrail serve` processes share it: "none" reads from the primary, "replica"
is started with DATABASE_REPLICA_URLS naming the standby. Tasks are loaded
through the API, then wrk drives each scenario (bench/wrk/tasks.lua) against the
two in turn, the order flipping every scenario and round. For each run it
reports requests per second and the CPU per request of the server process, of
the primary's processes and of the standby's (postmaster and all its children,
WAL sender and receiver and replay included).

On one machine the standby shares the primary's two cores, memory and disk, and
replaying the primary's WAL costs CPU of its own, so this shows what routing
reads to a replica costs and where the CPU goes, not the capacity a replica on
its own machine adds (that is the primary's CPU per read it takes away).
The raw output goes to bench/results/<date>-replicas.txt (quick runs:
bench/.work/results/).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.replication

import apps  # bench/ is not a package: its folder is on sys.path above
from run import log, wrk

from tasktrail import migrations
from tests.replication import Pair

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = ("get", "list", "stats", "update", "mix")
NOTE = (
    "one machine: the standby shares the primary's 2 cores, so these ratios are the cost of routing reads to a "
    "replica (and of replaying WAL beside it), not the capacity a replica on its own machine adds"
)


class IdlePool:
    """A pool stand-in whose connections cost nothing: what is left is the routing's own Python."""

    given_back = 0
    broken = False  # (it is its own connection)

    async def getconn(self) -> object:
        return self

    async def putconn(self, conn: object) -> None:
        pass


def overhead(n: int = 200_000) -> dict[str, float]:
    """CPU per request (us) that routing adds without replicas: the read helper, and a write's token, A/B."""
    import asyncio

    from tasktrail import db, replicas
    from tasktrail.http.app import observed

    pool = IdlePool()
    routing = replicas.Replicas("", pool)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "GET", "headers": [(b"host", b"x")], "state": {}}

    async def fetch(conn: object) -> int:
        return 1

    async def before() -> None:  # what a read handler did before: borrow, fetch
        async with db.Borrowed(pool) as conn:  # type: ignore[arg-type]
            await fetch(conn)

    async def after() -> None:  # what it does now: a closure per request, through the helper
        await routing.read(scope, lambda conn: fetch(conn))

    async def endpoint(scope: dict, receive: object, send) -> None:  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def sink(message: dict) -> None:
        pass

    # The request wrapper gives a write's answer its token and a read's none: the difference is the token.
    wrapped = observed(endpoint, count=False, access=None)
    write = {"type": "http", "method": "PATCH", "headers": [], "state": {}}

    async def tokened_write() -> None:
        await wrapped(dict(write, state={}), None, sink)

    async def plain_read() -> None:
        await wrapped(dict(scope, state={}), None, sink)

    async def timed(step) -> float:  # type: ignore[no-untyped-def]
        began = time.process_time()
        for _ in range(n):
            await step()
        return (time.process_time() - began) / n * 1e6

    async def run() -> dict[str, float]:
        pairs = {
            "read helper": (before, after),
            "a write's token (a write through the request wrapper, against a read)": (plain_read, tokened_write),
        }
        seen: dict[str, list[float]] = {}
        for round_no in range(5):
            for name, (a, b) in pairs.items():
                first, second = (a, b) if round_no % 2 == 0 else (b, a)
                ta, tb = await timed(first), await timed(second)
                if round_no % 2:
                    ta, tb = tb, ta
                seen.setdefault(name, []).append(tb - ta)
        return {name: statistics.median(values) for name, values in seen.items()}

    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round of 3 s, 500 tasks: checks the harness")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration, args.tasks = 1, 3, 500
    scenarios = args.scenarios.split(",")
    started = datetime.now(UTC)
    log(f"tasktrail replicas benchmark, {started:%Y-%m-%d %H:%M} UTC")
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    memory = psutil.virtual_memory().total / 2**30
    log(f"machine: {psutil.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}; "
        f"load average at start {load}")  # fmt: skip
    log(f"settings: {vars(args)}")
    log(f"NOTE: {NOTE}")
    log("== without replicas: the CPU routing adds per request (its code alone, A/B in one process, medians of 5) ==")
    for name, extra in overhead().items():
        log(f"{name:26} {extra:+.2f} us")
    apps.WORK.mkdir(parents=True, exist_ok=True)
    pair = Pair()
    results: dict[str, dict[str, list[dict]]] = {s: {"none": [], "replica": []} for s in scenarios}
    try:
        pair.create_database("bench")
        primary, standby = pair.primary.url("bench"), pair.standby.url("bench")
        migrations.migrate(primary)
        with pair.primary.connect() as conn:
            log(f"PostgreSQL: {conn.execute('SELECT version()').fetchone()[0]}")  # type: ignore[index]
        starters = (
            lambda: apps.start_tasktrail(primary, args.workers, name="none"),
            lambda: apps.start_tasktrail(primary, args.workers, name="replica", env={"DATABASE_REPLICA_URLS": standby}),
        )
        with apps.running(*starters) as servers:
            none, replica = servers
            apps.load(none, args.tasks, 0.5)
            for kind in ("ids", "running"):
                apps.ids_file(replica, kind).write_text(apps.ids_file(none, kind).read_text())
            pair.wait_replayed()
            time.sleep(1)  # the replica server's health checks find the standby level
            tree = apps.process_tree
            nodes = {"primary": tree(pair.primary.pid() or 0), "standby": tree(pair.standby.pid() or 0)}
            for server in servers:
                wrk(server.url, "get", 2, args.connections, (apps.ids_file(server, "ids"), ""))  # warm up
            for round_no in range(args.rounds):
                for i, scenario in enumerate(scenarios):
                    order = servers if (round_no + i) % 2 == 0 else servers[::-1]
                    for server in order:
                        with pair.primary.connect() as conn:
                            conn.execute("CHECKPOINT")  # each run starts with no dirty buffers to write
                        files = (apps.ids_file(server, "ids"), apps.ids_file(server, "running"))
                        app = tree(server.process.pid)
                        nodes = {name: tree(processes[0].pid) for name, processes in nodes.items()}
                        cpu = apps.cpu_seconds
                        before = {"app": cpu(app)} | {name: cpu(ps) for name, ps in nodes.items()}
                        r = wrk(server.url, scenario, args.duration, args.connections, files)
                        after = {"app": cpu(app)} | {name: cpu(ps) for name, ps in nodes.items()}
                        r["cpu_us"] = {k: (after[k] - before[k]) / r["requests"] * 1e6 for k in before}
                        results[scenario][server.name].append(r)
                        log(f"round {round_no + 1} {scenario:6} {server.name:7} {r['rps']:8.1f} req/s  "
                            f"p99 {r['p99_us'] / 1000:6.2f} ms  errors {r['errors']}  CPU per request: "
                            + ", ".join(f"{k} {v:.0f} us" for k, v in r["cpu_us"].items()))  # fmt: skip
    finally:
        pair.close()
    log("")
    log(f"== medians of {args.rounds} round(s), {args.duration} s each, {args.connections} connections, "
        f"{args.workers} server process(es) each ==")  # fmt: skip
    log(f"NOTE: {NOTE}")
    log("CPU per request in us, 'none' / 'replica': of the server process, the primary's and the standby's processes")
    log(f"{'scenario':8} | {'none req/s':>10} {'replica req/s':>13} {'ratio':>6} | {'app':>11} | {'primary':>11} | "
        f"{'standby':>11}")  # fmt: skip
    for scenario, by in results.items():
        med = {
            name: {"rps": statistics.median(r["rps"] for r in runs)}
            | {k: statistics.median(r["cpu_us"][k] for r in runs) for k in ("app", "primary", "standby")}
            for name, runs in by.items()
        }
        a, b = med["none"], med["replica"]
        cells = " | ".join(f"{a[k]:5.0f}/{b[k]:<5.0f}" for k in ("app", "primary", "standby"))
        log(f"{scenario:8} | {a['rps']:10.1f} {b['rps']:13.1f} {b['rps'] / a['rps']:5.2f}x | {cells}")
    out = (apps.WORK / "results") if args.quick else (ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started:%Y-%m-%d}-replicas.txt"
    path.write_text("\n".join(log.lines) + "\n")
    print(f"raw output: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
