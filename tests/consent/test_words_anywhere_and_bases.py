"""Sensitive words are read wherever the recipient would read them, however they are
typed; and a basis holds only for what it names: a refusal by display or by an
identifier the engine cannot check, a purpose within a refused one, a relative who
is no carer, a carer or role recorded inactive in any spelling."""

from __future__ import annotations

import copy
import itertools
import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cpa_fhir.config import load_policy
from cpa_fhir.conformance import default_package
from cpa_fhir.consent import RequiredElements, ShareRequest, share
from cpa_fhir.consent._policy import meaning
from cpa_fhir.errors import RecipientError, SharingError
from tests.common import EXAMPLES
from tests.common import entry_resource as _in

AT = datetime(2026, 11, 1, 9, tzinfo=UTC)
RECORD_C = orjson.loads(next(EXAMPLES.glob("Bundle-record-C-*.json")).read_bytes())
REQUIRED = RequiredElements(default_package())
CARER_CODE = {
    "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-AdditionalPersonRelationshipRole",
    "code": "Carer",
}


def _share(record: dict[str, Any], to: str = "gp", purpose: str = "TREAT", **kw: Any) -> Any:
    ids = itertools.count()
    return share(
        record,
        ShareRequest(to, purpose, **kw),
        load_policy(),
        at=AT,
        new_id=lambda: f"id-{next(ids)}",
        required=REQUIRED,
    )


def _sent(disclosure: Any) -> str:
    return json.dumps(disclosure.bundle) if disclosure.bundle else ""


# -- words anywhere ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "change", "marker"),
    [
        (
            "Patient/c-patient",
            lambda r: r["identifier"].append(
                {
                    "system": "https://example.org/Id/probation-case-reference-number",
                    "value": "PCR-81",
                }
            ),
            "PCR-81",
        ),
        (
            "Patient/c-patient",
            lambda r: r["address"].append({"text": "HMP Example, released on licence"}),
            "HMP Example",
        ),
        (
            "Encounter/c-review-2026-09",
            lambda r: r["participant"].append(
                {"individual": {"display": "Rhys, probation officer (MAPPA)"}}
            ),
            "Rhys, probation",
        ),
        (
            "Encounter/c-review-2026-09",
            lambda r: r.setdefault("hospitalization", {}).update(
                admitSource={"text": "Brought by police from custody"}
            ),
            "from custody",
        ),
        (
            "CareTeam/c-careteam",
            lambda r: r.setdefault("note", []).append({"text": "Heroin use discussed at panel"}),
            "Heroin use",
        ),
        (
            "Flag/c-risk-harm-to-others",
            lambda r: r["extension"][1]["extension"][0].update(valueString="probation report"),
            "probation report",
        ),
    ],
)
def test_a_sensitive_word_in_any_element_keeps_that_element_from_the_gp(
    key: str, change: Any, marker: str
) -> None:
    record = copy.deepcopy(RECORD_C)
    change(_in(record, key))
    disclosure = _share(record)
    assert "offending" not in disclosure.decision.allowed
    assert marker not in _sent(disclosure)
    assert any(w.reference == key for w in disclosure.withheld)


@pytest.mark.parametrize(
    "written",
    [
        "history of self\u2011harm",  # non-breaking hyphen, as word processors write it
        "history of self\u2013harm",  # en dash
        "known to children\u2019s services",  # curly apostrophe
        "S\u200buicidal thoughts",  # zero-width space
        "\uff30\uff52\uff4f\uff42\uff41\uff54\uff49\uff4f\uff4e report",  # full-width letters
        "imprisonment in 2019",
        "methadone script",
        "rent arrears",
    ],
)
def test_words_are_found_however_they_are_typed(written: str) -> None:
    record = copy.deepcopy(RECORD_C)
    need = _in(record, "Condition/c-need-accommodation")
    need["code"]["text"] = f"Precarious accommodation; {written}"
    assert "Condition/c-need-accommodation" in _share(copy.deepcopy(RECORD_C)).shared
    disclosure = _share(record)
    assert "Condition/c-need-accommodation" not in disclosure.shared
    assert written not in _sent(disclosure)


def test_the_display_of_a_code_the_policy_names_is_its_meaning_not_a_fact() -> None:
    """A risk-to-others flag's code reads "including sexual and domestic violence": the
    code's definition, which the policy's own rule for the code labels. It does not make
    the flag sexuality or abuse information."""
    record = copy.deepcopy(RECORD_C)
    flag = _in(record, "Flag/c-risk-harm-to-others")
    assert "sexual" in flag["code"]["coding"][0]["display"]
    flag["extension"][1]["extension"][0]["valueString"] = "clinical assessment"
    consent = _in(record, "Consent/c-consent")
    consent["provision"]["provision"][0]["securityLabel"].append(
        {
            "system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category",
            "code": "risk-to-others",
        }
    )
    disclosure = _share(record)
    assert "Flag/c-risk-harm-to-others" in disclosure.shared
    assert "sexual" in _sent(disclosure)  # the code goes whole; its free text did not
    assert "managed by probation" not in _sent(disclosure)


def test_a_flag_whose_required_source_is_withheld_is_withheld_whole() -> None:
    record = copy.deepcopy(RECORD_C)
    consent = _in(record, "Consent/c-consent")
    consent["provision"]["provision"][0]["securityLabel"].append(
        {
            "system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category",
            "code": "risk-to-others",
        }
    )
    disclosure = _share(record)
    assert "Flag/c-risk-harm-to-others" not in disclosure.shared  # its source: probation
    (why,) = [
        w.reason
        for w in disclosure.withheld
        if w.reference == "Flag/c-risk-harm-to-others" and w.element is None
    ]
    assert "Flag.extension('https://cpa-fhir.org/fhir/StructureDefinition/risk-source')" in why


# -- bases -------------------------------------------------------------------------------


def _refusing(actor: dict[str, Any], purpose: str = "TREAT") -> dict[str, Any]:
    """Record C with the GP's permit joined by a refusal of crisis information."""
    record = copy.deepcopy(RECORD_C)
    consent = _in(record, "Consent/c-consent")
    consent["provision"].setdefault("provision", []).append(
        {
            "type": "deny",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": actor,
                }
            ],
            "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}
            ],
            "securityLabel": [
                {
                    "system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category",
                    "code": "crisis",
                }
            ],
        }
    )
    return record


@pytest.mark.parametrize(
    "actor",
    [
        {"display": "Example Park Health Centre (Ceri's GP)"},
        {
            "identifier": {
                "system": "https://fhir.nhs.uk/Id/ods-organization-code",
                "value": "Y99999",
            }
        },
    ],
)
def test_a_refusal_naming_its_actor_in_a_way_that_cannot_be_checked_applies(
    actor: dict[str, Any],
) -> None:
    record = _refusing(actor)
    gp = _in(record, "Organization/c-gp-practice")
    gp.pop("identifier", None)  # the GP known by no identifier the refusal could be checked against
    assert "crisis" in _share(copy.deepcopy(RECORD_C)).decision.allowed
    assert "crisis" not in _share(record).decision.allowed


def test_a_refusal_by_an_identifier_of_another_organisation_does_not_apply() -> None:
    record = _refusing(
        {
            "identifier": {
                "system": "https://fhir.nhs.uk/Id/ods-organization-code",
                "value": "Z00000",
            }
        }
    )
    gp = _in(record, "Organization/c-gp-practice")
    ods = [
        i for i in gp.get("identifier", []) if i.get("system", "").endswith("ods-organization-code")
    ]
    assert ods and ods[0]["value"] != "Z00000"
    assert "crisis" in _share(record).decision.allowed


@pytest.mark.parametrize(("refused", "asked", "applies"), [
    ("TREAT", "COC", True), ("TREAT", "ETREAT", True), ("TREAT", "TREAT", True),
    ("COC", "TREAT", False), ("HOPERAT", "TREAT", False),
])  # fmt: skip
def test_a_refusal_for_a_purpose_covers_the_purposes_within_it(
    refused: str, asked: str, applies: bool
) -> None:
    record = _refusing({"reference": "Organization/c-gp-practice"}, purpose=refused)
    consent = _in(record, "Consent/c-consent")
    for provision in consent["provision"]["provision"]:
        if provision["type"] == "permit":
            provision["purpose"] = [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": asked}
            ]
    assert ("crisis" not in _share(record, purpose=asked).decision.allowed) is applies


def test_a_permit_for_a_purpose_grants_those_within_it_and_not_the_broader_one() -> None:
    record = copy.deepcopy(RECORD_C)
    consent = _in(record, "Consent/c-consent")
    permit = consent["provision"]["provision"][0]
    permit["purpose"] = [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}
    ]
    assert "care-plan" in _share(record, purpose="COC").decision.allowed
    permit["purpose"] = [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "COC"}
    ]
    assert "care-plan" not in _share(record, purpose="TREAT").decision.allowed


def _carer_record(**changes: Any) -> dict[str, Any]:
    record = copy.deepcopy(RECORD_C)
    _in(record, "RelatedPerson/c-carer-son").update(changes)
    return record


def test_the_carers_basis_holds_for_a_carer() -> None:
    disclosure = _share(
        _carer_record(), "carer:c-carer-son", "FAMRQT", exceptions=("carers-need-to-know",)
    )
    assert disclosure.bundle is not None


@pytest.mark.parametrize(
    "changes",
    [
        {
            "relationship": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                            "code": "FMRSPS",
                        }
                    ]
                }
            ]
        },
        {"active": "false"},
        {"active": 0},
        {"active": None},
        {"active": False},
    ],
)
def test_the_carers_basis_holds_for_no_one_else(changes: dict[str, Any]) -> None:
    record = _carer_record(**changes)
    with pytest.raises((RecipientError, SharingError)):
        _share(record, "carer:c-carer-son", "FAMRQT", exceptions=("carers-need-to-know",))


@pytest.mark.parametrize(
    "written",
    [
        "sui\u200ecidal thoughts",  # left-to-right mark
        "self\u2043harm",  # hyphen bullet
        "prob\u0430tion officer",  # Cyrillic a
        "p\u03bflice involvement",  # Greek omicron
        "s\u0336e\u0336l\u0336f\u0336-harm",  # combining strike-through
        "self_harm",
        "Risk of reoffending assessed as high",
        "Previous offences: theft",
        "convicted in 2019",
        "History of parasuicide",
        "Episodes of selfharm",
        "Polydrug use",
        "He is bisexual",
        "was drunk on the ward",
        "attends the hiv clinic",  # lower case
        "Referred to HMPPS resettlement",  # HM Prison and Probation Service
        "two non-drinking days a week",  # "non-" negates only what the policy says
    ],
)
def test_more_ways_of_writing_a_sensitive_word_are_found(written: str) -> None:
    record = copy.deepcopy(RECORD_C)
    _in(record, "Condition/c-need-accommodation")["code"]["text"] = f"Housing; {written}"
    disclosure = _share(record)
    assert "Condition/c-need-accommodation" not in disclosure.shared


@pytest.mark.parametrize(
    ("key", "change"),
    [
        # "non-offender": the Mental Health Act's own words for a civil section
        (
            "Condition/c-need-accommodation",
            lambda r: r["code"].update(text="Housing; a non-offender"),
        ),
        # a name or place that begins like a listed word: at most its element is held back
        ("CarePlan/c-careplan", lambda r: r["author"].update(display="Dr Samira Jailani")),
        (
            "CarePlan/c-careplan",
            lambda r: r.setdefault("note", []).append({"text": "Met at Hive House"}),
        ),
    ],
)
def test_innocent_words_do_not_withhold_a_whole_resource(key: str, change: Any) -> None:
    record = copy.deepcopy(RECORD_C)
    change(_in(record, key))
    assert key in _share(copy.deepcopy(RECORD_C)).shared
    disclosure = _share(record)
    assert key in disclosure.shared
    assert not [w for w in disclosure.withheld if w.reference == key and w.element is None]


def test_a_coded_coding_is_read_but_for_its_display() -> None:
    """The display of a code the policy names is the code's meaning; an extension or
    other text put on that coding is read like any other."""
    record = copy.deepcopy(RECORD_C)
    org = _in(record, "Organization/c-gp-practice")
    coding = org["type"][0]["coding"][0]
    coding["extension"] = [
        {"url": "https://local.example/note", "valueString": "Patient is on probation"}
    ]
    disclosure = _share(record)
    assert "on probation" not in _sent(disclosure)


@pytest.mark.parametrize(
    "display",
    [
        "Intentional self-harm after heroin relapse while on licence",
        "Intentional self-harm (heroin, on licence)",
    ],
)
def test_a_display_that_is_not_the_codes_meaning_is_read_as_any_text_is(display: str) -> None:
    """A self-harm flag goes to a GP the consent lets have risk to self; a display
    that says more than the code means is free text, and goes only where it may."""
    record = copy.deepcopy(RECORD_C)
    consent = _in(record, "Consent/c-consent")
    consent["provision"]["provision"][0]["securityLabel"].append(
        {
            "system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category",
            "code": "risk-to-self",
        }
    )
    flag = _in(record, "Flag/c-risk-self-harm")
    assert "Flag/c-risk-self-harm" in _share(record).shared  # its own display goes
    flag["code"]["coding"][0]["display"] = display
    disclosure = _share(record)
    assert "heroin" not in _sent(disclosure)
    assert "licence" not in _sent(disclosure)


def test_the_displays_the_policy_takes_for_meanings_are_those_of_the_code_systems() -> None:
    policy = load_policy()
    package = default_package()
    found = 0
    for (system, code), meanings in policy.coded.items():
        if not meanings:
            continue
        code_system = package.resolve(system)
        assert code_system is not None, system
        concepts = list(code_system.get("concept", []))
        displays = set()
        while concepts:
            concept = concepts.pop()
            concepts += concept.get("concept", [])
            if concept["code"] == code:
                displays.add(meaning(concept["display"]))
        assert meanings == displays, (system, code)
        found += 1
    assert found >= 20


def test_meta_goes_as_version_time_and_profiles_alone() -> None:
    record = copy.deepcopy(RECORD_C)
    plan = _in(record, "CarePlan/c-careplan")
    plan["meta"]["source"] = "https://prison-healthcare.example/epr"
    plan["meta"]["extension"] = [{"url": "https://local.example/x", "valueString": "MAPPA 2"}]
    disclosure = _share(record)
    assert "CarePlan/c-careplan" in disclosure.shared
    sent = _sent(disclosure)
    assert "prison-healthcare" not in sent and "MAPPA 2" not in sent


def test_a_resource_whose_id_names_a_sensitive_matter_carries_it() -> None:
    record = copy.deepcopy(RECORD_C)
    goal = _in(record, "Goal/c-goal-home")
    goal["id"] = "c-goal-home-after-prison"
    for e in record["entry"]:
        if e["resource"] is goal:
            e["fullUrl"] = e["fullUrl"].replace("c-goal-home", "c-goal-home-after-prison")
    text = json.dumps(record).replace('"Goal/c-goal-home"', '"Goal/c-goal-home-after-prison"')
    disclosure = _share(json.loads(text))
    assert "after-prison" not in _sent(disclosure)


def test_a_rule_for_any_element_takes_no_other_condition() -> None:
    from cpa_fhir.consent._policy import parse_policy
    from cpa_fhir.errors import PolicyError

    data = load_policy_data()
    data["rule"].append(
        {
            "id": "x",
            "resource": "*",
            "element": "*",
            "text": "offending",
            "category": "offending",
            "profile": "https://x",
        }
    )
    with pytest.raises(PolicyError, match="stands alone"):
        parse_policy(data)


def load_policy_data() -> dict[str, Any]:
    import tomllib

    from cpa_fhir._artifacts import find_artifact

    return tomllib.loads(find_artifact("policy/sharing.toml").read_text())
