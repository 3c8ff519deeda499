"""Record rules at their boundaries, on small synthetic records (pure, no files)."""

from __future__ import annotations

from datetime import date
from typing import Any

from cpa_fhir.validation import check_record
from cpa_fhir.validation._record_rules import ENHANCED, STANDARD, add_months

C = "https://cpa-fhir.org/fhir"


def level(code: str, start: str, end: str | None = None) -> dict[str, Any]:
    period = {"start": start, **({"end": end} if end else {})}
    return {
        "url": f"{C}/StructureDefinition/cpa-level",
        "extension": [
            {
                "url": "level",
                "valueCodeableConcept": {
                    "coding": [{"system": "http://snomed.info/sct", "code": code}]
                },
            },
            {"url": "period", "valuePeriod": period},
        ],
    }


def record(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"https://example.org/fhir/{r['resourceType']}/{r['id']}", "resource": r}
            for r in resources
        ],
    }


def episode(
    levels: list[dict[str, Any]], start: str, status: str = "active", end: str | None = None
) -> dict[str, Any]:
    return {
        "resourceType": "EpisodeOfCare",
        "id": "ep",
        "status": status,
        "extension": levels,
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "1092421000000100"}]}],
        "period": {"start": start, **({"end": end} if end else {})},
    }


def encounter(
    eid: str, cls: str, start: str, end: str | None = None, review: bool = False
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": cls},
        "period": {"start": start, **({"end": end} if end else {})},
    }
    if review:
        res["type"] = [
            {"coding": [{"system": "http://snomed.info/sct", "code": "166121000000101"}]}
        ]
    return res


def rules(bundle: dict[str, Any], as_of: str) -> list[str]:
    return [i.rule or "" for i in check_record(bundle, date.fromisoformat(as_of), C)]


def test_add_months_clamps_to_month_end() -> None:
    assert add_months(date(2026, 8, 31), 6) == date(2027, 2, 28)
    assert add_months(date(2024, 2, 29), 12) == date(2025, 2, 28)


def test_enhanced_review_due_within_six_months_to_the_day() -> None:
    ep = episode([level(ENHANCED, "2026-01-10")], "2026-01-10")
    assert rules(record(ep), "2026-07-10") == []
    assert rules(record(ep), "2026-07-11") == ["cpa-rec-review"]
    reviewed = record(ep, encounter("r1", "AMB", "2026-07-10", review=True))
    assert rules(reviewed, "2027-01-10") == []


def test_standard_allows_twelve_months_and_step_down_applies_from_the_review() -> None:
    ep = episode(
        [level(ENHANCED, "2025-01-01", "2025-06-30"), level(STANDARD, "2025-07-01")], "2025-01-01"
    )
    bundle = record(ep, encounter("r1", "AMB", "2025-07-01", review=True))
    assert rules(bundle, "2026-07-01") == []
    assert rules(bundle, "2026-07-02") == ["cpa-rec-review"]


def test_follow_up_after_inpatient_discharge() -> None:
    ep = episode([level(STANDARD, "2026-01-01")], "2026-01-01")
    stay = encounter("stay", "IMP", "2026-03-01", "2026-03-10")
    assert rules(record(ep, stay), "2026-03-17") == []  # still inside the 7 days
    assert rules(record(ep, stay), "2026-03-18") == ["cpa-rec-followup"]
    assert rules(record(ep, stay, encounter("visit", "HH", "2026-03-17")), "2026-04-01") == []
    assert rules(record(ep, stay, encounter("call", "VR", "2026-03-12")), "2026-04-01") == [
        "cpa-rec-followup"
    ]


def test_discharge_only_from_standard() -> None:
    stepped_down = episode(
        [level(ENHANCED, "2025-01-01", "2025-05-31"), level(STANDARD, "2025-06-01", "2025-09-01")],
        "2025-01-01",
        status="finished",
        end="2025-09-01",
    )
    reviews = [encounter(f"r{i}", "AMB", d, review=True) for i, d in enumerate(["2025-06-01"])]
    assert rules(record(stepped_down, *reviews), "2026-01-01") == []
    straight = episode(
        [level(ENHANCED, "2025-01-01", "2025-05-01")],
        "2025-01-01",
        status="finished",
        end="2025-05-01",
    )
    assert rules(record(straight), "2026-01-01") == ["cpa-rec-discharge"]
