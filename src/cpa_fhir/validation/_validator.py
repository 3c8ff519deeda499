"""The validator: JSON in, OperationOutcome issues out (pure; the package is passed in).

Order of checks for each input:
1. JSON well-formedness, and that it is a FHIR R4 resource (`resourceType`).
2. R4 structure: the fhir.resources R4B model parses it (primitive formats,
   types); R4B-only types and elements are refused by the R4 definitions.
3. Each declared (or the named) profile: the profile chain's snapshot walked
   element by element (see `_walker`).
4. For Bundles: every entry as a resource, references between entries, and for
   a patient record (a `collection` Bundle with one Patient) the record rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import date, datetime
from decimal import Decimal
from functools import cached_property
from typing import Any

import orjson
from fhirpathpy import compile as compile_fhirpath
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as fhirpath_models
from pydantic import ValidationError

from cpa_fhir.conformance.package import ConformancePackage
from cpa_fhir.fhir import jsonio
from cpa_fhir.fhir.models import (
    FHIR_VERSION,
    R4_RESOURCE_TYPES,
    bundle_entries,
    declared_profiles,
    model_class,
)
from cpa_fhir.fhir.outcome import Issue, sort_issues
from cpa_fhir.validation._bundle import check_bundle
from cpa_fhir.validation._fhirpath import compile_fast
from cpa_fhir.validation._record_rules import check_record
from cpa_fhir.validation._references import check_references
from cpa_fhir.validation._tree import Node, compile_tree
from cpa_fhir.validation._walker import Walk

BASE = "http://hl7.org/fhir/StructureDefinition/"
_FHIRPATH_MODEL = fhirpath_models["r4"]


# trace() in some core invariants would otherwise print to standard output.
def _has_value(inputs: list[Any]) -> list[bool]:
    """FHIRPath hasValue(): one primitive with a value (not extensions alone)."""
    return [len(inputs) == 1 and isinstance(inputs[0], (str, bool, int, float, Decimal))]


# hasValue() is FHIR's addition to FHIRPath (https://hl7.org/fhir/R4/fhirpath.html#functions),
# which fhirpathpy leaves out: without it base invariants such as per-1 (a period
# ends after it starts) could not run.
_FHIRPATH_OPTIONS = {
    "traceFn": lambda *args: None,
    "userInvocationTable": {"hasValue": {"fn": _has_value, "arity": {0: []}}},
}


class Validator:
    """Validates resources and Bundles against a conformance package."""

    def __init__(self, package: ConformancePackage):
        self.package = package
        self._trees: dict[str, Node | None] = {}
        self._datatypes: dict[str, Node | None] = {}
        # expression -> (fhirpathpy's compiled form, the fast path or None)
        self._compiled: dict[str, tuple[Any, Any]] = {}
        # Nodes live as long as this validator's trees, so their ids are stable keys.
        self.children_cache: dict[tuple[int, str, str], dict[str, Node]] = {}

    # -- definitions -----------------------------------------------------------
    def tree_for_url(self, url: str) -> Node | None:
        url = url.split("|", 1)[0]
        if url not in self._trees:
            sd = self.package.resolve(url)
            elements = (sd or {}).get("snapshot", {}).get("element") if sd else None
            if sd is None or sd.get("resourceType") != "StructureDefinition" or not elements:
                self._trees[url] = None
            else:
                self._trees[url] = compile_tree(elements)
        return self._trees[url]

    def tree_for_type(self, type_code: str) -> Node | None:
        return self.tree_for_url(BASE + type_code)

    def datatype_tree(self, type_code: str) -> Node | None:
        """A complex datatype's base definition, when it carries invariants to run on
        every value of the type; None otherwise."""
        if type_code not in self._datatypes:
            tree = self.tree_for_type(type_code) if type_code[:1].isupper() else None
            kind = self.package.resolve(BASE + type_code) if tree is not None else None
            self._datatypes[type_code] = (
                tree
                if tree is not None
                and tree.constraints
                and (kind or {}).get("kind") == "complex-type"
                else None
            )
        return self._datatypes[type_code]

    @cached_property
    def all_type_names(self) -> frozenset[str]:
        names = set()
        for url, sd in self.package.core.items():
            if (
                sd.get("resourceType") == "StructureDefinition"
                and sd.get("kind")
                in (
                    "primitive-type",
                    "complex-type",
                )
                and url.startswith(BASE)
            ):
                names.add(sd["type"][:1].upper() + sd["type"][1:])
        return frozenset(names)

    @cached_property
    def _core_constraint_keys(self) -> frozenset[str]:
        return frozenset(
            c["key"]
            for sd in self.package.core.values()
            for el in sd.get("snapshot", {}).get("element", [])
            for c in el.get("constraint", [])
            if "key" in c
        )

    def is_core_constraint(self, constraint: dict[str, Any]) -> bool:
        """Whether an invariant comes from FHIR R4 itself rather than a profile."""
        source = str(constraint.get("source", ""))
        if source:
            return source.startswith("http://hl7.org/fhir/")
        return constraint.get("key") in self._core_constraint_keys

    # -- terminology and invariants -------------------------------------------
    def check_binding(self, walk: Walk, node: Node, v: Any, loc: str, type_code: str) -> None:
        binding = node.binding or {}
        if binding.get("strength") != "required" or not binding.get("valueSet"):
            return
        vs_url = binding["valueSet"]
        expansion = self.package.terminology.expand(vs_url)
        if expansion is None:
            if vs_url.startswith(self.package.canonical):
                walk.error(loc, f"ValueSet {vs_url} is not in the package", code="not-found")
            return
        codings: list[tuple[str | None, str]] = []
        if type_code in ("code", "string", "uri") and isinstance(v, str):
            codings = [(None, v)]
        elif type_code == "Coding" and isinstance(v, dict):
            codings = _codings([v])
        elif type_code == "CodeableConcept" and isinstance(v, dict):
            raw = v.get("coding")
            codings = _codings(raw if isinstance(raw, list) else [])
        if not codings:
            return  # nothing codable to check; structure errors are reported elsewhere
        results = [expansion.contains(system, code) for system, code in codings]
        if True in results or None in results:
            return
        shown = ", ".join(f"{s}#{c}" if s else c for s, c in codings) or "no code"
        name = vs_url.split("|", 1)[0].rsplit("/", 1)[-1]
        walk.error(
            loc,
            f"{shown} is not in the required ValueSet {name} ({vs_url})",
            code="code-invalid",
        )

    def evaluate_invariant(
        self, constraint: dict[str, Any], v: Any, root: dict[str, Any], node: Node
    ) -> bool | None:
        expression = constraint.get("expression")
        if not expression:
            return True
        compiled = self._compiled.get(expression)
        if compiled is None:
            compiled = self._compiled[expression] = compile_invariant(expression)
        fn, fast = compiled
        if fn is None:
            return None
        path = node.el["path"]
        if fast is not None:
            try:
                return bool(fast(v, path))
            except Exception:  # Fallback, or anything unforeseen: fhirpathpy decides
                pass
        return fhirpathpy_outcome(fn, v, path, root)

    # -- entry points ----------------------------------------------------------
    def validate(
        self,
        data: bytes | str | dict[str, Any],
        profile: str | None = None,
        as_of: date | None = None,
    ) -> list[Issue]:
        """Validate JSON text or a parsed resource; returns issues, errors first."""
        if isinstance(data, (bytes, str)):
            try:
                resource = jsonio.loads(data)
            except orjson.JSONDecodeError as exc:
                return [Issue("fatal", "structure", f"Not well-formed JSON: {exc}")]
            repeated = jsonio.repeated_name(data)
            if repeated is not None:
                # https://hl7.org/fhir/R4/json.html: property names SHALL be unique.
                text = f"The property '{repeated}' is given twice in one object"
                return [Issue("fatal", "structure", f"Not FHIR JSON: {text}")]
        else:
            resource = data
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            return [
                Issue(
                    "fatal",
                    "structure",
                    "Not a FHIR resource: a JSON object with a resourceType is required",
                )
            ]
        rt = resource["resourceType"]
        if rt not in R4_RESOURCE_TYPES:
            return [
                Issue(
                    "fatal",
                    "not-supported",
                    f"'{rt}' is not a FHIR R4 ({FHIR_VERSION}) resource type",
                    rt,
                )
            ]
        structure = self._structure(resource)
        issues = list(structure)
        references: list[Any] = []
        self._resource(resource, rt, profile, issues, references)
        if rt == "Bundle":
            issues.extend(check_bundle(resource))
            issues.extend(check_references(resource, references, self.package))
            # Record rules read the record as FHIR: they run once it is well-formed.
            if not structure and _is_record(resource):
                issues.extend(
                    check_record(resource, as_of or _as_of(resource), self.package.canonical)
                )
        return sort_issues(_dedupe(issues))

    def _structure(self, resource: dict[str, Any]) -> list[Issue]:
        cls = model_class(resource["resourceType"])
        rt = resource["resourceType"]
        if cls is None:
            return [
                Issue(
                    "error",
                    "not-supported",
                    f"{rt} cannot be checked structurally by this validator",
                    rt,
                )
            ]
        try:
            cls.model_validate(resource)
        except ValidationError as exc:
            return [
                _pydantic_issue(rt, err)
                for err in exc.errors()
                if err["type"] not in _WALKER_REPORTS or not self._walked_at(resource, err["loc"])
            ]
        except (ValueError, TypeError, KeyError) as exc:
            # The models break on a resource inside this one whose type they cannot
            # read (a number, an unknown name): said of that element, as the walk does.
            inner = [
                issue
                for node, loc in _inner_resources(resource, rt)
                if (issue := resource_type_issue(node.get("resourceType"), loc)) is not None
            ]
            return inner or [Issue("error", "structure", f"Not valid FHIR R4: {exc}", rt)]
        return []

    def _walked_at(self, resource: dict[str, Any], loc: tuple[Any, ...]) -> bool:
        """Whether the walk reports an element the models find missing or unknown at
        `loc`: it does within a resource whose type (or a profile it declares) has a
        definition here. Within any other (Procedure, Basic, ...) only the models can,
        and an unknown element or a missing required one must not pass unsaid."""
        node: Any = resource
        innermost = resource
        for part in loc:
            if isinstance(node, dict) and isinstance(part, str) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                continue  # a model's own name, or the missing element itself
            if isinstance(node, dict) and isinstance(node.get("resourceType"), str):
                innermost = node
        rt = innermost["resourceType"]
        if rt not in R4_RESOURCE_TYPES or self.tree_for_type(rt) is not None:
            return True
        return any(self.tree_for_url(url) is not None for url in declared_profiles(innermost))

    def _resource(
        self,
        resource: dict[str, Any],
        loc: str,
        profile: str | None,
        issues: list[Issue],
        references: list[Any],
        container: dict[str, Any] | None = None,
    ) -> None:
        rt: Any = resource.get("resourceType")  # a string of an R4 type once checked
        wrong = resource_type_issue(rt, loc)
        if wrong is not None:
            issues.append(wrong)
            return
        urls = [profile] if profile else declared_profiles(resource)
        trees: list[Node] = []
        for url in urls:
            tree = self.tree_for_url(url)
            if tree is None:
                own = url.startswith(self.package.canonical)
                issues.append(
                    Issue(
                        "error" if own or profile else "warning",
                        "not-found",
                        f"Profile {url} is not known to this validator",
                        f"{loc}.meta.profile" if not profile else loc,
                    )
                )
            elif tree.el.get("path") != rt:
                issues.append(
                    Issue(
                        "error",
                        "invalid",
                        f"Profile {url} is for {tree.el.get('path')}, not {rt}",
                        loc,
                    )
                )
            else:
                trees.append(tree)
        if not trees:
            base = self.tree_for_type(rt)
            if base is not None:
                trees.append(base)
        for i, tree in enumerate(trees):
            walk = Walk(self, resource, rt, issues, container=container)
            walk.object(tree, resource, loc, rt, strict=True)
            walk.invariants(tree, resource, loc)
            if i == 0:
                references.extend(walk.references)
                for nested, nested_loc in walk.nested:
                    # A contained resource's local references are to its container's.
                    inside = resource if nested_loc.startswith(f"{loc}.contained[") else None
                    self._resource(nested, nested_loc, None, issues, references, inside)


def fhirpathpy_outcome(fn: Any, v: Any, path: str, root: dict[str, Any]) -> bool | None:
    """An invariant's outcome by fhirpathpy: passes, fails, or None if it cannot run."""
    target = v
    if not (isinstance(v, dict) and "resourceType" in v):
        target = ResourceNode.create_node(v, path)  # type: ignore[no-untyped-call]
    try:
        result = fn(target, {"resource": root, "rootResource": root})
    except Exception:  # evaluation failure is reported, not raised
        return None
    # An empty result is not a failure (an invariant guarding absent content).
    return all(r is True for r in result) if result else True


def compile_invariant(expression: str) -> tuple[Any, Any]:
    """fhirpathpy's compiled expression (None if it cannot parse it) and the fast path."""
    try:
        fn = compile_fhirpath(expression, _FHIRPATH_MODEL, _FHIRPATH_OPTIONS)
    except Exception:  # a profile's expression the engine cannot parse
        return None, None
    # fhirpathpy keeps its parse tree; reuse it rather than parse again.
    tree = getattr(fn, "parsedPath", None)
    return fn, compile_fast(expression, tree if isinstance(tree, dict) else None)


def _codings(items: list[Any]) -> list[tuple[str | None, str]]:
    """(system, code) pairs of well-formed Codings; malformed ones are the walker's to report."""
    return [
        (c.get("system") if isinstance(c.get("system"), str) else None, c["code"])
        for c in items
        if isinstance(c, dict) and isinstance(c.get("code"), str)
    ]


# Reported by the walker with a profile-aware message instead.
_WALKER_REPORTS = {"extra_forbidden", "missing"}


def _pydantic_issue(rt: str, err: Any) -> Issue:
    loc = rt
    for part in err["loc"]:
        if isinstance(part, int):
            loc += f"[{part}]"
        elif (part[:1].isupper() and part.isalpha()) or part == "root":
            continue  # pydantic names the model class, or its root, of a polymorphic value
        else:
            loc += f".{part}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    name = loc.rsplit(".", 1)[-1]
    if err["type"] == "extra_forbidden":  # said as the walk says it
        return Issue("error", "structure", f"Unknown element '{name}': not defined in FHIR", loc)
    if err["type"] == "missing":
        return Issue("error", "required", f"{name} is required", loc)
    value = err.get("input")
    if isinstance(value, (str, int, float, bool)):
        msg = f"{msg} (got {value!r})"
    return Issue("error", "value" if err["type"] == "value_error" else "structure", msg, loc)


_DISCLOSURE = "https://cpa-fhir.org/fhir/StructureDefinition/cpa-disclosure-bundle"


def _is_record(bundle: dict[str, Any]) -> bool:
    if bundle.get("type") != "collection" or _DISCLOSURE in declared_profiles(bundle):
        return False  # a disclosure is part of a record by design
    patients = [
        e
        for _, e in bundle_entries(bundle)
        if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "Patient"
    ]
    return len(patients) == 1


def _as_of(bundle: dict[str, Any]) -> date:
    ts = bundle.get("timestamp")
    if isinstance(ts, str):
        try:
            return datetime.fromisoformat(ts.replace("Z", "+00:00")).date()
        except ValueError:
            pass
    return date.today()


def resource_type_issue(rt: Any, loc: str) -> Issue | None:
    """What is wrong with a nested resource's resourceType, if anything."""
    if isinstance(rt, str) and rt in R4_RESOURCE_TYPES:
        return None
    if rt is None or isinstance(rt, str):
        return Issue("error", "structure", f"'{rt}' is not a FHIR R4 resource type", loc)
    shown = orjson.dumps(rt).decode()[:40]
    # Named from the resource's root, as a transaction entry's issues are moved.
    inside = loc.partition(".")[2] or loc
    return Issue(
        "error",
        "structure",
        f"{inside}.resourceType must be a string naming a FHIR R4 resource type, not {shown}",
        f"{loc}.resourceType",
    )


def _inner_resources(node: Any, loc: str) -> Iterator[tuple[dict[str, Any], str]]:
    """The resources inside a resource (contained, a Bundle's entries, ...): each
    object below it with a resourceType, and where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            at = f"{loc}.{key}"
            if isinstance(value, dict) and "resourceType" in value:
                yield value, at
            yield from _inner_resources(value, at)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            at = f"{loc}[{i}]"
            if isinstance(value, dict) and "resourceType" in value:
                yield value, at
            yield from _inner_resources(value, at)


def _dedupe(issues: Iterable[Issue]) -> list[Issue]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for i in issues:
        key = (i.severity, i.code, i.expression, i.message)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out
