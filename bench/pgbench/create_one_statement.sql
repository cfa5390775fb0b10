-- The same rows as create.sql, written by one statement in one round trip
-- (data-modifying CTEs, autocommit): what a create could cost if tasktrail
-- sent its three inserts together. Informational; the target uses create.sql.
WITH e AS (
    INSERT INTO events (stream_id, version, type, data, metadata, occurred_at)
    VALUES (gen_random_uuid(), 1, 'TaskCreated',
            '{"task_type":"bench","params":{"file_path":"/data/bench.pdf","n":1}}',
            '{"request_id":"0123456789abcdef0123456789abcdef"}', now())
    RETURNING position, stream_id, occurred_at
), t AS (
    INSERT INTO tasks (id, task_id, task_type, status, progress, params, result, error, retry_count,
                       created_at, updated_at, started_at, completed_at, version)
    SELECT position, stream_id, 'bench', 'pending', 0, '{"file_path":"/data/bench.pdf","n":1}', NULL,
           NULL, 0, occurred_at, occurred_at, NULL, NULL, 1
    FROM e
)
INSERT INTO task_counts AS c (task_type, status, shard, n)
SELECT task_type, status, pg_backend_pid() % 16, n
FROM unnest(ARRAY['bench']::text[], ARRAY['pending']::text[], ARRAY[1]::bigint[]) AS d(task_type, status, n)
ON CONFLICT (task_type, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
