"""Batch writes (SPEC §12): POST and PATCH /tasks/batch, up to 1,000 tasks a request.

Anything wrong in the body itself (an empty or too long list, a malformed
item, an item that asks for nothing) refuses the whole request with 422 and
writes nothing: the client has a bug to fix, not a task to retry. What depends
on a task's state (404, 409, 412) is decided per item, as a single request
would decide it, and answered in that item's result.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Request, patch, post
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import JSONBody
from litestar.typing import FieldDefinition

from tasktrail import writer
from tasktrail.domain.task import Command, CreateTask, DeleteTask, Task
from tasktrail.http.auth import SECURITY
from tasktrail.http.body import MAX_BODY_BYTES, Faults, Strict, check_json, invalid
from tasktrail.http.problems import Problem, problems, refusal
from tasktrail.http.tasks import (
    ERRORS,
    ConditionalUpdate,
    IdempotencyKey,
    JsonReply,
    changes_something,
    connection,
    documented,
    idempotency_metadata,
    if_version,
    json_response,
    metadata,
    version_schema,
)

MAX_ITEMS = 1000
Items = msgspec.Meta(min_length=1, max_length=MAX_ITEMS)


class NewTasks(msgspec.Struct, frozen=True):
    """POST /tasks/batch: the tasks to create, in order."""

    tasks: Annotated[list[CreateTask], Items]


class TaskChange(ConditionalUpdate, frozen=True, kw_only=True):
    """One item of PATCH /tasks/batch: a single PATCH's body (with its `if_version`), and the task it is for.

    `delete: true` (an extension of SPEC §12, which the dashboard's bulk delete
    uses) deletes the task as DELETE /tasks/{task_id} would; it takes no other change.
    """

    task_id: UUID
    delete: bool = False


class TaskChanges(msgspec.Struct, frozen=True):
    """PATCH /tasks/batch: the changes, decided in order."""

    updates: Annotated[list[TaskChange], Items]


CHANGES = ("status", "progress", "result", "error")
NOT_NULL = Schema(schema_not=Schema(type=OpenAPIType.NULL))
# What the types alone cannot say: an item is an update that changes at least
# one field, or a delete that changes none; anything else is a 422.
KINDS = [
    Schema(
        title="update",
        properties={"delete": Schema(const=False)},
        any_of=[Schema(required=[name], properties={name: NOT_NULL}) for name in CHANGES],
    ),
    Schema(
        title="delete",
        required=["delete"],
        properties={"delete": Schema(const=True)} | {name: Schema(type=OpenAPIType.NULL) for name in CHANGES},
    ),
]


class StrictChanges(Strict[TaskChanges]):
    """The body of PATCH /tasks/batch, whose schema also says which items ask for something."""

    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any) -> Any:
        reference = super().create_openapi_schema(field_definition, handler_id, schema_creator)
        version_schema(schema_creator, TaskChange).one_of = KINDS
        return reference


class CreatedTasks(msgspec.Struct):
    tasks: list[Task]


class ItemResult(msgspec.Struct, omit_defaults=True):
    """One item's answer: `status` is the HTTP status a single request would have had."""

    task_id: UUID
    status: int
    task: Task | None = None  # 200: the task after the change (unchanged for a no-op)
    problem: Problem | None = None  # 404, 409, 412: the problem a single request would have answered
    deleted: bool = False  # 200 for `delete: true`


class Results(msgspec.Struct):
    results: list[ItemResult]


DELETE = DeleteTask()


@post(
    "/tasks/batch",
    security=SECURITY,
    status_code=201,
    request_max_body_size=MAX_BODY_BYTES,
    dto=Strict[NewTasks],
    return_dto=None,
    responses={
        201: documented(CreatedTasks, "the tasks in the order given (for a repeated Idempotency-Key, the first ones)")
    }
    | problems(*ERRORS, 404, 409, 413),
)
async def create_tasks(request: Request, data: JSONBody[NewTasks], idempotency_key: IdempotencyKey = None) -> JsonReply:
    """Create 1 to 1,000 tasks, all or none, in order; an Idempotency-Key covers the whole batch."""
    faults = Faults()
    for index, command in enumerate(data.tasks):
        faults.check(check_json, f"tasks[{index}].params", command.params)
    faults.refuse()
    extra = idempotency_metadata(idempotency_key)
    async with connection(request) as conn:
        tasks = await writer.create_many(conn, data.tasks, metadata(request, **extra), idempotency_key)
    return json_response(CreatedTasks(tasks), 201)


@patch(
    "/tasks/batch",
    security=SECURITY,
    request_max_body_size=MAX_BODY_BYTES,
    dto=StrictChanges,
    return_dto=None,
    responses={200: documented(Results, "each item's result, in the order given")} | problems(*ERRORS, 409, 413),
)
async def change_tasks(request: Request, data: JSONBody[TaskChanges]) -> JsonReply:
    """Update or delete 1 to 1,000 tasks, each decided on its own and in order; the accepted ones commit together."""
    if "if-match" in request.headers:
        raise invalid("If-Match", "a batch takes each item's expected version in its if_version")
    faults = Faults()
    items = [
        (
            item.task_id,
            faults.check(_command, index, item),
            faults.check(if_version, f"updates[{index}].if_version", item),
        )
        for index, item in enumerate(data.updates)
    ]
    faults.refuse()
    async with connection(request) as conn:
        outcomes = await writer.change_many(conn, items, metadata(request))
    results = [_result(task_id, outcome) for (task_id, _, _), outcome in zip(items, outcomes, strict=True)]
    return json_response(Results(results))


def _command(index: int, item: TaskChange) -> Command:
    """The item's command: itself (it is an UpdateTask), or a delete; refuses an item that asks for nothing."""
    if item.delete:
        if changes_something(item):
            raise invalid(f"updates[{index}].delete", "a delete takes no other change (only task_id and if_version)")
        return DELETE
    if not changes_something(item):
        raise invalid(f"updates[{index}]", "give at least one of status, progress, result, error (or delete: true)")
    check_json(f"updates[{index}].result", item.result)
    return item


def _result(task_id: UUID, outcome: writer.Outcome) -> ItemResult:
    if outcome is None:
        return ItemResult(task_id, 200, deleted=True)
    if isinstance(outcome, Task):
        return ItemResult(task_id, 200, task=outcome)
    problem = refusal(outcome)
    return ItemResult(task_id, problem.status, problem=problem)


ROUTES = [create_tasks, change_tasks]
