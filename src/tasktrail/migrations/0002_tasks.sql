-- The tasks read model: one row per live task, kept by the projector in the
-- transaction that appends each event. Deleted tasks have no row here.
CREATE TABLE tasks (
    id           bigint           PRIMARY KEY,  -- position of the TaskCreated event
    task_id      uuid             NOT NULL UNIQUE,
    task_type    text             NOT NULL,
    status       text             NOT NULL,
    progress     double precision NOT NULL,
    params       jsonb,
    result       jsonb,
    error        text,
    retry_count  integer          NOT NULL,
    created_at   timestamptz      NOT NULL,
    updated_at   timestamptz      NOT NULL,
    started_at   timestamptz,
    completed_at timestamptz,
    version      integer          NOT NULL
) WITH (fillfactor = 80);  -- room on the page for HOT progress updates

CREATE INDEX tasks_status_id ON tasks (status, id);
CREATE INDEX tasks_type_id ON tasks (task_type, id);
CREATE INDEX tasks_completed_at ON tasks (completed_at) WHERE completed_at IS NOT NULL;

-- Stats counters, sharded: each connection adds its deltas to its own shard
-- (backend pid modulo the shard count), so concurrent writers do not queue on
-- one row per status. Stats sum at most types x statuses x shards rows.
CREATE TABLE task_counts (
    task_type text     NOT NULL,
    status    text     NOT NULL,
    shard     smallint NOT NULL,
    n         bigint   NOT NULL,
    PRIMARY KEY (task_type, status, shard)
);
