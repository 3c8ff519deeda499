"""Lenient handling of a search (https://hl7.org/fhir/R4/search.html#errors): what
the server does not know or support is left out, and nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpa_fhir.errors import SearchError, UnknownParameter
from cpa_fhir.store import known_parameters, parse_search

KNOWN = [
    "subject",
    "status",
    "_id",
    "_count",
    "_lastUpdated",
    "date",
    "category",
    "_include",
    "_sort",
    "subject:Patient.name",
    "subject.identifier",
    "_has:Flag:patient:date",
]
MODIFIERS = ["", ":missing", ":exact", ":not", ":text", ":below", ":Patient", ":nonsense"]
names = st.one_of(
    st.builds(lambda n, m: n + m, st.sampled_from(KNOWN), st.sampled_from(MODIFIERS)),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.:-", min_size=1, max_size=14),
)
values = st.one_of(
    st.sampled_from(["active", "Patient/c-patient", "ge2026-01-01", "1", "", "a,b", "true"]),
    st.text(max_size=8),
)


@settings(max_examples=400, deadline=None)
@given(params=st.lists(st.tuples(names, values), max_size=8))
def test_what_is_kept_holds_nothing_unknown_and_what_is_left_out_is(
    params: list[tuple[str, str]],
) -> None:
    kept, left_out = known_parameters("CarePlan", params)
    assert len(kept) + len(left_out) == len(params)
    # What is kept is what was given, in order, less what was left out.
    remaining = iter(params)
    assert all(any(p == q for q in remaining) for p in kept)
    for param in params:
        try:
            parse_search("CarePlan", [param])
        except UnknownParameter:
            assert param not in kept
        except SearchError:
            assert param in kept  # a known parameter misused: refused, not ignored
    try:
        parse_search("CarePlan", kept)
    except UnknownParameter as exc:  # pragma: no cover - the property's failure
        pytest.fail(f"kept an unknown parameter: {exc}")
    except SearchError:
        pass  # a malformed value of a known parameter: still the client's error


def test_each_left_out_parameter_is_named_with_why() -> None:
    kept, left_out = known_parameters(
        "CarePlan",
        [("status", "active"), ("colour", "blue"), ("status:text", "x"), ("date", "nonsense")],
    )
    assert kept == [("status", "active"), ("date", "nonsense")]
    assert [e.expression for e in left_out] == ["colour", "status:text"]
    assert "colour" in left_out[0].message and ":text" in left_out[1].message
