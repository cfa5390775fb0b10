-- The dashboard's session-signing secret (see http/sessions.py): one row, made
-- by the first server process that needs it, so that every process of every
-- `--workers` run and every restart signs and checks session cookies with the
-- same secret. TASKTRAIL_SESSION_SECRET, when set, is used instead.
CREATE TABLE session_secret (
    only_row   boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    secret     bytea       NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
