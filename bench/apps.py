"""The two apps under test, their databases, and loading data through their HTTP APIs.

Everything here runs on 127.0.0.1 only: the PostgreSQL server given by
BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/postgres) and the
servers this module starts and stops by their process handles.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WORK = BENCH / ".work"
ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Databases this harness creates and drops; nothing else on the server is touched.
DB_PREFIX = "tasktrail_bench_"
BASELINE_PACKAGES = ["fastapi", "sqlalchemy", "psycopg[binary]", "uvicorn"]


def find_baseline() -> Path:
    """The seed app: $BENCH_BASELINE_DIR, else shared/baseline/seed_app beside the repo (or above it)."""
    given = os.environ.get("BENCH_BASELINE_DIR")
    candidates = [Path(given)] if given else []
    candidates += [parent / "shared" / "baseline" / "seed_app" for parent in ROOT.parents]
    for candidate in candidates:
        if (candidate / "app" / "main.py").is_file():
            return candidate.resolve()
    tried = "\n  ".join(str(c) for c in candidates)
    raise SystemExit(f"bench: cannot find the baseline seed app; tried:\n  {tried}\nset BENCH_BASELINE_DIR")


def baseline_venv(log) -> Path:
    """The baseline's own virtual environment under bench/.work, built once; returns its bin/ folder."""
    venv = WORK / "seed-venv"
    marker = venv / ".bench-installed"
    wanted = " ".join(BASELINE_PACKAGES)
    if not (marker.is_file() and marker.read_text() == wanted):
        log(f"building the baseline's venv in {venv} ({wanted}) ...")
        subprocess.run([os.environ.get("BENCH_VENV_PYTHON", "python3"), "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *BASELINE_PACKAGES], check=True)
        marker.write_text(wanted)
    return venv / "bin"


def baseline_versions(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "pip"), "freeze"], capture_output=True, text=True, check=True).stdout
    keep = ("fastapi", "sqlalchemy", "psycopg", "uvicorn", "pydantic", "starlette")
    return " ".join(line for line in out.split() if line.lower().startswith(keep))


# --- CPU time ----------------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (uv, the server, its workers; a postmaster and its backends)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU time the processes have used so far (one that has exited counts 0)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def backends(url: str) -> list[psutil.Process]:
    """The PostgreSQL backends serving the database at `url` now (other than the one asking)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [psutil.Process(pid) for (pid,) in rows]


# --- databases ---------------------------------------------------------------


def db_url(name: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path=f"/{name}"))


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy reads postgresql:// as psycopg2; the baseline's venv has psycopg 3."""
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def drop_database(name: str) -> None:
    assert name.startswith(DB_PREFIX)
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def create_database(name: str) -> str:
    """A fresh, empty database (dropped first if a previous run left it); returns its URL."""
    drop_database(name)
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _made.add(name)
    return db_url(name)


_made: set[str] = set()


def drop_made() -> None:
    """Drop the databases this run made (never another run's: two benchmarks may share a server)."""
    for name in sorted(_made):
        drop_database(name)
    _made.clear()


def checkpoint() -> None:
    """Flush dirty pages now, so a checkpoint does not land inside one side's measurement."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def migrate(url: str) -> None:
    """tasktrail's schema, applied by tasktrail itself."""
    subprocess.run(
        ["uv", "run", "--quiet", "tasktrail", "migrate"],
        cwd=ROOT,
        env=os.environ | {"DATABASE_URL": url},
        check=True,
        capture_output=True,
    )


def verify(url: str) -> tuple[bool, str]:
    """`tasktrail verify` on the database: whether the read model and the counters match the log, and its report."""
    done = subprocess.run(
        ["uv", "run", "--quiet", "tasktrail", "verify"],
        cwd=ROOT,
        env=os.environ | {"DATABASE_URL": url},
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0, (done.stdout + done.stderr).strip()


# --- servers -----------------------------------------------------------------


def free_port() -> int:
    """A free port below the ephemeral range, so no outgoing connection can take it before the server binds."""
    low, _high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()  # noqa: S311 -- a port number, not a secret
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit("bench: no free port found")


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path
    ids: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM to the process group this harness started (the server and its workers)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self.process.returncode in (0, 143, -signal.SIGTERM):
            self.log_path.unlink(missing_ok=True)  # kept only when the server did not stop cleanly


def _start(name: str, command: list[str], cwd: Path, env: dict[str, str], port: int) -> Server:
    log_path = WORK / f"{name}-{port}.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, port, process, log_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: {name} exited on start; see {log_path}:\n{log_path.read_text()[-3000:]}")
        try:
            status, _, _ = request(server.port, "GET", "/health")
            if status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise SystemExit(f"bench: {name} did not answer /health within 90 s; see {log_path}")


def start_tasktrail(
    database_url: str,
    workers: int,
    *,
    name: str = "tasktrail",
    uv_args: tuple[str, ...] = (),
    env: dict | None = None,
    serve_args: tuple[str, ...] = (),
) -> Server:
    """`uv run tasktrail serve` of this checkout; uv_args (e.g. --with uvloop), env and serve_args make variants."""
    port = free_port()
    command = ["uv", "run", "--quiet", *uv_args, "tasktrail", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "warning", *serve_args]  # a later option wins
    return _start(name, command, ROOT, os.environ | {"DATABASE_URL": database_url} | (env or {}), port)


def start_baseline(database_url: str, workers: int, bin_dir: Path, app_dir: Path) -> Server:
    port = free_port()
    command = [str(bin_dir / "uvicorn"), "app.main:app", "--app-dir", str(app_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    env = os.environ | {"DATABASE_URL": sqlalchemy_url(database_url), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VIRTUAL_ENV", None)
    return _start("baseline", command, app_dir, env, port)


@contextmanager
def running(*starters) -> Iterator[list[Server]]:
    servers: list[Server] = []
    try:
        for start in starters:
            servers.append(start())
        yield servers
    finally:
        for server in servers:
            server.stop()


# --- HTTP --------------------------------------------------------------------


# A key every request of the harness sends (bench/wrk/tasks.lua too), for a server that has API keys.
API_KEY_ENV = "BENCH_API_KEY"


def request(port: int, method: str, path: str, body: object = None, conn=None) -> tuple[int, dict, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if key := os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if own:
            conn.close()


CREATE_BODY = {"task_type": "bench", "params": {"file_path": "/data/bench.pdf", "pages": 12}}


def load(server: Server, tasks: int, progressed: float, seed: int = 7) -> None:
    """Create `tasks` tasks and move a share of them to running with some progress, over 8 connections."""
    rng = random.Random(seed)  # noqa: S311 -- load data, not secrets

    def create(chunk: range) -> list[str]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        ids = []
        for n in chunk:
            status, _, body = request(server.port, "POST", "/tasks/", CREATE_BODY | {"params": {"n": n}}, conn)
            assert 200 <= status < 300, (server.name, status, body[:300])
            ids.append(json.loads(body)["task_id"])
        conn.close()
        return ids

    def progress(chunk: list[tuple[str, float]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for task_id, value in chunk:
            status, _, body = request(
                server.port, "PATCH", f"/tasks/{task_id}", {"status": "running", "progress": value}, conn
            )
            assert status == 200, (server.name, status, body[:300])
        conn.close()

    parts = 8
    with ThreadPoolExecutor(parts) as pool:
        server.ids = [i for ids in pool.map(create, [range(k, tasks, parts) for k in range(parts)]) for i in ids]
        server.running = rng.sample(server.ids, round(len(server.ids) * progressed))
        moves = [(task_id, round(rng.uniform(0, 99), 1)) for task_id in server.running]
        list(pool.map(progress, [moves[k::parts] for k in range(parts)]))
    for kind, ids in (("ids", server.ids), ("running", server.running)):
        (WORK / f"{server.name}-{kind}.txt").write_text("\n".join(ids) + "\n")


def ids_file(server: Server, kind: str) -> Path:
    return WORK / f"{server.name}-{kind}.txt"
