-- Versioned read models (see projections/versions.py and projections/follow.py).
--
-- Each read model version has its own schema, rm_<name>_v<version>, holding
-- its tables under their usual names; a server process puts the schemas of
-- its versions first on its search_path, so every query says `tasks` and
-- reads its own shape. The registry says which versions exist, in what state,
-- and up to which snapshot of the log each has applied every event.
CREATE TABLE projection_versions (
    name       text        NOT NULL,
    version    integer     NOT NULL CHECK (version > 0),
    -- building: a rebuild is filling rm_<name>_v<version>_new; live: the
    -- schema is complete and followed; retired: pruned, the schema is gone.
    state      text        NOT NULL CHECK (state IN ('building', 'live', 'retired')),
    -- Live only: every event visible in this snapshot is in the tables (by the
    -- writer's own statement, or applied by a follower since).
    checkpoint pg_snapshot,
    since      timestamptz NOT NULL DEFAULT now(),  -- when it entered its state
    PRIMARY KEY (name, version),
    CHECK ((state = 'live') = (checkpoint IS NOT NULL))
);

-- Which read-model versions the event's own statement wrote ("stats:1,tasks:2"):
-- a follower applies to its version exactly the events that name another.
-- Releases before this one wrote version 1 of both and do not name the column,
-- so that is the default; an append with no read model (eventstore.append) is NULL.
ALTER TABLE events ADD COLUMN projected text DEFAULT 'stats:1,tasks:1';

-- Views under the tables' own names, in the log's schema, of the newest live
-- version of a read model: for whoever connects without a version's
-- search_path (psql, scripts, the release before this one). Server processes
-- never use them: their search_path finds their own version's tables first.
-- Called whenever a version goes live or is pruned (the views of a dropped
-- schema go with it); simple views, so they take writes too.
CREATE FUNCTION projection_views(read_model text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    home   text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE c.oid = 'events'::regclass);
    newest integer := (SELECT max(version) FROM projection_versions WHERE name = read_model AND state = 'live');
    source text := format('rm_%s_v%s', read_model, newest);
    t      record;
BEGIN
    FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = source ORDER BY tablename LOOP
        EXECUTE format('DROP VIEW IF EXISTS %I.%I', home, t.tablename);
        EXECUTE format('CREATE VIEW %I.%I AS SELECT * FROM %I.%I', home, t.tablename, source, t.tablename);
    END LOOP;
END
$$;

-- A database made before this migration has version 1's tables in the
-- default schema: move them into their version's schema and register them
-- live from now (whatever is committed now is in them: the release before
-- this one writes them in each append's statement). Processes of that release
-- keep writing them, through the views, until they stop.
DO $$
BEGIN
    IF to_regclass('tasks') IS NOT NULL AND to_regclass('task_counts') IS NOT NULL THEN
        CREATE SCHEMA rm_tasks_v1;
        ALTER TABLE tasks SET SCHEMA rm_tasks_v1;
        CREATE SCHEMA rm_stats_v1;
        ALTER TABLE task_counts SET SCHEMA rm_stats_v1;
        INSERT INTO projection_versions (name, version, state, checkpoint)
        VALUES ('tasks', 1, 'live', pg_current_snapshot()), ('stats', 1, 'live', pg_current_snapshot());
        PERFORM projection_views('tasks'), projection_views('stats');
    END IF;
END
$$;
