"""`_summary` and `_elements` on reads and searches, SQLite and PostgreSQL: the part
asked for, marked SUBSETTED, and for a partner a part of what it may see, never more."""

from __future__ import annotations

from typing import Any

import pytest

from cpa_fhir.fhir.subset import SUBSETTED
from tests.sandbox.conftest import Fhir, outcome


def _matches(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _is_part_of(part: dict[str, Any], whole: dict[str, Any]) -> bool:
    return SUBSETTED in part["meta"]["tag"] and all(
        whole[k] == v for k, v in part.items() if k != "meta"
    )


def test_a_search_summary_keeps_the_summary_elements_of_each_match(trust: Fhir) -> None:
    query = {"subject": "Patient/c-patient"}
    whole = _matches(trust.get("CarePlan", params=query).json())
    summed = trust.get("CarePlan", params={**query, "_summary": "true"})
    assert summed.status_code == 200
    parts = _matches(summed.json())
    assert [p["id"] for p in parts] == [w["id"] for w in whole] and parts
    for part, full in zip(parts, whole, strict=True):
        assert _is_part_of(part, full)
        assert "activity" not in part and "activity" in full
        assert part["subject"] == full["subject"]  # mandatory and summary
    # The self link keeps what was asked.
    assert "_summary=true" in summed.json()["link"][0]["url"]


def test_elements_keep_the_elements_named_and_those_that_must_stay(trust: Fhir) -> None:
    bundle = trust.get("Patient", params={"_elements": "name,birthDate", "_count": "3"}).json()
    # With Patient's modifiers (active, deceased, link): they change what the rest means.
    kept = {"resourceType", "id", "meta", "name", "birthDate", "_birthDate"}
    modifiers = {"active", "deceasedBoolean", "deceasedDateTime", "link", "implicitRules"}
    parts = _matches(bundle)
    assert parts
    for part in parts:
        assert part.keys() <= kept | modifiers
        assert "name" in part and "telecom" not in part


def test_a_read_may_ask_for_a_part_too(trust: Fhir) -> None:
    whole = trust.get("CarePlan/c-careplan").json()
    for query in ({"_summary": "true"}, {"_elements": "title"}, {"_summary": "data"}):
        part = trust.get("CarePlan/c-careplan", params=query)
        assert part.status_code == 200
        assert _is_part_of(part.json(), whole)
    assert trust.get("CarePlan/c-careplan", params={"_summary": "false"}).json() == whole


def test_a_partner_gets_a_part_of_what_it_may_see_and_no_more(as_client: Any) -> None:
    gp = as_client("gp")
    seen = gp.get("CarePlan/c-careplan").json()
    part = gp.get("CarePlan/c-careplan", params={"_elements": "activity,note,title"}).json()
    assert _is_part_of(part, seen)
    # The consent engine's labels stay with what goes.
    assert part["meta"].get("security") == seen["meta"].get("security")
    searched = gp.get(
        "CarePlan", params={"subject": "Patient/c-patient", "_summary": "true"}
    ).json()
    visible = {
        r["id"]: r
        for r in _matches(gp.get("CarePlan", params={"subject": "Patient/c-patient"}).json())
    }
    assert {r["id"] for r in _matches(searched)} == visible.keys()
    for resource in _matches(searched):
        assert _is_part_of(resource, visible[resource["id"]])


@pytest.mark.parametrize(
    ("url", "query"),
    [
        ("CarePlan", {"_summary": "yes"}),
        ("CarePlan", {"_elements": "shoe"}),
        ("CarePlan", {"_elements": ""}),
        ("CarePlan", {"_elements": " , "}),
        ("CarePlan", {"_elements": "Patient.name"}),
        ("CarePlan", {"_elements": "title", "_summary": "true"}),
        ("CarePlan", {"_elements": "title", "_summary": "count"}),
        ("CarePlan/c-careplan", {"_summary": "maybe"}),
        ("CarePlan/c-careplan", {"_elements": "shoe"}),
        ("CarePlan/c-careplan", {"_elements": "title", "_summary": "text"}),
    ],
)
def test_a_part_that_cannot_be_had_is_an_outcome(
    trust: Fhir, url: str, query: dict[str, str]
) -> None:
    outcome(trust.get(url, params=query), 400)
