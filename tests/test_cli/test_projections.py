"""`tasktrail projections status | rebuild` and `serve --rebuild`, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
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
