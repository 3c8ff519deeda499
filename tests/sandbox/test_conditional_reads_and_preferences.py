"""Conditional reads (If-None-Match, If-Modified-Since: 304 Not Modified) and the
`Prefer: return=` of writes (https://hl7.org/fhir/R4/http.html#cread,
https://hl7.org/fhir/R4/http.html#ops), on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

import orjson
import pytest

from tests.common import EXAMPLES
from tests.sandbox.conftest import Fhir

RECORD_A = orjson.loads(next(EXAMPLES.glob("Bundle-record-A-*.json")).read_bytes())


def _flag() -> dict[str, Any]:
    flag = copy.deepcopy(
        next(e["resource"] for e in RECORD_A["entry"] if e["resource"]["resourceType"] == "Flag")
    )
    flag.pop("id", None)
    return flag


@pytest.fixture
def flag_v2(trust: Fhir) -> dict[str, Any]:
    """A Flag at version 2, as read back."""
    created = trust.post("Flag", _flag()).json()
    created["status"] = "inactive"
    assert trust.put(f"Flag/{created['id']}", created).status_code == 200
    return dict(trust.get(f"Flag/{created['id']}").json())


def _http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _not_modified(response: Any, version: int) -> None:
    assert response.status_code == 304, response.text
    assert response.content == b""
    assert response.headers["etag"] == f'W/"{version}"'


@pytest.mark.parametrize("tag", ['W/"2"', '"2"', "*", 'W/"1", W/"2"', ' W/"7" ,W/"2" '], ids=repr)
def test_if_none_match_naming_the_current_version_is_not_modified(
    trust: Fhir, flag_v2: dict[str, Any], tag: str
) -> None:
    _not_modified(trust.get(f"Flag/{flag_v2['id']}", headers={"if-none-match": tag}), 2)


@pytest.mark.parametrize("tag", ['W/"1"', 'W/"20"', 'W/"2x"', "2", ""], ids=repr)
def test_if_none_match_naming_another_version_reads_it_in_full(
    trust: Fhir, flag_v2: dict[str, Any], tag: str
) -> None:
    response = trust.get(f"Flag/{flag_v2['id']}", headers={"if-none-match": tag})
    assert response.status_code == 200
    assert response.json() == flag_v2


def test_if_modified_since_compares_with_the_last_update(
    trust: Fhir, flag_v2: dict[str, Any]
) -> None:
    url = f"Flag/{flag_v2['id']}"
    updated = datetime.fromisoformat(flag_v2["meta"]["lastUpdated"])
    # The header the server sent is the moment the client's copy dates from, to the
    # second; the update itself is later by its milliseconds, if it has any.
    sent = trust.get(url).headers["last-modified"]
    assert parsedate_to_datetime(sent) == updated.replace(microsecond=0)
    echoed = trust.get(url, headers={"if-modified-since": sent})
    assert echoed.status_code == (304 if updated.microsecond == 0 else 200)
    later = _http_date(updated + timedelta(days=1))
    _not_modified(trust.get(url, headers={"if-modified-since": later}), 2)
    earlier = _http_date(updated - timedelta(seconds=1))
    assert trust.get(url, headers={"if-modified-since": earlier}).status_code == 200
    # An unreadable date is ignored (RFC 9110 §13.1.3), not an error.
    for bad in ("yesterday", "Mon, 99 Foo 2026 99:99:99 GMT", "9" * 400):
        assert trust.get(url, headers={"if-modified-since": bad}).status_code == 200
    # If-None-Match, when present, decides alone.
    both = {"if-none-match": 'W/"1"', "if-modified-since": later}
    assert trust.get(url, headers=both).status_code == 200


def test_two_updates_within_one_second_do_not_pass_for_one(trust: Fhir) -> None:
    created = trust.post("Flag", _flag()).json()
    url = f"Flag/{created['id']}"
    first_copy = trust.get(url).headers["last-modified"]  # to the second
    created["status"] = "inactive"
    assert trust.put(url, created).status_code == 200
    updated = datetime.fromisoformat(trust.get(url).json()["meta"]["lastUpdated"])
    answer = trust.get(url, headers={"if-modified-since": first_copy})
    # Only an update on the very second (no milliseconds) is as old as the date says.
    assert answer.status_code == (304 if updated.microsecond == 0 else 200)


@pytest.mark.parametrize(
    "since",
    [
        "Thu, 01 Jan 2099 00:00:00 GMT, Thu, 01 Jan 1990 00:00:00 GMT",
        "01 Jan 2099 00:00",
        "Thu, 01 Jan 2099 00:00:00 +0000 junk",
        "Thu, 01 Jan 2099 00:00:00 EST",
        "2099-01-01T00:00:00Z",
    ],
)
def test_if_modified_since_that_is_not_one_http_date_is_ignored(
    trust: Fhir, flag_v2: dict[str, Any], since: str
) -> None:
    response = trust.get(f"Flag/{flag_v2['id']}", headers={"if-modified-since": since})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "since", ["Thursday, 01-Jan-99 00:00:00 GMT", "Thu Jan  1 00:00:00 2099"], ids=repr
)
def test_the_obsolete_http_date_forms_are_understood(
    trust: Fhir, flag_v2: dict[str, Any], since: str
) -> None:
    response = trust.get(f"Flag/{flag_v2['id']}", headers={"if-modified-since": since})
    # RFC 850's two-digit year 99 is 2099 only if that is within 50 years: it is not.
    assert response.status_code == (304 if "2099" in since else 200)


def test_a_condition_sent_on_several_lines_is_one(trust: Fhir, flag_v2: dict[str, Any]) -> None:
    response = trust.http.get(
        f"/fhir/Flag/{flag_v2['id']}",
        headers=[
            *trust.headers.items(),
            ("if-none-match", 'W/"2"'),
            ("if-none-match", 'W/"1"'),
        ],
    )
    assert response.status_code == 304
    created = trust.http.post(
        "/fhir/Flag",
        content=orjson.dumps(_flag()),
        headers=[
            *trust.headers.items(),
            ("content-type", "application/fhir+json"),
            ("prefer", "return=minimal"),
            ("prefer", "handling=lenient"),
        ],
    )
    assert created.status_code == 201 and created.content == b""


def test_vread_and_head_answer_conditionally_too(trust: Fhir, flag_v2: dict[str, Any]) -> None:
    fid = flag_v2["id"]
    _not_modified(trust.get(f"Flag/{fid}/_history/1", headers={"if-none-match": 'W/"1"'}), 1)
    assert (
        trust.get(f"Flag/{fid}/_history/1", headers={"if-none-match": 'W/"2"'}).json()["status"]
        == "active"
    )
    head = trust.http.head(f"/fhir/Flag/{fid}", headers={**trust.headers, "if-none-match": 'W/"2"'})
    _not_modified(head, 2)
    assert "content-length" not in head.headers  # a 304 has no body to measure


def test_a_deleted_or_unknown_resource_is_not_answered_not_modified(trust: Fhir) -> None:
    created = trust.post("Flag", _flag()).json()
    assert trust.delete(f"Flag/{created['id']}").status_code == 204
    gone = trust.get(f"Flag/{created['id']}", headers={"if-none-match": "*"})
    assert gone.status_code == 410
    assert trust.get("Flag/no-such-flag", headers={"if-none-match": "*"}).status_code == 404


def test_a_partners_conditional_read_is_answered_in_full_and_audited(
    trust: Fhir, as_client: Any
) -> None:
    gp = as_client("gp")
    first = gp.get("CarePlan/c-careplan")
    assert first.status_code == 200
    audits_before = trust.get("AuditEvent", params={"_summary": "count"}).json()["total"]
    again = gp.get(
        "CarePlan/c-careplan",
        headers={
            "if-none-match": first.headers["etag"],
            "if-modified-since": first.headers["last-modified"],
        },
    )
    # The GP's copy was filtered under the consent of its day: a 304 would vouch for it.
    assert again.status_code == 200
    assert again.content == first.content
    audits_after = trust.get("AuditEvent", params={"_summary": "count"}).json()["total"]
    assert audits_after == audits_before + 1


def test_a_batch_read_entry_carries_its_conditions(trust: Fhir, flag_v2: dict[str, Any]) -> None:
    fid = flag_v2["id"]
    updated = datetime.fromisoformat(flag_v2["meta"]["lastUpdated"])

    def read(**conditions: str) -> dict[str, Any]:
        return {"request": {"method": "GET", "url": f"Flag/{fid}", **conditions}}

    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            read(ifNoneMatch='W/"2"'),
            read(ifNoneMatch='W/"1"'),
            read(ifModifiedSince=(updated + timedelta(hours=1)).isoformat()),
            read(ifModifiedSince=(updated - timedelta(hours=1)).isoformat().replace("+00:00", "Z")),
            read(ifModifiedSince="not an instant"),
            # Instants at the ends of time, which UTC cannot hold: ignored.
            read(ifModifiedSince="0001-01-01T00:00:00+01:00"),
            read(ifModifiedSince="9999-12-31T23:59:59-01:00"),
        ],
    }
    answered = trust.post("", batch)
    assert answered.status_code == 200, answered.text
    entries = answered.json()["entry"]
    statuses = [e["response"]["status"] for e in entries]
    assert statuses == ["304", "200", "304", "200", "200", "200", "200"]
    assert "resource" not in entries[0] and entries[0]["response"]["etag"] == 'W/"2"'
    assert entries[1]["resource"] == flag_v2


def test_prefer_return_minimal_answers_a_write_with_no_body(trust: Fhir) -> None:
    created = trust.post("Flag", _flag(), headers={"prefer": "return=minimal"})
    assert created.status_code == 201
    assert created.content == b""
    assert created.headers["preference-applied"] == "return=minimal"
    assert created.headers["etag"] == 'W/"1"'
    location = created.headers["location"]
    fid = location.split("/Flag/")[1].split("/")[0]
    stored = trust.get(f"Flag/{fid}").json()  # created all the same
    stored["status"] = "inactive"
    updated = trust.put(f"Flag/{fid}", stored, headers={"prefer": "return=minimal"})
    assert updated.status_code == 200 and updated.content == b""
    assert updated.headers["etag"] == 'W/"2"'
    assert trust.get(f"Flag/{fid}").json()["status"] == "inactive"


def test_prefer_return_operation_outcome_reports_the_write(trust: Fhir) -> None:
    created = trust.post("Flag", _flag(), headers={"prefer": 'return="OperationOutcome"'})
    assert created.status_code == 201
    body = created.json()
    assert body["resourceType"] == "OperationOutcome"
    (issue,) = body["issue"]
    assert issue["severity"] == "information"
    fid = created.headers["location"].split("/Flag/")[1].split("/")[0]
    assert f"Flag/{fid} created: version 1" in issue["details"]["text"]
    assert created.headers["preference-applied"] == "return=OperationOutcome"


@pytest.mark.parametrize(
    "prefer", [None, "return=representation", "respond-async", "return=everything"]
)
def test_otherwise_a_write_answers_with_the_resource(trust: Fhir, prefer: str | None) -> None:
    headers = {"prefer": prefer} if prefer else {}
    created = trust.post("Flag", _flag(), headers=headers)
    assert created.status_code == 201
    body = created.json()
    assert body["resourceType"] == "Flag" and body["meta"]["versionId"] == "1"
    applied = created.headers.get("preference-applied")
    assert applied == ("return=representation" if prefer == "return=representation" else None)


def test_the_capability_statement_says_reads_may_be_conditional(trust: Fhir) -> None:
    resources = trust.get("metadata").json()["rest"][0]["resource"]
    assert {r["conditionalRead"] for r in resources} == {"full-support"}


def _searchset_parts(bundle: dict[str, Any]) -> tuple[set[str], list[dict[str, Any]]]:
    matches = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == "match"
    }
    outcomes = [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"]
    return matches, outcomes


def test_a_search_is_strict_unless_asked_to_be_lenient(trust: Fhir) -> None:
    query = {"patient": "Patient/c-patient", "colour": "blue"}
    assert trust.get("Flag", params=query).status_code == 400
    strict = trust.get("Flag", params=query, headers={"prefer": "handling=strict"})
    assert strict.status_code == 400


def test_a_lenient_search_leaves_out_what_it_does_not_understand_and_says_so(
    trust: Fhir,
) -> None:
    plain = trust.get("CarePlan", params={"subject": "Patient/c-patient"}).json()
    lenient = trust.get(
        "CarePlan",
        params=[
            ("subject", "Patient/c-patient"),
            ("colour", "blue"),
            ("status:text", "active"),
            ("_contained", "true"),
            ("subject:Patient.shoe-size", "9"),
            ("_include", "CarePlan:shoe"),
            ("_revinclude", "*"),
        ],
        headers={"prefer": "return=minimal, handling=lenient"},
    )
    assert lenient.status_code == 200, lenient.text
    assert lenient.headers["preference-applied"] == "handling=lenient"
    bundle = lenient.json()
    matches, outcomes = _searchset_parts(bundle)
    assert matches == _searchset_parts(plain)[0] and matches
    assert bundle["total"] == plain["total"]
    (outcome,) = outcomes
    ignored = " ".join(i["details"]["text"] for i in outcome["issue"])
    assert {i["severity"] for i in outcome["issue"]} == {"warning"}
    for name in ("colour", "status:text", "_contained", "shoe-size", "'shoe'", "_revinclude=*"):
        assert name in ignored
    # The self link holds the parameters used, and only those.
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "subject=Patient" in self_link
    assert not any(
        n in self_link for n in ("colour", "status", "_contained", "shoe", "_revinclude")
    )


def test_a_lenient_search_still_refuses_a_known_parameter_it_cannot_read(trust: Fhir) -> None:
    lenient = {"prefer": "handling=lenient"}
    assert trust.get("Flag", params={"date": "yesterday"}, headers=lenient).status_code == 400
    assert trust.get("Flag", params={"_count": "-1"}, headers=lenient).status_code == 400
    # A known parameter that cannot be included (not a reference), or a malformed include.
    for include in ("Flag:date", "Flag", "Unknown:patient"):
        answer = trust.get("Flag", params={"_include": include}, headers=lenient)
        assert answer.status_code == 400, include
    # Strict, an include of an unknown parameter is refused as any unknown parameter is.
    assert trust.get("Flag", params={"_include": "Flag:shoe"}).status_code == 400


def test_a_partners_lenient_search_is_filtered_as_any_other(trust: Fhir, as_client: Any) -> None:
    gp = as_client("gp")
    query = [("patient", "Patient/c-patient"), ("colour", "blue")]
    strict = gp.get("Flag", params=query[:1]).json()
    lenient = gp.get("Flag", params=query, headers={"prefer": "handling=lenient"})
    assert lenient.status_code == 200
    bundle = lenient.json()
    # Record C's risk flags are withheld from the GP: none found, none counted.
    assert bundle["total"] == strict["total"] == 0
    matches, outcomes = _searchset_parts(bundle)
    assert matches == set() and len(outcomes) == 1
    posted = gp.http.post(
        "/fhir/Flag/_search",
        content="patient=Patient/c-patient&colour=blue",
        headers={
            **gp.headers,
            "content-type": "application/x-www-form-urlencoded",
            "prefer": "handling=lenient",
        },
    )
    assert posted.status_code == 200 and posted.json()["total"] == 0


def _bundle_of_writes(kind: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "fullUrl": "urn:uuid:0d6f0c59-3bb1-4d4c-9c1b-5d1c2a5b7e01",
                "resource": _flag(),
                "request": {"method": "POST", "url": "Flag"},
            }
        ],
    }


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_bundles_prefer_holds_for_each_of_its_writes(trust: Fhir, kind: str) -> None:
    plain = trust.post("", _bundle_of_writes(kind)).json()["entry"][0]
    assert plain["resource"]["resourceType"] == "Flag"
    assert plain["response"]["status"].startswith("201")
    minimal = trust.post("", _bundle_of_writes(kind), headers={"prefer": "return=minimal"})
    (entry,) = minimal.json()["entry"]
    assert "resource" not in entry and "outcome" not in entry["response"]
    assert entry["response"]["status"].startswith("201")
    assert entry["response"]["etag"] == 'W/"1"' and "/Flag/" in entry["response"]["location"]
    reported = trust.post(
        "", _bundle_of_writes(kind), headers={"prefer": "return=OperationOutcome"}
    )
    (entry,) = reported.json()["entry"]
    assert "resource" not in entry
    assert entry["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert "created: version 1" in entry["response"]["outcome"]["issue"][0]["details"]["text"]


def test_a_transaction_read_entry_carries_its_conditions(
    trust: Fhir, flag_v2: dict[str, Any]
) -> None:
    fid = flag_v2["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": f"Flag/{fid}", "ifNoneMatch": 'W/"2"'}},
            {"request": {"method": "GET", "url": f"Flag/{fid}", "ifNoneMatch": 'W/"1"'}},
        ],
    }
    entries = trust.post("", bundle).json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["304", "200"]


def test_a_matched_conditional_create_says_nothing_was_created(trust: Fhir) -> None:
    flag = _flag()
    flag["identifier"] = [{"system": "https://example.org/flags", "value": "prefer-matched"}]
    first = trust.post("Flag", flag)
    assert first.status_code == 201
    again = trust.post(
        "Flag",
        flag,
        headers={
            "if-none-exist": "identifier=https://example.org/flags|prefer-matched",
            "prefer": "return=OperationOutcome",
        },
    )
    assert again.status_code == 200
    text = again.json()["issue"][0]["details"]["text"]
    assert "nothing was created" in text and "updated" not in text
