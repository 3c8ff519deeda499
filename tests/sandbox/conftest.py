"""A seeded sandbox per backend (SQLite file, PostgreSQL schema), and clients with tokens."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from cpa_fhir.sandbox import Sandbox, create_app, open_sandbox, seed_examples
from tests.store.conftest import (  # noqa: F401 - fixtures: a bare store per backend
    POSTGRES_URL,
    Postgres,
    backend,
    make_store,
    postgres,
    store,
    store_location,
)

BACKENDS = ["sqlite", "postgresql"]


class Fhir:
    """A TestClient speaking FHIR as one registered client."""

    def __init__(self, http: TestClient, token: str | None):
        self.http = http
        self.headers = {"authorization": f"Bearer {token}"} if token else {}

    def get(self, url: str, **kw: Any) -> Any:
        return self.http.get(
            f"/fhir/{url}", headers={**self.headers, **kw.pop("headers", {})}, **kw
        )

    def post(self, url: str, body: Any, **kw: Any) -> Any:
        headers = {"content-type": "application/fhir+json", **self.headers, **kw.pop("headers", {})}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.http.post(f"/fhir/{url}", content=data, headers=headers, **kw)

    def put(self, url: str, body: Any, **kw: Any) -> Any:
        headers = {"content-type": "application/fhir+json", **self.headers, **kw.pop("headers", {})}
        return self.http.put(f"/fhir/{url}", content=json.dumps(body), headers=headers, **kw)

    def delete(self, url: str) -> Any:
        return self.http.delete(f"/fhir/{url}", headers=self.headers)


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sandbox]:
    if request.param == "sqlite":
        box = open_sandbox(f"sqlite:///{tmp_path_factory.mktemp('sandbox') / 'store.db'}")
    else:
        server: Postgres = request.getfixturevalue("postgres")
        box = open_sandbox(POSTGRES_URL, schema=server.new_schema())
    seed_examples(box)
    yield box
    box.close()


@pytest.fixture(scope="module")
def http(sandbox: Sandbox) -> TestClient:
    return TestClient(create_app(sandbox))


@pytest.fixture(scope="module")
def as_client(sandbox: Sandbox, http: TestClient) -> Any:
    def make(client_id: str | None) -> Fhir:
        token = (
            sandbox.token_for(client_id, "http://testserver/fhir")["access_token"]
            if client_id
            else None
        )
        return Fhir(http, token)

    return make


@pytest.fixture(scope="module")
def trust(as_client: Any) -> Fhir:
    return as_client("trust")


def outcome(response: Any, status: int) -> dict[str, Any]:
    """The OperationOutcome a response carries, having checked its status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return dict(body)


def resource_keys(bundle: dict[str, Any]) -> set[str]:
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
    }


KEYS = Path(__file__).resolve().parent.parent / "fixtures" / "keys"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(sandbox: Sandbox) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(sandbox), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the sandbox did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
