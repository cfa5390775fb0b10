"""`tasktrail projections status | rebuild | prune`, and `serve` building what is missing, in real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg

from tasktrail import db, migrations
from tasktrail.projections import tasks
from tests.conftest import Server, fresh_database


def tasktrail(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "tasktrail", *args], env=env, capture_output=True, text=True, check=False, timeout=120
    )


def connect(database_url: str) -> psycopg.Connection:
    return psycopg.connect(database_url, **db.connect_kwargs())


def test_status_then_rebuild_then_status(live_server: str, database_url: str) -> None:
    with httpx.Client(base_url=live_server) as client:
        for i in range(5):
            task = client.post("/tasks/", json={"task_type": f"t{i % 2}"}).json()
            client.patch(f"/tasks/{task['task_id']}", json={"status": "running", "progress": 10 * i})

    before = tasktrail(database_url, "projections", "status")
    assert before.returncode == 0, before.stderr
    lines = before.stdout.splitlines()
    assert lines[0].split() == ["projection", "version", "state", "behind", "processes", "since"]
    # Both of this code's versions, live, nothing behind, used by the one server process.
    assert lines[1].split()[:5] == ["stats", "1", "live", "0", "1"]
    assert lines[2].split()[:5] == ["tasks", str(tasks.VERSION), "live", "0", "1"]
    assert "(this code)" in lines[2]
    assert lines[3] == "log head: position 10"

    done = tasktrail(database_url, "projections", "rebuild")
    assert done.returncode == 0, done.stderr
    assert "rebuilt tasks, stats from 10 events in" in done.stderr
    assert f"tasks version {tasks.VERSION}, stats version 1" in done.stderr
    assert "replay" in done.stderr  # the progress bar's first step

    with httpx.Client(base_url=live_server) as client:  # the running server goes on, on the new tables
        assert client.get("/tasks/stats/summary").json()["running"] == 5
        assert client.post("/tasks/", json={"task_type": "after"}).status_code == 201

    after = tasktrail(database_url, "projections", "status")
    assert after.stdout.splitlines()[3] == "log head: position 11"
    assert tasktrail(database_url, "projections", "rebuild", "nope").returncode == 2


def test_serve_builds_a_version_that_has_no_tables_and_prune_drops_only_unused_ones(
    database_url: str, tmp_path: Path
) -> None:
    env = os.environ | {"DATABASE_URL": database_url}
    server = Server(env, log_dir=tmp_path)
    try:
        with httpx.Client(base_url=server.url) as client:
            for i in range(3):
                assert client.post("/tasks/", json={"task_type": f"t{i}"}).status_code == 201
        refused = tasktrail(database_url, "projections", "prune", "stats", "1")
        assert refused.returncode == 1
        assert "stats version 1 is in use by a running process" in refused.stderr
        assert tasktrail(database_url, "projections", "prune").stdout == (
            "nothing to prune: every version left is this code's, or the last live one of its read model\n"
        )
    finally:
        server.stop()

    pruned = tasktrail(database_url, "projections", "prune", "stats", "1")
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned stats version 1: dropped schema rm_stats_v1" in pruned.stdout
    status = tasktrail(database_url, "projections", "status").stdout
    assert "stats              1  retired" in status

    server = Server(env, log_dir=tmp_path)  # this release again: it builds stats version 1 anew
    try:
        assert httpx.get(f"{server.url}/tasks/stats/summary").json()["pending"] == 3
        assert httpx.post(f"{server.url}/tasks/", json={"task_type": "t"}).status_code == 201
    finally:
        server.stop()
    assert "rebuilt stats from 3 events" in server.log()
    with connect(database_url) as conn:
        assert conn.execute("SELECT state FROM projection_versions WHERE name = 'stats'").fetchone() == ("live",)
    checked = tasktrail(database_url, "verify")
    assert checked.returncode == 0, checked.stdout


def test_ctrl_c_leaves_the_live_read_model_alone_and_the_next_rebuild_starts_over(
    database_url: str, tmp_path: Path
) -> None:
    env = os.environ | {"DATABASE_URL": database_url}
    server = Server(env, log_dir=tmp_path)
    try:
        with httpx.Client(base_url=server.url) as client:
            for i in range(4):
                client.post("/tasks/", json={"task_type": f"t{i}"})
    finally:
        server.stop()
    with connect(database_url) as conn:
        before = conn.execute("SELECT * FROM tasks ORDER BY id").fetchall()
        registry = conn.execute("SELECT name, version, state, since FROM projection_versions ORDER BY 1, 2").fetchall()

    with psycopg.connect(database_url, **db.connect_kwargs() | {"autocommit": False}) as reader:
        reader.execute("SELECT count(*) FROM tasks")  # holds the swap off, so Ctrl-C comes mid-rebuild
        rebuilding = subprocess.Popen(
            [sys.executable, "-m", "tasktrail", "projections", "rebuild"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            # As a terminal's Ctrl-C finds it: a suite started in the background (`nohup pytest &`) passes
            # SIGINT on ignored, and a process that starts with it ignored never hears it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        wait_for_the_swap(database_url)
        signals = signal_masks(rebuilding.pid)  # what the process does with signals, should SIGINT go unheeded
        rebuilding.send_signal(signal.SIGINT)
        _, stderr = rebuilding.communicate(timeout=60)
    assert rebuilding.returncode == 130, f"{stderr}\n{signals}"
    assert "interrupted; the live read models are untouched" in stderr

    with connect(database_url) as conn:
        assert conn.execute("SELECT * FROM tasks ORDER BY id").fetchall() == before
        assert (
            conn.execute("SELECT name, version, state, since FROM projection_versions ORDER BY 1, 2").fetchall()
            == registry
        )
    assert "left from an interrupted rebuild" in tasktrail(database_url, "projections", "status").stdout

    again = tasktrail(database_url, "projections", "rebuild")
    assert again.returncode == 0, again.stderr
    status = tasktrail(database_url, "projections", "status").stdout
    assert "interrupted" not in status
    with connect(database_url) as conn:
        assert conn.execute("SELECT * FROM tasks ORDER BY id").fetchall() == before


def signal_masks(pid: int) -> str:
    """The Sig* lines of /proc/PID/status: which signals the process blocks, ignores and catches."""
    with open(f"/proc/{pid}/status") as status:
        return " ".join(line.strip() for line in status if line.startswith("Sig"))


def wait_for_the_swap(database_url: str) -> None:
    """Until a swap waits to drop the live tasks table."""
    waiting = """
        SELECT count(*) FROM pg_locks JOIN pg_database ON pg_database.oid = pg_locks.database
        WHERE datname = current_database() AND mode = 'AccessExclusiveLock' AND NOT granted
    """
    with psycopg.connect(database_url, autocommit=True) as watcher:
        for _ in range(1200):
            if watcher.execute(waiting).fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the rebuild never reached its swap")


def test_wrong_settings_get_one_line_and_no_traceback(database_url: str, server_url: str) -> None:
    """The database unreachable or not migrated, an unknown read model or module, a bad setting or argument."""
    unreachable = "postgresql://postgres@127.0.0.1:1/nowhere"
    cases = [
        (unreachable, ["migrate"], {}, 1, "cannot use the database"),
        (unreachable, ["verify"], {}, 1, "cannot use the database"),
        (unreachable, ["projections", "status"], {}, 1, "cannot use the database"),
        (database_url, ["projections", "prune", "bogus"], {}, 2, "there is no read model 'bogus'"),
        # Audit: exit 1 "there is no version -1"; "the database refused: missing "=" ..." for a setting.
        (database_url, ["projections", "prune", "tasks", "-1"], {}, 2, "-1 is no version: versions count from 1"),
        ("garbage", ["verify"], {}, 1, "DATABASE_URL is not a PostgreSQL connection string (postgresql://"),
        ("postgresql://u:s3cr%zzet@h/d", ["verify"], {}, 1, "DATABASE_URL is not a PostgreSQL connection string"),
        (database_url, ["verify", "--version", "bogus=1"], {}, 2, "no read model named bogus"),
        # Audit: only the last was verified, and version 1 looked verified.
        (database_url, ["verify", "--version", "tasks=1", "--version", "tasks=2"], {}, 2, "names tasks twice"),
        (database_url, ["projections", "status"], {"TASKTRAIL_READ_MODELS": "no.such.module"}, 1, "No module named"),
        (database_url, ["projections", "status"], {"TASKTRAIL_STATEMENT_TIMEOUT": "forever"}, 1, "give a duration"),
        (database_url, ["serve", "--port", "99999"], {}, 2, "not a TCP port"),
        (database_url, ["serve", "--workers", "0"], {}, 2, "give at least 1"),
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_POOL_TIMEOUT": "abc"}, 1, "give a number of seconds"),
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_READ_TIMEOUT": "nan"}, 1, "TASKTRAIL_READ_TIMEOUT='nan'"),
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_POOL_TIMEOUT": "-1"}, 1, "give a number of seconds"),
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_WRITE_SLOTS": "-1"}, 1, "must be a whole number"),
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_WRITE_SLOTS": "two"}, 1, "not 'two'"),
        # Read by the streams once the app starts, where a refusal hung the process: checked first now.
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_POLL_SECONDS": "0"}, 1, "TASKTRAIL_POLL_SECONDS='0'"),
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_SSE_PING_SECONDS": "abc"}, 1, "give a number of seconds"),
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_SSE_PING_SECONDS": "1e9"}, 1, "under a day"),
        # Audit: a traceback, even with --log-format json.
        (database_url, ["serve", "--port", "0"], {"TASKTRAIL_SESSION_SECRET": "short"}, 1, "at least 32 characters"),
    ]

    def run(url: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "tasktrail", *args]
        environment = os.environ | {"DATABASE_URL": url} | env
        return subprocess.run(command, env=environment, capture_output=True, text=True, check=False, timeout=120)

    with ThreadPoolExecutor(4) as pool:  # side by side: each is mostly a Python start
        runs = list(pool.map(lambda case: run(*case[:3]), cases))
    for (_, args, env, code, said), done in zip(cases, runs, strict=True):
        assert (done.returncode, "Traceback" in done.stderr) == (code, False), (args, env, done.stderr)
        assert said in done.stderr, (args, env, done.stderr)
        assert "s3cr" not in done.stderr  # a password in a malformed DATABASE_URL (libpq's words quote it)
    with fresh_database(server_url, "template0") as empty:  # no migration ever ran
        for args in (["projections", "status"], ["projections", "prune"]):
            done = tasktrail(empty, *args)
            assert done.returncode == 1, done.stderr
            assert "run `tasktrail migrate`" in done.stderr
            assert "Traceback" not in done.stderr
        # An older release's database (before read models had versions, migration 0014): said so (audit: "no
        # tasktrail tables yet", and verify's "version 2 has no tables (pruned, not built yet...)").
        with psycopg.connect(empty, autocommit=True) as conn:
            conn.execute(migrations.CREATE_LEDGER)
            for version, name, statements in migrations.available():
                if version < 14:  # 0014 versioned the read models
                    conn.execute(statements)
                    conn.execute(migrations.RECORD, {"version": version, "name": name})
        commands = (["projections", "status"], ["projections", "prune"], ["verify"])
        with ThreadPoolExecutor(3) as pool:
            runs = list(pool.map(lambda args: tasktrail(empty, *args), commands))
        for args, done in zip(commands, runs, strict=True):
            assert done.returncode == 1, done.stderr
            assert "an older release's" in done.stderr + done.stdout, (args, done.stderr, done.stdout)
            assert "run `tasktrail migrate` to upgrade them" in done.stderr + done.stdout, args
            assert "Traceback" not in done.stderr
