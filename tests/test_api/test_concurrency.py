"""Racing writers against a real server: no update lost, none doubled, no version gap."""

from __future__ import annotations

import anyio
import httpx
import pytest

pytestmark = pytest.mark.anyio

WRITERS = 32


async def race(base_url: str, task_id: str, headers: dict[str, str] | None = None) -> list[httpx.Response]:
    responses: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=WRITERS)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        ready = anyio.Event()

        async def write(progress: int) -> None:
            await ready.wait()
            responses.append(await client.patch(f"/tasks/{task_id}", json={"progress": progress}, headers=headers))

        async with anyio.create_task_group() as group:
            for progress in range(1, WRITERS + 1):
                group.start_soon(write, progress)
            await anyio.sleep(0.1)
            ready.set()
    return responses


async def history(base_url: str, task_id: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url) as client:
        return (await client.get(f"/tasks/{task_id}/history?limit=1000")).json()["events"]


async def test_concurrent_patches_are_all_kept_without_gaps(live_server: str) -> None:
    async with httpx.AsyncClient(base_url=live_server) as client:
        task = (await client.post("/tasks/", json={"task_type": "race"})).json()
    responses = await race(live_server, task["task_id"])
    assert [r.status_code for r in responses] == [200] * WRITERS
    # Each changed something, so each is exactly one event, with its own version.
    assert sorted(r.json()["version"] for r in responses) == list(range(2, WRITERS + 2))
    events = await history(live_server, task["task_id"])
    assert [e["version"] for e in events] == list(range(1, WRITERS + 2))
    assert sorted(e["data"]["progress"] for e in events[1:]) == list(range(1, WRITERS + 1))
    async with httpx.AsyncClient(base_url=live_server) as client:
        final = (await client.get(f"/tasks/{task['task_id']}")).json()
    assert final["version"] == WRITERS + 1
    assert final["progress"] == events[-1]["data"]["progress"]


async def test_concurrent_patches_with_if_match_let_one_win(live_server: str) -> None:
    async with httpx.AsyncClient(base_url=live_server) as client:
        task = (await client.post("/tasks/", json={"task_type": "race"})).json()
    responses = await race(live_server, task["task_id"], {"If-Match": '"1"'})
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [412] * (WRITERS - 1)
    assert [e["version"] for e in await history(live_server, task["task_id"])] == [1, 2]


def conflicts(scrape: str) -> float:
    return float(next(line for line in scrape.splitlines() if line.startswith("tasktrail_write_conflicts_total "))[32:])


async def test_concurrent_cleanups_take_turns_rather_than_fight(live_server: str) -> None:
    """Cron on several hosts: each cleanup step reads what is expired once the steps before it committed."""
    async with httpx.AsyncClient(base_url=live_server, timeout=60) as client:
        for _ in range(3):
            made = (await client.post("/tasks/batch", json={"tasks": [{"task_type": "turns"}] * 1000})).json()
            done = [{"task_id": task["task_id"], "status": "completed"} for task in made["tasks"]]
            assert (await client.patch("/tasks/batch", json={"updates": done})).status_code == 200
        before = conflicts((await client.get("/metrics")).text)
        deleted: list[int] = []

        async def clean() -> None:
            deleted.append((await client.post("/tasks/cleanup?days=0")).json()["deleted"])

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(clean)
        assert sum(deleted) == 3000
        assert conflicts((await client.get("/metrics")).text) == before  # audit: thousands of lost races
        assert (await client.get("/tasks/stats/summary?task_type=turns")).json()["total"] == 0
