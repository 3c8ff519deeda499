"""What filtering needs to know about a labelled resource, kept with it.

Filtering asks the same questions of a resource for every recipient: where its
references are and what they name, whether its element labels and references
sit where a change can be made by copying only the objects on the way to it,
whether it has every required element, and what it looks like when it goes
out unchanged. None of that depends on the decision, so it is kept with the
labelled resource, worked out the first time filtering needs it (a resource
that is never shared is never walked for it, one that never changes is never
surveyed for changing); filtering is then mostly set operations, and only
resources that change are copied. A labelled resource is a snapshot: its
resource must not be changed afterwards (its labels would be stale too).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from cpa_fhir.consent._output import outgoing_resource
from cpa_fhir.consent._references import Path, resolve
from cpa_fhir.fhir import jsonio

if TYPE_CHECKING:
    from cpa_fhir.consent._labelling import ElementLabel
    from cpa_fhir.consent._policy import SharingPolicy
    from cpa_fhir.consent._required import ProfileRequirements, RequiredElements


class RecordIndex:
    """A record labelled together: references to its entries' fullUrls name their `Type/id`.

    `ids` are the ids of its resources' facts, in record order: a record given to
    the filter whose resources have facts of this index with these ids is the
    record as labelled, and their references resolve against it. When its
    resources' keys are all different (`unique`), what they refer to is also kept
    by key (filled in as filtering first needs it), so that filtering starts from
    that. The index holds no facts, so that a labelled record is freed as soon as
    it is dropped (no reference cycle).
    """

    __slots__ = (
        "by_url",
        "ids",
        "unique",
        "keys_by_type",
        "with_elements",
        "reach",
        "outward",
        "unresolved",
        "complete",
    )

    def __init__(self, by_url: dict[str, str]) -> None:
        self.by_url = by_url
        self.ids: tuple[int, ...] = ()
        self.unique = False
        self.keys_by_type: dict[str, frozenset[str]] = {}
        self.with_elements: tuple[str, ...] = ()  # keys of resources with element labels
        self.reach: dict[str, frozenset[str]] = {}
        self.outward: dict[str, frozenset[str]] = {}
        self.unresolved: set[str] = set()
        # Keys of resources known to have every element a RequiredElements asks for.
        self.complete: dict[RequiredElements, set[str]] = {}

    def gather(self, keys: Sequence[str], facts: Sequence[ResourceFacts]) -> None:
        self.ids = tuple(map(id, facts))
        by_key = dict(zip(keys, facts, strict=True))
        if len(by_key) != len(facts) or any(f.resource_type is None for f in facts):
            return
        self.unique = True
        types: dict[str, set[str]] = {}
        for k, f in by_key.items():
            types.setdefault(str(f.resource_type), set()).add(k)
        self.keys_by_type = {t: frozenset(ks) for t, ks in types.items()}
        self.with_elements = tuple(k for k, f in by_key.items() if f.element_union)

    def holds(self, facts: Sequence[ResourceFacts | None]) -> bool:
        """Whether these are the facts of this record, in its order."""
        # Facts of this index alive together have different ids, so equal ids are the
        # same facts.
        return (
            tuple(map(id, facts)) == self.ids
            and None not in facts
            and set(map(_RECORD, facts)) == {self}
        )

    def resolve(self, facts_of: Mapping[str, ResourceFacts]) -> None:
        """Have `reach`, `outward` and `unresolved` say what these resources refer to."""
        for key, facts in facts_of.items():
            targets = facts.targets
            self.reach[key] = targets.reach
            self.outward[key] = targets.outward
            if targets.unresolved:
                self.unresolved.add(key)


_RECORD = attrgetter("record")


class Targets:
    """What a resource's references name in one record."""

    __slots__ = ("keys", "reach", "outward", "unresolved", "_by_key")

    def __init__(self, refs: Sequence[str], by_url: dict[str, str]) -> None:
        keys = self.keys = tuple(resolve(ref, by_url) for ref in refs)
        outward = [k for ref, k in zip(refs, keys, strict=True) if not ref.startswith("#")]
        self.reach = frozenset(k for k in keys if k is not None)
        self.outward = frozenset(k for k in outward if k is not None)
        self.unresolved = None in outward
        self._by_key: (
            tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], tuple[int, ...]] | None
        ) = None

    def by_key(
        self, refs: Sequence[str]
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], tuple[int, ...]]:
        """The references naming each Type/id; the same, local (#) ones left out; and the
        non-local ones naming nothing."""
        if self._by_key is None:
            refs_to: dict[str, list[int]] = {}
            outward_refs_to: dict[str, list[int]] = {}
            unresolved: list[int] = []
            for i, (ref, key) in enumerate(zip(refs, self.keys, strict=True)):
                local = ref.startswith("#")
                if key is None:
                    if not local:
                        unresolved.append(i)
                    continue
                refs_to.setdefault(key, []).append(i)
                if not local:
                    outward_refs_to.setdefault(key, []).append(i)
            self._by_key = (
                {k: tuple(v) for k, v in refs_to.items()},
                {k: tuple(v) for k, v in outward_refs_to.items()},
                tuple(unresolved),
            )
        return self._by_key


class Shape:
    """Where a resource's element labels and references sit, for changing it.

    `simple`: changes can be made by copying only the objects on the path to them:
    plain JSON objects and lists, none empty or appearing twice, no reference inside
    another, element labels where they can be removed without reaching inside a
    reference, an item of a list of references, meta or resourceType.
    """

    __slots__ = (
        "simple",
        "ref_names",
        "ref_lists",
        "element_paths",
        "element_names",
        "element_expressions",
        "refs_under_element",
    )

    def __init__(
        self, resource: dict[str, Any], ref_paths: Sequence[Path], elements: Sequence[ElementLabel]
    ) -> None:
        survey = _Survey(resource)
        self.ref_names = tuple(names(p) for p in ref_paths)
        self.ref_lists = survey.lists  # lists holding references as items -> their lengths
        simple = survey.simple
        under: list[frozenset[int]] = []
        for element in elements:
            simple = simple and _removable(resource, element.path, ref_paths, survey.lists)
            under.append(_refs_under(element.path, ref_paths))
        self.simple = simple
        self.element_paths = tuple(e.path for e in elements)
        self.element_names = tuple(names(p) for p in self.element_paths)
        self.element_expressions = tuple(e.expression for e in elements)
        self.refs_under_element = tuple(under)  # references each one's removal takes


class ResourceFacts:
    """Decision-independent facts about one labelled resource (see the module docstring)."""

    __slots__ = (
        "resource",
        "full_url",
        "resource_type",
        "record",
        "elements",
        "element_union",
        "output_categories",
        "plain_meta",
        "_found",
        "_targets",
        "_shape",
        "_missing_for",
        "_missing",
        "_requirements",
        "_entry_policy",
        "_entry_json",
    )

    resource: dict[str, Any]
    full_url: str | None
    resource_type: str | None
    record: RecordIndex | None  # the record its references resolve against
    elements: tuple[ElementLabel, ...]
    element_union: frozenset[str]  # every category its element labels carry
    output_categories: frozenset[str]  # what it is labelled with when it goes unchanged
    plain_meta: bool  # meta absent or an object: its shared copy can be made at any time

    def __init__(
        self,
        resource: dict[str, Any],
        categories: frozenset[str],
        elements: tuple[ElementLabel, ...],
        full_url: str | None,
        record: RecordIndex | None = None,
    ) -> None:
        self.resource = resource
        self.full_url = full_url
        rt = resource.get("resourceType") if isinstance(resource, dict) else None
        self.resource_type = str(rt) if rt is not None else None
        self.record = record
        self.elements = elements
        self.element_union = frozenset().union(*(e.categories for e in elements))
        self.output_categories = categories | self.element_union
        meta = resource.get("meta") if isinstance(resource, dict) else None
        self.plain_meta = not meta or type(meta) is dict
        self._found: tuple[tuple[str, ...], tuple[Path, ...]] | None = None
        self._targets: Targets | None = None
        self._shape: Shape | None = None
        self._missing_for: RequiredElements | None = None
        self._missing: str | None = None
        self._requirements: ProfileRequirements | None = None
        self._entry_policy: SharingPolicy | None = None
        self._entry_json = b""

    def _references(self) -> tuple[tuple[str, ...], tuple[Path, ...]]:
        if self._found is None:
            refs: list[str] = []
            paths: list[Path] = []
            if isinstance(self.resource, dict):
                _find_in_object(self.resource, (), refs, paths)
            self._found = (tuple(refs), tuple(paths))
        return self._found

    @property
    def refs(self) -> tuple[str, ...]:
        """Each reference, in document order (as `references()` finds them)."""
        return self._references()[0]

    @property
    def ref_paths(self) -> tuple[Path, ...]:
        """Where each is."""
        return self._references()[1]

    @property
    def targets(self) -> Targets:
        if self._targets is None:
            by_url = self.record.by_url if self.record is not None else {}
            self._targets = Targets(self.refs, by_url)
        return self._targets

    @property
    def shape(self) -> Shape:
        if self._shape is None:
            self._shape = Shape(self.resource, self.ref_paths, self.elements)
        return self._shape

    def retargeted(self, by_url: dict[str, str]) -> ResourceFacts:
        """These facts with the references resolved against another record's fullUrls."""
        other = copy.copy(self)
        other.record = None
        other._targets = Targets(self.refs, by_url)
        return other

    def missing(self, required: RequiredElements) -> str | None:
        """The first required element the resource as given lacks (kept: it never changes)."""
        if self._missing_for is not required:
            self._requirements = required.of(self.resource)
            self._missing = (
                required.missing(self.resource)
                if self._requirements is None
                else self._requirements.missing(self.resource)
            )
            self._missing_for = required
        return self._missing

    def complete_under(self, required: RequiredElements) -> ProfileRequirements | None:
        """The required elements of its profiles, when the resource as given has every one
        (a change that keeps meta and resourceType keeps the profiles); else None."""
        return self._requirements if self.missing(required) is None else None

    def known_complete(self, required: RequiredElements) -> bool:
        """Whether the resource is known to have every element `required` asks for."""
        return self._missing_for is required and self._missing is None

    def outgoing(self, policy: SharingPolicy) -> dict[str, Any]:
        """The resource as it leaves unchanged: a new top level and meta, labelled."""
        return outgoing_resource(self.resource, self.output_categories, False, policy)

    def entry_json(self, policy: SharingPolicy) -> bytes:
        """Its Bundle entry, serialised, when it goes unchanged (kept: it never changes)."""
        if self._entry_policy is not policy:
            resource = self.outgoing(policy)
            entry = (
                {"fullUrl": self.full_url, "resource": resource}
                if self.full_url
                else {"resource": resource}
            )
            self._entry_json = jsonio.dumps(entry)
            self._entry_policy = policy
        return self._entry_json


# The walk of `references()`, without its generators (labelling and filtering
# find the references of every resource they share).


def _find_in_object(node: dict[str, Any], path: Path, refs: list[str], paths: list[Path]) -> None:
    ref = node.get("reference")
    if isinstance(ref, str):
        refs.append(ref)
        paths.append(path)
    for k, v in node.items():
        if isinstance(v, dict):
            _find_in_object(v, (*path, k), refs, paths)
        elif isinstance(v, list):
            _find_in_list(v, (*path, k), refs, paths)


def _find_in_list(node: list[Any], path: Path, refs: list[str], paths: list[Path]) -> None:
    for i, v in enumerate(node):
        if isinstance(v, dict):
            _find_in_object(v, (*path, i), refs, paths)
        elif isinstance(v, list):
            _find_in_list(v, (*path, i), refs, paths)


class _Survey:
    """A walk over a resource: the lists holding references as items, and whether its
    shape is simple (see Shape)."""

    def __init__(self, resource: Any) -> None:
        self.lists: dict[Path, int] = {}
        self.simple = type(resource) is dict
        self._seen: set[int] = set()
        if isinstance(resource, (dict, list)):
            self._visit(resource, (), False)

    def _visit(self, node: dict[str, Any] | list[Any], path: Path, in_reference: bool) -> None:
        if not node or id(node) in self._seen or type(node) not in (dict, list):
            self.simple = False
        self._seen.add(id(node))
        if isinstance(node, dict):
            if isinstance(node.get("reference"), str):
                if in_reference or not path:
                    self.simple = False
                in_reference = True
            for k, v in node.items():
                if isinstance(v, (dict, list)):
                    self._visit(v, (*path, k), in_reference)
            return
        holds_references = False
        for i, v in enumerate(node):
            if isinstance(v, (dict, list)):
                if isinstance(v, dict) and isinstance(v.get("reference"), str):
                    holds_references = True
                self._visit(v, (*path, i), in_reference)
        if holds_references:
            self.lists[path] = len(node)
            if not path or type(path[-1]) is not str:
                self.simple = False


def names(path: Path) -> tuple[str, ...]:
    """The element names along a path, list indices left out."""
    return tuple(step for step in path if type(step) is str)


def _removable(
    resource: dict[str, Any], path: Path, ref_paths: Sequence[Path], ref_lists: Iterable[Path]
) -> bool:
    """Whether removing the element at `path` is a plain removal (see Shape)."""
    if not path or path[0] in ("meta", "resourceType"):
        return False
    node: Any = resource
    for step in path:
        if type(step) is int and type(node) is list and 0 <= step < len(node):
            node = node[step]
        elif type(step) is str and type(node) is dict and step in node and step[:1] != "_":
            node = node[step]
        else:
            return False
    for holder in ref_paths:
        if len(path) > len(holder) and path[: len(holder)] == holder:
            return False  # inside a reference
    for items in ref_lists:
        if len(path) > len(items) + 1 and path[: len(items)] == items:
            return False  # inside an item of a list of references
    return True


def _refs_under(path: Path, ref_paths: Sequence[Path]) -> frozenset[int]:
    """References that go when the element at `path` is removed (with its `_name` sibling)."""
    prefixes = [path]
    if path and type(path[-1]) is str:
        prefixes.append((*path[:-1], f"_{path[-1]}"))
    return frozenset(
        i for i, at in enumerate(ref_paths) for prefix in prefixes if at[: len(prefix)] == prefix
    )
