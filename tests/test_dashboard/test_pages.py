"""The dashboard's pages and sessions through the real app (no browser): answers, headers, refusals."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from uuid import UUID

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from tasktrail.dashboard import routes
from tasktrail.http import auth, sessions
from tasktrail.http.app import create_app
from tests.conftest import assert_verifies, fresh_database

pytestmark = pytest.mark.anyio

KEYS = {scope: auth.new_key() for scope in auth.SCOPES}
CONFIGURED = [auth.Key(f"{scope}-key", scope, auth.digest(key)) for scope, key in KEYS.items()]
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
async def database(server_url: str, template_db: str) -> AsyncIterator[str]:
    with fresh_database(server_url, template_db) as url:
        yield url
        assert_verifies(url)


@pytest.fixture
async def open_client(database: str) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(app=create_app(database, api_keys=[])) as client:
        yield client


@pytest.fixture
async def secured(database: str) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(app=create_app(database, api_keys=CONFIGURED)) as client:
        yield client


async def signed_in(client: AsyncTestClient, scope: str) -> str:
    """Sign in as the browser does; the CSRF token the page then carries."""
    answer = await client.post("/ui/sign-in", data={"key": KEYS[scope], "next": "/ui"}, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui"
    page = await client.get("/ui")
    assert page.status_code == 200
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert match
    return match[1]


async def test_the_root_redirects_to_the_dashboard(open_client: AsyncTestClient) -> None:
    answer = await open_client.get("/", follow_redirects=False)
    assert answer.status_code in (301, 302, 303, 307, 308)
    assert answer.headers["location"] == "/ui"


async def test_pages_allow_scripts_and_styles_from_this_origin_only(open_client: AsyncTestClient) -> None:
    task = (await open_client.post("/tasks/", json={"task_type": XSS, "params": {"<b>": "</pre>"}})).json()
    for path in ("/ui", f"/ui/tasks/{task['task_id']}", "/ui/events"):
        page = await open_client.get(path)
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "style-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert XSS not in page.text
        assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
        assert '</pre>"' not in page.text
        # No inline script or handler: every <script> has a src, and no on* attribute appears.
        assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", page.text))
        assert not re.search(r"<[^>]+\son[a-z]+=", page.text)
        assert " style=" not in page.text


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/ui/tasks/not-a-uuid", 404),
        ("/ui/tasks/", 404),
        ("/ui/tasks", 404),
        ("/ui/no/such/page", 404),
        ("/ui/tasks/00000000-0000-4000-8000-000000000000", 404),
        ("/ui/tasks/%ff", 400),
        ("/ui/tasks/00000000-0000-4000-8000-000000000000?version=x", 422),
        ("/ui/tasks/00000000-0000-4000-8000-000000000000?version=" + "9" * 5000, 422),  # past what int() reads
        ("/ui/tasks/00000000-0000-4000-8000-000000000000?version=02", 422),  # as the API: no leading 0
        ("/ui/events?x=%ff", 400),
        # Deeper than a task page, matched by no page's route at all:
        ("/ui/tasks/a/b", 404),
        ("/ui/tasks/00000000-0000-4000-8000-000000000000/history", 404),
        ("/ui/tasks/%3Cscript%3Ealert(1)%3C%2Fscript%3E", 404),
        ("/ui/static/", 404),
    ],
)
async def test_a_bad_address_is_an_html_page_never_a_5xx(open_client: AsyncTestClient, path: str, status: int) -> None:
    page = await open_client.get(path)
    assert "<script>alert" not in page.text
    assert page.status_code == status
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert "Back to the tasks" in page.text


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "task_type=a%00b",
        "task_type=%ff",
        "task_type=" + "x" * 201,
        "cursor=nope",
        "limit=0",
        "limit=abc",
        "limit=%C2%B2",  # superscript two: a digit to str.isdigit, not to int()
        "limit=%E2%91%A0",
        "limit=%EF%BC%95",  # a fullwidth 5
        "limit=" + "9" * 5000,  # more digits than int() reads
        "limit=007",
        "cursor=aWQ6MTI3%3D",  # padded
        "cursor=aWQ6MTI3%2B",
        "cursor=aWQ677yR77yS",  # "id:" and fullwidth digits
        "status=failed&status=running",
    ],
)
async def test_a_bad_filter_is_refused_as_the_api_refuses_it_but_as_a_page(
    open_client: AsyncTestClient, query: str
) -> None:
    """The list's filters are the API's: the same status (from the same checks), as HTML rather than a problem."""
    api = await open_client.get(f"/tasks/?{query}")
    page = await open_client.get(f"/ui?{query}")
    assert api.status_code in (400, 422)
    assert api.headers["content-type"] == "application/problem+json"
    assert page.status_code == api.status_code
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "Back to the tasks" in page.text


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_a_method_no_page_has_is_an_html_page(open_client: AsyncTestClient, method: str) -> None:
    for path in ("/ui", "/ui/tasks/00000000-0000-4000-8000-000000000000"):
        page = await open_client.request(method, path)
        assert page.status_code == 405
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "GET" in page.headers["allow"]


async def test_a_version_past_the_latest_is_a_404_page(open_client: AsyncTestClient) -> None:
    task = (await open_client.post("/tasks/", json={"task_type": "versions"})).json()
    assert (await open_client.get(f"/ui/tasks/{task['task_id']}?version=1")).status_code == 200
    page = await open_client.get(f"/ui/tasks/{task['task_id']}?version=2")
    assert page.status_code == 404
    assert "its latest is 1" in page.text
    for version in ("%C2%B9", "%EF%BC%91", "%E2%91%A0"):  # digits to str.isdigit, not numbers in the URL
        api = await open_client.get(f"/tasks/{task['task_id']}?version={version}")
        page = await open_client.get(f"/ui/tasks/{task['task_id']}?version={version}")
        assert (api.status_code, page.status_code) == (422, 422), version
        assert page.headers["content-type"] == "text/html; charset=utf-8"


async def test_a_filtered_list_names_the_task_type_as_it_is(open_client: AsyncTestClient) -> None:
    """Types are case-sensitive: the heading must not lower-case one into a type that does not exist."""
    page = await open_client.get("/ui?status=failed&task_type=ImportCSV%20%C3%89t%C3%A9")
    assert "<h1>Failed tasks of type <bdi>ImportCSV Été</bdi></h1>" in page.text
    # Where no <bdi> can be, the type is isolated (U+2068 ... U+2069): an override in it reversed the tab's title.
    assert "<title>Failed tasks of type \u2068ImportCSV Été\u2069 · tasktrail</title>" in page.text
    assert 'aria-label="Task counts of type \u2068ImportCSV Été\u2069"' in page.text
    # A type's own bidi controls go there (audit: its own U+2069 closed the isolate, and an override after it
    # reversed the rest of the title); the heading's <bdi> shows it as it is.
    page = await open_client.get("/ui?task_type=ab%E2%81%A9%E2%80%AEcd%E2%80%AA")
    assert "<title>Tasks of type \u2068abcd\u2069 · tasktrail</title>" in page.text
    assert "<bdi>ab\u2069\u202ecd\u202a</bdi>" in page.text


async def test_every_time_a_page_shows_says_it_is_utc(open_client: AsyncTestClient) -> None:
    """Audit: the events page and the notices said UTC; the list's column and the task's facts did not."""
    task = (await open_client.post("/tasks/", json={"task_type": "utc", "params": {}})).json()
    for status in ("running", "completed"):
        assert (await open_client.patch(f"/tasks/{task['task_id']}", json={"status": status})).status_code == 200
    assert '<th scope="col">Last change (UTC)</th>' in (await open_client.get("/ui?task_type=utc")).text
    page = (await open_client.get(f"/ui/tasks/{task['task_id']}")).text
    times = re.findall(r"<dt>(\w+)</dt><dd><time datetime=\"[^\"]+\">[0-9: -]+</time> UTC</dd>", page)
    assert times == ["Created", "Updated", "Started", "Finished"], page


async def test_the_matching_tasks_are_written_with_thousands_separators_as_everywhere_on_the_page(
    open_client: AsyncTestClient,
) -> None:
    # Audit: "98872" in the counts and "471 matching." beside "Select all 2,506 tasks".
    created = await open_client.post("/tasks/batch", json={"tasks": [{"task_type": "thousands"}] * 1000})
    assert created.status_code == 201
    page = (await open_client.get("/ui?task_type=thousands")).text
    assert "1,000 matching." in page
    assert 'data-count="pending">1000</span>' in page  # the text is the number (docs/dashboard.md: a hook)
    assert 'Select all <span class="n">1,000</span>' in page


async def test_each_older_page_leads_back_to_the_page_before_it(open_client: AsyncTestClient) -> None:
    created = await open_client.post("/tasks/batch", json={"tasks": [{"task_type": "newer"}] * 4})
    assert created.status_code == 201
    link = re.compile(r'<a rel="(next|prev)" href="([^"]+)">')
    pages, url = [], "/ui?task_type=newer&limit=1"
    while url:
        page = (await open_client.get(url)).text
        links = {rel: html.unescape(href) for rel, href in link.findall(page)}
        pages.append((url, links.get("prev")))
        url = links.get("next")
    assert len(pages) == 4
    assert [newer for _, newer in pages] == [None, None, pages[1][0], pages[2][0]]  # the second: "Newest"


async def test_the_api_docs_page_names_no_other_host(open_client: AsyncTestClient) -> None:
    for path in ("/schema", "/schema/swagger"):
        page = await open_client.get(path)
        assert page.status_code == 200
        assert not re.search(r"(src|href)=['\"](https?:)?//", page.text), page.text
        # As the dashboard's pages: its own scripts only, and no other site may frame it (to click "Try it out").
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text
        for asset in re.findall(r"(?:src|href)=['\"](/ui/static/[^'\"?]+)", page.text):
            assert (await open_client.get(asset)).status_code == 200, asset
    # The files too are taken as the type they are sent as, and the shared live worker runs under the policy.
    for asset in ("/ui/static/live-worker.js", "/ui/static/dashboard.css", "/ui/static/favicon.svg"):
        served = await open_client.get(asset)
        assert served.headers.get_list("content-security-policy") == [routes.POLICY], asset
        assert served.headers["x-content-type-options"] == "nosniff"
    assert (await open_client.get("/schema/openapi.json")).status_code == 200


async def test_a_docs_path_that_names_nothing_is_a_problem_document(open_client: AsyncTestClient) -> None:
    """Litestar answers these with an HTML page of its own; every error of the API is problem+json."""
    for path in ("/schema/redoc", "/schema/oauth2-redirect.html", "/schema/openapi.yaml", "/schema/a/b"):
        missing = await open_client.get(path)
        assert missing.status_code == 404, path
        assert missing.headers["content-type"] == "application/problem+json", path
        assert missing.json()["status"] == 404


async def test_without_a_session_pages_ask_to_sign_in_and_the_api_still_says_401(secured: AsyncTestClient) -> None:
    page = await secured.get("/ui/events?x=1", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/sign-in?next=%2Fui%2Fevents%3Fx%3D1"
    assert (await secured.get("/tasks/")).status_code == 401
    form = await secured.get("/ui/sign-in?next=/ui/events")
    assert form.status_code == 200
    assert 'type="password"' in form.text
    # Statics and the sign-in form need no key.
    assert (await secured.get("/ui/static/dashboard.js")).status_code == 200
    # A key put in a page's URL is not copied into the sign-in page's URL or source (audit).
    key = KEYS["admin"]
    page = await secured.get(f"/ui?api_key={key}", follow_redirects=False)
    assert page.headers["location"] == "/ui/sign-in?next=%2Fui"
    form = await secured.get(f"/ui/sign-in?next=/ui%3Fapi_key%3D{key}")
    assert form.status_code == 200
    assert key not in form.text
    # Nor %-escaped (audit: tt%5F… went through into the redirect and the form's hidden field).
    escaped = key.replace("_", "%5F", 1)
    page = await secured.get(f"/ui?task_type={escaped}", follow_redirects=False)
    assert page.headers["location"] == "/ui/sign-in?next=%2Fui"
    form = await secured.get(f"/ui/sign-in?next=/ui%3Fx%3D{escaped.replace('%', '%25')}")
    assert key[3:] not in form.text


async def test_a_session_cookie_is_signed_expiring_and_strict(secured: AsyncTestClient) -> None:
    answer = await secured.post("/ui/sign-in", data={"key": KEYS["read"]}, follow_redirects=False)
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{sessions.COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", f"Max-Age={sessions.LIFETIME}"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain http here
    assert KEYS["read"] not in cookie


async def test_over_https_the_session_cookie_is_secure(database: str) -> None:
    async with AsyncTestClient(
        app=create_app(database, api_keys=CONFIGURED), base_url="https://testserver.local"
    ) as client:
        answer = await client.post("/ui/sign-in", data={"key": KEYS["read"]}, follow_redirects=False)
        assert answer.status_code == 303
        assert "; Secure" in answer.headers["set-cookie"]


async def test_signing_in_goes_back_to_the_page_with_its_address_in_ascii(secured: AsyncTestClient) -> None:
    # A filter of a task type "é x" came back in the Location header as raw UTF-8 (a header is ASCII).
    data = {"key": KEYS["read"], "next": "/ui?task_type=é x&status=failed"}
    answer = await secured.post("/ui/sign-in", data=data, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui?task_type=%C3%A9%20x&status=failed"


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/ui",
        "/tasks/",
        "/ui\\@evil",
        None,
        # Dot segments the browser resolves out of /ui (audit: to /etc, and to //evil.com on this host).
        "/ui/../../etc",
        "/ui/../..//evil.com",
        "/ui/%2e%2e/tasks/",
        "/ui/./../metrics",
        "/uix",
    ],
)
async def test_signing_in_goes_back_to_a_dashboard_page_only(secured: AsyncTestClient, target: str | None) -> None:
    data = {"key": KEYS["read"]} | ({} if target is None else {"next": target})
    answer = await secured.post("/ui/sign-in", data=data, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui"


async def test_a_sign_in_from_another_site_is_refused(secured: AsyncTestClient) -> None:
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        answer = await secured.post("/ui/sign-in", data={"key": KEYS["read"]}, headers=headers, follow_redirects=False)
        assert answer.status_code == 403
        assert "set-cookie" not in answer.headers
    # Behind a proxy that rewrites Host, the browser's Sec-Fetch-Site still says it is this site's page.
    proxied = {"Origin": "https://tasks.example", "Sec-Fetch-Site": "same-origin"}
    answer = await secured.post("/ui/sign-in", data={"key": KEYS["read"]}, headers=proxied, follow_redirects=False)
    assert answer.status_code == 303


async def test_a_cookie_write_needs_the_csrf_token_and_a_read_session_cannot_write(secured: AsyncTestClient) -> None:
    csrf = await signed_in(secured, "write")
    task = (await secured.post("/tasks/", json={"task_type": "csrf"}, headers={"X-CSRF-Token": csrf})).json()
    assert task["task_type"] == "csrf"
    path = f"/tasks/{task['task_id']}"
    assert (await secured.patch(path, json={"progress": 5})).status_code == 403
    assert (await secured.patch(path, json={"progress": 5}, headers={"X-CSRF-Token": "x" + csrf})).status_code == 403
    changed = await secured.patch(path, json={"progress": 5}, headers={"X-CSRF-Token": csrf})
    assert changed.status_code == 200
    history = (await secured.get(f"{path}/history")).json()["events"]
    assert [e["metadata"]["actor"] for e in history] == ["write-key", "write-key"]
    # Reads and streams need no token.
    assert (await secured.get("/tasks/stats/summary")).status_code == 200

    read_csrf = await signed_in(secured, "read")
    assert (await secured.patch(path, json={"progress": 6}, headers={"X-CSRF-Token": read_csrf})).status_code == 403
    page = await secured.get(f"/ui/tasks/{task['task_id']}")
    assert 'data-action="cancel"' not in page.text


async def test_a_bearer_key_works_as_before_and_wins_over_a_cookie(secured: AsyncTestClient) -> None:
    await signed_in(secured, "admin")
    task = (await secured.post("/tasks/", json={"task_type": "bearer"}, headers=bearer("write"))).json()
    assert (await secured.get(f"/tasks/{task['task_id']}/history", headers=bearer("read"))).status_code == 200
    # With a header the cookie is not looked at: a read key cannot write, even beside an admin session.
    refused = await secured.patch(f"/tasks/{task['task_id']}", json={"progress": 1}, headers=bearer("read"))
    assert refused.status_code == 403
    assert (await secured.get("/tasks/", headers={"Authorization": "Bearer nope"})).status_code == 401


def bearer(scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[scope]}"}


async def test_a_forged_expired_or_orphaned_session_is_refused(database: str) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        secret = await sessions.stored_secret(conn)
    write = CONFIGURED[1]
    forged, _ = sessions.issue(b"another secret of thirty-two bytes!", write.name, write.digest)
    expired, _ = sessions.issue(secret, write.name, write.digest, now=0)
    replaced, _ = sessions.issue(secret, write.name, auth.digest("an old key under the same name"))
    valid, session = sessions.issue(secret, write.name, write.digest)
    tampered = valid.replace(valid[3], "A" if valid[3] != "A" else "B", 1)
    async with AsyncTestClient(app=create_app(database, api_keys=CONFIGURED)) as client:
        for value in (forged, expired, replaced, tampered, "garbage", "a.b"):
            client.cookies.set(sessions.COOKIE, value)
            assert (await client.get("/tasks/")).status_code == 401, value
            assert (await client.get("/ui", follow_redirects=False)).status_code == 303
        client.cookies.set(sessions.COOKIE, valid)
        assert (await client.get("/tasks/")).status_code == 200
    # Without the key in the configuration its sessions end.
    async with AsyncTestClient(app=create_app(database, api_keys=CONFIGURED[:1])) as client:
        client.cookies.set(sessions.COOKIE, valid)
        assert (await client.get("/tasks/")).status_code == 401
    assert session.key == "write-key"


async def test_every_process_and_restart_shares_the_secret_unless_the_environment_gives_one(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncTestClient(app=create_app(database, api_keys=CONFIGURED)) as first:
        await signed_in(first, "read")
        cookie = first.cookies[sessions.COOKIE]
    async with AsyncTestClient(app=create_app(database, api_keys=CONFIGURED)) as second:
        second.cookies.set(sessions.COOKIE, cookie)
        assert (await second.get("/tasks/")).status_code == 200

    monkeypatch.setenv(sessions.SECRET_ENV, "s" * 40)
    async with AsyncTestClient(app=create_app(database, api_keys=CONFIGURED)) as configured:
        configured.cookies.set(sessions.COOKIE, cookie)
        assert (await configured.get("/tasks/")).status_code == 401
        await signed_in(configured, "read")
    monkeypatch.setenv(sessions.SECRET_ENV, "too short")
    with pytest.raises(sessions.BadSecret):
        create_app(database, api_keys=CONFIGURED)


async def test_signing_out_clears_the_cookie_and_needs_the_pages_token(secured: AsyncTestClient) -> None:
    csrf = await signed_in(secured, "read")
    for wrong in ("wrong", "é", csrf + "\x00", ""):
        refused = await secured.post("/ui/sign-out", data={"csrf": wrong}, follow_redirects=False)
        assert refused.status_code in (403, 422), wrong
        assert "set-cookie" not in refused.headers
    # Another site's form arrives without the cookie (SameSite=Strict), so with no token to check: refused
    # all the same, or its answer would clear the cookie and sign the user out.
    for other_site in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = await secured.post(
            "/ui/sign-out", data={"csrf": ""}, headers=other_site | {"Cookie": ""}, follow_redirects=False
        )
        assert refused.status_code == 403
        assert "set-cookie" not in refused.headers
    answer = await secured.post("/ui/sign-out", data={"csrf": csrf}, follow_redirects=False)
    assert answer.status_code == 303
    assert "Max-Age=0" in answer.headers["set-cookie"]


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        # Not sent as the page's form is: a cross-site page can post text/plain without a preflight.
        (b'{"key": "x"}', "application/json", 415, "not as application/json"),
        (b"key=x", "text/plain", 415, "not as text/plain"),
        (b"key=x", None, 415, "without a Content-Type"),
        (b"key=x", "multipart/form-data; boundary=x", 415, "not as multipart/form-data"),
        (b"key=x", f"{FORM}; charset=latin-1", 415, "(UTF-8)"),
        (b"key=x", f"{FORM}; charset=\xff", 415, "(UTF-8)"),
        # Not UTF-8 text, raw or %-escaped: no key is looked up.
        (b"key=\xff", FORM, 400, "key: not UTF-8 text"),
        (b"key=%ff", FORM, 400, "key: not UTF-8 text"),
        (b"%c3=x", FORM, 400, "a form field&#39;s name is not UTF-8 text"),
        # Text that breaks a rule.
        (b"key=a%00b", FORM, 422, "key: must not contain NUL"),
        (b"key=a&key=b", FORM, 422, "key: given more than once"),
    ],
)
async def test_the_sign_in_form_takes_its_own_encoding_only(
    secured: AsyncTestClient, body: bytes, content_type: str | None, status: int, says: str
) -> None:
    headers = [] if content_type is None else [(b"content-type", content_type.encode("latin-1"))]
    answer = await secured.post("/ui/sign-in", content=body, headers=headers, follow_redirects=False)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert says in answer.text
    assert "set-cookie" not in answer.headers


async def test_the_sign_in_form_as_a_browser_sends_it(secured: AsyncTestClient) -> None:
    """URL-encoded UTF-8, with or without a charset; a field the form does not know is ignored."""
    for content_type in (FORM, f"{FORM}; charset=UTF-8", f"{FORM.upper()};charset=utf-8"):
        body = f"next=%2Fui%2Fevents&key={KEYS['read']}&other=%C3%A9".encode()
        answer = await secured.post("/ui/sign-in", content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 200, content_type
        assert str(answer.url).endswith("/ui/events")
    wrong = await secured.post("/ui/sign-in", data={"key": "tt_é✓"})
    assert wrong.status_code == 401
    assert "That is not a key this service knows." in wrong.text


async def test_a_broken_session_cookie_or_csrf_token_is_refused_never_a_5xx(secured: AsyncTestClient) -> None:
    """What a browser may bring: another app's cookie on the same host, a garbled one of ours, a garbled token."""
    csrf = await signed_in(secured, "write")
    task = (await secured.post("/tasks/", json={"task_type": "garbled"}, headers={"X-CSRF-Token": csrf})).json()
    path = f"/tasks/{task['task_id']}"
    garbled = [b"\xff", b"\xc3\xa9", "é".encode("latin-1"), b"x\x00"]
    for raw in garbled:
        headers = [(b"x-csrf-token", raw), (b"content-type", b"application/json")]
        refused = await secured.patch(path, content=b'{"progress": 1}', headers=headers)
        assert refused.status_code == 403, raw
    session = secured.cookies[sessions.COOKIE]
    secured.cookies.clear()
    for raw in garbled:
        for cookie in (b"tasktrail_session=" + raw, b"other=" + raw + b"; tasktrail_session=" + session.encode()):
            valid = b"other" in cookie
            api = await secured.get("/tasks/", headers=[(b"cookie", cookie)])
            assert api.status_code == (200 if valid else 401), cookie
            page = await secured.get("/ui", headers=[(b"cookie", cookie)], follow_redirects=False)
            assert page.status_code == (200 if valid else 303), cookie


async def test_a_long_timeline_is_read_from_where_it_starts_as_a_fresh_fold_would_show_it(
    open_client: AsyncTestClient,
) -> None:
    # A live page renders again after each change; a task's whole history was read and folded each time.
    # Where the newest TIMELINE_CAP entries start, and the task before them, are kept: only those are read.
    task = (await open_client.post("/tasks/", json={"task_type": "long"})).json()
    path = f"/ui/tasks/{task['task_id']}"
    updates = [{"task_id": task["task_id"], "progress": n % 100} for n in range(1, 1001)]
    assert (await open_client.patch("/tasks/batch", json={"updates": updates})).status_code == 200

    def timeline(html: str) -> str:
        return re.search(r'<ol class="timeline".*?</ol>', html, re.DOTALL)[0]  # type: ignore[index]

    first = (await open_client.get(path)).text
    assert len(re.findall(r'<li data-version="', timeline(first))) == routes.TIMELINE_CAP
    assert "1 older event is not shown here" in first
    for status in ("running", "failed", "pending"):
        assert (await open_client.patch(path.removeprefix("/ui"), json={"status": status})).status_code == 200
    kept = (await open_client.get(path)).text
    assert routes._WINDOWS[UUID(task["task_id"])][0] == 5  # read from version 5: 1,000 of 1,004
    routes._WINDOWS.clear()  # the same page from the whole history, folded afresh
    fresh = (await open_client.get(path)).text
    assert timeline(kept) == timeline(fresh)
    assert "4 older events are not shown here" in kept
    assert 'data-version="1004" data-type="TaskRetried"' in kept
    # Time travel inside the kept entries, and before them (folded from the start).
    for version in (1003, 2, 1):
        page = (await open_client.get(f"{path}?version={version}")).text
        api = (await open_client.get(f"/tasks/{task['task_id']}?version={version}")).json()
        now = re.search(r'<section class="now".*?</section>', page, re.DOTALL)[0]  # type: ignore[index]
        assert f'data-status="{api["status"]}"' in now, version
        assert f"{api['progress']:g}%" in now, version
        assert f"Showing version {version} of 1004" in page
        assert f'<li data-version="{version}"' in timeline(page), version  # the timeline shows it too


async def test_older_events_of_a_long_timeline_are_shown_a_page_at_a_time(open_client: AsyncTestClient) -> None:
    task = (await open_client.post("/tasks/", json={"task_type": "longer"})).json()
    path = f"/ui/tasks/{task['task_id']}"
    for start in (1, 1001):
        updates = [{"task_id": task["task_id"], "progress": n % 100} for n in range(start, start + 1000)]
        assert (await open_client.patch("/tasks/batch", json={"updates": updates})).status_code == 200

    def versions(html: str) -> list[int]:
        return [int(v) for v in re.findall(r'<li data-version="([0-9]+)"', html)]

    seen = []
    page = (await open_client.get(path)).text  # 2,001 events: 1,002 to 2,001 first
    while True:
        shown = versions(page)
        assert shown == sorted(shown, reverse=True)
        assert len(shown) <= routes.TIMELINE_CAP
        seen += shown
        older = re.search(r'<a href="([^"]+)">show older events</a>', page)
        if older is None:
            break
        page = (await open_client.get(html.unescape(older[1]))).text
        assert f"{2001 - shown[-1] + 1} newer events</a> are not shown here" in page
    assert seen == list(range(2001, 0, -1))  # every event once, newest first
    newer = re.search(r'<a href="([^"]+)">2000 newer events</a>', page)  # from version 1 alone
    assert newer is not None
    assert versions((await open_client.get(html.unescape(newer[1]))).text)[::999] == [1001, 2]
    # A version picked before the newest events: the timeline starts at it, and the page says which it shows.
    page = (await open_client.get(f"{path}?version=7")).text
    assert versions(page)[-1] == 7
    assert len(versions(page)) == routes.TIMELINE_CAP
    assert 'aria-current="true"' in re.search(r'<li data-version="7".*?>', page)[0]  # type: ignore[index]
    newer = re.search(r'<a href="([^"]+)">995 newer events</a>', page)  # 1,007 to 2,001, still at version 7
    assert newer is not None
    following = (await open_client.get(html.unescape(newer[1]))).text
    assert versions(following)[0] == 2001
    assert "Showing version 7 of 2001" in following
    for bad in ("0", "1", "x", "-3"):
        assert (await open_client.get(f"{path}?before={bad}")).status_code == 422, bad
    assert versions((await open_client.get(f"{path}?before=99999")).text)[0] == 2001


async def test_progress_is_never_shown_rounded_to_done_or_to_nothing(open_client: AsyncTestClient) -> None:
    shown = {}
    for progress in (99.99999999999999, 0.01, 12.25):
        task = (await open_client.post("/tasks/", json={"task_type": "rounding"})).json()
        await open_client.patch(f"/tasks/{task['task_id']}", json={"status": "running", "progress": progress})
        page = (await open_client.get(f"/ui/tasks/{task['task_id']}")).text
        shown[progress] = re.findall(r"[0-9.]+%", re.search(r'<section class="now".*?</section>', page, re.DOTALL)[0])  # type: ignore[index]
    assert {progress: set(texts) for progress, texts in shown.items()} == {
        99.99999999999999: {"99.9%"},
        0.01: {"0.1%"},
        12.25: {"12.2%"},
    }


async def test_a_long_error_or_result_is_shown_whole_as_the_state_and_cut_in_each_timeline_entry(
    open_client: AsyncTestClient,
) -> None:
    # 210 failures with 60 KB errors made a task's page 12.8 MB, fetched again after every event.
    task = (await open_client.post("/tasks/", json={"task_type": "long-error"})).json()
    path = f"/tasks/{task['task_id']}"
    error, result = "E" * 20_000 + "<end>", {"r": "r" * 5_000}
    for status, body in (("running", {}), ("failed", {"error": error}), ("pending", {}), ("completed", {})):
        assert (await open_client.patch(path, json={"status": status} | body)).status_code == 200
    await open_client.patch(path, json={"status": "pending"})  # completed is final: a 409, nothing appended
    page = (await open_client.get(f"/ui{path}")).text
    now = re.search(r'<section class="now".*?</section>', page, re.DOTALL)[0]  # type: ignore[index]
    timeline = re.search(r'<ol class="timeline".*?</ol>', page, re.DOTALL)[0]  # type: ignore[index]
    assert "E" * 20_000 + "&lt;end&gt;" not in now  # cleared by the retry
    assert "E" * 20_000 + "&lt;end&gt;" not in timeline
    assert "E" * (routes.SUMMARY - 1) + "…" in timeline
    assert len(page) < 20_000
    other = (await open_client.post("/tasks/", json={"task_type": "long-result"})).json()
    await open_client.patch(f"/tasks/{other['task_id']}", json={"status": "failed", "error": error})
    page = (await open_client.get(f"/ui/tasks/{other['task_id']}")).text
    now = re.search(r'<section class="now".*?</section>', page, re.DOTALL)[0]  # type: ignore[index]
    assert "E" * 20_000 + "&lt;end&gt;" in now  # the state, whole
    assert page.count("E" * 20_000) == 1
    await open_client.patch(f"/tasks/{other['task_id']}", json={"status": "pending"})
    await open_client.patch(f"/tasks/{other['task_id']}", json={"status": "completed", "result": result})
    page = (await open_client.get(f"/ui/tasks/{other['task_id']}")).text
    assert page.count("r" * 5_000) == 1  # the state's result, whole; its entry cut


async def test_without_api_keys_no_actor_is_shown_never_python_none(open_client: AsyncTestClient) -> None:
    task = (await open_client.post("/tasks/", json={"task_type": "anonymous"})).json()
    history = (await open_client.get(f"/tasks/{task['task_id']}/history")).json()
    assert history["events"][0]["metadata"]["actor"] is None
    for path in (f"/ui/tasks/{task['task_id']}", "/ui/events"):
        page = (await open_client.get(path)).text
        assert ">None<" not in page, path
    assert '<span class="actor">—</span>' in (await open_client.get(f"/ui/tasks/{task['task_id']}")).text


async def test_deleting_the_stored_secret_signs_everyone_out_and_every_process_agrees_on_the_next(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "SECRET_READ_EVERY", 0.2)
    async with (
        AsyncTestClient(app=create_app(database, api_keys=CONFIGURED)) as one,
        AsyncTestClient(app=create_app(database, api_keys=CONFIGURED)) as other,  # another process
    ):
        await signed_in(one, "read")
        assert (await one.get("/tasks/")).status_code == 200
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await conn.execute("DELETE FROM session_secret")
        await asyncio.sleep(0.3)
        assert (await one.get("/tasks/")).status_code == 401  # the cookie was signed with the deleted secret
        await signed_in(one, "read")  # a new secret now; the other process reads the same one
        other.cookies.update(one.cookies)
        assert (await other.get("/tasks/")).status_code == 200
