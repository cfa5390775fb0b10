"""What each call does, written once for both clients.

Each operation is a generator that yields steps (send this request, read the
next line of that stream, sleep, hand this value to the caller) and is driven
by `Client` with httpx.Client and by `AsyncClient` with httpx.AsyncClient.
Retries, idempotency keys, paging, the read-after token and the stream's
resumption are therefore decided in one place, and the two clients cannot
drift apart. A transport error (connection refused or dropped, a timeout) is
thrown into the generator at the step that met it.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeVar

import httpx

from tasktrail_client.errors import (
    BadRequest,
    ConnectionFailed,
    PayloadTooLarge,
    PreconditionFailed,
    ValidationFailed,
    from_problem,
)
from tasktrail_client.models import Change, Event, History, ItemResult, Stats, Task, apply

T = TypeVar("T")

READ_AFTER = "Tasktrail-Read-After"
ON_PRIMARY = "primary"  # a token that sends a read to the primary (the server's replicas.ON_PRIMARY)
Headers = Mapping[str, str]
NO_HEADERS: Headers = MappingProxyType({})
PRIMARY: Headers = MappingProxyType({READ_AFTER: ON_PRIMARY})
REFUSED = (404, 409, 412)  # a write's answers that may carry a token besides a success


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: bool = False  # the driver leaves a 200's body unread, for NextLine

    @property
    def reads(self) -> bool:
        return self.method == "GET"


@dataclass(frozen=True)
class NextLine:
    """The next line of a streamed response's body; None at its end."""

    response: httpx.Response


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit:
    """A value for the caller of an iterating call."""

    value: Any


Step = Request | NextLine | Sleep | Emit
Flow = Generator[Step, Any, T]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is tried again (bounded, with jitter)."""

    # Ten attempts: 6 to 11 s of waiting in all (the jitter), which a restart of the service fits in.
    attempts: int = 10
    base_delay: float = 0.1
    max_delay: float = 2.0

    def delay(self, failures: int, retry_after: str | None = None) -> float:
        """Exponential, half of it random, never above max_delay; at least what Retry-After asks (up to max)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 -- jitter, not a secret
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), self.max_delay))
        return delay


_KEY = re.compile(r"[!-~]+")  # what a bearer token may be: printable ASCII, no space


class Session:
    """What a client keeps between calls: its headers and the read-after token of its last write."""

    def __init__(self, api_key: str | None, retry: RetryPolicy) -> None:
        self.retry = retry
        if api_key is not None and not _KEY.fullmatch(api_key):
            raise ValueError("api_key must be printable ASCII with no spaces (None for no key; it is empty or not)")
        self.headers = {"Accept": "application/json"} | (
            {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        )
        self._token: str | None = None
        self._lock = threading.Lock()  # a Run's progress thread writes beside the caller's thread

    def headers_for(self, request: Request) -> dict[str, str]:
        headers = self.headers | dict(request.headers)
        if request.reads and self._token is not None and READ_AFTER not in request.headers:
            headers[READ_AFTER] = self._token
        return headers

    def observe(self, request: Request, response: httpx.Response) -> None:
        """Keep a write's read-after token, so that the reads after it see it (SPEC §13).

        A refused write's too (404, 409, 412), which a server with replicas sends: a retry refused for the
        change its lost first attempt made then reads that change back, from data that has it.
        """
        token = response.headers.get(READ_AFTER)
        if token and not request.reads and (response.is_success or response.status_code in REFUSED):
            with self._lock:
                self._token = later(self._token, token)

    def lost(self, request: Request) -> None:
        """A write's answer was lost: it may have committed at a position no token names, so reads go to the
        primary until the next write's answer gives one."""
        if not request.reads:
            with self._lock:
                self._token = ON_PRIMARY

    @property
    def read_after(self) -> str | None:
        """The token the next read sends: the latest write's (None before any write)."""
        return self._token


_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def later(held: str | None, new: str) -> str:
    """Of two tokens, the later. They are opaque; when both read as WAL positions (X/Y), compare them,
    so that writes answered out of order (threads) never move the token back; else the newest wins."""
    if held is None:
        return new
    a, b = _LSN.fullmatch(held), _LSN.fullmatch(new)
    if a and b:
        return held if (int(a[1], 16), int(a[2], 16)) > (int(b[1], 16), int(b[2], 16)) else new
    return new


# Which failures a call retries: an answer lost in transit is retried only
# where a second attempt cannot make a second change.
ALWAYS = "always"  # reads, and writes whose repeat is harmless or recognised
UNSENT = "unsent"  # only failures where the request surely had no effect: no connection, or a plain 503
CHECKED = "checked"  # as UNSENT, but a lost answer raises Lost, for the caller to look whether it was applied


class Lost(Exception):
    """A write's answer was lost: it may or may not have been applied (a transport error, or a 503, is its cause)."""


def call(session: Session, request: Request, retry: str = ALWAYS) -> Flow[httpx.Response]:
    """Send a request, retrying 503s and transport errors with backoff; the final answer, whatever it is."""
    response, _sends = yield from attempts(session, request, retry)
    return response


def attempts(session: Session, request: Request, retry: str = ALWAYS) -> Flow[tuple[httpx.Response, int]]:
    """`call`, also saying how often the request was sent (more than once: an earlier one may have been applied)."""
    failures = 0
    while True:
        try:
            response = yield request
        except httpx.LocalProtocolError as exc:
            # A request this side cannot send (a header no HTTP allows, such as an empty key's "Bearer "):
            # no network failure, and no retry would send it.
            raise ValueError(f"{request.method} {request.path}: the request cannot be sent: {exc}") from exc
        except httpx.TransportError as exc:
            failures += 1
            unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
            if not unsent:
                session.lost(request)
            if failures >= session.retry.attempts or (retry == UNSENT and not unsent):
                raise ConnectionFailed(f"{request.method} {request.path}: {exc!r}") from exc
            if retry == CHECKED and not unsent:
                raise Lost from exc
            yield Sleep(session.retry.delay(failures))
            continue
        if response.status_code == 503 and _outcome_unknown(response):
            # The server lost its database connection with the write under way: as if its answer was lost.
            session.lost(request)
            if retry == CHECKED:
                raise Lost from _problem(response)
            if retry == UNSENT:
                raise ConnectionFailed(f"{request.method} {request.path}: the outcome is unknown") from _problem(
                    response
                )
        if response.status_code == 503 and failures + 1 < session.retry.attempts:
            failures += 1
            yield Sleep(session.retry.delay(failures, response.headers.get("retry-after")))
            continue
        return response, failures + 1


def expect(response: httpx.Response, *ok: int) -> Any:
    """The answer's JSON when its status is one of `ok`; else the problem as an exception."""
    if response.status_code in ok:
        return response.json() if response.content else None
    raise _problem(response)


def _problem_document(response: httpx.Response) -> dict[str, Any]:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    return problem if isinstance(problem, dict) else {"title": response.reason_phrase, "detail": response.text[:500]}


def _problem(response: httpx.Response) -> Exception:
    return from_problem(response.status_code, _problem_document(response), dict(response.headers))


def _outcome_unknown(response: httpx.Response) -> bool:
    """A 503 to a write the server may have made (its database connection lost mid-write, or its stop)."""
    return _problem_document(response).get("outcome") == "unknown"


def task_path(task_id: str | uuid.UUID, suffix: str = "") -> str:
    """A task's path; a task id is a UUID, never "", "." or "batch", which would name another route."""
    try:
        return f"/tasks/{uuid.UUID(str(task_id))}{suffix}"
    except ValueError:
        raise ValueError(f"{str(task_id)[:100]!r} is not a task id (a UUID)") from None


def _idempotency(key: str | None) -> dict[str, str]:
    if key is not None and not (_KEY.fullmatch(key) and len(key) <= 255):
        raise ValueError("an Idempotency-Key is 1 to 255 printable ASCII characters, no space")
    return {"Idempotency-Key": key or uuid.uuid4().hex}


def _if_match(version: int | None) -> dict[str, str]:
    return {} if version is None else {"If-Match": f'"{version}"'}


def _request_id() -> dict[str, str]:
    """Each write names itself, so that after a lost answer the history says whether it was applied."""
    return {"X-Request-ID": uuid.uuid4().hex}


def _next(response: httpx.Response) -> str | None:
    return response.links.get("next", {}).get("url")


def create(session: Session, task_type: str, params: dict[str, Any] | None, idempotency_key: str | None) -> Flow[Task]:
    # One key for every attempt: a retry after a lost answer gets the first attempt's task back.
    headers = _idempotency(idempotency_key) | _request_id()
    body = {"task_type": task_type} | ({} if params is None else {"params": params})
    response = yield from call(session, Request("POST", "/tasks/", json=body, headers=headers))
    return Task.from_json(expect(response, 201))


def create_many(
    session: Session, tasks: Iterable[Mapping[str, Any] | str], idempotency_key: str | None
) -> Flow[list[Task]]:
    items = [{"task_type": t} if isinstance(t, str) else dict(t) for t in tasks]
    headers = _idempotency(idempotency_key) | _request_id()
    response = yield from call(session, Request("POST", "/tasks/batch", json={"tasks": items}, headers=headers))
    return [Task.from_json(t) for t in expect(response, 201)["tasks"]]


def get(
    session: Session, task_id: str, version: int | None, as_of: datetime | str | None, headers: Headers = NO_HEADERS
) -> Flow[Task]:
    params: dict[str, Any] = {}
    if version is not None:
        params["version"] = version
    if as_of is not None:
        params["as_of"] = as_of.isoformat() if isinstance(as_of, datetime) else as_of
    response = yield from call(session, Request("GET", task_path(task_id), params=params, headers=headers))
    return Task.from_json(expect(response, 200))


# The most the service answers on a page: a larger page_size asks for pages of this many.
MAX_PAGE = 1000


def _page(page_size: int) -> int:
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, not {page_size}")
    return min(page_size, MAX_PAGE)


def list_tasks(session: Session, status: str | None, task_type: str | None, page_size: int) -> Flow[None]:
    params = {"limit": _page(page_size)} | ({} if status is None else {"status": status})
    params |= {} if task_type is None else {"task_type": task_type}
    request = Request("GET", "/tasks/", params=params)
    while True:
        response = yield from call(session, request)
        for task in expect(response, 200):
            yield Emit(Task.from_json(task))
        if (link := _next(response)) is None:
            return
        request = Request("GET", link)


def changes(
    status: str | None = None,
    progress: float | None = None,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    body = {"status": status, "progress": progress, "result": result, "error": error}
    return {name: value for name, value in body.items() if value is not None}


def update(session: Session, task_id: str, body: dict[str, Any], if_version: int | None) -> Flow[Task]:
    """A PATCH, its lost answers retried. Under If-Match a repeat answers 412 if the first attempt was
    applied, and the history tells whether that 412 is our own write. Without it a repeat is not harmless:
    another writer may have moved the task in between (`pending` sent again after a worker started the
    task requeues the worker's claim; `progress=50` sent again after 60 moves it back), and a first
    attempt not in the history yet may still be on its way (held by a proxy, queued at the server). So
    after a lost answer the history is read, from the primary: the change found there is the answer;
    else ConnectionFailed says the outcome is unknown. Never sent twice."""
    if not body:
        raise ValueError("give at least one of status, progress, result, error")
    headers = _if_match(if_version) | _request_id()
    request = Request("PATCH", task_path(task_id), json=body, headers=headers)
    try:
        response, sends = yield from attempts(session, request, ALWAYS if if_version is not None else CHECKED)
    except Lost as lost:
        mine = yield from _own_event(session, task_id, headers["X-Request-ID"], 0)
        if mine is not None:
            return (yield from get(session, task_id, mine.version, None, PRIMARY))
        raise ConnectionFailed(
            f"PATCH {request.path}: the answer was lost, and the change is not in the task's history"
            " (it made none, or may still be applied): read the task before sending it again"
        ) from lost.__cause__
    if response.status_code == 412 and sends > 1 and if_version is not None:
        mine = yield from _own_event(session, task_id, headers["X-Request-ID"], if_version)
        if mine is not None:
            return (yield from get(session, task_id, mine.version, None, PRIMARY))
    return Task.from_json(expect(response, 200))


# How often a run's claim or write is sent again on a newer version its task reached meanwhile.
RUN_REWRITES = 5


def claim(session: Session, task_id: str) -> Flow[tuple[Task, bool]]:
    """A run's start, and whether it claimed its task. A pending task is moved to running under If-Match, so
    of two runs racing for it only one claims it: the other raises PreconditionFailed (a task only annotated
    meanwhile is looked at again). A task already running is taken as it is: a move to running is a no-op
    there (SPEC §4), and the run holds it without a claim. Any other status is the server's 409."""
    task = yield from get(session, task_id, None, None, PRIMARY)
    if task.status == "running":
        return task, False
    if task.status != "pending":
        return (yield from update(session, task_id, {"status": "running"}, None)), False  # the server's 409
    # Looked at again while still pending: else claimed, or moved on, by someone else meanwhile.
    claimed = yield from _on_latest(
        session, task_id, {"status": "running"}, task, lambda now: now.status == "pending", RUN_REWRITES
    )
    return claimed, True


def run_write(session: Session, task_id: str, body: dict[str, Any], held: Task, claimed: bool) -> Flow[Task]:
    """A worker's run's write, If-Match the version it last saw (`held`). A run that claimed its task sends
    it again on the new version when someone else changed the task meanwhile in a way that leaves the run
    its task (a result, an error, progress: still running, not requeued or retried since it started). A
    task taken away (canceled, requeued, retried, deleted), or changed under a run that holds it without a
    claim, raises PreconditionFailed (or NotFound, Conflict), and is left as the other writer left it.
    """

    def still_the_run(now: Task) -> bool:
        return (now.status, now.retry_count, now.started_at) == ("running", held.retry_count, held.started_at)

    return (yield from _on_latest(session, task_id, body, held, still_the_run, RUN_REWRITES if claimed else 0))


def _on_latest(
    session: Session, task_id: str, body: dict[str, Any], held: Task, still: Callable[[Task], bool], rewrites: int
) -> Flow[Task]:
    """`body` If-Match `held`'s version; refused (412), sent again on the version the task is at now while
    `still(now)` holds, up to `rewrites` times; else the 412 is raised."""
    for _ in range(rewrites):
        try:
            return (yield from update(session, task_id, body, held.version))
        except PreconditionFailed:
            held = yield from get(session, task_id, None, None, PRIMARY)
            if not still(held):
                raise
    return (yield from update(session, task_id, body, held.version))


def delete(session: Session, task_id: str, if_version: int | None) -> Flow[None]:
    headers = _if_match(if_version) | _request_id()
    response, sends = yield from attempts(session, Request("DELETE", task_path(task_id), headers=headers))
    if response.status_code in (404, 412) and sends > 1:
        mine = yield from _own_event(session, task_id, headers["X-Request-ID"], if_version or 0)
        if mine is not None:
            return
    expect(response, 200)


def _same_task(task_id: Any) -> str:
    """One spelling of a task id for each task: the server takes 'AB…' and 'ab…' for the same one."""
    try:
        return str(uuid.UUID(str(task_id)))
    except ValueError:
        return str(task_id)


def _own_event(session: Session, task_id: str, request_id: str, after_version: int) -> Flow[Event | None]:
    """Our write's event in the task's history after `after_version`, if it was applied (read on the primary:
    the write's position may be known to no token, and the session's token is shared with other threads)."""
    events = yield from history(session, task_id, after_version, 1000, PRIMARY)
    return next((e for e in events if e.metadata.get("request_id") == request_id), None)


def update_many(session: Session, updates: Iterable[Mapping[str, Any]]) -> Flow[list[ItemResult]]:
    items = [dict(u) for u in updates]
    headers = _request_id()
    request = Request("PATCH", "/tasks/batch", json={"updates": items}, headers=headers)
    # A lost answer is retried when every item is under if_version: a repeat of an applied item answers
    # 412, and its event carries our request id. Not when an item has no if_version (another writer
    # may have moved its task in between, see `update`), nor when a task is named twice ([running,
    # pending] sent again would start and requeue it again): such a batch is sent again only when it
    # surely did not arrive.
    named_twice = len({_same_task(item.get("task_id")) for item in items}) < len(items)
    unconditional = any(item.get("if_version") is None for item in items)
    response, sends = yield from attempts(session, request, UNSENT if named_twice or unconditional else ALWAYS)
    results = []
    for given, answer in zip(items, expect(response, 200)["results"], strict=True):
        result = ItemResult(
            task_id=answer["task_id"],
            status=answer["status"],
            task=Task.from_json(answer["task"]) if answer.get("task") else None,
            deleted=bool(answer.get("deleted")),
            problem=answer.get("problem"),
        )
        if result.status in (404, 412) and sends > 1:
            # Perhaps a lost first attempt applied this item: its event then carries our request id.
            mine = yield from _own_event(session, result.task_id, headers["X-Request-ID"], given.get("if_version") or 0)
            if mine is not None and mine.type == "TaskDeleted":
                result = ItemResult(result.task_id, 200, deleted=True)
            elif mine is not None:
                result = ItemResult(
                    result.task_id, 200, task=(yield from get(session, result.task_id, mine.version, None, PRIMARY))
                )
        results.append(result)
    return results


def history(
    session: Session, task_id: str, after_version: int, page_size: int, headers: Headers = NO_HEADERS
) -> Flow[History]:
    request = Request(
        "GET",
        task_path(task_id, "/history"),
        params={"after_version": after_version, "limit": _page(page_size)},
        headers=headers,
    )
    events: list[Event] = []
    while True:
        response = yield from call(session, request)
        page = expect(response, 200)
        events += [Event.from_json(e, page["task_id"]) for e in page["events"]]
        if (link := _next(response)) is None:
            return History(page["task_id"], events)
        request = Request("GET", link, headers=headers)


def stats(session: Session, task_type: str | None) -> Flow[Stats]:
    params = {} if task_type is None else {"task_type": task_type}
    response = yield from call(session, Request("GET", "/tasks/stats/summary", params=params))
    return Stats.from_json(expect(response, 200))


def cleanup(session: Session, days: int) -> Flow[int]:
    # Retried only where the first attempt surely did nothing: a repeat would report fewer deletions.
    request = Request("POST", "/tasks/cleanup", params={"days": days}, headers=_request_id())
    response = yield from call(session, request, retry=UNSENT)
    return int(expect(response, 200)["deleted"])


def events(session: Session, after: str | None, page_size: int, follow: bool, poll_interval: float) -> Flow[None]:
    """The global feed from `after` (the start without it), page by page; at its head, stop or poll."""
    cursor, page_size = after, _page(page_size)
    while True:
        params = {"limit": page_size} | ({} if cursor is None else {"after": cursor})
        response = yield from call(session, Request("GET", "/events", params=params))
        page = expect(response, 200)
        for event in page["events"]:
            yield Emit(Event.from_json(event))
        cursor = page["next_cursor"]
        if len(page["events"]) < page_size:
            if not follow:
                return
            yield Sleep(poll_interval)


@dataclass
class Frame:
    """One Server-Sent Events message."""

    event: str = "message"
    data: str = ""
    id: str | None = None


class FrameParser:
    """The SSE wire format, line by line (https://html.spec.whatwg.org/#event-stream-interpretation)."""

    def __init__(self) -> None:
        self._event, self._data, self._id = "", [], None
        self.retry: int | None = None

    def feed(self, line: str) -> Frame | None:
        if line == "":
            frame = None
            if self._data:
                frame = Frame(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data, self._id = "", [], None
            return frame
        if line.startswith(":"):
            return None  # a comment: the server's ping
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None


def watch(session: Session, task_id: str, reconnects: int) -> Flow[None]:
    """The task as it changes, over its SSE stream, until it finishes or is deleted.

    A dropped connection is made again with the last event's id (or the
    snapshot's) as Last-Event-ID, so nothing is missed or repeated; with
    neither (a snapshot taken while an older write was still open) it starts
    afresh from a new snapshot, shown only if the task has moved.
    """
    task: Task | None = None
    last_id: str | None = None
    failures = 0
    path = task_path(task_id, "/stream")
    while True:
        headers = {"Accept": "text/event-stream"} | ({} if last_id is None else {"Last-Event-ID": last_id})
        try:
            response = yield Request("GET", path, headers=headers, stream=True)
            if response.status_code == 204:
                return  # resumed after the task's last event: nothing more will come
            if response.status_code != 200 and response.status_code != 503:
                expect(response, 200)  # raises: 404, 401, 422 ...
            if response.status_code == 200:
                parser = FrameParser()
                while (line := (yield NextLine(response))) is not None:
                    failures = 0
                    frame = parser.feed(line)
                    if frame is None:
                        continue
                    if frame.event == "snapshot":
                        last_id = frame.id or last_id  # where the snapshot stands: a drop resumes after it
                        now = Task.from_json(json.loads(frame.data))
                        if task is None or now.version != task.version:
                            task = now
                            yield Emit(Change("snapshot", task))
                    else:
                        event = Event.from_json(json.loads(frame.data))
                        last_id = frame.id or last_id
                        if task is not None and event.version <= task.version:
                            continue  # the snapshot already had it
                        task = apply(task, event)
                        yield Emit(Change(event.type, task, event))
                    if task is None or task.finished:
                        return
        except httpx.TransportError as exc:
            error: Exception = exc
        else:
            error = ConnectionError("the stream ended before the task finished")
        # The server went away (a restart, an outage, the network): come back where we were.
        failures += 1
        if failures > reconnects:
            raise ConnectionFailed(f"GET {path}: gave up after {reconnects} reconnects: {error!r}") from error
        yield Sleep(session.retry.delay(failures))


def check_progress(progress: float) -> float:
    if isinstance(progress, bool) or not isinstance(progress, int | float) or not math.isfinite(progress):
        raise ValueError(f"progress must be a number from 0 to 100, not {progress!r}")
    if not 0 <= progress <= 100:
        raise ValueError(f"progress must be from 0 to 100, not {progress}")
    return float(progress)


# A run's result the server refuses (over its size limit, not an object) or that is no JSON at all: the
# task is then failed with the reason, rather than left running with no one working on it.
UNRECORDABLE: tuple[type[Exception], ...] = (BadRequest, PayloadTooLarge, ValidationFailed, TypeError, ValueError)


def ending(exc: BaseException) -> dict[str, Any]:
    """How a run that raised leaves its task: failed with the exception's text; or, when the worker was
    interrupted (Ctrl-C, SystemExit, a cancelled asyncio task) rather than the work failing, back to pending
    for another worker. The server refuses NUL and errors over 65,536 characters: neither stops the record."""
    if not isinstance(exc, Exception):
        return {"status": "pending"}
    try:
        text = str(exc) or type(exc).__name__
    except Exception:  # an exception whose text fails: the task is failed all the same
        text = type(exc).__name__
    text = text.encode("utf-8", "backslashreplace").decode()  # a lone surrogate (from a file name) is no JSON
    return {"status": "failed", "error": text.replace("\0", "\ufffd")[:65_536]}
