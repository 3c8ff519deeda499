"""POST /token (client credentials: secret or private_key_jwt) and scope enforcement."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import RSAKey

from cpa_fhir.sandbox import parse_scope
from tests.sandbox.conftest import KEYS

TOKEN_URL = "http://testserver/token"


def _assertion(**claims: Any) -> str:
    key = RSAKey.import_key(json.loads((KEYS / "gp-backend-private.jwk.json").read_text()))
    now = int(time.time())
    body = {
        "iss": "gp-backend",
        "sub": "gp-backend",
        "aud": TOKEN_URL,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
    }
    body.update(claims)
    return jwt.encode({"alg": "RS384", "kid": "gp-backend-demo"}, body, key, algorithms=["RS384"])


def _token(http: TestClient, **form: str) -> Any:
    return http.post("/token", data={"grant_type": "client_credentials", **form})


def test_secret_in_body_or_basic_auth(http: TestClient) -> None:
    r = _token(http, client_id="gp", client_secret="gp-demo-secret")
    assert r.status_code == 200 and r.json()["token_type"] == "bearer"
    assert r.headers["cache-control"] == "no-store"
    r = http.post(
        "/token", data={"grant_type": "client_credentials"}, auth=("gp", "gp-demo-secret")
    )
    assert r.status_code == 200
    token = r.json()["access_token"]
    assert (
        http.get(
            "/fhir/Patient/c-patient", headers={"authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )


def test_private_key_jwt(http: TestClient) -> None:
    assertion = _assertion()
    form = {
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    r = _token(http, **form)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert (
        http.get(
            "/fhir/CarePlan/c-careplan", headers={"authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
    replay = _token(http, **form)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": "http://elsewhere/token"},
        {"exp": int(time.time()) - 10},
        {"exp": int(time.time()) + 3600},
        {"sub": "gp"},
        {"nbf": int(time.time()) + 3600},
        {"nbf": "0"},
    ],
    ids=["wrong audience", "expired", "too long", "sub is not the client", "not yet", "nbf text"],
)
def test_bad_assertions_are_refused(http: TestClient, claims: dict[str, Any]) -> None:
    r = _token(
        http,
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion=_assertion(**claims),
    )
    assert r.status_code in (400, 401) and r.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"client_id": "gp", "client_secret": "wrong"}, "invalid_client"),
        ({"client_id": "nobody", "client_secret": "x"}, "invalid_client"),
        (
            {"grant_type": "password", "client_id": "gp", "client_secret": "gp-demo-secret"},
            "unsupported_grant_type",
        ),
        (
            {"client_id": "gp", "client_secret": "gp-demo-secret", "scope": "system/*.write"},
            "invalid_scope",
        ),
        (
            {"client_id": "gp", "client_secret": "gp-demo-secret", "scope": "user/*.read"},
            "invalid_scope",
        ),
    ],
)
def test_token_errors_follow_rfc6749(http: TestClient, form: dict[str, str], error: str) -> None:
    r = _token(http, **form)
    assert r.status_code in (400, 401)
    assert r.json()["error"] == error


ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
GP_BASIC = ("gp", "gp-demo-secret")


def test_an_assertion_valid_from_now_is_taken(http: TestClient) -> None:
    now = int(time.time())
    r = _token(
        http, client_assertion_type=ASSERTION_TYPE, client_assertion=_assertion(nbf=now, iat=now)
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "auth", [("gp", "wrong"), ("nobody", "x"), "Basic !!!"], ids=["secret", "client", "garbled"]
)
def test_a_client_failing_http_basic_gets_401_and_a_basic_challenge(
    http: TestClient, auth: Any
) -> None:
    """RFC 6749 §5.2: authenticated in the Authorization header, it is told so there."""
    form = {"grant_type": "client_credentials"}
    if isinstance(auth, str):
        r = http.post("/token", data=form, headers={"authorization": auth})
    else:
        r = http.post("/token", data=form, auth=auth)
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_client"
    assert r.headers["www-authenticate"].startswith("Basic ")
    assert r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "body",
    [
        b"grant_type=password&grant_type=client_credentials&client_id=gp&client_secret=gp-demo-secret",
        b"grant_type=client_credentials&client_id=trust&client_id=gp&client_secret=gp-demo-secret",
    ],
    ids=["grant_type", "client_id"],
)
def test_a_parameter_given_twice_is_an_invalid_request(http: TestClient, body: bytes) -> None:
    """RFC 6749 §3.2: parameters are sent once; which of two would count is a guess."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = http.post("/token", content=body, headers=form)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request"
    assert "more than once" in r.json()["error_description"]


@pytest.mark.parametrize(
    ("form", "basic"),
    [
        ({"client_id": "trust", "client_secret": "nope"}, GP_BASIC),
        ({"client_secret": "gp-demo-secret"}, GP_BASIC),
        ({"client_id": "trust"}, GP_BASIC),  # another client named than authenticated
        ({"client_assertion_type": ASSERTION_TYPE, "client_assertion": "{assertion}"}, GP_BASIC),
        (
            {
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": "{assertion}",
                "client_id": "gp",
                "client_secret": "gp-demo-secret",
            },
            None,
        ),
    ],
    ids=["basic+post", "basic+secret", "basic+other-id", "assertion+basic", "assertion+secret"],
)
def test_two_ways_of_authenticating_in_one_request_are_refused(
    http: TestClient, form: dict[str, str], basic: tuple[str, str] | None
) -> None:
    """RFC 6749 §2.3: one client authentication method a request (a token had gone to
    the header's client whatever the form said)."""
    form = {k: _assertion() if v == "{assertion}" else v for k, v in form.items()}
    r = http.post("/token", data={"grant_type": "client_credentials", **form}, auth=basic)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request"


def test_an_assertion_with_another_client_id_is_refused(http: TestClient) -> None:
    form = {"client_assertion_type": ASSERTION_TYPE, "client_assertion": _assertion()}
    r = _token(http, client_id="trust", **form)
    assert r.status_code == 400 and r.json()["error"] == "invalid_client", r.text


def test_basic_with_the_same_client_id_in_the_form_is_one_method(http: TestClient) -> None:
    form = {"grant_type": "client_credentials", "client_id": "gp"}
    assert http.post("/token", data=form, auth=GP_BASIC).status_code == 200


def test_an_oversized_form_is_a_413(http: TestClient) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = http.post("/token", content=b"a" * (5 * 1024 * 1024 + 1), headers=form)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "invalid_request"


def test_narrowed_scopes_are_enforced(http: TestClient) -> None:
    token = _token(
        http, client_id="trust", client_secret="trust-demo-secret", scope="system/Patient.read"
    ).json()
    assert token["scope"] == "system/Patient.read"
    headers = {"authorization": f"Bearer {token['access_token']}"}
    assert http.get("/fhir/Patient/c-patient", headers=headers).status_code == 200
    refused = http.get("/fhir/CarePlan/c-careplan", headers=headers)
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"


def test_smart_scope_forms() -> None:
    assert parse_scope("system/CarePlan.read") == ("CarePlan", frozenset({"read", "search"}))
    assert parse_scope("system/Flag.rs") == ("Flag", frozenset({"read", "search"}))
    assert parse_scope("system/*.cud")[1] == frozenset({"create", "update", "delete"})
