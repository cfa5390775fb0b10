"""The server process killed mid-load, and stopped politely: real processes, real signals."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg

from tests.conftest import Server, assert_verifies

WRITERS = 4
MAX_WRITES_PER_WRITER = 500  # the load stops by itself even if the kill never came

COUNT_EVENTS = "SELECT count(*) FROM events"
CREATES_PER_KEY = "SELECT data->'params'->>'key', count(*) FROM events WHERE type = 'TaskCreated' GROUP BY 1"
WAITING = """
SELECT count(*) FROM pg_locks
WHERE NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
PROGRESS_PER_TASK = "SELECT stream_id, count(*) FROM events WHERE type = 'ProgressReported' GROUP BY 1"


def create(client: httpx.Client, key: str) -> httpx.Response:
    """A create that is safe to retry: its Idempotency-Key is also in its params, to count it in the log."""
    body = {"task_type": "crash", "params": {"key": key}}
    return client.post("/tasks/", json=body, headers={"Idempotency-Key": key})


class Load:
    """What the writers saw: the last acknowledged state per key, and the writes that got no answer."""

    def __init__(self) -> None:
        self.acknowledged: dict[str, dict] = {}
        self.unanswered_creates: list[str] = []
        self.unanswered_updates: set[str] = set()
        self.lock = threading.Lock()


def drive(url: str, writer: int, load: Load, killed: threading.Event) -> None:
    """Create a task and report progress on it, again and again, until the server dies."""
    with httpx.Client(base_url=url, timeout=10) as client:
        for n in range(MAX_WRITES_PER_WRITER):
            key = f"w{writer}-{n}"
            try:
                created = create(client, key)
            except httpx.TransportError:
                with load.lock:
                    load.unanswered_creates.append(key)
                return
            assert created.status_code == 201, created.text
            with load.lock:
                load.acknowledged[key] = created.json()
            try:
                updated = client.patch(f"/tasks/{created.json()['task_id']}", json={"progress": 50})
            except httpx.TransportError:
                with load.lock:
                    load.unanswered_updates.add(key)
                return
            assert updated.status_code == 200, updated.text
            with load.lock:
                load.acknowledged[key] = updated.json()
            if killed.is_set():
                return


def test_sigkill_mid_load_loses_no_acknowledged_write_and_repeats_none(database_url: str, tmp_path: Path) -> None:
    env = os.environ | {"DATABASE_URL": database_url}
    server = Server(env, log_dir=tmp_path)
    load, killed = Load(), threading.Event()
    with ThreadPoolExecutor(WRITERS) as pool:
        runs = [pool.submit(drive, server.url, writer, load, killed) for writer in range(WRITERS)]
        with psycopg.connect(database_url) as conn:
            deadline = time.monotonic() + 20
            while conn.execute(COUNT_EVENTS).fetchone()[0] < 120 and time.monotonic() < deadline:  # type: ignore[index]
                time.sleep(0.05)
        server.stop(signal.SIGKILL)
        killed.set()
        for run in runs:
            run.result()
    assert server.process.returncode == -signal.SIGKILL
    assert len(load.acknowledged) >= 30, "the kill came before any load"

    again = Server(env, log_dir=tmp_path)
    try:
        with httpx.Client(base_url=again.url) as client:
            for key, task in load.acknowledged.items():
                now = client.get(f"/tasks/{task['task_id']}").json()
                if key in load.unanswered_updates and now["version"] == task["version"] + 1:
                    assert now["progress"] == 50  # the unanswered update committed; it may or may not have
                else:
                    assert now == task  # every acknowledged write is there, and nothing after it
            # A client retries what got no answer: the Idempotency-Key keeps each a single task.
            for key in load.unanswered_creates:
                assert create(client, key).status_code == 201
    finally:
        again.stop()
    with psycopg.connect(database_url) as conn:
        created = dict(conn.execute(CREATES_PER_KEY).fetchall())
        progressed = dict(conn.execute(PROGRESS_PER_TASK).fetchall())
    assert set(load.acknowledged) | set(load.unanswered_creates) <= set(created)
    assert set(created.values()) == {1}, "a write appears twice"
    assert set(progressed.values()) == {1}, "a progress report appears twice"
    assert_verifies(database_url)


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(database_url: str, tmp_path: Path) -> None:
    # The request below waits on a lock for as long as the test needs: not for the lock timeout.
    env = os.environ | {"DATABASE_URL": database_url, "TASKTRAIL_LOCK_TIMEOUT": "1min"}
    server = Server(env, log_dir=tmp_path)
    task = httpx.post(f"{server.url}/tasks/", json={"task_type": "slow"}).json()
    with psycopg.connect(database_url) as holder, ThreadPoolExecutor(1) as pool:
        # Hold the tasks table so the list below is in flight, waiting on the lock, when SIGTERM comes.
        holder.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        in_flight = pool.submit(httpx.get, f"{server.url}/tasks/", timeout=30)
        deadline = time.monotonic() + 10
        while not holder.execute(WAITING).fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the request never reached the database"
            time.sleep(0.05)

        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{server.url}/health", timeout=1)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                # The listening socket is closed: new requests are refused (or, for one that reached the
                # socket's backlog as it closed, reset by the kernel unanswered, or closed by the server
                # with no answer: CI saw that once).
                break
            assert time.monotonic() < deadline, "still accepting new requests after SIGTERM"
            time.sleep(0.05)
        assert not in_flight.done()
        assert server.process.poll() is None, "exited with a request in flight"

        holder.rollback()  # let the in-flight request finish
        response = in_flight.result(timeout=10)
    assert response.status_code == 200
    assert [t["task_id"] for t in response.json()] == [task["task_id"]]
    assert server.process.wait(timeout=15) == 0  # a stop asked for is a clean exit, with the exit hooks run
    log = server.log()
    assert "Application shutdown complete" in log  # the lifespan closed the pool
    assert "Traceback" not in log, log


def test_a_request_sent_on_an_idle_connection_as_the_server_stops_is_answered_not_reset(
    database_url: str, tmp_path: Path
) -> None:
    """A keep-alive client may send just as SIGTERM comes: its request is answered, then the connection closes."""
    server = Server(os.environ | {"DATABASE_URL": database_url}, log_dir=tmp_path)
    connections = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    try:
        for conn in connections:  # each is used once, and idle when the stop comes
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert answer(conn).startswith(b"HTTP/1.1 200")
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.4)  # uvicorn notices the signal within 0.1 s, and has begun to stop
        body = b'{"task_type": "sent-as-it-stopped"}'
        for conn in connections:
            conn.sendall(
                b"POST /tasks/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        for conn in connections:
            head = answer(conn)
            assert head.startswith(b"HTTP/1.1 201"), head
            assert b"connection: close" in head.lower()
            assert conn.recv(1) == b""  # then closed
    finally:
        for conn in connections:
            conn.close()
    assert server.process.wait(timeout=15) == 0
    with psycopg.connect(database_url) as db:
        made = db.execute("SELECT count(*) FROM tasks WHERE task_type = 'sent-as-it-stopped'").fetchone()
    assert made == (4,)
    assert_verifies(database_url)


def answer(conn: socket.socket) -> bytes:
    """One whole HTTP answer read off the socket (a Content-Length body): its head and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed unanswered after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the connection closed in the middle of the answer"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_request_whose_body_never_comes_before_the_stop_gives_up_gets_a_problem_not_a_500(
    database_url: str, tmp_path: Path
) -> None:
    # The stop waits TASKTRAIL_STOP_TIMEOUT (10 s unless set) for the request, then cancels it.
    server = Server(os.environ | {"DATABASE_URL": database_url, "TASKTRAIL_STOP_TIMEOUT": "1"}, log_dir=tmp_path)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(
            b"PATCH /tasks/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n"  # and no body
        )
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        head = answer(conn)
    assert head.startswith(b"HTTP/1.1 503"), head
    assert b"content-type: application/problem+json" in head.lower()
    assert b"the server stopped before it could finish this request" in head
    assert b"\r\nretry-after: 1\r\n" in head.lower()  # as every 503 says when to try again
    assert b'"outcome":"unknown"' in head  # a write cut off: a client must not take it as not made
    assert server.process.wait(timeout=15) == 0
    assert "Traceback" not in server.log()
