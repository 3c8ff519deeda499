"""Remembered tokens: `TokenVerifier` answers exactly as `verify_token` would.

A token it has checked is remembered only until it expires; a token signed with
another key is never accepted; what is not a valid token is refused every time,
however often it comes and whatever valid tokens were seen before.
"""

from __future__ import annotations

import base64
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from cpa_fhir.sandbox import Registry, Sandbox, load_registry
from cpa_fhir.sandbox import _app as app_module
from cpa_fhir.sandbox._auth import (
    AuthFailure,
    TokenVerifier,
    issue_token,
    new_signing_key,
    verify_token,
)

NOW = 1_900_000_000
LIFETIME = 900
KEY = new_signing_key()


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


def _token(
    registry: Registry, client_id: str = "gp", *, now: int = NOW, key: str = KEY, **kw: Any
) -> str:
    client = registry.clients[client_id]
    issued = issue_token(
        client,
        kw.pop("scopes", client.scopes),
        now=now,
        lifetime=kw.pop("lifetime", LIFETIME),
        signing_key=key,
        issuer="http://testserver/fhir",
    )
    return f"Bearer {issued['access_token']}"


def _refused(verifier: TokenVerifier, authorization: str | None, now: int) -> AuthFailure:
    with pytest.raises(AuthFailure) as raised:
        verifier.verify(authorization, now=now)
    assert raised.value.status == 401
    return raised.value


def test_a_remembered_token_stops_working_when_it_expires(registry: Registry) -> None:
    verifier = TokenVerifier(registry, KEY)
    token = _token(registry)
    client, scopes = verifier.verify(token, now=NOW)
    assert client.id == "gp" and scopes == registry.clients["gp"].scopes
    for now in (NOW, NOW + 1, NOW + LIFETIME - 1):
        assert verifier.verify(token, now=now)[0].id == "gp"
    for now in (NOW + LIFETIME, NOW + LIFETIME + 1, NOW + 10 * LIFETIME):
        failure = _refused(verifier, token, now)
        assert "expired" in failure.message
    # verify_token, which remembers nothing, agrees at the edge.
    assert verify_token(token, registry, now=NOW + LIFETIME - 1, signing_key=KEY)[0].id == "gp"
    with pytest.raises(AuthFailure):
        verify_token(token, registry, now=NOW + LIFETIME, signing_key=KEY)


def test_a_token_first_seen_after_it_expired_is_refused(registry: Registry) -> None:
    verifier = TokenVerifier(registry, KEY)
    token = _token(registry, lifetime=60)
    _refused(verifier, token, NOW + 60)
    _refused(verifier, token, NOW + 61)


@settings(max_examples=50, deadline=None)
@given(
    lifetime=st.integers(1, 100_000),
    checks=st.lists(st.integers(-10, 200_000), min_size=1, max_size=12),
)
def test_the_verifier_agrees_with_verify_token_at_any_times(
    registry: Registry, lifetime: int, checks: list[int]
) -> None:
    """Times go forward, as a server's clock does; the answer is verify_token's each time."""
    verifier = TokenVerifier(registry, KEY)
    token = _token(registry, lifetime=lifetime)
    for offset in sorted(checks):
        now = NOW + offset
        try:
            expected: Any = verify_token(token, registry, now=now, signing_key=KEY)
        except AuthFailure as exc:
            expected = exc.status
        try:
            got: Any = verifier.verify(token, now=now)
        except AuthFailure as exc:
            got = exc.status
        assert got == expected, (offset, lifetime)


def test_a_token_signed_with_another_key_is_never_accepted(registry: Registry) -> None:
    mine, theirs = TokenVerifier(registry, KEY), TokenVerifier(registry, new_signing_key())
    token = _token(registry)
    assert mine.verify(token, now=NOW)[0].id == "gp"
    for _ in range(3):
        _refused(theirs, token, NOW)
    # Accepted by its own verifier all along; the other's refusal is remembered nowhere.
    assert mine.verify(token, now=NOW + 1)[0].id == "gp"
    foreign = _token(registry, key=new_signing_key())
    for _ in range(3):
        _refused(mine, foreign, NOW)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _garbage(registry: Registry) -> list[str | None]:
    good = _token(registry).split(" ", 1)[1]
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    as_trust = _b64({**claims, "sub": "trust", "scope": "system/*.read system/*.write"})
    longer = _b64({**claims, "exp": claims["exp"] + 10**6})
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    return [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic Z3A6Z3AtZGVtby1zZWNyZXQ=",
        f"Basic {good}",
        f"Token {good}",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        f"Bearer {header}.{payload}",
        f"Bearer {header}.{payload}.",
        f"Bearer {header}.{as_trust}.{signature}",  # claims changed, signature kept
        f"Bearer {header}.{longer}.{signature}",
        f"Bearer {header}.{payload}.{flipped}",
        f"Bearer {_b64({'alg': 'none', 'typ': 'JWT'})}.{as_trust}.",
        f"Bearer {_b64({'alg': 'HS512'})}.{payload}.{signature}",
        f"Bearer {good}x",
        f"Bearer {good[:-1]}",
        f"Bearer {_token(registry, 'gp', now=NOW - 2 * LIFETIME).split(' ', 1)[1]}",  # expired
    ]


def test_garbage_is_refused_every_time(registry: Registry) -> None:
    verifier = TokenVerifier(registry, KEY)
    good = _token(registry)
    garbage = _garbage(registry)
    for _ in range(3):
        for authorization in garbage:
            _refused(verifier, authorization, NOW)
        # A valid token seen in between changes nothing for them.
        assert verifier.verify(good, now=NOW)[0].id == "gp"


@settings(max_examples=200, deadline=None)
@given(authorization=st.one_of(st.none(), st.text(max_size=300), st.text().map("Bearer ".__add__)))
def test_any_string_that_is_not_a_token_is_refused_twice(
    registry: Registry, authorization: str | None
) -> None:
    verifier = TokenVerifier(registry, KEY)
    verifier.verify(_token(registry), now=NOW)
    _refused(verifier, authorization, NOW)
    _refused(verifier, authorization, NOW)


def test_a_token_of_a_client_no_longer_registered_is_refused(registry: Registry) -> None:
    token = _token(registry, "social-care")
    without = Registry({k: v for k, v in registry.clients.items() if k != "social-care"})
    verifier = TokenVerifier(without, KEY)
    for _ in range(2):
        _refused(verifier, token, NOW)


def test_remembering_is_bounded_and_forgets_nothing_it_should_not_accept(
    registry: Registry,
) -> None:
    verifier = TokenVerifier(registry, KEY, max_tokens=3)
    short = [_token(registry, "gp", lifetime=10) for _ in range(3)]
    long = [_token(registry, "social-care") for _ in range(5)]
    for token in short + long:
        verifier.verify(token, now=NOW)
    for token in long:
        assert verifier.verify(token, now=NOW + 20)[0].id == "social-care"
    for token in short:
        _refused(verifier, token, NOW + 20)


# -- over HTTP ---------------------------------------------------------------------------


def test_the_server_refuses_a_remembered_token_once_it_expires(
    sandbox: Sandbox, http: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = sandbox.token_for("gp", "http://testserver/fhir")
    headers = {"authorization": f"Bearer {issued['access_token']}"}
    url = "/fhir/CarePlan/c-careplan"
    assert http.get(url, headers=headers).status_code == 200
    payload = issued["access_token"].split(".")[1]
    # The token's own expiry: the first request may take a while (the server warms up).
    expires = int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])

    def at(moment: float) -> None:
        monkeypatch.setattr(app_module, "time", SimpleNamespace(time=lambda: moment))

    at(expires - 1)
    assert http.get(url, headers=headers).status_code == 200
    for moment in (expires + 1, expires + 3600):
        at(moment)
        refused = http.get(url, headers=headers)
        assert refused.status_code == 401
        assert refused.json()["resourceType"] == "OperationOutcome"
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "c-careplan" not in refused.text


def test_the_server_refuses_tokens_signed_with_another_key_and_garbage(
    sandbox: Sandbox, http: TestClient
) -> None:
    client = sandbox.registry.clients["trust"]
    foreign = issue_token(
        client,
        client.scopes,
        now=int(time.time()),
        lifetime=900,
        signing_key=new_signing_key(),
        issuer="http://testserver/fhir",
    )["access_token"]
    good = sandbox.token_for("gp", "http://testserver/fhir")["access_token"]
    for authorization in [f"Bearer {foreign}", "Bearer x.y.z", "Bearer", f"Bearer {good}."]:
        for _ in range(3):
            r = http.get("/fhir/Patient/c-patient", headers={"authorization": authorization})
            assert r.status_code == 401, authorization
            assert "c-patient" not in r.text
        assert (
            http.get(
                "/fhir/Patient/c-patient", headers={"authorization": f"Bearer {good}"}
            ).status_code
            == 200
        )
