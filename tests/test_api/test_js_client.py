"""clients/js/tasktrail.mjs by node against a real server: the seed's calls, and watchTask by SSE and by polling."""

from __future__ import annotations

from tests.conftest import run_node


def test_the_javascript_client_watches_tasks_by_sse_and_by_polling(live_server: str) -> None:
    assert "watch client: ok" in run_node("watch_client.mjs", live_server)
