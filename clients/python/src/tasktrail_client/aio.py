"""The asyncio client: `AsyncClient`, the same calls as `Client` to await, and `AsyncRun` for workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import httpx

from tasktrail_client import _flows as flows
from tasktrail_client.client import DEFAULT_TIMEOUT, STREAM_TIMEOUT, STREAMS
from tasktrail_client.errors import TasktrailError
from tasktrail_client.models import Change, Event, History, ItemResult, Stats, Task

T = TypeVar("T")
log = logging.getLogger("tasktrail_client")


class AsyncClient:
    """tasktrail over HTTP for asyncio; each call does what `Client`'s of the same name does.

    async with AsyncClient("http://127.0.0.1:8000") as client:
        task = await client.create("document_process")
        async for change in client.watch(task.task_id):
            print(change.task.status)
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: flows.RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.session = flows.Session(api_key, retry or flows.RetryPolicy())
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)
        self._streams = self._http
        if transport is None:  # watches' own pool (client.STREAMS)
            self._streams = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, limits=STREAMS)

    async def aclose(self) -> None:
        try:
            await self._http.aclose()
        finally:
            await self._streams.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def read_after(self) -> str | None:
        return self.session.read_after

    async def create(
        self, task_type: str, params: dict[str, Any] | None = None, *, idempotency_key: str | None = None
    ) -> Task:
        return await self._call(flows.create(self.session, task_type, params, idempotency_key))

    async def create_many(
        self, tasks: Iterable[Mapping[str, Any] | str], *, idempotency_key: str | None = None
    ) -> list[Task]:
        return await self._call(flows.create_many(self.session, tasks, idempotency_key))

    async def get(self, task_id: str, *, version: int | None = None, as_of: datetime | str | None = None) -> Task:
        return await self._call(flows.get(self.session, str(task_id), version, as_of))

    def list(
        self, status: str | None = None, task_type: str | None = None, page_size: int = 100
    ) -> AsyncIterator[Task]:
        return self._iterate(flows.list_tasks(self.session, status, task_type, page_size))

    async def update(
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
        body = dict(changes or {}) | flows.changes(status, progress, result, error)
        return await self._call(flows.update(self.session, str(task_id), body, if_version))

    async def update_many(self, updates: Iterable[Mapping[str, Any]]) -> list[ItemResult]:
        return await self._call(flows.update_many(self.session, updates))

    async def delete(self, task_id: str, *, if_version: int | None = None) -> None:
        await self._call(flows.delete(self.session, str(task_id), if_version))

    async def history(self, task_id: str, *, after_version: int = 0, page_size: int = 1000) -> History:
        return await self._call(flows.history(self.session, str(task_id), after_version, page_size))

    async def stats(self, task_type: str | None = None) -> Stats:
        return await self._call(flows.stats(self.session, task_type))

    async def cleanup(self, days: int = 30) -> int:
        return await self._call(flows.cleanup(self.session, days))

    def events(
        self, after: str | None = None, *, page_size: int = 100, follow: bool = False, poll_interval: float = 1.0
    ) -> AsyncIterator[Event]:
        return self._iterate(flows.events(self.session, after, page_size, follow, poll_interval))

    def watch(self, task_id: str, *, reconnects: int = 10) -> AsyncIterator[Change]:
        return self._iterate(flows.watch(self.session, str(task_id), reconnects))

    def run(self, task_id: str, *, progress_interval: float = 0.25) -> AsyncRun:
        """`async with client.run(task_id) as run:`; see `Run`."""
        return AsyncRun(self, str(task_id), progress_interval)

    # -- the driver: as Client's, awaiting each step

    async def _call(self, flow: flows.Flow[T]) -> T:
        streams: dict[int, tuple[httpx.Response, AsyncIterator[str]]] = {}
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    step = flow.throw(error) if error is not None else flow.send(value)
                except StopIteration as stop:
                    return stop.value
                assert not isinstance(step, flows.Emit), f"a call emitted {step.value!r}"
                value, error = await self._step(step, streams)
        finally:
            flow.close()
            await _close(streams)

    async def _iterate(self, flow: flows.Flow[None]) -> AsyncIterator[Any]:
        streams: dict[int, tuple[httpx.Response, AsyncIterator[str]]] = {}
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    step = flow.throw(error) if error is not None else flow.send(value)
                except StopIteration:
                    return
                if isinstance(step, flows.Emit):
                    value, error = None, None
                    yield step.value
                else:
                    value, error = await self._step(step, streams)
        finally:
            flow.close()
            await _close(streams)

    async def _step(
        self, step: flows.Step, streams: dict[int, tuple[httpx.Response, AsyncIterator[str]]]
    ) -> tuple[Any, BaseException | None]:
        """The step's outcome for the flow: (value, None), or (None, the transport error to throw in)."""
        try:
            return await self._do(step, streams), None
        except httpx.TransportError as exc:
            return None, exc

    async def _do(self, step: flows.Step, streams: dict[int, tuple[httpx.Response, AsyncIterator[str]]]) -> Any:
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
                response = await (self._streams if step.stream else self._http).send(request, stream=step.stream)
                if step.stream:
                    if response.status_code == 200:
                        streams[id(response)] = (response, response.aiter_lines())
                    else:
                        await response.aread()
                        await response.aclose()
                self.session.observe(step, response)
                return response
            case flows.NextLine(response=response):
                _, lines = streams[id(response)]
                try:
                    return await anext(lines)
                except (StopAsyncIteration, httpx.TransportError) as end:
                    streams.pop(id(response))
                    await response.aclose()
                    if isinstance(end, StopAsyncIteration):
                        return None
                    raise
            case flows.Sleep(seconds=seconds):
                await asyncio.sleep(seconds)
                return None
        raise AssertionError(f"unknown step {step!r}")


async def _close(streams: dict[int, tuple[httpx.Response, AsyncIterator[str]]]) -> None:
    for response, _lines in streams.values():
        await response.aclose()


class AsyncRun:
    """`Run` for asyncio: progress is sent by a background task."""

    def __init__(self, client: AsyncClient, task_id: str, progress_interval: float) -> None:
        self.client, self.task_id, self.interval = client, task_id, progress_interval
        self.result: dict[str, Any] | None = None
        self.task: Task | None = None
        self._claimed = False  # whether entering moved the task to running (flows.claim)
        self._pending: float | None = None
        self._error: TasktrailError | None = None
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncRun:
        self.task, self._claimed = await self.client._call(flows.claim(self.client.session, self.task_id))
        self._reporter = asyncio.create_task(self._report(), name=f"tasktrail-progress-{self.task_id}")
        return self

    def progress(self, progress: float) -> None:
        """Report progress (0 to 100); sent soon, in the background. Raises what the last report met."""
        value = flows.check_progress(progress)
        if self._error is not None:
            raise self._error
        self._pending = value
        self._wake.set()

    async def _report(self) -> None:
        while True:
            if self._pending is None and not self._closing.is_set():
                await self._wake.wait()
            self._wake.clear()
            value, self._pending = self._pending, None
            if value is None:
                if self._closing.is_set():
                    return
                continue
            if self._error is None:
                try:
                    self.task = await self._write({"progress": value})
                except TasktrailError as exc:
                    self._error = exc
            # The throttle: nothing more for `interval`, unless the block is ending.
            if not self._closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.interval)

    async def _write(self, body: dict[str, Any]) -> Task:
        assert self.task is not None
        return await self.client._call(
            flows.run_write(self.client.session, self.task_id, body, self.task, self._claimed)
        )

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        # Shielded: a worker cancelled again while its run records the end (cancel() twice, or a timeout
        # around a cancelled worker) still leaves the task completed, failed or back to pending, not running.
        ending = asyncio.ensure_future(self._end(exc))
        try:
            await asyncio.shield(ending)
        except asyncio.CancelledError:
            ending.add_done_callback(self._ended_alone)  # nobody awaits it now: say how it went
            raise

    def _ended_alone(self, ending: asyncio.Future[None]) -> None:
        if not ending.cancelled() and (failed := ending.exception()) is not None:
            log.warning("task %s: its run was cancelled, and recording its end failed: %s", self.task_id, failed)

    async def _end(self, exc: BaseException | None) -> None:
        self._closing.set()
        self._wake.set()
        assert self._reporter is not None
        await self._reporter
        if exc is None:
            try:
                self.task = await self._write(flows.changes("completed", result=self.result))
            except flows.UNRECORDABLE as refused:
                await self._fail(refused)
                raise
            return
        await self._fail(exc)

    async def _fail(self, exc: BaseException) -> None:
        try:
            self.task = await self._write(flows.ending(exc))
        except TasktrailError as failed:
            exc.add_note(f"tasktrail: could not record the failure of task {self.task_id}: {failed}")
