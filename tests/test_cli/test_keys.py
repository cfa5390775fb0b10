"""`tasktrail keys` and `serve` with keys, in real processes: hashes on disk, keys never in a log."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tasktrail import cli
from tests.conftest import Server, assert_verifies


@pytest.fixture(autouse=True)
def no_configured_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --api-keys` exports the file to its workers; undo that here, and start from no keys."""
    # setenv, not delenv: delenv of an unset variable records nothing to restore.
    monkeypatch.setenv("TASKTRAIL_API_KEYS", "")
    monkeypatch.setenv("TASKTRAIL_API_KEYS_FILE", "")


def tasktrail(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command line, run in this process (it refuses before starting anything); exit code, stdout, stderr."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def add_key(keys_file: Path, name: str, scope: str) -> str:
    """`tasktrail keys add` in a process of its own, as an operator runs it: the key it prints."""
    done = subprocess.run(
        [sys.executable, "-m", "tasktrail", "keys", "add", name, "--scope", scope, "--file", str(keys_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_keys_add_prints_the_key_once_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "keys.txt"
    writer = add_key(keys_file, "worker-7", "write")
    code, admin, _ = tasktrail(capsys, "keys", "add", "ops", "--scope", "admin", "--file", str(keys_file))
    assert code == 0
    assert writer != admin.strip()
    assert len(writer) > 40
    text = keys_file.read_text()
    assert writer not in text
    assert admin.strip() not in text
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    made_before = tmp_path / "made-before.txt"  # e.g. by an editor, readable by all
    made_before.touch(mode=0o644)
    made_before.chmod(0o644)
    code, _, err = tasktrail(capsys, "keys", "add", "late", "--scope", "read", "--file", str(made_before))
    assert code == 0
    assert f"readable by every user (mode 644): `chmod 600 {made_before}`" in err
    assert stat.S_IMODE(made_before.stat().st_mode) == 0o644  # its own: a group may need to read it

    code, _, err = tasktrail(capsys, "keys", "add", "ops", "--scope", "read", "--file", str(keys_file))
    assert code == 1
    assert "already" in err
    code, _, err = tasktrail(capsys, "keys", "add", "two words", "--scope", "read", "--file", str(keys_file))
    assert code == 2

    monkeypatch.setenv("TASKTRAIL_API_KEYS_FILE", str(keys_file))
    assert tasktrail(capsys, "keys", "list")[1].splitlines() == ["worker-7\twrite", "ops\tadmin"]
    assert tasktrail(capsys, "keys", "remove", "worker-7")[0] == 0
    assert tasktrail(capsys, "keys", "list")[1].splitlines() == ["ops\tadmin"]


def test_serve_refuses_a_public_address_without_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before binding or starting any database: nothing ever listens on 0.0.0.0.
    code, _, err = tasktrail(capsys, "--data-dir", str(tmp_path / "data"), "serve", "--host", "0.0.0.0")  # noqa: S104
    assert code == 2
    assert "refusing to serve on 0.0.0.0" in err
    assert "tasktrail keys add" in err
    assert "--api-keys" in err
    assert not (tmp_path / "data").exists()


def test_serve_refuses_an_unreadable_keys_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keys.txt").write_text("tt_a-pasted-key\n")
    code, _, err = tasktrail(capsys, "serve", "--api-keys", str(tmp_path / "keys.txt"))
    assert code == 2
    assert "keys.txt, line 1" in err
    assert "tt_a-pasted-key" not in err
    code, _, err = tasktrail(capsys, "serve", "--api-keys", str(tmp_path / "missing.txt"))
    assert code == 2
    assert f"cannot read the keys file {tmp_path / 'missing.txt'}" in err  # audit: it named a variable not set
    # A keys file with no key left (`keys remove` of the last one) asked for keys: not an open service.
    (tmp_path / "keys.txt").write_text("")
    code, _, err = tasktrail(
        capsys, "--data-dir", str(tmp_path / "data"), "serve", "--api-keys", str(tmp_path / "keys.txt")
    )
    assert code == 2
    assert "keys.txt holds no key" in err
    assert not (tmp_path / "data").exists()
    # Audit: a file not UTF-8 was "'utf-8' codec can't decode byte 0xff", naming no file; a name twice was
    # named nowhere; `keys list` of an empty file said nothing at all.
    (tmp_path / "keys.txt").write_bytes(b"\xff\xfe")
    for args in (
        ("serve", "--api-keys", str(tmp_path / "keys.txt")),
        ("keys", "list", "--file", str(tmp_path / "keys.txt")),
    ):
        code, _, err = tasktrail(capsys, *args)
        assert code in (1, 2)
        assert f"{tmp_path / 'keys.txt'} is not UTF-8 text" in err
    (tmp_path / "keys.txt").write_text(f"ops:read:{'1' * 64}\nops:write:{'2' * 64}\n")
    code, _, err = tasktrail(capsys, "keys", "list", "--file", str(tmp_path / "keys.txt"))
    assert (code, err) == (1, f"tasktrail: {tmp_path / 'keys.txt'}: a key name appears twice: ops\n")
    (tmp_path / "keys.txt").write_bytes(f"\ufeffops:read:{'1' * 64}\n".encode())  # an editor's byte order mark
    assert tasktrail(capsys, "keys", "list", "--file", str(tmp_path / "keys.txt"))[:2] == (0, "ops\tread\n")
    (tmp_path / "keys.txt").write_text("# every key removed\n")
    code, out, err = tasktrail(capsys, "keys", "list", "--file", str(tmp_path / "keys.txt"))
    assert (code, out) == (0, "")
    assert "holds none" in err
    # Audit: "tasktrail: [Errno 2] No such file or directory: '...'".
    code, _, err = tasktrail(capsys, "keys", "add", "k", "--scope", "read", "--file", str(tmp_path / "no" / "k.txt"))
    assert (code, err) == (1, f"tasktrail: {tmp_path / 'no' / 'k.txt'}: No such file or directory\n")


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
            # Keys guard it: any name may reach it (a proxy's, a host's), unlike an open service.
            assert client.get("/tasks/", headers={**as_reader, "Host": "tasks.example"}).status_code == 200
    finally:
        server.stop()
    log = server.log()
    assert "dashboard (read), worker-7 (write)" in log
    assert "GET /tasks/" in log  # the access log was on
    for key in (reader, writer):
        assert key not in log
        assert key[3:20] not in log
    assert_verifies(database_url)


def test_an_on_off_setting_that_is_neither_is_refused_by_serve_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Audit: TASKTRAIL_ACCESS_LOG=maybe was refused while the parser was made: every command failed, --help too.
    monkeypatch.setenv("TASKTRAIL_ACCESS_LOG", "maybe")
    assert tasktrail(capsys, "keys", "list", "--file", str(tmp_path / "none.txt"))[0] == 0
    code, out, _ = tasktrail(capsys, "--help")
    assert (code, "serve" in out) == (0, True)
    code, _, err = tasktrail(capsys, "--data-dir", str(tmp_path / "data"), "serve")
    assert (code, err) == (2, "tasktrail: TASKTRAIL_ACCESS_LOG='maybe': give 1 or 0\n")
    assert not (tmp_path / "data").exists()
