"""Snapshot generation for StructureDefinitions (pure).

https://hl7.org/fhir/R4/profiling.html#snapshot — a snapshot is the base
definition's snapshot with the differential laid over it. This generator covers
what constraining profiles and extensions use: property overrides, appended
constraints, slices (copied from the sliced element with its children), and
children of data-type elements unrolled from the data type's own definition
when a differential reaches inside them. Re-slicing and type slicing on choice
elements are out of scope and raise ProfileError.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from cpa_fhir.errors import ProfileError

Resolve = Callable[[str], dict[str, Any] | None]

# Properties whose differential value is added to, not replacing, the base's.
_APPENDED = ("constraint", "condition", "mapping")


def segments(element_id: str) -> list[str]:
    """Split an element id into its dot-separated segments, keeping `:slice` on each."""
    return element_id.split(".")


def _path_of(element_id: str) -> str:
    return ".".join(s.split(":", 1)[0] for s in segments(element_id))


def _in_group(element_id: str, group_id: str) -> bool:
    """Whether `element_id` is `group_id`, one of its slices, or a descendant of either."""
    return (
        element_id == group_id
        or element_id.startswith(group_id + ".")
        or element_id.startswith(group_id + ":")
    )


# The StructureDefinitions whose snapshots are being generated, outermost first: one
# needed again while its own is made is a cycle, which would recurse without end.
Building = tuple[str, ...]


def snapshot_of(
    sd: dict[str, Any], resolve: Resolve, building: Building = ()
) -> list[dict[str, Any]]:
    """The snapshot elements of `sd`: its own when present, else generated."""
    snap = snapshot_elements(sd)
    if snap:
        return list(snap)
    return generate_snapshot(sd, resolve, building)


def snapshot_elements(sd: dict[str, Any]) -> list[dict[str, Any]]:
    """The elements of `sd`'s own snapshot (none if it has none); ProfileError if malformed."""
    return _elements(sd, "snapshot")


def differential_elements(sd: dict[str, Any]) -> list[dict[str, Any]]:
    """The elements of `sd`'s differential; ProfileError if malformed."""
    return _elements(sd, "differential")


def _elements(sd: dict[str, Any], part: str) -> list[dict[str, Any]]:
    # Package files are edited by hand: a wrong shape is said, not met as a TypeError.
    holder = sd.get(part, {})
    elements = holder.get("element", []) if isinstance(holder, dict) else None
    if not isinstance(elements, list) or not all(isinstance(el, dict) for el in elements):
        raise ProfileError(f"{sd.get('url')}: {part}.element must be a list of objects")
    return elements


def generate_snapshot(
    sd: dict[str, Any], resolve: Resolve, building: Building = ()
) -> list[dict[str, Any]]:
    """Lay `sd`'s differential over its base definition's snapshot."""
    base_url = sd.get("baseDefinition")
    if not isinstance(base_url, str) or not base_url:
        raise ProfileError(f"{sd.get('url')} has no baseDefinition to build a snapshot from")
    base = resolve(base_url)
    if base is None:
        raise ProfileError(f"{sd.get('url')}: base definition {base_url} is not available")
    building = (*building, str(sd.get("url")))
    _not_circular(building, base, "baseDefinition")
    pristine = snapshot_of(base, resolve, building)
    elements = copy.deepcopy(pristine)
    root = elements[0]["id"] if elements else ""
    for n, diff in enumerate(differential_elements(sd)):
        try:
            element_id = _diff_id(diff, n, root)
            index = _find(elements, element_id)
            if index is None:
                index = _materialize(elements, element_id, resolve, pristine, building)
            _merge(elements[index], diff)
        except ProfileError as exc:
            raise ProfileError(f"{sd.get('url')}: {exc.message}") from None
    return elements


def _diff_id(diff: dict[str, Any], n: int, root: str) -> str:
    """The id of the n-th differential element, checked to lie inside the root element."""
    element_id = diff.get("id") or diff.get("path")
    if not isinstance(element_id, str):
        raise ProfileError(f"differential element {n + 1} has no id or path that is a string")
    if not isinstance(diff.get("path", ""), str):
        raise ProfileError(f"differential element {element_id}: its path is not a string")
    # Elements are made by walking up to their parent; an id outside the root (e.g.
    # `x` in a Patient profile) has no parent, and the walk up would never end.
    if segments(element_id)[0].split(":", 1)[0] != root:
        raise ProfileError(f"differential element {element_id} is not inside {root}")
    return element_id


def _find(elements: list[dict[str, Any]], element_id: str) -> int | None:
    for i, el in enumerate(elements):
        if el.get("id") == element_id:
            return i
    return None


def _not_circular(building: Building, needed: dict[str, Any], link: str) -> None:
    """ProfileError if `needed` is one whose snapshot is being made (a cycle)."""
    url = str(needed.get("url"))
    if url in building and not snapshot_elements(needed):
        cycle = [*building[building.index(url) :], url]
        raise ProfileError(f"circular {link}: {' -> '.join(cycle)}")


def _materialize(
    elements: list[dict[str, Any]],
    element_id: str,
    resolve: Resolve,
    base: list[dict[str, Any]],
    building: Building = (),
) -> int:
    """Create the element `element_id` (a slice, or a child inside a data type)."""
    segs = segments(element_id)
    last = segs[-1]
    parent_id = ".".join(segs[:-1])
    if ":" in last:
        name, slice_name = last.split(":", 1)
        if "/" in slice_name:
            raise ProfileError(f"re-slicing is not supported: {element_id}")
        sliced_id = ".".join([*segs[:-1], name])
        sliced = _find(elements, sliced_id)
        if sliced is None:
            sliced = _materialize(elements, sliced_id, resolve, base, building)
            # Unrolling a type can bring this very slice in (an extension's own slices).
            again = _find(elements, element_id)
            if again is not None:
                return again
        if name in ("extension", "modifierExtension") and "slicing" not in elements[sliced]:
            # FHIR slices extensions by url; say so, as other snapshot generators do.
            elements[sliced]["slicing"] = {
                "discriminator": [{"type": "value", "path": "url"}],
                "ordered": False,
                "rules": "open",
            }
        group = [el for el in elements if _in_group(el["id"], sliced_id)]
        end = sliced + len(group)
        copies = []
        for el in group:
            rest = el["id"][len(sliced_id) :]
            if rest.startswith(":"):
                continue  # an existing slice of the same element, or inside one
            dup = copy.deepcopy(el)
            dup["id"] = element_id + rest
            if not rest:
                dup.pop("slicing", None)
                dup["sliceName"] = slice_name
            copies.append(dup)
        elements[end:end] = copies
        return end
    if not parent_id:
        # The root itself is missing: nothing to derive it from (and no end to recursion).
        raise ProfileError(f"no element {element_id} in the base definition")
    parent = _find(elements, parent_id)
    if parent is None:
        parent = _materialize(elements, parent_id, resolve, base, building)
    _unroll(elements, parent, resolve, base, building)
    found = _find(elements, element_id)
    if found is None:
        raise ProfileError(f"no element {element_id} in the base definition")
    return found


def _type_definition(el: dict[str, Any], resolve: Resolve) -> dict[str, Any]:
    types = el.get("type") or []
    if len(types) != 1:
        raise ProfileError(f"cannot constrain inside {el['id']}: it has {len(types)} types")
    t = types[0]
    url = (t.get("profile") or [None])[0] or f"http://hl7.org/fhir/StructureDefinition/{t['code']}"
    sd = resolve(url)
    if sd is None:
        raise ProfileError(f"type definition {url} for {el['id']} is not available")
    return sd


def _unroll(
    elements: list[dict[str, Any]],
    index: int,
    resolve: Resolve,
    base: list[dict[str, Any]],
    building: Building = (),
) -> None:
    """Insert the children of a data-type element from the data type's snapshot."""
    parent = elements[index]
    if index + 1 < len(elements) and elements[index + 1]["id"].startswith(parent["id"] + "."):
        return  # already has children
    ref = parent.get("contentReference")
    if ref:
        # A recursive element (e.g. Consent.provision.provision) takes the children
        # of the element it refers to, as the base defines them: the profile's
        # constraints on the outer element do not apply to the nested one.
        source = ref.split("#", 1)[-1]
        root_id = source
        type_elements = [{"id": source, "path": source}] + [
            el
            for el in base
            # The recursive element itself stays (R4 nests to any depth), as a reference.
            if el["id"].startswith(source + ".") and not el["id"].startswith(parent["id"] + ".")
        ]
    else:
        definition = _type_definition(parent, resolve)
        _not_circular(building, definition, f"type profile (of {parent['id']})")
        type_elements = snapshot_of(definition, resolve, building)
        root_id = type_elements[0]["id"]
    children = []
    for el in type_elements[1:]:
        dup = copy.deepcopy(el)
        dup["id"] = parent["id"] + el["id"][len(root_id) :]
        dup["path"] = parent["path"] + el["path"][len(root_id) :]
        children.append(dup)
    if ref:
        # The children are now spelled out; a contentReference beside them would say
        # the element is the outer one again (Firely and SUSHI drop it likewise).
        del parent["contentReference"]
        parent["type"] = [{"code": "BackboneElement"}]
    elements[index + 1 : index + 1] = children


def _merge(element: dict[str, Any], diff: dict[str, Any]) -> None:
    for key, value in diff.items():
        if key in ("id", "path"):
            continue
        if key in _APPENDED:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ProfileError(f"{element['id']}: {key} must be a list of objects")
            existing = element.setdefault(key, [])
            if key == "constraint":
                keys = {c.get("key") for c in value}
                existing[:] = [c for c in existing if c.get("key") not in keys]
            existing.extend(copy.deepcopy(value))
        else:
            if key.startswith(("fixed", "pattern")):
                for old in [k for k in element if k.startswith(("fixed", "pattern"))]:
                    del element[old]
            element[key] = copy.deepcopy(value)
    element["path"] = _path_of(element["id"])
