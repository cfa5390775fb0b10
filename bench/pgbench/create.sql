-- The SQL work of one tasktrail create (POST /tasks/), statement for statement:
-- reserve the log position (eventstore.RESERVE), then in one transaction the
-- event (eventstore.APPEND; its triggers: feed order check, NOTIFY), the
-- read-model row (projections/tasks.py INSERT), the sharded counter
-- (projections/stats.py ADD, shard = backend pid % 16) and the projection
-- version check (projections.CHECK). tasktrail sends the transaction as one
-- pipelined round trip; pgbench sends each statement and waits. Run with -M prepared.
SELECT nextval('events_position_seq') AS position, gen_random_uuid() AS stream_id
\gset
BEGIN;
INSERT INTO events (position, stream_id, version, type, data, metadata, occurred_at)
OVERRIDING SYSTEM VALUE
VALUES (:position, :stream_id, 1, 'TaskCreated',
        '{"task_type":"bench","params":{"file_path":"/data/bench.pdf","n":1}}',
        '{"request_id":"0123456789abcdef0123456789abcdef"}', now());
INSERT INTO tasks (id, task_id, task_type, status, progress, params, result, error, retry_count,
                   created_at, updated_at, started_at, completed_at, version)
VALUES (:position, :stream_id, 'bench', 'pending', 0, '{"file_path":"/data/bench.pdf","n":1}', NULL,
        NULL, 0, now(), now(), NULL, NULL, 1);
INSERT INTO task_counts AS c (task_type, status, shard, n)
SELECT task_type, status, pg_backend_pid() % 16, n
FROM unnest(ARRAY['bench']::text[], ARRAY['pending']::text[], ARRAY[1]::bigint[]) AS d(task_type, status, n)
ON CONFLICT (task_type, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
SELECT projections_check(ARRAY['tasks', 'stats']::text[], ARRAY[1, 1]::integer[]);
COMMIT;
