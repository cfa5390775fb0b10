"""Where the database is, and connections to it."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

DEFAULT_DATA_DIR = Path(".tasktrail")
EMBEDDED_DATABASE = "tasktrail"

# Every connection: UTC timestamps, and no statement or idle transaction that
# holds a connection for ever.
SESSION_OPTIONS = "-c TimeZone=UTC -c statement_timeout=30s -c idle_in_transaction_session_timeout=60s"

set_json_dumps(msgspec.json.encode)
set_json_loads(msgspec.json.decode)


def start_embedded(data_dir: Path, cleanup_mode: str = "stop") -> Any:
    """Start (or reuse) the embedded PostgreSQL kept in data_dir; stopped at exit."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver then uses /tmp.
        warnings.simplefilter("ignore")
        import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        return pgserver.get_server(data_dir.resolve() / "pgdata", cleanup_mode=cleanup_mode)


def ensure_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


def resolve(data_dir: Path = DEFAULT_DATA_DIR) -> tuple[str, Any]:
    """DATABASE_URL when set, else the embedded server's; and its handle (or None)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url, None
    server = start_embedded(data_dir)
    ensure_database(server.get_uri(), EMBEDDED_DATABASE)
    return server.get_uri(EMBEDDED_DATABASE), server


def connect_kwargs() -> dict[str, Any]:
    return {"autocommit": True, "options": SESSION_OPTIONS}


def create_pool(conninfo: str, *, max_size: int = 16) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        conninfo,
        min_size=2,
        max_size=max_size,
        kwargs=connect_kwargs(),
        timeout=10,
        open=False,
    )
