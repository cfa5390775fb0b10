"""Two ways of running tasktrail, side by side under the same alternating load.

    uv run python bench/ab.py --b-with uvloop --b-with httptools        # uvicorn's fast loop and parser
    uv run python bench/ab.py --b-unix-socket                           # PostgreSQL over its Unix socket
    uv run python bench/ab.py --b-env TASKTRAIL_SOMETHING=1 --scenarios create,mix
    uv run python bench/ab.py --b-api-key                               # what API keys cost

A is `uv run tasktrail serve` as it is; B is the same with extra `uv run --with`
packages, environment variables, or DATABASE_URL through the Unix socket. Each
gets its own fresh database on the same server and the same tasks loaded through
its API; scenarios alternate A/B (order flipping every scenario and round) and
the medians and the median of the per-round ratios are printed. Nothing is written
to bench/results: this is for trying a change before measuring it with run.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # bench/ is not a package: its folder is on sys.path above
from run import SCENARIOS, wrk

from tasktrail.http import auth


def unix_socket(url: str, directory: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}@", query=f"host={directory}"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b-with", action="append", default=[], help="a package for B (uv run --with)")
    p.add_argument("--b-env", action="append", default=[], help="NAME=VALUE in B's environment")
    p.add_argument("--b-unix-socket", nargs="?", const="/var/run/postgresql", help="B reaches PostgreSQL here")
    p.add_argument(
        "--b-api-key", action="store_true", help="B has an API key (write scope); every request sends it (A ignores it)"
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tasks", type=int, default=2000)
    args = p.parse_args()
    uv_args = tuple(arg for package in args.b_with for arg in ("--with", package))
    env = dict(item.split("=", 1) for item in args.b_env)
    if args.b_api_key:
        key = auth.new_key()
        env["TASKTRAIL_API_KEYS"] = auth.Key("bench", "write", auth.digest(key)).entry()
        os.environ[apps.API_KEY_ENV] = key  # for the harness's requests and wrk's, to both servers
    scenarios = args.scenarios.split(",")
    print(f"A: tasktrail as it is; B: {' '.join(uv_args) or '-'} {env or ''} "
          f"{'unix socket ' + args.b_unix_socket if args.b_unix_socket else ''}")  # fmt: skip
    results: dict[str, dict[str, list[dict]]] = {s: {"A": [], "B": []} for s in scenarios}
    apps.WORK.mkdir(parents=True, exist_ok=True)
    try:
        for round_no in range(args.rounds):
            a_url = apps.create_database(apps.DB_PREFIX + "ab_a")
            b_url = apps.create_database(apps.DB_PREFIX + "ab_b")
            if args.b_unix_socket:
                b_url = unix_socket(b_url, args.b_unix_socket)
            starters = (
                lambda url=a_url: apps.start_tasktrail(url, args.workers, name="A"),
                lambda url=b_url: apps.start_tasktrail(url, args.workers, name="B", uv_args=uv_args, env=env),
            )
            with apps.running(*starters) as servers:
                for server in servers:
                    apps.load(server, args.tasks, 0.5)
                    wrk(server.url, "get", 2, args.connections, (apps.ids_file(server, "ids"), ""))
                for i, scenario in enumerate(scenarios):
                    order = servers if (round_no + i) % 2 == 0 else servers[::-1]
                    for server in order:
                        apps.checkpoint()
                        files = (apps.ids_file(server, "ids"), apps.ids_file(server, "running"))
                        r = wrk(server.url, scenario, args.duration, args.connections, files)
                        results[scenario][server.name].append(r)
                        print(f"round {round_no + 1} {scenario:7} {server.name} {r['rps']:8.1f} req/s  "
                              f"p50 {r['p50_us'] / 1000:6.2f} ms  p99 {r['p99_us'] / 1000:7.2f} ms  "
                              f"errors {r['errors']}", flush=True)  # fmt: skip
    finally:
        apps.drop_made()
    print(f"\n{'scenario':8} | {'A req/s':>8} {'p99 ms':>7} | {'B req/s':>8} {'p99 ms':>7} | B/A req/s  paired")
    for scenario, by in results.items():
        a, b = by["A"], by["B"]
        med = {k: {m: statistics.median(r[m] for r in runs) for m in ("rps", "p99_us")} for k, runs in by.items()}
        paired = statistics.median(y["rps"] / x["rps"] for x, y in zip(a, b, strict=True))
        print(f"{scenario:8} | {med['A']['rps']:8.1f} {med['A']['p99_us'] / 1000:7.2f} | "
              f"{med['B']['rps']:8.1f} {med['B']['p99_us'] / 1000:7.2f} | "
              f"{med['B']['rps'] / med['A']['rps']:8.2f}x {paired:6.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
