"""The application: pool, routes, and every error as problem+json."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any

import psycopg
import psycopg_pool
from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.middleware._internal.cors import CORSMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from tasktrail import dashboard, db, eventstore, grouped, idempotency, live, logs, metrics, replicas, writer
from tasktrail.dashboard.routes import error_page as dashboard_page
from tasktrail.domain.task import TaskNotFound, TransitionRejected
from tasktrail.http import auth, batch, events, health, history, openapi, protocol, sessions, tasks, wellformed
from tasktrail.http import metrics as scrape
from tasktrail.http.body import MAX_BODY_BYTES, InvalidInput, MalformedBody, readable
from tasktrail.http.problems import MEANINGS, answer, problem, refusal, send_problem, unkeyed
from tasktrail.projections import ProjectionOutdated, follow, versions

log = logging.getLogger("tasktrail")
GC_YOUNG = 20_000  # allocations between young collections (CPython's default is 700)


def _refused(_: Request, exc: Exception) -> Response[bytes]:
    """404, 409 or 412: the same problem a batch shows for one of its items."""
    return answer(refusal(exc))


def _conflict(_: Request, exc: eventstore.VersionConflict) -> Response[bytes]:
    return problem(409, str(exc))


def _key_reused(_: Request, exc: idempotency.KeyReused) -> Response[bytes]:
    return problem(422, str(exc), errors=[{"field": "Idempotency-Key", "message": str(exc)}])


def _malformed(_: Request, exc: MalformedBody) -> Response[bytes]:
    return problem(400, str(exc))


def _invalid(_: Request, exc: InvalidInput) -> Response[bytes]:
    return problem(422, str(exc), errors=exc.errors)


# Header parameters as clients know them (Litestar names a handler's argument), with what they must be.
_HEADERS = {
    "idempotency_key": ("Idempotency-Key", "must be 1 to 255 visible ASCII characters (no spaces)"),
    "last_event_id": ("Last-Event-ID", "must be at most 100 characters"),
}


def _parameter_error(item: dict[str, Any], misspelt: frozenset[str]) -> dict[str, str]:
    if item.get("source") == "body":
        # An empty body never reaches the strict decoder: Litestar reports the `data` argument missing.
        return {"field": "body", "message": "required"}
    key, message = str(item.get("key", "?")), readable(str(item.get("message", "")))
    if item.get("source") == "header" and key in _HEADERS:
        key, message = _HEADERS[key]
    elif item.get("source") == "query" and key in misspelt:  # 1e3 for 1000: see wellformed.misspelt_integers
        message = wellformed.WHOLE_NUMBER
    return {"field": key, "message": message}


def _invalid_parameter(request: Request, exc: ValidationException) -> Response[bytes]:
    misspelt = request.scope["state"].get(wellformed.MISSPELT, frozenset())
    errors = [
        _parameter_error(item, misspelt)
        for item in (exc.extra if isinstance(exc.extra, list) else [])
        if isinstance(item, dict)
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or exc.detail
    return problem(422, detail, errors=errors)


def _http(request: Request, exc: HTTPException) -> Response[bytes]:
    path = request.scope["path"]
    extra: dict[str, Any] = {}
    if "route_handler" not in request.scope:  # no route matched: the router's 404 or 405
        # The URL and headers are refused as on any route (a 414, a NUL's 400); and the router matched the
        # decoded path, where /tasks/%2F is the list (a 405 for PATCH): that is a 404.
        if (refused := wellformed.unrouted_refusal(request.scope)) is not None:
            exc, extra = HTTPException(status_code=refused[0], detail=refused[1]), refused[2]
        if request.app.state.get(LOOPBACK_ONLY) and auth.foreign_host(request.scope):
            # As the routes answer it (auth._loopback_only): a page elsewhere learns nothing of what exists here.
            exc, extra = HTTPException(status_code=403, detail=auth.FOREIGN_HOST), {}
        keys = request.app.state.get(API_KEYS)
        ui = path == "/ui" or path.startswith("/ui/")
        if keys and request.method != "OPTIONS" and not ui and path not in request.app.state[OPEN_PATHS]:
            # With keys, a caller without one hears 401 here too, as on every route: a 404 or a 405 with its
            # Allow would tell it which routes exist and what each takes (audit). A preflight carries no key.
            try:
                auth.bearer_key(keys, request.headers.get("authorization", ""))
            except NotAuthorizedException as unkeyed_caller:
                exc, extra = unkeyed_caller, {}
        if ui:
            # An address under /ui that no page's route matches (/ui/tasks/a/b), or a method no page has: a
            # page, as the dashboard's own refusals are, not a problem document.
            message = "There is no dashboard page at this address." if exc.status_code == 404 else unkeyed(exc.detail)
            headers = [(name.lower().encode(), value.encode()) for name, value in (exc.headers or {}).items()]
            return dashboard_page(None, message, exc.status_code, headers).response()
    # Litestar's own 413 (a chunked body over the limit) says "Request Entity Too Large"; ours says the limit.
    response = problem(exc.status_code, MEANINGS[413] if exc.status_code == 413 else exc.detail, **extra)
    response.headers.update(exc.headers or {})
    return response


def _unavailable(request: Request, exc: psycopg.OperationalError) -> Response[bytes]:
    log.warning("database unavailable: %s", exc)
    metrics.DB_UNAVAILABLE.inc()
    if isinstance(exc, psycopg.errors.QueryCanceled):  # the statement rolled back
        detail = "the database did not answer within the statement timeout; try again shortly"
    elif isinstance(exc, psycopg_pool.PoolTimeout) or request.method in replicas.SAFE_METHODS or exc.sqlstate:
        # No connection, a read, or PostgreSQL's own refusal (a shutdown's 57P01): nothing was written.
        detail = "the database is unavailable; try again shortly"
    else:
        # A connection lost with no answer to the write's statement: PostgreSQL may have committed it.
        return problem(503, CUT_OFF, headers={"Retry-After": "1"}, outcome=UNKNOWN)
    return problem(503, detail, headers={"Retry-After": "1"})


def _locked(request: Request, exc: psycopg.errors.LockNotAvailable) -> Response[bytes]:
    # The context names the relation waited on ('while updating tuple (0,1) in relation "tasks"'), never a value.
    where = exc.diag.context or ""
    log.warning("lock timeout on %s %s: %s", request.method, _route(request), where.strip() or exc)
    if "idempotency_keys" in where:
        detail = "the Idempotency-Key is held by another request still in progress; try again shortly"
    elif request.method in ("GET", "HEAD"):
        detail = "what this request reads is locked by another transaction; try again shortly"
    else:
        detail = "the task is locked by another transaction; try again shortly"
    return problem(503, detail, headers={"Retry-After": "1"})


def _unstorable(request: Request, exc: psycopg.DataError) -> Response[bytes]:
    # Input the decoders let through but PostgreSQL cannot hold (a NUL in text,
    # a value out of a column's range): the request's fault, not the server's.
    log.warning("refused a value on %s %s: %s", request.method, _route(request), exc.diag.message_primary or exc)
    return problem(422, "a value in the request cannot be stored: " + (exc.diag.message_primary or str(exc)))


def _outdated(_: Request, exc: ProjectionOutdated) -> Response[bytes]:
    log.error("refusing a request: %s", exc)
    return problem(503, "the service is being upgraded; try again shortly", headers={"Retry-After": "1"})


def _tables_missing(
    request: Request, exc: psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn
) -> Response[bytes]:
    # This process's read-model version was pruned under it: its queries find no tables (the log's views
    # refuse it, migration 0016), or another version's shape. Writes say so through writer._refused.
    return _outdated(request, ProjectionOutdated.missing(exc))


LOOPBACK_ONLY = "tasktrail.loopback_only"  # the key, in the app's state, of whether it serves this machine only
API_KEYS = "tasktrail.api_keys"  # ... of the configured keys (a tuple, empty without)
OPEN_PATHS = "tasktrail.open_paths"  # ... and of the paths whose routes need no key (/health: its 405 is no secret)


def _route(request: Request) -> str:
    """What a log line names a request by: its route's template, not the path as sent (the client's to fill)."""
    return request.scope.get("path_template") or metrics.UNMATCHED


def _unexpected(request: Request, exc: Exception) -> Response[bytes]:
    # The line has the request's id, which finds the rest.
    log.exception("unhandled error on %s %s", request.method, _route(request), exc_info=exc)
    return problem(500, "an unexpected error occurred; it has been logged")


# Every error's problem document, in one place; the dashboard shows the same (status, detail) as a page.
PROBLEMS: dict[type[Exception], Callable[[Request, Any], Response[bytes]]] = {
    TaskNotFound: _refused,
    TransitionRejected: _refused,
    eventstore.VersionConflict: _conflict,
    writer.PreconditionFailed: _refused,
    idempotency.KeyReused: _key_reused,
    MalformedBody: _malformed,
    InvalidInput: _invalid,
    ValidationException: _invalid_parameter,
    HTTPException: _http,
    psycopg.OperationalError: _unavailable,
    psycopg.errors.LockNotAvailable: _locked,
    psycopg.DataError: _unstorable,
    psycopg_pool.PoolTimeout: _unavailable,
    ProjectionOutdated: _outdated,
    psycopg.errors.UndefinedTable: _tables_missing,
    psycopg.errors.UndefinedColumn: _tables_missing,
    Exception: _unexpected,
}


# A request's id when the caller gives none: this process's random prefix and a
# counter, unique without a random draw per request.
_PROCESS = uuid.uuid4().hex[:12].encode()
_SEQUENCE = itertools.count(1)
# Whether this process counts requests (`serve --no-metrics` sets it to 0).
METRICS_ENV = "TASKTRAIL_METRICS"
# `serve --workers N` puts its process id here; each worker process stops when that process ends, however
# it ends (SIGKILL too): orphaned, a worker would go on answering on the port with no serve to stop it.
SERVE_PID_ENV = "TASKTRAIL_SERVE_PID"
_PR_SET_PDEATHSIG = 1


def _stop_with_serve() -> None:
    """In a worker of `serve --workers N` on Linux: be sent SIGTERM (a graceful stop) when serve ends."""
    serve = os.environ.get(SERVE_PID_ENV, "")
    if not serve.isdigit() or int(serve) == os.getpid() or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(serve):  # serve ended before the line above: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def observed(app: ASGIApp, *, count: bool, access: logs.AccessLine | None, cors: ASGIApp | None = None) -> ASGIApp:
    """Give each request an id (the caller's X-Request-ID if sane), echoed back; count, time and log it.

    One plain ASGI wrapper, the cheapest Litestar runs, around the whole app
    (router, CORS and error mapping included), so that a request that matches no
    route is counted and logged too, and a response is seen with the status the
    error mapping gave it. It also makes OPTIONS list every method of the path,
    not just its first handler's (litestar#4169, fixed in 3.0), and gives every
    2xx answer to a write its Tasktrail-Read-After token (see `_read_after`), and a write the log refused
    its token where it has one (replicas.REFUSED).

    Requests the HTTP protocol refuses before any app sees them (http/protocol.py)
    are counted and logged the same way, through `protocol.observe`.

    `cors` is Litestar's CORS middleware around `app`: it acts only on a request
    that carries an Origin header (without one it calls `app` and nothing else),
    so a request without one goes straight to `app`, sparing the middleware's
    parse of every header into a new multidict (the one scan below finds Origin).
    """

    observing = count or access is not None
    cors = cors or app

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await cors(scope, receive, send)
            return
        started = perf_counter()
        given = b""
        inner = app
        hosts = 0
        readable = True
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = given or value  # the first
            elif name == b"origin":
                inner = cors
            elif name == b"host":
                hosts += 1
                readable = readable and wellformed.valid_host(value)
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1, or a 400. And the request's URL is made from it:
        # unreadable (a port past 65535), it fails wherever the URL is read.
        if not readable or hosts > 1 or (not hosts and scope.get("http_version") != "1.0"):
            inner = _bad_host
        sane = logs.SANE_REQUEST_ID.fullmatch(given) is not None and logs.KEY_LIKE.search(given) is None
        header = given if sane else _new_request_id()
        request_id = header.decode()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        logs.request_id.set(request_id)
        method = scope["method"]
        options = method == "OPTIONS"
        write = method not in replicas.SAFE_METHODS
        status = 500  # what the server answers if the app sends nothing
        started_answer = False

        async def send_with_id(message: Any) -> None:
            nonlocal status, started_answer
            if message["type"] == "http.response.start":
                status, started_answer = message["status"], True
                headers = [*message.get("headers", []), (b"x-request-id", header)]
                # A refused write has a token only where its connection left one (replicas.REFUSED).
                if write and (200 <= status < 300 or replicas.STATE in state):
                    headers.append(_read_after(state))
                message["headers"] = headers
                if options:
                    _allow_every_method(message, scope)
            await send(message)

        try:
            await inner(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn's graceful stop gave up waiting (for a body still arriving, say) and cancels what is
            # left: a 503, not its plain-text 500 and a traceback. The request has ended either way.
            if started_answer:
                raise
            await send_problem(
                send_with_id, 503, STOPPED, [(b"retry-after", b"1")], **({"outcome": UNKNOWN} if write else {})
            )
        finally:
            if observing:
                client = scope.get("client")
                # The template of the route the router matched, never the path as sent.
                route = scope.get("path_template") or metrics.UNMATCHED
                record(request_id, method, route, status, perf_counter() - started, state.get("actor"), client)

    def record(
        request_id: str, method: str, route: str, status: int, seconds: float, actor: str | None, client: Any
    ) -> None:
        """Count and log a finished request: every one `middleware` sees, and those the protocol refuses."""
        method = method if method in metrics.METHODS else metrics.OTHER_METHOD
        if count:
            metrics.request_done(method, route, status, seconds)
        if access is not None:
            access(request_id, method, route, status, seconds, actor, client[0] if client else "-")

    # A request the HTTP protocol refuses before the app sees it (http/protocol.py).
    def refused(method: str, status: int, seconds: float, client: tuple[str, int] | None) -> bytes:
        request_id = _new_request_id()
        record(request_id.decode(), method, metrics.UNMATCHED, status, seconds, None, client)
        return request_id

    protocol.observe = refused
    return middleware


# How long a starting server waits for its follower's first round (see follow.Follower.settled).
STARTUP_FOLLOW_SECONDS = 30.0

UNKNOWN = "unknown"  # a 503's outcome when a write may have been applied (problems.Problem.outcome)
CUT_OFF = (
    "the connection to the database was lost with this write under way; it may or may not have been made: "
    "read the task back (or send a create again with its Idempotency-Key)"
)
STOPPED = (
    "the server stopped before it could finish this request; a write may or may not have been made: "
    "read the task back (or send a create again with its Idempotency-Key)"
)


def _new_request_id() -> bytes:
    """A request's id when the caller gives none: unique without a random draw per request."""
    return b"%s%020x" % (_PROCESS, next(_SEQUENCE))


async def _bad_host(scope: Scope, receive: Receive, send: Send) -> None:
    await send_problem(
        send, 400, "a request needs exactly one Host header: a host name or address, with a port from 0 to 65535 if any"
    )


def _read_after(state: dict[str, Any]) -> tuple[bytes, bytes]:
    """A write's Tasktrail-Read-After header (see replicas.py).

    The write's primary connection leaves the token in the request's state
    (replicas.Replicas.writing); without replicas, or when none was left, the
    token is replicas.ON_PRIMARY, which a process with replicas answers from the
    primary. Reads get none.
    """
    token = state.get(replicas.STATE)
    return _READ_AFTER, _ON_PRIMARY if token is None else token.encode()


_READ_AFTER = replicas.HEADER.lower().encode()
_ON_PRIMARY = replicas.ON_PRIMARY.encode()


def _allow_every_method(message: Message, scope: Scope) -> None:
    if "route_handler" in scope:
        handlers = scope["app"].route_handler_method_map
        methods = {method for path in scope["route_handler"].paths for method in handlers.get(path, {})}
        if "GET" in methods:
            methods.add("HEAD")  # every GET route answers HEAD too (http/wellformed.py)
        MutableScopeHeaders.from_message(message)["allow"] = ", ".join(sorted(methods))


def create_app(
    database_url: str | None = None,
    api_keys: Sequence[auth.Key] | None = None,
    *,
    replica_urls: Sequence[str] | None = None,
    replica_max_lag: float | None = None,
) -> Litestar:
    """The app, on DATABASE_URL, its replicas (DATABASE_REPLICA_URLS) and the configured API keys unless given others.

    Migrations are the caller's.
    """
    _stop_with_serve()
    conninfo = database_url or os.environ["DATABASE_URL"]
    keys = auth.load() if api_keys is None else api_keys
    urls, max_lag = replicas.configured()
    urls = urls if replica_urls is None else list(replica_urls)
    max_lag = max_lag if replica_max_lag is None else replicas.max_lag_from(replica_max_lag)
    counting = os.environ.get(METRICS_ENV, "1") != "0"
    # Signs the dashboard's session cookies; the API-key check reads them.
    signer = sessions.Signer(sessions.secret_from_env())
    access = logs.access_line()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = db.create_pool(conninfo, settings=versions.application_name())  # prune sees it
        await app.state.pool.open(wait=False)
        app.state.replicas = replicas.Replicas(conninfo, app.state.pool, urls, max_lag)
        await app.state.replicas.start()
        app.state.writes = grouped.Writes(app.state.replicas)
        app.state.live = live.Listener(conninfo, app.state.replicas, events.render)
        await app.state.live.start()
        # Marks this process's read-model versions in use, and applies to them what other releases write.
        app.state.follower = follow.Follower(conninfo)
        await app.state.follower.start()
        await app.state.follower.settled(STARTUP_FOLLOW_SECONDS)  # before the first request
        sampler = asyncio.create_task(metrics.keep_sampling_pool(app.state.pool)) if counting else None
        # What start-up made lives as long as the process: keep the collector from rescanning it,
        # and let the young generation grow (a request makes a few thousand short-lived objects)
        # before a collection looks through it.
        gc.freeze()
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            await app.state.writes.stop()  # the queued writes, before the pool closes
            await app.state.follower.stop()
            await app.state.live.stop()
            await app.state.replicas.stop()
            await app.state.pool.close()
            metrics.process_exiting()
            if access is not None:
                access.flush()

    app = Litestar(
        route_handlers=[
            *batch.ROUTES,
            *tasks.ROUTES,
            *history.ROUTES,
            *events.ROUTES,
            *health.ROUTES,
            *(scrape.ROUTES if counting else ()),
            dashboard.router(keys, signer, PROBLEMS, max_lag if urls else None),
        ],
        lifespan=[lifespan],
        # (Request ids, counting and logging wrap the whole app: see `observed` below.)
        # Each request is checked for its API key first (none without keys), then for its form: a caller
        # without a key hears 401, whatever it sent, and learns nothing of what a route accepts.
        middleware=[*auth.middleware(keys, signer), wellformed.wellformed],
        # `serve` configures logging (tasktrail.logs) before it makes the app: Litestar must leave it as it is.
        logging_config=None,
        openapi_config=openapi.CONFIG,
        plugins=[openapi.JsonObjects(), wellformed.Shapes()],
        request_max_body_size=MAX_BODY_BYTES,
        # Browsers on other origins (the seed's front end) may call the API and read its headers.
        cors_config=CORSConfig(
            allow_origins=["*"],
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "If-Match",
                "If-None-Match",
                "Idempotency-Key",
                "Last-Event-ID",
                "X-Request-ID",
                replicas.HEADER,
            ],
            expose_headers=["ETag", "Link", "Location", "Retry-After", "X-Request-ID", replicas.HEADER],
        ),
        exception_handlers=PROBLEMS,
    )
    # Outermost, around the router: see `observed`. Litestar's handler is the CORS middleware around the rest.
    app.state[LOOPBACK_ONLY] = auth.loopback_only(keys)
    app.state[API_KEYS] = tuple(keys)
    app.state[OPEN_PATHS] = frozenset(
        route.path
        for route in app.routes
        if all(h.opt.get("public") or h.http_methods == {"OPTIONS"} for h in route.route_handlers)
    )
    litestars = app.asgi_handler
    assert isinstance(litestars, CORSMiddleware)
    cors = _Cors(litestars.app, litestars.config)
    app.asgi_handler = observed(cors.app, count=counting, access=access, cors=cors)
    return app


class _Cors(CORSMiddleware):
    """Litestar's CORS middleware, refusing a preflight with a problem document (its own refusal is text/plain)."""

    def _create_preflight_response(self, origin: str, request_headers: Headers) -> Response[Any]:
        response = super()._create_preflight_response(origin, request_headers)
        if response.status_code < 400:
            return response
        refused = str(response.content).removeprefix("Disallowed CORS ")
        return problem(
            403 if "Origin" in refused else 400,
            f"CORS preflight refused: this service does not allow the {refused.lower()} it asks for"
            f" (methods {', '.join(self.config.allow_methods)}; headers {', '.join(self.config.allow_headers)})",
        )
