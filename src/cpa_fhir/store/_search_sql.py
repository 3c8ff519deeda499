"""A `SearchQuery` as SQL over the index tables: https://hl7.org/fhir/R4/search.html

Each criterion becomes `id IN (SELECT resource_id FROM <index> WHERE type, param and
any of its values match)` (its values ORed; criteria ANDed), so the database can
start from whichever index is most selective. `:not` and `:missing=true` use
`NOT IN`. A chained criterion nests one such subquery per link through
`search_reference`: forward, `id IN (SELECT resource_id FROM search_reference WHERE
param = <reference> AND target_id IN (<ids of the targets that match>))`; reverse
(`_has`), `id IN (SELECT target_id FROM search_reference WHERE resource_type =
<source> AND param = <reference> AND resource_id IN (<ids of the sources that
match>))`. Dates compare [low, high) ranges with the prefix rules of
https://hl7.org/fhir/R4/search.html#prefix; numbers compare the stored value with
the range the search value's precision implies. Builds statements only: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from cpa_fhir.store._dates import clamped_moment
from cpa_fhir.store._query import (
    ChainLink,
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
from cpa_fhir.store._search_parameters import COLUMN_PARAMETERS

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
    if criterion.chain:
        ids = _chained_ids(resource_type, criterion.chain, criterion, now_micros)
        return resource_current.c.id.in_(ids)
    return _direct_criterion(resource_current, resource_type, criterion, now_micros)


def _direct_criterion(
    resources: sa.FromClause, resource_type: str, criterion: Criterion, now_micros: int
) -> Condition:
    """The criterion as a condition on `resources` (resource_current or an alias of it)."""
    id_column = resources.c.id
    if criterion.parameter == "_id":
        return id_column.in_([v.code for v in criterion.values if isinstance(v, TokenValue)])
    if criterion.parameter == "_lastUpdated":
        column = resources.c.last_updated
        return sa.or_(
            *(
                _last_updated(column, v, now_micros)
                for v in criterion.values
                if isinstance(v, DateValue)
            )
        )
    matching = _indexed(resource_type, criterion, now_micros)
    negated = criterion.missing is True or criterion.modifier == "not"
    return id_column.not_in(matching) if negated else id_column.in_(matching)


def _indexed(resource_type: str, criterion: Criterion, now_micros: int) -> sa.Select[Any]:
    """Ids of resources indexed with the parameter: with any of its values, or (for
    `:missing`) with any value at all."""
    table = _TABLES[criterion.type]
    # Never correlated to a query it sits in, even one over the same table (a chain
    # through search_reference): so it needs no alias, whose columns cost more to
    # make and to key the statement cache with than the rest of the subquery.
    matching = (
        sa.select(table.c.resource_id)
        .where(table.c.resource_type == resource_type, table.c.param == criterion.parameter)
        .correlate(None)
    )
    if criterion.missing is not None:
        return matching
    value_conditions = [_value(table, criterion, v, now_micros) for v in criterion.values]
    return matching.where(sa.or_(*value_conditions))


def _chained_ids(
    resource_type: str, chain: Sequence[ChainLink], criterion: Criterion, now_micros: int
) -> sa.Select[Any] | sa.CompoundSelect[Any]:
    """Ids of the `resource_type` resources from which `chain` reaches a match."""
    link, onward = chain[0], chain[1:]
    if link.reverse:
        (source_type,) = link.to_types
        sources = search_reference.alias()
        return sa.select(sources.c.target_id).where(
            sources.c.resource_type == source_type,
            sources.c.param == link.reference,
            sources.c.target_type == resource_type,
            sources.c.resource_id.in_(_matching_ids(source_type, onward, criterion, now_micros)),
        )
    per_target: list[sa.Select[Any]] = []
    for target_type in link.to_types:
        references = search_reference.alias()
        per_target.append(
            sa.select(references.c.resource_id).where(
                references.c.resource_type == resource_type,
                references.c.param == link.reference,
                references.c.target_type == target_type,
                references.c.target_id.in_(
                    _matching_ids(target_type, onward, criterion, now_micros)
                ),
            )
        )
    # One subquery per target type, so that each can use the index on target_id.
    return per_target[0] if len(per_target) == 1 else sa.union_all(*per_target)


def _matching_ids(
    resource_type: str, chain: Sequence[ChainLink], criterion: Criterion, now_micros: int
) -> sa.Select[Any] | sa.CompoundSelect[Any]:
    """Ids of the `resource_type` resources that match, through `chain` if any.

    A positive criterion on an index is answered from the index alone: its rows are
    those of current, not deleted, resources. The others (`:not`, `:missing=true`,
    `_id`, `_lastUpdated`) need the resources themselves, so that a reference to a
    resource that does not exist never matches.
    """
    if chain:
        return _chained_ids(resource_type, chain, criterion, now_micros)
    negated = criterion.missing is True or criterion.modifier == "not"
    if criterion.parameter not in COLUMN_PARAMETERS and not negated:
        return _indexed(resource_type, criterion, now_micros)
    targets = resource_current.alias()
    return sa.select(targets.c.id).where(
        targets.c.resource_type == resource_type,
        targets.c.deleted == sa.false(),
        _direct_criterion(targets, resource_type, criterion, now_micros),
    )


def _value(table: sa.FromClause, criterion: Criterion, value: Any, now_micros: int) -> Condition:
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


def _last_updated(column: ColumnElement[Any], value: DateValue, now_micros: int) -> Condition:
    """`_lastUpdated` against the stored instant, a point in time (millisecond precision).

    Bounds past year 9999 or before year 1 (`9999`, `ap0001`) are clamped to the
    instants a datetime holds, which every stored one lies within."""
    low, high = clamped_moment(value.low), clamped_moment(value.high)
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
                column >= clamped_moment(value.low - margin),
                column < clamped_moment(value.high + margin),
            )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
