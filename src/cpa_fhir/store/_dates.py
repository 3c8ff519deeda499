"""FHIR dates as half-open ranges of UTC microseconds.

A FHIR date, dateTime or instant stands for the whole interval its precision
implies: `2026` is all of that year, `2026-04-03T10:15` that minute
(https://hl7.org/fhir/R4/search.html#date). Index rows and search values are both
kept as [low, high) in microseconds since 1970-01-01T00:00Z so that every prefix
is a comparison of integers. A value without a time zone is read as UTC (FHIR
leaves it to the server; this server's zone is UTC). Pure: no I/O.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

# Open ends of a Period, and values past year 9999, sit beyond any real date.
MIN_TIME = -(2**62)
MAX_TIME = 2**62
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_DAY_MICROS = 86_400_000_000

_DATE = re.compile(
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def to_micros(moment: datetime) -> int:
    """A timezone-aware datetime as microseconds since the epoch."""
    return (moment - EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


# The instants a datetime can hold, in UTC: a search bound beyond them (`_lastUpdated`
# near year 1 or 9999, an open end) is compared as the nearest one, as nothing stored
# lies outside them.
_FIRST = to_micros(datetime.min.replace(tzinfo=UTC))
_LAST = to_micros(datetime.max.replace(tzinfo=UTC))


def clamped_moment(micros: int) -> datetime:
    """`from_micros`, clamped to the range a datetime holds."""
    return from_micros(min(max(micros, _FIRST), _LAST))


def date_range(text: str) -> tuple[int, int] | None:
    """[low, high) of a FHIR date/dateTime/instant string, or None when it is not one."""
    match = _DATE.fullmatch(text)
    if match is None:
        return None
    parts = match.groupdict()
    try:
        return _range(parts)
    except (ValueError, OverflowError):
        return None


def _range(parts: dict[str, str | None]) -> tuple[int, int]:
    year = int(parts["year"] or 0)
    zone = _zone(parts["zone"])
    if parts["month"] is None:
        low = datetime(year, 1, 1, tzinfo=zone)
        high = _next_year(year, 1, zone)
    elif parts["day"] is None:
        month = int(parts["month"])
        low = datetime(year, month, 1, tzinfo=zone)
        high = _next_year(year, 1, zone) if month == 12 else low.replace(month=month + 1)
    elif parts["hour"] is None:
        low = datetime(year, int(parts["month"]), int(parts["day"]), tzinfo=zone)
        # In microseconds: the end of 9999-12-31 is past what a datetime holds.
        return to_micros(low), to_micros(low) + _DAY_MICROS
    else:
        fraction = parts["fraction"] or ""
        low = datetime(
            year,
            int(parts["month"]),
            int(parts["day"] or 0),
            int(parts["hour"]),
            int(parts["minute"] or 0),
            int(parts["second"] or 0),
            int((fraction + "000000")[:6]),
            tzinfo=zone,
        )
        if parts["second"] is None:
            step = 60_000_000
        elif not fraction:
            step = 1_000_000
        else:
            step = 10 ** max(0, 6 - len(fraction))
        return to_micros(low), to_micros(low) + step
    low_micros = to_micros(low)
    return low_micros, (to_micros(high) if high is not None else MAX_TIME)


def _zone(text: str | None) -> timezone:
    if text is None or text == "Z":
        return UTC
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 14 or minutes > 59:
        raise ValueError(text)
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _next_year(year: int, month: int, zone: timezone) -> datetime | None:
    return None if year >= 9999 else datetime(year + 1, month, 1, tzinfo=zone)


def value_ranges(value: Any) -> list[tuple[int, int]]:
    """Ranges of an element a date parameter indexes: date, dateTime, instant, Period, Timing."""
    if isinstance(value, str):
        found = date_range(value)
        return [found] if found is not None else []
    if not isinstance(value, dict):
        return []
    if "start" in value or "end" in value:  # Period
        start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
        end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
        if start is None and end is None:
            return []
        return [(start[0] if start else MIN_TIME, end[1] if end else MAX_TIME)]
    events = value.get("event")  # Timing
    if isinstance(events, list):
        return [r for e in events if isinstance(e, str) for r in value_ranges(e)]
    return []
