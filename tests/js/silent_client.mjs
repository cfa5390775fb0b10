// The JavaScript client against servers that take a connection and then say nothing: it gives up after its
// timeout (a silent read, a silent stream), and an added call's failure is a TaskTrailError of status 0.
// Usage: node silent_client.mjs <path to tasktrail.mjs>
import assert from 'node:assert/strict';
import net from 'node:net';
import {pathToFileURL} from 'node:url';

const {TaskManager, TaskTrailError} = await import(pathToFileURL(process.argv[2]).href);

function serve(onConnection) {
    const sockets = [];
    const server = net.createServer((socket) => { sockets.push(socket); onConnection(socket, sockets.length); });
    return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({
        url: `http://127.0.0.1:${server.address().port}`,
        connections: () => sockets.length,
        close: () => { sockets.forEach((s) => s.destroy()); server.close(); },
    })));
}

// Takes the request, answers nothing.
const mute = await serve(() => {});
try {
    const client = new TaskManager(mute.url, {timeout: 300, attempts: 2});
    const started = Date.now();
    await assert.rejects(client.getTask('00000000-0000-0000-0000-000000000001'), (error) => error.name === 'TimeoutError');
    await assert.rejects(client.createMany(['a']), (error) => error instanceof TaskTrailError && error.status === 0);
    assert.ok(Date.now() - started < 10000, 'a silent server held the calls past their timeout');
} finally {
    mute.close();
}

// Answers a stream's head and its snapshot, then goes silent without closing (a frozen proxy, say).
const task = {id: 1, task_id: '00000000-0000-0000-0000-000000000002', task_type: 't', status: 'running', progress: 0,
    params: null, result: null, error: null, retry_count: 0, created_at: 'x', updated_at: 'x', started_at: 'x',
    completed_at: null, version: 2};
const frozen = await serve((socket) => {
    socket.once('data', () => socket.write(
        'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n' +
        (() => { const frame = `event: snapshot\ndata: ${JSON.stringify(task)}\n\n`; return `${Buffer.byteLength(frame).toString(16)}\r\n${frame}\r\n`; })(),
    ));
});
try {
    const client = new TaskManager(frozen.url, {timeout: 400});
    const watch = client.watchTask(task.task_id, () => {});
    const deadline = Date.now() + 8000;
    while (frozen.connections() < 3) {
        assert.ok(Date.now() < deadline, `a silent stream was not given up (connections: ${frozen.connections()})`);
        await new Promise((resolve) => setTimeout(resolve, 50));
    }
    watch.close();
    assert.equal(await watch.done, undefined);
} finally {
    frozen.close();
}
console.log('silent client: ok');
