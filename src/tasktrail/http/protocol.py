"""The HTTP/1.1 protocol `serve` runs: uvicorn's httptools one, with bounds on a request's head.

uvicorn's own keeps reading a request's line and headers for as long as a
client sends them, however many and however slowly (httptools sets no limit,
and uvicorn times out only idle keep-alive connections), so one connection
could make the server hold any amount of memory, and a few thousand slow ones
every file descriptor, before the app sees a byte. This one answers 431 once a
head passes MAX_HEAD_BYTES, and 408 when a connection's next head has not
arrived within the read timeout (TASKTRAIL_READ_TIMEOUT), and closes. It also
answers the parser's own refusals (a NUL or a bare CR in a header, a
Content-Length that is not a number or comes twice, Content-Length beside
chunked, a broken chunk size) as problem+json, like every other error, where
uvicorn answers plain text; a method it does not know (FOO, or get: methods
are case-sensitive) as a 400 that says so (RFC 9110 suggests 501, but no input
gets a 5xx from this service: SPEC §8);
and a request that asks to upgrade the connection as HTTP/1.1, body and all
(UpgradeIgnored). An answer given before the request's body has all arrived
closes the connection (_Cycle), and a stream with a request pipelined behind
it hears that its client left (BoundedHead.answering).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from time import perf_counter
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from tasktrail.http.problems import PROBLEM, problem_body
from tasktrail.http.wellformed import MAX_HEADER_BYTES, MAX_URL_BYTES, read_timeout

# The app refuses longer URLs (414) and larger headers (431) itself, precisely;
# this bound, with room to spare above both, only caps what a connection can hold.
MAX_HEAD_BYTES = 2 * (MAX_URL_BYTES + MAX_HEADER_BYTES)


# After a refusal the client may still be sending: closing at once would reset
# the connection, and a reset can destroy the answer before the client reads
# it. So the answer goes out, the sending side closes, and whatever still
# arrives is dropped for this long before the connection closes.
LINGER_SECONDS = 2.0

# On a graceful stop (SIGTERM, Ctrl-C) uvicorn closed each idle keep-alive
# connection at once: a request the client had just sent (in the socket's
# buffer, or on its way) was reset unanswered, a create the client could not
# know the fate of. An idle connection is read this much longer: what arrives
# is answered (with Connection: close), then it closes.
SHUTDOWN_GRACE_SECONDS = 1.0

# httptools.parse_url keeps offsets in 16 bits: a longer URL is no URL to it.
PARSED_URL_BYTES = 65_535

# The headers that say where a request's body ends.
_FRAMING = (b"content-length", b"transfer-encoding")

# How the app counts and logs a request this protocol refuses before the app sees it (set by
# http/app.py, which counts and logs every other): (method, status, seconds, client) -> its request id.
observe: Callable[[str, int, float, tuple[str, int] | None], bytes] | None = None


class _Parser:
    """httptools' parser, noting when it refused a request for its method (uvicorn sees only a parse error)."""

    def __init__(self, parser: httptools.HttpRequestParser, protocol: BoundedHead) -> None:
        self.parser, self.protocol = parser, protocol
        # uvicorn's calls, as they are: no wrapper on the way of every request.
        self.get_http_version, self.get_method = parser.get_http_version, parser.get_method
        self.should_keep_alive, self.should_upgrade = parser.should_keep_alive, parser.should_upgrade
        self.set_dangerous_leniencies = parser.set_dangerous_leniencies

    def feed_data(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol.upgrade_body is not None:
            protocol.upgrade_body.feed_data(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            protocol.unknown_method = True
            raise
        except httptools.HttpParserUpgrade as exc:  # an Upgrade this server ignores: see UpgradeIgnored
            if protocol.upgrade_body is None:
                protocol.refused = True  # no body: what follows is not read, and the connection closes
            else:
                protocol.upgrade_body.feed_data(data[exc.args[0] :])  # the request's body


class UpgradeIgnored:
    """The body of a request that asks to upgrade the connection (Upgrade: h2c, or websocket), read as HTTP/1.1.

    This server speaks HTTP/1.1 only, and RFC 9110 lets it ignore an Upgrade. But
    the parser takes what follows such a request's head as the new protocol's
    bytes and skips its body: the app got none (a POST from `curl --http2` was a
    422), and the connection answered nothing more. So a second parser reads
    the body, as the head described it (a Content-Length, or chunks), into the
    request; the connection closes after the answer, since its next bytes could
    be of any protocol.
    """

    def __init__(self, protocol: BoundedHead, framing: bytes) -> None:
        self.protocol = protocol
        self.done = False
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")

    def feed_data(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.protocol.send_400_response("a broken body")

    def on_body(self, body: bytes) -> None:
        cycle = self.protocol.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.body += body
            cycle.message_event.set()

    def on_message_complete(self) -> None:
        self.done = True
        protocol, cycle = self.protocol, self.protocol.cycle
        if protocol.upgrade_body is not self:
            return  # an empty body, ended with the head: the request's own parser ends the message
        protocol.upgrade_body = None
        protocol.refused = True  # whatever follows is not read: the connection closes after the answer
        if cycle is not None:
            cycle.more_body = False
            cycle.message_event.set()


class BoundedHead(HttpToolsProtocol):
    reading_head = False
    head_bytes = 0
    refused = False
    unknown_method = False
    url_too_long = False
    upgrade_body: UpgradeIgnored | None = None  # reading the body of a request whose Upgrade is ignored
    head_due: asyncio.TimerHandle | None = None
    began = 0.0  # when the request's first byte was parsed
    began_in_read = False  # the head being read began in the last read (which may hold earlier requests)
    stopping = False  # the server is stopping: answer what comes, then close
    # The request being answered: uvicorn tells only the newest request read that the connection was
    # lost, so one answered with others pipelined behind it (a stream, say) ran on until a ping failed
    # (~45 s). Those queued behind it never start once the connection is gone: this one needs telling.
    answering: RequestResponseCycle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parser = _Parser(self.parser, self)  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_due = self.loop.call_later(read_timeout(), self.head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_due is not None:
            self.head_due.cancel()
        answering = self.answering
        if answering is not None and answering is not self.cycle and not answering.response_complete:
            answering.disconnected = True
            answering.message_event.set()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading_head, self.head_bytes, self.began = True, 0, perf_counter()
        self.began_in_read = True
        if self.head_due is None:
            self.head_due = self.loop.call_later(read_timeout(), self.head_late)

    def on_headers_complete(self) -> None:
        if len(self.url) > PARSED_URL_BYTES:
            # httptools.parse_url, which uvicorn calls next, fails on it: a 400 that should be the app's 414.
            self.url_too_long = True
            raise ValueError("the URL is longer than httptools can parse")
        self.reading_head = False
        if self.head_due is not None:
            self.head_due.cancel()
            self.head_due = None
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.__class__ = _Cycle
        if self.cycle is not None and self.stopping:
            self.cycle.keep_alive = False
        if self.cycle is not None and self.parser.should_upgrade():  # not to a WebSocket: none is served
            self.cycle.keep_alive = False
            framing = [b"%s: %s" % header for header in self.headers if header[0] in _FRAMING]
            body = UpgradeIgnored(self, b"\r\n".join(framing)) if framing else None
            if body is not None and not body.done:  # not "Content-Length: 0"
                self.upgrade_body = body
        if self.cycle is not None and not self.cycle.keep_alive:
            # The cycle closes the connection once it has answered: perhaps before the body has all arrived.
            self.cycle.transport = _Closing(self)  # type: ignore[assignment]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self.answering = cycle
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        if self.upgrade_body is None:  # else the body is still to come, through UpgradeIgnored
            super().on_message_complete()

    def shutdown(self) -> None:
        """A graceful stop: an answer in progress closes after it; an idle connection after SHUTDOWN_GRACE_SECONDS.

        (A request that arrives meanwhile is answered first, and closes it.)
        """
        self.stopping = True
        if self.cycle is None or self.cycle.response_complete:
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None
            self.loop.call_later(SHUTDOWN_GRACE_SECONDS, self._close_if_idle)
        else:
            super().shutdown()

    def _close_if_idle(self) -> None:
        if self.transport.is_closing() or self.reading_head:
            return  # closed, or a request is arriving: its answer closes the connection
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()

    def head_late(self) -> None:
        if not self.transport.is_closing():
            self.refuse(408, f"the request's line and headers did not arrive within {read_timeout():g} s")

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self.began_in_read = False
        super().data_received(data)
        # Counted only while a head is still incomplete once the bytes are parsed: what arrived since it
        # began is all head. A head that began in this read follows earlier requests in it (pipelined): its
        # bytes so far are its URL and headers, not the whole read (a burst of small requests was a 431).
        if self.reading_head and not self.refused and not self.transport.is_closing():
            if self.began_in_read:
                self.head_bytes = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            else:
                self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("refused a request whose head passed %d bytes", MAX_HEAD_BYTES)
                self.refuse(431, f"the request's line and headers are larger than {MAX_HEAD_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        if self.url_too_long:
            self.refuse(414, f"the URL is longer than {MAX_URL_BYTES} bytes")
            return
        if self.unknown_method:
            self.refuse(
                400, "this service does not know the request's method (methods are case-sensitive: GET, not get)"
            )
            return
        self.refuse(
            400,
            "the request is not valid HTTP/1.1 (for example a NUL or a bare CR in a header, a Content-Length "
            "that is not a number or is given twice or beside chunked, or a broken chunk)",
        )

    def refuse(self, status: int, detail: str) -> None:
        request_id = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A request read before the broken bytes is still being answered: this answer replaces it
            # (and the app counts and logs it, as it ends).
            self.cycle.disconnected = True
        elif observe is not None and (self.reading_head or status != 408):  # a 408 for no request is none
            request_id = self._observe(status)
        body = problem_body(status, detail)
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        if request_id is not None:
            content += [b"x-request-id: ", request_id, b"\r\n"]
        content += [
            b"content-type: ", PROBLEM.encode(), b"\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]  # fmt: skip
        self.transport.write(b"".join(content))
        self.linger()

    def _observe(self, status: int) -> bytes:
        method = ""  # not read yet, or not a method the parser knows: counted as "other"
        if getattr(self, "url", b"") and not self.unknown_method:  # the URL follows the method: it was read
            with contextlib.suppress(httptools.HttpParserError, UnicodeDecodeError):
                method = self.parser.get_method().decode("ascii")
        seconds = perf_counter() - self.began if self.reading_head else 0.0
        assert observe is not None
        return observe(method, status, seconds, self.client)

    def linger(self) -> None:
        """Close after an answer given while the client may still be sending: see LINGER_SECONDS."""
        self.refused = True  # what still arrives is dropped
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()  # read (and drop) on: unread bytes at the close would reset it
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


class _Closing:
    """The connection's transport, as a cycle that closes it after its answer sees it.

    An answer given before the request's body has all arrived (a 413 for a body
    past the limit, say) is closed the way a refusal is: the answer goes out, and
    the connection lingers, dropping what still arrives, instead of being reset.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: BoundedHead) -> None:
        self.protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self.protocol.transport, name)

    def close(self) -> None:
        protocol = self.protocol
        if protocol.cycle is not None and protocol.cycle.more_body and not protocol.transport.is_closing():
            protocol.linger()
        else:
            protocol.transport.close()


class _Cycle(RequestResponseCycle):
    """uvicorn's request-response cycle, closing the connection after an answer given before the body has all come.

    uvicorn kept such a connection open, reading and dropping the rest of the
    body with no deadline (each byte put off its keep-alive timeout): one byte
    now and then held a connection for ever (a 401, 404 or 413 answered from the
    head alone), and a request sent after the answer was never read. Now the
    answer says `Connection: close`, and the connection lingers, then closes,
    as after a refusal.
    """

    __slots__ = ()

    async def send(self, message: Any) -> None:
        # Not by keep_alive: a graceful stop clears it mid-request, and uvicorn would then close at once.
        if self.more_body and not self.response_started and not isinstance(self.transport, _Closing):
            self.keep_alive = False
            self.transport = _Closing(self.transport.get_protocol())  # type: ignore[assignment]
        await super().send(message)
