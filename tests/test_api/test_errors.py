"""Errors are problem+json with the right code, and no input gets a 5xx."""

from __future__ import annotations

import json

import pytest
from litestar.testing import AsyncTestClient

from tasktrail.http.wellformed import WHOLE_NUMBER

pytestmark = pytest.mark.anyio

DEEP = "[" * 100_000 + "]" * 100_000
JSON = {"Content-Type": "application/json"}


def problem(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["type"]
    assert body["detail"]
    return body


async def test_malformed_json_is_400(shared_client: AsyncTestClient) -> None:
    problem(await shared_client.post("/tasks/", content=b'{"task_type": ', headers=JSON), 400)
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    problem(await shared_client.patch(f"/tasks/{task['task_id']}", content=b"{nope}", headers=JSON), 400)
    for blank in (b" ", b"\n", b"\t\r\n  "):  # sent, and not JSON (no body at all is a 422: see test_content_type)
        problem(await shared_client.post("/tasks/", content=blank, headers=JSON), 400)
        problem(await shared_client.patch(f"/tasks/{task['task_id']}", content=blank, headers=JSON), 400)
        problem(await shared_client.post("/tasks/batch", content=blank, headers=JSON), 400)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "task_type"),
        ({"task_type": ""}, "task_type"),
        ({"task_type": 5}, "task_type"),
        ({"task_type": "x" * 201}, "task_type"),
        ({"task_type": "a\u0000b"}, "task_type"),
        ({"task_type": "x", "params": [1, 2]}, "params"),
        ({"task_type": "x", "params": "text"}, "params"),
        ({"task_type": "x", "params": {"k": "nul\u0000"}}, "params"),
        ({"task_type": "x", "params": {"k\u0000": 1}}, "params"),
        ({"task_type": "x", "params": {"big": "x" * 70_000}}, "params"),
        ({"task_type": "x", "params": {"n": 1e308, "deep": json.loads("[" * 40 + "]" * 40)}}, "params"),
        ([], "body"),
        ("task", "body"),
    ],
)
async def test_create_names_the_offending_field(shared_client: AsyncTestClient, body: object, field: str) -> None:
    errors = problem(await shared_client.post("/tasks/", json=body), 422)["errors"]
    assert errors[0]["field"] == field
    assert errors[0]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "done"}, "status"),
        ({"status": 1}, "status"),
        ({"progress": "50"}, "progress"),
        ({"progress": -1}, "progress"),
        ({"progress": 100.5}, "progress"),
        ({"progress": True}, "progress"),
        ({"result": [1]}, "result"),
        ({"result": {"x": "\u0000"}}, "result"),
        ({"error": 7}, "error"),
        ({"error": "bad\u0000"}, "error"),
    ],
)
async def test_update_names_the_offending_field(shared_client: AsyncTestClient, body: object, field: str) -> None:
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    errors = problem(await shared_client.patch(f"/tasks/{task['task_id']}", json=body), 422)["errors"]
    assert errors[0]["field"] == field


async def test_every_offending_field_is_named_not_only_the_first(shared_client: AsyncTestClient) -> None:
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    body = {"progress": 500, "status": "bogus", "error": 5, "result": {"ok": True}}
    refused = problem(await shared_client.patch(f"/tasks/{task['task_id']}", json=body), 422)
    assert [e["field"] for e in refused["errors"]] == ["progress", "status", "error"]
    assert "and 2 more" in refused["detail"]
    items = [{"task_type": ""}, {"task_type": "fine"}, {}, {"task_type": "x", "params": 5}]
    refused = problem(await shared_client.post("/tasks/batch", json={"tasks": items}), 422)
    assert [e["field"] for e in refused["errors"]] == ["tasks[0].task_type", "tasks[2].task_type", "tasks[3].params"]
    updates = [{"task_id": task["task_id"], "progress": 500}, {"task_id": "nope", "progress": 1}]
    refused = problem(await shared_client.patch("/tasks/batch", json={"updates": updates}), 422)
    assert [e["field"] for e in refused["errors"]] == ["updates[0].progress", "updates[1].task_id"]
    assert (await shared_client.get(f"/tasks/{task['task_id']}")).json()["version"] == 1  # nothing written


async def test_huge_numbers_are_422(shared_client: AsyncTestClient) -> None:
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    for raw in (b'{"progress": 1e308}', b'{"progress": 1e400}', b'{"progress": -1e308}'):
        problem(await shared_client.patch(f"/tasks/{task['task_id']}", content=raw, headers=JSON), 422)
    raw = b'{"task_type": "x", "params": {"n": 1e400}}'
    problem(await shared_client.post("/tasks/", content=raw, headers=JSON), 422)
    # An integer of more digits than Python reads (4,300) is JSON too: 422 wherever it is, naming where.
    long = b"9" * 4301
    refused = problem(
        await shared_client.patch(f"/tasks/{task['task_id']}", content=b'{"progress": ' + long + b"}", headers=JSON),
        422,
    )
    assert refused["errors"][0]["field"] == "progress"
    for raw in (
        b'{"task_type": "x", "params": {"n": [' + long + b"]}}",
        b'{"tasks": [{"task_type": "x", "params": {"n": ' + long + b"}}]}",
    ):
        path = "/tasks/" if raw.startswith(b'{"task_type"') else "/tasks/batch"
        refused = problem(await shared_client.post(path, content=raw, headers=JSON), 422)
        # Down to the mapping, not msgspec's `[...]` for whatever key it holds.
        assert refused["errors"][0]["field"] in ("params", "tasks[0].params"), refused
    raw = b'{"tasks": [{"task_type": "x"}, {"task_type": "x", "params": {"n": 1e400}}]}'
    refused = problem(await shared_client.post("/tasks/batch", content=raw, headers=JSON), 422)
    assert [e["field"] for e in refused["errors"]] == ["tasks[1].params"]
    assert (await shared_client.get(f"/tasks/{task['task_id']}")).json()["version"] == 1


async def test_bodies_over_one_mebibyte_are_413(shared_client: AsyncTestClient) -> None:
    big = b'{"task_type": "x", "params": {"k": "' + b"a" * (1024 * 1024) + b'"}}'
    problem(await shared_client.post("/tasks/", content=big, headers=JSON), 413)
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    problem(await shared_client.patch(f"/tasks/{task['task_id']}", content=big, headers=JSON), 413)


@pytest.mark.parametrize(
    "query",
    [
        "status=unknown",
        "limit=-1",
        "limit=0",
        "limit=1001",
        "limit=1e308",
        "limit=1e2",
        "limit=5.0",
        "limit=07",
        "limit=+5",
        "limit=",
        "limit=abc",
        "skip=-5",
        "skip=99999999999999999999999",
        "cursor=%%%",
        "cursor=bm90LWEtY3Vyc29y",
        "task_type=%00",
        "task_type=" + "x" * 300,
    ],
)
async def test_bad_list_filters_are_422(shared_client: AsyncTestClient, query: str) -> None:
    body = problem(await shared_client.get(f"/tasks/?{query}"), 422)
    assert body["errors"]
    assert body["errors"][0]["field"] == query.split("=")[0]


@pytest.mark.parametrize("query", ["days=-1", "days=abc", "days=1e308", "days=99999999999999", "days=1e1", "days=3.0"])
async def test_bad_cleanup_days_are_422(shared_client: AsyncTestClient, query: str) -> None:
    problem(await shared_client.post(f"/tasks/cleanup?{query}"), 422)


@pytest.mark.parametrize(("query", "field"), [("Days=0", "Days"), ("days=0&task_type=tmp", "task_type"), ("x", "x")])
async def test_cleanup_refuses_what_it_would_ignore(shared_client: AsyncTestClient, query: str, field: str) -> None:
    """Audit: ?Days=0 ran with 30 days, and ?task_type=tmp deleted the finished tasks of every type."""
    assert problem(await shared_client.post(f"/tasks/cleanup?{query}"), 422)["errors"][0]["field"] == field


async def test_an_integer_parameter_is_written_in_digits_on_every_route(shared_client: AsyncTestClient) -> None:
    """The query parser would read 1e3 as 1000 and 5.0 as 5; an integer parameter must be written as one."""
    task_id = (await shared_client.post("/tasks/", json={"task_type": "n"})).json()["task_id"]
    for path in ("/events?limit=", f"/tasks/{task_id}?version=", f"/tasks/{task_id}/history?after_version="):
        for spelling in ("1e0", "1.0", "01", "0x1", "%31e0", "-0"):
            body = problem(await shared_client.get(path + spelling), 422)
            assert body["errors"][0]["field"] == path.rsplit("?", 1)[1].rstrip("=")
        assert (await shared_client.get(path + "1")).status_code == 200
    # Audit: every one that is not, as for a body's fields (it named the first only).
    body = problem(await shared_client.get("/tasks/?skip=x&limit=y"), 422)
    assert [e["field"] for e in body["errors"]] == ["skip", "limit"]
    assert body["detail"] == f"skip: {WHOLE_NUMBER}; limit: {WHOLE_NUMBER}"
    # And together with the route's other faults (audit: ?status=x&limit=1e3 named limit only).
    for query in ("status=x&limit=1e3", "limit=5.0&status=x", "status=x&limit=%2B5&skip=-1"):
        body = problem(await shared_client.get(f"/tasks/?{query}"), 422)
        faults = {e["field"]: e["message"] for e in body["errors"]}
        assert faults.get("limit") == WHOLE_NUMBER, (query, body)
        assert "Invalid enum value 'x'" in faults["status"], (query, body)
    body = problem(await shared_client.get(f"/tasks/{task_id}/history?after_version=1.0&limit=0"), 422)
    assert [e["field"] for e in body["errors"]] == ["after_version", "limit"], body


HOSTILE_BODIES = [
    b"",
    b"null",
    b"\x00",
    b"\xff\xfe",
    b'{"task_type": "\\ud800"}',
    b'{"task_type": "x", "params": ' + DEEP.encode() + b"}",
    DEEP.encode(),
    b'{"task_type": "x", "params": {"n": 123456789012345678901234567890}}',
    b'{"task_type": "x", "params": {"a": -0.0, "b": 1e-400}}',
    b'{"task_type": ["x"]}',
    b'{"task_type": {"$gt": ""}}',
    b'{"task_type": "x\'; DROP TABLE events; --"}',
    b'{"status": "running", "progress": NaN}',
    b'{"progress": Infinity}',
    b'{"result": {"\\u0000": 1}}',
    b"[" * 50 + b"]" * 50,
]


@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=range(len(HOSTILE_BODIES)))
async def test_no_hostile_body_gets_a_5xx(shared_client: AsyncTestClient, body: bytes) -> None:
    task = (await shared_client.post("/tasks/", json={"task_type": "x"})).json()
    for response in (
        await shared_client.post("/tasks/", content=body, headers=JSON),
        await shared_client.patch(f"/tasks/{task['task_id']}", content=body, headers=JSON),
    ):
        assert 200 <= response.status_code < 500, (response.status_code, response.text)
        if response.status_code >= 400:
            problem(response, response.status_code)
    assert (await shared_client.get(f"/tasks/{task['task_id']}")).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/tasks/%00",
        "/tasks/..%2F..%2Fetc%2Fpasswd",
        "/tasks/00000000-0000-0000-0000-000000000000",
        "/tasks/?status=%00",
        "/tasks/?limit=%ff",
        "/tasks/stats/summary?task_type=%00",
        "/nowhere",
    ],
)
async def test_no_hostile_path_gets_a_5xx(shared_client: AsyncTestClient, path: str) -> None:
    response = await shared_client.get(path)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    problem(response, response.status_code)


async def test_wrong_method_is_a_problem(shared_client: AsyncTestClient) -> None:
    problem(await shared_client.put("/tasks/"), 405)


async def test_a_negative_zero_is_answered_as_stored_zero(shared_client: AsyncTestClient) -> None:
    """PostgreSQL's JSON has no -0.0: the answer to a write shows the 0.0 that every later read shows."""
    params = {"a": -0.0, "b": [-0.0, {"c": -0.0}], "d": -0.5}
    created = await shared_client.post(
        "/tasks/", content=json.dumps({"task_type": "z", "params": params}), headers=JSON
    )
    task_id = created.json()["task_id"]
    await shared_client.patch(f"/tasks/{task_id}", json={"progress": 50})
    changed = await shared_client.patch(
        f"/tasks/{task_id}", content=b'{"progress": -0.0, "result": {"r": [-0.0]}}', headers=JSON
    )
    read = await shared_client.get(f"/tasks/{task_id}")
    for answer in (created, changed, read):
        assert b"-0.0" not in answer.content, answer.text
    assert read.json()["params"] == created.json()["params"] == {"a": 0.0, "b": [0.0, {"c": 0.0}], "d": -0.5}
    assert (changed.json()["progress"], changed.json()["result"]) == (read.json()["progress"], read.json()["result"])
    batch = await shared_client.post(
        "/tasks/batch", content=b'{"tasks": [{"task_type": "z", "params": {"n": -0.0}}]}', headers=JSON
    )
    assert batch.json()["tasks"][0]["params"] == {"n": 0.0}
    assert b"-0.0" not in batch.content


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/tasks/", b'{"zzz": 1} x'),  # a field refused, then not JSON: 400 all the same
        ("POST", "/tasks/", b'{"task_type": 1,'),  # cut off
        ("PATCH", "/tasks/00000000-0000-4000-8000-000000000000", b"[1] x"),
        ("POST", "/tasks/batch", b'{"task_type": "a"}{}'),  # two documents
        ("POST", "/tasks/batch", b'{"tasks": 1'),
        ("PATCH", "/tasks/batch", b'{"updates": [{"task_id": "x", "if_version": 0x10}]}'),  # 0x10 is not JSON
    ],
)
async def test_a_body_that_is_not_json_is_400_whatever_its_first_fields_break(
    shared_client: AsyncTestClient, method: str, path: str, body: bytes
) -> None:
    answer = await shared_client.request(method, path, content=body, headers=JSON)
    assert "not valid JSON" in problem(answer, 400)["detail"]


async def test_a_large_float_is_answered_as_stored_and_sending_it_again_changes_nothing(
    shared_client: AsyncTestClient,
) -> None:
    """PostgreSQL's JSON keeps 1e16 as 10000000000000000: a repeat of the write must find it unchanged."""
    body = b'{"task_type": "big", "params": {"bytes": 1e16, "more": [-1.5e300, 1.2345678901234567e20, 9.5e15, 1e-7]}}'
    created = await shared_client.post("/tasks/", content=body, headers=JSON)
    stored = {"bytes": 10**16, "more": [-15 * 10**299, 123456789012345670000, 9.5e15, 1e-7]}
    task_id = created.json()["task_id"]
    assert created.json()["params"] == stored
    assert b"1e16" not in created.content  # to Python 1e16 == 10**16: the answer must show what is stored
    read = await shared_client.get(f"/tasks/{task_id}")
    assert read.json()["params"] == stored
    report = b'{"status": "completed", "result": {"bytes": 1e16, "r": [2.5e20]}}'
    for _ in range(3):  # a worker that retries its final report: the same answer, nothing appended
        done = await shared_client.patch(f"/tasks/{task_id}", content=report, headers=JSON)
        assert done.status_code == 200, done.text
        assert (done.json()["version"], done.json()["result"]) == (2, {"bytes": 10**16, "r": [25 * 10**19]})
    items = b'{"updates": [{"task_id": "%s", "result": {"bytes": 1e16, "r": [2.5e20]}}]}' % task_id.encode()
    batch = await shared_client.patch("/tasks/batch", content=items, headers=JSON)
    assert batch.json()["results"][0]["status"] == 200
    assert batch.json()["results"][0]["task"]["version"] == 2
    assert len((await shared_client.get(f"/tasks/{task_id}/history")).json()["events"]) == 2
    # 1e308 is 5 bytes as sent and 309 digits stored: the size limit holds for what is stored.
    swollen = b'{"task_type": "big", "params": {"n": [%s]}}' % b", ".join([b"1e308"] * 1000)
    refused = problem(await shared_client.post("/tasks/", content=swollen, headers=JSON), 422)
    assert refused["errors"][0]["field"] == "params"
    assert "as stored" in refused["detail"]
    # And 1e-300 (6 bytes) is stored as 0.000…1, 302 characters: 9,000 of them are 2.7 MB, not 63 KB.
    tiny = b'{"task_type": "tiny", "params": {"n": [%s]}}' % b", ".join([b"1e-300"] * 9000)
    refused = problem(await shared_client.post("/tasks/", content=tiny, headers=JSON), 422)
    assert "as stored" in refused["detail"]
    kept = b'{"task_type": "tiny", "params": {"n": [%s], "m": 1.5e-7}}' % b", ".join([b"1e-300"] * 100)
    created = await shared_client.post("/tasks/", content=kept, headers=JSON)
    assert created.status_code == 201, created.text
    read = await shared_client.get(f"/tasks/{created.json()['task_id']}")
    assert read.json()["params"] == {"n": [1e-300] * 100, "m": 1.5e-7}


@pytest.mark.parametrize("path", ["/tasks/%2F", "/tasks/%2f/history", "/tasks%2Fstats%2Fsummary", "/ui/tasks/%2F"])
async def test_an_escaped_slash_in_a_path_segment_names_nothing(shared_client: AsyncTestClient, path: str) -> None:
    """The router matches the decoded path, where %2F is a separator: /tasks/%2F found the task list."""
    assert (await shared_client.get(path)).status_code == 404
    assert (await shared_client.post("/tasks%2Fcleanup")).status_code == 404
    for method in ("PATCH", "DELETE", "PUT"):  # /tasks/%2F is the list once decoded: no 405 for it
        assert (await shared_client.request(method, path)).status_code == 404, method


async def test_a_lone_surrogate_escape_is_named_not_called_a_truncated_body(shared_client: AsyncTestClient) -> None:
    for raw in (rb'{"task_type": "\ud800"}', rb'{"task_type": "x\uDBFFy"}'):
        refused = problem(await shared_client.post("/tasks/", content=raw, headers=JSON), 400)
        assert "low surrogate" in refused["detail"], refused
    cut = problem(await shared_client.post("/tasks/", content=b'{"task_type": "x', headers=JSON), 400)
    assert "truncated" in cut["detail"]


async def test_params_may_nest_32_levels_as_documented_and_no_deeper(shared_client: AsyncTestClient) -> None:
    """Finding: 32 nested objects were refused (the leaf value was counted as a level)."""

    def nested(levels: int) -> object:
        value: object = "leaf"
        for _ in range(levels):
            value = {"a": value}
        return value

    kept = await shared_client.post("/tasks/", json={"task_type": "deep", "params": nested(32)})
    assert kept.status_code == 201, kept.text
    assert kept.json()["params"] == nested(32)
    listed = await shared_client.post("/tasks/", json={"task_type": "deep", "params": {"l": [[nested(30)]]}})
    assert listed.status_code == 422  # arrays count as levels too: 1 + 2 + 30
    refused = problem(await shared_client.post("/tasks/", json={"task_type": "deep", "params": nested(33)}), 422)
    assert "deeper than 32 levels" in refused["detail"]


async def test_a_refused_pattern_is_said_in_words_never_as_the_regex(shared_client: AsyncTestClient) -> None:
    """Audit: ?cursor=x answered with a 500-character base64 regex, a NUL with '^[^\\\\x00]*$'."""
    nul_item = {"tasks": [{"task_type": "\u0000"}]}
    refusals = [
        (await shared_client.get("/tasks/?cursor=x"), "cursor", "not a list cursor"),
        (await shared_client.get("/events?after=x"), "after", "not a feed cursor"),
        (await shared_client.post("/tasks/", json={"task_type": "a\u0000"}), "task_type", "must not contain NUL"),
        (await shared_client.post("/tasks/batch", json=nul_item), "tasks[0].task_type", "NUL"),
    ]
    for response, field, said in refusals:
        error = problem(response, 422)["errors"][0]
        assert (error["field"], said in error["message"], "regex" in response.text) == (field, True, False), error
