"""GET /metrics: Prometheus's scrape (SPEC §11), this service's families and the database's."""

from __future__ import annotations

import gzip
import logging
import math

import psycopg
import psycopg_pool
from litestar import Request, Response, get
from litestar.openapi import ResponseSpec
from prometheus_client.exposition import gzip_accepted
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from tasktrail import db, eventstore, metrics, replicas
from tasktrail.domain.task import Status
from tasktrail.http.auth import SECURITY
from tasktrail.http.problems import problems
from tasktrail.projections import stats

log = logging.getLogger("tasktrail")

# The newest live version of each read model (migration 0014): while two releases run, the one the newer serves.
PROJECTION_VERSIONS = """
SELECT name, max(version) FROM projection_versions WHERE state = 'live' GROUP BY name ORDER BY name
"""


async def database_families(conn: psycopg.AsyncConnection) -> list[Metric]:
    """What describes the database: the same whichever process asks, so read at scrape time, never added up."""
    counts = await stats.summary(conn)
    tasks = GaugeMetricFamily("tasktrail_tasks", "Tasks by status, from the stats counters", labels=["status"])
    for status in Status:
        tasks.add_metric([status.value], counts[status.value])
    held = GaugeMetricFamily(
        "tasktrail_feed_held_back_seconds",
        "How long the oldest open transaction that began before events the feed cannot show yet has held them back;"
        " 0 when nothing is held back",
        value=await eventstore.held_back_seconds(conn),
    )
    versions = GaugeMetricFamily("tasktrail_projection_version", "The live version of each read model", labels=["name"])
    cur = await conn.execute(PROJECTION_VERSIONS)
    for name, version in await cur.fetchall():
        versions.add_metric([name], version)
    return [tasks, held, versions]


def replica_families(status: list[tuple[str, str, float]]) -> list[Metric]:
    """Each replica as this process sees it (SPEC §13): its lag, and its state as a one-hot state set.

    Per process, like the routing it describes: each process checks its replicas
    itself. A replica's name is its host, port and database, never a password.
    """
    lag = GaugeMetricFamily(
        "tasktrail_replica_lag_seconds",
        "How long the replica has been behind a WAL position the primary had (0: level), as this process last saw",
        labels=["replica"],
    )
    state = GaugeMetricFamily(
        "tasktrail_replica_state",
        "1 for the replica's current state in this process's routing (serving gets reads; the others get none)",
        labels=["replica", "state"],
    )
    for name, current, seconds in status:
        if not math.isnan(seconds):  # unknown (down, not a standby of the primary): no sample, rather than a stale one
            lag.add_metric([name], seconds)
        for each in replicas.STATES:
            state.add_metric([name, each], 1.0 if each == current else 0.0)
    return [lag, state]


SCRAPE_WITHIN = 2.0  # how long a scrape waits for the database's gauges before it answers without them


@get(
    "/metrics",
    security=SECURITY,
    responses={
        200: ResponseSpec(
            str, description="Prometheus text format (or OpenMetrics, if asked)", media_type="text/plain",
            generate_examples=False,
        )
    }
    | problems(401, 403),
)  # fmt: skip
async def scrape(request: Request) -> Response[bytes]:
    """Every tasktrail_* metric, for Prometheus; the database's gauges are left out while it does not answer."""
    # The pool as the scrape found it: its own wait for a connection (up to SCRAPE_WITHIN) is not the news.
    metrics.sample_pool(request.app.state.pool)
    database: list[Metric] = []
    try:
        # The primary, never a replica: the transactions that hold the feed back run there. Within a
        # scrape's time (Prometheus gives up after 10 s by default), not a statement timeout.
        async with db.Borrowed(request.app.state.pool, within=SCRAPE_WITHIN) as conn:
            database = await database_families(conn)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        # The service's own figures matter most now (tasktrail_db_unavailable_total among them): answer with them.
        log.warning("metrics: the database did not answer, its gauges are left out: %s", exc)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        # This process's read-model version was pruned under it (see projections/versions.py): the same.
        log.warning("metrics: this process's read-model tables are missing, its gauges are left out: %s", exc)
    database += replica_families(request.app.state.replicas.status())
    body, content_type = metrics.exposition(request.headers.get("accept", ""), database)
    # The type goes in as a header: as media_type, Litestar would add a second charset to prometheus_client's.
    headers = {"Cache-Control": "no-store", "Content-Type": content_type}
    if gzip_accepted(request.headers.get("accept-encoding", "")):
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return Response(body, headers=headers)


ROUTES = [scrape]
