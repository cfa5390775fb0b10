"""The `tasktrail` command: serve, migrate, projections, verify, keys."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tasktrail import db, migrations

# What `serve` says before and while it starts, through the logging it configures (text or JSON lines).
log = logging.getLogger("tasktrail")


def _stderr(message: str) -> None:
    print(f"tasktrail: {message}", file=sys.stderr)


def _database(args: argparse.Namespace, say: Callable[[str], None] = _stderr) -> tuple[str, object]:
    with _signals_held():
        url, server = db.resolve(args.data_dir)
    # The whole path: the default folder is relative to where the command runs, so two look alike.
    where = "DATABASE_URL" if server is None else f"embedded PostgreSQL in {args.data_dir.absolute() / 'pgdata'}"
    say(f"database: {where}")
    return url, server


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the embedded PostgreSQL starts, and act on them once it has.

    pgserver records this process as a holder of the server only at the end of
    its start; stopped before that, the process would leave behind a server it
    started. Held until then, the stop runs the exit hooks that stop it.
    """
    caught: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda sig, _frame: caught.append(sig)) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught[:1]:
            signal.raise_signal(sig)


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_keys(args: argparse.Namespace) -> int | None:
    """Load the keys as the app will, and refuse an open service off loopback; an exit code on failure."""
    from tasktrail.http import auth

    if args.api_keys is not None:
        # The app (in every worker) reads the keys from the environment.
        os.environ["TASKTRAIL_API_KEYS_FILE"] = str(args.api_keys)
    try:
        keys = auth.load()
    except auth.BadKeys as exc:
        log.error("API keys: %s", exc)
        return 2
    if not keys and not _loopback(args.host):
        log.error(
            "refusing to serve on %s with no API keys: anyone who can reach it could change and delete tasks.\n"
            "  Make a key:  tasktrail keys add NAME --scope admin --file keys.txt  (prints the key once)\n"
            "  then serve:  tasktrail serve --host HOST --api-keys keys.txt  (or set TASKTRAIL_API_KEYS_FILE)\n"
            "  or bind to 127.0.0.1 to serve without keys on this machine only.",
            args.host,
        )
        return 2
    args.keyless = not keys
    scopes = ", ".join(f"{key.name} ({key.scope})" for key in keys)
    log.info("API keys: %s", scopes or "none: open to this machine only")
    return None


def _replicas(args: argparse.Namespace) -> int | None:
    """Check the replicas as the app will take them, and hand them to the workers; an exit code on failure."""
    from tasktrail import replicas

    try:
        if args.replica:
            for url in args.replica:
                replicas.check_url(url)
            os.environ[replicas.GIVEN_ENV] = json.dumps(args.replica)
        if args.replica_max_lag is not None:
            os.environ[replicas.MAX_LAG_ENV] = str(replicas.max_lag_from(args.replica_max_lag))
        urls, max_lag = replicas.configured()
    except ValueError as exc:
        log.error("replicas: %s", exc)
        return 2
    if urls:
        names = ", ".join(replicas.describe(url) for url in urls)
        log.info("replicas: %s (reads, when at most %g s behind)", names, max_lag)
    return None


def serve(args: argparse.Namespace) -> int:
    import logging.config

    from tasktrail import grouped, live, logs
    from tasktrail.http import sessions, wellformed

    if args.log_format not in logs.FORMATS:  # from the environment: argparse checks only what it parses
        _stderr(f"{logs.FORMAT_ENV}={args.log_format!r}: give one of {', '.join(logs.FORMATS)}")
        return 2
    for name, flag in ((logs.ACCESS_ENV, args.access_log), (METRICS_ENV, args.metrics)):
        if not isinstance(flag, bool):  # the same
            _stderr(f"{name}={flag!r}: give 1 or 0")
            return 2
    log_config = logs.config(args.log_format, args.log_level)
    logging.config.dictConfig(log_config)
    args.logged = True  # from here a refusal is a log line (in JSON mode, a JSON one): see main
    # Read only once the app starts: a bad value is refused before anything starts.
    db.pool_timeout()
    db.pool_size()
    wellformed.read_timeout()
    live.poll_seconds()
    live.ping_seconds()
    grouped.configured_slots()
    sessions.secret_from_env()
    args.stop_timeout = db.seconds(STOP_TIMEOUT_ENV, STOP_TIMEOUT)
    # First: prometheus_client reads the directory when it is first imported, which what follows may do.
    # (A worker process imports it afresh.) One process serving by itself has nothing to add up: its
    # values live in its memory, where an increment costs a lock, not a write to an mmap'd file.
    metrics_dir = _metrics_directory() if args.metrics and args.workers > 1 else None
    if metrics_dir is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        return _serve(args, log_config)
    finally:  # also when a stop (Ctrl-C, SIGTERM: see main) ends it
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def _serve(args: argparse.Namespace, log_config: dict[str, object]) -> int:
    import uvicorn

    from tasktrail import logs
    from tasktrail.http import auth

    if (refused := _api_keys(args)) is not None:
        return refused
    if (refused := _replicas(args)) is not None:
        return refused
    if (taken := _address_taken(args.host, args.port)) is not None:
        reason, option = taken
        log.error("cannot serve on %s port %s: %s; choose another with %s", args.host, args.port, reason, option)
        return 1
    _one_stop_per_ctrl_c()  # from the start's slow steps on (not in a test calling main: it returned before)
    url, _server = _database(args, log.info)  # the embedded server stops when this process exits
    for name in migrations.migrate(url):
        log.info("applied migration %s", name)
    if migrations.analyse_the_log(url):
        log.info("analysed the events table, which had no planner statistics")
    # This process's read-model versions are in use from now until it exits
    # (`projections prune` refuses them), and any that has no tables yet is
    # built from the log first, while other releases keep serving.
    _guard = _hold_read_models(url)
    failed = _rebuild(url, None, starting=True, say=log.info, bar=args.log_format == "text")
    if failed:
        return failed
    # Worker processes find the database where this one put it, and read how to log and count from here.
    os.environ["DATABASE_URL"] = url
    os.environ[logs.FORMAT_ENV] = args.log_format
    os.environ[logs.ACCESS_ENV] = "1" if args.access_log else "0"
    os.environ[METRICS_ENV] = "1" if args.metrics else "0"
    os.environ[SERVE_PID_ENV] = str(os.getpid())  # workers stop when this process ends (see the app's)
    # Open, on loopback: the app answers only requests addressed to this machine (see http/auth.py).
    os.environ[auth.LOOPBACK_ONLY_ENV] = "1" if args.keyless else "0"
    uvicorn.run(
        "tasktrail.http.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        log_config=log_config,
        # Each request's line comes from the app (tasktrail.logs), with its route and actor.
        access_log=False,
        timeout_graceful_shutdown=args.stop_timeout,
        # By name, like the app: a worker process imports it only once it answers uvicorn's health checks.
        http="tasktrail.http.protocol:BoundedHead",
    )
    # Stopped (uvicorn takes the Ctrl-C or SIGTERM that stops it and returns): what is left is the exit
    # hooks, which stop the embedded PostgreSQL. No Ctrl-C, pressed again or not, breaks that off.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0


# A Ctrl-C in a terminal signals every process of the foreground group, and `uv run` passes the signal on
# to its child as well: `serve` under uv hears one Ctrl-C twice, up to a few hundred milliseconds apart.
# uvicorn took the second for "quit now", cancelling requests in flight, or it broke off the exit hooks
# that stop the embedded PostgreSQL (a traceback). A SIGINT within DUPLICATE_STOP of the first stop is
# taken for the same Ctrl-C; pressed again later, it still quits at once. (With --workers N, uvicorn's
# supervisor handles signals its own way, which a second SIGINT does not hurry.)
DUPLICATE_STOP = 1.0
_stopped: list[float] = []  # when serve was first told to stop


def _news(sig: int) -> bool:
    """Whether a stop signal says something new: not the same Ctrl-C again."""
    now = time.monotonic()
    if _stopped and sig == signal.SIGINT and now - _stopped[0] < DUPLICATE_STOP:
        return False
    _stopped[:] = _stopped or [now]
    return True


def _one_stop_per_ctrl_c() -> None:
    """uvicorn's signal handler, and the one around it (before it starts, once it ends), heed _news only."""
    from uvicorn.server import Server

    handle_exit = Server.handle_exit
    if not getattr(handle_exit, "news_only", False):

        def news_only(self: Server, sig: int, frame: object) -> None:
            if _news(sig):
                handle_exit(self, sig, frame)  # type: ignore[arg-type]

        news_only.news_only = True  # type: ignore[attr-defined]
        Server.handle_exit = news_only  # type: ignore[method-assign]

    def interrupt(sig: int, frame: object) -> None:
        if _news(sig):
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


# On a stop (SIGTERM, Ctrl-C), how long requests in flight may take to finish before they are cancelled (a
# 503 each): under a supervisor's own grace period (Kubernetes gives 30 s before its SIGKILL).
STOP_TIMEOUT_ENV = "TASKTRAIL_STOP_TIMEOUT"
STOP_TIMEOUT = 10.0


def _address_taken(host: str, port: int) -> tuple[str, str] | None:
    """Why uvicorn could not listen on host:port, and the option to change: asked before the start's slow
    steps (a build from the log)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:  # no such name or address
        return exc.strerror or str(exc), "--host"
    if port == 0:
        return None
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "it is in use by another process", "--port"
        # Not this machine's address (EADDRNOTAVAIL), or one it may not listen on.
        return exc.strerror or str(exc), "--host" if exc.errno == errno.EADDRNOTAVAIL else "--host or --port"
    return None


# Mirror tasktrail.http.app's (importing the app here would import prometheus_client too early).
METRICS_ENV = "TASKTRAIL_METRICS"
SERVE_PID_ENV = "TASKTRAIL_SERVE_PID"
METRICS_DIR_PREFIX = "tasktrail-metrics-"


def _metrics_directory() -> str:
    """A fresh private directory for this run's metric files (see tasktrail.metrics), in PROMETHEUS_MULTIPROC_DIR.

    Its name holds this process's id: directories of earlier runs whose process is gone (killed before it could
    remove its own) are removed first.
    """
    for old in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"):
        pid = old.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        mine = old.is_dir() and not old.is_symlink() and old.stat().st_uid == os.getuid()
        if mine and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")  # mode 0700
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True


def _hold_read_models(url: str) -> object:
    """A connection that marks this release's read-model versions in use for as long as it is open."""
    import psycopg

    from tasktrail.projections import INLINE, versions

    conn = psycopg.connect(url, **db.connect_kwargs() | versions.application_name())
    versions.hold(conn, INLINE)
    return conn


def migrate(args: argparse.Namespace) -> int:
    url, _server = _database(args)
    applied = migrations.migrate(url)
    print("\n".join(f"applied {name}" for name in applied) or "up to date")
    # And this code's read-model versions, which no migration makes (see projections/rebuild.py).
    return _rebuild(url, None, starting=True)


def verify(args: argparse.Namespace) -> int:
    from tasktrail.projections import INLINE
    from tasktrail.verify import verify as run

    named = [name for name, _ in args.version or []]
    if twice := sorted({name for name in named if named.count(name) > 1}):
        print(
            f"tasktrail verify: --version names {', '.join(twice)} twice; verify one version of each a run",
            file=sys.stderr,
        )
        return 2
    if unknown := [name for name in named if name not in {m.NAME for m in INLINE}]:
        print(f"tasktrail verify: no read model named {', '.join(unknown)}", file=sys.stderr)
        return 2
    url, _server = _database(args)
    chosen = dict(args.version or [])
    report = run(url, {m.NAME: chosen.get(m.NAME, m.VERSION) for m in INLINE})
    print(report.summary())
    return 0 if report.ok else 1


def _name_version(text: str) -> tuple[str, int]:
    name, _, version = text.partition("=")
    if not (name and version.isascii() and version.isdigit() and int(version) > 0):
        raise argparse.ArgumentTypeError("NAME=VERSION, such as tasks=2")
    return name, int(version)


def _folder(value: str) -> Path:
    """A folder's path; an empty one is a mistake (a variable that expanded to nothing), not this folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty: give a folder (use . for this one)")
    return Path(value)


def _keys_file(args: argparse.Namespace) -> Path:
    path = args.file or os.environ.get("TASKTRAIL_API_KEYS_FILE")
    if not path:
        raise SystemExit("tasktrail keys: give --file PATH or set TASKTRAIL_API_KEYS_FILE")
    return Path(path)


def keys_add(args: argparse.Namespace) -> int:
    from tasktrail.http import auth

    path = _keys_file(args)
    existing = auth.parse_file(path) if path.exists() else []
    if any(key.name == args.name for key in existing):
        print(f"tasktrail keys: {path} already has a key named {args.name!r}", file=sys.stderr)
        return 1
    key = auth.new_key()
    entry = auth.Key(args.name, args.scope, auth.digest(key)).entry()
    # Only the hash is written; a file made here is the owner's alone all the same. One made before keeps
    # its mode (a group the service runs as may need to read it), with a word if everyone may read it.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as file:
        file.write(f"{entry}\n")
        mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
    print(key)
    if mode & 0o007:
        print(f"tasktrail keys: {path} is readable by every user (mode {mode:o}): `chmod 600 {path}`", file=sys.stderr)
    print(
        f"tasktrail keys: added {args.name} ({args.scope}) to {path}; the key above is shown only now", file=sys.stderr
    )
    return 0


def keys_list(args: argparse.Namespace) -> int:
    from tasktrail.http import auth

    path = _keys_file(args)
    if not path.exists():
        print(f"no keys: {path} does not exist (`tasktrail keys add` makes it)", file=sys.stderr)
        return 0
    listed = auth.parse_file(path)
    for key in listed:
        print(f"{key.name}\t{key.scope}")
    if not listed:
        print(f"no keys: {path} holds none (`tasktrail keys add` adds one)", file=sys.stderr)
    return 0


def keys_remove(args: argparse.Namespace) -> int:
    from tasktrail.http import auth

    path = _keys_file(args)
    existing = auth.parse_file(path) if path.exists() else []
    kept = [key for key in existing if key.name != args.name]
    if len(kept) == len(existing):
        print(f"tasktrail keys: {path} has no key named {args.name!r}", file=sys.stderr)
        return 1
    path.write_text("".join(f"{key.entry()}\n" for key in kept))
    print(f"tasktrail keys: removed {args.name}; restart the server to stop accepting it", file=sys.stderr)
    return 0


def projections_status(args: argparse.Namespace) -> int:
    from tasktrail.projections import INLINE, versions

    url, _server = _database(args)
    found, head, left = versions.status(url, INLINE)
    print(f"{'projection':<12}{'version':>8}  {'state':<9}{'behind':>8}{'processes':>11}  since")
    for v in found:
        mark = "  (this code)" if v.code else ""
        since = "-" if v.since is None else f"{v.since:%Y-%m-%d %H:%M:%S %Z}"
        behind = "-" if v.state != "live" else f"{v.behind:,}"
        print(f"{v.name:<12}{v.version:>8}  {v.state:<9}{behind:>8}{v.processes:>11}  {since}{mark}")
    print(f"log head: position {head:,}")
    live = Counter(v.name for v in found if v.state == "live")
    for v in found:
        if v.state == "missing":
            print(f"{v.name} version {v.version} has no tables yet: `tasktrail serve` builds it before it serves")
        elif v.state == "building" and v.processes == 0:
            print(f"{v.name} version {v.version} was being built and was interrupted: the next `serve` starts over")
        elif v.state == "live" and v.processes == 0 and not v.code and live[v.name] > 1:  # prune keeps the last
            print(f"{v.name} version {v.version} is used by no process: `tasktrail projections prune` drops it")
    for schema in left:
        print(f"schema {schema} is left from an interrupted rebuild; the next rebuild drops it")
    return 0


def projections_prune(args: argparse.Namespace) -> int:
    from tasktrail.projections import INLINE, versions

    url, _server = _database(args)
    if args.name is None:
        targets = versions.unused(url, INLINE)
        if not targets:
            print("nothing to prune: every version left is this code's, or the last live one of its read model")
            return 0
    elif args.name not in {module.NAME for module in INLINE} and args.name not in versions.names(url):
        print(f"tasktrail projections prune: there is no read model {args.name!r}", file=sys.stderr)
        return 2
    elif args.version is None:
        targets = [(n, v) for n, v in versions.unused(url, INLINE) if n == args.name]
        if not targets:
            print(f"nothing to prune: no version of {args.name} but this code's, or its last live one")
            return 0
    else:
        targets = [(args.name, args.version)]
    failed = 0
    for name, version in targets:
        try:
            print(versions.prune(url, name, version))
        except (versions.InUse, versions.Kept, LookupError) as exc:
            print(f"tasktrail projections prune: {exc.args[0]}", file=sys.stderr)
            failed = 1
    return failed


def projections_rebuild(args: argparse.Namespace) -> int:
    url, _server = _database(args)
    return _rebuild(url, args.name, starting=False)


def _rebuild(
    url: str, name: str | None, *, starting: bool, say: Callable[[str], None] | None = None, bar: bool = True
) -> int:
    """Rebuild with a progress bar; when `starting` a server, wait for the lock and build only what is not live.

    `say` takes the messages instead of the terminal (serve's log); `bar=False` shows no bar (JSON logs).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

    from tasktrail.projections import INLINE
    from tasktrail.projections.rebuild import RebuildBusy, SwapFailed, prepare, rebuild

    modules = [m for m in INLINE if name in (None, m.NAME)]
    if not modules:
        there_are = ", ".join(m.NAME for m in INLINE)
        print(f"tasktrail projections rebuild: no read model {name!r}; there are: {there_are}", file=sys.stderr)
        return 2
    console = Console(stderr=True, highlight=False)
    say = say or (lambda message: console.print(f"tasktrail: {message}"))
    columns = (
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]:<6} {task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    started = time.perf_counter()
    with Progress(*columns, console=console, disable=not bar) as shown:
        steps: dict[str, TaskID] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in steps:
                unit = "tasks" if step in ("load", "indexes") else "events" if step != "swap" else ""
                steps[step] = shown.add_task(step, total=total, unit=unit, rate="")
            shown.update(steps[step], completed=done, total=total)
            speed = shown.tasks[steps[step]].speed
            if speed and step == "replay":
                shown.update(steps[step], rate=f"{speed:>10,.0f} events/s")

        try:
            done = prepare(url, modules, progress) if starting else rebuild(url, modules, progress)
        except (RebuildBusy, SwapFailed) as exc:
            say(str(exc))
            return 1
        except KeyboardInterrupt:
            say("interrupted; the live read models are untouched, and a new rebuild starts over")
            return 130
    seconds = time.perf_counter() - started
    if done.names:
        built = ", ".join(f"{m.NAME} version {m.VERSION}" for m in modules if m.NAME in done.names)
        say(
            f"rebuilt {', '.join(done.names)} from {done.events:,} events in {seconds:.1f} s"
            f" ({done.events / seconds:,.0f} events/s), and {done.caught_up:,} appended meanwhile;"
            f" live since position {done.position:,}: {built}"
        )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="tasktrail",
        description="Event-sourced task-status service. Uses DATABASE_URL when set, "
        "else an embedded PostgreSQL kept under --data-dir.",
    )
    data_dir = Path(os.environ.get("TASKTRAIL_DATA_DIR") or db.DEFAULT_DATA_DIR)  # set but empty: unset
    data_dir_help = f"where the embedded PostgreSQL keeps its data (default: {data_dir}; env TASKTRAIL_DATA_DIR)"
    top.add_argument("--data-dir", type=_folder, default=data_dir, help=data_dir_help)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --data-dir after the command too (`tasktrail serve --data-dir X`): given there, it wins.
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--data-dir", type=_folder, default=argparse.SUPPRESS, help=data_dir_help)

    run = commands.add_parser(
        "serve",
        parents=[database],
        help="apply migrations and serve the HTTP API",
        description="Apply migrations, build the read-model versions that are not live yet, and serve the HTTP "
        "API and the dashboard (/ui). With DATABASE_URL set (postgresql://…) it uses that PostgreSQL; else it "
        "starts an embedded PostgreSQL (the pgserver package) whose data lives in pgdata under --data-dir "
        f"({data_dir}/pgdata by default), stopped when the last serve using it exits.",
    )
    run.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    run.add_argument("--port", type=_port, default=8000, help="port to bind (default: %(default)s)")
    run.add_argument("--workers", type=_positive, default=1, help="server processes (default: %(default)s)")
    run.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the least severe log lines written (default: %(default)s)",
    )
    run.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("TASKTRAIL_LOG_FORMAT") or "text",
        help="every log line as text, or as one JSON object (default: %(default)s; env TASKTRAIL_LOG_FORMAT)",
    )
    run.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=_flag("TASKTRAIL_ACCESS_LOG", default=True),
        help="log a line for every request, at level info (default: on; env TASKTRAIL_ACCESS_LOG=0 turns it off)",
    )
    run.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=_flag(METRICS_ENV, default=True),
        help="count requests and serve GET /metrics for Prometheus (default: on; env TASKTRAIL_METRICS=0 turns it off)",
    )
    run.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="require API keys from FILE (made by `tasktrail keys add`; env TASKTRAIL_API_KEYS_FILE); "
        "without keys, serve only on a loopback address",
    )
    run.add_argument(
        "--replica",
        action="append",
        metavar="URL",
        help="a PostgreSQL streaming replica of the database to send reads to (task, list, stats, history, time "
        "travel, feed, streams); repeat for several; writes go to the primary; a read that sends back a write's "
        "Tasktrail-Read-After token is answered only from a replica that has replayed that write, else from the "
        "primary (env DATABASE_REPLICA_URLS, comma-separated)",
    )
    run.add_argument(
        "--replica-max-lag",
        type=float,
        metavar="SECONDS",
        help="a replica that is down, or has not replayed the primary's position within SECONDS, gets no reads "
        "until it has caught up (default: 5; env TASKTRAIL_REPLICA_MAX_LAG)",
    )
    run.add_argument(
        "--rebuild",
        action="store_true",
        help=argparse.SUPPRESS,  # what serve always does now: build the versions that are not live, then serve
    )
    run.set_defaults(func=serve)

    mig = commands.add_parser(
        "migrate", parents=[database], help="apply pending migrations, build the read models, and exit (safe to repeat)"
    )
    mig.set_defaults(func=migrate)

    proj = commands.add_parser(
        "projections", help="the read models: their versions, rebuilding them, and pruning unused ones"
    )
    proj_commands = proj.add_subparsers(dest="projections_command", required=True, metavar="ACTION")
    proj_commands.add_parser(
        "status",
        parents=[database],
        help="every version of each read model: its state, how far behind the log, processes using it",
    ).set_defaults(func=projections_status)
    again = proj_commands.add_parser(
        "rebuild",
        parents=[database],
        help="rebuild this code's read-model versions from the whole log while the service runs, then swap them in",
    )
    again.add_argument("name", nargs="?", help="one read model (default: all)")
    again.set_defaults(func=projections_rebuild)
    prune = proj_commands.add_parser(
        "prune",
        parents=[database],
        help="drop the tables of versions no process uses (default: every version but this code's); "
        "refuses a version while a process of it runs",
    )
    prune.add_argument("name", nargs="?", help="one read model (default: all)")
    prune.add_argument(
        "version", nargs="?", type=_version, help="one version of it (default: every one but this code's)"
    )
    prune.set_defaults(func=projections_prune)

    check = commands.add_parser(
        "verify",
        parents=[database],
        help="fold the whole log in memory and compare it with a read-model version and its counters",
    )
    check.add_argument(
        "--version",
        action="append",
        type=_name_version,
        metavar="NAME=VERSION",
        help="verify this version of a read model instead of this code's (repeatable), e.g. tasks=2",
    )
    check.set_defaults(func=verify)

    keys = commands.add_parser("keys", help="manage API keys (stored as SHA-256 hashes in a file)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = key_commands.add_parser("add", help="make a random key, print it once, store its hash")
    add.add_argument("name", type=_key_name, help="who uses the key; events record it as the actor")
    add.add_argument(
        "--scope",
        choices=["read", "write", "admin"],
        required=True,
        help="what the key may do: read; write (read, create, update, delete); admin (write, cleanup)",
    )
    add.set_defaults(func=keys_add)
    listing = key_commands.add_parser("list", help="names and scopes (keys cannot be shown: only hashes are kept)")
    listing.set_defaults(func=keys_list)
    remove = key_commands.add_parser("remove", help="forget a key")
    remove.add_argument("name")
    remove.set_defaults(func=keys_remove)
    for action in (add, listing, remove):
        action.add_argument("--file", type=Path, help="the keys file (default: env TASKTRAIL_API_KEYS_FILE)")
    return _described(top)


def _flag(name: str, *, default: bool) -> bool | str:
    """An on/off setting from the environment; a value that is neither is returned as it is, for `serve` to
    refuse (refused here, it failed every command, `--help` too)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        return value
    return value in ("1", "true", "yes", "on")


def _key_name(name: str) -> str:
    from tasktrail.http import auth

    if not re.fullmatch(auth.NAME, name):
        raise argparse.ArgumentTypeError("1-64 letters, digits, '.', '_' or '-'")
    return name


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM (what systemd, Docker and Kubernetes send) stops a command as
    # Ctrl-C does: uvicorn finishes the requests in flight, then the exit hooks
    # run and stop the embedded PostgreSQL. Python's default for SIGTERM is to
    # die on the spot, running no hook, and uvicorn, once it has shut down,
    # raises the signal again under that default.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.func is serve:  # stopped while it started (uvicorn takes a stop while it serves)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # as once it has served: see _serve
            log.info("stopped")  # through serve's logging: a JSON line in JSON mode
        else:
            print("tasktrail: stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _refused(exc)
        if message is None:
            raise
        if getattr(args, "logged", False):  # through serve's logging: a JSON line in JSON mode
            log.error("%s", message)
        else:
            print(f"tasktrail: {message}", file=sys.stderr)
        return 1


def _refused(exc: BaseException) -> str | None:
    """An error of the setting a command ran in (the database, a file, a setting) as one line; None for a bug."""
    import psycopg

    from tasktrail.http.auth import BadKeys

    if isinstance(exc, psycopg.errors.UndefinedTable):
        missing = re.search(r'relation "([^"]+)" does not exist', str(exc))
        if missing and missing[1] not in ("events", "schema_migrations"):  # an older release's tables
            return (
                f"the database's tables are an older release's (it has no {missing[1]} yet): run `tasktrail migrate`"
                " to upgrade them (or `serve`, which does)"
            )
        return "the database has no tasktrail tables yet: run `tasktrail migrate` (or `serve`) first"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, psycopg.OperationalError):
        return f"cannot use the database: {text}"
    if isinstance(exc, psycopg.Error):
        return f"the database refused: {text}"
    if isinstance(exc, ImportError):  # TASKTRAIL_READ_MODELS names a module that is not there
        return f"{text} (TASKTRAIL_READ_MODELS names modules to import)"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"  # not "[Errno 2] No such file or directory: '...'"
    if isinstance(exc, BadKeys | OSError | ValueError):
        return text
    if isinstance(exc, subprocess.CalledProcessError):  # pgserver's initdb or pg_ctl
        return f"the embedded PostgreSQL did not start ({text}); its log is pgdata/log under --data-dir"
    return None


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _version(text: str) -> int:
    version = _whole(text)
    if version < 1:
        raise argparse.ArgumentTypeError(f"{version} is no version: versions count from 1")
    return version


def _port(text: str) -> int:
    port = _whole(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0 to 65535)")
    return port


def _positive(text: str) -> int:
    number = _whole(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number}: give at least 1")
    return number


def _described(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Each command's own --help opens with what the list of commands says of it, where it says no more."""
    for action in parser._actions:  # argparse keeps its subcommands only there
        if isinstance(action, argparse._SubParsersAction):
            said = {choice.dest: choice.help for choice in action._choices_actions}
            for name, command in action.choices.items():
                if command.description is None and said.get(name):
                    command.description = said[name][0].upper() + said[name][1:] + "."
                _described(command)
    return parser
