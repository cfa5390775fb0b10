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

CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- Not ENABLE ALWAYS: a bulk load under session_replication_role = replica
-- should not wake every reader per statement; their polling picks it up.
