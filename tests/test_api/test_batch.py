"""Batch writes (SPEC §12): POST and PATCH /tasks/batch, through the real app and real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from collections import Counter
from collections.abc import Awaitable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from litestar.testing import AsyncTestClient

from tasktrail import db, metrics
from tests.conftest import Server, assert_verifies, fresh_database, holding
from tests.sse import messages
from tests.test_api.test_tasks import assert_problem

pytestmark = pytest.mark.anyio

UNKNOWN = "0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f"
DEEP = {"a": {"b": json.loads("[" * 32 + "1" + "]" * 32)}}  # 34 levels: deeper than params may be


async def create_batch(client: AsyncTestClient, *task_types: str, **headers: str) -> list[dict]:
    body = {"tasks": [{"task_type": task_type} for task_type in task_types]}
    response = await client.post("/tasks/batch", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["tasks"]


async def patch_batch(client: AsyncTestClient, *updates: dict) -> list[dict]:
    response = await client.patch("/tasks/batch", json={"updates": list(updates)})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    results = response.json()["results"]
    assert [r["task_id"] for r in results] == [u["task_id"] for u in updates]
    return results


async def history(client: AsyncTestClient, task_id: str) -> list[dict]:
    response = await client.get(f"/tasks/{task_id}/history")
    assert response.status_code == 200, response.text
    return response.json()["events"]


async def event_count(client: AsyncTestClient) -> int:
    """How many events the feed shows, page by page."""
    count, params = 0, {"limit": 1000}
    while events := (page := (await client.get("/events", params=params)).json())["events"]:
        count += len(events)
        params["after"] = page["next_cursor"]
    return count


# --- POST /tasks/batch ---------------------------------------------------------


async def test_a_batch_creates_every_task_in_order_as_single_creates_answer_them(client: AsyncTestClient) -> None:
    body = {"tasks": [{"task_type": "import", "params": {"row": n}} for n in range(5)] + [{"task_type": "mail"}]}
    response = await client.post("/tasks/batch", json=body, headers={"X-Request-ID": "bulk1"})
    assert response.status_code == 201, response.text
    tasks = response.json()["tasks"]
    assert [(t["task_type"], t["params"]) for t in tasks] == [(t["task_type"], t.get("params")) for t in body["tasks"]]
    assert [t["id"] for t in tasks] == sorted(t["id"] for t in tasks)  # the log numbered them in order
    single = (await client.post("/tasks/", json={"task_type": "mail"})).json()
    assert single.keys() == tasks[-1].keys()
    for task in tasks:
        assert (await client.get(f"/tasks/{task['task_id']}")).json() == task
        assert (task["status"], task["version"], task["progress"]) == ("pending", 1, 0.0)
        (event,) = await history(client, task["task_id"])
        assert event["type"] == "TaskCreated"
        assert event["metadata"] == {"request_id": "bulk1", "actor": None}
    (event,) = await history(client, single["task_id"])
    assert event["data"] == {"task_type": "mail"} == (await history(client, tasks[-1]["task_id"]))[0]["data"]
    # The list is newest first: the batch's last item is the newest of it.
    listed = (await client.get("/tasks/", params={"task_type": "import"})).json()
    assert [t["task_id"] for t in listed] == [t["task_id"] for t in reversed(tasks[:5])]
    assert (await client.get("/tasks/stats/summary")).json()["pending"] == 7


async def test_an_idempotency_key_covers_the_whole_batch(client: AsyncTestClient) -> None:
    key = {"Idempotency-Key": "import-2026-12-03"}
    first = await create_batch(client, "a", "b", "c", **key)
    await patch_batch(client, {"task_id": first[1]["task_id"], "status": "running"})
    again = await create_batch(client, "a", "b", "c", **key)
    # The same tasks, as they are now; nothing appended.
    assert [t["task_id"] for t in again] == [t["task_id"] for t in first]
    assert again[1]["status"] == "running"
    assert again[0] == first[0]
    assert await event_count(client) == 4
    (created, _) = await history(client, first[1]["task_id"])
    assert created["metadata"]["idempotency_key"] == "import-2026-12-03"
    # Another body (other tasks, or the same in another order) with the key: 422.
    for other in (["a", "b"], ["c", "b", "a"], ["a", "b", "c", "d"]):
        body = {"tasks": [{"task_type": t} for t in other]}
        reused = assert_problem(await client.post("/tasks/batch", json=body, headers=key), 422)
        assert reused["errors"][0]["field"] == "Idempotency-Key"
    # A key of a single create is another body for a batch, and the reverse, even for the "same" task.
    single_key = {"Idempotency-Key": "one"}
    assert (await client.post("/tasks/", json={"task_type": "a"}, headers=single_key)).status_code == 201
    assert_problem(await client.post("/tasks/batch", json={"tasks": [{"task_type": "a"}]}, headers=single_key), 422)
    batch_key = {"Idempotency-Key": "many"}
    await create_batch(client, "a", **batch_key)
    assert_problem(await client.post("/tasks/", json={"task_type": "a"}, headers=batch_key), 422)
    assert await event_count(client) == 6


async def test_a_repeat_after_one_of_the_tasks_was_deleted_is_404(client: AsyncTestClient) -> None:
    key = {"Idempotency-Key": "k"}
    first = await create_batch(client, "a", "b", **key)
    assert (await client.delete(f"/tasks/{first[1]['task_id']}")).status_code == 200
    body = {"tasks": [{"task_type": "a"}, {"task_type": "b"}]}
    gone = assert_problem(await client.post("/tasks/batch", json=body, headers=key), 404)
    assert first[1]["task_id"] in gone["detail"]
    assert await event_count(client) == 3


async def test_concurrent_repeats_of_a_keyed_batch_create_it_once(client: AsyncTestClient) -> None:
    body = {"tasks": [{"task_type": f"t{n}"} for n in range(20)]}
    key = {"Idempotency-Key": "raced"}
    answers = await asyncio.gather(*(client.post("/tasks/batch", json=body, headers=key) for _ in range(6)))
    assert {a.status_code for a in answers} == {201}
    assert len({json.dumps([t["task_id"] for t in a.json()["tasks"]]) for a in answers}) == 1
    assert await event_count(client) == 20


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": [{"task_type": "x"}] * 1001}, "tasks"),
        ({}, "tasks"),
        ({"tasks": {"task_type": "x"}}, "tasks"),
        ({"tasks": [{"task_type": "x"}] * 3 + [{"task_type": 5}]}, "tasks[3].task_type"),
        ({"tasks": [{"task_type": "x"}, {}]}, "tasks[1].task_type"),
        ({"tasks": [{"task_type": "x"}, {"task_type": ""}]}, "tasks[1].task_type"),
        ({"tasks": [{"task_type": "x"}, {"task_type": "a\u0000b"}]}, "tasks[1].task_type"),
        ({"tasks": [{"task_type": "x"}, {"task_type": "y", "params": [1]}]}, "tasks[1].params"),
        ({"tasks": [{"task_type": "x"}, {"task_type": "y", "params": {"k": "v\u0000"}}]}, "tasks[1].params"),
        (
            {
                "tasks": [{"task_type": "x"}] * 2
                + [
                    {
                        "task_type": "y",
                        "params": {"a": {"b": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}},
                    }
                ]
            },
            "tasks[2].params",
        ),
        ({"tasks": [{"task_type": "x"}, {"task_type": "y", "params": {"big": "x" * 70_000}}]}, "tasks[1].params"),
        ({"tasks": ["x"]}, "tasks[0]"),
    ],
)
async def test_a_malformed_batch_is_a_422_naming_the_item_and_writes_nothing(
    shared_client: AsyncTestClient, body: dict, field: str
) -> None:
    before = (await shared_client.get("/tasks/stats/summary")).json()["total"]
    problem = assert_problem(await shared_client.post("/tasks/batch", json=body), 422)
    assert problem["errors"][0]["field"] == field, problem
    assert field in problem["detail"]
    assert (await shared_client.get("/tasks/stats/summary")).json()["total"] == before


async def test_a_malformed_batch_names_every_bad_item_not_only_the_first(shared_client: AsyncTestClient) -> None:
    body = {"tasks": [{"task_type": 5}, None, "x", {"task_type": "ok"}, {"params": {}}]}
    problem = assert_problem(await shared_client.post("/tasks/batch", json=body), 422)
    named = [error["field"] for error in problem["errors"]]
    assert named == ["tasks[0].task_type", "tasks[1]", "tasks[2]", "tasks[4].task_type"], problem
    assert "(and 3 more: see errors)" in problem["detail"]


async def test_bodies_that_are_not_a_batch(shared_client: AsyncTestClient) -> None:
    json_type = {"Content-Type": "application/json"}
    assert_problem(await shared_client.post("/tasks/batch", content=b"{nope", headers=json_type), 400)
    assert_problem(await shared_client.patch("/tasks/batch", content=b'{"updates": ', headers=json_type), 400)
    assert_problem(await shared_client.post("/tasks/batch", content=b"", headers=json_type), 422)
    text = {"Content-Type": "text/plain"}
    batch = b'{"tasks": [{"task_type": "x"}]}'
    assert_problem(await shared_client.post("/tasks/batch", content=batch, headers=text), 415)
    huge = {"tasks": [{"task_type": "x", "params": {"pad": "y" * 60_000}}] * 20}  # each item allowed, the body not
    assert_problem(await shared_client.post("/tasks/batch", json=huge), 413)
    updates = {"updates": [{"task_id": UNKNOWN, "result": {"pad": "y" * 60_000}}] * 20}
    assert_problem(await shared_client.patch("/tasks/batch", json=updates), 413)


async def test_the_batch_path_is_not_a_task_id(shared_client: AsyncTestClient) -> None:
    for method in ("GET", "DELETE", "PUT"):
        response = await shared_client.request(method, "/tasks/batch")
        assert response.status_code in (404, 405), (method, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    options = await shared_client.options("/tasks/batch")
    assert options.headers["allow"] == "OPTIONS, PATCH, POST"
    # A single PATCH or DELETE of a task is still routed to it.
    (task,) = await create_batch(shared_client, "x")
    assert (await shared_client.patch(f"/tasks/{task['task_id']}", json={"progress": 5})).status_code == 200
    assert (await shared_client.get("/tasks/batch/history")).status_code == 404


# --- PATCH /tasks/batch --------------------------------------------------------


async def test_each_item_is_decided_on_its_own_and_answered_as_a_single_patch_would(client: AsyncTestClient) -> None:
    a, b, c, d = await create_batch(client, "a", "b", "c", "d")
    await patch_batch(client, {"task_id": b["task_id"], "status": "completed"})
    assert (await client.delete(f"/tasks/{d['task_id']}")).status_code == 200
    before = await event_count(client)
    results = await patch_batch(
        client,
        {"task_id": a["task_id"], "status": "running", "progress": 10},
        {"task_id": b["task_id"], "progress": 50},  # completed is final: 409
        {"task_id": UNKNOWN, "progress": 5},  # never existed: 404
        {"task_id": d["task_id"], "progress": 5},  # deleted: 404 that says so
        {"task_id": c["task_id"], "progress": 5, "if_version": 7},  # 412
        {"task_id": c["task_id"], "progress": 5, "if_version": 0},  # no task is at 0: 412, as If-Match: "0" is
        {"task_id": c["task_id"], "progress": 5, "if_version": 2**63},  # nor past what a version column holds
        {"task_id": b["task_id"], "status": "completed"},  # asking for the status it has: a no-op, 200
        {"task_id": c["task_id"], "progress": 0.0},  # changes nothing: 200, appends nothing
    )
    assert [r["status"] for r in results] == [200, 409, 404, 404, 412, 412, 412, 200, 200]
    assert results[0]["task"]["status"] == "running"
    assert results[0]["task"] == (await client.get(f"/tasks/{a['task_id']}")).json()
    assert results[7]["task"] == (await client.get(f"/tasks/{b['task_id']}")).json()
    assert results[8]["task"] == c
    assert await event_count(client) == before + 1
    # Each refusal is the problem the single PATCH gives for the same request.
    singles = [
        await client.patch(f"/tasks/{b['task_id']}", json={"progress": 50}),
        await client.patch(f"/tasks/{UNKNOWN}", json={"progress": 5}),
        await client.patch(f"/tasks/{d['task_id']}", json={"progress": 5}),
        await client.patch(f"/tasks/{c['task_id']}", json={"progress": 5}, headers={"If-Match": '"7"'}),
        await client.patch(f"/tasks/{c['task_id']}", json={"progress": 5}, headers={"If-Match": '"0"'}),
        await client.patch(f"/tasks/{c['task_id']}", json={"progress": 5}, headers={"If-Match": f'"{2**63}"'}),
    ]
    for index, (result, single) in enumerate(zip(results[1:7], singles, strict=True)):
        answer = single.json()
        if index >= 4:  # If-Match names no version in "0" or 2**63 (none is written so); if_version is a number
            assert answer["detail"].endswith("not any version If-Match named")
            answer["detail"] = answer["detail"].replace("any version If-Match named", str([0, 2**63][index - 4]))
        assert result["problem"] == answer
        assert result["status"] == single.status_code
        assert "task" not in result
    assert results[1]["problem"]["current_status"] == "completed"
    assert results[1]["problem"]["allowed"] == []
    assert "deleted" in results[3]["problem"]["detail"]


async def test_a_task_named_twice_is_decided_in_order(client: AsyncTestClient) -> None:
    a, b = await create_batch(client, "a", "b")
    results = await patch_batch(
        client,
        {"task_id": a["task_id"], "status": "running"},
        {"task_id": b["task_id"], "status": "completed"},
        {"task_id": a["task_id"], "progress": 40},
        {"task_id": b["task_id"], "progress": 40},  # b is completed by now: 409
        {"task_id": a["task_id"], "status": "failed", "error": "disk full", "if_version": 3.0},  # JSON's 3.0 is 3
        {"task_id": a["task_id"], "status": "pending", "if_version": 3},  # a is at 4 now: 412
        {"task_id": a["task_id"], "status": "pending"},
        {"task_id": a["task_id"], "status": "pending"},  # no-op
    )
    assert [r["status"] for r in results] == [200, 200, 200, 409, 200, 412, 200, 200]
    assert [r["task"]["version"] for r in results if r["status"] == 200] == [2, 2, 3, 4, 5, 5]
    events = await history(client, a["task_id"])
    assert [e["type"] for e in events] == [
        "TaskCreated",
        "TaskStarted",
        "ProgressReported",
        "TaskFailed",
        "TaskRetried",
    ]
    assert [e["version"] for e in events] == [1, 2, 3, 4, 5]
    final = (await client.get(f"/tasks/{a['task_id']}")).json()
    assert final == results[-1]["task"]
    assert (final["status"], final["retry_count"], final["error"], final["started_at"]) == ("pending", 1, None, None)
    # Positions follow the items: the feed shows the batch as if it came request by request.
    feed = (await client.get("/events")).json()["events"][2:]
    assert [(e["task_id"], e["type"]) for e in feed] == [
        (a["task_id"], "TaskStarted"),
        (b["task_id"], "TaskCompleted"),
        (a["task_id"], "ProgressReported"),
        (a["task_id"], "TaskFailed"),
        (a["task_id"], "TaskRetried"),
    ]


async def test_a_task_named_twice_is_found_between_its_items_by_time_travel(client: AsyncTestClient) -> None:
    # Audit: every event of a batch had one time, so ?as_of= the first change found the task after the last,
    # and a task run and failed in one batch had started_at == completed_at.
    (task,) = await create_batch(client, "twice")
    steps = ["running", "failed", "pending"]
    results = await patch_batch(client, *({"task_id": task["task_id"], "status": step} for step in steps))
    assert [r["status"] for r in results] == [200, 200, 200]
    times = [e["occurred_at"] for e in await history(client, task["task_id"])]
    assert times == sorted(set(times)), times  # one each, in version order
    for version, at in enumerate(times[1:], start=2):
        then = await client.get(f"/tasks/{task['task_id']}", params={"as_of": at})
        assert then.status_code == 200, then.text
        assert then.json() == results[version - 2]["task"]
    failed = results[1]["task"]
    assert failed["started_at"] < failed["completed_at"]


async def test_delete_items_append_what_delete_does(client: AsyncTestClient) -> None:
    a, b, c = await create_batch(client, "a", "b", "c")
    single = await client.delete(f"/tasks/{c['task_id']}", headers={"X-Request-ID": "one"})
    assert single.status_code == 200
    response = await client.patch(
        "/tasks/batch",
        json={
            "updates": [
                {"task_id": a["task_id"], "delete": True},
                {"task_id": a["task_id"], "progress": 5},  # deleted by the item before
                {"task_id": a["task_id"], "delete": True},
                {"task_id": b["task_id"], "delete": True, "if_version": 2},  # 412: b is at 1
                {"task_id": b["task_id"], "delete": False, "status": "running"},
            ]
        },
        headers={"X-Request-ID": "many"},
    )
    results = response.json()["results"]
    assert results[0] == {"task_id": a["task_id"], "status": 200, "deleted": True}
    assert [r["status"] for r in results] == [200, 404, 404, 412, 200]
    assert "deleted" in results[1]["problem"]["detail"]
    assert (await client.get(f"/tasks/{a['task_id']}")).status_code == 404
    deleted_in_batch = (await history(client, a["task_id"]))[-1]
    deleted_alone = (await history(client, c["task_id"]))[-1]
    assert deleted_in_batch["type"] == deleted_alone["type"] == "TaskDeleted"
    assert deleted_in_batch["data"] == deleted_alone["data"] == {"reason": "request"}
    assert (deleted_in_batch["metadata"], deleted_alone["metadata"]) == (
        {"request_id": "many", "actor": None},
        {"request_id": "one", "actor": None},
    )
    summary = (await client.get("/tasks/stats/summary")).json()
    assert (summary["total"], summary["running"]) == (1, 1)


async def test_batch_and_single_requests_append_the_same_events(client: AsyncTestClient) -> None:
    """The same requests, one task by single requests, the other in batches: the same history."""
    steps = [
        {"status": "running", "progress": 5.5},
        {"progress": 30},
        {"result": {"pages": 3}},
        {"error": "slow disk"},
        {"status": "pending"},
        {"status": "running"},
        {"status": "completed", "result": {"pages": 7}},
    ]
    single, batched = await create_batch(client, "t", "t")
    for step in steps:
        assert (await client.patch(f"/tasks/{single['task_id']}", json=step)).status_code == 200
    await patch_batch(client, *({"task_id": batched["task_id"]} | step for step in steps[:3]))
    await patch_batch(client, *({"task_id": batched["task_id"]} | step for step in steps[3:]))

    def shape(events: list[dict]) -> list[tuple]:
        return [(e["version"], e["type"], e["data"], sorted(e["metadata"])) for e in events]

    assert shape(await history(client, batched["task_id"])) == shape(await history(client, single["task_id"]))
    one, other = [(await client.get(f"/tasks/{t['task_id']}")).json() for t in (single, batched)]
    different = {"id", "task_id", "created_at", "updated_at", "started_at", "completed_at"}
    assert {k: v for k, v in one.items() if k not in different} == {
        k: v for k, v in other.items() if k not in different
    }


LIVE = "live"  # stands for the test's live task: the valid items would change it, were the batch accepted


@pytest.mark.parametrize(
    ("updates", "field"),
    [
        ([], "updates"),
        ([{"task_id": LIVE, "progress": 1}] * 1001, "updates"),
        ([{"task_id": LIVE, "progress": 1}, {"progress": 1}], "updates[1].task_id"),
        ([{"task_id": LIVE, "progress": 1}, {"task_id": "abc-123", "progress": 1}], "updates[1].task_id"),
        ([{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "status": "done"}], "updates[1].status"),
        ([{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "progress": 101}], "updates[1].progress"),
        ([{"task_id": LIVE, "progress": -1}], "updates[0].progress"),
        ([{"task_id": LIVE, "progress": "50"}], "updates[0].progress"),
        ([{"task_id": LIVE, "progress": 1}] * 3 + [{"task_id": LIVE}], "updates[3]"),
        ([{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "status": None, "progress": None}], "updates[1]"),
        ([{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "delete": False}], "updates[1]"),
        (
            [{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "delete": True, "status": "running"}],
            "updates[1].delete",
        ),
        ([{"task_id": LIVE, "delete": "yes"}], "updates[0].delete"),
        ([{"task_id": LIVE, "progress": 1, "if_version": "1"}], "updates[0].if_version"),
        (
            [{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "progress": 2, "if_version": 1.5}],
            "updates[1].if_version",
        ),
        ([{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "error": "a\u0000"}], "updates[1].error"),
        ([{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "result": {"a": "\u0000"}}], "updates[1].result"),
        ([{"task_id": LIVE, "progress": 1}, {"task_id": LIVE, "result": {"big": "x" * 70_000}}], "updates[1].result"),
        ([{"task_id": LIVE, "result": "done"}], "updates[0].result"),
        ([{"task_id": LIVE, "progress": 1}, "x"], "updates[1]"),
    ],
)
async def test_a_malformed_update_batch_is_a_422_naming_the_item_and_writes_nothing(
    client: AsyncTestClient, updates: list, field: str
) -> None:
    (task,) = await create_batch(client, "x")
    body = json.loads(json.dumps({"updates": updates}).replace(f'"{LIVE}"', f'"{task["task_id"]}"'))
    problem = assert_problem(await client.patch("/tasks/batch", json=body), 422)
    assert problem["errors"][0]["field"] == field, problem
    assert field in problem["detail"]
    assert (await client.get(f"/tasks/{task['task_id']}")).json() == task


async def test_the_checks_after_the_types_name_every_bad_item_too(shared_client: AsyncTestClient) -> None:
    # Audit: an item that asks for nothing, a delete with a change, an if_version of 1.5 and a params over
    # the cap were checked once every type was right, and the first such fault was the only one named.
    (task,) = await create_batch(shared_client, "x")
    tid = task["task_id"]
    updates = [
        {"task_id": tid, "progress": 1, "if_version": 1.5},
        {"task_id": tid},
        {"task_id": tid, "progress": 2},
        {"task_id": tid, "delete": True, "progress": 5, "if_version": 2.5},
    ]
    problem = assert_problem(await shared_client.patch("/tasks/batch", json={"updates": updates}), 422)
    named = [error["field"] for error in problem["errors"]]
    assert named == ["updates[0].if_version", "updates[1]", "updates[3].delete", "updates[3].if_version"], problem
    assert problem["detail"].endswith("(and 3 more: see errors)")
    big = {"pad": "y" * 70_000}
    items = [{"task_type": "x", "params": big}, {"task_type": "x"}, {"task_type": "x", "params": big}]
    problem = assert_problem(await shared_client.post("/tasks/batch", json={"tasks": items}), 422)
    assert [error["field"] for error in problem["errors"]] == ["tasks[0].params", "tasks[2].params"], problem
    assert (await shared_client.get(f"/tasks/{tid}")).json() == task


async def test_if_match_on_a_batch_is_refused(shared_client: AsyncTestClient) -> None:
    (task,) = await create_batch(shared_client, "x")
    body = {"updates": [{"task_id": task["task_id"], "progress": 3}]}
    problem = assert_problem(await shared_client.patch("/tasks/batch", json=body, headers={"If-Match": '"1"'}), 422)
    assert problem["errors"][0]["field"] == "If-Match"
    assert (await shared_client.get(f"/tasks/{task['task_id']}")).json()["version"] == 1


# --- Real servers: races, and the streams ---------------------------------------


@pytest.fixture
def two_servers(database_url: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two real server processes on one database: their batches race in PostgreSQL, not in one event loop."""
    env = os.environ | {"DATABASE_URL": database_url}
    servers = [Server(env, log_dir=tmp_path) for _ in range(2)]
    try:
        yield [server.url for server in servers]
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        assert "Traceback" not in server.log(), server.log()
    assert_verifies(database_url)


async def test_batches_and_single_requests_racing_on_the_same_tasks_lose_nothing(
    two_servers: list[str], database_url: str
) -> None:
    rng = random.Random(14)  # noqa: S311 -- a test's workload, not a secret
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for url in two_servers]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        created = (await clients[0].post("/tasks/batch", json={"tasks": [{"task_type": "r"}] * 30})).json()["tasks"]
        singles = [(await clients[1].post("/tasks/", json={"task_type": "s"})).json() for _ in range(3)]
        ids = [t["task_id"] for t in created + singles]
        moves = [
            lambda: {"progress": rng.random() * 100},  # never the value it has: never a no-op
            lambda: {"status": "running", "progress": rng.random() * 100},
            lambda: {"status": rng.choice(["completed", "failed", "canceled"]), "result": {"n": rng.random()}},
            lambda: {"status": "pending", "progress": rng.random() * 100},
        ]

        def item() -> dict:
            task_id = rng.choice(ids[:12])  # few tasks, many writers: races on every batch
            if rng.random() < 0.02:
                return {"task_id": task_id, "delete": True}
            return {"task_id": task_id} | rng.choice(moves)()

        async def batch(client: httpx.AsyncClient) -> list[tuple[dict, dict]]:
            items = [item() for _ in range(rng.randint(1, 25))]
            rng.shuffle(items)
            response = await client.patch("/tasks/batch", json={"updates": items})
            assert response.status_code == 200, response.text
            return list(zip(items, response.json()["results"], strict=True))

        async def single(client: httpx.AsyncClient) -> list[tuple[dict, dict]]:
            change = item()
            task_id = change.pop("task_id")
            if change.pop("delete", False):
                response = await client.delete(f"/tasks/{task_id}")
            else:
                response = await client.patch(f"/tasks/{task_id}", json=change)
            assert response.status_code in (200, 404, 409), response.text
            body = response.json()
            result = {"status": response.status_code} | ({"task": body} if "version" in body else {})
            return [({"task_id": task_id}, result)]

        # Fewer requests in flight than a server has pooled connections: more would wait for one, and
        # on a busy machine a wait past the pool's timeout is a 503 (SPEC §8's fail-fast), not a race.
        in_flight = asyncio.Semaphore(12)

        async def limited(work: Awaitable[list[tuple[dict, dict]]]) -> list[tuple[dict, dict]]:
            async with in_flight:
                return await work

        # Also one batch creating tasks while the others race.
        more = clients[1].post("/tasks/batch", json={"tasks": [{"task_type": "late"}] * 50})
        work = [limited(rng.choice([batch, batch, single])(rng.choice(clients))) for _ in range(80)]
        answers = await asyncio.gather(more, *work)
    assert answers[0].status_code == 201
    outcomes = [pair for answer in answers[1:] for pair in answer]
    statuses = Counter(result["status"] for _, result in outcomes)
    assert set(statuses) <= {200, 404, 409}
    assert statuses[200] > 50
    assert statuses[409] > 0
    # Every accepted item appended exactly one event, and no refused one did: the log holds the 33 + 50
    # creates and one event per 200 (no move here is a no-op).
    with psycopg.connect(database_url, **db.connect_kwargs()) as conn:
        (events,) = conn.execute("SELECT count(*) FROM events").fetchone()  # type: ignore[misc]
        gaps = conn.execute(
            "SELECT stream_id FROM events GROUP BY stream_id HAVING max(version) <> count(*)"
        ).fetchall()
    assert events == 33 + 50 + statuses[200]
    assert gaps == []
    # Versions answered for one task are each a different event.
    versions = Counter((item["task_id"], r["task"]["version"]) for item, r in outcomes if "task" in r)
    assert max(versions.values()) == 1


async def test_batches_on_the_same_tasks_lose_a_race_at_most_once(two_servers: list[str], database_url: str) -> None:
    """A batch that lost a race locks its tasks before it reads them again: it loses no second race to a batch."""
    clients = [httpx.AsyncClient(base_url=url, timeout=60) for url in two_servers]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        created = (await clients[0].post("/tasks/batch", json={"tasks": [{"task_type": "b"}] * 40})).json()["tasks"]
        ids = [task["task_id"] for task in created]
        in_flight = asyncio.Semaphore(12)

        async def batch(n: int) -> httpx.Response:
            order = ids[n % 40 :] + ids[: n % 40]  # the same tasks, each batch starting elsewhere
            async with in_flight:
                updates = [{"task_id": task_id, "progress": n + 1} for task_id in order]
                return await clients[n % 2].patch("/tasks/batch", json={"updates": updates})

        answers = await asyncio.gather(*(batch(n) for n in range(30)))
        conflicts = 0.0
        for client in clients:
            for line in (await client.get("/metrics")).text.splitlines():
                if line.startswith("tasktrail_write_conflicts_total "):
                    conflicts += float(line.split()[1])
    assert [answer.status_code for answer in answers] == [200] * 30
    assert {result["status"] for answer in answers for result in answer.json()["results"]} == {200}
    assert conflicts <= 30  # the code before lost again and again: 246 races for these 30 batches
    with psycopg.connect(database_url, **db.connect_kwargs()) as conn:
        counts = conn.execute("SELECT count(*) FROM events GROUP BY stream_id").fetchall()
    assert counts == [(31,)] * 40  # created, then one progress report from each batch


async def test_a_batch_does_not_wait_for_another_batch_writing_other_tasks(
    client: AsyncTestClient, database_url: str
) -> None:
    """An optimistic batch holds its buckets' locks shared: one on other tasks writes meanwhile (it waited)."""
    (task,) = await create_batch(client, "a")
    async with await psycopg.AsyncConnection.connect(database_url) as other, other.transaction():
        # What a batch of 1,000 holds while it writes: every bucket, shared.
        await other.execute("SELECT pg_advisory_xact_lock_shared(%s, b) FROM generate_series(0, 63) b", [0x7474])
        (result,) = await patch_batch(client, {"task_id": task["task_id"], "progress": 5})
    assert result["status"] == 200
    assert result["task"]["version"] == 2


async def test_a_batch_gives_up_waiting_for_a_write_of_the_same_task_and_tries_again_locked(
    client: AsyncTestClient, database_url: str
) -> None:
    """Two batches on the same tasks may wait for each other: the first attempt waits 100 ms, not a deadlock's 1 s."""
    (task,) = await create_batch(client, "a")
    conflicts = metrics.REGISTRY.get_sample_value("tasktrail_write_conflicts_total") or 0.0

    # Another writer's uncommitted version 2 of the task, given up after 0.5 s.
    uncommitted = "INSERT INTO events (stream_id, version, type, data, occurred_at) VALUES (%s, 2, 'x', '{}', now())"
    with holding(database_url, uncommitted, [task["task_id"]], seconds=0.5):
        (result,) = await patch_batch(client, {"task_id": task["task_id"], "progress": 5})
    assert result["status"] == 200
    assert result["task"]["version"] == 2
    # It gave up its first attempt's wait (a lost race), then waited its turn with the locks taken first.
    assert metrics.REGISTRY.get_sample_value("tasktrail_write_conflicts_total") == conflicts + 1


async def test_a_batch_that_gives_up_waiting_for_a_counter_tries_again_and_lost_no_race(
    client: AsyncTestClient, database_url: str
) -> None:
    """Another transaction holds the counters for 0.5 s: the batch waits that out, with no lost race counted."""
    (task,) = await create_batch(client, "a")
    conflicts = metrics.REGISTRY.get_sample_value("tasktrail_write_conflicts_total") or 0.0
    with holding(database_url, "LOCK TABLE task_counts IN SHARE MODE", seconds=0.5):  # no counter changes meanwhile
        (result,) = await patch_batch(client, {"task_id": task["task_id"], "status": "running"})
    assert result["status"] == 200
    assert result["task"]["status"] == "running"
    assert metrics.REGISTRY.get_sample_value("tasktrail_write_conflicts_total") == conflicts


async def test_a_batch_commits_under_the_sessions_lock_timeout_not_its_statements(
    client: AsyncTestClient, database_url: str
) -> None:
    """The 100 ms a batch's statement waits at most do not apply to its commit, which may queue behind others'."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        # What lock_timeout is when the batch's transaction commits: a deferred trigger runs then.
        conn.execute(
            """
            CREATE TABLE at_commit (lock_timeout text);
            CREATE FUNCTION note_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO at_commit VALUES (current_setting('lock_timeout')); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER note_at_commit AFTER INSERT ON events
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION note_at_commit();
            """
        )
    (task,) = await create_batch(client, "a")
    await patch_batch(client, {"task_id": task["task_id"], "progress": 5})
    with psycopg.connect(database_url, autocommit=True) as conn:
        noted = conn.execute("SELECT lock_timeout FROM at_commit").fetchall()
        conn.execute("DROP TRIGGER note_at_commit ON events")
    assert noted == [(db.lock_timeout(),)] * 2  # the create's commit, then the update's


@pytest.fixture(scope="module")
def stream_server(server_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database(server_url, template_db) as url:
        env = os.environ | {"DATABASE_URL": url, "TASKTRAIL_SSE_PING_SECONDS": "0.3", "TASKTRAIL_POLL_SECONDS": "0.2"}
        server = Server(env, log_dir=tmp_path_factory.mktemp("stream"))
        yield server.url
        assert server.stop(signal.SIGINT) == 0
        assert_verifies(url)


def test_the_streams_show_a_batch_event_by_event_in_order(stream_server: str) -> None:
    base = stream_server
    timeout = httpx.Timeout(30)
    start = httpx.get(f"{base}/events").json()["next_cursor"]
    a, b = httpx.post(f"{base}/tasks/batch", json={"tasks": [{"task_type": "a"}, {"task_type": "b"}]}).json()["tasks"]
    updates = [
        {"task_id": a["task_id"], "status": "running"},
        {"task_id": b["task_id"], "progress": 10},
        {"task_id": a["task_id"], "progress": 50},
        {"task_id": b["task_id"], "delete": True},
        {"task_id": a["task_id"], "status": "completed"},
    ]
    with (
        httpx.stream("GET", f"{base}/events/stream", params={"after": start}, timeout=timeout) as every,
        httpx.stream("GET", f"{base}/tasks/{a['task_id']}/stream", timeout=timeout) as one,
    ):
        lines = one.iter_lines()
        (snapshot,) = messages(lines, 1)
        response = httpx.patch(f"{base}/tasks/batch", json={"updates": updates})
        assert [r["status"] for r in response.json()["results"]] == [200] * 5
        seen = messages(every.iter_lines(), 7)
        mine = messages(lines)  # to the end: the task stream closes after completed
    assert snapshot.json() == a
    assert [(m.event, m.json()["task_id"]) for m in seen] == [
        ("TaskCreated", a["task_id"]),
        ("TaskCreated", b["task_id"]),
        ("TaskStarted", a["task_id"]),
        ("ProgressReported", b["task_id"]),
        ("ProgressReported", a["task_id"]),
        ("TaskDeleted", b["task_id"]),
        ("TaskCompleted", a["task_id"]),
    ]
    assert len({m.id for m in seen}) == 7
    feed = httpx.get(f"{base}/events", params={"after": start}).json()["events"]
    assert [m.json() for m in seen] == feed
    assert [(m.event, m.json()["version"]) for m in mine] == [
        ("TaskStarted", 2),
        ("ProgressReported", 3),
        ("TaskCompleted", 4),
    ]
    assert [m.json() for m in mine] == [e for e in feed if e["task_id"] == a["task_id"]][1:]


async def test_a_thousand_items_each_way_and_a_batch_of_no_ops(client: AsyncTestClient) -> None:
    tasks = await create_batch(client, *(f"t{n % 7}" for n in range(1000)))
    assert len({t["task_id"] for t in tasks}) == 1000
    updates = [{"task_id": t["task_id"], "status": "running", "progress": n / 10} for n, t in enumerate(tasks)]
    results = await patch_batch(client, *updates)
    assert {r["status"] for r in results} == {200}
    assert [r["task"]["progress"] for r in results] == [u["progress"] for u in updates]
    summary = (await client.get("/tasks/stats/summary")).json()
    assert (summary["total"], summary["running"], summary["pending"]) == (1000, 1000, 0)
    before = await event_count(client)
    same = await patch_batch(client, *({"task_id": u["task_id"], "status": "running"} for u in updates[:50]))
    assert [r["task"] for r in same] == [r["task"] for r in results[:50]]
    assert await event_count(client) == before
