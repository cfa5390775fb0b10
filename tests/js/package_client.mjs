// clients/js as an installed package ('tasktrail-client', resolved through its package.json "exports"),
// against a real server:
//   node package_client.mjs BASE CUT_PROXY DROP_PROXY KEYED_BASE WRITE_KEY
// CUT_PROXY relays to BASE but cuts its first connection after `retry:`, the snapshot and two events;
// DROP_PROXY loses the answer to its first request after the server has done it.
import assert from 'node:assert/strict';

import {TaskManager, TaskTrail, TaskTrailError, applyEvent, later, EVENT_TYPES} from 'tasktrail-client';

const [base, cutProxy, dropProxy, keyedBase, writeKey] = process.argv.slice(2);
const kind = `js${Date.now()}`;
const tasks = new TaskManager(base);
assert.equal(TaskTrail, TaskManager);
assert.equal(EVENT_TYPES.length, 10);
assert.equal(new TaskManager().baseUrl, 'http://localhost:8000');  // the seed's default
// Writes answered out of order (concurrent calls) never move the read-after token back.
assert.equal(later('0/2000', '0/1000'), '0/2000');
assert.equal(later('0/1000', '0/2000'), '0/2000');
assert.equal(later('1/0', '0/FFFFFFFF'), '1/0');
assert.equal(later(null, '0/10'), '0/10');
assert.equal(later('0/10', 'primary'), 'primary');  // not a position: the newest wins

// The seed's calls, unchanged: the JSON of the answer, a problem document on a refusal.
const task = await tasks.createTask(kind, {file_path: '/tmp/test.pdf'});
assert.equal(task.status, 'pending');
assert.deepEqual(await tasks.getTask(task.task_id), task);
assert.equal((await tasks.updateTask(task.task_id, {status: 'running', progress: 10})).version, 2);
const stale = await tasks.updateTask(task.task_id, {progress: 20}, {ifVersion: 1});
assert.equal(stale.status, 412);
// JSON has no NaN or Infinity (JSON.stringify would send null: "unchanged", or a null param): refused here.
await assert.rejects(tasks.updateTask(task.task_id, {progress: NaN}), RangeError);
await assert.rejects(tasks.createTask(kind, {n: -Infinity}), /n is -Infinity/);
await assert.rejects(tasks.updateMany([{task_id: task.task_id, progress: Infinity}]), RangeError);
assert.equal((await tasks.getTask(task.task_id)).version, 2);
assert.deepEqual((await tasks.listTasks({task_type: kind})).map((t) => t.task_id), [task.task_id]);
assert.equal(typeof (await tasks.getStats()).running, 'number');
assert.equal((await tasks.getTask('0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f')).status, 404);
assert.equal((await tasks.getTask('no such task')).status, 404);  // the seed's calls: a 404's JSON
// An id that would name another route (the list, a dot segment, the batch writes) is never sent (audit).
for (const id of ['', '.', '..', 'batch']) {
    await assert.rejects(tasks.getTask(id), TypeError);
    await assert.rejects(tasks.updateTask(id, {updates: []}), TypeError);
    await assert.rejects(tasks.history(id), TypeError);
    assert.throws(() => tasks.watchTask(id, () => {}), TypeError);
    assert.throws(() => new TaskManager(tasks.baseUrl, {watch: 'poll'}).watchTask(id, () => {}), TypeError);
}

// History, the feed, and errors thrown by the added calls.
const history = await tasks.history(task.task_id, {limit: 1});  // one event a page: follows Link
assert.deepEqual(history.events.map((e) => e.type), ['TaskCreated', 'TaskStarted']);
assert.equal(history.task_id, task.task_id);
await assert.rejects(tasks.history('0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f'),
    (error) => error instanceof TaskTrailError && error.status === 404 && /not found/.test(error.detail));
let page = await tasks.events({limit: 1000});
let cursor = page.next_cursor;
while (page.events.length) {
    page = await tasks.events({after: cursor, limit: 1000});
    cursor = page.next_cursor;
}
const second = await tasks.createTask(kind);
for (let attempt = 0; ; attempt++) {  // the feed may hold a fresh event back while a transaction is open
    page = await tasks.events({after: cursor});
    if (page.events.length || attempt === 200) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
}
assert.deepEqual(page.events.map((e) => [e.task_id, e.type]), [[second.task_id, 'TaskCreated']]);
assert.ok(page.next_cursor);
await assert.rejects(tasks.events({after: 'nonsense'}), (error) => error.status === 422);

// A create whose answer is lost is retried under its Idempotency-Key: one task, not two.
{
    const lossy = new TaskManager(dropProxy);
    const made = await lossy.createTask(kind, {order: 42});
    assert.equal(made.status, 'pending');
    const mine = (await tasks.listTasks({task_type: kind})).filter((t) => t.params?.order === 42);
    assert.deepEqual(mine.map((t) => t.task_id), [made.task_id]);
}

// watchTask over Server-Sent Events (fetch): the state, then each event; a cut connection resumes
// with Last-Event-ID, nothing missed and nothing twice.
{
    const watched = await tasks.createTask(kind);
    const watcher = new TaskManager(cutProxy);
    const updates = [];
    let started;
    const ready = new Promise((resolve) => { started = resolve; });
    const watch = watcher.watchTask(watched.task_id, (state, event) => {
        updates.push({state, event});
        started();
    });
    await ready;
    await tasks.updateTask(watched.task_id, {status: 'running'});
    for (const progress of [10, 20, 30, 40, 50]) {
        await tasks.updateTask(watched.task_id, {progress});
    }
    await tasks.updateTask(watched.task_id, {status: 'completed', result: {rows: 5}});
    const finished = await watch.done;
    assert.deepEqual(finished, await tasks.getTask(watched.task_id));
    assert.deepEqual(updates.map((u) => u.state.version), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(updates.map((u) => u.event?.type ?? 'snapshot'),
        ['snapshot', 'TaskStarted', ...Array(5).fill('ProgressReported'), 'TaskCompleted']);
}

// A finished task's watch ends with its state; a deleted one's with null; an unknown one rejects.
await tasks.updateTask(second.task_id, {status: 'completed'});
assert.equal((await tasks.watchTask(second.task_id, () => {}).done).status, 'completed');
{
    const doomed = await tasks.createTask(kind);
    const seen = [];
    const watch = tasks.watchTask(doomed.task_id, (state) => seen.push(state));
    await tasks.deleteTask(doomed.task_id);
    assert.equal(await watch.done, null);
    assert.equal(seen.at(-1), null);
}
await assert.rejects(tasks.watchTask('0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f', () => {}).done,
    (error) => error instanceof TaskTrailError && error.status === 404);

// Batch writes: all or none, in order; one result per change.
{
    const made = await tasks.createMany([{task_type: kind, params: {n: 1}}, kind]);
    assert.deepEqual(made.map((t) => [t.task_type, t.params, t.version]), [[kind, {n: 1}, 1], [kind, null, 1]]);
    const again = await tasks.createMany([kind], {idempotencyKey: `${kind}-batch`});
    assert.deepEqual(await tasks.createMany([kind], {idempotencyKey: `${kind}-batch`}), again);
    await assert.rejects(tasks.createMany([]), (error) => error instanceof TaskTrailError && error.status === 422);
    const results = await tasks.updateMany([
        {task_id: made[0].task_id, status: 'running', progress: 30},
        {task_id: made[1].task_id, progress: 5, if_version: 4},
        {task_id: again[0].task_id, delete: true},
    ]);
    assert.deepEqual(results.map((r) => r.status), [200, 412, 200]);
    assert.equal(results[0].task.progress, 30);
    assert.equal(results[1].problem.status, 412);
    assert.equal(results[2].deleted, true);
    assert.ok(tasks.readAfter === null || typeof tasks.readAfter === 'string');
}

// applyEvent folds the feed to the state the server shows.
{
    const {events} = await tasks.history(task.task_id);
    let state;
    for (const event of events) state = applyEvent(state, {...event, task_id: task.task_id});
    assert.deepEqual(state, await tasks.getTask(task.task_id));
}

// The API key goes as a bearer token, on every call and on the stream.
{
    const keyed = new TaskManager(keyedBase, {apiKey: writeKey});
    const made = await keyed.createTask('keyed');
    assert.equal(made.status, 'pending');
    assert.equal((await keyed.history(made.task_id)).events[0].metadata.actor, 'worker');
    const watch = keyed.watchTask(made.task_id, () => {});
    await keyed.updateTask(made.task_id, {status: 'canceled'});
    assert.equal((await watch.done).status, 'canceled');
    assert.equal((await new TaskManager(keyedBase).getTask(made.task_id)).status, 401);
    await assert.rejects(new TaskManager(keyedBase).history(made.task_id), (error) => error.status === 401);
    // A key no header can carry is refused at once, not retried as a network error for seconds (audit).
    for (const bad of ['tt_\u2028x', 'tt_ x', 'tt_\nx', 'tt_é']) {
        assert.throws(() => new TaskManager(keyedBase, {apiKey: bad}), TypeError);
    }
    assert.equal((await new TaskManager(keyedBase, {apiKey: ''}).getTask(made.task_id)).status, 401);  // as none
}
console.log('package client: ok');
