"""SearchParameter expressions as fast path walkers over resource dicts.

A SearchParameter says what it indexes with a FHIRPath expression
(https://hl7.org/fhir/R4/searchparameter-definitions.html#SearchParameter.expression).
Nearly all of them are simple paths, so the common shapes are compiled here into
plain dict walks, which are much faster than a FHIRPath engine:

    Type.a.b                    (Type.a | Type.b)        Type.a.where(resolve() is X)
    Type.a as X   Type.a.as(X)   Type.a.ofType(X)         Type.a.where(b='literal')
    Type.extension('url')       Type.a.where(b.c.empty())   Type.a.where(b.exists())

Anything else is evaluated by fhirpathpy with the R4 model
(https://hl7.org/fhirpath/N1/). `resolve() is X` needs no server here: the type is
read from the reference itself, which is what a search index can know.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhirpathpy import compile as compile_fhirpath
from fhirpathpy.models import models as fhirpath_models

Evaluator = Callable[[dict[str, Any]], list[Any]]

# Suffixes a choice element's JSON key can carry (value[x] -> valueQuantity ...):
# every R4 data type, capitalised (https://hl7.org/fhir/R4/datatypes.html).
CHOICE_TYPE_SUFFIXES: frozenset[str] = frozenset(
    """Base64Binary Boolean Canonical Code Date DateTime Decimal Id Instant Integer Markdown
    Oid PositiveInt String Time UnsignedInt Uri Url Uuid Address Age Annotation Attachment
    CodeableConcept Coding ContactPoint Count Distance Duration HumanName Identifier Money
    Period Quantity Range Ratio Reference SampledData Signature Timing ContactDetail
    Contributor DataRequirement Expression ParameterDefinition RelatedArtifact
    TriggerDefinition UsageContext Dosage Meta""".split()
)
_ABSTRACT_ROOTS = frozenset({"Resource", "DomainResource"})
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FHIRPATH_MODEL = fhirpath_models["r4"]
_FHIRPATH_OPTIONS = {"traceFn": lambda *args: None}
# Names that are a choice element ([x]) somewhere in R4: only these may appear in
# JSON with a type suffix, so only these need looking for under other keys.
_CHOICE_NAMES = frozenset(path.rsplit(".", 1)[-1] for path in _FHIRPATH_MODEL["choiceTypePaths"])


# --- steps ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    """`.name`, or `.name.ofType(T)` when `choice_type` is set."""

    name: str
    choice_type: str | None = None
    # The JSON keys `name` takes if it is a choice element (value -> valueString, ...).
    choice_keys: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.name in _CHOICE_NAMES:
            keys = frozenset(self.name + suffix for suffix in CHOICE_TYPE_SUFFIXES)
            object.__setattr__(self, "choice_keys", keys)

    def apply(self, items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            if self.choice_type is not None:
                value = item.get(self.name + self.choice_type[0].upper() + self.choice_type[1:])
                if value is None:
                    value = item.get(self.name)
            else:
                value = item.get(self.name)
                if value is None and self.choice_keys:
                    # Most absent choices are absent: a set intersection in C says so
                    # without a look at every key.
                    present = item.keys() & self.choice_keys
                    value = item[min(present)] if present else None
            if value is None:
                continue
            if isinstance(value, list):
                out.extend(v for v in value if v is not None)
            else:
                out.append(value)
        return out


@dataclass(frozen=True, slots=True)
class _Extension:
    """`.extension('url')`."""

    url: str

    def apply(self, items: list[Any]) -> list[Any]:
        return [
            ext
            for item in items
            if isinstance(item, dict) and isinstance(item.get("extension"), list)
            for ext in item["extension"]
            if isinstance(ext, dict) and ext.get("url") == self.url
        ]


@dataclass(frozen=True, slots=True)
class _ResolveIs:
    """`.where(resolve() is T)`: references whose own text names type T."""

    target_type: str

    def apply(self, items: list[Any]) -> list[Any]:
        return [
            item
            for item in items
            if isinstance(item, dict) and reference_type(item.get("reference")) == self.target_type
        ]


@dataclass(frozen=True, slots=True)
class _FieldEquals:
    """`.where(name='literal')`."""

    name: str
    literal: str

    def apply(self, items: list[Any]) -> list[Any]:
        return [i for i in items if isinstance(i, dict) and i.get(self.name) == self.literal]


@dataclass(frozen=True, slots=True)
class _WhereExists:
    """`.where(path.exists())` or, negated, `.where(path.empty())`."""

    steps: tuple[_Step, ...]
    negate: bool

    def apply(self, items: list[Any]) -> list[Any]:
        return [i for i in items if bool(_walk([i], self.steps)) != self.negate]


_Step = _Field | _Extension | _ResolveIs | _FieldEquals | _WhereExists


def _walk(items: list[Any], steps: tuple[_Step, ...]) -> list[Any]:
    for step in steps:
        if not items:
            return items
        items = step.apply(items)
    return items


def reference_type(reference: Any) -> str | None:
    """The resource type a literal reference names (`Patient/1`, `https://x/Patient/1`)."""
    if not isinstance(reference, str) or reference.startswith("#"):
        return None
    parts = reference.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2]
    return None


# --- parsing the supported shapes ------------------------------------------------------


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on a one-character separator outside parentheses and quotes."""
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for i, char in enumerate(text):
        if char == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _strip_parens(text: str) -> str:
    text = text.strip()
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    return text


def _balanced(text: str) -> bool:
    depth = 0
    quoted = False
    for char in text:
        if char == "'":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not quoted


def _call(segment: str, name: str) -> str | None:
    """The argument text of `name(...)`, or None when the segment is not that call."""
    if segment.startswith(name + "(") and segment.endswith(")"):
        return segment[len(name) + 1 : -1].strip()
    return None


def _string_literal(text: str) -> str | None:
    if len(text) >= 2 and text[0] == text[-1] == "'" and "'" not in text[1:-1]:
        return text[1:-1]
    return None


def _compile_steps(segments: list[str]) -> tuple[_Step, ...] | None:
    steps: list[_Step] = []
    for segment in segments:
        type_filter = _call(segment, "ofType") or _call(segment, "as")
        if type_filter is not None:
            # A type filter only makes sense on the choice element just walked.
            last = steps[-1] if steps else None
            if not _IDENT.fullmatch(type_filter) or not isinstance(last, _Field):
                return None
            steps[-1] = _Field(last.name, type_filter)
            continue
        step = _compile_segment(segment)
        if step is None:
            return None
        steps.append(step)
    return tuple(steps)


def _compile_segment(segment: str) -> _Step | None:
    if _IDENT.fullmatch(segment):
        return _Field(segment)
    arg = _call(segment, "extension")
    if arg is not None:
        url = _string_literal(arg)
        return _Extension(url) if url is not None else None
    arg = _call(segment, "where")
    if arg is None:
        return None
    match = re.fullmatch(r"resolve\(\)\s+is\s+([A-Za-z]+)", arg)
    if match:
        return _ResolveIs(match.group(1))
    match = re.fullmatch(r"([A-Za-z]+)\s*=\s*('[^']*')", arg)
    if match:
        return _FieldEquals(match.group(1), match.group(2)[1:-1])
    inner = split_top_level(arg, ".")
    if len(inner) >= 2 and inner[-1] in ("empty()", "exists()"):
        sub = _compile_steps(inner[:-1])
        return _WhereExists(sub, negate=inner[-1] == "empty()") if sub is not None else None
    return None


def _compile_branch(branch: str) -> tuple[str, tuple[_Step, ...]] | None:
    branch = _strip_parens(branch)
    cast: str | None = None
    match = re.fullmatch(r"(.*\S)\s+as\s+([A-Za-z]+)", branch)
    if match:
        branch, cast = _strip_parens(match.group(1)), match.group(2)
    segments = split_top_level(branch, ".")
    if not segments or not _IDENT.fullmatch(segments[0]):
        return None
    if cast is not None:
        segments.append(f"ofType({cast})")
    steps = _compile_steps(segments[1:])
    return (segments[0], steps) if steps is not None else None


def compile_path(expression: str) -> Evaluator | None:
    """A fast evaluator for a supported expression shape, or None to use FHIRPath."""
    branches: list[tuple[str, tuple[_Step, ...]]] = []
    for text in split_top_level(_strip_parens(expression), "|"):
        compiled = _compile_branch(text)
        if compiled is None:
            return None
        branches.append(compiled)

    def evaluate(resource: dict[str, Any]) -> list[Any]:
        resource_type = resource.get("resourceType")
        out: list[Any] = []
        for root, steps in branches:
            if root == resource_type or root in _ABSTRACT_ROOTS:
                out.extend(_walk([resource], steps))
        return out

    return evaluate


def _plain(value: Any) -> Any:
    """fhirpathpy's own value types (dates, quantities) as the JSON they came from."""
    if value is None or isinstance(value, dict | list | str | bool | int | float):
        return value
    return str(value)


def compile_fhirpath_evaluator(expression: str) -> Evaluator:
    """An evaluator for any expression: a compiled walker, else fhirpathpy.

    A fhirpathpy failure on one resource yields no values rather than an error, so that
    one odd resource cannot stop it being stored; the expression itself must compile.
    """
    fast = compile_path(expression)
    if fast is not None:
        return fast
    slow = compile_fhirpath(expression, _FHIRPATH_MODEL, _FHIRPATH_OPTIONS)

    def evaluate(resource: dict[str, Any]) -> list[Any]:
        try:
            result = slow(resource, {"resource": resource, "rootResource": resource})
        except Exception:  # fhirpathpy raises many exception types on odd input
            return []
        return [_plain(v) for v in result if v is not None]

    return evaluate
