"""The blocking client: `Client(base_url, api_key=None)`, and `Run` for workers."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar

import httpx

from tasktrail_client import _flows as flows
from tasktrail_client.errors import TasktrailError
from tasktrail_client.models import Change, Event, History, ItemResult, Stats, Task

T = TypeVar("T")

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# A watch holds a connection for as long as it follows its task: watches have a pool of their own, without
# a bound, so 100 of them leave the calls theirs (httpx's default of 100 connections, which also keeps a
# burst of calls from opening more).
STREAMS = httpx.Limits(max_connections=None, max_keepalive_connections=0)
# A stream is quiet between events; the server pings every 15 s, so a longer silence is a dead connection.
STREAM_TIMEOUT = httpx.Timeout(10.0, connect=5.0, read=60.0)


class Client:
    """tasktrail over HTTP. Every call raises an `ApiError` subclass when the server refuses it.

    with Client("http://127.0.0.1:8000") as client:
        task = client.create("document_process", {"file_path": "/tmp/test.pdf"})
        for change in client.watch(task.task_id):
            print(change.task.status, change.task.progress)
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: flows.RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.session = flows.Session(api_key, retry or flows.RetryPolicy())
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)
        self._streams = self._http
        if transport is None:
            self._streams = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, limits=STREAMS)

    def close(self) -> None:
        try:
            self._http.close()
        finally:
            self._streams.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def read_after(self) -> str | None:
        """The `Tasktrail-Read-After` token of the last write, sent with every read after it."""
        return self.session.read_after

    # -- tasks

    def create(
        self, task_type: str, params: dict[str, Any] | None = None, *, idempotency_key: str | None = None
    ) -> Task:
        """Create a task. Retried on 503 and connection errors under one Idempotency-Key (made up when not
        given), so a retry after a lost answer returns the first attempt's task instead of making another."""
        return self._call(flows.create(self.session, task_type, params, idempotency_key))

    def create_many(
        self, tasks: Iterable[Mapping[str, Any] | str], *, idempotency_key: str | None = None
    ) -> list[Task]:
        """Create 1 to 1,000 tasks at once, all or none (`{"task_type", "params"}` each, or a task type)."""
        return self._call(flows.create_many(self.session, tasks, idempotency_key))

    def get(self, task_id: str, *, version: int | None = None, as_of: datetime | str | None = None) -> Task:
        """The task now, or as it was at a version or a time (folded from its history)."""
        return self._call(flows.get(self.session, str(task_id), version, as_of))

    def list(self, status: str | None = None, task_type: str | None = None, page_size: int = 100) -> Iterator[Task]:
        """Live tasks, newest first, page after page (following the `Link` header) as you iterate."""
        return self._iterate(flows.list_tasks(self.session, status, task_type, page_size))

    def update(
        self,
        task_id: str,
        changes: Mapping[str, Any] | None = None,
        *,
        status: str | None = None,
        progress: float | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        if_version: int | None = None,
    ) -> Task:
        """Change a task (`changes` as a PATCH body, or the keywords); with `if_version` only if it is still at
        that version (else `PreconditionFailed`)."""
        body = dict(changes or {}) | flows.changes(status, progress, result, error)
        return self._call(flows.update(self.session, str(task_id), body, if_version))

    def update_many(self, updates: Iterable[Mapping[str, Any]]) -> list[ItemResult]:
        """1 to 1,000 changes (`{"task_id", "status"?, "progress"?, "result"?, "error"?, "if_version"?}`), each
        decided on its own; one result per item, in order (see `ItemResult.ok` and `.raise_for_status()`)."""
        return self._call(flows.update_many(self.session, updates))

    def delete(self, task_id: str, *, if_version: int | None = None) -> None:
        """Delete a task (its history is kept)."""
        self._call(flows.delete(self.session, str(task_id), if_version))

    def history(self, task_id: str, *, after_version: int = 0, page_size: int = 1000) -> History:
        """The task's events in version order (all pages), deleted tasks too."""
        return self._call(flows.history(self.session, str(task_id), after_version, page_size))

    def stats(self, task_type: str | None = None) -> Stats:
        return self._call(flows.stats(self.session, task_type))

    def cleanup(self, days: int = 30) -> int:
        """Delete finished tasks completed more than `days` days ago (needs an admin key); how many."""
        return self._call(flows.cleanup(self.session, days))

    def events(
        self, after: str | None = None, *, page_size: int = 100, follow: bool = False, poll_interval: float = 1.0
    ) -> Iterator[Event]:
        """The global feed after a cursor (from the start without one), each event with its `cursor`.

        Stops at the feed's head, or with `follow=True` waits there for more, polling.
        """
        return self._iterate(flows.events(self.session, after, page_size, follow, poll_interval))

    def watch(self, task_id: str, *, reconnects: int = 10) -> Iterator[Change]:
        """The task now, then each change as it commits, until it finishes or is deleted (SSE).

        A dropped connection is made again, resuming after the last event seen.
        """
        return self._iterate(flows.watch(self.session, str(task_id), reconnects))

    def run(self, task_id: str, *, progress_interval: float = 0.25) -> Run:
        """`with client.run(task_id) as run:` marks the task running; see `Run`."""
        return Run(self, str(task_id), progress_interval)

    # -- the driver

    def _call(self, flow: flows.Flow[T]) -> T:
        steps = self._iterate(flow)
        try:
            value = next(steps)
        except StopIteration as stop:
            return stop.value
        raise AssertionError(f"a call emitted {value!r}")

    def _iterate(self, flow: flows.Flow[Any]) -> Any:
        """Run a flow's steps; yields what it emits, returns what it returns."""
        streams: dict[int, tuple[httpx.Response, Iterator[str]]] = {}
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    step = flow.throw(error) if error is not None else flow.send(value)
                except StopIteration as stop:
                    return stop.value
                value, error = None, None
                if isinstance(step, flows.Emit):
                    yield step.value
                    continue
                try:
                    value = self._do(step, streams)
                except httpx.TransportError as exc:
                    error = exc
        finally:
            flow.close()
            for response, _lines in streams.values():
                response.close()

    def _do(self, step: flows.Step, streams: dict[int, tuple[httpx.Response, Iterator[str]]]) -> Any:
        match step:
            case flows.Request():
                request = self._http.build_request(
                    step.method,
                    step.path,
                    params=step.params,
                    json=step.json,
                    headers=self.session.headers_for(step),
                    timeout=STREAM_TIMEOUT if step.stream else httpx.USE_CLIENT_DEFAULT,
                )
                response = (self._streams if step.stream else self._http).send(request, stream=step.stream)
                if step.stream:
                    if response.status_code == 200:
                        streams[id(response)] = (response, response.iter_lines())
                    else:
                        response.read()
                        response.close()
                self.session.observe(step, response)
                return response
            case flows.NextLine(response=response):
                _, lines = streams[id(response)]
                try:
                    return next(lines)
                except (StopIteration, httpx.TransportError) as end:
                    # Done with this connection either way: the flow reconnects or ends.
                    streams.pop(id(response))
                    response.close()
                    if isinstance(end, StopIteration):
                        return None
                    raise
            case flows.Sleep(seconds=seconds):
                time.sleep(seconds)
                return None
        raise AssertionError(f"unknown step {step!r}")


class Run:
    """A worker's hold on a task, for a `with` block.

    Entering marks the task running: a pending task is claimed (moved to running
    under If-Match: `PreconditionFailed` if another worker claimed it first), a
    task already running is taken as it is, a finished one is a `Conflict`.
    `progress(p)` reports progress at most
    once per `progress_interval` seconds from a background thread: the latest
    value wins, and the last one is sent before the block ends. Leaving the
    block completes the task with `run.result`; an exception fails it with the
    exception's text and is raised again; an interruption (KeyboardInterrupt,
    SystemExit) puts the task back to pending for another worker. Every write
    after the first is conditional on the version this run last saw (If-Match),
    so a task taken away meanwhile by someone else (canceled, requeued) is not
    overwritten: the write raises `PreconditionFailed` or `Conflict` instead
    (flows.run_write: a run that claimed its task writes over a change that
    leaves it the task, such as a note in its result).
    """

    def __init__(self, client: Client, task_id: str, progress_interval: float) -> None:
        self.client, self.task_id, self.interval = client, task_id, progress_interval
        self.result: dict[str, Any] | None = None
        self.task: Task | None = None
        self._claimed = False  # whether entering moved the task to running (flows.claim)
        self._pending: float | None = None
        self._closing = False
        self._error: TasktrailError | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._report, name=f"tasktrail-progress-{task_id}", daemon=True)

    def __enter__(self) -> Run:
        self.task, self._claimed = self.client._call(flows.claim(self.client.session, self.task_id))
        self._thread.start()
        return self

    def progress(self, progress: float) -> None:
        """Report progress (0 to 100); sent soon, in the background. Raises what the last report met."""
        value = flows.check_progress(progress)
        if self._error is not None:
            raise self._error
        with self._wake:
            self._pending = value
            self._wake.notify()

    def _report(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending is not None or self._closing)
                value, self._pending = self._pending, None
            if value is None:
                return
            if self._error is None:
                try:
                    self.task = self._write({"progress": value})
                except TasktrailError as exc:
                    self._error = exc
            with self._wake:
                # The throttle: nothing more for `interval`, unless the block is ending.
                self._wake.wait_for(lambda: self._closing, timeout=self.interval)

    def _write(self, body: dict[str, Any]) -> Task:
        assert self.task is not None
        return self.client._call(flows.run_write(self.client.session, self.task_id, body, self.task, self._claimed))

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        if exc is None:
            try:
                self.task = self._write(flows.changes("completed", result=self.result))
            except flows.UNRECORDABLE as refused:
                self._fail(refused)
                raise
            return
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        try:
            self.task = self._write(flows.ending(exc))
        except TasktrailError as failed:
            exc.add_note(f"tasktrail: could not record the failure of task {self.task_id}: {failed}")
