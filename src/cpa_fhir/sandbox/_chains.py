"""Chained and reverse-chained (`_has`) criteria for a partner's client.

The database answers a chain on everything stored, so a match it returns may hold
only through something the client may not see: `Patient?_has:Condition:subject:code=X`
would tell a GP that a withheld Condition exists. For a partner, a match therefore
stays only if each chained criterion also holds through what the client sees: every
link followed on the filtered content (a reference removed by filtering leads
nowhere, a withheld resource is not there), and the end parameter compared on the
filtered form of the resource reached
(https://hl7.org/fhir/R4/search.html#chaining, #has).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from cpa_fhir.fhir import jsonio
from cpa_fhir.sandbox._access import PartnerView, partner_scan, patient_of
from cpa_fhir.store import (
    ChainLink,
    Criterion,
    SearchQuery,
    SqlRepository,
    Stored,
    index_resource,
    matching,
)
from cpa_fhir.store._dates import to_micros

# (type, id) -> the resource as the client sees it
Seen = dict[tuple[str, str], dict[str, Any]]


def chains_hold(
    stored: Stored,
    shown: bytes,
    chained: Sequence[Criterion],
    view: PartnerView,
    repo: SqlRepository,
) -> set[tuple[str, str]] | None:
    """Whether every chained criterion holds for the match through what `view` shows:
    None if one does not; else the resources at the criteria's ends that it holds
    through (what a partner's answer tells of, without sending them)."""
    start: Seen = {(stored.resource_type, stored.id): jsonio.loads(shown)}
    through: set[tuple[str, str]] = set()
    for criterion in chained:
        ends = _holds(start, criterion, view, repo)
        if not ends:
            return None
        through |= ends
    return through


def _holds(
    start: Seen, criterion: Criterion, view: PartnerView, repo: SqlRepository
) -> set[tuple[str, str]]:
    """The resources the criterion holds through, as `view` shows them: those at its
    end whose shown form matches it, and those on the way to them (a chain's or a
    nested `_has`'s middle links); none if it does not hold."""
    current = start
    steps: list[dict[tuple[str, str], set[tuple[str, str]]]] = []  # key -> from which
    for link in criterion.chain:
        current, came_from = (
            _reverse(current, link, view, repo)
            if link.reverse
            else _forward(current, link, view, repo)
        )
        steps.append(came_from)
        if not current:
            return set()
    # The end is judged on what the client sees of each resource reached, as a
    # partner's own criteria are (`matching`): found by a value it is shown, never by
    # one withheld from it, and as without a part removed (`:missing=true`, `:not`).
    end = replace(criterion, chain=(), name=criterion.parameter)
    stored = repo.read_many(current)
    by_type: dict[str, list[tuple[Stored, dict[str, Any]]]] = {}
    for key, seen in current.items():
        if key in stored:
            by_type.setdefault(key[0], []).append((stored[key], seen))
    now_micros = to_micros(repo.clock())
    ends: set[tuple[str, str]] = set().union(
        *(
            matching(
                SearchQuery(rtype, criteria=(end,)), given, repo.parameters, now_micros=now_micros
            )
            for rtype, given in by_type.items()
        )
    )
    through, frontier = set(ends), set(ends)
    for came_from in reversed(steps[1:]):  # back along the links, short of the match
        frontier = set().union(*(came_from.get(k, set()) for k in frontier))
        through |= frontier
    return through


def _matches(
    repo: SqlRepository, query: SearchQuery, last: Stored | None, _: int, limit: int
) -> list[Stored]:
    """The page of matches after `last` (in the order of ids)."""
    after = last.id if last is not None else None
    return repo.search(replace(query, count=limit, total="none", after_id=after)).matches


def reference_targets(
    resource: dict[str, Any], rtype: str, parameter: str, repo: SqlRepository
) -> set[tuple[str, str]]:
    """The (type, id) the resource (of type `rtype`, in whatever form it is given)
    refers to by a reference search parameter, of the types the parameter names (a
    canonical written as `Practitioner/x` is no way to a Practitioner)."""
    found = repo.parameters.get(rtype, parameter)
    if found is None:
        return set()
    rows = index_resource(resource, [found]).references
    return {
        (t, i)
        for _, t, i, _ in rows
        if t is not None and i is not None and (not found.targets or t in found.targets)
    }


Step = tuple[Seen, dict[tuple[str, str], set[tuple[str, str]]]]


def _forward(current: Seen, link: ChainLink, view: PartnerView, repo: SqlRepository) -> Step:
    """The resources the client sees that `current`'s filtered references lead to, and
    for each, those of `current` that lead to it."""
    came_from: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for key, resource in current.items():
        for t in reference_targets(resource, key[0], link.reference, repo):
            if t[0] in link.to_types:
                came_from.setdefault(t, set()).add(key)
    found = list(repo.read_many(sorted(came_from)).values())
    # A professional or organisation is seen as an include would send it: judged under
    # the decisions for the records it was reached from (those of `current`).
    reached = {
        target: frozenset(p for k in sources if (p := patient_of(current[k])) is not None)
        for target, sources in came_from.items()
    }
    shown_forms = view.filter_many(found, referred=True, account=False, reached_from=reached)
    seen = {
        (s.resource_type, s.id): jsonio.loads(shown)
        for s, shown in zip(found, shown_forms, strict=True)
        if shown is not None
    }
    return seen, came_from


def _reverse(current: Seen, link: ChainLink, view: PartnerView, repo: SqlRepository) -> Step:
    """The resources the client sees whose filtered `link.reference` points at
    `current`, and for each, those of `current` it points at."""
    source_type = link.to_types[0]
    out: Seen = {}
    came_from: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for rtype, rid in current:
        query = repo.parse(source_type, [(link.reference, f"{rtype}/{rid}")])

        def referring(found: list[Stored], target: tuple[str, str] = (rtype, rid)) -> list[Any]:
            shown_forms = view.filter_many(found, account=False)
            seen = [
                (s, jsonio.loads(shown))
                for s, shown in zip(found, shown_forms, strict=True)
                if shown
            ]
            return [
                (s, form)
                for s, form in seen
                if target in reference_targets(form, source_type, link.reference, repo)
            ]

        for s, form in partner_scan(
            partial(_matches, repo, query), referring, f"{source_type} resources referring to one"
        ):
            out[(s.resource_type, s.id)] = form
            came_from.setdefault((s.resource_type, s.id), set()).add((rtype, rid))
    return out, came_from
