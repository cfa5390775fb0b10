"""The dashboard's pages: /ui (tasks and counts), /ui/tasks/{task_id}, /ui/events, and signing in.

Every page is whole HTML from the server, so the first page works without
JavaScript and every `data-*` hook (SPEC §10) has one definition: the
templates. The page reads the read models and the log through the same
functions as the API, and where the API reads (`tasks.read`: a replica fresh
enough for the request's Tasktrail-Read-After, else the primary). The page's
script keeps the token of its latest write in a cookie that `read_after_cookie`
passes on, so a page navigated to after a write shows it too (SPEC §13).

Errors are pages too, with the status the API would answer (http/app.PROBLEMS
and http/wellformed's refusals): a browser shows HTML, not a problem document.

Templates are rendered by one Jinja2 environment with autoescape on, so
whatever a task carries (its type, params, result, error, an actor's name)
reaches the page as text. Pages are sent as a bare ASGI reply, as JSON
answers are (http/tasks.JsonReply): Litestar's Template response costs a
response object per request, and /ui is meant to cost no more than the list
call it shows.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode
from uuid import UUID

import jinja2
import msgspec
import psycopg
from litestar import Request, Response, Router, get, post
from litestar.exceptions import ClientException, NotAuthorizedException
from litestar.file_system import BaseLocalFileSystem
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, FileInfo, Message, PathType, Receive, Scope, Send
from markupsafe import Markup, escape

from tasktrail import eventstore, logs, replicas
from tasktrail.domain.events import EVENT_TYPES, TaskCreated, TaskDeleted, type_of
from tasktrail.domain.task import FINISHED, MOVES, Status, Task, TaskNotFound, evolve, fold
from tasktrail.http import auth, sessions, wellformed
from tasktrail.http.body import invalid
from tasktrail.http.events import FeedItem, encode_cursor, item
from tasktrail.http.problems import shown
from tasktrail.http.tasks import _decode_cursor, _encode_cursor, encode_position, past_a_page, read
from tasktrail.projections import stats
from tasktrail.projections import tasks as tasks_view

HERE = Path(__file__).parent
STATIC = "/ui/static"
PAGE_SIZE = 50  # rows on /ui unless ?limit= says otherwise (1..1000, as the API)
TIMELINE_CAP = 1000  # events a task page's timeline shows at a time: the newest, or older ones a page at a time
FEED_SIZE = 100  # events /ui/events opens with

# Scripts and styles from this origin only: no inline script, no inline style, no other host.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Every page's, beside its policy (the API docs' too: http/openapi.py).
PAGE_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    # Live data and a CSRF token: never from a cache.
    (b"cache-control", b"no-store"),
]
HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-security-policy", POLICY.encode()),
    *PAGE_HEADERS,
]


# A file is taken as the type it is served as, and the shared live worker runs under the pages' policy.
FILE_HEADERS = [(b"content-security-policy", POLICY.encode()), (b"x-content-type-options", b"nosniff")]


def _file_headers(app: ASGIApp) -> ASGIApp:
    """The static files' answers with FILE_HEADERS (Litestar sends a file as it is, past any layer's headers)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:  # an error is a page
                message["headers"] = [*message.get("headers", ()), *FILE_HEADERS]
            await send(message)

        await app(scope, receive, sending)

    return wrapped


class HtmlReply:
    """A page as a bare ASGI app (see the module docstring)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: str, status: int = 200, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.body = body.encode()
        self.status = status
        self.headers = [*HEADERS, (b"content-length", b"%d" % len(self.body)), *extra]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})

    def response(self) -> Response[bytes]:
        """The same page as a Litestar Response, which exception handlers must return."""
        headers = {name.decode(): value.decode() for name, value in self.headers if name != b"content-length"}
        return Response(self.body, status_code=self.status, headers=headers)


# Formatting for the templates.


def when(moment: datetime | None) -> str:
    return "" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"


def when_precise(moment: datetime) -> str:
    return f"{moment:%H:%M:%S}.{moment.microsecond // 1000:03d}"


def iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat()


@functools.lru_cache(maxsize=2048)
def percent(progress: float) -> str:
    """Progress to one decimal, never rounded to done or to nothing: 99.99 is 99.9%, 0.01 is 0.1%."""
    if progress.is_integer():
        return f"{progress:.0f}%"
    return f"{min(max(round(progress, 1), 0.1), 99.9):.1f}%"  # not whole: between 0 and 100


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


SUMMARY = 160  # characters of a value in a feed row or a timeline entry


def compact(value: Any) -> str:
    """JSON on one line, cut at SUMMARY characters (the feed's and the timeline's summaries): as the streams
    write it (msgspec: 1e16, where json.dumps has 1e+16), so that a row shown live reads as after a reload."""
    return cut(msgspec.json.encode(value).decode())


# The bidirectional formatting characters: embeddings and overrides (U+202A-U+202E), isolates (U+2066-U+2069).
_BIDI_CONTROLS = dict.fromkeys([*range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def isolated(text: str) -> str:
    """Text set apart from the sentence around it (U+2068 ... U+2069), where no <bdi> can be: in a title or an
    attribute, a type written right to left or holding an override cannot reorder the rest. Its own bidi
    controls go: a U+2069 of its own closed the isolate early, and an override after it reversed the rest."""
    return f"\u2068{text.translate(_BIDI_CONTROLS)}\u2069"


def cut(text: str) -> str:
    """Text cut at SUMMARY characters, an ellipsis marking the cut."""
    return text if len(text) <= SUMMARY else text[: SUMMARY - 1] + "…"


def _static_url(name: str) -> str:
    # A hash of the file in its URL: a new release's script is never taken from an old cache.
    return f"{STATIC}/{name}?v={hashlib.sha256((HERE / 'static' / name).read_bytes()).hexdigest()[:12]}"


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,  # templates change only with a release: no stat() of each file per page
)
ENV.filters.update(
    when=when, when_precise=when_precise, iso=iso, percent=percent, pretty=pretty, compact=compact, isolated=isolated
)
ENV.globals.update(
    static={name: _static_url(name) for name in ("dashboard.css", "dashboard.js", "live-worker.js", "favicon.svg")},
    STATUSES=[status.value for status in Status],
    EVENT_TYPES=" ".join(EVENT_TYPES),
)


@functools.lru_cache(maxsize=4096)
def _escaped(text: str) -> str:
    """Text as HTML, as a plain str: an f-string formats a Markup through a slow path (1.7 us against 0.6)."""
    return str(escape(text))


def task_row(task: tasks_view.Listed, can_write: bool, tid: str, at: str) -> str:
    """A task's row on /ui, with its hooks `data-task-id` and `data-status`: the one definition of it.

    `tid` and `at` are the task's id and last change as text (see Rows.page); the row is HTML.
    Built here rather than in a Jinja macro: a page of 100 rows cost three times
    the API's JSON list in Jinja, which escapes each of a row's twenty values; here
    only the task type, the one text a user chose, needs escaping (the rest are a
    UUID, a status, numbers and times).
    """
    status, shown = task.status, percent(task.progress)
    pick = (
        f'<td class="pick needs-js"><input type="checkbox" class="pick" value="{tid}"'
        f' data-if-version="{task.version}" aria-label="Select task {tid}"></td>'
        if can_write
        else ""
    )
    return (  # the task type, the only text a user chose, is escaped
        f'<tr data-task-id="{tid}" data-status="{status}">{pick}'
        f'<td class="id"><a href="/ui/tasks/{tid}"><code>{tid}</code></a></td>'
        f'<td class="type">{_escaped(task.task_type)}</td>'
        f'<td><span class="status s-{status}">{status}</span></td>'
        f'<td class="progress"><progress max="100" value="{task.progress}" aria-label="Progress">{shown}</progress>'
        f' <span class="pct">{shown}</span></td>'
        f'<td class="changed"><time datetime="{at}">{at[:10]} {at[11:19]}</time>'
        f' <span class="ver">v{task.version}</span></td></tr>'
    )  # fmt: skip


# Task ids and times as text, a page's worth in one call (msgspec writes them in C,
# as the API's JSON list does; str(uuid) and isoformat() were half of a row's cost).
_as_text = msgspec.json.Encoder().encode
_texts = msgspec.json.Decoder(list[tuple[str, str]]).decode


class Rows:
    """Task rows as the page shows them, made once per (task, version, writable).

    A live page fetches /ui again up to four times a second, and most of its rows
    have not changed: a version of a task is immutable, so its row is too (a
    deleted task has no row). At most `size` rows are kept, the oldest dropped
    first; each process keeps its own.
    """

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        # An OrderedDict drops its oldest in O(1); next(iter(dict)) walks past every slot deleted before.
        self.made: OrderedDict[tuple[UUID, int, bool], str] = OrderedDict()

    def page(self, tasks: Sequence[tasks_view.Listed], can_write: bool) -> Markup:
        """The rows of these tasks, in their order, as one piece of HTML."""
        keys = [(task.task_id, task.version, can_write) for task in tasks]
        rows = [self.made.get(key) for key in keys]
        new = [i for i, row in enumerate(rows) if row is None]
        if new:
            texts = _texts(_as_text([(tasks[i].task_id, tasks[i].updated_at) for i in new]))
            for i, (tid, at) in zip(new, texts, strict=True):
                if len(self.made) >= self.size:
                    self.made.popitem(last=False)
                rows[i] = self.made[keys[i]] = task_row(tasks[i], can_write, tid, at)
        return Markup("".join(rows))  # type: ignore[arg-type]  # noqa: S704 -- rows are HTML (task_row)


ROWS = Rows()


def render(
    request: Request | None, template: str, status: int = 200, extra: Sequence[tuple[bytes, bytes]] = (), **context: Any
) -> HtmlReply:
    """A page for whoever is looking (nobody known before the guard has run: `request` None)."""
    opt = {} if request is None else request.route_handler.opt
    return HtmlReply(
        ENV.get_template(template).render(
            viewer=NOBODY if request is None else viewer(request),
            read_after_max_age=opt.get(READ_AFTER_MAX_AGE, 0),
            **context,
        ),
        status,
        extra,
    )


# Who is looking, and what they may do.


class Viewer(NamedTuple):
    name: str | None  # the API key's name; None when the service has no keys
    scope: str  # with no keys, everything is allowed
    csrf: str | None  # the session's CSRF token, when a session cookie signed the request in

    @property
    def can_write(self) -> bool:
        return auth.SCOPES.index(self.scope) >= auth.SCOPES.index("write")


def viewer(request: Request) -> Viewer:
    state = request.scope["state"]  # what the guard found (nothing without keys)
    return Viewer(state.get("actor"), state.get("scope", "admin"), state.get("csrf"))


NOBODY = Viewer(None, "read", None)  # on a page answered before the guard has looked


# The task list.


class Filters(NamedTuple):
    status: Status | None
    task_type: str | None
    before: int | None
    cursor: str | None
    limit: int

    def url(self, **changes: str | None) -> str:
        """/ui with these filters, changed as given (None drops one); the cursor is dropped unless given."""
        query = {"status": self.status and self.status.value, "task_type": self.task_type, "cursor": None}
        if self.limit != PAGE_SIZE:
            query["limit"] = str(self.limit)
        query |= changes
        kept = {name: value for name, value in query.items() if value}
        return f"/ui?{urlencode(kept)}" if kept else "/ui"

    def describe(self, counts: dict[str, int]) -> tuple[int, str]:
        """How many tasks match, from the counters, and what they are in words ("failed tasks of type import"),
        the type isolated: the page's title."""
        return (counts[self.status.value] if self.status else counts["total"]), self.words() + (
            f" of type {isolated(self.task_type)}" if self.task_type else ""
        )

    def words(self, count: int = 2) -> str:
        """What `count` matching tasks are, but for their type: "failed tasks" (a page puts the type in a <bdi>)."""
        noun = "task" if count == 1 else "tasks"
        return f"{self.status.value} {noun}" if self.status else noun


def _text_parameter(name: str, value: str | None, max_length: int = 200) -> str | None:
    if not value:
        return None
    if len(value) > max_length or "\x00" in value:
        raise invalid(name, f"at most {max_length} characters, no NUL")
    return value


def _whole(text: str, high: int) -> int | None:
    """ASCII digits without a leading 0 (as the API takes them) making a number from 1 to high, else None;
    read only when short enough to be one (int() of more than 4,300 digits raises)."""
    if not (text.isascii() and text.isdigit()) or text.startswith("0") or len(text) > len(str(high)):
        return None
    number = int(text)
    return number if 1 <= number <= high else None


def parse_filters(status: str | None, task_type: str | None, cursor: str | None, limit: str | None) -> Filters:
    """The API's list filters, taken from the page's URL; a bad one is a 400 page that says which."""
    if status and status not in Status.__members__.values():
        raise invalid("status", f"one of {', '.join(Status)}, or empty for any")
    size = PAGE_SIZE
    if limit:
        chosen = _whole(limit, 1000)
        if chosen is None:
            raise invalid("limit", "a whole number from 1 to 1000")
        size = chosen
    cursor = _text_parameter("cursor", cursor, 100)
    return Filters(
        Status(status) if status else None,
        _text_parameter("task_type", task_type),
        None if cursor is None else _decode_cursor(cursor),
        cursor,
        size,
    )


@get("/", opt=auth.PUBLIC, include_in_schema=False)
async def index() -> Redirect:
    return Redirect("/ui", status_code=302)


@get("/ui", include_in_schema=False)
async def tasks_page(
    request: Request,
    status: FromQuery[str | None] = None,
    task_type: FromQuery[str | None] = None,
    cursor: FromQuery[str | None] = None,
    limit: FromQuery[str | None] = None,
) -> HtmlReply:
    """Counts, filters and the task list, newest first, with keyset paging."""
    filters = parse_filters(status, task_type, cursor, limit)

    async def fetch(
        conn: psycopg.AsyncConnection,
    ) -> tuple[list[tasks_view.Listed], dict[str, int], int | None]:
        page = await tasks_view.list_shown(
            conn, status=filters.status, task_type=filters.task_type, before=filters.before, limit=filters.limit + 1
        )  # one more than a page: "older" only when there are older tasks
        newer = None
        if filters.before is not None:  # a page past the first: where the one before it begins, to go back
            after = page[0].id if page else filters.before - 1
            newer = await tasks_view.newer_cursor(
                conn, status=filters.status, task_type=filters.task_type, after=after, limit=filters.limit
            )
        return page, await stats.summary(conn, filters.task_type), newer

    page, counts, newer = await read(request, fetch)
    more = past_a_page(page, filters.limit)
    matching, noun = filters.describe(counts)
    looking = viewer(request)
    return render(
        request,
        "tasks.html",
        filters=filters,
        rows=ROWS.page(page, looking.can_write),
        counts=counts,
        matching=matching,
        # The page's title. Only the first letter raised: the task type in it keeps its case (Jinja's
        # capitalize lowers the rest).
        heading=noun[:1].upper() + noun[1:],
        older=filters.url(cursor=_encode_cursor(page[-1])) if more else None,
        # Back a page; none when that is the newest page, which "Newest" leads to.
        newer=None if newer is None else filters.url(cursor=encode_position(newer)),
    )


# A task's page.


class Entry(NamedTuple):
    """One event on a task's timeline: the event, what it changed, and the task after it."""

    stored: eventstore.Stored
    type: str
    changes: list[tuple[str, str]]
    after: Task | None


TRACKED = ("status", "progress", "retry_count", "result", "error", "started_at", "completed_at")
LABELS = {"retry_count": "retries", "started_at": "started", "completed_at": "finished"}


def _shown(field: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return when(value)
    if field == "progress":
        return percent(value)
    if field == "result":
        return compact(value)
    return cut(str(value))  # an error may be 64 KiB: shown whole only as the task's state


def changes(before: Task | None, after: Task | None, stored: eventstore.Stored) -> list[tuple[str, str]]:
    """What an event changed, in words: (field, "old → new")."""
    event = stored.recorded.event
    if isinstance(event, TaskCreated):
        created = [("type", event.task_type)]
        return created + ([("params", compact(event.params))] if event.params is not None else [])
    if isinstance(event, TaskDeleted):
        return [("deleted", f"reason: {event.reason}")]
    assert before is not None
    assert after is not None
    found = []
    for field in TRACKED:
        old, new = getattr(before, field), getattr(after, field)
        if old == new:
            continue
        if field in ("result", "error"):
            found.append((field, "cleared" if new is None else _shown(field, new)))
        else:
            found.append((LABELS.get(field, field), f"{_shown(field, old)} → {_shown(field, new)}"))
    return found


def timeline(history: Sequence[eventstore.Stored], state: Task | None = None) -> list[Entry]:
    """The task's events folded one by one onto `state` (the task before them), each with what it changed."""
    entries = []
    for stored in history:
        after = evolve(state, stored.recorded)
        entries.append(Entry(stored, type_of(stored.recorded.event), changes(state, after, stored), after))
        state = after
    return entries


# Where the timeline of each long task shown lately starts (its newest TIMELINE_CAP events, from
# version `first`) and the task just before it, most recently shown last. A live page renders again
# after each change, and a task's whole history (100,000 progress reports: 1.2 s) was read and folded
# each time; events never change, so a render reads and folds only the window and what came since.
# Only a state is kept per task, never its events (which may be large).
_WINDOWS: OrderedDict[UUID, tuple[int, Task | None]] = OrderedDict()
K, R, V = TypeVar("K"), TypeVar("R"), TypeVar("V")
WINDOWS_KEPT = 64
FOLD_IN_THREAD = 5_000  # events: folding more than this runs beside the event loop, not on it


async def _beside(work: Callable[[Sequence[R]], V], history: Sequence[R]) -> V:
    """work(history), beside the event loop when the history is long (FOLD_IN_THREAD), else on it."""
    if len(history) > FOLD_IN_THREAD:
        return await asyncio.to_thread(work, history)
    return work(history)


async def _timeline(history: Sequence[eventstore.Stored], state: Task | None = None) -> list[Entry]:
    return await _beside(lambda events: timeline(events, state), history)


def _remember(cache: OrderedDict[K, V], key: K, value: V) -> None:
    """Keep value as the most recently used of the cache's WINDOWS_KEPT entries."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > WINDOWS_KEPT:
        cache.popitem(last=False)


async def folded(request: Request, uuid: UUID, at: int | None = None) -> list[Entry]:
    """The task's newest TIMELINE_CAP timeline entries, oldest first.

    TaskNotFound for a task that never existed, or without version `at`.
    """
    first, before = _WINDOWS.get(uuid, (1, None))

    async def fetch(conn: psycopg.AsyncConnection) -> list[eventstore.Stored]:
        # Raised where a replica may only be behind: `read` then asks the primary.
        history = await eventstore.read_stream(conn, uuid, after_version=first - 1)
        if not history:
            raise TaskNotFound(f"No task {uuid} has ever existed here.")
        if at is not None and at > history[-1].recorded.version:
            raise TaskNotFound(f"Task {uuid} has no version {at}: its latest is {history[-1].recorded.version}.")
        return history

    entries = await _timeline(await read(request, fetch), before)
    if len(entries) > TIMELINE_CAP:
        older = len(entries) - TIMELINE_CAP
        before, entries = entries[older - 1].after, entries[older:]
        _remember(_WINDOWS, uuid, (entries[0].stored.recorded.version, before))
    return entries


# The task just before version v, for each older window (or version picked) shown lately: an open page
# renders again after each change, and folding a long task's history from the start each time cost
# a second. Events never change, so neither does the task before a version.
_STARTS: OrderedDict[tuple[UUID, int], Task | None] = OrderedDict()


async def window(request: Request, uuid: UUID, start: int, end: int) -> tuple[Task | None, list[Entry]]:
    """The task just before version `start`, and the timeline entries of versions start..end (which exist)."""
    known = (uuid, start) in _STARTS

    async def fetch(conn: psycopg.AsyncConnection) -> tuple[list[eventstore.Stored], list[eventstore.Stored]]:
        before = [] if known else await eventstore.read_stream(conn, uuid, limit=start - 1)
        events = await eventstore.read_stream(conn, uuid, after_version=start - 1, limit=end - start + 1)
        if len(events) < end - start + 1 or (not known and len(before) < start - 1):
            raise TaskNotFound(f"Task {uuid} has no version {end} here.")  # a replica behind: read asks the primary
        return before, events

    before, events = await read(request, fetch)
    state = _STARTS[(uuid, start)] if known else await _beside(lambda h: fold(s.recorded for s in h), before)
    _remember(_STARTS, (uuid, start), state)
    return state, await _timeline(events, state)


def actions(task: Task | None) -> dict[str, bool]:
    """Which of the page's actions the task's status allows."""
    if task is None:
        return {"cancel": False, "retry": False, "delete": False}
    return {
        "cancel": Status.CANCELED in MOVES[task.status],
        "retry": task.status in FINISHED and Status.PENDING in MOVES[task.status],
        "delete": True,
    }


def error_page(
    request: Request | None, message: str, status: int = 404, extra: Sequence[tuple[bytes, bytes]] = ()
) -> HtmlReply:
    title = HTTPStatus(status).phrase.capitalize()
    return render(request, "error.html", status, extra, message=message, title=title)


@get("/ui/tasks/{task_id:str}", include_in_schema=False)
async def task_page(
    request: Request,
    task_id: FromPath[str],
    version: FromQuery[str | None] = None,
    before: FromQuery[str | None] = None,
) -> HtmlReply:
    """The task now (or at ?version=N), its history as a timeline, and its actions.

    The timeline shows TIMELINE_CAP events: the newest, or those before version ?before=N (older
    events, a page at a time), or those up to a picked version older than the newest of them.
    """
    try:
        uuid = UUID(task_id)
    except ValueError:
        return error_page(request, "Task ids are UUIDs: this is not one.")
    at = None if version is None else _whole(version, 2**31 - 1)
    if version is not None and at is None:
        raise invalid("version", "a version number: a whole number from 1")
    until = None if before is None else _whole(before, 2**31 - 1)
    if before is not None and (until is None or until < 2):
        raise invalid("before", "a version number: a whole number from 2")

    try:
        entries = await folded(request, uuid, at)
    except TaskNotFound as exc:
        return error_page(request, str(exc))
    latest, first = entries[-1], entries[0].stored.recorded.version
    last = latest.stored.recorded.version
    end = last if until is None else min(until - 1, last)  # the newest event the timeline shows
    picked_early = at is not None and at < first  # a version before the newest TIMELINE_CAP events
    if at is not None and picked_early and until is None:
        end = min(at + TIMELINE_CAP - 1, last)  # a timeline that starts at it
    if end == last:
        start, before_start, timeline_entries = first, None, entries
    else:
        start = max(end - TIMELINE_CAP + 1, 1)
        before_start, timeline_entries = await window(request, uuid, start, end)
    if at is None:
        picked, prior = latest, entries[-2].after if len(entries) > 1 else None
    elif start <= at <= end:
        i = at - start
        picked, prior = timeline_entries[i], timeline_entries[i - 1].after if i else before_start
    elif at >= first:
        i = at - first
        picked, prior = entries[i], entries[i - 1].after if i else None
    else:  # before the window shown
        prior, (picked,) = await window(request, uuid, at, at)
    deleted = latest if latest.after is None else None
    # At a deletion the task has no state: show the one it had just before.
    shown = picked.after if picked.after is not None else prior
    oldest, newest = timeline_entries[0].stored.recorded.version, timeline_entries[-1].stored.recorded.version
    page_of = functools.partial(_timeline_url, uuid, at)
    return render(
        request,
        "task.html",
        task_id=uuid,
        entries=timeline_entries[::-1],
        older=(oldest - 1, page_of(oldest)) if oldest > 1 else None,
        # The next window, or the newest (whose address, with a version picked before it, names its end).
        newer=(
            last - newest,
            page_of(newest + 1 + TIMELINE_CAP if newest + TIMELINE_CAP < last or picked_early else None),
        )
        if newest < last
        else None,
        latest=latest,
        picked=picked,
        viewing_past=picked is not latest,
        shown=shown,
        deleted=deleted,
        actions=actions(latest.after),
        stream=None if deleted is not None else f"/tasks/{uuid}/stream",
    )


def _timeline_url(task_id: UUID, at: int | None, before: int | None) -> str:
    """A task page whose timeline shows the events before version `before` (None: the newest), at version `at`."""
    query = {name: value for name, value in (("version", at), ("before", before)) if value is not None}
    return f"/ui/tasks/{task_id}" + (f"?{urlencode(query)}" if query else "")


# The global feed.


@get("/ui/events", include_in_schema=False)
async def events_page(request: Request) -> HtmlReply:
    """The newest events, newest on top; the page follows the feed from where this read ended."""
    page = await read(request, lambda conn: eventstore.read_feed_tail(conn, limit=FEED_SIZE))
    items: list[FeedItem] = [item(event) for event in page.events]
    return render(request, "events.html", items=items, follow_from=encode_cursor(page.next_after), blank=None)


@get("/ui/{rest:path}", include_in_schema=False)
async def no_page(request: Request, rest: FromPath[str]) -> HtmlReply:
    """Any other address under /ui: a page that says so (a mistyped or outdated link), not a problem document."""
    return error_page(request, "There is no dashboard page at this address.")


@get("/ui/tasks", include_in_schema=False)
async def no_task(request: Request) -> HtmlReply:
    """/ui/tasks/ without a task id (the router reads it as a task page's prefix, not as any other address)."""
    return await no_page.fn(request, "tasks")


# Signing in: a key, once, for a session cookie (see http/sessions.py).

FORM = wellformed.FORM  # the key of a page's form (a msgspec Struct of text fields) in its handler's opt
FORM_TYPE = "application/x-www-form-urlencoded"
F = TypeVar("F", bound=msgspec.Struct)


class SignInForm(msgspec.Struct):
    key: str = ""
    next: str = ""


class SignOutForm(msgspec.Struct):
    csrf: str = ""


async def read_form(request: Request, kind: type[F]) -> F:
    """The form a page posted, as a browser sends it: URL-encoded UTF-8 text, by the query string's rules.

    Anything else is refused before a field is looked at: another Content-Type
    (415, as the API's JSON routes refuse one that is not JSON), text that is
    not UTF-8 once decoded (400), a NUL in a value or a field given twice (422).
    """
    body = await request.body()
    content_type = request.headers.get("content-type")
    if content_type is not None or body:
        media, _, parameters = (content_type or "").partition(";")
        charset = parameters.partition("charset=")[2].strip().strip('"').lower()
        if media.strip().lower() != FORM_TYPE or charset not in ("", "utf-8", "utf8"):
            given = "without a Content-Type" if content_type is None else f"not as {shown(content_type, 100)}"
            raise ClientException(status_code=415, detail=f"this form is sent as {FORM_TYPE} (UTF-8), {given}")
    refusal = wellformed.urlencoded_refusal(body)
    if refusal is not None:
        raise ClientException(status_code=refusal[0], detail=refusal[1])
    return msgspec.convert(dict(parse_qsl(body.decode(), keep_blank_values=True)), kind)


def _local(target: str | None) -> str:
    """Where to go after signing in: a dashboard path only, never another site, nor one with a key in it
    (a key put in a page's URL is not copied into the sign-in page's URL and source), nor one that dot
    segments lead out of /ui (/ui/../tasks/, also %-escaped: the browser resolves them)."""
    path = (target or "").partition("?")[0].partition("#")[0]
    if (
        target
        and (path == "/ui" or path.startswith("/ui/"))
        and not {".", ".."} & set(unquote(path).split("/"))
        and len(target) <= 2000
        and "\\" not in target
        and not target.startswith("//")
        and target.isprintable()
        and not logs.KEY_IN_TEXT.search(unquote(target))  # %5F is _: a key all the same
    ):
        return target
    return "/ui"


def _same_origin(request: Request) -> bool:
    """A form posted from this site's own page, not another site's (login CSRF).

    Browsers say where a request comes from in Sec-Fetch-Site; an older one only
    in Origin, compared with the Host it was sent to (behind a proxy that rewrites
    Host, Sec-Fetch-Site still decides for every current browser).
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is None or origin == _own_origin(request)


def _from_own_page(request: Request) -> bool:
    """The browser says the form is this site's own page's (not only that it is no other site's)."""
    if request.headers.get("sec-fetch-site") == "same-origin":
        return True
    return request.headers.get("origin") == _own_origin(request)


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def _cookie(request: Request, value: str, max_age: int) -> tuple[bytes, bytes]:
    secure = "; Secure" if request.url.scheme == "https" else ""
    return (
        b"set-cookie",
        f"{sessions.COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}".encode(),
    )


def _see_other(location: str, *extra: tuple[bytes, bytes]) -> HtmlReply:
    # A header is ASCII: a path's other characters (a task type's é, a space) percent-encoded, as a browser would.
    return HtmlReply("", 303, [(b"location", quote(location, safe=URL_SAFE).encode()), *extra])


URL_SAFE = ":/?#[]@!$&'()*+,;=%~"  # RFC 3986's reserved characters, and % (what is already escaped stays)


@get("/ui/sign-in", opt=auth.PUBLIC, include_in_schema=False)
async def sign_in_page(request: Request, next: FromQuery[str | None] = None) -> HtmlReply:  # noqa: A002 -- the form's field
    """The sign-in form (with no keys configured there is nothing to sign in to)."""
    if not request.route_handler.opt.get("keys"):
        return _see_other(_local(next))
    return render(request, "sign_in.html", next=_local(next), error=None, signed_out="out" in request.query_params)


@post("/ui/sign-in", opt={**auth.PUBLIC, FORM: SignInForm}, include_in_schema=False, status_code=303)
async def sign_in(request: Request) -> HtmlReply:
    """Check the key; on success a session cookie and back to the page asked for."""
    keys: Sequence[auth.Key] = request.route_handler.opt.get("keys") or ()
    form = await read_form(request, SignInForm)
    target = _local(form.next)
    if not keys:
        return _see_other(target)
    if not _same_origin(request):
        error = "Sign in from this site's own page."
        return render(request, "sign_in.html", 403, next=target, error=error, signed_out=False)
    key = auth.authenticate(keys, form.key.strip())
    if key is None:
        # Never echo what was typed: it may be a key of another service.
        error = "That is not a key this service knows." if form.key else "Enter an API key."
        return render(request, "sign_in.html", 401, next=target, error=error, signed_out=False)
    signer: sessions.Signer = request.route_handler.opt["signer"]
    value, _session = sessions.issue(await signer.secret(request.app.state.pool), key.name, key.digest)
    return _see_other(target, _cookie(request, value, sessions.LIFETIME))


@post("/ui/sign-out", opt={**auth.PUBLIC, FORM: SignOutForm}, include_in_schema=False, status_code=303)
async def sign_out(request: Request) -> HtmlReply:
    """End the session: on the server, and the cookie cleared (a form of the page; its CSRF token must match).

    A form of another site's page arrives without the cookie (SameSite=Strict),
    so it has no token to check; its answer would still clear the cookie.
    A page opened before the browser signed in again (in another tab) has the
    old session's token: when the browser vouches that the form is this site's
    own, the session the cookie holds now is ended all the same.
    """
    form = await read_form(request, SignOutForm)
    if not _same_origin(request):
        return error_page(request, "Sign out from the dashboard's own page.", 403)
    signer: sessions.Signer | None = request.route_handler.opt.get("signer")
    cookie = request.cookies.get(sessions.COOKIE)
    if signer is not None and cookie is not None:
        secret = await signer.secret(request.app.state.pool)
        session = sessions.read(secret, cookie)
        if (
            session is not None
            and not sessions.csrf_matches(secret, session, form.csrf)
            and not _from_own_page(request)
        ):
            return error_page(request, "Sign out from the dashboard's own page.", 403)
        if session is not None:
            await sessions.end(request.app.state.pool, session)  # a copy of the cookie is refused too
    return _see_other("/ui/sign-in?out", _cookie(request, "", 0))


# Read-your-writes across pages (SPEC §13).

READ_AFTER_COOKIE = b"tasktrail_read_after"
READ_AFTER_MAX_AGE = "read_after_max_age"  # the key of the cookie's lifetime, in seconds, in the router's opt
_READ_AFTER = replicas.HEADER.lower().encode()


def read_after_max_age(max_lag: float) -> int:
    """How long the page keeps a write's token: until no replica that serves reads can still be behind it.

    A replica more than max_lag behind the primary stops serving at its next
    health check; twice that, and ten seconds more, covers the checks' own delays.
    """
    return math.ceil(2 * max_lag) + 10


def read_after_cookie(app: ASGIApp) -> ASGIApp:
    """Pass the page's read-after cookie on as the Tasktrail-Read-After header that `read` routes by.

    The page's script sets the cookie (Path=/ui) to the token of its latest
    write, so a page the browser then opens or reloads is read where that write
    is. A header the request brings counts too: `read` takes the later of them.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            token = _cookie_value(scope["headers"], READ_AFTER_COOKIE)
            if token:
                scope["headers"] = [*scope["headers"], (_READ_AFTER, token)]
        await app(scope, receive, send)

    return middleware


def _cookie_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for header, value in headers:
        if header == b"cookie":
            for pair in value.split(b";"):
                key, _, found = pair.strip().partition(b"=")
                if key == name:
                    return found.strip().strip(b'"')
    return None


# What goes wrong on a page is a page too.


def _to_sign_in(request: Request, _: Exception) -> Response[bytes]:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _see_other(f"/ui/sign-in?{urlencode({'next': _local(target)})}").response()


ProblemHandler = Callable[[Request, Any], Response[bytes]]


def as_page(handler: ProblemHandler) -> ProblemHandler:
    """The API's answer to an error (a problem document) as a page: its status, headers and detail."""

    def page(request: Request, exc: Exception) -> Response[bytes]:
        answer = handler(request, exc)
        detail = msgspec.json.decode(answer.content).get("detail", "")
        kept = [(n.lower().encode(), str(v).encode()) for n, v in answer.headers.items() if n.lower() != "content-type"]
        return error_page(request, detail, answer.status_code, kept).response()

    return page


class _Files(BaseLocalFileSystem):
    """The dashboard's files on disk, where a name the system cannot look up (too long for it, or under a
    file rather than a folder) is no file: 404, where Litestar answered 500 for any such OSError."""

    async def info(self, path: PathType, **kwargs: Any) -> FileInfo:
        try:
            return await super().info(path, **kwargs)
        except (PermissionError, FileNotFoundError):
            raise
        except OSError as exc:
            raise FileNotFoundError(exc.errno, exc.strerror, str(path)) from exc


def router(
    keys: Sequence[auth.Key],
    signer: sessions.Signer,
    problems: Mapping[type[Exception], ProblemHandler],
    max_lag: float | None = replicas.DEFAULT_MAX_LAG,
) -> Router:
    """The dashboard's pages and files, knowing the configured keys (for signing in) and the session signer.

    `problems` is the app's answer to each error; a page answers the same as a
    page. `max_lag` is the replicas' (see read_after_max_age), None without replicas: every read is
    then the primary's, and the page keeps no read-after cookie.
    """
    static = create_static_files_router(
        path=STATIC,
        directories=[HERE / "static"],
        file_system=_Files(),
        opt=auth.PUBLIC,
        include_in_schema=False,
        name="dashboard-static",
        middleware=[_file_headers],
    )
    max_age = 0 if max_lag is None else read_after_max_age(max_lag)  # 0: no replicas, no cookie needed

    def refusal(status: int, detail: str) -> HtmlReply:
        return error_page(None, detail, status)

    return Router(
        path="/",
        route_handlers=[
            index,
            tasks_page,
            task_page,
            events_page,
            sign_in_page,
            sign_in,
            sign_out,
            no_page,
            no_task,
            static,
        ],
        opt={"keys": tuple(keys), "signer": signer, READ_AFTER_MAX_AGE: max_age, wellformed.PAGE: refusal},
        middleware=[read_after_cookie],
        include_in_schema=False,
        exception_handlers={kind: as_page(handler) for kind, handler in problems.items()}
        | {NotAuthorizedException: _to_sign_in},
    )
