"""Live events: one LISTEN connection per process reads the feed and fans it out to open streams.

Every server process runs one Listener. It holds one database connection that,
while any stream is open, LISTENs on `tasktrail_events` (notified by a trigger
when events commit) and, on each wake-up, reads the feed after its cursor once
and hands the new events to every open stream in memory; with none open it
neither listens nor reads, so writes cost the process nothing. A thousand idle streams cost no database
connection and a wake-up costs one query, not a thousand. Notifications only
say "look"; the feed says what is new. So a lost notification, a rolled-back
writer that held the horizon back, or a write from a process that does not
notify is picked up by polling: every `poll_interval`, and sooner, with
backoff, while committed events wait behind an open transaction.

A stream starts from its own cursor: it registers first, reads the database
until it is level with the feed's head, and from then on takes events from
memory, dropping any at or below its cursor. Registering before reading is what
makes the hand-over gap-free: whatever the listener delivers later lies above
the listener's cursor at registration, and everything at or below it was
already safe to read, so the stream's own read covers it. A stream that falls
too far behind (a slow client) is dropped back to reading the database.

With replicas (replicas.py) the listener still listens on the primary, whose
notifications a standby never sees, and reads the feed from a replica once it
has replayed what the primary had when woken; streams catch up from a replica
too. Cursors of any server are places in one order (eventstore.py), so the
listener and a stream may read different servers; but a stream's own read must
reach the listener's cursor before it takes events from memory, or the events
between would be lost: if its server is behind, it reads again on the primary,
which is never behind a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from typing import Any, TypeVar
from uuid import UUID

import psycopg

from tasktrail import db, eventstore, metrics
from tasktrail.eventstore import Cursor, FeedEvent
from tasktrail.projections import versions
from tasktrail.replicas import Replicas

log = logging.getLogger("tasktrail.live")
T = TypeVar("T")

# The channel 0005_live.sql notifies; writers notify only while a listener is
# registered (0008), and a registration clears those of backends that are gone.
LISTEN = "LISTEN tasktrail_events"
REGISTER = """
WITH gone AS (DELETE FROM live_listeners WHERE pid NOT IN (SELECT pid FROM pg_stat_activity))
INSERT INTO live_listeners (pid) VALUES (pg_backend_pid()) ON CONFLICT DO NOTHING
"""
UNLISTEN = "UNLISTEN tasktrail_events"
UNREGISTER = "DELETE FROM live_listeners WHERE pid = pg_backend_pid()"
PAGE = 500
# A stream whose client reads slower than events arrive goes back to the
# database rather than buffering without bound: past this many events waiting
# for it, or this many bytes of them (an event may carry 64 KiB of params or a
# result: 10,000 such are 640 MB, and kept until the slowest stream moves on).
MAX_PENDING = 10_000
MAX_PENDING_BYTES = 4 * 1024 * 1024
# What a stream behind the listener reads of the feed at once: its events are
# held until the client takes them, so fewer than the listener's page.
STREAM_PAGE = 100
# While committed events wait behind an open transaction, look again soon (5 ms,
# doubling up to 250 ms): if that transaction rolls back, nothing will notify.
HELD_BACK_FIRST_RETRY = 0.005
HELD_BACK_LAST_RETRY = 0.25

# An event and its encoded form (rendered once, sent to every stream that wants it).
Delivery = tuple[FeedEvent, bytes]


def poll_seconds() -> float:
    """TASKTRAIL_POLL_SECONDS: how often streams (and a follower) look for events nothing woke them for."""
    return _seconds("TASKTRAIL_POLL_SECONDS", 1.0)


def ping_seconds() -> float:
    """TASKTRAIL_SSE_PING_SECONDS: how often an idle stream sends a ping."""
    return _seconds("TASKTRAIL_SSE_PING_SECONDS", 15.0)


def _seconds(name: str, default: float) -> float:
    """A stream setting in seconds: above 0 and under a day (ValueError names it otherwise)."""
    value = db.seconds(name, default)
    if value >= 86_400:
        raise ValueError(f"{name}={os.environ[name]!r}: give a number of seconds under a day, such as 5")
    return value


class Subscriber:
    """One open stream: which task (or all), and what waits for it."""

    __slots__ = ("lagging", "pending", "pending_bytes", "stream_id", "wake")

    def __init__(self, stream_id: UUID | None) -> None:
        self.stream_id = stream_id
        self.pending: list[Delivery] = []
        self.pending_bytes = 0
        self.wake = asyncio.Event()
        # True: what is pending is not a complete continuation; read the database.
        self.lagging = True

    def take(self) -> list[Delivery]:
        """What waits for this stream, which then waits for nothing."""
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        return pending


class Listener:
    """The process's one LISTEN connection, its feed cursor, and the open streams."""

    def __init__(
        self,
        conninfo: str,
        reads: Replicas,
        render: Callable[[FeedEvent], bytes],
        *,
        poll_interval: float | None = None,
        ping_interval: float | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.reads = reads
        self.render = render
        self.poll_interval = poll_interval or poll_seconds()
        self.ping_interval = ping_interval or ping_seconds()
        # Everything at or below the cursor has been read and handed out; None
        # while the listener does not follow the feed: no stream is open, or
        # the database is down.
        self.cursor: Cursor | None = None
        self.subscribers: dict[UUID | None, set[Subscriber]] = defaultdict(set)
        self._wanted = asyncio.Event()  # set while a stream is open
        self.closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._previous_handlers: dict[int, Any] = {}

    def __len__(self) -> int:
        return sum(len(subscribers) for subscribers in self.subscribers.values())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tasktrail-listener")
        self._end_streams_on_exit_signals()

    async def stop(self) -> None:
        self._close_streams()
        for sig, (previous, ours) in self._previous_handlers.items():
            if signal.getsignal(sig) is ours:
                signal.signal(sig, previous)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _close_streams(self) -> None:
        self.closing.set()
        for subscribers in self.subscribers.values():
            for subscriber in subscribers:
                subscriber.wake.set()

    def _end_streams_on_exit_signals(self) -> None:
        """End open streams when uvicorn is told to stop, so its graceful shutdown does not wait on them.

        uvicorn waits for responses to finish before it shuts the app down
        (lifespan shutdown comes too late), and an event stream never finishes
        by itself. So chain onto uvicorn's own signal handler and close the
        streams first. Elsewhere (a test client) there is nothing to chain.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not type(getattr(previous, "__self__", None)).__module__.startswith("uvicorn"):
                continue

            def on_exit(signum: int, frame: Any, previous: Callable[..., Any] = previous) -> None:  # type: ignore[assignment]
                loop.call_soon_threadsafe(self._close_streams)
                previous(signum, frame)

            self._previous_handlers[sig] = (previous, on_exit)
            signal.signal(sig, on_exit)

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                # Named as the process's pool is (pg_stat_activity; prune sees the process by it).
                kwargs = db.connect_kwargs() | versions.application_name()
                async with await psycopg.AsyncConnection.connect(self.conninfo, **kwargs) as conn:
                    delay = 0.5
                    while True:
                        # With no stream open there is nothing to hand events
                        # to: neither listen nor read the feed, so writes cost
                        # this process nothing. A stream that opens reads the
                        # database by itself until the listener is level.
                        await self._wanted.wait()
                        await conn.execute(LISTEN)
                        await conn.execute(REGISTER)
                        self.cursor = await eventstore.head(conn)
                        self._resync()
                        await self._follow(conn)
                        self.cursor = None
                        await conn.execute(UNREGISTER)
                        await conn.execute(UNLISTEN)
            except (psycopg.Error, OSError) as exc:
                self.cursor = None
                log.warning("listener: %s; reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _follow(self, conn: psycopg.AsyncConnection) -> None:
        """Read the feed on every notification (and poll) until the last stream closes."""
        assert self.cursor is not None
        retry = 0.0
        while self.subscribers:
            page, caught_up = await self._read(conn)
            self._fan_out(page)
            if len(page.events) == PAGE:
                continue
            wait = self.poll_interval
            if page.held_back or not caught_up:
                wait = retry = min(retry * 2, HELD_BACK_LAST_RETRY, wait) if retry else HELD_BACK_FIRST_RETRY
            else:
                retry = 0.0
            async for _ in conn.notifies(timeout=wait, stop_after=1):
                pass

    async def _read(self, conn: psycopg.AsyncConnection) -> tuple[eventstore.FeedPage, bool]:
        """The feed after the cursor, and whether it holds everything committed before the listener woke.

        Without replicas, from the primary on the listener's own connection.
        With them, from a replica, which may not have replayed the latest
        commits yet: then it is read again soon, as for held-back events.
        """
        assert self.cursor is not None
        after = self.cursor
        if not self.reads.replicas:
            return await eventstore.read_feed(conn, after, limit=PAGE), True
        target = await self.reads.position(conn)
        return await self.reads.read_caught_up(lambda c: eventstore.read_feed(c, after, limit=PAGE), target)

    def _fan_out(self, page: eventstore.FeedPage) -> None:
        self.cursor = page.next_after
        if not page.events or not self.subscribers:
            return
        deliveries = [(event, self.render(event)) for event in page.events]
        by_stream: dict[UUID, list[Delivery]] = defaultdict(list)
        for delivery in deliveries:
            by_stream[delivery[0].stored.recorded.stream_id].append(delivery)
        self._deliver(self.subscribers.get(None, ()), deliveries)
        for stream_id, mine in by_stream.items():
            self._deliver(self.subscribers.get(stream_id, ()), mine)

    @staticmethod
    def _deliver(subscribers: Collection[Subscriber], deliveries: list[Delivery]) -> None:
        size = sum(len(frame) for _, frame in deliveries)
        for subscriber in subscribers:
            if subscriber.lagging:
                continue
            subscriber.pending.extend(deliveries)
            subscriber.pending_bytes += size
            if len(subscriber.pending) > MAX_PENDING or subscriber.pending_bytes > MAX_PENDING_BYTES:
                subscriber.take()
                subscriber.lagging = True
            subscriber.wake.set()

    async def _catch_up(self, after: Cursor, stream_id: UUID | None, level: Cursor | None) -> eventstore.FeedPage:
        """A stream's own read of the feed, which reaches `level` (the listener's cursor) unless the page is full."""

        def fetch(conn: psycopg.AsyncConnection) -> Awaitable[eventstore.FeedPage]:
            return eventstore.read_feed(conn, after, limit=STREAM_PAGE, stream_id=stream_id)

        page = await self.reads.read_steadily(fetch)
        if level is not None and len(page.events) < STREAM_PAGE and page.next_after < level:
            page = await self.reads.read_steadily(fetch, primary=True)  # that replica is behind the listener
        return page

    def _resync(self) -> None:
        """Send every stream back to the database (the listener's cursor jumped)."""
        for subscribers in self.subscribers.values():
            for subscriber in subscribers:
                subscriber.take()
                subscriber.lagging = True
                subscriber.wake.set()

    async def follow(self, after: Cursor, stream_id: UUID | None = None) -> AsyncIterator[list[Delivery]]:
        """Batches of events after the cursor as they commit, for ever; an empty batch when it is time to ping.

        Holds a database connection only while it reads; none while it waits.
        """
        subscriber = Subscriber(stream_id)
        self.subscribers[stream_id].add(subscriber)
        self._wanted.set()
        metrics.STREAM_CLIENTS.inc()
        loop = asyncio.get_running_loop()
        cursor, last_sent = after, loop.time()
        try:
            while not self.closing.is_set():
                if subscriber.lagging:
                    # Level with the listener only once it has a cursor; until
                    # then this stream polls the database by itself.
                    level = self.cursor
                    subscriber.lagging = level is None
                    subscriber.take()
                    page = await _uncancelled(self._catch_up(cursor, stream_id, level))
                    cursor = page.next_after
                    if len(page.events) == STREAM_PAGE:
                        subscriber.lagging = True
                    if page.events:
                        last_sent = loop.time()
                        yield [(event, self.render(event)) for event in page.events]
                    if subscriber.lagging and page.events:
                        continue
                ping_due = last_sent + self.ping_interval - loop.time()
                try:
                    async with asyncio.timeout(min(self.poll_interval, ping_due) if subscriber.lagging else ping_due):
                        await subscriber.wake.wait()
                except TimeoutError:
                    if loop.time() - last_sent >= self.ping_interval:
                        last_sent = loop.time()
                        yield []
                    continue
                subscriber.wake.clear()
                fresh = [delivery for delivery in subscriber.take() if delivery[0].cursor > cursor]
                if fresh and not subscriber.lagging:
                    cursor = fresh[-1][0].cursor
                    last_sent = loop.time()
                    yield fresh
        finally:
            metrics.STREAM_CLIENTS.dec()
            subscribers = self.subscribers[stream_id]
            subscribers.discard(subscriber)
            if not subscribers:
                del self.subscribers[stream_id]
            if not self.subscribers:
                self._wanted.clear()


async def _uncancelled(read: Coroutine[Any, Any, T]) -> T:
    """Await a read that a cancellation of the caller lets finish in the background.

    A stream is cancelled when its client leaves, often during its first read.
    A query interrupted by a cancellation makes psycopg close the connection, so
    the pool loses it and must open another: a burst of clients that open a
    stream and leave at once (a reconnect loop, a scanner) emptied the pool and
    made every other request wait for a connection. Left to finish, the read
    returns its connection as any other does.
    """
    task = asyncio.ensure_future(read)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Nobody waits for the result now; retrieve its error, if any, so asyncio does not log it as lost.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise
