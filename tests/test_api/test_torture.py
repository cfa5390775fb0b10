"""Torture: 16 writers on 64 tasks for 10 s, some committing late and some rolling back, while a
reader tails the feed and another holds an event stream; both see exactly the committed events, once each."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from uuid import UUID

import httpx
import psycopg

from tasktrail import db, writer
from tasktrail.domain.task import CreateTask, Status, UpdateTask
from tests.conftest import Server, assert_verifies
from tests.sse import Message, parse

WRITERS = 16
TASKS = 64
SECONDS = 6.0


async def write(database_url: str, task_ids: list[UUID], seed: int, deadline: float, outcomes: Counter) -> None:
    """Update random tasks through the real write path until the deadline; some commit late, some roll back."""
    rng = random.Random(seed)  # noqa: S311 -- a repeatable workload, not a secret
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        while time.monotonic() < deadline:
            task_id = rng.choice(task_ids)
            roll = rng.random()
            if roll < 0.1:
                update = UpdateTask(status=rng.choice([Status.PENDING, Status.RUNNING]))
            else:
                update = UpdateTask(progress=round(rng.uniform(0, 100), 2))
            if roll < 0.7:
                await writer.change(conn, task_id, update, {"writer": seed})
                outcomes["committed"] += 1
                continue
            # The same write inside an outer transaction that stays open a moment
            # (writers that began later commit first) and then commits or rolls back.
            try:
                async with conn.transaction():
                    await writer.change(conn, task_id, update, {"writer": seed})
                    await asyncio.sleep(rng.uniform(0, 0.02))
                    if roll >= 0.85:
                        raise psycopg.Rollback
            except psycopg.errors.SerializationFailure:
                # It lost a race and retried inside its older transaction: the
                # database refuses to put a version behind a newer one.
                outcomes["refused"] += 1
                continue
            outcomes["committed late" if roll < 0.85 else "rolled back"] += 1


def tail_feed(base: str, seen: list[dict], stop: threading.Event) -> None:
    """Follow GET /events from the start until told to stop."""
    after = None
    with httpx.Client(base_url=base, timeout=30) as client:
        while not stop.is_set():
            page = client.get("/events", params={"limit": 1000} | ({} if after is None else {"after": after})).json()
            seen += page["events"]
            after = page["next_cursor"]
            if not page["events"]:
                time.sleep(0.05)


def hold_stream(base: str, after: str, seen: list[dict], ready: threading.Event, stop: threading.Event) -> None:
    """Hold GET /events/stream open from `after` until told to stop (pings let it notice)."""
    with httpx.stream("GET", f"{base}/events/stream", params={"after": after}, timeout=30) as response:
        ready.set()
        for item in parse(response.iter_lines()):
            if isinstance(item, Message):
                seen.append(item.json())
            elif stop.is_set():
                return


def check(name: str, seen: list[dict], committed: list[int]) -> None:
    positions = [event["position"] for event in seen]
    skipped = set(committed) - set(positions)
    repeated = [position for position, n in Counter(positions).items() if n > 1]
    phantom = set(positions) - set(committed)  # a rolled-back event shown
    assert (len(skipped), len(repeated), len(phantom)) == (0, 0, 0), (
        f"{name}: skipped {sorted(skipped)[:10]}, repeated {repeated[:10]}, phantom {sorted(phantom)[:10]}"
    )
    # Each task's events arrive in version order, with no gap.
    versions: dict[str, list[int]] = defaultdict(list)
    for event in seen:
        versions[event["task_id"]].append(event["version"])
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values()), f"{name}: versions out of order"


def test_readers_see_every_committed_event_exactly_once_under_concurrent_writers(
    database_url: str, tmp_path: Path
) -> None:
    env = os.environ | {"DATABASE_URL": database_url, "TASKTRAIL_SSE_PING_SECONDS": "0.5"}
    server = Server(env, log_dir=tmp_path)
    try:
        start = httpx.get(f"{server.url}/events").json()["next_cursor"]
        feed_seen: list[dict] = []
        stream_seen: list[dict] = []
        stop, stream_ready = threading.Event(), threading.Event()
        readers = [
            threading.Thread(target=tail_feed, args=(server.url, feed_seen, stop)),
            threading.Thread(target=hold_stream, args=(server.url, start, stream_seen, stream_ready, stop)),
        ]
        for thread in readers:
            thread.start()
        assert stream_ready.wait(30)

        async def create_tasks(count: int) -> list[UUID]:
            async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
                return [
                    (await writer.create(conn, CreateTask(task_type=f"t{i % 4}"), {})).task_id for i in range(count)
                ]

        async def create_all() -> list[UUID]:
            return [
                task_id
                for ids in await asyncio.gather(*[create_tasks(TASKS // 8) for _ in range(8)])
                for task_id in ids
            ]

        task_ids = asyncio.run(create_all())
        assert len(set(task_ids)) == TASKS
        deadline = time.monotonic() + SECONDS
        counts: list[Counter] = [Counter() for _ in range(WRITERS)]
        writers = [
            threading.Thread(target=asyncio.run, args=(write(database_url, task_ids, seed, deadline, counts[seed]),))
            for seed in range(WRITERS)
        ]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        outcomes = sum(counts, Counter())
        assert outcomes["committed late"] > 0
        assert outcomes["rolled back"] > 0

        with psycopg.connect(database_url) as conn:
            committed = [row[0] for row in conn.execute("SELECT position FROM events ORDER BY position")]
        # Let both readers catch up with everything that committed.
        give_up = time.monotonic() + 60
        while min(len(feed_seen), len(stream_seen)) < len(committed) and time.monotonic() < give_up:
            time.sleep(0.1)
        time.sleep(0.3)  # anything extra (a repeat, a phantom) would show up now too
        stop.set()
        for thread in readers:
            thread.join(30)
        check("feed", feed_seen, committed)
        check("stream", stream_seen, committed)
        assert stream_seen == feed_seen  # the same events, the same JSON, in the same order
    finally:
        server.stop()
    assert_verifies(database_url)
