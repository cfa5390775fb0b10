"""clients/python (tasktrail_client) against a real server: calls, errors, retries, workers, live streams."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tasktrail_client import (
    AsyncClient,
    Client,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    PreconditionFailed,
    RetryPolicy,
    Unauthorized,
    ValidationFailed,
)
from tasktrail_client._flows import later

from tests.conftest import Server, free_port
from tests.prom import scrape
from tests.proxy import CutAfter, DropAnswer, Proxy, Relay, cutting_database
from tests.test_clients.conftest import Keyed

QUICK = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05)
UNKNOWN = "0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f"


@pytest.fixture
def client(server: str) -> Iterator[Client]:
    with Client(server, retry=QUICK) as client:
        yield client


def dropping_first(server: str) -> Proxy:
    """A proxy that loses the answer to the first request (after the server has done it), then relays."""
    return Proxy(server, lambda n: DropAnswer() if n == 0 else Relay())


def test_the_calls_answer_typed_results(client: Client, kind: str) -> None:
    task = client.create(kind, {"file_path": "/tmp/test.pdf"})
    assert (task.status, task.task_type, task.params, task.version) == (
        "pending",
        kind,
        {"file_path": "/tmp/test.pdf"},
        1,
    )
    assert client.get(task.task_id) == task
    assert (task["status"], task.as_dict()["task_type"]) == ("pending", kind)  # as with the JSON, too
    running = client.update(task.task_id, {"status": "running"}, progress=40)
    assert (running.status, running.progress, running.version) == ("running", 40.0, 2)
    assert running.started_at is not None
    assert running.started_at.tzinfo is not None
    done = client.update(task.task_id, status="completed", result={"pages": 3}, if_version=2)
    assert (done.status, done.progress, done.result, done.finished) == ("completed", 100.0, {"pages": 3}, True)

    # time travel and history
    assert client.get(task.task_id, version=2) == running
    assert client.get(task.task_id, as_of=running.updated_at) == running
    history = client.history(task.task_id)
    assert [e.type for e in history] == ["TaskCreated", "TaskStarted", "TaskCompleted"]
    assert history[0].data == {"task_type": kind, "params": {"file_path": "/tmp/test.pdf"}}
    assert {history.task_id, *(e.task_id for e in history)} == {task.task_id}
    assert [e.type for e in client.history(task.task_id, after_version=1, page_size=1)] == [
        "TaskStarted",
        "TaskCompleted",
    ]

    other = client.create(kind)
    stats = client.stats(kind)
    assert (stats.total, stats.pending, stats.completed, stats["completed"]) == (2, 1, 1, 1)
    client.delete(other.task_id)
    with pytest.raises(NotFound, match="deleted"):
        client.get(other.task_id)
    assert [e.type for e in client.history(other.task_id)] == ["TaskCreated", "TaskDeleted"]
    assert client.cleanup(days=0) >= 1
    assert client.stats(kind).total == 0
    assert [e.data["reason"] for e in client.history(task.task_id)[3:]] == ["retention"]


def test_list_follows_the_link_header_page_by_page(client: Client, kind: str) -> None:
    made = [client.create(kind, {"i": i}) for i in range(7)]
    newest_first = [t.task_id for t in reversed(made)]
    assert [t.task_id for t in client.list(task_type=kind, page_size=3)] == newest_first
    assert [t.task_id for t in client.list(task_type=kind, page_size=1000)] == newest_first
    # More than the service sends on a page: pages of its most, not a 422.
    assert [t.task_id for t in client.list(task_type=kind, page_size=5000)] == newest_first
    assert len(client.history(made[0].task_id, page_size=10**6).events) == 1
    with pytest.raises(ValueError, match="page_size"):
        next(client.list(task_type=kind, page_size=0))
    client.update(made[1].task_id, status="running")
    client.update(made[4].task_id, status="running")
    assert [t.params["i"] for t in client.list(status="running", task_type=kind, page_size=1)] == [4, 1]
    pages = client.list(task_type=kind, page_size=3)
    assert next(pages).task_id == newest_first[0]  # an iterator: pages are fetched as it goes


def test_the_feed_is_an_iterator_that_resumes_from_a_cursor(client: Client, kind: str) -> None:
    head = None
    for event in client.events(page_size=5000):
        head = event.cursor
    first = client.create(kind)
    client.update(first.task_id, progress=5)
    events = list(client.events(after=head, page_size=1))
    assert [(e.task_id, e.type) for e in events] == [
        (first.task_id, "TaskCreated"),
        (first.task_id, "ProgressReported"),
    ]
    assert all(e.cursor for e in events)
    second = client.create(kind)
    assert [(e.task_id, e.version) for e in client.events(after=events[-1].cursor)] == [(second.task_id, 1)]

    followed = client.events(after=events[-1].cursor, follow=True, poll_interval=0.05)
    assert next(followed).task_id == second.task_id
    creating = threading.Timer(0.1, client.create, args=(kind,))
    creating.start()
    later_one = next(followed)  # waited at the head for the next event
    # The feed can show the event before the create's answer arrives: let it arrive before the client closes.
    creating.join()
    assert (later_one.type, later_one.data["task_type"]) == ("TaskCreated", kind)


def test_refusals_are_exceptions_carrying_the_problem(client: Client, kind: str) -> None:
    with pytest.raises(NotFound) as missing:
        client.get(UNKNOWN)
    assert (missing.value.status, missing.value.title, missing.value.type) == (404, "Not Found", "/problems/not-found")
    assert UNKNOWN in missing.value.detail

    task = client.create(kind)
    client.update(task.task_id, status="completed")
    with pytest.raises(Conflict) as conflict:
        client.update(task.task_id, progress=10)
    assert (conflict.value.status, conflict.value.current_status, conflict.value.allowed) == (409, "completed", [])

    other = client.create(kind)
    with pytest.raises(PreconditionFailed) as stale:
        client.update(other.task_id, status="running", if_version=7)
    assert stale.value.status == 412
    with pytest.raises(PreconditionFailed):
        client.delete(other.task_id, if_version=3)

    with pytest.raises(ValidationFailed) as invalid:
        client.update(other.task_id, status="exploded")
    assert (invalid.value.status, list(invalid.value.fields)) == (422, ["status"])
    with pytest.raises(ValidationFailed) as invalid:
        client.create("x" * 201)
    assert "task_type" in invalid.value.fields
    with pytest.raises(ValueError, match="at least one"):
        client.update(other.task_id)


def test_a_create_whose_answer_is_lost_is_retried_into_one_task(server: str, client: Client, kind: str) -> None:
    # The first connection carries the create to the server, which commits it and answers; the proxy
    # then closes the connection without passing the answer on. The client retries under the same key.
    with dropping_first(server) as proxy, Client(proxy.url, retry=QUICK) as lossy:
        task = lossy.create(kind, {"order": 42})
        assert proxy.dropped == [0]
    assert [t.task_id for t in client.list(task_type=kind)] == [task.task_id]
    assert [e.type for e in client.history(task.task_id)] == ["TaskCreated"]

    # When every answer is lost, the client gives up after its bounded attempts, all under one key.
    with Proxy(server, lambda n: DropAnswer()) as proxy, Client(proxy.url, retry=QUICK) as lossy:
        with pytest.raises(ConnectionFailed):
            lossy.create(kind, idempotency_key=f"{kind}-always-lost")
        assert proxy.dropped == [0, 1, 2, 3, 4]
    assert client.stats(kind).total == 2


def test_a_conditional_write_whose_answer_is_lost_is_recognised_as_its_own(
    server: str, client: Client, kind: str
) -> None:
    task = client.create(kind)
    # The repeat meets a 412 (the first attempt moved the version): the history shows it was this write.
    with dropping_first(server) as proxy, Client(proxy.url, retry=QUICK) as lossy:
        updated = lossy.update(task.task_id, status="running", progress=30, if_version=1)
        assert proxy.dropped == [0]
    assert (updated.version, updated.status, updated.progress) == (2, "running", 30.0)
    with dropping_first(server) as proxy, Client(proxy.url, retry=QUICK) as lossy:
        lossy.delete(task.task_id, if_version=2)
        assert proxy.dropped == [0]
    assert [e.type for e in client.history(task.task_id)] == ["TaskCreated", "TaskStarted", "TaskDeleted"]


def test_an_update_whose_answer_is_lost_is_applied_once_though_another_writer_acts_before_the_retry(
    server: str, client: Client, kind: str
) -> None:
    task = client.create(kind)
    client.update(task.task_id, status="running")
    client.update(task.task_id, status="failed", error="boom")

    def plan(connection: int) -> DropAnswer | Relay:
        if connection == 1:  # the client's next request, after its first answer was lost
            client.update(task.task_id, status="running")  # meanwhile another worker claims the requeued task
        return DropAnswer() if connection == 0 else Relay()

    with Proxy(server, plan) as proxy, Client(proxy.url, retry=QUICK) as lossy:
        requeued = lossy.update(task.task_id, status="pending")
        assert proxy.dropped == [0]
        # Where the lost write committed no token says: reads go to the primary until the next write.
        assert lossy.read_after == "primary"
    # Sent again, "pending" would have requeued the other worker's claim: it was found in the history instead.
    assert (requeued.status, requeued.retry_count, requeued.version) == ("pending", 1, 4)
    assert [e.type for e in client.history(task.task_id)][3:] == ["TaskRetried", "TaskStarted"]
    assert client.get(task.task_id).status == "running"
    # A lost answer to a change not in the history (here a no-op; it might also be one still on its way):
    # the outcome is unknown, and the change is not sent again.
    with httpx.Client(base_url=server) as plain:
        before = scrape(plain).total("tasktrail_http_requests_total", method="PATCH")
        with dropping_first(server) as proxy, Client(proxy.url, retry=QUICK) as lossy:
            with pytest.raises(ConnectionFailed, match="not in the task's history"):
                lossy.update(task.task_id, status="running")
            assert proxy.dropped == [0]
        assert scrape(plain).total("tasktrail_http_requests_total", method="PATCH") == before + 1
    assert client.get(task.task_id).version == 5


def test_an_update_the_server_cut_off_at_its_database_is_found_in_the_history_not_sent_again(
    database_url: str, tmp_path: Path, kind: str
) -> None:
    # Audit: the server's 503 to a write whose database connection was lost after the statement went was
    # retried like any 503, so a change made once was sent twice. It says "outcome": "unknown" now.
    with cutting_database(database_url, b"cut-here") as proxied:
        server = Server(os.environ | {"DATABASE_URL": proxied}, log_dir=tmp_path)
        try:
            with Client(server.url, retry=QUICK) as client:
                task = client.create(kind)
                updated = client.update(task.task_id, result={"note": "cut-here"})
                assert (updated.version, updated.result) == (2, {"note": "cut-here"})
                assert client.read_after == "primary"  # the write's position is known to no token
                with httpx.Client(base_url=server.url) as plain:
                    assert (
                        scrape(plain).value(
                            "tasktrail_http_requests_total", method="PATCH", route="/tasks/{task_id}", status="503"
                        )
                        == 1
                    )
                    assert scrape(plain).total("tasktrail_http_requests_total", method="PATCH") == 1
        finally:
            server.stop()


def test_a_run_marks_the_task_running_throttles_progress_and_completes_it(client: Client, kind: str) -> None:
    task = client.create(kind)
    calls = 500
    started = time.monotonic()
    with client.run(task.task_id, progress_interval=0.2) as run:
        assert client.get(task.task_id).status == "running"
        for i in range(calls):
            run.progress(i * 77 / (calls - 1))  # ends at 77
        run.result = {"files_processed": 10}
    elapsed = time.monotonic() - started
    done = client.get(task.task_id)
    assert (done.status, done.result, done.progress) == ("completed", {"files_processed": 10}, 100.0)
    assert run.task == done
    history = client.history(task.task_id)
    reports = [e for e in history if e.type == "ProgressReported"]
    # At most one report per interval (and the last, sent as the block ends), never one per call.
    assert 1 <= len(reports) <= elapsed / 0.2 + 2 < calls
    assert reports[-1].data["progress"] == 77.0  # the latest value wins, and is always sent
    assert [history[0].type, history[1].type, history[-1].type] == ["TaskCreated", "TaskStarted", "TaskCompleted"]


def fail_inside_a_run(client: Client, task_id: str, error: BaseException) -> None:
    with client.run(task_id) as run:
        run.progress(10)
        raise error


def test_a_failing_block_fails_the_task_with_the_exception_text_and_raises_it(client: Client, kind: str) -> None:
    task = client.create(kind)
    with pytest.raises(OSError, match="disk full"):
        fail_inside_a_run(client, task.task_id, OSError("disk full"))
    failed = client.get(task.task_id)
    assert (failed.status, failed.error, failed.progress) == ("failed", "disk full", 10.0)

    # An interrupted worker gives the task back for another, rather than failing it.
    again = client.create(kind)
    with pytest.raises(KeyboardInterrupt):
        fail_inside_a_run(client, again.task_id, KeyboardInterrupt())
    given_back = client.get(again.task_id)
    assert (given_back.status, given_back.retry_count, given_back.progress) == ("pending", 1, 10.0)

    with pytest.raises(Conflict):
        client.run(task.task_id).__enter__()  # a finished task cannot be run
    # A task already running is taken as it is (no event), but with no claim to it: a change by someone
    # else (maybe the worker that claimed it) stops it, where a run that claimed its task writes over one.
    running = client.create(kind)
    client.update(running.task_id, status="running")

    def share() -> None:
        with client.run(running.task_id) as run:
            assert run.task is not None
            assert run.task.version == 2
            client.update(running.task_id, progress=50)  # the claiming worker
            run.result = {"done": 3}

    with pytest.raises(PreconditionFailed):
        share()
    assert (client.get(running.task_id).status, client.get(running.task_id).progress) == ("running", 50.0)

    # An exception whose text cannot be made still fails the task (it was left running), and is raised.
    class Unspeakable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    third = client.create(kind)
    with pytest.raises(Unspeakable):
        fail_inside_a_run(client, third.task_id, Unspeakable())
    assert (client.get(third.task_id).status, client.get(third.task_id).error) == ("failed", "Unspeakable")


def test_a_result_the_server_refuses_fails_the_task_instead_of_leaving_it_running(client: Client, kind: str) -> None:
    """Finding: a refused completion raised from the block's end and left the task running for ever."""
    for result, error in (
        ({"big": "x" * 70_000}, ValidationFailed),
        ([1, 2], ValidationFailed),
        ({"o": object()}, TypeError),
    ):
        task = client.create(kind)
        with pytest.raises(error), client.run(task.task_id) as run:
            run.result = result  # type: ignore[assignment]
        failed = client.get(task.task_id)
        assert failed.status == "failed", result
        assert failed.error

    # An exception whose text holds a lone surrogate (a file name decoded with surrogateescape) is recorded.
    task = client.create(kind)
    with pytest.raises(OSError, match="cannot read"):
        fail_inside_a_run(client, task.task_id, OSError("cannot read /data/caf\udce9.txt"))
    failed = client.get(task.task_id)
    assert (failed.status, failed.error) == ("failed", "cannot read /data/caf\\udce9.txt")


def test_a_run_does_not_overwrite_a_task_someone_else_changed(client: Client, kind: str) -> None:
    task = client.create(kind)

    def work() -> None:
        with client.run(task.task_id) as run:
            client.update(task.task_id, status="canceled")  # an operator cancels it meanwhile
            run.result = {"done": True}

    with pytest.raises(PreconditionFailed):
        work()
    assert client.get(task.task_id).status == "canceled"


def test_a_run_completes_a_task_someone_else_only_annotated_meanwhile(client: Client, kind: str) -> None:
    # Audit: any change by someone else (a note in the result, progress) made the run's last write a 412,
    # and the task stayed running for ever with the run's result lost.
    task = client.create(kind)
    with client.run(task.task_id, progress_interval=0.01) as run:
        run.progress(10)
        client.update(task.task_id, result={"note": "operator"})
        client.update(task.task_id, progress=11)
        run.progress(20)
        run.result = {"done": 1}
    done = client.get(task.task_id)
    assert (done.status, done.result, done.retry_count) == ("completed", {"done": 1}, 0)
    # A task requeued and claimed again by another worker meanwhile is not this run's to complete.
    taken = client.create(kind)

    def work() -> None:
        with client.run(taken.task_id) as run:
            client.update(taken.task_id, status="pending")
            client.update(taken.task_id, status="running")
            run.result = {"done": 2}

    with pytest.raises(PreconditionFailed):
        work()
    assert (client.get(taken.task_id).status, client.get(taken.task_id).result) == ("running", None)


def test_watch_follows_a_task_and_resumes_after_a_dropped_connection(server: str, client: Client, kind: str) -> None:
    task = client.create(kind)

    def work() -> None:
        client.update(task.task_id, status="running")
        for progress in (10, 20, 30, 40, 50):
            client.update(task.task_id, progress=progress)
        client.update(task.task_id, status="completed", result={"rows": 5})

    # The first stream is cut after `retry:`, the snapshot and two events; the client reconnects.
    with (
        Proxy(server, lambda n: CutAfter(4) if n == 0 else Relay()) as proxy,
        Client(proxy.url, retry=QUICK) as watcher,
    ):
        changes = []
        for change in watcher.watch(task.task_id):
            changes.append(change)
            if change.type == "snapshot":
                threading.Thread(target=work).start()
        assert proxy.dropped == [0]
    assert [c.type for c in changes] == ["snapshot", "TaskStarted", *["ProgressReported"] * 5, "TaskCompleted"]
    assert [c.task.version for c in changes] == list(range(1, 9))  # nothing missed, nothing twice
    assert changes[-1].task == client.get(task.task_id)  # folded as the server folds it
    assert (changes[0].event, changes[-1].event.type) == (None, "TaskCompleted")


def test_watch_ends_at_once_on_a_finished_task_and_follows_a_deletion(client: Client, kind: str) -> None:
    done = client.create(kind)
    client.update(done.task_id, status="failed", error="no")
    assert [(c.type, c.task.status) for c in client.watch(done.task_id)] == [("snapshot", "failed")]
    gone = client.create(kind)
    client.delete(gone.task_id)
    assert [(c.type, c.task) for c in client.watch(gone.task_id)][-1] == ("TaskDeleted", None)
    with pytest.raises(NotFound):
        list(client.watch(UNKNOWN))


async def fail_inside_an_async_run(client: AsyncClient, task_id: str) -> None:
    async with client.run(task_id):
        raise RuntimeError("boom")


@pytest.mark.anyio
async def test_the_async_client_does_the_same(server: str, kind: str) -> None:
    async with AsyncClient(server, retry=QUICK) as client:
        task = await client.create(kind, {"n": 1})
        assert (await client.get(task.task_id)).version == 1
        async with client.run(task.task_id, progress_interval=0.05) as run:
            for i in range(100):
                run.progress(i)
            run.result = {"ok": True}
        assert (await client.get(task.task_id)).status == "completed"
        history = await client.history(task.task_id)
        assert [e.data["progress"] for e in history if e.type == "ProgressReported"][-1] == 99.0
        assert [c.type async for c in client.watch(task.task_id)] == ["snapshot"]
        assert [t.task_id async for t in client.list(task_type=kind, page_size=1)] == [task.task_id]
        assert (await client.stats(kind)).completed == 1

        failing = await client.create(kind)
        with pytest.raises(RuntimeError, match="boom"):
            await fail_inside_an_async_run(client, failing.task_id)
        assert (await client.get(failing.task_id)).error == "boom"
        refused = await client.create(kind)
        with pytest.raises(ValidationFailed):
            async with client.run(refused.task_id) as run:
                run.result = {"big": "x" * 70_000}
        assert (await client.get(refused.task_id)).status == "failed"
        with pytest.raises(NotFound):
            await client.get(UNKNOWN)


@pytest.mark.anyio
async def test_an_async_worker_cancelled_twice_still_gives_its_task_back(server: str, kind: str) -> None:
    # Audit: the second cancel interrupted the run's last write, and the task stayed running for ever.
    async with AsyncClient(server, retry=QUICK) as client:
        task = await client.create(kind)
        inside = asyncio.Event()

        async def worker() -> None:
            async with client.run(task.task_id):
                inside.set()
                await asyncio.sleep(60)

        running = asyncio.create_task(worker())
        await asyncio.wait_for(inside.wait(), 30)
        running.cancel()
        await asyncio.sleep(0)  # the run has begun to record its end
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        for _ in range(100):  # the shielded write goes on after the worker is gone
            now = await client.get(task.task_id)
            if now.status != "running":
                break
            await asyncio.sleep(0.05)
        assert (now.status, now.retry_count) == ("pending", 1)


@pytest.mark.anyio
async def test_more_watches_than_httpx_connections_leave_room_for_other_calls(server: str, kind: str) -> None:
    # Audit: httpx's default pool (100 connections) went to 100 watches; the next call waited until it failed.
    async with AsyncClient(server, retry=QUICK, timeout=httpx.Timeout(5.0)) as client:
        task = await client.create(kind)
        following = asyncio.Semaphore(0)

        async def follow() -> list[str]:
            seen = []
            async for change in client.watch(task.task_id):
                seen.append(change.task.status)
                if len(seen) == 1:
                    following.release()
            return seen

        watches = [asyncio.create_task(follow()) for _ in range(105)]
        for _ in watches:
            await asyncio.wait_for(following.acquire(), 30)
        assert (await client.update(task.task_id, status="completed")).version == 2
        assert [await watch for watch in watches] == [["pending", "completed"]] * 105


@pytest.mark.anyio
async def test_the_async_client_retries_a_lost_create_and_resumes_a_watch(server: str, kind: str) -> None:
    with dropping_first(server) as proxy:
        async with AsyncClient(proxy.url, retry=QUICK) as client:
            task = await client.create(kind)
        assert proxy.dropped == [0]
    async with AsyncClient(server) as direct:
        assert [t.task_id async for t in direct.list(task_type=kind)] == [task.task_id]
        with Proxy(server, lambda n: CutAfter(3) if n == 0 else Relay()) as proxy:
            async with AsyncClient(proxy.url, retry=QUICK) as client:
                seen = []
                async for change in client.watch(task.task_id):
                    seen.append(change.task.version)
                    if change.type == "snapshot":
                        await direct.update(task.task_id, status="running")
                        await direct.update(task.task_id, progress=50)
                        await direct.update(task.task_id, status="completed")
            assert proxy.dropped == [0]
        events = [e.type async for e in direct.events() if e.task_id == task.task_id]
    assert seen == [1, 2, 3, 4]
    assert events == ["TaskCreated", "TaskStarted", "ProgressReported", "TaskCompleted"]


def test_the_api_key_is_sent_as_a_bearer_token(keyed_server: Keyed) -> None:
    with Client(keyed_server.url, api_key=keyed_server.keys["write"]) as worker:
        task = worker.create("import")
        assert worker.history(task.task_id)[0].metadata["actor"] == "worker"
        worker.update(task.task_id, status="canceled")
        assert [c.task.status for c in worker.watch(task.task_id)] == ["canceled"]  # the stream takes the key too
        task = worker.get(task.task_id)
    with Client(keyed_server.url, api_key=keyed_server.keys["read"]) as reader:
        assert reader.get(task.task_id) == task
        with pytest.raises(Forbidden):
            reader.create("import")
    with Client(keyed_server.url) as nobody, pytest.raises(Unauthorized) as refused:
        nobody.get(task.task_id)
    assert refused.value.headers.get("www-authenticate", "").startswith("Bearer")


def test_a_key_no_request_could_carry_is_refused_at_once_not_retried_as_a_network_failure() -> None:
    for key in ("", "tt_a key", "tt_key\r\nX-Admin: 1", "tt_ключ"):  # an unset variable read as "", ...
        with pytest.raises(ValueError, match="api_key"):
            Client("http://127.0.0.1:1", api_key=key)
        with pytest.raises(ValueError, match="api_key"):
            AsyncClient("http://127.0.0.1:1", api_key=key)


def test_a_task_id_that_would_name_another_route_is_refused_before_it_is_sent(
    server: str, client: Client, kind: str
) -> None:
    # Audit: get("") read the task list, get("..") a redirect, update("batch", ...) was a batch PATCH.
    with httpx.Client(base_url=server) as plain:
        before = scrape(plain).total("tasktrail_http_requests_total")
        for task_id in ("", ".", "..", "batch", "stats", "a/b", UNKNOWN + "x"):
            for call in (client.get, client.delete, client.history, lambda t: client.update(t, progress=1)):
                with pytest.raises(ValueError, match="is not a task id"):
                    call(task_id)
        for key in ("ключ", "a\nb", "a b", "k" * 256):
            with pytest.raises(ValueError, match="Idempotency-Key"):
                client.create(kind, idempotency_key=key)
        assert scrape(plain).total("tasktrail_http_requests_total") == before + 1  # the first scrape's
    task = client.create(kind)
    assert client.get(task.task_id.upper()).task_id == task.task_id  # any spelling of a UUID is one


def test_retry_delays_grow_are_jittered_and_bounded() -> None:
    policy = RetryPolicy(attempts=10, base_delay=0.1, max_delay=1.0)
    for failures in range(1, 10):
        ceiling = min(1.0, 0.1 * 2 ** (failures - 1))
        delays = {policy.delay(failures) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1
    assert policy.delay(1, retry_after="1") == 1.0
    assert policy.delay(1, retry_after="120") == 1.0  # never longer than max_delay


def test_read_after_tokens_only_move_forward() -> None:
    assert later(None, "0/16B3F28") == "0/16B3F28"
    assert later("0/16B3F28", "0/16B3F00") == "0/16B3F28"
    assert later("0/16B3F28", "1/0") == "1/0"
    assert later("opaque-1", "opaque-0") == "opaque-0"  # not WAL positions: the newest wins


def test_an_unreachable_server_is_a_connection_error_after_bounded_retries() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", retry=QUICK) as client, pytest.raises(ConnectionFailed) as failed:
        client.get(UNKNOWN)
    assert isinstance(failed.value.__cause__, httpx.ConnectError)


def test_batch_writes_create_all_at_once_and_answer_per_item(server: str, client: Client, kind: str) -> None:
    made = client.create_many([{"task_type": kind, "params": {"i": 0}}, kind, {"task_type": kind}])
    assert [(t.task_type, t.params, t.version) for t in made] == [(kind, {"i": 0}, 1), (kind, None, 1), (kind, None, 1)]
    again = client.create_many([kind], idempotency_key=f"{kind}-batch")
    assert client.create_many([kind], idempotency_key=f"{kind}-batch") == again  # one batch, however often sent
    with dropping_first(server) as proxy, Client(proxy.url, retry=QUICK) as lossy:
        lost = lossy.create_many([kind, kind])
        assert proxy.dropped == [0]
    assert client.stats(kind).total == 3 + 1 + 2
    with pytest.raises(ValidationFailed):
        client.create_many([])

    first, second, third = made
    client.update(third.task_id, status="completed")
    results = client.update_many(
        [
            {"task_id": first.task_id, "status": "running", "progress": 10},
            {"task_id": first.task_id, "progress": 20},  # decided after the item before it
            {"task_id": UNKNOWN, "progress": 5},
            {"task_id": third.task_id, "progress": 5},
            {"task_id": second.task_id, "progress": 5, "if_version": 9},
            {"task_id": lost[0].task_id, "delete": True},
        ]
    )
    assert [r.status for r in results] == [200, 200, 404, 409, 412, 200]
    assert (results[1].task.version, results[1].task.progress, results[1].ok) == (3, 20.0, True)
    assert (results[3].problem["current_status"], results[5].deleted) == ("completed", True)
    assert [type(r.error).__name__ for r in results[2:5]] == ["NotFound", "Conflict", "PreconditionFailed"]
    with pytest.raises(Conflict):
        results[3].raise_for_status()
    results[0].raise_for_status()  # nothing to raise

    # A conditional batch whose answer is lost: the repeat's 412s are recognised as its own writes.
    with dropping_first(server) as proxy, Client(proxy.url, retry=QUICK) as lossy:
        again = lossy.update_many(
            [
                {"task_id": second.task_id, "status": "running", "if_version": 1},
                {"task_id": lost[1].task_id, "delete": True, "if_version": 1},
            ]
        )
        assert proxy.dropped == [0]
    assert [(r.status, r.ok) for r in again] == [(200, True), (200, True)]
    assert (again[0].task.status, again[0].task.version, again[1].deleted) == ("running", 2, True)
    assert [e.type for e in client.history(second.task_id)] == ["TaskCreated", "TaskStarted"]

    # A batch naming a task twice is not sent again after a lost answer: it would apply both again.
    # Also when the two spell its id differently (the server reads them as one task).
    for spelling in (str, lambda task_id: str(task_id).upper()):
        with dropping_first(server) as proxy, Client(proxy.url, retry=QUICK) as lossy:
            with pytest.raises(ConnectionFailed):
                lossy.update_many(
                    [
                        {"task_id": second.task_id, "status": "pending"},
                        {"task_id": spelling(second.task_id), "status": "running"},
                    ]
                )
            assert proxy.dropped == [0]
    types = [e.type for e in client.history(second.task_id)]
    assert types == ["TaskCreated", "TaskStarted", *["TaskRequeued", "TaskStarted"] * 2]
