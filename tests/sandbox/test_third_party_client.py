"""A real third-party FHIR client (fhirpy, from PyPI) against the sandbox running under
uvicorn on loopback: CRUD, search with paging, conditional create and a transaction."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import httpx
import orjson
import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

from tests.common import EXAMPLES

RECORD_A = orjson.loads(next(EXAMPLES.glob("Bundle-record-A-*.json")).read_bytes())


@pytest.fixture(scope="module")
def fhir(base_url: str) -> SyncFHIRClient:
    # The client gets its token the standard way: client credentials at /token.
    token = httpx.post(
        f"{base_url}/token",
        data={"grant_type": "client_credentials", "scope": "system/*.read system/*.write"},
        auth=("trust", "trust-demo-secret"),
    ).json()["access_token"]
    return SyncFHIRClient(f"{base_url}/fhir", authorization=f"Bearer {token}")


def _flag_template() -> dict[str, Any]:
    flag = copy.deepcopy(
        next(e["resource"] for e in RECORD_A["entry"] if e["resource"]["resourceType"] == "Flag")
    )
    flag.pop("id")
    return flag


def test_crud(fhir: SyncFHIRClient) -> None:
    flag = fhir.resource("Flag", **_flag_template())
    flag.save()
    assert flag["id"] and flag["meta"]["versionId"] == "1"
    fetched = fhir.reference("Flag", flag["id"]).to_resource()
    assert fetched["code"] == flag["code"]
    fetched["status"] = "inactive"
    fetched.save()
    assert fhir.reference("Flag", flag["id"]).to_resource()["status"] == "inactive"
    fetched.delete()
    with pytest.raises(ResourceNotFound):  # 410 Gone, as fhirpy reports it
        fhir.reference("Flag", flag["id"]).to_resource()


def test_search_with_paging(fhir: SyncFHIRClient) -> None:
    everything = fhir.resources("Encounter").limit(4).fetch_all()
    total = fhir.execute("Encounter", method="get", params={"_summary": "count"})["total"]
    assert len(everything) == total
    assert len({e["id"] for e in everything}) == len(everything) > 4
    plans = fhir.resources("CarePlan").search(subject="Patient/c-patient", status="active").fetch()
    assert {p["id"] for p in plans} == {"c-careplan", "c-crisis-plan", "c-contingency-plan"}


def test_conditional_create(fhir: SyncFHIRClient) -> None:
    marker = uuid.uuid4().hex
    template = _flag_template()
    template["identifier"] = [{"system": "urn:test", "value": marker}]
    first, created = (
        fhir.resources("Flag")
        .search(identifier=f"urn:test|{marker}")
        .get_or_create(fhir.resource("Flag", **template))
    )
    again, created_again = (
        fhir.resources("Flag")
        .search(identifier=f"urn:test|{marker}")
        .get_or_create(fhir.resource("Flag", **template))
    )
    assert created and not created_again
    assert first["id"] == again["id"]


def test_transaction(fhir: SyncFHIRClient) -> None:
    flag = _flag_template()
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": flag,
                "request": {"method": "POST", "url": "Flag"},
            },
            {"request": {"method": "GET", "url": "Patient/a-patient"}},
        ],
    }
    result = fhir.execute("", method="post", data=bundle)
    assert result["type"] == "transaction-response"
    assert result["entry"][0]["response"]["status"] == "201"
    assert result["entry"][1]["resource"]["id"] == "a-patient"
