// clients/js/tasktrail.mjs against a real tasktrail server: node watch_client.mjs http://127.0.0.1:PORT
// watchTask's polling, and its EventSource path on the minimal EventSource
// below, built on fetch streaming the way a browser's behaves: named events,
// Last-Event-ID on reconnect, and giving up on a response that is not an event
// stream (404, 204). (Its default, Server-Sent Events over fetch, is driven by
// package_client.mjs.)
import assert from 'node:assert/strict';

import {TaskTrail, applyEvent} from '../../clients/js/tasktrail.mjs';

const base = process.argv[2];

class FetchEventSource {
    static connects = 0;

    constructor(url, {dropAfter = 0} = {}) {
        this.url = url;
        this.readyState = 0;
        this.lastEventId = '';
        this.listeners = new Map();
        this.dropAfter = dropAfter;  // cut the connection after this many events, once (a network drop)
        this.connect();
    }

    addEventListener(type, listener) {
        if (!this.listeners.has(type)) this.listeners.set(type, []);
        this.listeners.get(type).push(listener);
    }

    dispatch(type, message = {}) {
        for (const listener of this.listeners.get(type) ?? []) listener({type, ...message});
    }

    close() {
        this.readyState = 2;
        this.controller?.abort();
    }

    async connect() {
        FetchEventSource.connects += 1;
        this.controller = new AbortController();
        const headers = {Accept: 'text/event-stream'};
        if (this.lastEventId) headers['Last-Event-ID'] = this.lastEventId;
        let response;
        try {
            response = await fetch(this.url, {headers, signal: this.controller.signal});
        } catch {
            return this.reconnect();
        }
        if (response.status !== 200 || !response.headers.get('content-type')?.startsWith('text/event-stream')) {
            this.readyState = 2;
            this.dispatch('error');
            return;
        }
        this.readyState = 1;
        this.dispatch('open');
        let event = '', data = [], buffer = '', seen = 0;
        try {
            for await (const text of response.body.pipeThrough(new TextDecoderStream())) {
                buffer += text;
                const lines = buffer.split(/\r\n|\r|\n/);
                buffer = lines.pop();
                for (const line of lines) {
                    if (line === '') {
                        if (data.length) {
                            this.dispatch(event || 'message', {data: data.join('\n'), lastEventId: this.lastEventId});
                            seen += 1;
                        }
                        event = '';
                        data = [];
                        if (this.dropAfter && seen === this.dropAfter) {
                            // The network drops here: whatever else came in this read is lost.
                            this.dropAfter = 0;
                            this.controller.abort();
                            return this.reconnect();
                        }
                        continue;
                    }
                    const colon = line.indexOf(':');
                    if (colon === 0) continue;  // a comment: the ping
                    const field = colon < 0 ? line : line.slice(0, colon);
                    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
                    if (field === 'event') event = value;
                    else if (field === 'data') data.push(value);
                    else if (field === 'id') this.lastEventId = value;
                }
            }
        } catch {
            // aborted: by close(), or the simulated drop
        }
        this.reconnect();
    }

    reconnect() {
        if (this.readyState === 2) return;
        this.readyState = 0;
        this.dispatch('error');
        setTimeout(() => this.readyState !== 2 && this.connect(), 100);
    }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function watched(client, taskId) {
    const updates = [];
    let first;
    const started = new Promise((resolve) => { first = resolve; });
    const watch = client.watchTask(taskId, (task, event) => {
        updates.push({task, event});
        first();
    });
    return {updates, started, ...watch};
}

// The seed's calls.
const plain = new TaskTrail(base);
const task = await plain.createTask('document_process', {file_path: '/tmp/test.pdf'});
assert.equal(task.status, 'pending');
assert.deepEqual(await plain.getTask(task.task_id), task);
assert.equal((await plain.updateTask(task.task_id, {status: 'running', progress: 10})).progress, 10);
assert.deepEqual((await plain.listTasks({status: 'running'})).map(t => t.task_id), [task.task_id]);
assert.equal((await plain.getStats()).running, 1);
assert.equal((await plain.getTask('0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f')).status, 404);

// Polling, where there is no EventSource (Node 20).
assert.equal(globalThis.EventSource, undefined);
const polling = new TaskTrail(base, {watch: 'poll', pollInterval: 50});
{
    const watch = watched(polling, task.task_id);
    await watch.started;
    await plain.updateTask(task.task_id, {progress: 60});
    await sleep(200);
    await plain.updateTask(task.task_id, {status: 'completed', result: {files_processed: 10}});
    const finished = await watch.done;
    assert.deepEqual(finished, await plain.getTask(task.task_id));
    assert.equal(finished.status, 'completed');
    const versions = watch.updates.map(u => u.task.version);
    assert.deepEqual(versions, [...versions].sort((a, b) => a - b));
    assert.ok(watch.updates.every(u => u.event === null));
}
await assert.rejects(polling.watchTask('0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f', () => {}).done, /not found/);

// Server-Sent Events: the state first, then every event, folded the way the server folds it.
const streaming = new TaskTrail(base, {EventSource: FetchEventSource});
{
    const other = await plain.createTask('import', {n: 1});
    const watch = watched(streaming, other.task_id);
    await watch.started;
    await plain.updateTask(other.task_id, {status: 'running'});
    await plain.updateTask(other.task_id, {progress: 50});
    await plain.updateTask(other.task_id, {status: 'failed', error: 'disk full'});
    const finished = await watch.done;
    assert.deepEqual(finished, await plain.getTask(other.task_id));
    assert.deepEqual(watch.updates.map(u => u.event?.type ?? 'snapshot'),
        ['snapshot', 'TaskStarted', 'ProgressReported', 'TaskFailed']);
    assert.deepEqual(watch.updates[0].task, other);
}

// A dropped connection resumes from Last-Event-ID: nothing missed, nothing twice.
{
    const Dropping = class extends FetchEventSource {
        constructor(url) { super(url, {dropAfter: 3}); }  // the snapshot and two events
    };
    const dropping = new TaskTrail(base, {EventSource: Dropping});
    const third = await plain.createTask('report');
    const before = FetchEventSource.connects;
    const watch = watched(dropping, third.task_id);
    await watch.started;
    await plain.updateTask(third.task_id, {status: 'running'});
    for (const progress of [10, 20, 30, 40, 50]) {
        await plain.updateTask(third.task_id, {progress});
    }
    await plain.updateTask(third.task_id, {status: 'completed'});
    const finished = await watch.done;
    assert.ok(FetchEventSource.connects - before >= 2, 'the connection was dropped and made again');
    assert.deepEqual(finished, await plain.getTask(third.task_id));
    assert.deepEqual(watch.updates.slice(1).map(u => u.event.version), [2, 3, 4, 5, 6, 7, 8]);
}

// Deleted while watched: the last update is null.
{
    const doomed = await plain.createTask('doomed');
    const watch = watched(streaming, doomed.task_id);
    await watch.started;
    await plain.deleteTask(doomed.task_id);
    assert.equal(await watch.done, null);
    assert.deepEqual(watch.updates.map(u => u.task === null), [false, true]);
    assert.equal(watch.updates[1].event.type, 'TaskDeleted');
}
await assert.rejects(streaming.watchTask('0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f', () => {}).done, /not found/);

// A polyfill that tells of the error before it closes (as npm's eventsource does on a 404).
{
    const TellsFirst = class extends FetchEventSource {
        dispatch(type, message = {}) {
            const closing = type === 'error' && this.readyState === 2;
            if (closing) this.readyState = 0;
            super.dispatch(type, message);
            if (closing) this.readyState = 2;
        }
    };
    const tellsFirst = new TaskTrail(base, {EventSource: TellsFirst});
    await assert.rejects(tellsFirst.watchTask('0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f', () => {}).done, /not found/);
    const doomed = await plain.createTask('doomed');
    const watch = watched(tellsFirst, doomed.task_id);
    await watch.started;
    await plain.deleteTask(doomed.task_id);
    assert.equal(await watch.done, null);
}

// What onUpdate throws ends the watch and rejects done with it, in every mode: it is not a dropped
// connection to come back from.
for (const client of [plain, polling, streaming]) {
    const doomed = await plain.createTask('throws');
    let calls = 0;
    const connects = FetchEventSource.connects;
    const watch = client.watchTask(doomed.task_id, () => {
        calls += 1;
        throw new Error('the caller broke');
    });
    await assert.rejects(watch.done, /the caller broke/);
    await plain.updateTask(doomed.task_id, {progress: 5});
    await sleep(300);
    assert.equal(calls, 1, `${client.watchMode}: one call, then nothing`);
    if (client === streaming) assert.equal(FetchEventSource.connects, connects + 1, 'no reconnect');
}

// A finished task's watch ends with its state.
assert.equal((await streaming.watchTask(task.task_id, () => {}).done).status, 'completed');

// applyEvent folds a replayed history to the state the server shows. (The feed
// may hold the newest events back while a transaction is open: ask again.)
for (let attempt = 1; ; attempt++) {
    const feed = await (await fetch(`${base}/events?limit=1000`)).json();
    const states = new Map();
    for (const event of feed.events) {
        states.set(event.task_id, applyEvent(states.get(event.task_id), event));
    }
    const differences = [];
    for (const [taskId, state] of states) {
        const response = await fetch(`${base}/tasks/${taskId}`);
        const shown = response.status === 404 ? null : await response.json();
        try {
            assert.deepEqual(state, shown);
        } catch (error) {
            differences.push(error);
        }
    }
    if (!differences.length) break;
    if (attempt === 300) throw differences[0];
    await sleep(100);
}
console.log('watch client: ok');
