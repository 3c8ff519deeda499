"""`may_reach_types`: whether a search may use the search index of some types (the
server's AuditEvents, whose index rows come after their commit). A search it says
no to is answered without waiting for those rows, so it must never say no to one
that does use them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpa_fhir.errors import SearchError
from cpa_fhir.store import SearchQuery, may_reach_types, parse_search

APPENDED = frozenset({"AuditEvent"})
SEARCHED = ["Patient", "CarePlan", "Provenance", "AuditEvent", "Flag"]
CRITERIA = [
    "status",
    "subject",
    "patient",
    "target",
    "_id",
    "_count",
    "entity",
    "action",
    "subject:Patient.name",
    "target.action",
    "target:AuditEvent.action",
    "patient.name",
    "_has:AuditEvent:patient:action",
    "_has:AuditEvent:entity:action",
    "_has:CarePlan:subject:status",
    "_has:Flag:patient:_has:AuditEvent:patient:action",
    "subject._has:AuditEvent:patient:action",
]
VALUES = ["R", "active", "Patient/1", "1"]
INCLUDES = ["_include", "_include:iterate", "_revinclude", "_revinclude:iterate"]
INCLUDED = [
    "AuditEvent:patient",
    "AuditEvent:entity",
    "AuditEvent:entity:Patient",
    "Provenance:target",
    "CarePlan:subject",
    "Patient:link",
    "Flag:patient",
    "*",
]
params = st.one_of(
    st.tuples(st.sampled_from(CRITERIA), st.sampled_from(VALUES)),
    st.tuples(st.sampled_from(INCLUDES), st.sampled_from(INCLUDED)),
)


def _types_searched(query: SearchQuery) -> set[str]:
    """Every type whose index rows the parsed query may read."""
    types = {query.resource_type}
    for criterion in query.criteria:
        for link in criterion.chain:
            types.update(link.to_types)
            types.update(link.from_types)
    types.update(include.source_type for include in query.revinclude)
    return types


@settings(max_examples=600, deadline=None)
@given(
    resource_type=st.sampled_from(SEARCHED),
    params=st.lists(params, max_size=3),
)
def test_a_search_that_reads_their_index_is_never_said_not_to(
    resource_type: str, params: list[tuple[str, str]]
) -> None:
    try:
        query = parse_search(resource_type, params)
    except SearchError:
        return  # refused before any index is read
    if _types_searched(query) & APPENDED:
        assert may_reach_types(resource_type, params, APPENDED)


@pytest.mark.parametrize(
    ("resource_type", "params", "reaches"),
    [
        ("AuditEvent", [], True),
        ("AuditEvent", [("patient", "Patient/1")], True),
        ("CarePlan", [], False),
        ("CarePlan", [("subject", "Patient/1"), ("status", "active")], False),
        ("CarePlan", [("_include", "CarePlan:subject"), ("_sort", "-date")], False),
        ("Patient", [("_revinclude", "Provenance:target")], False),
        ("Patient", [("_revinclude", "AuditEvent:patient")], True),
        ("Patient", [("_revinclude", "*")], True),
        ("Patient", [("_revinclude:iterate", "Flag:patient")], True),
        ("Patient", [("_include:iterate", "Patient:link")], True),
        ("Patient", [("_has:AuditEvent:patient:action", "R")], True),
        ("Provenance", [("target.action", "R")], True),  # an untyped chain
        ("CarePlan", [("subject:Patient.name", "x")], True),  # any chain, to be safe
        ("Unknown", [], True),  # refused later; waiting does no harm
    ],
)
def test_which_searches_may_reach_audit_events(
    resource_type: str, params: list[tuple[str, str]], reaches: bool
) -> None:
    assert may_reach_types(resource_type, params, APPENDED) is reaches
