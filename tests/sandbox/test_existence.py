"""A partner's client cannot tell a resource withheld from it from one that does not
exist, by any interaction, reads or writes: the same status and the same words. And
even with write scopes it changes or deletes only what it sees whole, so that nothing
withheld from it is overwritten or lost."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson
import pytest

from cpa_fhir.errors import FhirError
from cpa_fhir.sandbox import Sandbox
from cpa_fhir.sandbox._router import Request, Response
from tests.sandbox.test_consent_freshness import audit_store_fails  # noqa: F401
from tests.sandbox.test_leaks import C_KEYS, CLINICAL, PARTNERS, _expected

WRITES = frozenset({"system/*.read", "system/*.write"})
FHIR_JSON = "application/fhir+json"

Call = Callable[..., Response]
# In record C, a need GP sees whole (no element of it withheld).
SEEN_WHOLE = "Condition/c-need-accommodation"
TBOO = ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "TBOO")


def _caller(sandbox: Sandbox, client_id: str) -> Call:
    """Requests straight to the router as this client, registered with write scopes."""
    client = replace(sandbox.registry.clients[client_id], scopes=WRITES)

    def call(
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> Response:
        content = b"" if body is None else orjson.dumps(body)
        request = Request(
            method, path, query or [], {"content-type": FHIR_JSON, **(headers or {})}, content
        )
        return sandbox.router.handle(request, client, WRITES)

    return call


@pytest.fixture(scope="module")
def trust_call(sandbox: Sandbox) -> Call:
    return _caller(sandbox, "trust")


def _withheld_key(client_id: str) -> str:
    hidden = sorted(k for k in C_KEYS - _expected(client_id) if k.split("/")[0] in CLINICAL)
    assert hidden, f"record C withholds nothing clinical from {client_id}"
    return hidden[0]


def _answer(response: Response, rid: str) -> tuple[int, bytes]:
    return response.status, response.body.replace(rid.encode(), b"{id}")


def _written_and_read_back(
    partner: Call,
    created: list[str],
    resource: dict[str, Any],
    name: str,
    elements: tuple[str, ...],
) -> tuple[int, bytes]:
    """A partner's create and, made, these elements of it as it reads it back, with its
    security labels' codes; `name` (what two attempts differ in) written as {id}. The
    id of what was made is added to `created`."""
    rtype = resource["resourceType"]
    made = partner("POST", rtype, resource)
    if made.status != 201:
        return _answer(made, name)
    created.append(orjson.loads(made.body)["id"])
    shown = orjson.loads(partner("GET", f"{rtype}/{created[-1]}").body)
    kept = {k: shown.get(k) for k in elements}
    kept["meta"] = [c.get("code") for c in shown.get("meta", {}).get("security", [])]
    return made.status, orjson.dumps(kept).replace(name.encode(), b"{id}")


def _alike_then_removed(
    answer: Callable[[str], tuple[int, bytes]],
    hidden: str,
    absent: str,
    trust_call: Call,
    made_type: str,
    created: list[str],
    planted: str,
) -> None:
    """The answers about what is there (withheld) and what is not are the same; then
    what the partner made (of `made_type`) and what the trust planted are removed."""
    try:
        assert answer(hidden) == answer(absent)
    finally:
        for made_id in created:
            assert trust_call("DELETE", f"{made_type}/{made_id}").status == 204
        assert trust_call("DELETE", planted).status == 204


def _copy(sandbox: Sandbox, key: str, new_id: str, **changes: Any) -> dict[str, Any]:
    """A new resource like a stored one: its content, a new id."""
    resource = copy.deepcopy(sandbox.repo.read(*key.split("/")).resource())
    resource.pop("meta", None)
    resource.update(changes, id=new_id)
    return resource


def _withheld_and_absent(sandbox: Sandbox, client_id: str) -> tuple[Call, str, str, str]:
    """The partner's caller, the type and id of a resource withheld from it, and an id
    of that type that is absent."""
    rtype, hidden = _withheld_key(client_id).split("/")
    return _caller(sandbox, client_id), rtype, hidden, f"no-such-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("client_id", list(PARTNERS))
def test_withheld_and_absent_answer_word_for_word_alike(sandbox: Sandbox, client_id: str) -> None:
    call, rtype, hidden, absent = _withheld_and_absent(sandbox, client_id)
    before = sandbox.repo.read(rtype, hidden)
    body = before.resource()

    def interactions(rid: str) -> list[tuple[str, str, Any, dict[str, str]]]:
        replacement = {**body, "id": rid}
        return [
            ("GET", f"{rtype}/{rid}", None, {}),
            ("GET", f"{rtype}/{rid}/_history/1", None, {}),
            ("GET", f"{rtype}/{rid}/_history/9", None, {}),
            ("GET", f"{rtype}/{rid}/_history", None, {}),
            ("PUT", f"{rtype}/{rid}", replacement, {}),
            ("PUT", f"{rtype}/{rid}", replacement, {"if-match": 'W/"1"'}),
            ("DELETE", f"{rtype}/{rid}", None, {}),
            ("DELETE", f"{rtype}/{rid}", None, {"if-match": 'W/"1"'}),
        ]

    for (method, path, content, headers), (_, absent_path, absent_content, _) in zip(
        interactions(hidden), interactions(absent), strict=True
    ):
        withheld_answer = _answer(call(method, path, content, headers), hidden)
        absent_answer = _answer(call(method, absent_path, absent_content, headers), absent)
        assert withheld_answer[0] == 404, (method, path, withheld_answer)
        assert withheld_answer == absent_answer, (method, path)
    # Nothing was written: not the withheld resource, nor one under the absent id.
    assert sandbox.repo.read(rtype, hidden).version_id == before.version_id
    assert sandbox.repo.history_total(rtype, absent) == 0


@pytest.mark.parametrize("client_id", list(PARTNERS))
@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ([("_summary", "true")], {}),
        ([("_elements", "id")], {"if-none-match": "*"}),
        ([("_summary", "bogus")], {}),
        ([("_elements", "shoe")], {}),
        ([("_elements", "")], {}),
        ([("_elements", "id"), ("_summary", "true")], {"if-none-match": "*"}),
        ([], {"if-none-match": "*", "if-modified-since": "Thu, 01 Jan 2099 00:00:00 GMT"}),
    ],
)
def test_a_read_asking_for_a_part_or_conditionally_tells_nothing_either(
    sandbox: Sandbox, client_id: str, query: list[tuple[str, str]], headers: dict[str, str]
) -> None:
    # A request's own faults are said alike whether or not what it names is withheld.
    call, rtype, hidden, absent = _withheld_and_absent(sandbox, client_id)
    for path in ("{}", "{}/_history/1"):
        withheld_answer = _answer(
            call("GET", f"{rtype}/{path.format(hidden)}", None, headers, query), hidden
        )
        absent_answer = _answer(
            call("GET", f"{rtype}/{path.format(absent)}", None, headers, query), absent
        )
        assert withheld_answer[0] in (400, 404), withheld_answer
        assert withheld_answer == absent_answer, (path, query, headers)


@pytest.mark.parametrize("client_id", list(PARTNERS))
def test_withheld_and_absent_alike_in_a_transaction(sandbox: Sandbox, client_id: str) -> None:
    call, rtype, hidden, absent = _withheld_and_absent(sandbox, client_id)
    body = sandbox.repo.read(rtype, hidden).resource()

    def transaction(method: str, rid: str) -> Response:
        entry: dict[str, Any] = {"request": {"method": method, "url": f"{rtype}/{rid}"}}
        if method == "PUT":
            entry["resource"] = {**body, "id": rid}
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        return call("POST", "", bundle)

    for method in ("PUT", "DELETE"):
        withheld_answer = _answer(transaction(method, hidden), hidden)
        assert withheld_answer[0] == 404, withheld_answer
        assert withheld_answer == _answer(transaction(method, absent), absent)
    assert sandbox.repo.read(rtype, hidden).version_id == 1


def test_a_deletion_is_told_only_of_what_the_partner_could_see(
    sandbox: Sandbox, trust_call: Call
) -> None:
    gp = _caller(sandbox, "gp")
    withheld = _withheld_key("gp")
    rtype = withheld.split("/")[0]
    hidden_id, seen_id, absent = (f"del-{uuid.uuid4().hex[:12]}" for _ in range(3))
    # A copy of something in C's record GP may not see, and of something it may.
    assert (
        trust_call("PUT", f"{rtype}/{hidden_id}", _copy(sandbox, withheld, hidden_id)).status == 201
    )
    seen = _copy(sandbox, SEEN_WHOLE, seen_id)
    assert trust_call("PUT", f"Condition/{seen_id}", seen).status == 201
    assert gp("GET", f"Condition/{seen_id}").status == 200
    assert gp("GET", f"{rtype}/{hidden_id}").status == 404
    for path in (f"{rtype}/{hidden_id}", f"Condition/{seen_id}"):
        assert trust_call("DELETE", path).status == 204

    def answers(path: str, rid: str) -> list[tuple[int, bytes]]:
        return [
            _answer(gp("GET", path), rid),
            _answer(gp("GET", f"{path}/_history/2"), rid),
            _answer(gp("GET", f"{path}/_history"), rid),
            _answer(gp("DELETE", path), rid),
        ]

    assert answers(f"{rtype}/{hidden_id}", hidden_id) == answers(f"{rtype}/{absent}", absent)
    read, vread, history, delete = answers(f"Condition/{seen_id}", seen_id)
    assert read[0] == 410 and vread[0] == 410 and delete[0] == 204
    assert history[0] == 200 and b'"method":"DELETE"' in history[1]


def test_a_partner_changes_or_deletes_only_what_it_sees_whole(
    sandbox: Sandbox, trust_call: Call
) -> None:
    gp = _caller(sandbox, "gp")
    # Record C's care plan reaches GP redacted: a whole replacement would erase what was
    # removed, a deletion would lose it.
    redacted = gp("GET", "CarePlan/c-careplan")
    assert redacted.status == 200 and b"REDACTED" in redacted.body
    before = sandbox.repo.read("CarePlan", "c-careplan")
    seen = orjson.loads(redacted.body)
    for method, body in (("PUT", seen), ("DELETE", None)):
        refused = gp(method, "CarePlan/c-careplan", body)
        assert refused.status == 403, refused.body
        assert b"withheld from this client" in refused.body
    assert sandbox.repo.read("CarePlan", "c-careplan").content == before.content

    # What it sees whole it may change, and delete.
    cid = f"whole-{uuid.uuid4().hex[:12]}"
    assert trust_call("PUT", f"Condition/{cid}", _copy(sandbox, SEEN_WHOLE, cid)).status == 201
    shown = orjson.loads(gp("GET", f"Condition/{cid}").body)
    assert "REDACTED" not in orjson.dumps(shown).decode()
    shown["meta"].pop("security", None)
    shown["note"] = [{"text": "Seen at the practice"}]
    updated = gp("PUT", f"Condition/{cid}", shown)
    assert updated.status == 200, updated.body
    assert sandbox.repo.read("Condition", cid).resource()["note"] == shown["note"]
    stale = gp("DELETE", f"Condition/{cid}", headers={"if-match": 'W/"1"'})
    assert stale.status == 412, stale.body
    assert gp("DELETE", f"Condition/{cid}").status == 204
    assert trust_call("GET", f"Condition/{cid}").status == 410


def test_a_label_the_partner_cannot_see_is_not_overwritten(
    sandbox: Sandbox, trust_call: Call
) -> None:
    # The trust's own security labels on a resource are replaced by the server's in
    # what a partner sees; its update would drop them.
    gp = _caller(sandbox, "gp")
    cid = f"labelled-{uuid.uuid4().hex[:12]}"
    condition = _copy(sandbox, SEEN_WHOLE, cid)
    # A label of the trust's own (a sensitivity the policy does not know would withhold
    # the resource from the partner altogether).
    condition["meta"] = {"security": [{"system": "https://trust.example/labels", "code": "ward-9"}]}
    assert trust_call("PUT", f"Condition/{cid}", condition).status == 201
    shown = gp("GET", f"Condition/{cid}")
    assert shown.status == 200 and b"ward-9" not in shown.body
    assert gp("PUT", f"Condition/{cid}", orjson.loads(shown.body)).status == 403
    assert gp("DELETE", f"Condition/{cid}").status == 403
    assert sandbox.repo.read("Condition", cid).version_id == 1


def test_a_partner_labels_no_contained_resource(sandbox: Sandbox, trust_call: Call) -> None:
    # A contained resource is labelled as a resource of its own: a label a partner put
    # on one would read as the trust's, and one the policy does not know would leave
    # the whole record unlabelled, every partner's view of it withheld.
    gp = _caller(sandbox, "gp")
    search = ("GET", "Condition", None, None, [("patient", "Patient/c-patient")])
    before = {e["resource"]["id"] for e in orjson.loads(gp(*search).body)["entry"]}
    assert before
    condition = _copy(sandbox, SEEN_WHOLE, "unused")
    del condition["id"], condition["recorder"]
    labels = [
        {"system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category", "code": "x"},
        {"system": TBOO[0], "code": TBOO[1]},
    ]
    condition["contained"] = [
        {"resourceType": "Basic", "id": "seen", "meta": {"security": labels}, "code": {"text": "a"}}
    ]
    condition["extension"] = [
        {"url": "https://example.org/fhir/seen-by", "valueReference": {"reference": "#seen"}}
    ]
    created = gp("POST", "Condition", condition)
    assert created.status == 201, created.body
    cid = orjson.loads(created.body)["id"]
    try:
        stored = sandbox.repo.read("Condition", cid).resource()
        assert "meta" not in stored["contained"][0]
        after = {e["resource"]["id"] for e in orjson.loads(gp(*search).body)["entry"]}
        assert before <= after
    finally:
        assert trust_call("DELETE", f"Condition/{cid}").status == 204


def test_the_trust_deletes_with_if_match(trust_call: Call, sandbox: Sandbox) -> None:
    pid = f"if-match-{uuid.uuid4().hex[:12]}"
    assert (
        trust_call("PUT", f"Patient/{pid}", _copy(sandbox, "Patient/c-patient", pid)).status == 201
    )
    stale = trust_call("DELETE", f"Patient/{pid}", headers={"if-match": 'W/"2"'})
    assert stale.status == 412 and b"version 1" in stale.body
    assert trust_call("GET", f"Patient/{pid}").status == 200
    assert trust_call("DELETE", f"Patient/{pid}", headers={"if-match": 'W/"1"'}).status == 204
    assert trust_call("GET", f"Patient/{pid}").status == 410


def test_a_partner_cannot_write_what_consent_decisions_are_made_from(
    sandbox: Sandbox,
) -> None:
    # A Consent of its own making would otherwise grant it what was withheld.
    gp = _caller(sandbox, "gp")
    withheld = _withheld_key("gp")
    consent = _copy(sandbox, "Consent/c-consent", "gp-made")
    consent.pop("id")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": consent, "request": {"method": "POST", "url": "Consent"}}],
    }
    for method, path, body in (
        ("POST", "Consent", consent),
        ("PUT", "Consent/c-consent", {**consent, "id": "c-consent"}),
        ("DELETE", "Consent/c-consent", None),
        ("POST", "", bundle),
    ):
        refused = gp(method, path, body)
        assert refused.status == 403, (method, path, refused.body)
        assert b"trust's own clients" in refused.body
    assert sandbox.repo.read("Consent", "c-consent").version_id == 1
    assert gp("GET", withheld).status == 404


@pytest.mark.parametrize(
    ("client_id", "key"),
    [
        ("gp", "Organization/c-gp-practice"),  # its own: a partner always sees itself
        ("gp", "Patient/c-patient"),
        ("probation", "Patient/a-patient"),
        ("carer", "RelatedPerson/c-carer-son"),
        ("gp", "Practitioner/no-such-practitioner"),  # refused alike, there or not
    ],
)
def test_a_partner_cannot_write_whom_a_consent_may_name(
    sandbox: Sandbox, client_id: str, key: str
) -> None:
    # A Consent names its actors by reference, and a recipient is matched to one by
    # identifier too: a partner that could edit an actor could make it name itself,
    # and inherit what the service user agreed to give that actor.
    call = _caller(sandbox, client_id)
    rtype, rid = key.split("/")
    try:
        body: dict[str, Any] = {**sandbox.repo.read(rtype, rid).resource(), "meta": {}}
    except FhirError:
        body = {"resourceType": rtype, "id": rid}
    before = _version_or_none(sandbox, rtype, rid)
    mine = {**body, "identifier": [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "Y90303"}]}  # fmt: skip
    created = {k: v for k, v in mine.items() if k != "id"}
    for method, path, sent in (
        ("PUT", key, mine),
        ("DELETE", key, None),
        ("POST", rtype, created),
        ("POST", "", {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": mine, "request": {"method": "PUT", "url": key}}]}),
    ):  # fmt: skip
        refused = call(method, path, sent)
        assert refused.status == 403, (method, path, refused.body)
        assert b"consent decisions are made from them" in refused.body
    assert _version_or_none(sandbox, rtype, rid) == before


@pytest.mark.parametrize("rtype", ["AuditEvent", "Provenance"])
def test_a_partner_cannot_write_into_the_audit_trail(sandbox: Sandbox, rtype: str) -> None:
    """A partner that could write an AuditEvent or a Provenance could put into the
    trust's record of disclosures one that never happened, or take one out."""
    gp = _caller(sandbox, "gp")
    trust = _caller(sandbox, "trust")
    gp("GET", "CarePlan/c-careplan")  # a disclosure, so that there is an AuditEvent
    stored = orjson.loads(trust("GET", rtype, query=[("_count", "1")]).body).get("entry", [])
    forged = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106"},
        "recorded": "2026-01-01T00:00:00Z",
        "agent": [{"who": {"reference": "Organization/c-probation"}, "requestor": True}],
        "source": {"observer": {"display": "cpa-fhir sandbox"}},
        "entity": [{"what": {"reference": "Patient/c-patient"}}],
    } if rtype == "AuditEvent" else {
        "resourceType": "Provenance",
        "target": [{"reference": "CarePlan/c-careplan"}],
        "recorded": "2026-01-01T00:00:00Z",
        "agent": [{"who": {"reference": "Organization/c-gp-practice"}}],
    }  # fmt: skip
    before = orjson.loads(trust("GET", rtype, query=[("_summary", "count")]).body)["total"]
    attempts: list[tuple[str, str, Any]] = [
        ("POST", rtype, forged),
        ("PUT", f"{rtype}/forged", {**forged, "id": "forged"}),
        ("POST", "", {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": forged, "request": {"method": "POST", "url": rtype}}]}),
    ]  # fmt: skip
    if stored:
        key = f"{rtype}/{stored[0]['resource']['id']}"
        attempts.append(("DELETE", key, None))
    for method, path, body in attempts:
        refused = gp(method, path, body)
        assert refused.status == 403, (method, path, refused.body)
        assert b"record of what was disclosed" in refused.body
    after = orjson.loads(trust("GET", rtype, query=[("_summary", "count")]).body)["total"]
    assert after == before


def _version_or_none(sandbox: Sandbox, rtype: str, rid: str) -> int | None:
    try:
        return sandbox.repo.read(rtype, rid).version_id
    except FhirError:
        return None


def test_a_partner_writes_only_the_version_it_was_checked_against(
    sandbox: Sandbox, trust_call: Call, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The trust labels the resource between the partner's check and its write. The
    # partner's write must not land on that new version, whether or not its If-Match
    # names it, and the answer must not say what the resource became.
    gp = _caller(sandbox, "gp")
    original = _copy(sandbox, SEEN_WHOLE, "x")
    label = {"security": [{"system": TBOO[0], "code": TBOO[1]}]}
    meddling: list[str] = []
    check = sandbox.router._check_valid

    def trust_writes_first(resource: dict[str, Any]) -> None:
        if meddling:
            cid = meddling.pop()
            labelled = {**original, "id": cid, "meta": label}
            assert trust_call("PUT", f"Condition/{cid}", labelled).status == 200
        check(resource)

    monkeypatch.setattr(sandbox.router, "_check_valid", trust_writes_first)
    for headers in ({"if-match": 'W/"2"'}, {}):
        cid = f"checked-{uuid.uuid4().hex[:12]}"
        assert trust_call("PUT", f"Condition/{cid}", {**original, "id": cid}).status == 201
        shown = orjson.loads(gp("GET", f"Condition/{cid}").body)
        shown["note"] = [{"text": "written by the partner"}]
        meddling.append(cid)
        answer = gp("PUT", f"Condition/{cid}", shown, headers)
        assert answer.status in (409, 412), answer.body
        assert b"TBOO" not in answer.body and b"version 2" not in answer.body
        stored = sandbox.repo.read("Condition", cid).resource()
        assert "note" not in stored, stored


def test_a_partner_keeps_seeing_what_it_sent_back(sandbox: Sandbox, trust_call: Call) -> None:
    # The labels in what it read are the server's: sent back, they are not kept as if
    # the trust had set them (which would hide the resource from the partner itself).
    gp = _caller(sandbox, "gp")
    cid = f"round-trip-{uuid.uuid4().hex[:12]}"
    assert trust_call("PUT", f"Condition/{cid}", _copy(sandbox, SEEN_WHOLE, cid)).status == 201
    shown = orjson.loads(gp("GET", f"Condition/{cid}").body)
    assert shown["meta"]["security"]
    shown["note"] = [{"text": "Reviewed"}]
    assert gp("PUT", f"Condition/{cid}", shown).status == 200
    assert "security" not in sandbox.repo.read("Condition", cid).resource()["meta"]
    again = orjson.loads(gp("GET", f"Condition/{cid}").body)
    assert gp("PUT", f"Condition/{cid}", again).status == 200


def test_transactions_answer_every_entry_and_refuse_contradictions(
    sandbox: Sandbox, trust_call: Call
) -> None:
    gp = _caller(sandbox, "gp")
    first, second = (f"tx-{uuid.uuid4().hex[:12]}" for _ in range(2))
    for cid in (first, second):
        assert trust_call("PUT", f"Condition/{cid}", _copy(sandbox, SEEN_WHOLE, cid)).status == 201
    assert trust_call("DELETE", f"Condition/{first}").status == 204

    def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}

    # Deleting what is deleted already is done, beside another deletion.
    both = gp(
        "POST",
        "",
        transaction(
            {"request": {"method": "DELETE", "url": f"Condition/{first}"}},
            {"request": {"method": "DELETE", "url": f"Condition/{second}"}},
        ),
    )
    assert both.status == 200, both.body
    assert [e["response"]["status"] for e in orjson.loads(both.body)["entry"]] == ["204", "204"]

    # Two entries creating the same match: a contradiction in the bundle, not a race.
    marker = uuid.uuid4().hex
    condition = _copy(
        sandbox, SEEN_WHOLE, "x", identifier=[{"system": "urn:test", "value": marker}]
    )
    condition.pop("id")
    create = {
        "resource": condition,
        "request": {
            "method": "POST",
            "url": "Condition",
            "ifNoneExist": f"identifier=urn:test|{marker}",
        },
    }
    twice = trust_call("POST", "", transaction(create, create))
    assert twice.status == 400 and b"another entry" in twice.body, twice.body
    made = trust_call("POST", "", transaction(create))
    assert made.status == 200, made.body
    made_id = orjson.loads(made.body)["entry"][0]["response"]["location"].split("/")[-3]
    deleted_then_matched = trust_call(
        "POST",
        "",
        transaction({"request": {"method": "DELETE", "url": f"Condition/{made_id}"}}, create),
    )
    assert deleted_then_matched.status == 400, deleted_then_matched.body
    assert trust_call("GET", f"Condition/{made_id}").status == 200

    # Malformed versions are the client's error, never the server's.
    as_number = {"request": {"method": "DELETE", "url": f"Condition/{made_id}", "ifMatch": 1}}
    assert trust_call("POST", "", transaction(as_number)).status == 400
    assert trust_call("GET", f"Condition/{made_id}/_history/99999999999999999999").status == 400
    stale = {"request": {"method": "DELETE", "url": f"Condition/{made_id}", "ifMatch": 'W/"7"'}}
    assert trust_call("POST", "", transaction(stale)).status == 412


@pytest.mark.parametrize("client_id", ["gp", "social-care"])
def test_a_reference_a_partner_writes_cannot_probe_another_patients_record(
    sandbox: Sandbox, trust_call: Call, client_id: str
) -> None:
    """A Goal written into C's record by the partner, pointing at a need in A's
    record (which it may not see): read back, the reference goes as one to nothing
    does, so it tells neither that the need exists nor what it holds."""
    partner = _caller(sandbox, client_id)
    assert partner("GET", "Condition/a-need-work").status == 404
    goal = copy.deepcopy(sandbox.repo.read("Goal", "c-goal-home").resource())
    goal.pop("id")
    goal.pop("meta")
    created: list[str] = []

    def kept(target: str) -> bool:
        made = partner("POST", "Goal", {**goal, "addresses": [{"reference": target}]})
        assert made.status == 201, made.body
        created.append(orjson.loads(made.body)["id"])
        shown = orjson.loads(partner("GET", f"Goal/{created[-1]}").body)
        return "addresses" in shown

    try:
        assert kept("Condition/a-need-work") == kept(f"Condition/{uuid.uuid4()}")
        assert not kept("Patient/a-patient")
    finally:
        for goal_id in created:
            assert trust_call("DELETE", f"Goal/{goal_id}").status == 204


@pytest.mark.parametrize("naming", ["identifier", "text"])
def test_a_partner_cannot_tell_what_is_withheld_by_naming_it_in_what_it_writes(
    sandbox: Sandbox, trust_call: Call, naming: str
) -> None:
    """A need in C's record withheld from the GP, and one that is not there: named in a
    task the GP writes (by a reference by identifier alone, or by `Type/id` in a note
    beside a reference to it), neither the write nor the task read back tells the GP
    which of them is there."""
    gp = _caller(sandbox, "gp")
    system = "https://example.org/fhir/Id/epr-need"
    hidden, absent = (f"need-{uuid.uuid4().hex[:12]}" for _ in range(2))
    need = _copy(
        sandbox, _withheld_key("gp"), hidden, identifier=[{"system": system, "value": hidden}]
    )
    assert trust_call("PUT", f"Condition/{hidden}", need).status == 201
    assert gp("GET", f"Condition/{hidden}").status == 404
    task = copy.deepcopy(sandbox.repo.read("Task", "c-transfer-coordination").resource())
    for k in ("id", "meta", "text", "requester", "owner"):
        task.pop(k, None)
    created: list[str] = []

    def answer(rid: str) -> tuple[int, bytes]:
        if naming == "identifier":
            named = {"focus": {"type": "Condition", "identifier": {"system": system, "value": rid}}}
        else:
            named = {
                "focus": {"reference": f"Condition/{rid}"},
                "note": [{"text": f"Condition/{rid}"}],
            }
        return _written_and_read_back(gp, created, {**task, **named}, rid, ("focus", "note"))

    _alike_then_removed(answer, hidden, absent, trust_call, "Task", created, f"Condition/{hidden}")


@pytest.mark.parametrize("naming", ["typed", "untyped", "contained"])
def test_a_partner_cannot_tell_what_the_store_holds_by_naming_a_party_by_identifier(
    sandbox: Sandbox, trust_call: Call, naming: str
) -> None:
    """An organisation the GP may not be told of (a probation unit), and an identifier
    no organisation has: named by identifier in an encounter the GP writes (in a
    reference by identifier alone, with its type or without, or in a contained
    organisation), neither the write nor the encounter read back tells the GP which
    of them the store holds."""
    gp = _caller(sandbox, "gp")
    system = "https://fhir.nhs.uk/Id/ods-organization-code"
    hidden, absent = (f"X{uuid.uuid4().hex[:8].upper()}" for _ in range(2))
    unit = _copy(
        sandbox,
        "Organization/c-probation",
        hidden,
        identifier=[{"system": system, "value": hidden}],
    )
    assert trust_call("PUT", f"Organization/{hidden}", unit).status == 201
    encounter = _copy(sandbox, "Encounter/c-review-2026-09", "unused")
    for k in ("id", "participant", "location", "hospitalization"):
        encounter.pop(k, None)
    created: list[str] = []

    def answer(value: str) -> tuple[int, bytes]:
        named: dict[str, Any] = {"identifier": {"system": system, "value": value}}
        written = {**encounter, "serviceProvider": named}
        if naming == "typed":
            named["type"] = "Organization"
        elif naming == "contained":
            # Typed as an agency the GP may be told of: a party no rule labels is
            # withheld, and what contains it with it.
            practice = sandbox.repo.read("Organization", "c-gp-practice").resource()
            party = {"resourceType": "Organization", "id": "unit", "type": practice["type"]}
            written["contained"] = [{**party, "identifier": [named["identifier"]]}]
            written["serviceProvider"] = {"reference": "#unit"}
        shown = ("resourceType", "serviceProvider", "contained")
        return _written_and_read_back(gp, created, written, value, shown)

    planted = f"Organization/{hidden}"
    _alike_then_removed(answer, hidden, absent, trust_call, "Encounter", created, planted)


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_partners_read_in_a_bundle_sees_what_the_bundle_wrote(
    sandbox: Sandbox, trust_call: Call, kind: str
) -> None:
    """A GET after a PUT of the same resource, in one Bundle, answers the version the
    PUT made, as for the trust."""
    gp = _caller(sandbox, "gp")
    cid = f"seen-after-write-{kind}-{uuid.uuid4().hex[:8]}"
    assert trust_call("PUT", f"Condition/{cid}", _copy(sandbox, SEEN_WHOLE, cid)).status == 201
    changed = orjson.loads(gp("GET", f"Condition/{cid}").body)
    changed.pop("meta")
    changed["note"] = [{"text": "written in the bundle"}]
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"resource": changed, "request": {"method": "PUT", "url": f"Condition/{cid}"}},
            {"request": {"method": "GET", "url": f"Condition/{cid}"}},
        ],
    }
    answer = gp("POST", "", bundle)
    assert answer.status == 200, answer.body
    written, read = orjson.loads(answer.body)["entry"]
    assert written["response"]["etag"] == read["response"]["etag"] == 'W/"2"'
    assert read["resource"].get("note") == changed["note"]


@pytest.mark.usefixtures("audit_store_fails")
@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_bundle_whose_reads_cannot_be_audited_says_what_it_wrote(
    sandbox: Sandbox, trust_call: Call, kind: str
) -> None:
    """The writes of a partner's Bundle are stored before its reads' AuditEvents are
    recorded. When those cannot be, the reads are refused (503, nothing of them sent)
    but the answer still says what was written, so that the client does not send the
    writes again."""
    gp = _caller(sandbox, "gp")
    marker = uuid.uuid4().hex
    goal = copy.deepcopy(sandbox.repo.read("Goal", "c-goal-home").resource())
    for name in ("id", "meta"):
        goal.pop(name)
    goal["identifier"] = [{"system": "urn:fuzz", "value": marker}]
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"resource": goal, "request": {"method": "POST", "url": "Goal"}},
            {"request": {"method": "GET", "url": "CarePlan/c-careplan"}},
        ],
    }
    answer = gp("POST", "", bundle)
    assert answer.status == 200, answer.body
    written, read = orjson.loads(answer.body)["entry"]
    assert written["response"]["status"] == "201"
    assert read["response"]["status"] == "503" and "resource" not in read
    assert b"c-careplan" not in answer.body.replace(b"CarePlan/c-careplan", b"")
    made = orjson.loads(
        trust_call("GET", "Goal", query=[("identifier", f"urn:fuzz|{marker}")]).body
    )
    assert made["total"] == 1
    # Nothing written, nothing to report: a Bundle of reads alone is refused whole.
    reads_alone = gp("POST", "", {**bundle, "entry": bundle["entry"][1:]})
    assert reads_alone.status == 503


@pytest.mark.parametrize(
    "target",
    [
        "Practitioner/a-consultant",  # of another patient's record
        "Organization/d-nursing-home",
        "http://testserver/fhir/Practitioner/d-health-board-nurse",
        "Practitioner/a-consultant/_history/1",
        "x?/Practitioner/a-consultant",  # read by the index as its last two segments
        "a b/Practitioner/d-home-nurse",  # white space before them too
        "Practitioner/a-consultant/_history/1 x",  # or in what follows _history
        "Organization/d-nursing-home/_history/ 2",
        "urn:x:Organization/d-nursing-home",
        f"Practitioner/no-such-{uuid.uuid4().hex[:8]}",  # absent: refused alike
    ],
)
@pytest.mark.parametrize("how", ["create", "transaction"])
def test_a_partner_cannot_refer_its_way_to_professionals_it_may_not_see(
    sandbox: Sandbox, trust_call: Call, target: str, how: str
) -> None:
    """Professionals and organisations go when shared content refers to them: were a
    partner's own reference enough, it could write one into a record it sees and then
    fetch, by `_include`, any of them in the store (and learn which are there)."""
    gp = _caller(sandbox, "gp")
    assert gp("GET", reference_key_of(target)).status == 404
    encounter = _copy(sandbox, "Encounter/c-review-2026-09", "unused")
    encounter.pop("id")
    encounter["participant"] = [{"individual": {"reference": target}}]
    if how == "create":
        made = gp("POST", "Encounter", encounter)
    else:
        made = gp(
            "POST",
            "",
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {"resource": encounter, "request": {"method": "POST", "url": "Encounter"}}
                ],
            },
        )
    assert made.status == 403, made.body
    assert b"Encounter.participant[0].individual" in made.body
    assert b"its own organisation" in made.body
    assert target.split("/")[-1].encode() not in made.body or "no-such" in target


def reference_key_of(target: str) -> str:
    parts = target.replace("urn:x:", "").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def test_a_partner_may_name_its_own_organisation_and_keep_what_it_was_shown(
    sandbox: Sandbox, trust_call: Call
) -> None:
    gp = _caller(sandbox, "gp")
    encounter = _copy(sandbox, "Encounter/c-review-2026-09", "unused")
    encounter.pop("id")
    encounter["serviceProvider"] = {"reference": "Organization/c-gp-practice"}
    # Another professional as a contained resource; by identifier alone only its own
    # organisation (the server would look another up, and tell what it found).
    lewis = {"system": "urn:test:gmc", "value": "7654321"}
    encounter["contained"] = [
        {"resourceType": "Practitioner", "id": "lewis", "identifier": [lewis]}
    ]
    encounter["participant"] = [{"individual": {"reference": "#lewis", "display": "Dr Lewis"}}]
    ods = sandbox.repo.read("Organization", "c-gp-practice").resource()["identifier"][0]
    by_identifier = {**encounter, "serviceProvider": {"identifier": ods}}
    made = gp("POST", "Encounter", by_identifier)
    assert made.status == 201, made.body
    assert trust_call("DELETE", f"Encounter/{orjson.loads(made.body)['id']}").status == 204
    elsewhere = {**encounter, "participant": [{"individual": {"identifier": lewis}}]}
    assert gp("POST", "Encounter", elsewhere).status == 403
    made = gp("POST", "Encounter", encounter)
    assert made.status == 201, made.body
    new_id = orjson.loads(made.body)["id"]
    try:
        # A resource it sees whole, its references to the trust's professionals kept.
        seen = orjson.loads(gp("GET", SEEN_WHOLE).body)
        assert any(ref.startswith("Practitioner/") for ref in _refs(seen))
        seen["meta"] = {k: v for k, v in seen["meta"].items() if k != "security"}
        updated = gp("PUT", SEEN_WHOLE, seen)
        assert updated.status == 200, updated.body
    finally:
        assert trust_call("DELETE", f"Encounter/{new_id}").status == 204


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_a_partners_write_keeps_the_stored_meta_and_its_answer_shows_none_of_it(
    sandbox: Sandbox, trust_call: Call
) -> None:
    """The trust's meta source, tags and extensions, never shown to a partner, are
    neither changed by its update nor shown in the answer to it (alone or in a
    transaction)."""
    rid = f"meta-{uuid.uuid4().hex[:10]}"
    need = _copy(sandbox, SEEN_WHOLE, rid)
    hidden = {
        "source": "https://epr.example/ward-seven",
        "tag": [{"system": "https://epr.example/tags", "code": "vip"}],
        "extension": [{"url": "https://epr.example/x", "valueString": "imported"}],
    }
    need["meta"] = {**need.get("meta", {}), **hidden}
    assert trust_call("PUT", f"Condition/{rid}", need).status == 201
    gp = _caller(sandbox, "gp")
    try:
        seen = orjson.loads(gp("GET", f"Condition/{rid}").body)
        assert not set(seen["meta"]) & set(hidden)
        seen["meta"] = {
            "source": "https://partner.example",
            "tag": [{"system": "https://partner.example/tags", "code": "x"}],
        }
        seen["note"] = [{"text": "Reviewed"}]
        answer = gp("PUT", f"Condition/{rid}", seen)
        assert answer.status == 200, answer.body
        assert not set(orjson.loads(answer.body)["meta"]) & set(hidden)
        seen["note"] = [{"text": "Reviewed again"}]
        in_bundle = gp(
            "POST",
            "",
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {"resource": seen, "request": {"method": "PUT", "url": f"Condition/{rid}"}}
                ],
            },
        )
        assert in_bundle.status == 200, in_bundle.body
        written = orjson.loads(in_bundle.body)["entry"][0]["resource"]
        assert written["note"] == [{"text": "Reviewed again"}]
        assert not set(written["meta"]) & set(hidden)
        stored = sandbox.repo.read("Condition", rid).resource()["meta"]
        assert {k: stored[k] for k in hidden} == hidden
    finally:
        assert trust_call("DELETE", f"Condition/{rid}").status == 204


@pytest.mark.parametrize("naming", ["identifier", "text", "professional"])
def test_a_partner_cannot_tell_what_the_stored_meta_it_is_not_shown_names(
    sandbox: Sandbox, trust_call: Call, naming: str
) -> None:
    """The trust's meta extensions are never shown to a partner: a name its update may
    keep because the version it replaces held it is one of what it was shown, so
    whether the GP may write a name (by identifier alone, `Type/id` in a note, a
    professional) does not tell whether the hidden meta holds it."""
    gp = _caller(sandbox, "gp")
    lewis = {"system": "urn:test:gmc", "value": f"{uuid.uuid4().int % 10**7:07d}"}
    named = {
        "identifier": (
            {"valueReference": {"identifier": lewis}},
            {"asserter": {"identifier": lewis}},
        ),
        "text": ({"valueString": "Goal/c-goal-x"}, {"note": [{"text": "Goal/c-goal-x"}]}),
        "professional": (
            {"valueReference": {"reference": "Practitioner/a-consultant"}},
            {"asserter": {"reference": "Practitioner/a-consultant"}},
        ),
    }[naming]
    created: list[str] = []

    def answer(in_meta: bool) -> int:
        rid = f"meta-{uuid.uuid4().hex[:10]}"
        need = _copy(sandbox, SEEN_WHOLE, rid)
        value = named[0] if in_meta else {"valueString": "imported"}
        need["meta"] = {"extension": [{"url": "https://epr.example/x", **value}]}
        assert trust_call("PUT", f"Condition/{rid}", need).status == 201
        created.append(rid)
        seen = orjson.loads(gp("GET", f"Condition/{rid}").body)
        assert "extension" not in seen["meta"]
        seen.pop("meta")
        return gp("PUT", f"Condition/{rid}", {**seen, **named[1]}).status

    try:
        assert answer(in_meta=True) == answer(in_meta=False) == 403
    finally:
        for rid in created:
            assert trust_call("DELETE", f"Condition/{rid}").status == 204


def test_a_partner_cannot_name_a_professional_in_a_canonical_either(sandbox: Sandbox) -> None:
    gp = _caller(sandbox, "gp")
    plan = {
        "resourceType": "CarePlan",
        "status": "active",
        "intent": "plan",
        "subject": {"reference": "Patient/c-patient"},
        "instantiatesCanonical": ["Practitioner/a-consultant"],
    }
    made = gp("POST", "CarePlan", plan)
    assert made.status == 403, made.body
    assert b"CarePlan.instantiatesCanonical[0]" in made.body


def test_a_deletion_of_what_is_now_withheld_is_not_told_either(
    sandbox: Sandbox, trust_call: Call
) -> None:
    """Seen, deleted, then made again as something withheld from the GP: every version,
    the deletion too, answers as an id never there does."""
    gp = _caller(sandbox, "gp")
    rid = f"gone-{uuid.uuid4().hex[:10]}"
    need = _copy(sandbox, SEEN_WHOLE, rid)
    assert trust_call("PUT", f"Condition/{rid}", need).status == 201
    assert gp("GET", f"Condition/{rid}").status == 200
    assert trust_call("DELETE", f"Condition/{rid}").status == 204
    hidden = {**need, "meta": {"security": [{"system": TBOO[0], "code": TBOO[1]}]}}
    assert trust_call("PUT", f"Condition/{rid}", hidden).status == 201
    absent = f"never-{uuid.uuid4().hex[:10]}"
    for version in (1, 2, 3):
        here = gp("GET", f"Condition/{rid}/_history/{version}")
        there = gp("GET", f"Condition/{absent}/_history/{version}")
        assert _answer(here, rid) == _answer(there, absent), version


def test_a_partner_may_mention_addresses_and_other_servers_and_keep_its_meta(
    sandbox: Sandbox, trust_call: Call
) -> None:
    """Only what the index would read as a reference to this server's party is refused:
    a note mentioning a web address, or an extension's own URL, names nothing; and what
    a partner put in meta (its system, as source) does not stop its own later update."""
    gp = _caller(sandbox, "gp")
    need = _copy(sandbox, SEEN_WHOLE, "unused")
    for k in ("id", "recorder", "asserter"):
        need.pop(k, None)
    need["note"] = [
        {"text": "see https://www.nhs.uk/service-search/Organization/12345 and Location/ward-3"}
    ]
    need["extension"] = [
        {
            "url": "https://example.org/fhir/StructureDefinition/Location/preferred",
            "valueString": "ward",
        }
    ]
    need["meta"] = {"source": "https://gp-system.example.net/emis"}
    made = gp("POST", "Condition", need)
    assert made.status == 201, made.body
    rid = orjson.loads(made.body)["id"]
    try:
        seen = orjson.loads(gp("GET", f"Condition/{rid}").body)
        seen["meta"] = {k: v for k, v in seen["meta"].items() if k != "security"}
        seen["note"].append({"text": "Reviewed"})
        assert gp("PUT", f"Condition/{rid}", seen).status == 200
        stored = sandbox.repo.read("Condition", rid).resource()
        assert stored["meta"]["source"] == "https://gp-system.example.net/emis"
    finally:
        trust_call("DELETE", f"Condition/{rid}")
