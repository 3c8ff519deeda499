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
the range the search value's precision implies.

Statements are written as text with their values bound as parameters, the same on
SQLite and PostgreSQL but for the placeholder, and run straight through the driver:
built and compiled as SQLAlchemy expressions, a search's statement cost the server
about as much as running it. Every value is a bound parameter; the names in the
text are this module's own (tables, columns, aliases). Builds statements only: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cpa_fhir.store._dates import clamped_moment
from cpa_fhir.store._query import (
    ChainLink,
    Criterion,
    DateValue,
    Include,
    NumberValue,
    ReferenceValue,
    SearchQuery,
    SortKey,
    StringValue,
    TokenValue,
)
from cpa_fhir.store._search_parameters import COLUMN_PARAMETERS

_DAY_MICROS = 86_400_000_000
# LIKE's escape character: not a backslash, which PostgreSQL reads as escaping the
# closing quote when standard_conforming_strings is off.
_LIKE_ESCAPE = "!"
# Past the last code point, so `normalised < prefix + _AFTER_ALL` bounds a prefix match.
_AFTER_ALL = "\U0010ffff"

_TABLES: dict[str, str] = {
    "token": "search_token",
    "uri": "search_token",
    "string": "search_string",
    "reference": "search_reference",
    "date": "search_date",
    "number": "search_number",
    "quantity": "search_number",
}
_SORT_COLUMNS: dict[str, tuple[str, str]] = {  # type: (ascending column, descending column)
    "token": ("code", "code"),
    "uri": ("code", "code"),
    "string": ("normalised", "normalised"),
    "date": ("low", "high"),
    "number": ("value", "value"),
    "quantity": ("value", "value"),
}
# The columns of a stored version, in the order `Stored` is read from (also by the
# repository's reads by id).
_COLUMN_NAMES = ("resource_type", "id", "version_id", "last_updated", "deleted", "content")
COLUMNS = ", ".join(_COLUMN_NAMES)
_CURRENT = "resource_current"
_CURRENT_COLUMNS = ", ".join(f"{_CURRENT}.{c}" for c in _COLUMN_NAMES)
_TRUE, _FALSE = "1 = 1", "1 = 0"

# SQL with `?` for each value, and the values in the order they appear.
Fragment = tuple[str, tuple[Any, ...]]
# A timezone-aware datetime as the database's driver takes it for `last_updated`.
MomentParameter = Callable[[datetime], Any]


def _join(separator: str, parts: Iterable[Fragment]) -> Fragment:
    listed = list(parts)
    return (
        separator.join(sql for sql, _ in listed),
        tuple(value for _, values in listed for value in values),
    )


def _any(parts: Sequence[Fragment]) -> Fragment:
    if not parts:
        return _FALSE, ()
    return parts[0] if len(parts) == 1 else _wrapped(_join(" OR ", parts))


def _all(parts: Sequence[Fragment]) -> Fragment:
    if not parts:
        return _TRUE, ()
    return parts[0] if len(parts) == 1 else _wrapped(_join(" AND ", parts))


def _wrapped(fragment: Fragment) -> Fragment:
    return f"({fragment[0]})", fragment[1]


def _in_list(column: str, values: Sequence[Any]) -> Fragment:
    if not values:
        return _FALSE, ()
    return f"{column} IN ({', '.join('?' * len(values))})", tuple(values)


class _Aliases:
    """Names for the tables a statement reads more than once (chains)."""

    def __init__(self) -> None:
        self.count = 0

    def new(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"


@dataclass(frozen=True, slots=True)
class _Chain:
    """What every subquery of one chained criterion shares."""

    criterion: Criterion
    now_micros: int
    aliases: _Aliases


def _hop(
    alias: str,
    out: str,
    into: str,
    resource_type: str,
    reference: str,
    target_type: str,
    inner: Fragment,
) -> Fragment:
    """One link through `search_reference`: its `out` column (resource_id forward,
    target_id backward) where `into` (the other) is among the ids `inner` selects."""
    return _join(
        "",
        [
            (
                f"SELECT {alias}.{out} FROM search_reference AS {alias}"
                f" WHERE {alias}.resource_type = ? AND {alias}.param = ?"
                f" AND {alias}.target_type = ? AND {alias}.{into} IN (",
                (resource_type, reference, target_type),
            ),
            inner,
            (")", ()),
        ],
    )


class SearchStatements:
    """The statements of a search, for one database. `placeholder`: the driver's
    (`?` on SQLite, `%s` on PostgreSQL); `moment`: a `last_updated` bound as the
    column stores it."""

    def __init__(self, *, placeholder: str, moment: MomentParameter) -> None:
        self._placeholder = placeholder
        self._moment = moment

    def _final(self, fragment: Fragment) -> Fragment:
        sql, values = fragment
        return (sql if self._placeholder == "?" else sql.replace("?", self._placeholder)), values

    # --- the statements ------------------------------------------------------------

    def where(self, query: SearchQuery, *, now_micros: int) -> Fragment:
        """Conditions on `resource_current` selecting the query's matches."""
        aliases = _Aliases()
        parts: list[Fragment] = [
            (f"{_CURRENT}.resource_type = ?", (query.resource_type,)),
            (f"NOT {_CURRENT}.deleted", ()),
        ]
        for criterion in query.criteria:
            parts.append(self._criterion(query.resource_type, criterion, now_micros, aliases))
        if query.after_id is not None:
            parts.append((f"{_CURRENT}.id > ?", (query.after_id,)))
        return _join(" AND ", parts)

    def page(self, query: SearchQuery, where: Fragment, offset: int) -> Fragment:
        """The page of matches: every column of `resource_current`, in order."""
        ordering = _join(", ", self._order_by(query))
        return self._final(
            _join(
                " ",
                [
                    (f"SELECT {COLUMNS} FROM {_CURRENT} WHERE", ()),
                    where,
                    ("ORDER BY", ()),
                    ordering,
                    ("LIMIT ? OFFSET ?", (query.count, offset)),
                ],
            )
        )

    def count(self, where: Fragment) -> Fragment:
        return self._final(_join(" ", [(f"SELECT count(*) FROM {_CURRENT} WHERE", ()), where]))

    def include(
        self, include: Include, ids: Sequence[str], *, limit: int, offset: int = 0
    ) -> Fragment:
        """What the resources of `include`'s source type with these ids refer to by it
        (not deleted), in order: `limit` of them from `offset`."""
        conditions = [
            ("resource_type = ?", (include.source_type,)),
            ("param = ?", (include.parameter,)),
            _in_list("resource_id", ids),
            ("target_id IS NOT NULL", ()),
        ]
        if include.target_type is not None:
            conditions.append(("target_type = ?", (include.target_type,)))
        pairs = _join(
            " ",
            [
                ("SELECT DISTINCT target_type, target_id FROM search_reference WHERE", ()),
                _join(" AND ", conditions),
            ],
        )
        return self._final(
            _join(
                " ",
                [
                    (f"SELECT {_CURRENT_COLUMNS} FROM {_CURRENT} JOIN (", ()),
                    pairs,
                    (
                        f") AS pairs ON {_CURRENT}.resource_type = pairs.target_type"
                        f" AND {_CURRENT}.id = pairs.target_id WHERE NOT {_CURRENT}.deleted"
                        f" ORDER BY {_CURRENT}.resource_type, {_CURRENT}.id LIMIT ? OFFSET ?",
                        (limit, offset),
                    ),
                ],
            )
        )

    def revinclude(
        self,
        include: Include,
        target_type: str,
        ids: Sequence[str],
        *,
        limit: int,
        offset: int = 0,
    ) -> Fragment:
        """What refers by `include` to the resources of `target_type` with these ids
        (not deleted), in order: `limit` of them from `offset`."""
        sources = _join(
            " AND ",
            [
                ("resource_type = ?", (include.source_type,)),
                ("param = ?", (include.parameter,)),
                ("target_type = ?", (target_type,)),
                _in_list("target_id", ids),
            ],
        )
        return self._final(
            _join(
                " ",
                [
                    (
                        f"SELECT {COLUMNS} FROM {_CURRENT} WHERE resource_type = ? AND id IN"
                        " (SELECT resource_id FROM search_reference WHERE",
                        (include.source_type,),
                    ),
                    sources,
                    (") AND NOT deleted ORDER BY id LIMIT ? OFFSET ?", (limit, offset)),
                ],
            )
        )

    # --- ordering --------------------------------------------------------------------

    def _order_by(self, query: SearchQuery) -> list[Fragment]:
        ordering = [self._sort_key(query.resource_type, key) for key in query.sort]
        # The id last makes paging stable whatever the sort.
        last = "DESC" if _only_id_descending(query.sort) else "ASC"
        ordering.append((f"{_CURRENT}.id {last}", ()))
        return ordering

    def _sort_key(self, resource_type: str, key: SortKey) -> Fragment:
        direction = "DESC" if key.descending else "ASC"
        if key.parameter == "_id":
            expression: Fragment = (f"{_CURRENT}.id", ())
        elif key.parameter == "_lastUpdated":
            expression = (f"{_CURRENT}.last_updated", ())
        else:
            table = _TABLES[key.type]
            column = _SORT_COLUMNS[key.type][1 if key.descending else 0]
            aggregate = "max" if key.descending else "min"
            expression = (
                f"(SELECT {aggregate}({column}) FROM {table} WHERE resource_type = ?"
                f" AND resource_id = {_CURRENT}.id AND param = ?)",
                (resource_type, key.parameter),
            )
        # Resources without a value sort after those with one, either way.
        return f"{expression[0]} {direction} NULLS LAST", expression[1]

    # --- criteria --------------------------------------------------------------------

    def _criterion(
        self, resource_type: str, criterion: Criterion, now_micros: int, aliases: _Aliases
    ) -> Fragment:
        if criterion.chain:
            at = _Chain(criterion, now_micros, aliases)
            ids = self._chained_ids(resource_type, criterion.chain, at)
            return _join("", [(f"{_CURRENT}.id IN (", ()), ids, (")", ())])
        return self._direct_criterion(_CURRENT, resource_type, criterion, now_micros)

    def _direct_criterion(
        self, resources: str, resource_type: str, criterion: Criterion, now_micros: int
    ) -> Fragment:
        """The criterion as a condition on `resources` (resource_current or an alias)."""
        if criterion.parameter == "_id":
            codes = [v.code for v in criterion.values if isinstance(v, TokenValue)]
            return _in_list(f"{resources}.id", codes)
        if criterion.parameter == "_lastUpdated":
            column = f"{resources}.last_updated"
            return _any(
                [
                    self._last_updated(column, v, now_micros)
                    for v in criterion.values
                    if isinstance(v, DateValue)
                ]
            )
        matching = self._indexed(resource_type, criterion, now_micros)
        negated = criterion.missing is True or criterion.modifier == "not"
        operator = "NOT IN" if negated else "IN"
        return _join("", [(f"{resources}.id {operator} (", ()), matching, (")", ())])

    def _indexed(self, resource_type: str, criterion: Criterion, now_micros: int) -> Fragment:
        """Ids of resources indexed with the parameter: with any of its values, or (for
        `:missing`) with any value at all. Never correlated to a query it sits in, so
        its table needs no alias."""
        table = _TABLES[criterion.type]
        matching: Fragment = (
            f"SELECT resource_id FROM {table} WHERE resource_type = ? AND param = ?",
            (resource_type, criterion.parameter),
        )
        if criterion.missing is not None:
            return matching
        values = _any([self._value(criterion, v, now_micros) for v in criterion.values])
        return _join(" AND ", [matching, values])

    def _chained_ids(self, resource_type: str, chain: Sequence[ChainLink], at: _Chain) -> Fragment:
        """Ids of the `resource_type` resources from which `chain` reaches a match."""
        link, onward = chain[0], chain[1:]
        if link.reverse:
            (source_type,) = link.to_types
            inner = self._matching_ids(source_type, onward, at)
            return _hop(
                at.aliases.new("ref"),
                "target_id",
                "resource_id",
                source_type,
                link.reference,
                resource_type,
                inner,
            )
        per_target = [
            _hop(
                at.aliases.new("ref"),
                "resource_id",
                "target_id",
                resource_type,
                link.reference,
                target_type,
                self._matching_ids(target_type, onward, at),
            )
            for target_type in link.to_types
        ]
        # One subquery per target type, so that each can use the index on target_id.
        return _join(" UNION ALL ", per_target)

    def _matching_ids(self, resource_type: str, chain: Sequence[ChainLink], at: _Chain) -> Fragment:
        """Ids of the `resource_type` resources that match, through `chain` if any.

        A positive criterion on an index is answered from the index alone: its rows
        are those of current, not deleted, resources. The others (`:not`,
        `:missing=true`, `_id`, `_lastUpdated`) need the resources themselves, so
        that a reference to a resource that does not exist never matches.
        """
        if chain:
            return self._chained_ids(resource_type, chain, at)
        criterion, now_micros = at.criterion, at.now_micros
        negated = criterion.missing is True or criterion.modifier == "not"
        if criterion.parameter not in COLUMN_PARAMETERS and not negated:
            return self._indexed(resource_type, criterion, now_micros)
        targets = at.aliases.new("rc")
        return _join(
            " AND ",
            [
                (
                    f"SELECT {targets}.id FROM {_CURRENT} AS {targets}"
                    f" WHERE {targets}.resource_type = ? AND NOT {targets}.deleted",
                    (resource_type,),
                ),
                self._direct_criterion(targets, resource_type, criterion, now_micros),
            ],
        )

    # --- values ----------------------------------------------------------------------

    def _value(self, criterion: Criterion, value: Any, now_micros: int) -> Fragment:
        if isinstance(value, TokenValue):
            parts: list[Fragment] = []
            if value.code is not None:
                parts.append(("code = ?", (value.code,)))
            if not value.any_system:
                parts.append(
                    ("system IS NULL", ())
                    if value.system is None
                    else ("system = ?", (value.system,))
                )
            return _all(parts)
        if isinstance(value, StringValue):
            if criterion.modifier == "exact":
                return "value = ?", (value.text,)
            if criterion.modifier == "contains":
                return f"normalised LIKE ? ESCAPE '{_LIKE_ESCAPE}'", (
                    f"%{_escape_like(value.normalised)}%",
                )
            return (
                "(normalised >= ? AND normalised < ?)",
                (value.normalised, value.normalised + _AFTER_ALL),
            )
        if isinstance(value, ReferenceValue):
            if value.url is not None:
                return "url = ?", (value.url,)
            if value.target_type is None:
                return "target_id = ?", (value.target_id,)
            return "(target_id = ? AND target_type = ?)", (value.target_id, value.target_type)
        if isinstance(value, DateValue):
            return date_condition(value, "low", "high", now_micros)
        assert isinstance(value, NumberValue)
        parts = [number_condition(value, "value")]
        if value.system is not None:
            parts.append(("system = ?", (value.system,)))
        if value.code is not None:
            parts.append(("code = ?", (value.code,)))
        return _all(parts)

    def _last_updated(self, column: str, value: DateValue, now_micros: int) -> Fragment:
        """`_lastUpdated` against the stored instant, a point in time (millisecond
        precision). Bounds past year 9999 or before year 1 (`9999`, `ap0001`) are
        clamped to the instants a datetime holds, which every stored one lies within."""
        low = self._moment(clamped_moment(value.low))
        high = self._moment(clamped_moment(value.high))
        match value.prefix:
            case "eq":
                return f"({column} >= ? AND {column} < ?)", (low, high)
            case "ne":
                return f"({column} < ? OR {column} >= ?)", (low, high)
            case "gt" | "sa":
                return f"{column} >= ?", (high,)
            case "lt" | "eb":
                return f"{column} < ?", (low,)
            case "ge":
                return f"{column} >= ?", (low,)
            case "le":
                return f"{column} < ?", (high,)
            case _:  # ap
                margin = approximate_margin(value, now_micros)
                return f"({column} >= ? AND {column} < ?)", (
                    self._moment(clamped_moment(value.low - margin)),
                    self._moment(clamped_moment(value.high + margin)),
                )


def _only_id_descending(sort: Sequence[SortKey]) -> bool:
    return len(sort) == 1 and sort[0].parameter == "_id" and sort[0].descending


def date_condition(value: DateValue, low: str, high: str, now_micros: int) -> Fragment:
    """Whether a target range [low, high) matches a date search value."""
    s_low, s_high = value.low, value.high
    contained: Fragment = f"({low} >= ? AND {high} <= ?)", (s_low, s_high)
    match value.prefix:
        case "eq":
            return contained
        case "ne":
            return f"NOT {contained[0]}", contained[1]
        case "gt":
            return f"{high} > ?", (s_high,)
        case "lt":
            return f"{low} < ?", (s_low,)
        case "ge":
            return f"({high} > ? OR {contained[0]})", (s_high, *contained[1])
        case "le":
            return f"({low} < ? OR {contained[0]})", (s_low, *contained[1])
        case "sa":
            return f"{low} >= ?", (s_high,)
        case "eb":
            return f"{high} <= ?", (s_low,)
        case _:  # ap
            margin = approximate_margin(value, now_micros)
            return f"({low} < ? AND {high} > ?)", (s_high + margin, s_low - margin)


def approximate_margin(value: DateValue, now_micros: int) -> int:
    """`ap` widens the search range by 10% of its distance from now, at least a day."""
    return max(_DAY_MICROS, abs(now_micros - value.low) // 10)


def number_condition(value: NumberValue, column: str) -> Fragment:
    match value.prefix:
        case "eq":
            return f"({column} >= ? AND {column} < ?)", (value.low, value.high)
        case "ne":
            return f"({column} < ? OR {column} >= ?)", (value.low, value.high)
        case "gt" | "sa":
            return f"{column} > ?", (value.value,)
        case "lt" | "eb":
            return f"{column} < ?", (value.value,)
        case "ge":
            return f"{column} >= ?", (value.value,)
        case "le":
            return f"{column} <= ?", (value.value,)
        case _:  # ap: within 10%
            margin = abs(value.value) / 10
            return f"({column} >= ? AND {column} <= ?)", (
                value.value - margin,
                value.value + margin,
            )


def _escape_like(text: str) -> str:
    escape = _LIKE_ESCAPE
    return text.replace(escape, escape * 2).replace("%", escape + "%").replace("_", escape + "_")
