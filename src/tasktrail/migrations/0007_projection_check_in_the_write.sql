-- A write is one statement (see writer.write), and the read-model version
-- check is a condition of that statement, so this form returns true (or
-- raises TT001, as projections_check(text[], integer[]) of 0006 does; that one
-- stays for processes still running the release before this one).
-- `expected` maps each read model the code writes to its version: {"tasks": 1, ...}.
CREATE FUNCTION projections_check(expected jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    mismatch record;
BEGIN
    SELECT code.key AS name, code.value::integer AS code_version, live.version AS live_version INTO mismatch
    FROM jsonb_each_text(expected) AS code
    LEFT JOIN projections live ON live.name = code.key
    WHERE live.version IS DISTINCT FROM code.value::integer
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the live % read model is version %, this code writes version %: run `tasktrail projections rebuild %`, or restart on the release that matches it',
            mismatch.name, coalesce(mismatch.live_version::text, 'none'), mismatch.code_version, mismatch.name
            USING ERRCODE = 'TT001';
    END IF;
    RETURN true;
END
$$;
