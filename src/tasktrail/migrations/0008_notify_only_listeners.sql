-- NOTIFY serialises committing writers: PostgreSQL holds a database-wide lock
-- from a notifying transaction's pre-commit until after its commit record is
-- flushed, so notifying writers cannot share a WAL flush (pgbench: 2,800
-- creates/s notifying, 6,700 without). So a write notifies only while some
-- process listens: each listener registers its backend here while it has open
-- streams (live.Listener), and removes itself when the last one closes.
-- A row left by a listener that died only costs notifications; the next
-- listener to register clears it. A write already past this check when a
-- listener registers is picked up by that listener's polling.
CREATE UNLOGGED TABLE live_listeners (
    pid   integer     PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM live_listeners) THEN
        PERFORM pg_notify('tasktrail_events', '');
    END IF;
    RETURN NULL;
END
$$;
