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

import orjson

from cpa_fhir.sandbox._access import PartnerView, partner_scan
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
    start: Seen = {(stored.resource_type, stored.id): orjson.loads(shown)}
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
    """The resources at the criterion's end, reached through what `view` shows, whose
    shown form matches it: none if it does not hold."""
    current = start
    for link in criterion.chain:
        current = (
            _reverse(current, link, view, repo)
            if link.reverse
            else _forward(current, link, view, repo)
        )
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
    return set().union(
        *(
            matching(
                SearchQuery(rtype, criteria=(end,)), given, repo.parameters, now_micros=now_micros
            )
            for rtype, given in by_type.items()
        )
    )


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
    refers to by a reference search parameter."""
    found = repo.parameters.get(rtype, parameter)
    if found is None:
        return set()
    rows = index_resource(resource, [found]).references
    return {(t, i) for _, t, i, _ in rows if t is not None and i is not None}


def _forward(current: Seen, link: ChainLink, view: PartnerView, repo: SqlRepository) -> Seen:
    """The resources the client sees that `current`'s filtered references lead to."""
    wanted: set[tuple[str, str]] = set()
    for (rtype, _), resource in current.items():
        wanted |= {
            t
            for t in reference_targets(resource, rtype, link.reference, repo)
            if t[0] in link.to_types
        }
    found = list(repo.read_many(sorted(wanted)).values())
    return {
        (s.resource_type, s.id): orjson.loads(shown)
        for s, shown in zip(found, view.filter_many(found, account=False), strict=True)
        if shown is not None
    }


def _reverse(current: Seen, link: ChainLink, view: PartnerView, repo: SqlRepository) -> Seen:
    """The resources the client sees whose filtered `link.reference` points at `current`."""
    source_type = link.to_types[0]
    out: Seen = {}
    for rtype, rid in current:
        query = repo.parse(source_type, [(link.reference, f"{rtype}/{rid}")])

        def referring(found: list[Stored], target: tuple[str, str] = (rtype, rid)) -> list[Any]:
            shown_forms = view.filter_many(found, account=False)
            seen = [
                (s, orjson.loads(shown))
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
    return out
