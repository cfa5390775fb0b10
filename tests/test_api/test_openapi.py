"""The OpenAPI schema tells the truth: each finding of the schemathesis run, kept as a plain test."""

from __future__ import annotations

import re

import pytest
from litestar.testing import AsyncTestClient

from tests.test_api.test_errors import JSON, problem

pytestmark = pytest.mark.anyio


async def openapi(client: AsyncTestClient) -> dict:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    return response.json()


async def test_request_bodies_are_declared_and_still_strict(shared_client: AsyncTestClient) -> None:
    doc = await openapi(shared_client)
    for path, method, name in (("/tasks", "post", "CreateTask"), ("/tasks/{task_id}", "patch", "ConditionalUpdate")):
        body = doc["paths"][path][method]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    assert problem(await shared_client.patch(f"/tasks/{task['task_id']}", json={"progress": "50"}), 422)
    assert problem(await shared_client.patch(f"/tasks/{task['task_id']}", content=b"{nope", headers=JSON), 400)
    errors = problem(await shared_client.post("/tasks/", content=b""), 422)["errors"]
    assert errors == [{"field": "body", "message": "required"}]


async def test_every_error_is_declared_as_a_problem(shared_client: AsyncTestClient) -> None:
    doc = await openapi(shared_client)
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    content = response["content"]
                    assert list(content) == ["application/problem+json"], (path, method, status)
                    assert content["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}


async def test_progress_below_zero_is_outside_the_schema(shared_client: AsyncTestClient) -> None:
    """Finding: Litestar dropped the bound `ge=0.0` (falsy), so the schema allowed the -1 that answers 422."""
    doc = await openapi(shared_client)
    assert doc["components"]["schemas"]["ConditionalUpdate"]["properties"]["progress"]["minimum"] == 0.0


async def test_if_version_is_an_integer_in_the_schema(shared_client: AsyncTestClient) -> None:
    schemas = (await openapi(shared_client))["components"]["schemas"]
    for name in ("ConditionalUpdate", "TaskChange"):
        assert schemas[name]["properties"]["if_version"] == {"oneOf": [{"type": "integer"}, {"type": "null"}]}, name


async def test_nul_anywhere_in_params_is_outside_the_schema(shared_client: AsyncTestClient) -> None:
    """Finding: params was any object, but a NUL in a nested key or string is 422 (jsonb cannot hold it)."""
    doc = await openapi(shared_client)
    schemas = doc["components"]["schemas"]
    assert schemas["CreateTask"]["properties"]["params"]["oneOf"][0] == {"$ref": "#/components/schemas/JsonObject"}
    assert schemas["JsonObject"]["propertyNames"]["pattern"] == "^[^\\x00]*$"
    assert {"type": "string", "pattern": "^[^\\x00]*$"} in schemas["JsonValue"]["oneOf"]
    nested = {"task_type": "x", "params": {"a": [{"b": "c\u0000"}]}}
    assert problem(await shared_client.post("/tasks/", json=nested), 422)["errors"][0]["field"] == "params"


async def test_cursors_given_out_match_the_documented_pattern(shared_client: AsyncTestClient) -> None:
    """Finding: cursor was any string, but one the service did not give out is 422."""
    doc = await openapi(shared_client)
    (cursor,) = [p for p in doc["paths"]["/tasks"]["get"]["parameters"] if p["name"] == "cursor"]
    pattern = re.compile(cursor["schema"]["pattern"])
    for _ in range(3):
        await shared_client.post("/tasks/", json={"task_type": "paged"})
    url = "/tasks/?task_type=paged&limit=1"
    for _ in range(2):  # the third page is the last: no Link
        response = await shared_client.get(url)
        assert response.status_code == 200
        url = response.links["next"]["url"]
        given = re.search(r"cursor=([^&]+)", url)
        assert given is not None
        assert pattern.fullmatch(given[1])
    assert not pattern.fullmatch("bm90LWEtY3Vyc29y")  # base64 of "not-a-cursor"
    problem(await shared_client.get("/tasks/?cursor=bm90LWEtY3Vyc29y"), 422)


async def test_options_lists_every_method_of_the_path(shared_client: AsyncTestClient) -> None:
    """Finding: Litestar 2 answered OPTIONS with the first handler's methods only (GET, not PATCH or DELETE)."""
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    response = await shared_client.options(f"/tasks/{task['task_id']}")
    assert response.status_code == 204
    assert response.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH"
    assert (await shared_client.options("/tasks/")).headers["allow"] == "GET, HEAD, OPTIONS, POST"


async def test_reusing_an_idempotency_key_is_a_documented_422(shared_client: AsyncTestClient) -> None:
    """Found by the fuzzer as a "valid request rejected": it is the documented answer, so the fuzz test varies keys."""
    doc = await openapi(shared_client)
    assert "422" in doc["paths"]["/tasks"]["post"]["responses"]
    headers = {"Idempotency-Key": "fuzz-reused"}
    assert (await shared_client.post("/tasks/", json={"task_type": "a"}, headers=headers)).status_code == 201
    problem(await shared_client.post("/tasks/", json={"task_type": "b"}, headers=headers), 422)


async def test_the_batch_routes_are_documented_with_their_bodies_and_problems(shared_client: AsyncTestClient) -> None:
    doc = await openapi(shared_client)
    schemas = doc["components"]["schemas"]
    batch = doc["paths"]["/tasks/batch"]
    for method, name, answer in (("post", "NewTasks", "201"), ("patch", "TaskChanges", "200")):
        operation = batch[method]
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{name}"
        }
        assert {answer, "400", "413", "422"} <= operation["responses"].keys()
    assert schemas["NewTasks"]["properties"]["tasks"] | {"items": None} == {
        "type": "array", "items": None, "minItems": 1, "maxItems": 1000
    }  # fmt: skip
    assert schemas["CreatedTasks"]["properties"]["tasks"]["items"] == {"$ref": "#/components/schemas/Task"}
    # An item is an update that changes something, or a delete that changes nothing: the rest is a 422.
    item = schemas["TaskChange"]
    assert [kind["title"] for kind in item["oneOf"]] == ["update", "delete"]
    assert item["properties"]["if_version"]["oneOf"][0] == {"type": "integer"}
    result = schemas["ItemResult"]["properties"]
    assert result["problem"]["oneOf"][0] == {"$ref": "#/components/schemas/Problem"}
    assert result["task"]["oneOf"][0] == {"$ref": "#/components/schemas/Task"}
    (task,) = (await shared_client.post("/tasks/batch", json={"tasks": [{"task_type": "x"}]})).json()["tasks"]
    # What the schema excludes the server refuses; what it allows, it takes.
    nothing = {"updates": [{"task_id": task["task_id"], "status": None}]}
    assert problem(await shared_client.patch("/tasks/batch", json=nothing), 422)["errors"][0]["field"] == "updates[0]"
    whole = {"updates": [{"task_id": task["task_id"], "progress": 1, "if_version": 1.0}]}
    assert (await shared_client.patch("/tasks/batch", json=whole)).json()["results"][0]["status"] == 200
