"""A private PostgreSQL primary and a streaming standby, for the replica tests and bench/replicas.py.

The primary is initdb'd with wal_level=replica; the standby is `pg_basebackup -R`
of it, so it streams and replays the primary's WAL from the start. Each listens
on its own free loopback port (and a socket in its data folder). They use
pgserver's PostgreSQL binaries, the ones the embedded suite runs on. PostgreSQL
refuses to run as root, so as root (as here and in CI) every PostgreSQL command
runs as pgserver's unprivileged user, as pgserver itself does; as anyone else it
runs as that user. Servers are stopped by their postmaster's PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

SYSTEM_USER = "pgserver"  # pgserver's own choice of an unprivileged user when run as root
# Quick to notice a stopped standby and quick to reconnect to a restarted primary;
# hot_standby_feedback keeps the standby's reads from being cancelled by replayed cleanup.
PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "4",
    "fsync": "off",  # a test cluster: speed over durability
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "60",
}
STANDBY_SETTINGS = {
    "hot_standby_feedback": "on",
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "200ms",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _running(pid: int) -> bool:
    """Whether pid is a live process (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class Node:
    """One PostgreSQL server of the pair: its data folder, port and postmaster."""

    def __init__(self, name: str, root: Path, user: str | None) -> None:
        self.name = name
        self.data = root / name
        self.port = _free_port()
        self.user = user
        self.log = root / f"{name}.log"

    def url(self, dbname: str = "postgres") -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)

    def run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [str(POSTGRES_BIN_PATH / tool), *args], user=self.user, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def configure(self, settings: dict[str, str]) -> None:
        lines = [f"{name} = '{value}'" for name, value in settings.items()]
        lines += [f"port = {self.port}", "listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{self.data}'"]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(lines) + "\n")

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        """SIGINT to the postmaster (a fast shutdown: sessions are ended); returns once it has shut down.

        The postmaster removes its pid file as it exits. (Waiting for the PID to
        vanish can take a while: pg_ctl left it to be reaped by PID 1.)
        """
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while (self.data / "postmaster.pid").exists() and _running(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=5)


class Pair:
    """A primary and its streaming standby, started in a private folder; `close()` stops both and removes it."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: the PostgreSQL user must reach the folder (see conftest.embedded_data_dir).
        self.root = Path(tempfile.mkdtemp(prefix="tasktrail-replicas-"))
        user = None
        if os.geteuid() == 0:
            user = SYSTEM_USER
            entry = ensure_user_exists(user)
            assert entry is not None
            ensure_prefix_permissions(self.root)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.primary = Node("primary", self.root, user)
        self.standby = Node("standby", self.root, user)
        try:
            self.primary.run("initdb", "-D", str(self.primary.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
            self.primary.configure(PRIMARY_SETTINGS)
            with (self.primary.data / "pg_hba.conf").open("a") as hba:
                hba.write("host replication all 127.0.0.1/32 trust\n")
            self.primary.start()
            self.standby.run(
                "pg_basebackup", "-D", str(self.standby.data), "-R", "-X", "stream", "-c", "fast",
                "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
            )  # fmt: skip
            self.standby.configure(STANDBY_SETTINGS)
            self.standby.start()
            self.wait_replayed()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.standby.stop()
        self.primary.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- the standby's replay ---------------------------------------------------

    def primary_lsn(self) -> str:
        with self.primary.connect() as conn:
            return conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]  # type: ignore[index]

    def wait_replayed(self, timeout: float = 30) -> None:
        """Until the standby has replayed everything the primary has flushed now."""
        target = self.primary_lsn()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.standby.connect() as conn:
                    done = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()
                if done and done[0]:
                    return
            except psycopg.OperationalError:
                pass  # still starting
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not replay {target} in {timeout}s:\n{self.standby._log_tail()}")
            time.sleep(0.02)

    def pause_replay(self) -> None:
        with self.standby.connect() as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            while conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()[0] != "paused":  # type: ignore[index]
                time.sleep(0.01)

    def resume_replay(self) -> None:
        with self.standby.connect() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def paused(self) -> _Paused:
        return _Paused(self)

    # --- databases ----------------------------------------------------------------

    def create_database(self, name: str, template: str | None = None) -> None:
        """A database on the primary, once the standby has it too."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self.primary.connect() as conn:
            conn.execute(query)
        self.wait_replayed()

    def drop_database(self, name: str) -> None:
        with self.primary.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def standby_backends(self, dbname: str) -> list[dict[str, Any]]:
        """The client sessions on the standby's database (who reads from it)."""
        with self.standby.connect() as conn:
            cur = conn.execute(
                "SELECT pid, application_name, state, query FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                (dbname,),
            )
            return [dict(zip(("pid", "application_name", "state", "query"), row, strict=True)) for row in cur]


class _Paused:
    """`with pair.paused():` replay paused on the standby for the block, resumed after."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    def __enter__(self) -> Pair:
        self.pair.pause_replay()
        return self.pair

    def __exit__(self, *_: object) -> None:
        self.pair.resume_replay()
