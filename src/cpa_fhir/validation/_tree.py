"""Compiled element trees: a StructureDefinition snapshot as nested nodes (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cpa_fhir.conformance.snapshot import segments

# Base invariants checked natively (ele-1, ext-1 by the walker; the Bundle rules in
# `_bundle`) or not applicable to stored JSON (narrative and contained-resource
# rules of DomainResource).
NATIVE_OR_SKIPPED = frozenset(
    {
        "ele-1",
        "ext-1",
        "ref-1",
        "per-1",
        "dom-2",
        "dom-3",
        "dom-4",
        "dom-5",
        "dom-6",
        "txt-1",
        "txt-2",
    }
    | {f"bdl-{n}" for n in range(1, 13)}
)


def _evaluable(constraint: dict[str, Any]) -> bool:
    """Whether an invariant is ours to run: not native, and not reliant on resolve()."""
    if constraint.get("key") in NATIVE_OR_SKIPPED:
        return False
    # resolve() needs a server; the references it follows are checked in the Bundle.
    return "resolve()" not in str(constraint.get("expression", ""))


@dataclass(eq=False)
class Node:
    """One element definition with its children and slices."""

    el: dict[str, Any]
    name: str
    min: int
    max: int | None
    types: list[dict[str, Any]]
    slice_name: str | None = None
    children: dict[str, Node] = field(default_factory=dict)
    slices: list[Node] = field(default_factory=list)
    fixed: Any = None
    pattern: Any = None
    constraints: list[dict[str, Any]] = field(default_factory=list)

    is_array: bool = False
    is_choice: bool = False
    type_codes: list[str] = field(default_factory=list)
    first_type: str = ""
    under_name: str = ""
    binding: dict[str, Any] | None = None
    # Whether some slice has a minimum; set once the slices are attached.
    slices_required: bool = False

    def __post_init__(self) -> None:
        # Computed once: the walker asks these for every element of every resource.
        base_max = self.el.get("base", {}).get("max", self.el.get("max", "1"))
        self.is_array = base_max not in ("0", "1")
        self.is_choice = self.name.endswith("[x]")
        self.type_codes = [t.get("code", "") for t in self.types]
        self.first_type = self.type_codes[0] if self.type_codes else ""
        self.under_name = "_" + self.name
        self.binding = self.el.get("binding")

    @property
    def id(self) -> str:
        return str(self.el["id"])

    @property
    def slicing(self) -> dict[str, Any] | None:
        return self.el.get("slicing")

    @property
    def content_reference(self) -> str | None:
        return self.el.get("contentReference")


def _fixed_or_pattern(el: dict[str, Any], prefix: str) -> Any:
    for key, value in el.items():
        if key.startswith(prefix) and key != prefix:
            return value
    return None


def compile_tree(elements: list[dict[str, Any]]) -> Node:
    """Nest snapshot elements by id; slices hang off the element they slice."""
    by_id: dict[str, Node] = {}
    root: Node | None = None
    for el in elements:
        segs = segments(el["id"])
        last = segs[-1]
        name = last.split(":", 1)[0]
        raw_max = el.get("max", "*")
        node = Node(
            el=el,
            name=name,
            min=int(el.get("min", 0)),
            max=None if raw_max == "*" else int(raw_max),
            types=el.get("type", []),
            slice_name=el.get("sliceName"),
            fixed=_fixed_or_pattern(el, "fixed"),
            pattern=_fixed_or_pattern(el, "pattern"),
            constraints=[c for c in el.get("constraint", []) if _evaluable(c)],
        )
        by_id[el["id"]] = node
        if root is None:
            root = node
            continue
        if ":" in last:
            sliced = by_id.get(".".join([*segs[:-1], name]))
            if sliced is not None:
                sliced.slices.append(node)
            continue
        parent = by_id.get(".".join(segs[:-1]))
        if parent is not None:
            parent.children[name] = node
    if root is None:
        raise ValueError("a snapshot with no elements")
    for node in by_id.values():
        node.slices_required = any(s.min for s in node.slices)
    return root


def find_by_path(root: Node, path: str) -> Node | None:
    """The unsliced node at an element path such as `Consent.provision` (for contentReference)."""
    parts = path.split(".")
    node = root
    for part in parts[1:]:
        child = node.children.get(part)
        if child is None:
            return None
        node = child
    return node
