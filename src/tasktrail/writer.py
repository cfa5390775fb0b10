"""The write path: load state, decide, append, project; one transaction each."""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from tasktrail import eventstore, idempotency, metrics, projections
from tasktrail.domain.events import Recorded
from tasktrail.domain.task import (
    FINISHED,
    Command,
    CreateTask,
    DeleteTask,
    PreconditionFailed,
    Task,
    TaskNotFound,
    TransitionRejected,
    decide,
    evolve,
)
from tasktrail.projections import Change, follow
from tasktrail.projections import tasks as tasks_view

# A writer that loses a race re-reads and decides again. Each lost race means
# another writer committed, so the loop always makes progress overall; the cap
# only guards against a pathological pile-up.
MAX_ATTEMPTS = 100


def now() -> datetime:
    return datetime.now(UTC)


_TICK = timedelta(microseconds=1)  # the finest step of a stored time


def _decide(
    commands: Sequence[tuple[UUID, Task | None, Command]], at: datetime
) -> tuple[list[Change], list[Task | None]]:
    """Decide each command on its state: the changes to write, and every task's state after them.

    The log numbers events as it appends them, so until then a change's
    position is 0, and a new task's id (its creating event's position) too.
    """
    changes, afters = [], []
    for stream_id, before, command in commands:
        event = decide(command, before)
        if event is None:
            afters.append(before)
            continue
        if before is None:
            recorded = Recorded(stream_id, 1, 0, at, event)
        else:
            # Each of a task's events is later than the one before, whatever this host's clock says against
            # the last writer's, and when two are decided at one time (one batch, one group): `?as_of=` the
            # time of any finds the task as that event left it.
            recorded = Recorded(stream_id, before.version + 1, 0, max(at, before.updated_at + _TICK), event)
        after = evolve(before, recorded)
        changes.append((recorded, before, after))
        afters.append(after)
    return changes, afters


async def _write(
    conn: psycopg.AsyncConnection, changes: Sequence[Change], metadata: dict[str, Any] | Sequence[dict[str, Any]]
) -> dict[UUID, int]:
    """Append the events and project them in one statement; the new events' positions by stream.

    VersionConflict when another writer took one of the versions: then nothing
    was written for it (inside a transaction, the caller's rollback undoes the rest).
    """
    modules = projections.INLINE
    write = eventstore.document([recorded for recorded, _, _ in changes], metadata)
    write |= projections.document(changes, modules)
    cur = await conn.execute(projections.statement(eventstore.APPEND, modules, write), {"write": Jsonb(write)})
    appended = await cur.fetchall()  # a row per event: a batch may append several to one stream
    if len(appended) < len(changes):
        # The winner may be a process of another release, which does not write
        # this process's read-model versions: apply its events to them before
        # the caller reads the task again (projections/follow.py).
        await follow.catch_up(conn, modules, streams=[recorded.stream_id for recorded, _, _ in changes])
        raise eventstore.VersionConflict("another writer changed the task first")
    return dict(appended)  # the caller counts the events (metrics.appended) once they have committed


@asynccontextmanager
async def _refused(conn: psycopg.AsyncConnection) -> AsyncIterator[None]:
    """A write to read-model tables that are gone (a pruned version) as ProjectionOutdated."""
    try:
        yield
    except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable) as exc:
        raise projections.ProjectionOutdated.missing(exc) from exc


# The state this process last wrote of each recently written task, as a guess
# for the next change of it: deciding on the guess spares reading the read
# model first (an update is one round trip instead of two). A guess is only a
# guess. The append refuses a version that is taken, so a stale one loses like
# any overtaken writer and the task is read afresh; a guess that refuses the
# command or changes nothing is checked by a read before that is the answer;
# and only states that committed are remembered (a caller's transaction may
# still roll back). A client's requests arrive on its keep-alive connection,
# so with several server processes the same process mostly serves them.
RECENT = 10_000  # tasks
# And at most this much of their params, results and errors, as JSON: 10,000 tasks of 64 KiB params and results
# each held 1.3 GB (audit). Past it, the least recently written are forgotten first.
RECENT_BYTES = 16 << 20


class Guesses:
    """The guesses: a task's state by its id, the most recently written last, within RECENT and RECENT_BYTES."""

    def __init__(self) -> None:
        self._tasks: OrderedDict[UUID, tuple[Task, int]] = OrderedDict()
        self.size = 0  # bytes of the documents held

    def get(self, task_id: UUID) -> Task | None:
        found = self._tasks.get(task_id)
        return None if found is None else found[0]

    def __getitem__(self, task_id: UUID) -> Task:
        return self._tasks[task_id][0]

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def pop(self, task_id: UUID, default: None = None) -> Task | None:
        found = self._tasks.pop(task_id, None)
        if found is None:
            return default
        self.size -= found[1]
        return found[0]

    def __setitem__(self, task_id: UUID, task: Task) -> None:
        self.pop(task_id)
        size = sum(len(_JSON.encode(d)) for d in (task.params, task.result) if d is not None) + len(task.error or "")
        self._tasks[task_id] = (task, size)
        self.size += size
        while len(self._tasks) > RECENT or self.size > RECENT_BYTES:
            self.size -= self._tasks.popitem(last=False)[1][1]


_JSON = msgspec.json.Encoder()
_recent = Guesses()


# How many writes of each task this process has in flight (see `change`: a race lost to one is a race).
_writing: Counter[UUID] = Counter()


def _remember(task_id: UUID, task: Task | None) -> None:
    if task is None:
        _recent.pop(task_id)
    else:
        _recent[task_id] = task


def _written(conn: psycopg.AsyncConnection, task_id: UUID, task: Task | None) -> None:
    """Remember a task's state after a write that has committed; forget it while a caller's transaction is open."""
    committed = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    _remember(task_id, task if committed else None)


def _numbered(task: Task, positions: dict[UUID, int]) -> Task:
    """A new task with its id, the position the log gave its creating event."""
    return msgspec.structs.replace(task, id=positions[task.task_id])


async def create(
    conn: psycopg.AsyncConnection, command: CreateTask, metadata: dict[str, Any], idempotency_key: str | None = None
) -> Task:
    """Create a task; with a key, a repeat of the same request returns the task the first one created."""
    if idempotency_key is None:
        changes, (task,) = _decide([(uuid4(), None, command)], now())
        assert task is not None
        async with _refused(conn):
            task = _numbered(task, await _write(conn, changes, metadata))
        metrics.appended(changes)
        _written(conn, task.task_id, task)
        return task
    print_ = idempotency.fingerprint(command)
    for _ in range(MAX_ATTEMPTS):
        task_id, at = uuid4(), now()
        changes, (task,) = _decide([(task_id, None, command)], at)
        assert task is not None
        # The claim and the write commit together: a key is never claimed for a task that was not created.
        async with _refused(conn), conn.pipeline(), conn.transaction():
            claimed = await idempotency.claim(conn, idempotency_key, print_, task_id, at)
            if claimed:
                task = _numbered(task, await _write(conn, changes, metadata))
        if claimed:
            metrics.appended(changes)
            return task
        original = await idempotency.find(conn, idempotency_key, print_)
        if original is None:
            continue  # the claim expired and was cleaned up meanwhile: claim it now
        found = await _caught_up(conn, original)
        if found is not None and await _late(conn, found):  # changed by another release a moment ago
            found = await tasks_view.get(conn, original)
        if found is None:
            raise TaskNotFound(f"task {original}, created with this Idempotency-Key, has been deleted")
        return found
    raise eventstore.VersionConflict("could not claim the Idempotency-Key; try again")


async def change(
    conn: psycopg.AsyncConnection,
    task_id: UUID,
    command: Command,
    metadata: dict[str, Any],
    expected: Collection[int] | None = None,
    lost_at: datetime | None = None,
) -> Task | None:
    """Apply an update or delete to a live task, deciding again on a lost race unless versions were expected.

    `lost_at`: when a group (grouped.py) decided this write on a guess, and lost: counted as a guess lost here.
    """
    guess = _recent.get(task_id) if expected is None else None
    taken = lost_at or (now() if guess is not None else None)  # when the guess was taken (none: no guess)
    busy = task_id in _writing  # another request of this process writing the task as the guess is taken
    lost_on_guess = lost_at is not None
    for _ in range(MAX_ATTEMPTS):
        before, guessed, guess = guess, guess is not None, None
        if before is None:
            before = await _caught_up(conn, task_id, expected)
            if before is None:
                _remember(task_id, None)
                raise TaskNotFound(f"task {task_id} not found")
            if lost_on_guess and taken is not None and before.updated_at >= taken:
                # The guess lost to another process's write made after it was taken: a race. A write made
                # before (another process wrote the task since this one last did) only made it stale.
                metrics.WRITE_CONFLICTS.inc()
            lost_on_guess = False
            if expected is not None and before.version not in expected:
                raise PreconditionFailed(f"task {task_id} is at version {before.version}, not {_versions(expected)}")
        try:
            changes, (after,) = _decide([(task_id, before, command)], now())
        except TransitionRejected:
            if guessed or await _late(conn, before):
                continue  # perhaps only the guess (or a row another release's write has not reached) refuses it
            raise
        if not changes:
            if guessed or await _late(conn, before):
                continue  # nothing to change, by the guess or a late row: make sure on the read model
            return after
        _writing[task_id] += 1
        try:
            async with _refused(conn):
                await _write(conn, changes, metadata)
        except eventstore.VersionConflict:
            # Another writer (another request, another process, another release) appended first. The task
            # is read afresh and the write decided again. Decided on the read model, that was a race lost;
            # on this process's guess too, when another request of this process was writing the task as the
            # guess was taken, or is now. Else the fresh read tells (see above).
            _remember(task_id, None)
            if expected is not None:
                raise PreconditionFailed(f"task {task_id} changed after version {before.version}") from None
            if not guessed or busy or _writing[task_id] > 1:
                metrics.WRITE_CONFLICTS.inc()
            else:
                lost_on_guess = True
            continue
        finally:
            _writing[task_id] -= 1
            if not _writing[task_id]:
                del _writing[task_id]
        metrics.appended(changes)
        _written(conn, task_id, after)
        return after
    raise eventstore.VersionConflict(f"task {task_id} is changing too fast; try again")


async def _late(conn: psycopg.AsyncConnection, before: Task) -> bool:
    """During a rolling deploy, whether the log has moved past the row decided on; if so, the row is caught up."""
    if not follow.deploying() or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return False
    if not await follow.outdated(conn, {before.task_id: before.version}):
        return False
    await follow.catch_up(conn, streams=[before.task_id])
    return True


async def _caught_up(conn: psycopg.AsyncConnection, task_id: UUID, expected: Collection[int] = ()) -> Task | None:
    """The task in this process's read model, which another release's writes reach a few ms late.

    So a task not there, or at a version older than one a caller expects, may
    have been written by another release a moment ago (during a rolling deploy):
    then its events are applied here (follow.catch_up), and it is read again.
    """
    task = await tasks_view.get(conn, task_id)
    if task is None or (expected and task.version < max(expected)):
        await follow.catch_up(conn, streams=[task_id])
        task = await tasks_view.get(conn, task_id)
    return task


# One write of a group of single requests (grouped.py): a create (no task id
# yet), or an update of a task this process wrote last; with its request's metadata.
Single = tuple[UUID | None, Command, dict[str, Any]]


class Together(msgspec.Struct):
    """A group decided: the changes to write, and the task after each single (None: not in the group)."""

    changes: list[Change]
    metadata: list[dict[str, Any]]
    outcomes: list[Task | None]
    states: dict[UUID, Task]  # each task's last state
    creates: list[int]  # the singles that create a task (numbered once written)
    at: datetime  # when it was decided, on guesses taken then


def decide_together(singles: Sequence[Single]) -> Together:
    """Decide single requests' creates and updates for one group (group commit, grouped.py).

    Each as `create` or `change` decides it, an update on this process's
    guess, one task's in the order given. An update is left out (None) when
    there is no guess, or the guess refuses it or sees nothing to change
    (`change` reads, alone), and so is every later one of that task: they
    keep their order. The changes are in the order of their tasks' ids, so
    two groups that share tasks wait for each other in one order.
    """
    at = now()
    ids = [uuid4() if task_id is None else task_id for task_id, _, _ in singles]
    group = Together([], [], [None] * len(singles), {}, [], at)
    left_out: set[UUID] = set()
    for i in sorted(range(len(singles)), key=ids.__getitem__):  # stable: one task's in the order given
        task_id, (wrote, command, each) = ids[i], singles[i]
        before = None
        if wrote is not None:
            before = group.states[task_id] if task_id in group.states else _recent.get(task_id)
            if before is None or task_id in left_out:
                left_out.add(task_id)
                continue
        try:
            changes, (after,) = _decide([(task_id, before, command)], at)
        except TransitionRejected:
            changes, after = [], None
        if not changes or after is None:
            left_out.add(task_id)
            continue
        group.changes += changes
        group.metadata.append(each)
        group.states[task_id] = group.outcomes[i] = after
        if wrote is None:
            group.creates.append(i)
    return group


async def write_together(conn: psycopg.AsyncConnection, group: Together) -> None:
    """Write a decided group in one statement and transaction; its outcomes then hold the new tasks' ids.

    Raises, having written nothing, when a guess was stale (VersionConflict)
    or a lock is waited for longer than IMPATIENT (LockNotAvailable).
    """
    try:
        async with _refused(conn), conn.pipeline(), conn.transaction():
            await conn.execute(IMPATIENT)
            positions = await _write(conn, group.changes, group.metadata)
            await conn.execute(PATIENT)  # the commit waits as any write's does
    except eventstore.VersionConflict:
        # Decided on guesses, one of which lost: each then goes alone (`change`, lost_at), which tells a race
        # from a stale guess.
        for task_id in group.states:
            _recent.pop(task_id, None)  # one of these guesses is stale: each goes alone, and reads
        raise
    metrics.appended(group.changes)
    for i in group.creates:
        task = _numbered(group.outcomes[i], positions)  # type: ignore[arg-type]
        group.outcomes[i] = group.states[task.task_id] = task
    for task_id, task in group.states.items():
        _remember(task_id, task)


def guessed(task_id: UUID) -> bool:
    """Whether this process wrote the task last (so an update of it may go in a group)."""
    return task_id in _recent


def _versions(expected: Collection[int]) -> str:
    return " or ".join(map(str, sorted(expected))) or "any version If-Match named"


# The most tasks one transaction of a cleanup deletes: the expired tasks of a long
# retention go a few at a time (each step short, holding back no other writer for
# long), and a task that changes meanwhile costs a step, not the whole cleanup.
CLEANUP_STEP = 1_000


async def cleanup(conn: psycopg.AsyncConnection, days: int, metadata: dict[str, Any]) -> int:
    """Delete (reason: retention) every finished task completed more than `days` ago; how many.

    Oldest first, up to CLEANUP_STEP tasks a transaction. A step that loses a
    race to another writer (a task retried meanwhile is no longer expired)
    looks again at a quarter of its tasks, so it goes on under any rate of
    changes; steps that win grow back. A task completed more than `days` ago
    that is first seen past the request's start (its commit came late) waits
    for the next cleanup.
    """
    retention = DeleteTask(reason="retention")
    cutoff = now() - timedelta(days=days)
    after, step, deleted, lost = tasks_view.FIRST_PAGE, CLEANUP_STEP, 0, 0
    while True:
        try:
            async with _refused(conn), conn.transaction():
                # One step of one cleanup at a time: concurrent cleanups (cron on several hosts) would each
                # read the same expired tasks, and all but one lose the race for them, step after step.
                await conn.execute(CLEANUP_LOCK, {"space": BUCKET_SPACE})
                expired = await tasks_view.finished_before(conn, cutoff, FINISHED, after, step)
                if expired:
                    changes, _ = _decide([(task.task_id, task, retention) for task in expired], now())
                    await _lock_buckets(conn, (recorded.stream_id for recorded, _, _ in changes))  # as a batch does
                    await _write(conn, changes, metadata)
        except eventstore.VersionConflict:
            metrics.WRITE_CONFLICTS.inc()
            lost += 1
            if step == 1 and lost > MAX_ATTEMPTS:
                raise eventstore.VersionConflict(
                    f"tasks are changing too fast to clean up; {deleted} deleted so far, try again"
                ) from None
            step = max(1, step // 4)  # one of them changed meanwhile: look again, at fewer
            continue
        if not expired:
            break
        metrics.appended(changes)
        for task in expired:
            _remember(task.task_id, None)
        deleted += len(expired)
        last = expired[-1]
        assert last.completed_at is not None  # a finished task's
        after, step, lost = (last.completed_at, last.id), min(CLEANUP_STEP, step * 2), 0
    async with conn.transaction():
        await idempotency.forget_expired(conn, now())
    return deleted


# Batches (SPEC §12): many commands, one `_write`. Each command is decided as
# a single request would decide it, so each accepted one appends the event a
# single request would; all of them go into one statement, in one transaction,
# so they commit together or not at all. (The statement alone is atomic, but
# it appends what it can and skips a version another writer took, so only the
# transaction's rollback makes a lost race write nothing.) The events keep the
# commands' order: positions, the history, the feed and the streams show them
# as if the requests had come one by one.


def missing(task_id: UUID, deleted: bool) -> TaskNotFound:
    """A 404 that says whether the task never existed or was deleted."""
    if deleted:
        return TaskNotFound(f"task {task_id} was deleted (its history is kept)")
    return TaskNotFound(f"task {task_id} not found")


async def create_many(
    conn: psycopg.AsyncConnection,
    commands: Sequence[CreateTask],
    metadata: dict[str, Any],
    idempotency_key: str | None = None,
) -> list[Task]:
    """Create tasks in order, all or none; with a key, a repeat of the same batch returns the first one's tasks."""
    if idempotency_key is None:
        created = await _create_many(conn, commands, metadata, None)
        assert created is not None
        return created
    print_ = idempotency.batch_fingerprint(commands)
    for _ in range(MAX_ATTEMPTS):
        created = await _create_many(conn, commands, metadata, (idempotency_key, print_))
        if created is not None:
            return created
        original = await idempotency.find_batch(conn, idempotency_key, print_)
        if original is None:
            continue  # the claim expired and was cleaned up meanwhile: claim it now
        found, _ = await tasks_view.get_many(conn, original)
        gone = [task_id for task_id in original if task_id not in found]
        late = follow.deploying() and await follow.outdated(conn, {t: task.version for t, task in found.items()})
        if gone or late:  # perhaps created, or changed, by another release a moment ago: see _caught_up
            await follow.catch_up(conn, streams=list(original))
            found, _ = await tasks_view.get_many(conn, original)
            gone = [task_id for task_id in original if task_id not in found]
        if gone:
            raise TaskNotFound(
                f"{len(gone)} of the {len(original)} tasks created with this Idempotency-Key"
                f" have been deleted (the first: {gone[0]})"
            )
        return [found[task_id] for task_id in original]
    raise eventstore.VersionConflict("could not claim the Idempotency-Key; try again")


async def _create_many(
    conn: psycopg.AsyncConnection,
    commands: Sequence[CreateTask],
    metadata: dict[str, Any],
    key: tuple[str, bytes] | None,
) -> list[Task] | None:
    """The new tasks; None when a live claim holds the key (key, fingerprint) already."""
    at = now()
    new = zip(_new_ids(len(commands)), commands, strict=True)
    changes, afters = _decide([(task_id, None, command) for task_id, command in new], at)
    created = [task for task in afters if task is not None]
    async with _refused(conn), conn.pipeline(), conn.transaction():
        # The claim and the write commit together: a key is never claimed for tasks that were not created.
        if key is not None and not await idempotency.claim_batch(conn, *key, [t.task_id for t in created], at):
            return None
        positions = await _write(conn, changes, metadata)
    metrics.appended(changes)
    # Unlike a single create, a batch leaves its tasks out of the guesses (_recent): a few batches would
    # push out every single request's guess, and remembering costs 1-2 us a task.
    return [_numbered(task, positions) for task in created]


def _new_ids(n: int) -> list[UUID]:
    """n random task ids, as uuid4() makes them, from one read of the random source (0.5 us less each)."""
    random = os.urandom(16 * n)
    return [UUID(bytes=random[i : i + 16], version=4) for i in range(0, 16 * n, 16)]


# One item of a batch of changes: the task, an update or delete, and the version it must be at (or None).
Item = tuple[UUID, Command, int | None]
# What became of it: the task after it (unchanged for a no-op), None when it deleted the task, or the
# refusal a single request would have raised (TaskNotFound, TransitionRejected, PreconditionFailed).
Outcome = Task | None | Exception


async def change_many(conn: psycopg.AsyncConnection, items: Sequence[Item], metadata: dict[str, Any]) -> list[Outcome]:
    """Decide each item in order on the state the items before it left; write the accepted ones together.

    First optimistically: read the tasks and decide, then write, holding the
    locks of the changed tasks' buckets (see _lock_buckets) shared; the write's
    statement waits at most IMPATIENT for another transaction's write of one of
    its tasks (or of a counter it changes too). Batches on different tasks do
    not wait for each other at all then (they share buckets: 1,000 tasks fall
    in every one of them). A race lost, to another batch, a single write or a
    process of another release, or a wait given up, rolls the whole batch back;
    then the batch takes the locks exclusively before it reads, and decides and
    writes under them: another batch on these tasks waits, and this one decides
    on what that one wrote. So with many batches on the same tasks a batch
    loses at most one race to another batch, never again and again.
    """
    task_ids = list(dict.fromkeys(task_id for task_id, _, _ in items))
    locked_first = caught_up = False
    for _ in range(MAX_ATTEMPTS):
        impatient = False  # whether a lock wait now ends after IMPATIENT's 100 ms
        decided: tuple[list[Change], list[Outcome]] | None = None
        try:
            async with _refused(conn), conn.pipeline() as pipeline, conn.transaction():
                if locked_first:
                    await _lock_buckets(conn, task_ids)
                states, deleted = await tasks_view.get_many(conn, task_ids)
                # Perhaps written by another release a moment ago (see _caught_up): unknown here, or older
                # than an item expects.
                lagging = [task_id for task_id in task_ids if task_id not in states and task_id not in deleted]
                lagging += (
                    task_id
                    for task_id, _, version in items
                    if version is not None and task_id in states and states[task_id].version < version
                )
                if not lagging or caught_up:
                    read = {task_id: task.version for task_id, task in states.items()}
                    changes, outcomes = _decide_many(items, states, deleted, now())
                    # A task the batch appends nothing to (refused, or nothing to change) has no version check:
                    # during a rolling deploy its row may be one another release's write has not reached yet.
                    for recorded, _, _ in changes:
                        read.pop(recorded.stream_id, None)
                    if not caught_up and read and follow.deploying() and await follow.outdated(conn, read):
                        lagging = list(read)
                    else:
                        # What this process guessed of these tasks will be stale: forget it. (Remembering the
                        # new states instead would push out single requests' guesses, as in create_many.)
                        for recorded, _, _ in changes:
                            _recent.pop(recorded.stream_id, None)
                        if changes:
                            if not locked_first:
                                buckets = (recorded.stream_id for recorded, _, _ in changes)
                                await _lock_buckets(conn, buckets, shared=True)
                                await pipeline.sync()  # the locks, waited for as long as any write waits
                                impatient = True
                                await conn.execute(IMPATIENT)
                            await _write(conn, changes, metadata)
                            if not locked_first:
                                await conn.execute(PATIENT)  # the commit waits as any write's does
                        decided = changes, outcomes
        except (eventstore.VersionConflict, psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            # The winner may be a process of another release (see _write): now that the transaction is
            # over, apply its events to this process's read models before reading the tasks again.
            metrics.WRITE_CONFLICTS.inc()
            locked_first = True
            await follow.catch_up(conn, streams=task_ids)
            continue
        except psycopg.errors.LockNotAvailable as exc:
            if not impatient:
                raise  # a wait of the whole lock_timeout: a transaction left open (see db.LOCK_TIMEOUT)
            # 'while inserting index tuple (0,2) in relation "events"': another writer of one of these
            # tasks, a lost race. (Else a wait for a counter's row, or a table a rebuild's swap holds.)
            if '"events"' in (exc.diag.context or ""):
                metrics.WRITE_CONFLICTS.inc()
            locked_first = True
            continue
        if decided is not None:  # and committed
            metrics.appended(decided[0])
            return decided[1]
        # Apply the other release's events (outside a transaction, as catch_up needs), and look once more.
        caught_up = True
        await follow.catch_up(conn, streams=lagging)
    raise eventstore.VersionConflict("the tasks of this batch are changing too fast; try again")


# Two batches that name the same tasks in different orders would deadlock on
# the events' (stream_id, version) keys: each appends in its items' order, and
# holds what it appended until it commits. PostgreSQL would find the deadlock
# only after deadlock_timeout (1 s) and abort one. So a batch takes advisory
# locks, in one global order, on the buckets its tasks fall in. Taken
# exclusively, they make batches that share a bucket write one after the other,
# and a batch never waits for one that waits for it. Taken shared (a batch's
# optimistic first attempt), they only keep the exclusive ones waiting; two
# shared holders may wait for each other's keys, and IMPATIENT ends that wait
# within 100 ms, not 1 s, in the one that gives up first. (The other waits in
# an optimistic write are short: for a single write's commit, or for a
# counter's row while another write's transaction is open; one given up costs
# a second attempt. IMPATIENT holds for the write's statement only: the
# commit, which may queue behind other commits, waits as any write's does.)
# A single write appends to one task only, so it needs no lock: nothing it
# holds can be what a batch waits for while it waits. Cleanup writes many
# tasks too, so it takes them exclusively.
# Buckets rather than one lock per task: advisory locks take room in the server's
# shared lock table (64 per connection by default), and 1,000 tasks would overflow it.
BUCKETS = 64
BUCKET_SPACE = 0x7474  # the first key of the two-key advisory locks: tasktrail's batches
LOCK_BUCKETS = "SELECT pg_advisory_xact_lock{}(%(space)s, bucket) FROM unnest(%(buckets)s::integer[]) AS bucket"
LOCK_EXCLUSIVE, LOCK_SHARED = LOCK_BUCKETS.format(""), LOCK_BUCKETS.format("_shared")
CLEANUP_LOCK = "SELECT pg_advisory_xact_lock(%(space)s, -1)"  # no bucket's number
IMPATIENT = "SET LOCAL lock_timeout = '100ms'"
PATIENT = "RESET lock_timeout"  # back to the session's (db.LOCK_TIMEOUT), for the rest of the transaction


async def _lock_buckets(conn: psycopg.AsyncConnection, task_ids: Iterable[UUID], *, shared: bool = False) -> None:
    """Wait for the buckets of these tasks, in the one order (unnest keeps the sorted array's)."""
    buckets = sorted({task_id.int % BUCKETS for task_id in task_ids})
    await conn.execute(LOCK_SHARED if shared else LOCK_EXCLUSIVE, {"space": BUCKET_SPACE, "buckets": buckets})


def _decide_many(
    items: Sequence[Item], states: dict[UUID, Task], deleted: set[UUID], at: datetime
) -> tuple[list[Change], list[Outcome]]:
    """The changes to write and each item's outcome; leaves in `states` and `deleted` where the items took them.

    A task named twice gets two times all the same (see _decide): `?as_of=` the first finds it between the two.
    """
    changes: list[Change] = []
    outcomes: list[Outcome] = []
    for task_id, command, version in items:
        before = states.get(task_id)
        if before is None:
            outcomes.append(missing(task_id, task_id in deleted))
            continue
        if version is not None and before.version != version:
            outcomes.append(PreconditionFailed(f"task {task_id} is at version {before.version}, not {version}"))
            continue
        try:
            decided, (after,) = _decide([(task_id, before, command)], at)
        except TransitionRejected as exc:
            outcomes.append(exc)
            continue
        if decided:
            changes += decided
            if after is None:
                del states[task_id]
                deleted.add(task_id)
            else:
                states[task_id] = after
        outcomes.append(after)
    return changes, outcomes
