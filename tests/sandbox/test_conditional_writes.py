"""Conditional update and delete, and JSON Patch, on SQLite and PostgreSQL:
https://hl7.org/fhir/R4/http.html#cond-update, #cdelete and #patch."""

from __future__ import annotations

import copy
import json
import threading
import uuid
from dataclasses import replace
from typing import Any

import orjson
import pytest

from cpa_fhir.errors import PreconditionFailed
from cpa_fhir.sandbox import Sandbox
from cpa_fhir.sandbox._router import Request
from tests.common import EXAMPLES
from tests.sandbox.conftest import Fhir, outcome

RECORD_A = orjson.loads(next(EXAMPLES.glob("Bundle-record-A-*.json")).read_bytes())
PATCH_TYPE = {"content-type": "application/json-patch+json"}


def _flag(marker: str, **changes: Any) -> dict[str, Any]:
    flag = copy.deepcopy(
        next(e["resource"] for e in RECORD_A["entry"] if e["resource"]["resourceType"] == "Flag")
    )
    flag.pop("id", None)
    flag["identifier"] = [{"system": "urn:test", "value": marker}]
    flag.update(changes)
    return flag


def _count(trust: Fhir, marker: str) -> int:
    found = trust.get("Flag", params={"identifier": f"urn:test|{marker}", "_summary": "count"})
    return int(found.json()["total"])


def _patch(trust: Fhir, url: str, operations: Any, **headers: str) -> Any:
    body = operations if isinstance(operations, bytes) else json.dumps(operations)
    return trust.http.patch(
        f"/fhir/{url}", content=body, headers={**trust.headers, **PATCH_TYPE, **headers}
    )


# -- conditional update ------------------------------------------------------------------


def test_conditional_update_creates_then_updates_the_one_match(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    criteria = {"identifier": f"urn:test|{marker}"}
    created = trust.put("Flag", _flag(marker), params=criteria)
    assert created.status_code == 201, created.text
    fid = created.json()["id"]
    assert created.headers["location"].endswith(f"/Flag/{fid}/_history/1")
    updated = trust.put("Flag", _flag(marker, status="inactive"), params=criteria)
    assert updated.status_code == 200, updated.text
    assert (updated.json()["id"], updated.headers["etag"]) == (fid, 'W/"2"')
    assert trust.get(f"Flag/{fid}").json()["status"] == "inactive"
    assert _count(trust, marker) == 1


def test_conditional_update_refuses_what_it_cannot_do_unambiguously(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    criteria = {"identifier": f"urn:test|{marker}"}
    first = trust.post("Flag", _flag(marker)).json()
    # The body names another resource than the one matched.
    outcome(trust.put("Flag", _flag(marker, id="some-other-flag"), params=criteria), 400)
    # A stale version of the match.
    outcome(trust.put("Flag", _flag(marker), params=criteria, headers={"if-match": 'W/"7"'}), 412)
    # No match, but the body's id is taken by a resource the criteria do not match.
    other = trust.post("Flag", _flag(uuid.uuid4().hex)).json()
    nothing = {"identifier": f"urn:test|{uuid.uuid4().hex}"}
    outcome(trust.put("Flag", _flag(marker, id=other["id"]), params=nothing), 409)
    # Several match: which to update is unknowable.
    trust.post("Flag", _flag(marker))
    outcome(trust.put("Flag", _flag(marker, status="inactive"), params=criteria), 412)
    outcome(trust.put("Flag", _flag(marker)), 400)  # neither id nor criteria
    assert trust.get(f"Flag/{first['id']}").json() == first
    assert trust.get(f"Flag/{other['id']}").json() == other


def test_conditional_update_validates_like_any_write(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    bad = _flag(marker)
    del bad["code"]
    outcome(trust.put("Flag", bad, params={"identifier": f"urn:test|{marker}"}), 422)
    assert _count(trust, marker) == 0


def test_concurrent_conditional_updates_create_one_resource(sandbox: Sandbox) -> None:
    marker = uuid.uuid4().hex
    criteria = f"identifier=urn:test|{marker}"
    barrier = threading.Barrier(6)
    results: list[Any] = []

    def write() -> None:
        barrier.wait()
        try:
            results.append(sandbox.repo.conditional_update(_flag(marker), criteria).id)
        except Exception as exc:  # a writer that lost a race may be told to retry
            results.append(exc)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {r for r in results if isinstance(r, str)}
    query = sandbox.repo.parse("Flag", [("identifier", f"urn:test|{marker}")])
    stored = sandbox.repo.search(query).matches
    assert len(stored) == 1 and ids == {stored[0].id}, results


@pytest.mark.parametrize("conditional", ["ifNoneExist", "conditional update"])
def test_concurrent_transactions_with_a_condition_create_one_resource(
    sandbox: Sandbox, conditional: str
) -> None:
    marker = uuid.uuid4().hex
    criteria = f"identifier=urn:test|{marker}"
    entry = {
        "fullUrl": "urn:uuid:" + str(uuid.uuid4()),
        "resource": _flag(marker),
        "request": {"method": "POST", "url": "Flag", "ifNoneExist": criteria}
        if conditional == "ifNoneExist"
        else {"method": "PUT", "url": f"Flag?{criteria}"},
    }
    body = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    request = Request("POST", "", [], {"content-type": "application/fhir+json"}, body)
    trust = sandbox.registry.clients["trust"]
    barrier = threading.Barrier(6)
    answers: list[Any] = []

    def send() -> None:
        barrier.wait()
        answers.append(sandbox.router.handle(request, trust, trust.scopes))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    query = sandbox.repo.parse("Flag", [("identifier", f"urn:test|{marker}")])
    stored = sandbox.repo.search(query).matches
    assert len(stored) == 1, [a.status for a in answers]
    # Each transaction found the one Flag or made it, or lost a race and was told so.
    for answer in answers:
        assert answer.status in (200, 409), answer.body
        if answer.status == 200:
            location = orjson.loads(answer.body)["entry"][0]["response"]["location"]
            assert f"Flag/{stored[0].id}/" in location
        else:
            assert b"send it again" in answer.body


# -- conditional delete ------------------------------------------------------------------


def test_conditional_delete_removes_the_one_match_only(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    criteria = {"identifier": f"urn:test|{marker}"}
    fid = trust.post("Flag", _flag(marker)).json()["id"]
    assert (
        trust.http.delete("/fhir/Flag", params=criteria, headers=trust.headers).status_code == 204
    )
    outcome(trust.get(f"Flag/{fid}"), 410)
    # Nothing matches now: nothing to do, and no error.
    assert (
        trust.http.delete("/fhir/Flag", params=criteria, headers=trust.headers).status_code == 204
    )


def test_conditional_delete_never_deletes_several_or_all(trust: Fhir) -> None:
    marker = uuid.uuid4().hex
    kept = [trust.post("Flag", _flag(marker)).json()["id"] for _ in range(2)]
    criteria = {"identifier": f"urn:test|{marker}"}
    outcome(trust.http.delete("/fhir/Flag", params=criteria, headers=trust.headers), 412)
    outcome(trust.http.delete("/fhir/Flag", headers=trust.headers), 400)
    assert all(trust.get(f"Flag/{k}").status_code == 200 for k in kept)


# -- partners ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("PUT", "Flag", {}),
        ("DELETE", "Flag", {}),
        ("POST", "Flag", {"if-none-exist": "identifier=urn:test|x"}),
    ],
)
def test_a_partner_cannot_probe_the_store_with_a_conditional_write(
    sandbox: Sandbox, method: str, path: str, headers: dict[str, str]
) -> None:
    # Even one registered with write scopes: whether the criteria found one, none or
    # several would tell it about resources it may not see.
    gp = sandbox.registry.clients["gp"]
    scopes = frozenset({"system/*.read", "system/*.write"})
    writer = replace(gp, scopes=scopes)
    flag = _flag("x")
    request = Request(
        method,
        path,
        [("identifier", "urn:test|x")] if method != "POST" else [],
        {"content-type": "application/fhir+json", **headers},
        orjson.dumps(flag),
    )
    response = sandbox.router.handle(request, writer, scopes)
    assert response.status == 403, response.body
    assert b"trust's own clients" in response.body


def test_a_partner_cannot_probe_the_store_with_a_conditional_create_in_a_transaction(
    sandbox: Sandbox,
) -> None:
    scopes = frozenset({"system/*.read", "system/*.write"})
    writer = replace(sandbox.registry.clients["gp"], scopes=scopes)
    existing = sandbox.repo.create(_flag(uuid.uuid4().hex))
    marker = orjson.loads(existing.content)["identifier"][0]["value"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": _flag(marker),
                "request": {
                    "method": "POST",
                    "url": "Flag",
                    "ifNoneExist": f"identifier=urn:test|{marker}",
                },
            }
        ],
    }
    request = Request(
        "POST", "", [], {"content-type": "application/fhir+json"}, orjson.dumps(bundle)
    )
    response = sandbox.router.handle(request, writer, scopes)
    assert response.status == 403, response.body
    assert existing.content not in response.body


# -- PATCH --------------------------------------------------------------------------------


def test_json_patch_updates_the_current_version(trust: Fhir) -> None:
    fid = trust.post("Flag", _flag(uuid.uuid4().hex)).json()["id"]
    ops = [
        {"op": "test", "path": "/status", "value": "active"},
        {"op": "replace", "path": "/status", "value": "inactive"},
    ]
    patched = _patch(trust, f"Flag/{fid}", ops, **{"if-match": 'W/"1"'})
    assert patched.status_code == 200, patched.text
    assert patched.headers["etag"] == 'W/"2"' and patched.json()["status"] == "inactive"
    assert trust.get(f"Flag/{fid}").json() == patched.json()
    # The same patch again: its test no longer holds.
    outcome(_patch(trust, f"Flag/{fid}", ops), 422)
    outcome(_patch(trust, f"Flag/{fid}", ops[1:], **{"if-match": 'W/"1"'}), 412)
    assert trust.get(f"Flag/{fid}").headers["etag"] == 'W/"2"'


def test_a_patch_is_refused_without_changing_anything(trust: Fhir) -> None:
    before = trust.post("Flag", _flag(uuid.uuid4().hex)).json()
    fid = before["id"]
    # The result must still conform: Flag.code is required.
    outcome(_patch(trust, f"Flag/{fid}", [{"op": "remove", "path": "/code"}]), 422)
    outcome(_patch(trust, f"Flag/{fid}", [{"op": "replace", "path": "/id", "value": "x"}]), 422)
    outcome(_patch(trust, f"Flag/{fid}", [{"op": "remove", "path": "/no-such"}]), 422)
    outcome(_patch(trust, f"Flag/{fid}", [{"op": "frobnicate", "path": "/status"}]), 400)
    outcome(_patch(trust, f"Flag/{fid}", {"op": "remove", "path": "/status"}), 400)
    outcome(_patch(trust, f"Flag/{fid}", b"[not json"), 400)
    wrong_type = trust.http.patch(
        f"/fhir/Flag/{fid}", content=b"[]", headers={**trust.headers, "content-type": "text/plain"}
    )
    outcome(wrong_type, 415)
    outcome(_patch(trust, "Flag/no-such-flag", []), 404)
    assert trust.get(f"Flag/{fid}").json() == before


def test_a_partner_cannot_patch_even_with_the_scope(sandbox: Sandbox) -> None:
    # A patch works on, and answers with, the whole stored resource, withheld parts too.
    scopes = frozenset({"system/*.read", "system/*.write"})
    writer = replace(sandbox.registry.clients["gp"], scopes=scopes)
    before = sandbox.repo.read("CarePlan", "c-careplan")
    ops = [{"op": "add", "path": "/description", "value": "changed by a partner"}]
    headers = {"content-type": "application/json-patch+json"}
    request = Request("PATCH", "CarePlan/c-careplan", [], headers, orjson.dumps(ops))
    response = sandbox.router.handle(request, writer, scopes)
    assert response.status == 403, response.body
    assert sandbox.repo.read("CarePlan", "c-careplan").version_id == before.version_id


def test_a_partner_cannot_patch_without_the_scope(as_client: Any) -> None:
    gp = as_client("gp")
    ops = [{"op": "replace", "path": "/status", "value": "inactive"}]
    outcome(_patch(gp, "Flag/a-risk-self-harm", ops), 403)


def test_capability_statement_declares_conditional_writes_and_patch(trust: Fhir) -> None:
    cs = trust.get("metadata").json()
    assert cs["patchFormat"] == ["application/json-patch+json"]
    flag = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Flag")
    assert (flag["conditionalUpdate"], flag["conditionalDelete"]) == (True, "single")
    assert {"code": "patch"} in flag["interaction"]


def test_conditional_delete_in_the_store_refuses_several(sandbox: Sandbox) -> None:
    marker = uuid.uuid4().hex
    for _ in range(2):
        sandbox.repo.create(_flag(marker))
    with pytest.raises(PreconditionFailed, match="more than one"):
        sandbox.repo.conditional_delete("Flag", f"identifier=urn:test|{marker}")


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize("client_id", ["gp", "trust"])
def test_an_if_match_list_on_a_conditional_entry_searches_nothing_it_may_not(
    sandbox: Sandbox, method: str, client_id: str
) -> None:
    """An If-Match list is compared with what the criteria match, so they are searched
    early: never for a partner (403, not 412 for several matching), nor past a
    token's scopes (403 for a trust token that may not write Flags)."""
    marker = uuid.uuid4().hex
    for _ in range(2):  # several match: searched, it would be a 412
        sandbox.repo.create(_flag(marker))
    scopes = frozenset({"system/*.read", "system/*.write"})
    if client_id == "trust":
        scopes = frozenset({"system/*.read", "system/Patient.write"})
    writer = replace(sandbox.registry.clients[client_id], scopes=scopes)
    entry: dict[str, Any] = {
        "request": {
            "method": method,
            "url": f"Flag?identifier=urn:test|{marker}",
            "ifMatch": 'W/"1", W/"2"',
        }
    }
    if method == "PUT":
        entry["resource"] = _flag(marker)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    request = Request(
        "POST", "", [], {"content-type": "application/fhir+json"}, orjson.dumps(bundle)
    )
    response = sandbox.router.handle(request, writer, scopes)
    assert response.status == 403, response.body


def test_a_failed_header_condition_is_a_conflict_and_several_matches_say_so(
    trust: Fhir,
) -> None:
    """A 412 for a condition of the headers that the resource does not meet is issue
    `conflict` (R4 http.html), as for a stale If-Match; criteria matching several
    are `multiple-matches`. Neither is a `duplicate`: nothing was written twice."""
    marker, absent = uuid.uuid4().hex, uuid.uuid4().hex
    made = trust.post("Flag", _flag(marker)).json()
    url, body = f"Flag/{made['id']}", {**_flag(marker), "id": made["id"]}
    refused = [
        trust.put(url, body, headers={"if-match": 'W/"7"'}),
        trust.put(url, body, headers={"if-none-match": "*"}),
        trust.put(url, body, headers={"if-unmodified-since": "Mon, 01 Jan 2001 00:00:00 GMT"}),
        trust.put(f"Flag/{absent}", body | {"id": absent}, headers={"if-match": "*"}),
        trust.put(
            "Flag", _flag(marker), params={"identifier": "urn:test|none"}, headers={"if-match": "*"}
        ),
    ]
    entry = {
        "resource": _flag(marker),
        "request": {"method": "PUT", "url": "Flag?identifier=urn:test|none", "ifMatch": "*"},
    }
    refused.append(
        trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    )
    assert [outcome(r, 412)["issue"][0]["code"] for r in refused] == ["conflict"] * len(refused)
    trust.post("Flag", _flag(marker))
    several = trust.put("Flag", _flag(marker), params={"identifier": f"urn:test|{marker}"})
    assert outcome(several, 412)["issue"][0]["code"] == "multiple-matches"
    assert trust.get(url).json() == made
