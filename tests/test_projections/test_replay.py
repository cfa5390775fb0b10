"""The rebuild's unrolled replay gives exactly what folding with `evolve` gives, for any history."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from types import ModuleType, SimpleNamespace
from uuid import uuid4

import msgspec
import psycopg
import pytest

from tasktrail import db, eventstore
from tasktrail.domain.events import Recorded
from tasktrail.domain.task import (
    CreateTask,
    DeleteTask,
    Status,
    TransitionRejected,
    UpdateTask,
    decide,
    evolve,
)
from tasktrail.projections import rebuild, stats, tasks
from tasktrail.projections.rebuild import load
from tasktrail.projections.replayed import to_task
from tasktrail.verify import fold_log

pytestmark = pytest.mark.anyio

TEXTS = ["", "x", 'a "quoted" \\ back\\slash', "tab\there\nnew line", "ü€ \x1e\x1f \u2028", "\\\\"]


def command(rng: random.Random) -> UpdateTask | DeleteTask:
    if rng.random() < 0.03:
        return DeleteTask(reason=rng.choice(["request", "retention"]))
    return UpdateTask(
        status=rng.choice([None, *Status]),
        progress=rng.choice([None, None, 0.0, 12.5, 100.0, 100 / 3, rng.uniform(0, 100)]),
        result=rng.choice([None, None, {}, {"n": rng.randrange(10**6)}, {"text": rng.choice(TEXTS), "deep": [[{}]]}]),
        error=rng.choice([None, None, *TEXTS]),
    )


async def test_the_replay_equals_evolve_on_random_histories(database_url: str) -> None:
    rng = random.Random(20261129)  # noqa: S311 -- reproducible test data, not secrets
    at = datetime(2026, 1, 1, tzinfo=UTC)
    states: dict = {}
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as conn:
        for _ in range(4_000):
            if not states or rng.random() < 0.15:
                stream, state = uuid4(), None
                event = decide(
                    CreateTask(
                        task_type=rng.choice(["a", "b", TEXTS[2]]), params=rng.choice([None, {}, {"p": TEXTS[4]}])
                    ),
                    None,
                )
            else:
                stream = rng.choice(list(states))
                state = states[stream]
                try:
                    event = decide(command(rng), state)
                except TransitionRejected:
                    continue
                if event is None:
                    continue
            # Whole seconds, and every number of fractional digits PostgreSQL prints.
            at += timedelta(microseconds=rng.choice([1_000_000, 500_000, 120_000, 1, 654_321]))
            recorded = Recorded(stream, 1 if state is None else state.version + 1, 0, at, event)
            (position,) = await eventstore.append(conn, [recorded], {})
            recorded = msgspec.structs.replace(recorded, position=position)
            after = evolve(state, recorded)
            if after is None:
                del states[stream]
            else:
                states[stream] = after

    loaded = load(database_url, [])
    for readers in (2, 3):  # several readers, as on a machine with more than two cores, taking turns by small chunks
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rebuild, "READERS", readers)
            patch.setattr(rebuild, "CHUNK", 97)
            assert load(database_url, []).states == loaded.states

    with psycopg.connect(database_url) as conn:
        events, folded = fold_log(conn)
    live = {stream: task for stream, task in folded.items() if task is not None}
    assert loaded.events == events > 1_500
    assert len(live) > 100
    replayed = {task.task_id: task for task in map(to_task, loaded.states.values())}
    assert replayed == live
    assert list(replayed) == sorted(live, key=lambda stream: live[stream].id)  # creation order
    assert list(loaded.states) == [stream.bytes for stream in replayed]
    assert live == states

    # The read models' fast rows (COPY data straight from the states) load the
    # same tables as their `rows` of the Tasks.
    load(database_url, [tasks, stats])
    load(database_url, [_through_tasks(tasks), _through_tasks(stats)])
    with psycopg.connect(database_url) as conn:
        for name, version in [("tasks", tasks.VERSION), ("stats", stats.VERSION)]:
            table = "tasks" if name == "tasks" else "task_counts"
            fast, through_tasks = (
                conn.execute(f"SELECT * FROM rm_{name}_v{v}_new.{table} ORDER BY 1, 2").fetchall()  # noqa: S608 -- constants
                for v in (version, version + 100)
            )
            assert fast == through_tasks
            assert len(fast) >= (len(live) if name == "tasks" else 2)


def _through_tasks(module: ModuleType) -> SimpleNamespace:
    """The read model under another version, without its fast rows: loaded through `rows` of Tasks."""
    names = ["NAME", "TABLES", "CREATE", "INDEXES", "AFTER_INDEXES", "COPY", "COPY_TYPES", "rows"]
    return SimpleNamespace(**{name: getattr(module, name) for name in names}, VERSION=module.VERSION + 100)
