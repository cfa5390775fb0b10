"""The seed-compatible task routes: /tasks."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlencode
from uuid import UUID

import msgspec
import psycopg
from litestar import Request, delete, get, patch, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.types import Receive, Scope, Send
from litestar.typing import FieldDefinition

from tasktrail import db, eventstore, logs, replicas, writer
from tasktrail.domain.task import CreateTask, DeleteTask, Status, Task, TaskNotFound, UpdateTask, fold
from tasktrail.http.auth import SECURITY
from tasktrail.http.body import MAX_BODY_BYTES, Strict, check_json, invalid
from tasktrail.http.problems import problems
from tasktrail.projections import follow, stats
from tasktrail.projections import tasks as tasks_view

JSON = "application/json"
_encode = msgspec.json.Encoder().encode

# Filters: an empty value means no filter, as in the seed (`?status=` lists everything).
TaskTypeFilter = Annotated[
    str | None, QueryParameter(max_length=200, pattern="^[^\\x00]*$", description="only this task type")
]
# Not optional: the query parser reads "null" as None for an optional parameter, and ?status=null is no status.
StatusFilter = Annotated[
    Literal["", "pending", "running", "completed", "failed", "canceled"],
    QueryParameter(description="only this status; empty for any"),
]


def status_filter(status: str | None) -> Status | None:
    return Status(status) if status else None


class JsonReply:
    """A JSON response as a bare ASGI app, which Litestar sends as it is.

    Litestar's own Response is turned into a second object, header by header,
    on every request; this writes its two messages directly (35 us less CPU per
    request, measured on a minimal app). Header names and values are ASCII.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.body, self.status = body, status
        self.headers = [] if status == 304 else [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]
        for name, value in (headers or {}).items():
            self.headers.append((name.lower().encode(), value.encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


_JSON = JSON.encode()


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> JsonReply:
    return JsonReply(_encode(content), status_code, headers)


def documented(container: Any, description: str) -> ResponseSpec:
    """How the OpenAPI schema shows a success body (handlers return it encoded already)."""
    return ResponseSpec(container, description=description, generate_examples=False)


# Any task route may answer these: a malformed request, no or a too small API key, a bad parameter, no database.
ERRORS = (400, 401, 403, 422, 503)


class Deleted(msgspec.Struct):
    status: str = "deleted"


class Summary(msgspec.Struct):
    total: int
    pending: int
    running: int
    completed: int
    failed: int
    canceled: int


class CleanedUp(msgspec.Struct):
    deleted: int


def task_response(task: Task, status_code: int = 200, headers: dict[str, str] | None = None) -> JsonReply:
    """A task with its version as a strong ETag."""
    return json_response(task, status_code, {"ETag": f'"{task.version}"'} | (headers or {}))


# An entity tag as task_response writes one: a version, without leading zeros
# (tags are compared as strings: "01" is not "1"), weak or not; and the version
# bare, without the quotes RFC 9110 asks for (If-Match: 3), as clients send it.
_TAG = re.compile(r'\s*(W/)?("?)([1-9]\d{0,9})\2\s*')


def matching_versions(header: str, *, weak: bool) -> frozenset[int] | None:
    """The versions an If-Match/If-None-Match header names; None for `*` (any).

    RFC 9110: If-None-Match compares weakly (`W/"3"` names version 3), If-Match
    strongly (a weak tag names nothing, so a PATCH with only one is refused).
    """
    if header.strip() == "*":
        return None
    return frozenset(int(m[3]) for part in header.split(",") if (m := _TAG.fullmatch(part)) and (weak or m[1] is None))


def list_header(request: Request, name: bytes) -> str | None:
    """A list-valued header, its repeats joined as RFC 9110 says they may be (`If-Match: "1"` twice is one list).

    `name` in lower case, as ASGI gives header names. Read from the scope's raw
    headers: request.headers would first build a multidict of every header.
    """
    values = [value.decode("latin-1") for key, value in request.scope["headers"] if key == name]
    return ", ".join(values) if values else None


def expected_versions(request: Request) -> frozenset[int] | None:
    header = list_header(request, b"if-match")
    return None if header is None else matching_versions(header, weak=False)


# A version is any integer: one no task is at (0, -1, 2**40) gets 412, as If-Match: "0" does.
# JSON Schema counts 3.0 as an integer too, so a float is taken, and `if_version` refuses 3.5.
Version = int | float
VERSION = Schema(one_of=[Schema(type=OpenAPIType.INTEGER), Schema(type=OpenAPIType.NULL)])


class ConditionalUpdate(UpdateTask, frozen=True, kw_only=True):
    """A PATCH's body: the change, and the version it expects the task at (as If-Match says it), if any."""

    if_version: Version | None = None


def version_schema(schema_creator: Any, model: type[ConditionalUpdate]) -> Schema:
    """The schema of `model` (registered), its `if_version` an integer rather than int | float."""
    found = schema_creator.schema_registry.get_schema_for_field_definition(FieldDefinition.from_annotation(model))
    found.properties["if_version"] = VERSION
    return found


class StrictUpdate(Strict[ConditionalUpdate]):
    """The body of PATCH /tasks/{task_id}."""

    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any) -> Any:
        reference = super().create_openapi_schema(field_definition, handler_id, schema_creator)
        version_schema(schema_creator, ConditionalUpdate)
        return reference


def changes_something(change: UpdateTask) -> bool:
    return (
        change.status is not None
        or change.progress is not None
        or change.result is not None
        or change.error is not None
    )


def if_version(field: str, change: ConditionalUpdate) -> int | None:
    """The body's expected version as an int; 3.5 is a 422 naming `field`."""
    version = change.if_version
    if isinstance(version, float):
        if not version.is_integer():
            raise invalid(field, "a version is a whole number")
        return int(version)
    return version


def parse_task_id(task_id: str) -> UUID:
    try:
        return UUID(task_id)
    except ValueError:
        raise TaskNotFound(f"task {task_id!r} not found: task ids are UUIDs") from None


# The stream's latest version, and whether the task was deleted: a deletion is always a task's last event.
# The newest row alone, along (stream_id, version): an aggregate read all of a long history (audit: 33 ms
# for the 404 of a deleted task of 100,000 events).
STREAM_STATE = """
SELECT version, type = 'TaskDeleted' FROM events WHERE stream_id = %(stream_id)s ORDER BY version DESC LIMIT 1
"""


class NotYetHere(TaskNotFound):
    """A live task the log has and this process's read model not yet: another release wrote it a moment ago."""


async def not_found(conn: psycopg.AsyncConnection, task_id: UUID) -> TaskNotFound:
    """A 404 that says whether the task never existed or was deleted (or is NotYetHere)."""
    cur = await conn.execute(STREAM_STATE, {"stream_id": task_id})
    version, deleted = await cur.fetchone() or (None, False)
    if version is not None and not deleted:
        return NotYetHere(f"task {task_id} not found")
    return writer.missing(task_id, bool(deleted))


def connection(request: Request) -> db.Borrowed:
    """`async with connection(request) as conn`: a pooled connection to the primary, for a write handler.

    Writes, and every read a write makes (the state it decides on, the
    Idempotency-Key check), use the primary; with replicas, a write's
    connection also takes the Tasktrail-Read-After token (replicas.py).
    Taken in the handler rather than as a Litestar dependency, whose generator
    cleanup costs 15 us of CPU per request (measured against this).
    """
    return request.app.state.replicas.writing(request.scope)


T = TypeVar("T")


async def read(request: Request, fetch: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
    """`await read(request, fetch)`: fetch(conn) for a read handler, on a replica fresh enough for the request.

    Every read handler takes its connection here: on a replica that has
    replayed the request's Tasktrail-Read-After, else on the primary; a read
    that fails on a replica runs again on the primary, so fetch must only read.
    Without replicas it is the primary, at the cost of `connection`.
    """
    return await request.app.state.replicas.read(request.scope, fetch)


def metadata(request: Request, **extra: str) -> dict[str, Any]:
    """What the log records of a request beside the event: its id, and the API key's name as the actor.

    The actor is null when API keys are off (SPEC §5 lists it among every event's metadata).
    """
    state = request.scope["state"]  # the dict itself: request.state wraps it anew on every access
    return {"request_id": state["request_id"], "actor": state.get("actor")} | extra


IdempotencyKey = Annotated[
    str | None, HeaderParameter(name="Idempotency-Key", min_length=1, max_length=255, pattern="^[\\x21-\\x7e]+$")
]


def idempotency_metadata(idempotency_key: str | None) -> dict[str, str]:
    """What a create's events record of its Idempotency-Key: never an API key, which every reader of the history
    would see (as a request id holding one is replaced)."""
    if idempotency_key is None:
        return {}
    if "tt_" in idempotency_key and logs.KEY_IN_TEXT.search(idempotency_key):
        raise invalid("Idempotency-Key", "must not hold an API key (the task's history keeps it, for every reader)")
    return {"idempotency_key": idempotency_key}


@post(
    ["/tasks", "/tasks/"],
    security=SECURITY,
    status_code=201,
    request_max_body_size=MAX_BODY_BYTES,
    dto=Strict[CreateTask],
    return_dto=None,
    responses={201: documented(Task, "the task (or, for a repeated Idempotency-Key, the first one's)")}
    | problems(*ERRORS, 404, 409, 413),
)
async def create_task(
    request: Request, data: JSONBody[CreateTask], idempotency_key: IdempotencyKey = None
) -> JsonReply:
    """Create a task; a repeat with the same Idempotency-Key and body returns the first one's task."""
    check_json("params", data.params)
    writes = request.app.state.writes
    if idempotency_key is None and writes.busy:
        task = await writes.write(None, data, metadata(request), request.scope)
    else:
        extra = idempotency_metadata(idempotency_key)
        async with writes.slot(), connection(request) as conn:
            task = await writer.create(conn, data, metadata(request, **extra), idempotency_key)
    return task_response(task, 201, {"Location": f"/tasks/{task.task_id}"})


async def _as_it_was(conn: psycopg.AsyncConnection, uuid: UUID, version: int | None, as_of: datetime | None) -> Task:
    """The task at a version (404 unless it has that version) or at a moment (404 before creation or after deletion).

    A moment after the last event is the state now: the task has not changed since.
    A version after the last does not exist (yet): answering the latest state
    instead would pass off another version as the one asked for.
    """
    task, last = None, 0
    async for events in eventstore.read_stream_until(conn, uuid, version=version, as_of=as_of):
        task, last = fold(events, task), events[-1].version
    when = f"version {version}" if version is not None else as_of.isoformat()  # type: ignore[union-attr]
    if not last:
        if await eventstore.read_stream(conn, uuid, limit=1):
            raise TaskNotFound(f"task {uuid} did not exist yet at {when}")
        raise TaskNotFound(f"task {uuid} not found")
    if version is not None and last < version:
        versions = f"{last} version{'s' * (last > 1)}" + (" (the last deleted it)" if task is None else "")
        raise TaskNotFound(f"task {uuid} has only {versions}: there is no version {version}")
    if task is None:
        raise TaskNotFound(f"task {uuid} had been deleted by {when}")
    return task


@get(
    "/tasks/{task_id:str}",
    security=SECURITY,
    responses={
        200: documented(Task, "the task, now or as it was"),
        304: ResponseSpec(None, description="the task is still at the version If-None-Match names"),
    }
    | problems(*ERRORS, 404),
)
async def get_task(
    request: Request,
    task_id: FromPath[str],
    version: Annotated[int | None, QueryParameter(ge=1, le=2**31 - 1)] = None,
    as_of: Annotated[
        str | None, QueryParameter(max_length=64, format="date-time", description="an RFC 3339 time (no offset: UTC)")
    ] = None,
) -> JsonReply:
    """The task now, or as it was at ?version=N or ?as_of=TIME (folded from the log)."""
    uuid = parse_task_id(task_id)
    if version is not None and as_of is not None:
        raise invalid("as_of", "give version or as_of, not both")
    moment = None if as_of is None else parse_moment(as_of)

    async def fetch(conn: psycopg.AsyncConnection) -> Task:
        if version is not None or as_of is not None:
            return await _as_it_was(conn, uuid, version, moment)
        found = await tasks_view.get(conn, uuid)
        if found is None:
            raise await not_found(conn, uuid)
        return found

    # During a rolling deploy, another release's writes reach this process's read model a few ms late.
    if (
        request.app.state.follower.others
        and version is None
        and as_of is None
        and replicas.wanted(request.scope["headers"]) is not None
    ):
        # The write a Read-After token names may be one of them (never answer older data): apply them
        # here first, and read on the primary, where they were applied.
        async with connection(request) as conn:
            await follow.catch_up(conn, streams=[uuid])
            task = await fetch(conn)
    else:
        try:
            task = await read(request, fetch)
        except NotYetHere:  # created by one of them a moment ago: apply them (on the primary), and look again
            async with connection(request) as conn:
                await follow.catch_up(conn, streams=[uuid])
            task = await read(request, fetch)
    cached = list_header(request, b"if-none-match")
    if cached is not None and ((tags := matching_versions(cached, weak=True)) is None or task.version in tags):
        return JsonReply(b"", 304, {"ETag": f'"{task.version}"'})
    return task_response(task)


# A `+` sent unescaped in a query string arrives as a space (form decoding): in
# the offset's place (after the time, before hh:mm) it can only have been a `+`.
_DECODED_PLUS = re.compile(r"(?<=[0-9]) (?=[0-9]{2}:[0-9]{2}$)")
# Digits past the microsecond, which PostgreSQL's times do not have: cut off,
# as the moment they name is still within that microsecond (the decoder would
# round 00:00:00.9999999 up to a second that has not come yet).
_PAST_MICROSECONDS = re.compile(r"(:[0-9]{2}\.[0-9]{6})[0-9]+")


def parse_moment(text: str) -> datetime:
    """?as_of's RFC 3339 time, its offset's `+` restored if it came decoded as a space; no offset is UTC."""
    try:
        moment = msgspec.convert(_PAST_MICROSECONDS.sub(r"\1", _DECODED_PLUS.sub("+", text), count=1), datetime)
    except msgspec.ValidationError:
        raise invalid("as_of", "Invalid RFC3339 encoded datetime") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@patch(
    "/tasks/{task_id:str}",
    security=SECURITY,
    request_max_body_size=MAX_BODY_BYTES,
    dto=StrictUpdate,
    return_dto=None,
    responses={200: documented(Task, "the task after the change")} | problems(*ERRORS, 404, 409, 412, 413),
)
async def update_task(request: Request, task_id: FromPath[str], data: JSONBody[ConditionalUpdate]) -> JsonReply:
    """Change status, progress, result or error; If-Match (or `if_version`) makes it conditional on the version."""
    uuid = parse_task_id(task_id)
    if not changes_something(data):
        raise invalid("body", "give at least one of status, progress, result, error")
    check_json("result", data.result)
    expected, writes = expected_versions(request), request.app.state.writes
    if (version := if_version("if_version", data)) is not None:  # as If-Match; with one too, both must hold
        expected = frozenset((version,)) if expected is None else expected & {version}
    if expected is None and writes.busy and writer.guessed(uuid):
        try:
            task = await writes.write(uuid, data, metadata(request), request.scope)
        except TaskNotFound:  # deleted meanwhile (by another process): its write went alone, and read
            async with connection(request) as conn:
                raise await not_found(conn, uuid) from None
    else:
        async with writes.slot(), connection(request) as conn:
            try:
                task = await writer.change(conn, uuid, data, metadata(request), expected)
            except TaskNotFound:
                raise await not_found(conn, uuid) from None
    assert task is not None
    return task_response(task)


@delete(
    "/tasks/{task_id:str}",
    security=SECURITY,
    status_code=200,
    responses={200: documented(Deleted, "the task is deleted; its history is kept")} | problems(*ERRORS, 404, 409, 412),
)
async def delete_task(request: Request, task_id: FromPath[str]) -> JsonReply:
    """Delete the task (its history stays); If-Match makes it conditional on the version."""
    uuid = parse_task_id(task_id)
    async with connection(request) as conn:
        try:
            await writer.change(conn, uuid, DeleteTask(), metadata(request), expected_versions(request))
        except TaskNotFound:
            raise await not_found(conn, uuid) from None
    return json_response(Deleted())


# Exactly the cursors _encode_cursor gives out, so the OpenAPI schema can say which are valid:
# unpadded base64url of "id:" ("aWQ6") and 1-18 digits, four characters per three digits.
_ONE = "(?:[MN][AQgw]|O[AQ])"  # a last single digit
_TWO = "(?:[MN][DTjz]|O[DT])[AEIMQUYcgk]"  # a last pair of digits
_THREE = f"{_TWO}[w-z0-5]"
CURSOR = f"^aWQ6(?:{_THREE}){{0,5}}(?:{_THREE}|{_TWO}|{_ONE})$"
_CURSOR = re.compile(CURSOR)


def _encode_cursor(task: Task | tasks_view.Listed) -> str:
    return encode_position(task.id)


def encode_position(position: int) -> str:
    """The list's cursor for the page of tasks before this id."""
    return base64.urlsafe_b64encode(f"id:{position}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    """The position a cursor of _encode_cursor's names; 422 for anything else (the dashboard's pages too)."""
    if _CURSOR.fullmatch(cursor):
        with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
            kind, _, value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
            if kind == "id" and value.isascii() and value.isdigit() and len(value) < 19:
                return int(value)
    raise invalid("cursor", "not a cursor this service gave out")


def past_a_page(rows: list[Any], limit: int) -> bool:
    """Whether rows read as limit + 1 are more than a page: then the next page has some. Keeps the page."""
    if len(rows) <= limit:
        return False
    del rows[limit:]
    return True


@get(
    ["/tasks", "/tasks/"],
    security=SECURITY,
    responses={200: documented(list[Task], "live tasks, newest first; a Link to the next page when there is one")}
    | problems(*ERRORS),
)
async def list_tasks(
    request: Request,
    status: StatusFilter = "",
    task_type: TaskTypeFilter = None,
    skip: Annotated[int, QueryParameter(ge=0, le=1_000_000_000)] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, QueryParameter(max_length=100, pattern=CURSOR)] = None,
) -> JsonReply:
    """Live tasks, newest first; the next page's URL is in the Link header."""
    before = None if cursor is None else _decode_cursor(cursor)
    wanted = status_filter(status)
    # One more than a page: a Link only when another page has tasks (no empty last page to follow).
    page = await read(
        request,
        lambda conn: tasks_view.list_page(
            conn, status=wanted, task_type=task_type or None, before=before, skip=skip, limit=limit + 1
        ),
    )
    headers = {}
    if past_a_page(page, limit):
        query = {k: v for k, v in request.query_params.items() if k not in ("cursor", "skip")}
        query["cursor"] = _encode_cursor(page[-1])
        headers["Link"] = f'<{request.url.path}?{urlencode(query)}>; rel="next"'
    return json_response(page, headers=headers)


@get(
    "/tasks/stats/summary",
    security=SECURITY,
    responses={200: documented(Summary, "counts per status")} | problems(*ERRORS),
)
async def stats_summary(request: Request, task_type: TaskTypeFilter = None) -> JsonReply:
    """Counts per status, from the counters (never by counting rows)."""
    counts = await read(request, lambda conn: stats.summary(conn, task_type or None))
    return json_response(Summary(**counts))


@post(
    "/tasks/cleanup",
    security=SECURITY,
    status_code=200,
    opt={"scope": "admin"},
    responses={200: documented(CleanedUp, "how many finished tasks were deleted")} | problems(*ERRORS, 409),
)
async def cleanup(request: Request, days: Annotated[int, QueryParameter(ge=0, le=100_000)] = 30) -> JsonReply:
    """Delete finished tasks completed more than `days` days ago."""
    # The one destructive route reads nothing but `days`: a typo (`Days=0`) or a filter it does not have
    # (`task_type=tmp`, which would delete every type's) is refused, never ignored.
    for name in request.query_params:
        if name != "days":
            raise invalid(name, "cleanup takes only days (?days=30); it deletes finished tasks of every type")
    async with connection(request) as conn:
        deleted = await writer.cleanup(conn, days, metadata(request))
    return json_response(CleanedUp(deleted))


ROUTES = [create_task, get_task, update_task, delete_task, list_tasks, stats_summary, cleanup]
