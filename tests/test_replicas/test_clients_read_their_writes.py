"""clients/python and clients/js read their own writes from a real streaming replica whose replay is paused
(SPEC §13): each write's Tasktrail-Read-After token goes with the reads after it, by itself, while a read without
it gets the older data. (Here, beside the replica tests, to share their primary and standby.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from tasktrail_client import AsyncClient, Task

from tasktrail.http.app import create_app
from tasktrail.replicas import lsn
from tests.conftest import ROOT, Server
from tests.replication import Pair
from tests.test_clients.test_js_package import node
from tests.test_replicas.conftest import Database, replica_of, until, until_serving


async def created_and_replayed(plain: AsyncTestClient, client: AsyncClient, kind: str) -> tuple[Any, Task, str]:
    """Once the app serves from its replica: a task the client created, which the replica has replayed;
    the replica, the task and the create's read-after token."""
    replica = await until_serving(plain)
    task = await client.create(kind)
    created = client.read_after
    assert created is not None
    await until(lambda: replica.replayed >= lsn(created), "the replica is seen past the create")
    return replica, task, created


@pytest.mark.anyio
async def test_the_python_client_reads_its_writes_from_a_paused_replica(pair: Pair, database: Database) -> None:
    app = create_app(database.primary, replica_urls=[database.replica], replica_max_lag=60)
    async with (
        AsyncTestClient(app=app) as plain,
        AsyncClient("http://app", transport=httpx.ASGITransport(app)) as client,
    ):
        replica, task, created = await created_and_replayed(plain, client, "replicated")
        with pair.paused():
            await client.update(task.task_id, status="running", progress=5)
            assert client.read_after != created
            # A read without the token is answered by the replica, which has not replayed the change ...
            stale = await plain.get(f"/tasks/{task.task_id}")
            assert (stale.json()["status"], stale.json()["version"]) == ("pending", 1)
            # ... the client's own reads send it, and see their write: the task, lists, history, counts, the feed.
            assert ((await client.get(task.task_id)).status, (await client.get(task.task_id)).version) == ("running", 2)
            assert [t.task_id async for t in client.list(status="running")] == [task.task_id]
            assert [e.type for e in await client.history(task.task_id)] == ["TaskCreated", "TaskStarted"]
            assert (await client.stats()).running == 1
            assert [e.type async for e in client.events()] == ["TaskCreated", "TaskStarted"]
    assert replica_of(plain) is replica


def test_the_javascript_client_reads_its_writes_from_a_paused_replica(
    pair: Pair, database: Database, tmp_path: Path
) -> None:
    env = os.environ | {"DATABASE_URL": database.primary}
    server = Server(env, log_dir=tmp_path, serve_args=("--replica", database.replica, "--replica-max-lag", "60"))
    try:
        serving = False
        for _ in range(100):  # until a read without a token is answered by the (paused) replica
            pair.wait_replayed()
            probe = httpx.post(f"{server.url}/tasks/", json={"task_type": "probe"}).json()
            with pair.paused():
                httpx.patch(f"{server.url}/tasks/{probe['task_id']}", json={"progress": 1})
                if httpx.get(f"{server.url}/tasks/{probe['task_id']}").json()["version"] == 1:
                    serving = True
                    break
        assert serving, "the replica never served reads"
        pair.wait_replayed()
        with pair.paused():
            out = node(str(ROOT / "tests" / "js" / "read_after.mjs"), server.url, cwd=ROOT)
        assert "read after: ok" in out
    finally:
        server.stop()


class LosesAnAnswer(httpx.AsyncBaseTransport):
    """The app, through a connection that loses the answer to the next PATCH once it has been applied."""

    def __init__(self, app: object) -> None:
        self.inner = httpx.ASGITransport(app)  # type: ignore[arg-type]
        self.lose_next_patch = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.lose_next_patch and request.method == "PATCH":
            self.lose_next_patch = False
            await response.aread()
            raise httpx.ReadError("the connection dropped before the answer came", request=request)
        return response


@pytest.mark.anyio
async def test_a_write_whose_answer_was_lost_is_known_for_the_clients_own_while_the_replica_lags(
    pair: Pair, database: Database
) -> None:
    # The retry of a write with If-Match meets 412 (the first attempt was applied); the client then looks for
    # its own request in the history. The 412 carried no token, so that read went to the paused replica, which
    # had not replayed the first attempt: the client raised as if another writer had changed the task.
    app = create_app(database.primary, replica_urls=[database.replica], replica_max_lag=60)
    transport = LosesAnAnswer(app)
    async with AsyncTestClient(app=app) as plain, AsyncClient("http://app", transport=transport) as client:
        _, task, _ = await created_and_replayed(plain, client, "lost-answer")
        with pair.paused():
            transport.lose_next_patch = True
            done = await client.update(task.task_id, status="completed", result={"ok": True}, if_version=1)
            assert (done.status, done.version) == ("completed", 2)
            refused = await plain.patch(f"/tasks/{task.task_id}", json={"progress": 5}, headers={"If-Match": '"1"'})
            assert refused.status_code == 412
            assert lsn(refused.headers["Tasktrail-Read-After"]) >= lsn(client.read_after)
        history = await client.history(task.task_id)
        assert [e.type for e in history] == ["TaskCreated", "TaskCompleted"]
