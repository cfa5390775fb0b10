-- Which read-model versions an event's own statement wrote, when the statement
-- does not say: a release before migration 0014 names no `projected` and
-- writes the read models through the views of the log's schema. Migration
-- 0014 gave such events 'stats:1,tasks:1', but the views follow the newest
-- live version (projection_views): once a newer release had built tasks
-- version 2, those writes went to version 2 while their events said version 1,
-- so no follower ever applied them to version 1 and a release still serving
-- it answered with stale rows for ever (audit). The default now names the
-- versions the views show when the row is inserted. A release that names
-- `projected` (every one since 0014) never evaluates it. A VOLATILE function
-- reads the registry afresh, after the statement has locked the views it
-- writes through: a version going live swaps the views under a lock that
-- waits for that statement.
CREATE FUNCTION projected_through_views() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT string_agg(name || ':' || newest, ',' ORDER BY name)
    FROM (SELECT name, max(version) AS newest FROM projection_versions WHERE state = 'live' GROUP BY name) live
$$;

ALTER TABLE events ALTER COLUMN projected SET DEFAULT projected_through_views();
