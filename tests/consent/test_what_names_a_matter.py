"""What names a sensitive matter is found however a record puts it: abbreviations and
other forms of its words, words split by punctuation or escaped as a URL or HTML
would, a code the policy names wherever it is coded, the Patient's religion and
gender identity, and a resource's fullUrl and profiles. Each goes to record C's GP
(who may have care-plan, crisis, medication and administrative information) only
where the consent allows what it names."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.common import entry_resource as _in
from tests.consent.test_hidden_content import RECORD_C, _sent, _share

MARK = "ZZMARK"


@pytest.mark.parametrize(
    "phrase",
    [
        # abbreviations, whole
        "DSH x3", "OD on paracetamol", "YOT worker", "IVDU", "EtOH excess",
        "DV incident", "LGBT group", "=MASH referral".removeprefix("="),
        # split, joined or escaped
        "self/harm", "self.harm", "self - harm", "report%20on%20probation", "self%20harm",
        "children&#39;s services", "children&rsquo;s services", "self&nbsp;harm",
        "2probation", "childrens services", "children services",
        # other forms and missing terms
        "self-poisoning", "overdosing", "overdosed", "tried to kill herself", "ligature",
        "criminal damage", "suspended sentence", "on bail", "approved premises", "curfew",
        "child protection plan", "safeguarding concern", "care proceedings",
        "drug misuse", "using drugs", "heavy drinker", "amphetamine", "ketamine",
        "Physeptone", "Subutex", "Suboxone", "disulfiram", "naltrexone", "Truvada (PrEP)",
        "transgender", "gay", "gender dysphoria", "abusive partner", "coercive control",
        "homicidal ideation",
    ],
)  # fmt: skip
def test_words_in_other_forms_name_their_matter(phrase: str) -> None:
    record = copy.deepcopy(RECORD_C)
    _in(record, "Encounter/c-review-2026-09")["serviceType"] = {"text": f"{MARK} {phrase}"}
    assert MARK.lower() not in _sent(record)


@pytest.mark.parametrize(
    "innocent",
    ["ODS code Y90101", "Odd jobs at the weekend", "PO Box 12", "Gaynor Smith", "a short sentence"],
)
def test_whole_word_abbreviations_are_not_the_start_of_other_words(innocent: str) -> None:
    record = copy.deepcopy(RECORD_C)
    _in(record, "Encounter/c-review-2026-09")["serviceType"] = {"text": f"{MARK} {innocent}"}
    assert MARK.lower() in _sent(record)


def _with_reason(record: dict[str, Any], coding: dict[str, str]) -> dict[str, Any]:
    record["entry"].append(
        {
            "fullUrl": "https://example.org/fhir/MedicationStatement/c-med-reason",
            "resource": {
                "resourceType": "MedicationStatement",
                "id": "c-med-reason",
                "status": "active",
                "medicationCodeableConcept": {"text": "Olanzapine 10mg"},
                "subject": {"reference": "Patient/c-patient"},
                "reasonCode": [{"coding": [coding], "text": MARK}],
            },
        }
    )
    return record


@pytest.mark.parametrize(
    "coding",
    [
        {"system": "http://snomed.info/sct", "code": "406554000", "display": "At risk for deliberate self-harm"},
        {"system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-risk-type", "code": "criminal-justice"},
        {"system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-risk-type", "code": "risk-to-children"},
    ],
)  # fmt: skip
def test_a_code_the_policy_names_carries_its_categories_wherever_it_is(
    coding: dict[str, str],
) -> None:
    """A risk code as a medication's reason says what it would on a risk Flag: the
    reason is held back, the rest of the medication goes."""
    disclosure = _share(_with_reason(copy.deepcopy(RECORD_C), coding))
    sent = json.dumps(disclosure.bundle)
    assert "MedicationStatement/c-med-reason" in disclosure.shared
    assert coding["code"] not in sent and MARK not in sent and "Olanzapine" in sent
    # An innocent code there leaves the reason as it was.
    plain = {"system": "http://snomed.info/sct", "code": "35489007", "display": "Depression"}
    assert MARK in json.dumps(_share(_with_reason(copy.deepcopy(RECORD_C), plain)).bundle)


@pytest.mark.parametrize(
    ("url", "value"),
    [
        ("http://hl7.org/fhir/StructureDefinition/patient-religion", {"valueCodeableConcept": {"text": MARK}}),
        ("http://hl7.org/fhir/StructureDefinition/patient-genderIdentity", {"valueCodeableConcept": {"text": MARK}}),
        ("http://hl7.org/fhir/StructureDefinition/individual-genderIdentity", {"extension": [{"url": "value", "valueCodeableConcept": {"text": MARK}}]}),
        ("http://hl7.org/fhir/StructureDefinition/patient-sexualOrientation", {"valueCodeableConcept": {"text": MARK}}),
    ],
)  # fmt: skip
def test_religion_gender_identity_and_orientation_are_their_categories(
    url: str, value: dict[str, Any]
) -> None:
    record = copy.deepcopy(RECORD_C)
    patient = _in(record, "Patient/c-patient")
    patient.setdefault("extension", []).append({"url": url, **value})
    disclosure = _share(record)
    assert "Patient/c-patient" in disclosure.shared
    assert MARK.lower() not in _sent(record)


def test_a_full_url_or_profile_naming_a_matter_names_the_resource() -> None:
    record = copy.deepcopy(RECORD_C)
    for entry in record["entry"]:
        if entry["resource"]["id"] == "c-review-2026-09":
            entry["fullUrl"] = "https://hmp-cardiff.example/fhir/Encounter/c-review-2026-09"
        if entry["resource"]["id"] == "c-review-2026-04":
            entry["resource"]["meta"]["profile"].append(
                "https://trust.example/fhir/StructureDefinition/mappa-review"
            )
    disclosure = _share(record)
    assert "Encounter/c-review-2026-09" not in disclosure.shared
    assert "Encounter/c-review-2026-04" not in disclosure.shared
    assert "hmp-cardiff" not in _sent(record) and "mappa-review" not in _sent(record)
    assert "Encounter/c-review-2026-09" in _share(copy.deepcopy(RECORD_C)).shared


def test_a_professional_is_what_the_roles_they_hold_are() -> None:
    """The probation officer and the children's social worker, under names that say
    nothing: their roles are with probation and children's services, so neither they
    nor their presence at C's reviews goes to the GP; the coordinator and the GP do."""
    text = json.dumps(RECORD_C)
    for old, new in (
        ("c-probation-officer", "c-officer-7"),
        ("c-childrens-social-worker", "c-worker-9"),
    ):
        text = text.replace(old, new)
    record = json.loads(text)
    _in(record, "Practitioner/c-officer-7")["telecom"] = [
        {"system": "email", "value": "rhys.jones@justice.gov.uk"}
    ]
    disclosure = _share(record)
    assert "Practitioner/c-officer-7" not in disclosure.shared
    assert "Practitioner/c-worker-9" not in disclosure.shared
    assert {"Practitioner/c-coordinator", "Practitioner/c-gp"} <= set(disclosure.shared)
    sent = json.dumps(disclosure.bundle)
    assert "c-officer-7" not in sent and "c-worker-9" not in sent and "justice.gov.uk" not in sent
    assert any(e["resource"]["resourceType"] == "Encounter" for e in disclosure.bundle["entry"])


def test_what_names_a_withheld_resource_other_than_by_reference_goes_as_it_would() -> None:
    """A canonical or URI naming a withheld risk Flag (by Type/id or fullUrl), and a
    reference by identifier alone to the withheld probation service, say what those
    are: held back from the GP as they are; a canonical naming what the GP may see
    stays."""
    record = copy.deepcopy(RECORD_C)
    ods = {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "ZZPRB01"}
    _in(record, "Organization/c-probation")["identifier"] = [ods]
    review = _in(record, "Encounter/c-review-2026-09")
    review["serviceProvider"] = {"identifier": ods}
    plan = _in(record, "CarePlan/c-careplan")
    plan["instantiatesCanonical"] = [
        "Flag/c-risk-harm-to-others",
        "https://example.org/fhir/Condition/c-need-accommodation",
    ]
    plan["instantiatesUri"] = ["https://example.org/fhir/Flag/c-risk-harm-to-others"]
    disclosure = _share(record)
    assert "Flag/c-risk-harm-to-others" not in disclosure.shared
    assert {"CarePlan/c-careplan", "Encounter/c-review-2026-09"} <= set(disclosure.shared)
    sent = json.dumps(disclosure.bundle)
    assert "ZZPRB01" not in sent and "c-risk-harm-to-others" not in sent
    assert "https://example.org/fhir/Condition/c-need-accommodation" in sent
