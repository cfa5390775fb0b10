"""The seed's own clients, unchanged, against a real server: its JavaScript class and its curl examples."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import run_node


def test_the_seed_javascript_client_works_unchanged(live_server: str) -> None:
    assert "seed client: ok" in run_node("seed_client.mjs", live_server, timeout=60)


def curl(*args: str) -> dict:
    done = subprocess.run(["curl", "-sS", "--fail-with-body", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_the_seed_curl_examples_work_unchanged(live_server: str) -> None:
    base = live_server  # the seed says http://localhost:8000
    task = curl(
        "-X", "POST", f"{base}/tasks/",
        "-H", "Content-Type: application/json",
        "-d", '{\n    "task_type": "document_process",\n    "params": {"file_path": "/tmp/test.pdf"}\n  }',
    )  # fmt: skip
    assert (task["task_type"], task["status"], task["progress"]) == ("document_process", "pending", 0.0)
    task_id = task["task_id"]  # the seed's "abc-123"

    assert curl(f"{base}/tasks/{task_id}")["task_id"] == task_id
    done = curl(
        "-X", "PATCH", f"{base}/tasks/{task_id}",
        "-H", "Content-Type: application/json",
        "-d", '{\n    "status": "completed",\n    "progress": 100.0,\n    "result": {"files_processed": 10}\n  }',
    )  # fmt: skip
    assert (done["status"], done["progress"], done["result"]) == ("completed", 100.0, {"files_processed": 10})

    assert [t["task_id"] for t in curl(f"{base}/tasks/")] == [task_id]
    assert [t["task_id"] for t in curl(f"{base}/tasks/?status=completed")] == [task_id]
    assert [t["task_id"] for t in curl(f"{base}/tasks/?task_type=document_process")] == [task_id]
    assert [t["task_id"] for t in curl(f"{base}/tasks/?skip=0&limit=10")] == [task_id]
    stats = curl(f"{base}/tasks/stats/summary")
    assert stats == {"total": 1, "pending": 0, "running": 0, "completed": 1, "failed": 0, "canceled": 0}
    assert curl("-X", "POST", f"{base}/tasks/cleanup?days=30") == {"deleted": 0}
    assert curl(f"{base}/health") == {"status": "ok"}
