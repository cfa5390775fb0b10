-- The projection registry: which version of each read model is live, and how
-- far into the log it was built. The read models named here are kept inline,
-- in each append's transaction, so from `position` on they follow every
-- committed event; `tasktrail projections rebuild` replaces a read model with
-- a fresh one built from the whole log and records the new version here, in
-- the transaction that swaps the tables.
CREATE TABLE projections (
    name       text        PRIMARY KEY,
    version    integer     NOT NULL CHECK (version > 0),
    -- The log's last position when this version went live (all appends are
    -- blocked while a rebuild swaps, so nothing before it is missing).
    position   bigint      NOT NULL,
    rebuilt_at timestamptz  -- NULL: made by migrations, never rebuilt
);

-- 0002 made version 1 of both read models.
INSERT INTO projections (name, version, position)
SELECT name, 1, coalesce((SELECT max(position) FROM events), 0)
FROM (VALUES ('tasks'), ('stats')) AS made (name);
