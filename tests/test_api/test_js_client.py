"""clients/js/tasktrail.mjs by node against a real server: the seed's calls, and watchTask by SSE and by polling."""

from __future__ import annotations

import shutil
import subprocess

from tests.conftest import ROOT


def test_the_javascript_client_watches_tasks_by_sse_and_by_polling(live_server: str) -> None:
    assert shutil.which("node"), "node is needed for this test (the client is JavaScript)"
    done = subprocess.run(
        ["node", str(ROOT / "tests/js/watch_client.mjs"), live_server],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "watch client: ok" in done.stdout
