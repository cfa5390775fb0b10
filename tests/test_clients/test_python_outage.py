"""The Python client through a real database outage: a create retried on 503 until PostgreSQL is back makes one task."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from tasktrail_client import Client, RetryPolicy

from tasktrail import db
from tests.conftest import Server
from tests.test_faults.test_database import stop_postgres

PATIENT = RetryPolicy(attempts=200, base_delay=0.05, max_delay=0.2)


class Recording(httpx.HTTPTransport):
    """The real HTTP transport, noting each answer's status (to know the client met the outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


def until(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_a_create_is_retried_through_an_outage_into_one_task(own_postgres: Any, tmp_path: Path) -> None:
    db.ensure_database(own_postgres.get_uri(), "outage")
    server = Server(os.environ | {"DATABASE_URL": own_postgres.get_uri("outage")}, log_dir=tmp_path)
    transport = Recording()
    made: list[Any] = []
    try:
        with Client(server.url, retry=PATIENT, transport=transport) as client:
            stop_postgres(own_postgres)
            worker = threading.Thread(target=lambda: made.append(client.create("outage", {"n": 1})))
            worker.start()
            until(lambda: 503 in transport.statuses, "the client met the outage")
            own_postgres.ensure_postgres_running()
            worker.join(timeout=60)
            assert made, "the create did not come through"
            assert transport.statuses[0] == 503
            assert transport.statuses[-1] == 201
            assert [t.task_id for t in client.list(task_type="outage")] == [made[0].task_id]
    finally:
        server.stop()
