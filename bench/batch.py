"""Batch writes (SPEC §12): tasks per second through POST and PATCH /tasks/batch, one server process.

    uv run python bench/batch.py                 # the full run (about 3 minutes)
    uv run python bench/batch.py --quick         # a short run to check the harness (under a minute)
    uv run python bench/batch.py --profile       # also: py-spy on the server, EXPLAIN ANALYZE of each statement

On a fresh database on BENCH_PG_URL's server, one `tasktrail serve` process
(one worker) takes, per round:

1. create: batches of --size new tasks (POST /tasks/batch) over --connections
   keep-alive connections, the bodies encoded before the clock starts;
2. progress: batches of --size progress reports (PATCH /tasks/batch), each
   batch on --size different tasks, each report a new value (never a no-op);
3. for scale, single requests of the same kinds under wrk (POST /tasks/ and
   PATCH /tasks/{id}) at the same connection count.

Printed per phase: tasks (or updates) per second, the target beside it, and
the CPU each task cost the server process and the database's backends (both
share this machine's cores, so CPU saved in either is throughput). After the
last round `tasktrail verify` folds the whole log and compares it with the
read model and the counters; the run fails if it finds a difference. Medians
over the rounds go to bench/results/<date>-batch.txt (quick runs: bench/.work/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # bench/ is not a package: its folder is on sys.path above
from run import Log, wrk

TARGETS = {"create": 30_000, "progress": 20_000}  # items per second, at least (issue 14)
DB = apps.DB_PREFIX + "batch"
TASK = {"task_type": "bench"}
log = Log()


def create_bodies(batches: int, size: int, start: int) -> list[bytes]:
    """The tasks of the single-create benchmarks (bench/wrk/tasks.lua), `size` to a batch."""
    bodies = []
    for b in range(batches):
        first = start + b * size
        tasks = [TASK | {"params": {"file_path": "/data/bench.pdf", "n": n}} for n in range(first, first + size)]
        bodies.append(json.dumps({"tasks": tasks}).encode())
    return bodies


def progress_bodies(ids: list[str], batches: int, size: int, rng: random.Random) -> list[bytes]:
    """Each batch names `size` different tasks; successive batches walk through all of them."""
    bodies, at = [], 0
    for _ in range(batches):
        chunk = [ids[(at + i) % len(ids)] for i in range(size)]
        at += size
        # A new value each time (a fresh random draw, two decimals), so no report is a no-op.
        updates = [{"task_id": task_id, "progress": round(rng.uniform(0, 99.99), 2) + 0.001} for task_id in chunk]
        bodies.append(json.dumps({"updates": updates}).encode())
    return bodies


class Sender(threading.Thread):
    """One keep-alive connection sending its share of the bodies, one at a time."""

    def __init__(self, port: int, method: str, bodies: list[bytes], answers: list) -> None:
        super().__init__(daemon=True)
        self.port, self.method, self.bodies, self.answers = port, method, bodies, answers
        self.error: str | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            for body in self.bodies:
                conn.request(self.method, "/tasks/batch", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                if response.status not in (200, 201):
                    self.error = f"{response.status}: {data[:300]!r}"
                    return
                self.answers.append(data)
        finally:
            conn.close()


def send(server: apps.Server, url: str, method: str, bodies: list[bytes], connections: int, items: int) -> dict:
    """Send the bodies over `connections` connections; items per second and CPU per item."""
    answers: list[bytes] = []
    senders = [Sender(server.port, method, bodies[k::connections], answers) for k in range(connections)]
    root = psutil.Process(server.process.pid)
    pythons = [root, *root.children(recursive=True)]
    pgs = apps.backends(url)
    before = (apps.cpu_seconds(pythons), apps.cpu_seconds(pgs), time.process_time())
    start = time.perf_counter()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    elapsed = time.perf_counter() - start
    after = (apps.cpu_seconds(pythons), apps.cpu_seconds(pgs), time.process_time())
    errors = [s.error for s in senders if s.error]
    if errors:
        raise SystemExit(f"bench: {method} /tasks/batch failed: {errors[0]}")
    n = len(bodies) * items
    return {
        "rate": n / elapsed,
        "server_us": (after[0] - before[0]) / n * 1e6,
        "pg_us": (after[1] - before[1]) / n * 1e6,
        "client_us": (after[2] - before[2]) / n * 1e6,
        "answers": answers,
    }


def explain(url: str, size: int) -> None:
    """EXPLAIN ANALYZE of the one statement of a batch of creates and of progress reports, rolled back."""
    from psycopg.types.json import Jsonb

    from tasktrail import db, eventstore, projections, writer
    from tasktrail.domain.task import CreateTask, UpdateTask
    from tasktrail.projections import tasks as tasks_view

    rng = random.Random(1)  # noqa: S311 -- load data, not secrets
    # db's settings: psycopg encodes JSON with msgspec (UUIDs, datetimes), the read models' schemas come first.
    with psycopg.connect(url, **db.connect_kwargs()) as conn:
        ids = [row[0] for row in conn.execute("SELECT task_id FROM tasks LIMIT %s", (size,))]
        query = f"SELECT {tasks_view.COLUMNS} FROM tasks WHERE task_id = ANY(%s)"  # noqa: S608 -- a constant
        found = {task.task_id: task for task in map(tasks_view.to_task, conn.execute(query, (ids,)))}
        new = [(UUID(int=rng.getrandbits(128)), None, CreateTask("bench", {"n": n})) for n in range(size)]
        creates, _ = writer._decide(new, writer.now())
        reports = [(task_id, UpdateTask(progress=rng.uniform(0, 99)), None) for task_id in ids]
        updates, _ = writer._decide_many(reports, found, set(), writer.now())
        plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {tasks_view.GET_MANY}", {"task_ids": Jsonb(ids)})
        log(f"\n-- EXPLAIN ANALYZE of reading the {len(ids)} tasks a batch of progress reports names:")
        for (line,) in plan:
            log("   " + line)
        for name, changes in (("creates", creates), ("progress reports", updates)):
            write = eventstore.document([recorded for recorded, _, _ in changes], {"request_id": "0" * 32})
            write |= projections.document(changes, projections.INLINE)
            statement = projections.statement(eventstore.APPEND, projections.INLINE, write)
            with conn.transaction(force_rollback=True):
                plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", {"write": Jsonb(write)})
                log(f"\n-- EXPLAIN ANALYZE of the statement of a batch of {len(changes)} {name} (rolled back):")
                for (line,) in plan:
                    log("   " + line)


def profile(server: apps.Server, url: str, method: str, bodies: list[bytes], args: argparse.Namespace) -> None:
    """py-spy on the server while it takes the bodies (again and again for --profile-seconds); the top frames."""
    from profile import summarise_stacks  # bench/profile.py, ahead of the standard library's on sys.path

    seconds = args.profile_seconds
    raw = apps.WORK / f"profile-batch-{method.lower()}.txt"
    root = psutil.Process(server.process.pid)  # `uv run`, whose child is the server's Python
    python = next((p for p in root.children(recursive=True) if p.name() != "uv"), root)
    spy = ["uv", "run", "py-spy", "record", "--pid", str(python.pid), "--rate", "250"]
    spy += ["--duration", str(seconds), "--nonblocking", "--format", "raw", "-o", str(raw)]
    recorder = subprocess.Popen(spy, cwd=apps.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + seconds + 1
    while time.monotonic() < deadline:
        send(server, url, method, bodies, args.connections, args.size)
    _, err = recorder.communicate(timeout=seconds + 60)
    if recorder.returncode != 0 or not raw.is_file():
        log(f"   py-spy failed: {err.decode()[-500:]}")
        return
    log(f"\n-- py-spy of the server under {method} /tasks/batch; stacks in {raw.relative_to(apps.ROOT)}")
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        summarise_stacks(raw, 15)
    log(summary.getvalue().rstrip())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run to check the harness")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=40, help="batches per phase and round")
    p.add_argument("--size", type=int, default=1000, help="items per batch")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--wrk-seconds", type=int, default=8, help="single requests under wrk, per kind and round")
    p.add_argument("--profile", action="store_true", help="py-spy the server and EXPLAIN ANALYZE the statements")
    p.add_argument("--profile-seconds", type=int, default=10)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.batches, args.wrk_seconds, args.profile_seconds = 1, 8, 3, 4
    rng = random.Random(14)  # noqa: S311 -- load data, not secrets
    apps.WORK.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC)
    memory = psutil.virtual_memory().total / 2**30
    log(f"tasktrail batch writes, {stamp:%Y-%m-%d %H:%M} UTC, {platform.node()}: {os.cpu_count()} cores, "
        f"{memory:.0f} GiB; PostgreSQL at {apps.ADMIN_URL.rsplit('@', 1)[-1]}")  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=apps.ROOT, capture_output=True, text=True)
    log(f"commit {commit.stdout.strip()}; one server process; {args.rounds} rounds of {args.batches} batches of "
        f"{args.size} per phase over {args.connections} connections")  # fmt: skip
    url = apps.create_database(DB)
    results: dict[str, list[dict]] = {"create": [], "progress": [], "single create": [], "single update": []}
    ok = False
    try:
        apps.migrate(url)
        with apps.running(lambda: apps.start_tasktrail(url, 1)) as (server,):
            warm = send(server, url, "POST", create_bodies(4, args.size, 10**9), args.connections, args.size)
            ids = [t["task_id"] for answer in warm["answers"] for t in json.loads(answer)["tasks"]]
            send(server, url, "PATCH", progress_bodies(ids, 4, args.size, rng), args.connections, args.size)
            made = 0
            for round_no in range(args.rounds):
                bodies = create_bodies(args.batches, args.size, made)
                made += args.batches * args.size
                created = send(server, url, "POST", bodies, args.connections, args.size)
                ids = [t["task_id"] for answer in created.pop("answers") for t in json.loads(answer)["tasks"]]
                results["create"].append(created)
                bodies = progress_bodies(ids, args.batches, args.size, rng)
                progressed = send(server, url, "PATCH", bodies, args.connections, args.size)
                progressed.pop("answers")
                results["progress"].append(progressed)
                files = _id_files(ids)
                for kind, scenario in (("single create", "create"), ("single update", "update")):
                    r = wrk(server.url, scenario, args.wrk_seconds, args.connections * 4, files)
                    results[kind].append({"rate": r["rps"], "errors": r["errors"]})
                log(f"round {round_no + 1}: " + ", ".join(f"{k} {v[-1]['rate']:,.0f}/s" for k, v in results.items()))
            if args.profile:
                profile(server, url, "POST", create_bodies(8, args.size, 2 * 10**9), args)
                profile(server, url, "PATCH", progress_bodies(ids, 8, args.size, rng), args)
        if args.profile:
            explain(url, args.size)
        ok, report = apps.verify(url)
    finally:
        if ok:
            apps.drop_database(DB)  # else kept, to look into
    _report(results, args)
    log(f"\ntasktrail verify: {'passed' if ok else 'FAILED'}: {report}")
    folder = apps.BENCH / "results" if not args.quick else apps.WORK / "results"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{stamp:%Y-%m-%d}-batch{'-profile' if args.profile else ''}.txt"
    out.write_text("\n".join(log.lines) + "\n")
    print(f"raw output: {out.relative_to(apps.ROOT)}")
    missed = [k for k, target in TARGETS.items() if statistics.median(r["rate"] for r in results[k]) < target]
    return 0 if ok and not missed else 1


def _id_files(ids: list[str]) -> tuple[Path, Path]:
    """wrk's script reads task ids from files: the same for both (it updates the `running` ones)."""
    path = apps.WORK / "batch-ids.txt"
    path.write_text("\n".join(ids) + "\n")
    return path, path


def _report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    log(f"\n{'':16} {'per second':>12} {'target':>8} {'vs target':>9}  {'CPU per item (median)':<40}")
    for kind, runs in results.items():
        rate = statistics.median(r["rate"] for r in runs)
        target = TARGETS.get(kind)
        versus = f"{rate / target:8.2f}x" if target else ""
        cpu = ""
        if "server_us" in runs[0]:
            server = statistics.median(r["server_us"] for r in runs)
            pg = statistics.median(r["pg_us"] for r in runs)
            client = statistics.median(r["client_us"] for r in runs)
            cpu = f"server {server:5.1f} us, PostgreSQL {pg:5.1f} us, client {client:4.1f} us"
        log(f"{kind:16} {rate:12,.0f} {target or '':>8} {versus:>9}  {cpu}")
    for batch, single in (("create", "single create"), ("progress", "single update")):
        ratio = statistics.median(r["rate"] for r in results[batch]) / statistics.median(
            r["rate"] for r in results[single]
        )
        log(f"{batch} in batches of {args.size}: {ratio:.1f}x the items per second of single requests")


if __name__ == "__main__":
    sys.exit(main())
