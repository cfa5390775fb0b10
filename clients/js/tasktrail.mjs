// tasktrail's JavaScript client: one ES module, no dependencies, for browsers and Node 18+.
//
// TaskManager has the seed's calls, unchanged in name, arguments and answer
// (each resolves to the response's JSON: the task, or on a refusal the problem
// document, whose `status` is the HTTP status), plus what the seed did not
// have: watchTask (the task as it changes, over Server-Sent Events), history,
// events (the global feed), createMany/updateMany (batch writes) and cleanup.
// The added calls throw a TaskTrailError on a refusal.
//
//   import {TaskManager} from 'tasktrail-client';
//   const tasks = new TaskManager('http://localhost:8000', {apiKey: 'optional'});
//   const task = await tasks.createTask('document_process', {file_path: '/tmp/test.pdf'});
//   const watch = tasks.watchTask(task.task_id, (state, event) => render(state));
//   const finished = await watch.done;   // the finished task (null if it was deleted)
//
// Creates are retried on a 503 or a network error under one Idempotency-Key,
// so a retry never makes a second task. After a write, the reads that follow
// send its Tasktrail-Read-After token back, so that they see it.

const FINISHED = new Set(['completed', 'failed', 'canceled']);
const READ_AFTER = 'Tasktrail-Read-After';
const ON_PRIMARY = 'primary';  // a token that sends a read to the primary

// The status each event moves a task to (the rest leave it as it is).
const TARGET = {
    TaskStarted: 'running',
    TaskCompleted: 'completed',
    TaskFailed: 'failed',
    TaskCanceled: 'canceled',
    TaskRequeued: 'pending',
    TaskRetried: 'pending',
};

export const EVENT_TYPES = [
    'TaskCreated', 'TaskStarted', 'ProgressReported', 'TaskCompleted', 'TaskFailed',
    'TaskCanceled', 'TaskRequeued', 'TaskRetried', 'TaskUpdated', 'TaskDeleted',
];

// A refusal by the server (or a network failure, status 0) in the calls the seed did not have.
export class TaskTrailError extends Error {
    constructor(status, problem = {}) {
        super(`${status} ${problem.title ?? 'Error'}${problem.detail ? `: ${problem.detail}` : ''}`);
        this.name = 'TaskTrailError';
        this.status = status;
        this.problem = problem;
        this.title = problem.title;
        this.detail = problem.detail;
        this.errors = problem.errors ?? [];
        this.currentStatus = problem.current_status;
        this.allowed = problem.allowed;
    }
}

// The task after an event from the feed or a stream, as the server computes it;
// null once deleted. Mirrors the server's evolve().
export function applyEvent(task, event) {
    const at = event.occurred_at;
    const data = event.data;
    if (event.type === 'TaskCreated') {
        return {
            id: event.position, task_id: event.task_id, task_type: data.task_type, status: 'pending',
            progress: 0, params: data.params ?? null, result: null, error: null, retry_count: 0,
            created_at: at, updated_at: at, started_at: null, completed_at: null, version: event.version,
        };
    }
    if (event.type === 'TaskDeleted') {
        return null;
    }
    const next = {...task, updated_at: at, version: event.version};
    if (event.type in TARGET) {
        next.status = TARGET[event.type];
    }
    switch (event.type) {
        case 'TaskStarted':
            if (task.started_at === null) next.started_at = at;
            break;
        case 'TaskCompleted':
        case 'TaskFailed':
        case 'TaskCanceled':
            next.completed_at = at;
            break;
        case 'TaskRequeued':
            next.retry_count = task.retry_count + 1;
            break;
        case 'TaskRetried':
            Object.assign(next, {retry_count: task.retry_count + 1, started_at: null, completed_at: null, error: null});
            break;
    }
    for (const field of ['progress', 'result', 'error']) {
        if (field in data) next[field] = data[field];
    }
    return next;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// JSON has no NaN or Infinity: JSON.stringify writes null for them, which the service reads as "unchanged"
// (progress) or stores (params), so a NaN would pass unseen. It is refused here, before anything is sent.
function finite(key, value) {
    if (typeof value === 'number' && !Number.isFinite(value)) {
        throw new RangeError(`${key || 'the body'} is ${value}: JSON has no NaN or Infinity`);
    }
    return value;
}

// Of two read-after tokens, the later. They are opaque; when both read as WAL positions (X/Y), compare
// them, so that writes answered out of order (concurrent calls) never move the token back.
const LSN = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/;
export function later(held, token) {
    const a = held && LSN.exec(held), b = LSN.exec(token);
    if (!a || !b) return token;
    const [ah, al, bh, bl] = [a[1], a[2], b[1], b[2]].map((hex) => parseInt(hex, 16));
    return ah > bh || (ah === bh && al > bl) ? held : token;
}

// A task's path. Any id is sent (the seed's calls answer a 404's JSON for an unknown one), but never one
// that names another route: '' (the list), '.' and '..' (dot segments), 'batch' (the batch writes).
function taskPath(taskId, suffix = '') {
    const id = String(taskId);
    if (['', '.', '..', 'batch'].includes(id)) throw new TypeError(`${JSON.stringify(id)} is not a task id`);
    return `/tasks/${encodeURIComponent(id)}${suffix}`;
}

function newKey() {
    if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
    return Array.from({length: 32}, () => Math.floor(Math.random() * 16).toString(16)).join('');
}

// Exponential, half of it random, at most `max` ms.
function backoff(failures, base = 100, max = 2000) {
    const ceiling = Math.min(max, base * 2 ** (failures - 1));
    return ceiling / 2 + Math.random() * ceiling / 2;
}

export class TaskManager {
    // options: apiKey (a bearer token); attempts (tries per create, default 10: 6 to 11 s in all, a restart's time);
    // timeout (ms an answer may take, default 30000: a connection gone silent is given up, as a network error);
    // watch: 'stream' (default) or 'poll'; pollInterval (ms, for 'poll');
    // EventSource: a constructor to stream with instead (it cannot send the API key).
    constructor(baseUrl = 'http://localhost:8000', options = {}) {
        const {apiKey, attempts = 10, timeout = 30000, watch = 'stream', pollInterval = 1000, EventSource} = options;
        // A key goes in a header: one that cannot (a space, a line break, a character past Latin-1) is refused
        // here, not retried as a network error on each call.
        if (apiKey && !/^[\x21-\x7e]+$/.test(String(apiKey))) {
            throw new TypeError('apiKey: an API key is printable ASCII with no space (tt_…, as `tasktrail keys add` made it)');
        }
        this.baseUrl = baseUrl.replace(/\/+$/, '');
        this.apiKey = apiKey;
        this.attempts = attempts;
        this.timeout = timeout;
        this.watchMode = watch;
        this.pollInterval = pollInterval;
        this.EventSource = EventSource;
        this.readAfter = null;  // the last write's Tasktrail-Read-After token
    }

    #headers(method, extra = {}) {
        const headers = {...extra};
        if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
        if (method === 'GET' && this.readAfter) headers[READ_AFTER] = this.readAfter;
        return headers;
    }

    // One request; retried on a 503 or a network error when `retry` (reads, and creates under their key).
    async #fetch(method, path, {body, headers = {}, retry = method === 'GET'} = {}) {
        const init = {method, headers: this.#headers(method, headers)};
        if (body !== undefined) {
            init.body = JSON.stringify(body, finite);
            init.headers['Content-Type'] = 'application/json';
        }
        for (let failures = 0; ; ) {
            let response;
            try {
                response = await fetch(`${this.baseUrl}${path}`, {...init, signal: AbortSignal.timeout(this.timeout)});
            } catch (error) {
                // A write's answer lost: it may have committed at a position no token names, so reads go to
                // the primary until a write's answer gives a token again (as the Python client does).
                if (method !== 'GET') this.readAfter = ON_PRIMARY;
                if (!retry || ++failures >= this.attempts) throw error;
                await sleep(backoff(failures));
                continue;
            }
            // A 503 to a write may say its outcome is unknown (the server lost its database mid-write): as a
            // lost answer, reads go to the primary until a write's answer gives a token again.
            if (response.status === 503 && method !== 'GET') this.readAfter = ON_PRIMARY;
            if (response.status === 503 && retry && ++failures < this.attempts) {
                await response.body?.cancel();
                await sleep(Math.max(backoff(failures), Math.min(Number(response.headers.get('Retry-After')) * 1000 || 0, 2000)));
                continue;
            }
            const token = response.headers.get(READ_AFTER);
            // A refused write's token too (404, 409, 412: a server with replicas sends one).
            if (method !== 'GET' && (response.ok || [404, 409, 412].includes(response.status)) && token) this.readAfter = later(this.readAfter, token);
            return response;
        }
    }

    // The seed's calls: the response's JSON, whatever the status.

    async createTask(taskType, params, {idempotencyKey = newKey()} = {}) {
        const response = await this.#fetch('POST', '/tasks/', {
            body: {task_type: taskType, params}, headers: {'Idempotency-Key': idempotencyKey}, retry: true,
        });
        return response.json();
    }

    async getTask(taskId) {
        return (await this.#fetch('GET', taskPath(taskId))).json();
    }

    async listTasks(filters = {}) {
        return (await this.#fetch('GET', `/tasks/?${new URLSearchParams(filters)}`)).json();
    }

    // `ifVersion`: change it only if it is still at that version (else a 412 problem).
    async updateTask(taskId, updates, {ifVersion} = {}) {
        const headers = ifVersion === undefined ? {} : {'If-Match': `"${ifVersion}"`};
        return (await this.#fetch('PATCH', taskPath(taskId), {body: updates, headers})).json();
    }

    async deleteTask(taskId) {
        return (await this.#fetch('DELETE', taskPath(taskId))).json();
    }

    async getStats() {
        return (await this.#fetch('GET', '/tasks/stats/summary')).json();
    }

    // The added calls: they throw a TaskTrailError on a refusal.

    async #json(method, path, options = {}) {
        const response = await this.#reached(method, path, options);
        const body = await response.json().catch(() => ({}));
        if (!response.ok) throw new TaskTrailError(response.status, body);
        return body;
    }

    // #fetch, with a network failure (after its retries) as the TaskTrailError of status 0 the added calls promise.
    async #reached(method, path, options = {}) {
        try {
            return await this.#fetch(method, path, options);
        } catch (error) {
            if (error instanceof RangeError) throw error;  // a body JSON cannot carry: nothing was sent
            throw new TaskTrailError(0, {title: 'the server could not be reached', detail: String(error?.message ?? error)});
        }
    }

    // {task_id, events}: every event of the task in version order (all pages), deleted tasks too.
    async history(taskId, {afterVersion = 0, limit = 1000} = {}) {
        const events = [];
        let path = taskPath(taskId, `/history?after_version=${afterVersion}&limit=${limit}`);
        for (;;) {
            const response = await this.#reached('GET', path);
            const page = await response.json().catch(() => ({}));
            if (!response.ok) throw new TaskTrailError(response.status, page);
            events.push(...page.events);
            const next = /<([^>]+)>;\s*rel="next"/.exec(response.headers.get('Link') ?? '');
            if (!next) return {task_id: page.task_id, events};
            path = next[1];
        }
    }

    // One page of the global feed: {events, next_cursor}; ask again with after: next_cursor.
    events({after, limit = 100} = {}) {
        const query = new URLSearchParams({limit: String(limit), ...(after ? {after} : {})});
        return this.#json('GET', `/events?${query}`);
    }

    // 1 to 1,000 tasks, all or none: [{task_type, params?} or a task type]. Resolves to the tasks.
    async createMany(tasks, {idempotencyKey = newKey()} = {}) {
        const items = tasks.map((t) => (typeof t === 'string' ? {task_type: t} : t));
        const body = await this.#json('POST', '/tasks/batch', {
            body: {tasks: items}, headers: {'Idempotency-Key': idempotencyKey}, retry: true,
        });
        return body.tasks;
    }

    // 1 to 1,000 changes [{task_id, status?, progress?, result?, error?, if_version?}], each decided on its
    // own. Resolves to one result per item, in order: {task_id, status: <HTTP status>, task or problem}.
    async updateMany(updates) {
        return (await this.#json('PATCH', '/tasks/batch', {body: {updates}})).results;
    }

    // Delete finished tasks completed more than `days` days ago (an admin key). Resolves to how many.
    async cleanup(days = 30) {
        return (await this.#json('POST', `/tasks/cleanup?days=${days}`)).deleted;
    }

    // Call onUpdate(task, event) with the task's state each time it changes
    // (event: the event that changed it, or null for a state read whole),
    // until it reaches a finished status or is deleted (task null).
    // Returns {done, close}: done resolves with the last state, or rejects if
    // the task does not exist, or with what onUpdate threw (the watch stops then).
    watchTask(taskId, onUpdate) {
        taskPath(taskId);  // an id that names another route throws here, whichever the watch mode
        let settle;
        const done = new Promise((resolve, reject) => { settle = {resolve, reject}; });
        let watch;
        let stopped = false;
        const stop = () => { stopped = true; watch?.close(); };
        // The caller's error is the caller's, not a dropped connection to come back from.
        const update = (task, event) => {
            if (stopped) return;
            try {
                onUpdate(task, event);
            } catch (error) {
                stop();
                settle.reject(error);
            }
        };
        if (this.watchMode === 'poll') watch = this.#poll(taskId, update, settle);
        else if (this.EventSource) watch = this.#eventSource(taskId, update, settle);
        else watch = this.#stream(taskId, update, settle);
        if (stopped) watch.close();
        return {done, close: () => { stop(); settle.resolve(undefined); }};
    }

    // Server-Sent Events over fetch: it can send the API key and the read-after token, which
    // EventSource cannot. A dropped connection is made again after the last event's id (or the
    // snapshot's): nothing missed or repeated; with neither, a fresh snapshot is shown only if the task moved.
    #stream(taskId, onUpdate, settle) {
        const controller = new AbortController();
        let task;
        let lastId = null;
        let failures = 0;
        const url = taskPath(taskId, '/stream');
        const handle = (frame) => {
            if (frame.event === 'snapshot') {
                if (frame.id) lastId = frame.id;  // where the snapshot stands: a drop resumes after it
                const now = JSON.parse(frame.data);
                if (task && now.version === task.version) return false;
                task = now;
                onUpdate(task, null);
            } else {
                const event = JSON.parse(frame.data);
                if (frame.id) lastId = frame.id;
                if (task && event.version <= task.version) return false;
                task = applyEvent(task, event);
                onUpdate(task, event);
            }
            return task === null || FINISHED.has(task.status);
        };
        (async () => {
            while (!controller.signal.aborted) {
                // This connection's own end: the watch's close, or a silence of 1.5 times the timeout (45 s by
                // default: three of the server's 15 s pings; a connection that went quiet without closing
                // would otherwise hang for minutes).
                const attempt = new AbortController();
                const end = () => attempt.abort();
                controller.signal.addEventListener('abort', end);
                const silence = this.timeout * 1.5;
                let quiet = setTimeout(end, silence);
                const heard = () => { clearTimeout(quiet); quiet = setTimeout(end, silence); };
                try {
                    // Resumes with ?after= (as Last-Event-ID would), a header a browser would first have to ask
                    // another origin's leave to send.
                    const resume = lastId ? `?after=${encodeURIComponent(lastId)}` : '';
                    const headers = this.#headers('GET', {Accept: 'text/event-stream'});
                    const response = await fetch(`${this.baseUrl}${url}${resume}`, {headers, signal: attempt.signal});
                    if (response.status === 204) return settle.resolve(task);  // resumed after its last event
                    if (response.status !== 200 && response.status !== 503) {
                        const problem = await response.json().catch(() => ({}));
                        return settle.reject(new TaskTrailError(response.status, problem));
                    }
                    if (response.status === 200) {
                        for await (const frame of frames(response.body, heard)) {
                            failures = 0;
                            if (handle(frame)) {
                                controller.abort();
                                return settle.resolve(task);
                            }
                        }
                    } else {
                        await response.body?.cancel();
                    }
                } catch (error) {
                    if (controller.signal.aborted) return;
                    // The network dropped the stream, or went silent, or the server went away: come back.
                } finally {
                    clearTimeout(quiet);
                    controller.signal.removeEventListener('abort', end);
                }
                if (++failures > 10) return settle.reject(new TaskTrailError(0, {title: 'gave up reconnecting'}));
                await sleep(backoff(failures));
            }
        })();
        return {close: () => controller.abort()};
    }

    // A given EventSource (a browser's, or a polyfill's); it reconnects by itself with Last-Event-ID.
    #eventSource(taskId, onUpdate, settle) {
        const source = new this.EventSource(`${this.baseUrl}${taskPath(taskId, '/stream')}`);
        let task;
        let fallback;
        let over = false;
        const finish = () => {
            over = true;
            source.close();
            settle.resolve(task);
        };
        source.addEventListener('snapshot', (message) => {
            task = JSON.parse(message.data);
            onUpdate(task, null);
            if (FINISHED.has(task.status)) finish();
        });
        const onEvent = (message) => {
            const event = JSON.parse(message.data);
            if (task && event.version <= task.version) return;  // the state read whole already had it
            task = applyEvent(task, event);
            onUpdate(task, event);
            if (task === null || FINISHED.has(task.status)) finish();
        };
        for (const type of EVENT_TYPES) {
            source.addEventListener(type, onEvent);
        }
        source.addEventListener('error', async () => {
            // EventSource reconnects by itself (sending Last-Event-ID) unless it
            // gave up: on a 404, or a 204 (nothing more to come). Ask which. A
            // browser closes before it tells; some polyfills (npm eventsource) just
            // after, so look once the event has been handed round.
            await sleep(0);
            if (source.readyState !== 2 || over) return;
            over = true;
            const response = await this.#fetch('GET', taskPath(taskId));
            if (response.status === 404) {
                if (task === undefined) {
                    settle.reject(new TaskTrailError(404, await response.json()));
                    return;
                }
                if (task !== null) onUpdate(null, null);
                task = null;
                settle.resolve(null);
                return;
            }
            const now = response.ok ? await response.json() : task;
            if (response.ok && (!task || now.version !== task.version)) onUpdate(now, null);
            task = now;
            if (task && FINISHED.has(task.status)) settle.resolve(task);
            else fallback = this.#poll(taskId, onUpdate, settle, task);
        });
        return {close: () => { over = true; source.close(); fallback?.close(); }};
    }

    #poll(taskId, onUpdate, settle, task = undefined) {
        let timer;
        let stopped = false;
        const tick = async () => {
            try {
                const response = await this.#fetch('GET', taskPath(taskId));
                if (stopped) return;
                if (response.status === 404) {
                    if (task === undefined) {
                        settle.reject(new TaskTrailError(404, await response.json()));
                    } else {
                        onUpdate(null, null);
                        settle.resolve(null);
                    }
                    return;
                }
                if (response.ok) {
                    const now = await response.json();
                    if (task === undefined || now.version !== task.version) {
                        task = now;
                        onUpdate(task, null);
                    }
                    if (FINISHED.has(task.status)) {
                        settle.resolve(task);
                        return;
                    }
                }
            } catch (error) {
                // The server is away for a moment: keep polling.
            }
            if (!stopped) timer = setTimeout(tick, this.pollInterval);
        };
        tick();
        return {close: () => { stopped = true; clearTimeout(timer); }};
    }
}

// The name this module had before it was a package.
export {TaskManager as TaskTrail};

// The Server-Sent Events of a response body, frame by frame: {event, data, id}.
// `heard` is told of every piece that arrives, pings included.
async function* frames(body, heard = () => {}) {
    let buffer = '';
    let event = '';
    let data = [];
    let id = null;
    for await (const text of body.pipeThrough(new TextDecoderStream())) {
        heard();
        buffer += text;
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop();
        for (const line of lines) {
            if (line === '') {
                if (data.length) yield {event: event || 'message', data: data.join('\n'), id};
                event = '';
                data = [];
                id = null;
                continue;
            }
            if (line.startsWith(':')) continue;  // a comment: the ping
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
            if (field === 'event') event = value;
            else if (field === 'data') data.push(value);
            else if (field === 'id') id = value;
        }
    }
}
