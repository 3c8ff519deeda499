"""A partner's sorted search is in the order of what it sees: where a match stands
must not tell of a value withheld from it."""

from __future__ import annotations

import copy
from typing import Any

from tests.sandbox.conftest import Fhir


def _plan(template: dict[str, Any], activities: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """A copy of the care plan with these activities, each scheduled from a date."""
    plan = {k: v for k, v in copy.deepcopy(template).items() if k != "id"}
    plan["meta"] = {"profile": plan["meta"]["profile"]}  # what the labelling rules go by
    plan["activity"] = []
    for activity, start in activities:
        activity = copy.deepcopy(activity)
        activity["detail"].pop("scheduledString", None)
        activity["detail"]["scheduledPeriod"] = {"start": start}
        plan["activity"].append(activity)
    return plan


def test_a_partners_sorted_search_follows_what_it_sees(trust: Fhir, as_client: Any) -> None:
    template = trust.get("CarePlan/c-careplan").json()
    by_coordinator, by_childrens_services = template["activity"][0], template["activity"][3]
    assert "c-childrens-services" in str(by_childrens_services)
    # The first plan's earliest activity is one the GP may not see (children's
    # services'); what the GP sees of it starts after the second plan's.
    first = trust.post(
        "CarePlan",
        _plan(template, [(by_coordinator, "2026-05-01"), (by_childrens_services, "2020-01-01")]),
    )
    second = trust.post("CarePlan", _plan(template, [(by_coordinator, "2026-03-01")]))
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    ours = [first.json()["id"], second.json()["id"]]

    def order(client: Fhir, sort: str) -> list[str]:
        bundle = client.get(
            "CarePlan", params={"subject": "Patient/c-patient", "_sort": sort}
        ).json()
        ids = [e["resource"]["id"] for e in bundle.get("entry", [])]
        return [i for i in ids if i in ours]

    # The trust sees both activities of the first plan: it comes first.
    assert order(trust, "activity-date") == ours
    gp = as_client("gp")
    shown = gp.get(f"CarePlan/{ours[0]}")
    assert shown.status_code == 200 and "2026-05-01" in shown.text
    assert "2020-01-01" not in shown.text  # withheld from the GP
    assert order(gp, "activity-date") == ours[::-1]
    assert order(gp, "-activity-date") == ours
