"""One primary and its streaming standby for the package's tests; each test gets its own database on them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tasktrail.http.app import create_app
from tasktrail.replicas import HEADER, SERVING, Replica, lsn
from tests.conftest import assert_verifies, prepared
from tests.replication import Pair


@pytest.fixture(scope="package")
def pair() -> Iterator[Pair]:
    pair = Pair()
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture(scope="package")
def template(pair: Pair) -> str:
    name = f"tasktrail_template_{uuid.uuid4().hex[:8]}"
    pair.create_database(name)
    prepared(pair.primary.url(name))
    return name


@dataclass
class Database:
    name: str
    primary: str  # its connection string on the primary
    replica: str  # ... and on the standby


@contextmanager
def replicated_database(pair: Pair, template: str) -> Iterator[Database]:
    """A fresh, migrated database that the standby has replayed; replay runs again afterwards, whatever was done."""
    name = f"tasktrail_test_{uuid.uuid4().hex[:12]}"
    pair.create_database(name, template)
    try:
        yield Database(name, pair.primary.url(name), pair.standby.url(name))
    finally:
        if pair.standby.pid() is None:
            pair.standby.start()
        pair.resume_replay()
        pair.wait_replayed()
        assert_verifies(pair.primary.url(name))
        pair.drop_database(name)


@pytest.fixture
def database(pair: Pair, template: str) -> Iterator[Database]:
    with replicated_database(pair, template) as database:
        yield database


@pytest.fixture
def replicated_app(database: Database) -> Callable[..., AsyncIterator[AsyncTestClient[Litestar]]]:
    """`async with replicated_app(max_lag=...) as client`: the real app reading from the standby."""

    def start(max_lag: float = 60.0) -> AsyncTestClient[Litestar]:
        app = create_app(database.primary, replica_urls=[database.replica], replica_max_lag=max_lag)
        return AsyncTestClient(app=app)

    return start  # type: ignore[return-value]


def replica_of(client: AsyncTestClient[Litestar]) -> Replica:
    (replica,) = client.app.state.replicas.replicas
    return replica


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll until the condition holds (30 s at most): the health checks run on their own schedule."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"not within 30 s: {what}"
        await asyncio.sleep(0.02)


async def until_serving(client: AsyncTestClient[Litestar]) -> Replica:
    replica = replica_of(client)
    await until(lambda: replica.state == SERVING, "the replica serves reads")
    return replica


async def created(client: AsyncTestClient[Litestar], **headers: str) -> tuple[dict[str, Any], str]:
    """A new task, and the Tasktrail-Read-After token of its create."""
    response = await client.post("/tasks/", json={"task_type": "replicated"}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json(), response.headers[HEADER]


async def created_on_replica(client: AsyncTestClient[Litestar]) -> tuple[Replica, dict[str, Any], str]:
    """Once the replica serves: a new task, its create's token, and the replica seen past that token."""
    replica = await until_serving(client)
    task, token = await created(client)
    await until(lambda: replica.replayed >= lsn(token), "the replica is seen past the create")
    return replica, task, token
