"""What every request must be before a handler reads any of it, checked once for every route.

Handlers decode what they read as text: a path segment, a query parameter, a
header, a JSON body. Bytes that are not text broke those decoders in different
ways: msgspec raised UnicodeDecodeError on a body that is not UTF-8 (a 500),
and the query parser quietly turned %ff into U+FFFD and filtered on that. So
the checks below run before any handler, on every route, the ones added later
included, and answer problem+json:

- the URL is at most MAX_URL_BYTES (414); its path and query string
  percent-decode to UTF-8 (400), and no path segment holds an escaped `/`
  (404: the router matched the decoded path, where %2F became a separator,
  so /tasks/%2F found the list); a query value holds no NUL (422: PostgreSQL
  text cannot), a parameter the handler reads comes once unless it takes a
  list (422: a filter given twice is ambiguous, and a proxy may have checked
  the other one; one it does not read, such as a cache-buster, may repeat),
  and an integer parameter is written in digits (422: the
  parser would read 1e3 as 1000 and 5.0 as 5; named together with the
  route's own faults, see misspelt_integers);
- the headers are at most MAX_HEADER_BYTES in all (431), and a header the
  service reads as one value (SINGLE) does not come twice with different
  values (400; a second Host is refused before, by app.observed);
- a route that takes a JSON body (a `data` parameter, JSON being Litestar's
  default body encoding) needs Content-Type `application/json` or
  `application/*+json` (RFC 6839: JSON all the same), with charset utf-8 if
  any; a body without a Content-Type is refused too (415). A cross-site HTML
  form can post `text/plain` without a CORS preflight; it cannot post JSON.
  The body must be UTF-8 (400) and arrive within the read timeout (408), so a
  client that announces more bytes than it sends cannot hold a request open
  (a dashboard form's body too, which its page reads itself);
- a route that reads no body still refuses one over 1 MiB (413): by its
  Content-Length, or, sent in chunks, by reading it through (within the read
  timeout) before the handler runs; otherwise a DELETE or a cleanup with a
  2 MiB chunked body went through.

`Shapes` (a plugin) works out once per route handler which body and which
list parameters it takes, and adds 415 to its OpenAPI responses; `wellformed`
(a middleware) checks each request against that. A request no route matched
gets the same checks of its URL and headers from the app's 404 and 405
(`unrouted_refusal`).

A web page's route (the dashboard's: its handler's opt names a PAGE) gets the
same refusal, with the same status, as an HTML page a browser shows rather
than a problem document; `urlencoded_refusal` applies the query string's rules
to a form's body (the same encoding).
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import functools
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from litestar.constants import RESERVED_KWARGS
from litestar.enums import RequestEncodingType
from litestar.exceptions import ClientException
from litestar.handlers import HTTPRouteHandler
from litestar.params import PathParameter
from litestar.plugins import ReceiveRoutePlugin
from litestar.routes import BaseRoute, HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from tasktrail import db
from tasktrail.http.body import MAX_BODY_BYTES, MalformedBody, refused
from tasktrail.http.problems import problems, send_problem, shown

MAX_URL_BYTES = 16 * 1024
MAX_HEADER_BYTES = 32 * 1024
# A request of up to 1 MiB arrives in well under a second on any working link;
# a client that stops sending mid-way would otherwise hold its connection (and,
# mid-body, its request) until it disconnects. TASKTRAIL_READ_TIMEOUT, seconds:
# for the head (http/protocol.py) and again for the body.
READ_TIMEOUT = 30.0
# Headers read as one value: two that differ leave it to chance which one counts.
SINGLE = {
    b"authorization": "Authorization",
    b"content-type": "Content-Type",
    b"idempotency-key": "Idempotency-Key",
    b"last-event-id": "Last-Event-ID",
    b"x-csrf-token": "X-CSRF-Token",
}
_BODY_HEADERS = (b"content-length", b"transfer-encoding")
_WATCHED = frozenset(SINGLE) | frozenset(_BODY_HEADERS)
_CHARSETS = ("utf-8", "utf8")
SHAPE = "tasktrail.shape"  # the key of a handler's Shape in its opt
# The key of a page's form (a msgspec Struct of text fields) in its handler's opt: it reads a body.
FORM = "tasktrail.form"
# The key of a page route's refusal in its opt: (status, detail) -> the ASGI app that answers it.
PAGE = "tasktrail.page"
_WHOLE = re.compile(r"0|-?[1-9][0-9]*")  # not -0, nor 00
WHOLE_NUMBER = "must be a whole number in digits, such as 100 (no exponent, point or leading 0)"
MISSPELT = "tasktrail.misspelt_integers"  # in a request's scope["state"]: the integer parameters misspelt


@dataclass(frozen=True)
class Shape:
    """What a route handler reads: a JSON body or not; which query parameters once, which as lists, which integers."""

    json_body: bool
    lists: frozenset[str]
    integers: frozenset[str] = frozenset()
    singles: frozenset[str] = frozenset()


def shape_of(handler: HTTPRouteHandler) -> Shape:
    fields = handler.parsed_fn_signature.parameters
    data = fields.get("data")
    json_body = data is not None and getattr(data.kwarg_definition, "media_type", None) in (
        None,
        RequestEncodingType.JSON,
    )
    lists, integers, singles = set(), set(), set()
    for name, field in fields.items():
        where = field.kwarg_definition
        if (
            name in RESERVED_KWARGS
            or getattr(where, "header", None)
            or getattr(where, "cookie", None)
            or isinstance(where, PathParameter)
        ):
            continue
        query = getattr(where, "query", None) or name
        if field.is_non_string_sequence:
            lists.add(query)
            continue
        singles.add(query)
        if any(t.is_subclass_of(int) and not t.is_subclass_of(bool) for t in (field, *field.inner_types)):
            integers.add(query)
    return Shape(json_body, frozenset(lists), frozenset(integers), frozenset(singles))


class Shapes(ReceiveRoutePlugin):
    """Records each route handler's Shape as it is registered, and documents its 415."""

    def receive_route(self, route: BaseRoute) -> None:
        if not isinstance(route, HTTPRoute):
            return
        for handler in route.route_handlers:
            handler.opt[SHAPE] = shape = shape_of(handler)
            if shape.json_body:
                handler.responses = {**(handler.responses or {}), **problems(415)}
        # HEAD is GET without the body (RFC 9110 9.3.2), on every GET route: the router finds the GET
        # handler's copy, left out of the OpenAPI document, and `wellformed` runs the GET itself.
        if "GET" in route.route_handler_map and "HEAD" not in route.route_handler_map:
            handler, kwargs = route.route_handler_map["GET"]
            head = copy.copy(handler)
            head._resolved_include_in_schema = False
            route.route_handler_map["HEAD"] = (head, kwargs)


@functools.lru_cache(maxsize=64)  # a client sends the same Host on every request
def valid_host(header: bytes) -> bool:
    """Whether a Host header reads as a URL's host and port, as the request's URL is made from it."""
    text = header.decode("latin-1")
    try:
        parts = urlsplit(f"http://{text}/")
        parts.port  # noqa: B018 -- read for its ValueError: a port past 65535, or not digits
    except ValueError:
        return False
    return parts.netloc == text  # none of it read as a path, query or fragment


def read_timeout() -> float:
    return db.seconds("TASKTRAIL_READ_TIMEOUT", READ_TIMEOUT)


def wellformed(app: ASGIApp) -> ASGIApp:
    """The middleware: refuse a request that breaks a rule above, before the handler runs."""
    body_timeout = read_timeout()

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        handler = scope.get("route_handler")
        shape = None if handler is None else handler.opt.get(SHAPE)
        refusal = _refusal(scope, shape)
        page = None if handler is None else handler.opt.get(PAGE)
        if refusal is None and (misspelt := misspelt_integers(scope.get("query_string", b""), shape)):
            if page is None:
                scope = _not_integers(scope, misspelt)
            else:
                refusal = _integer_refusal(misspelt)
        if refusal is not None:
            status, detail, extra = refusal
            if page is not None:
                await page(status, detail)(scope, receive, send)
                return
            await send_problem(send, status, detail, **extra)
            return
        if shape is not None and shape.json_body:
            receive = _text_body(receive, body_timeout)
        elif handler is not None and FORM in handler.opt:
            receive = _timed_body(receive, body_timeout)  # read by dashboard.routes.read_form
        elif handler is not None and _chunked(scope):
            receive = await _read_through(receive, body_timeout)
        if scope["method"] == "HEAD":
            await _as_get(app, scope, receive, send)
            return
        await app(scope, receive, send)

    return middleware


async def _as_get(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer HEAD as the route's GET would, headers only; an event stream ends once its headers are out.

    The GET runs on a copy of the scope, so the server, which reads the method
    from its own, still sends no body.
    """
    done = False

    async def head_only(message: Message) -> None:
        nonlocal done
        if done:
            return
        if message["type"] == "http.response.start":
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            done = True

    async def until_answered() -> Message:
        # A stream's handler waits on receive() for the client to leave: once answered, it has.
        return {"type": "http.disconnect"} if done else await receive()

    await app({**scope, "method": "GET"}, until_answered, head_only)


Refusal = tuple[int, str, dict[str, Any]]


def _refusal(scope: Scope, shape: Shape | None) -> Refusal | None:
    seen: dict[bytes, bytes] = {}
    size = 0
    codings: list[bytes] = []
    encodings: list[bytes] = []  # Content-Encoding's, over every line of it (RFC 9110 5.3: one list)
    for name, value in scope["headers"]:
        size += len(name) + len(value)
        if name in _WATCHED and seen.setdefault(name, value) != value and name in SINGLE:
            return 400, f"give one {SINGLE[name]} header, not several that differ", {}
        if name == b"transfer-encoding":
            codings += (coding.strip().lower() for coding in value.split(b","))
        elif name == b"content-encoding":
            encodings += (coding.strip().lower() for coding in value.split(b","))
    if size > MAX_HEADER_BYTES:
        return 431, f"the headers are larger than {MAX_HEADER_BYTES} bytes in all", {}
    if codings and codings != [b"chunked"]:
        # RFC 9112 6.1: a coding the server does not decode (gzip, chunked) would be read as if it were not there.
        return 400, "the only transfer coding taken is chunked (Transfer-Encoding: chunked)", {}
    length = seen.get(b"content-length", b"0").strip()
    if length.isdigit() and (len(length) > 18 or int(length) > MAX_BODY_BYTES):
        # Whether the route reads a body or not: none may be larger (the body is not read to find out).
        return 413, "the body is over 1 MiB", {}
    # Litestar's test client puts the query string in raw_path too (uvicorn, as ASGI says, does not).
    raw_path = (scope.get("raw_path") or scope["path"].encode()).partition(b"?")[0]
    query = scope.get("query_string", b"")
    if len(raw_path) + len(query) > MAX_URL_BYTES:
        return 414, f"the URL is longer than {MAX_URL_BYTES} bytes", {}
    refusal = _path_refusal(raw_path) or (_query_refusal(query, shape) if query else None)
    if refusal is None and shape is not None and shape.json_body:
        has_body = length != b"0" or b"transfer-encoding" in seen
        detail = _content_type_refusal(seen.get(b"content-type"), has_body)
        coding = next((each for each in encodings if each not in (b"identity", b"")), None)
        if detail is None and has_body and coding is not None:
            # RFC 9110 15.5.16: a coding the server does not decode is 415, not a body it cannot parse (400).
            quoted = shown(coding.decode("latin-1"), 40)
            detail = f"request bodies are read as sent, not decoded from {quoted!r}: send it without Content-Encoding"
        if detail is not None:
            refusal = 415, detail, {}
    return refusal


def unrouted_refusal(scope: Scope) -> Refusal | None:
    """What refuses a request that no route matched, before its 404 or 405: its URL's and headers' faults.

    The middleware runs for a matched route only, so /nothing%00 or a 20 KB URL was a 404. A query's
    rules (422) are a route's, and a route that does not exist has none.
    """
    refusal = _refusal(scope, None)
    return None if refusal is None or refusal[0] == 422 else refusal


def _path_refusal(raw_path: bytes) -> Refusal | None:
    if b"%" not in raw_path and b"\x00" not in raw_path and raw_path.isascii():
        return None  # nothing escaped: plain ASCII text
    try:
        path = unquote_to_bytes(raw_path).decode()
    except UnicodeDecodeError:
        return 400, "the URL's path is not UTF-8 text once its %-escapes are decoded", {}
    if "\x00" in path:
        return 400, "the URL's path holds NUL (%00)", {}
    if b"%2f" in raw_path.lower():
        # The router has matched the decoded path, in which %2F became a separator: /tasks/%2F found the list.
        return 404, "nothing here has a / inside a path segment (%2F)", {}
    return None


def _query_refusal(query: bytes, shape: Shape | None, noun: str = "query parameter") -> Refusal | None:
    if b"%" in query or b"+" in query or b"\x00" in query or not query.isascii():
        return _escaped_query_refusal(query, shape, noun)
    # Nothing escaped (the common case): plain ASCII text; only a repeat can be wrong (and an integer's spelling,
    # which misspelt_integers finds).
    return _repeat_refusal([part.partition(b"=")[0].decode("ascii") for part in query.split(b"&") if part], shape)


def _escaped_query_refusal(query: bytes, shape: Shape | None, noun: str) -> Refusal | None:
    names = []
    for part in query.split(b"&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition(b"=")
        try:
            name = _decoded(raw_name)
        except UnicodeDecodeError:
            return 400, f"a {noun}'s name is not UTF-8 text once its %-escapes are decoded", {}
        try:
            value = _decoded(raw_value)
        except UnicodeDecodeError:
            return _invalid(400, name, "not UTF-8 text once its %-escapes are decoded")
        if "\x00" in name:
            return 400, f"a {noun}'s name holds NUL (%00)", {}
        if "\x00" in value:
            return _invalid(422, name, "must not contain NUL (%00)")
        names.append(name)
    return _repeat_refusal(names, shape)


def misspelt_integers(query: bytes, shape: Shape | None) -> list[str]:
    """The integer parameters not written as one, each once: the parser would take 1e3 and 5.0 (as 1000 and 5).

    Called once the query has passed _query_refusal (its escapes decode).
    """
    if shape is None or not shape.integers or not query:
        return []
    bad = {}
    for part in query.split(b"&"):
        raw_name, _, raw_value = part.partition(b"=")
        name = _decoded(raw_name)
        if name in shape.integers and not _WHOLE.fullmatch(_decoded(raw_value)):
            bad[name] = None
    return list(bad)


def _not_integers(scope: Scope, names: list[str]) -> Scope:
    """The scope with those parameters' values made plain non-integers, so that the route's own check names
    them together with its other faults (?status=x&limit=1e3: both); the 422 says why (MISSPELT)."""
    scope["state"][MISSPELT] = frozenset(names)
    parts = []
    for part in scope["query_string"].split(b"&"):
        raw_name = part.partition(b"=")[0]
        parts.append(raw_name + b"=not-digits" if _decoded(raw_name) in names else part)
    return {**scope, "query_string": b"&".join(parts)}


def _integer_refusal(names: list[str]) -> Refusal:
    faults = refused([(shown(name, 100), WHOLE_NUMBER) for name in names])  # as a body's
    return 422, str(faults), {"errors": faults.errors}


def urlencoded_refusal(data: bytes) -> Refusal | None:
    """Why a form's body (application/x-www-form-urlencoded) is refused, by the query string's rules; None if not."""
    return _query_refusal(data, None, "form field") if data else None


def _repeat_refusal(names: list[str], shape: Shape | None) -> Refusal | None:
    """A parameter the route reads once, given twice (without a route, such as a form's fields: any)."""
    if len(set(names)) < len(names):
        for name in names:
            if names.count(name) > 1 and (name in shape.singles if shape is not None else True):
                return _invalid(422, name, "given more than once; give it once")
    return None


def _decoded(raw: bytes) -> str:
    """A query string's name or value as text: + is a space, %-escapes are UTF-8 bytes."""
    if b"%" not in raw and b"+" not in raw and raw.isascii():
        return raw.decode("ascii")  # a raw NUL stays, and is refused
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode()


def _invalid(status: int, field: str, message: str) -> Refusal:
    quoted = shown(field, 100)
    return status, f"{quoted}: {message}", {"errors": [{"field": quoted, "message": message}]}


def _content_type_refusal(value: bytes | None, has_body: bool) -> str | None:
    """Why a JSON route refuses this Content-Type; None when it takes it.

    Without a body there is nothing to read as JSON, whatever the type says (`curl -X PATCH -d ''` sends
    an empty form): that is the 422 of a missing body, as without a Content-Type.
    """
    if not has_body:
        return None
    if value is None:
        return "this route takes a JSON body: send it with Content-Type: application/json"
    media, *parameters = value.decode("latin-1").split(";")
    media = media.strip().lower()
    quoted = shown(media, 100)
    json = media == "application/json" or (
        media.startswith("application/") and media.endswith("+json") and len(media) > len("application/+json")
    )
    if not json:
        given = quoted or "an empty Content-Type"
        return f"this route takes a JSON body, not {given}: send Content-Type: application/json"
    for parameter in parameters:
        key, _, charset = parameter.partition("=")
        charset = charset.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in _CHARSETS:
            return f"JSON is read as UTF-8 only, not charset {shown(charset, 40)!r}: send the body as UTF-8"
    return None


def _chunked(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" for name, _ in scope["headers"])


async def _read_through(receive: Receive, seconds: float) -> Receive:
    """Read a body no handler reads, to refuse one over MAX_BODY_BYTES; `receive` as if it had not been read."""
    read, deadline = 0, asyncio.get_running_loop().time() + seconds
    while True:
        message = await _body_message(receive, deadline, seconds)
        read += len(message.get("body", b""))
        if read > MAX_BODY_BYTES:
            raise ClientException(status_code=413, detail="the body is over 1 MiB", headers={"Connection": "close"})
        if not message.get("more_body", False):
            break
    given = False

    async def after() -> Message:
        nonlocal given
        if given:
            return await receive()  # the client going away, for a stream
        given = True
        return {"type": "http.request", "body": b"", "more_body": False}

    return after


async def _body_message(receive: Receive, deadline: float, seconds: float) -> Message:
    """The body's next message, by the deadline (the request's read timeout, `seconds`, after its first)."""
    try:
        async with asyncio.timeout_at(deadline):
            message = await receive()
    except TimeoutError:
        # The rest of the body may still come: close the connection rather than read it as the next request.
        raise ClientException(
            status_code=408,
            detail=f"the body did not arrive within {seconds:g} s of the request",
            headers={"Connection": "close"},
        ) from None
    if message["type"] != "http.request":
        # Gone mid-body: nobody reads this answer, but logs and metrics should not count a server error.
        raise ClientException(detail="the client closed the connection before it had sent the whole body")
    return message


def _timed_body(receive: Receive, timeout: float) -> Receive:
    """`receive` that refuses a body that does not arrive in time, or a client gone before it has sent it."""
    state = {"complete": False, "deadline": 0.0}

    async def timed() -> Message:
        if state["complete"]:
            return await receive()
        if not state["deadline"]:
            state["deadline"] = asyncio.get_running_loop().time() + timeout
        message = await _body_message(receive, state["deadline"], timeout)
        state["complete"] = not message.get("more_body", False)
        return message

    return timed


def _text_body(receive: Receive, timeout: float) -> Receive:
    """`receive` that refuses a body that is not UTF-8, or that does not arrive in time."""
    timed = _timed_body(receive, timeout)
    decoder = codecs.getincrementaldecoder("utf-8")()
    state = {"read": 0, "ascii": True, "complete": False}

    async def checked() -> Message:
        if state["complete"]:
            return await receive()
        message = await timed()
        chunk = message.get("body", b"")
        state["complete"] = not message.get("more_body", False)
        if not (state["ascii"] and chunk.isascii()):
            # Past plain ASCII (the common case, checked in C): decode to find any invalid or cut-off sequence.
            state["ascii"] = False
            held = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=state["complete"])
            except UnicodeDecodeError as exc:
                at = state["read"] - held + exc.start
                raise MalformedBody(f"the body is not UTF-8 text (byte {at}): JSON must be sent as UTF-8") from None
        state["read"] += len(chunk)
        return message

    return checked
