// The seed's JavaScript TaskManager, copied unchanged from the reference design,
// driven against a real tasktrail server: node seed_client.mjs http://127.0.0.1:PORT
import assert from 'node:assert/strict';

// ---- from the seed, unchanged ----
class TaskManager {
    constructor(baseUrl = 'http://localhost:8000') {
        this.baseUrl = baseUrl;
    }

    async createTask(taskType, params) {
        const response = await fetch(`${this.baseUrl}/tasks/`, {
            method: 'POST',
            headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({task_type: taskType, params})
        });
        return response.json();
    }

    async getTask(taskId) {
        const response = await fetch(`${this.baseUrl}/tasks/${taskId}`);
        return response.json();
    }

    async listTasks(filters = {}) {
        const params = new URLSearchParams(filters);
        const response = await fetch(`${this.baseUrl}/tasks/?${params}`);
        return response.json();
    }

    async updateTask(taskId, updates) {
        const response = await fetch(`${this.baseUrl}/tasks/${taskId}`, {
            method: 'PATCH',
            headers: {'Content-Type': 'application/json'},
            body: JSON.stringify(updates)
        });
        return response.json();
    }

    async deleteTask(taskId) {
        const response = await fetch(`${this.baseUrl}/tasks/${taskId}`, {
            method: 'DELETE'
        });
        return response.json();
    }

    async getStats() {
        const response = await fetch(`${this.baseUrl}/tasks/stats/summary`);
        return response.json();
    }
}
// ---- end of the seed's code ----

const taskManager = new TaskManager(process.argv[2]);

// The seed's usage example: create, then poll until finished while a worker reports progress.
const task = await taskManager.createTask('document_process', {file_path: '/tmp/test.pdf'});
assert.equal(task.status, 'pending');
assert.equal(task.task_type, 'document_process');
assert.deepEqual(task.params, {file_path: '/tmp/test.pdf'});
assert.equal(typeof task.id, 'number');

const seen = [];
const worker = (async () => {
    for (const progress of [10, 50, 90]) {
        const updated = await taskManager.updateTask(task.task_id, {status: 'running', progress});
        assert.equal(updated.progress, progress);
        // Wait until the poller has seen it, so the test does not hang on timing.
        for (let i = 0; i < 500 && !seen.includes(progress); i++) {
            await new Promise(r => setTimeout(r, 20));
        }
    }
    await taskManager.updateTask(task.task_id, {status: 'completed', progress: 100.0, result: {files_processed: 10}});
})();

const pollTask = async (taskId) => {
    while (true) {
        const task = await taskManager.getTask(taskId);
        seen.push(task.progress);
        if (task.status === 'completed' || task.status === 'failed') {
            return task;
        }
        await new Promise(r => setTimeout(r, 100));
    }
};
const finished = await pollTask(task.task_id);
await worker;
assert.equal(finished.status, 'completed');
assert.deepEqual(finished.result, {files_processed: 10});
assert.ok([10, 50, 90].every(p => seen.includes(p)), `poll saw progress ${seen}`);
assert.ok(!Number.isNaN(Date.parse(finished.completed_at)));

// The rest of the class.
const other = await taskManager.createTask('import', undefined);
assert.equal(other.params, null);
const all = await taskManager.listTasks();
assert.deepEqual(all.map(t => t.task_id), [other.task_id, task.task_id]);
assert.deepEqual((await taskManager.listTasks({status: 'completed'})).map(t => t.task_id), [task.task_id]);
assert.deepEqual((await taskManager.listTasks({task_type: 'import', skip: 0, limit: 10})).map(t => t.task_id), [other.task_id]);
assert.deepEqual(await taskManager.getStats(), {total: 2, pending: 1, running: 0, completed: 1, failed: 0, canceled: 0});
assert.deepEqual(await taskManager.deleteTask(other.task_id), {status: 'deleted'});
const gone = await taskManager.getTask(other.task_id);
assert.equal(gone.status, 404);
assert.equal((await taskManager.getStats()).total, 1);
console.log('seed client: ok');
