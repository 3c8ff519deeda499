"""Chained and reverse-chained search over stored resources, on SQLite and PostgreSQL:
https://hl7.org/fhir/R4/search.html#chaining and https://hl7.org/fhir/R4/search.html#has

The data makes each chain matter: a flag that refers to one patient as its subject and
to another as its author; two patients with different NHS numbers and a third with the
same number under another system; a care plan whose subject was deleted, one whose
subject was never stored, and one whose subject is a Group.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cpa_fhir.errors import SearchError
from cpa_fhir.store import SqlRepository
from tests.store.conftest import BACKENDS, example_resources
from tests.store.test_search import _open, ids

NHS = "https://fhir.nhs.uk/Id/nhs-number"
MRN = "https://example.org/fhir/Id/mrn"
SMITH_PLANS = ["cp-smith-active", "cp-smith-draft"]


def _patient(id: str, family: str, identifier: tuple[str, str], **more: Any) -> dict[str, Any]:
    system, value = identifier
    return {
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": system, "value": value}],
        "name": [{"family": family}],
        **more,
    }


def _care_plan(id: str, subject: str, status: str) -> dict[str, Any]:
    return {
        "resourceType": "CarePlan",
        "id": id,
        "status": status,
        "intent": "plan",
        "subject": {"reference": subject},
    }


def _flag(id: str, patient: str, start: str, author: str | None = None) -> dict[str, Any]:
    flag: dict[str, Any] = {
        "resourceType": "Flag",
        "id": id,
        "status": "active",
        "code": {"text": "risk"},
        "subject": {"reference": patient},
        "period": {"start": start, "end": start},
    }
    if author is not None:
        flag["author"] = {"reference": author}
    return flag


def _consent(id: str, patient: str, status: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": id,
        "status": status,
        "scope": {"text": "patient-privacy"},
        "category": [{"text": "sharing"}],
        "patient": {"reference": patient},
    }


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Organization", "id": "org-river", "name": "Riverside Mental Health Trust"},
    {"resourceType": "Organization", "id": "org-hill", "name": "Hillside Partnership"},
    {"resourceType": "Practitioner", "id": "pr-okafor", "name": [{"family": "Okafor"}]},
    {"resourceType": "Group", "id": "g-household", "type": "person", "actual": True},
    _patient(
        "p-smith",
        "Smith",
        (NHS, "9000000009"),
        gender="female",
        birthDate="1970-05-01",
        managingOrganization={"reference": "Organization/org-river"},
        generalPractitioner=[{"reference": "Practitioner/pr-okafor"}],
    ),
    _patient(
        "p-jones",
        "Jones",
        (NHS, "9000000017"),
        gender="male",
        birthDate="1985-02-01",
        managingOrganization={"reference": "Organization/org-hill"},
    ),
    # The same number as Smith's NHS number, under another system.
    _patient("p-brown", "Brown", (MRN, "9000000009")),
    _patient("p-gone", "Gone", (NHS, "9000000025"), gender="female"),
    _care_plan("cp-smith-active", "Patient/p-smith", "active"),
    _care_plan("cp-smith-draft", "Patient/p-smith", "draft"),
    _care_plan("cp-jones-active", "Patient/p-jones", "active"),
    _care_plan("cp-brown-active", "Patient/p-brown", "active"),
    _care_plan("cp-gone", "Patient/p-gone", "active"),
    _care_plan("cp-dangling", "Patient/p-never-stored", "active"),
    _care_plan("cp-group", "Group/g-household", "active"),
    _flag("flag-smith", "Patient/p-smith", "2026-01-10", author="Practitioner/pr-okafor"),
    # Refers to Smith, but as its author: Smith's NHS number must not find it as a patient's.
    _flag("flag-jones", "Patient/p-jones", "2026-02-01", author="Patient/p-smith"),
    _flag("flag-jones-old", "Patient/p-jones", "2020-03-01"),
    _flag("flag-brown-deleted", "Patient/p-brown", "2026-03-01"),
    _consent("consent-smith", "Patient/p-smith", "active"),
    _consent("consent-jones", "Patient/p-jones", "inactive"),
]


@pytest.fixture(scope="module", params=BACKENDS)
def linked(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqlRepository]:
    store = _open(request, tmp_path_factory)
    store.load(RESOURCES)
    store.delete("Patient", "p-gone")
    store.delete("Flag", "flag-brown-deleted")
    yield store
    store.close()


# --- forward chains ---------------------------------------------------------------


def test_care_plans_by_the_patients_nhs_number(linked: SqlRepository) -> None:
    by_type = [("subject:Patient.identifier", f"{NHS}|9000000009")]
    assert ids(linked, "CarePlan", by_type) == SMITH_PLANS
    assert ids(linked, "CarePlan", [("subject.identifier", f"{NHS}|9000000017")]) == [
        "cp-jones-active"
    ]
    # Any system: Brown's record number has the same digits.
    assert ids(linked, "CarePlan", [("subject.identifier", "9000000009")]) == [
        "cp-brown-active",
        *SMITH_PLANS,
    ]
    assert ids(linked, "CarePlan", [("subject.identifier", f"{MRN}|9000000009")]) == [
        "cp-brown-active"
    ]
    assert ids(linked, "CarePlan", [("subject.identifier", f"{NHS}|9999999999")]) == []


def test_a_deleted_or_missing_target_never_matches(linked: SqlRepository) -> None:
    assert ids(linked, "CarePlan", [("subject.identifier", f"{NHS}|9000000025")]) == []
    # The reference itself still matches directly; through the chain it leads nowhere.
    assert ids(linked, "CarePlan", [("subject", "Patient/p-never-stored")]) == ["cp-dangling"]
    assert ids(linked, "CarePlan", [("subject:Patient._id", "p-never-stored")]) == []
    assert ids(linked, "CarePlan", [("subject._id", "p-gone")]) == []


def test_flags_and_consents_by_nhs_number_follow_only_the_named_reference(
    linked: SqlRepository,
) -> None:
    smith = f"{NHS}|9000000009"
    assert ids(linked, "Flag", [("patient.identifier", smith)]) == ["flag-smith"]
    assert ids(linked, "Flag", [("author:Patient.identifier", smith)]) == ["flag-jones"]
    assert ids(linked, "Flag", [("patient.identifier", f"{NHS}|9000000017")]) == [
        "flag-jones",
        "flag-jones-old",
    ]
    assert ids(linked, "Consent", [("patient.identifier", smith)]) == ["consent-smith"]
    assert ids(linked, "Consent", [("patient.identifier", f"{NHS}|9000000017")]) == [
        "consent-jones"
    ]


def test_or_within_a_chain_and_and_across_chains(linked: SqlRepository) -> None:
    either = f"{NHS}|9000000009,{NHS}|9000000017"
    assert ids(linked, "CarePlan", [("subject.identifier", either)]) == [
        "cp-jones-active",
        *SMITH_PLANS,
    ]
    assert ids(linked, "CarePlan", [("subject.identifier", either), ("status", "draft")]) == [
        "cp-smith-draft"
    ]
    assert (
        ids(linked, "CarePlan", [("subject.name", "smith"), ("subject.gender", "female")])
        == SMITH_PLANS
    )
    assert ids(linked, "CarePlan", [("subject.name", "smith"), ("subject.gender", "male")]) == []
    assert ids(
        linked, "CarePlan", [("subject.name", "smith,jones"), ("subject.gender", "male")]
    ) == ["cp-jones-active"]
    # Chains combine with the searched type's own parameters.
    assert ids(
        linked, "Flag", [("patient.identifier", f"{NHS}|9000000017"), ("date", "ge2025")]
    ) == ["flag-jones"]


def test_two_level_chains(linked: SqlRepository) -> None:
    assert ids(linked, "CarePlan", [("subject.organization.name", "riverside")]) == SMITH_PLANS
    exact = [("subject:Patient.organization:Organization.name:exact", "Hillside Partnership")]
    assert ids(linked, "CarePlan", exact) == ["cp-jones-active"]
    assert ids(linked, "CarePlan", [("subject.organization.name:contains", "SIDE")]) == [
        "cp-jones-active",
        *SMITH_PLANS,
    ]
    assert ids(linked, "CarePlan", [("subject.organization.name", "nowhere")]) == []
    gp = [("patient.general-practitioner:Practitioner.name", "okafor")]
    assert ids(linked, "Flag", gp) == ["flag-smith"]


def test_a_reference_to_several_types_searches_each(linked: SqlRepository) -> None:
    assert ids(linked, "CarePlan", [("subject._id", "g-household")]) == ["cp-group"]
    assert ids(linked, "CarePlan", [("subject._id", "g-household,p-jones")]) == [
        "cp-group",
        "cp-jones-active",
    ]
    assert ids(linked, "CarePlan", [("subject:Patient._id", "g-household")]) == []
    # A Flag's author may be a Patient, a Practitioner, an Organization...
    assert ids(linked, "Flag", [("author.name", "smith")]) == ["flag-jones"]
    assert ids(linked, "Flag", [("author.name", "okafor")]) == ["flag-smith"]


def test_every_parameter_type_and_modifier_at_the_end_of_a_chain(linked: SqlRepository) -> None:
    existing = ["cp-brown-active", "cp-jones-active", *SMITH_PLANS]
    assert ids(linked, "CarePlan", [("subject.birthdate", "lt1980")]) == SMITH_PLANS
    assert ids(linked, "CarePlan", [("subject.birthdate", "1985-02")]) == ["cp-jones-active"]
    # :not and :missing=true hold only for targets that exist.
    assert ids(linked, "CarePlan", [("subject.gender:not", "male")]) == [
        "cp-brown-active",
        *SMITH_PLANS,
    ]
    assert ids(linked, "CarePlan", [("subject.gender:missing", "true")]) == ["cp-brown-active"]
    assert ids(linked, "CarePlan", [("subject.gender:missing", "false")]) == [
        "cp-jones-active",
        *SMITH_PLANS,
    ]
    assert ids(linked, "CarePlan", [("subject.organization", "Organization/org-river")]) == (
        SMITH_PLANS
    )
    assert ids(linked, "CarePlan", [("subject.organization:missing", "true")]) == [
        "cp-brown-active"
    ]
    assert ids(linked, "CarePlan", [("subject.name:exact", "Smith")]) == SMITH_PLANS
    assert ids(linked, "CarePlan", [("subject.name:exact", "smith")]) == []
    assert ids(linked, "CarePlan", [("subject:Patient._lastUpdated", "gt2000")]) == existing


# --- reverse chains ---------------------------------------------------------------


def test_has(linked: SqlRepository) -> None:
    assert ids(linked, "Patient", [("_has:CarePlan:subject:status", "active")]) == [
        "p-brown",
        "p-jones",
        "p-smith",
    ]
    assert ids(linked, "Patient", [("_has:CarePlan:subject:status", "draft")]) == ["p-smith"]
    assert ids(linked, "Patient", [("_has:CarePlan:subject:status", "completed")]) == []
    assert ids(linked, "Patient", [("_has:CarePlan:subject:status", "draft,completed")]) == [
        "p-smith"
    ]
    assert ids(linked, "Patient", [("_has:Flag:patient:date", "lt2021")]) == ["p-jones"]
    assert ids(linked, "Patient", [("_has:Consent:patient:status", "inactive")]) == ["p-jones"]
    assert ids(linked, "Group", [("_has:CarePlan:subject:status", "active")]) == ["g-household"]
    assert ids(linked, "Patient", [("_has:CarePlan:subject:status:not", "active")]) == ["p-smith"]


def test_has_only_through_the_named_reference_and_live_resources(linked: SqlRepository) -> None:
    # flag-jones names Smith as its author, not its patient; Brown's 2026 flag was deleted.
    assert ids(linked, "Patient", [("_has:Flag:patient:date", "ge2026")]) == [
        "p-jones",
        "p-smith",
    ]
    assert ids(linked, "Patient", [("_has:Flag:author:date", "ge2026")]) == ["p-smith"]
    assert ids(linked, "Practitioner", [("_has:Flag:author:date", "ge2026")]) == ["pr-okafor"]
    # p-gone is deleted, though its care plan is not.
    assert ids(linked, "Patient", [("_has:CarePlan:subject:_id", "cp-gone")]) == []


def test_has_and_and_or(linked: SqlRepository) -> None:
    both = [("_has:CarePlan:subject:status", "active"), ("_has:Flag:patient:date", "lt2021")]
    assert ids(linked, "Patient", both) == ["p-jones"]
    neither = [("_has:CarePlan:subject:status", "draft"), ("_has:Flag:patient:date", "lt2021")]
    assert ids(linked, "Patient", neither) == []
    assert ids(
        linked, "Patient", [("gender", "female"), ("_has:CarePlan:subject:status", "active")]
    ) == ["p-smith"]


def test_nested_has_and_chains_inside_has(linked: SqlRepository) -> None:
    nested = [("_has:Patient:organization:_has:Flag:patient:date", "lt2021")]
    assert ids(linked, "Organization", nested) == ["org-hill"]
    nested_active = [("_has:Patient:organization:_has:CarePlan:subject:status", "active")]
    assert ids(linked, "Organization", nested_active) == ["org-hill", "org-river"]
    by_author = [("_has:Flag:patient:author:Patient.identifier", f"{NHS}|9000000009")]
    assert ids(linked, "Patient", by_author) == ["p-jones"]
    assert ids(linked, "Practitioner", [("_has:Flag:author:patient.name", "smith")]) == [
        "pr-okafor"
    ]
    # Forward, back, forward: care plans whose patient has a flag authored by Okafor.
    three = [("subject._has:Flag:patient:author:Practitioner.name", "okafor")]
    assert ids(linked, "CarePlan", three) == SMITH_PLANS


def test_totals_paging_and_sorting_with_chains(linked: SqlRepository) -> None:
    params = [("subject:Patient._lastUpdated", "gt2000"), ("_sort", "-_id"), ("_count", "2")]
    result = linked.search(linked.parse("CarePlan", params))
    assert result.total == 4
    assert [m.id for m in result.matches] == ["cp-smith-draft", "cp-smith-active"]
    counted = linked.search(
        linked.parse("Patient", [("_has:CarePlan:subject:status", "active"), ("_summary", "count")])
    )
    assert (counted.total, counted.matches) == (3, [])


@pytest.mark.parametrize(
    ("resource_type", "name", "value", "message"),
    [
        ("CarePlan", "subject.nonsense", "x", "unknown search parameter 'nonsense'"),
        ("CarePlan", "status.code", "x", "only reference parameters can be chained"),
        ("CarePlan", "subject:Observation.code", "x", "not Observation"),
        ("Task", "subject.performer", "x", "is ambiguous"),
        ("Patient", "_has:Flag:patient", "x", "_has is _has:Type:reference:parameter"),
        ("Patient", "_has:Flag:patient:nonsense", "x", "unknown search parameter 'nonsense'"),
        ("Organization", "_has:Flag:patient:date", "2020", "never to Organization"),
        ("CarePlan", "subject.birthdate", "someday", "is not a date"),
        ("CarePlan", "subject._id", "not an id", "is not a resource id"),
    ],
)
def test_bad_chains_are_search_errors(
    linked: SqlRepository, resource_type: str, name: str, value: str, message: str
) -> None:
    with pytest.raises(SearchError) as raised:
        linked.parse(resource_type, [(name, value)])
    assert message in raised.value.message
    assert raised.value.to_operation_outcome()["issue"][0]["code"] == "invalid"


# --- the example records ----------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def examples(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqlRepository]:
    store = _open(request, tmp_path_factory)
    store.load(example_resources())
    yield store
    store.close()


def test_example_records_by_nhs_number(examples: SqlRepository) -> None:
    c = f"{NHS}|9993006726"
    plans = ["c-careplan", "c-contingency-plan", "c-crisis-plan"]
    assert ids(examples, "CarePlan", [("subject:Patient.identifier", c)]) == plans
    assert ids(examples, "CarePlan", [("subject", "Patient/c-patient")]) == plans
    assert ids(examples, "Flag", [("patient.identifier", c)]) == [
        "c-risk-disengagement",
        "c-risk-harm-to-others",
        "c-risk-self-harm",
        "c-risk-to-children",
    ]
    assert ids(examples, "Consent", [("patient.identifier", c)]) == ["c-consent"]
    assert ids(examples, "Consent", [("patient.identifier", f"{NHS}|9994008862")]) == ["d-consent"]
    assert ids(
        examples, "Patient", [("_has:Flag:patient:_id", "c-risk-to-children,d-risk-falls")]
    ) == ["c-patient", "d-patient"]
