"""A partner's search answers for what the partner is shown: a resource redacted of a
part is found by what remains of it, never by what was removed, and as one without
that part (`:missing=true`, `:not`), so that no criterion tells where it was
redacted. Checked over every redacted resource of record C each partner sees."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from cpa_fhir.sandbox import Sandbox
from cpa_fhir.store import default_search_parameters, index_resource
from tests.sandbox.conftest import Fhir, resource_keys
from tests.sandbox.test_consent_freshness import Changes, changes  # noqa: F401
from tests.sandbox.test_existence import _caller
from tests.sandbox.test_leaks import C_KEYS

PARTNERS = ["gp", "social-care", "probation", "children-services", "carer"]
TYPES = ["CarePlan", "CareTeam", "EpisodeOfCare", "Encounter", "Flag", "Condition", "Goal"]


def _redacted(trust: Fhir, partner: Fhir) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(key, stored form, form shown) of each of C's resources the partner sees redacted."""
    out = []
    for key in sorted(C_KEYS):
        if key.split("/")[0] not in TYPES:
            continue
        shown = partner.get(key)
        if shown.status_code != 200:
            continue
        stored = trust.get(key).json()
        labels = {c.get("code") for c in shown.json().get("meta", {}).get("security", [])}
        if "REDACTED" in labels:
            out.append((key, stored, shown.json()))
    return out


def _found(client: Fhir, key: str, name: str, value: str) -> bool:
    rtype, rid = key.split("/")
    r = client.get(rtype, params={"_id": rid, name: value})
    assert r.status_code == 200, r.text
    return key in resource_keys(r.json())


@pytest.mark.parametrize("client_id", PARTNERS)
def test_a_redacted_resource_is_found_as_it_is_shown(
    as_client: Any, trust: Fhir, client_id: str
) -> None:
    partner: Fhir = as_client(client_id)
    redacted = _redacted(trust, partner)
    if client_id == "gp":
        assert redacted, "the GP sees some of C's record redacted"
    registry = default_search_parameters()
    for key, stored, shown in redacted:
        rtype = key.split("/")[0]
        parameters = [p for p in registry.indexed(rtype) if p.type in ("token", "reference")]
        before, after = index_resource(stored, parameters), index_resource(shown, parameters)
        for parameter in parameters:
            code = parameter.code
            has = any(row[0] == code for row in after.tokens | after.references)
            # One answer or the other, as for any resource: never neither.
            assert _found(partner, key, f"{code}:missing", "false") == has, (key, code)
            assert _found(partner, key, f"{code}:missing", "true") == (not has), (key, code)
        for name, system, value in sorted(before.tokens - after.tokens, key=str):
            token = f"{system}|{value}" if system else f"|{value}"
            assert not _found(partner, key, name, token), (key, name, token)
            assert _found(partner, key, f"{name}:not", token), (key, name, token)
        for name, system, value in sorted(after.tokens & before.tokens, key=str):
            token = f"{system}|{value}" if system else f"|{value}"
            assert _found(partner, key, name, token), (key, name, token)


REDACTED = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue|REDACTED"


@pytest.mark.parametrize(
    ("match", "params", "found"),
    [
        ("c-careplan", {"_security": REDACTED}, True),
        ("c-careplan", {"_security:not": REDACTED}, False),
        ("c-crisis-plan", {"part-of:CarePlan._security": REDACTED}, True),
        ("c-crisis-plan", {"part-of:CarePlan._security:not": REDACTED}, False),
        ("c-crisis-plan", {"part-of:CarePlan._security:missing": "true"}, False),
    ],
)
def test_labels_and_chain_ends_are_judged_on_what_is_shown(
    as_client: Any, trust: Fhir, match: str, params: dict[str, str], found: bool
) -> None:
    """The GP is shown C's care plan labelled REDACTED (the label is the server's,
    not stored): it finds the plan by the label, directly and at the end of a chain
    from the plans that are part of it, and never by its absence."""
    gp: Fhir = as_client("gp")
    labels = gp.get("CarePlan/c-careplan").json()["meta"]["security"]
    assert {"system": REDACTED.split("|")[0], "code": "REDACTED"} in [
        {"system": c["system"], "code": c["code"]} for c in labels
    ]
    answer = gp.get("CarePlan", params={"_id": match, **params})
    assert answer.status_code == 200, answer.text
    assert (f"CarePlan/{match}" in resource_keys(answer.json())) == found
    # The trust, shown the stored plan (no such label), is answered the other way.
    stored = trust.get("CarePlan", params={"_id": match, **params})
    if "missing" not in next(iter(params)):
        assert (f"CarePlan/{match}" in resource_keys(stored.json())) == (not found)


PLAN = "CarePlan/c-careplan"


def _finds_plan(call: Any, params: list[tuple[str, str]]) -> bool:
    r = call("GET", "CarePlan", query=params)
    assert r.status == 200, r.body[:300]
    return PLAN in {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in orjson.loads(r.body).get("entry", [])
    }


def test_an_approximate_date_is_not_judged_from_an_earlier_now(
    sandbox: Sandbox,
    trust: Fhir,
    changes: Changes,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ap` depends on now, so an answer judged with it is not kept (in
    `derived.matches_as_shown`). The GP sees C's care plan without the probation
    activity (A, scheduled on D) and with the coordinator's (B, D - 8 days). 100 days
    before D, `ap` D's margin (10 days) takes in B; a day before D (1 day) only A,
    which the GP is not shown: the plan is then not found, as an answer kept from 100
    days before would have had it."""
    now = datetime.now(UTC)
    d = (now + timedelta(days=100)).date()

    def dated(plan: dict[str, Any]) -> None:
        b = plan["activity"][0]["detail"]
        b.pop("scheduledString", None)
        b["scheduledPeriod"] = {
            "start": str(d - timedelta(days=8)),
            "end": str(d - timedelta(days=8)),
        }
        assert plan["activity"][4]["detail"]["description"].startswith("Probation")
        plan["activity"][4]["detail"]["scheduledPeriod"] = {"start": str(d), "end": str(d)}

    changes.edit(PLAN, dated)
    gp = _caller(sandbox, "gp")
    moment = [now]
    monkeypatch.setattr(sandbox.router, "clock", lambda: moment[0])
    monkeypatch.setattr(sandbox.repo, "clock", lambda: moment[0])
    query = [("activity-date", f"ap{d}")]
    assert _finds_plan(gp, query)  # by B, which the GP is shown
    moment[0] = now + timedelta(days=99)
    # Asked afresh (another criterion, so nothing kept applies), it is not found:
    assert not _finds_plan(gp, [*query, ("_id", "c-careplan")])
    # Asked as before, it is: by the withheld activity's date.
    assert not _finds_plan(gp, query)
