"""A list filtered by both status and task type reads its page, not every task newer than it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from litestar.testing import AsyncTestClient
from psycopg import sql

from tasktrail.domain.task import Status
from tasktrail.projections import tasks

pytestmark = pytest.mark.anyio

PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s"


async def created(client: AsyncTestClient, task_type: str, n: int, status: str | None = None) -> list[str]:
    made = await client.post("/tasks/batch", json={"tasks": [{"task_type": task_type}] * n})
    ids = [task["task_id"] for task in made.json()["tasks"]]
    if status:
        changed = await client.patch("/tasks/batch", json={"updates": [{"task_id": i, "status": status} for i in ids]})
        assert {result["status"] for result in changed.json()["results"]} == {200}
    return ids


def removed_by_filter(plan: dict[str, Any]) -> Iterator[int]:
    yield plan.get("Rows Removed by Filter", 0)
    for child in plan.get("Plans", []):
        yield from removed_by_filter(child)


async def test_a_rare_pair_is_read_from_its_index_with_a_plan_for_its_values(
    client: AsyncTestClient, conn: psycopg.AsyncConnection
) -> None:
    # The oldest three tasks of a type are running, its 2,000 others pending, below 2,000 running
    # tasks of another type: version 1 read all 4,000 newer rows to find the three (ids descending).
    rare = await created(client, "rare", 3, "running")
    await created(client, "rare", 1000)
    await created(client, "rare", 1000)
    for _ in range(2):
        await created(client, "common", 1000, "running")
    await conn.execute("ANALYZE tasks")  # what autovacuum does after such a load

    params = {"status": Status.RUNNING, "task_type": "rare", "before": None, "skip": 0, "limit": 11}
    explain = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + tasks._list_query(tasks.COLUMNS, params)
    cur = await conn.execute(explain, params, prepare=False)
    ((plan,),) = await cur.fetchall()
    assert sum(removed_by_filter(plan[0]["Plan"])) == 0, plan

    for _ in range(8):  # more than psycopg's prepare_threshold: a prepared plan is one for any pair
        page = await tasks.list_page(conn, status=Status.RUNNING, task_type="rare", limit=11)
        assert [str(task.task_id) for task in page] == rare[::-1]
        await tasks.list_page(conn, status=Status.RUNNING, limit=1)
    both = await conn.execute(PREPARED, ("%status = $1 AND task_type = $2%",))
    one = await conn.execute(PREPARED, ("%WHERE status = $1 ORDER BY%",))
    assert (await both.fetchone(), await one.fetchone()) == ((0,), (1,))

    listed = await client.get("/tasks/", params={"status": "running", "task_type": "rare"})
    assert [task["task_id"] for task in listed.json()] == rare[::-1]
    counts = await client.get("/tasks/stats/summary")
    assert (counts.json()["running"], counts.json()["pending"]) == (2003, 2000)
