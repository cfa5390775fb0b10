"""A task's state, the commands on it, and the rules: decide and evolve."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
from msgspec import UNSET

from tasktrail.domain.events import (
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
)


class Status(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


FINISHED = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELED})

# The transition table: from status -> {to status: the event that records the move}.
MOVES: dict[Status, dict[Status, type[Event]]] = {
    Status.PENDING: {
        Status.RUNNING: TaskStarted,
        Status.COMPLETED: TaskCompleted,
        Status.FAILED: TaskFailed,
        Status.CANCELED: TaskCanceled,
    },
    Status.RUNNING: {
        Status.COMPLETED: TaskCompleted,
        Status.FAILED: TaskFailed,
        Status.CANCELED: TaskCanceled,
        Status.PENDING: TaskRequeued,
    },
    Status.FAILED: {Status.PENDING: TaskRetried},
    Status.CANCELED: {Status.PENDING: TaskRetried},
    Status.COMPLETED: {},
}

TARGET: dict[type[Event], Status] = {
    TaskStarted: Status.RUNNING,
    TaskCompleted: Status.COMPLETED,
    TaskFailed: Status.FAILED,
    TaskCanceled: Status.CANCELED,
    TaskRequeued: Status.PENDING,
    TaskRetried: Status.PENDING,
}


class Task(msgspec.Struct, frozen=True):
    id: int
    task_id: UUID
    task_type: str
    status: Status
    progress: float
    params: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    retry_count: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    version: int


# Commands: data only, named in the imperative.


# Limits a decoder enforces; no NUL: PostgreSQL text cannot hold it.
TaskType = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern="^[^\\x00]+$")]
# `extra` restates the lower bound for the OpenAPI schema: Litestar drops a bound of 0 (it tests truthiness).
Progress = Annotated[float, msgspec.Meta(ge=0.0, le=100.0, extra_json_schema={"extra": {"minimum": 0.0}})]
ErrorText = Annotated[str, msgspec.Meta(max_length=65_536, pattern="^[^\\x00]*$")]


class CreateTask(msgspec.Struct, frozen=True):
    task_type: TaskType
    params: dict[str, Any] | None = None


class UpdateTask(msgspec.Struct, frozen=True):
    status: Status | None = None
    progress: Progress | None = None
    result: dict[str, Any] | None = None
    error: ErrorText | None = None


class DeleteTask(msgspec.Struct, frozen=True):
    reason: str = "request"


Command = CreateTask | UpdateTask | DeleteTask


# What the domain refuses.


class TaskNotFound(Exception):
    """No such task: never created, or deleted."""


class PreconditionFailed(Exception):
    """The task is not at the version the caller said it expected (If-Match)."""


class TransitionRejected(Exception):
    """A change the task's current status does not allow."""

    def __init__(self, current: Status, asked: str) -> None:
        self.current = current
        self.allowed = sorted(MOVES[current])
        moves = ", ".join(self.allowed) or "none: it is final"
        super().__init__(f"task is {current}; {asked} is not allowed (allowed moves: {moves})")


def decide(command: Command, state: Task | None) -> Event | None:
    """The event a command produces on a state; None when it changes nothing."""
    match command:
        case CreateTask(task_type=task_type, params=params):
            return TaskCreated(task_type=task_type, params=params)
        case _ if state is None:
            raise TaskNotFound("task not found")
        case DeleteTask(reason=reason):
            return TaskDeleted(reason=reason)
        case UpdateTask():
            return _decide_update(command, state)
    raise TypeError(f"unknown command {command!r}")  # pragma: no cover


NUMBERS = (int, float)  # not bool: true is no number in JSON


def same_json(a: Any, b: Any) -> bool:
    """Whether two decoded JSON values are the same JSON: true is not 1 (to Python's == it is).

    1 and 1.0 are the same number, as PostgreSQL's jsonb, JSON Schema and JavaScript (which
    cannot tell them apart) have it: a client sending back a result it read is no change.
    """
    if type(a) is not type(b):
        return type(a) in NUMBERS and type(b) in NUMBERS and bool(a == b)
    if type(a) is dict:
        return a.keys() == b.keys() and all(same_json(value, b[key]) for key, value in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(map(same_json, a, b))
    return bool(a == b)


def _decide_update(command: UpdateTask, state: Task) -> Event | None:
    changes: dict[str, Any] = {}
    if command.progress is not None and command.progress != state.progress:
        changes["progress"] = float(command.progress) + 0.0  # -0.0 is 0.0, as PostgreSQL's JSON stores it
    if command.result is not None and not same_json(command.result, state.result):
        changes["result"] = command.result
    if command.error is not None and command.error != state.error:
        changes["error"] = command.error

    target = command.status
    if target is None or target == state.status:
        if not changes:
            return None
        if state.status in FINISHED:
            raise TransitionRejected(state.status, f"changing {', '.join(changes)}")
        # SPEC §5: TaskUpdated is a result or an error set without a status change (with progress or not).
        if "result" in changes or "error" in changes:
            return TaskUpdated(**changes)
        return ProgressReported(**changes)

    event_type = MOVES[state.status].get(target)
    if event_type is None:
        raise TransitionRejected(state.status, f"moving to {target}")
    if event_type is TaskCompleted and command.progress is None and state.progress != 100.0:
        changes["progress"] = 100.0
    if event_type is TaskRetried and command.error is not None:
        changes["error"] = command.error  # a retry clears the error; a new one is a change
    return event_type(**changes)


def evolve(state: Task | None, recorded: Recorded) -> Task | None:
    """The state after an event. Decides nothing: the event already did."""
    event, at = recorded.event, recorded.occurred_at
    match event:
        case TaskCreated(task_type=task_type, params=params):
            return Task(
                id=recorded.position,
                task_id=recorded.stream_id,
                task_type=task_type,
                status=Status.PENDING,
                progress=0.0,
                params=params,
                result=None,
                error=None,
                retry_count=0,
                created_at=at,
                updated_at=at,
                started_at=None,
                completed_at=None,
                version=recorded.version,
            )
        case TaskDeleted():
            return None
    assert state is not None, f"{type(event).__name__} before TaskCreated"
    fields: dict[str, Any] = {"updated_at": at, "version": recorded.version}
    status = TARGET.get(type(event))
    if status is not None:
        fields["status"] = status
    match event:
        case TaskStarted() if state.started_at is None:
            fields["started_at"] = at
        case TaskCompleted() | TaskFailed() | TaskCanceled():
            fields["completed_at"] = at
        case TaskRequeued():
            fields["retry_count"] = state.retry_count + 1
        case TaskRetried():
            fields.update(retry_count=state.retry_count + 1, started_at=None, completed_at=None, error=None)
    if event.progress is not UNSET:
        fields["progress"] = event.progress
    if event.result is not UNSET:
        fields["result"] = event.result
    if event.error is not UNSET:
        fields["error"] = event.error
    return msgspec.structs.replace(state, **fields)


def fold(history: Iterable[Recorded], state: Task | None = None) -> Task | None:
    for recorded in history:
        state = evolve(state, recorded)
    return state
