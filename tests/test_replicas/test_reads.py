"""Reads from a real streaming replica, and read-your-writes with Tasktrail-Read-After (SPEC §13)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tasktrail.replicas import HEADER, ON_PRIMARY, lsn
from tests.replication import Pair
from tests.test_replicas.conftest import Database, created, created_on_replica, until, until_serving

pytestmark = pytest.mark.anyio
App = Callable[..., AsyncTestClient[Litestar]]


async def test_a_read_with_the_token_sees_the_write_while_one_without_may_be_older(
    replicated_app: App, pair: Pair, database: Database
) -> None:
    async with replicated_app() as client:
        replica, task, first = await created_on_replica(client)
        with pair.paused():
            response = await client.patch(f"/tasks/{task['task_id']}", json={"status": "running", "progress": 5})
            assert response.status_code == 200
            second = response.headers[HEADER]
            assert lsn(second) > lsn(first)
            path = f"/tasks/{task['task_id']}"
            # Without the token: the replica answers, which has not replayed the change.
            stale = await client.get(path)
            assert (stale.status_code, stale.json()["status"], stale.json()["version"]) == (200, "pending", 1)
            # The first write's token: the replica has replayed that one, so it may answer.
            assert (await client.get(path, headers={HEADER: first})).json()["version"] == 1
            # The second's: only the primary has it.
            fresh = await client.get(path, headers={HEADER: second})
            assert (fresh.json()["status"], fresh.json()["version"]) == ("running", 2)
            # Every kind of read, with the token and without.
            token = {HEADER: second}
            reads = {
                "list": ("/tasks/?status=running", lambda body: [t["task_id"] for t in body]),
                "stats": ("/tasks/stats/summary", lambda body: body["running"]),
                "history": (f"{path}/history", lambda body: len(body["events"])),
                "time travel": (f"{path}?version=2", lambda body: body["status"]),
                "feed": ("/events", lambda body: [e["type"] for e in body["events"]]),
            }
            seen = {}
            for kind, (url, shown) in reads.items():
                old, new = await client.get(url), await client.get(url, headers=token)
                assert (old.status_code, new.status_code) == (200, 200), (kind, old.text, new.text)
                seen[kind] = (shown(old.json()), shown(new.json()))
            assert seen == {
                "list": ([], [task["task_id"]]),
                "stats": (0, 1),
                "history": (1, 2),
                # The replica's log ends at version 1: it does not know version 2, so the primary answers.
                "time travel": ("running", "running"),
                "feed": (["TaskCreated"], ["TaskCreated", "TaskStarted"]),
            }
            # A task the replica has not replayed at all: the primary answers, never a 404.
            unseen = (await client.post("/tasks/", json={"task_type": "unseen"})).json()
            again = await client.get(f"/tasks/{unseen['task_id']}")
            assert (again.status_code, again.json()["version"]) == (200, 1)
            assert (await client.get(f"/tasks/{unseen['task_id']}/history")).status_code == 200
        # Replay resumed: the replica catches up and shows the change without a token too.
        await until(lambda: replica.replayed >= lsn(second), "the replica is seen past the change")
        assert (await client.get(f"/tasks/{task['task_id']}")).json()["version"] == 2


async def test_every_answer_to_a_write_carries_a_token_the_primary_decides_on(
    replicated_app: App, pair: Pair, database: Database
) -> None:
    async with replicated_app() as client:
        await until_serving(client)
        keyed = {"Idempotency-Key": "create-once"}
        task, _ = await created(client, **keyed)
        done = await client.post("/tasks/", json={"task_type": "done"})
        task_id = task["task_id"]
        with pair.paused():
            # The replica has none of these writes: each must still decide on the primary's state.
            answers = {
                "repeat create": await client.post("/tasks/", json={"task_type": "replicated"}, headers=keyed),
                "start": await client.patch(f"/tasks/{task_id}", json={"status": "running"}),
                "no-op": await client.patch(f"/tasks/{task_id}", json={"status": "running"}),
                "progress": await client.patch(f"/tasks/{task_id}", json={"progress": 50}, headers={"If-Match": '"2"'}),
                "complete other": await client.patch(f"/tasks/{done.json()['task_id']}", json={"status": "completed"}),
                "cleanup": await client.post("/tasks/cleanup?days=0"),
                "delete": await client.delete(f"/tasks/{task_id}"),
            }
            statuses = {name: response.status_code for name, response in answers.items()}
            assert statuses == dict.fromkeys(answers, 200) | {"repeat create": 201}
            assert answers["repeat create"].json()["task_id"] == task_id
            assert answers["progress"].json()["version"] == 3
            assert answers["cleanup"].json() == {"deleted": 1}
            tokens = [lsn(response.headers[HEADER]) for response in answers.values()]
            assert tokens == sorted(tokens)
            # A refused write carries one too, at least as late as what it was refused for (the delete).
            refused = await client.patch(f"/tasks/{task_id}", json={"progress": 1})
            assert refused.status_code == 404
            assert lsn(refused.headers[HEADER]) >= tokens[-1]
            assert HEADER not in (await client.post("/nowhere", json={})).headers  # no write: none
            # A read after the delete, with its token, sees the delete.
            gone = await client.get(f"/tasks/{task_id}", headers={HEADER: answers["delete"].headers[HEADER]})
            assert gone.status_code == 404


async def test_a_token_that_cannot_be_read_reads_from_the_primary(
    replicated_app: App, pair: Pair, database: Database
) -> None:
    async with replicated_app() as client:
        _replica, task, token = await created_on_replica(client)
        with pair.paused():
            await client.patch(f"/tasks/{task['task_id']}", json={"progress": 7})
            path = f"/tasks/{task['task_id']}"
            for sent in (ON_PRIMARY, "garbage", "0/0, nonsense", "1/2/3", "x" * 4000, "FFFFFFFF/FFFFFFFF", b"0/\xff"):
                response = await client.get(path, headers={HEADER: sent})
                assert (response.status_code, response.json()["progress"]) == (200, 7), sent
            # Tokens the replica has passed may be read there: it does not have the change.
            for sent in ("0/0", "", f"{token}\t", f"0/1,{token}"):
                response = await client.get(path, headers={HEADER: sent})
                assert (response.status_code, response.json()["progress"]) == (200, 0), sent


async def test_without_replicas_writes_carry_a_token_and_reads_take_any(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post("/tasks/", json={"task_type": "single"})
    token = response.headers[HEADER]
    assert token == ON_PRIMARY
    for sent in (token, "0/0", "garbage"):
        read = await client.get(f"/tasks/{response.json()['task_id']}", headers={HEADER: sent})
        assert read.status_code == 200
    assert HEADER not in read.headers


async def test_cors_lets_browsers_send_and_read_the_token(client: AsyncTestClient[Litestar]) -> None:
    origin = {"Origin": "https://front.example"}
    preflight = await client.options(
        "/tasks/",
        headers=origin | {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": HEADER.lower()},
    )
    assert preflight.status_code in (200, 204)
    assert HEADER.lower() in preflight.headers["access-control-allow-headers"].lower()
    written = await client.post("/tasks/", json={"task_type": "cors"}, headers=origin)
    assert HEADER.lower() in written.headers["access-control-expose-headers"].lower()
    assert written.headers[HEADER]
