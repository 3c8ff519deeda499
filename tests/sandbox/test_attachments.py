"""What an attachment's base64 data holds reaches a partner only as the consent engine
reads it: text it can read is read for words, anything else (a PDF, a photo) is the
most restrictive content, withheld unless consent grants that."""

from __future__ import annotations

import base64
from typing import Any

from tests.sandbox.conftest import Fhir


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_a_partner_gets_no_attachment_data_the_engine_cannot_read_or_that_names_a_matter(
    as_client: Any, trust: Fhir
) -> None:
    patient = trust.get("Patient/c-patient").json()
    scan = {"contentType": "application/pdf", "data": _b64("%PDF-1.4 scanned letter")}
    letter = {"contentType": "text/plain", "data": _b64("Letter copied to her probation officer")}
    note = {"contentType": "text/plain", "data": _b64("Seen at the weekly review")}
    patient["photo"] = [scan, letter, note]
    assert trust.put("Patient/c-patient", patient).status_code == 200
    assert trust.get("Patient/c-patient").json()["photo"] == [scan, letter, note]

    for partner in ("gp", "social-care"):
        sent = as_client(partner).get("Patient/c-patient")
        assert sent.status_code == 200, sent.text
        assert sent.json()["photo"] == [
            {"contentType": "application/pdf"},
            {"contentType": "text/plain"},
            note,
        ]
        searched = as_client(partner).get("Patient", params={"_id": "c-patient"}).json()
        assert [e["resource"]["photo"] for e in searched["entry"]] == [sent.json()["photo"]]
