"""Python CPU per request of the app itself, driven in-process (no HTTP server, no wrk), A against B.

    uv run python bench/inproc.py                              # this tree's src/ alone
    uv run python bench/inproc.py --b-src /tmp/base/src        # this tree (A) against another tree's src/ (B)
    uv run python bench/inproc.py --b-env TASKTRAIL_API_KEYS=... --key tt_...   # B with API keys configured
    uv run python bench/inproc.py --a-env TASKTRAIL_METRICS=0 \
        --b-env TASKTRAIL_ACCESS_LOG=1 --b-env TASKTRAIL_LOG_FORMAT=json        # what metrics and JSON lines cost

Each side is a fresh process that imports tasktrail from its src/ (put first on
sys.path), makes the app with create_app on a fresh database, and calls the ASGI
app the way uvicorn would, from 16 asyncio tasks, for each scenario: create,
get, update (as bench/run.py's wrk script sends them). What it reports per
request is the process's CPU time (user + system) and that of its PostgreSQL
backends, over the measured requests after a warm-up. Without an HTTP server
and a load generator in the way, the figure moves with the code far more than
with the machine, so small differences show; the sides alternate, and the
median of the rounds is printed. The HTTP protocol's own cost (uvicorn,
httptools) is not in it: what a change to the app saves is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # bench/ is not a package: its folder is on sys.path above

SCENARIOS = ("create", "get", "update")
CREATE_BODY = b'{"task_type":"bench","params":{"file_path":"/data/bench.pdf","n":%d}}'
UPDATE_BODY = b'{"status":"running","progress":%.1f}'


def _side(src: str, url: str, scenarios: list[str], requests: int, key: str | None) -> dict:
    """One side's run in this process: {scenario: {"python_us", "postgres_us", "statuses"}}."""
    sys.path.insert(0, src)
    import asyncio
    import random
    import time

    from tasktrail.http.app import create_app

    if os.environ.get("TASKTRAIL_ACCESS_LOG") == "1":
        # As `serve` configures its workers: every request's line, to a file as a deployment would.
        import logging.config

        from tasktrail import logs

        logging.config.dictConfig(logs.config(logs.log_format(), "info"))
        sys.stderr = open(os.environ.get("INPROC_LOG_FILE", os.devnull), "w")  # noqa: SIM115 -- as long as the process

    # The schema and the read models, as `tasktrail migrate` of this side's tree makes them.
    migrate = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from tasktrail.cli import main; "
               "sys.argv[1:] = ['migrate']; sys.exit(main())", src]  # fmt: skip
    subprocess.run(migrate, env=os.environ | {"DATABASE_URL": url}, check=True, capture_output=True)
    app = create_app(url)
    rng = random.Random(7)  # noqa: S311 -- load data, not secrets
    auth = [(b"authorization", b"Bearer " + key.encode())] if key else []

    async def call(method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), *auth]
        if body:
            headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
            "state": {},
        }
        sent = False
        status, chunks = 0, []

        async def receive() -> dict:
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                chunks.append(message.get("body", b""))

        await app(scope, receive, send)
        return status, b"".join(chunks)

    async def dump() -> None:
        """Under valgrind --tool=callgrind (CALLGRIND=1): a dump of the counts so far, so each window has its own."""
        if os.environ.get("CALLGRIND") != "1":
            return
        control = await asyncio.create_subprocess_exec(
            "callgrind_control", "--dump", str(os.getpid()), stdout=subprocess.DEVNULL
        )
        await control.wait()  # the loop keeps running meanwhile: valgrind takes the command only then

    async def main() -> dict:
        results = {}
        async with app.lifespan():
            ids = []
            for n in range(100 if os.environ.get("CALLGRIND") == "1" else 400):
                status, body = await call("POST", "/tasks/", CREATE_BODY % n)
                assert status == 201, (status, body)
                ids.append(json.loads(body)["task_id"])
            running = ids[::2]
            for task_id in running:
                status, body = await call("PATCH", f"/tasks/{task_id}", b'{"status":"running","progress":1.0}')
                assert status == 200, (status, body)
            counter = 1000

            def make(scenario: str) -> tuple[str, str, bytes]:
                nonlocal counter
                if scenario == "create":
                    counter += 1
                    return "POST", "/tasks/", CREATE_BODY % counter
                if scenario == "get":
                    return "GET", f"/tasks/{rng.choice(ids)}", b""
                return "PATCH", f"/tasks/{rng.choice(running)}", UPDATE_BODY % (rng.random() * 99)

            for scenario in scenarios:
                statuses: dict[int, int] = {}

                async def worker(n: int, scenario: str = scenario, statuses: dict = statuses) -> None:
                    for _ in range(n):
                        status, _ = await call(*make(scenario))
                        statuses[status] = statuses.get(status, 0) + 1

                await asyncio.gather(*(worker(requests // 32) for _ in range(16)))  # warm-up
                statuses.clear()
                pg = apps.backends(url)
                await dump()
                pg0, py0 = apps.cpu_seconds(pg), time.process_time()
                await asyncio.gather(*(worker(requests // 16) for _ in range(16)))
                py1, pg1 = time.process_time(), apps.cpu_seconds(pg)
                await dump()
                n = sum(statuses.values())
                results[scenario] = {
                    "python_us": (py1 - py0) / n * 1e6,
                    "postgres_us": (pg1 - pg0) / n * 1e6,
                    "statuses": statuses,
                }
        return results

    import uvloop  # as `serve` runs (uvicorn picks uvloop when it is installed)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def run_side(src: str, env: dict[str, str], scenarios: list[str], requests: int, key: str | None, name: str) -> dict:
    database = apps.DB_PREFIX + "inproc_" + name
    url = apps.create_database(database)
    try:
        command = [sys.executable, __file__, "--side", src, "--url", url, "--scenarios", ",".join(scenarios)]
        command += ["--requests", str(requests)] + (["--key", key] if key else [])
        out = subprocess.run(command, env=os.environ | env, capture_output=True, text=True, check=False, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"side {name} failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        apps.drop_database(database)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b-src", help="B imports tasktrail from this src/ folder (default: this tree's)")
    p.add_argument("--b-env", action="append", default=[], help="NAME=VALUE in B's environment")
    p.add_argument("--a-env", action="append", default=[], help="NAME=VALUE in A's environment")
    p.add_argument("--key", help="the API key both sides send (as Authorization: Bearer)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=3200)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    scenarios = args.scenarios.split(",")
    if args.side:
        print(json.dumps(_side(args.side, args.url, scenarios, args.requests, args.key)))
        return 0
    here = str(Path(__file__).resolve().parents[1] / "src")
    sides = {"A": (here, dict(item.split("=", 1) for item in args.a_env))}
    if args.b_src or args.b_env:
        sides["B"] = (str(Path(args.b_src or here).resolve()), dict(item.split("=", 1) for item in args.b_env))
    print("  ".join(f"{name}: {src} {env or ''}" for name, (src, env) in sides.items()))
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for round_no in range(args.rounds):
        order = list(sides) if round_no % 2 == 0 else list(sides)[::-1]
        for name in order:
            src, env = sides[name]
            result = run_side(src, env, scenarios, args.requests, args.key, name.lower())
            runs[name].append(result)
            line = "  ".join(
                f"{s} {r['python_us']:5.0f} + {r['postgres_us']:4.0f} us {r['statuses']}" for s, r in result.items()
            )
            print(f"round {round_no + 1} {name}: {line}", flush=True)
    print(f"\nmedian CPU per request, Python + PostgreSQL backends (us), over {args.rounds} rounds:")
    for scenario in scenarios:
        cells = []
        for name in sides:
            py = statistics.median(r[scenario]["python_us"] for r in runs[name])
            pg = statistics.median(r[scenario]["postgres_us"] for r in runs[name])
            cells.append(f"{name} {py:6.1f} + {pg:5.1f}")
        if len(sides) == 2:
            paired = statistics.median(
                b[scenario]["python_us"] / a[scenario]["python_us"] for a, b in zip(runs["A"], runs["B"], strict=True)
            )
            cells.append(f"B/A python {paired:.3f}")
        print(f"{scenario:7} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
