"""Professionals and organisations a partner is sent (reached by `_include` from what
it is shown) are named in the AuditEvent of the patient whose record they were
reached from, as `cpa-fhir share` names them in its own."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from cpa_fhir.consent import disclosed_references
from cpa_fhir.sandbox import Sandbox
from tests.sandbox.test_existence import _caller

SUPPORTING = ("Practitioner", "PractitionerRole", "Organization", "Location")


def _recorded(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The AuditEvents the router records from now on."""
    events: list[dict[str, Any]] = []
    record = sandbox.router.audit_log.record

    def keep(batch: Any) -> Any:
        events.extend(batch)
        return record(batch)

    monkeypatch.setattr(sandbox.router.audit_log, "record", keep)
    return events


@pytest.mark.parametrize("client_id", ["gp", "social-care", "probation", "carer"])
def test_included_professionals_and_organisations_are_named_in_the_audit(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, client_id: str
) -> None:
    partner = _caller(sandbox, client_id)
    for _ in range(2):  # and again, when the AuditEvent is made from what was kept
        events = _recorded(sandbox, monkeypatch)
        found = partner(
            "GET",
            "EpisodeOfCare",
            query=[
                ("patient", "Patient/c-patient"),
                ("_include", "EpisodeOfCare:care-manager"),
                ("_include", "EpisodeOfCare:organization"),
            ],
        )
        assert found.status == 200, found.body
        sent = {
            f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in orjson.loads(found.body)["entry"]
        }
        professionals = {k for k in sent if k.split("/")[0] in SUPPORTING}
        assert professionals, sent
        audited = {k for e in events for k in disclosed_references(e)}
        assert sent <= audited, f"sent but never audited: {sent - audited}"
        assert len(events) == 1  # one patient's information: one AuditEvent
