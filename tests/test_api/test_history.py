"""History, time travel, ETags and idempotency keys (SPEC 6), through the real app."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import urlsplit
from uuid import uuid4

import anyio
import psycopg
import pytest
from litestar.testing import AsyncTestClient

from tasktrail import writer
from tasktrail.http.app import create_app

pytestmark = pytest.mark.anyio


async def create(client: AsyncTestClient, **headers: str) -> dict:
    response = await client.post("/tasks/", json={"task_type": "h", "params": {"n": 1}}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def patch(client: AsyncTestClient, task_id: str, body: dict, **headers: str):  # type: ignore[no-untyped-def]
    return await client.patch(f"/tasks/{task_id}", json=body, headers=headers)


async def test_history_lists_events_in_version_order_with_metadata(client: AsyncTestClient) -> None:
    task = await create(client, **{"X-Request-ID": "req1"})
    await patch(client, task["task_id"], {"status": "running", "progress": 5})
    await patch(client, task["task_id"], {"progress": 50})
    await patch(client, task["task_id"], {"status": "completed", "result": {"ok": 1}})
    response = await client.get(f"/tasks/{task['task_id']}/history")
    assert response.status_code == 200
    body = response.json()
    assert body["task_id"] == task["task_id"]
    events = body["events"]
    assert [e["type"] for e in events] == ["TaskCreated", "TaskStarted", "ProgressReported", "TaskCompleted"]
    assert [e["version"] for e in events] == [1, 2, 3, 4]
    assert [e["position"] for e in events] == sorted(e["position"] for e in events)
    assert events[0]["position"] == task["id"]
    assert events[0]["data"] == {"task_type": "h", "params": {"n": 1}}
    assert events[1]["data"] == {"progress": 5.0}
    assert events[3]["data"] == {"progress": 100.0, "result": {"ok": 1}}
    assert events[0]["metadata"] == {"request_id": "req1", "actor": None}  # no API keys: no actor
    assert all(set(e) == {"version", "position", "type", "occurred_at", "data", "metadata"} for e in events)
    assert datetime.fromisoformat(events[3]["occurred_at"]) == datetime.fromisoformat(
        (await client.get(f"/tasks/{task['task_id']}")).json()["completed_at"]
    )


async def test_history_pages_follow_the_link_header(client: AsyncTestClient) -> None:
    task = await create(client)
    for progress in range(1, 9):
        await patch(client, task["task_id"], {"progress": progress})
    versions, url = [], f"/tasks/{task['task_id']}/history?limit=3"
    while url:
        response = await client.get(url)
        assert response.json()["events"], "a Link led to an empty page"  # 9 events: 3 full pages, no 4th
        versions += [e["version"] for e in response.json()["events"]]
        link = response.headers.get("link")
        url = link and "{0.path}?{0.query}".format(urlsplit(link[1 : link.index(">")]))
    assert versions == list(range(1, 10))
    later = (await client.get(f"/tasks/{task['task_id']}/history?after_version=6")).json()["events"]
    assert [e["version"] for e in later] == [7, 8, 9]


async def test_history_survives_deletion_and_404s_only_for_unknown(client: AsyncTestClient) -> None:
    task = await create(client)
    await client.delete(f"/tasks/{task['task_id']}")
    events = (await client.get(f"/tasks/{task['task_id']}/history")).json()["events"]
    assert [e["type"] for e in events] == ["TaskCreated", "TaskDeleted"]
    assert events[1]["data"] == {"reason": "request"}
    for unknown in (uuid4(), "nope"):
        for page in ("", "?after_version=5"):
            response = await client.get(f"/tasks/{unknown}/history{page}")
            assert response.status_code == 404
            assert response.headers["content-type"] == "application/problem+json"
    past_the_end = await client.get(f"/tasks/{task['task_id']}/history?after_version=5")
    assert (past_the_end.status_code, past_the_end.json()["events"]) == (200, [])
    for query in ("limit=0", "limit=1001", "after_version=-1"):
        assert (await client.get(f"/tasks/{task['task_id']}/history?{query}")).status_code == 422


async def test_time_travel_by_version_and_by_time(client: AsyncTestClient) -> None:
    task = await create(client)
    running = (await patch(client, task["task_id"], {"status": "running", "progress": 10})).json()
    done = (await patch(client, task["task_id"], {"status": "completed"})).json()
    url = f"/tasks/{task['task_id']}"

    assert (await client.get(f"{url}?version=1")).json() == task
    assert (await client.get(f"{url}?version=2")).json() == running
    assert (await client.get(f"{url}?version=3")).json() == done
    assert (await client.get(f"{url}?version=2")).headers["etag"] == '"2"'

    at = datetime.fromisoformat(running["updated_at"])
    assert (await client.get(url, params={"as_of": at.isoformat()})).json() == running
    before_done = at + (datetime.fromisoformat(done["updated_at"]) - at) / 2
    assert (await client.get(url, params={"as_of": before_done.isoformat()})).json() == running
    naive_utc = at.replace(tzinfo=None).isoformat()
    assert (await client.get(url, params={"as_of": naive_utc})).json() == running
    # Nanoseconds are cut off, not rounded: .xxxxxx999 is still before the next microsecond.
    just_before = (at - timedelta(microseconds=1)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f999Z")
    assert (await client.get(url, params={"as_of": just_before})).json() == task

    too_early = datetime.fromisoformat(task["created_at"]) - timedelta(seconds=1)
    early = await client.get(url, params={"as_of": too_early.isoformat()})
    assert early.status_code == 404
    assert "did not exist yet" in early.json()["detail"]

    await client.delete(url)
    assert (await client.get(f"{url}?version=3")).json() == done
    gone = await client.get(f"{url}?version=4")
    assert gone.status_code == 404
    assert "deleted" in gone.json()["detail"]
    for query in ("version=0", "version=x", "as_of=yesterday", "version=1&as_of=2026-01-01T00:00:00Z"):
        assert (await client.get(f"{url}?{query}")).status_code == 422, query


async def test_a_host_whose_clock_is_behind_never_takes_a_tasks_times_back(
    client: AsyncTestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Audit: a second host 5 s behind wrote v2 before v1's time; the task showed started_at before created_at,
    # and ?as_of= between the two folded v2 without v1: a 500.
    task = await create(client)
    monkeypatch.setattr(writer, "now", lambda: datetime.now(UTC) - timedelta(seconds=5))
    running = (await patch(client, task["task_id"], {"status": "running"})).json()
    batched = await client.patch("/tasks/batch", json={"updates": [{"task_id": task["task_id"], "progress": 5}]})
    monkeypatch.undo()
    progressed = batched.json()["results"][0]["task"]
    times = [e["occurred_at"] for e in (await client.get(f"/tasks/{task['task_id']}/history")).json()["events"]]
    assert times == sorted(times)
    assert task["created_at"] <= running["started_at"] == running["updated_at"] <= progressed["updated_at"]
    for seconds in (-6, -3, 0, 1):
        at = datetime.fromisoformat(task["created_at"]) + timedelta(seconds=seconds)
        assert (await client.get(f"/tasks/{task['task_id']}", params={"as_of": at.isoformat()})).status_code in (
            200,
            404,
        )


async def test_time_travel_in_a_log_whose_times_go_back_takes_a_beginning_of_the_stream(database_url: str) -> None:
    """A log written before a task's times had to go forward, by hosts whose clocks disagreed."""
    async with AsyncTestClient(app=create_app(database_url)) as client:
        task = await create(client)
        created = datetime.fromisoformat(task["created_at"])
        with psycopg.connect(database_url, autocommit=True) as conn:  # v2, 5 s before v1 (no projection: no verify)
            conn.execute(
                "INSERT INTO events (stream_id, version, type, data, occurred_at)"
                " VALUES (%s, 2, 'TaskStarted', '{}', %s)",
                (task["task_id"], created - timedelta(seconds=5)),
            )
        url = f"/tasks/{task['task_id']}"
        before = await client.get(url, params={"as_of": (created - timedelta(seconds=2)).isoformat()})
        assert before.status_code == 404, before.text  # v2's time, but not without v1
        assert "did not exist yet" in before.json()["detail"]
        assert (await client.get(url, params={"as_of": created.isoformat()})).json()["version"] == 2


async def test_time_travel_folds_a_long_history_read_in_chunks(client: AsyncTestClient) -> None:
    # A long stream is read and folded a chunk (1,000 events) at a time, the event loop free between them.
    task = await create(client)
    url = f"/tasks/{task['task_id']}"
    seen = {1: task}
    for first in range(0, 2_500, 500):
        updates = [{"task_id": task["task_id"], "progress": (first + i) % 97 + 0.5} for i in range(500)]
        results = (await client.patch("/tasks/batch", json={"updates": updates})).json()["results"]
        seen |= {r["task"]["version"]: r["task"] for r in results}
    assert len(seen) == 2_501
    for version in (999, 1_000, 1_001, 2_000, 2_001, 2_500, 2_501):
        assert (await client.get(f"{url}?version={version}")).json() == seen[version], version
    assert "has only 2501 versions" in (await client.get(f"{url}?version=2502")).json()["detail"]


async def test_time_travel_takes_an_offset_whose_plus_was_not_escaped(client: AsyncTestClient) -> None:
    """`?as_of=2026-…T10:00:00+00:00` as typed (curl, an f-string URL): query decoding turns the `+` into a space."""
    task = await create(client)
    running = (await patch(client, task["task_id"], {"status": "running"})).json()
    url = f"/tasks/{task['task_id']}"
    at = datetime.fromisoformat(running["updated_at"])
    for moment in (at, at.astimezone(timezone(timedelta(hours=5, minutes=30)))):
        response = await client.get(f"{url}?as_of={moment.isoformat()}")
        assert response.status_code == 200, (moment.isoformat(), response.text)
        assert response.json() == running
    west = at.astimezone(timezone(timedelta(hours=-3)))
    assert (await client.get(f"{url}?as_of={west.isoformat()}")).json() == running
    for query in ("as_of=2026-01-01T00:00:00 00", "as_of=2026-01-01 00:00", "as_of= 00:00", "as_of="):
        assert (await client.get(f"{url}?{query}")).status_code == 422, query


async def test_every_task_response_has_its_version_as_etag(client: AsyncTestClient) -> None:
    created = await client.post("/tasks/", json={"task_type": "e"})
    task_id = created.json()["task_id"]
    assert created.headers["etag"] == '"1"'
    assert (await client.get(f"/tasks/{task_id}")).headers["etag"] == '"1"'
    assert (await patch(client, task_id, {"progress": 3})).headers["etag"] == '"2"'


async def test_if_match_makes_writes_conditional(client: AsyncTestClient) -> None:
    task_id = (await create(client))["task_id"]
    stale = await patch(client, task_id, {"progress": 1}, **{"If-Match": '"7"'})
    assert stale.status_code == 412
    assert stale.headers["content-type"] == "application/problem+json"
    assert (await patch(client, task_id, {"progress": 1}, **{"If-Match": '"1"'})).status_code == 200
    assert (await patch(client, task_id, {"progress": 2}, **{"If-Match": '"1"'})).status_code == 412
    assert (await patch(client, task_id, {"progress": 2}, **{"If-Match": '"9", "2"'})).status_code == 200
    # Strong comparison (RFC 9110): a weak tag, or the version written otherwise, names nothing.
    for other in ['W/"3"', '"03"', '"3.0"', '"+3"', '" 3"']:
        assert (await patch(client, task_id, {"progress": 2.5}, **{"If-Match": other})).status_code == 412, other
    # The version bare (If-Match: 3), as clients that read "ETag is the version" send it, names it too.
    for other in ['"3', '3"', "03", "W/3"]:
        assert (await patch(client, task_id, {"progress": 2.5}, **{"If-Match": other})).status_code == 412, other
    assert (await patch(client, task_id, {"progress": 2.75}, **{"If-Match": "3"})).status_code == 200
    assert (await patch(client, task_id, {"progress": 3}, **{"If-Match": "*"})).status_code == 200
    assert (await patch(client, task_id, {"progress": 4}, **{"If-Match": "garbage"})).status_code == 412
    assert (await client.delete(f"/tasks/{task_id}", headers={"If-Match": '"1"'})).status_code == 412
    assert (await client.get(f"/tasks/{task_id}")).json()["version"] == 5
    assert (await client.delete(f"/tasks/{task_id}", headers={"If-Match": '"5"'})).status_code == 200


async def test_if_version_in_a_patch_body_is_an_if_match(client: AsyncTestClient) -> None:
    # A batch item's `if_version` copied into a single PATCH is a condition too, never ignored.
    task_id = (await create(client))["task_id"]
    stale = await patch(client, task_id, {"status": "running", "if_version": 7})
    assert (stale.status_code, stale.headers["content-type"]) == (412, "application/problem+json")
    assert (await patch(client, task_id, {"status": "running", "if_version": 1.0})).status_code == 200
    # With If-Match as well, both must name the version.
    assert (await patch(client, task_id, {"progress": 5, "if_version": 2}, **{"If-Match": '"1"'})).status_code == 412
    assert (await patch(client, task_id, {"progress": 5, "if_version": 2}, **{"If-Match": "*"})).status_code == 200
    assert (await patch(client, task_id, {"progress": 6, "if_version": 3}, **{"If-Match": '"3"'})).status_code == 200
    for body, field in (({"progress": 7, "if_version": 3.5}, "if_version"), ({"if_version": 4}, "body")):
        refused = await patch(client, task_id, body)
        assert (refused.status_code, refused.json()["errors"][0]["field"]) == (422, field), body
    for wrong in ("4", True):
        refused = await patch(client, task_id, {"progress": 7, "if_version": wrong})
        assert refused.json()["errors"][0]["message"].startswith("Expected `integer | null`, got"), wrong
    history = (await client.get(f"/tasks/{task_id}/history")).json()["events"]
    assert [e["type"] for e in history] == ["TaskCreated", "TaskStarted", "ProgressReported", "ProgressReported"]


async def test_if_none_match_answers_304(client: AsyncTestClient) -> None:
    task_id = (await create(client))["task_id"]
    fresh = await client.get(f"/tasks/{task_id}", headers={"If-None-Match": '"1"'})
    assert (fresh.status_code, fresh.content, fresh.headers["etag"]) == (304, b"", '"1"')
    await patch(client, task_id, {"progress": 9})
    changed = await client.get(f"/tasks/{task_id}", headers={"If-None-Match": '"1"'})
    assert (changed.status_code, changed.json()["progress"]) == (200, 9.0)
    # Weak comparison: W/"2" names version 2 too; "02" names nothing.
    assert (await client.get(f"/tasks/{task_id}", headers={"If-None-Match": 'W/"2"'})).status_code == 304
    assert (await client.get(f"/tasks/{task_id}", headers={"If-None-Match": '"02"'})).status_code == 200
    assert (await client.get(f"/tasks/{task_id}", headers={"If-None-Match": "2"})).status_code == 304


async def test_an_idempotency_key_creates_once(client: AsyncTestClient, database_url: str) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = await client.post("/tasks/", json={"task_type": "k", "params": {"a": 1, "b": 2}}, headers=key)
    reordered = b'{"params": {"b": 2, "a": 1}, "task_type": "k"}'
    again = await client.post("/tasks/", content=reordered, headers=key | {"Content-Type": "application/json"})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["task_id"] == first.json()["task_id"]
    other = await client.post("/tasks/", json={"task_type": "k", "params": {"a": 2}}, headers=key)
    assert other.status_code == 422
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    for bad in ("x y", "x" * 256, "tab\there"):
        refused = await client.post("/tasks/", json={"task_type": "k"}, headers={"Idempotency-Key": bad})
        assert refused.status_code == 422
        assert refused.json()["errors"] == [
            {"field": "Idempotency-Key", "message": "must be 1 to 255 visible ASCII characters (no spaces)"}
        ]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
        assert conn.execute("SELECT metadata->>'idempotency_key' FROM events").fetchone() == ("order-42",)


async def test_concurrent_requests_with_one_key_create_one_task(client: AsyncTestClient, database_url: str) -> None:
    answers: list[str] = []

    async def post() -> None:
        response = await client.post("/tasks/", json={"task_type": "c"}, headers={"Idempotency-Key": "same"})
        assert response.status_code == 201
        answers.append(response.json()["task_id"])

    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(post)
    assert len(answers) == 8
    assert len(set(answers)) == 1
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)


async def test_idempotency_keys_outlive_a_restart_and_expire_after_a_day(database_url: str) -> None:
    body, key = {"task_type": "r"}, {"Idempotency-Key": "restart"}
    async with AsyncTestClient(app=create_app(database_url)) as client:
        first = (await client.post("/tasks/", json=body, headers=key)).json()
    async with AsyncTestClient(app=create_app(database_url)) as client:
        assert (await client.post("/tasks/", json=body, headers=key)).json()["task_id"] == first["task_id"]
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE idempotency_keys SET created_at = created_at - interval '25 hours'")
        assert (await client.post("/tasks/", json=body, headers=key)).json()["task_id"] != first["task_id"]


async def test_a_version_after_the_last_is_404_naming_how_many_there_are(client: AsyncTestClient) -> None:
    task = await create(client)
    url = f"/tasks/{task['task_id']}"
    await patch(client, task["task_id"], {"progress": 10})
    done = (await patch(client, task["task_id"], {"status": "completed"})).json()
    assert (await client.get(f"{url}?version=3")).json() == done
    for asked in (4, 5, 2**31 - 1):
        missing = await client.get(f"{url}?version={asked}")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert "has only 3 versions" in missing.json()["detail"]
        assert f"no version {asked}" in missing.json()["detail"]
    await client.delete(url)
    for asked in (4, 9):  # version 4 deleted it
        detail = (await client.get(f"{url}?version={asked}")).json()["detail"]
        assert "deleted" in detail
        if asked > 4:
            assert "has only 4 versions (the last deleted it)" in detail
    assert (await client.get(f"{url}?version=3")).json() == done  # what it was stays readable
    only_one = (await create(client))["task_id"]
    assert "has only 1 version:" in (await client.get(f"/tasks/{only_one}?version=2")).json()["detail"]
    unknown = await client.get(f"/tasks/{uuid4()}?version=2")
    assert (unknown.status_code, "not found" in unknown.json()["detail"]) == (404, True)


@pytest.mark.parametrize(
    ("as_of", "status"),
    [
        ("0001-01-01T00:00:00Z", 404),  # the far past: not created yet
        ("0001-01-01T00:00:00+23:59", 404),  # before year 1 in UTC
        ("1970-01-01T00:00:00Z", 404),
        ("9999-12-31T23:59:59.999999Z", 200),  # the far future: the state now
        ("9999-12-31T23:59:59-23:59", 200),  # after year 9999 in UTC
        ("2999-01-01T00:00:00+14:00", 200),
        ("2030-01-01T00:00:00.123456789Z", 200),  # more digits than microseconds
        ("10000-01-01T00:00:00Z", 422),  # out of range years
        ("-0001-01-01T00:00:00Z", 422),
        ("0000-01-01T00:00:00Z", 422),
        ("2030-02-30T00:00:00Z", 422),  # no such day
        ("2030-01-01T24:00:01Z", 422),
        ("2030-01-01T00:00:60Z", 422),
        ("2030-01-01T00:00:00+24:00", 422),  # no such offset
        ("2030-01-01T00:00:00+99:99", 422),
        ("1e308", 422),
        ("99999999999999999999", 422),
        ("", 422),
    ],
)
async def test_as_of_odd_times(shared_client: AsyncTestClient, as_of: str, status: int) -> None:
    task = await create(shared_client)
    response = await shared_client.get(f"/tasks/{task['task_id']}", params={"as_of": as_of})
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json() == task
    else:
        assert response.headers["content-type"] == "application/problem+json"


async def test_as_of_a_deleted_task(client: AsyncTestClient) -> None:
    task = await create(client)
    url = f"/tasks/{task['task_id']}"
    await client.delete(url)
    deleted_at = (await client.get(f"{url}/history")).json()["events"][-1]["occurred_at"]
    before = datetime.fromisoformat(deleted_at) - timedelta(microseconds=1)
    assert (await client.get(url, params={"as_of": before.isoformat()})).json() == task
    for after in (deleted_at, "9999-12-31T23:59:59Z"):
        gone = await client.get(url, params={"as_of": after})
        assert gone.status_code == 404
        assert "had been deleted by" in gone.json()["detail"]
