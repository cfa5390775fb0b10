"""What metrics and JSON logs cost: mixed throughput with them off and on, side by side (SPEC §11: 5% at most).

    uv run python bench/observability.py            # 6 rounds, 8 s each alone, in 4 turns (about 5 minutes)
    uv run python bench/observability.py --quick    # 2 rounds, 4 s each alone, in 2 turns, to check the harness

off: `serve --no-metrics --no-access-log` (the request id is still given: it was there before).
on:  `serve --log-format json --log-level info`: every request counted and timed by
     prometheus_client (in memory: one worker), a JSON line per request (to a file), and
     GET /metrics scraped every --scrape-every seconds (default 5; Prometheus's default is 15).

First, the one ASGI wrapper that gives request ids, counts and logs, alone: its CPU
time per request in one process, with metrics (in memory, as `serve` keeps them with
one worker) and the JSON line (to a file) off and on, around an app that only
answers. Then the whole service.
Each round gives both fresh databases on the same PostgreSQL (BENCH_PG_URL) and the
same tasks loaded through their APIs, then drives the mix of bench/wrk/tasks.lua
(20% create, 40% update, 30% get, 5% list, 5% stats) at each alone, in turns of a
few seconds in the order A B B A A B B A (a slow drift in the machine's speed, the
larger part of its noise, then weighs on both alike), which server is A flipping
every round. Besides requests per second it counts the CPU time the server
processes used per request (less disturbed than throughput by other load on a shared
machine), and after each round drives both at once (other load then weighs on both
alike). The target is judged on the ratio within each round (median, and mean with its
standard error); the medians of the rates and the both-at-once ratio are printed beside it. In the
last round py-spy samples the "on" server while it is driven, and the share of its
samples in the code of metrics and logs (tasktrail.metrics, tasktrail.logs, tasktrail.http.metrics,
prometheus_client) is printed: a measure of their cost that other load hardly moves.
The raw output goes to bench/results/observability-<date>.txt (quick runs: bench/.work/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # bench/ is not a package: its folder is on sys.path above
from run import Log, machine, wrk

VARIANTS = {
    "off": ("--no-metrics", "--no-access-log"),
    "on": ("--log-format", "json", "--log-level", "info"),
}
TARGET = 0.95  # on / off mixed throughput, at least

log = Log()


def cpu_seconds(server: apps.Server) -> float:
    """User and system CPU time of the server's processes so far (uv, the server and its workers)."""
    return apps.cpu_seconds(apps.process_tree(server.process.pid))


class Scraper:
    """GET /metrics every `every` seconds of the time "on" is driven, as Prometheus would (paused in between)."""

    TICK = 0.05

    def __init__(self, server: apps.Server, every: float) -> None:
        self.server, self.every = server, every
        self.stop = threading.Event()
        self.active = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.scrapes = 0

    def run(self) -> None:
        driven = 0.0
        while not self.stop.wait(self.TICK):
            if not self.active.is_set():
                continue
            driven += self.TICK
            if driven >= self.every:
                driven = 0.0
                status, _, _ = apps.request(self.server.port, "GET", "/metrics")
                assert status == 200, status
                self.scrapes += 1

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


# Frames of the code that metrics and logs add (py-spy names a frame "function (path:line)").
OBSERVING = ("tasktrail/metrics.py", "tasktrail/logs.py", "tasktrail/http/metrics.py", "prometheus_client/")


class Profile:
    """py-spy sampling a server's Python processes for `seconds`; then the share of samples in OBSERVING code."""

    def __init__(self, server: apps.Server, seconds: int) -> None:
        root = psutil.Process(server.process.pid)
        pythons = [p for p in root.children(recursive=True) if p.name().startswith(("python", "tasktrail"))]
        self.out = apps.WORK / f"profile-{server.name}.txt"
        command = ["py-spy", "record", "--pid", str(pythons[0].pid), "--subprocesses", "--nonblocking"]
        command += ["--rate", "200", "--duration", str(seconds), "--format", "raw", "--output", str(self.out)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def share(self) -> tuple[float, int]:
        self.process.wait(timeout=120)
        observing = total = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            total += int(count)
            if any(part in stack for part in OBSERVING):
                observing += int(count)
        return observing / max(total, 1), total


def measure(servers: list[apps.Server], args: argparse.Namespace, *, first: int, profile: bool) -> dict[str, dict]:
    """Each server driven alone in turn, `args.slices` times each, in the order A B B A A B ... (servers[first] is
    A): slow drifts of the machine's speed then weigh on both alike. What each served, summed over its slices."""
    order = [servers[first], servers[1 - first]]
    on = next(server for server in servers if server.name == "on")
    totals = {server.name: {"requests": 0, "duration_us": 0, "errors": 0, "cpu": 0.0, "sample": "", "p50": [],
                            "p99": []} for server in servers}  # fmt: skip
    # py-spy over the whole round: while "off" is driven, "on" idles, and idle threads are not sampled.
    slices = args.slices * 2
    profiling = Profile(on, int(slices * (args.duration / args.slices + 1.5))) if profile else None
    with Scraper(on, args.scrape_every) as scraper:
        for n in range(slices):
            server = order[0] if n % 4 in (0, 3) else order[1]
            apps.checkpoint()
            files = (apps.ids_file(server, "ids"), apps.ids_file(server, "running"))
            cpu_before = cpu_seconds(server)
            if server is on:
                scraper.active.set()
            result = wrk(server.url, "mix", max(1, round(args.duration / args.slices)), args.connections, files)
            scraper.active.clear()
            total = totals[server.name]
            total["cpu"] += cpu_seconds(server) - cpu_before
            for key in ("requests", "duration_us", "errors"):
                total[key] += result[key]
            total["sample"] = total["sample"] or result["sample"]
            total["p50"].append(result["p50_us"])
            total["p99"].append(result["p99_us"])
    results = {}
    for name, total in totals.items():
        results[name] = {
            "rps": total["requests"] / (total["duration_us"] / 1e6),
            "cpu_us": total["cpu"] / total["requests"] * 1e6,
            # Of the slices' percentiles, the median: each slice's are of its own requests.
            "p50_us": statistics.median(total["p50"]),
            "p99_us": statistics.median(total["p99"]),
            "errors": total["errors"],
            "sample": total["sample"],
            "scrapes": scraper.scrapes if name == "on" else 0,
        }
    if profiling is not None:
        results["on"]["profile"] = profiling.share()
    return results


def together(servers: list[apps.Server], args: argparse.Namespace) -> dict[str, dict]:
    """Both servers driven at once: whatever else loads the machine loads both alike, so the ratio of their
    throughputs is the ratio of what a request costs each (when, as here, the servers' CPU is what limits)."""
    apps.checkpoint()
    with ThreadPoolExecutor(len(servers)) as pool, contextlib.ExitStack() as stack:
        for server in servers:
            if server.name == "on":
                stack.enter_context(Scraper(server, args.scrape_every))
        runs = {
            server.name: pool.submit(
                wrk, server.url, "mix", args.duration, args.connections,
                (apps.ids_file(server, "ids"), apps.ids_file(server, "running")),
            )
            for server in servers
        }  # fmt: skip
        return {name: run.result() for name, run in runs.items()}


# The wrapper alone: run in a process of its own, as prometheus_client's mode is chosen at import.
WRAPPER = """
import asyncio, os, sys, tempfile, time
files = tempfile.TemporaryDirectory(prefix="tasktrail-bench-")
if int(sys.argv[1]) > 1:  # as `serve` counts: in mmap'd files only when there are workers to add up
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = files.name
from tasktrail import logs
from tasktrail.http.app import observed

async def app(scope, receive, send):
    scope["path_template"] = "/tasks/{task_id}"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})

async def sent(message): pass
async def receive(): return {"type": "http.request"}
HEADERS = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"authorization", b"Bearer k")]

async def per_request(wrapped, n):
    started = time.process_time()
    for _ in range(n):
        scope = {"type": "http", "method": "PATCH", "path": "/tasks/x", "headers": HEADERS,
                 "client": ("127.0.0.1", 1), "state": {}}
        await wrapped(scope, receive, sent)
        await asyncio.sleep(0)  # a turn of the loop, as between a server's requests (lines are written per turn)
    return (time.process_time() - started) / n * 1e6

async def main():
    variants = {"off": observed(app, count=False, access=None),
                "metrics": observed(app, count=True, access=None),
                "metrics+json": observed(app, count=True, access=logs.AccessLine("json"))}
    best = {}
    for _ in range(5):  # interleaved; the least disturbed of five
        for name, wrapped in variants.items():
            best[name] = min(best.get(name, 1e9), await per_request(wrapped, 20_000))
    print(" ".join(f"{name}={us:.2f}" for name, us in best.items()), file=sys.__stdout__)

asyncio.run(main())
files.cleanup()
"""


def wrapper_cost(workers: int) -> dict[str, float]:
    """CPU us a request of the wrapper alone, by variant (its JSON lines go to a file, as a server's would)."""
    with (apps.WORK / "wrapper-access.log").open("w") as lines:
        command = [sys.executable, "-c", WRAPPER, str(workers)]
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=lines, text=True, check=True, timeout=600)
    return {name: float(us) for name, us in (item.split("=") for item in done.stdout.split())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 3 s, to check the harness")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 6; quick 2)")
    p.add_argument("--duration", type=int, help="seconds each server is driven alone a round (default 8; quick 4)")
    p.add_argument("--slices", type=int, default=4, help="in how many turns each is (default 4; quick 2)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="server processes each (default 1)")
    p.add_argument("--tasks", type=int, default=2000, help="tasks loaded through each API (default 2000)")
    p.add_argument("--scrape-every", type=float, default=5.0, help="seconds between scrapes of 'on' (default 5)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="no py-spy in the last round")
    args = p.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 6)
    args.duration = args.duration or (4 if args.quick else 8)
    args.slices = 2 if args.quick else args.slices

    apps.WORK.mkdir(parents=True, exist_ok=True)
    log(f"tasktrail observability cost, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine()}")
    log(f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}; settings: {vars(args)}")
    for name, serve_args in VARIANTS.items():
        log(f"{name:>3}: tasktrail serve {' '.join(serve_args)}")
    costs = wrapper_cost(args.workers)
    mode = "in memory" if args.workers == 1 else "in files"
    log(f"\n== the wrapper alone (one process, metrics {mode}; CPU us a request, best of 5 interleaved runs of 20k) ==")
    log("  ".join(f"{name} {us:.2f}" for name, us in costs.items()))
    metrics_us, json_us = costs["metrics"] - costs["off"], costs["metrics+json"] - costs["metrics"]
    log(f"metrics add {metrics_us:.2f} us a request, the JSON line {json_us:.2f} us")
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    at_once: list[dict[str, dict]] = []
    try:
        for round_no in range(args.rounds):
            log(f"\n== round {round_no + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f}) ==")
            urls = {name: apps.create_database(apps.DB_PREFIX + f"obs_{name}") for name in VARIANTS}
            starters = [
                lambda name=name, url=url: apps.start_tasktrail(url, args.workers, name=name, serve_args=VARIANTS[name])
                for name, url in urls.items()
            ]
            with apps.running(*starters) as servers:
                for server in servers:
                    apps.load(server, args.tasks, 0.5)
                    wrk(server.url, "get", 2, args.connections, (apps.ids_file(server, "ids"), ""))  # warm up
                last = round_no == args.rounds - 1
                measured = measure(servers, args, first=round_no % 2, profile=last and args.profile)
                for server in servers:
                    r = measured[server.name]
                    results[server.name].append(r)
                    flag = f"  !! {r['errors']} errors, e.g. {r['sample']}" if r["errors"] else ""
                    log(f"{server.name:>3} {r['rps']:9.1f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms  "
                        f"p99 {r['p99_us'] / 1000:7.2f} ms  server CPU {r['cpu_us']:6.1f} us/request  "
                        f"scrapes {r['scrapes']}{flag}")  # fmt: skip
                    if "profile" in r:
                        share, samples = r["profile"]
                        log(f"    py-spy: {share:.2%} of {samples} samples of the on server in metrics and logs code")
                both = together(servers, args)
                at_once.append(both)
                log("at once: " + "  ".join(f"{name} {r['rps']:8.1f} req/s" for name, r in both.items())
                    + f"  on / off {both['on']['rps'] / both['off']['rps']:.3f}")  # fmt: skip
            for name in urls:
                apps.drop_database(apps.DB_PREFIX + f"obs_{name}")
        summarise(results, at_once)
    finally:
        apps.drop_made()
        out_dir = apps.WORK / "results" if args.quick else apps.BENCH / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"observability-{datetime.now(UTC):%Y-%m-%d}.txt"
        n = 2
        while out.exists():
            out, n = out.with_name(f"observability-{datetime.now(UTC):%Y-%m-%d}-{n}.txt"), n + 1
        out.write_text("\n".join(log.lines) + "\n")
        print(f"raw output: {out.relative_to(apps.ROOT)}")
    return 0


def summarise(results: dict[str, list[dict]], at_once: list[dict[str, dict]]) -> None:
    off, on = results["off"], results["on"]

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    log(f"\n== medians of {len(off)} rounds ==")
    log(f"{'':>3} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'errors':>6}")
    for name, runs in results.items():
        log(f"{name:>3} {med(runs, 'rps'):9.1f} {med(runs, 'p50_us') / 1000:7.2f} {med(runs, 'p99_us') / 1000:7.2f} "
            f"{med(runs, 'cpu_us'):10.1f} {sum(r['errors'] for r in runs):6d}")  # fmt: skip
    throughput = med(on, "rps") / med(off, "rps")
    paired = statistics.median(b["rps"] / a["rps"] for a, b in zip(off, on, strict=True))
    cpu = med(on, "cpu_us") / med(off, "cpu_us")
    cpu_paired = statistics.median(b["cpu_us"] / a["cpu_us"] for a, b in zip(off, on, strict=True))
    ratios = [b["rps"] / a["rps"] for a, b in zip(off, on, strict=True)]
    spread = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    # Judged on the ratio within each round (its turns interleaved A B B A): the machine's speed drifts
    # by 20% and more from round to round, which the medians of the rates take in whole.
    log(
        f"\nmixed throughput on / off, paired within rounds: median {paired:.3f}, mean {statistics.mean(ratios):.3f}"
        f" +/- {spread:.3f} (standard error); target >= {TARGET}: {'met' if paired >= TARGET else 'NOT MET'}"
    )
    log(f"mixed throughput on / off, medians of the rounds' rates: {throughput:.3f} (drifts with the machine)")
    log(f"server CPU per request on / off: {cpu:.3f} (paired: {cpu_paired:.3f}), "
        f"+{med(on, 'cpu_us') - med(off, 'cpu_us'):.1f} us a request")  # fmt: skip
    simultaneous = statistics.median(both["on"]["rps"] / both["off"]["rps"] for both in at_once)
    log(f"mixed throughput on / off, both driven at once: {simultaneous:.3f} (median of {len(at_once)})")


if __name__ == "__main__":
    sys.exit(main())
