"""A write that waits on a lock gives up after lock_timeout with a retryable 503, and succeeds once the lock is gone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import psycopg
import pytest
from litestar.testing import AsyncTestClient
from psycopg import sql

from tasktrail import db
from tasktrail.http.app import create_app
from tasktrail.projections import tasks as tasks_view
from tests.test_api.test_errors import problem

pytestmark = pytest.mark.anyio

# The read model's row of a task, locked as another writer's open transaction would.
LOCK_TASK = sql.SQL("SELECT 1 FROM {} WHERE task_id = %(task_id)s FOR UPDATE").format(
    sql.Identifier(tasks_view.TABLES[0])
)
LOCK_KEY = "SELECT 1 FROM idempotency_keys WHERE key = %(key)s FOR UPDATE"
# Another request that claimed a fresh key and has not committed yet.
CLAIM_KEY = """
INSERT INTO idempotency_keys (key, fingerprint, task_id, created_at)
VALUES (%(key)s, '\\x00', gen_random_uuid(), %(now)s)
"""


@pytest.fixture
async def client(database_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AsyncTestClient]:
    monkeypatch.setenv("TASKTRAIL_LOCK_TIMEOUT", "200ms")
    async with AsyncTestClient(app=create_app(database_url)) as test_client:
        yield test_client


@asynccontextmanager
async def held(database_url: str, statement: sql.Composable | str, **params: object) -> AsyncIterator[None]:
    """Run the statement in another session's transaction, kept open (its locks held), rolled back at the end."""
    async with await psycopg.AsyncConnection.connect(database_url) as holder, holder.transaction(force_rollback=True):
        await holder.execute(statement, params)
        yield


def refused_as_locked(response, what: str) -> None:  # type: ignore[no-untyped-def]
    body = problem(response, 503)
    assert response.headers["retry-after"] == "1"
    assert what in body["detail"], body["detail"]
    assert "try again" in body["detail"]


async def test_a_write_to_a_locked_task_answers_503_then_succeeds(client: AsyncTestClient, database_url: str) -> None:
    task = (await client.post("/tasks/", json={"task_type": "locked"})).json()
    url = f"/tasks/{task['task_id']}"
    async with held(database_url, LOCK_TASK, task_id=task["task_id"]):
        refused_as_locked(await client.patch(url, json={"progress": 5}), "the task is locked by another transaction")
        refused_as_locked(await client.delete(url), "the task is locked by another transaction")
        assert (await client.get(url)).json()["version"] == 1  # reads do not wait on row locks
    changed = await client.patch(url, json={"progress": 5})
    assert (changed.status_code, changed.json()["version"]) == (200, 2)
    events = (await client.get(f"{url}/history")).json()["events"]
    assert [e["type"] for e in events] == ["TaskCreated", "ProgressReported"]  # the refused writes left nothing


async def test_a_create_whose_key_is_locked_answers_503_then_returns_the_first_task(
    client: AsyncTestClient, database_url: str
) -> None:
    key = {"Idempotency-Key": "held-key"}
    first = (await client.post("/tasks/", json={"task_type": "k"}, headers=key)).json()
    async with held(database_url, LOCK_KEY, key="held-key"):
        refused_as_locked(await client.post("/tasks/", json={"task_type": "k"}, headers=key), "Idempotency-Key")
    again = await client.post("/tasks/", json={"task_type": "k"}, headers=key)
    assert (again.status_code, again.json()["task_id"]) == (201, first["task_id"])


async def test_a_create_whose_key_another_request_is_claiming_answers_503(
    client: AsyncTestClient, database_url: str
) -> None:
    key = {"Idempotency-Key": "claimed-key"}
    async with held(database_url, CLAIM_KEY, key="claimed-key", now=datetime.now(UTC)):
        refused_as_locked(await client.post("/tasks/", json={"task_type": "k"}, headers=key), "Idempotency-Key")
    # The other claim rolled back: the key is free.
    created = await client.post("/tasks/", json={"task_type": "k"}, headers=key)
    assert created.status_code == 201
    assert (await client.get("/tasks/stats/summary")).json()["total"] == 1


def test_the_lock_timeout_is_set_on_every_session_and_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "-c lock_timeout=5s" in db.connect_kwargs()["options"]
    monkeypatch.setenv("TASKTRAIL_LOCK_TIMEOUT", "750ms")
    assert "-c lock_timeout=750ms" in db.connect_kwargs()["options"]
    monkeypatch.setenv("TASKTRAIL_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="TASKTRAIL_LOCK_TIMEOUT"):
        db.connect_kwargs()
