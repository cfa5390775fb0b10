// tasktrail's JavaScript client: a plain ES module, no dependencies.
//
// The calls of the seed's TaskManager, unchanged in shape (each answers the
// response's JSON, a problem document on an error), plus watchTask: the task's
// state as it changes, over Server-Sent Events (EventSource), or by polling
// where there is no EventSource (Node, some workers).
//
//   import {TaskTrail} from './tasktrail.mjs';
//   const tasks = new TaskTrail('http://localhost:8000');
//   const task = await tasks.createTask('document_process', {file_path: '/tmp/test.pdf'});
//   const watch = tasks.watchTask(task.task_id, (state, event) => render(state));
//   const finished = await watch.done;   // the finished task (null if it was deleted)
//   watch.close();                       // stop early

const FINISHED = new Set(['completed', 'failed', 'canceled']);

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

export class TaskTrail {
    constructor(baseUrl = 'http://localhost:8000', {EventSource = globalThis.EventSource, pollInterval = 1000} = {}) {
        this.baseUrl = baseUrl.replace(/\/+$/, '');
        this.EventSource = EventSource;
        this.pollInterval = pollInterval;
    }

    async #json(path, init) {
        const response = await fetch(`${this.baseUrl}${path}`, init);
        return response.json();
    }

    #send(method, path, body) {
        return this.#json(path, {method, headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
    }

    createTask(taskType, params) {
        return this.#send('POST', '/tasks/', {task_type: taskType, params});
    }

    getTask(taskId) {
        return this.#json(`/tasks/${taskId}`);
    }

    listTasks(filters = {}) {
        return this.#json(`/tasks/?${new URLSearchParams(filters)}`);
    }

    updateTask(taskId, updates) {
        return this.#send('PATCH', `/tasks/${taskId}`, updates);
    }

    deleteTask(taskId) {
        return this.#json(`/tasks/${taskId}`, {method: 'DELETE'});
    }

    getStats() {
        return this.#json('/tasks/stats/summary');
    }

    // Call onUpdate(task, event) with the task's state each time it changes
    // (event: the feed event that changed it, or null for a state read whole),
    // until it reaches a finished status or is deleted (task null).
    // Returns {done, close}: done resolves with the last state, or rejects if
    // the task does not exist.
    watchTask(taskId, onUpdate) {
        let settle;
        const done = new Promise((resolve, reject) => { settle = {resolve, reject}; });
        const watch = this.EventSource
            ? this.#stream(taskId, onUpdate, settle)
            : this.#poll(taskId, onUpdate, settle);
        return {done, close: () => { watch.close(); settle.resolve(undefined); }};
    }

    #stream(taskId, onUpdate, settle) {
        const source = new this.EventSource(`${this.baseUrl}/tasks/${taskId}/stream`);
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
            // gave up: on a 404, or a 204 (nothing more to come). Ask which.
            if (source.readyState !== 2 || over) return;
            over = true;
            const response = await fetch(`${this.baseUrl}/tasks/${taskId}`);
            if (response.status === 404) {
                if (task === undefined) {
                    settle.reject(new Error(`task ${taskId} not found`));
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
                const response = await fetch(`${this.baseUrl}/tasks/${taskId}`);
                if (stopped) return;
                if (response.status === 404) {
                    if (task === undefined) {
                        settle.reject(new Error(`task ${taskId} not found`));
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
