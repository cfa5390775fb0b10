-- The event log: the single source of truth. Append-only, enforced here.
CREATE TABLE events (
    position       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id      uuid        NOT NULL,
    version        integer     NOT NULL CHECK (version > 0),
    type           text        NOT NULL,
    data           jsonb       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}',
    occurred_at    timestamptz NOT NULL,
    -- The writing transaction, for a feed that never skips an event that
    -- commits after a later-numbered one (positions are handed out before
    -- commit, so position order is not commit order).
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- The optimistic-concurrency check: two writers of one version, one wins.
    UNIQUE (stream_id, version)
);

CREATE INDEX events_commit_order ON events (transaction_id, position);

CREATE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- Statement-level, so even a statement that matches no row is refused.
CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- ALWAYS: also under session_replication_role = replica.
ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only;
