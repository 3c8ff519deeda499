"""A partner's search, history and reverse chain filter every stored match, not a
first part of them: what is withheld changes neither its totals nor which visible
matches it is given, in either sort order; past the bound the request is refused,
never answered from a part. (Its own sandbox: the test adds resources.)"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.sandbox.conftest import Fhir, outcome, resource_keys


def _total(client: Fhir, url: str, **params: str) -> int:
    r = client.get(url, params={"_count": "100", **params})
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


def _visible(client: Fhir) -> tuple[int, int, list[str], list[str]]:
    def page(sort: str) -> list[str]:
        r = client.get("Encounter", params={"_sort": sort, "_count": "3"})
        assert r.status_code == 200, r.text
        return sorted(resource_keys(r.json()))

    return (
        _total(client, "Encounter"),
        _total(client, "Encounter/_history"),
        page("date"),
        page("-date"),
    )


def test_withheld_matches_change_nothing_a_partner_is_given(
    as_client: Any, trust: Fhir, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp: Fhir = as_client("gp")
    before = _visible(gp)
    assert before[0] > 3  # more than a page, so which page the sort gives matters
    withheld = trust.get("Encounter/a-review-2025-10").json()  # A's: never the GP's
    assert gp.get("Encounter/a-review-2025-10").status_code == 404
    for field in ("id", "meta"):
        withheld.pop(field)
    stored = _total(trust, "Encounter")
    # Many more withheld than the GP may see, each dated before and after all of its:
    # were only a first part of the stored matches filtered, they would crowd out
    # the visible ones in one order or the other.
    added = 3 * stored
    entries = []
    for i in range(added):
        encounter = copy.deepcopy(withheld)
        encounter["period"] = {"start": f"{1990 + i % 2 * 80}-01-01"}  # 1990 or 2070
        entries.append({"resource": encounter, "request": {"method": "POST", "url": "Encounter"}})
    r = trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert r.status_code == 200, r.text
    versions = _total(trust, "Encounter/_history")
    # The bound just holds every version: all is filtered, and nothing changed.
    monkeypatch.setattr("cpa_fhir.sandbox._access.MAX_PARTNER_SCAN", versions)
    assert _visible(gp) == before
    # Past the bound: refused, not answered from the first part.
    monkeypatch.setattr("cpa_fhir.sandbox._access.MAX_PARTNER_SCAN", stored + added - 1)
    for url in ("Encounter", "Encounter/_history"):
        issue = outcome(gp.get(url), 400)["issue"][0]
        assert issue["code"] == "too-costly", issue
    # The trust's own searches page the database as they always did.
    assert _total(trust, "Encounter") == stored + added


def test_a_reverse_chain_filters_every_source(
    as_client: Any, trust: Fhir, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp: Fhir = as_client("gp")
    chained = {"_has:Encounter:patient:status": "finished"}
    found = gp.get("Patient", params=chained)
    assert found.status_code == 200 and "Patient/c-patient" in resource_keys(found.json())
    sources = _total(trust, "Encounter", patient="Patient/c-patient")
    monkeypatch.setattr("cpa_fhir.sandbox._access.MAX_PARTNER_SCAN", sources - 1)
    assert outcome(gp.get("Patient", params=chained), 400)["issue"][0]["code"] == "too-costly"
