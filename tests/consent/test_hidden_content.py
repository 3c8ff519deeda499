"""What a record says where labelling rules do not look still goes only as the
decision allows: contained resources, narrative, tags, extensions at any depth,
sensitivity labels the policy does not know, and categories passed on through
several references."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import tomllib
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cpa_fhir.config import default_policy_path, load_policy
from cpa_fhir.conformance import default_package
from cpa_fhir.consent import CATEGORY_SYSTEM, RequiredElements, ShareRequest, share
from cpa_fhir.consent._policy import parse_policy
from cpa_fhir.errors import PolicyError, SharingError
from tests.common import EXAMPLES
from tests.common import entry_resource as _in

AT = datetime(2026, 11, 1, 9, tzinfo=UTC)
RECORD_C = orjson.loads(next(EXAMPLES.glob("Bundle-record-C-*.json")).read_bytes())
REQUIRED = RequiredElements(default_package())
MAPPA = "https://cpa-fhir.org/fhir/StructureDefinition/mappa-level"


def _share(record: dict[str, Any]) -> Any:
    """Record C (or a change of it) to its GP for treatment: administrative, care-plan,
    crisis and medication may go."""
    ids = itertools.count()
    return share(
        record,
        ShareRequest("gp", "TREAT"),
        load_policy(),
        at=AT,
        new_id=lambda: f"id-{next(ids)}",
        required=REQUIRED,
    )


def _sent(record: dict[str, Any]) -> str:
    disclosure = _share(record)
    return json.dumps(disclosure.bundle).lower() if disclosure.bundle else ""


def test_a_contained_resource_is_labelled_as_any_other_and_goes_with_its_container() -> None:
    record = copy.deepcopy(RECORD_C)
    plan = _in(record, "CarePlan/c-careplan")
    plan["contained"] = [
        {
            "resourceType": "Encounter",
            "id": "e1",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "reasonCode": [{"text": "Admitted after heroin overdose"}],
        }
    ]
    plan["supportingInfo"].append({"reference": "#e1", "display": "Heroin overdose"})
    assert "CarePlan/c-careplan" in _share(copy.deepcopy(RECORD_C)).shared
    disclosure = _share(record)
    assert "CarePlan/c-careplan" not in disclosure.shared
    assert "heroin" not in _sent(record)


def test_contained_content_that_is_not_a_resource_shares_nothing() -> None:
    record = copy.deepcopy(RECORD_C)
    _in(record, "Encounter/c-review-2026-09")["contained"] = ["Heroin dependence"]
    with pytest.raises(SharingError, match="contained"):
        _share(record)


def test_narrative_and_tags_never_go() -> None:
    record = copy.deepcopy(RECORD_C)
    review = _in(record, "Encounter/c-review-2026-09")
    review["text"] = {
        "status": "additional",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">Discussed her heroin use</div>',
    }
    review["meta"]["tag"] = [{"system": "https://local.example/tags", "code": "dsu", "display": "Drug service: heroin"}]  # fmt: skip
    disclosure = _share(record)
    assert "Encounter/c-review-2026-09" in disclosure.shared
    assert "heroin" not in _sent(record)
    for entry in disclosure.bundle["entry"]:
        assert "text" not in entry["resource"]
        assert "tag" not in entry["resource"].get("meta", {})


def test_a_version_id_that_names_a_matter_goes_only_where_the_matter_may() -> None:
    # meta.versionId goes with the resource (and its contained ones), and an id may be
    # any word: it is read as the resource's own id is.
    record = copy.deepcopy(RECORD_C)
    _in(record, "Encounter/c-review-2026-09")["meta"]["versionId"] = "heroin-review-2"
    plan = _in(record, "CarePlan/c-careplan")
    plan["contained"] = [
        {
            "resourceType": "Goal",
            "id": "g1",
            "meta": {"versionId": "MAPPA-3"},
            "lifecycleStatus": "active",
            "description": {"text": "Keep her tenancy"},
            "subject": {"reference": "Patient/c-patient"},
        }
    ]
    plan["goal"].append({"reference": "#g1"})
    disclosure = _share(record)
    assert "Encounter/c-review-2026-09" not in disclosure.shared
    assert "CarePlan/c-careplan" not in disclosure.shared
    assert "heroin" not in _sent(record)
    assert "mappa" not in _sent(record)


@pytest.mark.parametrize("code", ["ETHUD", "OPIOIDUD", "BH"])
def test_a_sensitivity_label_the_policy_does_not_know_is_the_most_restrictive(code: str) -> None:
    record = copy.deepcopy(RECORD_C)
    review = _in(record, "Encounter/c-review-2026-09")
    review["meta"]["security"] = [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code}
    ]
    assert "Encounter/c-review-2026-09" not in _share(record).shared


@pytest.mark.parametrize("where", ["nested", "modifierExtension", "primitive", "in an element"])
def test_an_extension_is_found_at_any_depth(where: str) -> None:
    """The MAPPA level marks a risk flag as offending information, wherever it sits."""
    record = copy.deepcopy(RECORD_C)
    consent = _in(record, "Consent/c-consent")
    consent["provision"]["provision"][0]["securityLabel"].append(
        {"system": CATEGORY_SYSTEM, "code": "risk-to-others"}
    )
    flag = _in(record, "Flag/c-risk-harm-to-others")
    # Its required source said to be a clinical one: a probation report is offending
    # information itself, and the flag would not go for that alone.
    source = next(e for e in flag["extension"] if e["url"].endswith("/risk-source"))
    source["extension"][0]["valueString"] = "clinical assessment"
    mappa = next(e for e in flag["extension"] if e["url"] == MAPPA)
    flag["extension"] = [e for e in flag["extension"] if e["url"] != MAPPA]
    if where == "nested":
        flag["extension"].append(
            {
                "url": "https://local.example/w",
                "extension": [{"url": "inner", "extension": [mappa]}],
            }
        )
    elif where == "modifierExtension":
        flag["modifierExtension"] = [mappa]
    elif where == "primitive":
        flag["_status"] = {"extension": [mappa]}
    else:
        flag["code"]["extension"] = [mappa]
    disclosure = _share(record)
    assert "offending" not in disclosure.decision.allowed
    # Nested in an extension of the flag's, that extension is removed; elsewhere, the
    # flag carries it as a whole.
    assert ("Flag/c-risk-harm-to-others" in disclosure.shared) == (where == "nested")
    assert MAPPA.lower() not in _sent(record)


@pytest.mark.parametrize("form", ["relative", "absolute", "urn"])
def test_categories_pass_on_through_references_of_any_form_and_any_number_of_steps(
    form: str,
) -> None:
    """A probation officer's role inherits offending from the probation service it is
    held with; what that role performs inherits it in turn."""
    record = copy.deepcopy(RECORD_C)
    org = next(e for e in record["entry"] if e["resource"]["id"] == "c-probation")
    ref = "Organization/c-probation"
    if form == "absolute":
        ref = org["fullUrl"]
    elif form == "urn":
        ref = org["fullUrl"] = "urn:uuid:6b1a3c7e-1111-4c2d-9a9a-000000000001"
    _in(record, "PractitionerRole/c-probation-officer-role")["organization"] = {"reference": ref}
    review = _in(record, "Encounter/c-review-2026-09")
    review["participant"].append(
        {"individual": {"reference": "PractitionerRole/c-probation-officer-role"}}
    )
    activity = _in(record, "CarePlan/c-careplan")["activity"][4]["detail"]
    activity["description"] = "Fortnightly supervision appointments under licence conditions"
    activity["performer"] = [{"reference": "PractitionerRole/c-probation-officer-role"}]
    disclosure = _share(record)
    assert "PractitionerRole/c-probation-officer-role" not in disclosure.shared
    assert "licence conditions" not in _sent(record)


def test_a_versioned_reference_to_another_servers_resource_is_not_this_records() -> None:
    """Another server's Condition/x of some version is not the record's Condition/x:
    the reference names nothing that goes, so it does not go (nor where it points)."""
    record = copy.deepcopy(RECORD_C)
    elsewhere = "https://drug-and-alcohol-service.example.org/fhir/Condition/c-need-accommodation"
    _in(record, "CarePlan/c-careplan")["supportingInfo"].append(
        {"reference": f"{elsewhere}/_history/2"}
    )
    assert "drug-and-alcohol-service" not in _sent(record)
    # The record's own entry, by its fullUrl and a version, is the record's.
    own = next(e for e in record["entry"] if e["resource"]["id"] == "c-need-accommodation")
    _in(record, "CarePlan/c-careplan")["supportingInfo"][-1] = {
        "reference": f"{own['fullUrl']}/_history/1"
    }
    plan = next(
        e["resource"] for e in _share(record).bundle["entry"] if e["resource"]["id"] == "c-careplan"
    )
    assert {"reference": f"{own['fullUrl']}/_history/1"} in plan["supportingInfo"]


def test_what_a_resource_contains_goes_without_narrative_tags_or_labels_of_its_own() -> None:
    record = copy.deepcopy(RECORD_C)
    plan = _in(record, "CarePlan/c-careplan")
    plan["contained"] = [
        {
            "resourceType": "Medication",
            "id": "m1",
            "meta": {
                "tag": [
                    {
                        "system": "https://local.example/tags",
                        "code": "dsu",
                        "display": "Drug service: heroin",
                    }
                ]
            },  # fmt: skip
            "text": {
                "status": "additional",
                "div": '<div xmlns="http://www.w3.org/1999/xhtml">For her heroin dependence</div>',
            },  # fmt: skip
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "387286002"}]},
        }
    ]
    plan["supportingInfo"].append({"reference": "#m1"})
    assert "CarePlan/c-careplan" in _share(record).shared
    assert "heroin" not in _sent(record)


def test_a_record_whose_contained_resource_is_about_another_patient_shares_nothing() -> None:
    record = copy.deepcopy(RECORD_C)
    plan = _in(record, "CarePlan/c-careplan")
    plan["contained"] = [
        {
            "resourceType": "MedicationStatement",
            "id": "m1",
            "status": "active",
            "subject": {"reference": "Patient/someone-else"},
            "medicationCodeableConcept": {"text": "Sertraline 50mg"},
        }
    ]
    plan["supportingInfo"].append({"reference": "#m1"})
    with pytest.raises(SharingError, match="not this record's patient"):
        _share(record)


def test_a_probation_officers_role_is_offending_information_wherever_it_is_held() -> None:
    record = copy.deepcopy(RECORD_C)
    role = _in(record, "PractitionerRole/c-probation-officer-role")
    role["organization"] = {"reference": "Organization/c-trust"}
    review = _in(record, "Encounter/c-review-2026-09")
    review["participant"].append(
        {"individual": {"reference": "PractitionerRole/c-probation-officer-role"}}
    )
    assert "PractitionerRole/c-probation-officer-role" not in _share(record).shared


@pytest.mark.parametrize(
    "role_text",
    ["Probation officer", "Substance misuse worker", "Child protection social worker"],
)
def test_a_role_named_only_in_words_is_what_a_coded_one_is_for_its_holder_too(
    role_text: str,
) -> None:
    # Ids that name nothing, a role with the trust and no coding: only its words say
    # what the holder does, and the holder still attends the reviews the GP is sent.
    text = json.dumps(RECORD_C).replace("c-probation-officer", "c-professional-7")
    record = json.loads(text)
    role = _in(record, "PractitionerRole/c-professional-7-role")
    role["organization"] = {"reference": "Organization/c-trust"}
    role["code"] = [{"text": role_text}]
    shared = _share(record).shared
    assert "Practitioner/c-professional-7" not in shared
    assert "PractitionerRole/c-professional-7-role" not in shared


@pytest.mark.parametrize(
    ("subject", "contained", "shares"),
    [
        (
            {
                "identifier": {
                    "system": "https://fhir.nhs.uk/Id/nhs-number",
                    "value": "9000000017",
                },
                "display": "Other Person",
            },
            None,
            False,
        ),  # fmt: skip
        (
            {"reference": "#p1"},
            [{"resourceType": "Patient", "id": "p1", "name": [{"family": "Other"}]}],
            False,
        ),  # fmt: skip
        ({"display": "Other Person"}, None, False),
        (None, None, True),  # C's own NHS number: her
    ],
)
def test_a_record_naming_another_patient_in_any_form_shares_nothing(
    subject: dict[str, Any] | None, contained: list[Any] | None, shares: bool
) -> None:
    record = copy.deepcopy(RECORD_C)
    need = _in(record, "Condition/c-need-mental-health")
    if subject is None:
        nhs = next(
            i
            for i in _in(record, "Patient/c-patient")["identifier"]
            if i["system"].endswith("nhs-number")  # fmt: skip
        )
        subject = {"identifier": {"system": nhs["system"], "value": nhs["value"]}}
    need["subject"] = subject
    if contained is not None:
        need["contained"] = contained
    if shares:
        assert _share(record).bundle is not None
    else:
        with pytest.raises(SharingError, match="not this record's patient"):
            _share(record)


SYSTEM_SCT = "http://snomed.info/sct"


@pytest.mark.parametrize(
    ("key", "change", "word"),
    [
        (
            "Condition/c-need-mental-health",
            {
                "code": {
                    "coding": [
                        {
                            "system": SYSTEM_SCT,
                            "code": "160734000",
                            "display": "Suicidal ideation and overdose",
                        }
                    ]
                }
            },
            "overdose",
        ),  # fmt: skip
        (
            "Condition/c-need-mental-health",
            {"asserter": {"display": "PC Smith, police custody"}},
            "custody",
        ),  # fmt: skip
        (
            "Condition/c-need-mental-health",
            {
                "_recordedDate": {
                    "extension": [
                        {"url": "https://local.example/why", "valueString": "after an overdose"}
                    ]
                }
            },
            "overdose",
        ),  # fmt: skip
        (
            "Condition/c-need-mental-health",
            {"note": [{"text": "Concerns about drug\u00a0use at weekends"}]},
            "weekends",
        ),  # fmt: skip
        (
            "Condition/c-need-mental-health",
            {"note": [{"text": "Opioid dependence; attends the needle exchange"}]},
            "needle",
        ),  # fmt: skip
        ("CarePlan/c-careplan", {"title": "CPA care plan: heroin detox"}, "heroin"),
    ],
)
def test_sensitive_words_are_found_wherever_a_need_or_a_plan_holds_them(
    key: str, change: dict[str, Any], word: str
) -> None:
    record = copy.deepcopy(RECORD_C)
    _in(record, key).update(change)
    assert word not in _sent(record)


def _with_attachments(*attachments: dict[str, Any]) -> dict[str, Any]:
    record = copy.deepcopy(RECORD_C)
    _in(record, "Patient/c-patient")["photo"] = list(attachments)
    return record


def _b64(text: str, charset: str = "utf-8") -> str:
    return base64.b64encode(text.encode(charset)).decode()


@pytest.mark.parametrize(
    "attachment",
    [
        {"contentType": "application/pdf", "data": _b64("%PDF-1.4 letter from probation")},
        {"contentType": "image/png", "data": _b64("\x89PNG scan")},
        {"contentType": "text/html", "data": _b64("<p>pro<b>bation</b></p>")},
        {"data": _b64("no media type given")},
        {"contentType": "text/plain; charset=x-unknown", "data": _b64("in a charset none knows")},
        {"contentType": "text/plain", "data": "not base64 at all!"},
        {
            "contentType": "text/plain; charset=utf-8",
            "data": base64.b64encode(b"\xff\xfe\xfa").decode(),
        },
    ],
    ids=["pdf", "png", "html", "no-type", "unknown-charset", "not-base64", "not-utf-8"],
)
def test_base64_content_the_engine_cannot_read_does_not_go(attachment: dict[str, Any]) -> None:
    """What no rule can read (a PDF, a picture, HTML, text in no known charset) takes the
    most restrictive category: the GP gets the Patient, without the data."""
    disclosure = _share(_with_attachments(attachment))
    patient = next(
        e["resource"]
        for e in disclosure.bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    rest = {k: v for k, v in attachment.items() if k != "data"}
    assert patient.get("photo") == ([rest] if rest else None)  # nothing left: no photo
    assert attachment["data"] not in json.dumps(disclosure.bundle)
    assert any(
        w.element == ".photo[0].data" and w.categories == {"personal"} for w in disclosure.withheld
    ), disclosure.withheld_summary()


@pytest.mark.parametrize(
    ("content_type", "charset"),
    [
        ("text/plain", "utf-8"),
        ('TEXT/plain; charset="ISO-8859-1"', "latin-1"),
        ("text/plain; charset=utf-16", "utf-16"),
    ],
)
def test_readable_text_in_base64_is_read_for_words(content_type: str, charset: str) -> None:
    """A text attachment is decoded in its charset and read as any element: what names
    a sensitive matter is held back, and the rest goes as it was written."""
    sensitive = {
        "contentType": content_type,
        "data": _b64("Letter to her probation officer, café", charset),
    }
    innocent = {
        "contentType": content_type,
        "data": _b64("Seen at the weekly review, café", charset),
    }
    disclosure = _share(_with_attachments(sensitive, innocent))
    patient = next(
        e["resource"]
        for e in disclosure.bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    assert patient["photo"] == [{"contentType": content_type}, innocent]
    assert any(
        w.element == ".photo[0].data" and "offending" in w.categories for w in disclosure.withheld
    )


def test_base64_in_extensions_and_a_word_split_across_lines_of_base64() -> None:
    """An extension's valueBase64Binary is unreadable (no media type says what it is);
    base64 written in lines, as MIME writes it, is read whole."""
    encoded = _b64("Discussed her heroin use at length")
    lines = "\n".join(encoded[i : i + 8] for i in range(0, len(encoded), 8))
    record = _with_attachments({"contentType": "text/plain", "data": lines})
    _in(record, "Patient/c-patient").setdefault("extension", []).append(
        {"url": "https://example.org/fhir/scan", "valueBase64Binary": _b64("heroin")}
    )
    sent = _sent(record)
    assert lines.lower() not in sent and _b64("heroin").lower() not in sent
    assert '"photo": [{"contenttype": "text/plain"}]' in sent


def test_the_policy_names_readable_media_types_as_type_and_subtype() -> None:
    data = tomllib.loads(default_policy_path().read_text())
    assert data["readable_media_types"] == ["text/plain"]
    for wrong in (["text/plain; charset=utf-8"], ["plain"], ["text/"], [1]):
        with pytest.raises(PolicyError, match="readable_media_types"):
            parse_policy({**data, "readable_media_types": wrong})
    # With none readable, even plain text is unreadable.
    policy = parse_policy({**data, "readable_media_types": []})
    record = _with_attachments(
        {"contentType": "text/plain", "data": _b64("Seen at the weekly review")}
    )
    ids = itertools.count()
    disclosure = share(
        record,
        ShareRequest("gp", "TREAT"),
        policy,
        at=AT,
        new_id=lambda: f"id-{next(ids)}",
        required=REQUIRED,
    )
    assert '"data"' not in json.dumps(disclosure.bundle)
