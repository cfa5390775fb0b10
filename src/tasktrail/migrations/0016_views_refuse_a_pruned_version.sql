-- The views of migration 0014 are found by unqualified names (`tasks`) on any
-- search_path that reaches the log's schema. A server process whose own
-- version was pruned under it (its connections had all dropped, so nothing
-- showed it was running) found its schema gone and fell through to them: it
-- served the newest version's rows, and wrote rows of its own shape into that
-- version's tables. Now a session whose search_path names a read-model
-- version (rm_<name>_v<n>, as every server process's does) is refused by the
-- views, with the error a missing table gives (42P01), which such a process
-- answers with 503 (and logs that it must restart; a process of a release
-- before this one answers its reads with 500); psql and scripts, whose
-- search_path names none, read and write through the views as before.
CREATE FUNCTION projection_view_guard() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF current_setting('search_path') ~ '\mrm_[a-z0-9_]+_v[0-9]+\M' THEN
        RAISE EXCEPTION 'a read-model version on this session''s search_path (%) has no tables: it was pruned, or is not built yet',
            current_setting('search_path')
            USING ERRCODE = 'undefined_table';
    END IF;
    RETURN true;
END
$$;

-- As in 0014, with the guard: in the WHERE for reads, updates and deletes,
-- and through the check option for inserts.
CREATE OR REPLACE FUNCTION projection_views(read_model text) RETURNS void
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
        EXECUTE format(
            'CREATE VIEW %I.%I AS SELECT * FROM %I.%I WHERE %I.projection_view_guard() WITH LOCAL CHECK OPTION',
            home, t.tablename, source, t.tablename, home
        );
    END LOOP;
END
$$;

SELECT projection_views(name) FROM (SELECT DISTINCT name FROM projection_versions WHERE state = 'live') live;
