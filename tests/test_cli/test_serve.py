"""`tasktrail serve` and `migrate` as a user runs them, in real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import psycopg

from tasktrail import migrations
from tests.conftest import Server


def test_serve_with_no_database_configured_uses_embedded_postgres(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    data_dir = tmp_path / "data"

    first = Server(env, "--data-dir", str(data_dir), log_dir=tmp_path)
    created = httpx.post(f"{first.url}/tasks/", json={"task_type": "embedded"}).json()
    assert (data_dir / "pgdata" / "PG_VERSION").exists()
    assert (data_dir / "pgdata" / "postmaster.pid").exists()
    assert first.stop(signal.SIGINT) == 0  # Ctrl-C
    assert not (data_dir / "pgdata" / "postmaster.pid").exists(), "the embedded PostgreSQL was left running"
    assert "embedded PostgreSQL" in first.log()

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
    finally:
        assert server.stop() == 0


def test_migrate_command_is_safe_to_repeat(database_url: str) -> None:
    env = os.environ | {"DATABASE_URL": database_url}
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "tasktrail", "migrate"], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "up to date"  # the template was migrated already
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(migrations.available()),)


def test_help_names_every_command() -> None:
    done = subprocess.run([sys.executable, "-m", "tasktrail", "--help"], capture_output=True, text=True, check=True)
    for word in ("serve", "migrate", "DATABASE_URL"):
        assert word in done.stdout
