"""Filtering: what actually leaves, once the decision is made.

A resource carrying a category the decision does not allow is withheld whole;
an element carrying one is removed and the resource is marked REDACTED
(https://hl7.org/fhir/R4/security-labels.html, v3-ObservationValue#REDACTED).
References to withheld content are removed, or masked with the
data-absent-reason `masked` where the element is required, so nothing dangles.
Supporting resources (professionals, organisations) go only when something
shared refers to them. What was withheld, and why, is reported for the sender.

Most of a record usually goes unchanged, so the work is arranged around that:
what each resource refers to, and how it looks when it goes unchanged, were
worked out when it was labelled (`ResourceFacts`); a resource is only copied
when something in it must go, and then only the objects on the way to the
change (`_redaction`); and required elements are checked again only where a
change could have removed one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from cpa_fhir.consent._decision import Decision
from cpa_fhir.consent._facts import RecordIndex, ResourceFacts
from cpa_fhir.consent._labelling import LabelledResource
from cpa_fhir.consent._output import outgoing_resource
from cpa_fhir.consent._policy import SharingPolicy
from cpa_fhir.consent._redaction import CopyRedaction, PathRedaction, Redaction
from cpa_fhir.consent._references import resolve
from cpa_fhir.consent._required import RequiredElements as RequiredElements
from cpa_fhir.fhir import jsonio

NOT_NEEDED = "not needed: no shared content refers to it"


@dataclass(frozen=True, slots=True)
class WithheldItem:
    """One thing that did not go: a resource, or an element of a shared one."""

    reference: str  # Type/id
    element: str | None  # FHIRPath-like location inside it, or None for the whole resource
    categories: frozenset[str]  # the categories that stopped it (empty: see reason)
    reason: str


class FilterResult:
    """What goes, in record order, as (fullUrl, resource); what was withheld and why;
    and the categories of what goes.

    `shared` is built when first asked for. `entry_bytes()` gives the same entries
    serialised, reusing the serialisation made when an unchanged resource was first
    shared, for callers that write the Bundle as bytes.
    """

    __slots__ = ("withheld", "shared_categories", "_shared", "_outgoing", "_policy")

    def __init__(
        self,
        shared: list[tuple[str | None, dict[str, Any]]],
        withheld: list[WithheldItem],
        shared_categories: frozenset[str],
    ) -> None:
        self.withheld = withheld
        self.shared_categories = shared_categories
        self._shared: list[tuple[str | None, dict[str, Any]]] | None = shared
        self._outgoing: list[_Outgoing] = []
        self._policy: SharingPolicy | None = None

    @classmethod
    def _of(
        cls,
        outgoing: list[_Outgoing],
        withheld: list[WithheldItem],
        shared_categories: frozenset[str],
        policy: SharingPolicy,
    ) -> FilterResult:
        result = cls.__new__(cls)
        result.withheld = withheld
        result.shared_categories = shared_categories
        result._shared = None
        result._outgoing = outgoing
        result._policy = policy
        return result

    @property
    def shared(self) -> list[tuple[str | None, dict[str, Any]]]:
        if self._shared is None:
            policy = self._policy
            assert policy is not None
            self._shared = [
                (url, resource if facts is None else facts.outgoing(policy))
                for url, resource, facts in self._outgoing
            ]
        return self._shared

    def entry_bytes(self) -> list[bytes]:
        """Each shared entry as a serialised Bundle.entry ({"fullUrl", "resource"}), in order."""
        if self._policy is None:
            return [jsonio.dumps(_entry(url, resource)) for url, resource in self.shared]
        policy = self._policy
        return [
            jsonio.dumps(_entry(url, resource)) if facts is None else facts.entry_json(policy)
            for url, resource, facts in self._outgoing
        ]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FilterResult):
            return NotImplemented
        return (self.shared, self.withheld, self.shared_categories) == (
            other.shared,
            other.withheld,
            other.shared_categories,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"FilterResult(shared={self.shared!r}, withheld={self.withheld!r}, "
            f"shared_categories={self.shared_categories!r})"
        )


# A shared entry: fullUrl, and the resource as it leaves, or the facts of a resource
# that leaves unchanged (its shared copy and serialisation are made from them).
_Outgoing = tuple[str | None, dict[str, Any], ResourceFacts | None]


def _entry(url: str | None, resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": url, "resource": resource} if url else {"resource": resource}


class _Denials:
    """What of a set of categories the decision does not allow, and why: worded once per
    set denied, and looked up by the (labelled resource's own) set of categories."""

    __slots__ = ("_allowed", "_why", "_by_categories", "_worded")

    def __init__(self, decision: Decision, allowed: frozenset[str]) -> None:
        self._allowed = allowed
        self._why = decision.denied
        self._by_categories: dict[frozenset[str], tuple[frozenset[str], str]] = {}
        self._worded: dict[frozenset[str], str] = {}

    def __call__(self, categories: frozenset[str]) -> tuple[frozenset[str], str]:
        found = self._by_categories.get(categories)
        if found is None:
            denied = categories - self._allowed
            reason = self._worded.get(denied)
            if reason is None:
                why = self._why
                phrases = [f"{c}: {why.get(c, 'not allowed')}" for c in denied]
                if len(phrases) > 1:
                    phrases.sort()
                reason = self._worded[denied] = "; ".join(phrases)
            found = self._by_categories[categories] = (denied, reason)
        return found


def filter_record(
    record: Sequence[LabelledResource],
    decision: Decision,
    policy: SharingPolicy,
    required: RequiredElements,
) -> FilterResult:
    """Apply a decision to a labelled record. Pure: the input is not changed."""
    allowed = frozenset(decision.allowed)
    denials = _Denials(decision, allowed)
    withheld: list[WithheldItem] = []
    kept: dict[str, LabelledResource] = {}
    for item in record:
        cats = item.categories
        if cats <= allowed:
            kept[item.key] = item
        else:
            denied, reason = denials(cats)
            withheld.append(_withheld(item.key, None, denied, reason))
    known = _Known(_labelled_together(record), kept, record, policy, required)
    facts_of = known.facts_of

    # Element labels: a resource changes only when something inside it must go.
    redactions: dict[str, Redaction] = {}
    element_categories: dict[str, frozenset[str]] = {}
    for key in known.with_elements:
        facts = facts_of[key]
        if facts.element_union <= allowed:
            continue
        elements = kept[key].elements
        doomed = [i for i, e in enumerate(elements) if not e.categories <= allowed]
        element_categories[key] = frozenset(
            c for e in elements if e.categories <= allowed for c in e.categories
        )
        redacted = redactions[key] = known.redaction(key)
        redacted.remove_elements(doomed)
        known.changed(key, redacted)
        for i in doomed:
            denied, reason = denials(elements[i].categories)
            withheld.append(_withheld(key, known.expression(key, i), denied, reason))

    outward, unresolved, unchecked = known.outward, known.unresolved, known.unchecked
    unchecked.update(redactions)
    dropped: dict[str, str] = {}
    live = set(kept)
    # Withholding one resource can strip another of something it needs: repeat
    # until nothing changes.
    while True:
        reachable = known.reachable(live)
        if len(reachable) != len(live):
            for key in live - reachable:
                dropped[key] = NOT_NEEDED
            live = reachable
        # Resources referring to what does not go, or not yet known to have every
        # required element, in key order (as the first filter went through them).
        dead_ends = [key for key in live if not outward[key] <= live]
        work = sorted({*dead_ends, *(unresolved & live), *(unchecked & live)})
        newly_dropped = []
        for key in work:
            changes: Redaction | None = redactions.get(key)
            if key in unresolved or not outward[key] <= live:
                if changes is None:
                    changes = redactions[key] = known.redaction(key)
                changes.scrub(live, required)
                known.changed(key, changes)
            if changes is None:
                missing = facts_of[key].missing(required)
                if missing is None:
                    known.complete(key)
            else:
                missing = changes.missing(required)
            unchecked.discard(key)
            if missing is not None:
                dropped[key] = f"a required element ({missing}) was withheld"
                newly_dropped.append(key)
        if not newly_dropped:
            break
        live.difference_update(newly_dropped)

    outgoing: list[_Outgoing] = []
    shared_categories: set[str] = set()
    # With every key once, what was kept is in record order already.
    in_order = kept.items() if known.unique else ((item.key, item) for item in record)
    for key, item in in_order:
        if key not in kept:
            continue
        if key in dropped:
            withheld.append(_withheld(key, None, frozenset(), dropped[key]))
            continue
        facts = facts_of[key]
        if key not in redactions and item is kept[key] and facts.plain_meta:
            cats = facts.output_categories
            outgoing.append((item.full_url, facts.resource, facts))
        else:
            changed = redactions.get(key)
            cats = item.categories | element_categories.get(key, facts.element_union)
            content = facts.resource if changed is None else changed.content
            resource = outgoing_resource(content, cats, changed is not None, policy)
            outgoing.append((item.full_url, resource, None))
        shared_categories |= cats
    return FilterResult._of(outgoing, withheld, frozenset(shared_categories), policy)


_FACTS = attrgetter("facts")


def _labelled_together(record: Sequence[LabelledResource]) -> RecordIndex | None:
    """The index of the record as label_resources made it, if that is what was given."""
    first = record[0].facts if record else None
    index = first.record if first is not None else None
    if index is not None and index.holds(tuple(map(_FACTS, record))):
        return index
    return None


class _Known:
    """What filtering knows of the resources kept, brought up to date as they change:
    their facts, what they refer to, and whether they have every required element."""

    __slots__ = (
        "facts_of",
        "by_url",
        "unique",
        "with_elements",
        "reach",
        "outward",
        "unresolved",
        "unchecked",
        "roots",
        "_complete",
    )

    def __init__(
        self,
        index: RecordIndex | None,
        kept: Mapping[str, LabelledResource],
        record: Sequence[LabelledResource],
        policy: SharingPolicy,
        required: RequiredElements,
    ) -> None:
        if index is not None and index.unique:
            # The record as labelled, every key once: start from what labelling gathered.
            facts_of = {key: item.facts for key, item in kept.items() if item.facts is not None}
            self.facts_of: Mapping[str, ResourceFacts] = facts_of
            self.by_url = index.by_url
            self.unique = True
            self.with_elements = [key for key in index.with_elements if key in kept]
            if not index.reach.keys() >= kept.keys():
                index.resolve({k: f for k, f in facts_of.items() if k not in index.reach})
            self.reach = dict(index.reach)
            self.outward = dict(index.outward)
            self.unresolved = index.unresolved.intersection(kept)
            self._complete = index.complete.setdefault(required, set())
            self.unchecked = kept.keys() - self._complete
            types = index.keys_by_type
            supporting_keys = [types[t] for t in policy.supporting if t in types]
            self.roots = kept.keys() - set().union(*supporting_keys)
            return
        facts_of = {}
        if index is not None:
            self.by_url = index.by_url
            for key, item in kept.items():
                assert item.facts is not None
                facts_of[key] = item.facts
        else:
            # Put together otherwise: references resolve against this record.
            self.by_url = {r.full_url: r.key for r in record if r.full_url}
            for key, item in kept.items():
                facts = item.facts
                if facts is None:  # made by hand, or changed since it was labelled
                    facts = ResourceFacts(
                        item.resource, item.categories, item.elements, item.full_url
                    )
                facts_of[key] = facts.retargeted(self.by_url)
        self.facts_of = facts_of
        self.unique = False
        self.with_elements = list(facts_of)
        self.reach = {key: facts.targets.reach for key, facts in facts_of.items()}
        self.outward = {key: facts.targets.outward for key, facts in facts_of.items()}
        self.unresolved = {key for key, facts in facts_of.items() if facts.targets.unresolved}
        self._complete = set()
        self.unchecked = {k for k, f in facts_of.items() if not f.known_complete(required)}
        supporting = policy.supporting
        self.roots = {
            key
            for key, facts in facts_of.items()
            if (facts.resource_type or kept[key].resource_type) not in supporting
        }

    def redaction(self, key: str) -> Redaction:
        facts = self.facts_of[key]
        shape = facts.shape
        if shape.simple:
            return PathRedaction(facts, shape)
        by_url = self.by_url
        return CopyRedaction(facts, lambda ref: resolve(ref, by_url))

    def expression(self, key: str, label: int) -> str:
        """ElementLabel.expression of an element label."""
        return self.facts_of[key].shape.element_expressions[label]

    def changed(self, key: str, changes: Redaction) -> None:
        self.reach[key], self.outward[key] = changes.reach, changes.outward
        if not changes.unresolved:
            self.unresolved.discard(key)

    def complete(self, key: str) -> None:
        """The resource, unchanged, has every required element (noted for next time)."""
        self._complete.add(key)

    def reachable(self, live: set[str]) -> set[str]:
        """Live resources, less supporting ones that nothing shared refers to."""
        reach = self.reach
        reached = self.roots & live
        frontier = reached
        while frontier:
            found = set().union(*map(reach.__getitem__, frontier))
            found &= live
            found -= reached
            reached |= found
            frontier = found
        return reached


def _fast_withheld() -> Callable[[str, str | None, frozenset[str], str], WithheldItem]:
    """WithheldItem's constructor, less the frozen dataclass's object.__setattr__ call
    per field, which is most of its cost; a filter makes dozens of them."""
    new = object.__new__
    fields = vars(WithheldItem)
    set_reference = fields["reference"].__set__
    set_element = fields["element"].__set__
    set_categories = fields["categories"].__set__
    set_reason = fields["reason"].__set__

    def make(
        reference: str, element: str | None, categories: frozenset[str], reason: str
    ) -> WithheldItem:
        item: WithheldItem = new(WithheldItem)
        set_reference(item, reference)
        set_element(item, element)
        set_categories(item, categories)
        set_reason(item, reason)
        return item

    return make


_withheld = _fast_withheld()
