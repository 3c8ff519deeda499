"""The REST API on SQLite and PostgreSQL: CRUD, versions, conditional create, search,
paging, validation on write, transactions, and an OperationOutcome for every client error."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import orjson
import pytest

from tests.common import EXAMPLES
from tests.sandbox.conftest import Fhir, outcome, resource_keys

RECORD_A = orjson.loads(next(EXAMPLES.glob("Bundle-record-A-*.json")).read_bytes())


def _flag(**changes: Any) -> dict[str, Any]:
    flag = copy.deepcopy(
        next(e["resource"] for e in RECORD_A["entry"] if e["resource"]["resourceType"] == "Flag")
    )
    flag.pop("id", None)
    flag.update(changes)
    return flag


def test_metadata_is_generated_from_what_runs(trust: Fhir) -> None:
    cs = trust.get("metadata").json()
    assert cs["fhirVersion"] == "4.0.1"
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert (
        "https://cpa-fhir.org/fhir/StructureDefinition/cpa-care-plan"
        in by_type["CarePlan"]["supportedProfile"]
    )
    assert {"name": "cpa-level", "type": "token"} in by_type["EpisodeOfCare"]["searchParam"]
    assert {"code": "vread"} in by_type["Patient"]["interaction"]


def test_create_read_vread_update_delete(trust: Fhir) -> None:
    created = trust.post("Flag", _flag())
    assert created.status_code == 201, created.text
    flag = created.json()
    fid = flag["id"]
    assert created.headers["etag"] == 'W/"1"'
    assert created.headers["location"].endswith(f"/Flag/{fid}/_history/1")
    assert trust.get(f"Flag/{fid}").json() == flag
    flag["status"] = "inactive"
    updated = trust.put(f"Flag/{fid}", flag, headers={"if-match": 'W/"1"'})
    assert updated.status_code == 200 and updated.headers["etag"] == 'W/"2"'
    stale = trust.put(f"Flag/{fid}", flag, headers={"if-match": 'W/"1"'})
    outcome(stale, 412)
    assert trust.get(f"Flag/{fid}/_history/1").json()["status"] == "active"
    history = trust.get(f"Flag/{fid}/_history").json()
    assert history["type"] == "history" and history["total"] == 2
    assert trust.delete(f"Flag/{fid}").status_code == 204
    outcome(trust.get(f"Flag/{fid}"), 410)
    assert trust.get(f"Flag/{fid}/_history/2").status_code == 200


def test_conditional_create(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    flag = _flag(identifier=[{"system": "urn:test", "value": marker}])
    first = trust.post("Flag", flag, headers={"if-none-exist": f"identifier=urn:test|{marker}"})
    again = trust.post("Flag", flag, headers={"if-none-exist": f"identifier=urn:test|{marker}"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]


def test_invalid_resource_is_refused_with_the_validators_outcome(trust: Fhir) -> None:
    bad = _flag()
    del bad["code"]
    refused = outcome(trust.post("Flag", bad), 422)
    assert any("Flag.code" in (i.get("expression") or [""])[0] for i in refused["issue"])
    assert trust.post("Flag/$validate", bad).json()["issue"][0]["severity"] == "error"


def test_search_by_nhs_number_and_patient(trust: Fhir) -> None:
    patient = trust.get("Patient/c-patient").json()
    nhs = next(
        i["value"]
        for i in patient["identifier"]
        if i["system"] == "https://fhir.nhs.uk/Id/nhs-number"
    )
    found = trust.get(
        "Patient", params={"identifier": f"https://fhir.nhs.uk/Id/nhs-number|{nhs}"}
    ).json()
    assert resource_keys(found) == {"Patient/c-patient"}
    plans = trust.get(
        "CarePlan", params={"subject": "Patient/c-patient", "status": "active"}
    ).json()
    assert resource_keys(plans) == {
        "CarePlan/c-careplan",
        "CarePlan/c-crisis-plan",
        "CarePlan/c-contingency-plan",
    }
    enhanced = trust.get(
        "EpisodeOfCare", params={"cpa-level": "http://snomed.info/sct|1092221000000101"}
    ).json()
    assert {"EpisodeOfCare/c-episode", "EpisodeOfCare/d-episode"} <= resource_keys(enhanced)


def test_a_reference_searched_by_its_absolute_url_here_finds_relative_ones(trust: Fhir) -> None:
    """R4 search.html#reference: "A relative reference resolving to the same value as a
    specified absolute URL, or vice versa, qualifies as a match": with the server base
    http://testserver/fhir, `subject=http://testserver/fhir/Patient/c-patient` finds the
    Flags whose subject is written `Patient/c-patient`, as `subject=Patient/c-patient`
    does, at the end of a chain too. Another server's URL is not this one's resource."""
    here = "http://testserver/fhir"
    relative = resource_keys(trust.get("Flag", params={"subject": "Patient/c-patient"}).json())
    assert relative
    for value in (f"{here}/Patient/c-patient", f"{here}/Patient/c-patient/_history/1"):
        found = trust.get("Flag", params={"subject": value})
        assert found.status_code == 200, found.text
        assert resource_keys(found.json()) == relative
    chained = trust.get(
        "Flag",
        params={"subject:Patient.general-practitioner": f"{here}/Organization/c-gp-practice"},
    ).json()
    assert resource_keys(chained) == relative
    elsewhere = trust.get(
        "Flag", params={"subject": "http://elsewhere.example/fhir/Patient/c-patient"}
    )
    assert resource_keys(elsewhere.json()) == set()


def test_conditional_writes_read_an_absolute_url_here_as_a_search_does(trust: Fhir) -> None:
    """The criteria of a conditional create, update and delete, alone or in a
    transaction, match as the same search does (R4 http.html#ccreate: "as if a search
    was performed"): a subject named by this server's absolute URL finds the Flag
    whose subject is written `Patient/c-patient`, so no duplicate is made."""
    here = "http://testserver/fhir"
    marker = f"abs-{uuid.uuid4().hex[:10]}"
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "code": {"text": "absolute criteria"},
        "subject": {"reference": "Patient/c-patient"},
        "identifier": [{"system": "urn:test:abs", "value": marker}],
    }
    made = trust.post("Flag", flag)
    assert made.status_code == 201, made.text
    fid = made.json()["id"]
    criteria = f"identifier=urn:test:abs|{marker}&subject={here}/Patient/c-patient"
    again = trust.post("Flag", flag, headers={"if-none-exist": criteria})
    assert again.status_code == 200 and again.json()["id"] == fid, again.text
    in_bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": flag,
                "request": {"method": "POST", "url": "Flag", "ifNoneExist": criteria},
            },
            {
                "resource": {**flag, "status": "inactive"},
                "request": {"method": "PUT", "url": f"Flag?{criteria}"},
            },
        ],
    }
    answer = trust.post("", in_bundle)
    assert answer.status_code == 200, answer.text
    locations = [e["response"].get("location", "") for e in answer.json()["entry"]]
    assert all(f"Flag/{fid}/" in loc for loc in locations), locations
    updated = trust.http.put(
        f"/fhir/Flag?{criteria}", json={**flag, "status": "active"}, headers=trust.headers
    )
    assert updated.status_code == 200 and updated.json()["id"] == fid, updated.text
    found = trust.get("Flag", params={"identifier": f"urn:test:abs|{marker}"}).json()
    assert resource_keys(found) == {f"Flag/{fid}"}
    gone = trust.http.delete(f"/fhir/Flag?{criteria}", headers=trust.headers)
    assert gone.status_code == 204, gone.text
    assert trust.get(f"Flag/{fid}").status_code == 410


def test_paging_links_and_count(trust: Fhir) -> None:
    first = trust.get("Encounter", params={"_count": "5", "_sort": "date"}).json()
    total = first["total"]
    assert total > 10 and len(first["entry"]) == 5
    seen = resource_keys(first)
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = trust.get(nxt.split("/fhir/", 1)[1]).json()
    assert not seen & resource_keys(second)
    count = trust.get("Encounter", params={"_summary": "count"}).json()
    assert count["total"] == total and "entry" not in count


def test_include_and_revinclude(trust: Fhir) -> None:
    bundle = trust.get(
        "CarePlan", params={"_id": "c-careplan", "_include": "CarePlan:subject"}
    ).json()
    assert "Patient/c-patient" in resource_keys(bundle)
    rev = trust.get("Patient", params={"_id": "c-patient", "_revinclude": "Flag:patient"}).json()
    assert "Flag/c-risk-harm-to-others" in resource_keys(rev)


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"nonsense": "1"}, 400),
        ({"birthdate": "gt-yesterday"}, 400),
        ({"_count": "-1"}, 400),
        ({"name:fuzzy": "x"}, 400),
    ],
)
def test_bad_search_parameters_are_outcomes(
    trust: Fhir, params: dict[str, str], status: int
) -> None:
    outcome(trust.get("Patient", params=params), status)


def test_client_errors_are_outcomes(trust: Fhir, as_client: Any) -> None:
    outcome(as_client(None).get("Patient/c-patient"), 401)
    bad_token = Fhir(trust.http, "not-a-token")
    outcome(bad_token.get("Patient/c-patient"), 401)
    outcome(as_client("gp").post("Flag", _flag()), 403)
    outcome(trust.get("Patient/no-such-patient"), 404)
    outcome(trust.get("NotAType/1"), 404)
    outcome(trust.http.patch("/fhir/Patient", headers=trust.headers), 405)
    outcome(trust.post("Flag", b"<Flag/>", headers={"content-type": "application/fhir+xml"}), 415)
    outcome(trust.post("Flag", b"{not json"), 400)
    outcome(trust.get("Patient/c-patient", params={"_format": "xml"}), 406)
    outcome(trust.post("Flag", b"{" + b" " * (6 * 1024 * 1024) + b"}"), 413)
    many = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "Patient/c-patient"}}] * 501}  # fmt: skip
    assert outcome(trust.post("", many), 413)["issue"][0]["code"] == "too-costly"
    flag = trust.get("Flag/a-risk-self-harm").json()
    outcome(trust.put("Flag/a-risk-self-harm", flag, headers={"if-match": "yesterday"}), 400)
    outcome(trust.put("Flag/other-id", flag), 400)


def test_transaction_resolves_references_and_is_all_or_nothing(trust: Fhir) -> None:
    patient = copy.deepcopy(
        next(e["resource"] for e in RECORD_A["entry"] if e["resource"]["resourceType"] == "Patient")
    )
    patient.pop("id")
    patient["identifier"][0]["value"] = "9434765919"
    patient.pop("generalPractitioner", None)
    flag = _flag(subject={"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"})
    flag.pop("author", None)
    tx = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
                "resource": patient,
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
                "resource": flag,
                "request": {"method": "POST", "url": "Flag"},
            },
        ],
    }
    result = trust.post("", tx)
    assert result.status_code == 200, result.text
    entries = result.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201", "201"]
    new_patient = entries[0]["resource"]["id"]
    assert entries[1]["resource"]["subject"]["reference"] == f"Patient/{new_patient}"
    # A failing entry leaves nothing behind.
    before = trust.get("Flag", params={"_summary": "count"}).json()["total"]
    broken = copy.deepcopy(tx)
    broken["entry"][1]["resource"].pop("code")
    outcome(trust.post("", broken), 422)
    stale = copy.deepcopy(tx)
    existing = trust.get("Flag/a-risk-self-harm").json()
    stale["entry"].append(
        {
            "resource": existing,
            "request": {"method": "PUT", "url": "Flag/a-risk-self-harm", "ifMatch": 'W/"99"'},
        }
    )
    assert trust.post("", stale).status_code in (409, 412)
    assert trust.get("Flag", params={"_summary": "count"}).json()["total"] == before


def test_transaction_resolves_every_link_to_an_entry(trust: Fhir) -> None:
    # R4 http.html#trules: all matching links, references or not (an element of type
    # uri, an extension's value, a narrative's <a href="">), not only `reference`s.
    first = f"urn:uuid:{uuid.uuid4()}"
    linking = _flag(
        text={
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{first}">the other</a>'
            f"<a href='{first}'>again</a> {first} in the words stays</div>",
        },
    )
    # An identifier may be the urn:uuid its entry's fullUrl is: it names the
    # resource, not where it is stored, and stays.
    linking["identifier"] = [{"system": "urn:ietf:rfc:3986", "value": first}]
    linking["extension"] += [
        {"url": "https://example.org/fhir/related-flag", "valueUri": first},
        {
            "url": "https://example.org/fhir/related",
            "extension": [{"url": "flag", "valueReference": {"reference": first}}],
        },
    ]
    tx = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": first, "resource": _flag(), "request": {"method": "POST", "url": "Flag"}},
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": linking,
                "request": {"method": "POST", "url": "Flag"},
            },
        ],
    }
    result = trust.post("", tx)
    assert result.status_code == 200, result.text
    entries = result.json()["entry"]
    made = f"Flag/{entries[0]['resource']['id']}"
    stored = trust.get(f"Flag/{entries[1]['resource']['id']}").json()
    assert stored["extension"][-2]["valueUri"] == made
    assert stored["extension"][-1]["extension"][0]["valueReference"]["reference"] == made
    div = stored["text"]["div"]
    assert f'href="{made}"' in div and f"href='{made}'" in div
    assert f"{first} in the words stays" in div
    assert stored["identifier"][0]["value"] == first


def test_batch_reports_each_entry(trust: Fhir) -> None:
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/a-patient"}},
            {"request": {"method": "GET", "url": "Patient/none"}},
        ],
    }
    entries = trust.post("", batch).json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["200", "404"]
    assert entries[1]["response"]["outcome"]["resourceType"] == "OperationOutcome"


def test_a_batch_whose_entries_depend_on_each_other_is_refused(trust: Fhir) -> None:
    """R4 http.html#transaction: "For a batch, there SHALL be no interdependencies between
    the different entries in the Bundle that cause change on the server ... Servers SHALL
    validate that this is the case." A batch entry referring to another's `urn:uuid:`
    fullUrl is one: refused (400) before anything is written, not stored as a reference
    that can never be followed. The same entries as a transaction are resolved."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    patient = {"resourceType": "Patient", "gender": "unknown"}
    flag = _flag(subject={"reference": patient_url})
    entries = [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": flag,
         "request": {"method": "POST", "url": "Flag"}},
        {"fullUrl": patient_url, "resource": patient,
         "request": {"method": "POST", "url": "Patient"}},
    ]  # fmt: skip
    before = trust.get("Flag", params={"_summary": "count"}).json()["total"]
    said = outcome(
        trust.post("", {"resourceType": "Bundle", "type": "batch", "entry": entries}), 400
    )
    assert said["issue"][0]["expression"] == ["Bundle.entry[0]"]
    assert patient_url in said["issue"][0]["details"]["text"]
    assert trust.get("Flag", params={"_summary": "count"}).json()["total"] == before
    done = trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert done.status_code == 200, done.text
    made = done.json()["entry"]
    assert made[0]["resource"]["subject"]["reference"] == f"Patient/{made[1]['resource']['id']}"


def test_a_write_that_changes_nothing_makes_no_version(trust: Fhir) -> None:
    """As HAPI FHIR and Medplum do: what is stored, sent again (by PUT, an empty
    patch or a transaction), is answered with the version it already is."""
    created = trust.post("Flag", _flag())
    assert created.status_code == 201
    key = f"Flag/{created.json()['id']}"

    def versions() -> int:
        return int(trust.get(f"{key}/_history").json()["total"])

    again = trust.put(key, trust.get(key).json())
    assert again.status_code == 200, again.text
    assert again.headers["etag"] == created.headers["etag"] == 'W/"1"'
    assert again.json()["meta"]["lastUpdated"] == created.json()["meta"]["lastUpdated"]
    current = trust.get(key).json()
    kept = {k: v for k, v in current["meta"].items() if k not in ("versionId", "lastUpdated")}
    unmetered = {**current, "meta": kept}  # what the server sets, left out
    assert trust.put(key, unmetered).headers["etag"] == 'W/"1"'
    patched = trust.http.patch(
        f"/fhir/{key}",
        content=b"[]",
        headers={**trust.headers, "content-type": "application/json-patch+json"},
    )
    assert patched.status_code == 200 and patched.headers["etag"] == 'W/"1"'
    entry = {"resource": trust.get(key).json(), "request": {"method": "PUT", "url": key}}
    answer = trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    assert answer.json()["entry"][0]["response"]["etag"] == 'W/"1"'
    assert versions() == 1
    changed = trust.put(key, {**unmetered, "status": "inactive"})
    assert changed.headers["etag"] == 'W/"2"' and versions() == 2
    # Stale, it is refused as any write is, though it changes nothing.
    stale = trust.put(key, changed.json(), headers={"if-match": 'W/"1"'})
    assert stale.status_code == 412
