"""Decimals keep the precision they were written with, through every write and read
(https://hl7.org/fhir/R4/datatypes.html#decimal: 1.50 is not 1.5), on SQLite and
PostgreSQL, for the trust and through the consent filter for a partner."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import orjson

from tests.sandbox.conftest import Fhir

ENCOUNTER = "Encounter/c-review-2026-09"  # a review the GP is shown


def _with_length(trust: Fhir, value: str) -> tuple[dict[str, Any], bytes]:
    """The review as stored, and a body setting its length to `value` as written."""
    encounter = trust.get(ENCOUNTER).json()
    encounter["length"] = {
        "value": 0,
        "unit": "min",
        "system": "http://unitsofmeasure.org",
        "code": "min",
    }
    body = _dumps_with(encounter, '"value":0', f'"value":{value}')
    return encounter, body


def _dumps_with(resource: dict[str, Any], placeholder: str, written: str) -> bytes:
    raw = orjson.dumps(resource).decode()
    assert raw.count(placeholder) == 1
    return raw.replace(placeholder, written).encode()


def _put(trust: Fhir, body: bytes) -> Any:
    return trust.http.put(
        f"/fhir/{ENCOUNTER}",
        content=body,
        headers={**trust.headers, "content-type": "application/fhir+json"},
    )


def test_a_decimal_is_read_back_as_written_by_every_interaction(
    trust: Fhir, as_client: Any
) -> None:
    _, body = _with_length(trust, "45.50")
    written = _put(trust, body)
    assert written.status_code == 200, written.text
    version = written.headers["etag"].split('"')[1]
    assert b'"value":45.50' in written.content
    gp = as_client("gp")
    for client in (trust, gp):
        for url in (ENCOUNTER, f"{ENCOUNTER}/_history/{version}"):
            assert b'"value":45.50' in client.get(url).content, (client, url)
        found = client.get("Encounter", params={"_id": ENCOUNTER.split("/")[1]})
        assert b'"value":45.50' in found.content
        history = client.get(f"{ENCOUNTER}/_history")
        assert b'"value":45.50' in history.content


def test_a_change_of_precision_alone_is_a_new_version_and_the_same_text_is_not(
    trust: Fhir,
) -> None:
    _, body = _with_length(trust, "12.50")
    first = _put(trust, body)
    assert first.status_code == 200, first.text
    again = _put(trust, _with_length(trust, "12.50")[1])
    assert again.headers["etag"] == first.headers["etag"]  # nothing changed: no version
    less = _put(trust, _with_length(trust, "12.5")[1])
    assert less.headers["etag"] != first.headers["etag"]
    assert b'"value":12.5,' in trust.get(ENCOUNTER).content


def test_a_transaction_keeps_each_decimal_as_written(trust: Fhir) -> None:
    encounter = copy.deepcopy(trust.get(ENCOUNTER).json())
    for key in ("id", "meta"):
        encounter.pop(key)
    marker = uuid.uuid4().hex
    encounter["identifier"] = [{"system": "urn:test", "value": marker}]
    encounter["length"] = {
        "value": 0,
        "unit": "min",
        "system": "http://unitsofmeasure.org",
        "code": "min",
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": encounter,
                "request": {"method": "POST", "url": "Encounter"},
            }
        ],
    }
    body = _dumps_with(bundle, '"value":0', '"value":3.0e1')
    done = trust.http.post(
        "/fhir", content=body, headers={**trust.headers, "content-type": "application/fhir+json"}
    )
    assert done.status_code == 200, done.text
    location = done.json()["entry"][0]["response"]["location"]
    stored = trust.get(location.split("/_history")[0].split("/fhir/")[-1])
    assert b'"value":3.0e1' in stored.content
