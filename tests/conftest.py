"""Real PostgreSQL for every test: DATABASE_URL's server when set, else an embedded one.

Each test that asks for `database_url` gets a fresh database cloned from a
migrated template, so tests never see each other's events.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from litestar.testing import AsyncTestClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tasktrail import db, migrations
from tasktrail.http.app import create_app
from tasktrail.projections import INLINE
from tasktrail.projections.rebuild import prepare
from tasktrail.verify import verify

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@contextmanager
def embedded_data_dir() -> Iterator[Path]:
    """A folder for an embedded PostgreSQL's data, removed afterwards.

    Not under pytest's tmp_path: as root, pgserver runs PostgreSQL as another
    user, who must be able to reach the folder, and pytest keeps its own base
    folder private (0700), re-tightening it whenever another session starts.
    """
    path = Path(tempfile.mkdtemp(prefix="tasktrail-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server: DATABASE_URL's, or an embedded one for this session."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with embedded_data_dir() as data_dir:
        server = db.start_embedded(data_dir, cleanup_mode="delete")
        yield server.get_uri()
        server.cleanup()


def _admin(server_url: str) -> psycopg.Connection:
    return psycopg.connect(server_url, autocommit=True)


def prepared(url: str) -> None:
    """Migrate the database and build this code's read models, which no migration makes (as `tasktrail migrate`)."""
    migrations.migrate(url)
    prepare(url, INLINE)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"tasktrail_template_{uuid.uuid4().hex[:8]}"
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    prepared(make_conninfo(server_url, dbname=name))
    yield name
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def fresh_database(server_url: str, template_db: str) -> Iterator[str]:
    name = f"tasktrail_test_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db))
        )
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with _admin(server_url) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with fresh_database(server_url, template_db) as url:
        yield url


@pytest.fixture(scope="module")
async def shared_client(server_url: str, template_db: str) -> AsyncIterator[AsyncTestClient]:
    """One app on one fresh database for a whole module whose tests don't count rows."""
    with fresh_database(server_url, template_db) as url:
        async with AsyncTestClient(app=create_app(url)) as test_client:
            yield test_client
        assert_verifies(url)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(database_url, **db.connect_kwargs()) as connection:
        yield connection


@contextmanager
def holding(database_url: str, statement: str, params: Sequence[Any] = (), seconds: float = 10.0) -> Iterator[None]:
    """Another transaction runs `statement` and holds the locks it took, for `seconds` or until the block ends.

    In a thread: a test client's requests block the test's event loop. Rolled back at the end.
    """
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with psycopg.connect(database_url, **db.connect_kwargs()) as other, other.transaction(force_rollback=True):
            other.execute(statement, params)
            held.set()
            release.wait(seconds)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10), "the other transaction did not take its locks"
        yield
    finally:
        release.set()
        thread.join()


def assert_verifies(database_url: str) -> None:
    """The log, folded, matches the read model and the counters."""
    report = verify(database_url)
    assert report.ok, report.summary()


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[AsyncTestClient]:
    """The real app on a fresh database; afterwards `verify` must find no difference."""
    async with AsyncTestClient(app=create_app(database_url)) as test_client:
        yield test_client
    assert_verifies(database_url)


def run_node(script: str, *args: str, timeout: float = 120) -> str:
    """Run tests/js/<script> with node; its stdout (the test fails on a non-zero exit)."""
    assert shutil.which("node"), "node is needed for this test (the clients are JavaScript)"
    done = subprocess.run(
        ["node", str(ROOT / "tests/js" / script), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`tasktrail [args] serve` in a real process on a free loopback port; its log in a file."""

    def __init__(
        self,
        env: dict[str, str],
        *args: str,
        log_dir: Path,
        serve_args: tuple[str, ...] = (),
        launcher: tuple[str, ...] = (sys.executable, "-m", "tasktrail"),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        command = [*launcher, *args, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        command += serve_args
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            self.wait_until_up()
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the process and what it started: uvicorn's workers (or, under uv, the server) would live on."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.process.kill()
        self.process.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.url} did not come up in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send sig and wait; kill if it does not exit in time. The exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


@pytest.fixture
def live_server(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `tasktrail serve` process on the test's database; its base URL."""
    server = Server(os.environ | {"DATABASE_URL": database_url}, log_dir=tmp_path)
    yield server.url
    server.stop()
    assert_verifies(database_url)


@pytest.fixture(scope="session")
def shared_server(server_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real `tasktrail serve` on a fresh database for the tests that don't count rows (the clients', the docs'
    examples): each keeps to task types of its own. Its URL."""
    with fresh_database(server_url, template_db) as url:
        server = Server(os.environ | {"DATABASE_URL": url}, log_dir=tmp_path_factory.mktemp("server"))
        yield server.url
        server.stop()
        assert_verifies(url)
