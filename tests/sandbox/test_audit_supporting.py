"""Professionals and organisations a partner is sent (reached by `_include` from what
it is shown) are named in the AuditEvent of the patient whose record they were
reached from, as `cpa-fhir share` names them in its own."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from cpa_fhir.consent import disclosed_references
from cpa_fhir.sandbox import Sandbox
from tests.sandbox.test_existence import _caller

SUPPORTING = ("Practitioner", "PractitionerRole", "Organization", "Location")


def _recorded(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The AuditEvents the router records from now on."""
    events: list[dict[str, Any]] = []
    record = sandbox.router.audit_log.record

    def keep(batch: Any) -> Any:
        events.extend(batch)
        return record(batch)

    monkeypatch.setattr(sandbox.router.audit_log, "record", keep)
    return events


@pytest.mark.parametrize("client_id", ["gp", "social-care", "probation", "carer"])
def test_included_professionals_and_organisations_are_named_in_the_audit(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, client_id: str
) -> None:
    partner = _caller(sandbox, client_id)
    for _ in range(2):  # and again, when the AuditEvent is made from what was kept
        events = _recorded(sandbox, monkeypatch)
        found = partner(
            "GET",
            "EpisodeOfCare",
            query=[
                ("patient", "Patient/c-patient"),
                ("_include", "EpisodeOfCare:care-manager"),
                ("_include", "EpisodeOfCare:organization"),
            ],
        )
        assert found.status == 200, found.body
        sent = {
            f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in orjson.loads(found.body)["entry"]
        }
        professionals = {k for k in sent if k.split("/")[0] in SUPPORTING}
        assert professionals, sent
        audited = {k for e in events for k in disclosed_references(e)}
        assert sent <= audited, f"sent but never audited: {sent - audited}"
        assert len(events) == 1  # one patient's information: one AuditEvent


CATEGORY = "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category"
IRCP = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}
    ]  # fmt: skip
}


def _edit(sandbox: Sandbox, key: str, change: Any) -> Any:
    """Change a stored resource as the trust would; the function undoes it."""
    trust = _caller(sandbox, "trust")
    original = sandbox.repo.read(*key.split("/")).resource()
    meta = {k: v for k, v in original["meta"].items() if k not in ("versionId", "lastUpdated")}
    original = {**original, "meta": meta}  # its profiles kept: rules label by them
    changed = copy.deepcopy(original)
    change(changed)
    assert trust("PUT", key, changed).status in (200, 201)

    def undo() -> None:
        assert trust("PUT", key, original).status == 200

    return undo


def test_a_professional_sent_by_an_include_goes_labelled_without_narrative_or_tags(
    sandbox: Sandbox,
) -> None:
    def narrate(person: dict[str, Any]) -> None:
        person["text"] = {
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">Key worker since her overdose; MAPPA level 2 case</div>',  # fmt: skip
        }
        person["meta"] = {"tag": [{"system": "urn:example:trust-tags", "code": "mappa-case"}]}

    undo = _edit(sandbox, "Practitioner/c-coordinator", narrate)
    try:
        found = _caller(sandbox, "gp")(
            "GET", "CarePlan", query=[("_id", "c-careplan"), ("_include", "CarePlan:performer")]
        )
        entries = orjson.loads(found.body)["entry"]
        coordinator = next(e["resource"] for e in entries if e["resource"]["id"] == "c-coordinator")
        assert "overdose" not in orjson.dumps(coordinator).decode()
        assert "tag" not in coordinator["meta"] and "text" not in coordinator
        assert any(c["system"] == CATEGORY for c in coordinator["meta"]["security"])
    finally:
        undo()


def test_an_included_organisation_is_judged_by_the_records_it_was_reached_from(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probation (offending) is reached from C's record through the social care
    organisation it is part of. D lets the GP have offending, C does not: a search that
    also looks at D's plans, sending none of them, must not send it on D's consent; nor
    the social care organisation, which goes whole or not at all, and names it."""

    def part_of_probation(org: dict[str, Any]) -> None:
        org["partOf"] = {"reference": "Organization/c-probation"}

    def offending_to_gp(consent: dict[str, Any]) -> None:
        consent["provision"]["provision"].append(
            {
                "type": "permit",
                "actor": [{"role": IRCP, "reference": {"reference": "Organization/c-gp-practice"}}],
                "securityLabel": [{"system": CATEGORY, "code": "offending"}],
                "purpose": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": "TREAT",
                    }
                ],  # fmt: skip
            }
        )

    undo = [
        _edit(sandbox, "Organization/c-social-care", part_of_probation),
        _edit(sandbox, "Consent/d-consent", offending_to_gp),
    ]
    try:
        gp = _caller(sandbox, "gp")
        includes = [("_include", "CarePlan:performer"), ("_include:iterate", "Organization:partof")]
        for query in ([("subject", "Patient/c-patient"), *includes], includes):
            events = _recorded(sandbox, monkeypatch)
            found = orjson.loads(gp("GET", "CarePlan", query=query).body)
            sent = {
                f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in found["entry"]
            }
            assert "Organization/c-social-care" not in sent
            assert "Organization/c-probation" not in sent, query
            assert b"c-probation" not in gp("GET", "CarePlan", query=query).body
            assert not any(
                e["resourceType"] == "AuditEvent"
                and "Organization/c-probation" in disclosed_references(e)
                for e in events
            )
    finally:
        for step in reversed(undo):
            step()


def test_professionals_are_audited_only_under_the_records_they_were_reached_from(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _recorded(sandbox, monkeypatch)
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "CarePlan/a-careplan"}},
            {
                "request": {
                    "method": "GET",
                    "url": "CarePlan?_id=c-careplan&_include=CarePlan:performer",
                }
            },  # fmt: skip
        ],
    }
    answer = _caller(sandbox, "gp")("POST", "", batch)
    statuses = [e["response"]["status"] for e in orjson.loads(answer.body)["entry"]]
    assert statuses == ["404", "200"]
    patients = {
        e["what"]["reference"].split("/_history/")[0]
        for event in events
        for e in event["entity"]
        if e.get("what", {}).get("reference", "").startswith("Patient/")
    }
    assert patients == {"Patient/c-patient"}


def test_a_role_sent_by_an_include_is_labelled_with_the_organisation_it_is_held_with(
    sandbox: Sandbox,
) -> None:
    """A PractitionerRole takes its organisation's categories: judged alone it could not
    see them and went as the most restrictive, to no partner."""

    def by_role(plan: dict[str, Any]) -> None:
        plan["activity"][1]["detail"]["performer"] = [
            {"reference": "PractitionerRole/c-consultant-role"}
        ]

    undo = _edit(sandbox, "CarePlan/c-careplan", by_role)
    try:
        found = _caller(sandbox, "gp")(
            "GET", "CarePlan", query=[("_id", "c-careplan"), ("_include", "CarePlan:performer")]
        )
        sent = {
            f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in orjson.loads(found.body)["entry"]
        }
        assert "PractitionerRole/c-consultant-role" in sent
    finally:
        undo()
