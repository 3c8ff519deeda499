"""Putting the sandbox together from its configuration (the edge: files and database)."""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from cpa_fhir import __version__
from cpa_fhir._artifacts import find_artifact
from cpa_fhir.config import load_policy
from cpa_fhir.conformance import ConformancePackage, default_package, default_package_dir
from cpa_fhir.consent import RequiredElements
from cpa_fhir.errors import FhirError
from cpa_fhir.fhir import jsonio
from cpa_fhir.sandbox._auth import (
    Registry,
    TokenVerifier,
    issue_token,
    new_signing_key,
    parse_registry,
)
from cpa_fhir.sandbox._capability import capability_statement
from cpa_fhir.sandbox._router import Router
from cpa_fhir.store import SqlRepository
from cpa_fhir.validation import Validator

DEFAULT_DB = "sqlite:///cpa-sandbox.db"
SIGNING_KEY = "sandbox.token-signing-key"


def default_sandbox_dir() -> Path:
    """The sandbox configuration: $CPA_FHIR_SANDBOX, or `sandbox/` of this source checkout."""
    env = os.environ.get("CPA_FHIR_SANDBOX")
    if env:
        return Path(env)
    found = find_artifact("sandbox/clients.toml")
    if found is None:
        raise FhirError(
            "the sandbox configuration was not found: set CPA_FHIR_SANDBOX", code="not-found"
        )
    return found.parent


def load_registry(folder: Path | None = None) -> Registry:
    folder = folder or default_sandbox_dir()
    path = folder / "clients.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FhirError(f"cannot read the client registry {path}: {exc}", code="invalid") from None
    jwks: dict[str, Any] = {}
    for spec in (data.get("client") or {}).values():
        name = spec.get("jwks") if isinstance(spec, dict) else None
        if isinstance(name, str) and (folder / name).is_file():
            jwks[name] = orjson.loads((folder / name).read_bytes())
    return parse_registry(data, jwks)


@dataclass
class Sandbox:
    repo: SqlRepository
    router: Router
    registry: Registry
    signing_key: str
    package: ConformancePackage

    def __post_init__(self) -> None:
        self.tokens = TokenVerifier(self.registry, self.signing_key)

    def close(self) -> None:
        self.router.audit_log.close()
        self.repo.close()

    def token_for(self, client_id: str, issuer: str) -> dict[str, Any]:
        client = self.registry.clients.get(client_id)
        if client is None:
            known = ", ".join(sorted(self.registry.clients))
            raise FhirError(f"no client '{client_id}': the sandbox has {known}", code="not-found")
        return issue_token(
            client,
            client.scopes,
            now=int(time.time()),
            lifetime=self.registry.token_lifetime,
            signing_key=self.signing_key,
            issuer=issuer,
        )


def open_sandbox(
    db_url: str = DEFAULT_DB, *, config: Path | None = None, schema: str | None = None
) -> Sandbox:
    """Open (creating or upgrading the schema of) the sandbox's store."""
    package = default_package()
    repo = SqlRepository(db_url, schema=schema)
    validator = Validator(package)
    router = Router(
        repo,
        validator,
        load_policy(),
        RequiredElements(package),
        lambda base: capability_statement(base, package, repo.parameters, __version__),
    )
    key = repo.setting(SIGNING_KEY, new_signing_key)
    return Sandbox(repo, router, load_registry(config), key, package)


def seed_examples(sandbox: Sandbox, examples: Path | None = None) -> int:
    """Load the example records A–D into a store that has never held a patient; the
    number of resources loaded. One whose patients were all deleted keeps them deleted,
    and what was written since: it is not empty."""
    folder = examples or default_package_dir() / "examples"

    def resources() -> list[dict[str, Any]]:
        found = []
        for path in sorted(folder.glob("Bundle-record-*.json")):
            bundle = jsonio.loads(path.read_bytes())
            found += [e["resource"] for e in bundle["entry"]]
        return found

    return sandbox.repo.load_if_new("Patient", resources)
