-- Wake live readers when events commit: every server process LISTENs on
-- tasktrail_events and reads the feed when woken. Statement-level, so a write
-- pays one notification however many events it appends, and no extra round
-- trip: PostgreSQL sends it at commit, and never for a rolled-back write.
-- The payload is empty on purpose: the feed, not the notification, says what
-- is new, so a lost or merged notification loses nothing (readers also poll).
CREATE FUNCTION events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasktrail_events', '');
    RETURN NULL;
END
$$;

-- Not ENABLE ALWAYS: a bulk load under session_replication_role = replica
-- does not wake every reader per statement; their polling picks it up.
CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- The feed orders events by writing transaction (see eventstore.READ_FEED), so
-- a task's events must have rising transaction ids in version order, or a
-- reader would get version 8 before version 7. The write path keeps that by
-- itself: it reads version N committed, then appends N+1 in a new transaction,
-- whose id is newer. A transaction that took its id before version N-1
-- committed (one that retried inside an older transaction) is refused with
-- serialization_failure: retry in a new transaction.
CREATE FUNCTION events_in_transaction_order() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version > 1 AND EXISTS (
        SELECT FROM events
        WHERE stream_id = NEW.stream_id AND version = NEW.version - 1 AND transaction_id > NEW.transaction_id
    ) THEN
        RAISE EXCEPTION 'version % of stream % was written by a transaction newer than this one', NEW.version - 1, NEW.stream_id
            USING ERRCODE = 'serialization_failure', HINT = 'retry in a new transaction';
    END IF;
    RETURN NEW;
END
$$;

-- Not ENABLE ALWAYS either: a bulk load under session_replication_role =
-- replica (COPY of events written elsewhere) skips the per-row check.
CREATE TRIGGER events_in_transaction_order
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_in_transaction_order();
