"""What the server keeps between requests never outlives a change to the store.

A partner reads something; the trust then withdraws or narrows consent, or changes
a resource (or one it refers to) so that it carries a category the partner may not
see; the partner's very next request must reflect it. And the other way round:
consent given is honoured on the next request. Every disclosure has its AuditEvent
committed before the body goes, one per patient per request, also when many
partners read at once; when the AuditEvent cannot be stored, nothing is shared.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace as dataclass_replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from cpa_fhir.consent import disclosed_references
from cpa_fhir.sandbox import Sandbox
from cpa_fhir.sandbox._access import DerivedCache
from cpa_fhir.sandbox._router import Request
from cpa_fhir.store import SqlRepository
from cpa_fhir.store._appender import AppendRejected, ProcessAppender
from tests.sandbox.conftest import Fhir, resource_keys
from tests.store.conftest import POSTGRES_URL

CATEGORY = "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category"
AGENCY = "https://cpa-fhir.org/fhir/CodeSystem/partner-agency-type"
C_PLAN = "CarePlan/c-careplan"
C_NEED = "Condition/c-need-mental-health"  # a need: care-plan information
C_SELF_HARM = "Flag/c-risk-self-harm"  # risk-to-self: not given to the GP
HOUSING = "housing support"  # in an activity of C's plan that adult social care performs

Edit = Callable[[dict[str, Any]], None]


def _gp_permit(consent: dict[str, Any]) -> dict[str, Any]:
    return next(
        p
        for p in consent["provision"]["provision"]
        if p["type"] == "permit"
        and any(a["reference"]["reference"] == "Organization/c-gp-practice" for a in p["actor"])
    )


def _label(code: str) -> dict[str, str]:
    return {"system": CATEGORY, "code": code}


class Changes:
    """The trust's changes made by a test, undone afterwards (the module's sandbox is
    shared by its tests)."""

    def __init__(self, trust: Fhir):
        self.trust = trust
        self.saved: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []

    def edit(self, key: str, edit: Edit) -> dict[str, Any]:
        current = self.trust.get(key)
        assert current.status_code == 200, current.text
        body = current.json()
        self.saved.setdefault(key, copy.deepcopy(body))
        edit(body)
        r = self.trust.put(key, body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def delete(self, key: str) -> None:
        current = self.trust.get(key)
        assert current.status_code == 200, current.text
        self.saved.setdefault(key, current.json())
        assert self.trust.delete(key).status_code == 204

    def create(self, resource: dict[str, Any]) -> str:
        r = self.trust.post(resource["resourceType"], resource)
        assert r.status_code == 201, r.text
        key = f"{resource['resourceType']}/{r.json()['id']}"
        self.created.append(key)
        return key

    def undo(self) -> None:
        for key in self.created:
            self.trust.delete(key)
        for key, body in self.saved.items():
            r = self.trust.put(key, body)
            assert r.status_code in (200, 201), r.text
        self.saved.clear()
        self.created.clear()


@pytest.fixture
def changes(trust: Fhir) -> Iterator[Changes]:
    made = Changes(trust)
    yield made
    made.undo()


@pytest.fixture(scope="module")
def gp(as_client: Any) -> Fhir:
    client: Fhir = as_client("gp")
    return client


def _visible(client: Fhir, key: str) -> bool:
    """Whether the client can see `key` by read and by a search of its patient's record."""
    rtype = key.split("/")[0]
    read = client.get(key)
    assert read.status_code in (200, 404), read.text
    param = "patient" if rtype in ("Flag", "Consent") else "subject"
    found = client.get(rtype, params={param: "Patient/c-patient", "_count": "1000"})
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["total"] == len(resource_keys(body))
    in_search = key in resource_keys(body)
    shown: bool = read.status_code == 200
    assert in_search == shown, f"read and search disagree on {key}"
    return shown


# -- consent withdrawn or narrowed ----------------------------------------------------

YESTERDAY = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
LAST_YEAR = (datetime.now(UTC) - timedelta(days=400)).date().isoformat()


def _inactive(c: dict[str, Any]) -> None:
    c["status"] = "inactive"


def _refused(c: dict[str, Any]) -> None:
    c["status"] = "rejected"


def _deny_care_plan(c: dict[str, Any]) -> None:
    c["provision"]["provision"].append({"type": "deny", "securityLabel": [_label("care-plan")]})


def _permit_moved_to_social_care(c: dict[str, Any]) -> None:
    _gp_permit(c)["actor"][0]["reference"] = {"reference": "Organization/c-social-care"}


def _permit_narrowed(c: dict[str, Any]) -> None:
    permit = _gp_permit(c)
    permit["securityLabel"] = [x for x in permit["securityLabel"] if x["code"] != "care-plan"]


def _consent_ended(c: dict[str, Any]) -> None:
    c["provision"]["period"] = {"start": LAST_YEAR, "end": YESTERDAY}


def _permit_ended(c: dict[str, Any]) -> None:
    _gp_permit(c)["period"] = {"start": LAST_YEAR, "end": YESTERDAY}


WITHDRAWALS: dict[str, Edit] = {
    "status inactive": _inactive,
    "status rejected": _refused,
    "a deny of care-plan added": _deny_care_plan,
    "permit now for another organisation": _permit_moved_to_social_care,
    "care-plan taken out of the permit": _permit_narrowed,
    "consent period ended yesterday": _consent_ended,
    "permit period ended yesterday": _permit_ended,
}


@pytest.mark.parametrize("withdraw", WITHDRAWALS.values(), ids=WITHDRAWALS.keys())
def test_withdrawn_consent_takes_effect_on_the_very_next_request(
    gp: Fhir, changes: Changes, withdraw: Edit
) -> None:
    for _ in range(2):  # warm: what the server keeps is in place
        assert _visible(gp, C_PLAN)
        assert _visible(gp, C_NEED)
        assert gp.get(f"{C_PLAN}/_history/1").status_code == 200
    changes.edit("Consent/c-consent", withdraw)
    assert not _visible(gp, C_PLAN)
    assert not _visible(gp, C_NEED)
    assert gp.get(f"{C_PLAN}/_history/1").status_code == 404
    batch = gp.post(
        "",
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"request": {"method": "GET", "url": C_PLAN}}],
        },
    )
    assert batch.status_code == 200
    assert batch.json()["entry"][0]["response"]["status"] == "404"
    # Given back: visible again on the next request.
    changes.undo()
    assert _visible(gp, C_PLAN)


def test_deleted_consent_takes_effect_on_the_very_next_request(gp: Fhir, changes: Changes) -> None:
    assert _visible(gp, C_PLAN)
    changes.delete("Consent/c-consent")
    assert not _visible(gp, C_PLAN)
    assert gp.get("Patient/c-patient").status_code == 404
    changes.undo()
    assert _visible(gp, C_PLAN)
    assert gp.get("Patient/c-patient").status_code == 200


def test_withdrawal_is_seen_while_partners_are_reading(
    base_url: str, sandbox: Sandbox, changes: Changes
) -> None:
    """Partners read without pause over HTTP while the trust withdraws consent: every
    read that starts after the withdrawal's response came back is refused."""
    token = sandbox.token_for("gp", f"{base_url}/fhir")["access_token"]
    headers = {"authorization": f"Bearer {token}"}
    done_at: list[float] = []
    seen: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def reader() -> None:
        with httpx.Client(base_url=f"{base_url}/fhir", headers=headers, timeout=30) as http:
            while not stop.is_set():
                started = time.monotonic()
                status = http.get(C_PLAN).status_code
                with lock:
                    seen.append((started, status))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()

    def reads_since(moment: float) -> int:
        with lock:
            return sum(1 for t, _ in seen if t > moment)

    def wait_for_reads(moment: float) -> None:
        deadline = time.monotonic() + 20
        while reads_since(moment) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)

    try:
        wait_for_reads(0.0)
        changes.edit("Consent/c-consent", _inactive)
        done_at.append(time.monotonic())
        wait_for_reads(done_at[0])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    before = [s for t, s in seen if t < done_at[0]]
    after = [s for t, s in seen if t > done_at[0]]
    assert before and after, "the readers did not overlap the withdrawal"
    assert set(before) <= {200, 404}
    assert set(after) == {404}, f"{after.count(200)} reads after the withdrawal saw the plan"


def _other_repository(sandbox: Sandbox) -> SqlRepository:
    """A second repository on the sandbox's store, as another server process would open."""
    engine = sandbox.repo.engine
    if engine.dialect.name == "sqlite":
        return SqlRepository(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        schema = connection.execute(sa.text("SELECT current_schema()")).scalar_one()
    return SqlRepository(POSTGRES_URL, schema=schema)


def test_a_change_written_by_another_process_takes_effect(
    gp: Fhir, sandbox: Sandbox, trust: Fhir
) -> None:
    other = _other_repository(sandbox)
    original = other.read("Consent", "c-consent").resource()
    try:
        assert _visible(gp, C_PLAN)
        other.update({**original, "status": "inactive"})
        assert not _visible(gp, C_PLAN)
    finally:
        other.update(original)
        other.close()
    assert _visible(gp, C_PLAN)
    assert trust.get("Consent/c-consent").json()["status"] == "active"


def test_a_change_written_by_another_process_takes_effect_on_a_running_server(
    base_url: str, sandbox: Sandbox
) -> None:
    """The same through a served app, which (on a database server) reads the store's
    generation on its event loop, shared among concurrent requests."""
    token = sandbox.token_for("gp", f"{base_url}/fhir")["access_token"]
    other = _other_repository(sandbox)
    original = other.read("Consent", "c-consent").resource()
    with httpx.Client(
        base_url=f"{base_url}/fhir", headers={"authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        try:
            assert http.get(C_PLAN).status_code == 200
            other.update({**original, "status": "inactive"})
            assert http.get(C_PLAN).status_code == 404
        finally:
            other.update(original)
            other.close()
        assert http.get(C_PLAN).status_code == 200


# -- consent given --------------------------------------------------------------------


def test_consent_given_takes_effect_on_the_very_next_request(gp: Fhir, changes: Changes) -> None:
    for _ in range(2):
        assert not _visible(gp, C_SELF_HARM)
    changes.edit(
        "Consent/c-consent", lambda c: _gp_permit(c)["securityLabel"].append(_label("risk-to-self"))
    )
    assert _visible(gp, C_SELF_HARM)
    assert gp.get(f"{C_SELF_HARM}/_history/1").status_code == 200
    changes.undo()
    assert not _visible(gp, C_SELF_HARM)


def test_a_new_consent_takes_effect_and_so_does_its_deletion(
    gp: Fhir, trust: Fhir, changes: Changes
) -> None:
    assert not _visible(gp, C_SELF_HARM)
    consent = trust.get("Consent/c-consent").json()
    consent.pop("id")
    consent.pop("meta", None)
    consent["meta"] = {"profile": ["https://cpa-fhir.org/fhir/StructureDefinition/cpa-consent"]}
    permit = copy.deepcopy(_gp_permit(consent))
    permit["securityLabel"] = [_label("risk-to-self")]
    consent["provision"]["provision"] = [permit]
    key = changes.create(consent)
    assert _visible(gp, C_SELF_HARM)
    assert trust.delete(key).status_code == 204
    assert not _visible(gp, C_SELF_HARM)


@contextlib.contextmanager
def _stored_directly(sandbox: Sandbox, resource: dict[str, Any]) -> Iterator[str]:
    """Store a resource as another writer of the database might, past the API's checks;
    delete it afterwards."""
    stored = sandbox.repo.create(resource)
    try:
        yield f"{stored.resource_type}/{stored.id}"
    finally:
        sandbox.repo.delete(stored.resource_type, stored.id)


def _consent_naming(patient: str, provisions: list[dict[str, Any]], trust: Fhir) -> dict[str, Any]:
    consent = trust.get("Consent/c-consent").json()
    consent.pop("id")
    consent.pop("meta", None)
    consent["patient"] = {"reference": patient}
    consent["provision"]["provision"] = provisions
    return dict(consent)


@pytest.mark.parametrize(
    "patient",
    [
        "https://other-trust.example/fhir/Patient/c-patient",
        "http://testserver/fhir/Patient/c-patient",  # this server's base, written out
        "https://other-trust.example/fhir/Patient/c-patient/_history/1",
    ],
)
def test_a_consent_not_naming_its_patient_as_this_servers_is_held_to_its_refusals_alone(
    sandbox: Sandbox, gp: Fhir, trust: Fhir, patient: str
) -> None:
    """The search index files a Consent whose patient is an absolute URL ending in
    Patient/c-patient under C, whether it is another server's patient or this
    server's base written out. The API refuses to store one (422); one stored all the
    same grants nothing here, and what it refuses is refused."""
    permit = copy.deepcopy(_gp_permit(trust.get("Consent/c-consent").json()))
    permit["securityLabel"] = [_label("risk-to-self")]
    grant = _consent_naming(patient, [permit], trust)
    refused = trust.post("Consent", grant)
    assert refused.status_code == 422, refused.text
    assert "Consent.patient" in refused.text
    assert _visible(gp, C_PLAN) and not _visible(gp, C_SELF_HARM)
    with _stored_directly(sandbox, grant):
        assert trust.get("Consent", params={"patient": "Patient/c-patient"}).json()["total"] == 2
        assert not _visible(gp, C_SELF_HARM)
        assert _visible(gp, C_PLAN)
    refusal = {**permit, "type": "deny", "securityLabel": [_label("care-plan")]}
    with _stored_directly(sandbox, _consent_naming(patient, [refusal], trust)):
        assert not _visible(gp, C_PLAN)
    assert _visible(gp, C_PLAN)


def test_a_refusal_naming_the_partner_by_this_servers_absolute_url_applies(
    gp: Fhir, trust: Fhir, changes: Changes
) -> None:
    permit = _gp_permit(trust.get("Consent/c-consent").json())
    refusal = copy.deepcopy(permit)
    refusal["type"] = "deny"
    refusal["actor"][0]["reference"] = {
        "reference": "http://testserver/fhir/Organization/c-gp-practice"
    }
    refusal.pop("purpose")
    assert _visible(gp, C_PLAN)
    changes.create(_consent_naming("Patient/c-patient", [refusal], trust))
    assert not _visible(gp, C_PLAN)
    assert gp.get("Patient/c-patient").status_code == 404


def test_a_consent_starting_later_today_grants_nothing_yet(gp: Fhir, changes: Changes) -> None:
    """A permit for risk-to-self whose period starts in an hour: not yet."""
    start = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0).isoformat()

    def later(c: dict[str, Any]) -> None:
        permit = copy.deepcopy(_gp_permit(c))
        permit["securityLabel"] = [_label("risk-to-self")]
        permit["period"] = {"start": start}
        c["provision"]["provision"].append(permit)

    assert not _visible(gp, C_SELF_HARM)
    changes.edit("Consent/c-consent", later)
    assert not _visible(gp, C_SELF_HARM)
    assert _visible(gp, C_PLAN)


def test_a_permit_takes_effect_and_lapses_at_its_period_edges_without_a_write(
    gp: Fhir, sandbox: Sandbox, changes: Changes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is written between these reads: only the time of disclosure moves, so
    a decision kept for a span of time must end where a period does."""
    opens = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    closes = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)

    def timed(c: dict[str, Any]) -> None:
        permit = copy.deepcopy(_gp_permit(c))
        permit["securityLabel"] = [_label("risk-to-self")]
        # Edges in two zones: 10:30+01:00 is 09:30Z.
        permit["period"] = {"start": "2026-12-01T10:30:00+01:00", "end": "2026-12-01T15:00:00Z"}
        c["provision"]["provision"].append(permit)

    changes.edit("Consent/c-consent", timed)
    moment = [opens - timedelta(hours=2)]
    monkeypatch.setattr(sandbox.router, "clock", lambda: moment[0])
    expected = [
        (opens - timedelta(hours=2), False),
        (opens - timedelta(microseconds=1), False),
        (opens, True),
        (opens + timedelta(hours=1), True),
        (closes - timedelta(microseconds=1), True),
        (closes, False),
        (closes + timedelta(hours=3), False),
    ]
    for when, visible in expected:
        moment[0] = when
        for _ in range(2):
            assert _visible(gp, C_SELF_HARM) is visible, when
        assert _visible(gp, C_PLAN), when


# -- content changed by the trust ------------------------------------------------------


def test_a_resource_relabelled_as_substance_use_is_withheld_on_the_next_read(
    gp: Fhir, changes: Changes
) -> None:
    for _ in range(2):
        assert _visible(gp, C_NEED)
    changes.edit(
        C_NEED, lambda r: r["code"].update(text=r["code"]["text"] + "; drinking alcohol daily")
    )
    assert not _visible(gp, C_NEED)
    # Now withheld, it is unknown in every interaction, as one never there is: a
    # version shared before, or its history, would tell that it is still there and
    # has become something the GP may not see.
    never = C_NEED.split("/")[0] + "/no-such-need"
    for url in (C_NEED, f"{C_NEED}/_history/1", f"{C_NEED}/_history"):
        absent = url.replace(C_NEED, never)
        assert gp.get(url).status_code == gp.get(absent).status_code == 404, url
        assert gp.get(url).json()["issue"] == [
            {**issue, "details": {"text": issue["details"]["text"].replace(never, C_NEED)}}
            for issue in gp.get(absent).json()["issue"]
        ]
    history = gp.get(C_NEED.split("/")[0] + "/_history", params={"_count": "1000"}).json()
    assert C_NEED.split("/")[1] not in {e["resource"]["id"] for e in history.get("entry", [])}
    changes.undo()
    assert _visible(gp, C_NEED)
    assert gp.get(f"{C_NEED}/_history/1").status_code == 200


def test_an_element_relabelled_is_redacted_on_the_next_read(gp: Fhir, changes: Changes) -> None:
    marker = "MARKER-cannabis-7f3a"
    assert marker not in gp.get(C_PLAN).text
    updated = changes.edit(
        C_PLAN, lambda r: r.setdefault("note", []).append({"text": f"{marker} uses cannabis"})
    )
    read = gp.get(C_PLAN)
    assert read.status_code == 200
    assert read.headers["etag"] == f'W/"{updated["meta"]["versionId"]}"'
    assert marker not in read.text and "cannabis" not in read.text
    found = gp.get("CarePlan", params={"subject": "Patient/c-patient", "_count": "100"})
    assert marker not in found.text


def test_a_change_to_a_referred_resource_redacts_on_the_next_read(
    gp: Fhir, changes: Changes
) -> None:
    """The plan itself is unchanged (same version); an organisation it names as the
    performer of an activity becomes a probation service, so the activity is offending
    information the GP may not see."""
    before = gp.get(C_PLAN)
    assert before.status_code == 200 and HOUSING in before.text

    def probation(org: dict[str, Any]) -> None:
        for concept in org["type"]:
            for coding in concept["coding"]:
                if coding["system"] == AGENCY:
                    coding.update(code="probation", display="Probation service")

    changes.edit("Organization/c-social-care", probation)
    after = gp.get(C_PLAN)
    assert after.status_code == 200
    assert after.headers["etag"] == before.headers["etag"]
    assert HOUSING not in after.text
    found = gp.get("CarePlan", params={"subject": "Patient/c-patient", "_count": "100"})
    assert C_PLAN in resource_keys(found.json()) and HOUSING not in found.text
    changes.undo()
    assert HOUSING in gp.get(C_PLAN).text


def test_a_carer_no_longer_caring_loses_its_need_to_know_on_the_next_request(
    as_client: Any, changes: Changes
) -> None:
    """The carer's client reaches C's record by the carers' need to know alone (C's
    consent names no carer): once the trust records its RelatedPerson as inactive,
    or as another person's carer, that basis no longer holds."""
    carer: Fhir = as_client("carer")
    crisis_plan = "CarePlan/c-crisis-plan"
    assert _visible(carer, crisis_plan)
    changes.edit("RelatedPerson/c-carer-son", lambda person: person.update(active=False))
    assert not _visible(carer, crisis_plan)
    assert carer.get("Patient/c-patient").status_code == 404
    changes.edit("RelatedPerson/c-carer-son", lambda person: person.update(active=True))
    assert _visible(carer, crisis_plan)
    changes.edit(
        "RelatedPerson/c-carer-son",
        lambda person: person.update(patient={"reference": "Patient/d-patient"}),
    )
    assert not _visible(carer, crisis_plan)


def test_an_agency_no_longer_in_the_care_team_loses_its_legal_basis_on_the_next_request(
    as_client: Any, changes: Changes
) -> None:
    """Probation reaches C's risk to others by public protection, which holds while
    C's care team records its involvement (an officer acting on its behalf)."""
    probation: Fhir = as_client("probation")
    risk = "Flag/c-risk-harm-to-others"
    assert _visible(probation, risk)

    def without_probation(team: dict[str, Any]) -> None:
        team["participant"] = [
            p
            for p in team["participant"]
            if p.get("onBehalfOf", {}).get("reference") != "Organization/c-probation"
        ]

    changes.edit("CareTeam/c-careteam", without_probation)
    assert not _visible(probation, risk)
    assert probation.get("Patient/c-patient").status_code == 404


def test_a_carers_need_to_know_holds_within_its_period(as_client: Any, changes: Changes) -> None:
    carer: Fhir = as_client("carer")
    assert _visible(carer, "CarePlan/c-crisis-plan")
    changes.edit(
        "RelatedPerson/c-carer-son",
        lambda person: person.update(period={"start": "2020-01-01", "end": "2025-01-01"}),
    )
    assert not _visible(carer, "CarePlan/c-crisis-plan")


def test_a_carers_own_details_go_to_it_as_consent_allows_and_are_audited(
    sandbox: Sandbox, trust: Fhir, changes: Changes
) -> None:
    """A carer's RelatedPerson is part of the record of the person it cares for, and
    what it holds (the carer's assessment, say) is carer information: it goes to the
    carer itself only as the decision allows, as it would to anyone, and once it goes
    its AuditEvent names it. C's consent names no carer."""
    own = "RelatedPerson/c-carer-son"
    carer = dataclass_replace(
        sandbox.registry.clients["carer"],
        scopes=frozenset({"system/RelatedPerson.read", "system/Patient.read"}),
    )

    def get(path: str, *query: tuple[str, str]) -> Any:
        return sandbox.router.handle(
            Request("GET", path, list(query), {}, b""), carer, carer.scopes
        )

    assert get(own).status == 404
    assert get(f"{own}/_history/1").status == 404
    found = get("RelatedPerson", ("patient", "Patient/c-patient"))
    assert found.status == 200 and orjson.loads(found.body)["total"] == 0
    assert get("Patient/c-patient").status == 200  # the carers' need to know holds

    # C consents to her son's seeing what the record holds about him as her carer.
    def permit_carer(consent: dict[str, Any]) -> None:
        permit = copy.deepcopy(_gp_permit(consent))
        permit["actor"][0]["reference"] = {"reference": own}
        permit["securityLabel"] = [_label("administrative"), _label("carer")]
        permit["purpose"] = [
            {**permit["purpose"][0], "code": "FAMRQT", "display": "family requested"}
        ]
        consent["provision"]["provision"].append(permit)

    changes.edit("Consent/c-consent", permit_carer)
    before = _audit_count(trust, entity=own)
    shown = get(own)
    assert shown.status == 200, shown.body
    assert orjson.loads(shown.body)["id"] == "c-carer-son"
    assert _audit_count(trust, entity=own) == before + 1
    found = get("RelatedPerson", ("patient", "Patient/c-patient"))
    assert orjson.loads(found.body)["total"] == 1
    assert _audit_count(trust, entity=own) == before + 2


PROBATION = "Organization/c-probation"
RISK_TO_OTHERS = "Flag/c-risk-harm-to-others"


def _edit_probation_participant(edit: Callable[[dict[str, Any]], None]) -> Edit:
    def change(team: dict[str, Any]) -> None:
        for participant in team["participant"]:
            if participant.get("onBehalfOf", {}).get("reference") == PROBATION:
                edit(participant)

    return change


@pytest.mark.parametrize(
    ("period", "holds"),
    [
        ({"start": "2025-11-03", "end": "2025-12-01"}, False),  # left the team
        ({"start": "2999-01-01"}, False),  # not yet on it
        ({"start": "2025-11-03", "end": "2999-01-01"}, True),
    ],
)
def test_an_agencys_legal_basis_holds_within_its_role_period(
    as_client: Any, changes: Changes, period: dict[str, str], holds: bool
) -> None:
    probation: Fhir = as_client("probation")
    assert _visible(probation, RISK_TO_OTHERS)
    changes.edit(
        "CareTeam/c-careteam",
        _edit_probation_participant(lambda p: p.update(period=period)),
    )
    assert _visible(probation, RISK_TO_OTHERS) == holds


@pytest.mark.parametrize("status", ["proposed", "suspended", "inactive"])
def test_an_agencys_legal_basis_needs_an_active_care_team(
    as_client: Any, changes: Changes, status: str
) -> None:
    probation: Fhir = as_client("probation")
    changes.edit("CareTeam/c-careteam", lambda team: team.update(status=status))
    assert not _visible(probation, RISK_TO_OTHERS)


def test_an_agency_is_recognised_by_its_identifier(
    sandbox: Sandbox, trust: Fhir, changes: Changes
) -> None:
    """Named by its ODS code alone (no reference), an agency whose client carries that
    identifier is the one named."""
    ods = ("https://fhir.nhs.uk/Id/ods-organization-code", "PROB01")
    client = dataclass_replace(sandbox.registry.clients["probation"], identifiers=frozenset({ods}))

    def status(key: str) -> int:
        request = Request("GET", key, [], {}, b"")
        return sandbox.router.handle(request, client, client.scopes).status

    def by_identifier(participant: dict[str, Any]) -> None:
        participant["onBehalfOf"] = {"identifier": {"system": ods[0], "value": ods[1]}}

    changes.edit("CareTeam/c-careteam", _edit_probation_participant(by_identifier))
    assert status(RISK_TO_OTHERS) == 200
    other = {"identifier": {"system": ods[0], "value": "SOMEONE-ELSE"}}
    changes.edit(
        "CareTeam/c-careteam",
        lambda team: [
            p.update(onBehalfOf=other)
            for p in team["participant"]
            if p.get("onBehalfOf", {}).get("identifier", {}).get("value") == ods[1]
        ],
    )
    assert status(RISK_TO_OTHERS) == 404


@pytest.mark.parametrize(
    ("role_state", "holds"),
    [
        ({"active": True}, True),
        ({"active": True, "period": {"start": "2025-11-03", "end": "2999-01-01"}}, True),
        ({"active": False}, False),  # the role is no longer held
        ({"active": True, "period": {"start": "2020-01-01", "end": "2021-01-01"}}, False),
        ({"active": True, "period": {"start": "2999-01-01"}}, False),  # not yet begun
    ],
)
def test_an_agency_is_recognised_through_a_practitioner_role_while_it_is_held(
    as_client: Any, changes: Changes, role_state: dict[str, Any], holds: bool
) -> None:
    """The officer sits on C's team in a PractitionerRole with probation, not on its
    behalf: probation's involvement is recorded while that role is active and within
    its period, and its public-protection basis reaches C's risk-to-others flag only
    then."""
    probation: Fhir = as_client("probation")
    role = changes.create(
        {
            "resourceType": "PractitionerRole",
            "practitioner": {"reference": "Practitioner/c-probation-officer"},
            "organization": {"reference": PROBATION},
            **role_state,
        }
    )

    def by_role(participant: dict[str, Any]) -> None:
        participant.pop("onBehalfOf")
        participant["member"] = {"reference": role}

    changes.edit("CareTeam/c-careteam", _edit_probation_participant(by_role))
    assert _visible(probation, RISK_TO_OTHERS) == holds


def test_a_care_team_of_a_patient_elsewhere_gives_no_legal_basis_here(
    as_client: Any, trust: Fhir, changes: Changes
) -> None:
    """Probation leaves C's care team; the trust then records a care team of a patient
    at another server who happens to share C's id, naming probation. `_care_teams`
    finds teams by the search index, which files an absolute URL under the type/id it
    ends in: that team is taken as C's, and probation's basis reaches C's record.
    (`patient_of` reads such a reference as no patient of this server's.)"""
    probation: Fhir = as_client("probation")
    changes.edit(
        "CareTeam/c-careteam",
        lambda team: team.update(
            participant=[
                p
                for p in team["participant"]
                if p.get("onBehalfOf", {}).get("reference") != PROBATION
            ]
        ),
    )
    assert not _visible(probation, RISK_TO_OTHERS)
    changes.create(
        {
            "resourceType": "CareTeam",
            "status": "active",
            "subject": {"reference": "https://other-trust.example/fhir/Patient/c-patient"},
            "participant": [
                {
                    "member": {"reference": "Practitioner/c-probation-officer"},
                    "onBehalfOf": {"reference": PROBATION},
                }
            ],
        }
    )
    assert not _visible(probation, RISK_TO_OTHERS)


# -- audit ------------------------------------------------------------------------------


def _audit_count(trust: Fhir, **params: str) -> int:
    r = trust.get("AuditEvent", params={**params, "_summary": "count"})
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


def _audit_ids(trust: Fhir) -> set[str]:
    r = trust.get("AuditEvent", params={"_count": "1000"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] <= 1000
    return {e["resource"]["id"] for e in body.get("entry", [])}


def test_each_disclosing_read_is_audited_once_and_a_withheld_one_not_at_all(
    gp: Fhir, trust: Fhir
) -> None:
    for n in range(3):
        before = _audit_count(trust)
        about = _audit_count(trust, entity=C_PLAN)
        assert gp.get(C_PLAN).status_code == 200
        # Committed before the body left: visible as soon as the response is.
        assert _audit_count(trust) == before + 1, n
        assert _audit_count(trust, entity=C_PLAN) == about + 1, n
    before = _audit_count(trust)
    assert gp.get(C_SELF_HARM).status_code == 404
    assert gp.get("CarePlan/no-such-plan").status_code == 404
    assert _audit_count(trust) == before


def test_a_search_is_audited_once_per_patient_disclosed(
    gp: Fhir, trust: Fhir, changes: Changes
) -> None:
    # Patients A and B consent to the GP's seeing their care plans too.
    for letter in "ab":
        consent = trust.get("Consent/c-consent").json()
        consent.pop("id")
        consent["meta"] = {"profile": [consent["meta"]["profile"][0]]}
        consent["patient"] = {"reference": f"Patient/{letter}-patient"}
        consent["performer"] = [{"reference": f"Patient/{letter}-patient"}]
        consent["provision"]["provision"] = [_gp_permit(consent)]
        changes.create(consent)
    before = _audit_ids(trust)
    found = gp.get("CarePlan", params={"_count": "1000"})
    assert found.status_code == 200
    plans = [e["resource"] for e in found.json()["entry"]]
    patients = {p["subject"]["reference"] for p in plans}
    assert patients == {"Patient/a-patient", "Patient/b-patient", "Patient/c-patient"}
    new = _audit_ids(trust) - before
    assert len(new) == len(patients)
    named: set[str] = set()
    for event_id in new:
        event = trust.get(f"AuditEvent/{event_id}").json()
        what = set(disclosed_references(event))
        shared_plans = {k for k in what if k.startswith("CarePlan/")}
        assert shared_plans, event
        named |= shared_plans
    assert named == {f"CarePlan/{p['id']}" for p in plans}


def test_concurrent_partner_reads_are_each_audited_exactly_once(
    base_url: str, sandbox: Sandbox, trust: Fhir
) -> None:
    reads = {"gp": [C_PLAN, C_NEED, C_SELF_HARM], "social-care": [C_PLAN, C_SELF_HARM]}
    tokens = {cid: sandbox.token_for(cid, f"{base_url}/fhir")["access_token"] for cid in reads}
    jobs = [(cid, key) for cid, keys in reads.items() for key in keys] * 6
    before = _audit_ids(trust)
    results: list[tuple[str, str, int, bytes]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(jobs))

    def read(cid: str, key: str) -> None:
        headers = {"authorization": f"Bearer {tokens[cid]}"}
        barrier.wait(30)
        r = httpx.get(f"{base_url}/fhir/{key}", headers=headers, timeout=60)
        with lock:
            results.append((cid, key, r.status_code, r.content))

    threads = [threading.Thread(target=read, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(jobs)
    assert {s for _, _, s, _ in results} <= {200, 404}
    disclosed = [(cid, key) for cid, key, s, _ in results if s == 200]
    assert disclosed, "nothing was disclosed"
    new = _audit_ids(trust) - before
    assert len(new) == len(disclosed)
    events = [trust.get(f"AuditEvent/{i}").json() for i in new]
    by_reader: dict[tuple[str, str], int] = {}
    for event in events:
        requester = next(a["who"]["reference"] for a in event["agent"] if a["requestor"])
        what = disclosed_references(event)
        assert len(what) == 1, what
        by_reader[(requester, what[0])] = by_reader.get((requester, what[0]), 0) + 1
    org = {"gp": "Organization/c-gp-practice", "social-care": "Organization/c-social-care"}
    expected: dict[tuple[str, str], int] = {}
    for cid, key in disclosed:
        expected[(org[cid], key)] = expected.get((org[cid], key), 0) + 1
    assert by_reader == expected


# -- when the audit cannot be written -------------------------------------------------


class _Broken(Exception):
    pass


@pytest.fixture
def audit_store_fails(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fail(resources: Any) -> int:
        calls.append(len(list(resources)))
        raise _Broken("the audit table is not writable")

    async def child_fails(self: Any, resources: Any, at: Any) -> int:
        calls.append(len(list(resources)))
        raise AppendRejected("the audit table is not writable")

    # In the server's own process, and in the child process that stores them for the app.
    monkeypatch.setattr(sandbox.repo, "append", fail)
    monkeypatch.setattr(ProcessAppender, "append", child_fails)
    return calls


def _refused_without_data(response: Any) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    text = response.text
    for leak in ("c-careplan", "c-need-mental-health", "Section 117", "Ceri", HOUSING, "CarePlan/"):
        assert leak not in text, leak


def test_a_disclosure_that_cannot_be_audited_is_not_made(
    gp: Fhir, trust: Fhir, sandbox: Sandbox, audit_store_fails: list[int], monkeypatch: Any
) -> None:
    before = _audit_count(trust)
    _refused_without_data(gp.get(C_PLAN))
    _refused_without_data(gp.get(f"{C_PLAN}/_history/1"))
    _refused_without_data(gp.get("CarePlan", params={"subject": "Patient/c-patient"}))
    _refused_without_data(
        gp.post(
            "CarePlan/_search",
            "subject=Patient/c-patient",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    )
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": C_PLAN}}],
    }
    _refused_without_data(gp.post("", batch))
    assert audit_store_fails, "the audit was never attempted"
    # Nothing disclosed, nothing to record: the refusal is the client's usual 404.
    assert gp.get(C_SELF_HARM).status_code == 404
    # The trust's own reads are not disclosures.
    assert trust.get(C_PLAN).status_code == 200
    monkeypatch.undo()
    assert _audit_count(trust) == before
    assert gp.get(C_PLAN).status_code == 200
    assert _audit_count(trust) == before + 1


def test_a_disclosure_that_cannot_be_audited_is_not_made_over_http(
    base_url: str, sandbox: Sandbox, audit_store_fails: list[int]
) -> None:
    token = sandbox.token_for("gp", f"{base_url}/fhir")["access_token"]
    headers = {"authorization": f"Bearer {token}"}
    responses: list[Any] = []

    def read() -> None:
        responses.append(httpx.get(f"{base_url}/fhir/{C_PLAN}", headers=headers, timeout=60))

    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(responses) == 6
    for r in responses:
        _refused_without_data(r)


def test_the_router_refuses_too_when_it_records_the_audit_itself(
    sandbox: Sandbox, audit_store_fails: list[int]
) -> None:
    client = sandbox.registry.clients["gp"]
    response = sandbox.router.handle(
        Request(method="GET", path=C_PLAN, base_url="http://testserver/fhir"),
        client,
        client.scopes,
    )
    assert response.status == 503
    assert orjson.loads(response.body)["resourceType"] == "OperationOutcome"
    assert b"c-careplan" not in response.body and response.audit is None


# -- what is kept, by generation ---------------------------------------------------------


def test_derived_work_is_kept_per_generation_and_never_goes_back() -> None:
    cache = DerivedCache()
    five = cache.at(5)
    assert five.generation == 5 and cache.at(5) is five
    five.resources["Patient/x"] = {"resourceType": "Patient", "id": "x"}
    # A request that looked at the store before: its own, empty, and it replaces nothing.
    older = cache.at(4)
    assert older is not five and older.generation == 4 and not older.resources
    assert cache.at(5) is five
    six = cache.at(6)
    assert six is not five and six.generation == 6 and not six.resources
    late = cache.at(5)
    assert late is not five and late is not six and not late.resources
    assert cache.at(6) is six


def test_derived_work_is_dropped_when_it_grows_too_large() -> None:
    cache = DerivedCache(max_entries=3)
    first = cache.at(1)
    for n in range(4):
        first.resources[f"Patient/{n}"] = None
    # The size is looked at every so many requests, not at each.
    later = [cache.at(1) for _ in range(DerivedCache.SIZE_CHECK_EVERY)]
    second = later[-1]
    assert second is not first and second.generation == 1 and not second.resources


def test_derived_cache_from_many_threads_keeps_the_newest() -> None:
    cache = DerivedCache()
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def request(generation: int) -> None:
        derived = cache.at(generation)
        with lock:
            seen.append((generation, derived.generation))

    threads = [threading.Thread(target=request, args=(g % 17,)) for g in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(asked == got for asked, got in seen)
    assert cache.at(16).generation == 16
    assert cache.at(15) is not cache.at(16)


def test_the_trusts_reads_see_what_another_process_wrote_before_them(
    base_url: str, sandbox: Sandbox
) -> None:
    """On a database server the trust's reads by id are read together on the event
    loop (`SqlRepository.current_reads`); each still sees every write committed before
    it was sent, and a deletion or an absence reads as it would alone."""
    token = sandbox.token_for("trust", f"{base_url}/fhir")["access_token"]
    other = _other_repository(sandbox)
    flag = other.read("Flag", "a-risk-self-harm").resource()
    url = f"{base_url}/fhir/Flag/a-risk-self-harm"
    headers = {"authorization": f"Bearer {token}"}

    def read_at_once(count: int) -> list[httpx.Response]:
        """Several reads at once, as they come together into one query."""
        results: list[httpx.Response] = []

        def read() -> None:
            results.append(httpx.get(url, headers=headers, timeout=30))

        threads = [threading.Thread(target=read) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    try:
        for n in range(5):
            written = other.update({**flag, "code": {**flag["code"], "text": f"edit {n}"}})
            results = read_at_once(4)
            assert {r.status_code for r in results} == {200}
            assert {r.json()["meta"]["versionId"] for r in results} == {str(written.version_id)}
        assert httpx.get(f"{base_url}/fhir/Flag/no-such-flag", headers=headers).status_code == 404
        doomed = other.create({k: v for k, v in flag.items() if k not in ("id", "meta")})
        other.delete("Flag", doomed.id)
        gone = httpx.get(f"{base_url}/fhir/Flag/{doomed.id}", headers=headers)
        assert gone.status_code == 410
    finally:
        other.update(flag)
        other.close()


def test_the_trusts_shared_reads_serve_and_survive_a_dropped_connection(
    sandbox: Sandbox,
) -> None:
    from fastapi.testclient import TestClient

    from cpa_fhir.sandbox import create_app

    app = create_app(sandbox)
    token = sandbox.token_for("trust", "http://testserver/fhir")["access_token"]
    headers = {"authorization": f"Bearer {token}"}
    with TestClient(app) as http:
        reads = app.state.current_reads
        if sandbox.repo.embedded:
            assert reads is None  # a local read needs no sharing
            return
        assert http.get("/fhir/Patient/c-patient", headers=headers).status_code == 200
        assert reads.queries >= 1  # the read went through them
        # The database drops their connection (a restart, an administrator).
        with sandbox.repo.engine.connect() as connection:
            dropped = connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE pid <> pg_backend_pid() AND query LIKE :shape"
                ),
                {"shape": "%FROM resource_current WHERE (resource_type, id) IN%"},
            ).all()
        assert dropped
        for _ in range(3):  # the first read again by the router, then a new connection
            answer = http.get("/fhir/Patient/c-patient", headers=headers)
            assert answer.status_code == 200 and answer.json()["id"] == "c-patient"
        assert http.get("/fhir/Patient/no-such-patient", headers=headers).status_code == 404


def test_an_activity_performed_by_a_role_goes_to_a_partner_as_share_sends_it(
    gp: Fhir, changes: Changes
) -> None:
    """The consultant's activity, performed by his PractitionerRole: the role inherits
    its organisation's categories, which the server must look up too (two steps from
    the plan), or the activity would be redacted as unlabelled."""
    reviews = "reviews mental state and medication monthly"

    def by_role(plan: dict[str, Any]) -> None:
        plan["activity"][1]["detail"]["performer"] = [
            {"reference": "PractitionerRole/c-consultant-role"}
        ]

    assert reviews in gp.get(C_PLAN).text
    changes.edit(C_PLAN, by_role)
    assert reviews in gp.get(C_PLAN).text


def test_a_refusal_of_a_care_team_the_partner_acts_for_applies(
    gp: Fhir, trust: Fhir, changes: Changes
) -> None:
    crisis_plan = "CarePlan/c-crisis-plan"

    def gp_in_team(team: dict[str, Any]) -> None:
        team["participant"].append(
            {
                "role": [{"text": "GP practice"}],
                "member": {"reference": "Organization/c-gp-practice"},
            }
        )

    def refuse_crisis_to_team(consent: dict[str, Any]) -> None:
        permit = _gp_permit(consent)
        consent["provision"]["provision"].append(
            {
                "type": "deny",
                "actor": [
                    {**permit["actor"][0], "reference": {"reference": "CareTeam/c-careteam"}}
                ],
                "securityLabel": [_label("crisis")],
            }
        )

    changes.edit("CareTeam/c-careteam", gp_in_team)
    assert _visible(gp, crisis_plan)
    changes.edit("Consent/c-consent", refuse_crisis_to_team)
    assert not _visible(gp, crisis_plan)


def test_a_refusal_of_the_gp_in_person_applies_to_the_practice_they_work_at(
    gp: Fhir, changes: Changes
) -> None:
    """The GP's PractitionerRole is with the practice: a refusal naming the person
    refuses the practice."""
    crisis_plan = "CarePlan/c-crisis-plan"

    def refuse_crisis_to_the_gp(consent: dict[str, Any]) -> None:
        permit = _gp_permit(consent)
        consent["provision"]["provision"].append(
            {
                "type": "deny",
                "actor": [{**permit["actor"][0], "reference": {"reference": "Practitioner/c-gp"}}],
                "securityLabel": [_label("crisis")],
            }
        )

    assert _visible(gp, crisis_plan)
    changes.edit("Consent/c-consent", refuse_crisis_to_the_gp)
    assert not _visible(gp, crisis_plan)


def test_a_resource_containing_what_is_about_another_patient_is_withheld(
    gp: Fhir, changes: Changes
) -> None:
    def contain_another(plan: dict[str, Any]) -> None:
        plan["contained"] = [
            {
                "resourceType": "MedicationStatement",
                "id": "m1",
                "status": "active",
                "subject": {"reference": "Patient/a-patient"},
                "medicationCodeableConcept": {"text": "Sertraline 50mg"},
            }
        ]
        plan["supportingInfo"] = [*plan.get("supportingInfo", []), {"reference": "#m1"}]

    assert _visible(gp, C_PLAN)
    changes.edit(C_PLAN, contain_another)
    assert not _visible(gp, C_PLAN)


def test_a_consent_that_cannot_be_evaluated_withholds_that_record_alone_and_says_nothing(
    gp: Fhir, trust: Fhir, changes: Changes
) -> None:
    """A's Consent with a provision about single resources (data), which the engine
    cannot honour: nothing of A's goes, answered as absence is (a refusal naming the
    Consent would tell that A's record is there), and other records are unaffected."""
    consent = trust.get("Consent/c-consent").json()
    consent.pop("id")
    consent.pop("meta", None)
    consent["patient"] = {"reference": "Patient/a-patient"}
    consent["provision"]["provision"][1]["data"] = [
        {"meaning": "instance", "reference": {"reference": "Patient/a-patient"}}
    ]
    changes.create(consent)
    absent, withheld = gp.get("Patient/zz-nobody"), gp.get("Patient/a-patient")
    assert withheld.status_code == absent.status_code == 404
    said = absent.json()["issue"][0]["details"]["text"].replace("zz-nobody", "a-patient")
    assert withheld.json()["issue"][0]["details"]["text"] == said
    assert b"Consent" not in withheld.content
    for params in ({"_id": "a-need-relapse-signs"}, {"_id": "zz-none"}):
        found = gp.get("Condition", params=params)
        assert found.status_code == 200 and found.json()["total"] == 0
    everything = gp.get("Condition", params={"_lastUpdated": "gt2000-01-01", "_count": "1000"})
    assert everything.status_code == 200
    assert any(k.startswith("Condition/c-") for k in resource_keys(everything.json()))
    assert _visible(gp, C_PLAN)
