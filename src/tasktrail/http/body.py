"""Request bodies: strict decoding into commands, and the limits on JSON values."""

from __future__ import annotations

import codecs
import re
import typing
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Generic, TypeVar

import msgspec
from litestar.dto import AbstractDTO
from litestar.typing import FieldDefinition

T = TypeVar("T")

MAX_BODY_BYTES = 1024 * 1024
MAX_JSON_BYTES = 64 * 1024  # each of params and result, encoded
MAX_JSON_DEPTH = 32


class MalformedBody(Exception):
    """The body is not JSON at all (400)."""


class InvalidInput(Exception):
    """Well-formed input that breaks a rule (422); `errors` names the fields."""

    def __init__(self, detail: str, errors: list[dict[str, str]]) -> None:
        super().__init__(detail)
        self.errors = errors


def invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", [{"field": field, "message": message}])


def refused(errors: list[tuple[str, str]]) -> InvalidInput:
    """One 422 naming every (field, message), the first in its detail."""
    (field, message), more = errors[0], len(errors) - 1
    detail = f"{field}: {message}" + (f" (and {more} more: see errors)" if more else "")
    return InvalidInput(detail, [{"field": f, "message": m} for f, m in errors])


class Faults:
    """The 422s of several checks (a batch's items), refused together: every field named, not only the first."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def check(self, run: Callable[..., T], *args: Any) -> T | None:
        try:
            return run(*args)
        except InvalidInput as fault:
            self.errors += ((error["field"], error["message"]) for error in fault.errors)
            return None

    def refuse(self) -> None:
        if self.errors:
            raise refused(self.errors)


_MISSING = re.compile(r"Object missing required field `(.+)`")
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>.*)`)?$", re.DOTALL)


def decode(body: bytes, type_: type[T]) -> T:
    """Decode a JSON body strictly ("50" is not a number): 400 unless it is JSON, then 422 unless it is a T."""
    if not body:  # whitespace alone is sent, and not JSON: a 400 below
        raise InvalidInput("the request needs a JSON body", [{"field": "body", "message": "required"}])
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        # The decoder stops at the first field it refuses, perhaps before the body stops being JSON (cut off,
        # or with more after it): that is a 400 all the same. Else the answer names every field refused.
        errors = [_field_error(exc, "")]
        try:
            document = msgspec.json.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as not_json:
            # JSON all the same, a number no value can hold (1e400, an integer of over 4,300 digits): a 422.
            if not str(not_json).startswith(("Number out of range", "Integer value out of range")):
                raise _malformed(body, not_json) from exc
        except RecursionError:
            raise invalid("body", f"nested deeper than {MAX_JSON_DEPTH} levels") from exc
        else:
            errors += (error for error in _every_error(document, type_, "") if error not in errors)
        raise refused(errors) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _malformed(body, exc) from exc
    except RecursionError as exc:
        raise invalid("body", f"nested deeper than {MAX_JSON_DEPTH} levels") from exc


def _malformed(body: bytes, exc: Exception) -> MalformedBody:
    """Why a body is not JSON (400), as the decoder said."""
    if isinstance(exc, UnicodeDecodeError):
        # msgspec decodes a string's bytes only when it builds the string, and raises this, not a DecodeError.
        return MalformedBody(f"the body is not UTF-8 text (byte {exc.start}): JSON must be sent as UTF-8")
    if body.startswith(codecs.BOM_UTF8):
        return MalformedBody("the body starts with a byte order mark: send JSON as UTF-8 without one")
    if str(exc) == "Input data was truncated" and _HIGH_SURROGATE.search(body):
        # What msgspec says of a lone high surrogate, as if the body had been cut short.
        return MalformedBody(
            "the body is not valid JSON: a \\uD800-\\uDBFF escape not followed by its low surrogate names no character"
        )
    return MalformedBody(f"the body is not valid JSON: {exc}")


# What a refused pattern means, for the patterns the API has (else the validator would quote the regex).
_PATTERN = re.compile(r"Expected `str` matching regex '(.*)'", re.DOTALL)
_PATTERNS = {
    r"^[^\\x00]*$": "must not contain NUL (\\u0000)",  # as the validator quotes the pattern, escaped again
    r"^[^\\x00]+$": "must not contain NUL (\\u0000)",
    "^[0-9]{1,18}-[0-9]{1,18}$": "not a feed cursor: take next_cursor (or an event's cursor) as it was given",
}


def readable(message: str) -> str:
    """A validator's message with a regex it quotes put in words: a value "of the wrong form" at worst.

    And `if_version`'s type (int | float, so that 3.0 is taken) said as the schema says it, an integer.
    """
    if message.startswith("Expected `int | float | null`"):
        return "Expected `integer | null`" + message.removeprefix("Expected `int | float | null`")
    if (match := _PATTERN.fullmatch(message)) is None:
        return message
    if (said := _PATTERNS.get(match[1])) is not None:
        return said
    if match[1].startswith("^aWQ6"):  # tasks.CURSOR
        return "not a list cursor: take it from a Link header as it was given"
    return "has the wrong form" if len(match[1]) > 40 else message


def _field_error(exc: msgspec.ValidationError, at: str) -> tuple[str, str]:
    """The field a ValidationError names (under `at`), and its message."""
    match = _AT.match(str(exc))
    assert match is not None
    # msgspec says `[...]` for a key of a mapping, whatever the key: the field is named down to the mapping.
    path = f"{at}{match['path'] or ''}".partition("[...]")[0].lstrip(".")
    missing = _MISSING.match(match["message"])
    if missing:
        path = f"{path}.{missing[1]}".lstrip(".")
    return path or "body", readable(match["message"])


def _every_error(value: Any, type_: Any, at: str) -> list[tuple[str, str]]:
    """Each field of a decoded body that `type_` refuses, field by field (and item by item in lists of objects)."""
    if not (isinstance(type_, type) and issubclass(type_, msgspec.Struct)):
        return []
    if not isinstance(value, dict):  # e.g. a batch's item that is null, or a string: refused whole
        try:
            msgspec.convert(value, type=type_)
        except msgspec.ValidationError as exc:
            return [_field_error(exc, at)]
        return []
    errors = []
    for field in msgspec.structs.fields(type_):
        name = field.encode_name
        if name not in value:
            if field.required:
                errors.append((f"{at}.{name}".lstrip("."), f"Object missing required field `{name}`"))
            continue
        try:
            msgspec.convert(value[name], type=field.type)
        except msgspec.ValidationError as exc:
            items = _items_of(field.type)
            found = []
            if items is not None and isinstance(value[name], list):
                for i, item in enumerate(value[name]):
                    found += _every_error(item, items, f"{at}.{name}[{i}]")
            errors += found or [_field_error(exc, f"{at}.{name}")]
    return errors


def _items_of(type_: Any) -> Any:
    """T of list[T] (or of Annotated[list[T], ...]), else None."""
    if typing.get_origin(type_) is typing.Annotated:
        type_ = typing.get_args(type_)[0]
    return typing.get_args(type_)[0] if typing.get_origin(type_) is list else None


def check_json(field: str, value: Any) -> None:
    """Refuse a params/result value PostgreSQL cannot store or we will not keep; make its numbers what it stores.

    PostgreSQL's JSON numbers are decimals: a -0.0 is stored, and read back, as
    0.0, and a float JSON writes with a positive exponent (1e16, 1.5e300: every
    one from 1e16 up) as the whole number its digits say (10000000000000000),
    which reads back as an integer. So they are made those here (in place), for
    the answer to a write to show what is stored, and for a repeat of the same
    write to find the same value, and change nothing. The size limit holds for
    what is stored: 1e308 is 5 bytes as sent and 309 digits stored.
    """
    if value is None:
        return
    encoded = msgspec.json.encode(value)
    if len(encoded) > MAX_JSON_BYTES:
        raise invalid(field, f"larger than {MAX_JSON_BYTES} bytes of JSON")
    # The walk below is exact, and costs a microsecond or two (per item of a batch). Most values need
    # no walk, as their JSON shows: a NUL in a key or string is encoded as \u0000, a value too deep has
    # at least MAX_JSON_DEPTH nested objects or arrays, so as many opening brackets, and a -0.0 is -0.0.
    exponent = _EXPONENT.search(encoded) is not None or b"e-" in encoded
    if (
        b"\\u0000" not in encoded
        and b"-0" not in encoded
        and not exponent
        and encoded.count(b"{") + encoded.count(b"[") < MAX_JSON_DEPTH
    ):
        return
    stack = [(value, 1)]
    decimals = 0  # digits a tiny float gains as stored: 1e-300 is 6 bytes sent, 302 stored (0.000…1)
    while stack:
        item, depth = stack.pop()  # depth: of the objects and arrays, the value itself being 1
        if depth > MAX_JSON_DEPTH and isinstance(item, dict | list):
            raise invalid(field, f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            if "\x00" in item:
                raise invalid(field, "strings must not contain NUL (\\u0000)")
        elif isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            for key, child in item.items():
                if type(child) is float:
                    item[key] = _as_stored(child)
                    decimals += _zeros(child)
                else:
                    stack.append((child, depth + 1))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                if type(child) is float:
                    item[index] = _as_stored(child)
                    decimals += _zeros(child)
                else:
                    stack.append((child, depth + 1))
    if exponent and len(msgspec.json.encode(value)) + decimals > MAX_JSON_BYTES:
        raise invalid(
            field, f"larger than {MAX_JSON_BYTES} bytes of JSON as stored (1e300 and 1e-300 are stored as 301 digits)"
        )


# A float JSON writes with a positive exponent (msgspec, as Python's repr, from 1e16 up); in a string
# too, which costs only the walk.
_EXPONENT = re.compile(rb"[0-9]e[0-9]")


def _as_stored(number: float) -> float | int:
    """The number PostgreSQL's jsonb gives back for a float (see check_json)."""
    if number == 0.0:
        return 0.0
    if abs(number) >= 1e16:
        return int(Decimal(repr(number)))
    return number


def _zeros(number: float) -> int:
    """The zeros PostgreSQL writes out for a float JSON gives with a negative exponent (1e-300: 300)."""
    if number == 0.0 or abs(number) >= 1e-4:  # JSON writes these without an exponent, as stored
        return 0
    return -Decimal(repr(number)).adjusted()


class Strict(AbstractDTO[T], Generic[T]):
    """`data: T` decoded by `decode` above, so the OpenAPI schema shows the body and "50" stays 422.

    Litestar's own body parsing converts leniently ("50" becomes 50.0); this DTO
    decodes the raw bytes with `decode` instead, and tells the schema the body's type.
    """

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Iterator[Any]:
        return iter(())

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        """Nothing to prepare: `decode` needs no transfer model."""

    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any) -> Any:
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))

    def decode_bytes(self, value: bytes) -> T:
        return decode(value, self.model_type)
