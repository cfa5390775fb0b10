// clients/js reads its own writes from a paused replica: node read_after.mjs BASE
// (the server reads from a streaming replica whose replay the test has paused).
import assert from 'node:assert/strict';

import {TaskManager} from '../../clients/js/tasktrail.mjs';

const base = process.argv[2];
const tasks = new TaskManager(base);
const task = await tasks.createTask('replicated');
assert.equal(task.status, 'pending');
assert.ok(tasks.readAfter, 'the create answered with a Tasktrail-Read-After token');
// Without the token, the paused replica answers, and has not even seen the create:
// its list is empty (a task it does not know at all is asked of the primary instead).
assert.deepEqual(await (await fetch(`${base}/tasks/?task_type=replicated`)).json(), []);
// The client's reads send it, and see their writes.
assert.equal((await tasks.getTask(task.task_id)).version, 1);
await tasks.updateTask(task.task_id, {status: 'running', progress: 5});
assert.equal((await tasks.getTask(task.task_id)).status, 'running');
assert.deepEqual((await tasks.listTasks({task_type: 'replicated'})).map((t) => t.task_id), [task.task_id]);
assert.deepEqual((await tasks.history(task.task_id)).events.map((e) => e.type), ['TaskCreated', 'TaskStarted']);
// A write whose answer is lost may have committed at a position no token names: the reads after it go
// to the primary until a write's answer gives a token again (audit: the paused replica's state was read).
// The answer is lost here after the server applied the write (a 1 ms timeout lost it only most times).
const realFetch = globalThis.fetch;
globalThis.fetch = async (...args) => {
    globalThis.fetch = realFetch;
    await (await realFetch(...args)).arrayBuffer();
    throw new TypeError('fetch failed: the connection dropped before the answer came');
};
await assert.rejects(tasks.updateTask(task.task_id, {progress: 77}));
assert.equal(tasks.readAfter, 'primary');
const primary = await (await fetch(`${base}/tasks/${task.task_id}`, {headers: {'Tasktrail-Read-After': 'primary'}})).json();
assert.deepEqual(await tasks.getTask(task.task_id), primary);
const watch = tasks.watchTask(task.task_id, () => {});
await tasks.updateTask(task.task_id, {status: 'completed'});
assert.equal((await watch.done).status, 'completed');
console.log('read after: ok');
