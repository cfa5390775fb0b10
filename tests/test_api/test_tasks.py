"""The seed-compatible task API, through the real app and a real PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from tasktrail import writer
from tasktrail.domain.task import Status, Task, UpdateTask
from tasktrail.projections import tasks as tasks_view
from tests.conftest import holding

pytestmark = pytest.mark.anyio

FIELDS = {
    "id", "task_id", "task_type", "status", "progress", "params", "result", "error", "retry_count",
    "created_at", "updated_at", "started_at", "completed_at", "version",
}  # fmt: skip


async def create(client: AsyncTestClient, task_type: str = "document_process", **params: object) -> dict:
    response = await client.post("/tasks/", json={"task_type": task_type, "params": params or None})
    assert response.status_code == 201, response.text
    return response.json()


async def patch(client: AsyncTestClient, task_id: str, **body: object) -> dict:
    response = await client.patch(f"/tasks/{task_id}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_problem(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


async def test_create_answers_201_with_location_and_every_field(client: AsyncTestClient) -> None:
    response = await client.post(
        "/tasks/", json={"task_type": "document_process", "params": {"file_path": "/tmp/test.pdf"}}
    )
    assert response.status_code == 201
    task = response.json()
    assert set(task) == FIELDS
    assert response.headers["location"] == f"/tasks/{task['task_id']}"
    assert UUID(task["task_id"])
    assert isinstance(task["id"], int)
    assert task | {"task_id": None, "id": None, "created_at": None, "updated_at": None} == {
        "id": None, "task_id": None, "task_type": "document_process", "status": "pending", "progress": 0.0,
        "params": {"file_path": "/tmp/test.pdf"}, "result": None, "error": None, "retry_count": 0,
        "created_at": None, "updated_at": None, "started_at": None, "completed_at": None, "version": 1,
    }  # fmt: skip
    assert datetime.fromisoformat(task["created_at"]).utcoffset() == timedelta(0)


async def test_both_tasks_paths_answer(client: AsyncTestClient) -> None:
    made = (await client.post("/tasks", json={"task_type": "x"})).json()
    for path in ("/tasks", "/tasks/"):
        response = await client.get(path)
        assert response.status_code == 200
        assert [t["task_id"] for t in response.json()] == [made["task_id"]]


async def test_get_then_patch_through_the_life_of_a_task(client: AsyncTestClient) -> None:
    task = await create(client, file_path="/tmp/test.pdf")
    fetched = (await client.get(f"/tasks/{task['task_id']}")).json()
    assert fetched == task

    running = await patch(client, task["task_id"], status="running", progress=50.0)
    assert (running["status"], running["progress"], running["version"]) == ("running", 50.0, 2)
    assert running["started_at"] is not None
    assert running["completed_at"] is None

    done = await patch(client, task["task_id"], status="completed", progress=100.0, result={"files_processed": 10})
    assert (done["status"], done["progress"], done["result"]) == ("completed", 100.0, {"files_processed": 10})
    assert done["completed_at"] >= done["started_at"]
    assert done["updated_at"] == done["completed_at"]
    assert (await client.get(f"/tasks/{task['task_id']}")).json() == done


async def test_completing_sets_progress_100(client: AsyncTestClient) -> None:
    task = await create(client)
    assert (await patch(client, task["task_id"], status="completed"))["progress"] == 100.0


async def test_retry_and_requeue(client: AsyncTestClient) -> None:
    task = await create(client)
    await patch(client, task["task_id"], status="running")
    requeued = await patch(client, task["task_id"], status="pending")
    assert requeued["retry_count"] == 1
    await patch(client, task["task_id"], status="running")
    failed = await patch(client, task["task_id"], status="failed", error="disk full")
    assert failed["error"] == "disk full"
    assert failed["completed_at"] is not None
    retried = await patch(client, task["task_id"], status="pending")
    assert retried["retry_count"] == 2
    assert (retried["started_at"], retried["completed_at"], retried["error"]) == (None, None, None)


async def test_a_finished_task_answers_409_naming_status_and_moves(client: AsyncTestClient) -> None:
    task = await create(client)
    await patch(client, task["task_id"], status="completed")
    body = assert_problem(await client.patch(f"/tasks/{task['task_id']}", json={"progress": 10}), 409)
    assert body["current_status"] == "completed"
    assert body["allowed"] == []
    assert "completed" in body["detail"]

    await patch(client, task["task_id"], status="completed")  # same status: a no-op, 200
    failed = await create(client)
    await patch(client, failed["task_id"], status="failed")
    body = assert_problem(await client.patch(f"/tasks/{failed['task_id']}", json={"status": "running"}), 409)
    assert (body["current_status"], body["allowed"]) == ("failed", ["pending"])
    assert "pending" in body["detail"]


async def test_an_update_that_changes_nothing_appends_nothing(client: AsyncTestClient, database_url: str) -> None:
    task = await create(client)
    await patch(client, task["task_id"], progress=10)
    again = await patch(client, task["task_id"], progress=10, status="pending")
    assert again["version"] == 2
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (2,)


async def test_an_empty_patch_is_422(client: AsyncTestClient) -> None:
    task = await create(client)
    for body in ({}, {"status": None}, {"unknown": 1}):
        problem = assert_problem(await client.patch(f"/tasks/{task['task_id']}", json=body), 422)
        assert problem["errors"][0]["field"] == "body"
    assert_problem(await client.patch(f"/tasks/{task['task_id']}", content=b""), 422)


async def test_delete_keeps_history_and_answers_404_after(client: AsyncTestClient, database_url: str) -> None:
    task = await create(client)
    response = await client.delete(f"/tasks/{task['task_id']}")
    assert (response.status_code, response.json()) == (200, {"status": "deleted"})
    for response in (
        await client.get(f"/tasks/{task['task_id']}"),
        await client.patch(f"/tasks/{task['task_id']}", json={"progress": 1}),
        await client.delete(f"/tasks/{task['task_id']}"),
    ):
        assert "deleted" in assert_problem(response, 404)["detail"]
    assert (await client.get("/tasks/")).json() == []
    with psycopg.connect(database_url) as conn:
        types = conn.execute("SELECT type FROM events WHERE stream_id = %s ORDER BY version", (task["task_id"],))
        assert [t for (t,) in types] == ["TaskCreated", "TaskDeleted"]


async def test_unknown_tasks_are_404(client: AsyncTestClient) -> None:
    for task_id in (str(uuid4()), "abc-123", "x" * 300):
        assert_problem(await client.get(f"/tasks/{task_id}"), 404)
        assert_problem(await client.patch(f"/tasks/{task_id}", json={"progress": 1}), 404)
        assert_problem(await client.delete(f"/tasks/{task_id}"), 404)


async def test_list_filters_newest_first_and_skip_limit(client: AsyncTestClient) -> None:
    made = [await create(client, "a" if i % 2 else "b") for i in range(6)]
    await patch(client, made[0]["task_id"], status="completed")
    ids = [t["task_id"] for t in reversed(made)]
    assert [t["task_id"] for t in (await client.get("/tasks/")).json()] == ids
    assert [t["task_id"] for t in (await client.get("/tasks/?skip=1&limit=2")).json()] == ids[1:3]
    by_type = (await client.get("/tasks/?task_type=a")).json()
    assert [t["task_id"] for t in by_type] == [t["task_id"] for t in reversed(made) if t["task_type"] == "a"]
    done = (await client.get("/tasks/?status=completed")).json()
    assert [t["task_id"] for t in done] == [made[0]["task_id"]]
    assert (await client.get("/tasks/?status=completed&task_type=a")).json() == []
    # An empty filter is no filter, as in the seed (a front end's empty <select>).
    assert len((await client.get("/tasks/?status=&task_type=")).json()) == 6


async def test_keyset_pages_follow_the_link_header(client: AsyncTestClient) -> None:
    made = [await create(client, "k") for _ in range(9)]
    seen, url, pages = [], "/tasks/?task_type=k&limit=3", 0
    while url:
        response = await client.get(url)
        assert response.status_code == 200
        assert response.json(), "a Link led to an empty page"
        pages += 1
        seen += [t["task_id"] for t in response.json()]
        link = response.headers.get("link")
        if link is None:
            break
        assert link.endswith('>; rel="next"')
        target = urlsplit(link[1 : link.index(">")])
        url = f"{target.path}?{target.query}"
        assert "task_type=k" in url
        assert "limit=3" in url
        assert "cursor=" in url
    assert seen == [t["task_id"] for t in reversed(made)]
    assert pages == 3  # the third, full, page has no Link: nothing is older
    offset = await client.get("/tasks/?task_type=k&limit=3&skip=6")
    assert (len(offset.json()), offset.headers.get("link")) == (3, None)


async def test_stats_count_every_status_including_canceled(client: AsyncTestClient) -> None:
    tasks = [await create(client, "s") for _ in range(6)]
    await patch(client, tasks[0]["task_id"], status="running")
    await patch(client, tasks[1]["task_id"], status="completed")
    await patch(client, tasks[2]["task_id"], status="failed")
    await patch(client, tasks[3]["task_id"], status="canceled")
    await client.delete(f"/tasks/{tasks[4]['task_id']}")
    await create(client, "other")
    stats = (await client.get("/tasks/stats/summary")).json()
    assert stats == {"total": 6, "pending": 2, "running": 1, "completed": 1, "failed": 1, "canceled": 1}
    assert (await client.get("/tasks/stats/summary?task_type=")).json() == stats
    only_s = (await client.get("/tasks/stats/summary?task_type=s")).json()
    assert only_s["total"] == 5
    assert only_s["pending"] == 1


async def test_cleanup_deletes_only_old_finished_tasks(
    client: AsyncTestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Everything below happens 31 days ago, as far as the events say.
    month_ago = writer.now() - timedelta(days=31)
    monkeypatch.setattr(writer, "now", lambda: month_ago)
    finished = []
    for status in ("completed", "failed", "canceled"):
        task = await create(client)
        await patch(client, task["task_id"], status=status)
        finished.append(task["task_id"])
    pending = await create(client)
    running = await create(client)
    await patch(client, running["task_id"], status="running")
    recent = await create(client)
    monkeypatch.undo()
    await patch(client, recent["task_id"], status="completed")

    assert (await client.post("/tasks/cleanup?days=40")).json() == {"deleted": 0}  # none old enough
    response = await client.post("/tasks/cleanup?days=30")
    assert (response.status_code, response.json()) == (200, {"deleted": 3})
    for task_id in finished:
        assert (await client.get(f"/tasks/{task_id}")).status_code == 404
    for task in (pending, running, recent):
        assert (await client.get(f"/tasks/{task['task_id']}")).status_code == 200
    stats = (await client.get("/tasks/stats/summary")).json()
    assert stats == {"total": 3, "pending": 1, "running": 1, "completed": 1, "failed": 0, "canceled": 0}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT data FROM events WHERE type = 'TaskDeleted'").fetchall()
        assert [data for (data,) in rows] == [{"reason": "retention"}] * 3
    assert (await client.post("/tasks/cleanup")).json() == {"deleted": 0}


async def test_cleanup_goes_a_step_at_a_time_and_on_past_a_task_changed_under_it(
    client: AsyncTestClient, conn: psycopg.AsyncConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    month_ago = writer.now() - timedelta(days=31)
    monkeypatch.setattr(writer, "now", lambda: month_ago)
    expired = []
    for _ in range(10):
        task = await create(client, "old")
        await patch(client, task["task_id"], status="failed")
        expired.append(task["task_id"])
    monkeypatch.undo()
    monkeypatch.setattr(writer, "CLEANUP_STEP", 4)
    # An operator retries one of the tasks of the second step after the cleanup read them, before it writes.
    read, steps = tasks_view.finished_before, []

    async def finished_before(*args: object) -> list[Task]:
        found = await read(*args)  # type: ignore[arg-type]
        steps.append(len(found))
        if len(steps) == 2:
            await writer.change(conn, found[1].task_id, UpdateTask(status=Status.PENDING), {"request_id": "retry"})
        return found

    monkeypatch.setattr(tasks_view, "finished_before", finished_before)
    response = await client.post("/tasks/cleanup?days=30")
    assert (response.status_code, response.json()) == (200, {"deleted": 9})
    assert steps == [4, 4, 1, 2, 2, 0]  # the lost step looked again at a quarter, then grew back
    retried = (await client.get(f"/tasks/{expired[5]}")).json()
    assert (retried["status"], retried["retry_count"]) == ("pending", 1)
    for task_id in expired[:5] + expired[6:]:
        assert (await client.get(f"/tasks/{task_id}")).status_code == 404
    assert (await client.get("/tasks/stats/summary?task_type=old")).json()["total"] == 1


async def test_health(client: AsyncTestClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/health/ready")).status_code == 200


async def test_readiness_fails_while_a_lock_holds_every_write_up(client: AsyncTestClient, database_url: str) -> None:
    with holding(database_url, "LOCK TABLE events IN ACCESS EXCLUSIVE MODE"):  # as a migration's ALTER takes
        refused = await client.get("/health/ready")
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
    assert (await client.get("/health/ready")).status_code == 200


async def test_writes_record_the_request_id(client: AsyncTestClient, database_url: str) -> None:
    response = await client.post("/tasks/", json={"task_type": "x"}, headers={"X-Request-ID": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT metadata FROM events").fetchone() == ({"request_id": "abc123", "actor": None},)


@pytest.mark.parametrize(
    "given",
    ["0b8e5f4e-3c1a-4d2b-9f6e-1a2b3c4d5e6f", "trace_42", "svc.web:7", "Root=1-5759e988-bd862e3fe1be46a994272793"],
)
async def test_a_request_id_in_a_usual_shape_is_kept(client: AsyncTestClient, database_url: str, given: str) -> None:
    """UUIDs, AWS trace ids and dotted ids are what proxies and clients send: echoed and recorded as sent."""
    response = await client.post("/tasks/", json={"task_type": "x"}, headers={"X-Request-ID": given})
    assert response.headers["x-request-id"] == given
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT metadata FROM events").fetchone() == ({"request_id": given, "actor": None},)


@pytest.mark.parametrize("given", ["has space", "semi;colon", 'quote"d', "<b>", "x" * 129])
async def test_a_request_id_that_is_not_a_plain_token_is_replaced(client: AsyncTestClient, given: str) -> None:
    response = await client.get("/health", headers={"X-Request-ID": given})
    assert response.headers["x-request-id"] != given
    assert response.headers["x-request-id"].isalnum()


async def test_browsers_on_other_origins_may_call_and_read_headers(client: AsyncTestClient) -> None:
    preflight = await client.options(
        "/tasks/",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "PATCH",
                 "Access-Control-Request-Headers": "if-match, content-type"},
    )  # fmt: skip
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://app.example")
    created = await client.post("/tasks/", json={"task_type": "x"}, headers={"Origin": "http://app.example"})
    assert "etag" in created.headers["access-control-expose-headers"].lower()
    assert "retry-after" in created.headers["access-control-expose-headers"].lower()  # for a 503's wait


async def test_head_answers_as_get_without_the_body(client: AsyncTestClient) -> None:
    """RFC 9110: a server supports HEAD wherever it supports GET (curl -I, link checkers, monitors)."""
    created = (await client.post("/tasks/", json={"task_type": "x"})).json()
    task_id = created["task_id"]
    for path in ("/health", "/health/ready", f"/tasks/{task_id}", "/tasks/", "/tasks/stats/summary", "/metrics", "/ui"):
        got, head = await client.get(path), await client.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
    head = await client.head(f"/tasks/{task_id}", headers={"If-None-Match": '"1"'})
    assert head.status_code == 304
    head = await client.head(f"/tasks/{task_id}")
    assert head.headers["etag"] == '"1"'
    missing = await client.head(f"/tasks/{uuid4()}")
    assert (missing.status_code, missing.content) == (404, b"")
    assert (await client.head("/tasks/batch")).status_code == 405
    assert (await client.head("/tasks/cleanup")).status_code == 405


async def test_head_on_an_event_stream_ends_with_its_headers(client: AsyncTestClient) -> None:
    task_id = (await client.post("/tasks/", json={"task_type": "x"})).json()["task_id"]
    for path in ("/events/stream", f"/tasks/{task_id}/stream"):
        head = await client.head(path)
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        assert head.content == b""
