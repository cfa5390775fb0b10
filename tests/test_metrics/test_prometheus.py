"""A real Prometheus scrapes a real server with the documented configuration; promtool checks the alert rules."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

import httpx
import pytest
import yaml

from tasktrail.http import auth
from tests.conftest import ROOT, Server, assert_verifies, free_port

DOCS = ROOT / "docs" / "prometheus"
CONFIG = DOCS / "prometheus.yml"
RULES = DOCS / "tasktrail-alerts.yml"
REQUESTS = 25
T = TypeVar("T")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed for this test: apt-get install prometheus (.ci/run installs it)"
    return path


def test_the_alert_rules_are_valid_and_fire_when_they_should() -> None:
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(DOCS / "tasktrail-alerts.test.yml")]):
        done = subprocess.run([tool("promtool"), *command], capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


class Prometheus:
    """`prometheus` on a free loopback port with a configuration of ours; stopped by its process handle."""

    def __init__(self, config: dict, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "prometheus.log"
        command = [
            tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log_path.read_text()}"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus did not get ready:\n{self.log_path.read_text()}"
            time.sleep(0.1)

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Keyed(NamedTuple):
    server: Server
    reader: str  # Prometheus's key, of scope read
    writer: str


@pytest.fixture
def keyed(database_url: str, tmp_path: Path) -> Iterator[Keyed]:
    """Two server processes that want API keys."""
    reader, writer = auth.new_key(), auth.new_key()
    entries = [auth.Key("prometheus", "read", auth.digest(reader)), auth.Key("w", "write", auth.digest(writer))]
    env = os.environ | {"DATABASE_URL": database_url, "TASKTRAIL_API_KEYS": " ".join(k.entry() for k in entries)}
    server = Server(env, log_dir=tmp_path, serve_args=("--workers", "2"))
    yield Keyed(server, reader, writer)
    server.stop()
    assert_verifies(database_url)


def until(check: Callable[[], T], timeout: float = 30) -> T:
    """Poll until check() gives something truthy (Prometheus scrapes once a second); that value."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, "Prometheus never saw it"
        time.sleep(0.2)
    return got


def evaluated_rules(prometheus: Prometheus) -> list[dict]:
    """Every alert rule once each has been evaluated at least once, else an empty list."""
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return rules if rules and all(not rule["lastEvaluation"].startswith("0001") for rule in rules) else []


def test_prometheus_scrapes_with_a_read_key_and_counts_every_request(keyed: Keyed, tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    key_file = tmp_path / "tasktrail.key"
    key_file.write_text(keyed.reader)
    job["authorization"]["credentials_file"] = str(key_file)
    job["static_configs"] = [{"targets": [f"127.0.0.1:{keyed.server.port}"]}]
    prometheus = Prometheus(config, tmp_path)
    try:
        until(lambda: prometheus.query('up{job="tasktrail"} == 1'))
        with httpx.Client(base_url=keyed.server.url, headers={"Authorization": f"Bearer {keyed.writer}"}) as client:
            for n in range(REQUESTS):
                assert client.post("/tasks/", json={"task_type": "scraped", "params": {"n": n}}).status_code == 201
        created = 'sum(tasktrail_http_requests_total{method="POST", route="/tasks", status="201"})'
        until(lambda: [r for r in prometheus.query(created) if float(r["value"][1]) == REQUESTS])
        appended = 'sum(tasktrail_events_appended_total{type="TaskCreated"})'
        assert float(prometheus.query(appended)[0]["value"][1]) == REQUESTS
        assert float(prometheus.query('tasktrail_tasks{status="pending"}')[0]["value"][1]) == REQUESTS
        # Every alert rule evaluates without an error on what tasktrail exposes.
        rules = until(lambda: evaluated_rules(prometheus))
        assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
    finally:
        prometheus.stop()
