"""Conditional update, conditional delete and PATCH as entries of transactions and
batches, on SQLite and PostgreSQL: https://hl7.org/fhir/R4/http.html#trules.

The commonest feed from an EPR is a transaction that upserts the patient by NHS
number and writes what refers to them: the conditional entry's fullUrl must resolve
to whichever resource it matched or made, and nothing may land if any entry fails.
"""

from __future__ import annotations

import base64
import copy
import random
import uuid
from dataclasses import replace
from typing import Any

import orjson
import pytest

from cpa_fhir.sandbox import Sandbox
from cpa_fhir.sandbox._router import Request
from cpa_fhir.validation.identifiers import nhs_number_check_digit
from tests.sandbox.conftest import Fhir, outcome
from tests.sandbox.test_conditional_writes import RECORD_A, _count, _flag, _patch

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def _nhs_number() -> str:
    while True:
        first_nine = f"{random.randrange(10**8, 10**9)}"
        digit = nhs_number_check_digit(first_nine)
        if digit is not None:
            return f"{first_nine}{digit}"


def _patient(nhs: str, family: str = "Upsert") -> dict[str, Any]:
    patient = copy.deepcopy(
        next(e["resource"] for e in RECORD_A["entry"] if e["resource"]["resourceType"] == "Patient")
    )
    patient.pop("id")
    patient.pop("generalPractitioner", None)
    patient["identifier"][0]["value"] = nhs
    patient["name"][0]["family"] = family
    return patient


def _transaction(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _json_patch(operations: Any, content_type: str = "application/json-patch+json") -> Any:
    data = base64.b64encode(orjson.dumps(operations)).decode()
    return {"resourceType": "Binary", "contentType": content_type, "data": data}


def _statuses(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [e["response"]["status"] for e in response.json()["entry"]]


def _version(trust: Fhir, url: str) -> str:
    return str(trust.get(url).headers["etag"])


# -- conditional update -------------------------------------------------------------------


def test_a_conditional_update_entry_upserts_and_references_follow_it(trust: Fhir) -> None:
    nhs = _nhs_number()
    patient_url = "urn:uuid:" + str(uuid.uuid4())

    def upsert(family: str) -> Any:
        flag = _flag(uuid.uuid4().hex, subject={"reference": patient_url})
        flag.pop("author", None)
        return trust.post(
            "",
            _transaction(
                {
                    "fullUrl": patient_url,
                    "resource": _patient(nhs, family),
                    "request": {"method": "PUT", "url": f"Patient?identifier={NHS}|{nhs}"},
                },
                {"resource": flag, "request": {"method": "POST", "url": "Flag"}},
            ),
        )

    first = upsert("Before")
    assert _statuses(first) == ["201", "201"]
    made = first.json()["entry"][0]["resource"]["id"]
    assert first.json()["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{made}"
    second = upsert("After")
    assert _statuses(second) == ["200", "201"]
    entries = second.json()["entry"]
    assert entries[0]["resource"]["id"] == made and entries[0]["response"]["etag"] == 'W/"2"'
    assert entries[1]["resource"]["subject"]["reference"] == f"Patient/{made}"
    found = trust.get("Patient", params={"identifier": f"{NHS}|{nhs}"}).json()
    assert found["total"] == 1 and found["entry"][0]["resource"]["name"][0]["family"] == "After"


def test_a_conditional_update_entry_keeps_the_rules_of_one_alone(trust: Fhir) -> None:
    marker, other = uuid.uuid4().hex, uuid.uuid4().hex
    mine = trust.post("Flag", _flag(marker)).json()
    theirs = trust.post("Flag", _flag(other)).json()
    criteria = f"Flag?identifier=urn:test|{marker}"

    def put(resource: dict[str, Any], url: str = criteria, **request: Any) -> Any:
        tail = {"resource": _flag(uuid.uuid4().hex), "request": {"method": "POST", "url": "Flag"}}
        entry = {"resource": resource, "request": {"method": "PUT", "url": url, **request}}
        return trust.post("", _transaction(entry, tail))

    # The match's version, named and stale: 412; an id that is not the match's: 400.
    outcome(put(_flag(marker, status="inactive"), ifMatch='W/"7"'), 412)
    outcome(put(_flag(marker, id=theirs["id"])), 400)
    # None matching, and the resource's own id is another's: that one is not overwritten.
    outcome(put(_flag(uuid.uuid4().hex, id=theirs["id"]), f"Flag?identifier=urn:test|{uuid.uuid4().hex}"), 409)  # fmt: skip
    # Several matching: 412, as alone.
    trust.post("Flag", _flag(other))
    outcome(put(_flag(other), f"Flag?identifier=urn:test|{other}"), 412)
    outcome(put(_flag(marker), "Flag?"), 400)
    outcome(put(_flag(marker), "Flag/1?identifier=x"), 400)
    assert _version(trust, f"Flag/{mine['id']}") == 'W/"1"'
    assert _version(trust, f"Flag/{theirs['id']}") == 'W/"1"'
    # Each refusal left the whole transaction out: one Flag POSTed per try, none kept.
    updated = put(_flag(marker, status="inactive"), ifMatch='W/"1"')
    assert _statuses(updated) == ["200", "201"]
    assert trust.get(f"Flag/{mine['id']}").json()["status"] == "inactive"


# -- conditional delete -------------------------------------------------------------------


def test_a_conditional_delete_entry_removes_the_one_match_or_nothing(trust: Fhir) -> None:
    gone, kept, several = (uuid.uuid4().hex for _ in range(3))
    trust.post("Flag", _flag(gone))
    for _ in range(2):
        trust.post("Flag", _flag(several))

    def delete(marker: str) -> Any:
        new = uuid.uuid4().hex
        answer = trust.post(
            "",
            _transaction(
                {"request": {"method": "DELETE", "url": f"Flag?identifier=urn:test|{marker}"}},
                {"resource": _flag(new), "request": {"method": "POST", "url": "Flag"}},
            ),
        )
        return answer, new

    answer, new = delete(gone)
    assert _statuses(answer) == ["204", "201"]
    assert (_count(trust, gone), _count(trust, new)) == (0, 1)
    answer, new = delete(kept)  # none matches: nothing to delete
    assert _statuses(answer) == ["204", "201"]
    answer, new = delete(several)  # never several at once, and then nothing lands
    outcome(answer, 412)
    assert (_count(trust, several), _count(trust, new)) == (2, 0)


def test_entries_may_not_change_one_resource_twice(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    flag = trust.post("Flag", _flag(marker)).json()
    by_id = {"resource": flag, "request": {"method": "PUT", "url": f"Flag/{flag['id']}"}}
    for second in (
        {
            "resource": _flag(marker),
            "request": {"method": "PUT", "url": f"Flag?identifier=urn:test|{marker}"},
        },  # fmt: skip
        {"request": {"method": "DELETE", "url": f"Flag?identifier=urn:test|{marker}"}},
        {"request": {"method": "DELETE", "url": f"Flag/{flag['id']}"}},
    ):
        body = outcome(trust.post("", _transaction(by_id, second)), 400)
        assert "both write" in body["issue"][0]["details"]["text"]
    assert _version(trust, f"Flag/{flag['id']}") == 'W/"1"'


# -- PATCH --------------------------------------------------------------------------------


def test_a_patch_entry_applies_to_the_version_it_names(trust: Fhir) -> None:
    flag = trust.post("Flag", _flag(uuid.uuid4().hex)).json()
    url = f"Flag/{flag['id']}"
    to_inactive = [{"op": "replace", "path": "/status", "value": "inactive"}]

    def patch(resource: Any, **request: Any) -> tuple[Any, str]:
        new = uuid.uuid4().hex
        entry = {"resource": resource, "request": {"method": "PATCH", "url": url, **request}}
        tail = {"resource": _flag(new), "request": {"method": "POST", "url": "Flag"}}
        return trust.post("", _transaction(entry, tail)), new

    answer, new = patch(_json_patch(to_inactive), ifMatch='W/"1"')
    assert _statuses(answer) == ["200", "201"]
    assert answer.json()["entry"][0]["resource"]["status"] == "inactive"
    assert trust.get(url).json()["status"] == "inactive" and _version(trust, url) == 'W/"2"'
    refusals = [
        (patch(_json_patch(to_inactive), ifMatch='W/"1"'), 412),  # stale
        (patch(_flag("x")), 400),  # not a Binary
        (patch(_json_patch(to_inactive, "application/fhir+json")), 415),
        (patch({**_json_patch(to_inactive), "data": "not base64!"}), 400),
        (patch(_json_patch({"op": "remove"})), 400),  # not a list of operations
        (patch(_json_patch([{"op": "replace", "path": "/id", "value": "x"}])), 422),
        (patch(_json_patch([{"op": "remove", "path": "/code"}])), 422),  # Flag.code is 1..1
    ]
    for (answer, new), status in refusals:
        outcome(answer, status)
        assert _count(trust, new) == 0  # nothing of the transaction landed
    assert _version(trust, url) == 'W/"2"'


def test_a_patch_entry_in_a_batch(trust: Fhir) -> None:
    flag = trust.post("Flag", _flag(uuid.uuid4().hex)).json()
    to_inactive = [{"op": "replace", "path": "/status", "value": "inactive"}]
    batch = _transaction(
        {
            "resource": _json_patch(to_inactive),
            "request": {"method": "PATCH", "url": f"Flag/{flag['id']}"},
        },
        {"resource": _flag("x"), "request": {"method": "PATCH", "url": f"Flag/{flag['id']}"}},
        kind="batch",
    )
    answer = trust.post("", batch)
    assert _statuses(answer) == ["200", "400"]
    assert trust.get(f"Flag/{flag['id']}").json()["status"] == "inactive"


# -- partners ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        {"request": {"method": "PUT", "url": "Flag?identifier=urn:test|{marker}"}},
        {"request": {"method": "DELETE", "url": "Flag?identifier=urn:test|{marker}"}},
        {"request": {"method": "PATCH", "url": "Flag/{id}"}},
    ],
    ids=["conditional-update", "conditional-delete", "patch"],
)
def test_a_partner_cannot_use_these_entries_even_with_write_scopes(
    sandbox: Sandbox, entry: dict[str, Any]
) -> None:
    # A conditional entry's match would tell of what the partner may not see; a patch
    # works on the whole stored resource.
    scopes = frozenset({"system/*.read", "system/*.write"})
    writer = replace(sandbox.registry.clients["gp"], scopes=scopes)
    marker = uuid.uuid4().hex
    existing = sandbox.repo.create(_flag(marker))
    request = entry["request"]
    url = request["url"].format(marker=marker, id=existing.id)
    to_inactive = [{"op": "replace", "path": "/status", "value": "inactive"}]
    resource = _json_patch(to_inactive) if request["method"] == "PATCH" else _flag(marker)
    bundle = _transaction(
        {"resource": resource, "request": {**request, "url": url}}
        if request["method"] != "DELETE"
        else {"request": {**request, "url": url}}
    )
    headers = {"content-type": "application/fhir+json"}
    answer = sandbox.router.handle(Request("POST", "", [], headers, orjson.dumps(bundle)), writer, scopes)  # fmt: skip
    assert answer.status == 403, answer.body
    assert b"trust's own clients" in answer.body and existing.content not in answer.body
    assert sandbox.repo.read("Flag", existing.id).version_id == 1


def test_an_entry_that_fails_before_the_writes_is_named(trust: Fhir) -> None:
    to_inactive = [{"op": "replace", "path": "/status", "value": "inactive"}]
    bundle = _transaction(
        {"resource": _flag(uuid.uuid4().hex), "request": {"method": "POST", "url": "Flag"}},
        {"resource": _json_patch(to_inactive), "request": {"method": "PATCH", "url": "Flag/none"}},
    )
    body = outcome(trust.post("", bundle), 404)
    assert body["issue"][0]["expression"] == ["Bundle.entry[1]"]


def test_entries_are_read_as_the_same_requests_alone_would_be(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    existing = trust.post("Flag", _flag(marker)).json()
    criteria = f"identifier=urn:test|{marker}"
    # Two conditional creates finding the one resource write nothing: both answer it.
    same = {"resource": _flag(marker), "request": {"method": "POST", "url": "Flag", "ifNoneExist": criteria}}  # fmt: skip
    answer = trust.post("", _transaction(same, copy.deepcopy(same)))
    assert _statuses(answer) == ["200", "200"]
    assert {e["resource"]["id"] for e in answer.json()["entry"]} == {existing["id"]}
    # `_format` in criteria names no criterion; a JSON Patch type may carry parameters.
    put = {"resource": _flag(marker, status="inactive"), "request": {"method": "PUT", "url": f"Flag?{criteria}&_format=json"}}  # fmt: skip
    assert _statuses(trust.post("", _transaction(put))) == ["200"]
    patch = _json_patch(
        [{"op": "replace", "path": "/status", "value": "active"}],
        "application/json-patch+json; charset=utf-8",
    )
    entry = {"resource": patch, "request": {"method": "PATCH", "url": f"Flag/{existing['id']}"}}
    assert _statuses(trust.post("", _transaction(entry))) == ["200"]
    # A version named for what no longer matches anything: 412, as for an update.
    gone = f"Flag?identifier=urn:test|{uuid.uuid4().hex}"
    delete = {"request": {"method": "DELETE", "url": gone, "ifMatch": 'W/"1"'}}
    outcome(trust.post("", _transaction(delete)), 412)
    assert _version(trust, f"Flag/{existing['id']}") == 'W/"3"'


def test_a_bundle_is_taken_at_the_base_written_without_a_slash(trust: Fhir) -> None:
    # Clients POST batches and transactions to the base URL as configured: no redirect.
    bundle = _transaction({"request": {"method": "GET", "url": "Patient/a-patient"}}, kind="batch")
    answer = trust.http.post(
        "/fhir",
        content=orjson.dumps(bundle),
        headers={**trust.headers, "content-type": "application/fhir+json"},
        follow_redirects=False,
    )
    assert _statuses(answer) == ["200"]


# -- what a transaction's entries may say ----------------------------------------------


def _all_flags(trust: Fhir) -> int:
    return int(trust.get("Flag", params={"_summary": "count"}).json()["total"])


def test_a_post_entry_with_criteria_in_its_url_is_a_conditional_create(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    url = f"Flag?identifier=urn:test|{marker}"
    entry = {"resource": _flag(marker), "request": {"method": "POST", "url": url}}
    assert _statuses(trust.post("", _transaction(entry))) == ["201"]
    assert _statuses(trust.post("", _transaction(entry))) == ["200"]
    assert _count(trust, marker) == 1
    differing = {**entry, "request": {**entry["request"], "ifNoneExist": "identifier=urn:test|x"}}
    outcome(trust.post("", _transaction(differing)), 400)
    encoded = f"identifier=urn%3Atest%7C{marker}"  # the same criteria, written otherwise
    same = {**entry, "request": {**entry["request"], "ifNoneExist": encoded}}
    assert _statuses(trust.post("", _transaction(same))) == ["200"]


@pytest.mark.parametrize("url", ["Flag/abc", "Flag/c-risk-self-harm/_history/1"])
def test_a_post_entry_to_an_instance_is_refused(trust: Fhir, url: str) -> None:
    before = _all_flags(trust)
    entry = {"resource": _flag(uuid.uuid4().hex), "request": {"method": "POST", "url": url}}
    outcome(trust.post("", _transaction(entry)), 400)
    assert _all_flags(trust) == before


def test_a_reference_to_an_urn_no_entry_has_is_refused(trust: Fhir) -> None:
    before = _all_flags(trust)
    flag = _flag(uuid.uuid4().hex, subject={"reference": f"urn:uuid:{uuid.uuid4()}"})
    entry = {"resource": flag, "request": {"method": "POST", "url": "Flag"}}
    found = outcome(trust.post("", _transaction(entry)), 400)
    assert "no entry" in found["issue"][0]["details"]["text"]
    assert _all_flags(trust) == before


def test_two_entries_with_one_full_url_are_refused(trust: Fhir) -> None:
    before = _all_flags(trust)
    url = f"urn:uuid:{uuid.uuid4()}"
    entries = [
        {
            "fullUrl": url,
            "resource": _flag(uuid.uuid4().hex),
            "request": {"method": "POST", "url": "Flag"},
        }  # fmt: skip
        for _ in range(2)
    ]
    outcome(trust.post("", _transaction(*entries)), 400)
    assert _all_flags(trust) == before


def test_a_conditional_reference_names_the_one_resource_it_matches(trust: Fhir) -> None:
    patient = trust.get("Patient/c-patient").json()
    nhs = next(i["value"] for i in patient["identifier"] if i["system"] == NHS)
    marker = uuid.uuid4().hex
    flag = _flag(marker, subject={"reference": f"Patient?identifier={NHS}|{nhs}"})
    entry = {"resource": flag, "request": {"method": "POST", "url": "Flag"}}
    assert _statuses(trust.post("", _transaction(entry))) == ["201"]
    stored = trust.get("Flag", params={"identifier": f"urn:test|{marker}"}).json()["entry"]
    assert stored[0]["resource"]["subject"] == {"reference": "Patient/c-patient"}
    before = _all_flags(trust)
    for criteria in (f"identifier={NHS}|0000000000", "gender=female,male,other,unknown"):
        nowhere = _flag(uuid.uuid4().hex, subject={"reference": f"Patient?{criteria}"})
        refused = trust.post("", _transaction({**entry, "resource": nowhere}))
        assert refused.status_code in (400, 412), refused.text
        assert refused.json()["resourceType"] == "OperationOutcome"
    assert _all_flags(trust) == before


@pytest.mark.parametrize("reference", ["Patient?", "Patient?&", "Patient?_format=json"])
def test_a_conditional_reference_without_criteria_is_a_400(trust: Fhir, reference: str) -> None:
    before = _all_flags(trust)
    flag = _flag(uuid.uuid4().hex, subject={"reference": reference})
    entry = {"resource": flag, "request": {"method": "POST", "url": "Flag"}}
    said = outcome(trust.post("", _transaction(entry)), 400)
    assert "needs at least one search criterion" in said["issue"][0]["details"]["text"]
    assert _all_flags(trust) == before


def test_a_conditional_reference_outside_a_transaction_is_a_400(trust: Fhir) -> None:
    """Resolved in transactions only (R4 http.html#trules): a create, update, patch or
    batch entry holding one is refused, naming the element, not stored as written."""
    before = _all_flags(trust)
    flag = _flag(uuid.uuid4().hex, subject={"reference": "Patient?_id=c-patient"})
    said = outcome(trust.post("Flag", flag), 400)
    text = said["issue"][0]["details"]["text"]
    assert "Flag.subject.reference" in text and "only in a transaction" in text
    made = trust.post("Flag", _flag(uuid.uuid4().hex)).json()
    contained = {"resourceType": "Basic", "id": "b", "code": {"text": "x"}}
    contained["subject"] = {"reference": "Patient?"}
    changed = {**made, "contained": [contained]}
    said = outcome(trust.put(f"Flag/{made['id']}", changed), 400)
    assert "Flag.contained[0].subject.reference" in said["issue"][0]["details"]["text"]
    ops = [{"op": "replace", "path": "/subject/reference", "value": "Patient?_id=c-patient"}]
    outcome(_patch(trust, f"Flag/{made['id']}", ops), 400)
    batch = _transaction(
        {"resource": flag, "request": {"method": "POST", "url": "Flag"}}, kind="batch"
    )
    assert _statuses(trust.post("", batch)) == ["400"]
    assert _all_flags(trust) == before + 1  # the one made to update
    assert trust.get(f"Flag/{made['id']}").json()["subject"] == made["subject"]


@pytest.mark.parametrize("condition", ["", "identifier=", "_count=1"])
def test_if_none_exist_without_criteria_is_a_400(trust: Fhir, condition: str) -> None:
    found = outcome(
        trust.post("Flag", _flag(uuid.uuid4().hex), headers={"if-none-exist": condition}), 400
    )
    assert found["issue"][0]["code"] != "duplicate"


def _new_patient(trust: Fhir) -> tuple[str, str]:
    """A patient of its own (an NHS number no other has): its id and NHS number."""
    nhs = _nhs_number()
    made = trust.post("Patient", _patient(nhs))
    assert made.status_code == 201, made.text
    return made.json()["id"], nhs


def test_a_conditional_reference_to_what_the_transaction_deletes_is_refused(trust: Fhir) -> None:
    pid, nhs = _new_patient(trust)
    flag = _flag(uuid.uuid4().hex, subject={"reference": f"Patient?identifier={NHS}|{nhs}"})
    bundle = _transaction(
        {"request": {"method": "DELETE", "url": f"Patient/{pid}"}},
        {"resource": flag, "request": {"method": "POST", "url": "Flag"}},
    )
    said = outcome(trust.post("", bundle), 400)
    assert f"matches Patient/{pid}, which entry 0 deletes" in said["issue"][0]["details"]["text"]
    assert trust.get(f"Patient/{pid}").status_code == 200  # nothing of it happened


def test_a_conditional_reference_is_matched_again_under_the_write_lock(
    trust: Fhir, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a conditional reference matched before the transaction took the write lock
    may have changed by the time it holds it: matched again then, a change is a 409,
    never a reference to what no longer matches."""
    pid, nhs = _new_patient(trust)
    other, _ = _new_patient(trust)
    real = sandbox.repo.conditional_match

    def stale(rtype: str, criteria: str, what: str, base: str | None = None) -> Any:
        found = real(rtype, criteria, what, base)
        if "the reference" in what:  # as it was before another transaction moved it
            return sandbox.repo.read("Patient", other)
        return found

    monkeypatch.setattr(sandbox.repo, "conditional_match", stale)
    marker = uuid.uuid4().hex
    flag = _flag(marker, subject={"reference": f"Patient?identifier={NHS}|{nhs}"})
    answer = trust.post(
        "", _transaction({"resource": flag, "request": {"method": "POST", "url": "Flag"}})
    )
    assert (
        "changed while the transaction ran" in outcome(answer, 409)["issue"][0]["details"]["text"]
    )
    assert trust.get("Flag", params={"identifier": f"urn:test|{marker}"}).json()["total"] == 0
