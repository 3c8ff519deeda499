"""How a Consent is read: a refusal errs towards applying, a grant never goes beyond
what it says, and what cannot be evaluated shares nothing."""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cpa_fhir.config import load_policy
from cpa_fhir.conformance import default_package
from cpa_fhir.consent import (
    CATEGORY_SYSTEM,
    Recipient,
    RequiredElements,
    ShareRequest,
    SharingPolicy,
    decide,
    share,
)
from cpa_fhir.consent._decision import PRIVACY_SCOPE
from cpa_fhir.errors import ConsentFormatError, RecipientError, SharingError
from tests.common import EXAMPLES
from tests.common import entry_resource as _in

AT = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
RECORD_C = orjson.loads(next(EXAMPLES.glob("Bundle-record-C-*.json")).read_bytes())
CONSENT_C = next(
    e["resource"] for e in RECORD_C["entry"] if e["resource"]["resourceType"] == "Consent"
)
GP = Recipient("Organization/c-gp-practice", "gp-practice")
GIVEN = {"administrative", "care-plan", "crisis", "medication"}  # C's consent, to her GP


def _with_gp_actor(reference: str, kind: str) -> dict[str, Any]:
    """C's consent with its GP permit naming the GP as `reference`, made a `kind`."""
    consent = copy.deepcopy(CONSENT_C)
    for provision in consent["provision"]["provision"]:
        for actor in provision.get("actor", []):
            if actor["reference"]["reference"] == GP.reference:
                actor["reference"]["reference"] = reference
                provision["type"] = kind
    return consent


def _allowed(consents: list[dict[str, Any]], policy: SharingPolicy, **kw: Any) -> set[str]:
    return set(decide(consents, GP, "TREAT", AT, policy, **kw).allowed)


@pytest.mark.parametrize(
    "url",
    [
        "http://testserver/fhir/Organization/c-gp-practice",
        "https://elsewhere.example/fhir/Organization/c-gp-practice/_history/3",
    ],
)
def test_a_refusal_naming_the_recipient_by_absolute_url_applies(
    url: str, policy: SharingPolicy
) -> None:
    assert _allowed([CONSENT_C], policy) == GIVEN
    refusal = _with_gp_actor(url, "deny")
    refusal["id"] = "refusal"
    assert _allowed([CONSENT_C, refusal], policy) == set()


def test_a_grant_naming_the_recipient_by_absolute_url_grants_nothing(
    policy: SharingPolicy,
) -> None:
    grant = _with_gp_actor("https://elsewhere.example/fhir/Organization/c-gp-practice", "permit")
    assert _allowed([grant], policy) == set()
    other = _with_gp_actor("https://elsewhere.example/fhir/Organization/c-gp-practice-2", "deny")
    other["id"] = "other"
    assert _allowed([CONSENT_C, other], policy) == GIVEN


def test_a_consent_that_only_restricts_refuses_but_never_grants(policy: SharingPolicy) -> None:
    refusal = _with_gp_actor(GP.reference, "deny")
    assert _allowed([CONSENT_C], policy, restricting=[refusal]) == set()
    assert _allowed([], policy, restricting=[CONSENT_C]) == set()
    assert _allowed([CONSENT_C], policy, restricting=[CONSENT_C]) == GIVEN


# -- through share(): a record's fullUrls, what a provision cannot say, carers -------------

REQUIRED = RequiredElements(default_package())


def _share(record: dict[str, Any], to: str = "gp", purpose: str = "TREAT", *exc: str) -> Any:
    ids = itertools.count()
    return share(
        record,
        ShareRequest(to, purpose, exc),
        load_policy(),
        at=AT,
        new_id=lambda: f"id-{next(ids)}",
        required=REQUIRED,
    )


def _gp_permit_of(record: dict[str, Any]) -> dict[str, Any]:
    permit: dict[str, Any] = _in(record, "Consent/c-consent")["provision"]["provision"][0]
    assert permit["actor"][0]["reference"]["reference"] == GP.reference
    return permit


def test_a_refusal_naming_the_recipient_by_the_records_urn_applies() -> None:
    record = copy.deepcopy(RECORD_C)
    urn = "urn:uuid:0f7d2c56-4f0b-4b43-9a0e-2f6f3c1d9e01"
    next(e for e in record["entry"] if e["resource"]["id"] == "c-gp-practice")["fullUrl"] = urn
    refusal = copy.deepcopy(_gp_permit_of(record))
    refusal.update(type="deny", actor=[{**refusal["actor"][0], "reference": {"reference": urn}}])
    refusal["securityLabel"] = [{"system": CATEGORY_SYSTEM, "code": "care-plan"}]
    _in(record, "Consent/c-consent")["provision"]["provision"].append(refusal)
    assert "care-plan" not in _share(record).decision.allowed


@pytest.mark.parametrize(
    ("system", "refused"),
    [("urn:oid:2.16.840.1.113883.5.8", True), ("https://local.example/purposes", None)],
)
def test_a_refusal_for_a_purpose_coded_otherwise_applies_or_is_an_error(
    system: str, refused: bool | None
) -> None:
    record = copy.deepcopy(RECORD_C)
    _in(record, "Consent/c-consent")["provision"]["provision"].append(
        {
            "type": "deny",
            "purpose": [{"system": system, "code": "TREAT"}],
            "securityLabel": [{"system": CATEGORY_SYSTEM, "code": "care-plan"}],
        }
    )
    if refused is None:
        with pytest.raises(ConsentFormatError, match="purpose"):
            _share(record)
    else:
        assert "care-plan" not in _share(record).decision.allowed


@pytest.mark.parametrize(
    ("scope", "outcome"),
    [
        ({"text": "Privacy consent"}, "error"),
        ({"coding": [{"system": "https://local.example/scopes", "code": "sharing"}]}, "error"),
        ({"coding": [{"system": PRIVACY_SCOPE[0], "code": "treatment"}]}, "ignored"),
    ],
)
def test_a_refusal_whose_scope_cannot_be_read_shares_nothing(
    scope: dict[str, Any], outcome: str
) -> None:
    record = copy.deepcopy(RECORD_C)
    refusal = copy.deepcopy(_in(record, "Consent/c-consent"))
    refusal.update(id="c-consent-withdrawal", scope=scope)
    refusal["provision"]["provision"] = [{**_gp_permit_of(record), "type": "deny"}]
    record["entry"].append({"resource": refusal})
    if outcome == "error":
        with pytest.raises(ConsentFormatError, match="scope"):
            _share(record)
    else:
        assert set(_share(record).decision.allowed) == GIVEN


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("class", [{"system": "http://hl7.org/fhir/resource-types", "code": "MedicationStatement"}]),
        ("code", [{"coding": [{"system": "http://snomed.info/sct", "code": "182836005"}]}]),
        ("dataPeriod", {"start": "2026-10-01"}),
        ("modifierExtension", [{"url": "https://local.example/only-in-emergency", "valueBoolean": True}]),
    ],
)  # fmt: skip
def test_a_permit_narrowed_in_ways_not_evaluated_shares_nothing(element: str, value: Any) -> None:
    record = copy.deepcopy(RECORD_C)
    _gp_permit_of(record)[element] = value
    with pytest.raises(ConsentFormatError, match=element):
        _share(record)
    record = copy.deepcopy(RECORD_C)
    _in(record, "Consent/c-consent")["modifierExtension"] = [
        {"url": "https://local.example/x", "valueBoolean": True}
    ]
    with pytest.raises(ConsentFormatError, match="modifier"):
        _share(record)


ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
ROLE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


@pytest.mark.parametrize(
    ("change", "kind", "allowed"),
    [
        ({"action": [{"coding": [{"system": ACTION, "code": "collect"}]}]}, "permit", set()),
        ({"action": [{"coding": [{"system": ACTION, "code": "disclose"}]}]}, "permit", GIVEN),
        ({"role": {"coding": [{"system": ROLE, "code": "AUT"}]}}, "permit", set()),
        ({"role": {"coding": [{"system": ROLE, "code": "AUT"}]}}, "deny", set()),
        ({"action": [{"coding": [{"system": ACTION, "code": "collect"}]}]}, "deny", set()),
    ],
)
def test_a_permit_grants_only_disclosure_to_a_recipient_a_refusal_errs_towards_applying(
    change: dict[str, Any], kind: str, allowed: set[str]
) -> None:
    record = copy.deepcopy(RECORD_C)
    provision = _gp_permit_of(record)
    if kind == "deny":  # C's permit as it is, and a refusal of the same, changed
        provision = copy.deepcopy(provision)
        _in(record, "Consent/c-consent")["provision"]["provision"].append(provision)
        provision["type"] = "deny"
    if "role" in change:
        provision["actor"][0]["role"] = change["role"]
    else:
        provision.update(change)
    assert set(_share(record).decision.allowed) == allowed


@pytest.mark.parametrize(
    "change",
    [
        {"active": False},
        {"patient": {"reference": "Patient/someone-else"}},
        {"period": {"start": "2020-01-01", "end": "2021-01-01"}},
    ],
)
def test_a_carers_need_to_know_holds_only_for_an_active_carer_of_the_records_patient(
    change: dict[str, Any],
) -> None:
    ask = ("carer:c-carer-son", "FAMRQT", "carers-need-to-know")
    assert _share(copy.deepcopy(RECORD_C), *ask).bundle is not None
    record = copy.deepcopy(RECORD_C)
    _in(record, "RelatedPerson/c-carer-son").update(change)
    with pytest.raises((RecipientError, SharingError), match="carer|patient"):
        _share(record, *ask)


@pytest.mark.parametrize(
    "subject",
    ["Patient/jac-fictional-carey", "https://other.example/fhir/Patient/c-patient"],
)
def test_a_record_holding_what_is_about_another_patient_shares_nothing(subject: str) -> None:
    record = copy.deepcopy(RECORD_C)
    need = copy.deepcopy(_in(record, "Condition/c-need-accommodation"))
    need.update(id="jac-need-school", subject={"reference": subject})
    record["entry"].append({"resource": need})
    with pytest.raises(SharingError, match="not this record's patient"):
        _share(record)


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("modifierExtension", [{"url": "https://local.example/only-if", "valueBoolean": True}]),
        ("dataPeriod", {"start": "2026-01-01", "end": "2026-02-01"}),
        ("class", [{"system": "http://hl7.org/fhir/resource-types", "code": "Flag"}]),
    ],
)
def test_a_base_provision_the_engine_cannot_honour_shares_nothing(element: str, value: Any) -> None:
    record = copy.deepcopy(RECORD_C)
    _in(record, "Consent/c-consent")["provision"][element] = value
    with pytest.raises(ConsentFormatError, match=element):
        _share(record)


def test_an_action_that_cannot_be_read_is_an_error() -> None:
    record = copy.deepcopy(RECORD_C)
    _gp_permit_of(record)["action"] = [{"coding": 5}]
    with pytest.raises(ConsentFormatError, match="action"):
        _share(record)


@pytest.mark.parametrize("form", ["fullUrl", "urn"])
def test_a_carer_naming_its_patient_by_the_records_full_url_cares_for_them(form: str) -> None:
    record = copy.deepcopy(RECORD_C)
    entry = next(e for e in record["entry"] if e["resource"]["id"] == "c-patient")
    if form == "urn":
        entry["fullUrl"] = "urn:uuid:6f1c2d4e-1111-4c4c-9a9a-0123456789ab"
    _in(record, "RelatedPerson/c-carer-son")["patient"] = {"reference": entry["fullUrl"]}
    disclosure = _share(record, "carer:c-carer-son", "FAMRQT", "carers-need-to-know")
    assert "CarePlan/c-crisis-plan" in disclosure.shared


def _refusing_crisis_to(record: dict[str, Any], reference: str) -> None:
    permit = _gp_permit_of(record)
    refusal = {
        "type": "deny",
        "actor": [{**permit["actor"][0], "reference": {"reference": reference}}],
        "securityLabel": [{"system": CATEGORY_SYSTEM, "code": "crisis"}],
    }
    _in(record, "Consent/c-consent")["provision"]["provision"].append(refusal)


@pytest.mark.parametrize(
    "names",
    ["care team", "group", "role", "contained", "an actor not in the record", "practitioner"],
)
def test_a_refusal_of_those_that_stand_for_the_recipient_applies(names: str) -> None:
    record = copy.deepcopy(RECORD_C)
    consent = _in(record, "Consent/c-consent")
    gp_role = {
        "resourceType": "PractitionerRole",
        "id": "gp-role",
        "active": True,
        "organization": {"reference": GP.reference},
    }
    if names == "care team":
        team = _in(record, "CareTeam/c-careteam")
        team["participant"].append({"member": {"reference": GP.reference}})
        reference = "CareTeam/c-careteam"
    elif names == "group":
        group = {"resourceType": "Group", "id": "g1", "type": "practitioner", "actual": True,
                 "member": [{"entity": {"reference": GP.reference}}]}  # fmt: skip
        record["entry"].append({"resource": group})
        reference = "Group/g1"
    elif names == "role":
        record["entry"].append({"resource": gp_role})
        reference = "PractitionerRole/gp-role"
    elif names == "contained":
        ods = next(
            i
            for i in _in(record, GP.reference)["identifier"]
            if i["system"].endswith("ods-organization-code")  # fmt: skip
        )
        consent["contained"] = [{"resourceType": "Organization", "id": "gp", "identifier": [ods]}]
        reference = "#gp"
    elif names == "practitioner":  # the GP in person, whose role is with the practice
        reference = "Practitioner/c-gp"
        assert _in(record, "PractitionerRole/c-gp-role")["practitioner"]["reference"] == reference
    else:
        reference = "Organization/deleted-since"
    assert "crisis" in _share(copy.deepcopy(record)).decision.allowed
    _refusing_crisis_to(record, reference)
    assert "crisis" not in _share(record).decision.allowed


def test_a_grant_to_a_care_team_the_recipient_is_in_grants_it_nothing() -> None:
    record = copy.deepcopy(RECORD_C)
    _in(record, "CareTeam/c-careteam")["participant"].append(
        {"member": {"reference": GP.reference}}
    )
    _gp_permit_of(record)["actor"][0]["reference"] = {"reference": "CareTeam/c-careteam"}
    assert set(_share(record).decision.allowed) == set()


def test_a_refusal_nested_in_a_permit_of_other_categories_still_refuses() -> None:
    """A refusal inside the GP permit names what that permit does not grant; another
    Consent permits it: the refusal holds (deny beats permit, at any depth)."""
    consent = copy.deepcopy(CONSENT_C)
    permit = next(
        p
        for p in consent["provision"]["provision"]
        if any(a["reference"]["reference"] == GP.reference for a in p.get("actor", []))
    )
    label = {"system": CATEGORY_SYSTEM, "code": "substance-use"}
    # Without C's own refusal of substance use, which is not nested.
    consent["provision"]["provision"] = [
        p for p in consent["provision"]["provision"] if label["code"] not in str(p) or p is permit
    ]
    other = copy.deepcopy(CONSENT_C)
    other["id"] = "c-consent-2"
    other["provision"]["provision"] = [{**permit, "securityLabel": [label]}]
    policy = load_policy()
    assert "substance-use" in _allowed([consent, other], policy)
    permit["provision"] = [{"type": "deny", "securityLabel": [label]}]
    assert "substance-use" not in _allowed([consent, other], policy)
    assert _allowed([consent, other], policy) >= GIVEN
    # Nested with no label, it refuses everything (when its own conditions hold).
    permit["provision"] = [{"type": "deny"}]
    assert _allowed([consent, other], policy) == set()


@pytest.mark.parametrize(
    ("codes", "granted"),
    [
        (["HIV"], set()),  # not gender identity, sexual orientation or pregnancy
        (["SEX", "HIV", "STD"], {"sexuality"}),
        (["PSY"], set()),  # a diagnosis is labelled DIA too
        (["MH"], {"crisis", "care-plan", "risk-to-self", "risk-to-others"}),
    ],
)
def test_a_grant_by_sensitivity_covers_only_categories_it_names_every_label_of(
    codes: list[str], granted: set[str], policy: SharingPolicy
) -> None:
    consent = copy.deepcopy(CONSENT_C)
    grant = consent["provision"]["provision"][0]
    grant["securityLabel"] = [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code}
        for code in codes
    ]
    consent["provision"]["provision"] = [grant]
    assert _allowed([consent], policy) == granted
    # A refusal by any one of them refuses every category labelled with it.
    refusal = copy.deepcopy(consent)
    refusal["id"] = "refusal"
    refusal["provision"]["provision"][0]["type"] = "deny"
    everything = copy.deepcopy(CONSENT_C)
    everything["provision"]["provision"] = [
        {
            **grant,
            "securityLabel": [{"system": CATEGORY_SYSTEM, "code": c} for c in policy.categories],
        }
    ]
    refused = {c for code in codes for c in policy.categories_by_sensitivity[code]}
    assert _allowed([everything, refusal], policy) == set(policy.categories) - refused
