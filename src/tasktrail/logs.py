"""Logs as text or as one JSON object a line (`serve --log-format`): a line per request, and every other line.

Every line, a request's or not (start-up, warnings, errors with their
tracebacks, uvicorn's own), has `time` (UTC, ISO 8601), `level`, `logger` and
`message`; a line logged while a request is handled also has its `request_id`.
A request's line adds `method`, `route` (the route template, never the path as
sent), `status`, `duration` (seconds), `actor` (the API key's name, or null)
and `client`. Nothing else of a request is written: never a key, a header, a
body, or a query or body value.

A request's line is written straight to stderr, not through `logging`: making
a LogRecord and passing it through logger, handler and formatter costs 11 us
of CPU a request, this 3 us (measured on this machine), and the line is the
same. The lines go out together, in one write at most FLUSH_SECONDS after
the first of them (or once MAX_PENDING wait, and when the server stops), not
one write each: a write per line, flushed at once as stderr is, was 5 us of a
request's 9. A process killed outright (SIGKILL) loses at most that many
seconds of request lines. It is written when the access log is on (`serve
--no-access-log` turns it off) and the `tasktrail.access` logger is enabled for INFO (`--log-level`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

import msgspec

FORMATS = ("text", "json")
# How `serve` tells its worker processes (and create_app) what it was asked.
FORMAT_ENV = "TASKTRAIL_LOG_FORMAT"
ACCESS_ENV = "TASKTRAIL_ACCESS_LOG"
ACCESS_LOGGER = "tasktrail.access"

# The id of the request being handled, for lines logged while it is.
request_id: ContextVar[str | None] = ContextVar("tasktrail_request_id", default=None)
# A caller's X-Request-ID kept as sent: the shapes proxies and clients use (UUIDs, `Root=1-…` trace ids,
# dotted or underscored names), and nothing that could break a text log line (no space, quote or semicolon).
SANE_REQUEST_ID = re.compile(rb"[0-9A-Za-z._:=+/-]{1,128}")
# An API key (auth.new_key) sent as a request id by mistake: never logged, echoed or stored; a new id instead.
KEY_LIKE = re.compile(rb"tt_[0-9A-Za-z_-]{43}")
KEY_IN_TEXT = re.compile(KEY_LIKE.pattern.decode())

_encode = msgspec.json.Encoder().encode
# What an IPv4 or IPv6 address (or a test client's name), or a request id, looks like: nothing to escape or quote.
_PLAIN = re.compile(r"[0-9A-Za-z._:=+/\[\]-]{1,128}")


def _json_text(value: str) -> str:
    """`value` as a JSON string."""
    return f'"{value}"' if _PLAIN.fullmatch(value) else _encode(value).decode()


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def timestamp(at: float) -> str:
    """ISO 8601 in UTC to the millisecond, e.g. 2026-12-03T10:11:12.345Z."""
    whole = int(at)
    return f"{_second(whole)}.{int((at - whole) * 1000):03d}Z"


def log_format() -> str:
    value = os.environ.get(FORMAT_ENV) or "text"
    if value not in FORMATS:
        raise ValueError(f"{FORMAT_ENV}={value!r}: give one of {', '.join(FORMATS)}")
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and request_id and exception when there are."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (current := request_id.get()) is not None:
            fields["request_id"] = current
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return _encode(fields).decode()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, then request_id=… while a request is handled, then any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{timestamp(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if (current := request_id.get()) is not None:
            line += f" request_id={current}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is written (as logging's last resort does)."""

    def __init__(self) -> None:
        super().__init__()
        # A Python warning would otherwise print as bare text.
        logging.captureWarnings(True)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


class AnsweredElsewhere(logging.Filter):
    """Drops uvicorn's warning for a request that is not HTTP: tasktrail answers it 400 and logs its access line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Invalid HTTP request received."


def config(fmt: str, level: str) -> dict[str, Any]:
    """The logging configuration (dictConfig) `serve` and its workers apply: every logger through one handler."""
    level = level.upper()
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"tasktrail": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {"stderr": {"()": f"{__name__}.Stderr", "formatter": "tasktrail"}},
        "filters": {"answered": {"()": f"{__name__}.AnsweredElsewhere"}},
        "loggers": {
            "tasktrail": {"level": level},
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True, "filters": ["answered"]},
            # Replaced by the line create_app's middleware writes for each request.
            "uvicorn.access": {"handlers": [], "propagate": False},
            "litestar": {"level": level, "handlers": [], "propagate": True},
        },
        # Other libraries: their warnings and errors.
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }


def _bounded_client(client: str) -> str:
    """A client address as logged: a trusted proxy's X-Forwarded-For says what it likes, a key or a page."""
    return KEY_IN_TEXT.sub("tt_(a key)", client)[:128]


class AccessLine:
    """Writes one line per request to stderr, in the configured format (see the module's docstring).

    A JSON line is a template filled in, not a dict encoded: what a route's
    lines share (method, route, status and the message made of them) is encoded
    once per route and status, and a request id or client address of the plain
    characters they are made of needs no escaping (anything else is encoded).
    """

    __slots__ = ("_actors", "_heads", "json", "pending")
    FLUSH_SECONDS = 0.05
    MAX_PENDING = 256

    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"
        self.pending: list[str] = []
        # Bounded as the metrics' labels are: methods, routes and statuses are each from a fixed set.
        self._heads: dict[tuple[str, str, int], str] = {}
        # The API keys' names (from the configuration), and None.
        self._actors: dict[str | None, str] = {None: "null"}

    def __call__(
        self, request_id: str, method: str, route: str, status: int, seconds: float, actor: str | None, client: str
    ) -> None:
        now = timestamp(time.time())
        if "tt_" in client or len(client) > 128:
            client = _bounded_client(client)
        if self.json:
            try:
                head = self._heads[method, route, status]
            except KeyError:
                head = self._heads[method, route, status] = self._head(method, route, status)
            try:
                named = self._actors[actor]
            except KeyError:
                named = self._actors[actor] = _encode(actor).decode()
            line = (
                f'{{"time":"{now}",{head},"request_id":{_json_text(request_id)},"duration":{seconds:.6f},'
                f'"actor":{named},"client":{_json_text(client)}}}'
            )
        else:
            if not _PLAIN.fullmatch(client):
                # A trusted proxy's X-Forwarded-For becomes the client, whatever it says: quoted, it stays one field.
                client = _encode(client).decode()
            line = (
                f"{now} INFO    {ACCESS_LOGGER}: {method} {route} {status} {seconds * 1000:.2f}ms"
                f" request_id={request_id} actor={actor or '-'} client={client}"
            )
        self.pending.append(line + "\n")
        if len(self.pending) == 1:
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop: called on its own
                self.flush()
        elif len(self.pending) >= self.MAX_PENDING:
            self.flush()

    @staticmethod
    def _head(method: str, route: str, status: int) -> str:
        """The fields after `time` that every line of this method, route and status has, as JSON text."""
        fields = {
            "level": "info",
            "logger": ACCESS_LOGGER,
            "message": f"{method} {route} {status}",
            "method": method,
            "route": route,
            "status": status,
        }
        return _encode(fields).decode()[1:-1]

    def flush(self) -> None:
        if self.pending:
            sys.stderr.write("".join(self.pending))
            self.pending.clear()


def access_line() -> AccessLine | None:
    """What writes a request's line, or None when the access log is off (the default outside `serve`)."""
    if os.environ.get(ACCESS_ENV, "0") != "1" or not logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO):
        return None
    return AccessLine(log_format())
