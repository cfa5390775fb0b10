"""Fold the whole log in memory and compare it with the read model and the counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql

from tasktrail import db, eventstore, migrations, projections
from tasktrail.domain.task import Task, evolve
from tasktrail.projections import tasks as tasks_view

BATCH = 10_000

ALL_EVENTS = "SELECT stream_id, version, position, occurred_at, type, data FROM events ORDER BY position"
ALL_TASKS = "SELECT {} FROM tasks"  # the columns: version 1's, then those the version verified adds


def columns(module: ModuleType) -> tuple[str, ...]:
    """A tasks read model's columns (its COLUMNS), in the order its rows() gives their values."""
    return tuple(name.strip() for name in module.COLUMNS.split(","))


V1_COLUMNS = columns(tasks_view)
COUNTS = "SELECT task_type, status, sum(n)::bigint FROM task_counts GROUP BY task_type, status"


@dataclass
class Report:
    events: int = 0
    streams: int = 0
    live: int = 0
    differences: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # the read-model versions compared
    missing: list[str] = field(default_factory=list)  # versions asked for that have no tables
    behind: dict[str, int] = field(default_factory=dict)  # events another release wrote, not applied yet

    @property
    def ok(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        if self.missing:  # nothing was compared: no count of the log would mean anything
            return "nothing compared: " + "; ".join(self.missing)
        compared = ", ".join(f"{name} version {version}" for name, version in sorted(self.versions.items()))
        head = f"{self.events} events in {self.streams} streams, {self.live} live tasks ({compared})"
        if self.behind:  # compared as each holds the log (fold_kept): say so, and by how much
            lag = ", ".join(f"{version} {n:,}" for version, n in self.behind.items())
            head += f", as far as its followers have applied another release's writes (events not yet: {lag})"
        if self.ok:
            return f"{head}: the read model and the counters match the log"
        more = f" (and {len(self.differences) - 1} more)" if len(self.differences) > 1 else ""
        return f"{head}: first difference: {self.differences[0]}{more}"


# The log as a version holds it (see projections/follow.py): every event its own processes wrote (which name
# it in `projected`), and every other one visible in its checkpoint, the snapshot its followers have applied.
# During a rolling deploy, the other release's writes of the last milliseconds are not in it yet: compared
# with the whole log they would be differences that are not there (audit). Without a deploy, every event.
KEPT = """
SELECT stream_id, version, position, occurred_at, type, data,
       pg_visible_in_snapshot(transaction_id, t.checkpoint) OR strpos(written, %(tasks)s) > 0,
       pg_visible_in_snapshot(transaction_id, s.checkpoint) OR strpos(written, %(stats)s) > 0
FROM (SELECT *, ',' || coalesce(projected, '') || ',' AS written FROM events) events,
     (SELECT checkpoint FROM projection_versions WHERE name = 'tasks' AND version = %(tasks_version)s) t,
     (SELECT checkpoint FROM projection_versions WHERE name = 'stats' AND version = %(stats_version)s) s
ORDER BY position
"""


@dataclass
class Kept:
    """The log folded as two read-model versions hold it."""

    events: int = 0
    tasks: dict[UUID, Task | None] = field(default_factory=dict)  # each stream's state, as the tasks version has it
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (task type, status): as the counters hold
    behind: Counter[str] = field(default_factory=Counter)  # events a version's followers have not applied yet


def fold_kept(conn: psycopg.Connection, versions: dict[str, int]) -> Kept:
    """Every stream's state from the log as each version holds it (KEPT), streamed in batches of BATCH events.

    A task's row is its state after the last event its version holds (a prefix of its events: a writer
    catches its row up before it appends). The counters hold each event's move between the states the
    whole log gives it, the event's own writer's or follower's as it was, of the events they hold: not
    always a prefix (a follower moves the tasks and the stats checkpoints one after the other).
    """
    kept = Kept()
    marks = {name: f",{name}:{versions[name]}," for name in ("tasks", "stats")}
    params = marks | {"tasks_version": versions["tasks"], "stats_version": versions["stats"]}
    states: dict[UUID, Task | None] = {}  # the whole log's
    with conn.cursor(name="verify_events") as cur:
        cur.itersize = BATCH
        cur.execute(KEPT, params)
        for *row, in_tasks, in_stats in cur:
            recorded = eventstore.recorded(*row)
            stream = recorded.stream_id
            kept.events += 1
            before = states.get(stream)
            states[stream] = after = evolve(before, recorded)
            if not in_tasks:
                kept.behind["tasks"] += 1
            elif kept.tasks.get(stream) is before:
                kept.tasks[stream] = after  # the same Task: nothing is held twice
            else:
                kept.tasks[stream] = evolve(kept.tasks.get(stream), recorded)
            if not in_stats:
                kept.behind["stats"] += 1
                continue
            if before is not None:
                kept.counts[(before.task_type, before.status.value)] -= 1
            if after is not None:
                kept.counts[(after.task_type, after.status.value)] += 1
    return kept


def fold_log(conn: psycopg.Connection) -> tuple[int, dict[UUID, Task | None]]:
    """Every stream's state from the log, streamed in batches of BATCH events."""
    states: dict[UUID, Task | None] = {}
    events = 0
    with conn.cursor(name="verify_events") as cur:
        cur.itersize = BATCH
        cur.execute(ALL_EVENTS)
        for row in cur:
            recorded = eventstore.recorded(*row)
            states[recorded.stream_id] = evolve(states.get(recorded.stream_id), recorded)
            events += 1
    return events, states


# Fields of any JSON value, compared as JSON: to Python's ==, 1, 1.0 and true are one value, which the API
# would show as three.
JSON_FIELDS = ("params", "result")
_json = msgspec.json.Encoder().encode


def _differs(log: Task, model: Task, f: str) -> bool:
    was, now = getattr(log, f), getattr(model, f)
    return was != now or (f in JSON_FIELDS and _json(was) != _json(now))


def _added_diff(module: ModuleType, names: tuple[str, ...], log: Task, held: dict[str, object]) -> str:
    """How the columns a version adds (`held`: what the read model holds) differ from its rows() of the log's task.

    `names`: the version's columns, in its rows()'s order."""
    (row,) = module.rows([log])
    wanted = dict(zip(names, row, strict=True))
    found = []
    for name, value in held.items():
        should = getattr(wanted[name], "obj", wanted[name])  # a Jsonb wrapper: the value it wraps
        # A JSON value as JSON (1 is not true, nor 1.0: the API would show them apart); any other as SQL has it.
        json = isinstance(value, dict | list) or isinstance(should, dict | list)
        if value != should or (json and _json(value) != _json(should)):
            found.append(f"{name}: read model {_shown(value)}, log {_shown(should)}")
    return ", ".join(found)


def _same(log: Task, model: Task) -> bool:
    return log == model and not any(_differs(log, model, f) for f in JSON_FIELDS)


def _shown(value: object) -> str:
    """A value as the API shows it ("running", "2026-12-05T08:29:40.577971Z", {"i":1.0}), not as Python's repr."""
    try:
        return _json(value).decode()
    except TypeError:
        return repr(value)


def _diff(log: Task, model: Task) -> str:
    fields = [f for f in Task.__struct_fields__ if _differs(log, model, f)]
    return ", ".join(f"{f}: read model {_shown(getattr(model, f))}, log {_shown(getattr(log, f))}" for f in fields)


USE = sql.SQL('SET search_path = {}, "$user", public')
EXISTS = "SELECT to_regnamespace(%(schema)s) IS NOT NULL"


# The read models' tables, by identity: a rebuild's swap replaces them with new ones under the same names.
TABLES = """
SELECT array_agg(c.oid::bigint ORDER BY c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%(schemas)s) AND c.relkind IN ('r', 'p')
"""
SWAPPED_ATTEMPTS = 3


def verify(conninfo: str, versions: dict[str, int] | None = None) -> Report:
    """Compare in one snapshot, so concurrent writers cannot cause false differences.

    `versions` names the read-model version to compare (default: this code's), by read model.
    A rebuild's swap during the comparison is no difference: the new tables' rows
    (loaded frozen, so visible to every snapshot) may be newer than the log as
    folded; the comparison is made again.
    """
    for _ in range(SWAPPED_ATTEMPTS - 1):
        report, swapped = _compare(conninfo, versions)
        if report.ok or not swapped:
            return report
    return _compare(conninfo, versions)[0]


def _compare(conninfo: str, versions: dict[str, int] | None) -> tuple[Report, bool]:
    """The report, and whether a rebuild swapped a read model's tables while it was made."""
    chosen = {module.NAME: module.VERSION for module in projections.INLINE} | (versions or {})
    report = Report(versions=chosen)
    with psycopg.connect(conninfo, **db.connect_kwargs()) as conn:
        schemas = [projections.schema(name, version) for name, version in chosen.items()]
        missing = [
            f"read model {name} version {version} has no tables (pruned, not built yet, or no such version:"
            " `tasktrail projections status` lists those that exist)"
            for (name, version), schema in zip(chosen.items(), schemas, strict=True)
            if not conn.execute(EXISTS, {"schema": schema}).fetchone()[0]  # type: ignore[index]
        ]
        if missing and (behind := migrations.pending(conn)):
            missing = [
                f"the database's tables are an older release's ({len(behind)} migrations not applied, from"
                f" {behind[0]}): run `tasktrail migrate` to upgrade them (or `serve`, which does)"
            ]
        if missing:
            report.differences = report.missing = missing
            return report, False
        tables = {"schemas": schemas}
        before = conn.execute(TABLES, tables).fetchone()
        conn.execute(USE.format(sql.SQL(", ").join(map(sql.Identifier, schemas))))
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        kept = fold_kept(conn, chosen)
        report.events, states = kept.events, kept.tasks
        report.behind = {f"{name} version {chosen[name]}": n for name, n in sorted(kept.behind.items())}
        report.streams = len(states)
        live = {task_id: task for task_id, task in states.items() if task is not None}
        report.live = len(live)

        # The columns a version adds to version 1's are compared with what its code makes of the log, when
        # this process has the code of the version verified (TASKTRAIL_READ_MODELS); else version 1's only.
        module = next((m for m in projections.INLINE if m.NAME == tasks_view.NAME), tasks_view)
        mine = chosen[tasks_view.NAME] == module.VERSION
        names = columns(module)
        added = [name for name in names if name not in V1_COLUMNS] if mine else []
        seen = set()
        with conn.cursor(name="verify_tasks") as cur:
            cur.itersize = BATCH
            cur.execute(sql.SQL(ALL_TASKS).format(sql.SQL(", ").join(map(sql.Identifier, (*V1_COLUMNS, *added)))))
            for row in cur:
                model = tasks_view.to_task(row[: len(V1_COLUMNS)])
                seen.add(model.task_id)
                expected = live.get(model.task_id)
                if expected is None:
                    gone = "was deleted" if model.task_id in states else "has no events"
                    report.differences.append(f"task {model.task_id} is in the read model but {gone} in the log")
                    continue
                held = dict(zip(added, row[len(V1_COLUMNS) :], strict=True))
                parts = [] if _same(expected, model) else [_diff(expected, model)]
                if held and (added_diff := _added_diff(module, names, expected, held)):
                    parts.append(added_diff)
                if parts:
                    report.differences.append(f"task {model.task_id}: {', '.join(parts)}")
        report.differences += [f"task {task_id} is missing from the read model" for task_id in live.keys() - seen]

        expected_counts = kept.counts
        counted = Counter({(task_type, status): n for task_type, status, n in conn.execute(COUNTS)})
        for key in sorted(expected_counts.keys() | counted.keys()):
            if expected_counts[key] != counted[key]:
                report.differences.append(
                    f"counter {key[0]}/{key[1]} is {counted[key]}, the log says {expected_counts[key]}"
                )
        conn.rollback()
        swapped = conn.execute(TABLES, tables).fetchone() != before  # a new transaction: the tables now
        conn.rollback()
    return report, swapped
