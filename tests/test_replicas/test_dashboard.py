"""The dashboard on a server that reads from a standby: after an action, the page shows it (SPEC §10, §13).

With replay paused on the standby, a read without the action's
Tasktrail-Read-After token is answered there, and is older; the page's own
reads carry the token (its script's fetches in the header, a page the browser
opens in a cookie), so they are answered where the write is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import Server
from tests.replication import Pair
from tests.test_dashboard.conftest import Dashboard, launched
from tests.test_replicas.conftest import replicated_database

expect.set_options(timeout=10_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launched()


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"not within 30 s: {what}"
        time.sleep(0.02)


def running(http: httpx.Client) -> str:
    task = http.post("/tasks/", json={"task_type": "replicated"}).json()
    assert http.patch(f"/tasks/{task['task_id']}", json={"status": "running"}).status_code == 200
    return task["task_id"]


def served(page: Page, path: str) -> str:
    """Open a page; the HTML the server sent for it (before the page's script changes anything)."""
    response = page.goto(path)
    assert response is not None
    assert response.status == 200
    return response.text()


def test_after_an_action_or_a_bulk_action_the_pages_show_it_while_the_standby_lags(
    pair: Pair, template: str, browser: Browser, tmp_path: Path
) -> None:
    with replicated_database(pair, template) as database:
        serve_args = ("--replica", database.replica, "--replica-max-lag", "60")
        server = Server(os.environ | {"DATABASE_URL": database.primary}, log_dir=tmp_path, serve_args=serve_args)
        ui = Dashboard(server, browser)
        try:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                one, other, probe = running(http), running(http), running(http)
                pair.wait_replayed()
                # The replica serves once its pool is open (its health check holds one connection there).
                until(lambda: len(pair.standby_backends(database.name)) > 1, "the server reads from the standby")
                page = ui.page()
                page.goto(f"/ui/tasks/{one}")
                expect(page.locator("#now")).to_have_attribute("data-status", "running")
                with pair.paused():
                    # Reads without a token now come from the standby, which shows none of what follows.
                    http.patch(f"/tasks/{probe}", json={"progress": 50})
                    until(lambda: http.get(f"/tasks/{probe}").json()["progress"] == 0, "a stale read")

                    # An action: the page's fetch after it carries the token.
                    page.get_by_role("button", name="Cancel").click()
                    expect(page.locator("#action-message")).to_have_text("Canceled.")
                    expect(page.locator("#now")).to_have_attribute("data-status", "canceled")
                    # A page the browser opens next: the cookie carries it to the server.
                    assert f'<tr data-task-id="{one}" data-status="canceled">' in served(page, "/ui")
                    expect(page.locator('[data-count="canceled"]')).to_have_text("1")

                    # A bulk action: the page's refresh after it, and the next page opened.
                    page.locator(f'tr[data-task-id="{other}"]').get_by_role("checkbox").check()
                    page.locator('#bulk [data-bulk="cancel"]').click()
                    page.get_by_role("dialog").get_by_role("button", name="Cancel 1 task").click()
                    expect(page.locator("#bulk-run")).to_contain_text("Cancel: finished. 1 done.")
                    expect(page.locator(f'tr[data-task-id="{other}"]')).to_have_attribute("data-status", "canceled")
                    expect(page.locator('[data-count="canceled"]')).to_have_text("2")
                    assert 'data-type="TaskCanceled"' in served(page, f"/ui/tasks/{other}")
                    expect(page.locator("#now")).to_have_attribute("data-status", "canceled")

                    # Without the token the standby still answers what it had.
                    assert [http.get(f"/tasks/{t}").json()["status"] for t in (one, other)] == ["running"] * 2

                    # Pages that wrote nothing (no token): a change made elsewhere reaches them through their
                    # streams (from the primary, the standby being paused), and their refresh reads it there
                    # too, not the standby's older state (audit: with a standby 2 s behind, never shown).
                    watching, listing = ui.page(), ui.page()
                    watching.goto(f"/ui/tasks/{probe}")
                    expect(watching.locator("#now .pct")).to_have_text("50%")  # the standby has 0%
                    listing.goto("/ui")
                    expect(listing.locator(f'tr[data-task-id="{probe}"]')).to_have_attribute("data-status", "running")
                    http.patch(f"/tasks/{probe}", json={"progress": 75})
                    expect(watching.locator("#now .pct")).to_have_text("75%")
                    http.patch(f"/tasks/{probe}", json={"status": "failed", "error": "elsewhere"})
                    expect(listing.locator(f'tr[data-task-id="{probe}"]')).to_have_attribute("data-status", "failed")
                    expect(listing.locator('[data-count="failed"]')).to_have_text("1")
            ui.close_contexts()
        finally:
            server.stop()
