"""The dashboard's cost and its pace under a write storm, side by side with the API in one run.

    uv run python bench/dashboard.py                      # 1,000,000 tasks, 30 s storm
    uv run python bench/dashboard.py --tasks 50000 --storm 10 --requests 200   # a short check

1. Server-side cost of a page: GET /ui (counts + the newest page of tasks, rendered
   as HTML) against GET /tasks (the same page as JSON), with --tasks tasks loaded
   (bench/scale.py). Requests alternate in rounds on one connection; the server's
   CPU time per request (psutil, the server process and its workers) and the
   median latency of each are printed, and their ratio. Also a filtered page
   (?status=failed&task_type=...) both ways.
2. A page open during a storm: about --rate events a second for --storm seconds
   (every 100 ms a POST /tasks/batch of creates and a PATCH /tasks/batch of progress
   reports, through the API) while a real Chromium holds /ui and /ui/events open.
   The page records, for each task row that appears, how long after the task's
   commit it appeared, its DOM size and how late its own timers ran (a measure
   of how responsive it stays); after the storm, how long until it shows the last
   task written.

Needs the PostgreSQL of BENCH_PG_URL (see bench/apps.py) and Chromium. Raw
output goes to bench/results/dashboard-<date>.txt. Figures are for this machine,
whatever else it is running: compare the two sides of one run, not runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # bench/ is not a package: its folder is on sys.path above
import scale

RESULTS = Path(__file__).parent / "results"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]

# Injected into the page: when each task row appears, how long after its commit (its
# last change, shown in the row), the DOM size, and how late a 100 ms timer fires.
WATCH = """
(() => {
  const seen = new Map();
  const lags = [];
  const record = (row) => {
    const id = row.dataset.taskId;
    if (!id || seen.has(id)) return;
    const time = row.querySelector("time");
    if (!time) return;
    seen.set(id, Date.now());
    lags.push(Date.now() - Date.parse(time.dateTime));
  };
  new MutationObserver((records) => {
    for (const r of records) for (const node of r.addedNodes) if (node.nodeType === 1) {
      if (node.matches("tr[data-task-id]")) record(node);
    }
  }).observe(document.body, { childList: true, subtree: true });
  const delays = [];
  let last = performance.now();
  setInterval(() => { const now = performance.now(); delays.push(now - last - 100); last = now; }, 100);
  const doms = [];
  setInterval(() => doms.push(document.getElementsByTagName("*").length), 1000);
  window.__bench = { lags, delays, doms, seen };
})();
"""


def page_cost(server: apps.Server, paths: dict[str, list[str]], requests: int, rounds: int) -> dict[str, dict]:
    """CPU ms per request of the server and median latency, per kind of request, alternating in rounds.

    Each kind has a list of paths, taken in turn and never reused across rounds when
    it has enough (cold pages: rows the dashboard has never rendered), or one path
    asked again and again (warm: what a live page's refetch asks).
    """
    root = psutil.Process(server.process.pid)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, list[float]] = {name: [] for name in paths}
    for name in ("api /tasks", "page /ui"):  # warm up the process, not the pages
        for _ in range(20):
            status, _, _ = apps.request(server.port, "GET", paths[name][0], conn=conn)
            assert status == 200, (name, status)
    for round_no in range(rounds):
        order = list(paths.items()) if round_no % 2 == 0 else list(paths.items())[::-1]
        for name, candidates in order:
            before = apps.cpu_seconds(apps.process_tree(root.pid))
            for i in range(requests):
                path = candidates[(round_no * requests + i) % len(candidates)]
                start = time.perf_counter()
                status, _, _ = apps.request(server.port, "GET", path, conn=conn)
                wall[name].append((time.perf_counter() - start) * 1000)
                assert status == 200, (path, status)
            cpu[name].append((apps.cpu_seconds(apps.process_tree(root.pid)) - before) * 1000 / requests)
    conn.close()
    return {name: {"cpu_ms": statistics.median(cpu[name]), "p50_ms": statistics.median(wall[name])} for name in paths}


def cursors(server: apps.Server, count: int) -> list[str]:
    """The keyset cursors of the first `count` pages of 100, newest first, as the API's Link headers give them."""
    found, path = [], "/tasks?limit=100"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    while len(found) < count:
        _, headers, _ = apps.request(server.port, "GET", path, conn=conn)
        link = headers.get("link", "")
        if "cursor=" not in link:
            break
        path = link[1 : link.index(">")]
        found.append(path.split("cursor=")[1].split("&")[0])
    conn.close()
    return found


def running_ids(url: str, path: Path, limit: int = 5000) -> None:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT task_id FROM tasks WHERE status = 'running' LIMIT %s", (limit,)).fetchall()
    path.write_text("".join(f"{task_id}\n" for (task_id,) in rows))


def head_position(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


def paced_writes(server: apps.Server, running: list[str], rate: int, seconds: float, done: dict) -> None:
    """About `rate` events a second for `seconds`: every 100 ms one POST /tasks/batch of creates and one
    PATCH /tasks/batch of progress reports on running tasks (half the events each), through the API."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    per_tick = max(1, rate // 20)
    creates = json.dumps({"tasks": [{"task_type": "storm", "params": {"n": i}} for i in range(per_tick)]})
    start, tick, sent, late = time.monotonic(), 0, 0, 0
    while time.monotonic() - start < seconds:
        chosen = running[(tick * per_tick) % len(running) :][:per_tick] or running[:per_tick]
        updates = {"updates": [{"task_id": t, "progress": float((tick + i) % 100)} for i, t in enumerate(chosen)]}
        for method, body in (("POST", creates), ("PATCH", json.dumps(updates))):
            conn.request(method, "/tasks/batch", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status in (200, 201), response.status
            sent += per_tick if method == "POST" else len(chosen)
        tick += 1
        pause = start + tick * 0.1 - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            late += 1
    conn.close()
    done.update(sent=sent, seconds=time.monotonic() - start, late_ticks=late, ticks=tick)


def storm(server: apps.Server, url: str, seconds: int, rate: int, log: Callable[[str], None]) -> dict:
    from playwright.sync_api import sync_playwright

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT task_id::text FROM tasks WHERE status = 'running' LIMIT 20000").fetchall()
    running = [task_id for (task_id,) in rows]
    results: dict = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        tasks_page = browser.new_page()
        tasks_page.goto(f"{server.url}/ui")
        tasks_page.locator("#live[data-state=live]").wait_for()
        tasks_page.evaluate(WATCH)
        events_page = browser.new_page()
        events_page.goto(f"{server.url}/ui/events")
        events_page.locator("#live[data-state=live]").wait_for()
        events_page.evaluate(WATCH.replace('node.matches("tr[data-task-id]")', 'node.matches("tr[data-type]")'))

        first = head_position(url)
        writes: dict = {}
        writer = threading.Thread(target=paced_writes, args=(server, running, rate, seconds, writes))
        started = time.monotonic()
        writer.start()
        # Browser calls stay on this thread (Playwright's sync API is not thread-safe).
        while writer.is_alive():
            tasks_page.wait_for_timeout(500)
        elapsed = time.monotonic() - started
        last = head_position(url)
        with psycopg.connect(url) as conn:
            (newest,) = conn.execute("SELECT task_id FROM tasks ORDER BY id DESC LIMIT 1").fetchone()
        ended = time.monotonic()
        tasks_page.locator(f'tr[data-task-id="{newest}"]').wait_for(timeout=60_000)
        catch_up = time.monotonic() - ended
        for name, page in (("/ui", tasks_page), ("/ui/events", events_page)):
            data = page.evaluate(
                "() => ({lags: __bench.lags, delays: __bench.delays, doms: __bench.doms, shown: __bench.seen.size})"
            )
            lags = sorted(data["lags"]) or [0]
            delays = sorted(data["delays"]) or [0]
            results[name] = {
                "rows_seen": data["shown"],
                "lag_p50_ms": lags[len(lags) // 2],
                "lag_p99_ms": lags[int(len(lags) * 0.99)],
                "lag_max_ms": lags[-1],
                "dom_elements_max": max(data["doms"] or [0]),
                "timer_late_p50_ms": round(delays[len(delays) // 2]),
                "timer_late_p99_ms": round(delays[int(len(delays) * 0.99)]),
                "timer_late_max_ms": round(delays[-1]),
            }
        results["events_per_s"] = round((last - first) / elapsed)
        results["writer"] = writes
        results["catch_up_s_after_storm"] = round(catch_up, 3)
        browser.close()
    log(json.dumps(results, indent=2))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300, help="requests per path per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--storm", type=int, default=30, help="seconds of writes with the pages open (0: none)")
    parser.add_argument("--rate", type=int, default=2000, help="events a second during the storm")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"dashboard-{datetime.now(UTC):%Y-%m-%d-%H%M}.txt"
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    apps.WORK.mkdir(parents=True, exist_ok=True)
    name = apps.DB_PREFIX + "dashboard"
    url = apps.create_database(name)
    try:
        apps.migrate(url)
        started = time.monotonic()
        events = scale.load(url, args.tasks, apps.WORK / "dashboard-spool.tsv")
        log(f"loaded {args.tasks:,} tasks ({events:,} events) in {time.monotonic() - started:.0f} s")
        with apps.running(lambda: apps.start_tasktrail(url, args.workers, name="tasktrail")) as (server,):
            kind = scale.TASK_TYPES[1]
            pages = cursors(server, args.requests * args.rounds)
            paths = {
                "page /ui": ["/ui?limit=100"],
                "api /tasks": ["/tasks?limit=100"],
                "page /ui filtered": [f"/ui?status=failed&task_type={kind}&limit=100"],
                "api /tasks filtered": [f"/tasks?status=failed&task_type={kind}&limit=100"],
                "page /ui cold": [f"/ui?limit=100&cursor={c}" for c in pages],
                "api /tasks cold": [f"/tasks?limit=100&cursor={c}" for c in pages],
            }
            costs = page_cost(server, paths, args.requests, args.rounds)
            log(f"\n{'path (100 tasks a page)':24} {'server CPU ms/req':>18} {'p50 ms':>8}")
            for label, cost in costs.items():
                log(f"{label:24} {cost['cpu_ms']:18.3f} {cost['p50_ms']:8.3f}")
            log(f"(cold: {len(pages)} distinct older pages, each asked once per kind; warm: the same page again)")
            for suffix in ("", " filtered", " cold"):
                page, api = costs[f"page /ui{suffix}"], costs[f"api /tasks{suffix}"]
                log(
                    f"/ui over /tasks{suffix or ' (warm)'}: server CPU x{page['cpu_ms'] / api['cpu_ms']:.2f},"
                    f" latency x{page['p50_ms'] / api['p50_ms']:.2f} (target: within x2)"
                )
            if args.storm:
                log(
                    f"\nstorm: {args.storm} s of about {args.rate} events/s (batches of creates and progress"
                    " reports through the API), /ui and /ui/events open in Chromium"
                )
                storm(server, url, args.storm, args.rate, log)
    finally:
        apps.drop_database(name)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nraw output: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
