"""The rebuild's fast fold (rebuild.replay, `evolve` unrolled) and `evolve` cannot drift apart.

Any valid history (commands decided one after another, so every kind of event
in every order the rules allow) is folded both ways and must give the same
tasks. The histories are fed to the replay as the log leaves PostgreSQL
(READ_LOG's chunks), cut at arbitrary places; test_replay.py does the
same through a real database. A new kind of event fails here until the fast
fold knows it.
"""

from __future__ import annotations

import itertools
import random
import struct
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasktrail.domain import events as ev
from tasktrail.domain.events import Recorded, to_data, type_of
from tasktrail.domain.task import (
    CreateTask,
    DeleteTask,
    Status,
    Task,
    TransitionRejected,
    UpdateTask,
    decide,
    evolve,
)
from tasktrail.projections import rebuild
from tasktrail.projections.replayed import to_task

TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12)
JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
UPDATES = st.builds(
    UpdateTask,
    status=st.none() | st.sampled_from(Status),
    progress=st.none() | st.sampled_from([0.0, 100.0, 12.5]) | st.floats(0, 100),
    result=st.none() | st.dictionaries(TEXT, JSON, max_size=3),
    error=st.none() | TEXT,
)
COMMANDS = st.one_of(
    st.tuples(
        st.just("create"),
        st.builds(
            CreateTask,
            task_type=TEXT.filter(bool),
            params=st.none() | JSON.filter(lambda value: isinstance(value, dict)),
        ),
    ),
    st.tuples(st.just("change"), UPDATES),
    st.tuples(st.just("change"), UPDATES),
    st.tuples(st.just("change"), UPDATES),
    st.tuples(st.just("delete"), st.builds(DeleteTask, reason=st.sampled_from(["request", "retention"]))),
)


def history(steps: list[tuple[str, Any, int, int]]) -> list[Recorded]:
    """The events the commands produce, decided one after another on the streams' states."""
    states: dict[UUID, Task | None] = {}
    recorded: list[Recorded] = []
    # Just before 2000-01-01, where READ_LOG's times (microseconds since then) turn from negative to positive.
    at = datetime(1999, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)
    for kind, command, pick, micros in steps:
        live = [stream for stream, state in states.items() if state is not None]
        if kind == "create" or not live:
            if kind != "create":
                continue
            stream, state = uuid4(), None
        else:
            stream = live[pick % len(live)]
            state = states[stream]
        try:
            event = decide(command, state)
        except TransitionRejected:
            continue
        if event is None:
            continue
        at += timedelta(microseconds=micros)
        one = Recorded(stream, 1 if state is None else state.version + 1, len(recorded) + 1, at, event)
        states[stream] = evolve(state, one)
        recorded.append(one)
    return recorded


def micros(at: datetime) -> int:
    """A timestamptz as PostgreSQL holds it: microseconds since 2000-01-01 UTC."""
    return (at - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def copy_rows(recorded: list[Recorded], cuts: list[int]) -> list[rebuild.Chunk]:
    """The events as READ_LOG's chunks, cut after the given counts of events (and an empty range among them)."""
    edges = sorted({0, len(recorded), *(cut % (len(recorded) + 1) for cut in cuts)})
    chunks: list[rebuild.Chunk] = [(None,) * 6]
    for a, b in itertools.pairwise(edges):
        part = recorded[a:b]
        if not part:
            continue
        chunks.append((
            b"".join(r.stream_id.bytes for r in part),
            struct.pack(f">{len(part)}i", *(r.version for r in part)),
            struct.pack(f">{len(part)}q", *(r.position for r in part)),
            struct.pack(f">{len(part)}q", *(micros(r.occurred_at) for r in part)),
            "\x1f".join(type_of(r.event) for r in part).encode(),
            b"\x1e".join(msgspec.json.encode(to_data(r.event)) for r in part),
        ))  # fmt: skip
        if len(chunks) == 2:
            chunks.append((None,) * 6)
    return chunks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(COMMANDS, st.integers(0, 1000), st.sampled_from([1, 2, 250_000, 1_000_000, 654_321])),
        min_size=1,
        max_size=60,
    ),
    st.lists(st.integers(0, 1000), max_size=4),
)
def test_the_fast_fold_equals_evolve_on_any_valid_history(steps: list[Any], cuts: list[int]) -> None:
    recorded = history([(kind, command, pick, micros) for (kind, command), pick, micros in steps])
    folded: dict[UUID, Task | None] = {}
    for r in recorded:
        folded[r.stream_id] = evolve(folded.get(r.stream_id), r)
    expected = {stream: task for stream, task in folded.items() if task is not None}

    states, counted = rebuild.replay(copy_rows(recorded, cuts))
    replayed = {task.task_id: task for task in map(to_task, states.values())}

    assert counted == len(recorded)
    assert replayed == expected
    assert list(replayed) == sorted(expected, key=lambda stream: expected[stream].id)  # creation order


def test_the_fast_fold_knows_every_kind_of_event() -> None:
    """A new event type in the domain fails here (and the rebuild refuses to import) until the fold knows it."""
    assert set(rebuild.KINDS) == set(ev.EVENT_TYPES.values())
    assert set(ev.Event.__args__) == set(ev.EVENT_TYPES.values())  # type: ignore[attr-defined]


def test_the_histories_reach_every_kind_of_event() -> None:
    """The commands above, decided at random, produce every event type the domain has (so the property covers it)."""
    rng = random.Random(15)  # noqa: S311 -- test data
    seen: set[type[ev.Event]] = set()
    for _ in range(50):
        steps = [
            (
                rng.choice(["create", "change", "change", "change", "delete"]),
                None,
                rng.randrange(1000),
                1,
            )
            for _ in range(60)
        ]
        commands = []
        for kind, _, pick, micros in steps:
            command: Any = {
                "create": CreateTask(task_type="t"),
                "delete": DeleteTask(),
                "change": UpdateTask(
                    status=rng.choice([None, *Status]),
                    progress=rng.choice([None, 50.0]),
                    result=rng.choice([None, {"r": 1}]),
                    error=rng.choice([None, "e"]),
                ),
            }[kind]
            commands.append((kind, command, pick, micros))
        seen |= {type(r.event) for r in history(commands)}
    assert seen == set(ev.EVENT_TYPES.values())
