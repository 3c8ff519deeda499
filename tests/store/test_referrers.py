"""What refers to a resource, from whatever element (`SqlRepository.referrers`), on
SQLite and PostgreSQL: the reverse of every relative reference a resource makes,
search parameter or not, kept up to date by every write and by migration 7 for
what an older version stored."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from cpa_fhir.store import SqlRepository, migrate
from cpa_fhir.store._schema import search_reference
from cpa_fhir.store._search_parameters import EVERY_REFERENCE
from tests.store.conftest import StoreFactory

CARE_TEAM: dict[str, Any] = {
    "resourceType": "CareTeam",
    "id": "team",
    "subject": {"reference": "Patient/p1"},
    "participant": [
        # onBehalfOf is no search parameter of CareTeam: found all the same.
        {"member": {"reference": "Practitioner/dr"}, "onBehalfOf": {"reference": "Organization/org"}},
        {"member": {"reference": "PractitionerRole/dr-role/_history/2"}},
        # Neither names a resource of this store by type and id.
        {"member": {"reference": "https://elsewhere.example/fhir/Practitioner/dr"}},
        {"member": {"reference": "#contained"}},
    ],
}  # fmt: skip


def _referring(store: SqlRepository, key: str, limit: int = 100) -> list[str]:
    rtype, rid = key.split("/")
    return [f"{s.resource_type}/{s.id}" for s in store.referrers(rtype, rid, limit=limit)]


def test_referrers_are_found_from_any_element(store: SqlRepository) -> None:
    store.update(CARE_TEAM)
    store.update({"resourceType": "Flag", "id": "f1", "status": "active",
                  "code": {"text": "x"}, "subject": {"reference": "Patient/p1"},
                  "author": {"reference": "Organization/org"}})  # fmt: skip
    assert _referring(store, "Organization/org") == ["CareTeam/team", "Flag/f1"]
    assert _referring(store, "Organization/org", limit=1) == ["CareTeam/team"]
    assert _referring(store, "Practitioner/dr") == ["CareTeam/team"]
    assert _referring(store, "PractitionerRole/dr-role") == ["CareTeam/team"]
    assert _referring(store, "Patient/p1") == ["CareTeam/team", "Flag/f1"]
    assert _referring(store, "Practitioner/contained") == []


def test_referrers_follow_updates_and_deletes(store: SqlRepository) -> None:
    store.update(CARE_TEAM)
    changed = {**CARE_TEAM, "participant": [{"member": {"reference": "Practitioner/other"}}]}
    store.update(changed)
    assert _referring(store, "Practitioner/dr") == []
    assert _referring(store, "Practitioner/other") == ["CareTeam/team"]
    store.delete("CareTeam", "team")
    assert _referring(store, "Practitioner/other") == []


def test_the_servers_audit_events_are_not_referrers(store: SqlRepository) -> None:
    event = {
        "resourceType": "AuditEvent",
        "id": "e1",
        "type": {"code": "110106"},
        "recorded": "2026-11-01T10:00:00Z",
        "agent": [{"who": {"reference": "Organization/org"}, "requestor": True}],
        "source": {"observer": {"display": "test"}},
    }
    store.append([event])
    assert _referring(store, "Organization/org") == []


def test_migration_7_finds_what_an_older_version_stored(make_store: StoreFactory) -> None:
    store = make_store(migrate=False)
    migrate(store.engine, target=6)
    store.update(CARE_TEAM)
    with store.engine.begin() as connection:  # as a version before 7 wrote it
        connection.execute(
            search_reference.delete().where(search_reference.c.param == EVERY_REFERENCE)
        )
    assert _referring(store, "Organization/org") == []
    assert migrate(store.engine) == [7]
    assert _referring(store, "Organization/org") == ["CareTeam/team"]
    assert migrate(store.engine) == []
    with store.engine.connect() as connection:
        rows = connection.scalar(
            sa.select(sa.func.count()).where(search_reference.c.param == EVERY_REFERENCE)
        )
    assert rows == 4  # Patient/p1, Practitioner/dr, Organization/org, PractitionerRole/dr-role
