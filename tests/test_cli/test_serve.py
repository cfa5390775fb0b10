"""`tasktrail serve` and `migrate` as a user runs them, in real processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from tasktrail import db, migrations
from tests.conftest import ROOT, Server, embedded_data_dir, free_port

PYTHON = (sys.executable, "-m", "tasktrail")
UV_RUN = (shutil.which("uv") or "uv", "run", "--no-sync", "tasktrail")  # uv forwards signals to its child


def test_serve_with_no_database_configured_uses_embedded_postgres(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    with embedded_data_dir() as data_dir:
        # A path with a space and a quote ("My Projects"): PostgreSQL's start passes folders through a shell.
        serve_twice(env, data_dir / "my project's data", tmp_path)


def test_serve_on_a_port_in_use_says_so_before_it_touches_the_database() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = os.environ | {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}  # never reached
        done = subprocess.run(
            [*PYTHON, "serve", "--port", str(port)], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 1
    assert f"cannot serve on 127.0.0.1 port {port}: it is in use by another process" in done.stderr
    assert "database" not in done.stderr


def test_serve_on_a_host_that_is_not_this_machine_s_says_which_option_to_change(tmp_path: Path) -> None:
    # Audit: a host no resolver knows was "Name or service not known; choose another with --port".
    keys = tmp_path / "keys.txt"
    keys.write_text(f"ops:read:{'1' * 64}\n")
    env = os.environ | {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}  # never reached
    for host in ("999.1.1.1", "192.0.2.1"):  # not an address; an address of no interface here
        done = subprocess.run(
            [*PYTHON, "serve", "--host", host, "--port", "18999", "--api-keys", str(keys)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1
        assert f"cannot serve on {host} port 18999" in done.stderr
        assert "choose another with --host" in done.stderr


def test_serve_refuses_a_data_folder_a_shell_would_misread_and_says_why(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [*PYTHON, "--data-dir", str(tmp_path / "$HOME"), "serve"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "cannot keep its data in" in done.stderr
    assert "choose another --data-dir" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "$HOME").exists()  # refused before anything is made there
    # An empty folder (a variable that expanded to nothing) is a mistake, not the current folder.
    done = subprocess.run([*PYTHON, "--data-dir", "", "verify"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "--data-dir: empty" in done.stderr
    # A file where the folder would be, or above it (audit: "/path: File exists", naming no setting).
    (tmp_path / "a-file").write_text("")
    for folder, why in ((tmp_path / "a-file", "it is a file"), (tmp_path / "a-file" / "below", "not a directory")):
        placed = env | {"TASKTRAIL_DATA_DIR": str(folder)}
        done = subprocess.run([*PYTHON, "verify"], env=placed, capture_output=True, text=True, check=False)
        assert done.returncode == 1, done.stderr
        assert f"cannot keep its data in {str(folder)!r} ({why}): choose another --data-dir" in done.stderr
        assert "Traceback" not in done.stderr


def serve_twice(env: dict[str, str], data_dir: Path, tmp_path: Path) -> None:
    """Start, write, Ctrl-C; start again on the same data and find the write."""
    first = Server(env, "--data-dir", str(data_dir), log_dir=tmp_path)
    created = httpx.post(f"{first.url}/tasks/", json={"task_type": "embedded"}).json()
    assert (data_dir / "pgdata" / "PG_VERSION").exists()
    assert (data_dir / "pgdata" / "postmaster.pid").exists()
    assert first.stop(signal.SIGINT) == 0  # Ctrl-C
    assert not (data_dir / "pgdata" / "postmaster.pid").exists(), "the embedded PostgreSQL was left running"
    assert f"embedded PostgreSQL in {data_dir.absolute() / 'pgdata'}" in first.log()  # the whole path

    second = Server(env, "--data-dir", str(data_dir), log_dir=tmp_path)
    try:
        again = httpx.get(f"{second.url}/tasks/{created['task_id']}")
        assert again.status_code == 200
        assert again.json() == created
    finally:
        assert second.stop(signal.SIGINT) == 0
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()


def test_serve_with_two_workers(database_url: str, tmp_path: Path) -> None:
    server = Server(os.environ | {"DATABASE_URL": database_url}, log_dir=tmp_path, serve_args=("--workers", "2"))
    try:
        workers = psutil.Process(server.process.pid).children()
        assert len([w for w in workers if "spawn_main" in " ".join(w.cmdline())]) == 2
        with httpx.Client(base_url=server.url) as client:
            made = [client.post("/tasks/", json={"task_type": "w"}).json() for _ in range(10)]
            assert all(client.get(f"/tasks/{t['task_id']}").status_code == 200 for t in made)
            assert client.get("/tasks/stats/summary").json()["total"] == 10
            # With no keys, only requests addressed to this machine: a name of a web page's own that
            # resolves to 127.0.0.1 (DNS rebinding) must not reach the open service.
            for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", ""):
                refused = client.post("/tasks/", json={"task_type": "w"}, headers={"Host": host})
                assert refused.status_code == 403, host
                assert refused.headers["content-type"] == "application/problem+json"
                assert "addressed to this machine" in refused.json()["detail"]
            # Nor learn which routes exist (audit: an unknown path was 404, a method the path lacks 405).
            for method, path in (("GET", "/nonexistent"), ("PUT", "/tasks/"), ("GET", "/ui/nowhere")):
                refused = client.request(method, path, headers={"Host": "evil.example"})
                assert (refused.status_code, "addressed to this machine" in refused.text) == (403, True), path
            for host in (f"localhost:{server.port}", "LOCALHOST", "[::1]:80", "127.0.0.2", "app.localhost"):
                assert client.get("/tasks/stats/summary", headers={"Host": host}).status_code == 200, host
            assert client.get("/tasks/stats/summary").json()["total"] == 10
    finally:
        assert server.stop() == 0


def test_the_workers_of_a_killed_serve_stop_with_it(database_url: str, tmp_path: Path) -> None:
    """Orphaned, a worker would go on answering on the port with no serve to stop it, and keep the port."""
    server = Server(os.environ | {"DATABASE_URL": database_url}, log_dir=tmp_path, serve_args=("--workers", "2"))
    workers = [w for w in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(w.cmdline())]
    assert len(workers) == 2
    try:
        server.process.kill()
        server.process.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert alive == []
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    with socket.create_server(("127.0.0.1", server.port)):  # the port is free again
        pass


def test_with_no_keys_a_write_another_site_sends_without_a_preflight_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    """A page of another site the operator opens must not clean the open service up with a form's POST."""
    server = Server(os.environ | {"DATABASE_URL": database_url}, log_dir=tmp_path)
    try:
        with httpx.Client(base_url=server.url) as client:
            task = client.post("/tasks/", json={"task_type": "victim"}).json()
            assert client.patch(f"/tasks/{task['task_id']}", json={"status": "completed"}).status_code == 200
            for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example"):
                for kind in (
                    "application/x-www-form-urlencoded",
                    "text/plain; charset=utf-8",
                    "multipart/form-data; boundary=x",
                    None,
                ):
                    headers = {"Origin": origin} | ({} if kind is None else {"Content-Type": kind})
                    sent = client.post("/tasks/cleanup?days=0", content=b"x=1" if kind else b"", headers=headers)
                    assert sent.status_code == 403, (origin, kind)
                    assert sent.headers["content-type"] == "application/problem+json"
                    assert "needs no CORS preflight" in sent.json()["detail"]
            assert client.get(f"/tasks/{task['task_id']}").json()["status"] == "completed"  # not cleaned up
            # What CORS governs stays open to any page (the seed's front end): reads, and preflighted writes.
            other = {"Origin": "https://front.example"}
            preflight = client.options(
                "/tasks/",
                headers=other
                | {"Access-Control-Request-Method": "PATCH", "Access-Control-Request-Headers": "if-match"},
            )
            assert (preflight.status_code, preflight.headers["access-control-allow-origin"]) == (204, "*")
            created = client.post("/tasks/", json={"task_type": "front"}, headers=other)
            assert created.status_code == 201
            assert "Tasktrail-Read-After" in created.headers["access-control-expose-headers"]
            assert client.get(f"/tasks/{task['task_id']}", headers=other).status_code == 200
            # A page of this machine may send a form's POST too.
            local = {"Origin": f"http://localhost:{server.port}", "Content-Type": "application/x-www-form-urlencoded"}
            assert client.post("/tasks/cleanup?days=0", headers=local).json() == {"deleted": 1}
    finally:
        assert server.stop() == 0


def test_processes_starting_at_once_each_find_the_database_made(server_url: str) -> None:
    """Two `serve`s started together on a fresh data folder both make sure of the database: neither may fail."""
    name = f"tasktrail_race_{os.getpid()}"
    start = threading.Barrier(4)

    def ensure() -> None:
        start.wait()
        db.ensure_database(server_url, name)

    try:
        for _ in range(3):
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name}")
            with ThreadPoolExecutor(4) as pool:
                for made in [pool.submit(ensure) for _ in range(4)]:
                    made.result()
            with psycopg.connect(server_url, autocommit=True) as conn:
                assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone() == (1,)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")


def test_migrate_command_is_safe_to_repeat(database_url: str) -> None:
    env = os.environ | {"DATABASE_URL": database_url}
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "tasktrail", "migrate"], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "up to date"  # the template was migrated already
    with psycopg.connect(database_url) as conn:
        applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert applied == (len(migrations.available()),)


def test_serve_analyses_a_large_log_that_was_never_analysed_and_never_a_small_one(
    database_url: str, tmp_path: Path
) -> None:
    # Autovacuum off (or not come round since a bulk load): the events table has no statistics. serve
    # analyses it once it is large; statistics of a few rows would stay, and mislead every later plan.
    reltuples = "SELECT reltuples FROM pg_class WHERE oid = 'events'::regclass"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE events SET (autovacuum_enabled = false)")
    env = os.environ | {"DATABASE_URL": database_url}
    server = Server(env, log_dir=tmp_path)
    try:
        for _ in range(3):
            assert httpx.post(f"{server.url}/tasks/", json={"task_type": "analyse"}).status_code == 201
    finally:
        server.stop()
    server = Server(env, log_dir=tmp_path)  # three events: left alone
    try:
        tasks = [{"task_type": "analyse"}] * 1000
        for _ in range(migrations.ANALYSE_FROM // 1000):
            assert httpx.post(f"{server.url}/tasks/batch", json={"tasks": tasks}, timeout=30).status_code == 201
    finally:
        server.stop()
    assert "analysed the events table" not in server.log()
    with psycopg.connect(database_url) as conn:
        assert conn.execute(reltuples).fetchone() == (-1,)

    server = Server(env, log_dir=tmp_path)
    server.stop()
    assert "analysed the events table" in server.log()
    with psycopg.connect(database_url) as conn:
        assert conn.execute(reltuples).fetchone() == (migrations.ANALYSE_FROM + 3,)
        assert conn.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'events'").fetchone()[0] > 0

    server = Server(env, log_dir=tmp_path)
    server.stop()
    assert "analysed the events table" not in server.log()


def test_help_names_every_command() -> None:
    done = subprocess.run([sys.executable, "-m", "tasktrail", "--help"], capture_output=True, text=True, check=True)
    for word in ("serve", "migrate", "DATABASE_URL"):
        assert word in done.stdout


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["verify"], "Fold the whole log"),
        (["migrate"], "Apply pending migrations"),
        (["projections", "status"], "Every version of each read model"),
        (["projections", "prune"], "Drop the tables of versions no process uses"),
        (["keys", "add"], "Make a random key"),
    ],
)
def test_each_commands_help_says_what_it_does(
    capsys: pytest.CaptureFixture[str], command: list[str], says: str
) -> None:
    from tasktrail.cli import parser

    with pytest.raises(SystemExit):
        parser().parse_args([*command, "--help"])
    assert says in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "args", [["serve", "--port", "abc"], ["serve", "--workers", "two"], ["projections", "prune", "tasks", "x"]]
)
def test_a_number_that_is_not_one_is_refused_in_words(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    from tasktrail.cli import parser

    with pytest.raises(SystemExit):
        parser().parse_args(args)
    assert f"{args[-1]!r} is not a whole number" in capsys.readouterr().err


# --- stopping the embedded PostgreSQL -------------------------------------------------------------
# One data folder for the tests below (initdb once): each must leave its server stopped for the next.


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    with embedded_data_dir() as path:
        yield path
        info = path / "pgdata" / "postmaster.pid"
        if info.exists():  # a failed test left it running: stop it, as a user would
            subprocess.run([*PYTHON, "--data-dir", str(path), "migrate"], check=False, capture_output=True)


def embedded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}


def postmaster(data_dir: Path) -> int:
    """The running embedded server's process id, from its postmaster.pid."""
    return int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])


def handles(data_dir: Path) -> list[int]:
    """pgserver's list of the processes that hold the embedded server."""
    path = data_dir / "pgdata" / db.HANDLES
    return json.loads(path.read_text()) if path.exists() else []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_stopped(data_dir: Path, pid: int) -> None:
    assert gone(pid), f"the embedded PostgreSQL (pid {pid}) was left running"
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    assert handles(data_dir) == []


@pytest.mark.parametrize(
    ("launcher", "sig"),
    # Ctrl-C on `python -m tasktrail serve` is in the tests above and below.
    [(UV_RUN, signal.SIGTERM), (UV_RUN, signal.SIGINT), (PYTHON, signal.SIGTERM)],
    ids=["uv run, SIGTERM", "uv run, SIGINT", "python -m, SIGTERM"],
)
def test_any_stop_stops_the_embedded_postgres(data_dir: Path, tmp_path: Path, launcher: tuple, sig: int) -> None:
    server = Server(embedded_env(), "--data-dir", str(data_dir), log_dir=tmp_path, launcher=launcher)
    try:
        created = httpx.post(f"{server.url}/tasks/", json={"task_type": "stopped"})
        assert created.status_code == 201
        pid = postmaster(data_dir)
        assert handles(data_dir) != []
    finally:
        code = server.stop(sig)  # to uv itself under `uv run`: it passes the signal on
    assert code == 0, server.log()
    assert_stopped(data_dir, pid)
    assert "Traceback" not in server.log(), server.log()


def test_ctrl_c_in_a_terminal_under_uv_run_stops_once_and_cleanly(data_dir: Path, tmp_path: Path) -> None:
    """Audit: a terminal's Ctrl-C reaches uv and serve (its process group), and uv passes it on: serve heard it
    twice, quit at once (a request in flight was cut off, 503), and the second broke off the exit hooks that
    stop PostgreSQL (a traceback). One Ctrl-C is one graceful stop."""
    port = free_port()
    log = (tmp_path / "terminal.log").open("wb")
    command = [*UV_RUN, "--data-dir", str(data_dir), "serve", "--port", str(port)]
    # Its own session: the test signals that process group as a terminal would, and no other.
    process = subprocess.Popen(
        command, env=embedded_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _answers(url):
            assert process.poll() is None, (tmp_path / "terminal.log").read_text()
            assert time.monotonic() < deadline, "serve did not answer in 60 s"
            time.sleep(0.1)
        pid = postmaster(data_dir)
        with psycopg.connect(_embedded_url(data_dir), autocommit=True) as locker:
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE events IN EXCLUSIVE MODE")  # a create waits: in flight at the Ctrl-C
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(httpx.post, f"{url}/tasks/", json={"task_type": "ctrl-c"}, timeout=30)
                time.sleep(0.5)
                os.killpg(process.pid, signal.SIGINT)
                time.sleep(1.5)  # past uv's copy of the signal
                locker.execute("ROLLBACK")
                assert in_flight.result().status_code == 201
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "terminal.log").read_text()
    assert_stopped(data_dir, pid)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _embedded_url(data_dir: Path) -> str:
    """A connection to the running embedded server, through its socket (from its postmaster.pid)."""
    lines = (data_dir / "pgdata" / "postmaster.pid").read_text().splitlines()
    return f"postgresql://postgres@/{db.EMBEDDED_DATABASE}?host={lines[4]}&port={lines[3]}"


def test_a_postmaster_pid_left_behind_naming_another_process_is_set_aside(data_dir: Path, tmp_path: Path) -> None:
    """Audit: after a restart of the machine (or a SIGKILL of PostgreSQL), postmaster.pid names a process id
    that another process may have taken since: pgserver took it for its server, serve failed to connect,
    and at exit pgserver killed that process."""
    first = Server(embedded_env(), "--data-dir", str(data_dir), log_dir=tmp_path)
    left_behind = (data_dir / "pgdata" / "postmaster.pid").read_text().split("\n")
    pid = postmaster(data_dir)
    assert first.stop(signal.SIGINT) == 0
    assert_stopped(data_dir, pid)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # now holds the id, say
    try:
        # Left behind an hour ago, say: the id's process now started at another time than the file says.
        started = str(int(left_behind[2]) - 3600)
        written = [str(bystander.pid), left_behind[1], started, *left_behind[3:]]
        (data_dir / "pgdata" / "postmaster.pid").write_text("\n".join(written))
        again = Server(embedded_env(), "--data-dir", str(data_dir), log_dir=tmp_path)
        pid = postmaster(data_dir)
        assert pid != bystander.pid
        assert httpx.get(f"{again.url}/tasks/").status_code == 200
        assert again.stop(signal.SIGINT) == 0
        assert_stopped(data_dir, pid)
        assert bystander.poll() is None  # left alone
    finally:
        bystander.kill()
        bystander.wait()


def test_a_killed_serve_does_not_keep_the_next_from_stopping_postgres(data_dir: Path, tmp_path: Path) -> None:
    killed = Server(embedded_env(), "--data-dir", str(data_dir), log_dir=tmp_path)
    task = httpx.post(f"{killed.url}/tasks/", json={"task_type": "survivor"}).json()
    pid = postmaster(data_dir)
    assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
    # What a SIGKILL leaves: the server running, and the dead process's id in pgserver's list.
    assert not gone(pid)
    assert handles(data_dir) == [killed.process.pid]

    again = Server(embedded_env(), "--data-dir", str(data_dir), log_dir=tmp_path)
    try:
        assert postmaster(data_dir) == pid  # it took over the running server
        assert handles(data_dir) == [again.process.pid]
        assert httpx.get(f"{again.url}/tasks/{task['task_id']}").json() == task
    finally:
        assert again.stop(signal.SIGINT) == 0
    assert_stopped(data_dir, pid)


def test_a_stop_while_the_embedded_postgres_starts_still_stops_it(data_dir: Path, tmp_path: Path) -> None:
    log = (tmp_path / "early.log").open("wb")
    command = [*PYTHON, "--data-dir", str(data_dir), "serve", "--port", "0"]
    process = subprocess.Popen(command, env=embedded_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        info = data_dir / "pgdata" / "postmaster.pid"
        deadline = time.monotonic() + 30
        # PostgreSQL makes the file, then writes its pid in it: wait for the pid, not only the file. A
        # negative one is initdb's standalone backend (seen once, as -6441), before the server's.
        while not (info.exists() and info.read_text().strip()[:1].isdigit()) and process.poll() is None:
            assert time.monotonic() < deadline, "the embedded PostgreSQL never started"
            time.sleep(0.01)
        pid = postmaster(data_dir)
        process.send_signal(signal.SIGTERM)  # during the start, or just after it: either way it must stop
        assert process.wait(timeout=30) in (0, 130)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert_stopped(data_dir, pid)


def test_the_data_folder_may_be_named_after_the_command_too_and_serve_help_says_where_the_database_is(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Finding: `serve --data-dir X` was refused (unrecognized arguments); serve --help named no database."""
    from tasktrail.cli import parser

    assert parser().parse_args(["serve", "--data-dir", "/srv/tt"]).data_dir == Path("/srv/tt")
    assert parser().parse_args(["--data-dir", "/srv/a", "verify", "--data-dir", "/srv/b"]).data_dir == Path("/srv/b")
    assert parser().parse_args(["--data-dir", "/srv/a", "projections", "rebuild"]).data_dir == Path("/srv/a")
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "DATABASE_URL" in shown
    assert "embedded PostgreSQL" in shown
    assert "least severe" in shown  # --log-level's help
