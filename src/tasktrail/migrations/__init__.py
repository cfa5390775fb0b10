"""Versioned SQL migrations, applied in order, once, under an advisory lock."""

from __future__ import annotations

from importlib import resources

import psycopg

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
# Serialises migrators across processes; released when the transaction ends.
LOCK = "SELECT pg_advisory_xact_lock(hashtext('tasktrail.migrations'))"
APPLIED = "SELECT version FROM schema_migrations"
RECORD = "INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s)"


def available() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every migration file, in order."""
    files = [f for f in resources.files(__package__).iterdir() if f.name.endswith(".sql")]
    return sorted((int(f.name.split("_", 1)[0]), f.name, f.read_text()) for f in files)


def pending(conn: psycopg.Connection) -> list[str]:
    """The names of the migrations this database has yet to be given (all, when it has none)."""
    if conn.execute("SELECT to_regclass('schema_migrations') IS NULL").fetchone()[0]:  # type: ignore[index]
        return [name for _, name, _ in available()]
    done = {row[0] for row in conn.execute(APPLIED)}
    return [name for version, name, _ in available() if version not in done]


def migrate(conninfo: str) -> list[str]:
    """Apply the pending migrations; return the names of those applied."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        conn.execute(LOCK)
        conn.execute(CREATE_LEDGER)
        done = {row[0] for row in conn.execute(APPLIED)}
        applied = []
        for version, name, sql in available():
            if version in done:
                continue
            conn.execute(sql)
            conn.execute(RECORD, {"version": version, "name": name})
            applied.append(name)
        return applied


# The log's planner statistics, when it has none and is large: a table never analysed (reltuples -1) is
# planned with default estimates, and the followers' rounds during a deploy then scan all of it (0.4 s
# a round at 630,000 events). Autovacuum analyses it in time; where it is off, or has not come round
# since a bulk load or a restore, this is the one ANALYZE that matters. Not while the log is small:
# statistics taken from a few rows (one task's three events) say a task's events are a third of the
# log, and with autovacuum off they would stay, and send later reads of one task to scan the table.
ANALYSE_FROM = 10_000  # events
UNANALYSED = f"""
SELECT reltuples < 0 AND (SELECT count(*) FROM (SELECT FROM events LIMIT {ANALYSE_FROM}) first) = {ANALYSE_FROM}
FROM pg_class WHERE oid = 'events'::regclass
"""  # noqa: S608 -- a constant
ANALYZE = "ANALYZE events"


def analyse_the_log(conninfo: str) -> bool:
    """ANALYZE the events table if it was never analysed and holds ANALYSE_FROM events or more; whether it did."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if not conn.execute(UNANALYSED).fetchone()[0]:  # type: ignore[index]
            return False
        conn.execute(ANALYZE)
        return True
