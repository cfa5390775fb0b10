"""A TCP proxy on 127.0.0.1 in front of a real server, that breaks chosen connections the way a network does.

Per connection (numbered from 0 in the order they are accepted) a plan says
what to do to the server's answer:

- `Relay()`: pass everything both ways.
- `DropAnswer()`: pass the request on, wait until the server has begun to
  answer (so it has done the work), then close the client's connection
  without passing a byte of the answer on: the client never learns the outcome.
- `CutAfter(n)`: pass the answer on up to the end of its n-th blank line
  (the n-th Server-Sent Events block; `retry:` counts as one), then close.

`cutting_database` is one in front of PostgreSQL, for the service's own connections.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg.conninfo


@dataclass(frozen=True)
class Relay:
    pass


@dataclass(frozen=True)
class DropAnswer:
    pass


@dataclass(frozen=True)
class CutAfter:
    blocks: int


Plan = Relay | DropAnswer | CutAfter


class Proxy:
    def __init__(self, target: str, plan: Callable[[int], Plan]) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self.target = (host, int(port))
        self.plan = plan
        self.connections = 0
        self.dropped: list[int] = []  # connections closed on purpose, by number
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _shut(self._listener)  # shutdown() wakes the thread blocked in accept(); close() alone would not
        with self._lock:
            for sock in self._sockets:
                _shut(sock)
        self._accepting.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                number = self.connections
                self.connections += 1
                upstream = socket.create_connection(self.target)
                self._sockets += [client, upstream]
            plan = self.plan(number)
            threading.Thread(target=self._pump, args=(client, upstream, None, number), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, plan, number), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, plan: Plan | None, number: int) -> None:
        """Copy source to sink; the answer's direction (plan given) follows the plan."""
        seen = b""
        try:
            while data := source.recv(65536):
                if isinstance(plan, DropAnswer):
                    self._drop(number, source, sink)
                    return
                if isinstance(plan, CutAfter):
                    seen += data
                    end = _end_of_block(seen, plan.blocks)
                    if end is not None:
                        sink.sendall(data[: len(data) - (len(seen) - end)])
                        self._drop(number, source, sink)
                        return
                sink.sendall(data)
        except OSError:
            pass
        _shut(sink)
        _shut(source)

    def _drop(self, number: int, *sockets: socket.socket) -> None:
        self.dropped.append(number)
        for sock in sockets:
            _shut(sock)


def _end_of_block(seen: bytes, blocks: int) -> int | None:
    """Where the n-th blank line of the body ends in what has been seen, if it has been."""
    body = seen.find(b"\r\n\r\n")
    if body < 0:
        return None
    at = body + 4
    for _ in range(blocks):
        found = seen.find(b"\n\n", at)
        if found < 0:
            return None
        at = found + 2
    return at


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@contextlib.contextmanager
def cutting_database(database_url: str, marker: bytes) -> Iterator[str]:
    """A TCP proxy to the database that passes on a message holding `marker` (a write's parameters), then
    closes both ends at PostgreSQL's first answer to it, unread: the write is made, its outcome never heard.
    Only the first such message is cut: a client that sends the write again is heard.
    (Threads, not the test's event loop: the app's start-up blocks that loop on the database.)"""
    parts = psycopg.conninfo.conninfo_to_dict(database_url)
    host, port = str(parts.get("host") or "127.0.0.1"), int(parts.get("port") or 5432)
    listener = socket.create_server(("127.0.0.1", 0))
    cut: list[bool] = []

    def connect() -> socket.socket:
        if host.startswith("/"):  # the embedded server's socket
            unix = socket.socket(socket.AF_UNIX)
            unix.connect(f"{host}/.s.PGSQL.{port}")
            return unix
        return socket.create_connection((host, port))

    def pump(source: socket.socket, sink: socket.socket, upstream: bool, armed: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not upstream and armed.is_set():
                    break
                sink.sendall(data)
                if upstream and marker in data and not cut:
                    cut.append(True)
                    armed.set()
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                server, armed = connect(), threading.Event()
                threading.Thread(target=pump, args=(client, server, True, armed), daemon=True).start()
                threading.Thread(target=pump, args=(server, client, False, armed), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1", port=listener.getsockname()[1])
    finally:
        listener.close()
