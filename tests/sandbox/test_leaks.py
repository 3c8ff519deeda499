"""Partner clients receive exactly what the consent engine allows, on every path:
read, vread, search, _include, _revinclude, history, _summary=count and totals,
search criteria on withheld values, batch — and each disclosure is audited."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cpa_fhir.config import load_policy
from cpa_fhir.conformance import default_package
from cpa_fhir.consent import (
    Recipient,
    RequiredElements,
    ShareRequest,
    disclosed_references,
    share,
)
from cpa_fhir.store import default_search_parameters
from cpa_fhir.validation import Validator
from tests.common import EXAMPLES
from tests.sandbox.conftest import Fhir, resource_keys
from tests.sandbox.test_consent_freshness import Changes, changes  # noqa: F401

RECORD_C = orjson.loads(next(EXAMPLES.glob("Bundle-record-C-*.json")).read_bytes())
C_KEYS = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in RECORD_C["entry"]}
TEAM_ROLE = "https://cpa-fhir.org/fhir/CodeSystem/cpa-care-team-role"

# client id -> (recipient as the consent engine sees it, purpose, exceptions)
PARTNERS = {
    "gp": (
        Recipient(
            "Organization/c-gp-practice",
            "gp-practice",
            frozenset({("https://fhir.nhs.uk/Id/ods-organization-code", "Y90303")}),
        ),
        "TREAT",
        (),
    ),
    "probation": (
        Recipient("Organization/c-probation", "probation"),
        "THREAT",
        ("public-protection",),
    ),
    "social-care": (Recipient("Organization/c-social-care", "social-care"), "COC", ()),
    "carer": (Recipient("RelatedPerson/c-carer-son", "carer"), "FAMRQT", ("carers-need-to-know",)),
}


def _shared_with(client_id: str, record: dict[str, Any]) -> Any:
    """The disclosure `cpa-fhir share` would make of a record to this partner now."""
    recipient, purpose, exceptions = PARTNERS[client_id]
    return share(
        record,
        ShareRequest(recipient, purpose, exceptions),
        load_policy(),
        at=datetime.now(UTC),
        new_id=lambda: "x",
        required=RequiredElements(default_package()),
    )


def _expected(client_id: str) -> set[str]:
    """What `cpa-fhir share` would send this partner from C's record (non-supporting types)."""
    d = _shared_with(client_id, RECORD_C)
    supporting = {"Practitioner", "PractitionerRole", "Organization", "Location"}
    return {k for k in d.shared if k.split("/")[0] not in supporting}


CLINICAL = [
    "Patient",
    "EpisodeOfCare",
    "CareTeam",
    "CarePlan",
    "Flag",
    "Condition",
    "Goal",
    "Encounter",
    "RelatedPerson",
    "Consent",
    "Task",
]


@pytest.fixture(scope="module", params=list(PARTNERS))
def partner(request: pytest.FixtureRequest, as_client: Any) -> tuple[str, Fhir]:
    return str(request.param), as_client(request.param)


def _search_all(
    client: Fhir, rtype: str, params: dict[str, str]
) -> tuple[set[str], int | None, int]:
    r = client.get(rtype, params={**params, "_count": "1000"})
    if r.status_code == 403:
        return set(), 0, 403
    assert r.status_code == 200, r.text
    body = r.json()
    return {k for k in resource_keys(body)}, body.get("total"), 200


def test_search_and_totals_show_exactly_what_consent_allows(partner: tuple[str, Fhir]) -> None:
    client_id, client = partner
    expected = _expected(client_id)
    seen: set[str] = set()
    reachable: set[str] = set()  # types the client's scopes let it search
    for rtype in CLINICAL:
        for param in ("patient", "subject", "for", "_id"):
            value = "c-patient" if param == "_id" else "Patient/c-patient"
            if rtype == "Patient" and param != "_id":
                continue
            r = client.get(rtype, params={param: value, "_count": "1000"})
            if r.status_code != 200:
                assert r.status_code in (400, 403), r.text  # no such parameter, or beyond scope
                continue
            reachable.add(rtype)
            body = r.json()
            keys = resource_keys(body)
            assert body["total"] == len(keys), f"{rtype}?{param}: total counts withheld resources"
            count = client.get(rtype, params={param: value, "_summary": "count"}).json()["total"]
            assert count == len(keys)
            seen |= keys
    assert seen & C_KEYS == {k for k in expected if k.split("/")[0] in reachable}


def test_read_and_vread_withheld_look_absent(partner: tuple[str, Fhir]) -> None:
    client_id, client = partner
    expected = _expected(client_id)
    for key in sorted(C_KEYS):
        if key.split("/")[0] not in CLINICAL:
            continue
        r = client.get(key)
        v = client.get(f"{key}/_history/1")
        if r.status_code == 403 and "scopes do not allow" in r.text:
            continue
        if key in expected:
            assert r.status_code == 200 and v.status_code == 200, key
            assert "REDACTED" in r.text or r.json()["id"] == key.split("/")[1]
        else:
            assert r.status_code in (403, 404), key
            assert v.status_code in (403, 404), key
            assert r.status_code != 200


def test_history_include_revinclude_and_batch_hide_withheld(partner: tuple[str, Fhir]) -> None:
    client_id, client = partner
    allowed = (
        _expected(client_id)
        | {
            "Practitioner/" + p
            for p in (
                "c-coordinator",
                "c-consultant",
                "c-previous-coordinator",
                "c-gp",
                "c-social-worker",
                "c-childrens-social-worker",
                "c-probation-officer",
            )
        }
        | {
            f"Organization/{o}"
            for o in (
                "c-trust",
                "c-gp-practice",
                "c-social-care",
                "c-probation",
                "c-childrens-services",
            )
        }
    )
    withheld = C_KEYS - allowed
    history = client.get("Flag/_history")
    if history.status_code == 200:
        assert not resource_keys(history.json()) & withheld
    for params in (
        {"_id": "c-patient", "_revinclude": "Flag:patient"},
        {"_id": "c-patient", "_revinclude": "CarePlan:subject"},
    ):
        r = client.get("Patient", params=params)
        if r.status_code == 200:
            assert not resource_keys(r.json()) & withheld, params
    r = client.get(
        "CarePlan", params={"subject": "Patient/c-patient", "_include": "CarePlan:supporting-info"}
    )
    if r.status_code == 200:
        assert not resource_keys(r.json()) & withheld
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": k}}
            for k in sorted(withheld)
            if k.split("/")[0] in CLINICAL
        ],
    }
    r = client.post("", batch)
    assert r.status_code == 200
    for entry in r.json()["entry"]:
        assert entry["response"]["status"] in ("403", "404")


def test_criteria_on_withheld_values_reveal_nothing(partner: tuple[str, Fhir]) -> None:
    """Searching by a withheld risk type, or by a performer removed from a shared plan,
    must not return the patient's resources."""
    client_id, client = partner
    expected = _expected(client_id)
    r = client.get(
        "Flag",
        params={"code": "https://cpa-fhir.org/fhir/CodeSystem/cpa-risk-type|risk-to-children"},
    )
    if r.status_code == 200:
        assert resource_keys(r.json()) <= expected
    r = client.get("CarePlan", params={"performer": "Organization/c-childrens-services"})
    if r.status_code == 200:
        assert not resource_keys(r.json()) & C_KEYS, "a plan found by a redacted performer"


def test_a_plan_found_only_by_what_was_removed_stays_hidden_however_often_searched(
    as_client: Any,
) -> None:
    """Whether a redacted plan still matches is kept while the store is unchanged: by
    the parameters searched, so that a search by what the GP sees finds it every
    time, and one by what was removed never does."""
    gp = as_client("gp")
    by_removed = {"performer": "Organization/c-childrens-services"}
    by_shown = {"subject": "Patient/c-patient"}
    for _ in range(3):
        found = gp.get("CarePlan", params=by_removed)
        assert found.status_code == 200
        assert "CarePlan/c-careplan" not in resource_keys(found.json())
        found = gp.get("CarePlan", params=by_shown)
        assert "CarePlan/c-careplan" in resource_keys(found.json())


def test_gp_sees_redacted_care_plan_and_every_disclosure_is_audited(
    as_client: Any, trust: Fhir
) -> None:
    gp = as_client("gp")
    before = trust.get("AuditEvent", params={"_summary": "count"}).json()["total"]
    plan = gp.get("CarePlan/c-careplan").json()
    assert (
        "description" not in plan
        and "children's services" not in orjson.dumps(plan).decode().lower()
    )
    assert any(c["code"] == "REDACTED" for c in plan["meta"]["security"])
    after = trust.get("AuditEvent", params={"_summary": "count"}).json()["total"]
    assert after == before + 1
    events = trust.get("AuditEvent", params={"_count": "1000"}).json()["entry"]
    latest = max((e["resource"] for e in events), key=lambda r: r["meta"]["lastUpdated"])
    # The version sent, by its versioned reference: the id alone would name later ones.
    sent = f"CarePlan/c-careplan/_history/{plan['meta']['versionId']}"
    assert {"reference": sent} in [e.get("what") for e in latest["entity"]]
    # The trust finds it among the service user's disclosures, though no Patient went.
    of_patient = trust.get(
        "AuditEvent", params={"patient": "Patient/c-patient", "_count": "1000"}
    ).json()
    assert latest["id"] in {e["resource"]["id"] for e in of_patient.get("entry", [])}
    # A partner never sees the audit trail.
    assert gp.get("AuditEvent").status_code in (200, 403)
    assert (
        resource_keys(gp.get("AuditEvent").json()) == set()
        if gp.get("AuditEvent").status_code == 200
        else True
    )


def _new_audit_events(trust: Fhir, before: set[str]) -> list[dict[str, Any]]:
    found = trust.get("AuditEvent", params={"_count": "1000"}).json()
    assert found["total"] <= 1000
    return [e["resource"] for e in found.get("entry", []) if e["resource"]["id"] not in before]


def _counted(event: dict[str, Any]) -> dict[str, int]:
    return {
        d["type"].removeprefix("counted-"): int(d["valueString"])
        for e in event["entity"]
        if e.get("description", "").startswith("Counted")
        for d in e["detail"]
    }


def test_what_an_answer_counts_but_does_not_send_is_audited(as_client: Any, trust: Fhir) -> None:
    """A total, or a next page, tells a partner that the matches it counts are there:
    that an NHS number is a service user's of this trust, say. Each patient whose
    matches are counted has an AuditEvent, naming what was sent and counting the rest."""
    gp = as_client("gp")
    patient = trust.get("Patient/c-patient").json()
    nhs = next(i for i in patient["identifier"] if i["system"].endswith("/nhs-number"))
    by_nhs = {"identifier": f"{nhs['system']}|{nhs['value']}"}
    validator = Validator(default_package())
    for asked in ({"_summary": "count"}, {"_count": "0"}, {"_offset": "5"}):
        before = {e["resource"]["id"] for e in trust.get("AuditEvent", params={"_count": "1000"}).json().get("entry", [])}  # fmt: skip
        answer = gp.get("Patient", params={**by_nhs, **asked})
        assert answer.status_code == 200 and answer.json()["total"] == 1
        (event,) = _new_audit_events(trust, before)
        assert disclosed_references(event) == []
        assert _counted(event) == {"Patient": 1}
        assert {"reference": "Patient/c-patient"} in [e.get("what") for e in event["entity"]]
        assert [i for i in validator.validate(event) if i.is_error] == []
    encounters = gp.get("Encounter", params={"subject": "Patient/c-patient"}).json()["total"]
    assert encounters > 1
    before = {e["resource"]["id"] for e in trust.get("AuditEvent", params={"_count": "1000"}).json().get("entry", [])}  # fmt: skip
    page = gp.get("Encounter", params={"subject": "Patient/c-patient", "_count": "1"}).json()
    (event,) = _new_audit_events(trust, before)
    assert disclosed_references(event) == sorted(resource_keys(page))
    assert _counted(event) == {"Encounter": encounters - 1}


def _patient_parameter(resource_type: str) -> str | None:
    params = default_search_parameters().for_type(resource_type)
    for name in ("patient", "subject", "beneficiary"):
        found = params.get(name)
        if found is not None and (not found.targets or "Patient" in found.targets):
            return name
    return None


def test_reverse_chains_find_the_patient_only_through_what_is_shared(
    partner: tuple[str, Fhir],
) -> None:
    """`Patient?_has:T:patient:_id=X` finds C's patient through X only if X is shared:
    a withheld resource's existence is not told by a reverse chain."""
    client_id, client = partner
    expected = _expected(client_id)
    probed = found = 0
    for key in sorted(C_KEYS):
        rtype, rid = key.split("/")
        if rtype not in CLINICAL or rtype == "Patient" or key == PARTNERS[client_id][0].reference:
            continue  # (a partner may always see itself)
        parameter = _patient_parameter(rtype)
        if parameter is None:
            continue
        r = client.get("Patient", params={f"_has:{rtype}:{parameter}:_id": rid})
        if r.status_code == 403:  # a type its scopes keep from it: not searched through
            assert f"search of {rtype}" in r.json()["issue"][0]["details"]["text"]
            continue
        assert r.status_code == 200, r.text
        hits = resource_keys(r.json())
        if key not in expected:
            probed += 1
            assert "Patient/c-patient" not in hits, f"{key} is withheld, yet the chain found it"
        elif "Patient/c-patient" in hits:
            found += 1
    assert probed > 0, "nothing withheld was probed"
    if "Patient/c-patient" in expected:
        assert found > 0, "no shared resource led back to the patient"


def test_forward_chain_by_nhs_number_finds_what_is_shared(partner: tuple[str, Fhir]) -> None:
    client_id, client = partner
    patient = next(
        e["resource"] for e in RECORD_C["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    nhs = next(i for i in patient["identifier"] if i["system"].endswith("/nhs-number"))
    by_chain = client.get(
        "CarePlan", params={"subject:Patient.identifier": f"{nhs['system']}|{nhs['value']}"}
    )
    direct = client.get("CarePlan", params={"subject": "Patient/c-patient"})
    assert by_chain.status_code == direct.status_code == 200, by_chain.text
    assert resource_keys(by_chain.json()) == resource_keys(direct.json())
    assert by_chain.json()["total"] == direct.json()["total"]
    assert resource_keys(by_chain.json()) <= _expected(client_id)


def test_the_trust_finds_withheld_resources_through_chains(trust: Fhir) -> None:
    r = trust.get("Patient", params={"_has:Condition:subject:_id": "c-need-child-care"})
    assert resource_keys(r.json()) == {"Patient/c-patient"}


CARER_SEARCHES = [
    ("Patient", "_id"),
    ("CarePlan", "subject"),
    ("EpisodeOfCare", "patient"),
    ("CareTeam", "patient"),
    ("Flag", "patient"),
    ("Encounter", "patient"),
]


# Clients that invoke a legal basis, with the recipient and purpose the engine sees.
INVOKING = {
    "carer": PARTNERS["carer"][:2],
    "probation": PARTNERS["probation"][:2],
    "children-services": (
        Recipient("Organization/c-childrens-services", "children-services"),
        "THREAT",
    ),
}


@pytest.mark.parametrize("client_id", sorted(INVOKING))
@pytest.mark.parametrize("patient", ["a-patient", "b-patient", "d-patient"])
def test_a_legal_basis_reaches_only_those_it_is_invoked_for(
    as_client: Any, trust: Fhir, client_id: str, patient: str
) -> None:
    """The carer cares for C, and C's care team records probation's and children's
    services' involvement: their legal bases reach C's record alone. Of A's, B's and
    D's they get what those patients' consent allows, which is nothing."""
    record = orjson.loads(
        next(EXAMPLES.glob(f"Bundle-record-{patient[0].upper()}-*.json")).read_bytes()
    )
    recipient, purpose = INVOKING[client_id]
    by_consent = share(
        record,
        ShareRequest(recipient, purpose),
        load_policy(),
        at=datetime.now(UTC),
        new_id=lambda: "x",
        required=RequiredElements(default_package()),
    )
    assert by_consent.bundle is None
    client: Fhir = as_client(client_id)
    found: set[str] = set()
    for rtype, param in CARER_SEARCHES:
        value = patient if param == "_id" else f"Patient/{patient}"
        found |= resource_keys(trust.get(rtype, params={param: value, "_count": "1000"}).json())
        seen = client.get(rtype, params={param: value, "_count": "1000"})
        assert seen.status_code == 200, seen.text
        assert seen.json()["total"] == 0 and not seen.json().get("entry"), (rtype, patient)
    assert f"Patient/{patient}" in found and any(k.startswith("CarePlan/") for k in found)
    for key in sorted(found):
        assert client.get(key).status_code == 404, key


def test_chains_and_has_reach_only_types_the_token_may_search(as_client: Any) -> None:
    """The carer's scopes leave out Task: a `_has` through Tasks would read their
    values a guess at a time, so it is refused as a search of Task is; a chain whose
    reference may point at several types goes only through those it may search."""
    carer: Fhir = as_client("carer")
    assert carer.get("Task/c-transfer-coordination").status_code == 403
    for status in ("completed", "cancelled"):
        r = carer.get("Patient", params={"_has:Task:patient:status": status})
        assert r.status_code == 403, r.text
        assert "Task" in r.json()["issue"][0]["details"]["text"]
    r = carer.get("CarePlan", params={"subject:Group._id": "anything"})
    assert r.status_code == 403, r.text
    # CarePlan.subject may be a Group, which the carer may not search: the chain
    # goes through Patients alone, and finds what it did before.
    chained = carer.get("CarePlan", params={"subject.name": "Fictional"})
    direct = carer.get("CarePlan", params={"subject": "Patient/c-patient"})
    assert chained.status_code == direct.status_code == 200
    assert resource_keys(chained.json()) == resource_keys(direct.json()) != set()


def test_what_a_searchs_chained_criteria_hold_through_is_audited(
    as_client: Any, trust: Fhir
) -> None:
    """`Patient?_has:Condition:subject:recorded-date=D` tells the GP that a Condition of
    the patient's was recorded on D: that Condition is named in the AuditEvent, as
    consulted, not sent."""
    gp = as_client("gp")
    needs = gp.get("Condition", params={"subject": "Patient/c-patient"}).json()["entry"]
    need = needs[0]["resource"]
    day = need["recordedDate"][:10]
    before = {e["resource"]["id"] for e in trust.get("AuditEvent", params={"_count": "1000"}).json().get("entry", [])}  # fmt: skip
    found = gp.get("Patient", params={"_has:Condition:subject:recorded-date": day})
    assert resource_keys(found.json()) == {"Patient/c-patient"}
    (event,) = _new_audit_events(trust, before)
    assert disclosed_references(event) == ["Patient/c-patient"]
    consulted = {
        e["what"]["reference"].split("/_history/")[0]
        for e in event["entity"]
        if e.get("description", "").startswith("Found")
    }
    assert f"Condition/{need['id']}" in consulted
    assert all(k.startswith("Condition/") for k in consulted)
    assert [i for i in Validator(default_package()).validate(event) if i.is_error] == []


def test_what_a_nested_has_passes_through_is_audited_as_consulted(
    as_client: Any, trust: Fhir
) -> None:
    gp = as_client("gp")
    before = {e["resource"]["id"] for e in trust.get("AuditEvent", params={"_count": "1000"}).json().get("entry", [])}  # fmt: skip
    found = gp.get("Patient", params={"_has:Goal:subject:_has:CarePlan:goal:status": "active"})
    assert resource_keys(found.json()) == {"Patient/c-patient"}
    (event,) = _new_audit_events(trust, before)
    consulted = {
        e["what"]["reference"]
        for e in event["entity"]
        if e.get("description", "").startswith("Found")
    }
    assert any(k.startswith("Goal/") for k in consulted), consulted
    assert any(k.startswith("CarePlan/") for k in consulted), consulted


def test_the_audit_names_the_version_that_was_sent(as_client: Any, trust: Fhir) -> None:
    """A read of one version, then of the next: each AuditEvent names the version it
    disclosed (`Type/id/_history/n`), so the trail never points at content that did
    not go."""
    gp = as_client("gp")
    key = "Condition/c-need-accommodation"
    before = {e["resource"]["id"] for e in trust.get("AuditEvent", params={"_count": "1000"}).json().get("entry", [])}  # fmt: skip
    first = gp.get(key).json()
    stored = trust.get(key).json()
    changed = {**stored, "note": [*stored.get("note", []), {"text": "Reviewed at the CPA review"}]}
    assert trust.put(key, changed).status_code == 200
    try:
        second = gp.get(key).json()
        assert int(second["meta"]["versionId"]) == int(first["meta"]["versionId"]) + 1
        events = _new_audit_events(trust, before)
        named = [
            e["what"]["reference"]
            for event in sorted(events, key=lambda ev: ev["recorded"])
            for e in event["entity"]
            if e.get("what", {}).get("reference", "").startswith(key)
        ]
        assert named == [f"{key}/_history/{r['meta']['versionId']}" for r in (first, second)]
        assert (
            trust.get("AuditEvent", params={"entity": key, "_summary": "count"}).json()["total"]
            >= 2
        )
    finally:
        assert trust.put(key, stored).status_code == 200


def test_a_professional_goes_as_the_roles_they_hold_allow(as_client: Any) -> None:
    """The children's social worker's role is with children's services: the GP gets the
    reviews they attended without them, and no include or read brings them, as
    `cpa-fhir share` sends C's record; the care coordinator comes."""
    gp = as_client("gp")
    worker = "Practitioner/c-childrens-social-worker"
    bundle = gp.get(
        "Encounter",
        params={"_id": "c-review-2026-09", "_include": "Encounter:practitioner"},
    ).json()
    keys = resource_keys(bundle)
    assert "Encounter/c-review-2026-09" in keys and "Practitioner/c-coordinator" in keys
    assert worker not in keys and worker not in orjson.dumps(bundle).decode()
    assert gp.get(worker).status_code == 404
    shared = share(
        RECORD_C,
        ShareRequest("gp", "TREAT"),
        load_policy(),
        at=datetime.now(UTC),
        new_id=lambda: "x",
        required=RequiredElements(default_package()),
    ).shared
    assert worker not in shared and "Practitioner/c-coordinator" in shared


def test_a_chain_through_a_professional_the_partner_is_shown_finds_what_a_reference_does(
    as_client: Any,
) -> None:
    """Encounter?practitioner:Practitioner._id=X finds for the GP what
    Encounter?practitioner=Practitioner/X does when X goes to the GP (the coordinator),
    and nothing through one withheld from it (the children's social worker)."""
    gp = as_client("gp")
    for name, shown in (("c-coordinator", True), ("c-childrens-social-worker", False)):
        direct = gp.get("Encounter", params={"practitioner": f"Practitioner/{name}"}).json()
        chained = gp.get("Encounter", params={"practitioner:Practitioner._id": name}).json()
        assert resource_keys(chained) == (resource_keys(direct) if shown else set())
        assert (chained["total"] > 0) == shown


def test_a_professional_or_organisation_a_chain_holds_through_is_audited_as_consulted(
    as_client: Any, trust: Fhir
) -> None:
    """`EpisodeOfCare?organization:Organization.name=Example` tells the GP that the
    episode's organisation is named so: the organisation is named in the AuditEvent,
    as consulted, as a Condition a `_has` holds through is."""
    gp = as_client("gp")
    before = {e["resource"]["id"] for e in trust.get("AuditEvent", params={"_count": "1000"}).json().get("entry", [])}  # fmt: skip
    found = gp.get("EpisodeOfCare", params={"organization:Organization.name": "Example"})
    assert resource_keys(found.json()) == {"EpisodeOfCare/c-episode"}
    (event,) = _new_audit_events(trust, before)
    consulted = {
        e["what"]["reference"].split("/_history/")[0]
        for e in event["entity"]
        if e.get("description", "").startswith("Found")
    }
    assert consulted == {"Organization/c-trust"}
    assert disclosed_references(event) == ["EpisodeOfCare/c-episode"]
    assert [i for i in Validator(default_package()).validate(event) if i.is_error] == []


def test_a_reference_to_what_share_drops_for_a_required_element_goes_as_share_sends_it(
    as_client: Any,
    trust: Fhir,
    changes: Changes,  # noqa: F811
) -> None:
    """An encounter whose class names probation loses it for the GP, and with it an
    element it needs: `share` drops the encounter, and masks a need's reference to
    it. Read alone, the need was labelled with the encounter as a whole, and named
    it to the GP, who can read no such encounter."""
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
            "display": "probation supervision",
        },
        "subject": {"reference": "Patient/c-patient"},
    }
    hidden = changes.create(encounter)
    need = next(
        copy.deepcopy(e["resource"])
        for e in RECORD_C["entry"]
        if e["resource"]["id"] == "c-need-accommodation"
    )
    need.pop("id")
    need["encounter"] = {"reference": hidden}
    key = changes.create(need)
    record = copy.deepcopy(RECORD_C)
    for found in (key, hidden):
        resource = trust.get(found).json()
        resource.pop("meta")
        record["entry"].append(
            {"fullUrl": f"https://example.org/fhir/{found}", "resource": resource}
        )
    sent = _shared_with("gp", record)
    assert hidden not in sent.shared and key in sent.shared
    (expected,) = (
        e["resource"] for e in sent.bundle["entry"] if key.endswith(f"/{e['resource']['id']}")
    )
    gp = as_client("gp")
    assert gp.get(hidden).status_code == 404
    read = gp.get(key).json()
    assert read["encounter"] == expected["encounter"]
    found = gp.get("Condition", params={"_id": key.split("/")[1]}).json()
    assert [e["resource"]["encounter"] for e in found["entry"]] == [expected["encounter"]]


def test_a_reference_by_identifier_alone_names_what_the_store_holds_with_it(
    as_client: Any,
    trust: Fhir,
    changes: Changes,  # noqa: F811
) -> None:
    """A review whose service provider is a probation unit nothing else in the record
    refers to, named by its ODS code alone: `share` reads the reference as naming that
    organisation and holds it back from the GP. The server must find the organisation
    by that identifier, or it would send the GP the probation unit's code."""
    ods = {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "ZZPRB02"}
    unit = {
        "resourceType": "Organization",
        "active": True,
        "identifier": [ods],
        "type": [
            {
                "coding": [
                    {
                        "system": "https://cpa-fhir.org/fhir/CodeSystem/partner-agency-type",
                        "code": "probation",
                    }
                ]
            }
        ],
        "name": "Example Delivery Unit North",
    }
    changes.create(unit)
    changes.edit(
        "Encounter/c-review-2026-09",
        lambda review: review.update(serviceProvider={"identifier": ods}),
    )
    gp = as_client("gp")
    for answer in (
        gp.get("Encounter/c-review-2026-09"),
        gp.get("Encounter", params={"_id": "c-review-2026-09"}),
    ):
        assert answer.status_code == 200, answer.text
        assert "ZZPRB02" not in answer.text
        assert "c-review-2026-09" in answer.text
    # The trust's own client reads it as stored.
    assert trust.get("Encounter/c-review-2026-09").json()["serviceProvider"] == {"identifier": ods}


@pytest.mark.parametrize(
    ("role", "withheld"),
    [
        ({"coding": [{"system": TEAM_ROLE, "code": "probation-officer"}]}, True),
        ({"text": "Probation officer"}, True),
        ({"text": "Support worker"}, False),
    ],
    ids=["coded", "in-words", "neutral"],
)
def test_a_professional_a_care_team_names_as_probation_officer_is_not_sent_to_the_gp(
    as_client: Any,
    changes: Changes,  # noqa: F811
    role: dict[str, Any],
    withheld: bool,
) -> None:
    """An officer holding no PractitionerRole, named only in C's care team in a probation
    officer's place, is an offender's probation officer: the GP gets the review they
    attended without them, and no read, search or include brings them, as `cpa-fhir
    share` sends the record. In a place that says nothing, they go."""
    gp = as_client("gp")
    officer = changes.create(
        {"resourceType": "Practitioner", "active": True, "name": [{"family": "Fictional-Rees"}]}
    )
    changes.edit(
        "CareTeam/c-careteam",
        lambda team: team["participant"].append({"role": [role], "member": {"reference": officer}}),
    )
    review = "Encounter/c-review-2026-09"
    changes.edit(review, lambda e: e["participant"].append({"individual": {"reference": officer}}))
    included = gp.get(
        "Encounter", params={"_id": review.split("/")[1], "_include": "Encounter:practitioner"}
    )
    assert included.status_code == 200
    assert review in resource_keys(included.json())
    assert (officer in resource_keys(included.json())) == (not withheld)
    read = gp.get(review)
    assert read.status_code == 200
    searched = gp.get("Encounter", params={"subject": "Patient/c-patient", "_count": "1000"})
    assert review in resource_keys(searched.json())
    for answer in (included, read, searched):
        assert (officer in answer.text) == (not withheld)
    if withheld:
        assert gp.get(officer).status_code == 404
        found = gp.get("Practitioner", params={"_id": officer.split("/")[1]})
        assert officer not in resource_keys(found.json())
