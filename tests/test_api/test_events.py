"""GET /events: the global feed through the real app."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from tests.test_api.test_tasks import assert_problem, create, patch

pytestmark = pytest.mark.anyio

EVENT_FIELDS = {"task_id", "cursor", "version", "position", "type", "occurred_at", "data", "metadata"}


async def follow(client: AsyncTestClient, count: int, after: str | None = None, limit: int = 100) -> tuple[list, str]:
    """Page through the feed until `count` events came (others' transactions may hold the horizon back a moment)."""
    events: list[dict] = []
    deadline = time.monotonic() + 30
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} of {count} events came"
        query = {"limit": limit} | ({} if after is None else {"after": after})
        response = await client.get("/events", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        events += page["events"]
        after = page["next_cursor"]
        if not page["events"]:
            await asyncio.sleep(0.02)
    assert after is not None
    return events, after


async def test_an_empty_feed_still_gives_a_cursor(client: AsyncTestClient) -> None:
    page = (await client.get("/events")).json()
    assert page["events"] == []
    assert isinstance(page["next_cursor"], str)
    assert page["next_cursor"]


async def test_the_feed_shows_every_event_as_the_history_does_plus_task_and_cursor(client: AsyncTestClient) -> None:
    task = await create(client, "document_process", file_path="/tmp/test.pdf")
    await patch(client, task["task_id"], status="running", progress=50)
    await patch(client, task["task_id"], status="completed", result={"files_processed": 10})
    events, _ = await follow(client, 3)
    assert [set(event) for event in events] == [EVENT_FIELDS] * 3
    assert [(e["task_id"], e["version"], e["type"]) for e in events] == [
        (task["task_id"], 1, "TaskCreated"),
        (task["task_id"], 2, "TaskStarted"),
        (task["task_id"], 3, "TaskCompleted"),
    ]
    assert events[0]["position"] == task["id"]
    assert events[0]["data"] == {"task_type": "document_process", "params": {"file_path": "/tmp/test.pdf"}}
    assert events[1]["data"] == {"progress": 50.0}
    assert events[2]["data"] == {"result": {"files_processed": 10}, "progress": 100.0}
    assert events[2]["occurred_at"] == (await client.get(f"/tasks/{task['task_id']}")).json()["completed_at"]
    assert events[0]["metadata"].keys() == {"request_id", "actor"}
    assert len({e["cursor"] for e in events}) == 3


async def test_paging_by_cursor_sees_each_event_once_and_polls_from_the_head(client: AsyncTestClient) -> None:
    tasks = [await create(client, f"t{i}") for i in range(5)]
    events, head = await follow(client, 5, limit=2)
    assert [e["task_id"] for e in events] == [t["task_id"] for t in tasks]
    # The head's cursor is there even on an empty page; what commits later follows it.
    page = (await client.get("/events", params={"after": head})).json()
    assert (page["events"], bool(page["next_cursor"])) == ([], True)
    later = await create(client, "later")
    more, _ = await follow(client, 1, after=page["next_cursor"])
    assert [e["task_id"] for e in more] == [later["task_id"]]
    deleted = await client.delete(f"/tasks/{later['task_id']}")
    assert deleted.status_code == 200
    gone, _ = await follow(client, 1, after=more[-1]["cursor"])
    assert [(e["type"], e["data"]) for e in gone] == [("TaskDeleted", {"reason": "request"})]


@pytest.mark.parametrize(
    "query",
    [
        {"after": "nonsense"},
        {"after": "ZXY6MTox"[:-1] + "!"},
        {"after": "aWQ6Mw"},  # a task-list cursor, not a feed cursor
        {"after": "ZXY6LTE6MA"},  # ev:-1:0
        {"after": "ZXY6OTk5OTk5OTk5OTk5OTk5OTk5OTk5OjA"},  # too large
        {"after": "x" * 101},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "-5"},
        {"limit": "ten"},
    ],
)
async def test_a_bad_cursor_or_limit_is_a_422_problem(shared_client: AsyncTestClient, query: dict) -> None:
    body = assert_problem(await shared_client.get("/events", params=query), 422)
    assert body["errors"][0]["field"] in query


async def test_a_cursor_past_the_end_of_the_log_is_a_422_not_a_wait_for_ever(shared_client: AsyncTestClient) -> None:
    """A well-formed cursor never given out (another database's, a typo) would keep a feed empty and a stream silent."""
    task = await create(shared_client, "future")
    head = (await shared_client.get("/events", params={"after": "0-0", "limit": 1000})).json()
    while head["events"]:
        head = (await shared_client.get("/events", params={"after": head["next_cursor"], "limit": 1000})).json()
    assert (await shared_client.get("/events", params={"after": head["next_cursor"]})).status_code == 200
    future = "999999999999-0"
    body = assert_problem(await shared_client.get("/events", params={"after": future}), 422)
    assert body["errors"][0]["field"] == "after"
    assert "past the end of the log" in body["detail"]
    refused = await shared_client.get("/events/stream", headers={"Last-Event-ID": future})
    assert assert_problem(refused, 422)["errors"][0]["field"] == "Last-Event-ID"
    refused = await shared_client.get(f"/tasks/{task['task_id']}/stream", params={"after": future})
    assert assert_problem(refused, 422)["errors"][0]["field"] == "after"


async def test_a_cursor_inside_the_transaction_the_head_waits_on_is_past_the_end(
    client: AsyncTestClient, database_url: str
) -> None:
    # Audit: the head's transaction with a position was taken, and the events that transaction then
    # wrote below the position were never shown to a client polling from it.
    task = await create(client, "future")
    with psycopg.connect(database_url) as open_transaction:  # the head stays at or below it until it ends
        (txid,) = open_transaction.execute("SELECT txid_current()").fetchone()
        forged = f"{txid}-999999999"
        body = assert_problem(await client.get("/events", params={"after": forged}), 422)
        assert "past the end of the log" in body["detail"]
        refused = await client.get("/events/stream", headers={"Last-Event-ID": forged})
        assert assert_problem(refused, 422)["errors"][0]["field"] == "Last-Event-ID"
        refused = await client.get(f"/tasks/{task['task_id']}/stream", params={"after": forged})
        assert assert_problem(refused, 422)["errors"][0]["field"] == "after"
        assert (await client.get("/events", params={"after": f"{txid}-0"})).status_code == 200
