"""Screenshots of the dashboard for the docs: a real server, sample data, a real Chromium.

    uv run python docs/screenshots.py

Starts `tasktrail serve` on a free loopback port (an embedded PostgreSQL in a
temporary folder, or DATABASE_URL's server when set: use a scratch database),
fills it with sample tasks through the API, and writes docs/images/ui.png and
docs/images/task.png.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
TYPES = ["import", "export", "thumbnail", "send-email", "report"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_data(api: httpx.Client) -> str:
    """Tasks in every status; the id of one with a story to show on its page."""
    rng = random.Random(7)  # noqa: S311 -- sample data, the same on every run
    for i in range(90):
        task = api.post("/tasks/", json={"task_type": rng.choice(TYPES), "params": {"batch": i}}).json()
        path, roll = f"/tasks/{task['task_id']}", rng.random()
        if roll < 0.2:
            continue
        api.patch(path, json={"status": "running"})
        api.patch(path, json={"progress": rng.choice([8, 23.5, 41, 67, 92])})
        if roll < 0.45:
            continue
        if roll < 0.75:
            api.patch(path, json={"status": "completed", "result": {"rows": rng.randint(100, 9000)}})
        elif roll < 0.9:
            api.patch(path, json={"status": "failed", "error": "ConnectionError: warehouse did not answer in 30 s"})
        else:
            api.patch(path, json={"status": "canceled"})
    task = api.post(
        "/tasks/",
        json={"task_type": "import", "params": {"source": "s3://exports/2026-12-01/orders.csv", "dry_run": False}},
        headers={"X-Request-ID": "docsdemo1"},
    ).json()
    path = f"/tasks/{task['task_id']}"
    api.patch(path, json={"status": "running"})
    for progress in (15, 48):
        api.patch(path, json={"progress": progress})
    api.patch(path, json={"status": "failed", "error": "ValueError: row 18213: date '2026-13-01' is out of range"})
    api.patch(path, json={"status": "pending"})
    api.patch(path, json={"status": "running"})
    api.patch(path, json={"progress": 73.5})
    return task["task_id"]


def main() -> int:
    IMAGES.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix="tasktrail-screenshots-"))
    command = [sys.executable, "-m", "tasktrail", "--data-dir", str(data_dir), "serve", "--port", str(port)]
    server = subprocess.Popen(command, env=os.environ.copy())  # noqa: S603 -- our own server, fixed arguments
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=10) as api:
            task_id = sample_data(api)
        with sync_playwright() as playwright:
            chromium = shutil.which("chromium")
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 860}, device_scale_factor=1)
            page.goto(f"{base}/ui")
            page.locator("#live[data-state=live]").wait_for()
            page.locator("tr[data-task-id] input.pick").nth(2).check()
            page.locator("tr[data-task-id] input.pick").nth(4).check()
            page.screenshot(path=IMAGES / "ui.png")
            page.goto(f"{base}/ui/tasks/{task_id}")
            page.locator("#live[data-state=live]").wait_for()
            page.screenshot(path=IMAGES / "task.png")
            browser.close()
        print(f"wrote {IMAGES / 'ui.png'} and {IMAGES / 'task.png'}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
