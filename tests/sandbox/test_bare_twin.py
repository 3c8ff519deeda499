"""The benchmark's bare twin endpoint: the same exchange as a FHIR request, with no work.

The throughput benchmark's baseline is only fair if the twin sends exactly what the
FHIR endpoint sends for the same request (status, headers and body), and does
none of the work behind it after the first time; and the sandbox proper must not
serve it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cpa_fhir.sandbox import Sandbox, create_app, open_sandbox, seed_examples

TWINNED = [
    "Patient/c-patient",
    "CarePlan/c-careplan",
    "CarePlan?subject=Patient/c-patient&status=active",
    "Flag?patient=Patient/c-patient",
    "Patient/no-such-patient",
]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    sandbox = open_sandbox(f"sqlite:///{tmp_path / 'store.db'}")
    seed_examples(sandbox)
    yield sandbox
    sandbox.close()


def _auth(box: Sandbox, client: str) -> dict[str, str]:
    token = box.token_for(client, "http://testserver/fhir")["access_token"]
    return {"authorization": f"Bearer {token}"}


def _answer(response: Any) -> tuple[int, dict[str, str], Any]:
    """Status, headers and body, less what a searchset Bundle makes afresh each time."""
    body = response.json()
    if body.get("resourceType") == "Bundle":
        body.pop("id", None)
        body.pop("meta", None)
    return response.status_code, dict(response.headers), body


@pytest.mark.parametrize("client", ["trust", "gp"])
def test_the_twin_answers_with_what_the_fhir_endpoint_answers(box: Sandbox, client: str) -> None:
    with TestClient(create_app(box, bare_endpoint=True, audit_process=False)) as http:
        headers = _auth(box, client)
        for path in TWINNED:
            direct = http.get(f"/fhir/{path}", headers=headers)
            twin = http.get(f"/_bare/fhir/{path}", headers=headers)
            assert _answer(twin) == _answer(direct), path
            again = http.get(f"/_bare/fhir/{path}", headers=headers)
            assert (again.status_code, again.headers, again.content) == (
                twin.status_code,
                twin.headers,
                twin.content,
            )


def test_the_twin_keeps_its_first_answer_per_client_and_does_no_work_after(
    box: Sandbox,
) -> None:
    with TestClient(create_app(box, bare_endpoint=True, audit_process=False)) as http:
        trust, gp = _auth(box, "trust"), _auth(box, "gp")
        first_trust = http.get("/_bare/fhir/CarePlan/c-careplan", headers=trust)
        first_gp = http.get("/_bare/fhir/CarePlan/c-careplan", headers=gp)
        # Each client's own answer: the GP's is consent-filtered, the trust's is not.
        assert first_gp.content != first_trust.content
        audited = len(box.repo.referring("AuditEvent", "patient", ("Patient", "c-patient")))
        assert audited >= 1  # the GP's first twin request was a disclosure, recorded

        changed = {**first_trust.json(), "title": "A title written after the first answer"}
        updated = http.put(
            "/fhir/CarePlan/c-careplan",
            json=changed,
            headers={**trust, "content-type": "application/fhir+json"},
        )
        assert updated.status_code == 200, updated.text
        assert (
            http.get("/fhir/CarePlan/c-careplan", headers=trust).json()["title"]
            == (changed["title"])
        )

        for headers, first in ((trust, first_trust), (gp, first_gp)):
            kept = http.get("/_bare/fhir/CarePlan/c-careplan", headers=headers)
            assert (kept.status_code, kept.headers, kept.content) == (
                first.status_code,
                first.headers,
                first.content,
            )
        # The GP's later twin requests disclosed nothing anew, so recorded nothing.
        assert len(box.repo.referring("AuditEvent", "patient", ("Patient", "c-patient"))) == (
            audited
        )


def test_the_sandbox_does_not_serve_the_twin(box: Sandbox) -> None:
    with TestClient(create_app(box, audit_process=False)) as http:
        response = http.get("/_bare/fhir/Patient/c-patient", headers=_auth(box, "trust"))
        assert response.status_code == 404
