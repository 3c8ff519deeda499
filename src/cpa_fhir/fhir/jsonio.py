"""FHIR JSON read and written with each decimal's precision kept.

FHIR decimals carry their precision in how they are written: `1.50` is not `1.5`,
and the precision must be kept (https://hl7.org/fhir/R4/datatypes.html#decimal).
A float cannot hold it, and a number beyond a float's digits loses its value as
well (a number beyond its range, 1e400, orjson refuses: an error, as for any
invalid body). `loads` gives such a number as an `ExactDecimal` (a float that
remembers the text it was written as) and every other number as orjson gives it;
`dumps` writes an `ExactDecimal` back as that text.

Most documents hold no such number, and orjson parses them alone: the standard
library's parser, which can keep a number's text, runs only when a number that
orjson would change appears (a document orjson writes back unchanged has none;
otherwise a cheap scan of the bytes finds candidates).
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["ExactDecimal", "canonical", "dumps", "loads", "repeated_name"]


class ExactDecimal(float):
    """A JSON number whose float value would be written otherwise than it was given
    (`1.50`, `1e2`, `0.1000000000000000055511`, a 30-digit integer): the float, for
    comparing and searching, and `text`, the number as written, for writing back."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> ExactDecimal:
        made = super().__new__(cls, text)
        made.text = text
        return made

    def __reduce__(self) -> tuple[Any, ...]:
        return (ExactDecimal, (self.text,))

    def __repr__(self) -> str:  # as written, as a float's repr is (validators read it)
        return self.text

    __str__ = __repr__

    def __copy__(self) -> ExactDecimal:
        return self

    def __deepcopy__(self, memo: Any) -> ExactDecimal:
        return self


# A number in a value's place (after a colon, comma or bracket, before a comma or
# closing bracket, or alone) with a fraction or an exponent, or an integer of 16 digits or
# more, or -0: the numbers a float or an integer may write otherwise. Text inside a string can look like
# one ("ratio 3:2.50,"); it only sends the document the slower way.
_NUMBER = (
    rb"\s*(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+)"
    rb"|-?[1-9][0-9]{15,}|-0)(?=\s*(?:[,\]}]|\Z))"
)
# Led by one of the three bytes a value follows, and a look ahead for a digit: the
# regular expression engine then skips to each such byte, not trying every position
# (a third of the time on resources, which hold many colons and few numbers).
_CANDIDATE = re.compile(rb"[:,\[](?=\s*-?[0-9])" + _NUMBER)
_ALONE = re.compile(_NUMBER)  # a document that is one number


def _written_again(text: bytes) -> bool:
    """Whether orjson writes the number it reads from `text` as `text` again."""
    try:
        return orjson.dumps(orjson.loads(text)) == text
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        return False


def _may_change(data: bytes) -> bool:
    alone = _ALONE.match(data)
    if alone is not None and not _written_again(alone.group(1)):
        return True
    return any(not _written_again(m.group(1)) for m in _CANDIDATE.finditer(data))


def _number(text: str) -> float | int:
    value = orjson.loads(text)
    return value if orjson.dumps(value).decode() == text else ExactDecimal(text)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON as orjson does (its errors for invalid input), keeping the text of
    each number a float would write otherwise (`ExactDecimal`)."""
    parsed = orjson.loads(data)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    # What orjson wrote (stored content, the server's own messages) it writes again
    # byte for byte: then every number is as orjson gives it, and one serialisation,
    # a tenth of the cost of the scan below, says so.
    try:
        if orjson.dumps(parsed) == raw:
            return parsed
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: the scan decides
        pass
    if not (_CANDIDATE.search(raw) or _ALONE.match(raw)) or not _may_change(raw):
        return parsed
    # orjson has checked the text (stricter than the standard library: no NaN, no
    # lone surrogates), so this parse of it succeeds, but for depth: the standard
    # library's parser recurses, and orjson takes deeper nesting than Python can.
    try:
        return json.loads(raw, parse_float=_number, parse_int=_number)
    except RecursionError:
        raise orjson.JSONDecodeError("the JSON nests too deeply", raw.decode(), 0) from None


class _Repeated(Exception):
    def __init__(self, name: str):
        self.name = name


def _unique_names(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise _Repeated(name)
        seen.add(name)


def repeated_name(data: bytes | str) -> str | None:
    """The first property name that an object of this (well-formed) JSON gives twice,
    if any. FHIR JSON names each property once (https://hl7.org/fhir/R4/json.html):
    of two values a parser keeps one, not every parser the same one, so what one
    reader checked would not be what another stores."""
    try:
        json.loads(
            data,
            object_pairs_hook=_unique_names,
            parse_int=len,  # the values are not looked at: nothing to convert
            parse_float=len,
            parse_constant=len,
        )
    except _Repeated as exc:
        return exc.name
    except RecursionError:  # nesting this deep is refused for its depth
        return None
    return None


def _fragment(value: Any) -> Any:
    if isinstance(value, ExactDecimal):
        return orjson.Fragment(value.text)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def dumps(value: Any, option: int | None = None) -> bytes:
    """`orjson.dumps`, writing an `ExactDecimal` as the text it was given."""
    if option is None:
        return orjson.dumps(value, default=_fragment)
    return orjson.dumps(value, default=_fragment, option=option)


def canonical(value: Any) -> bytes:
    """`dumps` with keys sorted: equal for JSON that differs only in key order."""
    return dumps(value, orjson.OPT_SORT_KEYS)
