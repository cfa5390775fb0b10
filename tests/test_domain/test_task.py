"""The domain as pure functions: given events, when a command, then an event or a refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import msgspec
import pytest

from tasktrail.domain.events import (
    EVENT_TYPES,
    UPCASTERS,
    Event,
    ProgressReported,
    Recorded,
    TaskCanceled,
    TaskCompleted,
    TaskCreated,
    TaskDeleted,
    TaskFailed,
    TaskRequeued,
    TaskRetried,
    TaskStarted,
    TaskUpdated,
    from_data,
    to_data,
    type_of,
)
from tasktrail.domain.task import (
    FINISHED,
    DeleteTask,
    Status,
    Task,
    TaskNotFound,
    TransitionRejected,
    UpdateTask,
    decide,
    evolve,
    fold,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STREAM = uuid4()


def history(*events: Event) -> list[Recorded]:
    return [
        Recorded(STREAM, version, 100 + version, T0 + timedelta(seconds=version), event)
        for version, event in enumerate(events, start=1)
    ]


def given(*events: Event) -> Task:
    state = fold(history(*events))
    assert state is not None
    return state


def then(state: Task, event: Event) -> Task:
    after = evolve(state, Recorded(STREAM, state.version + 1, 999, T0 + timedelta(hours=1), event))
    assert after is not None
    return after


CREATED = TaskCreated(task_type="import", params={"file": "a.csv"})
# One way to reach each status from creation.
REACH: dict[Status, tuple[Event, ...]] = {
    Status.PENDING: (CREATED,),
    Status.RUNNING: (CREATED, TaskStarted()),
    Status.COMPLETED: (CREATED, TaskStarted(), TaskCompleted(progress=100.0)),
    Status.FAILED: (CREATED, TaskStarted(), TaskFailed(error="boom")),
    Status.CANCELED: (CREATED, TaskCanceled()),
}
ALLOWED: dict[tuple[Status, Status], type[Event]] = {
    (Status.PENDING, Status.RUNNING): TaskStarted,
    (Status.PENDING, Status.COMPLETED): TaskCompleted,
    (Status.PENDING, Status.FAILED): TaskFailed,
    (Status.PENDING, Status.CANCELED): TaskCanceled,
    (Status.RUNNING, Status.COMPLETED): TaskCompleted,
    (Status.RUNNING, Status.FAILED): TaskFailed,
    (Status.RUNNING, Status.CANCELED): TaskCanceled,
    (Status.RUNNING, Status.PENDING): TaskRequeued,
    (Status.FAILED, Status.PENDING): TaskRetried,
    (Status.CANCELED, Status.PENDING): TaskRetried,
}


@pytest.mark.parametrize(("source", "target"), [(a, b) for a in Status for b in Status])
def test_transition_table(source: Status, target: Status) -> None:
    state = given(*REACH[source])
    assert state.status is source
    command = UpdateTask(status=target)
    if source is target:
        assert decide(command, state) is None  # asking for the current status is not a move
    elif (source, target) in ALLOWED:
        event = decide(command, state)
        assert type(event) is ALLOWED[source, target]
        assert then(state, event).status is target
    else:
        with pytest.raises(TransitionRejected) as refused:
            decide(command, state)
        assert refused.value.current is source
        assert set(refused.value.allowed) == {b for a, b in ALLOWED if a is source}
        assert str(source) in str(refused.value)


def test_create_starts_pending_with_times_from_the_event() -> None:
    task = given(CREATED)
    assert (task.status, task.progress, task.retry_count, task.version) == (Status.PENDING, 0.0, 0, 1)
    assert task.id == 101  # the creating event's position
    assert task.created_at == task.updated_at == T0 + timedelta(seconds=1)
    assert task.params == {"file": "a.csv"}


def test_started_at_is_set_on_the_first_start_only() -> None:
    task = given(CREATED, TaskStarted(), TaskRequeued(), TaskStarted())
    assert task.started_at == T0 + timedelta(seconds=2)
    assert task.retry_count == 1


def test_requeue_bumps_retry_count() -> None:
    event = decide(UpdateTask(status=Status.PENDING), given(*REACH[Status.RUNNING]))
    assert isinstance(event, TaskRequeued)
    assert then(given(*REACH[Status.RUNNING]), event).retry_count == 1


@pytest.mark.parametrize("source", [Status.FAILED, Status.CANCELED])
def test_retry_bumps_retry_count_and_clears_times_and_error(source: Status) -> None:
    state = given(*REACH[source])
    assert state.completed_at is not None
    after = then(state, decide(UpdateTask(status=Status.PENDING), state))
    assert after.status is Status.PENDING
    assert after.retry_count == 1
    assert (after.started_at, after.completed_at, after.error) == (None, None, None)


def test_completing_sets_progress_to_100_unless_told_otherwise() -> None:
    running = given(CREATED, TaskStarted(), ProgressReported(progress=40.0))
    assert decide(UpdateTask(status=Status.COMPLETED), running) == TaskCompleted(progress=100.0)
    assert decide(UpdateTask(status=Status.COMPLETED, progress=70), running) == TaskCompleted(progress=70.0)
    done = then(running, TaskCompleted(progress=100.0))
    assert done.completed_at == T0 + timedelta(hours=1)


def test_an_update_that_changes_nothing_decides_nothing() -> None:
    state = given(CREATED, TaskStarted(progress=10.0))
    assert decide(UpdateTask(progress=10), state) is None
    assert decide(UpdateTask(status=Status.RUNNING, progress=10.0), state) is None


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"ok": 1}, {"ok": True}),
        ({"ok": 0}, {"ok": False}),
        ({"n": [0, 1]}, {"n": [False, True]}),
        ({"a": {"b": 1}}, {"a": {"b": True}}),
        ({"a": 1}, {"a": 1, "b": None}),
        ({"n": 1}, {"n": 1.5}),
        ({"n": 2**53 + 1}, {"n": float(2**53)}),  # no number is rounded to compare
    ],
)
def test_a_result_that_python_calls_equal_but_json_does_not_is_a_change(before: object, after: object) -> None:
    """1 == True == 1.0 to Python; a client that sends true where 1 was changed its result."""
    running = given(CREATED, TaskStarted(result=before))
    assert decide(UpdateTask(result=after), running) == TaskUpdated(result=after)
    assert decide(UpdateTask(result=before), running) is None
    reordered = dict(reversed(list(before.items()))) if isinstance(before, dict) else before
    assert decide(UpdateTask(result=reordered), running) is None  # an object's keys have no order
    with pytest.raises(TransitionRejected):
        decide(UpdateTask(result=after), then(running, TaskCompleted()))


@pytest.mark.parametrize(
    ("before", "after"),
    [({"n": 1}, {"n": 1.0}), ({"n": [0, -0.0]}, {"n": [0.0, 0]}), ({"a": {"b": 100}}, {"a": {"b": 1e2}})],
)
def test_the_same_number_spelled_another_way_is_no_change(before: object, after: object) -> None:
    """As jsonb compares them, and as a JavaScript client sends back a result it read (1.0 is 1 to it)."""
    running = given(CREATED, TaskStarted(result=before))
    assert decide(UpdateTask(result=after), running) is None
    done = then(running, TaskCompleted())
    assert decide(UpdateTask(status=Status.COMPLETED, result=after), done) is None


def test_progress_and_result_without_a_move() -> None:
    state = given(CREATED, TaskStarted())
    assert decide(UpdateTask(progress=55.5), state) == ProgressReported(progress=55.5)
    assert decide(UpdateTask(result={"rows": 3}), state) == TaskUpdated(result={"rows": 3})
    assert decide(UpdateTask(error="slow"), state) == TaskUpdated(error="slow")
    # SPEC §5: a result or an error set without a move is TaskUpdated, progress with it or not (audit: it
    # was ProgressReported as soon as the progress changed too).
    both = UpdateTask(progress=60, result={"rows": 4})
    assert decide(both, state) == TaskUpdated(progress=60.0, result={"rows": 4})
    assert decide(UpdateTask(progress=60, error="slow"), state) == TaskUpdated(progress=60.0, error="slow")
    assert decide(UpdateTask(progress=55.5, result=None), state) == ProgressReported(progress=55.5)


def test_a_move_carries_what_else_changed() -> None:
    state = given(CREATED)
    event = decide(UpdateTask(status=Status.RUNNING, progress=5, result={"a": 1}), state)
    assert event == TaskStarted(progress=5.0, result={"a": 1})
    assert to_data(event) == {"progress": 5.0, "result": {"a": 1}}


@pytest.mark.parametrize("finished", sorted(FINISHED))
@pytest.mark.parametrize("command", [UpdateTask(progress=1), UpdateTask(result={"x": 1}), UpdateTask(error="late")])
def test_a_finished_task_refuses_other_changes(finished: Status, command: UpdateTask) -> None:
    with pytest.raises(TransitionRejected, match=str(finished)):
        decide(command, given(*REACH[finished]))


def test_a_finished_task_accepts_its_own_status_as_a_no_op() -> None:
    done = given(*REACH[Status.COMPLETED])
    assert decide(UpdateTask(status=Status.COMPLETED, progress=100.0), done) is None


def test_delete_and_missing_tasks() -> None:
    state = given(CREATED)
    assert decide(DeleteTask(), state) == TaskDeleted(reason="request")
    assert evolve(state, history(CREATED, TaskDeleted())[1]) is None
    with pytest.raises(TaskNotFound):
        decide(UpdateTask(progress=1), None)
    with pytest.raises(TaskNotFound):
        decide(DeleteTask(), None)


def test_every_event_round_trips_through_its_stored_form() -> None:
    samples = [
        CREATED,
        TaskStarted(progress=1.0),
        ProgressReported(progress=2.0, result={"a": [1, 2]}),
        TaskCompleted(progress=100.0, result={"ok": True}),
        TaskFailed(error="x"),
        TaskCanceled(),
        TaskRequeued(),
        TaskRetried(),
        TaskUpdated(error="y"),
        TaskDeleted(reason="retention"),
    ]
    assert {type_of(e) for e in samples} == set(EVENT_TYPES)
    for event in samples:
        stored = msgspec.json.decode(msgspec.json.encode(to_data(event)))
        assert "type" not in stored
        assert from_data(type_of(event), stored) == event


def test_an_upcaster_reads_an_old_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    # Suppose TaskFailed once stored its error as {"message": ...}.
    def upcast(data: dict) -> dict:
        if isinstance(data.get("error"), dict):
            data = data | {"error": data["error"]["message"]}
        return data

    monkeypatch.setitem(UPCASTERS, "TaskFailed", upcast)
    assert from_data("TaskFailed", {"error": {"message": "disk full"}}) == TaskFailed(error="disk full")
    assert from_data("TaskFailed", {"error": "disk full"}) == TaskFailed(error="disk full")
