"""Parsing search parameters: https://hl7.org/fhir/R4/search.html"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpa_fhir.errors import FhirError, SearchError
from cpa_fhir.store import (
    MAX_CHAIN_LINKS,
    MAX_COUNT,
    ChainLink,
    DateValue,
    Include,
    NumberValue,
    ReferenceValue,
    SortKey,
    StringValue,
    TokenValue,
    parse_search,
)


def test_criteria_values_and_result_parameters() -> None:
    query = parse_search(
        "CarePlan",
        [
            ("subject", "Patient/p1"),
            ("status", "active,draft"),
            ("date", "ge2026-01-01"),
            ("date", "lt2027"),
            ("_count", "10"),
            ("_offset", "20"),
            ("_sort", "-date,_id"),
            ("_include", "CarePlan:subject:Patient"),
            ("_revinclude", "Provenance:target"),
        ],
    )
    subject, status, since, until = query.criteria
    assert subject.values == (ReferenceValue("Patient", "p1"),)
    assert status.values == (
        TokenValue(None, "active", any_system=True),
        TokenValue(None, "draft", any_system=True),
    )
    assert isinstance(since.values[0], DateValue) and since.values[0].prefix == "ge"
    assert isinstance(until.values[0], DateValue) and until.values[0].prefix == "lt"
    assert (query.count, query.offset) == (10, 20)
    assert query.sort == (SortKey("date", "date", True), SortKey("_id", "token", False))
    assert query.include == (Include("CarePlan", "subject", "Patient"),)
    assert query.revinclude == (Include("Provenance", "target", "CarePlan"),)


def test_tokens_and_escapes() -> None:
    (criterion,) = parse_search("Patient", [("identifier", r"https://x|a\,b\|c,|d,e|")]).criteria
    assert criterion.values == (
        TokenValue("https://x", "a,b|c", any_system=False),
        TokenValue(None, "d", any_system=False),
        TokenValue("e", None, any_system=False),
    )


def test_strings_are_normalised_for_matching() -> None:
    (criterion,) = parse_search("Patient", [("name:contains", "ZOË")]).criteria
    assert criterion.modifier == "contains"
    assert criterion.values == (StringValue("ZOË", "zoe"),)


def test_numbers_carry_their_precision() -> None:
    (criterion,) = parse_search("RiskAssessment", [("probability", "gt0.50")]).criteria
    assert criterion.values == (NumberValue("gt", 0.5, 0.495, 0.505),)
    (criterion,) = parse_search(
        "Encounter", [("length", "5.4|http://unitsofmeasure.org|h")]
    ).criteria
    value = criterion.values[0]
    assert isinstance(value, NumberValue)
    assert (value.system, value.code) == ("http://unitsofmeasure.org", "h")


def test_missing_and_summary_and_total() -> None:
    query = parse_search(
        "Patient", [("gender:missing", "true"), ("_summary", "count"), ("_total", "none")]
    )
    assert query.criteria[0].missing is True and query.criteria[0].values == ()
    assert query.summary_count and query.total == "none"


def test_empty_values_are_ignored_and_count_is_capped() -> None:
    query = parse_search("Patient", [("name", ""), ("_count", "100000")])
    assert query.criteria == () and query.count == MAX_COUNT


def test_project_parameter_is_known() -> None:
    (criterion,) = parse_search(
        "EpisodeOfCare", [("cpa-level", "http://snomed.info/sct|x")]
    ).criteria
    assert criterion.type == "token"


NHS = "https://fhir.nhs.uk/Id/nhs-number"


def test_chain_names_the_links_and_the_parameter_at_its_end() -> None:
    (criterion,) = parse_search(
        "CarePlan", [("subject:Patient.identifier", f"{NHS}|9000000009,{NHS}|9000000017")]
    ).criteria
    assert (criterion.parameter, criterion.type) == ("identifier", "token")
    assert criterion.modifier is None
    assert criterion.values == (
        TokenValue(NHS, "9000000009", any_system=False),
        TokenValue(NHS, "9000000017", any_system=False),
    )
    assert criterion.chain == (ChainLink("subject", False, ("CarePlan",), ("Patient",)),)
    assert criterion.name == "subject:Patient.identifier"
    assert criterion.chained and not criterion.reverse_chained
    assert criterion.target_types == ("Patient",)


def test_chain_without_a_type_searches_every_target_with_the_parameter() -> None:
    # Group has no `identifier` search parameter in R4, so only Patient is searched;
    # every type has `_id`.
    (by_identifier,) = parse_search("CarePlan", [("subject.identifier", "x")]).criteria
    assert by_identifier.target_types == ("Patient",)
    (by_id,) = parse_search("CarePlan", [("subject._id", "g1")]).criteria
    assert by_id.target_types == ("Group", "Patient")
    (by_name,) = parse_search("Consent", [("actor.name:exact", "Smith")]).criteria
    assert by_name.modifier == "exact"
    assert by_name.target_types == ("Organization", "Patient", "Practitioner", "RelatedPerson")


def test_multi_level_and_reverse_chains() -> None:
    (two_levels,) = parse_search("CarePlan", [("subject.organization.name", "river")]).criteria
    assert two_levels.chain == (
        ChainLink("subject", False, ("CarePlan",), ("Patient",)),
        ChainLink("organization", False, ("Patient",), ("Organization",)),
    )
    (has,) = parse_search("Patient", [("_has:CarePlan:subject:status", "active")]).criteria
    assert has.chain == (ChainLink("subject", True, ("Patient",), ("CarePlan",)),)
    assert (has.parameter, has.reverse_chained, has.chained) == ("status", True, False)
    (nested,) = parse_search(
        "Organization", [("_has:Patient:organization:_has:Flag:patient:date", "lt2021")]
    ).criteria
    assert nested.chain == (
        ChainLink("organization", True, ("Organization",), ("Patient",)),
        ChainLink("patient", True, ("Patient",), ("Flag",)),
    )
    (mixed,) = parse_search(
        "CarePlan", [("subject._has:Flag:patient:author:Practitioner.name", "okafor")]
    ).criteria
    assert [link.reverse for link in mixed.chain] == [False, True, False]
    assert mixed.target_types == ("Practitioner",) and mixed.chained and mixed.reverse_chained


def test_chained_missing_and_unchained_criteria() -> None:
    chained, plain = parse_search(
        "CarePlan", [("subject.gender:missing", "true"), ("status:not", "draft")]
    ).criteria
    assert (chained.parameter, chained.missing, chained.values) == ("gender", True, ())
    assert plain.chain == () and plain.target_types == () and plain.name == "status:not"
    assert not plain.chained and not plain.reverse_chained
    assert parse_search("CarePlan", [("subject.name", "")]).criteria == ()


@pytest.mark.parametrize(
    ("resource_type", "name", "message"),
    [
        ("CarePlan", "subject.nonsense", "unknown search parameter 'nonsense' for Group or Patient"),
        ("CarePlan", "status.code", "status is a token parameter of CarePlan"),
        ("CarePlan", "subject:Observation.code", "subject refers to Group, Patient, not Observation"),
        ("CarePlan", "subject:Nope.name", "only a resource type can qualify a reference"),
        ("CarePlan", "subject:missing.name", "only a resource type can qualify a reference"),
        ("CarePlan", "subject.", "a chain is reference[:Type].parameter"),
        ("CarePlan", ".name", "a chain is reference[:Type].parameter"),
        ("CarePlan", "subject.name:nonsense", "modifier :nonsense does not apply"),
        ("Task", "subject.performer", "performer is ambiguous (reference on CarePlan, RiskAssessment; token on Task)"),
        ("Patient", "_has", "_has is _has:Type:reference:parameter"),
        ("Patient", "_has:Flag:patient", "_has is _has:Type:reference:parameter"),
        ("Patient", "_has:Nope:patient:date", "'Nope' is not a resource type"),
        ("Patient", "_has:Flag:nonsense:date", "unknown search parameter 'nonsense' for Flag"),
        ("Patient", "_has:Flag:date:date", "Flag:date is a date parameter, not a reference"),
        ("Organization", "_has:Flag:patient:date", "Flag:patient refers to Patient, never to Organization"),
        ("Patient", "_has:Flag:patient:nonsense", "unknown search parameter 'nonsense' for Flag"),
    ],
)  # fmt: skip
def test_bad_chains_are_refused_precisely(resource_type: str, name: str, message: str) -> None:
    with pytest.raises(SearchError) as raised:
        parse_search(resource_type, [(name, "x")])
    assert raised.value.code == "invalid"
    assert message in raised.value.message
    assert raised.value.expression == name


def test_ambiguous_chain_names_its_candidates_and_a_type_resolves_it() -> None:
    with pytest.raises(SearchError) as raised:
        parse_search("Task", [("subject.performer", "Practitioner/1")])
    assert "choose one of CarePlan, RiskAssessment, Task" in raised.value.message
    (criterion,) = parse_search("Task", [("subject:CarePlan.performer", "Practitioner/1")]).criteria
    assert criterion.values == (ReferenceValue("Practitioner", "1"),)


@pytest.mark.parametrize(
    ("resource_type", "params"),
    [
        ("Patient", [("link:Patient." * MAX_CHAIN_LINKS + "general-practitioner.name", "x")]),
        ("CarePlan", [("subject._count", "1")]),
        ("CarePlan", [("subject._sort", "name")]),
        ("CarePlan", [("subject._text", "x")]),
        ("CarePlan", [("_sort", "subject.name")]),
    ],
)
def test_unsupported_chains_are_refused(resource_type: str, params: list[tuple[str, str]]) -> None:
    with pytest.raises(SearchError) as raised:
        parse_search(resource_type, params)
    assert raised.value.code == "not-supported"


def test_longest_chain_allowed() -> None:
    name = "link:Patient." * (MAX_CHAIN_LINKS - 1) + "general-practitioner.name"
    (criterion,) = parse_search("Patient", [(name, "x")]).criteria
    assert len(criterion.chain) == MAX_CHAIN_LINKS


@pytest.mark.parametrize(
    ("resource_type", "params", "code"),
    [
        ("Patient", [("nonsense", "1")], "invalid"),
        ("Patient", [("name:nonsense", "x")], "invalid"),
        ("Patient", [("name:text", "x")], "not-supported"),
        ("Patient", [("gender:exact", "x")], "invalid"),
        ("Patient", [("birthdate", "2020-13-01")], "invalid"),
        ("Patient", [("birthdate", "xx2020")], "invalid"),
        ("Patient", [("birthdate", "2020-02-30")], "invalid"),
        ("Patient", [("birthdate", "2020-01-01T10:00:00+25:00")], "invalid"),
        ("Patient", [("birthdate:missing", "maybe")], "invalid"),
        ("Patient", [("_count", "-1")], "invalid"),
        ("Patient", [("_count", "ten")], "invalid"),
        ("Patient", [("_count", "1"), ("_count", "2")], "invalid"),
        ("Patient", [("_offset", "1.5")], "invalid"),
        ("Patient", [("_sort", "general-practitioner")], "not-supported"),
        ("Patient", [("_sort", "nonsense")], "invalid"),
        ("Patient", [("_sort", "")], "invalid"),
        ("Patient", [("_summary", "yes")], "invalid"),
        ("Patient", [("_summary", "true"), ("_elements", "name")], "invalid"),
        ("Patient", [("_elements", "shoe")], "invalid"),
        ("Patient", [("_total", "some")], "invalid"),
        ("Patient", [("_include", "*")], "not-supported"),
        ("Patient", [("_include", "CarePlan:subject")], "invalid"),
        ("Patient", [("_include", "Patient:gender")], "invalid"),
        ("Patient", [("_include:deep", "Patient:general-practitioner")], "not-supported"),
        ("Patient", [("_revinclude", "Flag:author:Device")], "invalid"),
        ("Patient", [("_revinclude", "EpisodeOfCare:organization")], "invalid"),
        ("Patient", [("_has", "Flag:patient:status=active")], "invalid"),
        ("Patient", [("general-practitioner.nonsense", "x")], "invalid"),
        ("Patient", [("general-practitioner", "Nope/1")], "invalid"),
        ("Patient", [("general-practitioner", "Patient/1")], "invalid"),
        ("Patient", [("general-practitioner", "a/b/c")], "invalid"),
        ("Patient", [("general-practitioner:Flag", "1")], "invalid"),
        ("Patient", [("identifier", "a|b|c")], "invalid"),
        ("Patient", [("identifier", "|")], "invalid"),
        ("Patient", [("_id", "not an id")], "invalid"),
        ("Patient", [("_id:missing", "true")], "invalid"),
        ("RiskAssessment", [("probability", "lots")], "invalid"),
        ("RiskAssessment", [("probability", "NaN")], "invalid"),
        ("Encounter", [("length", "1|2")], "invalid"),
        ("NotAType", [], "not-supported"),
    ],
)
def test_malformed_searches_are_refused(
    resource_type: str, params: list[tuple[str, str]], code: str
) -> None:
    with pytest.raises(SearchError) as raised:
        parse_search(resource_type, params)
    assert raised.value.code == code
    issue = raised.value.to_operation_outcome()["issue"][0]
    assert issue["severity"] == "error" and issue["details"]["text"]


_NAMES = st.sampled_from(
    [
        "name", "family", "birthdate", "identifier", "gender", "general-practitioner", "_id",
        "_lastUpdated", "_count", "_offset", "_sort", "_include", "_revinclude", "_summary",
        "_total", "_profile", "subject", "patient", "probability", "length", "date", "cpa-level",
    ]
)  # fmt: skip
_MODIFIERS = st.sampled_from(
    ["", ":missing", ":exact", ":contains", ":not", ":Patient", ":text", ":x", ":"]
)
_VALUE_PIECES = st.sampled_from(
    [
        "ge", "eq", "ap", "2020", "-01", "-13", "T10:00", ":00Z", "+01:00", "|", ",", "\\", "/",
        "Patient", "1", ".5", "e9", "true", "*", ":", "-", "_id", "CarePlan:subject",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    resource_type=st.sampled_from(["Patient", "CarePlan", "Flag", "RiskAssessment", "Encounter"]),
    params=st.lists(
        st.tuples(
            st.builds(lambda n, m: n + m, _NAMES, _MODIFIERS) | st.text(max_size=6),
            st.lists(_VALUE_PIECES | st.text(max_size=3), max_size=5).map("".join),
        ),
        max_size=4,
    ),
)
def test_parsing_raises_nothing_but_search_errors(
    resource_type: str, params: list[tuple[str, str]]
) -> None:
    try:
        parse_search(resource_type, params)
    except SearchError:
        pass
    except FhirError as exc:  # pragma: no cover - the assertion names the stray error
        pytest.fail(f"{type(exc).__name__}: {exc}")


_CHAIN_PIECES = st.sampled_from(
    [
        "subject", "patient", "author", "organization", "general-practitioner", "link", "actor",
        "name", "identifier", "status", "date", "gender", "_id", "_lastUpdated", "_has", "_count",
        "Patient", "Flag", "CarePlan", "Group", "Organization", "Practitioner", "Nope",
        "missing", "not", "exact", "", ":", ".",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    resource_type=st.sampled_from(["Patient", "CarePlan", "Flag", "Consent", "Organization"]),
    pieces=st.lists(
        st.tuples(_CHAIN_PIECES, st.sampled_from([".", ":", ""])), min_size=1, max_size=8
    ),
    value=st.lists(_VALUE_PIECES | st.text(max_size=3), max_size=4).map("".join),
)
def test_chained_parsing_raises_nothing_but_search_errors(
    resource_type: str, pieces: list[tuple[str, str]], value: str
) -> None:
    name = "".join(piece + separator for piece, separator in pieces)
    try:
        query = parse_search(resource_type, [(name, value)])
    except SearchError:
        return
    for criterion in query.criteria:
        for link in criterion.chain:
            assert link.from_types and link.to_types
