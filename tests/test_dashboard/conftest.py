"""A real Chromium (Playwright) against a real `tasktrail serve` on a real PostgreSQL.

Chromium: Debian's `chromium` where it is installed, else the one `playwright
install chromium` downloaded. With neither the browser tests fail, saying how
to get one: they are never skipped.

Each module gets one server (on a fresh database) and one browser; each test
a fresh browser context (no cookies carried over) whose every request,
console error and JavaScript dialog is recorded, and checked when it ends:
no request leaves the server's origin, nothing is logged as an error, no
dialog opens.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from tests.conftest import Server, assert_verifies, fresh_database

DEBIAN_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOW_TO_INSTALL = (
    "the dashboard's tests need a Chromium: `apt-get install chromium` (Debian; .ci/run does this),"
    " or `uv run playwright install chromium`"
)


def chromium_executable(playwright: Playwright) -> str | None:
    """Debian's chromium if installed, else None for Playwright's own download; fails when there is neither."""
    found = shutil.which("chromium") or (DEBIAN_CHROMIUM if os.path.exists(DEBIAN_CHROMIUM) else None)
    if found:
        return found
    if os.path.exists(playwright.chromium.executable_path):
        return None
    pytest.fail(HOW_TO_INSTALL)


def launched() -> Iterator[Browser]:
    """A headless Chromium, until the generator is closed (for a fixture: `yield from launched()`)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(playwright), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launched()


@dataclass
class Watched:
    """What a browser context did: its requests, console errors and dialogs."""

    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

        def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)

    def allow(self, *fragments: str) -> None:
        """Forget console errors the test expects (Chromium logs every 4xx answer and aborted request)."""
        self.errors = [e for e in self.errors if not any(fragment in e for fragment in fragments)]

    def check(self) -> None:
        foreign = [url for url in self.requests if not url.startswith(self.origin + "/")]
        assert foreign == [], f"requests left the origin {self.origin}: {foreign}"
        assert self.errors == [], f"console errors: {self.errors}"
        assert self.dialogs == [], f"dialogs opened: {self.dialogs}"


@dataclass
class Dashboard:
    """A running server and a way to open pages on it in fresh browser contexts."""

    server: Server
    browser: Browser
    contexts: list[tuple[BrowserContext, Watched]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def context(self, **options: Any) -> tuple[BrowserContext, Watched]:
        context = self.browser.new_context(base_url=self.url, **options)
        watched = Watched(self.url)
        context.on("request", lambda r: watched.requests.append(r.url))
        context.on("page", watched.attach)
        self.contexts.append((context, watched))
        return context, watched

    def page(self, **options: Any) -> Page:
        context, _ = self.context(**options)
        return context.new_page()

    def allow(self, *fragments: str) -> None:
        """Forget these expected console errors in every context so far."""
        for _, watched in self.contexts:
            watched.allow(*fragments)

    def close_contexts(self) -> None:
        contexts, self.contexts = self.contexts, []
        for context, watched in contexts:
            context.close()
            watched.check()


def serve(
    server_url: str, template_db: str, log_dir: Path, browser: Browser, env: dict[str, str] | None = None
) -> Iterator[Dashboard]:
    """A server on a fresh database for a module; afterwards `verify` must find no difference."""
    with fresh_database(server_url, template_db) as url:
        server = Server(os.environ | {"DATABASE_URL": url} | (env or {}), log_dir=log_dir)
        try:
            yield Dashboard(server, browser)
        finally:
            server.stop()
        assert_verifies(url)


@pytest.fixture(scope="module")
def dashboard(
    server_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory, browser: Browser
) -> Iterator[Dashboard]:
    """The server of a module whose service has no API keys."""
    yield from serve(server_url, template_db, tmp_path_factory.mktemp("server"), browser)


@pytest.fixture
def ui(dashboard: Dashboard) -> Iterator[Dashboard]:
    """The module's server, for one test: its browser contexts are closed and checked afterwards."""
    yield dashboard
    dashboard.close_contexts()
