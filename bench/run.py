"""tasktrail beside the seed baseline and the PostgreSQL ceiling, on this machine.

    uv run python bench/run.py            # the full run (about 20 minutes)
    uv run python bench/run.py --quick    # a short run to check the harness (about 3 minutes)

1. Side by side: per round, fresh databases for tasktrail and the baseline on
   the same PostgreSQL, both servers started with the same number of worker
   processes, the same tasks loaded through each HTTP API, then each scenario
   driven by wrk (bench/wrk/tasks.lua) at the same connection count, the two
   apps taking turns (the order flips every scenario and round).
2. Ceiling: pgbench running the statement tasktrail sends for one create (made
   from tasktrail's code by `create_script`) at the same concurrency, on a
   database with tasktrail's schema.
3. Scale: tasks COPYed straight into tasktrail's tables (bench/scale.py), then
   the latency of stats, the first list page and a deep keyset page at one
   connection, at the small and the large size.

Medians over rounds are printed per scenario and the raw output is written to
bench/results/<date>-<name>.txt (quick runs: bench/.work/results/).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import msgspec
import psycopg

from tasktrail import eventstore, projections
from tasktrail.domain.events import Recorded, TaskCreated
from tasktrail.domain.task import evolve

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # bench/ is not a package: its folder is on sys.path above
import scale

SCENARIOS = ("get", "list", "stats", "update", "create", "mix")
LUA = apps.BENCH / "wrk" / "tasks.lua"
TARGETS = {  # issue 14's (issue 6's were 8x, 0.2 and 0.35; the scale target is issue 6's)
    "mix_throughput": 12.0,  # tasktrail / baseline requests per second, at least
    "mix_p99": 0.1,  # tasktrail p99 / baseline p99, at most
    "create_ceiling": 0.5,  # tasktrail create rate / pgbench ceiling, at least
    "scale": 2.0,  # large / small latency, at most
}


class Log:
    """Print and keep every line, for the results file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def raw(self, text: str) -> None:
        """Tool output: into the results file, not the terminal."""
        self.lines.extend(text.rstrip("\n").split("\n"))


log = Log()


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


# --- load generators -----------------------------------------------------------


def wrk(url: str, scenario: str, seconds: int, connections: int, files=("", ""), path: str = "") -> dict:
    threads = max(1, min(2, connections))
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s"]
    command += ["-s", str(LUA), url, "--", scenario, str(files[0]), str(files[1]), path]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    log.raw(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
    match = re.search(r"^BENCH (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not match:
        raise SystemExit(f"bench: wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(match[1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = result["non2xx"] + sum(
        result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    sample = re.search(r"^BENCH_SAMPLE (.*)$", done.stdout, re.MULTILINE)
    result["sample"] = sample[1] if sample else ""
    return result


def create_script() -> Path:
    """pgbench's script: the one statement tasktrail sends for a create, as its code builds it.

    Each transaction gives the write document a fresh task id in SQL (task ids
    are unique): that replace() is the only work pgbench does beyond tasktrail's.
    """
    placeholder, at = UUID(int=0), datetime.now(UTC)
    created = TaskCreated(task_type="bench", params={"file_path": "/data/bench.pdf", "n": 1})
    recorded = Recorded(placeholder, 1, 0, at, created)
    changes = [(recorded, None, evolve(None, recorded))]
    write = eventstore.document([recorded], {"request_id": "0" * 32})
    write |= projections.document(changes, projections.INLINE)
    # ": " and ", " as separators: pgbench would take :name for one of its variables.
    document = json.dumps(msgspec.to_builtins(write)).replace("'", "''")
    fresh = f"replace('{document}', '{placeholder}', gen_random_uuid()::text)::jsonb"
    fresh = f"fresh AS MATERIALIZED (SELECT {fresh} AS doc)"
    statement = projections.statement(eventstore.APPEND, projections.INLINE, write)
    statement = statement.replace("%%", "%").replace("%(write)s", "(SELECT doc FROM fresh)")
    script = apps.WORK / "create.sql"
    script.write_text(statement.replace("WITH ", f"WITH {fresh},\n", 1) + ";\n")
    return script


def pgbench(url: str, script: Path, clients: int, seconds: int) -> dict:
    command = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(seconds)]
    command += ["-f", str(script), url]
    # pgbench's sessions find the read models' tables as tasktrail's do, through its versions' search_path.
    search_path = {"PGOPTIONS": f"-c search_path={projections.search_path(projections.INLINE)}"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, env=os.environ | search_path)
    log.raw(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if done.returncode != 0 or not tps:
        raise SystemExit(f"bench: pgbench failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {
        "tps": float(tps[1]),
        "latency_ms": float(latency[1]) if latency else float("nan"),
        "failed": int(failed[1]) if failed else 0,
    }


# --- side by side --------------------------------------------------------------


def side_by_side(args: argparse.Namespace, bin_dir: Path, app_dir: Path) -> tuple[dict, dict]:
    results: dict[str, dict[str, list[dict]]] = {s: {"tasktrail": [], "baseline": []} for s in SCENARIOS}
    ceilings: dict[str, list[dict]] = {"create.sql": []}
    scripts = {"create.sql": create_script()}
    log.raw(f"pgbench create.sql:\n{scripts['create.sql'].read_text()}")
    names = {k: apps.DB_PREFIX + k for k in ("tasktrail", "baseline", "ceiling")}
    for round_no in range(args.rounds):
        log(f"\n== round {round_no + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f}) ==")
        tt_url = apps.create_database(names["tasktrail"])
        base_url = apps.create_database(names["baseline"])
        ceiling_url = apps.create_database(names["ceiling"])
        apps.migrate(ceiling_url)
        starters = (
            lambda url=tt_url: apps.start_tasktrail(url, args.workers),
            lambda url=base_url: apps.start_baseline(url, args.workers, bin_dir, app_dir),
        )
        with apps.running(*starters) as (tt, base):
            for server in (tt, base):
                t0 = time.monotonic()
                apps.load(server, args.tasks, args.progressed)
                log(f"{server.name}: loaded {len(server.ids)} tasks ({len(server.running)} running) "
                    f"through its API in {time.monotonic() - t0:.1f} s")  # fmt: skip
            for server in (tt, base):  # warm up: not recorded
                wrk(server.url, "get", 2, args.connections, (apps.ids_file(server, "ids"), ""))
            for i, scenario in enumerate(SCENARIOS):
                order = (tt, base) if (round_no + i) % 2 == 0 else (base, tt)
                for server in order:
                    apps.checkpoint()
                    files = (apps.ids_file(server, "ids"), apps.ids_file(server, "running"))
                    r = wrk(server.url, scenario, args.duration, args.connections, files)
                    results[scenario][server.name].append(r)
                    flag = f"  !! {r['errors']} errors, e.g. {r['sample']}" if r["errors"] else ""
                    log(f"{scenario:7} {server.name:9} {r['rps']:9.1f} req/s  p50 {ms(r['p50_us']):>8} ms  "
                        f"p99 {ms(r['p99_us']):>8} ms{flag}")  # fmt: skip
                if scenario == "create":
                    for script in ceilings:
                        apps.checkpoint()
                        c = pgbench(ceiling_url, scripts[script], args.connections, args.duration)
                        ceilings[script].append(c)
                        log(f"{'pgbench':7} {script:9} {c['tps']:9.1f} tx/s   avg {c['latency_ms']:8.2f} ms")
        for name in names.values():
            apps.drop_database(name)
    return results, ceilings


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(args: argparse.Namespace, results: dict, ceilings: dict) -> dict:
    log(f"\n== side by side: medians of {args.rounds} rounds, {args.duration} s each, "
        f"{args.connections} connections, {args.workers} server process(es) each ==")  # fmt: skip
    log("throughput x = tasktrail req/s / baseline req/s (higher is better), from the medians;")
    log("p99 ratio    = tasktrail p99 / baseline p99     (lower is better), from the medians;")
    log("paired       = the median of the same ratios taken within each round (the two ran back to back)")
    head = f"{'scenario':8} | {'tasktrail req/s':>15} {'p50 ms':>8} {'p99 ms':>8} | "
    head += f"{'baseline req/s':>14} {'p50 ms':>8} {'p99 ms':>8} | {'throughput x':>12} {'paired':>6} "
    head += f"{'p99 ratio':>9} {'paired':>6} | errors"
    log(head)
    log("-" * len(head))
    summary = {}
    for scenario in SCENARIOS:
        tt, base = results[scenario]["tasktrail"], results[scenario]["baseline"]
        row = {
            side: {k: median(runs, k) for k in ("rps", "p50_us", "p99_us")} | {"errors": sum(r["errors"] for r in runs)}
            for side, runs in (("tasktrail", tt), ("baseline", base))
        }
        row["speedup"] = row["tasktrail"]["rps"] / row["baseline"]["rps"]
        row["p99_ratio"] = row["tasktrail"]["p99_us"] / row["baseline"]["p99_us"]
        row["speedup_paired"] = statistics.median(a["rps"] / b["rps"] for a, b in zip(tt, base, strict=True))
        row["p99_paired"] = statistics.median(a["p99_us"] / b["p99_us"] for a, b in zip(tt, base, strict=True))
        summary[scenario] = row
        errors = f"tasktrail {row['tasktrail']['errors']}, baseline {row['baseline']['errors']}"
        flagged = row["tasktrail"]["errors"] or row["baseline"]["errors"]
        flag = "  !! FLAGGED: non-2xx or socket errors" if flagged else ""
        a, b = row["tasktrail"], row["baseline"]
        log(f"{scenario:8} | {a['rps']:15.1f} {ms(a['p50_us']):>8} {ms(a['p99_us']):>8} | "
            f"{b['rps']:14.1f} {ms(b['p50_us']):>8} {ms(b['p99_us']):>8} | "
            f"{row['speedup']:11.2f}x {row['speedup_paired']:5.2f}x {row['p99_ratio']:9.3f} {row['p99_paired']:6.3f} | "
            f"{errors}{flag}")  # fmt: skip
    log(f"\n== PostgreSQL ceiling: pgbench -M prepared, {args.connections} clients, medians of {args.rounds} ==")
    create_rps = summary["create"]["tasktrail"]["rps"]
    for script, runs in ceilings.items():
        tps = median(runs, "tps")
        paired = statistics.median(
            a["rps"] / c["tps"] for a, c in zip(results["create"]["tasktrail"], runs, strict=True)
        )
        summary[script] = tps
        failed = sum(r["failed"] for r in runs)
        log(f"{script:26} {tps:9.1f} tx/s  avg latency {median(runs, 'latency_ms'):.2f} ms  "
            f"failed {failed}; tasktrail create = {create_rps / tps:.1%} of it (paired: {paired:.1%})")  # fmt: skip
    return summary


# --- scale -----------------------------------------------------------------------


def _cursor_for(server: apps.Server, task_id: int) -> str:
    """A keyset cursor in the format the server's own Link header uses."""
    status, headers, _ = apps.request(server.port, "GET", "/tasks/?limit=1")
    link = headers.get("link") or headers.get("Link") or ""
    match = re.search(r"<([^>]*)>", link)
    assert status == 200, status
    assert match, f"no Link header on a full first page: {headers}"
    given = parse_qs(urlsplit(match[1]).query)["cursor"][0]
    decoded = base64.urlsafe_b64decode(given + "=" * (-len(given) % 4)).decode()
    assert decoded.startswith("id:"), f"unknown cursor format {decoded!r}; update bench/run.py"
    return base64.urlsafe_b64encode(f"id:{task_id}".encode()).decode().rstrip("=")


def _deep_id(url: str, n: int, status: str | None) -> int:
    """The cursor id whose next page is the last full page of the (filtered) list: the deepest one."""
    where, params = ("WHERE status = %(status)s", {"status": status}) if status else ("", {})
    with psycopg.connect(url) as conn:
        count = conn.execute(f"SELECT count(*) FROM tasks {where}", params).fetchone()[0]  # noqa: S608 -- fixed text
        offset = max(0, count - 101)
        row = conn.execute(
            f"SELECT id FROM tasks {where} ORDER BY id DESC OFFSET %(offset)s LIMIT 1",  # noqa: S608 -- fixed text
            params | {"offset": offset},
        ).fetchone()
    return row[0]


# The queries behind the scale test's requests, as tasktrail sends them (projections/stats.py SUMMARY,
# projections/tasks.py LIST), explained with the generic plan that a prepared statement settles on.
EXPLAIN = {
    "stats": (
        "SELECT status, sum(n)::bigint FROM task_counts WHERE $1::text IS NULL OR task_type = $1 GROUP BY status",
        "(NULL)",
    ),
    "first page": ("SELECT * FROM tasks WHERE true ORDER BY id DESC LIMIT $1 OFFSET $2", "(100, 0)"),
    "deep keyset page": (
        "SELECT * FROM tasks WHERE id < $1 ORDER BY id DESC LIMIT $2 OFFSET $3",
        "({deep}, 100, 0)",
    ),
    "first page, pending": (
        "SELECT * FROM tasks WHERE status = $1 ORDER BY id DESC LIMIT $2 OFFSET $3",
        "('pending', 100, 0)",
    ),
    "deep keyset, pending": (
        "SELECT * FROM tasks WHERE status = $1 AND id < $2 ORDER BY id DESC LIMIT $3 OFFSET $4",
        "('pending', {deep_pending}, 100, 0)",
    ),
}


def explain(url: str, label: str, values: dict[str, int]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name, (query, args) in EXPLAIN.items():
            for mode in ("force_custom_plan", "force_generic_plan"):
                conn.execute(f"SET plan_cache_mode = {mode}")
                conn.execute(f"PREPARE q AS {query}")
                plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE q{args.format(**values)}").fetchall()
                conn.execute("DEALLOCATE q")
                log.raw(f"-- {label}: {name}, {mode}: EXPLAIN ANALYZE\n" + "\n".join(r[0] for r in plan))


def scale_test(args: argparse.Namespace) -> dict:
    sizes = {"small": args.small, "large": args.large}
    log(f"\n== scale: {args.small:,} and {args.large:,} tasks COPYed into tasktrail's tables ==")
    urls, deep = {}, {}
    for label, n in sizes.items():
        url = apps.create_database(apps.DB_PREFIX + f"scale_{label}")
        apps.migrate(url)
        t0 = time.monotonic()
        events = scale.load(url, n, apps.WORK / f"spool-{label}.tsv")
        log(f"{label}: {n:,} tasks, {events:,} events loaded with COPY (+ VACUUM ANALYZE) in "
            f"{time.monotonic() - t0:.1f} s")  # fmt: skip
        urls[label] = url
        deep[label] = {"deep": _deep_id(url, n, None), "deep_pending": _deep_id(url, n, "pending")}
        if args.verify_scale:
            log(f"{label}: tasktrail verify: {apps.verify(url)[1]}")
    starters = [lambda label=label: apps.start_tasktrail(urls[label], args.workers) for label in sizes]
    timings: dict[str, dict[str, list[dict]]] = {}
    with apps.running(*starters) as servers:
        by_size = dict(zip(sizes, servers, strict=True))
        paths = {}
        for label, server in by_size.items():
            cursor = _cursor_for(server, deep[label]["deep"])
            pending_cursor = _cursor_for(server, deep[label]["deep_pending"])
            skip = sizes[label] - 100
            paths[label] = {
                "stats": "/tasks/stats/summary",
                "first page": "/tasks/?limit=100",
                "deep keyset page": f"/tasks/?limit=100&cursor={cursor}",
                "first page, pending": "/tasks/?status=pending&limit=100",
                "deep keyset, pending": f"/tasks/?status=pending&limit=100&cursor={pending_cursor}",
                "deep offset page (info)": f"/tasks/?limit=100&skip={skip}",
            }
            for name, path in paths[label].items():
                status, _, body = apps.request(server.port, "GET", path)
                assert status == 200, (label, path, status, body[:300])
                if "page" in name or "pending" in name:
                    assert len(json.loads(body)) == 100, (label, name, len(json.loads(body)))
        for round_no in range(args.scale_rounds):
            for i, name in enumerate(paths["small"]):
                order = list(by_size) if (round_no + i) % 2 == 0 else list(reversed(by_size))
                for label in order:
                    r = wrk(by_size[label].url, "path", args.scale_duration, 1, path=paths[label][name])
                    timings.setdefault(name, {}).setdefault(label, []).append(r)
                    if r["errors"]:
                        log(f"!! {label} {name}: {r['errors']} errors, e.g. {r['sample']}")
    for label, url in urls.items():
        explain(url, label, deep[label])
        apps.drop_database(apps.DB_PREFIX + f"scale_{label}")

    log(f"latency at 1 connection, medians of {args.scale_rounds} x {args.scale_duration} s; "
        "ratio = large p50 / small p50 (lower is better)")  # fmt: skip
    head = f"{'request':24} | {'small p50 ms':>12} {'p99 ms':>8} | {'large p50 ms':>12} {'p99 ms':>8} | {'ratio':>6}"
    log(head)
    log("-" * len(head))
    summary = {}
    for name, by_label in timings.items():
        s = {label: {k: median(runs, k) for k in ("p50_us", "p99_us")} for label, runs in by_label.items()}
        ratio = s["large"]["p50_us"] / s["small"]["p50_us"]
        summary[name] = s | {"ratio": ratio}
        log(f"{name:24} | {ms(s['small']['p50_us']):>12} {ms(s['small']['p99_us']):>8} | "
            f"{ms(s['large']['p50_us']):>12} {ms(s['large']['p99_us']):>8} | {ratio:6.2f}")  # fmt: skip
    return summary


# --- report -----------------------------------------------------------------------


def targets(summary: dict, scales: dict) -> None:
    log("\n== targets (issues 14 and 6) ==")
    checks = []
    if summary:
        mix = summary["mix"]
        checks += [
            ("mixed throughput, tasktrail / baseline", mix["speedup"], ">=", TARGETS["mix_throughput"], "x"),
            ("mixed p99, tasktrail / baseline", mix["p99_ratio"], "<=", TARGETS["mix_p99"], ""),
            (
                "create rate / pgbench ceiling",
                summary["create"]["tasktrail"]["rps"] / summary["create.sql"],
                ">=",
                TARGETS["create_ceiling"],
                "",
            ),
        ]
    for name in ("stats", "deep keyset page"):
        if name in scales:
            checks.append((f"{name} latency, large / small", scales[name]["ratio"], "<=", TARGETS["scale"], "x"))
    for label, value, op, target, unit in checks:
        ok = value >= target if op == ">=" else value <= target
        log(f"{label:40} {value:8.3f}{unit:1}  target {op} {target}{unit}  {'met' if ok else 'NOT MET'}")


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    gib = int(mem.split()[1]) / 1024 / 1024
    return f"{os.cpu_count()} cores ({cpu}), {gib:.0f} GiB, {platform.system()} {platform.release()}"


def header(args: argparse.Namespace, baseline_packages: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=apps.ROOT, capture_output=True, text=True)
    with psycopg.connect(apps.ADMIN_URL) as conn:
        pg = conn.execute("SELECT version()").fetchone()[0].split(" on ")[0]
        settings = conn.execute(
            "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ' ' ORDER BY name) FROM pg_settings "
            "WHERE name IN ('shared_buffers', 'synchronous_commit', 'fsync', 'max_connections', 'work_mem', "
            "'wal_buffers', 'commit_delay', 'max_wal_size')"
        ).fetchone()[0]
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    log(f"tasktrail benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, tasktrail commit {commit.stdout.strip()}")
    log(f"machine: {machine()}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    log(f"PostgreSQL: {pg} at {apps.ADMIN_URL.rsplit('@', 1)[-1]}; {settings}")
    pgbench_version = subprocess.run(["pgbench", "--version"], capture_output=True, text=True).stdout.strip()
    log(f"tools: {wrk_version.strip()}; {pgbench_version}")
    log(f"baseline venv: {baseline_packages}")
    log(f"settings: {vars(args)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs and small data, to check the harness")
    p.add_argument("--name", help="results file name part (default: full, or quick)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 5; quick 2)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 10; quick 3)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="server processes per app (default 1)")
    p.add_argument("--tasks", type=int, help="tasks loaded through each API (default 2000; quick 300)")
    p.add_argument("--progressed", type=float, default=0.5, help="share of them moved to running (default 0.5)")
    p.add_argument("--small", type=int, default=1000, help="small size for the scale test (default 1000)")
    p.add_argument("--large", type=int, help="large size for the scale test (default 1000000; quick 20000)")
    p.add_argument("--scale-rounds", type=int, help="alternating rounds of the scale test (default 5; quick 1)")
    p.add_argument("--scale-duration", type=int, help="seconds per scale measurement (default 3; quick 2)")
    p.add_argument("--verify-scale", action="store_true", help="run tasktrail verify on the COPYed data")
    p.add_argument("--skip-side-by-side", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    args = p.parse_args()
    quick = args.quick
    defaults = {
        "rounds": 2 if quick else 5,
        "duration": 3 if quick else 10,
        "tasks": 300 if quick else 2000,
        "large": 20_000 if quick else 1_000_000,
        "scale_rounds": 1 if quick else 5,
        "scale_duration": 2 if quick else 3,
        "name": "quick" if quick else "full",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for tool in ("wrk", "pgbench"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise SystemExit(f"bench: {tool} is not on PATH (apt-get install {tool})")

    apps.WORK.mkdir(parents=True, exist_ok=True)
    bin_dir = apps.baseline_venv(log)
    app_dir = apps.find_baseline()
    header(args, apps.baseline_versions(bin_dir))
    started = time.monotonic()
    summary, scales = {}, {}
    try:
        if not args.skip_side_by_side:
            results, ceilings = side_by_side(args, bin_dir, app_dir)
            summary = summarise(args, results, ceilings)
        if not args.skip_scale:
            scales = scale_test(args)
        targets(summary, scales)
        log(f"\ndone in {time.monotonic() - started:.0f} s; load average at end "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    finally:
        apps.drop_made()
        out_dir = apps.BENCH / "results" if not quick or args.name != "quick" else apps.WORK / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{datetime.now(UTC):%Y-%m-%d}-{args.name}"
        out = out_dir / f"{stem}.txt"
        n = 2
        while out.exists():
            out, n = out_dir / f"{stem}-{n}.txt", n + 1
        out.write_text("\n".join(log.lines) + "\n")
        print(f"raw output: {out.relative_to(apps.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
