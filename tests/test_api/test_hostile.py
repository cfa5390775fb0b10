"""Hostile requests beyond encodings (SPEC 8): repeated parameters and headers, oversized heads, lying lengths."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest
from litestar import Request, get
from litestar.params import FromQuery
from litestar.testing import AsyncTestClient

from tasktrail.http.app import create_app
from tasktrail.http.protocol import MAX_HEAD_BYTES
from tasktrail.http.tasks import connection
from tasktrail.http.wellformed import MAX_HEADER_BYTES, MAX_URL_BYTES
from tests.conftest import Server
from tests.prom import scrape
from tests.test_api.test_encodings import call
from tests.test_api.test_errors import problem

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "query",
    [
        "limit=5&limit=10",
        "status=running&status=failed",
        "status=&status=running",
        "task_type=a&task_type=a",
        "skip=0&cursor=aWQ6MTIz&cursor=aWQ6MTI0",
        "limit=5&%6cimit=10",  # the same name, one of them escaped
    ],
)
async def test_a_query_parameter_given_twice_is_422(shared_client: AsyncTestClient, query: str) -> None:
    errors = problem(await shared_client.get(f"/tasks/?{query}"), 422)["errors"]
    assert errors[0]["message"] == "given more than once; give it once"
    assert errors[0]["field"] in query


@pytest.mark.parametrize("status", ["null", "NULL", "None", "PENDING", "completed,failed"])
async def test_a_status_that_is_none_of_the_statuses_is_422_not_no_filter(
    shared_client: AsyncTestClient, status: str
) -> None:
    errors = problem(await shared_client.get(f"/tasks/?status={status}"), 422)["errors"]
    assert errors[0]["field"] == "status"
    assert (await shared_client.get("/tasks/?status=")).status_code == 200  # empty: any status, as in the seed


async def test_a_parameter_no_route_reads_may_repeat_as_it_may_come_once(shared_client: AsyncTestClient) -> None:
    for path in ("/tasks/?_=1&_=2", "/tasks/stats/summary?foo=1&foo=2", "/events?x=1&x=1", "/ui?_=1&_=2"):
        assert (await shared_client.get(path)).status_code == 200, path


@get("/tags", opt={"public": True})
async def tags(tag: FromQuery[list[str]]) -> list[str]:
    return tag


async def test_a_parameter_that_takes_a_list_may_repeat(database_url: str) -> None:
    app = create_app(database_url)
    app.register(tags)
    async with AsyncTestClient(app=app) as client:
        assert (await client.get("/tags?tag=a&tag=b")).json() == ["a", "b"]
        problem(await client.get("/tags?tag=a&tag=%00"), 422)


async def test_a_raw_nul_in_the_url_is_refused_like_an_escaped_one(shared_client: AsyncTestClient) -> None:
    """uvicorn refuses a raw NUL in the request line; an ASGI server that passes one on gets the same answers."""
    assert (await call(shared_client.app, "GET", b"/tasks/a\x00b")).status == 400
    assert (await call(shared_client.app, "GET", b"/tasks/", b"task_type=a\x00b")).status == 422


@get("/stored", opt={"public": True})
async def stored(request: Request, text: FromQuery[str]) -> str:
    """A route that hands PostgreSQL what it was given, as a handler added later might."""
    async with connection(request) as conn:
        cur = await conn.execute("SELECT %s::text", (text.replace("~", "\x00"),))
        return str((await cur.fetchone())[0])  # type: ignore[index]


async def test_a_value_postgresql_cannot_hold_is_422_not_500(database_url: str) -> None:
    app = create_app(database_url)
    app.register(stored)
    async with AsyncTestClient(app=app) as client:
        assert (await client.get("/stored?text=ok")).text == "ok"
        assert "cannot be stored" in problem(await client.get("/stored?text=a~b"), 422)["detail"]


async def test_a_singleton_header_given_twice_with_different_values_is_400(shared_client: AsyncTestClient) -> None:
    app = shared_client.app
    for name in (b"idempotency-key", b"authorization", b"last-event-id", b"content-type", b"host", b"x-csrf-token"):
        headers = [(b"content-type", b"application/json"), (name, b"one"), (name, b"two")]
        answer = await call(app, "POST", b"/tasks/", headers=headers, body=b'{"task_type": "x"}')
        assert answer.status == 400, (name, answer)
        assert name.decode() in msgspec.json.decode(answer.body)["detail"].lower()
    same = [(b"content-type", b"application/json"), (b"idempotency-key", b"k1"), (b"idempotency-key", b"k1")]
    assert (await call(app, "POST", b"/tasks/", headers=same, body=b'{"task_type": "x"}')).status == 201


async def test_content_encoding_over_several_lines_is_one_list(shared_client: AsyncTestClient) -> None:
    """RFC 9110 5.3: two Content-Encoding lines are the list of both, so a coding in either is 415, whichever first.

    The body is plain JSON, as a proxy that did not decode it would pass it on: the first line alone let it in.
    """
    for lines in ((b"identity", b"gzip"), (b"", b"br"), (b"gzip", b"identity")):
        headers = [(b"content-type", b"application/json"), *((b"content-encoding", each) for each in lines)]
        answer = await call(shared_client.app, "POST", b"/tasks/", headers=headers, body=b'{"task_type": "coded"}')
        assert answer.status == 415, (lines, answer)
        assert "Content-Encoding" in msgspec.json.decode(answer.body)["detail"]
    assert (await shared_client.get("/tasks/", params={"task_type": "coded"})).json() == []


async def test_repeated_if_match_headers_are_one_list(shared_client: AsyncTestClient) -> None:
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    path = f"/tasks/{task['task_id']}".encode()
    headers = [(b"content-type", b"application/json"), (b"if-match", b'"7"'), (b"if-match", b'"1"')]
    assert (await call(shared_client.app, "PATCH", path, headers=headers, body=b'{"progress": 1}')).status == 200
    cached = [(b"if-none-match", b'"9"'), (b"if-none-match", b'"2"')]
    assert (await call(shared_client.app, "GET", path, headers=cached)).status == 304


async def test_oversized_urls_and_headers_are_refused(shared_client: AsyncTestClient) -> None:
    problem(await shared_client.get("/tasks/", params={"task_type": "x" * MAX_URL_BYTES}), 414)
    big = {f"x-filler-{n}": "y" * 1000 for n in range(MAX_HEADER_BYTES // 1000 + 1)}
    problem(await shared_client.get("/tasks/", headers=big), 431)
    assert (await shared_client.get("/tasks/", headers={"x-filler": "y" * 1000})).status_code == 200


@pytest.mark.parametrize("path", [b"/nothing", b"/tasks/a/b/c", b"/ui/nothing"])
async def test_an_address_no_route_matches_has_its_url_and_headers_refused_as_any_other(
    shared_client: AsyncTestClient, path: bytes
) -> None:
    """The checks ran for a matched route only: /nothing%00 or a 20 KB URL was a 404 (audit)."""
    kind = b"text/html" if path.startswith(b"/ui/") else b"application/problem+json"

    async def status(raw: bytes, query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> int:
        answer = await call(shared_client.app, "GET", raw, query, headers)
        assert answer.content_type.startswith(kind), (raw[:60], query[:60], answer)
        return answer.status

    long = b"a" * MAX_URL_BYTES
    filler = [(b"x-filler-%d" % n, b"y" * 1000) for n in range(MAX_HEADER_BYTES // 1000 + 1)]
    assert await status(path) == 404
    assert [await status(path + b"/" + long), await status(path, b"q=" + long)] == [414, 414]
    assert [await status(path + b"%00"), await status(path + b"/%ff"), await status(path, b"x=%ff")] == [400] * 3
    assert await status(path, headers=filler) == 431
    assert await status(path, headers=[(b"content-length", b"%d" % (2 << 20))]) == 413
    assert await status(path, b"a=1&a=2&limit=1e3") == 404  # a query's rules are a route's, and none matched


async def test_a_burst_of_streams_left_at_once_costs_the_pool_no_connection(shared_client: AsyncTestClient) -> None:
    """A client that leaves during a stream's first read used to cancel the query, and psycopg closed the connection."""
    pool = shared_client.app.state.pool
    before = pool.get_stats().get("returns_bad", 0)
    for _ in range(40):
        assert (await call(shared_client.app, "GET", b"/events/stream")).status == 200
    assert pool.get_stats().get("returns_bad", 0) == before
    assert (await shared_client.get("/tasks/?limit=1")).status_code == 200


def wait_for(condition: Callable[[], bool], failure: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def exchange(server: Server, request: bytes, chunk: int = 64 * 1024) -> bytes:
    """Send raw bytes (as far as the server lets us) and read until it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        try:
            for start in range(0, len(request), chunk):
                sock.sendall(request[start : start + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer is already on its way
        answer = b""
        while data := sock.recv(65536):
            answer += data
        return answer


def problem_of(answer: bytes, status: int) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert b"content-type: application/problem+json" in head.lower(), head
    document = msgspec.json.decode(body)
    assert document["status"] == status
    return document


def test_what_the_http_parser_refuses_is_problem_json_too(database_url: str, tmp_path: Path) -> None:
    env = os.environ | {"DATABASE_URL": database_url, "TASKTRAIL_READ_TIMEOUT": "1"}
    server = Server(env, log_dir=tmp_path)
    try:
        huge = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (64 * MAX_HEAD_BYTES) + b"\r\n\r\n"
        assert "larger than" in problem_of(exchange(server, huge), 431)["detail"]
        many = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * MAX_HEAD_BYTES + b"\r\n"
        problem_of(exchange(server, many), 431)
        # Small heads pipelined past the bound in one read, the last one cut off: not one large head (the
        # whole read was counted as the last head's: a 431, and none of the others answered).
        small = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        burst = small * (MAX_HEAD_BYTES // len(small) + 100)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(burst + b"GET /health HTTP/1.1\r\nHo")
            time.sleep(0.3)
            sock.sendall(b"st: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answers = b""
            while data := sock.recv(1 << 20):
                answers += data
        assert answers.count(b"HTTP/1.1 200 ") == burst.count(b"GET") + 1, answers[:300]
        for broken in (
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: a\x00b\r\n\r\n",
            b"GET /tasks/\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"POST /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            b"POST /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -2\r\n\r\n{}",
            b"POST /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        ):
            problem_of(exchange(server, broken), 400)
        # A URL past what httptools parses (65,535 bytes) is as long as any other too long: 414, not 400.
        # (Connection: close where the answer keeps the connection: else exchange waits out keep-alive's 5 s.)
        for length in (20_000, 66_000, 100_000):
            line = (
                b"GET /tasks/?task_type=" + b"a" * length + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            assert "URL is longer than" in problem_of(exchange(server, line), 414)["detail"], length
        # A method the server does not know (methods are case-sensitive): a 400 that says so (never a 5xx).
        for unknown in (b"FOO", b"get", b"BREW"):
            answer = exchange(server, unknown + b" /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert "does not know the request's method" in problem_of(answer, 400)["detail"]
        # A transfer coding this server does not decode would be read as if it were not there.
        task = b'11\r\n{"task_type":"a"}\r\n0\r\n\r\n'
        head = b"POST /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
        for codings in (b"gzip, chunked", b"deflate, chunked", b"gzip\r\nTransfer-Encoding: chunked"):
            refused = problem_of(exchange(server, head + b"Transfer-Encoding: " + codings + b"\r\n\r\n" + task), 400)
            assert "only transfer coding" in refused["detail"]
        assert exchange(server, head + b"Transfer-Encoding: chunked\r\n\r\n" + task).startswith(b"HTTP/1.1 201 ")
        # A head that never ends, and a body shorter than its Content-Length: 408 once the read timeout passes.
        assert (
            "did not arrive"
            in problem_of(exchange(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"), 408)["detail"]
        )
        lying = (
            b"POST /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
            b'{"task_type": "x"}'
        )
        assert "did not arrive" in problem_of(exchange(server, lying), 408)["detail"]
        # A dashboard form's body too (audit: read with no deadline; a client gone mid-body counted a 500).
        posted = b"POST /ui/sign-in HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
        posted += b"Content-Type: application/x-www-form-urlencoded\r\n\r\nkey=abc"
        assert exchange(server, posted).startswith(b"HTTP/1.1 408 ")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(posted.replace(b"sign-in", b"sign-out"))
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/tasks/stats/summary").json()["total"] == 1
            # A route that reads no body refuses one over 1 MiB all the same, sent in chunks too.
            doomed = client.post("/tasks/", json={"task_type": "doomed"}).json()["task_id"]
            head = f"DELETE /tasks/{doomed} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            head += "Transfer-Encoding: chunked\r\n\r\n"
            # 17 chunks of 64 KiB, one past 1 MiB (the rest unsent: the answer comes before it)
            over = b"%x\r\n%s\r\n" % (65536, b"x" * 65536) * 17
            for _ in range(30):  # the answer, never a reset (1 in 12 was, closing with the body still arriving)
                problem_of(exchange(server, head.encode() + over), 413)
            assert client.get(f"/tasks/{doomed}").status_code == 200
            small = b"%x\r\n%s\r\n0\r\n\r\n" % (1000, b"x" * 1000)
            assert exchange(server, head.encode() + small).startswith(b"HTTP/1.1 200 ")
            assert client.get(f"/tasks/{doomed}").status_code == 404
            assert client.get("/tasks/stats/summary").json()["total"] == 1
            # Each refusal is counted and logged as any request is (under "unmatched": no route was found),
            # the method as sent where the parser read one; a connection that sent nothing is no request.
            scraped = scrape(client)
            refused = {"route": "unmatched"}
            for status, times in [(431, 2), (400, 7), (414, 2)]:  # the longest URLs (past 65,535 bytes)
                assert scraped.total("tasktrail_http_requests_total", **refused, status=str(status)) == times, status
            assert scraped.value("tasktrail_http_requests_total", method="GET", **refused, status="431") == 2
            # The three unknown methods, and one request refused before its method was read.
            assert scraped.value("tasktrail_http_requests_total", method="other", **refused, status="400") == 4
            assert scraped.value("tasktrail_http_requests_total", method="POST", **refused, status="400") == 2
            assert scraped.total("tasktrail_http_requests_total", **refused, status="408") >= 1
            assert scraped.value("tasktrail_http_requests_total", method="POST", route="/ui/sign-in", status="408") == 1
            assert (
                scraped.value("tasktrail_http_requests_total", method="POST", route="/ui/sign-out", status="400") == 1
            )
            assert scraped.total("tasktrail_http_requests_total", status="500") == 0
        assert b"x-request-id: " in exchange(server, unknown + b" /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").lower()
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()
    assert "GET unmatched 431" in server.log()
    assert "other unmatched 400" in server.log()


def test_a_missing_repeated_or_unreadable_host_is_400_wherever_it_is_sent(database_url: str, tmp_path: Path) -> None:
    # The request's URL is made from Host: a port past 65535, or not digits, failed wherever the URL was
    # read (a list's Link header, a query's 422, the dashboard's redirect to sign in) with a 500.
    server = Server(os.environ | {"DATABASE_URL": database_url}, log_dir=tmp_path)
    try:
        for host in (b"localhost:65536", b"[::1]:65536", b"localhost:99999", b"::1", b"[::1]:x", b"localhost:abc"):
            for target in (b"/tasks/?limit=1", b"/events?limit=0", b"/ui", b"/nowhere"):
                for origin in (b"", b"Origin: http://example.com\r\n"):  # CORS's middleware runs first with one
                    head = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + origin
                    request = head + b"Connection: close\r\n\r\n"
                    assert "Host header" in problem_of(exchange(server, request), 400)["detail"], (host, target)
        for host in (b"localhost:65535", b"127.0.0.1", b"[::1]:8000", b"localhost"):
            request = b"GET /tasks/?limit=1 HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
            assert exchange(server, request).startswith(b"HTTP/1.1 200 "), host
        # RFC 9112 section 3.2: an HTTP/1.1 request has exactly one Host; HTTP/1.0 may have none.
        for head in (b"", b"Host: 127.0.0.1\r\nHost: 127.0.0.1\r\n", b"Host: a\r\nHost: b\r\n"):
            request = b"GET /tasks/?limit=1 HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n"
            assert "exactly one Host" in problem_of(exchange(server, request), 400)["detail"], head
        assert exchange(server, b"GET /tasks/?limit=1 HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()


def test_a_request_that_asks_to_upgrade_is_answered_as_http_1_1_with_its_body(
    database_url: str, tmp_path: Path
) -> None:
    # The parser took the bytes after such a head as the new protocol's and skipped the body: the app
    # got none (a PATCH from `curl --http2` was a 422, "body: required"), and the connection hung.
    server = Server(os.environ | {"DATABASE_URL": database_url}, log_dir=tmp_path)
    try:
        h2c = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        create = b"POST /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + h2c
        created = exchange(server, create + b'Content-Length: 22\r\n\r\n{"task_type": "h2c"}  ')
        assert created.startswith(b"HTTP/1.1 201 "), created[:300]
        task = msgspec.json.decode(created.partition(b"\r\n\r\n")[2])
        assert task["task_type"] == "h2c"
        path = f"/tasks/{task['task_id']}".encode()
        head = (
            b"PATCH "
            + path
            + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: upgrade\r\n"
        )
        then = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # the connection closes first: never read
        for upgrade, framing, body in (
            (b"websocket", b"Transfer-Encoding: chunked", b'6\r\n{"prog\r\n' + b'c\r\nress": 42.5}\r\n0\r\n\r\n'),
            (b"h2c", b"Content-Length: 17", b'{"progress": 50} '),
        ):
            answer = exchange(server, head + b"Upgrade: " + upgrade + b"\r\n" + framing + b"\r\n\r\n" + body + then)
            assert answer.count(b"HTTP/1.1 ") == 1, answer
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
            assert b"connection: close" in answer.lower()
        assert b'"progress":50.0' in exchange(
            server, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        empty = head + b"Upgrade: h2c\r\nContent-Length: 0\r\n\r\n"
        assert "body" in problem_of(exchange(server, empty), 422)["detail"]
        ws = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n" + then
        assert exchange(server, ws).count(b"HTTP/1.1 200 ") == 1
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()
    assert "Unsupported upgrade" not in server.log()


async def test_a_file_name_the_system_cannot_look_up_is_404_not_500(shared_client: AsyncTestClient) -> None:
    for path in (
        "/ui/static/" + "a" * 256,  # longer than a file name may be (ENAMETOOLONG)
        "/ui/static/vendor/" + "b" * 300,
        "/ui/static/dashboard.css/x",  # under a file, not a folder (ENOTDIR)
        "/ui/static/favicon.svg/..",
    ):
        for method in ("GET", "HEAD"):
            response = await shared_client.request(method, path)
            assert response.status_code == 404, (method, path, response.status_code)
    assert (await shared_client.get("/ui/static/dashboard.css")).status_code == 200


def test_an_answer_before_the_body_has_come_closes_the_connection_and_a_stream_hears_its_client_leave(
    database_url: str, tmp_path: Path
) -> None:
    server = Server(os.environ | {"DATABASE_URL": database_url}, log_dir=tmp_path)
    client = httpx.Client(base_url=server.url)

    def streams() -> float:
        return scrape(client).value("tasktrail_stream_clients")

    try:
        # Answered from the head alone (no route; over the body limit; a route that reads no body), with the
        # body still to come: the connection was kept, dropping what came with no deadline, so a byte now
        # and then held it for ever. Now the answer says it closes, and it does, whatever still arrives.
        json = b"Content-Type: application/json\r\n"
        for head, expected in (
            (b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n" + json + b"Content-Length: 1000\r\n", 404),
            (b"POST /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + json + b"Content-Length: 2000000\r\n", 413),
            (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n", 200),
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(head + b"\r\n{")
                answer = sock.recv(65536)
                assert answer.startswith(b"HTTP/1.1 %d " % expected), answer[:200]
                assert b"connection: close" in answer.lower(), answer[:400]
                sock.sendall(b" ")  # a byte more: it no longer keeps the connection
                while sock.recv(65536):  # the server closes it (after lingering), long before the timeout
                    pass

        # A stream with a request pipelined behind it, whose client leaves: uvicorn told only the newest
        # request, so the stream ran on until a ping failed (~45 s), then logged a traceback.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"GET /events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            wait_for(lambda: streams() == 1, "the stream did not open")
        wait_for(lambda: streams() == 0, "the stream did not hear its client leave")
    finally:
        client.close()
        server.stop()
    assert "Traceback" not in server.log(), server.log()
