"""Replicas that stop, fall behind, or are not replicas at all: no request fails, and reads go elsewhere (SPEC §13)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tasktrail import projections
from tasktrail.http.app import create_app
from tasktrail.projections import tasks
from tasktrail.replicas import DOWN, FOREIGN, HEADER, LAGGING, NO_ACCESS, NOT_A_STANDBY, SERVING
from tests.conftest import Server, prepared
from tests.replication import STANDBY_SETTINGS, Node, Pair
from tests.test_replicas.conftest import Database, created_on_replica, replica_of, until, until_serving

pytestmark = pytest.mark.anyio
App = Callable[..., AsyncTestClient[Litestar]]


async def is_stale(client: AsyncTestClient[Litestar], pair: Pair, task_id: str, progress: float) -> bool:
    """With replay paused, change the task; whether a read without the token still shows it as before (the replica)."""
    with pair.paused():
        assert (await client.patch(f"/tasks/{task_id}", json={"progress": progress})).status_code == 200
        return (await client.get(f"/tasks/{task_id}")).json()["progress"] != progress


async def replica_gauges(client: AsyncTestClient[Litestar]) -> tuple[dict[str, float], dict[str, str]]:
    """/metrics' tasktrail_replica_lag_seconds by replica, and the state each replica's one-hot state set names."""
    scraped = (await client.get("/metrics")).text
    lags, states = {}, {}
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            if sample.name == "tasktrail_replica_lag_seconds":
                lags[sample.labels["replica"]] = sample.value
            elif sample.name == "tasktrail_replica_state" and sample.value == 1:
                assert sample.labels["replica"] not in states, "one state at a time"
                states[sample.labels["replica"]] = sample.labels["state"]
    return lags, states


async def test_a_stopped_replica_fails_no_request_and_serves_again_once_back(
    replicated_app: App, pair: Pair, database: Database
) -> None:
    async with replicated_app(max_lag=30) as client:
        replica, task, _token = await created_on_replica(client)
        task_id = task["task_id"]
        assert await is_stale(client, pair, task_id, 1)  # the replica answers reads
        await client.get("/tasks/")  # its pool holds connections, which the stop breaks

        pair.standby.stop()
        statuses: list[int] = []
        # At once (the health checks have not noticed yet), and on after they have.
        for progress in range(2, 6):
            statuses.append((await client.patch(f"/tasks/{task_id}", json={"progress": progress})).status_code)
            reads = (f"/tasks/{task_id}", "/tasks/", "/tasks/stats/summary", f"/tasks/{task_id}/history", "/events")
            for path in reads:
                statuses.append((await client.get(path)).status_code)
            got = await client.get(f"/tasks/{task_id}")
            assert got.json()["progress"] == progress  # from the primary
        await until(lambda: replica.state == DOWN, "the replica is found down")
        assert await replica_gauges(client) == ({}, {replica.name: DOWN})  # no lag of 0 from when it was level
        statuses.append((await client.get(f"/tasks/{task_id}")).status_code)
        assert set(statuses) == {200}

        pair.standby.start()
        await until(lambda: replica.state == SERVING, "the replica serves again")
        assert await is_stale(client, pair, task_id, 6)


async def test_a_replica_that_falls_behind_gets_no_reads_until_it_catches_up(
    replicated_app: App, pair: Pair, database: Database
) -> None:
    async with replicated_app(max_lag=0.5) as client:
        replica = await until_serving(client)
        response = await client.post("/tasks/", json={"task_type": "lagged"})
        task_id = response.json()["task_id"]
        with pair.paused():
            await client.patch(f"/tasks/{task_id}", json={"progress": 10})
            await until(lambda: replica.state == LAGGING, "the replica is found lagging")
            assert replica.lag > 0.5
            lags, states = await replica_gauges(client)
            assert (states, lags[replica.name] > 0.5) == ({replica.name: LAGGING}, True)
            # Out of service: a read without a token comes from the primary.
            assert (await client.get(f"/tasks/{task_id}")).json()["progress"] == 10
        await until(lambda: replica.state == SERVING, "the replica serves again once it has replayed")
        assert replica.lag <= 0.5
        assert (await client.get(f"/tasks/{task_id}")).json()["progress"] == 10
        assert (await replica_gauges(client))[1] == {replica.name: SERVING}


async def test_a_primary_or_another_database_named_as_a_replica_never_serves(
    pair: Pair, database: Database, template: str
) -> None:
    # The primary itself (not in recovery), and the standby's copy of another database.
    urls = [database.primary, pair.standby.url(template)]
    async with AsyncTestClient(app=create_app(database.primary, replica_urls=urls, replica_max_lag=1)) as client:
        primary, other = client.app.state.replicas.replicas
        await until(lambda: (primary.state, other.state) == (NOT_A_STANDBY, FOREIGN), "both are found out")
        response = await client.post("/tasks/", json={"task_type": "t"})
        assert (await client.get(f"/tasks/{response.json()['task_id']}")).status_code == 200


async def test_a_replica_whose_role_cannot_read_the_log_and_read_models_gets_no_reads_until_granted(
    replicated_app: App, pair: Pair, database: Database
) -> None:
    # Audit: a role of the replica's own, granted the read models' schemas by hand, lost them with the next
    # version's schemas (a rebuild, a release). Each read then failed there and was read again on the
    # primary, with a warning, while the replica showed as serving: no alert could fire.
    name = f"reader_{uuid.uuid4().hex[:8]}"
    role = sql.Identifier(name)
    schemas = [sql.Identifier(projections.schema(module.NAME, module.VERSION)) for module in projections.INLINE]

    def grant(*statements: sql.Composable) -> None:
        with psycopg.connect(database.primary, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    grant(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    try:
        pair.wait_replayed()
        url = make_conninfo(database.replica, user=name)
        async with AsyncTestClient(app=create_app(database.primary, replica_urls=[url], replica_max_lag=30)) as client:
            replica = replica_of(client)
            await until(lambda: replica.state == NO_ACCESS, "the replica is found unreadable")
            assert (await replica_gauges(client))[1] == {replica.name: NO_ACCESS}
            task = (await client.post("/tasks/", json={"task_type": "granted"})).json()
            assert (await client.get(f"/tasks/{task['task_id']}")).status_code == 200  # from the primary

            # The read models, not yet the log (history, the feed and the streams read it): still none.
            grant(*(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, role) for schema in schemas))
            grant(*(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, role) for s in schemas))
            pair.wait_replayed()
            await until(lambda: replica.unreadable == "public.events", "only the log is found unreadable")
            assert replica.state == NO_ACCESS
            grant(sql.SQL("GRANT SELECT ON events TO {}").format(role))
            await until(lambda: replica.state == SERVING, "the replica serves once granted")
            assert await is_stale(client, pair, task["task_id"], 5)  # read on the replica
    finally:
        grant(sql.SQL("DROP OWNED BY {}").format(role), sql.SQL("DROP ROLE {}").format(role))


async def test_an_unreachable_replica_fails_no_request(database: Database) -> None:
    nowhere = "postgresql://postgres@127.0.0.1:9/nowhere?connect_timeout=1"
    async with AsyncTestClient(app=create_app(database.primary, replica_urls=[nowhere])) as client:
        replica = replica_of(client)
        await until(lambda: replica.state == DOWN, "the replica is found down")
        # Its lag is unknown: no sample, not a 0 that says "level" (audit: it kept its last value).
        assert await replica_gauges(client) == ({}, {replica.name: DOWN})
        response = await client.post("/tasks/", json={"task_type": "t"})
        got = await client.get(f"/tasks/{response.json()['task_id']}", headers={HEADER: response.headers[HEADER]})
        assert got.status_code == 200


def test_requests_racing_a_replica_that_stops_and_starts_all_succeed(
    pair: Pair, database: Database, tmp_path: Path
) -> None:
    """A real server under steady load while its standby is stopped and started under it, twice: every answer 2xx."""
    env = os.environ | {"DATABASE_URL": database.primary}
    server = Server(env, log_dir=tmp_path, serve_args=("--replica", database.replica, "--replica-max-lag", "5"))
    answers: list[int] = []
    done = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            task_id = http.post("/tasks/", json={"task_type": "raced"}).json()["task_id"]
            progress = 0
            while not done.is_set():
                progress = progress % 100 + 1
                answers.append(http.patch(f"/tasks/{task_id}", json={"progress": progress}).status_code)
                for path in (f"/tasks/{task_id}", "/tasks/", f"/tasks/{task_id}/history", "/events?limit=5"):
                    answers.append(http.get(path).status_code)

    def answered(more: int) -> None:
        target = len(answers) + more
        deadline = time.monotonic() + 30
        while len(answers) < target and worker.is_alive():
            assert time.monotonic() < deadline, "the load stalled"
            time.sleep(0.01)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for _ in range(2):
            answered(20)
            pair.standby.stop()
            answered(50)
            pair.standby.start()
            deadline = time.monotonic() + 30
            while not pair.standby_backends(database.name):  # the server has reconnected to it
                assert time.monotonic() < deadline, "the server did not reconnect to the standby"
                time.sleep(0.05)
            answered(50)
    finally:
        done.set()
        worker.join()
        assert server.stop(signal.SIGINT) == 0, server.log()
    assert len(answers) >= 240
    assert set(answers) == {200}, server.log()


async def test_a_promoted_standby_gets_no_reads(tmp_path: Path) -> None:
    # A promoted standby keeps its last replay position (until it restarts) and takes writes of its own:
    # it was taken for a standby still, and served reads, some of them data only it had.
    pair = Pair()  # its own: the package's pair must stay a pair
    try:
        pair.create_database("promoted")
        primary, standby = pair.primary.url("promoted"), pair.standby.url("promoted")
        await asyncio.to_thread(prepared, primary)  # it runs an event loop of its own
        pair.wait_replayed()
        app = create_app(primary, replica_urls=[standby], replica_max_lag=60)
        async with AsyncTestClient(app=app) as client:
            replica = await until_serving(client)
            task = (await client.post("/tasks/", json={"task_type": "promoted"})).json()
            pair.wait_replayed()
            with pair.standby.connect() as conn:
                conn.execute("SELECT pg_promote()")
            with pair.standby.connect("promoted") as conn:
                await until(lambda: conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0], "promoted")
                table = sql.Identifier(projections.schema("tasks", tasks.VERSION), "tasks")
                conn.execute(sql.SQL("UPDATE {} SET error = 'only on the promoted server'").format(table))
            await until(lambda: replica.state == NOT_A_STANDBY, "the promoted standby is found out")
            for _ in range(4):
                assert (await client.get(f"/tasks/{task['task_id']}")).json()["error"] is None
    finally:
        pair.close()


async def test_a_standby_of_a_promoted_sibling_gets_no_reads() -> None:
    """One replication family, two histories: a standby that follows a promoted standby has replayed WAL
    positions past the primary's tokens, of another timeline: its data is no older, it is another's."""
    pair = Pair()
    forked = Node("forked", pair.root, pair.primary.user)
    try:
        pair.create_database("forked")
        primary = pair.primary.url("forked")
        await asyncio.to_thread(prepared, primary)
        pair.wait_replayed()
        with pair.standby.connect() as conn:
            conn.execute("SELECT pg_promote()")  # a failover the primary's URL did not follow
        with pair.standby.connect("forked") as conn:
            await until(lambda: conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0], "promoted")
        forked.run(
            "pg_basebackup", "-D", str(forked.data), "-R", "-X", "stream", "-c", "fast",
            "-h", "127.0.0.1", "-p", str(pair.standby.port), "-U", "postgres",
        )  # fmt: skip
        forked.configure(STANDBY_SETTINGS)
        forked.start()
        app = create_app(primary, replica_urls=[forked.url("forked")], replica_max_lag=60)
        async with AsyncTestClient(app=app) as client:
            replica = replica_of(client)
            await until(lambda: replica.state == FOREIGN, "the standby of the fork is found out")
            task = (await client.post("/tasks/", json={"task_type": "forked"})).json()
            assert (await client.get(f"/tasks/{task['task_id']}")).status_code == 200  # from the primary

            # Audit: with the sibling stopped, the standby receives nothing, so the timeline went unchecked,
            # and having replayed past the primary (lag 0), it served stale reads, read-after ones too.
            with pair.standby.connect("forked") as sibling:
                sibling.execute("CREATE TABLE filler AS SELECT generate_series(1, 100000) AS n")
                (end,) = sibling.execute("SELECT pg_current_wal_lsn()").fetchone()
            with forked.connect("forked") as conn:
                replayed = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
                await until(lambda: conn.execute(replayed, (end,)).fetchone()[0], "the fork's writes replayed")
                pair.standby.stop()
                receiving = "SELECT EXISTS (SELECT FROM pg_stat_wal_receiver)"
                await until(lambda: not conn.execute(receiving).fetchone()[0], "the standby receives nothing")
            states = set()
            for _ in range(40):  # 4 s: several health checks
                changed = await client.patch(f"/tasks/{task['task_id']}", json={"progress": 50})
                read = await client.get(f"/tasks/{task['task_id']}", headers={HEADER: changed.headers[HEADER]})
                assert read.json()["version"] == changed.json()["version"], "a read-after read saw older data"
                states.add(replica.state)
                await asyncio.sleep(0.1)
            assert states == {FOREIGN}
    finally:
        forked.stop()
        pair.close()
