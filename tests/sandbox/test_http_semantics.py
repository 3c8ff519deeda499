"""HTTP and FHIR semantics a client relies on, on SQLite and PostgreSQL: write
preconditions (If-None-Match, If-Unmodified-Since), media types compared without case,
content coding refused, a re-creation answered 201, HEAD and nesting in Bundles, and
`_summary=count` kept to searches."""

from __future__ import annotations

import copy
import logging
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import anyio
import orjson
import pytest

from cpa_fhir.sandbox import Sandbox, create_app
from tests.sandbox.conftest import Fhir, outcome

FLAG = "Flag/c-risk-self-harm"


def _new_flag(trust: Fhir) -> tuple[str, dict[str, Any]]:
    flag = copy.deepcopy(trust.get(FLAG).json())
    flag["id"] = f"http-{uuid.uuid4().hex[:12]}"
    flag.pop("meta")
    made = trust.put(f"Flag/{flag['id']}", flag)
    assert made.status_code == 201, made.text
    return f"Flag/{flag['id']}", made.json()


@pytest.mark.parametrize("tag", ["*", 'W/"1"', '"1"', 'W/"7", W/"1"'])
def test_if_none_match_stops_a_write_over_what_is_there(trust: Fhir, tag: str) -> None:
    key, flag = _new_flag(trust)
    changed = {**flag, "status": "inactive"}
    outcome(trust.put(key, changed, headers={"if-none-match": tag}), 412)
    outcome(trust.http.delete(f"/fhir/{key}", headers={**trust.headers, "if-none-match": tag}), 412)
    assert trust.get(key).json()["status"] == flag["status"]
    assert trust.put(key, changed, headers={"if-none-match": 'W/"9"'}).status_code == 200


def test_if_none_match_star_creates_what_is_not_there(trust: Fhir) -> None:
    key, flag = _new_flag(trust)
    other = {**flag, "id": f"http-{uuid.uuid4().hex[:12]}"}
    made = trust.put(f"Flag/{other['id']}", other, headers={"if-none-match": "*"})
    assert made.status_code == 201, made.text


def test_if_unmodified_since_stops_a_write_over_a_later_change(trust: Fhir) -> None:
    key, flag = _new_flag(trust)
    before = format_datetime(datetime.now(UTC) - timedelta(days=1), usegmt=True)
    after = format_datetime(datetime.now(UTC) + timedelta(days=1), usegmt=True)
    changed = {**flag, "status": "inactive"}
    outcome(trust.put(key, changed, headers={"if-unmodified-since": before}), 412)
    assert trust.put(key, changed, headers={"if-unmodified-since": after}).status_code == 200
    deleting = {**trust.headers, "if-unmodified-since": before}
    outcome(trust.http.delete(f"/fhir/{key}", headers=deleting), 412)


def test_a_resource_made_again_after_its_deletion_is_created(trust: Fhir) -> None:
    key, flag = _new_flag(trust)
    assert trust.delete(key).status_code == 204
    assert trust.get(key).status_code == 410
    again = trust.put(key, flag)
    assert again.status_code == 201, again.text
    assert again.headers["etag"] == 'W/"3"'


@pytest.mark.parametrize("media", ["Application/FHIR+JSON", "APPLICATION/JSON; charset=UTF-8"])
def test_media_types_are_compared_without_case(trust: Fhir, media: str) -> None:
    _, flag = _new_flag(trust)
    flag.pop("id")
    made = trust.http.post(
        "/fhir/Flag", json=flag, headers={**trust.headers, "content-type": media, "accept": media}
    )
    assert made.status_code == 201, made.text
    patched = trust.http.patch(
        f"/fhir/Flag/{made.json()['id']}",
        json=[{"op": "replace", "path": "/status", "value": "inactive"}],
        headers={**trust.headers, "content-type": "Application/JSON-Patch+JSON"},
    )
    assert patched.status_code == 200, patched.text


def test_a_coded_body_is_refused_not_misread(trust: Fhir) -> None:
    _, flag = _new_flag(trust)
    flag.pop("id")
    for coding in ("gzip", "deflate", "br"):
        sent = trust.http.post(
            "/fhir/Flag",
            json=flag,
            headers={
                **trust.headers,
                "content-type": "application/fhir+json",
                "content-encoding": coding,
            },
        )
        assert coding in outcome(sent, 415)["issue"][0]["details"]["text"]


@pytest.mark.parametrize("client_id", ["trust", "gp"])
@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_a_head_entry_answers_as_a_get_without_the_body(
    as_client: Any, client_id: str, kind: str
) -> None:
    client: Fhir = as_client(client_id)
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"request": {"method": "HEAD", "url": "Patient/c-patient"}},
            {"request": {"method": "GET", "url": "Patient/c-patient"}},
        ],
    }
    answer = client.post("", bundle)
    assert answer.status_code == 200, answer.text
    head, get = answer.json()["entry"]
    assert head["response"]["status"] == get["response"]["status"] == "200"
    assert head["response"]["etag"] == get["response"]["etag"]
    assert "resource" not in head and get["resource"]["id"] == "c-patient"


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_a_bundle_within_a_bundle_is_refused(trust: Fhir, kind: str) -> None:
    inner = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient/c-patient"}}],
    }
    outer = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [{"request": {"method": "POST", "url": ""}, "resource": inner}],
    }
    answer = trust.post("", outer)
    if kind == "transaction":
        assert "not the base URL" in outcome(answer, 400)["issue"][0]["details"]["text"]
    else:
        (entry,) = answer.json()["entry"]
        assert entry["response"]["status"] == "400"
        assert "resource" not in entry


@pytest.mark.parametrize("client_id", ["trust", "gp"])
def test_summary_count_is_for_searches(as_client: Any, client_id: str) -> None:
    client: Fhir = as_client(client_id)
    said = outcome(client.get("Patient/c-patient", params={"_summary": "count"}), 400)
    assert "for searches" in said["issue"][0]["details"]["text"]
    assert (
        client.get("Patient", params={"_summary": "count", "_id": "c-patient"}).status_code == 200
    )


def test_if_match_star_writes_only_over_what_is_there(trust: Fhir) -> None:
    key, flag = _new_flag(trust)
    assert (
        trust.put(key, {**flag, "status": "inactive"}, headers={"if-match": "*"}).status_code == 200
    )
    absent = {**flag, "id": f"http-{uuid.uuid4().hex[:12]}"}
    said = outcome(trust.put(f"Flag/{absent['id']}", absent, headers={"if-match": "*"}), 412)
    assert "If-Match: *" in said["issue"][0]["details"]["text"]
    assert trust.get(f"Flag/{absent['id']}").status_code == 404
    gone = trust.http.delete(
        f"/fhir/Flag/{absent['id']}", headers={**trust.headers, "if-match": "*"}
    )
    outcome(gone, 412)


def test_a_stale_if_match_fails_whatever_else_is_asked(trust: Fhir) -> None:
    key, flag = _new_flag(trust)
    assert trust.put(key, {**flag, "status": "inactive"}).status_code == 200  # now at 2
    later = format_datetime(datetime.now(UTC) + timedelta(days=1), usegmt=True)
    for extra in ({"if-unmodified-since": later}, {"if-none-match": 'W/"99"'}):
        stale = {"if-match": 'W/"1"', **extra}
        outcome(trust.put(key, {**flag, "status": "active"}, headers=stale), 412)
        outcome(trust.http.delete(f"/fhir/{key}", headers={**trust.headers, **stale}), 412)
    assert trust.get(key).json()["meta"]["versionId"] == "2"


def test_an_if_match_on_what_is_not_there_says_so(trust: Fhir) -> None:
    """A version named by If-Match of a resource never made, or deleted, is refused
    (412) with words a person can act on, not a version of nothing."""
    key, flag = _new_flag(trust)
    assert trust.http.delete(f"/fhir/{key}", headers=trust.headers).status_code == 204
    absent = f"Flag/http-{uuid.uuid4().hex[:12]}"
    for where in (key, absent):
        body = {**flag, "id": where.split("/")[1]}
        said = outcome(trust.put(where, body, headers={"if-match": 'W/"1"'}), 412)
        text = said["issue"][0]["details"]["text"]
        assert text == f"{where} is not there, not at version 1", text
        said = outcome(trust.put(where, body, headers={"if-match": 'W/"abc"'}), 412)
        assert "None" not in said["issue"][0]["details"]["text"]


def test_a_patch_honours_the_write_preconditions_and_refuses_a_coded_body(trust: Fhir) -> None:
    key, _ = _new_flag(trust)
    ops = [{"op": "replace", "path": "/status", "value": "inactive"}]
    patch = {**trust.headers, "content-type": "application/json-patch+json"}
    before = format_datetime(datetime.now(UTC) - timedelta(days=1), usegmt=True)
    for extra in ({"if-unmodified-since": before}, {"if-none-match": "*"}):
        outcome(trust.http.patch(f"/fhir/{key}", json=ops, headers={**patch, **extra}), 412)
    outcome(
        trust.http.patch(f"/fhir/{key}", json=ops, headers={**patch, "content-encoding": "gzip"}),
        415,
    )
    assert trust.get(key).json()["status"] != "inactive"


def test_a_transaction_entry_honours_if_none_match(trust: Fhir) -> None:
    key, flag = _new_flag(trust)
    entry = {
        "resource": {**flag, "status": "inactive"},
        "request": {"method": "PUT", "url": key, "ifNoneMatch": "*"},
    }
    answer = trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    outcome(answer, 412)
    assert trust.get(key).json()["meta"]["versionId"] == "1"


def test_a_body_too_deep_for_the_parser_is_a_400(as_client: Any) -> None:
    gp: Fhir = as_client("gp")
    deep = b'{"resourceType":"Patient","extension":' + b"[" * 1010 + b"1.50" + b"]" * 1010 + b"}"
    outcome(gp.post("Patient/$validate", deep), 400)


def test_an_integer_written_minus_zero_is_an_integer(trust: Fhir) -> None:
    _, flag = _new_flag(trust)
    flag.pop("id")
    text = orjson.dumps(
        {**flag, "extension": [{"url": "https://local.example/n", "valueInteger": 7}]}
    )
    made = trust.post("Flag", text.replace(b'"valueInteger":7', b'"valueInteger":-0'))
    assert made.status_code == 201, made.text


def test_a_conditional_write_honours_the_write_preconditions(trust: Fhir) -> None:
    key, flag = _new_flag(trust)
    criteria = {"_id": key.split("/")[1]}
    before = format_datetime(datetime.now(UTC) - timedelta(days=1), usegmt=True)
    for extra in ({"if-none-match": "*"}, {"if-unmodified-since": before}):
        outcome(
            trust.put("Flag", {**flag, "status": "inactive"}, params=criteria, headers=extra), 412
        )
        gone = trust.http.delete("/fhir/Flag", params=criteria, headers={**trust.headers, **extra})
        outcome(gone, 412)
    nothing = {"_id": f"none-{uuid.uuid4().hex[:10]}"}
    outcome(
        trust.put(
            "Flag", {**flag, "id": nothing["_id"]}, params=nothing, headers={"if-match": "*"}
        ),
        412,
    )
    entry = {
        "resource": {**flag, "status": "inactive"},
        "request": {"method": "PUT", "url": f"Flag?_id={criteria['_id']}", "ifNoneMatch": "*"},
    }
    outcome(
        trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}), 412
    )
    assert trust.get(key).json()["meta"]["versionId"] == "1"


@pytest.mark.parametrize(
    ("method", "url", "allow"),
    [
        ("POST", "Patient/a-patient", "GET, HEAD, PUT, DELETE, PATCH"),
        ("PATCH", "Patient", "GET, HEAD, POST, PUT, DELETE"),
        ("GET", "", "POST"),
        ("DELETE", "", "POST"),
        ("POST", "metadata", "GET, HEAD"),
        ("GET", "Patient/_search", "POST"),
        ("GET", "Patient/$validate", "POST"),
        ("POST", "Patient/_history", "GET, HEAD"),
        ("PUT", "Patient/a-patient/_history", "GET, HEAD"),
        ("DELETE", "Patient/a-patient/_history/1", "GET, HEAD"),
        ("GET", "Patient/a-patient/$validate", "POST"),
        ("OPTIONS", "Patient/a-patient", "GET, HEAD, PUT, DELETE, PATCH"),  # the framework's
        ("TRACE", "metadata", "GET, HEAD"),
    ],
)
def test_a_405_names_the_methods_the_url_takes_in_allow(
    trust: Fhir, method: str, url: str, allow: str
) -> None:
    """RFC 9110 §15.5.6: a 405 carries Allow."""
    body = b'{"resourceType": "Patient"}' if method in ("POST", "PUT", "PATCH") else None
    headers = {**trust.headers, "content-type": "application/fhir+json"}
    refused = trust.http.request(method, f"/fhir/{url}", content=body, headers=headers)
    said = outcome(refused, 405)
    assert refused.headers["allow"] == allow
    assert said["issue"][0]["code"] == "not-supported"
    if "HEAD" not in allow:  # HEAD is GET less the body: refused alike
        head = trust.http.head(f"/fhir/{url}", headers=trust.headers)
        assert (head.status_code, head.headers["allow"]) == (405, allow)


def test_a_405_in_a_batch_is_the_entry_s_and_the_token_endpoint_takes_post(trust: Fhir) -> None:
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "DELETE", "url": "Patient/a-patient/_history/1"}}],
    }
    answer = trust.post("", batch)
    assert answer.status_code == 200, answer.text
    assert answer.json()["entry"][0]["response"]["status"] == "405"
    assert trust.http.get("/fhir", headers=trust.headers).headers["allow"] == "POST"
    assert trust.http.get("/token").headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("tag", "status"),
    [
        ('W/"01"', 412),  # an ETag is an opaque string: "01" is not "1"
        ('"01"', 412),
        ('W/"x"', 412),
        ('W/"1", W/"2"', 200),  # a list holds if any tag names the current version
        ('W/"2", "1"', 200),
        ('W/"2", W/"3"', 412),
        ('W/"2", W/"01"', 412),
        ('"1', 400),
        ('W/"1" W/"2"', 400),
    ],
)
def test_if_match_compares_tags_as_strings_and_takes_a_list(
    trust: Fhir, tag: str, status: int
) -> None:
    for method in ("PUT", "PATCH", "DELETE", "transaction", "conditional"):
        key, flag = _new_flag(trust)  # at version 1
        changed = {**flag, "status": "inactive"}
        headers = {**trust.headers, "if-match": tag}
        if method == "PUT":
            answer = trust.put(key, changed, headers={"if-match": tag})
        elif method == "PATCH":
            ops = b'[{"op": "replace", "path": "/status", "value": "inactive"}]'
            patch_type = {"content-type": "application/json-patch+json"}
            answer = trust.http.patch(
                f"/fhir/{key}", content=ops, headers={**headers, **patch_type}
            )
        elif method == "DELETE":
            answer = trust.http.delete(f"/fhir/{key}", headers=headers)
        elif method == "transaction":
            entry = {"resource": changed, "request": {"method": "PUT", "url": key, "ifMatch": tag}}
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
            answer = trust.post("", bundle)
        else:
            criteria = {"_id": flag["id"]}
            answer = trust.put("Flag", changed, params=criteria, headers={"if-match": tag})
        written = 204 if method == "DELETE" else 200
        assert answer.status_code == (written if status == 200 else status), (method, answer.text)
        if status != 200:
            assert trust.get(key).json()["meta"]["versionId"] == "1"


def test_if_none_match_compares_tags_as_strings_and_takes_a_list(trust: Fhir) -> None:
    key, _ = _new_flag(trust)
    for tag, status in (('W/"01"', 200), ('W/"7", W/"1"', 304), ('"1"', 304)):
        read = trust.get(key, headers={"if-none-match": tag})
        assert read.status_code == status, tag


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        ("application/fhir+json;q=0", 406),  # refused by its weight
        ("application/fhir+json; q=0.0, */*", 406),  # the most specific range decides
        ("*/*;q=0", 406),
        ("application/fhir+json; fhirVersion=3.0", 406),  # R4 (4.0) only is served
        ('application/fhir+json; fhirVersion="3.0", application/json;q=0', 406),
        ("application/fhir+json; fhirVersion=4.0", 200),
        ("application/fhir+json; fhirVersion=3.0, application/fhir+json; fhirVersion=4.0", 200),
        ("application/fhir+json;q=0, application/json;q=0.5", 200),
        ("text/html, */*;q=0.1", 200),
        ("application/fhir+json;q=0.001", 200),
    ],
)
def test_accept_weights_and_fhir_version_are_honoured(
    trust: Fhir, accept: str, status: int
) -> None:
    read = trust.get(FLAG, headers={"accept": accept})
    assert read.status_code == status, read.text
    assert read.json()["resourceType"] == ("Flag" if status == 200 else "OperationOutcome")
    by_format = trust.get(FLAG, params={"_format": accept})
    assert by_format.status_code == status, by_format.text


@pytest.mark.parametrize("charset", ["iso-8859-1", '"latin1"', "utf-16", "us-ascii"])
def test_a_body_in_a_charset_other_than_utf8_is_a_415(trust: Fhir, charset: str) -> None:
    key, flag = _new_flag(trust)
    created = {**flag, "code": {"text": "café"}}
    created.pop("id")
    media = f"application/fhir+json; charset={charset}"
    said = outcome(trust.post("Flag", created, headers={"content-type": media}), 415)
    assert "UTF-8 only" in said["issue"][0]["details"]["text"]
    outcome(trust.put(key, {**flag, "status": "inactive"}, headers={"content-type": media}), 415)
    patch = trust.http.patch(
        f"/fhir/{key}",
        content=b"[]",
        headers={**trust.headers, "content-type": f"application/json-patch+json;charset={charset}"},
    )
    outcome(patch, 415)
    search = trust.http.post(
        "/fhir/Flag/_search",
        content=b"status=active",
        headers={
            **trust.headers,
            "content-type": f"application/x-www-form-urlencoded; charset={charset}",
        },
    )
    outcome(search, 415)
    assert trust.get(key).json()["meta"]["versionId"] == "1"


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", '"Utf-8"'])
def test_a_body_in_utf8_is_taken_however_the_charset_is_written(trust: Fhir, charset: str) -> None:
    _, flag = _new_flag(trust)
    flag.pop("id")
    flag["code"] = {"text": "café"}
    media = f"application/fhir+json; charset={charset}"
    made = trust.post("Flag", flag, headers={"content-type": media})
    assert made.status_code == 201, made.text
    assert made.json()["code"]["text"] == "café"


@pytest.mark.parametrize("path", ["/fhir/Patient", "/token"])
def test_a_client_leaving_mid_body_is_a_quiet_abort(
    sandbox: Sandbox, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Content-Length 100, part of the body, then gone: no fault of the server's, so no
    exception out of the app (the server logged it as an error, with a traceback)."""
    app = create_app(sandbox, audit_process=False)
    messages = [
        {"type": "http.request", "body": b'{"resourceType":', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/fhir+json"),
            (b"content-length", b"100"),
        ],
    }  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        anyio.run(app, scope, receive, send)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert sent[0]["status"] == 400  # to no one: the client has gone


@pytest.mark.parametrize("inner", [5, ["Patient"], {"a": 1}])
def test_a_contained_resource_type_that_is_no_string_is_named(trust: Fhir, inner: Any) -> None:
    """Not "Not valid FHIR R4: can only concatenate str (not "int") to str"."""
    _, flag = _new_flag(trust)
    flag.pop("id")
    flag["contained"] = [{"resourceType": inner}]
    said = outcome(trust.post("Flag", flag), 422)
    errors = [i for i in said["issue"] if i["severity"] == "error"]
    assert [i["expression"] for i in errors] == [["Flag.contained[0].resourceType"]], errors
    text = errors[0]["details"]["text"]
    assert text.startswith("contained[0].resourceType must be a string"), text
    assert "concatenate" not in str(said)
    entry = {
        "resource": {
            "resourceType": "Basic",
            "code": {"text": "x"},
            "contained": [{"resourceType": inner}],
        }
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{**entry, "request": {"method": "POST", "url": "Basic"}}],
    }
    said = outcome(trust.post("", bundle), 422)
    errors = [i for i in said["issue"] if i["severity"] == "error"]
    assert errors[0]["expression"] == ["Bundle.entry[0].resource.contained[0].resourceType"]
    assert errors[0]["details"]["text"].startswith("contained[0].resourceType must be a string")


@pytest.mark.parametrize("kind", ["single", "batch", "transaction"])
def test_deleting_what_was_never_there_is_no_error(trust: Fhir, kind: str) -> None:
    """R4 http.html#delete: "Upon successful deletion, or if the resource does not exist
    at all, the server should return either a 200 OK if the response contains a
    payload, or a 204 No Content with no response payload". A delete names the state
    the client wants, which holds already; with If-Match there is no version to match
    (RFC 9110 §13.1.1), so that is still a 412."""
    key = f"Flag/never-{uuid.uuid4().hex[:12]}"
    if kind == "single":
        assert trust.delete(key).status_code == 204
        stale = trust.http.delete(f"/fhir/{key}", headers={**trust.headers, "if-match": 'W/"1"'})
        outcome(stale, 412)
    else:
        entries = [{"request": {"method": "DELETE", "url": key}}]
        answer = trust.post("", {"resourceType": "Bundle", "type": kind, "entry": entries})
        assert answer.status_code == 200, answer.text
        assert answer.json()["entry"][0]["response"]["status"] == "204"
    assert trust.get(key).status_code == 404  # nothing was made by it
