"""Input limits through a real uvicorn server, where bodies arrive as a client sends them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from tasktrail.http.body import MAX_BODY_BYTES, MAX_JSON_BYTES
from tests.test_api.test_errors import JSON, problem


def body_of(size: int) -> bytes:
    """A JSON create body of exactly `size` bytes."""
    head, tail = b'{"task_type": "x", "params": {"k": "', b'"}}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def test_a_body_over_one_mebibyte_is_413_however_it_is_sent(live_server: str) -> None:
    too_big = body_of(MAX_BODY_BYTES + 1)
    with httpx.Client(base_url=live_server) as client:
        problem(client.post("/tasks/", content=too_big, headers=JSON), 413)  # with Content-Length

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(too_big), 64 * 1024):
                yield too_big[start : start + 64 * 1024]

        chunked = problem(client.post("/tasks/", content=chunks(), headers=JSON), 413)  # no length given up front
        assert chunked["detail"] == "the body is over 1 MiB"  # as with a length, not "Request Entity Too Large"
        task = client.post("/tasks/", json={"task_type": "x"}).json()
        problem(client.patch(f"/tasks/{task['task_id']}", content=too_big, headers=JSON), 413)
        # Routes that read no body refuse one over the limit all the same (before reading it).
        problem(client.post("/tasks/cleanup?days=100000", content=too_big), 413)
        problem(client.request("GET", "/tasks/stats/summary", content=too_big), 413)
        problem(client.request("DELETE", f"/tasks/{task['task_id']}", content=too_big), 413)
        assert client.get(f"/tasks/{task['task_id']}").status_code == 200
        # At the limit the body is read, and the params cap answers instead.
        errors = problem(client.post("/tasks/", content=body_of(MAX_BODY_BYTES), headers=JSON), 422)["errors"]
        assert errors[0]["field"] == "params"
        assert str(MAX_JSON_BYTES) in errors[0]["message"]
        assert client.get("/health").status_code == 200


def test_strict_types_and_nul_through_a_real_server(live_server: str) -> None:
    with httpx.Client(base_url=live_server) as client:
        task = client.post("/tasks/", json={"task_type": "x"}).json()
        assert problem(client.patch(f"/tasks/{task['task_id']}", json={"progress": "50"}), 422)
        assert problem(client.post("/tasks/", json={"task_type": "a\u0000b"}), 422)
        nul = b'{"task_type": "x", "params": {"k": "\\u0000"}}'
        assert problem(client.post("/tasks/", content=nul, headers=JSON), 422)
        assert client.get(f"/tasks/{task['task_id']}").json()["progress"] == 0.0
