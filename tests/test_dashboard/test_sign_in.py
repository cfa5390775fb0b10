"""With API keys configured: sign in once for a session cookie, see and do only what the key's scope allows."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tasktrail.http import auth, events
from tests.test_dashboard.conftest import Dashboard, serve

expect.set_options(timeout=10_000)

KEYS = {scope: auth.new_key() for scope in ("read", "write")}
ENTRIES = " ".join(auth.Key(f"{scope}-key", scope, auth.digest(key)).entry() for scope, key in KEYS.items())


@pytest.fixture(scope="module")
def secured(
    server_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory, browser: Browser
) -> Iterator[Dashboard]:
    yield from serve(
        server_url, template_db, tmp_path_factory.mktemp("server"), browser, {"TASKTRAIL_API_KEYS": ENTRIES}
    )


@pytest.fixture
def ui(secured: Dashboard) -> Iterator[Dashboard]:
    yield secured
    secured.close_contexts()


def sign_in(page: Page, scope: str, path: str = "/ui") -> None:
    page.goto(path)
    expect(page).to_have_url(re.compile(r"/ui/sign-in\?next="))
    page.get_by_label("API key").fill(KEYS[scope])
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("header .who")).to_contain_text(f"Signed in as {scope}-key")


def a_page_from_before_signing_in_again(ui: Dashboard, path: str, scope: str) -> tuple[BrowserContext, Page]:
    """A page signed in with the write key, then the browser signed in again in another tab with `scope`'s key."""
    context, _ = ui.context()
    before = context.new_page()
    sign_in(before, "write", path)
    again = context.new_page()
    again.goto("/ui/sign-in?next=/ui")
    again.get_by_label("API key").fill(KEYS[scope])
    again.get_by_role("button", name="Sign in").click()
    expect(again.locator("header .who")).to_contain_text(f"Signed in as {scope}-key")
    return context, before


def a_task(ui: Dashboard, **fields: object) -> dict:
    with ui.api(Authorization=f"Bearer {KEYS['write']}") as api:
        task = api.post("/tasks/", json={"task_type": "secured"}).json()
        if fields:
            task = api.patch(f"/tasks/{task['task_id']}", json=fields).json()
    return task


def test_a_read_key_signs_in_for_a_strict_http_only_cookie_and_sees_no_write_actions(ui: Dashboard) -> None:
    task = a_task(ui, status="running")
    context, _ = ui.context()
    page = context.new_page()
    sign_in(page, "read", f"/ui/tasks/{task['task_id']}")
    expect(page).to_have_url(re.compile(rf"/ui/tasks/{task['task_id']}$"))

    (cookie,) = context.cookies()
    assert cookie["name"] == "tasktrail_session"
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain http here; https sets Secure
    assert cookie["expires"] > 0
    assert KEYS["read"] not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # no script can read it

    # Nothing to write with: no actions, no selection, and the server refuses anyway.
    expect(page.locator("#now")).to_have_attribute("data-status", "running")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    page.goto("/ui")
    expect(row_of(page, task)).to_be_visible()
    expect(page.locator("input.pick")).to_have_count(0)
    expect(page.locator("#bulk")).to_have_count(0)
    refused = page.evaluate(
        """async (id) => (await fetch(`/tasks/${id}`, {method: "PATCH", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({status: "canceled"})})).status""",
        task["task_id"],
    )
    assert refused == 403

    # Live through the cookie (EventSource sends no header).
    fresh = a_task(ui)
    expect(row_of(page, fresh)).to_be_visible()

    # The key is in no URL, no page, no log.
    for visited in ui.contexts[-1][1].requests:
        assert KEYS["read"] not in visited
    assert KEYS["read"] not in page.content()
    assert KEYS["read"] not in ui.server.log()
    ui.allow("status of 403")


def row_of(page: Page, task: dict):
    return page.locator(f'tr[data-task-id="{task["task_id"]}"]')


def test_a_wrong_key_is_refused_without_echoing_it(ui: Dashboard) -> None:
    page = ui.page()
    page.goto("/ui/events")
    page.get_by_label("API key").fill("tt_not-a-key-of-ours")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That is not a key this service knows.")
    assert "tt_not-a-key-of-ours" not in page.content()
    ui.allow("status of 401")


def test_a_write_key_cancels_with_the_csrf_token_and_a_cookie_alone_cannot_write(ui: Dashboard) -> None:
    task = a_task(ui, status="running")
    page = ui.page()
    sign_in(page, "write", f"/ui/tasks/{task['task_id']}")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#now")).to_have_attribute("data-status", "canceled")
    expect(page.locator('#timeline [data-type="TaskCanceled"] .actor')).to_have_text("write-key")

    # The same session without the page's token: refused (403), whatever the body, a text/plain one a
    # cross-site form could send included: the key (here, the session and its token) is checked first.
    other = a_task(ui)
    statuses = page.evaluate(
        """async (id) => [
            (await fetch(`/tasks/${id}`, {method: "PATCH", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({status: "canceled"})})).status,
            (await fetch("/tasks/", {method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({task_type: "csrf"})})).status,
            (await fetch("/tasks/", {method: "POST", headers: {"Content-Type": "text/plain"},
                body: JSON.stringify({task_type: "csrf"})})).status,
            (await fetch(`/tasks/${id}`, {method: "DELETE"})).status,
        ]""",
        other["task_id"],
    )
    assert statuses == [403, 403, 403, 403]
    with ui.api(Authorization=f"Bearer {KEYS['read']}") as api:
        assert api.get(f"/tasks/{other['task_id']}").json()["version"] == 1
        assert api.get("/tasks/", params={"task_type": "csrf"}).json() == []
    ui.allow("status of 403")

    session = next(cookie for cookie in page.context.cookies() if cookie["name"] == "tasktrail_session")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/ui/sign-in"))
    # The session is gone, and nothing else was kept: without replicas, writes leave no read-after cookie.
    assert page.context.cookies() == []
    # Ended on the server too: a copy of the cookie, kept from before signing out, is refused.
    with ui.api(Cookie=f"tasktrail_session={session['value']}") as api:
        assert api.get(f"/tasks/{other['task_id']}").status_code == 401


def test_a_page_from_before_signing_in_again_says_so_and_still_signs_out(ui: Dashboard) -> None:
    # Signing in again in another tab gives the browser a new session, and with it a new CSRF token: the
    # page opened before still had the old one, so its Cancel was refused with a word about a header it
    # had sent, and its Sign out was refused (403) and left the new session signed in.
    task = a_task(ui, status="running")
    context, before = a_page_from_before_signing_in_again(ui, f"/ui/tasks/{task['task_id']}", "write")
    (session,) = context.cookies()

    before.get_by_role("button", name="Cancel").click()
    expect(before.locator("#action-message")).to_contain_text("You signed in again in another tab or window")
    expect(before.get_by_role("alert").filter(has_text="reload this page")).to_have_count(2)  # the notice too
    with ui.api(Authorization=f"Bearer {KEYS['read']}") as api:
        assert api.get(f"/tasks/{task['task_id']}").json()["status"] == "running"
    ui.allow("status of 403")

    before.get_by_role("button", name="Sign out").click()
    expect(before).to_have_url(re.compile(r"/ui/sign-in\?out"))
    assert context.cookies() == []
    with ui.api(Cookie=f"tasktrail_session={session['value']}") as api:
        assert api.get("/tasks/stats/summary").status_code == 401
    ui.allow("status of 401")


def test_a_list_from_before_signing_in_again_with_a_read_key_stays_live_and_quiet(ui: Dashboard) -> None:
    # Audit: the rows of a read key's page have no checkbox; patching the old page's rows with them threw,
    # and the page said "Update failed; retrying…" and fetched itself four times a second for ever.
    with ui.api(Authorization=f"Bearer {KEYS['write']}") as api:
        listed = api.post("/tasks/", json={"task_type": "again"}).json()
    _, before = a_page_from_before_signing_in_again(ui, "/ui?task_type=again", "read")
    asked: list[str] = []
    before.on("request", lambda r: asked.append(r.url))
    with ui.api(Authorization=f"Bearer {KEYS['write']}") as api:
        api.patch(f"/tasks/{listed['task_id']}", json={"status": "running"})  # a row the page shows changes
    expect(before.locator("#signed-in-again")).to_be_visible()
    expect(before.locator(f'#task-rows tr[data-task-id="{listed["task_id"]}"]')).to_have_attribute(
        "data-status", "running"
    )
    before.wait_for_timeout(600)
    expect(before.locator("#live")).to_have_text("Live")
    settled = len(asked)
    before.wait_for_timeout(1000)
    assert asked[settled:] == [], asked[settled:]
    # Audit: the rows, patched cell by cell from the read key's page, lost their checkbox column and
    # every value moved under the heading before it; a new row had a cell fewer than the headings.
    with ui.api(Authorization=f"Bearer {KEYS['write']}") as api:
        arrived = api.post("/tasks/", json={"task_type": "again"}).json()
    expect(before.locator(f'#task-rows tr[data-task-id="{arrived["task_id"]}"]')).to_have_count(1)
    headings = before.locator("table.tasks thead th").count()
    assert before.locator("#task-rows tr").evaluate_all("rows => rows.map(r => r.cells.length)") == [headings] * 2
    changed = before.locator(f'#task-rows tr[data-task-id="{listed["task_id"]}"]')
    expect(changed.locator("input.pick")).to_have_count(1)  # its own session's row, as it was
    expect(changed.locator("td").nth(3)).to_contain_text("running")  # under Status


def test_a_task_page_from_before_signing_in_again_with_a_read_key_does_not_call_the_task_deleted(
    ui: Dashboard,
) -> None:
    # Audit: the read key's page of the task has no actions; the old page took that for a deletion, hid its
    # buttons and said "The task was deleted", of a task still pending.
    task = a_task(ui)
    _, before = a_page_from_before_signing_in_again(ui, f"/ui/tasks/{task['task_id']}", "read")
    with ui.api(Authorization=f"Bearer {KEYS['write']}") as api:
        api.patch(f"/tasks/{task['task_id']}", json={"progress": 9})
    expect(before.locator("#signed-in-again")).to_be_visible()
    expect(before.locator("#now .pct")).to_have_text("9%")
    expect(before.locator("#action-message")).not_to_contain_text("deleted")
    expect(before.get_by_role("button", name="Cancel")).to_be_visible()  # as its own session showed it
    # And a real deletion still says so.
    with ui.api(Authorization=f"Bearer {KEYS['write']}") as api:
        api.delete(f"/tasks/{task['task_id']}")
    expect(before.locator("#action-message")).to_have_text("The task was deleted: nothing more can be done to it.")


def test_signing_out_ends_the_live_streams_of_every_open_page(ui: Dashboard) -> None:
    # Streams are authorised as they open; one opened with a session must not outlive it, or the
    # browser's other pages (and a copy of the cookie) would go on receiving events after signing out.
    context, _ = ui.context()
    first = context.new_page()
    sign_in(first, "read", "/ui/events")
    pages = [first] + [context.new_page() for _ in range(3)]  # two with their own streams, two sharing one
    for page in pages[1:]:
        page.goto("/ui/events")
    for page in pages:
        expect(page.locator("#live")).to_have_attribute("data-state", "live")
    (session,) = context.cookies()
    seen = a_task(ui)
    for page in pages:
        expect(page.locator(f'#feed-rows tr[data-task-id="{seen["task_id"]}"]')).to_have_count(1)
    # A copy of the cookie follows the feed too, until the session ends.
    with ui.api(Cookie=f"tasktrail_session={session['value']}") as api, api.stream("GET", "/events/stream") as copy:
        assert copy.status_code == 200
        # A stream looks at its session again before sending events at most every SESSION_CHECK_SECONDS:
        # past that, the first event after the sign-out is the one that ends it.
        time.sleep(events.SESSION_CHECK_SECONDS + 0.2)
        pages[1].get_by_role("button", name="Sign out").click()
        expect(pages[1]).to_have_url(re.compile(r"/ui/sign-in"))
        unseen = a_task(ui)
        received = "".join(copy.iter_text())  # ends: the server closed it
    assert unseen["task_id"] not in received
    # Its last words: reconnect at once (refused if signed out; signed in again, live again at once).
    assert received.endswith(events.RECONNECT_NOW.decode())
    for page in (pages[0], *pages[2:]):
        expect(page.locator("#live")).to_have_text("Signed out: reload to sign in")
        expect(page.locator(f'#feed-rows tr[data-task-id="{unseen["task_id"]}"]')).to_have_count(0)
    ui.allow("status of 401")

    # Signed out, a page asks no more (audit: each page tried its stream and the counts again and again, every
    # refusal an error in the console) until this browser signs in again; then it is live again at once.
    asked: list[str] = []
    for page in (pages[0], *pages[2:]):
        page.on("request", lambda request: asked.append(request.url))
    time.sleep(3)  # the streams' retries came after 0.5, 1 and 2 s
    assert asked == []
    sign_in(context.new_page(), "read", "/ui/events")
    for page in (pages[0], *pages[2:]):
        expect(page.locator("#live")).to_have_attribute("data-state", "live")
    again = a_task(ui)
    for page in (pages[0], *pages[2:]):
        expect(page.locator(f'#feed-rows tr[data-task-id="{again["task_id"]}"]')).to_have_count(1)


def test_on_a_phone_the_bar_wraps_rather_than_widening_the_page(ui: Dashboard) -> None:
    # Signed in, the bar holds the badge and who is signed in: at 375 px it was 449 px wide, Sign out off-screen.
    finished = a_task(ui, status="failed")
    page = ui.page(viewport={"width": 375, "height": 800})
    sign_in(page, "write", f"/ui/tasks/{finished['task_id']}")
    expect(page.locator("#live")).to_contain_text("finished")
    for path in (f"/ui/tasks/{finished['task_id']}", "/ui", "/ui/events"):
        page.goto(path)
        expect(page.locator("#live")).to_be_visible()
        page.evaluate("document.getElementById('live').textContent = 'Reconnecting…'")  # the longest it says
        assert page.evaluate("document.documentElement.scrollWidth <= innerWidth"), path
        sign_out = page.get_by_role("button", name="Sign out")
        box = sign_out.bounding_box()
        assert box is not None
        assert box["x"] + box["width"] <= 375, path
