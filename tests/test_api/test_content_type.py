"""JSON routes take JSON only: a body sent as anything else is 415, which a cross-site form cannot get past."""

from __future__ import annotations

import gzip

import msgspec
import pytest
from litestar import post
from litestar.params import JSONBody
from litestar.testing import AsyncTestClient

from tasktrail.http.app import create_app
from tests.test_api.test_errors import problem

pytestmark = pytest.mark.anyio

BODY = b'{"task_type": "typed"}'


async def total(client: AsyncTestClient) -> int:
    return (await client.get("/tasks/stats/summary")).json()["total"]


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",  # what an HTML form with enctype=text/plain sends, with no CORS preflight
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/json",
        "application/jsonx",
        "application/json-seq",
        "application/+json",
        "application/json; charset=latin-1",
        "application/json; charset=utf-16",
        'application/json; charset="us-ascii"',
        "",
    ],
)
async def test_a_body_that_is_not_sent_as_json_is_415(client: AsyncTestClient, content_type: str) -> None:
    task = (await client.post("/tasks/", json={"task_type": "x"})).json()
    headers = {"Content-Type": content_type}
    detail = problem(await client.post("/tasks/", content=BODY, headers=headers), 415)["detail"]
    assert "application/json" in detail or "UTF-8" in detail
    problem(await client.patch(f"/tasks/{task['task_id']}", content=b'{"progress": 5}', headers=headers), 415)
    assert await total(client) == 1, "a refused create made a task"
    assert (await client.get(f"/tasks/{task['task_id']}")).json()["progress"] == 0.0


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate, gzip"])
async def test_a_body_in_a_content_coding_is_415_not_malformed(client: AsyncTestClient, coding: str) -> None:
    """RFC 9110 15.5.16: the coding is what the service does not take, not the JSON (which would be 400)."""
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    detail = problem(await client.post("/tasks/", content=gzip.compress(BODY), headers=headers), 415)["detail"]
    assert "Content-Encoding" in detail
    identity = {"Content-Type": "application/json", "Content-Encoding": "identity"}
    assert (await client.post("/tasks/", content=BODY, headers=identity)).status_code == 201
    assert await total(client) == 1


async def test_a_body_without_a_type_is_415_and_no_body_is_422_whatever_the_type(client: AsyncTestClient) -> None:
    # httpx adds no Content-Type for raw content.
    detail = problem(await client.post("/tasks/", content=BODY), 415)["detail"]
    assert "Content-Type: application/json" in detail
    # No body, with no type or any type (`curl -X PATCH -d ''` sends an empty form): the body is what is missing.
    required = [{"field": "body", "message": "required"}]
    assert problem(await client.post("/tasks/", content=b""), 422)["errors"] == required
    task = (await client.post("/tasks/", json={"task_type": "x"})).json()
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        headers = {"Content-Type": content_type}
        assert problem(await client.post("/tasks/", content=b"", headers=headers), 422)["errors"] == required
        empty = await client.patch(f"/tasks/{task['task_id']}", content=b"", headers=headers)
        assert problem(empty, 422)["errors"] == required
    assert await total(client) == 1


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON; Charset=UTF-8",
        'application/json;charset="utf-8"',
        "application/json; charset=utf8",
        "application/merge-patch+json",  # RFC 7396: what a PATCH body is
        "application/vnd.tasktrail+json; charset=utf-8",
    ],
)
async def test_json_in_any_spelling_is_taken(client: AsyncTestClient, content_type: str) -> None:
    headers = {"Content-Type": content_type}
    created = await client.post("/tasks/", content=BODY, headers=headers)
    assert created.status_code == 201, created.text
    changed = await client.patch(f"/tasks/{created.json()['task_id']}", content=b'{"progress": 5}', headers=headers)
    assert changed.status_code == 200, changed.text


async def test_routes_without_a_body_ignore_the_content_type(client: AsyncTestClient) -> None:
    task = (await client.post("/tasks/", json={"task_type": "x"})).json()
    plain = {"Content-Type": "text/plain"}
    assert (await client.get(f"/tasks/{task['task_id']}", headers=plain)).status_code == 200
    assert (await client.post("/tasks/cleanup?days=30", headers=plain)).json() == {"deleted": 0}
    assert (await client.delete(f"/tasks/{task['task_id']}", headers=plain)).status_code == 200


async def test_cors_preflight_still_allows_json_and_the_415_is_readable_cross_origin(client: AsyncTestClient) -> None:
    origin = {"Origin": "https://app.example"}
    preflight = await client.options(
        "/tasks/",
        headers=origin | {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )
    assert preflight.status_code == 204
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    assert "POST" in preflight.headers["access-control-allow-methods"]
    # Every request header the API reads may come from another origin: a stream resumed by
    # Last-Event-ID, a write named by X-Request-ID, a conditional or idempotent write.
    for header in ("last-event-id", "x-request-id", "if-match", "idempotency-key", "authorization"):
        asked = await client.options(
            "/events/stream",
            headers=origin | {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": header},
        )
        assert asked.status_code == 204, header
        assert header in asked.headers["access-control-allow-headers"].lower(), header
    created = await client.post("/tasks/", content=BODY, headers=origin | {"Content-Type": "application/json"})
    assert created.status_code == 201
    refused = await client.post("/tasks/", content=BODY, headers=origin | {"Content-Type": "text/plain"})
    problem(refused, 415)
    assert refused.headers["access-control-allow-origin"] == "*"


async def test_a_refused_cors_preflight_is_a_problem_document(client: AsyncTestClient) -> None:
    for asked, what in (
        ({"Access-Control-Request-Method": "PUT"}, "method"),
        ({"Access-Control-Request-Method": "PATCH", "Access-Control-Request-Headers": "x-custom"}, "headers"),
    ):
        refused = await client.options("/tasks/batch", headers={"Origin": "https://app.example"} | asked)
        assert problem(refused, 400)["detail"].startswith(
            f"CORS preflight refused: this service does not allow the {what}"
        )


async def test_the_schema_documents_415_on_every_route_with_a_body(client: AsyncTestClient) -> None:
    doc = (await client.get("/schema/openapi.json")).json()
    with_body = set()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                with_body.add((method, path))
                assert "415" in operation["responses"], (method, path)
            else:
                assert "415" not in operation["responses"], (method, path)
    assert {("post", "/tasks"), ("patch", "/tasks/{task_id}")} <= with_body


class Note(msgspec.Struct):
    text: str


@post("/notes", status_code=200, opt={"public": True})
async def add_note(data: JSONBody[Note]) -> dict[str, str]:
    return {"text": data.text}


async def test_a_route_added_later_takes_json_only_without_code_of_its_own(database_url: str) -> None:
    """A JSON route registered after the app is built gets the Content-Type and UTF-8 checks, and a documented 415."""
    app = create_app(database_url)
    app.register(add_note)
    async with AsyncTestClient(app=app) as client:
        assert (await client.post("/notes", json={"text": "hi"})).json() == {"text": "hi"}
        problem(await client.post("/notes", content=b'{"text": "hi"}', headers={"Content-Type": "text/plain"}), 415)
        problem(
            await client.post("/notes", content=b'{"text": "\xff"}', headers={"Content-Type": "application/json"}), 400
        )
        doc = (await client.get("/schema/openapi.json")).json()
        assert "415" in doc["paths"]["/notes"]["post"]["responses"]
