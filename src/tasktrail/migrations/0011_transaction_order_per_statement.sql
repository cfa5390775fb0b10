-- The check of 0005 (a task's events must have rising transaction ids in
-- version order) once per statement instead of once per row: a batch appends
-- up to 1,000 events in one statement, and a row-level trigger ran a plpgsql
-- function, and a query, for each of them (a create too, only to find that
-- version 1 has nothing before it). Here one query per statement joins the
-- appended rows that have a predecessor to it. Rows of one statement share a
-- transaction id, so a batch that appends versions 3 and 4 of a task passes.
-- An AFTER trigger sees the same rows the BEFORE one did and its error aborts
-- the statement just the same: serialization_failure, retry in a new transaction.
CREATE FUNCTION events_in_transaction_order_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    late record;
BEGIN
    -- LIMIT 1 inside LATERAL keeps this a lookup along (stream_id, version) for each appended row
    -- whatever the planner makes of the row counts: the plan is cached for the session, and a hash
    -- join chosen for one large batch would scan the whole log for every single write after it.
    SELECT n.stream_id, n.version INTO late
    FROM appended_events n
    CROSS JOIN LATERAL (
        SELECT e.transaction_id FROM events e
        WHERE e.stream_id = n.stream_id AND e.version = n.version - 1
        LIMIT 1
    ) previous
    WHERE n.version > 1 AND previous.transaction_id > n.transaction_id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'version % of stream % was written by a transaction newer than this one', late.version - 1, late.stream_id
            USING ERRCODE = 'serialization_failure', HINT = 'retry in a new transaction';
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER events_in_transaction_order ON events;
DROP FUNCTION events_in_transaction_order();

-- Not ENABLE ALWAYS, as in 0005: a bulk load under session_replication_role = replica skips it.
CREATE TRIGGER events_in_transaction_order
    AFTER INSERT ON events
    REFERENCING NEW TABLE AS appended_events
    FOR EACH STATEMENT EXECUTE FUNCTION events_in_transaction_order_appended();
