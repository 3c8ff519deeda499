"""The benchmark's bare twin endpoint: the same exchange as a FHIR request, with no work.

The throughput benchmark's baseline is only fair if the twin sends exactly what the
FHIR endpoint sends for the same request (status, headers and body), and does
none of the work behind it after the first time. Since it then neither authorises
nor audits, it sends a kept answer only to the very same request, keeps no error,
answers loopback clients only, and the sandbox proper does not serve it.
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


LOOPBACK = ("127.0.0.1", 50000)


def _twin(box: Sandbox) -> TestClient:
    return TestClient(create_app(box, bare_endpoint=True, audit_process=False), client=LOOPBACK)


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
    with _twin(box) as http:
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
    with _twin(box) as http:
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
    with TestClient(create_app(box, audit_process=False), client=LOOPBACK) as http:
        response = http.get("/_bare/fhir/Patient/c-patient", headers=_auth(box, "trust"))
        assert response.status_code == 404


def test_the_twin_answers_loopback_clients_only(box: Sandbox) -> None:
    app = create_app(box, bare_endpoint=True, audit_process=False)
    with TestClient(app, client=("192.0.2.7", 50000)) as http:
        response = http.get("/_bare/fhir/Patient/c-patient", headers=_auth(box, "trust"))
        assert response.status_code == 404
        assert response.json()["resourceType"] == "OperationOutcome"


def test_a_kept_answer_goes_only_to_the_very_same_request(box: Sandbox) -> None:
    with _twin(box) as http:
        trust = _auth(box, "trust")
        # HEAD (which Starlette routes with GET) is not kept for the GETs after it.
        assert http.head("/_bare/fhir/Patient/c-patient", headers=trust).status_code == 404
        assert http.get("/_bare/fhir/Patient/c-patient", headers=trust).status_code == 200
        # Another Host makes other links: its own answer, not the first one's.
        elsewhere = http.get(
            "/_bare/fhir/Flag?patient=Patient/c-patient",
            headers={**trust, "host": "elsewhere.example"},
        )
        here = http.get("/_bare/fhir/Flag?patient=Patient/c-patient", headers=trust)
        assert "elsewhere.example" in elsewhere.text
        assert "elsewhere.example" not in here.text
        # An answer that is an error is not kept: the same request is answered afresh.
        assert http.get("/_bare/fhir/Flag/twin-flag", headers=trust).status_code == 404
        flag = {
            "resourceType": "Flag",
            "id": "twin-flag",
            "status": "active",
            "code": {"text": "written after the first answer"},
            "subject": {"reference": "Patient/c-patient"},
        }
        box.repo.update(flag)
        assert http.get("/_bare/fhir/Flag/twin-flag", headers=trust).status_code == 200


def test_a_full_twin_says_so_rather_than_doing_the_work(
    box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cpa_fhir.sandbox._app._MAX_BARE_ANSWERS", 2)
    with _twin(box) as http:
        trust = _auth(box, "trust")
        for path in ("Patient/c-patient", "CarePlan/c-careplan"):
            assert http.get(f"/_bare/fhir/{path}", headers=trust).status_code == 200
        full = http.get("/_bare/fhir/EpisodeOfCare/c-episode", headers=trust)
        assert full.status_code == 507
        assert full.json()["issue"][0]["code"] == "too-costly"
        assert http.get("/_bare/fhir/Patient/c-patient", headers=trust).status_code == 200
