"""No broken encoding anywhere in a request gets a 5xx: every route, every injection point, every encoding.

The routes come from the app itself, so routes added later are covered
without a change here. Requests go to the real app as raw ASGI messages, the
only way to put any byte in a header or path: each must get a response (no
exception, no silence), never a 5xx, and every error is problem+json, except
on a web page's route (its handler's opt names wellformed.PAGE: the
dashboard's), where it is an HTML page with the same status. Broken text in
the URL or the body is refused outright: 400 when it is not UTF-8 text (or not
JSON), 422 for well-formed text that breaks a rule (a NUL). A page's form
(its handler's opt names its fields under routes.FORM) is a body too, URL-encoded.

Litestar's own handlers (OPTIONS, the schema pages) read nothing of a request
but its path: they get one broken encoding at each point, and only "no 5xx"
is asserted (the schema site's 404 is an HTML page). The YAML schema is
rebuilt on every request, and the full set there would cost 30 s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote_from_bytes, unquote

import anyio
import msgspec
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from tasktrail.dashboard.routes import FORM, FORM_TYPE
from tasktrail.http import auth
from tasktrail.http.app import create_app
from tasktrail.http.sessions import COOKIE
from tasktrail.http.wellformed import PAGE, SHAPE
from tests.conftest import assert_verifies, fresh_database

pytestmark = pytest.mark.anyio

KEY = auth.new_key()
KEYS = [auth.Key("matrix", "admin", auth.digest(KEY))]
BEARER = f"Bearer {KEY}".encode()

# Bytes that are not UTF-8 text, or not the text they look like.
BROKEN = {
    "invalid byte ff": b"\xff",
    "invalid byte fe": b"\xfe",
    "lone continuation byte": b"\x80",
    "overlong /": b"\xc0\xaf",
    "overlong NUL": b"\xc0\x80",
    "overlong 3-byte": b"\xe0\x80\xaf",
    "UTF-8 high surrogate": b"\xed\xa0\x80",
    "UTF-8 low surrogate": b"\xed\xbf\xbf",
    "beyond U+10FFFF": b"\xf4\x90\x80\x80",
    "truncated 2-byte": b"\xc3",
    "truncated 3-byte": b"\xe2\x82",
    "truncated 4-byte": b"\xf0\x9f\x98",
    "latin-1": "café".encode("latin-1"),
    "UTF-16 with BOM": "ok".encode("utf-16"),
    "NUL": b"\x00",
}
# Valid UTF-8 that is not ASCII: never an encoding error (it may break another rule).
VALID = {"BOM mid-text": b"\xef\xbb\xbf", "accents and emoji": "é✓😀".encode()}
# JSON escapes that decode to no valid text: lone or reversed surrogates, NUL.
ESCAPES = {
    "escaped high surrogate": rb"\ud800",
    "escaped low surrogate": rb"\udfff",
    "escaped reversed pair": rb"\udc00\ud800",
    "escaped high then text": rb"\ud83dx",
    "escaped NUL": rb"\u0000",
}
# Whole bodies that are not UTF-8 JSON.
BODIES = {
    **{f"body of {name}": raw for name, raw in BROKEN.items()},
    "UTF-8 BOM before JSON": b'\xef\xbb\xbf{"x": 1}',
    "UTF-16LE JSON": '{"x": "y"}'.encode("utf-16-le"),
    "UTF-16 JSON with BOM": '{"x": "y"}'.encode("utf-16"),
    "UTF-32 JSON": '{"x": "y"}'.encode("utf-32"),
    "latin-1 JSON": '{"x": "café"}'.encode("latin-1"),
}
# Headers that something in the service (or Litestar) decodes, each as a plausible value around the bytes.
# The Content-Type names the route's own body type; a session cookie is sent without the Authorization
# header, which would otherwise decide alone.
HEADERS = {
    b"if-match": (b'"', b'"'),
    b"if-none-match": (b'W/"', b'"'),
    b"idempotency-key": (b"key-", b""),
    b"x-request-id": (b"req", b""),
    b"last-event-id": (b"1-", b""),
    b"authorization": (b"Bearer tt_", b""),
    b"content-type": (b"; charset=", b""),
    b"cookie": (COOKIE.encode() + b"=session.", b"; other=1"),
    b"x-csrf-token": (b"token", b""),
    b"tasktrail-read-after": (b"0/", b""),
    b"user-agent": (b"agent/", b""),
}


@dataclass
class Answer:
    status: int
    content_type: bytes
    body: bytes


async def call(
    app: Litestar, method: str, path: bytes, query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> Answer:  # fmt: skip
    """One request as the server would hand it over; the client goes away once the answer has started."""
    answered = anyio.Event()
    sent_body = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # a stream ends when its client leaves
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.start":
            answered.set()

    given = [(b"host", b"testserver"), *(headers or [])]
    if body:
        given.append((b"content-length", b"%d" % len(body)))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": unquote(path.decode("ascii")), "raw_path": path, "query_string": query, "root_path": "",
        "headers": given, "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {},
    }  # fmt: skip
    with anyio.fail_after(30):
        await app(scope, receive, send)  # type: ignore[arg-type]
    starts = [m for m in messages if m["type"] == "http.response.start"]
    assert len(starts) == 1, f"{method} {path!r}: no answer (a dropped connection)"
    content_type = dict(starts[0].get("headers", [])).get(b"content-type", b"")
    return Answer(starts[0]["status"], content_type, b"".join(m.get("body", b"") for m in messages[1:]))


@dataclass
class Endpoint:
    """One method of one route, with what its handler reads."""

    method: str
    template: str  # the route's path, {name} for each parameter
    parameters: list[str]
    query: list[str]
    body: Any  # the data type of a JSON body, or None
    form: Any  # the Struct of a page's form (a URL-encoded body), or None
    ours: bool  # False for Litestar's own handlers (OPTIONS, the schema pages): see the test
    page: bool  # a web page's route: its errors are HTML pages

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def endpoints(app: Litestar) -> list[Endpoint]:
    found = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            fields = handler.parsed_fn_signature.parameters
            query = [
                getattr(field.kwarg_definition, "query", None) or name
                for name, field in fields.items()
                if type(field.kwarg_definition).__name__ == "ParameterKwarg"
                and not (field.kwarg_definition.header or field.kwarg_definition.cookie)
                and name not in route.path_parameters
            ]
            shape = handler.opt[SHAPE]
            body = fields["data"].annotation if shape.json_body else None
            ours = handler.fn.__module__.startswith("tasktrail")
            page = PAGE in handler.opt
            for method in sorted(handler.http_methods):
                found.append(
                    Endpoint(
                        method, route.path_format, list(route.path_parameters), query, body, handler.opt.get(FORM),
                        ours, page,
                    )
                )  # fmt: skip
    return sorted(found, key=lambda e: (e.template, e.method))  # one order in every process (xdist's workers agree)


ENDPOINTS = endpoints(create_app("postgresql://unused", api_keys=KEYS))


class Target:
    """A live app with a task to aim at, and a fresh task for each request that may change or delete one."""

    def __init__(self, app: Litestar, client: AsyncTestClient) -> None:
        self.app, self.client = app, client

    async def task_id(self) -> str:
        created = await self.client.post(
            "/tasks/", json={"task_type": "target"}, headers={"Authorization": BEARER.decode()}
        )
        assert created.status_code == 201, created.text
        return created.json()["task_id"]


@pytest.fixture(scope="module")
async def target(server_url: str, template_db: str) -> AsyncIterator[Target]:
    with fresh_database(server_url, template_db) as url:
        app = create_app(url, api_keys=KEYS)
        async with AsyncTestClient(app=app) as client:
            yield Target(app, client)
        assert_verifies(url)


def sample(info: Any, leaves: Iterator[str], task_id: str) -> Any:
    """A value of a msgspec type, every string in it (keys too) a distinct marker from `leaves`."""
    kind = type(info).__name__
    if kind == "StructType":
        return {field.encode_name: sample(field.type, leaves, task_id) for field in info.fields}
    if kind == "Metadata":
        return sample(info.type, leaves, task_id)
    if kind == "UnionType":
        return sample(next(t for t in info.types if type(t).__name__ != "NoneType"), leaves, task_id)
    if kind in ("ListType", "SetType", "FrozenSetType", "VarTupleType"):
        return [sample(info.item_type, leaves, task_id)]
    if kind == "DictType":
        return {next(leaves): {next(leaves): [next(leaves)]}}
    if kind in ("StrType", "AnyType"):
        return next(leaves)
    if kind in ("IntType", "FloatType"):
        low = info.ge if info.ge is not None else (info.gt + 1 if info.gt is not None else 1)
        return low if kind == "IntType" else float(low)
    if kind == "BoolType":
        return False
    if kind == "LiteralType":
        return info.values[0]
    if kind == "EnumType":
        return next(iter(info.cls)).value
    if kind == "UUIDType":
        return task_id
    if kind == "DateTimeType":
        return "2020-01-01T00:00:00Z"
    return None


def template(body_type: Any, task_id: str) -> tuple[bytes, list[bytes]]:
    """A JSON body of the type with a distinct marker at every string and key; the markers."""
    made: list[bytes] = []

    def markers() -> Iterator[str]:
        while True:
            made.append(b"MARK%03dZ" % len(made))
            yield made[-1].decode()

    document = msgspec.json.encode(sample(msgspec.inspect.type_info(body_type), markers(), task_id))
    return document, made


def filled(document: bytes, leaves: list[bytes], at: bytes | None = None, raw: bytes = b"") -> bytes:
    """The body with "ok" at every marker, and the bytes `raw` inside the one at `at`."""
    for leaf in leaves:
        document = document.replace(leaf, b"ok" + raw + b"ok" if leaf == at else b"ok")
    return document


@dataclass
class Case:
    where: str
    path: bytes
    query: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    expect: frozenset[int] | None = None  # the only statuses allowed; None: any below 500


def quoted(raw: bytes) -> bytes:
    return quote_from_bytes(raw, safe="").encode()


def form_template(form_type: Any) -> tuple[bytes, list[bytes]]:
    """A form of the type, URL-encoded, with a distinct marker as every field's value; the markers."""
    names = [field.encode_name.encode() for field in msgspec.structs.fields(form_type)]
    made = [b"MARK%03dZ" % n for n in range(len(names))]
    return b"&".join(name + b"=" + mark for name, mark in zip(names, made, strict=True)), made


def cases(endpoint: Endpoint, task_id: str) -> Iterator[Case]:
    path = endpoint.template
    for name in endpoint.parameters:
        path = path.replace(f"{{{name}}}", task_id)
    base = path.encode()
    media = FORM_TYPE.encode() if endpoint.form is not None else b"application/json"
    if endpoint.form is not None:
        document, leaves = form_template(endpoint.form)
    else:
        document, leaves = (b"", []) if endpoint.body is None else template(endpoint.body, task_id)
    body = filled(document, leaves)
    sent = ((b"authorization", BEARER),) + (((b"content-type", media),) if body else ())

    yield Case("as is", base, headers=sent, body=body)
    encodings = {**BROKEN, **VALID} if endpoint.ours else dict([next(iter(BROKEN.items()))])
    for encoding, raw in encodings.items():
        broken = encoding in BROKEN
        for name in endpoint.parameters:
            wrong = path.replace(task_id, "x" + quoted(raw).decode(), 1).encode()
            yield Case(f"path {name}: {encoding}", wrong, headers=sent, body=body, expect=_4xx(broken))
        for name in [*endpoint.query, "unknown"]:
            query = name.encode() + b"=ok" + quoted(raw)
            yield Case(f"query {name}: {encoding}", base, query, sent, body, _4xx(broken, 400, 422))
        yield Case(f"query name: {encoding}", base, quoted(raw) + b"=1", sent, body, _4xx(broken, 400))
        for header, (before, after) in HEADERS.items():
            if header == b"content-type":
                before = media + before
            unsent = (header, b"authorization") if header == b"cookie" else (header,)
            headers = (*(h for h in sent if h[0] not in unsent), (header, before + raw + after))
            expect = frozenset({415}) if header == b"content-type" and body and broken else None
            yield Case(f"header {header.decode()}: {encoding}", base, headers=headers, body=body, expect=expect)
        # In a form, a NUL is text that breaks a rule, as in a query string: 422.
        in_body = _4xx(broken, 400, 422) if endpoint.form is not None else _4xx(broken, 400)
        for leaf in leaves:
            injected = filled(document, leaves, leaf, raw)
            yield Case(f"body at {leaf.decode()}: {encoding}", base, headers=sent, body=injected, expect=in_body)
            if endpoint.form is not None:
                injected = filled(document, leaves, leaf, quoted(raw))
                where = f"form field {leaf.decode()} %-escaped: {encoding}"
                yield Case(where, base, headers=sent, body=injected, expect=in_body)
    if endpoint.body is not None:
        for leaf in leaves:
            for encoding, escape in ESCAPES.items():
                injected = filled(document, leaves, leaf, escape)
                expect = _4xx(True, 400, 422)
                yield Case(f"body at {leaf.decode()}: {encoding}", base, headers=sent, body=injected, expect=expect)
        for name, whole in BODIES.items():
            yield Case(name, base, headers=sent, body=whole, expect=frozenset({400}))
    if endpoint.form is not None:
        for name, raw in BROKEN.items():
            yield Case(f"body of {name}", base, headers=sent, body=raw, expect=frozenset({400}))
        others = tuple(h for h in sent if h[0] != b"content-type")
        for name, given in {"JSON": b"application/json", "text": b"text/plain", "nothing": None}.items():
            headers = others if given is None else (*others, (b"content-type", given))
            yield Case(f"form sent as {name}", base, headers=headers, body=body, expect=frozenset({415}))


def _4xx(broken: bool, *statuses: int) -> frozenset[int] | None:
    if not broken:
        return None
    return frozenset(statuses) if statuses else frozenset(range(400, 500))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_no_broken_encoding_gets_a_5xx(target: Target, endpoint: Endpoint) -> None:
    changes = endpoint.method not in ("GET", "HEAD", "OPTIONS")
    task_id = await target.task_id()
    aim = task_id
    wrong = []
    for case in cases(endpoint, task_id):
        case.path = case.path.replace(task_id.encode(), aim.encode())
        case.body = case.body.replace(task_id.encode(), aim.encode())
        answer = await call(target.app, endpoint.method, case.path, case.query, list(case.headers), case.body)
        if changes and answer.status < 400 and aim.encode() in case.path + case.body:
            aim = await target.task_id()  # the write may have finished or deleted its task: aim on at a fresh one
        if case.where == "as is" and endpoint.body is not None:
            # Each injection changes one thing in a body that is accepted as it is, so the decoders do see it.
            assert answer.status < 400, f"{endpoint} as is: {answer.status} {answer.body[:300]!r}"
        if case.where == "as is" and endpoint.form is not None:
            # A form that is taken (its fields need not sign anyone in): the decoders see every injection.
            assert answer.status not in (400, 415, 422), f"{endpoint} as is: {answer.status} {answer.body[:300]!r}"
        described = None  # whether an error says what it is: a problem document, or a page
        if answer.status >= 400:
            described = page_of(answer) if endpoint.page else problem_of(answer)
        allowed = answer.status < 500 if case.expect is None or not endpoint.ours else answer.status in case.expect
        if not allowed or (described is False and endpoint.ours):
            wrong.append(f"{case.where}: {answer.status} {answer.content_type.decode()} {answer.body[:200]!r}")
    assert not wrong, f"{endpoint}:\n" + "\n".join(wrong)


def problem_of(answer: Answer) -> bool:
    return (
        answer.content_type.startswith(b"application/problem+json")
        and msgspec.json.decode(answer.body).get("status") == answer.status
    )


def page_of(answer: Answer) -> bool:
    """An HTML page that names its status (the error page's title is the status's phrase)."""
    title = HTTPStatus(answer.status).phrase.capitalize().encode()
    return answer.content_type == b"text/html; charset=utf-8" and (
        b"<title>" + title in answer.body or b'role="alert"' in answer.body  # the sign-in form, with its error
    )


def test_every_route_is_in_the_matrix() -> None:
    """The matrix walks the app's routes: the task, event, health, schema and page routes, the bodies and the forms."""
    names = {str(e) for e in ENDPOINTS}
    assert {"POST /tasks", "PATCH /tasks/{task_id}", "GET /events/stream", "GET /health"} <= names
    assert {str(e) for e in ENDPOINTS if e.body is not None} >= {"POST /tasks", "PATCH /tasks/{task_id}"}
    pages = {str(e) for e in ENDPOINTS if e.page and e.ours}
    assert {"GET /ui", "GET /ui/tasks/{task_id}", "GET /ui/events", "POST /ui/sign-in"} <= pages
    assert not any(e.page for e in ENDPOINTS if e.template.startswith(("/tasks", "/events", "/health", "/schema")))
    assert {str(e) for e in ENDPOINTS if e.form is not None} == {"POST /ui/sign-in", "POST /ui/sign-out"}
