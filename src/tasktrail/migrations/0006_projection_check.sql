-- Every write checks that the live read models are the versions its code
-- writes (see projections.project). As a function that raises, the check is
-- one more statement in the append's pipeline rather than a round trip whose
-- answer the writer must wait for. SQLSTATE TT001: a read model is outdated.
CREATE FUNCTION projections_check(names text[], versions integer[]) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    mismatch record;
BEGIN
    SELECT code.name, code.version AS code_version, live.version AS live_version INTO mismatch
    FROM unnest(names, versions) AS code (name, version)
    LEFT JOIN projections live ON live.name = code.name
    WHERE live.version IS DISTINCT FROM code.version
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the live % read model is version %, this code writes version %: run `tasktrail projections rebuild %`, or restart on the release that matches it',
            mismatch.name, coalesce(mismatch.live_version::text, 'none'), mismatch.code_version, mismatch.name
            USING ERRCODE = 'TT001';
    END IF;
END
$$;
