"""What leaves: whole resources dropped, elements redacted, references never dangling,
counts never revealing, the sender told what was withheld, one audit per disclosure."""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cpa_fhir.consent import (
    CATEGORY_SYSTEM,
    Disclosure,
    RequiredElements,
    ShareRequest,
    SharingPolicy,
    disclosed_references,
    share,
)
from cpa_fhir.consent._audit import SUBJECT_ROLE
from cpa_fhir.validation import Validator
from tests.common import EXAMPLES

AT = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
RECORDS = {
    letter: orjson.loads(next(EXAMPLES.glob(f"Bundle-record-{letter}-*.json")).read_bytes())
    for letter in "ABCD"
}
REQUESTS = [
    ("A", ShareRequest("gp", "TREAT")),
    ("A", ShareRequest("carer:a-carer-mother", "FAMRQT")),
    ("B", ShareRequest("gp", "COC")),
    ("B", ShareRequest("voluntary-provider", "COC")),
    ("C", ShareRequest("gp", "TREAT")),
    ("C", ShareRequest("social-care", "COC")),
    ("C", ShareRequest("probation", "THREAT", ("public-protection",))),
    ("C", ShareRequest("children-services", "THREAT", ("child-protection",))),
    ("C", ShareRequest("carer:c-carer-son", "FAMRQT", ("carers-need-to-know",))),
    ("D", ShareRequest("social-care", "CAREMGT")),
    ("D", ShareRequest("private-provider", "TREAT")),
]


def _share(
    letter: str, request: ShareRequest, policy: SharingPolicy, required: RequiredElements
) -> Disclosure:
    ids = itertools.count()
    return share(
        RECORDS[letter], request, policy, at=AT, new_id=lambda: f"id-{next(ids)}", required=required
    )


def _resource(d: Disclosure, key: str) -> dict[str, Any]:
    assert d.bundle is not None
    for e in d.bundle["entry"]:
        r = e["resource"]
        if f"{r['resourceType']}/{r['id']}" == key:
            return r
    raise KeyError(key)


def _references(node: Any) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            out.append(node["reference"])
        for v in node.values():
            out += _references(v)
    elif isinstance(node, list):
        for v in node:
            out += _references(v)
    return out


@pytest.mark.parametrize(("letter", "request_"), REQUESTS, ids=[f"{a}-{r.to}" for a, r in REQUESTS])
def test_every_disclosure_is_valid_and_self_contained(
    letter: str,
    request_: ShareRequest,
    policy: SharingPolicy,
    required: RequiredElements,
    validator: Validator,
) -> None:
    before = copy.deepcopy(RECORDS[letter])
    d = _share(letter, request_, policy, required)
    assert RECORDS[letter] == before, "the record must not be changed"
    assert d.bundle is not None and d.audit_event is not None
    assert [i for i in validator.validate(d.bundle) if i.is_error] == []
    assert [i for i in validator.validate(d.audit_event) if i.is_error] == []
    urls = {e["fullUrl"] for e in d.bundle["entry"]}
    keys = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in d.bundle["entry"]}
    for ref in _references(d.bundle):
        assert ref in urls or ref in keys, f"{ref} dangles"
    assert "total" not in d.bundle
    # Exactly one Provenance, vouching for every shared resource.
    provenances = [
        e["resource"] for e in d.bundle["entry"] if e["resource"]["resourceType"] == "Provenance"
    ]
    assert len(provenances) == 1
    assert len(provenances[0]["target"]) == len(d.bundle["entry"]) - 1
    # The audit lists exactly what went, and counts (never lists) what did not.
    assert disclosed_references(d.audit_event) == d.shared
    # ... and names the service user whose record it was, as the patient.
    patient = next(
        e["resource"]["id"]
        for e in RECORDS[letter]["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    subjects = [
        e["what"]["reference"] for e in d.audit_event["entity"] if e.get("role") == SUBJECT_ROLE
    ]
    assert subjects == [f"Patient/{patient}"]
    counted = sum(
        int(detail["valueString"])
        for ent in d.audit_event["entity"]
        for detail in ent.get("detail", [])
    )
    assert counted >= len(d.withheld)


def test_element_redaction_keeps_the_rest(
    policy: SharingPolicy, required: RequiredElements
) -> None:
    """C's care plan goes to the GP without its child-care description and its
    children's services and probation activities, and says it was redacted."""
    d = _share("C", ShareRequest("gp", "TREAT"), policy, required)
    original = next(
        e["resource"] for e in RECORDS["C"]["entry"] if e["resource"]["id"] == "c-careplan"
    )
    plan = _resource(d, "CarePlan/c-careplan")
    assert "description" not in plan
    assert len(plan["activity"]) == len(original["activity"]) - 2
    text = orjson.dumps(plan).decode()
    assert "children's services" not in text.lower() and "probation" not in text.lower()
    labels = plan["meta"]["security"]
    assert {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "REDACTED",
        "display": "redacted",
    } in labels
    # Flags about risks the GP may not see are neither shared nor referred to.
    assert not any(ref.startswith("Flag/") for ref in _references(plan))
    assert "supportingInfo" not in plan
    elements = {(w.reference, w.element) for w in d.withheld}
    assert ("CarePlan/c-careplan", ".description") in elements


def test_required_reference_to_withheld_plan_is_masked(
    policy: SharingPolicy, required: RequiredElements
) -> None:
    """B did not consent to the GP seeing the crisis plan: the care plan still goes, its
    required link to the crisis plan masked rather than dangling."""
    d = _share("B", ShareRequest("gp", "COC"), policy, required)
    assert "CarePlan/b-crisis-plan" not in d.shared
    plan = _resource(d, "CarePlan/b-careplan")
    link = next(e for e in plan["extension"] if e["url"].endswith("/crisis-plan"))["valueReference"]
    assert link == {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                "valueCode": "masked",
            }
        ]
    }


def test_supporting_resources_go_only_when_referred_to(
    policy: SharingPolicy, required: RequiredElements
) -> None:
    d = _share("C", ShareRequest("probation", "THREAT", ("public-protection",)), policy, required)
    shared_refs = set(_references(d.bundle))
    for key in d.shared:
        if key.split("/")[0] in policy.supporting:
            assert key in shared_refs, f"{key} goes though nothing shared refers to it"
    assert "Organization/c-childrens-services" not in d.shared


def test_every_shared_resource_is_labelled_within_the_decision(
    policy: SharingPolicy, required: RequiredElements
) -> None:
    for letter, request in REQUESTS:
        d = _share(letter, request, policy, required)
        assert d.bundle is not None
        for e in d.bundle["entry"]:
            labels = e["resource"].get("meta", {}).get("security", [])
            confidentiality = [c for c in labels if c["system"].endswith("v3-Confidentiality")]
            assert len(confidentiality) == 1
            cats = {c["code"] for c in labels if c["system"] == CATEGORY_SYSTEM}
            assert cats <= set(d.decision.allowed)


def test_withheld_summary_says_what_and_why(
    policy: SharingPolicy, required: RequiredElements
) -> None:
    d = _share("A", ShareRequest("gp", "TREAT"), policy, required)
    lines = d.withheld_summary()
    assert "withheld Flag/a-risk-self-harm: risk-to-self: no consent covers it" in lines
    assert "withheld Consent/a-consent: personal: no consent covers it" in lines


def test_audit_basis_names_consent_or_law(
    policy: SharingPolicy, required: RequiredElements
) -> None:
    d = _share("C", ShareRequest("probation", "THREAT", ("public-protection",)), policy, required)
    assert d.audit_event is not None
    bases = {}
    for ext in d.audit_event["extension"]:
        parts = {p["url"]: p for p in ext["extension"]}
        bases[parts["category"]["valueCoding"]["code"]] = parts["legalBasis"]["valueCoding"]["code"]
    assert bases == {
        "administrative": "public-protection",
        "risk-to-others": "public-protection",
        "offending": "public-protection",
    }
    agents = {a["type"]["coding"][0]["code"]: a["who"] for a in d.audit_event["agent"]}
    assert agents["110152"]["reference"] == "Organization/c-probation"
