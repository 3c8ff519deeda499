"""A `SearchQuery` as SQL over the index tables: https://hl7.org/fhir/R4/search.html

Each criterion becomes `id IN (SELECT resource_id FROM <index> WHERE type, param and
any of its values match)` (its values ORed; criteria ANDed), so the database can
start from whichever index is most selective. `:not` and `:missing=true` use
`NOT IN`. Dates compare [low, high) ranges with the prefix rules of
https://hl7.org/fhir/R4/search.html#prefix; numbers compare the stored value with
the range the search value's precision implies. Builds statements only: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from cpa_fhir.store._dates import from_micros
from cpa_fhir.store._query import (
    Criterion,
    DateValue,
    NumberValue,
    ReferenceValue,
    SearchQuery,
    SortKey,
    StringValue,
    TokenValue,
)
from cpa_fhir.store._schema import (
    resource_current,
    search_date,
    search_number,
    search_reference,
    search_string,
    search_token,
)

_DAY_MICROS = 86_400_000_000
# Past the last code point, so `normalised < prefix + _AFTER_ALL` bounds a prefix match.
_AFTER_ALL = "\U0010ffff"

_TABLES: dict[str, sa.Table] = {
    "token": search_token,
    "uri": search_token,
    "string": search_string,
    "reference": search_reference,
    "date": search_date,
    "number": search_number,
    "quantity": search_number,
}
_SORT_COLUMNS: dict[str, tuple[str, str]] = {  # type: (ascending column, descending column)
    "token": ("code", "code"),
    "uri": ("code", "code"),
    "string": ("normalised", "normalised"),
    "date": ("low", "high"),
    "number": ("value", "value"),
    "quantity": ("value", "value"),
}

Condition = ColumnElement[bool]


def where_clause(query: SearchQuery, *, now_micros: int) -> list[Condition]:
    """Conditions on `resource_current` selecting the query's matches."""
    rc = resource_current.c
    conditions: list[Condition] = [
        rc.resource_type == query.resource_type,
        rc.deleted == sa.false(),
    ]
    for criterion in query.criteria:
        conditions.append(_criterion(query.resource_type, criterion, now_micros))
    return conditions


def order_by(query: SearchQuery) -> list[Any]:
    rc = resource_current.c
    ordering: list[Any] = [_sort_key(query.resource_type, key) for key in query.sort]
    # The id last makes paging stable whatever the sort.
    ordering.append(rc.id.desc() if _only_id_descending(query.sort) else rc.id.asc())
    return ordering


def _only_id_descending(sort: Sequence[SortKey]) -> bool:
    return len(sort) == 1 and sort[0].parameter == "_id" and sort[0].descending


def _sort_key(resource_type: str, key: SortKey) -> Any:
    rc = resource_current.c
    if key.parameter == "_id":
        expression: Any = rc.id
    elif key.parameter == "_lastUpdated":
        expression = rc.last_updated
    else:
        table = _TABLES[key.type]
        column_name = _SORT_COLUMNS[key.type][1 if key.descending else 0]
        aggregate = sa.func.max if key.descending else sa.func.min
        expression = (
            sa.select(aggregate(table.c[column_name]))
            .where(
                table.c.resource_type == resource_type,
                table.c.resource_id == rc.id,
                table.c.param == key.parameter,
            )
            .scalar_subquery()
        )
    # Resources without a value sort after those with one, either way.
    return (expression.desc() if key.descending else expression.asc()).nulls_last()


def _criterion(resource_type: str, criterion: Criterion, now_micros: int) -> Condition:
    rc = resource_current.c
    if criterion.parameter == "_id":
        return rc.id.in_([v.code for v in criterion.values if isinstance(v, TokenValue)])
    if criterion.parameter == "_lastUpdated":
        return sa.or_(
            *(_last_updated(v, now_micros) for v in criterion.values if isinstance(v, DateValue))
        )
    table = _TABLES[criterion.type]
    matching = sa.select(table.c.resource_id).where(
        table.c.resource_type == resource_type, table.c.param == criterion.parameter
    )
    if criterion.missing is not None:
        return rc.id.not_in(matching) if criterion.missing else rc.id.in_(matching)
    value_conditions = [_value(table, criterion, v, now_micros) for v in criterion.values]
    matching = matching.where(sa.or_(*value_conditions))
    return rc.id.not_in(matching) if criterion.modifier == "not" else rc.id.in_(matching)


def _value(table: sa.Table, criterion: Criterion, value: Any, now_micros: int) -> Condition:
    c = table.c
    if isinstance(value, TokenValue):
        parts: list[Condition] = []
        if value.code is not None:
            parts.append(c.code == value.code)
        if not value.any_system:
            parts.append(c.system.is_(None) if value.system is None else c.system == value.system)
        return sa.and_(*parts)
    if isinstance(value, StringValue):
        if criterion.modifier == "exact":
            return c.value == value.text
        if criterion.modifier == "contains":
            return c.normalised.like(f"%{_escape_like(value.normalised)}%", escape="\\")
        return sa.and_(
            c.normalised >= value.normalised, c.normalised < value.normalised + _AFTER_ALL
        )
    if isinstance(value, ReferenceValue):
        if value.url is not None:
            return c.url == value.url
        if value.target_type is None:
            return c.target_id == value.target_id
        return sa.and_(c.target_id == value.target_id, c.target_type == value.target_type)
    if isinstance(value, DateValue):
        return date_condition(value, c.low, c.high, now_micros)
    assert isinstance(value, NumberValue)
    condition = number_condition(value, c.value)
    if value.system is not None:
        condition = sa.and_(condition, c.system == value.system)
    if value.code is not None:
        condition = sa.and_(condition, c.code == value.code)
    return condition


def date_condition(
    value: DateValue, low: ColumnElement[Any], high: ColumnElement[Any], now_micros: int
) -> Condition:
    """Whether a target range [low, high) matches a date search value."""
    s_low, s_high = value.low, value.high
    contained = sa.and_(low >= s_low, high <= s_high)
    match value.prefix:
        case "eq":
            return contained
        case "ne":
            return sa.not_(contained)
        case "gt":
            return high > s_high
        case "lt":
            return low < s_low
        case "ge":
            return sa.or_(high > s_high, contained)
        case "le":
            return sa.or_(low < s_low, contained)
        case "sa":
            return low >= s_high
        case "eb":
            return high <= s_low
        case _:  # ap
            margin = approximate_margin(value, now_micros)
            return sa.and_(low < s_high + margin, high > s_low - margin)


def approximate_margin(value: DateValue, now_micros: int) -> int:
    """`ap` widens the search range by 10% of its distance from now, at least a day."""
    return max(_DAY_MICROS, abs(now_micros - value.low) // 10)


def number_condition(value: NumberValue, column: ColumnElement[Any]) -> Condition:
    match value.prefix:
        case "eq":
            return sa.and_(column >= value.low, column < value.high)
        case "ne":
            return sa.or_(column < value.low, column >= value.high)
        case "gt" | "sa":
            return column > value.value
        case "lt" | "eb":
            return column < value.value
        case "ge":
            return column >= value.value
        case "le":
            return column <= value.value
        case _:  # ap: within 10%
            margin = abs(value.value) / 10
            return sa.and_(column >= value.value - margin, column <= value.value + margin)


def _last_updated(value: DateValue, now_micros: int) -> Condition:
    """`_lastUpdated` against the stored instant, a point in time (millisecond precision)."""
    column = resource_current.c.last_updated
    low, high = from_micros(value.low), from_micros(value.high)
    match value.prefix:
        case "eq":
            return sa.and_(column >= low, column < high)
        case "ne":
            return sa.or_(column < low, column >= high)
        case "gt" | "sa":
            return column >= high
        case "lt" | "eb":
            return column < low
        case "ge":
            return column >= low
        case "le":
            return column < high
        case _:  # ap
            margin = approximate_margin(value, now_micros)
            return sa.and_(
                column >= from_micros(value.low - margin), column < from_micros(value.high + margin)
            )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
