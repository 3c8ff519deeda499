"""Clients, scopes and tokens of the sandbox.

OAuth 2.0 client credentials (RFC 6749 §4.4) with `client_secret_basic`,
`client_secret_post` or `private_key_jwt` (RFC 7523, as SMART Backend Services
use it: https://hl7.org/fhir/smart-app-launch/backend-services.html); access
tokens are JWTs signed with the store's key; scopes are SMART system scopes,
v1 (`system/CarePlan.read`) or v2 (`system/CarePlan.rs`). Pure: the caller
supplies the time, the key and the registry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import unquote

from authlib.oauth2.rfc6749.errors import (
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    UnsupportedGrantTypeError,
)
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey

from cpa_fhir.errors import FhirError

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_ALGORITHM = "HS256"
ASSERTION_ALGORITHMS = ["RS384", "ES384", "RS256", "ES256"]
# How far ahead of this server's clock a client's may run, for an assertion's nbf.
CLOCK_SKEW = 60
TRUST = "mental-health-trust"
Interaction = Literal["read", "search", "create", "update", "delete"]
_V2 = {"read": "r", "search": "s", "create": "c", "update": "u", "delete": "d"}


class AuthFailure(FhirError):
    """A request without a valid token (401) or beyond its scopes (403)."""

    code = "security"

    def __init__(self, message: str, *, status: int):
        super().__init__(message, code="login" if status == 401 else "forbidden")
        self.status = status


@dataclass(frozen=True, slots=True)
class Client:
    """A registered client and whom it speaks for."""

    id: str
    partner_type: str
    purpose: str
    scopes: frozenset[str]
    reference: str | None = None  # Organization/... or RelatedPerson/...
    identifiers: frozenset[tuple[str, str]] = frozenset()
    exceptions: tuple[str, ...] = ()
    secret_sha256: str | None = None
    jwks: Mapping[str, Any] | None = None

    @property
    def sees_everything(self) -> bool:
        return self.partner_type == TRUST


@dataclass(frozen=True, slots=True)
class Registry:
    clients: Mapping[str, Client]
    token_lifetime: int = 900
    seen_assertions: set[str] = field(default_factory=set)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_registry(data: Mapping[str, Any], jwks: Mapping[str, Mapping[str, Any]]) -> Registry:
    """Check `sandbox/clients.toml` data; `jwks` maps the files it names to their content."""
    raw = data.get("client")
    if not isinstance(raw, Mapping) or not raw:
        raise FhirError("the client registry defines no [client.*]", code="invalid")
    clients: dict[str, Client] = {}
    for cid, spec in raw.items():
        where = f"client '{cid}'"
        if not isinstance(spec, Mapping):
            raise FhirError(f"{where} must be a table", code="invalid")
        for key in ("partner_type", "purpose", "scopes"):
            if key not in spec:
                raise FhirError(f"{where} needs {key}", code="invalid")
        scopes = spec["scopes"]
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise FhirError(f"{where}: scopes must be a list of strings", code="invalid")
        for s in scopes:
            parse_scope(s)
        reference = spec.get("organization") or spec.get("related_person")
        idents: set[tuple[str, str]] = set()
        if "identifier" in spec:
            system, _, value = str(spec["identifier"]).rpartition("|")
            idents.add((system, value))
        secret = spec.get("secret")
        jwks_file = spec.get("jwks")
        if secret is None and jwks_file is None:
            raise FhirError(f"{where} needs a secret or jwks", code="invalid")
        if jwks_file is not None and jwks_file not in jwks:
            raise FhirError(f"{where}: its jwks file {jwks_file} was not found", code="invalid")
        clients[cid] = Client(
            id=cid,
            partner_type=str(spec["partner_type"]),
            purpose=str(spec["purpose"]),
            scopes=frozenset(scopes),
            reference=str(reference) if reference else None,
            identifiers=frozenset(idents),
            exceptions=tuple(spec.get("exceptions", ())),
            secret_sha256=_sha256(secret) if isinstance(secret, str) else None,
            jwks=jwks[jwks_file] if jwks_file is not None else None,
        )
    return Registry(clients, int(data.get("token_lifetime_seconds", 900)))


# -- scopes -------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def parse_scope(scope: str) -> tuple[str, frozenset[str]]:
    """`system/Type.read|write|*` or v2 `system/Type.cruds` -> (type or *, interactions)."""
    context, _, rest = scope.partition("/")
    rtype, _, access = rest.partition(".")
    if context != "system" or not rtype or not access:
        raise FhirError(f"'{scope}' is not a SMART system scope", code="invalid")
    if access == "read":
        return rtype, frozenset({"read", "search"})
    if access == "write":
        return rtype, frozenset({"create", "update", "delete"})
    if access == "*":
        return rtype, frozenset(_V2)
    letters = set(access.split("?")[0])
    if not letters or not letters <= set("cruds"):
        raise FhirError(f"'{scope}' has an unknown access '{access}'", code="invalid")
    return rtype, frozenset(k for k, v in _V2.items() if v in letters)


@lru_cache(maxsize=4096)
def allows(scopes: frozenset[str], resource_type: str, interaction: Interaction) -> bool:
    for scope in scopes:
        rtype, interactions = parse_scope(scope)
        if rtype in ("*", resource_type) and interaction in interactions:
            return True
    return False


def require(scopes: frozenset[str], resource_type: str, interaction: Interaction) -> None:
    if not allows(scopes, resource_type, interaction):
        raise AuthFailure(
            f"the token's scopes do not allow {interaction} of {resource_type}", status=403
        )


# -- tokens -------------------------------------------------------------------------


def new_signing_key() -> str:
    return secrets.token_urlsafe(48)


def _key(signing_key: str) -> OctKey:
    return OctKey.import_key(signing_key.encode())


def issue_token(
    client: Client,
    scopes: frozenset[str],
    *,
    now: int,
    lifetime: int,
    signing_key: str,
    issuer: str,
) -> dict[str, Any]:
    """The token response (RFC 6749 §5.1) for a client granted `scopes`."""
    claims = {
        "iss": issuer,
        "sub": client.id,
        "iat": now,
        "exp": now + lifetime,
        "scope": " ".join(sorted(scopes)),
        "jti": secrets.token_hex(8),
    }
    token = jwt.encode({"alg": TOKEN_ALGORITHM}, claims, _key(signing_key))
    return {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": lifetime,
        "scope": claims["scope"],
    }


def verify_token(
    authorization: str | None, registry: Registry, *, now: int, signing_key: str
) -> tuple[Client, frozenset[str]]:
    """The client and scopes of a `Bearer` token (RFC 6750), or AuthFailure 401."""
    client, granted, _ = _verify(authorization, registry, now=now, signing_key=signing_key)
    return client, granted


class TokenVerifier:
    """`verify_token` for a server: a token whose signature checked out is remembered
    until it expires, so each request does not pay for the HMAC and the JWT parsing
    again. Tokens cannot be revoked here, so remembering one changes nothing a
    client can observe."""

    def __init__(self, registry: Registry, signing_key: str, *, max_tokens: int = 10_000):
        self.registry = registry
        self.signing_key = signing_key
        self.max_tokens = max_tokens
        self._verified: dict[str, tuple[Client, frozenset[str], int]] = {}

    def verify(self, authorization: str | None, *, now: int) -> tuple[Client, frozenset[str]]:
        known = self._verified.get(authorization) if authorization else None
        if known is not None and known[2] > now:
            return known[0], known[1]
        client, granted, exp = _verify(
            authorization, self.registry, now=now, signing_key=self.signing_key
        )
        if len(self._verified) >= self.max_tokens:
            self._verified = {a: v for a, v in self._verified.items() if v[2] > now}
            if len(self._verified) >= self.max_tokens:
                self._verified.clear()
        assert authorization is not None
        self._verified[authorization] = (client, granted, exp)
        return client, granted


def _verify(
    authorization: str | None, registry: Registry, *, now: int, signing_key: str
) -> tuple[Client, frozenset[str], int]:
    if not authorization:
        raise AuthFailure("this server needs a bearer token: POST /token first", status=401)
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise AuthFailure("the Authorization header must be 'Bearer <token>'", status=401)
    try:
        decoded = jwt.decode(token.strip(), _key(signing_key), algorithms=[TOKEN_ALGORITHM])
    except Exception:  # whatever a hostile token breaks in the JOSE library: not valid
        raise AuthFailure("the bearer token is not valid", status=401) from None
    claims = decoded.claims
    exp = claims.get("exp")
    if not isinstance(exp, int) or exp <= now:
        raise AuthFailure("the bearer token has expired", status=401)
    client = registry.clients.get(str(claims.get("sub")))
    if client is None:
        raise AuthFailure("the bearer token's client is no longer registered", status=401)
    # A client whose registration narrowed since keeps only what it still has.
    granted = frozenset(s for s in str(claims.get("scope", "")).split() if covers(client.scopes, s))
    return client, granted, exp


def _basic(authorization: str | None) -> tuple[str, str] | None:
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidClientError(description="malformed Basic credentials") from None
    cid, sep, secret = raw.partition(":")
    if not sep:
        raise InvalidClientError(description="malformed Basic credentials")
    return unquote(cid), unquote(secret)


def _unverified_issuer(assertion: str) -> str:
    """The `iss` of a JWT before its signature is checked: only to pick the client's keys."""
    parts = assertion.split(".")
    if len(parts) != 3:
        raise InvalidClientError(description="client_assertion is not a JWT")
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidClientError(description="client_assertion is not a JWT") from None
    return str(payload.get("iss")) if isinstance(payload, dict) else ""


def _assertion_client(
    form: Mapping[str, str], registry: Registry, *, now: int, token_url: str
) -> Client:
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise InvalidClientError(description=f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = form.get("client_assertion", "")
    client = registry.clients.get(_unverified_issuer(assertion))
    if client is None or client.jwks is None:
        raise InvalidClientError(description="unknown client, or one without registered keys")
    try:
        keys = KeySet.import_key_set(dict(client.jwks))  # type: ignore[arg-type]
        claims = jwt.decode(assertion, keys, algorithms=ASSERTION_ALGORITHMS).claims
    except Exception:  # whatever a hostile assertion breaks in the JOSE library: not valid
        raise InvalidClientError(description="client_assertion signature is not valid") from None
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    exp = claims.get("exp")
    jti = claims.get("jti")
    if claims.get("sub") != client.id:
        raise InvalidClientError(description="client_assertion sub must be the client id")
    if token_url not in auds:
        raise InvalidClientError(description=f"client_assertion aud must be {token_url}")
    if not isinstance(exp, int) or exp <= now or exp > now + 300:
        raise InvalidClientError(description="client_assertion exp must be within 5 minutes")
    nbf = claims.get("nbf")
    if nbf is not None and (
        isinstance(nbf, bool) or not isinstance(nbf, int | float) or nbf > now + CLOCK_SKEW
    ):
        raise InvalidClientError(description="client_assertion is not valid yet (nbf)")
    if form.get("client_id", client.id) != client.id:
        raise InvalidClientError(description="client_id names another client than the assertion")
    replay = f"{client.id}:{jti}"
    if not isinstance(jti, str) or replay in registry.seen_assertions:
        raise InvalidClientError(description="client_assertion jti is missing or was used before")
    registry.seen_assertions.add(replay)
    return client


def covers(registered: frozenset[str], requested: str) -> bool:
    """Whether registered scopes include everything a requested scope would allow."""
    rtype, interactions = parse_scope(requested)
    for scope in registered:
        have_type, have = parse_scope(scope)
        if have_type in ("*", rtype) and interactions <= have:
            return True
    return False


def token_request(
    form: Mapping[str, str],
    authorization: str | None,
    registry: Registry,
    *,
    now: int,
    signing_key: str,
    token_url: str,
    issuer: str,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Answer a token request: (status, JSON body, headers), errors as RFC 6749 §5.2
    says. A client authenticating with HTTP Basic that fails is told so by a 401
    with a Basic challenge."""
    basic_used = bool(authorization) and str(authorization).lower().startswith("basic ")
    try:
        # One client authentication method a request (RFC 6749 §2.3).
        methods = [
            name
            for name, used in (
                ("HTTP Basic", basic_used),
                ("client_secret", "client_secret" in form),
                ("client_assertion", "client_assertion" in form),
            )
            if used
        ]
        if len(methods) > 1:
            raise InvalidRequestError(
                description=f"use one client authentication method, not {' and '.join(methods)}"
            )
        if form.get("grant_type") != "client_credentials":
            raise UnsupportedGrantTypeError(str(form.get("grant_type")))
        if "client_assertion" in form:
            client = _assertion_client(form, registry, now=now, token_url=token_url)
        else:
            basic = _basic(authorization)
            cid, secret = (
                basic if basic else (form.get("client_id", ""), form.get("client_secret", ""))
            )
            if basic and form.get("client_id", cid) != cid:
                raise InvalidRequestError(
                    description="client_id names another client than the Authorization header"
                )
            candidate = registry.clients.get(cid)
            if (
                candidate is None
                or candidate.secret_sha256 is None
                or not hmac.compare_digest(candidate.secret_sha256, _sha256(secret))
            ):
                raise InvalidClientError(description="unknown client or wrong secret")
            client = candidate
        asked = form.get("scope")
        if asked:
            granted = set()
            for scope in asked.split():
                try:
                    ok = covers(client.scopes, scope)
                except FhirError:
                    raise InvalidScopeError(description=f"'{scope}' is not a scope") from None
                if ok:
                    granted.add(scope)
            if not granted:
                raise InvalidScopeError(
                    description="none of the scopes asked for is registered for this client"
                )
        else:
            granted = set(client.scopes)
        return (
            200,
            issue_token(
                client,
                frozenset(granted),
                now=now,
                lifetime=registry.token_lifetime,
                signing_key=signing_key,
                issuer=issuer,
            ),
            {},
        )
    except OAuth2Error as exc:
        if isinstance(exc, InvalidClientError) and basic_used:
            # RFC 6749 §5.2: a client that authenticated in the Authorization header
            # gets 401 and a challenge in the scheme it used.
            return 401, dict(exc.get_body()), {"www-authenticate": 'Basic realm="cpa-fhir"'}
        return exc.status_code or 400, dict(exc.get_body()), {}
