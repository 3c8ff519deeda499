"""A care-team member is what their place in the team says they are, as a role's holder
is: a professional named only in a care team as its probation officer is an offender's
probation officer, and is not sent to a GP the record's consent does not let know of
offending (CPA.md, confidentiality)."""

from __future__ import annotations

import itertools
import tomllib
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cpa_fhir.config import load_policy
from cpa_fhir.conformance import default_package
from cpa_fhir.consent import (
    RequiredElements,
    ShareRequest,
    SharingPolicy,
    label_resources,
    parse_policy,
    share,
)
from cpa_fhir.errors import PolicyError
from tests.common import EXAMPLES, POLICY
from tests.consent import reference_labelling

RECORD_C = orjson.loads(next(EXAMPLES.glob("Bundle-record-C-*.json")).read_bytes())
# The officer under an id that says nothing (record C's says what they are).
OFFICER = "Practitioner/c-officer-rhys"
TEAM_ROLE = "https://cpa-fhir.org/fhir/CodeSystem/cpa-care-team-role"
AT = datetime.now(UTC)

ROLES = {
    "coded": {"coding": [{"system": TEAM_ROLE, "code": "probation-officer"}]},
    "in words": {"text": "Probation officer"},
    "neutral": {"text": "Support worker"},
}


def _officer_only_in_the_team(role: dict[str, Any]) -> dict[str, Any]:
    """Record C with the officer holding no PractitionerRole, and on the care team in
    this role on behalf of no agency: their place in the team alone says what they are."""
    record = orjson.loads(orjson.dumps(RECORD_C).replace(b"c-probation-officer", b"c-officer-rhys"))
    record["entry"] = [
        e
        for e in record["entry"]
        if e["resource"]["resourceType"] != "PractitionerRole"
        or e["resource"]["practitioner"]["reference"] != OFFICER
    ]
    for entry in record["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "CareTeam":
            for participant in resource["participant"]:
                if participant["member"]["reference"] == OFFICER:
                    participant.pop("onBehalfOf", None)
                    participant["role"] = [role]
    return record


def _shared_with_gp(record: dict[str, Any]) -> Any:
    ids = itertools.count()
    return share(
        record,
        ShareRequest("gp", "TREAT"),
        load_policy(),
        at=AT,
        new_id=lambda: f"id-{next(ids)}",
        required=RequiredElements(default_package()),
    )


@pytest.mark.parametrize("role", ["coded", "in words"])
def test_a_probation_officer_named_only_in_the_care_team_is_not_sent_to_the_gp(
    role: str,
) -> None:
    record = _officer_only_in_the_team(ROLES[role])
    result = _shared_with_gp(record)
    assert OFFICER not in result.shared
    # Nor named by the reviews they attended, which go.
    assert "Encounter/c-review-2026-09" in result.shared
    assert OFFICER not in orjson.dumps(result.bundle).decode()


def test_a_professional_in_a_neutral_place_in_the_team_still_goes() -> None:
    result = _shared_with_gp(_officer_only_in_the_team(ROLES["neutral"]))
    assert OFFICER in result.shared


@pytest.mark.parametrize("role", sorted(ROLES))
def test_the_labeller_and_its_oracle_agree_on_what_a_team_lends(
    role: str, policy: SharingPolicy
) -> None:
    record = _officer_only_in_the_team(ROLES[role])
    entries = [(e.get("fullUrl"), e["resource"]) for e in record["entry"]]
    fast = {r.key: r for r in label_resources(entries, policy)}
    slow = {r.key: r for r in reference_labelling.label_resources(entries, policy)}
    assert {k: (r.categories, r.rules) for k, r in fast.items()} == {
        k: (r.categories, r.rules) for k, r in slow.items()
    }
    assert ("offending" in fast[OFFICER].categories) == (role != "neutral")


def test_a_team_lends_to_the_types_its_rule_names_only(policy: SharingPolicy) -> None:
    """The service user on their own team does not take what their place in it says:
    a member the rule's `lend_to` leaves out is not lent to."""
    team = {
        "resourceType": "CareTeam",
        "id": "t",
        "participant": [
            {"role": [ROLES["coded"]], "member": {"reference": "Patient/p"}},
            {"role": [ROLES["coded"]], "member": {"reference": "RelatedPerson/r"}},
        ],
    }
    patient = {"resourceType": "Patient", "id": "p"}
    person = {"resourceType": "RelatedPerson", "id": "r", "patient": {"reference": "Patient/p"}}
    labelled = {
        r.key: r.categories
        for r in label_resources([(None, team), (None, patient), (None, person)], policy)
    }
    assert "offending" not in labelled["Patient/p"]
    assert "offending" in labelled["RelatedPerson/r"]


def test_lend_to_needs_a_lend() -> None:
    data = tomllib.loads(POLICY.read_text())
    (member,) = [r for r in data["rule"] if r["id"] == "care-team-member"]
    del member["lend"]
    with pytest.raises(PolicyError, match="lend_to"):
        parse_policy(data)
