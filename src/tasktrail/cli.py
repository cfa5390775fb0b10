"""The `tasktrail` command: serve, migrate, verify."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tasktrail import db, migrations


def _database(args: argparse.Namespace) -> tuple[str, object]:
    url, server = db.resolve(args.data_dir)
    where = "DATABASE_URL" if server is None else f"embedded PostgreSQL in {args.data_dir / 'pgdata'}"
    print(f"tasktrail: database: {where}", file=sys.stderr)
    return url, server


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    url, _server = _database(args)  # the embedded server stops when this process exits
    for name in migrations.migrate(url):
        print(f"tasktrail: applied migration {name}", file=sys.stderr)
    # Worker processes find the database where this one put it.
    os.environ["DATABASE_URL"] = url
    uvicorn.run(
        "tasktrail.http.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
    )
    return 0


def migrate(args: argparse.Namespace) -> int:
    url, _server = _database(args)
    applied = migrations.migrate(url)
    print("\n".join(f"applied {name}" for name in applied) or "up to date")
    return 0


def verify(args: argparse.Namespace) -> int:
    from tasktrail.verify import verify as run

    url, _server = _database(args)
    report = run(url)
    print(report.summary())
    return 0 if report.ok else 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="tasktrail",
        description="Event-sourced task-status service. Uses DATABASE_URL when set, "
        "else an embedded PostgreSQL kept under --data-dir.",
    )
    top.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("TASKTRAIL_DATA_DIR", db.DEFAULT_DATA_DIR)),
        help="where the embedded PostgreSQL keeps its data (default: %(default)s; env TASKTRAIL_DATA_DIR)",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("serve", help="apply migrations and serve the HTTP API")
    run.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    run.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    run.add_argument("--workers", type=int, default=1, help="server processes (default: %(default)s)")
    run.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    run.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False, help="log every request")
    run.set_defaults(func=serve)

    mig = commands.add_parser("migrate", help="apply pending migrations and exit (safe to repeat)")
    mig.set_defaults(func=migrate)

    check = commands.add_parser(
        "verify", help="fold the whole log in memory and compare it with the read model and counters"
    )
    check.set_defaults(func=verify)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)
