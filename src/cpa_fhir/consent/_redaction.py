"""Changing one resource for sharing: removing labelled elements, and references to what
does not go (masked with data-absent-reason where the element is required).

`PathRedaction` keeps the changes as a list of paths in the resource as given and
builds the changed resource by copying only the objects on those paths; the
references that remain, and the required elements a change can affect, follow
from the paths without walking the resource. It needs a resource of simple shape
(`Shape.simple`). `CopyRedaction` deep-copies and walks, for any shape. Both
give what the first filter gave: the tests check them against it, kept there
as an oracle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cpa_fhir.consent._facts import ResourceFacts, Shape
from cpa_fhir.consent._references import Path, references
from cpa_fhir.consent._required import RequiredElements

DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"

_GONE: Any = object()  # a removed list item, until the list is rebuilt without it


def _masked() -> dict[str, Any]:
    """What stands for a reference that must stay but may not say what it refers to."""
    return {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]}


class Redaction(Protocol):
    """Changes to one resource. `content` is the resource as changed so far; `reach`,
    `outward` and `unresolved` say what its remaining references name (see Targets)."""

    @property
    def content(self) -> dict[str, Any]: ...

    @property
    def reach(self) -> frozenset[str]: ...

    @property
    def outward(self) -> frozenset[str]: ...

    @property
    def unresolved(self) -> bool: ...

    def remove_elements(self, labels: Iterable[int]) -> None:
        """Remove the elements of these element labels (indices into its labels)."""

    def scrub(self, live: set[str], required: RequiredElements) -> None:
        """Remove references to anything not in `live`; mask those the resource must keep."""

    def missing(self, required: RequiredElements) -> str | None:
        """The first required element the content lacks, as a path, or None."""


# -- changes kept as paths ----------------------------------------------------------------

# What happens at a path: the element goes (with its `_name` sibling, as an element
# label removes it), it goes alone, it is masked, or a list becomes [masked].
REMOVE_ELEMENT, REMOVE, MASK, MASK_LIST = range(4)


class PathRedaction:
    """Changes to a resource of simple shape, as paths into the resource as given."""

    __slots__ = (
        "_facts",
        "_shape",
        "_keys",
        "_refs_to",
        "_outward_refs_to",
        "_unresolved_refs",
        "_changes",
        "_gone",
        "_removed",
        "_masked",
        "_content",
        "_copies",
        "reach",
        "outward",
        "unresolved",
        "_missing_known",
        "_missing",
    )

    def __init__(self, facts: ResourceFacts, shape: Shape) -> None:
        self._facts = facts
        self._shape = shape
        targets = facts.targets
        self._keys = targets.keys
        self._refs_to, self._outward_refs_to, self._unresolved_refs = targets.by_key(facts.refs)
        self._changes: dict[Path, int] = {}
        self._gone: set[int] = set()  # references no longer in the content
        self._removed: set[tuple[str, ...]] = set()  # element names of what was removed
        self._masked: set[tuple[str, ...]] = set()  # and of what was masked
        self._content: dict[str, Any] | None = facts.resource
        # The objects of `_content` that are copies, by their path in the resource as given.
        self._copies: dict[Path, Any] = {}
        self.reach = targets.reach
        self.outward = targets.outward
        self.unresolved = targets.unresolved
        self._missing_known = False
        self._missing: str | None = None

    @property
    def content(self) -> dict[str, Any]:
        if self._content is None:
            self._copies = {}
            self._content = apply_changes(self._facts.resource, self._changes, self._copies)
        return self._content

    def _take(self, references: set[int]) -> None:
        """Forget references the changes took."""
        self._content = None
        self._missing_known = False
        gone = self._gone
        taken = references - gone
        if not taken:
            return
        gone |= taken
        keys = self._keys
        named = {k for i in taken if (k := keys[i]) is not None}
        vanished = {k for k in named if gone.issuperset(self._refs_to[k])}
        if vanished:
            self.reach = self.reach - vanished
        outward_refs_to = self._outward_refs_to
        vanished = {k for k in named & self.outward if gone.issuperset(outward_refs_to[k])}
        if vanished:
            self.outward = self.outward - vanished
        if self.unresolved:
            self.unresolved = not gone.issuperset(self._unresolved_refs)

    def remove_elements(self, labels: Iterable[int]) -> None:
        shape = self._shape
        taken: set[int] = set()
        for i in labels:
            self._changes[shape.element_paths[i]] = REMOVE_ELEMENT
            self._removed.add(shape.element_names[i])
            taken |= shape.refs_under_element[i]
        self._take(taken)

    def scrub(self, live: set[str], required: RequiredElements) -> None:
        shape = self._shape
        paths, ref_names = self._facts.ref_paths, shape.ref_names
        changes = self._changes
        gone = self._gone
        outward_refs_to = self._outward_refs_to
        doomed = [j for k in self.outward - live for j in outward_refs_to[k] if j not in gone]
        if self.unresolved:
            doomed += [j for j in self._unresolved_refs if j not in gone]
        doomed.sort()
        # The last reference of a list to go, by list: lists emptied are masked, then
        # dropped where the profile allows, in the order they were emptied.
        last_in_list: dict[Path, int] = {}
        for i in doomed:
            path = paths[i]
            if type(path[-1]) is int:
                changes[path] = REMOVE
                last_in_list[path[:-1]] = i
                self._removed.add(ref_names[i])
            else:
                changes[path] = MASK
                self._masked.add(ref_names[i])
        emptied = sorted(
            (i, items)
            for items, i in last_in_list.items()
            if all((*items, j) in changes for j in range(shape.ref_lists[items]))
        )
        for i, items in emptied:
            changes[items] = MASK_LIST
            self._masked.add(ref_names[i])
        self._take(set(doomed))
        if emptied:
            self._drop_emptied_lists([(ref_names[i], items) for i, items in emptied], required)

    def _drop_emptied_lists(
        self, emptied: list[tuple[tuple[str, ...], Path]], required: RequiredElements
    ) -> None:
        """Drop each list emptied of references (masked so far) where the resource
        keeps every required element without it; in order, each seeing the last."""
        facts = self._facts
        changes = self._changes
        profile = facts.complete_under(required)
        if profile is None:
            # The resource as given lacks a required element: check whole resources.
            for names, items in emptied:
                trial = dict(changes)
                trial[items] = REMOVE
                if required.missing(apply_changes(facts.resource, trial, {})) is None:
                    changes[items] = REMOVE
                    self._removed.add(names)
            return
        content = self.content
        copies = self._copies
        # Dropping a list changes only the required elements naming it or its
        # ancestors: the others are missing with or without it.
        missing = profile.missing_after(content, self._removed, self._masked)
        for names, items in emptied:
            affected = profile.affected(names, True)
            if any(i not in affected for i in missing):
                continue
            trial, fresh = _without(content, copies, items)
            if profile.present(trial, affected):
                content, missing = trial, []
                copies.update(fresh)
                changes[items] = REMOVE
                self._removed.add(names)
        self._content = content
        self._missing = profile.describe(content, missing[0]) if missing else None
        self._missing_known = True

    def missing(self, required: RequiredElements) -> str | None:
        if not self._missing_known:
            content = self.content
            profile = self._facts.complete_under(required)
            if profile is None:
                self._missing = required.missing(content)
            else:
                # The resource as given has every required element: only those the
                # changes could have taken need checking.
                missing = profile.missing_after(content, self._removed, self._masked)
                self._missing = profile.describe(content, missing[0]) if missing else None
            self._missing_known = True
        return self._missing


def apply_changes(
    resource: dict[str, Any], changes: dict[Path, int], copies: dict[Path, Any]
) -> dict[str, Any]:
    """The resource with the changes made, copying only the objects on their paths (put
    in `copies` by path), without the objects and lists the changes leave empty."""
    tree: dict[Any, Any] = {}
    for path, change in changes.items():
        node = tree
        for step in path[:-1]:
            child = node.get(step)
            if child is None:
                child = node[step] = {}
            elif not isinstance(child, dict):
                break  # a change above this one takes all below it
            node = child
        else:
            node[path[-1]] = change
    out: dict[str, Any] | None = _apply(resource, tree, (), copies)
    assert out is not None  # resourceType stays
    return out


def _apply(node: Any, tree: dict[Any, Any], path: Path, copies: dict[Path, Any]) -> Any:
    """`node` changed as `tree` says, or None when nothing is left of it."""
    if type(node) is dict:
        out = dict(node)
        for key, change in tree.items():
            if change == REMOVE_ELEMENT:
                del out[key]
                out.pop(f"_{key}", None)
            elif change == REMOVE:
                del out[key]
            elif change == MASK:
                out[key] = _masked()
            elif change == MASK_LIST:
                out[key] = [_masked()]
            else:
                child = _apply(out[key], change, (*path, key), copies)
                if child is None:
                    del out[key]
                else:
                    out[key] = child
        copies[path] = out
        return out or None
    items = list(node)
    for index, change in tree.items():
        if change == REMOVE_ELEMENT or change == REMOVE:
            items[index] = _GONE
        elif change == MASK:
            items[index] = _masked()
        elif change == MASK_LIST:
            items[index] = [_masked()]
        else:
            child = _apply(items[index], change, (*path, index), copies)
            items[index] = _GONE if child is None else child
    kept = [v for v in items if v is not _GONE]
    copies[path] = kept
    return kept or None


def _without(
    content: dict[str, Any], copies: dict[Path, Any], path: Path
) -> tuple[Any, dict[Path, Any]]:
    """`content` less the element at `path` and what that leaves empty, copying only the
    objects on the way (all copies already, found in `copies`); and the new copies."""
    chain = [copies[path[:depth]] for depth in range(len(path))]
    fresh: list[Any] = [dict(node) if type(node) is dict else list(node) for node in chain]
    for depth in range(1, len(chain)):
        parent, step = fresh[depth - 1], path[depth - 1]
        if type(step) is int:  # lists may have lost items: find it where it is now
            step = next(i for i, v in enumerate(parent) if v is chain[depth])
        parent[step] = fresh[depth]
    del fresh[-1][path[-1]]
    depth = len(fresh) - 1
    while depth > 0 and not fresh[depth]:
        parent, step = fresh[depth - 1], path[depth - 1]
        if type(step) is int:
            step = next(i for i, v in enumerate(parent) if v is fresh[depth])
        del parent[step]
        depth -= 1
    return fresh[0], {path[:d]: fresh[d] for d in range(depth + 1)}


# -- changes made on a deep copy ------------------------------------------------------------


class CopyRedaction:
    """Changes to a resource of any shape, made on a deep copy as the first filter made them."""

    __slots__ = (
        "_content",
        "_elements",
        "_resolve",
        "reach",
        "outward",
        "unresolved",
        "_missing_known",
        "_missing",
    )

    def __init__(self, facts: ResourceFacts, resolve: Callable[[str], str | None]) -> None:
        self._content = facts.resource
        self._elements = tuple(e.path for e in facts.elements)
        self._resolve = resolve
        targets = facts.targets
        self.reach = targets.reach
        self.outward = targets.outward
        self.unresolved = targets.unresolved
        self._missing_known = False
        self._missing: str | None = None

    @property
    def content(self) -> dict[str, Any]:
        return self._content

    def _set(self, content: dict[str, Any]) -> None:
        self._content = content
        self._missing_known = False
        found = [(ref, self._resolve(ref)) for _, ref in references(content)]
        self.reach = frozenset(k for _, k in found if k is not None)
        outward = [k for ref, k in found if not ref.startswith("#")]
        self.unresolved = None in outward
        self.outward = frozenset(k for k in outward if k is not None)

    def remove_elements(self, labels: Iterable[int]) -> None:
        copied = copy.deepcopy(self._content)
        for i in labels:
            _remove_one(copied, self._elements[i])
        _prune(copied)
        self._set(copied)

    def _doomed(self, live: set[str]) -> list[Path]:
        doomed: list[Path] = []
        for path, ref in references(self._content):
            if ref.startswith("#"):
                continue
            target = self._resolve(ref)
            if target is None and ref.startswith(("http://", "https://", "urn:")):
                doomed.append(path)  # an address outside the record would tell where else data is
                continue
            if target not in live:
                doomed.append(path)
        return doomed

    def scrub(self, live: set[str], required: RequiredElements) -> None:
        """Remove references to anything not shared; mask those a resource must keep."""
        doomed = self._doomed(live)
        out = copy.deepcopy(self._content)
        list_items = [p for p in doomed if p and isinstance(p[-1], int)]
        singles = [p for p in doomed if p and not isinstance(p[-1], int)]
        for p in singles:
            _set(out, p, _masked())
        emptied: list[Path] = []
        for p in list_items:
            parent = _get(out, p[:-1])
            parent[p[-1]] = _GONE
            if all(v is _GONE for v in parent):
                emptied.append(p[:-1])
        for p in emptied:
            parent = _get(out, p)
            parent[:] = [_masked()]
        _prune(out)
        # A list emptied of references stays only where the profile requires it.
        for p in emptied:
            try:
                holder = _get(out, p[:-1])
            except (KeyError, IndexError, TypeError):
                continue
            trial = copy.deepcopy(out)
            del _get(trial, p[:-1])[p[-1]]
            _prune(trial)
            if required.missing(trial) is None:
                del holder[p[-1]]
        _prune(out)
        self._set(out)

    def missing(self, required: RequiredElements) -> str | None:
        if not self._missing_known:
            self._missing = required.missing(self._content)
            self._missing_known = True
        return self._missing


def _remove_one(node: Any, path: Path) -> None:
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return
    last = path[-1]
    try:
        if isinstance(last, int):
            node[last] = _GONE  # a placeholder, so the indices of the others stay valid
        else:
            node.pop(last, None)
            node.pop(f"_{last}", None)
    except (IndexError, TypeError, AttributeError):
        return


def _prune(node: Any) -> Any:
    """Drop removed list items and the empty objects and lists removal leaves."""
    if isinstance(node, dict):
        for k in list(node):
            v = _prune(node[k])
            if v is _GONE or v == {} or v == []:
                del node[k]
            else:
                node[k] = v
        return node
    if isinstance(node, list):
        kept = [_prune(v) for v in node if v is not _GONE]
        return [v for v in kept if v is not _GONE and v != {} and v != []]
    return node


def _get(node: Any, path: Path) -> Any:
    for step in path:
        node = node[step]
    return node


def _set(node: Any, path: Path, value: Any) -> None:
    _get(node, path[:-1])[path[-1]] = value
