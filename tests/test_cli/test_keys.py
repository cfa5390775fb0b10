"""`tasktrail keys` and `serve` with keys, in real processes: hashes on disk, keys never in a log."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import Server, assert_verifies


def tasktrail(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasktrail", *args], env=env, capture_output=True, text=True, check=False, timeout=60
    )


def add_key(keys_file: Path, name: str, scope: str) -> str:
    done = tasktrail("keys", "add", name, "--scope", scope, "--file", str(keys_file))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_keys_add_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    writer = add_key(keys_file, "worker-7", "write")
    admin = add_key(keys_file, "ops", "admin")
    assert writer != admin
    assert len(writer) > 40
    text = keys_file.read_text()
    assert writer not in text
    assert admin not in text
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600

    again = tasktrail("keys", "add", "ops", "--scope", "read", "--file", str(keys_file))
    assert again.returncode == 1
    assert "already" in again.stderr

    listed = tasktrail("keys", "list", env=os.environ | {"TASKTRAIL_API_KEYS_FILE": str(keys_file)})
    assert listed.stdout.splitlines() == ["worker-7\twrite", "ops\tadmin"]
    assert tasktrail("keys", "remove", "worker-7", "--file", str(keys_file)).returncode == 0
    assert tasktrail("keys", "list", "--file", str(keys_file)).stdout.splitlines() == ["ops\tadmin"]


def test_serve_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKTRAIL_API_KEYS")}
    started = time.monotonic()
    # Refused before binding or starting any database: nothing ever listens on 0.0.0.0.
    done = tasktrail("--data-dir", str(tmp_path / "data"), "serve", "--host", "0.0.0.0", env=env)  # noqa: S104
    assert done.returncode == 2
    assert "refusing to serve on 0.0.0.0" in done.stderr
    assert "tasktrail keys add" in done.stderr
    assert "--api-keys" in done.stderr
    assert not (tmp_path / "data").exists()
    assert time.monotonic() - started < 30


def test_serve_refuses_an_unreadable_keys_file(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("tt_a-pasted-key\n")
    done = tasktrail("serve", "--api-keys", str(tmp_path / "keys.txt"))
    assert done.returncode == 2
    assert "keys.txt, line 1" in done.stderr
    assert "tt_a-pasted-key" not in done.stderr


def test_a_server_with_keys_checks_them_and_never_logs_them(database_url: str, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    reader = add_key(keys_file, "dashboard", "read")
    writer = add_key(keys_file, "worker-7", "write")
    server = Server(
        os.environ | {"DATABASE_URL": database_url},
        log_dir=tmp_path,
        serve_args=("--api-keys", str(keys_file), "--access-log", "--log-level", "debug"),
    )
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/tasks/").status_code == 401
            created = client.post("/tasks/", json={"task_type": "k"}, headers={"Authorization": f"Bearer {writer}"})
            assert created.status_code == 201
            task_id = created.json()["task_id"]
            as_reader = {"Authorization": f"Bearer {reader}"}
            assert client.patch(f"/tasks/{task_id}", json={"progress": 5}, headers=as_reader).status_code == 403
            history = client.get(f"/tasks/{task_id}/history", headers=as_reader).json()
            assert history["events"][0]["metadata"]["actor"] == "worker-7"
            assert client.get("/tasks/", headers={"Authorization": f"Bearer {writer}x"}).status_code == 401
    finally:
        server.stop()
    log = server.log()
    assert "dashboard (read), worker-7 (write)" in log
    assert "GET /tasks/" in log  # the access log was on
    for key in (reader, writer):
        assert key not in log
        assert key[3:20] not in log
    assert_verifies(database_url)
