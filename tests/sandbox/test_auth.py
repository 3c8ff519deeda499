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
    ],
    ids=["wrong audience", "expired", "too long", "sub is not the client"],
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
