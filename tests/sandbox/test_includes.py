"""`_include` and `_revinclude`, iterated or not: what they add for the trust, and,
for partners, only what each may see, reached through the links it is shown."""

from __future__ import annotations

from typing import Any

import pytest

from tests.sandbox.conftest import Fhir, outcome, resource_keys
from tests.sandbox.test_consent_freshness import Changes, changes  # noqa: F401

PARTNERS = ["gp", "social-care", "probation", "children-services", "carer"]

CARE_TEAM_OF_C = [("patient", "Patient/c-patient"), ("_include", "CareTeam:participant")]
PLANS_OF_C_WITH_TEAMS = [
    ("subject", "Patient/c-patient"),
    ("_include", "CarePlan:care-team"),
    ("_include:iterate", "CareTeam:participant"),
]
# Members of C's care team whose place in it (probation, children's services) the
# carer's view of the team leaves out.
WITHHELD_FROM_CARER = {"Practitioner/c-probation-officer", "Practitioner/c-childrens-social-worker"}


def _keys(body: dict[str, Any], mode: str) -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in body.get("entry", [])
        if e["search"]["mode"] == mode
    ]


def _references(node: Any) -> set[str]:
    """Every literal reference anywhere in a resource."""
    if isinstance(node, dict):
        found = {node["reference"]} if isinstance(node.get("reference"), str) else set()
        return found.union(*(_references(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_references(v) for v in node))
    return set()


def _search(client: Fhir, rtype: str, params: list[tuple[str, str]]) -> dict[str, Any]:
    response = client.get(rtype, params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_an_iterated_include_follows_what_the_step_before_included(trust: Fhir) -> None:
    plans = _search(trust, "CarePlan", PLANS_OF_C_WITH_TEAMS[:2])
    teams = set(_keys(plans, "include"))
    assert teams == {
        ref
        for e in plans["entry"]
        if e["search"]["mode"] == "match"
        for ref in _references(e["resource"].get("careTeam"))
    }
    assert teams == {"CareTeam/c-careteam"}
    team = trust.get("CareTeam/c-careteam").json()
    members = {p["member"]["reference"] for p in team["participant"]}

    iterated = _search(trust, "CarePlan", PLANS_OF_C_WITH_TEAMS)
    included = _keys(iterated, "include")
    assert len(included) == len(set(included))  # each once
    assert set(included) == teams | members
    assert _keys(iterated, "match") == _keys(plans, "match")
    # R3's name for it is taken too.
    recursed = [(k.replace("iterate", "recurse"), v) for k, v in PLANS_OF_C_WITH_TEAMS]
    assert set(_keys(_search(trust, "CarePlan", recursed), "include")) == set(included)


def test_an_iterated_revinclude_walks_back_from_what_it_added(trust: Fhir) -> None:
    found = _search(
        trust,
        "Practitioner",
        [
            ("_id", "c-coordinator"),
            ("_revinclude:iterate", "CareTeam:participant"),
            ("_revinclude:iterate", "CarePlan:care-team"),
        ],
    )
    teams = _keys(
        _search(trust, "CareTeam", [("participant", "Practitioner/c-coordinator")]), "match"
    )
    plans = {
        key
        for team in teams
        for key in _keys(_search(trust, "CarePlan", [("care-team", team)]), "match")
    }
    assert teams and plans
    assert set(_keys(found, "include")) == set(teams) | plans


def test_an_include_from_another_type_must_be_iterated(trust: Fhir) -> None:
    response = trust.get("CarePlan", params=[("_include", "CareTeam:participant")])
    assert "starts at CareTeam" in outcome(response, 400)["issue"][0]["details"]["text"]
    assert outcome(trust.get("CarePlan", params=[("_include:deep", "CarePlan:subject")]), 400)


def test_iterating_ends_at_a_cycle(trust: Fhir) -> None:
    def organisation(name: str, part_of: str | None = None) -> dict[str, Any]:
        org: dict[str, Any] = {"resourceType": "Organization", "name": name}
        if part_of:
            org["partOf"] = {"reference": part_of}
        return org

    first = trust.post("Organization", organisation("Cycle one")).json()
    second = trust.post("Organization", organisation("Cycle two", f"Organization/{first['id']}"))
    second_id = second.json()["id"]
    looped = {**first, **organisation("Cycle one", f"Organization/{second_id}")}
    assert trust.put(f"Organization/{first['id']}", looped).status_code == 200

    found = _search(
        trust, "Organization", [("_id", first["id"]), ("_include:iterate", "Organization:partof")]
    )
    assert _keys(found, "match") == [f"Organization/{first['id']}"]
    assert _keys(found, "include") == [f"Organization/{second_id}"]


def _warnings(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in body.get("entry", []) if e["search"]["mode"] == "outcome"]


def test_includes_stop_at_their_bound_and_say_so(
    trust: Fhir, monkeypatch: pytest.MonkeyPatch
) -> None:
    everything = _keys(_search(trust, "CarePlan", PLANS_OF_C_WITH_TEAMS), "include")
    assert len(everything) > 2 and not _warnings(_search(trust, "CarePlan", PLANS_OF_C_WITH_TEAMS))
    monkeypatch.setattr("cpa_fhir.store._repository.MAX_INCLUDES", 2)
    cut = _search(trust, "CarePlan", PLANS_OF_C_WITH_TEAMS)
    assert _keys(cut, "include") == everything[:2]
    [warning] = _warnings(cut)
    assert warning["issue"][0]["severity"] == "warning"
    assert warning["issue"][0]["code"] == "too-costly"


@pytest.mark.parametrize("client_id", ["trust", "carer", "gp"])
def test_includes_read_page_by_page_are_all_there(
    as_client: Any, monkeypatch: pytest.MonkeyPatch, client_id: str
) -> None:
    """A step of including is read a page at a time, as far as it is used: pages of
    two give what one read gives."""
    client: Fhir = as_client(client_id)
    for rtype, params in (("CarePlan", PLANS_OF_C_WITH_TEAMS), ("CareTeam", CARE_TEAM_OF_C)):
        whole = _search(client, rtype, params)
        with monkeypatch.context() as patched:
            patched.setattr("cpa_fhir.store._repository._PAGE", 2)
            paged = _search(client, rtype, params)
        assert _keys(paged, "include") == _keys(whole, "include")
        assert _keys(paged, "match") == _keys(whole, "match")


def test_a_partners_include_bound_counts_only_what_it_is_shown(
    as_client: Any, trust: Fhir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The carer is shown fewer of the team than the trust: a bound of what it is shown
    cuts the trust's includes, never its own, so a cut tells it nothing withheld."""
    carer: Fhir = as_client("carer")
    shown = _keys(_search(carer, "CareTeam", CARE_TEAM_OF_C), "include")
    assert len(shown) < len(_keys(_search(trust, "CareTeam", CARE_TEAM_OF_C), "include"))
    monkeypatch.setattr("cpa_fhir.store._repository.MAX_INCLUDES", len(shown))
    # Pages of one: what the carer may not see is read, and left out, before the rest.
    monkeypatch.setattr("cpa_fhir.store._repository._PAGE", 1)
    for_carer = _search(carer, "CareTeam", CARE_TEAM_OF_C)
    assert _keys(for_carer, "include") == shown and not _warnings(for_carer)
    assert _warnings(_search(trust, "CareTeam", CARE_TEAM_OF_C))


@pytest.mark.parametrize("client_id", PARTNERS)
@pytest.mark.parametrize(
    "rtype, params",
    [
        ("CareTeam", CARE_TEAM_OF_C),
        ("CarePlan", PLANS_OF_C_WITH_TEAMS),
        ("CarePlan", [("subject", "Patient/c-patient"), ("_include", "CarePlan:performer")]),
        ("Patient", [("_id", "c-patient"), ("_revinclude", "CareTeam:participant")]),
        (
            "RelatedPerson",
            [("patient", "Patient/c-patient"), ("_revinclude", "Encounter:participant")],
        ),
        (
            "EpisodeOfCare",
            [
                ("patient", "Patient/c-patient"),
                ("_revinclude:iterate", "Encounter:episode-of-care"),
            ],
        ),
    ],
)
def test_a_partner_is_included_only_what_it_is_shown_a_link_to(
    as_client: Any, client_id: str, rtype: str, params: list[tuple[str, str]]
) -> None:
    client: Fhir = as_client(client_id)
    response = client.get(rtype, params=params)
    if response.status_code == 403:  # not in its scopes
        return
    assert response.status_code == 200, response.text
    shown = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
        for e in response.json().get("entry", [])
    }
    for key in _keys(response.json(), "include"):
        others = {k: r for k, r in shown.items() if k != key}
        referred_to = any(key in _references(r) for r in others.values())
        refers_to = bool(_references(shown[key]) & others.keys())
        assert referred_to or refers_to, f"{key} is linked to nothing {client_id} is shown"


@pytest.mark.parametrize("rtype, params", [("CareTeam", CARE_TEAM_OF_C)])
def test_a_care_team_include_brings_a_carer_only_the_members_it_is_shown(
    as_client: Any, trust: Fhir, rtype: str, params: list[tuple[str, str]]
) -> None:
    assert WITHHELD_FROM_CARER <= set(_keys(_search(trust, rtype, params), "include"))
    carer: Fhir = as_client("carer")
    team = carer.get("CareTeam/c-careteam").json()
    assert not _references(team) & WITHHELD_FROM_CARER
    included = set(_keys(_search(carer, rtype, params), "include"))
    assert included and not included & WITHHELD_FROM_CARER
    assert included - {"Patient/c-patient"} <= _references(team)


def test_a_withheld_link_does_not_hide_what_a_shown_link_includes(
    as_client: Any,
    trust: Fhir,
    changes: Changes,  # noqa: F811
) -> None:
    """The carer's view of C's care team leaves out a participant whose role names
    child protection: the service user, listed on their own team for those
    conferences (a member such a place lends nothing to: the policy's `lend_to`). A
    crisis plan the carer sees names the service user as a performer. Walking team ->
    plan -> performer, the Patient was left out, because the step from the team found
    it (through the withheld participant) and it was never looked at again: whether it
    comes tells the carer whether the team's withheld part names it."""
    carer: Fhir = as_client("carer")
    person = "Patient/c-patient"
    assert carer.get(person).status_code == 200

    def with_person(team: dict[str, Any]) -> None:
        # Named by the team in that place alone.
        team["participant"] = [
            p for p in team["participant"] if p.get("member", {}).get("reference") != person
        ]
        team["participant"].append(
            {"role": [{"text": "child protection conferences"}], "member": {"reference": person}}
        )

    changes.edit("CareTeam/c-careteam", with_person)
    plan = trust.get("CarePlan/c-crisis-plan").json()
    for k in ("id", "meta"):
        plan.pop(k)
    plan["careTeam"] = [{"reference": "CareTeam/c-careteam"}]
    plan["activity"][1]["detail"]["performer"] = [{"reference": person}]
    pid = changes.create(plan).split("/")[1]
    shown = carer.get(f"CarePlan/{pid}").json()
    assert shown["activity"][1]["detail"]["performer"] == [{"reference": person}]
    assert "child protection" not in str(carer.get("CareTeam/c-careteam").json())
    walk = [
        ("_id", "c-careteam"),
        ("_include:iterate", "CareTeam:participant"),
        ("_revinclude:iterate", "CarePlan:care-team"),
        ("_include:iterate", "CarePlan:performer"),
    ]
    bundle = carer.get("CareTeam", params=walk).json()
    found = resource_keys(bundle)
    assert f"CarePlan/{pid}" in found
    assert person in found, sorted(found)
    team = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "c-careteam")
    assert person not in str(team.get("participant", []))


@pytest.mark.parametrize("client_id", ["gp", "social-care", "probation"])  # shown C's trust
def test_a_professional_or_organisation_comes_only_where_what_is_shown_refers_to_it(
    as_client: Any, trust: Fhir, client_id: str
) -> None:
    """`cpa-fhir share` sends a professional or organisation only when shared content
    refers to it. The roles held with the trust, and the organisations part of it,
    refer to an organisation a partner is shown; found by a reverse include from it,
    they went to the partner though nothing it is shown names them."""
    walk = [
        ("patient", "Patient/c-patient"),
        ("_include", "EpisodeOfCare:organization"),
        ("_revinclude:iterate", "PractitionerRole:organization"),
        ("_revinclude:iterate", "Organization:partof"),
    ]
    assert {"PractitionerRole"} <= {
        k.split("/")[0] for k in _keys(_search(trust, "EpisodeOfCare", walk), "include")
    }
    response = as_client(client_id).get("EpisodeOfCare", params=walk)
    assert response.status_code == 200, response.text
    shown = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
        for e in response.json().get("entry", [])
    }
    included = _keys(response.json(), "include")
    assert "Organization/c-trust" in included
    for key in included:
        others = [r for k, r in shown.items() if k != key]
        assert any(key in _references(r) for r in others), f"{key} went to {client_id}"
