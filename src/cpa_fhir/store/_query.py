"""Parse FHIR search parameters into a `SearchQuery`: https://hl7.org/fhir/R4/search.html

The input is the query string as (name, value) pairs, in order, as a URL carries
them. A parameter repeated is an AND of its occurrences; commas within one value
are an OR (https://hl7.org/fhir/R4/search.html#combining); `\\,` `\\|` `\\$` and
`\\\\` escape (https://hl7.org/fhir/R4/search.html#escaping).

Chained parameters (`subject:Patient.identifier=...`,
https://hl7.org/fhir/R4/search.html#chaining) and reverse chains
(`_has:CarePlan:subject:status=...`, https://hl7.org/fhir/R4/search.html#has) become a
`Criterion` on the parameter at the end of the chain, with the `ChainLink`s that
lead there from the searched type.

Every parameter is understood or refused: an unknown name, an unsupported or
misapplied modifier, a malformed value or a bad result parameter raises
`SearchError` (to become a 400 OperationOutcome), never a silent partial search.
A known parameter with an empty value is ignored, as the specification asks.
Pure: no I/O.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Literal, cast

from cpa_fhir.errors import SearchError, UnknownParameter
from cpa_fhir.fhir.models import R4_RESOURCE_TYPES
from cpa_fhir.fhir.subset import SubsetError, Summary, requested_elements
from cpa_fhir.store._dates import date_range
from cpa_fhir.store._indexing import INDEXED_STRING_CHARS, indexed_token, normalise
from cpa_fhir.store._search_parameters import (
    COLUMN_PARAMETERS,
    ParameterType,
    SearchParameter,
    SearchParameters,
    default_search_parameters,
)

Prefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"]
PREFIXES: tuple[str, ...] = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
Total = Literal["none", "estimate", "accurate"]

DEFAULT_COUNT = 50
MAX_COUNT = 1000
# An offset past every row gives an empty page; larger ones are read as this, which
# no store reaches and every database's integer holds.
MAX_OFFSET = 10**18 - 1
# Each criterion is one more subquery and each value one more condition: past these a
# search costs the database far more than any real one (SQLite refuses an expression
# that deep; PostgreSQL spent 16 s planning 200 criteria), so they are refused first.
# A real search has a handful of criteria and values; the server's own searches keep
# to a few criteria, but list up to a page of ids, hence the separate `_id` bound
# (one IN list, cheap on any database).
MAX_CRITERIA = 50
MAX_VALUES = 100
MAX_IDS = 10_000
# Resources `_include`s and `_revinclude`s (iterated or not) add to one page at most
# (HAPI FHIR's default bound too): the rest are left out, and the searchset says so.
MAX_INCLUDES = 1000
# A chain through a reference to many types is one subquery per type, each comparing
# every value: all the criteria's subqueries and comparisons together may number at
# most these (SQLite took over a second to prepare 1,000 such subqueries).
MAX_SUBQUERIES = 500
MAX_COMPARISONS = 5_000
# Each link is one more join; four covers a forward chain inside a nested `_has`.
MAX_CHAIN_LINKS = 4

# The result parameters (https://hl7.org/fhir/R4/search.html#return) understood here,
# and those refused as not supported rather than unknown.
_RESULT_PARAMETERS = frozenset(
    {"_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total", "_elements"}
)
_UNSUPPORTED = frozenset(
    {
        "_contained",
        "_containedType",
        "_list",
        "_query",
        "_filter",
        "_text",
        "_content",
        "_type",
    }
)
_MODIFIERS: dict[str, frozenset[str]] = {
    "token": frozenset({"missing", "not"}),
    "uri": frozenset({"missing"}),
    "string": frozenset({"missing", "exact", "contains"}),
    "date": frozenset({"missing"}),
    "number": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
    "reference": frozenset({"missing"}),  # plus :[Type]
}
_KNOWN_UNSUPPORTED_MODIFIERS = frozenset(
    {"text", "in", "not-in", "below", "above", "of-type", "identifier", "iterate"}
)
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# A double's decimal exponents run from about -324 to 308.
_MAX_EXPONENT = 330
_SORTABLE = frozenset({"date", "string", "token", "uri", "number", "quantity"})


@dataclass(frozen=True, slots=True)
class TokenValue:
    """`code` (any system), `system|code`, `|code` (no system) or `system|` (any code)."""

    system: str | None
    code: str | None
    any_system: bool


@dataclass(frozen=True, slots=True)
class StringValue:
    text: str
    normalised: str


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    """A target by type and id (type None: any type), or an absolute url."""

    target_type: str | None
    target_id: str | None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class DateValue:
    prefix: Prefix
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class NumberValue:
    """A number with the range its precision implies, and a quantity's system and code."""

    prefix: Prefix
    value: float
    low: float
    high: float
    system: str | None = None
    code: str | None = None


SearchValue = TokenValue | StringValue | ReferenceValue | DateValue | NumberValue


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One step of a chain, from resources of `from_types` to resources of `to_types`.

    Forward (`reference[:Type].…`, https://hl7.org/fhir/R4/search.html#chaining):
    `reference` is a parameter of the `from_types`, pointing at the `to_types`.
    Reverse (`_has:Type:reference:…`, https://hl7.org/fhir/R4/search.html#has):
    `reference` is a parameter of the one type in `to_types`, pointing back at the
    `from_types`.
    """

    reference: str
    reverse: bool
    from_types: tuple[str, ...]
    to_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Criterion:
    """One occurrence of a search parameter: its values are ORed.

    With the `missing` modifier, `missing` says which way and `values` is empty.
    Unchained, `parameter` is one of the searched type's. Chained, `chain` leads
    from the searched type to the resources whose `parameter` is compared with the
    values (`target_types`). `name` is the parameter as the client wrote it, modifiers
    and chain included.
    """

    parameter: str
    type: ParameterType
    modifier: str | None
    values: tuple[SearchValue, ...]
    missing: bool | None = None
    chain: tuple[ChainLink, ...] = ()
    name: str = ""

    @property
    def chained(self) -> bool:
        """Whether the criterion follows any reference forward (`ref.param`)."""
        return any(not link.reverse for link in self.chain)

    @property
    def reverse_chained(self) -> bool:
        """Whether the criterion follows any reference backwards (`_has`)."""
        return any(link.reverse for link in self.chain)

    @property
    def target_types(self) -> tuple[str, ...]:
        """The types whose `parameter` is searched; empty when unchained (the searched type)."""
        return self.chain[-1].to_types if self.chain else ()


@dataclass(frozen=True, slots=True)
class SortKey:
    parameter: str
    type: ParameterType
    descending: bool = False


@dataclass(frozen=True, slots=True)
class Include:
    """`_include=Source:param[:Target]` or `_revinclude=Source:param[:Target]`."""

    source_type: str
    parameter: str
    target_type: str | None = None
    # `:iterate`: followed from what is included too, not from the matches alone.
    iterate: bool = False


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed search of one resource type; criteria are ANDed."""

    resource_type: str
    criteria: tuple[Criterion, ...] = ()
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: tuple[SortKey, ...] = ()
    include: tuple[Include, ...] = ()
    revinclude: tuple[Include, ...] = ()
    summary_count: bool = False
    total: Total = "accurate"
    # What of each match goes (`cpa_fhir.fhir.subset`): a summary, or the elements named.
    summary: Summary | None = None
    elements: frozenset[str] | None = None
    # Only matches whose id sorts after this one: the next page of a scan in the order
    # of ids (no `sort`), which a write between pages cannot shift.
    after_id: str | None = None


def split_escaped(value: str, separator: str) -> list[str]:
    """Split on `separator` where it is not escaped with a backslash; unescape the parts."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            escaped = next(chars, "")
            if escaped in (",", "|", "$", "\\"):
                current.append(escaped)
            else:
                current.append("\\" + escaped)
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _escaped_pieces(value: str, separator: str) -> list[str]:
    """Split on unescaped `separator`, keeping the other escapes for a later split."""
    parts: list[str] = []
    start = 0
    i = 0
    while i < len(value):
        if value[i] == "\\":
            i += 2
            continue
        if value[i] == separator:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    parts.append(value[start:])
    return parts


def parse_search(
    resource_type: str,
    params: Iterable[tuple[str, str]],
    parameters: SearchParameters | None = None,
) -> SearchQuery:
    """Parse a search of `resource_type`; raise `SearchError` for anything not understood."""
    registry = parameters if parameters is not None else default_search_parameters()
    if resource_type not in R4_RESOURCE_TYPES:
        raise SearchError(f"unknown resource type {resource_type!r}", code="not-supported")
    criteria: list[Criterion] = []
    sort: tuple[SortKey, ...] = ()
    include: list[Include] = []
    revinclude: list[Include] = []
    count, offset, summary_count = DEFAULT_COUNT, 0, False
    summary: Summary | None = None
    elements: frozenset[str] | None = None
    total: Total = "accurate"
    seen_result: set[str] = set()
    for raw_name, value in params:
        if not isinstance(raw_name, str) or not isinstance(value, str):
            raise SearchError("search parameters must be text")
        if _is_chained(raw_name):
            chained = _parse_chained_criterion(resource_type, raw_name, value, registry)
            if chained is not None:
                criteria.append(chained)
            continue
        name, _, modifier = raw_name.partition(":")
        if name in _RESULT_PARAMETERS:
            if name not in ("_include", "_revinclude"):
                if name in seen_result:
                    raise SearchError(f"{name} given more than once", expression=name)
                seen_result.add(name)
            # `recurse` is R3's name for `iterate`, which some clients still send.
            iterate = modifier in ("iterate", "recurse") and name in ("_include", "_revinclude")
            if modifier and not iterate:
                raise UnknownParameter(
                    f"{raw_name}: modifiers on {name} are not supported",
                    expression=raw_name,
                    code="not-supported",
                )
            if name == "_count":
                count = whole_number(name, value, MAX_COUNT)
            elif name == "_offset":
                offset = whole_number(name, value, MAX_OFFSET)
            elif name == "_sort":
                sort = _parse_sort(resource_type, value, registry)
            elif name == "_include":
                include.append(
                    _parse_include(resource_type, value, registry, reverse=False, iterate=iterate)
                )
            elif name == "_revinclude":
                revinclude.append(
                    _parse_include(resource_type, value, registry, reverse=True, iterate=iterate)
                )
            elif name == "_summary":
                if value not in ("count", "false", "true", "text", "data"):
                    raise SearchError(
                        f"_summary must be true, text, data, count or false, not {value!r}",
                        expression=name,
                    )
                summary_count = value == "count"
                summary = cast(Summary, value) if value in ("true", "text", "data") else None
            elif name == "_elements":
                try:
                    elements = requested_elements(resource_type, value)
                except SubsetError as exc:
                    raise SearchError(str(exc), expression=name) from None
            else:
                if value not in ("none", "estimate", "accurate"):
                    raise SearchError(
                        f"_total must be none, estimate or accurate, not {value!r}",
                        expression=name,
                    )
                total = cast(Total, value)
            continue
        criterion = _parse_criterion(resource_type, name, modifier or None, value, registry)
        if criterion is not None:
            criteria.append(criterion)
    _check_cost(criteria)
    if elements is not None and (summary is not None or summary_count):
        raise SearchError("_elements and _summary cannot be used together", expression="_elements")
    return SearchQuery(
        resource_type=resource_type,
        criteria=tuple(criteria),
        count=count,
        offset=offset,
        sort=sort,
        # Each is a statement of its own: one given twice is run once.
        include=tuple(dict.fromkeys(include)),
        revinclude=tuple(dict.fromkeys(revinclude)),
        summary_count=summary_count,
        total=total,
        summary=summary,
        elements=elements,
    )


def _check_cost(criteria: list[Criterion]) -> None:
    """SearchError (too-costly) for a search past `MAX_CRITERIA`, `MAX_SUBQUERIES`,
    `MAX_IDS` (in all) or `MAX_COMPARISONS`."""
    if len(criteria) > MAX_CRITERIA:
        raise SearchError(
            f"a search may have at most {MAX_CRITERIA} criteria, not {len(criteria)}",
            code="too-costly",
        )
    subqueries = sum(_branches(c) for c in criteria)
    if subqueries > MAX_SUBQUERIES:
        raise SearchError(
            f"the search's criteria come to {subqueries} subqueries, more than the "
            f"{MAX_SUBQUERIES} allowed: give fewer criteria, or name the target type of "
            "a chained reference (reference:Type.parameter)",
            code="too-costly",
        )
    ids = sum(len(c.values) for c in criteria if _ids(c))
    if ids > MAX_IDS:
        # Each id is a bound value, and PostgreSQL takes at most 65,535 a statement.
        raise SearchError(
            f"a search may list at most {MAX_IDS} ids in all, not {ids}", code="too-costly"
        )
    comparisons = sum(_branches(c) * max(1, len(c.values)) for c in criteria if not _ids(c))
    if comparisons > MAX_COMPARISONS:
        raise SearchError(
            f"the search's criteria come to {comparisons} comparisons, more than the "
            f"{MAX_COMPARISONS} allowed: give fewer values or criteria, or name the "
            "target type of a chained reference (reference:Type.parameter)",
            code="too-costly",
        )


def _branches(criterion: Criterion) -> int:
    """How many subqueries compare the criterion's values (see `_search_sql`): a
    forward link is one per type it may reach, each repeating the rest of the chain."""
    return math.prod(len(link.to_types) for link in criterion.chain if not link.reverse)


def _ids(criterion: Criterion) -> bool:
    """Whether the criterion is an unchained `_id`: one IN list, by primary key."""
    return criterion.parameter == "_id" and not criterion.chain


def whole_number(name: str, value: str, limit: int) -> int:
    """A query parameter's non-negative integer, at most `limit` (a larger one is
    read as `limit`); SearchError if it is not one."""
    if not re.fullmatch(r"\d+", value, re.ASCII):
        raise SearchError(f"{name} must be a non-negative integer, not {value!r}", expression=name)
    digits = value.lstrip("0")
    # Compared as text first: int() refuses thousands of digits.
    if len(digits) > len(str(limit)):
        return limit
    return min(int(digits or "0"), limit)


def _lookup(resource_type: str, name: str, registry: SearchParameters) -> SearchParameter:
    if name in _UNSUPPORTED:
        raise UnknownParameter(
            f"search parameter {name} is not supported", expression=name, code="not-supported"
        )
    parameter = registry.get(resource_type, name)
    if parameter is None:
        raise UnknownParameter(
            f"unknown search parameter {name!r} for {resource_type}", expression=name
        )
    return parameter


def known_parameters(
    resource_type: str,
    params: Iterable[tuple[str, str]],
    parameters: SearchParameters | None = None,
) -> tuple[list[tuple[str, str]], list[UnknownParameter]]:
    """The parameters of a search less those this server does not know or support
    (a name, a chain through one, or a modifier), and why each was left out: a
    search with lenient handling (https://hl7.org/fhir/R4/search.html#errors). A
    known parameter with a malformed value stays, for `parse_search` to refuse."""
    kept: list[tuple[str, str]] = []
    left_out: list[UnknownParameter] = []
    for param in params:
        try:
            parse_search(resource_type, [param], parameters)
        except UnknownParameter as exc:
            left_out.append(exc)
            continue
        except SearchError:
            pass
        kept.append(param)
    return kept, left_out


def _parse_criterion(
    resource_type: str,
    name: str,
    modifier: str | None,
    value: str,
    registry: SearchParameters,
) -> Criterion | None:
    parameter = _lookup(resource_type, name, registry)
    where = f"{name}:{modifier}" if modifier else name
    return _criterion_of(parameter, modifier, value, where, chained=False)


def _criterion_of(
    parameter: SearchParameter, modifier: str | None, value: str, where: str, *, chained: bool
) -> Criterion | None:
    code, kind = parameter.code, parameter.type
    if modifier is not None:
        _check_modifier(parameter, modifier, where)
    if modifier == "missing":
        if value not in ("true", "false"):
            raise SearchError(f"{where} must be true or false, not {value!r}", expression=where)
        return Criterion(code, kind, modifier, (), missing=value == "true", name=where)
    if "\x00" in value:
        # No stored text holds it (PostgreSQL's cannot, and writes refuse it), and
        # PostgreSQL refuses it as a value to compare with.
        raise SearchError(
            f"{where}: a search value cannot contain the NUL character", expression=where
        )
    if value == "":
        return None
    pieces = _escaped_pieces(value, ",")
    limit = MAX_IDS if code == "_id" and not chained else MAX_VALUES
    if len(pieces) > limit:
        raise SearchError(
            f"{where}: at most {limit} values may be given, not {len(pieces)}",
            expression=where,
            code="too-costly",
        )
    values = tuple(_parse_value(parameter, modifier, piece, where) for piece in pieces)
    return Criterion(code, kind, modifier, values, name=where)


# --- chains: https://hl7.org/fhir/R4/search.html#chaining and #has ------------------


@dataclass(frozen=True, slots=True)
class _Path:
    """Where (the rest of) a chained name leads from some resource types.

    `types` are those of the types at hand it can start from; `parameter` (merged
    over the types it is searched on) and `modifier` are the last parameter's.
    """

    types: tuple[str, ...]
    links: tuple[ChainLink, ...]
    parameter: SearchParameter
    modifier: str | None


def may_reach_types(
    resource_type: str, params: Iterable[tuple[str, str]], types: AbstractSet[str]
) -> bool:
    """Whether a search of `resource_type` with `params` may use the search index of
    resources of `types`: a search of one of them, or one whose criteria follow
    references to or from other types (a chain, `_has`), or include what refers to
    the matches (`_revinclude`) from one of them, or iterate. Judged from the names
    alone and erring towards yes: a parameter that would be refused says yes too."""
    if resource_type in types or resource_type not in R4_RESOURCE_TYPES:
        return True
    for name, value in params:
        if _is_chained(name) or name.startswith("_has"):
            return True
        base, _, modifier = name.partition(":")
        if base == "_revinclude":
            source = value.partition(":")[0]
            if modifier or source in types or source not in R4_RESOURCE_TYPES:
                return True  # iterating, from one of them, or `*`
        elif base == "_include" and modifier:
            return True
    return False


def _is_chained(raw_name: str) -> bool:
    return "." in raw_name or raw_name == "_has" or raw_name.startswith("_has:")


def _parse_chained_criterion(
    resource_type: str, raw_name: str, value: str, registry: SearchParameters
) -> Criterion | None:
    path = _resolve_path((resource_type,), raw_name, raw_name, registry, links=0)
    criterion = _criterion_of(path.parameter, path.modifier, value, raw_name, chained=True)
    return None if criterion is None else replace(criterion, chain=path.links)


def _resolve_path(
    types: tuple[str, ...], text: str, where: str, registry: SearchParameters, *, links: int
) -> _Path:
    """Resolve `text`, what remains of the chained name `where`, from resources of `types`."""
    if text == "_has" or text.startswith("_has:"):
        return _resolve_reverse(types, text, where, registry, links=links)
    head, dot, rest = text.partition(".")
    if not dot:
        name, _, modifier = text.partition(":")
        parameter, applicable = _shared_parameter(types, name, where, registry)
        return _Path(applicable, (), parameter, modifier or None)
    name, _, type_modifier = head.partition(":")
    if not name or not rest:
        raise SearchError(f"{where}: a chain is reference[:Type].parameter", expression=where)
    _check_chain_length(where, links + 1)
    reference, applicable = _shared_parameter(types, name, where, registry)
    if reference.type != "reference":
        raise SearchError(
            f"{where}: {name} is a {reference.type} parameter of {_either(applicable)}; "
            "only reference parameters can be chained",
            expression=where,
        )
    if type_modifier:
        if type_modifier not in R4_RESOURCE_TYPES:
            raise SearchError(
                f"{where}: {name}:{type_modifier} - only a resource type can qualify a "
                "reference in a chain",
                expression=where,
            )
        if reference.targets and type_modifier not in reference.targets:
            raise SearchError(
                f"{where}: {name} refers to {', '.join(reference.targets)}, not {type_modifier}",
                expression=where,
            )
        candidates: tuple[str, ...] = (type_modifier,)
    elif reference.targets:
        candidates = reference.targets
    else:
        raise SearchError(
            f"{where}: {name} may refer to any type; name one, as {name}:[Type].{rest}",
            expression=where,
        )
    onward = _resolve_path(candidates, rest, where, registry, links=links + 1)
    reached = set(onward.types)
    start = tuple(
        t
        for t in applicable
        if not (targets := _targets(registry, t, name)) or reached.intersection(targets)
    )
    link = ChainLink(name, reverse=False, from_types=start, to_types=onward.types)
    return _Path(start, (link, *onward.links), onward.parameter, onward.modifier)


def _resolve_reverse(
    types: tuple[str, ...], text: str, where: str, registry: SearchParameters, *, links: int
) -> _Path:
    parts = text.split(":", 3)
    if len(parts) != 4 or not all(parts[1:]):
        raise SearchError(
            f"{where}: _has is _has:Type:reference:parameter, as in "
            "_has:CarePlan:subject:status=active",
            expression=where,
        )
    _, source_type, name, rest = parts
    _check_chain_length(where, links + 1)
    if source_type not in R4_RESOURCE_TYPES:
        raise SearchError(f"{where}: {source_type!r} is not a resource type", expression=where)
    reference = registry.get(source_type, name)
    if reference is None:
        raise UnknownParameter(
            f"{where}: unknown search parameter {name!r} for {source_type}", expression=where
        )
    if reference.type != "reference":
        raise SearchError(
            f"{where}: {source_type}:{name} is a {reference.type} parameter, not a reference",
            expression=where,
        )
    referred = tuple(t for t in types if not reference.targets or t in reference.targets)
    if not referred:
        raise SearchError(
            f"{where}: {source_type}:{name} refers to {', '.join(reference.targets)}, "
            f"never to {_either(types)}",
            expression=where,
        )
    onward = _resolve_path((source_type,), rest, where, registry, links=links + 1)
    link = ChainLink(name, reverse=True, from_types=referred, to_types=(source_type,))
    return _Path(referred, (link, *onward.links), onward.parameter, onward.modifier)


def _shared_parameter(
    types: tuple[str, ...], name: str, where: str, registry: SearchParameters
) -> tuple[SearchParameter, tuple[str, ...]]:
    """The parameter `name` of whichever of `types` have it, and those types.

    A chain through a reference that may point at several types searches each target
    type that has the parameter; where its type differs between them the chain is
    ambiguous and refused, as https://hl7.org/fhir/R4/search.html#chaining advises.
    """
    if name in _UNSUPPORTED or name in _RESULT_PARAMETERS:
        raise UnknownParameter(
            f"{where}: {name} cannot be used in a chain", expression=where, code="not-supported"
        )
    found = {t: p for t in types if (p := registry.get(t, name)) is not None}
    if not found:
        raise UnknownParameter(
            f"{where}: unknown search parameter {name!r} for {_either(types)}", expression=where
        )
    kinds: dict[str, list[str]] = {}
    for resource_type, parameter in found.items():
        kinds.setdefault(parameter.type, []).append(resource_type)
    if len(kinds) > 1:
        described = "; ".join(f"{kind} on {', '.join(ts)}" for kind, ts in kinds.items())
        raise SearchError(
            f"{where}: {name} is ambiguous ({described}); choose one of "
            f"{', '.join(found)} with a :[Type] modifier on the reference before it",
            expression=where,
        )
    first = next(iter(found.values()))
    targets: tuple[str, ...] = ()
    if all(p.targets for p in found.values()):
        targets = tuple(sorted({t for p in found.values() for t in p.targets}))
    return replace(first, targets=targets), tuple(found)


def _targets(registry: SearchParameters, resource_type: str, name: str) -> tuple[str, ...]:
    parameter = registry.get(resource_type, name)
    return parameter.targets if parameter is not None else ()


def _check_chain_length(where: str, links: int) -> None:
    if links > MAX_CHAIN_LINKS:
        raise SearchError(
            f"{where}: chains of more than {MAX_CHAIN_LINKS} links are not supported",
            expression=where,
            code="not-supported",
        )


def _either(types: Iterable[str]) -> str:
    return " or ".join(types)


def _check_modifier(parameter: SearchParameter, modifier: str, where: str) -> None:
    if parameter.code in COLUMN_PARAMETERS:
        raise UnknownParameter(f"{where}: {parameter.code} takes no modifier", expression=where)
    if modifier in _MODIFIERS[parameter.type]:
        return
    if parameter.type == "reference" and modifier in R4_RESOURCE_TYPES:
        if parameter.targets and modifier not in parameter.targets:
            raise SearchError(
                f"{where}: {parameter.code} refers to {', '.join(parameter.targets)}, "
                f"not {modifier}",
                expression=where,
            )
        return
    if modifier in _KNOWN_UNSUPPORTED_MODIFIERS:
        raise UnknownParameter(
            f"{where}: modifier :{modifier} is not supported",
            expression=where,
            code="not-supported",
        )
    raise UnknownParameter(
        f"modifier :{modifier} does not apply to {parameter.type} parameter {parameter.code}",
        expression=where,
    )


def _parse_value(
    parameter: SearchParameter, modifier: str | None, raw: str, where: str
) -> SearchValue:
    kind = parameter.type
    if kind == "date":
        return _parse_date(raw, where)
    if kind in ("number", "quantity"):
        return _parse_number(raw, where, quantity=kind == "quantity")
    if kind == "reference":
        return _parse_reference(parameter, modifier, split_escaped(raw, ",")[0], where)
    if kind == "string":
        text = split_escaped(raw, ",")[0]
        return StringValue(text, normalise(text)[:INDEXED_STRING_CHARS])
    if kind == "uri":
        return TokenValue(None, indexed_token(split_escaped(raw, ",")[0]), any_system=True)
    return _parse_token(parameter, raw, where)


def _parse_token(parameter: SearchParameter, raw: str, where: str) -> TokenValue:
    pieces = _escaped_pieces(raw, "|")
    if len(pieces) > 2:
        raise SearchError(f"{where}: a token is [system|]code, not {raw!r}", expression=where)
    if parameter.code == "_id":
        identifier = split_escaped(raw, ",")[0]
        if not _ID.fullmatch(identifier):
            raise SearchError(f"_id: {raw!r} is not a resource id", expression=where)
        return TokenValue(None, identifier, any_system=True)
    # Compared as the index holds them: a long one by its beginning.
    if len(pieces) == 1:
        return TokenValue(None, indexed_token(split_escaped(pieces[0], "|")[0]), any_system=True)
    system, code = (split_escaped(p, "|")[0] for p in pieces)
    if not system and not code:
        raise SearchError(f"{where}: {raw!r} names neither a system nor a code", expression=where)
    return TokenValue(indexed_token(system or None), indexed_token(code or None), any_system=False)


def _split_prefix(raw: str) -> tuple[Prefix, str]:
    if raw[:2] in PREFIXES and len(raw) > 2:
        return cast(Prefix, raw[:2]), raw[2:]
    return "eq", raw


def _parse_date(raw: str, where: str) -> DateValue:
    prefix, text = _split_prefix(raw)
    found = date_range(text)
    if found is None:
        raise SearchError(
            f"{where}: {raw!r} is not a date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime, "
            f"optionally after a prefix {', '.join(PREFIXES)})",
            expression=where,
        )
    return DateValue(prefix, found[0], found[1])


def _parse_number(raw: str, where: str, *, quantity: bool) -> NumberValue:
    pieces = split_escaped(raw, "|") if quantity else [raw]
    if len(pieces) not in (1, 3):
        raise SearchError(
            f"{where}: a quantity is [prefix]number[|system|code], not {raw!r}", expression=where
        )
    prefix, text = _split_prefix(pieces[0])
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = Decimal("NaN")
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text) or not number.is_finite():
        raise SearchError(f"{where}: {raw!r} is not a number", expression=where)
    exponent = int(number.as_tuple().exponent)
    value = float(number)
    # Stored numbers are doubles: a value or precision far outside their range
    # (1e9999999, 1e-9999999, 0e-9999999) has no meaning to compare with here.
    if (
        math.isinf(value)
        or (value == 0 and not number.is_zero())
        or not -_MAX_EXPONENT <= exponent <= _MAX_EXPONENT
    ):
        raise SearchError(
            f"{where}: {raw!r} is not a number this server can search with", expression=where
        )
    half = Decimal(5).scaleb(exponent - 1)
    # Within a double's range, so that no bound is infinite.
    low = max(float(number - half), -sys.float_info.max)
    high = min(float(number + half), sys.float_info.max)
    system = pieces[1] or None if len(pieces) == 3 else None
    code = pieces[2] or None if len(pieces) == 3 else None
    return NumberValue(prefix, value, low, high, system, code)


def _parse_reference(
    parameter: SearchParameter, modifier: str | None, raw: str, where: str
) -> ReferenceValue:
    if "://" in raw or raw.startswith("urn:"):
        return ReferenceValue(None, None, raw)
    parts = raw.split("/")
    if len(parts) == 4 and parts[2] == "_history":
        parts = parts[:2]
    if len(parts) == 1:
        target_type = modifier
        if target_type is None and len(parameter.targets) == 1:
            target_type = parameter.targets[0]
        target_id = parts[0]
    elif len(parts) == 2:
        target_type, target_id = parts
        if target_type not in R4_RESOURCE_TYPES:
            raise SearchError(f"{where}: {target_type!r} is not a resource type", expression=where)
        if modifier is not None and modifier != target_type:
            raise SearchError(f"{where}: {raw!r} is not a {modifier} reference", expression=where)
        if parameter.targets and target_type not in parameter.targets:
            raise SearchError(
                f"{where}: {parameter.code} refers to {', '.join(parameter.targets)}, "
                f"not {target_type}",
                expression=where,
            )
    else:
        raise SearchError(f"{where}: {raw!r} is not [Type/]id or a url", expression=where)
    if not _ID.fullmatch(target_id):
        raise SearchError(f"{where}: {target_id!r} is not a resource id", expression=where)
    return ReferenceValue(target_type, target_id)


def _parse_sort(resource_type: str, value: str, registry: SearchParameters) -> tuple[SortKey, ...]:
    keys: list[SortKey] = []
    for item in value.split(","):
        descending = item.startswith("-")
        name = item[1:] if descending else item
        if not name:
            raise SearchError(f"_sort: {value!r} has an empty item", expression="_sort")
        if _is_chained(name):
            raise SearchError(
                f"_sort: sorting by a chained parameter ({name}) is not supported",
                expression="_sort",
                code="not-supported",
            )
        parameter = _lookup(resource_type, name, registry)
        if parameter.type not in _SORTABLE:
            raise SearchError(
                f"_sort: sorting by {parameter.type} parameter {name} is not supported",
                expression="_sort",
                code="not-supported",
            )
        keys.append(SortKey(name, parameter.type, descending))
    return tuple(keys)


def _parse_include(
    resource_type: str, value: str, registry: SearchParameters, *, reverse: bool, iterate: bool
) -> Include:
    """An `_include` starts at the type searched and a `_revinclude` ends there, unless
    iterated: then either may start or end at any type (a Target type, if given,
    narrows which)."""
    name = ("_revinclude" if reverse else "_include") + (":iterate" if iterate else "")
    parts = value.split(":")
    if value == "*" or "*" in parts:
        raise UnknownParameter(f"{name}=* is not supported", expression=name, code="not-supported")
    if len(parts) not in (2, 3):
        raise SearchError(
            f"{name} must be SourceType:parameter[:TargetType], not {value!r}", expression=name
        )
    source, code = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if source not in R4_RESOURCE_TYPES or (target is not None and target not in R4_RESOURCE_TYPES):
        raise SearchError(f"{name}: {value!r} names an unknown resource type", expression=name)
    if not reverse and not iterate and source != resource_type:
        raise SearchError(
            f"_include: {value!r} starts at {source}, but the search is of {resource_type}",
            expression=name,
        )
    parameter = registry.get(source, code)
    if parameter is None:
        # Unknown, as an unknown criterion is: left out of a lenient search.
        raise UnknownParameter(
            f"{name}: {source} has no search parameter {code!r}", expression=name
        )
    if parameter.type != "reference":
        raise SearchError(
            f"{name}: {source} has no reference search parameter {code!r}", expression=name
        )
    if target is not None and parameter.targets and target not in parameter.targets:
        raise SearchError(
            f"{name}: {source}:{code} refers to {', '.join(parameter.targets)}, not {target}",
            expression=name,
        )
    if reverse and not iterate:
        if target is not None and target != resource_type:
            raise SearchError(
                f"_revinclude: {value!r} targets {target}, but the search is of {resource_type}",
                expression=name,
            )
        if parameter.targets and resource_type not in parameter.targets:
            raise SearchError(
                f"_revinclude: {source}:{code} never refers to {resource_type}", expression=name
            )
        target = resource_type
    return Include(source, code, target, iterate)


def local_references(query: SearchQuery, base: str) -> SearchQuery:
    """A search with each reference value that is an absolute URL of a resource here
    (`[base]/Type/id`, of a version too) taken as the relative `Type/id` it resolves
    to: "A relative reference resolving to the same value as a specified absolute URL,
    or vice versa, qualifies as a match" (R4 search.html#reference). Another server's
    URL is compared as it is written."""
    prefix = f"{base.rstrip('/')}/"

    def local(value: SearchValue, modifier: str | None) -> SearchValue:
        if not isinstance(value, ReferenceValue) or value.url is None:
            return value
        if not value.url.startswith(prefix):
            return value
        parts = value.url[len(prefix) :].split("/")
        if len(parts) == 4 and parts[2] == "_history":
            parts = parts[:2]
        if (
            len(parts) != 2
            or parts[0] not in R4_RESOURCE_TYPES
            or not _ID.fullmatch(parts[1])
            or (modifier in R4_RESOURCE_TYPES and modifier != parts[0])
        ):
            return value
        return ReferenceValue(parts[0], parts[1])

    criteria = tuple(
        replace(c, values=tuple(local(v, c.modifier) for v in c.values))
        if any(isinstance(v, ReferenceValue) and v.url is not None for v in c.values)
        else c
        for c in query.criteria
    )
    return replace(query, criteria=criteria)
