"""Requests a client can send that once broke the server: each now gets an
OperationOutcome with a 4xx status (or, for HEAD, GET's headers without the body),
and changes nothing stored.

Found by probing the API with malformed ids, numbers, JSON Patches, nested
Bundles, conditions of the wrong type, hostile tokens and odd methods.
"""

from __future__ import annotations

import base64
import json
import random
import string
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cpa_fhir.sandbox import Sandbox
from tests.common import EXAMPLES
from tests.sandbox.conftest import Fhir, outcome, resource_keys

FLAG = "Flag/c-risk-self-harm"


def _versions(trust: Fhir, key: str) -> int:
    return int(trust.get(f"{key}/_history", params={"_count": "1"}).json()["total"])


def test_an_id_with_a_trailing_newline_is_not_the_id_without_it(trust: Fhir) -> None:
    """`$` in a pattern matches before a final newline: the id must match whole."""
    before = _versions(trust, FLAG)
    for method in (trust.get, trust.delete):
        outcome(method(f"{FLAG}%0A"), 400)
    assert trust.get(FLAG).status_code == 200
    assert _versions(trust, FLAG) == before


@pytest.mark.parametrize(
    "url",
    [
        f"{FLAG}/_history/%C2%B2",  # a superscript two: str.isdigit() says yes, int() no
        "Flag/_history?_count=%C2%B2",
        "Flag/_history?_offset=%C2%B3",
        f"{FLAG}/_history?_since=0001-01-01T00:00:00%2B14:00",
        f"{FLAG}/_history?_since=9999-12-31T23:59:59-14:00",
    ],
)
def test_numbers_and_instants_a_server_cannot_take_are_400(trust: Fhir, url: str) -> None:
    outcome(trust.get(url), 400)


def test_an_offset_past_any_store_is_an_empty_page(trust: Fhir) -> None:
    page = trust.get(f"{FLAG}/_history", params={"_offset": "99999999999999999999"})
    assert page.status_code == 200, page.text
    assert page.json().get("entry", []) == []
    assert page.json()["total"] >= 1


@pytest.mark.parametrize("path", ["status", "/a~", "/~2"])
def test_a_json_patch_whose_path_is_no_json_pointer_is_400(trust: Fhir, path: str) -> None:
    before = _versions(trust, FLAG)
    r = trust.http.patch(
        f"/fhir/{FLAG}",
        content=json.dumps([{"op": "replace", "path": path, "value": "inactive"}]),
        headers={**trust.headers, "content-type": "application/json-patch+json"},
    )
    outcome(r, 400)
    assert _versions(trust, FLAG) == before


def test_the_same_patch_in_a_batch_entry_is_that_entry_s_400(trust: Fhir) -> None:
    patch = base64.b64encode(json.dumps([{"op": "remove", "path": "x"}]).encode()).decode()
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/json-patch+json",
                    "data": patch,
                },
                "request": {"method": "PATCH", "url": FLAG},
            },
            {"request": {"method": "GET", "url": FLAG}},
        ],
    }
    r = trust.post("", bundle)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses[0].startswith("400") and statuses[1].startswith("200")


@pytest.mark.parametrize("profile", [5, ["x"], {"a": 1}])
def test_validate_with_a_profile_that_is_no_url_is_400(trust: Fhir, profile: Any) -> None:
    flag = trust.get(FLAG).json()
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": flag},
            {"name": "profile", "valueUri": profile},
        ],
    }
    outcome(trust.post("Flag/$validate", params), 400)


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth):
        node = {"a": node}
    return node


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_a_bundle_nested_past_any_fhir_content_is_refused_whole(trust: Fhir, kind: str) -> None:
    flags = int(trust.get("Flag", params={"_summary": "count"}).json()["total"])
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "code": {"text": "deep"},
        "subject": {"reference": "Patient/c-patient"},
        "deep": _nested(900),
    }
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [{"resource": flag, "request": {"method": "POST", "url": "Flag"}}],
    }
    body = outcome(trust.post("", bundle), 400)
    assert body["issue"][0]["code"] == "too-costly"
    assert int(trust.get("Flag", params={"_summary": "count"}).json()["total"]) == flags


@pytest.mark.parametrize("condition", [{"ifMatch": 5}, {"ifNoneExist": ["identifier=x"]}])
@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_a_condition_that_is_not_a_string_is_not_skipped(
    trust: Fhir, kind: str, condition: dict[str, Any]
) -> None:
    before = _versions(trust, FLAG)
    flag = trust.get(FLAG).json()
    method, url = ("PUT", FLAG) if "ifMatch" in condition else ("POST", "Flag")
    if method == "POST":
        flag.pop("id")
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [{"resource": flag, "request": {"method": method, "url": url, **condition}}],
    }
    outcome(trust.post("", bundle), 400)
    assert _versions(trust, FLAG) == before


def _jwt_with_header(header: dict[str, Any]) -> str:
    def part(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part({})}.x"


@pytest.mark.parametrize("crit", [5, None, True, 1.5, [5]])
def test_a_token_with_a_malformed_crit_header_is_401(http: TestClient, crit: Any) -> None:
    token = _jwt_with_header({"alg": "HS256", "crit": crit})
    r = http.get(f"/fhir/{FLAG}", headers={"authorization": f"Bearer {token}"})
    outcome(r, 401)


@pytest.mark.parametrize(
    "assertion",
    [
        _jwt_with_header({"alg": "RS384", "crit": 5}),
        "x." + base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode() + ".x",
    ],
)
def test_a_hostile_client_assertion_is_invalid_client(http: TestClient, assertion: str) -> None:
    r = http.post(
        "/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
    )
    assert r.status_code in (400, 401), r.text
    assert r.json()["error"] == "invalid_client"


def test_head_is_get_without_the_body(trust: Fhir) -> None:
    got = trust.get(FLAG)
    head = trust.http.head(f"/fhir/{FLAG}", headers=trust.headers)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["etag"] == got.headers["etag"]
    assert int(head.headers["content-length"]) == len(got.content)


def test_metadata_takes_get_only(http: TestClient, trust: Fhir) -> None:
    assert http.head("/fhir/metadata").status_code == 200
    for method in ("POST", "DELETE"):
        body = outcome(http.request(method, "/fhir/metadata", headers=trust.headers), 405)
        assert body["issue"][0]["code"] == "not-supported"


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("OPTIONS", f"/fhir/{FLAG}", 405),
        ("GET", "/token", 405),
        ("GET", f"/fhir/{FLAG}%0A/_history/1", 404),
        ("GET", "/nowhere", 404),
    ],
)
def test_what_the_framework_answers_is_an_operation_outcome_too(
    http: TestClient, sandbox: Sandbox, method: str, url: str, status: int
) -> None:
    token = sandbox.token_for("trust", "http://testserver/fhir")["access_token"]
    outcome(http.request(method, url, headers={"authorization": f"Bearer {token}"}), status)


def test_thousands_of_digits_in_a_history_count_or_offset_are_no_fault(trust: Fhir) -> None:
    nines = "9" * 5000
    page = trust.get(f"{FLAG}/_history", params={"_offset": nines})
    assert page.status_code == 200, page.text
    assert page.json().get("entry", []) == []
    outcome(trust.get(f"{FLAG}/_history", params={"_count": nines}), 400)


@pytest.mark.parametrize("depth", [100, 400])
def test_a_patch_nesting_deeper_than_a_body_may_is_refused(trust: Fhir, depth: int) -> None:
    before = _versions(trust, FLAG)
    # Written out as text: past a few hundred levels the JSON libraries refuse to.
    ext = '{"url": "https://example.org/deep", "extension": ['
    value = ext * depth + '{"url": "https://example.org/deep"}' + "]}" * depth
    r = trust.http.patch(
        f"/fhir/{FLAG}",
        content=f'[{{"op": "add", "path": "/extension/-", "value": {value}}}]',
        headers={**trust.headers, "content-type": "application/json-patch+json"},
    )
    body = outcome(r, 400)
    assert body["issue"][0]["code"] == "too-costly"
    assert _versions(trust, FLAG) == before


def test_the_api_answers_below_the_root_path_it_is_mounted_at(sandbox: Sandbox) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from cpa_fhir.sandbox import create_app

    outer = Starlette(routes=[Mount("/api", create_app(sandbox, audit_process=False))])
    token = sandbox.token_for("trust", "http://testserver/api/fhir")["access_token"]
    http = TestClient(outer)
    assert http.get("/api/fhir/metadata").status_code == 200
    read = http.get(f"/api/fhir/{FLAG}", headers={"authorization": f"Bearer {token}"})
    assert read.status_code == 200, read.text
    assert read.json()["id"] == "c-risk-self-harm"


def test_a_value_longer_than_an_index_entry_is_stored_and_found(trust: Fhir) -> None:
    """A name of 9,000 characters of no pattern (which no compression brings under
    PostgreSQL's bound on an index entry) is stored, and found by its beginning."""
    rng = random.Random(11)
    family = "".join(rng.choice(string.ascii_letters) for _ in range(9_000))
    created = trust.post("Patient", {"resourceType": "Patient", "name": [{"family": family}]})
    assert created.status_code == 201, created.text
    found = trust.get("Patient", params={"family": family[:30]}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [created.json()["id"]]


# -- found by fuzzing Bundles, preconditions and far-off dates -------------------------


def _count(trust: Fhir, rtype: str) -> int:
    return int(trust.get(rtype, params={"_summary": "count"}).json()["total"])


def _new_flag(trust: Fhir, identifier: str | None = None) -> dict[str, Any]:
    flag = trust.get(FLAG).json()
    flag.pop("id")
    flag.pop("meta")
    if identifier is not None:
        flag["identifier"] = [{"system": "urn:fuzz", "value": identifier}]
    return dict(flag)


@pytest.mark.parametrize("url", ["//[x", "http://[::1", "Flag?x=[y"])
def test_a_transaction_with_an_entry_url_that_is_no_url_writes_nothing(
    trust: Fhir, url: str
) -> None:
    """An unclosed '[' is no URL: refused before the writes, not after they commit."""
    before = _count(trust, "Flag")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _new_flag(trust), "request": {"method": "POST", "url": "Flag"}},
            {"request": {"method": "GET", "url": url}},
        ],
    }
    response = trust.post("", bundle)
    if url == "Flag?x=[y":  # a URL after all: an unknown parameter, answered in the entry
        assert response.status_code == 200, response.text
        trust.delete(response.json()["entry"][0]["response"]["location"].split("/_history")[0])
        return
    outcome(response, 400)
    assert _count(trust, "Flag") == before


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_batch_entry_url_that_is_no_url_is_that_entrys_400(trust: Fhir, method: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": method, "url": "//[x"}},
            {"request": {"method": "GET", "url": FLAG}},
        ],
    }
    response = trust.post("", bundle)
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses[0].startswith("400") and statuses[1].startswith("200"), statuses


@pytest.mark.parametrize("method", ["DELETE", "PATCH"])
def test_a_transaction_entry_id_that_is_no_id_is_400(trust: Fhir, method: str) -> None:
    entry: dict[str, Any] = {"request": {"method": method, "url": "Patient/a\u0000b"}}
    if method == "PATCH":
        entry["resource"] = {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": "W10=",
        }
    response = trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    outcome(response, 400)


THOUSANDS_OF_DIGITS = 'W/"' + "9" * 4301 + '"'


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_an_if_match_of_thousands_of_digits_is_a_stale_version(trust: Fhir, method: str) -> None:
    """No version has so many digits: 412, as for any version that is not there."""
    before = _versions(trust, FLAG)
    body, content_type = json.dumps(trust.get(FLAG).json()), "application/fhir+json"
    if method == "PATCH":
        body, content_type = "[]", "application/json-patch+json"
    headers = {**trust.headers, "if-match": THOUSANDS_OF_DIGITS, "content-type": content_type}
    response = trust.http.request(
        method, f"/fhir/{FLAG}", headers=headers, content=None if method == "DELETE" else body
    )
    outcome(response, 412)
    entry = {"request": {"method": "DELETE", "url": FLAG, "ifMatch": THOUSANDS_OF_DIGITS}}
    outcome(
        trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}), 412
    )
    assert _versions(trust, FLAG) == before


def test_a_conditional_delete_honours_if_match(trust: Fhir) -> None:
    made = trust.post("Flag", _new_flag(trust, "conditional-delete-if-match"))
    assert made.status_code == 201, made.text
    key = f"Flag/{made.json()['id']}"
    url = "/fhir/Flag?identifier=urn:fuzz|conditional-delete-if-match"
    stale = trust.http.delete(url, headers={**trust.headers, "if-match": 'W/"7"'})
    outcome(stale, 412)
    assert trust.get(key).status_code == 200  # nothing lost
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "DELETE", "ifMatch": 'W/"7"', "url": url[6:]}}],
    }
    assert trust.post("", batch).json()["entry"][0]["response"]["status"].startswith("412")
    assert trust.get(key).status_code == 200
    none = trust.http.delete(
        "/fhir/Flag?identifier=urn:fuzz|no-such", headers={**trust.headers, "if-match": 'W/"1"'}
    )
    outcome(none, 412)
    current = trust.http.delete(url, headers={**trust.headers, "if-match": 'W/"1"'})
    assert current.status_code == 204, current.text
    assert trust.get(key).status_code == 410


@pytest.mark.parametrize("path", ["Bundle/$validate", "Bundle"])
def test_a_record_discharged_in_the_last_week_of_9999_is_judged_not_a_500(
    trust: Fhir, path: str
) -> None:
    record = json.loads(next(EXAMPLES.glob("Bundle-record-C-*.json")).read_text())
    for e in record["entry"]:
        if e["resource"].get("id") == "c-admission-2026-04":
            e["resource"]["period"]["end"] = "9999-12-30T11:00:00+00:00"
    response = trust.post(path, record)
    assert response.status_code < 500, response.text
    if response.status_code == 201:
        assert trust.delete(f"Bundle/{response.json()['id']}").status_code == 204


@pytest.mark.parametrize("end", ["9999-12-31", "9999-12", "9999"])
def test_a_consent_until_the_end_of_9999_holds_and_breaks_nothing(
    trust: Fhir, as_client: Any, end: str
) -> None:
    gp: Fhir = as_client("gp")
    shown = resource_keys(gp.get("CarePlan", params={"subject": "Patient/c-patient"}).json())
    assert shown
    consent = trust.get("Consent/c-consent").json()
    original = json.loads(json.dumps(consent))
    consent.pop("meta")
    consent["provision"]["period"]["end"] = end
    try:
        assert trust.put("Consent/c-consent", consent).status_code == 200
        for url in ("Patient/c-patient", "Flag"):
            assert gp.get(url).status_code < 500, url
        again = gp.get("CarePlan", params={"subject": "Patient/c-patient"})
        assert again.status_code == 200 and resource_keys(again.json()) == shown
    finally:
        original.pop("meta")
        assert trust.put("Consent/c-consent", original).status_code == 200


@pytest.mark.parametrize("kind", ["batch", "transaction"])
@pytest.mark.parametrize("method", [["GET"], {"GET": 1}, 7, None])
def test_an_entry_method_that_is_not_text_is_the_clients_error(
    as_client: Any, kind: str, method: Any
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [{"request": {"method": method, "url": "Patient"}}],
    }
    for client_id in ("gp", "trust"):
        outcome(as_client(client_id).post("", bundle), 400)


def test_validate_with_parameters_that_are_not_a_list_is_400(trust: Fhir) -> None:
    for url in ("Flag/$validate", "Flag/c-risk-self-harm/$validate"):
        for parameter in (5, 1.5, True, "text"):
            body = {"resourceType": "Parameters", "parameter": parameter}
            outcome(trust.post(url, body), 400)


def test_a_body_naming_a_property_twice_is_refused_and_stores_nothing(trust: Fhir) -> None:
    """FHIR JSON names each property once: of `"status": "active", "status":
    "inactive"` one parser keeps the first and another the last, so what one side
    checked would not be what the other stored."""
    flag = trust.get(FLAG).json()
    before, flags = _versions(trust, FLAG), int(trust.get("Flag?_summary=count").json()["total"])
    whole = json.dumps({k: v for k, v in flag.items() if k != "meta"})
    twice = whole[:-1] + ', "status": "inactive"}'
    created = twice.replace(f'"id": "{flag["id"]}", ', "")
    entry = '{"resource": %s, "request": {"method": "POST", "url": "Flag"}}'
    transaction = '{"resourceType": "Bundle", "type": "transaction", "entry": [%s]}'
    json_patch = {**trust.headers, "content-type": "application/json-patch+json"}
    fhir_json = {**trust.headers, "content-type": "application/fhir+json"}
    answers = [
        trust.post("Flag", created),
        trust.http.put(f"/fhir/{FLAG}", content=twice, headers=fhir_json),
        trust.post("", transaction % (entry % created)),
        trust.post("Flag/$validate", created),
        trust.http.patch(
            f"/fhir/{FLAG}",
            content='[{"op": "replace", "path": "/status", "value": "inactive", "value": 1}]',
            headers=json_patch,
        ),
    ]
    for answer, name in zip(answers, ["status"] * 4 + ["value"], strict=True):
        said = outcome(answer, 400)["issue"][0]
        assert said["code"] == "structure" and f"'{name}'" in said["details"]["text"]
    assert _versions(trust, FLAG) == before
    assert int(trust.get("Flag?_summary=count").json()["total"]) == flags
    assert trust.get(FLAG).json() == flag


def test_a_resource_of_a_type_without_a_definition_here_is_validated_too(trust: Fhir) -> None:
    procedures = int(trust.get("Procedure?_summary=count").json()["total"])
    said = outcome(trust.post("Procedure", {"resourceType": "Procedure", "bogus": "x"}), 422)
    assert "Procedure.bogus" in [e for i in said["issue"] for e in i.get("expression", [])]
    assert int(trust.get("Procedure?_summary=count").json()["total"]) == procedures
