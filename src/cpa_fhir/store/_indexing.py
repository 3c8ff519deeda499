"""The search-index rows of one resource: https://hl7.org/fhir/R4/search.html

Each parameter's expression picks elements out of the resource; each element becomes
rows by the parameter's type (https://hl7.org/fhir/R4/search.html#ptypes):

- token: (system, code) of each Coding (also inside a CodeableConcept), Identifier
  (system, value), ContactPoint (value), and code, boolean, string, id, uri primitives;
- string: the text, and for HumanName and Address each part, both as written (for
  `:exact`) and normalised (case-folded, accents stripped) for the default match;
- reference: target type and id of a relative `Type/id` (or of an absolute URL
  ending in one), and the URL itself when absolute; canonicals as URLs;
- date: [low, high) ranges in UTC microseconds (see `_dates`);
- uri: the value, as a token without a system;
- number, quantity: the value, and a Quantity's system and code (or unit).

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cpa_fhir.fhir import jsonio
from cpa_fhir.store._dates import value_ranges
from cpa_fhir.store._search_parameters import SearchParameter

# How much of a string (normalised) and of a token's code and system the index holds,
# in characters: a B-tree entry has a bound (PostgreSQL's is 2,704 bytes, whatever
# the text), and at four bytes a character these keep every entry under it. A
# longer string is indexed, and searched for, by its beginning, as HAPI FHIR does
# (a string matches by its beginning anyway; `:exact` compares the whole value,
# kept outside the index). A longer token is indexed as its beginning and a digest
# of the whole (`indexed_token`), so that it still matches only itself: a
# conditional create or update by a long identifier must not take another's.
INDEXED_STRING_CHARS = 512
INDEXED_TOKEN_CHARS = 256

_NAME_PARTS = ("text", "family", "given", "prefix", "suffix")
_ADDRESS_PARTS = ("text", "line", "city", "district", "state", "postalCode", "country")


@dataclass(slots=True)
class IndexRows:
    """Rows for each index table, without the resource's own type and id."""

    tokens: set[tuple[str, str | None, str]] = field(default_factory=set)
    strings: set[tuple[str, str, str]] = field(default_factory=set)
    references: set[tuple[str, str | None, str | None, str | None]] = field(default_factory=set)
    dates: set[tuple[str, int, int]] = field(default_factory=set)
    numbers: set[tuple[str, float, str | None, str | None]] = field(default_factory=set)

    def count(self) -> int:
        return (
            len(self.tokens)
            + len(self.strings)
            + len(self.references)
            + len(self.dates)
            + len(self.numbers)
        )

    def union(self, other: IndexRows) -> IndexRows:
        return IndexRows(
            self.tokens | other.tokens,
            self.strings | other.strings,
            self.references | other.references,
            self.dates | other.dates,
            self.numbers | other.numbers,
        )


def normalise(text: str) -> str:
    """Case-folded, accents stripped: how `string` parameters compare by default.

    Unicode's compatibility caseless form (The Unicode Standard, D146): decomposing
    can reveal letters with case (a mathematical capital alpha is a capital alpha),
    so folding once is not enough for the result to stay put when normalised again.
    """
    folded = unicodedata.normalize("NFD", text).casefold()
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", folded).casefold())
    return "".join(c for c in folded if not unicodedata.combining(c))


def indexed_token(text: str | None) -> Any:
    """A token's system or code as the index holds it: itself, or, past
    `INDEXED_TOKEN_CHARS`, its beginning, `#` and the SHA-256 of the whole, in as
    many characters."""
    if text is None or len(text) <= INDEXED_TOKEN_CHARS:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{text[: INDEXED_TOKEN_CHARS - len(digest) - 1]}#{digest}"


def index_resource(resource: dict[str, Any], parameters: Iterable[SearchParameter]) -> IndexRows:
    rows = IndexRows()
    for parameter in parameters:
        values = parameter.evaluate(resource)
        if not values:
            continue
        code = parameter.code
        kind = parameter.type
        if kind == "token":
            rows.tokens.update(
                (code, indexed_token(s), indexed_token(c)) for v in values for s, c in _tokens(v)
            )
        elif kind == "uri":
            rows.tokens.update((code, None, indexed_token(v)) for v in values if isinstance(v, str))
        elif kind == "string":
            rows.strings.update(
                (code, s, normalise(s)[:INDEXED_STRING_CHARS]) for v in values for s in _strings(v)
            )
        elif kind == "reference":
            rows.references.update((code, *r) for v in values if (r := reference_target(v)))
        elif kind == "date":
            rows.dates.update((code, lo, hi) for v in values for lo, hi in value_ranges(v))
        else:
            rows.numbers.update((code, *n) for v in values if (n := _number(v)))
    return rows


def _tokens(value: Any) -> list[tuple[str | None, str]]:
    if isinstance(value, bool):
        return [(None, "true" if value else "false")]
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, int | float):
        return [(None, str(value))]
    if not isinstance(value, dict):
        return []
    if isinstance(value.get("coding"), list):  # CodeableConcept
        return [t for coding in value["coding"] for t in _tokens(coding)]
    system = value.get("system") if isinstance(value.get("system"), str) else None
    if isinstance(value.get("code"), str):  # Coding
        return [(system, value["code"])]
    if isinstance(value.get("value"), str):  # Identifier, ContactPoint
        is_contact_point = system in _CONTACT_POINT_SYSTEMS and "type" not in value
        return [(None if is_contact_point else system, value["value"])]
    return []


# ContactPoint.system codes: a ContactPoint's token is its value alone.
_CONTACT_POINT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, dict):
        return []
    parts = _NAME_PARTS if ("family" in value or "given" in value) else _ADDRESS_PARTS
    out: list[str] = []
    for part in parts:
        item = value.get(part)
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            out.extend(i for i in item if isinstance(i, str))
    if not out and isinstance(value.get("text"), str):
        out.append(value["text"])
    return out


def reference_target(value: Any) -> tuple[str | None, str | None, str | None] | None:
    """(target type, target id, absolute url) of a Reference or canonical."""
    text = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(text, str) or not text or text.startswith("#"):
        return None
    absolute = "://" in text or text.startswith("urn:")
    parts = text.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-1]:
        return parts[-2], parts[-1], text if absolute else None
    return (None, None, text) if absolute else None


def _number(value: Any) -> tuple[float, str | None, str | None] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value), None, None
    if isinstance(value, str):
        try:
            return float(value), None, None
        except ValueError:
            return None
    if isinstance(value, dict) and isinstance(value.get("value"), int | float):
        system = value.get("system")
        code = value.get("code") or value.get("unit")
        return (
            float(value["value"]),
            system if isinstance(system, str) else None,
            code if isinstance(code, str) else None,
        )
    return None


# The elements in which the records a server makes from one template differ: an
# AuditEvent's id and time, and the version metadata the store stamps.
RECORD_VARYING = frozenset({"id", "recorded"})
META_VARYING = frozenset({"lastUpdated", "versionId"})
# FHIRPath functions that reach elements without naming them.
_UNNAMED_REACH = frozenset({"descendants", "children", "repeat", "trace", "extension"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `meta` itself, not one of its parts that templates share
_WHOLE_META = re.compile(r"\bmeta\b(?!\.(?:profile|security|tag|source)\b)")


class RecordIndexer:
    """`index_resource` for records made from templates, alike but for `RECORD_VARYING`
    and `META_VARYING` (the AuditEvents of disclosures that differ only in id and time).

    Parameters whose expression names none of those elements (nor reaches elements
    unnamed) give the same rows for every record of a template: they are indexed
    once per template, keyed by the rest of the record, and only the others each time.
    """

    def __init__(self, *, max_templates: int = 4096) -> None:
        self.max_templates = max_templates
        self._templates: dict[bytes, IndexRows] = {}
        # id of a parameter tuple -> (the tuple, kept so that its id stays its own; the
        # parameters that read no varying element; those that may)
        self._split: dict[int, tuple[Any, list[SearchParameter], list[SearchParameter]]] = {}

    def index(self, resource: dict[str, Any], parameters: tuple[SearchParameter, ...]) -> IndexRows:
        steady, varying = self._split_parameters(parameters)
        rest = {k: v for k, v in resource.items() if k not in RECORD_VARYING}
        meta = rest.get("meta")
        if isinstance(meta, dict):
            rest["meta"] = {k: v for k, v in meta.items() if k not in META_VARYING}
        key = jsonio.dumps(rest, option=orjson.OPT_SORT_KEYS)
        rows = self._templates.get(key)
        if rows is None:
            if len(self._templates) >= self.max_templates:
                self._templates.clear()
            rows = self._templates[key] = index_resource(rest, steady)
        return rows.union(index_resource(resource, varying)) if varying else rows

    def _split_parameters(
        self, parameters: tuple[SearchParameter, ...]
    ) -> tuple[list[SearchParameter], list[SearchParameter]]:
        known = self._split.get(id(parameters))
        if known is not None and known[0] is parameters:
            return known[1], known[2]
        steady: list[SearchParameter] = []
        varying: list[SearchParameter] = []
        for p in parameters:
            names = set(_NAME.findall(p.expression))
            reads_varying = (
                names & (RECORD_VARYING | META_VARYING | _UNNAMED_REACH)
                or _WHOLE_META.search(p.expression) is not None
            )
            (varying if reads_varying else steady).append(p)
        self._split[id(parameters)] = (parameters, steady, varying)
        return steady, varying
