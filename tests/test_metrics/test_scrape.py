"""GET /metrics through the real app on a real PostgreSQL, in one process (as create_app runs without serve).

The metrics of this process are shared by every app it makes, so each test
compares a scrape after its requests with one before them.
"""

from __future__ import annotations

import asyncio
import random
import string
import uuid

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from tasktrail import db, metrics, writer
from tasktrail.domain.task import CreateTask, UpdateTask
from tasktrail.http import auth
from tasktrail.http.app import create_app
from tasktrail.projections import INLINE, tasks
from tests.conftest import free_port
from tests.prom import FAMILIES, Scrape

pytestmark = pytest.mark.anyio


async def scrape(client: AsyncTestClient, headers: dict[str, str] | None = None) -> Scrape:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def delta(after: Scrape, before: Scrape, name: str, /, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def test_every_family_the_spec_names_is_there_with_its_labels(client: AsyncTestClient) -> None:
    task = (await client.post("/tasks/", json={"task_type": "m"})).json()
    await client.get(f"/tasks/{task['task_id']}")
    got = await scrape(client)
    for name, (kind, labels) in FAMILIES.items():
        assert name in got.families, f"{name} is missing"
        family = got.families[name]
        assert family.type == kind, name
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    assert {s["state"] for s in got.series("tasktrail_db_pool_connections")} == {"in_use", "idle", "waiting"}
    assert got.value("tasktrail_projection_version", name="tasks") == tasks.VERSION
    assert {s["name"] for s in got.series("tasktrail_projection_version")} == {m.NAME for m in INLINE}
    # Only those: one process shows the families N workers do (their collector has no *_created series).
    assert not [name for name in got.families if name.endswith("_created")]


async def test_requests_are_counted_by_method_route_template_and_status(client: AsyncTestClient) -> None:
    before = await scrape(client)
    task_id = (await client.post("/tasks/", json={"task_type": "m"})).json()["task_id"]
    for _ in range(3):
        assert (await client.get(f"/tasks/{task_id}")).status_code == 200
    await client.patch(f"/tasks/{task_id}", json={"progress": 5})
    await client.get(f"/tasks/{uuid.uuid4()}")  # 404, on the same route
    await client.get(f"/tasks/{task_id}/history")
    await client.get("/tasks/?status=pending&task_type=m")
    after = await scrape(client)

    def requests(method: str, route: str, status: str) -> float:
        return delta(after, before, "tasktrail_http_requests_total", method=method, route=route, status=status)

    assert requests("POST", "/tasks", "201") == 1
    assert requests("GET", "/tasks/{task_id}", "200") == 3
    assert requests("GET", "/tasks/{task_id}", "404") == 1
    assert requests("PATCH", "/tasks/{task_id}", "200") == 1
    assert requests("GET", "/tasks/{task_id}/history", "200") == 1
    assert requests("GET", "/tasks", "200") == 1
    count = "tasktrail_http_request_duration_seconds_count"
    assert delta(after, before, count, method="GET", route="/tasks/{task_id}") == 4
    inf = delta(
        after,
        before,
        "tasktrail_http_request_duration_seconds_bucket",
        method="GET",
        route="/tasks/{task_id}",
        le="+Inf",
    )
    assert inf == 4
    assert task_id not in after.text  # a path is never a label
    labels = [value for series in after.series("tasktrail_http_requests_total") for value in series.values()]
    assert not [value for value in labels if "pending" in value]  # nor a query value


def random_path(rng: random.Random) -> str:
    parts = [
        "".join(rng.choices(string.ascii_letters + string.digits + "-._~%", k=rng.randint(1, 30)))
        for _ in range(rng.randint(1, 5))
    ]
    query = f"?{rng.choice(string.ascii_lowercase)}={uuid.uuid4()}" if rng.random() < 0.5 else ""
    return "/zz" + "/".join(["", *parts]) + query


async def test_paths_that_match_no_route_share_one_label_whatever_is_sent(client: AsyncTestClient) -> None:
    """Bounded cardinality: random paths and methods make no new series after the first of each status."""
    rng = random.Random(13)  # noqa: S311 -- test data
    methods = ["GET", "POST", "DELETE", "PUT", "BREW", "PROPFIND", "X" * 40]

    async def send(n: int) -> None:
        for _ in range(n):
            response = await client.request(rng.choice(methods), random_path(rng))
            assert response.status_code in (400, 404, 405)  # 400: %ff or %00, refused as on any route

    await scrape(client)  # its own series (route /metrics) is there from the next scrape on, whatever ran before
    for method in methods:  # each method's series of each status random paths get: 404, and 400 (an escape of no UTF-8)
        assert [(await client.request(method, path)).status_code for path in ("/zz/a", "/zz/%ff")] == [404, 400]
    await send(30)
    before = await scrape(client)
    await send(200)
    after = await scrape(client)
    assert after.series("tasktrail_http_requests_total") == before.series("tasktrail_http_requests_total")
    assert after.series("tasktrail_http_request_duration_seconds_bucket") == before.series(
        "tasktrail_http_request_duration_seconds_bucket"
    )
    unmatched = after.total("tasktrail_http_requests_total", route=metrics.UNMATCHED)
    assert unmatched - before.total("tasktrail_http_requests_total", route=metrics.UNMATCHED) == 200
    assert {s["method"] for s in after.series("tasktrail_http_requests_total")} <= metrics.METHODS | {"other"}
    for series in after.series("tasktrail_http_requests_total"):
        assert series["route"] == metrics.UNMATCHED or series["route"].startswith("/")
        assert "/zz" not in series["route"]
        assert series["status"].isdigit()
        assert len(series["status"]) == 3


async def test_events_appended_and_tasks_by_status_follow_the_log(client: AsyncTestClient) -> None:
    before = await scrape(client)
    made = [(await client.post("/tasks/", json={"task_type": "m"})).json()["task_id"] for _ in range(3)]
    await client.patch(f"/tasks/{made[0]}", json={"status": "running"})
    await client.patch(f"/tasks/{made[1]}", json={"status": "completed"})
    await client.patch(f"/tasks/{made[1]}", json={"status": "completed"})  # a no-op appends nothing
    await client.delete(f"/tasks/{made[2]}")
    after = await scrape(client)
    appended = {
        kind: delta(after, before, "tasktrail_events_appended_total", type=kind)
        for kind in ("TaskCreated", "TaskStarted", "TaskCompleted", "TaskDeleted", "ProgressReported")
    }
    assert appended == {"TaskCreated": 3, "TaskStarted": 1, "TaskCompleted": 1, "TaskDeleted": 1, "ProgressReported": 0}
    summary = (await client.get("/tasks/stats/summary")).json()
    for status in ("pending", "running", "completed", "failed", "canceled"):
        assert after.value("tasktrail_tasks", status=status) == summary[status]
    assert summary["running"] == 1
    assert summary["completed"] == 1


async def test_a_write_that_loses_a_race_is_counted_as_a_conflict(database_url: str) -> None:
    """The loser decided on version 1, waits on the winner's uncommitted version 2, loses, and decides again."""
    connect = psycopg.AsyncConnection.connect
    async with (
        await connect(database_url, **db.connect_kwargs()) as winner,
        await connect(database_url, **db.connect_kwargs()) as loser,
    ):
        task = await writer.create(winner, CreateTask(task_type="race"), {})
        conflicts = conflicts_so_far()
        async with winner.transaction():
            await writer.change(winner, task.task_id, UpdateTask(progress=1), {})
            racing = asyncio.create_task(writer.change(loser, task.task_id, UpdateTask(progress=2), {}))
            for _ in range(200):  # until the loser waits on the winner's row
                # The loser's own wait: another test's on this server (xdist) once broke the loop too early.
                waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = %s"
                cur = await winner.execute(waiting, (loser.info.backend_pid,))
                if (await cur.fetchone())[0]:  # type: ignore[index]
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the second writer never waited on the first")
        after = await racing
    assert after is not None
    assert after.version == 3
    assert conflicts_so_far() - conflicts == 1


async def test_a_race_lost_on_this_process_s_last_state_is_counted_too(database_url: str) -> None:
    """Two requests in one process decide on the state it last wrote, at once; the second to append loses a race."""
    connect = psycopg.AsyncConnection.connect
    async with (
        await connect(database_url, **db.connect_kwargs()) as first,
        await connect(database_url, **db.connect_kwargs()) as second,
    ):
        task = await writer.create(first, CreateTask(task_type="race"), {})
        assert writer.guessed(task.task_id)
        conflicts = conflicts_so_far()
        both = await asyncio.gather(
            writer.change(first, task.task_id, UpdateTask(progress=1), {}),
            writer.change(second, task.task_id, UpdateTask(progress=2), {}),
        )
    assert sorted(t.version for t in both) == [2, 3]  # type: ignore[union-attr]
    assert conflicts_so_far() - conflicts == 1
    assert not writer._writing  # nothing left in flight


async def test_a_guess_another_process_made_stale_is_not_a_race(database_url: str) -> None:
    """Audit: with --workers 2, one request at a time raised the conflicts alert: each process's guess of a task
    went stale when the other wrote it, and each write that found so was counted as a race lost."""
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        task = await writer.create(conn, CreateTask(task_type="stale"), {})
        guess = writer._recent[task.task_id]
        conflicts = conflicts_so_far()
        assert (await writer.change(conn, task.task_id, UpdateTask(progress=1), {})).version == 2  # type: ignore[union-attr]
        writer._recent[task.task_id] = guess  # as another process's guess stays at version 1
        after = await writer.change(conn, task.task_id, UpdateTask(progress=2), {})
    assert (after.version, after.progress) == (3, 2)  # type: ignore[union-attr]
    assert conflicts_so_far() == conflicts


def conflicts_so_far() -> float:
    value = metrics.REGISTRY.get_sample_value("tasktrail_write_conflicts_total")
    assert value is not None
    return value


async def test_answers_503_for_an_unreachable_database_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKTRAIL_POOL_TIMEOUT", "0.2")
    app = create_app(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", api_keys=[])
    async with AsyncTestClient(app=app) as client:
        before = await scrape(client)
        for _ in range(3):
            assert (await client.get("/tasks/")).status_code == 503
        after = await scrape(client)  # answered all the same, with what the process knows
    assert delta(after, before, "tasktrail_db_unavailable_total") == 3
    assert delta(after, before, "tasktrail_http_requests_total", method="GET", route="/tasks", status="503") == 3
    assert "tasktrail_tasks" not in after.families  # the database's gauges are left out, never made up


async def test_metrics_needs_a_read_key_when_keys_are_configured(database_url: str) -> None:
    keys = {scope: auth.new_key() for scope in auth.SCOPES}
    configured = [auth.Key(f"{scope}-key", scope, auth.digest(key)) for scope, key in keys.items()]
    async with AsyncTestClient(app=create_app(database_url, api_keys=configured)) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer tt_not-a-key"})).status_code == 401
        for scope in auth.SCOPES:
            await scrape(client, {"Authorization": f"Bearer {keys[scope]}"})


async def test_openmetrics_when_prometheus_asks_for_it(client: AsyncTestClient) -> None:
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def test_an_accept_version_it_cannot_read_gets_the_plain_text_format(client: AsyncTestClient) -> None:
    # Audit: prometheus_client's choice of format raised on these, a 500 to anyone who may scrape.
    for version in ("abc", "1.x", "1.0.0-rc1", "9" * 5000 + ".x", "\u00e9"):
        for kind in ("application/openmetrics-text", "text/plain"):
            response = await client.get("/metrics", headers={"Accept": f"{kind}; version={version}".encode()})
            assert response.status_code == 200, (kind, version[:20])
            assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert "tasktrail_http_requests_total" in response.text


async def test_the_content_type_names_each_parameter_once(client: AsyncTestClient) -> None:
    """Prometheus 3 parses the scrape's Content-Type strictly: a parameter given twice fails the scrape."""
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        response = await client.get("/metrics", headers={"Accept": accept} if accept else None)
        assert response.status_code == 200
        names = [part.split("=")[0].strip() for part in response.headers["content-type"].split(";")[1:]]
        assert len(names) == len(set(names)), response.headers["content-type"]


async def test_requests_that_gave_up_waiting_for_a_connection_are_not_counted_as_waiting() -> None:
    """psycopg_pool keeps a waiter that timed out in its queue until a connection comes: in an outage its
    count grew with every refused request, and the pool-exhausted alert would fire for no one."""
    pool = db.create_pool("postgresql://postgres@127.0.0.1:1/nowhere", timeout=0.05, busy_wait=0.05)
    await pool.open(wait=False)
    try:
        for _ in range(5):
            with pytest.raises(db.PoolTimeout):
                async with db.Borrowed(pool):
                    pass
        assert pool.get_stats().get("requests_waiting", 0) > 0  # the library's count, still holding them
        metrics.sample_pool(pool)
        assert metrics._pool["waiting"]._value.get() == 0
    finally:
        await pool.close(timeout=0)


def appended_so_far(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("tasktrail_events_appended_total", {"type": kind}) or 0.0


async def test_events_are_counted_once_they_have_committed(database_url: str) -> None:
    """A batch's events count when its transaction commits: not when the commit fails."""
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        await conn.execute(
            """
            CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.metadata ->> 'doomed' IS NOT NULL THEN RAISE EXCEPTION 'refused at commit'; END IF;
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON events
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();
            """
        )
        task = await writer.create(conn, CreateTask(task_type="m"), {})
        created, progressed = appended_so_far("TaskCreated"), appended_so_far("ProgressReported")
        with pytest.raises(psycopg.errors.RaiseException):
            await writer.create_many(conn, [CreateTask(task_type="m")] * 2, {"doomed": "yes"})
        with pytest.raises(psycopg.errors.RaiseException):
            await writer.change_many(conn, [(task.task_id, UpdateTask(progress=5), None)], {"doomed": "yes"})
        assert (appended_so_far("TaskCreated"), appended_so_far("ProgressReported")) == (created, progressed)
        await writer.create_many(conn, [CreateTask(task_type="m")] * 2, {})
        await writer.change_many(conn, [(task.task_id, UpdateTask(progress=5), None)], {})
        assert (appended_so_far("TaskCreated"), appended_so_far("ProgressReported")) == (created + 2, progressed + 1)
        (events,) = await (await conn.execute("SELECT count(*) FROM events")).fetchone()  # type: ignore[misc]
        assert events == 4
