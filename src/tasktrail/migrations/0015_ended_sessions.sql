-- Dashboard sessions ended by signing out (see http/sessions.py): a session
-- cookie is signed and carries its own expiry, so signing out must also say, on
-- the server, that this session id is over, or a copy of the cookie would stay
-- valid until it expires. Rows are forgotten once the session would have expired.
CREATE TABLE ended_sessions (
    sid     text        PRIMARY KEY,
    expires timestamptz NOT NULL
);
CREATE INDEX ended_sessions_expires ON ended_sessions (expires);
