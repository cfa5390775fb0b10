"""How replicas are named, how tokens are read, and how lag is measured (pure rules, and the command line)."""

from __future__ import annotations

import argparse
import asyncio
import math

import pytest

from tasktrail import cli, db, replicas
from tasktrail.replicas import EVERYTHING, PrimaryPositions, Replica, Replicas, configured, describe, split_urls, wanted


def header(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"accept", b"*/*")] + [(b"tasktrail-read-after", value.encode()) for value in values]


@pytest.mark.parametrize(
    ("values", "position"),
    [
        ((), None),
        (("",), None),
        (("0/0",), 0),
        (("1/A",), 1 << 32 | 10),
        (("0/10", "0/2"), 16),  # several tokens: the latest
        (("0/2, 0/10",), 16),
        (("primary",), EVERYTHING),  # what a process without replicas gives out
        (("0/2, garbage",), EVERYTHING),
        (("-1/0",), EVERYTHING),
        (("123456789/0",), EVERYTHING),  # more than 32 bits in a half
        (("0/0/0",), EVERYTHING),
    ],
)
def test_a_token_asks_for_a_position_or_for_the_primary(values: tuple[str, ...], position: int | None) -> None:
    assert wanted(header(*values)) == position


def test_an_idle_primary_is_no_lag_however_long_it_has_been_idle() -> None:
    seen = PrimaryPositions(keep=11)
    seen.add(0.0, 100)
    for at in range(1, 1000):
        seen.add(float(at), 100)  # the primary does not move
    assert seen.behind(100, 1000.0) == (0.0, True)
    # A replica that has not replayed that position has been behind at least since it was first seen.
    assert seen.behind(99, 1000.0) == (1000.0, False)


def test_lag_is_how_long_a_replica_has_been_behind_the_oldest_position_it_lacks() -> None:
    seen = PrimaryPositions(keep=11)
    for at, position in [(0.0, 100), (1.0, 200), (2.0, 300), (3.0, 400)]:
        seen.add(at, position)
    assert seen.behind(400, 3.5) == (0.0, True)
    assert seen.behind(250, 3.5) == (1.5, True)  # lacks 300, first seen at 2.0
    assert seen.behind(100, 3.5) == (2.5, True)
    # Behind everything remembered: at least that long, and not known to be level.
    assert seen.behind(50, 3.5) == (3.5, False)
    # Positions older than `keep` are forgotten but the newest of them, so a replica that far behind stays out.
    for at in range(4, 40):
        seen.add(float(at), 100 * (at + 1))
    assert seen.behind(150, 40.0)[0] >= 11
    assert seen.behind(3950, 40.0) == (1.0, True)


def test_sightings_close_together_share_one_so_a_long_max_lag_keeps_few() -> None:
    seen = PrimaryPositions(keep=2 * 86_400 + 1)
    for i in range(100_000):
        seen.add(i * 0.25, 100 * (i + 1))  # four checks a second, the primary always moving
    assert len(seen.seen) < 200
    at, position = seen.seen[-1]
    assert position == 100 * 100_000
    assert seen.behind(position - 1, 25_000.0)[0] >= 25_000.0 - at  # counted from the shared sighting: not less


def test_no_position_seen_yet_is_not_level_and_its_lag_unknown() -> None:
    lag, exact = PrimaryPositions(keep=11).behind(100, 5.0)
    assert (math.isnan(lag), exact) == (True, False)  # not 0, "level" (review)


def test_replica_urls_split_on_commas_but_keep_multi_host_urls_whole() -> None:
    value = "postgresql://h1,h2:5433/db, postgres://u:pw@h3/db?sslmode=require,host=a,b port=5 dbname=x,"
    assert split_urls(value) == [
        "postgresql://h1,h2:5433/db",
        "postgres://u:pw@h3/db?sslmode=require",
        "host=a,b port=5 dbname=x",
    ]
    assert describe("postgres://u:pw@h3:6432/db") == "h3:6432/db"  # no credentials in logs
    assert configured({"DATABASE_REPLICA_URLS": "", "TASKTRAIL_REPLICA_MAX_LAG": "0.5"}) == ([], 0.5)
    for lag in ("0", "-1", "nan", "inf", "ten"):
        with pytest.raises(ValueError, match="seconds"):
            configured({"TASKTRAIL_REPLICA_MAX_LAG": lag})
    with pytest.raises(ValueError, match="not a PostgreSQL connection string"):
        configured({"DATABASE_REPLICA_URLS": "nonsense"})
    # Refused, it is logged: never with its password.
    for url in ("postgresql://u:S3CRET@h/db?%zz=1", "host=h password=S3CRET port", "postgresql://u:S3C%zzRET@h/db"):
        with pytest.raises(ValueError, match="not a PostgreSQL connection string") as refused:
            configured({"DATABASE_REPLICA_URLS": url})
        assert "S3C" not in str(refused.value)
        assert "RET" not in str(refused.value)
        assert "***" in str(refused.value)


@pytest.mark.anyio
async def test_a_replica_that_never_answers_holds_back_no_other_replicas_check(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each replica is checked on its own clock: one whose check hangs (CHECK_TIMEOUT) must not slow the others'."""
    replicas = Replicas(database_url, db.create_pool(database_url), ["postgresql://silent/db", "postgresql://good/db"])
    silent, good = replicas.replicas
    checked: list[Replica] = []
    enough = asyncio.Event()

    async def check(replica: Replica) -> None:
        if replica is silent:
            await asyncio.Event().wait()  # takes the connection, never answers
        checked.append(replica)
        if len(checked) == 5:
            enough.set()

    monkeypatch.setattr(replicas, "_check", check)
    await replicas.start()
    try:
        await asyncio.wait_for(enough.wait(), 30)
    finally:
        await replicas.stop()
    assert checked == [good] * 5


def test_serve_help_documents_the_replica_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens otherwise
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for words in ("--replica URL", "repeat for several", "DATABASE_REPLICA_URLS", "Tasktrail-Read-After"):
        assert words in shown
    assert "--replica-max-lag SECONDS" in shown
    assert "(default: 5; env TASKTRAIL_REPLICA_MAX_LAG)" in shown


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (("--replica", "nonsense"), {}, "is not a PostgreSQL connection string"),
        (("--replica-max-lag", "0"), {}, "above 0"),
        ((), {"DATABASE_REPLICA_URLS": "postgresql://ok/db,also nonsense"}, "is not a PostgreSQL connection string"),
        ((), {"TASKTRAIL_REPLICA_MAX_LAG": "soon"}, "seconds"),
    ],
)
def test_serve_refuses_replicas_it_cannot_use(
    args: tuple[str, ...],
    env: dict[str, str],
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("DATABASE_REPLICA_URLS", "TASKTRAIL_REPLICA_MAX_LAG", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)  # and restored afterwards, whatever serve sets
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Refused before the database is looked for or a port bound.
    assert cli.main(["serve", "--port", "1", *args]) == 2
    assert said in capsys.readouterr().err


@pytest.mark.anyio
async def test_what_a_replica_had_replayed_is_forgotten_on_a_new_connection(database_url: str) -> None:
    """Behind the same address another standby may answer next (a failover), which may have replayed less."""
    replicas = Replicas(database_url, db.create_pool(database_url), [database_url])
    (replica,) = replicas.replicas
    replica.replayed = 1 << 40  # what the standby before had replayed
    try:
        await replicas._check(replica)  # a new connection: this one is no standby at all
    finally:
        await replicas.stop()
    assert replica.replayed == 0


def test_serve_hands_each_replica_to_its_workers_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Joined with commas, a password with ",a=" in it read as two connection strings (and logged half of one).
    for name in ("DATABASE_REPLICA_URLS", "TASKTRAIL_REPLICA_MAX_LAG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(replicas.GIVEN_ENV, "")  # so that what serve sets there goes away afterwards
    given = ["postgresql://postgres:pa,ss=1@127.0.0.1:9/db", "host=127.0.0.1 port=9 password=s3,host=x"]
    assert cli._replicas(argparse.Namespace(replica=given, replica_max_lag=None)) is None
    assert configured() == (given, replicas.DEFAULT_MAX_LAG)
