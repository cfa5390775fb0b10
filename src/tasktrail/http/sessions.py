"""Dashboard sessions: an API key exchanged once for a signed, expiring cookie, and its CSRF token.

A browser's EventSource cannot send an Authorization header, so the dashboard
signs in with a key once (a form POST) and gets a cookie instead. The cookie
holds no key: it names the key, carries a fingerprint of the key's hash (a
key replaced under the same name ends its sessions), the expiry and a random
session id, signed with HMAC-SHA256. It is `HttpOnly` (no script reads it),
`SameSite=Strict` (no other site's page sends it) and `Secure` over https.
Signing out records the session id as ended (migration 0015), so that a copy
of the cookie is refused too, not only the browser's own, which is cleared.

SameSite is not all of CSRF's answer (an older browser, a sibling subdomain),
so a write that a cookie authenticates must also carry the session's CSRF
token in the `X-CSRF-Token` header: a value derived from the session id that
the page holds and a cross-site form cannot send (a custom header needs a CORS
preflight, which this service never grants with credentials).

The signing secret is TASKTRAIL_SESSION_SECRET when set; otherwise 32 random
bytes that the first process to need them stores in the database (migration
0012), so every worker and every restart agrees on it. Rotating it (set the
variable, or delete the row) signs every session out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from tasktrail import db

COOKIE = "tasktrail_session"
CSRF_HEADER = "x-csrf-token"
LIFETIME = 12 * 3600  # seconds: a working day, then sign in again
SECRET_ENV = "TASKTRAIL_SESSION_SECRET"  # noqa: S105 -- the variable's name, not a secret
MIN_SECRET_CHARS = 32


class BadSecret(ValueError):
    """TASKTRAIL_SESSION_SECRET is too short to sign with."""


class Session(msgspec.Struct, frozen=True, array_like=True):
    """What a cookie says: which key signed in, a fingerprint of it, until when, and a random id."""

    key: str
    fingerprint: str
    expires: int
    sid: str


_decode = msgspec.json.Decoder(Session).decode


def fingerprint(digest: bytes) -> str:
    """A short tag of a key's hash: a new key under an old name does not match it."""
    return hashlib.sha256(b"tasktrail-session-key:" + digest).hexdigest()[:16]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.digest(secret, payload.encode(), "sha256"))


def issue(secret: bytes, key_name: str, key_digest: bytes, *, now: float | None = None) -> tuple[str, Session]:
    """A new session for a key: the cookie's value and what it says."""
    moment = int(time.time() if now is None else now)
    session = Session(key_name, fingerprint(key_digest), moment + LIFETIME, secrets.token_urlsafe(16))
    payload = _b64(msgspec.json.encode(session))
    return f"{payload}.{_sign(secret, payload)}", session


def read(secret: bytes, value: str, *, now: float | None = None) -> Session | None:
    """The session a cookie holds if its signature is ours and it has not expired; else None."""
    payload, _, signature = value.partition(".")
    if not payload or len(value) > 512 or not _same(_sign(secret, payload), signature):
        return None
    try:
        session = _decode(_unb64(payload))
    except (ValueError, msgspec.DecodeError):
        return None
    return session if session.expires > (time.time() if now is None else now) else None


def csrf_token(secret: bytes, session: Session) -> str:
    """The session's CSRF token: the page sends it back in X-CSRF-Token on every write."""
    return _sign(secret, f"csrf:{session.sid}")


def csrf_matches(secret: bytes, session: Session, presented: str | None) -> bool:
    return presented is not None and _same(csrf_token(secret, session), presented)


def _same(ours: str, presented: str) -> bool:
    """A constant-time comparison with what a request brought, which may be any text.

    hmac.compare_digest takes str only when both are ASCII, and raises otherwise (a
    500): a cookie or header is decoded as latin-1, a form field as UTF-8.
    """
    return hmac.compare_digest(ours.encode(), presented.encode("utf-8", "surrogatepass"))


def secret_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> bytes | None:
    """The signing secret TASKTRAIL_SESSION_SECRET gives, or None when unset."""
    value = environ.get(SECRET_ENV)
    if not value:
        return None
    if len(value) < MIN_SECRET_CHARS:
        raise BadSecret(f"{SECRET_ENV} must be at least {MIN_SECRET_CHARS} characters (e.g. `openssl rand -hex 32`)")
    return hashlib.sha256(value.encode()).digest()


# The first process to need a secret makes one; whichever insert wins, every
# process then reads the same row (a separate statement, so it sees the winner's).
MAKE_SECRET = "INSERT INTO session_secret (secret) VALUES (%(secret)s) ON CONFLICT DO NOTHING"  # noqa: S105 -- SQL
READ_SECRET = "SELECT secret FROM session_secret"  # noqa: S105 -- SQL


async def stored_secret(conn: psycopg.AsyncConnection) -> bytes:
    """The secret kept in the database, made on first use (or after the row was deleted)."""
    row = await (await conn.execute(READ_SECRET)).fetchone()
    if row is None:
        await conn.execute(MAKE_SECRET, {"secret": secrets.token_bytes(32)})
        row = await (await conn.execute(READ_SECRET)).fetchone()
        assert row is not None
    return bytes(row[0])


# A process reads the stored secret again this often: deleting the row signs everyone out within it, and
# every process then signs with the one new secret (a secret read once was kept until a restart: sessions
# outlived the deletion, and processes started since refused the others' cookies).
SECRET_READ_EVERY = 5.0


# Signing out ends the session id for good (until the cookie would have expired anyway).
END_SESSION = """
WITH gone AS (DELETE FROM ended_sessions WHERE expires < now())
INSERT INTO ended_sessions (sid, expires) VALUES (%(sid)s, to_timestamp(%(expires)s)) ON CONFLICT DO NOTHING
"""
IS_ENDED = "SELECT EXISTS (SELECT FROM ended_sessions WHERE sid = %(sid)s)"


async def end(pool: AsyncConnectionPool, session: Session) -> None:
    """Sign the session out on the server: its cookie, or any copy of it, is refused from now on."""
    async with db.Borrowed(pool) as conn:  # the primary's pool: a write
        await conn.execute(END_SESSION, {"sid": session.sid, "expires": session.expires})


async def ended(pool: AsyncConnectionPool, session: Session) -> bool:
    """Whether the session was signed out (read on the primary: a replica may not have the sign-out yet)."""
    async with db.Borrowed(pool) as conn:
        cur = await conn.execute(IS_ENDED, {"sid": session.sid})
        row = await cur.fetchone()
    return bool(row and row[0])


class Signer:
    """The process's signing secret: from the environment, else loaded from the database on first use."""

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret
        self._stored = secret is None  # kept in the database: read again every SECRET_READ_EVERY
        self._read_at = 0.0

    async def secret(self, pool: AsyncConnectionPool) -> bytes:
        if self._stored and (self._secret is None or time.monotonic() - self._read_at > SECRET_READ_EVERY):
            # The primary's pool, never a replica's: a first use writes the row.
            async with db.Borrowed(pool) as conn:
                self._secret = await stored_secret(conn)
            self._read_at = time.monotonic()
        assert self._secret is not None
        return self._secret
