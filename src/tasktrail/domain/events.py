"""The stored format of tasktrail's events.

This module is a contract with every event already written. Add fields only
with defaults; never rename a tag (the class name is the tag and the `type`
column); change a shape only by adding an upcaster below that turns the old
stored `data` into the new one on read.

`data` holds the event's fields without the tag, and only what changed: unset
optional fields are left out of the stored JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeAlias
from uuid import UUID

import msgspec
from msgspec import UNSET, UnsetType


class _Event(msgspec.Struct, frozen=True, tag=True, omit_defaults=True):
    pass


class TaskCreated(_Event, frozen=True):
    task_type: str
    params: dict[str, Any] | None = None


class _Change(_Event, frozen=True):
    """What a status move or an update may carry besides the move itself."""

    progress: float | UnsetType = UNSET
    result: dict[str, Any] | UnsetType = UNSET
    error: str | UnsetType = UNSET


class TaskStarted(_Change, frozen=True):
    pass


class ProgressReported(_Change, frozen=True):
    pass


class TaskCompleted(_Change, frozen=True):
    pass


class TaskFailed(_Change, frozen=True):
    pass


class TaskCanceled(_Change, frozen=True):
    pass


class TaskRequeued(_Change, frozen=True):
    """A running task went back to pending (its worker gave it up)."""


class TaskRetried(_Change, frozen=True):
    """A failed or canceled task went back to pending for another attempt."""


class TaskUpdated(_Change, frozen=True):
    """Result or error set without a status change."""


class TaskDeleted(_Event, frozen=True, omit_defaults=False):
    """Deleted at a request, or by cleanup (reason "retention"); the reason is always stored."""

    reason: str = "request"


Event: TypeAlias = (
    TaskCreated
    | TaskStarted
    | ProgressReported
    | TaskCompleted
    | TaskFailed
    | TaskCanceled
    | TaskRequeued
    | TaskRetried
    | TaskUpdated
    | TaskDeleted
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls
    for cls in Event.__args__  # type: ignore[attr-defined]
}


class Recorded(msgspec.Struct, frozen=True):
    """An event as the log holds it: where it stands and when it happened."""

    stream_id: UUID
    version: int
    position: int
    occurred_at: datetime
    event: Event


# Upcasters: stored type -> function from old `data` to current `data`.
# Each one must accept every shape that type was ever stored in.
UPCASTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def type_of(event: Event) -> str:
    return event.__struct_config__.tag  # type: ignore[return-value]


def to_data(event: Event) -> dict[str, Any]:
    """The stored `data` of an event: its set fields, without the tag."""
    data = msgspec.to_builtins(event)
    del data["type"]
    return data


def from_data(type_: str, data: dict[str, Any]) -> Event:
    """Decode stored `data` of the given type, upcasting older shapes."""
    upcast = UPCASTERS.get(type_)
    if upcast is not None:
        data = upcast(data)
    return msgspec.convert(data, EVENT_TYPES[type_])
