"""`serve --log-format json`: one JSON object a line, a line per request, never a key or a value sent."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from tasktrail import logs
from tasktrail.http import auth
from tasktrail.http.app import create_app
from tests.conftest import Server, assert_verifies

SECRET_QUERY = "query-value-8c1f"  # noqa: S105 -- a value the log must not show, not a password
SECRET_BODY = "body-value-5e2a"  # noqa: S105 -- the same
REQUEST_FIELDS = {"time", "level", "logger", "message", "request_id", "method", "route", "status", "duration", "actor"}


def test_json_logs_parse_line_by_line_and_hold_no_key_or_value(database_url: str, tmp_path: Path) -> None:
    writer, reader = auth.new_key(), auth.new_key()
    entries = [auth.Key("worker-7", "write", auth.digest(writer)), auth.Key("grafana", "read", auth.digest(reader))]
    keys = " ".join(key.entry() for key in entries)
    env = os.environ | {"DATABASE_URL": database_url, "TASKTRAIL_API_KEYS": keys}
    server = Server(env, log_dir=tmp_path, serve_args=("--log-format", "json"))
    as_writer = {"Authorization": f"Bearer {writer}", "X-Request-ID": "traceme123"}
    try:
        with httpx.Client(base_url=server.url) as client:
            created = client.post(
                "/tasks/", json={"task_type": "logged", "params": {"token": SECRET_BODY}}, headers=as_writer
            )
            assert created.status_code == 201
            task_id = created.json()["task_id"]
            listed = client.get(f"/tasks/?task_type={SECRET_QUERY}", headers={"Authorization": f"Bearer {reader}"})
            assert listed.status_code == 200
            # A key sent as the request id by mistake (audit): logged, echoed and stored as it was.
            mistaken = client.get("/tasks/", headers={"Authorization": f"Bearer {reader}", "X-Request-ID": reader})
            assert (mistaken.status_code, mistaken.headers["x-request-id"] != reader) == (200, True)
            # ... or inside one, or as the client a trusted proxy (here, loopback) forwards for.
            for given in (f"req-{reader}", f"{reader}.", f"Bearer:{reader}"):
                mistaken = client.get("/tasks/", headers={"Authorization": f"Bearer {reader}", "X-Request-ID": given})
                assert (mistaken.status_code, reader in mistaken.headers["x-request-id"]) == (200, False)
            for forwarded in (writer, f"10.0.0.1, {writer}", "9" * 3000):
                assert client.get("/health", headers={"X-Forwarded-For": forwarded}).status_code == 200
            assert client.get("/tasks/", headers={"Authorization": f"Bearer {writer}x"}).status_code == 401
            assert client.get(f"/nowhere/{SECRET_QUERY}?key={writer}").status_code in (401, 404)
            assert client.get("/metrics", headers={"Authorization": f"Bearer {reader}"}).status_code == 200
            assert client.post("/tasks/cleanup", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
            history = client.get(f"/tasks/{task_id}/history", headers=as_writer).json()
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as raw:
            raw.sendall(b"get /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # not HTTP: methods are upper case
            assert raw.recv(4096).startswith(b"HTTP/1.1 400")
    finally:
        server.stop()
    assert history["events"][0]["metadata"] == {"request_id": "traceme123", "actor": "worker-7"}

    text = server.log()
    for secret in (writer, reader, writer[3:20], reader[3:20], SECRET_QUERY, SECRET_BODY, task_id, "9" * 129):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any("Application startup complete" in line["message"] for line in lines)  # uvicorn's own lines too
    requests = [line for line in lines if line["logger"] == "tasktrail.access"]
    assert all(line.keys() >= REQUEST_FIELDS for line in requests)
    (create,) = [line for line in requests if line["request_id"] == "traceme123" and line["method"] == "POST"]
    assert create["route"] == "/tasks"
    assert create["status"] == 201
    assert create["actor"] == "worker-7"
    assert 0 < create["duration"] < 30  # seconds
    routes = {(line["method"], line["route"], line["status"], line["actor"]) for line in requests}
    assert ("GET", "/tasks", 200, "grafana") in routes
    assert ("GET", "/tasks", 401, None) in routes
    assert ("GET", "/tasks/{task_id}/history", 200, "worker-7") in routes
    assert ("GET", "/metrics", 200, "grafana") in routes
    assert ("POST", "/tasks/cleanup", 403, "grafana") in routes  # who was refused
    # The request that was not HTTP: its access line, and not also uvicorn's warning without a request id.
    assert ("other", "unmatched", 400, None) in routes
    assert "Invalid HTTP request received" not in text
    assert_verifies(database_url)


def test_text_logs_by_default_and_the_access_log_and_metrics_can_be_turned_off(
    database_url: str, tmp_path: Path
) -> None:
    env = os.environ | {"DATABASE_URL": database_url}
    server = Server(env, log_dir=tmp_path)
    try:
        assert httpx.get(f"{server.url}/tasks/", headers={"X-Request-ID": "plain42"}).status_code == 200
    finally:
        server.stop()
    line = next(line for line in server.log().splitlines() if "plain42" in line)
    assert " INFO " in line
    assert "tasktrail.access: GET /tasks 200 " in line

    server = Server(env, log_dir=tmp_path, serve_args=("--no-access-log", "--no-metrics"))
    try:
        assert httpx.get(f"{server.url}/tasks/", headers={"X-Request-ID": "quiet42"}).status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 404
    finally:
        server.stop()
    assert "quiet42" not in server.log()
    assert "tasktrail.access" not in server.log()


def test_a_line_logged_while_a_request_is_handled_names_it_and_keeps_its_traceback_on_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("tasktrail", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    token = logs.request_id.set("req-9")
    try:
        line = logs.JsonFormatter().format(record)
    finally:
        logs.request_id.reset(token)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["message"] == "failed here"
    assert fields["level"] == "error"
    assert fields["request_id"] == "req-9"
    assert "RuntimeError: boom" in fields["exception"]


def test_a_client_address_a_proxy_made_up_stays_one_field_of_a_text_line(capsys: pytest.CaptureFixture[str]) -> None:
    """uvicorn takes the client from a trusted proxy's X-Forwarded-For, whatever it holds."""
    line = logs.AccessLine("text")
    line("r1", "GET", "/tasks", 200, 0.001, None, "10.0.0.7")
    line("r2", "GET", "/tasks", 200, 0.001, "k", "1.2.3.4 actor=admin\x1b[2J")
    first, second = capsys.readouterr().err.splitlines()
    assert first.endswith(" request_id=r1 actor=- client=10.0.0.7")
    assert second.endswith(' request_id=r2 actor=k client="1.2.3.4 actor=admin\\u001b[2J"')


@pytest.mark.anyio
async def test_request_lines_waiting_to_be_written_are_written_when_the_server_stops(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lines go out together every FLUSH_SECONDS; a stop in between must not lose them."""
    monkeypatch.setenv(logs.ACCESS_ENV, "1")
    monkeypatch.setenv(logs.FORMAT_ENV, "json")
    monkeypatch.setattr(logs.AccessLine, "FLUSH_SECONDS", 3600.0)  # only the stop writes them
    monkeypatch.setattr(logging.getLogger(logs.ACCESS_LOGGER), "level", logging.INFO)
    async with AsyncTestClient(app=create_app(database_url)) as client:
        assert (await client.get("/tasks/", headers={"X-Request-ID": "waiting1"})).status_code == 200
        assert "waiting1" not in capsys.readouterr().err  # still waiting
    (line,) = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "waiting1" in line]
    assert (line["method"], line["route"], line["status"]) == ("GET", "/tasks", 200)


@pytest.mark.parametrize(
    ("request_id", "route", "actor", "client"),
    [
        ("tt0123456789ab00000000000000000001", "/tasks/{task_id}", None, "127.0.0.1"),
        ("Root=1-5759e988-bd862e3fe1be46a994272793", "/tasks", "worker-7", "[::1]"),
        ('a"b\\c', 'route "with" \\ quotes', 'ac"tor\n', '1.2.3.4", "level":"error'),
        ("x" * 129, "unmatched", "é ü 名前", "10.0.0.7\x1b[2J\x00"),
    ],
)
def test_a_json_request_line_is_one_object_with_each_field_as_given(
    request_id: str, route: str, actor: str | None, client: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The line is a template filled in: whatever a field holds, it must stay that field's value."""
    logs.AccessLine("json")(request_id, "PATCH", route, 409, 0.0012346, actor, client)
    (text,) = capsys.readouterr().err.splitlines()
    line = json.loads(text)
    assert line.pop("time").endswith("Z")
    assert line == {
        "level": "info",
        "logger": "tasktrail.access",
        "message": f"PATCH {route} 409",
        "request_id": request_id,
        "method": "PATCH",
        "route": route,
        "status": 409,
        "duration": 0.001235,
        "actor": actor,
        "client": client,
    }


def test_a_database_serve_cannot_use_is_a_json_line_too(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nobody listens on (bound, never listening)
    port = closed.getsockname()[1]
    env = os.environ | {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/nowhere"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tasktrail", "serve", "--port", "0", "--log-format", "json"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        closed.close()
    assert done.returncode == 1
    lines = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    assert any(line["level"] == "error" and "cannot use the database" in line["message"] for line in lines), lines
    # A setting refused before anything starts, too.
    env["TASKTRAIL_POOL_TIMEOUT"] = "abc"
    done = subprocess.run(
        [sys.executable, "-m", "tasktrail", "serve", "--port", "0", "--log-format", "json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    (line,) = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    assert line["level"] == "error"
    assert "TASKTRAIL_POOL_TIMEOUT" in line["message"]
