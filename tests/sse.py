"""A reader of Server-Sent Events as the HTML standard parses them, for tests and benchmarks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, NamedTuple


class Message(NamedTuple):
    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        return json.loads(self.data)


class Comment(NamedTuple):
    text: str


class Parser:
    """Feed it lines; it answers a Message or Comment when one is complete."""

    def __init__(self) -> None:
        self.event, self.data, self.id = "", [], None  # type: tuple[str, list[str], str | None]

    def line(self, line: str) -> Message | Comment | None:
        if line.startswith(":"):
            return Comment(line[1:].strip())
        if not line:
            if not self.data:
                self.event = ""
                return None
            message = Message(self.event or "message", "\n".join(self.data), self.id)
            self.event, self.data, self.id = "", [], None
            return message
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        return None


def parse(lines: Iterable[str]) -> Iterator[Message | Comment]:
    parser = Parser()
    for line in lines:
        if (item := parser.line(line)) is not None:
            yield item


async def aparse(lines: AsyncIterable[str]) -> AsyncIterator[Message | Comment]:
    parser = Parser()
    async for line in lines:
        if (item := parser.line(line)) is not None:
            yield item


def messages(lines: Iterable[str], count: int | None = None) -> list[Message]:
    """The next `count` messages (all until the stream ends if None), skipping comments."""
    seen: list[Message] = []
    for item in parse(lines):
        if isinstance(item, Message):
            seen.append(item)
            if len(seen) == count:
                break
    return seen
