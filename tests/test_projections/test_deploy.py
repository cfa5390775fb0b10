"""A rolling deploy of a new read-model version: two releases' server processes on one PostgreSQL.

Release N runs this code's read models (tasks version NOW); release N+1 runs the
test-only tasks version NEXT (tasks_next.py: duration_seconds), chosen through
TASKTRAIL_READ_MODELS. Both take writes at the same time; neither refuses one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tasktrail import db, projections
from tasktrail.projections import stats, tasks, versions
from tasktrail.verify import fold_log
from tests.conftest import Server
from tests.test_projections import tasks_next

RELEASE_N1 = {"TASKTRAIL_READ_MODELS": "tests.test_projections.tasks_next,tasktrail.projections.stats"}
V2 = (tasks_next, stats)
NOW, NEXT = tasks.VERSION, tasks_next.VERSION


def env(database_url: str, release: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != projections.MODULES_ENV}
    return base | {"DATABASE_URL": database_url} | (release or {})


def tasktrail(database_url: str, *args: str, release: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasktrail", *args],
        env=env(database_url, release),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


class Starting(Server):
    """A server process that may take a while to come up (it builds its read models first)."""

    def wait_until_up(self, timeout: float = 30.0) -> None:
        pass  # the test waits, with Server.wait_until_up, when it wants to


def up(server: Server, timeout: float = 60.0) -> Server:
    Server.wait_until_up(server, timeout)
    return server


class Load(threading.Thread):
    """One client writing to whichever servers it is given: creates, updates of any task, deletes."""

    def __init__(self, urls: list[str], known: list[str], deleting: set[str], seed: int) -> None:
        super().__init__()
        self.urls, self.known, self.deleting = urls, known, deleting
        self.rng = random.Random(seed)  # noqa: S311 -- test data
        self.stop = threading.Event()
        self.answers: Counter[int] = Counter()
        self.refused: list[str] = []  # answers that refuse or lose a write
        self.unanswered = 0  # requests to a process that was killed
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=30) as client:
                while not self.stop.is_set():
                    try:
                        self.once(client, self.rng.choice(self.urls))
                    except httpx.TransportError:
                        self.unanswered += 1
        except BaseException as exc:
            self.error = exc

    def once(self, client: httpx.Client, url: str) -> None:
        roll = self.rng.random()
        if roll < 0.35 or len(self.known) < 5:
            answer = client.post(f"{url}/tasks/", json={"task_type": self.rng.choice(["a", "b"]), "params": {}})
            if answer.status_code == 201:
                self.known.append(answer.json()["task_id"])
        elif roll < 0.93:
            task_id = self.rng.choice(self.known[-200:])
            change = self.rng.choice(
                [
                    {"status": "running"},
                    {"progress": round(self.rng.uniform(0, 100), 2)},
                    {"status": "completed", "result": {"n": self.rng.randrange(100)}},
                    {"status": "failed", "error": "boom"},
                    {"status": "pending"},
                ]
            )
            answer = client.patch(f"{url}/tasks/{task_id}", json=change)
        else:
            task_id = self.rng.choice(self.known[-200:])
            self.deleting.add(task_id)
            answer = client.delete(f"{url}/tasks/{task_id}")
        self.answers[answer.status_code] += 1
        problem = answer.json() if answer.headers.get("content-type") == "application/problem+json" else {}
        if answer.status_code >= 500:
            self.refused.append(f"{answer.request.method} {answer.request.url}: {answer.status_code} {answer.text}")
        elif answer.status_code == 404 and answer.request.method != "POST":
            if answer.request.url.path.rsplit("/", 1)[-1] not in self.deleting:
                self.refused.append(f"{answer.request.method} {answer.request.url}: 404 for a live task")
        elif answer.status_code == 409 and "current_status" not in problem:
            self.refused.append(f"{answer.request.method} {answer.request.url}: 409 {problem.get('detail')}")


class Clients:
    def __init__(self, urls: list[str], n: int = 2) -> None:
        known: list[str] = []
        deleting: set[str] = set()
        self.loads = [Load(urls, known, deleting, seed) for seed in range(n)]
        self.known = known
        for load in self.loads:
            load.start()

    def use(self, urls: list[str]) -> None:
        for load in self.loads:
            load.urls = urls

    def writes(self) -> int:
        return sum(sum(load.answers.values()) for load in self.loads)

    def wait_for(self, writes: int, timeout: float = 60) -> None:
        target, deadline = self.writes() + writes, time.monotonic() + timeout
        while self.writes() < target:
            assert all(load.error is None for load in self.loads), [load.error for load in self.loads]
            assert time.monotonic() < deadline, "the clients stopped making progress"
            time.sleep(0.05)

    def run_for(self, seconds: float) -> None:
        """Let the clients write for a while (a bounded load, not a timing: nothing asserts how much)."""
        self.wait_for(20)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert all(load.error is None for load in self.loads), [load.error for load in self.loads]
            time.sleep(0.05)

    def stop(self) -> tuple[Counter[int], list[str]]:
        for load in self.loads:
            load.stop.set()
        for load in self.loads:
            load.join()
        assert all(load.error is None for load in self.loads), [load.error for load in self.loads]
        answers: Counter[int] = Counter()
        for load in self.loads:
            answers += load.answers
        return answers, [refused for load in self.loads for refused in load.refused]


def caught_up(database_url: str, timeout: float = 30) -> None:
    """Until every live version has applied every event other releases wrote."""
    deadline = time.monotonic() + timeout
    while True:
        found, _, _ = versions.status(database_url, ())
        if all(v.behind == 0 for v in found if v.state == "live"):
            return
        assert time.monotonic() < deadline, [(v.name, v.version, v.behind) for v in found]
        time.sleep(0.1)


def connect(database_url: str, modules: tuple[Any, ...] | None = None) -> psycopg.Connection:
    conn = psycopg.connect(database_url, **db.connect_kwargs())
    if modules is not None:
        conn.execute(f"SET search_path = {projections.search_path(modules)}")
    return conn


def verified(database_url: str, *args: str) -> str:
    done = tasktrail(database_url, "verify", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    """Servers a test starts; each is stopped afterwards, by its handle."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def test_two_releases_serve_and_write_side_by_side_then_the_old_version_is_pruned(
    database_url: str, tmp_path: Path, servers: list[Server]
) -> None:
    old = Server(env(database_url), log_dir=tmp_path)
    servers.append(old)
    clients = Clients([old.url])
    clients.wait_for(150)

    # Release N+1 starts: it builds tasks version NEXT from the log while release N takes writes.
    new = up(Starting(env(database_url, RELEASE_N1), log_dir=tmp_path))
    servers.append(new)
    assert "rebuilt tasks from" in new.log()
    clients.use([old.url, new.url])
    clients.run_for(2)  # writes on both, each changing the other's tasks
    answers, refused = clients.stop()

    assert refused == [], refused[:5]
    assert not [code for code in answers if code >= 500]
    assert answers[201] > 20
    assert answers[200] > 20

    caught_up(database_url)
    assert f"tasks version {NOW}" in verified(database_url)
    assert f"tasks version {NEXT}" in verified(database_url, "--version", f"tasks={NEXT}")
    with connect(database_url) as conn:
        conn.autocommit = False
        _, states = fold_log(conn)
    live = {str(task_id): task for task_id, task in states.items() if task is not None}
    with connect(database_url, V2) as conn:
        durations = {str(k): v for k, v in conn.execute("SELECT task_id, duration_seconds FROM tasks").fetchall()}
    assert durations == {task_id: tasks_next.duration(task) for task_id, task in live.items()}
    assert any(d is not None for d in durations.values())
    with connect(database_url) as conn:
        columns = [c.name for c in conn.execute("SELECT * FROM tasks LIMIT 0").description]
        assert "duration_seconds" not in columns

    # Each release reads its own version's rows: a mark made in version NOW only is seen by release N only.
    task_id = next(iter(live))
    with connect(database_url) as conn:
        conn.execute("UPDATE tasks SET progress = 42.25 WHERE task_id = %s", (task_id,))
    assert httpx.get(f"{old.url}/tasks/{task_id}").json()["progress"] == 42.25
    assert httpx.get(f"{new.url}/tasks/{task_id}").json()["progress"] == live[task_id].progress != 42.25
    with connect(database_url) as conn:
        conn.execute("UPDATE tasks SET progress = %s WHERE task_id = %s", (live[task_id].progress, task_id))

    # A write reaches the other release's read model a few ms late; a request naming it there at once
    # (on a kept-alive connection) must not be refused for that: a read, If-Match, an Idempotency-Key
    # repeated, a batch's if_version; and a read with the write's Read-After token sees the write.
    with httpx.Client(base_url=old.url) as on_old, httpx.Client(base_url=new.url) as on_new:
        for n in range(10):
            one, other = (on_old, on_new) if n % 2 else (on_new, on_old)
            key = {"Idempotency-Key": f"deploy-{n}"}
            made = one.post("/tasks/", json={"task_type": "lag"}, headers=key).json()
            path = f"/tasks/{made['task_id']}"
            assert other.get(path).status_code == 200
            again = other.post("/tasks/", json={"task_type": "lag"}, headers=key)
            assert (again.status_code, again.json()["task_id"]) == (201, made["task_id"])
            batch_key = {"Idempotency-Key": f"deploy-batch-{n}"}
            items = {"tasks": [{"task_type": "lag"}, {"task_type": "lag"}]}
            made_many = one.post("/tasks/batch", json=items, headers=batch_key).json()["tasks"]
            again_many = other.post("/tasks/batch", json=items, headers=batch_key)
            assert again_many.status_code == 201, again_many.text
            assert [t["task_id"] for t in again_many.json()["tasks"]] == [t["task_id"] for t in made_many]
            written = one.patch(path, json={"progress": 7})
            version = written.json()["version"]
            read_after = {"Tasktrail-Read-After": written.headers["tasktrail-read-after"]}
            assert other.get(path, headers=read_after).json()["progress"] == 7  # never older than the token
            started = other.patch(path, json={"status": "running"}, headers={"If-Match": f'"{version}"'})
            assert started.status_code == 200, started.text
            progressed = other.patch(path, json={"progress": 8}).json()["version"]
            item = {"task_id": made["task_id"], "progress": 9, "if_version": progressed}
            reported = one.patch("/tasks/batch", json={"updates": [item]})
            assert reported.json()["results"][0]["status"] == 200, reported.text
            deleted = other.delete(path, headers={"If-Match": f'"{progressed + 1}"'})
            assert deleted.status_code == 200, deleted.text

        # What the other release wrote a moment ago decides a write that would append nothing on the late
        # row: the requeue of a task it started is no no-op, a move from the status it left is not refused
        # (409); a single PATCH or a batch item. (Audit: 45 of 50 requeues were answered 200 unchanged.)
        # So does an Idempotency-Key's repeat, which answers the task as it is now (audit: in about 1 of 4 it
        # was the created one at version 1, on the other release, after a PATCH there was acknowledged).
        for n in range(10):
            one, other = (on_old, on_new) if n % 2 else (on_new, on_old)
            key = {"Idempotency-Key": f"late-{n}"}
            task_id = one.post("/tasks/", json={"task_type": "late"}, headers=key).json()["task_id"]
            path = f"/tasks/{task_id}"
            assert one.patch(path, json={"status": "running"}).status_code == 200
            repeated = other.post("/tasks/", json={"task_type": "late"}, headers=key).json()
            assert (repeated["task_id"], repeated["version"]) == (task_id, 2), repeated
            batch, batch_key = {"tasks": [{"task_type": "late"}]}, {"Idempotency-Key": f"late-batch-{n}"}
            (made,) = one.post("/tasks/batch", json=batch, headers=batch_key).json()["tasks"]
            assert one.patch(f"/tasks/{made['task_id']}", json={"progress": 3}).status_code == 200
            again = other.post("/tasks/batch", json=batch, headers=batch_key).json()
            assert again["tasks"][0]["version"] == 2, again
            requeued = other.patch(path, json={"status": "pending"}).json()
            assert (requeued["status"], requeued["version"], requeued["retry_count"]) == ("pending", 3, 1), requeued
            assert other.patch(path, json={"status": "canceled"}).status_code == 200
            retried = one.patch("/tasks/batch", json={"updates": [{"task_id": task_id, "status": "pending"}]})
            assert retried.json()["results"][0]["task"]["version"] == 5, retried.text
            started = other.patch("/tasks/batch", json={"updates": [{"task_id": task_id, "status": "running"}]})
            assert started.json()["results"][0].get("task", {}).get("version") == 6, (n, started.text)
            assert one.patch(path, json={"progress": 50}).json()["version"] == 7

    # Version NOW cannot go while release N runs; it goes once its last process has stopped.
    refused_prune = tasktrail(database_url, "projections", "prune", release=RELEASE_N1)
    assert refused_prune.returncode == 1
    assert f"tasks version {NOW} is in use by a running process" in refused_prune.stderr
    status = tasktrail(database_url, "projections", "status", release=RELEASE_N1).stdout
    assert [line.split()[:5] for line in status.splitlines()[1:4]] == [
        ["stats", "1", "live", "0", "2"],
        ["tasks", str(NOW), "live", "0", "1"],
        ["tasks", str(NEXT), "live", "0", "1"],
    ]
    old.stop()
    pruned = tasktrail(database_url, "projections", "prune", release=RELEASE_N1)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout == f"pruned tasks version {NOW}: dropped schema rm_tasks_v{NOW}\n"
    assert httpx.post(f"{new.url}/tasks/", json={"task_type": "after"}).status_code == 201
    assert f"tasks version {NEXT}" in verified(database_url, "--version", f"tasks={NEXT}")

    # And back: release N starting again builds its version anew, from the log.
    again = up(Starting(env(database_url), log_dir=tmp_path))
    servers.append(again)
    assert "rebuilt tasks from" in again.log()
    created = httpx.post(f"{again.url}/tasks/", json={"task_type": "again"}).json()
    assert httpx.patch(f"{new.url}/tasks/{created['task_id']}", json={"status": "running"}).status_code == 200
    caught_up(database_url)
    assert httpx.get(f"{again.url}/tasks/{created['task_id']}").json()["status"] == "running"
    verified(database_url)


BLOCKED = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND NOT granted AND classid = hashtext(%(space)s)::oid
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())  -- not another test's (xdist)
"""


def wait_until_blocked(database_url: str, space: str) -> None:
    with connect(database_url) as conn:
        for _ in range(1200):
            if conn.execute(BLOCKED, {"space": space}).fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError(f"nothing waited for a {space} lock")


def test_a_new_release_killed_while_it_builds_starts_over_and_the_old_one_never_notices(
    database_url: str, tmp_path: Path, servers: list[Server]
) -> None:
    old = Server(env(database_url), log_dir=tmp_path)
    servers.append(old)
    clients = Clients([old.url], n=1)
    clients.wait_for(50)

    with connect(database_url) as holder:
        # The build's last step waits for this lock: the new release is killed there, its tables built.
        holder.execute(f"SELECT pg_advisory_lock(hashtext('tasktrail.follows'), hashtext('tasks:{NEXT}'))")
        new = Starting(env(database_url, RELEASE_N1), log_dir=tmp_path)
        servers.append(new)
        wait_until_blocked(database_url, versions.FOLLOWS)
        new.stop(signal.SIGKILL)
    status = tasktrail(database_url, "projections", "status", release=RELEASE_N1).stdout
    assert f"tasks version {NEXT} was being built and was interrupted" in status
    assert f"schema rm_tasks_v{NEXT}_new is left from an interrupted rebuild" in status

    again = up(Starting(env(database_url, RELEASE_N1), log_dir=tmp_path))
    servers.append(again)
    clients.use([old.url, again.url])
    clients.wait_for(150)
    # Release N is killed too, in the middle of writes, and comes back.
    old.stop(signal.SIGKILL)
    clients.use([again.url])
    clients.wait_for(50)
    back = up(Starting(env(database_url), log_dir=tmp_path))
    servers.append(back)
    clients.use([back.url, again.url])
    clients.wait_for(100)
    answers, refused = clients.stop()

    # The only failures are the requests the killed process never answered (transport errors, not answers).
    assert refused == [], refused[:5]
    assert not [code for code in answers if code >= 500]
    caught_up(database_url)
    verified(database_url)
    verified(database_url, "--version", f"tasks={NEXT}")
    status = tasktrail(database_url, "projections", "status", release=RELEASE_N1).stdout
    assert "interrupted" not in status


def test_a_prune_killed_halfway_changes_nothing(database_url: str, tmp_path: Path) -> None:
    done = tasktrail(database_url, "migrate", release=RELEASE_N1)  # builds tasks version NEXT beside NOW
    assert done.returncode == 0, done.stderr
    with connect(database_url) as reader:
        reader.autocommit = False
        held = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(projections.schema("tasks", NOW), "tasks"))
        reader.execute(held)  # holds the drop off
        pruning = subprocess.Popen(
            [sys.executable, "-m", "tasktrail", "projections", "prune", "tasks", str(NOW)],
            env=env(database_url, RELEASE_N1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        waiting = (
            "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"  # this test's
        )
        with connect(database_url) as watcher:
            for _ in range(1200):
                if watcher.execute(waiting).fetchone()[0]:
                    break
                time.sleep(0.05)
        pruning.kill()
        pruning.communicate(timeout=30)
    with connect(database_url) as conn:
        assert conn.execute(
            "SELECT state FROM projection_versions WHERE name = 'tasks' AND version = %s", (NOW,)
        ).fetchone() == ("live",)
        assert conn.execute(
            "SELECT to_regnamespace(%s) IS NOT NULL", (projections.schema("tasks", NOW),)
        ).fetchone() == (True,)
    verified(database_url)
    done = tasktrail(database_url, "projections", "prune", "tasks", str(NOW), release=RELEASE_N1)
    assert done.returncode == 0, done.stderr
    assert f"tasks version {NEXT}" in verified(database_url, "--version", f"tasks={NEXT}")


def test_an_event_that_names_no_versions_is_marked_with_those_the_views_show(database_url: str) -> None:
    """A release before migration 0014 names no `projected` and writes the read models through the views of the
    newest live version; its events said tasks:1 whatever the views showed (audit: written into version 2,
    marked as in version 1, so no follower applied them to version 1, whose release served them stale)."""
    append = """INSERT INTO events (stream_id, version, type, data, occurred_at)
                VALUES (gen_random_uuid(), 1, 'TaskCreated', '{"task_type": "old"}', now()) RETURNING projected"""
    named = """INSERT INTO events (stream_id, version, type, data, occurred_at, projected)
               VALUES (gen_random_uuid(), 1, 'TaskCreated', '{"task_type": "old"}', now(), NULL) RETURNING projected"""
    done = tasktrail(database_url, "migrate", release=RELEASE_N1)  # builds tasks version NEXT beside NOW
    assert done.returncode == 0, done.stderr
    versions.prune(database_url, "tasks", NEXT)  # the views go back to NOW, which lacks nothing
    with connect(database_url) as conn:
        assert conn.execute(append).fetchone() == (f"stats:1,tasks:{NOW}",)
        assert "duration_seconds" not in [c.name for c in conn.execute("SELECT * FROM tasks LIMIT 0").description]
    done = tasktrail(database_url, "migrate", release=RELEASE_N1)  # NEXT again, from the log
    assert done.returncode == 0, done.stderr
    with connect(database_url) as conn:
        assert conn.execute(append).fetchone() == (f"stats:1,tasks:{NEXT}",)
        # A statement that names it keeps what it says, none included (eventstore.append writes no read model).
        assert conn.execute(named).fetchone() == (None,)

    # Pruning NEXT now would leave the views on NOW, which lacks those two events and which no process keeps
    # current (a pre-0014 release, rolled back to, then read it stale: audit).
    with pytest.raises(versions.Kept, match=f"would show tasks version {NOW} instead, which lacks 2 events"):
        versions.prune(database_url, "tasks", NEXT)
    # NOW can go; then NEXT is the last live version, which a prune of what is not this code's keeps (audit: it
    # dropped it, and the release that read it through the views answered 500), and status does not offer.
    versions.prune(database_url, "tasks", NOW)
    status = tasktrail(database_url, "projections", "status")
    assert f"tasks version {NEXT} is used by no process" not in status.stdout, status.stdout
    kept = tasktrail(database_url, "projections", "prune", "tasks")
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout == "nothing to prune: no version of tasks but this code's, or its last live one\n"


# The backends of every tasktrail server process on this database, and those holding a version's liveness lock.
SERVERS = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'tasktrail[%%'"
HOLDERS = """
SELECT DISTINCT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = hashtext(%s)::oid AND l.objid = hashtext(%s)::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def terminate(database_url: str, query: str, *params: str) -> int:
    with connect(database_url) as conn:
        pids = [pid for (pid,) in conn.execute(query, params).fetchall()]
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


def test_a_version_is_not_pruned_while_its_release_is_connected_and_readiness_says_when_it_was(
    database_url: str, tmp_path: Path, servers: list[Server]
) -> None:
    server = Server(env(database_url), log_dir=tmp_path)
    servers.append(server)
    tasks = projections.tasks
    assert httpx.post(f"{server.url}/tasks/", json={"task_type": "prune"}).status_code == 201  # its pool is connected

    # The connection holding the version's liveness lock drops (a blip): the process takes the lock
    # again as it reconnects, and meanwhile its pool's connections still say it serves the version.
    assert terminate(database_url, HOLDERS, versions.USES, f"{tasks.NAME}:{tasks.VERSION}") >= 1
    with pytest.raises(versions.InUse):
        versions.prune(database_url, tasks.NAME, tasks.VERSION)
    assert httpx.get(f"{server.url}/health/ready", timeout=10).status_code == 200

    # Every connection of the process drops, and the version is pruned before it reconnects: it cannot
    # write (its tables are gone) and says so to its readiness probe, not "ready".
    for _ in range(20):
        terminate(database_url, SERVERS)
        try:
            versions.prune(database_url, tasks.NAME, tasks.VERSION)
            break
        except versions.InUse:
            time.sleep(0.2)
    else:
        pytest.fail("the version could not be pruned in the moment its release was away")
    ready = httpx.get(f"{server.url}/health/ready", timeout=10)
    assert ready.status_code == 503
    assert ready.headers["content-type"] == "application/problem+json"
    assert "has no tables" in ready.json()["detail"]
    assert "restart" in ready.json()["detail"]
    assert httpx.post(f"{server.url}/tasks/", json={"task_type": "prune"}).status_code == 503


def test_a_release_whose_version_was_pruned_under_it_refuses_rather_than_use_the_newer_versions_tables(
    database_url: str, tmp_path: Path, servers: list[Server]
) -> None:
    # A process with no connection for a while (a database outage, then its reconnect backoff) shows
    # nothing of itself, so its version can be pruned while it runs. Its queries then used to fall through
    # to the log's views of the newest version: it served release N+1's rows and wrote its own shape into
    # them. It must refuse instead (503), until restarted.
    old = Server(env(database_url), log_dir=tmp_path)
    servers.append(old)
    made = httpx.post(f"{old.url}/tasks/", json={"task_type": "pruned"}).json()
    new = up(Starting(env(database_url, RELEASE_N1), log_dir=tmp_path))
    servers.append(new)
    mine = "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s"
    for _ in range(20):
        terminate(database_url, mine, f"tasktrail[{old.process.pid}]%")
        done = tasktrail(database_url, "projections", "prune", "tasks", str(NOW), release=RELEASE_N1)
        if done.returncode == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the version could not be pruned in the moment its release was away")
    with connect(database_url) as conn:
        before = conn.execute("SELECT count(*) FROM events").fetchone()

    for answer in (
        httpx.get(f"{old.url}/tasks/"),
        httpx.get(f"{old.url}/tasks/{made['task_id']}"),
        httpx.post(f"{old.url}/tasks/", json={"task_type": "pruned"}),
        httpx.patch(f"{old.url}/tasks/{made['task_id']}", json={"progress": 5}),
        httpx.post(f"{old.url}/tasks/batch", json={"tasks": [{"task_type": "pruned"}]}),
        httpx.get(f"{old.url}/health/ready", timeout=10),
    ):
        assert answer.status_code == 503, (answer.request.method, answer.request.url, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    with connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == before
    assert "Traceback" not in old.log()
    assert httpx.get(f"{old.url}/tasks/stats/summary").status_code == 200  # stats version 1 is both releases'
    assert "tasktrail_http_requests_total" in httpx.get(f"{old.url}/metrics").text  # its own figures still
    # Release N+1 is untouched, and psql still reads the newest version through the views.
    assert httpx.get(f"{new.url}/tasks/{made['task_id']}").json()["task_type"] == "pruned"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM tasks WHERE duration_seconds IS NULL").fetchone() == (1,)
    assert f"tasks version {NEXT}" in verified(database_url, "--version", f"tasks={NEXT}")
