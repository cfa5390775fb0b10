"""What the API answers, as typed values: plain dataclasses built from its JSON.

Fields the server adds later are ignored, so an older client keeps working
against a newer server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, overload

STATUSES = ("pending", "running", "completed", "failed", "canceled")
FINISHED = frozenset({"completed", "failed", "canceled"})

# The status each event moves a task to; the others leave it as it is.
TARGET = {
    "TaskStarted": "running",
    "TaskCompleted": "completed",
    "TaskFailed": "failed",
    "TaskCanceled": "canceled",
    "TaskRequeued": "pending",
    "TaskRetried": "pending",
}


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class _Fields:
    """`result["status"]` as well as `result.status`, for code written against the JSON."""

    def __getitem__(self, name: str) -> Any:
        if name not in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
            raise KeyError(name)
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Task(_Fields):
    """A task as `GET /tasks/{task_id}` shows it."""

    id: int
    task_id: str
    task_type: str
    status: str
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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        return cls(
            id=data["id"],
            task_id=data["task_id"],
            task_type=data["task_type"],
            status=data["status"],
            progress=float(data["progress"]),
            params=data.get("params"),
            result=data.get("result"),
            error=data.get("error"),
            retry_count=data["retry_count"],
            created_at=datetime.fromisoformat(data["created_at"]),
            updated_at=datetime.fromisoformat(data["updated_at"]),
            started_at=_time(data.get("started_at")),
            completed_at=_time(data.get("completed_at")),
            version=data["version"],
        )

    @property
    def finished(self) -> bool:
        """completed, failed or canceled."""
        return self.status in FINISHED


@dataclass(frozen=True)
class Event(_Fields):
    """One event of a task's history, or of the global feed (which adds `cursor`)."""

    task_id: str
    version: int
    position: int
    type: str
    occurred_at: datetime
    data: dict[str, Any]
    metadata: dict[str, Any]
    cursor: str | None = None  # where the feed resumes after this event; None in a task's history

    @classmethod
    def from_json(cls, data: dict[str, Any], task_id: str | None = None) -> Event:
        return cls(
            task_id=data.get("task_id", task_id),
            version=data["version"],
            position=data["position"],
            type=data["type"],
            occurred_at=datetime.fromisoformat(data["occurred_at"]),
            data=data.get("data") or {},
            metadata=data.get("metadata") or {},
            cursor=data.get("cursor"),
        )


@dataclass(frozen=True)
class History(Sequence[Event]):
    """A task's events in version order; a sequence of `Event`s."""

    task_id: str
    events: list[Event] = field(default_factory=list)

    @overload
    def __getitem__(self, index: int) -> Event: ...
    @overload
    def __getitem__(self, index: slice) -> list[Event]: ...
    def __getitem__(self, index: int | slice) -> Event | list[Event]:
        return self.events[index]

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)


@dataclass(frozen=True)
class Stats(_Fields):
    """Counts per status (`GET /tasks/stats/summary`)."""

    total: int
    pending: int
    running: int
    completed: int
    failed: int
    canceled: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stats:
        return cls(**{f.name: int(data.get(f.name, 0)) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class ItemResult(_Fields):
    """One item's outcome in `update_many`: `status` is its HTTP status (200, 404, 409, 412, 422)."""

    task_id: str
    status: int
    task: Task | None = None
    deleted: bool = False
    problem: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> Exception | None:
        """The exception this item's problem means (the one `raise_for_status` raises), or None."""
        if self.ok:
            return None
        from tasktrail_client.errors import from_problem  # errors imports models: import here

        return from_problem(self.status, self.problem or {})

    def raise_for_status(self) -> None:
        if (error := self.error) is not None:
            raise error


@dataclass(frozen=True)
class Change:
    """One step of `watch`: the task after it (None once deleted) and the event that made it.

    The first step is the task as it is (`type` "snapshot", `event` None);
    each later step is an event, folded into the task as the server folds it.
    """

    type: str
    task: Task | None
    event: Event | None = None


def apply(task: Task | None, event: Event) -> Task | None:
    """The task after an event, as the server's projection computes it; None once deleted."""
    at = event.occurred_at
    if event.type == "TaskCreated":
        return Task(
            id=event.position,
            task_id=event.task_id,
            task_type=event.data["task_type"],
            status="pending",
            progress=0.0,
            params=event.data.get("params"),
            result=None,
            error=None,
            retry_count=0,
            created_at=at,
            updated_at=at,
            started_at=None,
            completed_at=None,
            version=event.version,
        )
    if event.type == "TaskDeleted" or task is None:
        return None
    changes: dict[str, Any] = {"updated_at": at, "version": event.version}
    if event.type in TARGET:
        changes["status"] = TARGET[event.type]
    if event.type == "TaskStarted" and task.started_at is None:
        changes["started_at"] = at
    elif event.type in ("TaskCompleted", "TaskFailed", "TaskCanceled"):
        changes["completed_at"] = at
    elif event.type == "TaskRequeued":
        changes["retry_count"] = task.retry_count + 1
    elif event.type == "TaskRetried":
        changes.update(retry_count=task.retry_count + 1, started_at=None, completed_at=None, error=None)
    for name in ("progress", "result", "error"):
        if name in event.data:
            changes[name] = float(event.data[name]) if name == "progress" else event.data[name]
    return dataclasses.replace(task, **changes)
