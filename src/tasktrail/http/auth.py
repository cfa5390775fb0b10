"""API keys: bearer tokens with a scope, kept only as SHA-256 hashes, checked before each handler (`middleware`).

Scopes nest: `admin` may do all `write` may, `write` all `read` may. GETs need
`read`, other methods `write` (OPTIONS none); a route asks for more with `opt={"scope": "admin"}`
or for none with `opt=PUBLIC`. With no keys configured there is no key check
(`tasktrail serve` allows that only on a loopback address), and `serve` has
the app answer only requests addressed to this machine by their Host header
(LOOPBACK_ONLY_ENV): a web page the operator opens could otherwise reach the
open service through a name of its own that resolves to 127.0.0.1 (DNS
rebinding). And it refuses a write another site's page can send without a
CORS preflight (a form's POST, or fetch's with no body or a form's type): a
POST /tasks/cleanup from any page the operator opens would otherwise delete
every finished task. Every other cross-origin write is preflighted, which CORS
grants to any page (the seed's front end): with keys, it needs one all the same.

Why a plain SHA-256 and not a slow password hash: a key is 256 random bits made
by `new_key`, so its hash cannot be reversed by guessing, however fast the hash;
a slow hash protects guessable passwords and would cost every request
milliseconds. A stolen key file therefore reveals names and scopes, never keys.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import ClientException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send

from tasktrail.http import sessions

SCOPES = ("read", "write", "admin")  # each includes the ones before it
PUBLIC = {"public": True}
# How the OpenAPI schema marks a route that needs a key (see http/openapi.py).
SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}]

NAME = "[A-Za-z0-9._-]{1,64}"
_ENTRY = re.compile(f"(?P<name>{NAME}):(?P<scope>read|write|admin):(?P<digest>[0-9a-f]{{64}})")
_BEARER = re.compile(r"bearer[ \t]+(?P<key>\S+)[ \t]*", re.IGNORECASE)
_REALM = 'Bearer realm="tasktrail"'
# Set by `serve` when it serves with no keys, on loopback: see the module's docstring.
LOOPBACK_ONLY_ENV = "TASKTRAIL_LOOPBACK_ONLY"
_HOST_PORT = re.compile(rb"(?P<host>\[[^\]]*\]|[^:]*)(?::[0-9]{1,5})?")


class Key(msgspec.Struct, frozen=True):
    name: str
    scope: str
    digest: bytes  # SHA-256 of the key itself

    def entry(self) -> str:
        """The line a keys file keeps for this key."""
        return f"{self.name}:{self.scope}:{self.digest.hex()}"


class BadKeys(Exception):
    """The configured keys cannot be read."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    """A fresh random key (256 bits), shown once and never stored."""
    return "tt_" + secrets.token_urlsafe(32)


def parse(text: str, source: str) -> list[Key]:
    """Entries `name:scope:sha256-hex`, separated by commas or white space; `#` starts a comment."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        for entry in line.split("#", 1)[0].replace(",", " ").split():
            match = _ENTRY.fullmatch(entry)
            if match is None:
                # Never echo the entry: someone may have pasted a key itself.
                raise BadKeys(f"{source}, line {number}: not an entry of the form name:scope:sha256-hex")
            keys.append(Key(match["name"], match["scope"], bytes.fromhex(match["digest"])))
    return distinct(keys, source)


def parse_file(path: Path) -> list[Key]:
    """The keys a file holds (as `parse`); OSError when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte order mark is not an entry
    except UnicodeDecodeError as exc:
        raise BadKeys(f"{path} is not UTF-8 text (byte {exc.start}): a keys file holds name:scope:sha256-hex") from None
    return parse(text, str(path))


def distinct(keys: list[Key], where: str) -> list[Key]:
    """The keys, unless a name or a key (its hash) appears twice: which entry counted would be left to order."""
    names = [key.name for key in keys]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise BadKeys(f"{where}: a key name appears twice: {', '.join(twice)}")
    if len({key.digest for key in keys}) != len(keys):
        raise BadKeys(f"{where}: a key (its hash) appears twice, under two names or scopes")
    return keys


def load(environ: Mapping[str, str] = os.environ) -> list[Key]:
    """The keys in TASKTRAIL_API_KEYS and in the file TASKTRAIL_API_KEYS_FILE names."""
    keys = parse(environ.get("TASKTRAIL_API_KEYS", ""), "TASKTRAIL_API_KEYS")
    if path := environ.get("TASKTRAIL_API_KEYS_FILE"):
        try:
            keys += parse_file(Path(path))
        except OSError as exc:
            raise BadKeys(f"cannot read the keys file {path}: {exc.strerror}") from None
        if not keys:  # keys asked for and none given is a mistake (the last one removed), not an open service
            raise BadKeys(
                f"{path} holds no key: add one (tasktrail keys add NAME --scope read|write|admin --file {path}),"
                " or serve without a keys file (open to this machine only)"
            )
    return distinct(keys, "across TASKTRAIL_API_KEYS and TASKTRAIL_API_KEYS_FILE")


def authenticate(keys: Sequence[Key], presented: str) -> Key | None:
    """The key whose hash matches, comparing with every key in constant time (no early exit)."""
    presented_digest = digest(presented)
    found = None
    for key in keys:
        if hmac.compare_digest(key.digest, presented_digest):
            found = key
    return found


def needed_scope(method: str, handler: BaseRouteHandler) -> str | None:
    # OPTIONS only lists a path's methods, and a browser's CORS preflight never carries a key.
    if handler.opt.get("public") or method == "OPTIONS":
        return None
    default = "read" if method in ("GET", "HEAD") else "write"
    return handler.opt.get("scope", default)


def middleware(keys: Sequence[Key], signer: sessions.Signer | None = None) -> list[Callable[[ASGIApp], ASGIApp]]:
    """The check that asks for a key with a large enough scope; none when no keys are configured.

    A request without an Authorization header may instead bring the dashboard's
    session cookie (see http/sessions.py), given the signer that checks it.

    A route middleware rather than a Litestar guard: Litestar hands each guard a
    copy of the route handler (copy.copy of an object with dozens of slots), which
    cost more than the check itself. It runs where the guard did, after routing
    and before the handler's parameters are read, on every route, and its
    refusals go through the route's own exception handlers, as the guard's did.
    """
    if not keys:
        return [_loopback_only] if loopback_only(keys) else []
    configured = tuple(keys)
    ranks = {scope: rank for rank, scope in enumerate(SCOPES)}

    def require_key(app: ASGIApp) -> ASGIApp:
        async def check(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "lifespan":
                await _check(scope, receive, send)
            await app(scope, receive, send)

        return check

    async def _check(scope: Scope, receive: Receive, send: Send) -> None:
        needed = needed_scope(scope.get("method", "GET"), scope["route_handler"])  # type: ignore[arg-type]
        if needed is None:
            return
        # The raw header, as connection.headers.get would find it (the first), without building every header
        # into a multidict first. Two that differ are a 400, as http/wellformed.py answers it, whichever is known.
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(set(given)) > 1:
            raise ClientException("give one Authorization header, not several that differ")
        header = given[0] if given else None
        if header is None and signer is not None:
            connection: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope, receive, send)
            if sessions.COOKIE in connection.cookies:
                key = await session_key(connection, configured, signer)
            else:
                key = bearer_key(configured, "")
        else:
            key = bearer_key(configured, "" if header is None else header.decode("latin-1"))
        state = scope["state"]  # the dict itself: connection.state wraps it anew on every access
        state["actor"] = key.name  # a refusal's log line says who was refused too
        if ranks[key.scope] < ranks[needed]:
            raise PermissionDeniedException(
                f"the API key {key.name!r} has scope {key.scope}; this route needs {needed}",
                headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{needed}"'},
            )
        state["scope"] = key.scope

    return [require_key]


@functools.lru_cache(maxsize=64)  # a client sends the same Host on every request
def loopback_host(header: bytes) -> bool:
    """Whether a Host header names this machine: localhost (or a name under it), or a loopback address."""
    match = _HOST_PORT.fullmatch(header)
    if match is None:
        return False
    host = match["host"].decode("latin-1").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") else host).is_loopback
    except ValueError:
        return False


def loopback_origin(origin: str) -> bool:
    """Whether a browser's Origin header is a page of this machine (`null`, a sandboxed or local file's, is not)."""
    scheme, separator, host = origin.partition("://")
    return bool(separator) and scheme.lower() in ("http", "https") and loopback_host(host.encode("latin-1"))


# What a page may send to another site without a CORS preflight (the Fetch standard's "simple" requests).
_UNPREFLIGHTED_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data", b"text/plain")


def _unpreflighted_write(scope: Scope) -> bool:
    """Whether a request is a write a browser sends cross-origin without asking first: a POST, with no body type
    or a form's. (PATCH, DELETE and a JSON body are asked first, in a preflight.)"""
    if scope["method"] != "POST":
        return False
    kind = next((value for name, value in scope["headers"] if name == b"content-type"), None)
    return kind is None or kind.split(b";", 1)[0].strip().lower() in _UNPREFLIGHTED_TYPES


FOREIGN_HOST = (
    "this service has no API keys and answers only requests addressed to this machine"
    " (Host: localhost or a loopback address); configure keys to serve it under other names"
)


def foreign_host(scope: Scope) -> bool:
    """Whether a request's (first) Host names another machine."""
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    return host is not None and not loopback_host(host)


def loopback_only(keys: Sequence[Key]) -> bool:
    """Whether this process serves with no keys, on loopback only (`serve` says so: see the module's docstring)."""
    return not keys and os.environ.get(LOOPBACK_ONLY_ENV) == "1"


def _loopback_only(app: ASGIApp) -> ASGIApp:
    async def check(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            host = origin = None
            for name, value in scope["headers"]:
                if name == b"host" and host is None:
                    host = value
                elif name == b"origin" and origin is None:
                    origin = value
            if host is not None and not loopback_host(host):
                raise PermissionDeniedException(FOREIGN_HOST)
            if origin is not None and _unpreflighted_write(scope) and not loopback_origin(origin.decode("latin-1")):
                raise PermissionDeniedException(
                    "this service has no API keys and takes a write that needs no CORS preflight (a form's) only"
                    " from pages of this machine (Origin: localhost or a loopback address); send it as JSON"
                )
        await app(scope, receive, send)

    return check


def bearer_key(configured: Sequence[Key], header: str) -> Key:
    match = _BEARER.fullmatch(header)
    if match is None:
        raise NotAuthorizedException(
            "this route needs an API key: send `Authorization: Bearer <key>`", headers={"WWW-Authenticate": _REALM}
        )
    key = authenticate(configured, match["key"])
    if key is None:
        raise NotAuthorizedException(
            "the API key is not one this service knows",
            headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
        )
    return key


_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


async def session_key(
    connection: ASGIConnection[Any, Any, Any, Any], configured: Sequence[Key], signer: sessions.Signer
) -> Key:
    """The key a valid session cookie signed in with; a write must also carry the session's CSRF token."""
    secret = await signer.secret(connection.app.state.pool)
    session = sessions.read(secret, connection.cookies[sessions.COOKIE])
    key = None if session is None else next((k for k in configured if k.name == session.key), None)
    if (
        session is None
        or key is None
        or sessions.fingerprint(key.digest) != session.fingerprint
        or await sessions.ended(connection.app.state.pool, session)
    ):
        raise NotAuthorizedException(
            "the dashboard session has expired or is no longer valid: sign in again at /ui/sign-in,"
            " or send `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": _REALM},
        )
    if connection.scope["method"] not in _SAFE and not sessions.csrf_matches(  # type: ignore[typeddict-item]
        secret, session, connection.headers.get(sessions.CSRF_HEADER)
    ):
        raise PermissionDeniedException(
            "a write authenticated by the dashboard's session cookie needs the session's X-CSRF-Token header"
            " (a page opened before the browser signed in again has an earlier session's: reload it)"
        )
    connection.state.session = session
    connection.state.csrf = sessions.csrf_token(secret, session)
    return key
