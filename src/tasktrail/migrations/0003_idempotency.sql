-- Idempotency keys of POST /tasks/: a repeat within 24 hours returns the task
-- the first request created. Kept in the database, so a restart forgets none.
CREATE TABLE idempotency_keys (
    key         text        PRIMARY KEY,
    fingerprint bytea       NOT NULL,  -- sha256 of the canonical request body
    task_id     uuid        NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
