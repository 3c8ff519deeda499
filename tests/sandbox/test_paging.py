"""History is paged like search (next/previous links, a total that counts every version),
and a partner's pages, totals and audit cover only what it may see and was sent."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.sandbox.conftest import Fhir, outcome
from tests.sandbox.test_rest import _flag


def _follow(client: Fhir, url: str) -> Any:
    parts = urlsplit(url)
    path = parts.path.split("/fhir/", 1)[1]
    return client.get(path, params=parse_qsl(parts.query))


def _pages(client: Fhir, path: str, **params: str) -> list[dict[str, Any]]:
    pages = [client.get(path, params=params).json()]
    while True:
        nxt = [link["url"] for link in pages[-1]["link"] if link["relation"] == "next"]
        if not nxt:
            return pages
        response = _follow(client, nxt[0])
        assert response.status_code == 200, response.text
        pages.append(response.json())


def test_instance_history_pages_through_every_version_once(trust: Fhir) -> None:
    flag = trust.post("Flag", _flag(identifier=[{"system": "urn:t", "value": uuid.uuid4().hex}]))
    body = flag.json()
    for status in ("inactive", "active", "inactive", "active", "inactive", "active"):
        body = trust.put(f"Flag/{body['id']}", {**body, "status": status}).json()
    pages = _pages(trust, f"Flag/{body['id']}/_history", _count="3")
    assert [len(p["entry"]) for p in pages] == [3, 3, 1]
    assert all(p["total"] == 7 for p in pages)
    versions = [int(e["response"]["etag"].strip('W/"')) for p in pages for e in p["entry"]]
    assert versions == [7, 6, 5, 4, 3, 2, 1]
    previous = [link for link in pages[1]["link"] if link["relation"] == "previous"]
    assert previous and "_offset=0" in previous[0]["url"]
    assert not [link for link in pages[0]["link"] if link["relation"] == "previous"]


def test_type_history_total_counts_all_versions_not_the_page(trust: Fhir) -> None:
    first = trust.get("Flag/_history", params={"_count": "2"}).json()
    assert len(first["entry"]) == 2
    everything = trust.get("Flag/_history", params={"_count": "1000"}).json()
    assert first["total"] == everything["total"] == len(everything["entry"])
    assert everything["total"] > 2


def test_history_paging_parameters_are_checked(trust: Fhir) -> None:
    for params in ({"_count": "0"}, {"_count": "x"}, {"_count": "1001"}, {"_offset": "-1"}):
        outcome(trust.get("Flag/_history", params=params), 400)


def test_partner_history_pages_only_what_it_may_see(as_client: Any, trust: Fhir) -> None:
    gp = as_client("gp")
    everything = gp.get("CarePlan/_history", params={"_count": "1000"}).json()
    visible = everything["entry"]
    assert everything["total"] == len(visible) >= 2
    trusted = trust.get("CarePlan/_history", params={"_count": "1000"}).json()
    assert trusted["total"] > len(visible), "the GP must not see every care plan"
    pages = _pages(gp, "CarePlan/_history", _count="1")
    assert sum(len(p.get("entry", [])) for p in pages) == len(visible)
    assert all(p["total"] == len(visible) for p in pages)


def test_partner_search_audits_the_page_sent_not_every_match(as_client: Any, trust: Fhir) -> None:
    gp = as_client("gp")
    matches = gp.get("CarePlan", params={"subject": "Patient/c-patient"}).json()
    assert matches["total"] >= 2
    before = trust.get("AuditEvent", params={"_summary": "count"}).json()["total"]
    page = gp.get("CarePlan", params={"subject": "Patient/c-patient", "_count": "1"}).json()
    assert len(page["entry"]) == 1 and page["total"] == matches["total"]
    events = trust.get("AuditEvent", params={"_count": "1000", "_sort": "-_lastUpdated"}).json()[
        "entry"
    ]
    after = trust.get("AuditEvent", params={"_summary": "count"}).json()["total"]
    assert after == before + 1
    latest = max((e["resource"] for e in events), key=lambda r: r["meta"]["lastUpdated"])
    shared = [
        e["what"]["reference"]
        for e in latest["entity"]
        if e.get("what", {}).get("reference", "").startswith("CarePlan/")
    ]
    sent = page["entry"][0]["resource"]
    assert shared == [f"{sent['resourceType']}/{sent['id']}/_history/{sent['meta']['versionId']}"]


def test_a_page_of_nothing_has_no_next_page(trust: Fhir) -> None:
    """`_count=0` asks for the total alone: a next link would be the same page again,
    and a client following next pages would never stop."""
    for extra in ({}, {"_total": "none"}, {"_offset": "2"}):
        body = trust.get("Flag", params={"_count": "0", **extra}).json()
        assert {link["relation"] for link in body["link"]} == {"self"}, (extra, body["link"])


def test_history_since_its_last_change_is_an_empty_page(trust: Fhir, as_client: Any) -> None:
    later = {"_since": "2999-01-01T00:00:00Z"}
    for client in (trust, as_client("gp")):
        page = client.get("CarePlan/c-careplan/_history", params=later)
        assert page.status_code == 200, page.text
        assert page.json()["total"] == 0 and not page.json().get("entry")
    outcome(trust.get("CarePlan/no-such-plan/_history", params=later), 404)
    # Of what the partner may not see, as of what is not there: unknown.
    gp = as_client("gp")
    outcome(gp.get("Flag/c-risk-self-harm/_history", params=later), 404)


def test_history_refuses_what_it_does_not_support(trust: Fhir) -> None:
    for params in (
        [("_at", "2026")],
        [("_list", "x")],
        [("patient", "Patient/c-patient")],
        [("_since", "2020-01-01T00:00:00Z"), ("_since", "2021-01-01T00:00:00Z")],
    ):
        found = outcome(trust.get("CarePlan/c-careplan/_history", params=params), 400)
        assert params[0][0] in found["issue"][0]["details"]["text"]
