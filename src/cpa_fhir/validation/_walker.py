"""Walk a resource against a compiled profile tree, collecting issues (pure).

Checks, per element: unknown elements (against the R4 definitions), cardinality,
choice types, fixed and pattern values, required bindings, slices and their
cardinality, FHIRPath invariants, empty elements (ele-1), extensions having a
value or children but not both (ext-1), NHS number and SNOMED CT check digits.
Nested resources (Bundle entries, contained) are handed back to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cpa_fhir.fhir.outcome import Issue
from cpa_fhir.store._dates import date_range
from cpa_fhir.validation._narrative import narrative_issues
from cpa_fhir.validation._tree import Node, find_by_path
from cpa_fhir.validation.identifiers import (
    NHS_NUMBER_SYSTEM,
    SNOMED_SYSTEM,
    is_valid_nhs_number,
    is_valid_sctid,
)

if TYPE_CHECKING:
    from cpa_fhir.validation._validator import Validator

_RESOURCE_TYPES = {"Resource", "DomainResource"}
# Extensions are always sliced by url, whether or not the definition says so.
_BY_URL = [{"type": "value", "path": "url"}]


def _upper_first(code: str) -> str:
    return code[:1].upper() + code[1:]


_FHIRPATH = "http://hl7.org/fhirpath/System."
_BOOLEANS = {"boolean", _FHIRPATH + "Boolean"}
_INTEGERS = {"integer", "positiveInt", "unsignedInt", "integer64", _FHIRPATH + "Integer"}
_DECIMALS = {"decimal", _FHIRPATH + "Decimal"}


def json_kind_error(type_code: str, v: Any) -> str | None:
    """What is wrong with a primitive's JSON form, or None: FHIR JSON writes a boolean
    as true or false, an integer or decimal as a number and every other primitive as
    a string (https://hl7.org/fhir/R4/json.html#primitive). The model parse would
    take "false" or 0 for false, and a record would say the opposite of itself."""
    if type_code in _BOOLEANS:
        ok, kind = type(v) is bool, "true or false"
    elif type_code in _INTEGERS:
        # -0, or an integer beyond 64 bits, is kept as written (an ExactDecimal).
        written = getattr(v, "text", None)
        whole = isinstance(written, str) and written.lstrip("-").isdigit()
        ok, kind = type(v) is int or whole, "a whole number"
    elif type_code in _DECIMALS:
        ok, kind = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
    else:
        ok, kind = isinstance(v, str), "a string"
    if ok:
        return None
    name = type_code.removeprefix(_FHIRPATH)
    article = "An" if name[:1].lower() in "aeiou" else "A"
    return f"{article} {name} must be {kind} in JSON, not {_json_text(v)}"


def _json_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, (list, dict)):
        return "an array" if isinstance(v, list) else "an object"
    return f"the number {v}"


def is_primitive(type_code: str) -> bool:
    found = _PRIMITIVE.get(type_code)
    if found is None:
        found = _PRIMITIVE[type_code] = bool(type_code) and (
            type_code[0].islower() or type_code.startswith("http://hl7.org/fhirpath")
        )
    return found


# Asked for every value walked; the answer only depends on the type code.
_PRIMITIVE: dict[str, bool] = {}


def contains_pattern(actual: Any, pattern: Any) -> bool:
    """FHIR pattern[x] semantics: every value in the pattern appears in the instance."""
    if isinstance(pattern, dict):
        if not isinstance(actual, dict):
            return False
        return all(k in actual and contains_pattern(actual[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        items = actual if isinstance(actual, list) else [actual]
        return all(any(contains_pattern(a, p) for a in items) for p in pattern)
    return bool(actual == pattern)


@dataclass
class ReferenceSite:
    """A Reference met in the walk, kept for resolution inside a Bundle."""

    location: str
    reference: str
    target_profiles: list[str]


@dataclass
class Walk:
    validator: Validator
    root: dict[str, Any]
    root_type: str
    issues: list[Issue]
    nested: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    references: list[ReferenceSite] = field(default_factory=list)
    # The resource that contains this one, for a contained resource (%rootResource).
    container: dict[str, Any] | None = None

    def error(
        self, loc: str, message: str, code: str = "structure", rule: str | None = None
    ) -> None:
        self.issues.append(Issue("error", code, message, loc, rule))

    def warning(
        self, loc: str, message: str, code: str = "informational", rule: str | None = None
    ) -> None:
        self.issues.append(Issue("warning", code, message, loc, rule))

    # -- objects ---------------------------------------------------------------
    def children_of(self, node: Node, type_code: str) -> dict[str, Node]:
        if node.children:
            return node.children
        cache = self.validator.children_cache
        key = (id(node), type_code, self.root_type)
        found = cache.get(key)
        if found is None:
            found = cache[key] = self._children_of(node, type_code)
        return found

    def _children_of(self, node: Node, type_code: str) -> dict[str, Node]:
        ref = node.content_reference
        resource_tree = self.validator.tree_for_type(self.root_type)
        if ref and resource_tree is not None:
            target = find_by_path(resource_tree, ref.lstrip("#"))
            if target is not None:
                return target.children
        profiles = [
            p for t in node.types if t.get("code") == type_code for p in t.get("profile", [])
        ]
        tree = self.validator.tree_for_url(profiles[0]) if profiles else None
        if tree is None:
            tree = self.validator.tree_for_type(type_code)
        return tree.children if tree is not None else {}

    def object(
        self, node: Node, obj: dict[str, Any], loc: str, type_code: str, strict: bool
    ) -> None:
        children = self.children_of(node, type_code)
        used: set[str] = set()
        for child in children.values():
            if child.is_choice:
                keys = self._keys_for(child, obj, loc, used, report=strict)
            elif child.name in obj or child.under_name in obj:
                keys = [(child.name, child.first_type)]
            else:
                keys = []
            if not keys:
                # Most elements are absent: only a required minimum can be broken.
                if child.min:
                    self.cardinality(child, 0, f"{loc}.{child.name.replace('[x]', '')}")
                if child.slices_required:
                    self.slicing(child, [], f"{loc}.{child.name}")
                continue
            values: list[tuple[Any, str, str]] = []  # value, location, type code
            for key, child_type in keys:
                raw = obj.get(key)
                prim_ext = obj.get("_" + key)
                used.add(key)
                if prim_ext is not None:
                    used.add("_" + key)
                # FHIR JSON has no nulls (but in an array of primitives, beside its
                # `_` extensions) and no empty arrays: https://hl7.org/fhir/R4/json.html
                if key in obj and raw is None:
                    self.error(f"{loc}.{key}", "null is not a FHIR value: leave the element out")
                elif raw == []:
                    self.error(f"{loc}.{key}", "An array must not be empty: leave the element out")
                if f"_{key}" in obj and prim_ext is None:
                    self.error(f"{loc}._{key}", "null is not a FHIR value: leave the element out")
                elif prim_ext == []:
                    self.error(f"{loc}._{key}", "An array must not be empty: leave the element out")
                if raw is None and prim_ext is None:
                    continue
                items = raw if isinstance(raw, list) else [raw]
                if raw is None:
                    items = prim_ext if isinstance(prim_ext, list) else [prim_ext]
                for i, item in enumerate(items):
                    sub = f"{loc}.{key}[{i}]" if child.is_array else f"{loc}.{key}"
                    values.append((item, sub, child_type))
            self.cardinality(child, len(values), f"{loc}.{child.name.replace('[x]', '')}")
            for item, sub, child_type in values:
                self.value(child, item, sub, child_type, strict)
            if child.slices:
                self.slicing(child, values, f"{loc}.{keys[0][0]}")
        if strict:
            for key in obj:
                if not isinstance(key, str):
                    self.error(loc, f"Element names must be strings, not {key!r}")
                    continue
                if key in used or (key == "resourceType" and node.el.get("path") == type_code):
                    continue
                if key.startswith("_") and key[1:] in used:
                    continue
                if key == "fhir_comments":
                    continue
                self.error(
                    f"{loc}.{key}",
                    f"Unknown element '{key}': not defined in FHIR R4 for {type_code}",
                )

    def _keys_for(
        self, child: Node, obj: dict[str, Any], loc: str, used: set[str], report: bool
    ) -> list[tuple[str, str]]:
        """Instance keys holding this element, each with the type it implies."""
        if not child.is_choice:
            if child.name in obj or child.under_name in obj:
                return [(child.name, child.first_type)]
            return []
        base = child.name[:-3]
        allowed = {_upper_first(t): t for t in child.type_codes}
        found = []
        for key in obj:
            bare = key[1:] if key.startswith("_") else key
            if not bare.startswith(base) or len(bare) == len(base) or not bare[len(base)].isupper():
                continue
            if key.startswith("_") and bare in obj:
                continue
            suffix = bare[len(base) :]
            if suffix in allowed:
                found.append((bare, allowed[suffix]))
            elif report and suffix in self.validator.all_type_names:
                used.add(key)
                self.error(
                    f"{loc}.{bare}",
                    f"Type {suffix} is not allowed for {child.name}; allowed: "
                    + ", ".join(sorted(allowed)),
                )
        if len(found) > 1:
            self.error(
                f"{loc}.{base}[x]", f"Only one of {', '.join(k for k, _ in found)} may be present"
            )
        return found

    # -- cardinality -----------------------------------------------------------
    def cardinality(self, node: Node, count: int, loc: str) -> None:
        label = f"{node.name}:{node.slice_name}" if node.slice_name else node.name
        if count < node.min:
            what = node.el.get("short") or label
            self.error(
                loc,
                f"{label} is required (minimum {node.min}, found {count}): {what}",
                code="required",
            )
        if node.max is not None and count > node.max:
            if node.max == 0:
                self.error(loc, f"{label} is not allowed by this profile", code="structure")
            else:
                self.error(
                    loc, f"{label} allows at most {node.max}, found {count}", code="structure"
                )

    # -- values ----------------------------------------------------------------
    def value(self, node: Node, v: Any, loc: str, type_code: str, strict: bool) -> None:
        if v is None or v == "" or v == {} or v == []:
            self.error(loc, "Elements must have a value or children (ele-1)", rule="ele-1")
            if v != {}:
                return  # an empty object still gets its required children reported
        if node.fixed is not None and v != node.fixed:
            self.error(loc, f"Value must be exactly {_show(node.fixed)}", code="value")
        if node.pattern is not None and not contains_pattern(v, node.pattern):
            self.error(loc, f"Value must match the pattern {_show(node.pattern)}", code="value")
        if node.binding:
            self.validator.check_binding(self, node, v, loc, type_code)
        if type_code in _RESOURCE_TYPES or (
            not type_code and isinstance(v, dict) and "resourceType" in v
        ):
            if not isinstance(v, dict):
                self.error(loc, "A contained or entry resource must be a JSON object")
            elif strict:
                self.nested.append((v, loc))
            return
        if is_primitive(type_code) or not isinstance(v, dict):
            if isinstance(v, dict) and is_primitive(type_code) and set(v) <= {"id", "extension"}:
                pass  # the `_element` form carries only id and extensions
            elif isinstance(v, dict) and is_primitive(type_code):
                self.error(loc, f"A {type_code} must be a JSON primitive, not an object")
            elif not is_primitive(type_code) and type_code:
                self.error(loc, f"A {type_code} must be a JSON object")
            elif type_code and (wrong := json_kind_error(type_code, v)) is not None:
                self.error(loc, wrong, code="value")
                return
            elif type_code == "xhtml" and isinstance(v, str):
                for rule, problem in narrative_issues(v):
                    self.error(loc, f"{problem} ({rule})", code="invariant", rule=rule)
            self.invariants(node, v, loc)
            return
        if type_code == "Extension":
            self.extension(node, v, loc, strict)
        else:
            self.object(node, v, loc, type_code, strict)
            if type_code == "Period":
                self.period(v, loc)
            # The datatype's own invariants (per-1: a Period ends after it starts; rng-2,
            # qty-3, cpt-2, ...), which a snapshot's elements do not repeat.
            datatype = self.validator.datatype_tree(type_code)
            if datatype is not None:
                self.invariants(datatype, v, loc)
        if type_code == "Identifier" and v.get("system") == NHS_NUMBER_SYSTEM:
            value = v.get("value")
            if isinstance(value, str) and not is_valid_nhs_number(value):
                self.error(
                    f"{loc}.value",
                    f"NHS number '{value}' is not valid: it must be 10 digits with a correct modulus-11 check digit",
                    code="value",
                    rule="nhs-number",
                )
        elif type_code == "Coding" and v.get("system") == SNOMED_SYSTEM:
            code = v.get("code")
            if isinstance(code, str) and not is_valid_sctid(code):
                self.error(
                    f"{loc}.code",
                    f"'{code}' is not a SNOMED CT identifier: its Verhoeff check digit is wrong or it has the wrong length",
                    code="code-invalid",
                    rule="sctid",
                )
        elif type_code == "Reference" and isinstance(v.get("reference"), str):
            local = v["reference"]
            if local.startswith("#") and local != "#":
                # ref-1, natively: a local reference names a resource this one contains.
                holder = self.container if self.container is not None else self.root
                contained = holder.get("contained")
                ids = {
                    c.get("id") for c in (contained if isinstance(contained, list) else [])
                    if isinstance(c, dict)
                }  # fmt: skip
                if local[1:] not in ids:
                    self.error(
                        f"{loc}.reference",
                        f"SHALL have a contained resource if a local reference is provided:"
                        f" nothing contained has the id '{local[1:]}' (ref-1)",
                        code="invariant",
                        rule="ref-1",
                    )
            targets = [
                p for t in node.types for p in t.get("targetProfile", []) if isinstance(p, str)
            ]
            self.references.append(ReferenceSite(f"{loc}.reference", v["reference"], targets))
        self.invariants(node, v, loc)

    def period(self, v: dict[str, Any], loc: str) -> None:
        """per-1, natively: a Period does not end before it starts. As FHIRPath compares
        them (https://hl7.org/fhir/R4/fhirpath.html): two dates (or months, or years)
        of one precision as days, two dateTimes with times as instants whatever zone
        each is written in; values of different precision cannot be compared, and pass."""
        start, end = v.get("start"), v.get("end")
        if not (isinstance(start, str) and isinstance(end, str)):
            return
        if ("T" in start) != ("T" in end) or ("T" not in start and len(start) != len(end)):
            return
        first, last = date_range(start), date_range(end)
        if first is not None and last is not None and first[0] > last[0]:
            self.error(
                loc,
                "If present, start SHALL have a lower value than end (per-1)",
                code="invariant",
                rule="per-1",
            )

    def extension(self, node: Node, v: dict[str, Any], loc: str, strict: bool) -> None:
        has_value = any(isinstance(k, str) and k.startswith("value") for k in v)
        if has_value and "extension" in v:
            self.error(
                loc,
                "An extension has either a value or nested extensions, not both (ext-1)",
                rule="ext-1",
            )
        url = v.get("url")
        tree = self.validator.tree_for_url(url) if isinstance(url, str) else None
        if tree is not None and tree.el.get("path") == "Extension":
            # A known extension: its own definition says what it may hold.
            self.object(tree, v, loc, "Extension", strict)
            self.invariants(tree, v, loc)
        else:
            self.object(node, v, loc, "Extension", strict)

    def invariants(
        self, node: Node, v: Any, loc: str, constraints: list[dict[str, Any]] | None = None
    ) -> None:
        for c in node.constraints if constraints is None else constraints:
            outcome = self.validator.evaluate_invariant(c, v, self.root, node)
            if outcome is True:
                continue
            severity = c.get("severity", "error")
            text = f"{c.get('human', c.get('key'))} ({c.get('key')})"
            if outcome is None:
                # Base FHIR invariants the engine cannot run (resolve(), hasValue()) are
                # left out; a profile's own invariant must not silently pass.
                if not self.validator.is_core_constraint(c):
                    self.warning(
                        loc, f"Invariant could not be evaluated: {text}", rule=c.get("key")
                    )
            elif severity == "error":
                self.error(loc, text, code="invariant", rule=c.get("key"))
            else:
                self.warning(loc, text, code="invariant", rule=c.get("key"))

    # -- slicing ---------------------------------------------------------------
    def slicing(self, node: Node, values: list[tuple[Any, str, str]], loc: str) -> None:
        slicing = node.slicing or {}
        discriminators = slicing.get("discriminator") or (
            _BY_URL if node.name in ("extension", "modifierExtension") else []
        )
        counts = {id(s): 0 for s in node.slices}
        for v, sub, type_code in values:
            matched = [s for s in node.slices if self._matches(s, discriminators, v)]
            for s in matched:
                counts[id(s)] += 1
                if type_code != "Extension":
                    self.value_in_slice(s, node, v, sub, type_code)
            if not matched and slicing.get("rules") == "closed":
                self.error(sub, f"This {node.name} matches none of the slices this profile allows")
        for s in node.slices:
            self.cardinality(s, counts[id(s)], loc)

    def value_in_slice(self, s: Node, sliced: Node, v: Any, loc: str, type_code: str) -> None:
        """Slice-specific constraints; what every value must meet was checked already."""
        if s.fixed is not None and v != s.fixed:
            self.error(loc, f"Value must be exactly {_show(s.fixed)}", code="value")
        if s.pattern is not None and not contains_pattern(v, s.pattern):
            self.error(loc, f"Value must match the pattern {_show(s.pattern)}", code="value")
        if s.binding and s.binding != sliced.binding:
            self.validator.check_binding(self, s, v, loc, type_code)
        if isinstance(v, dict) and s.children:
            self.object(s, v, loc, type_code, strict=False)
        inherited = {c.get("key") for c in sliced.constraints}
        own = [c for c in s.constraints if c.get("key") not in inherited]
        if own:
            self.invariants(s, v, loc, own)

    def _matches(self, s: Node, discriminators: list[dict[str, Any]], v: Any) -> bool:
        if not discriminators:
            return False
        for d in discriminators:
            path = d.get("path", "$this")
            if path == "url" and isinstance(v, dict):
                profiles = [p for t in s.types for p in t.get("profile", [])]
                if profiles:
                    if v.get("url") not in profiles:
                        return False
                    continue
            expected_node = s if path == "$this" else self._descend(s, path)
            if expected_node is None:
                return False
            expected = (
                expected_node.fixed if expected_node.fixed is not None else expected_node.pattern
            )
            if expected is None:
                return False
            actual = [v] if path == "$this" else _navigate(v, path)
            if d.get("type") == "value" and expected_node.fixed is not None:
                if not any(a == expected for a in actual):
                    return False
            elif not any(contains_pattern(a, expected) for a in actual):
                return False
        return True

    def _descend(self, s: Node, path: str) -> Node | None:
        node: Node | None = s
        for part in path.split("."):
            if node is None:
                return None
            children = node.children or self.children_of(
                node, node.type_codes[0] if node.types else ""
            )
            node = children.get(part)
        return node


def _navigate(v: Any, path: str) -> list[Any]:
    current = [v]
    for part in path.split("."):
        nxt: list[Any] = []
        for item in current:
            if isinstance(item, dict) and part in item:
                got = item[part]
                nxt.extend(got if isinstance(got, list) else [got])
        current = nxt
    return current


def _show(value: Any) -> str:
    import json

    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 160 else text[:157] + "..."
