"""`tasktrail projections status | rebuild` and `serve --rebuild`, in real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from tests.conftest import Server


def tasktrail(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "tasktrail", *args], env=env, capture_output=True, text=True, check=False, timeout=120
    )


def test_status_then_rebuild_then_status(live_server: str, database_url: str) -> None:
    with httpx.Client(base_url=live_server) as client:
        for i in range(5):
            task = client.post("/tasks/", json={"task_type": f"t{i % 2}"}).json()
            client.patch(f"/tasks/{task['task_id']}", json={"status": "running", "progress": 10 * i})

    before = tasktrail(database_url, "projections", "status")
    assert before.returncode == 0, before.stderr
    lines = before.stdout.splitlines()
    assert lines[0].split()[:4] == ["projection", "live", "code", "applied"]
    assert lines[1].split()[:3] == ["tasks", "1", "1"]
    assert "position 10" in lines[1]
    assert "never" in lines[1]

    done = tasktrail(database_url, "projections", "rebuild")
    assert done.returncode == 0, done.stderr
    assert "rebuilt tasks, stats from 10 events in" in done.stderr
    assert "replay" in done.stderr  # the progress bar's first step

    with httpx.Client(base_url=live_server) as client:  # the running server goes on, on the new tables
        assert client.get("/tasks/stats/summary").json()["running"] == 5
        assert client.post("/tasks/", json={"task_type": "after"}).status_code == 201

    after = tasktrail(database_url, "projections", "status")
    assert "live since position 10" in after.stdout
    assert "never" not in after.stdout
    assert tasktrail(database_url, "projections", "rebuild", "nope").returncode == 2


def test_serve_names_an_outdated_read_model_and_rebuilds_it_with_the_flag(database_url: str, tmp_path: Path) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM projections WHERE name = 'stats'")  # as if stats were new in this release
    env = os.environ | {"DATABASE_URL": database_url}

    server = Server(env, log_dir=tmp_path)
    try:
        refused = httpx.post(f"{server.url}/tasks/", json={"task_type": "t"})
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
    finally:
        server.stop()
    assert "run `tasktrail projections rebuild stats`" in server.log()

    server = Server(env, log_dir=tmp_path, serve_args=("--rebuild",))
    try:
        assert httpx.post(f"{server.url}/tasks/", json={"task_type": "t"}).status_code == 201
    finally:
        server.stop()
    assert "rebuilt stats" in server.log()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT version FROM projections WHERE name = 'stats'").fetchone() == (1,)


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
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT * FROM tasks ORDER BY id").fetchall()
        registry = conn.execute("SELECT * FROM projections ORDER BY name").fetchall()

    with psycopg.connect(database_url) as reader:
        reader.execute("SELECT count(*) FROM tasks")  # holds the swap off, so Ctrl-C comes mid-rebuild
        rebuilding = subprocess.Popen(
            [sys.executable, "-m", "tasktrail", "projections", "rebuild"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_the_swap(database_url)
        rebuilding.send_signal(signal.SIGINT)
        _, stderr = rebuilding.communicate(timeout=60)
    assert rebuilding.returncode == 130, stderr
    assert "interrupted; the live read models are untouched" in stderr

    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT * FROM tasks ORDER BY id").fetchall() == before
        assert conn.execute("SELECT * FROM projections ORDER BY name").fetchall() == registry
    assert "left from an interrupted rebuild" in tasktrail(database_url, "projections", "status").stdout

    again = tasktrail(database_url, "projections", "rebuild")
    assert again.returncode == 0, again.stderr
    status = tasktrail(database_url, "projections", "status").stdout
    assert "interrupted" not in status
    assert "never" not in status
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT * FROM tasks ORDER BY id").fetchall() == before


def wait_for_the_swap(database_url: str) -> None:
    """Until a swap waits to drop the live tasks table."""
    waiting = "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND NOT granted"
    with psycopg.connect(database_url, autocommit=True) as watcher:
        for _ in range(1200):
            if watcher.execute(waiting).fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the rebuild never reached its swap")
