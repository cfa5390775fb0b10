"""Prometheus metrics (SPEC §11): the families, how server processes add them up, and a scrape's text.

Names and labels are a contract that dashboards and alerts depend on: never rename one.

Several processes, one answer. `tasktrail serve --workers N` runs N worker
processes and a scrape reaches one of them, so each process keeps its counters, histograms and
live gauges in files of its own in PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode: a value lives in an mmap'd file, about 1 us a write), and the
process that answers reads them all and adds them up. `serve` makes a fresh
private directory for each run, so nothing from an earlier run is counted. A
counter of a process that has exited still counts (what it counted happened);
its live gauges must not: a worker that exits drops its gauge files, and a scrape
drops those of processes that no longer exist (a worker killed with SIGKILL
never ran its exit). Without PROMETHEUS_MULTIPROC_DIR (one worker, or create_app
alone, as most tests run it) the values live in this process's memory, where an
increment is a lock and an addition (a request's count and duration, 2 us).

What describes the database, not a process (the tasks by status, how long the
feed is held back, the read models' versions) is read from the database by the
process that answers the scrape, at scrape time: every process would say the
same, so adding them up would be wrong (see http/metrics.py).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric

from tasktrail.domain.events import EVENT_TYPES, type_of

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from tasktrail.projections import Change

# prometheus_client picks where values live when it is first imported, from
# this variable: `serve` sets it before anything imports the library.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
REGISTRY = CollectorRegistry()
# No *_created series: the multiprocess collector (--workers N) has none, so one process shows what N do.
disable_created_metrics()

# Sub-millisecond reads to the 10 s a request may take at most.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "tasktrail_http_requests",
    "HTTP requests answered, by method, route template and status code",
    ["method", "route", "status"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "tasktrail_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response (for event streams: the stream's whole life)",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
EVENTS_APPENDED = Counter(
    "tasktrail_events_appended", "Events appended to the log, by event type", ["type"], registry=REGISTRY
)
WRITE_CONFLICTS = Counter(
    "tasktrail_write_conflicts",
    "Writes decided again because another writer changed the task first (a lost race; for a batch, also"
    " one that was still writing it after 100 ms)",
    registry=REGISTRY,
)
DB_UNAVAILABLE = Counter(
    "tasktrail_db_unavailable",
    "Requests answered 503 because the database did not answer (unreachable, or over the statement timeout)",
    registry=REGISTRY,
)
STREAM_CLIENTS = Gauge(
    "tasktrail_stream_clients",
    "Open Server-Sent Events streams",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
POOL_CONNECTIONS = Gauge(
    "tasktrail_db_pool_connections",
    "Pooled database connections: in_use by a request, idle in the pool, and requests waiting for one",
    ["state"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
POOL_STATES = ("in_use", "idle", "waiting")
# How often each process writes down its pool's state (the answering process also does at each scrape).
POOL_SAMPLE_SECONDS = 1.0

# Every series a rate() will be taken of exists from the start, at 0: a series
# that appears with its first increment hides that increment from rate().
_appended = {name: EVENTS_APPENDED.labels(name) for name in EVENT_TYPES}
_pool = {state: POOL_CONNECTIONS.labels(state) for state in POOL_STATES}

# Methods beyond these are one label value, so a client cannot mint label values.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
# The route of a request that reached no route handler (an unknown path, a method
# the path does not have, a CORS preflight): one value, whatever the path was.
UNMATCHED = "unmatched"

# (method, route, status) -> the two calls a finished request makes. Bounded:
# each part comes from a fixed set (METHODS, the app's routes, HTTP status codes).
_observers: dict[tuple[str, str, int], tuple[Callable[[], None], Callable[[float], None]]] = {}


def request_done(method: str, route: str, status: int, seconds: float) -> None:
    """Count a finished request and observe its duration (method and route already bounded)."""
    try:
        count, observe = _observers[method, route, status]
    except KeyError:
        count = REQUESTS.labels(method, route, str(status)).inc
        observe = DURATION.labels(method, route).observe
        _observers[method, route, status] = count, observe
    count()
    observe(seconds)


def appended(changes: Sequence[Change]) -> None:
    """Count the events of a write that the log took."""
    if len(changes) == 1:
        _appended[type_of(changes[0][0].event)].inc()
        return
    for name, n in Tally(type_of(recorded.event) for recorded, _, _ in changes).items():
        _appended[name].inc(n)


def sample_pool(pool: AsyncConnectionPool) -> None:
    stats = pool.get_stats()
    size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
    _pool["in_use"].set(max(0, size - idle))
    _pool["idle"].set(idle)
    _pool["waiting"].set(getattr(pool, "waiting", 0))  # db.Pool's own count: see there


async def keep_sampling_pool(pool: AsyncConnectionPool) -> None:
    """Write down the pool's state every POOL_SAMPLE_SECONDS, so that every process's is there to add up."""
    while True:
        sample_pool(pool)
        await asyncio.sleep(POOL_SAMPLE_SECONDS)


def process_exiting() -> None:
    """Take this process's live gauges out of the totals (its counters stay: what they counted happened)."""
    if MULTIPROCESS_DIR:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROCESS_DIR)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: the signal's answer is all there is
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a killed worker is a zombie until reaped


def _forget_exited(path: str) -> None:
    """Drop the live gauges of processes that are gone without saying so (SIGKILL, a crash)."""
    for name in os.listdir(path):
        # gauge_livesum_<pid>.db (see prometheus_client.values)
        if name.startswith("gauge_live") and name.endswith(".db"):
            pid = name[:-3].rsplit("_", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                multiprocess.mark_process_dead(int(pid), path)


class _Scrape:
    """What one scrape shows: this service's families, then the database's as the caller read them."""

    def __init__(self, database: Iterable[Metric]) -> None:
        self.database = database

    def collect(self) -> Iterator[Metric]:
        if MULTIPROCESS_DIR:
            _forget_exited(MULTIPROCESS_DIR)
            yield from multiprocess.MultiProcessCollector(None, MULTIPROCESS_DIR).collect()
        else:
            yield from REGISTRY.collect()
        yield from self.database


def exposition(accept: str, database: Iterable[Metric]) -> tuple[bytes, str]:
    """The scrape's body in the format the Accept header asks for (Prometheus text, or OpenMetrics), and its type."""
    try:
        encode, content_type = choose_encoder(accept)
    except (TypeError, ValueError):  # a version it cannot compare ("1.x"): the format asked for no version
        encode, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
    return encode(_Scrape(database)), content_type  # type: ignore[arg-type]
