"""GET /metrics from `tasktrail serve` in real processes: two workers add up, gauges say what is true now."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from tests.conftest import Server, assert_verifies, fresh_database
from tests.prom import scrape, wait_for_scrape

STREAMS = "tasktrail_stream_clients"
HELD_BACK = "tasktrail_feed_held_back_seconds"


@pytest.fixture(scope="module")
def database(server_url: str, template_db: str) -> Iterator[str]:
    with fresh_database(server_url, template_db) as url:
        yield url
        assert_verifies(url)


@pytest.fixture(scope="module")
def two_workers(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = os.environ | {"DATABASE_URL": database}
    server = Server(env, log_dir=tmp_path_factory.mktemp("metrics"), serve_args=("--workers", "2"))
    yield server
    assert server.stop() == 0


def workers(server: Server) -> list[psutil.Process]:
    """The server's worker processes that are running (not one that exited and awaits its parent)."""
    found = []
    for child in psutil.Process(server.process.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


def test_counters_add_up_across_two_workers(two_workers: Server) -> None:
    with httpx.Client(base_url=two_workers.url) as client:
        task_id = client.post("/tasks/", json={"task_type": "w"}).json()["task_id"]
        before = scrape(client)
    served_by, sent = set(), 0
    # A connection of its own for each request, so that both processes answer some.
    while sent < 40 or len(served_by) < 2:
        assert sent < 400, "one worker answered every request"
        response = httpx.get(f"{two_workers.url}/tasks/{task_id}")
        assert response.status_code == 200
        served_by.add(response.headers["x-request-id"][:12])  # the answering process's prefix
        sent += 1
    with httpx.Client(base_url=two_workers.url) as client:
        after = scrape(client)
    labels = {"method": "GET", "route": "/tasks/{task_id}"}
    counted = after.value("tasktrail_http_requests_total", **labels, status="200")
    assert counted - before.value("tasktrail_http_requests_total", **labels, status="200") == sent
    timed = after.value("tasktrail_http_request_duration_seconds_count", **labels)
    assert timed - before.value("tasktrail_http_request_duration_seconds_count", **labels) == sent
    assert task_id not in after.text


def test_stream_clients_rise_and_fall_with_open_streams(two_workers: Server) -> None:
    with httpx.Client(base_url=two_workers.url) as client, contextlib.ExitStack() as stack:
        assert wait_for_scrape(client, lambda s: s.value(STREAMS) == 0)
        streams = []
        for _ in range(6):
            # Each on a connection of its own (so on either worker).
            stream = stack.enter_context(httpx.stream("GET", f"{two_workers.url}/events/stream", timeout=30))
            assert stream.status_code == 200
            streams.append(stack.enter_context(contextlib.closing(stream)))
        wait_for_scrape(client, lambda s: s.value(STREAMS) == 6)
        for stream in streams[:4]:
            stream.close()
        wait_for_scrape(client, lambda s: s.value(STREAMS) == 2)
    with httpx.Client(base_url=two_workers.url) as client:
        wait_for_scrape(client, lambda s: s.value(STREAMS) == 0)


def test_an_open_transaction_holds_the_feed_back_until_it_commits(two_workers: Server, database: str) -> None:
    with httpx.Client(base_url=two_workers.url) as client:
        wait_for_scrape(client, lambda s: s.value(HELD_BACK) == 0)
        with psycopg.connect(database) as holder:
            holder.execute("SELECT pg_current_xact_id()")  # a transaction id: this one now holds the horizon
            assert client.post("/tasks/", json={"task_type": "late"}).status_code == 201  # commits after it
            held = wait_for_scrape(client, lambda s: s.value(HELD_BACK) > 0)
            time.sleep(0.3)
            assert scrape(client).value(HELD_BACK) > held.value(HELD_BACK)  # it counts from the holder's start
            (opened,) = holder.execute("SELECT extract(epoch FROM now() - xact_start) FROM pg_stat_activity"
                                       " WHERE pid = pg_backend_pid()").fetchone()  # fmt: skip
            assert scrape(client).value(HELD_BACK) >= float(opened)
            holder.commit()
        wait_for_scrape(client, lambda s: s.value(HELD_BACK) == 0)


def still_there(lines: Iterator[str], seconds: float) -> bool:
    """Read a stream (pinged often) for a while: True if it goes on, False if its server went away.

    `lines` is kept by the caller: an iterator left behind would close its stream.
    """
    until = time.monotonic() + seconds
    try:
        while time.monotonic() < until:
            next(lines)
    except (httpx.HTTPError, StopIteration):
        return False
    return True


def test_a_worker_that_exits_leaves_no_stale_gauge_and_its_counts_stay(database: str, tmp_path: Path) -> None:
    """SIGKILL (no goodbye) and SIGTERM (a clean exit); uvicorn starts a new worker each time."""
    env = os.environ | {"DATABASE_URL": database, "TASKTRAIL_SSE_PING_SECONDS": "0.2"}
    server = Server(env, log_dir=tmp_path, serve_args=("--workers", "2"))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client, contextlib.ExitStack() as stack:
            for _ in range(20):
                assert httpx.get(f"{server.url}/health").status_code == 200
            counted = scrape(client).value("tasktrail_http_requests_total", method="GET", route="/health", status="200")
            # Streams on both workers, each on a connection of its own, so the one killed has some.
            opened: dict[str, list[httpx.Response]] = {}
            while len(opened) < 2 or min(map(len, opened.values())) < 2:
                assert sum(map(len, opened.values())) < 40, "one worker answered every stream"
                stream = stack.enter_context(httpx.stream("GET", f"{server.url}/events/stream", timeout=30))
                opened.setdefault(stream.headers["x-request-id"][:12], []).append(stream)
            lines = [stream.iter_lines() for streams in opened.values() for stream in streams]
            wait_for_scrape(client, lambda s: s.value(STREAMS) == len(lines))
            first, second = workers(server)

            first.send_signal(signal.SIGKILL)
            with ThreadPoolExecutor(len(lines)) as pool:
                alive = sum(pool.map(lambda stream_lines: still_there(stream_lines, 1.0), lines))
            assert 0 < alive < len(lines)
            # The scrape drops the dead worker's gauges at once, before uvicorn replaces it.
            after = wait_for_scrape(client, lambda s: s.value(STREAMS) == alive)
            # What the killed worker counted still counts.
            assert after.value("tasktrail_http_requests_total", method="GET", route="/health", status="200") == counted

            serving(server.url, set(opened))  # the killed worker's replacement, before the other one goes
            second.send_signal(signal.SIGTERM)  # a clean exit: it ends its streams and leaves
            with contextlib.suppress(psutil.NoSuchProcess):
                second.wait(timeout=30)
            wait_for_scrape(client, lambda s: s.value(STREAMS) == 0)
    finally:
        assert server.stop() == 0


def serving(url: str, old: set[str], timeout: float = 60) -> None:
    """Wait until a worker other than the `old` ones (by their request ids' prefix) answers."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health", timeout=timeout).headers["x-request-id"][:12] in old:
        assert time.monotonic() < deadline, "no new worker answered"
        time.sleep(0.05)
