"""Part of a resource, as `_summary` and `_elements` ask for it
(https://hl7.org/fhir/R4/search.html#summary, search.html#elements).

What a summary keeps is the base definition's: the elements it marks `isSummary`
(`_summary=true`); the narrative with the elements every instance has (`text`);
everything but the narrative (`data`). `_elements` keeps the elements named. Each
keeps `id` and `meta`, the elements the resource must have (min 1), and those that
change the meaning of the rest (modifiers, `modifierExtension` among them: left
out, what is kept could be read as saying what it does not), and marks the result
SUBSETTED (v3-ObservationValue), as the specification asks: it is not the whole
resource, and may not conform to its profiles. Elements are chosen at the
resource's top level; what one holds goes whole. A type the vendored definitions
do not hold goes whole, unmarked.

Pure: the definitions are the vendored R4 ones, read once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

Summary = Literal["true", "text", "data"]

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
_ALWAYS = frozenset({"resourceType", "id", "meta"})
_NAME = re.compile(r"[a-z][A-Za-z0-9]*")


@dataclass(frozen=True, slots=True)
class ElementRules:
    """A resource type's top-level elements, by name ([x] left off a choice's)."""

    resource_type: str
    elements: frozenset[str]
    summary: frozenset[str]
    mandatory: frozenset[str]  # min 1, and modifiers: kept in every part
    choices: frozenset[str]  # names of choice elements, e.g. "effective"

    def name_of(self, key: str) -> str | None:
        """The element a JSON key belongs to (`_birthDate` to `birthDate`,
        `effectiveDateTime` to `effective`), or None if none of this type's."""
        name = key[1:] if key.startswith("_") else key
        if name in self.elements:
            return name
        for choice in self.choices:
            rest = name[len(choice) :]
            if name.startswith(choice) and rest[:1].isupper():
                return choice
        return None


@cache
def element_rules(resource_type: str) -> ElementRules | None:
    """The rules of a type the vendored definitions hold, else None."""
    from cpa_fhir.conformance.package import core_definitions

    definition = core_definitions().get(f"http://hl7.org/fhir/StructureDefinition/{resource_type}")
    if definition is None or definition.get("kind") != "resource":
        return None
    elements, summary, mandatory, choices = set(), set(), set(), set()
    for element in definition["snapshot"]["element"]:
        path = element["path"]
        if path.count(".") != 1:
            continue
        name = path.split(".", 1)[1]
        if name.endswith("[x]"):
            name = name[:-3]
            choices.add(name)
        elements.add(name)
        if element.get("isSummary"):
            summary.add(name)
        if element.get("min", 0) >= 1 or element.get("isModifier"):
            mandatory.add(name)
    return ElementRules(
        resource_type,
        frozenset(elements),
        frozenset(summary),
        frozenset(mandatory),
        frozenset(choices),
    )


class SubsetError(ValueError):
    """`_elements` names what the resource type does not have."""


def requested_elements(resource_type: str, value: str) -> frozenset[str]:
    """The element names of an `_elements` value (`name,Type.name`); SubsetError for
    one the type does not have, or one of another type."""
    rules = element_rules(resource_type)
    names = set()
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        prefix, _, name = item.rpartition(".")
        if prefix and prefix != resource_type:
            raise SubsetError(f"_elements: {item!r} is not an element of {resource_type}")
        if not _NAME.fullmatch(name) or (rules is not None and name not in rules.elements):
            raise SubsetError(f"_elements: {resource_type} has no element {name!r}")
        names.add(name)
    if not names:
        raise SubsetError("_elements names no element")
    return frozenset(names)


def subset(
    resource: dict[str, Any],
    *,
    summary: Summary | None = None,
    elements: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The part of `resource` asked for (a new dict; the resource is not changed);
    the resource itself if nothing is asked for, or if its type is not one the
    definitions hold (it then goes whole, unmarked)."""
    if summary is None and elements is None:
        return resource
    rules = element_rules(str(resource.get("resourceType")))
    if rules is None:
        return resource
    if summary == "data":

        def keep(name: str | None) -> bool:
            return name != "text"

    else:
        wanted = {
            None: elements or frozenset(),
            "true": rules.summary,
            "text": frozenset({"text"}),
        }[summary]
        chosen = wanted | rules.mandatory

        def keep(name: str | None) -> bool:
            return name in chosen

    part = {k: v for k, v in resource.items() if k in _ALWAYS or keep(rules.name_of(k))}
    meta = dict(part.get("meta") or {})
    tags = [
        t
        for t in meta.get("tag") or []
        if not (isinstance(t, dict) and t.get("code") == "SUBSETTED")
    ]
    meta["tag"] = [*tags, SUBSETTED]
    part["meta"] = meta
    return part
