"""The store's change counter and its bulk reads.

`generation()` moves on with every committed write through the repository
(create, update, delete, transaction, load), and only then: not with `append` (the
server's own new records), not with a write that failed or was rolled back, not with
reads. `read_many` returns exactly the current, not deleted, versions asked for.
`append` stores all of its batch or none of it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.errors import InputError, ResourceGone, ResourceNotFound, VersionConflict
from cpa_fhir.store import SqlRepository, Stored
from tests.store.conftest import StoreFactory


def patient(id: str, family: str = "Jones") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": f"N-{id}"}],
        "name": [{"family": family, "given": ["Ana"]}],
    }


def flag(id: str, patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Flag",
        "id": id,
        "status": "active",
        "code": {"text": "a risk"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def audit_event(id: str, marker: str = "audit") -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "id": id,
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
        },
        "recorded": "2026-11-01T10:00:00Z",
        "agent": [{"who": {"display": marker}, "requestor": True}],
        "source": {"observer": {"display": marker}},
        "entity": [{"what": {"reference": "Patient/p1"}}],
    }


def new_id() -> str:
    return uuid.uuid4().hex


def count(store: SqlRepository, resource_type: str, *params: tuple[str, str]) -> int:
    query = store.parse(resource_type, [*params, ("_summary", "count")])
    return int(store.search(query).total or 0)


def moves(store: SqlRepository, write: Callable[[], Any]) -> int:
    before = store.generation()
    write()
    return store.generation() - before


# -- what moves the generation ------------------------------------------------------


def test_a_new_store_starts_at_a_generation(store: SqlRepository) -> None:
    assert isinstance(store.generation(), int)


def test_create_moves_the_generation(store: SqlRepository) -> None:
    assert moves(store, lambda: store.create(patient("ignored"))) >= 1


def test_update_moves_the_generation_when_it_creates_and_when_it_changes(
    store: SqlRepository,
) -> None:
    assert moves(store, lambda: store.update(patient("p1"))) >= 1
    assert moves(store, lambda: store.update(patient("p1", family="Smith"))) >= 1
    assert moves(store, lambda: store.update(patient("p1", family="Brown"), if_match=2)) >= 1


def test_delete_moves_the_generation(store: SqlRepository) -> None:
    store.update(patient("p1"))
    assert moves(store, lambda: store.delete("Patient", "p1")) >= 1


def test_transaction_moves_the_generation(store: SqlRepository) -> None:
    store.update(patient("p0"))

    def several() -> None:
        with store.transaction() as tx:
            tx.update(patient("p1"))
            tx.update(flag("f1", "p1"))
            tx.delete("Patient", "p0")

    assert moves(store, several) >= 1
    assert store.read("Flag", "f1").version_id == 1


def test_load_moves_the_generation(store: SqlRepository) -> None:
    assert moves(store, lambda: store.load([patient(f"p{n}") for n in range(5)])) >= 1
    # Reloading makes new versions: a change too.
    assert moves(store, lambda: store.load([patient("p1", family="Smith")])) >= 1


def test_every_write_moves_the_generation_on_from_another_repository(
    make_store: StoreFactory,
) -> None:
    """The counter is in the database: a second server on the store sees each change."""
    writer, watcher = make_store(), make_store()
    seen = [watcher.generation()]
    writer.update(patient("p1"))
    seen.append(watcher.generation())
    writer.update(patient("p1", family="Smith"))
    seen.append(watcher.generation())
    writer.delete("Patient", "p1")
    seen.append(watcher.generation())
    with writer.transaction() as tx:
        tx.update(patient("p2"))
    seen.append(watcher.generation())
    writer.load([patient("p3")])
    seen.append(watcher.generation())
    assert all(later > earlier for earlier, later in zip(seen, seen[1:], strict=False)), seen
    assert watcher.generation() == writer.generation()


def test_append_does_not_move_the_generation(store: SqlRepository) -> None:
    store.update(patient("p1"))
    ids = [new_id() for _ in range(3)]
    assert moves(store, lambda: store.append([audit_event(i) for i in ids])) == 0
    assert set(store.read_many(("AuditEvent", i) for i in ids)) == {("AuditEvent", i) for i in ids}


def test_reads_do_not_move_the_generation(store: SqlRepository) -> None:
    store.update(patient("p1"))
    store.update(patient("p1", family="Smith"))
    before = store.generation()
    store.read("Patient", "p1")
    store.vread("Patient", "p1", 1)
    store.read_many([("Patient", "p1"), ("Patient", "nobody")])
    store.history("Patient", "p1")
    store.history()
    store.search(store.parse("Patient", [("family", "Smith")]))
    with pytest.raises(ResourceNotFound):
        store.read("Patient", "nobody")
    assert store.generation() == before


def test_a_rolled_back_transaction_does_not_move_the_generation(store: SqlRepository) -> None:
    store.update(patient("p1"))
    before = store.generation()
    with pytest.raises(RuntimeError, match="changed my mind"):
        with store.transaction() as tx:
            tx.update(patient("p2"))
            tx.delete("Patient", "p1")
            raise RuntimeError("changed my mind")
    assert store.generation() == before
    assert store.read("Patient", "p1").version_id == 1
    with pytest.raises(ResourceNotFound):
        store.read("Patient", "p2")


def test_failed_writes_do_not_move_the_generation(store: SqlRepository) -> None:
    store.update(patient("p1"))
    store.update(patient("p1", family="Smith"))
    before = store.generation()
    with pytest.raises(VersionConflict):
        store.update(patient("p1", family="Brown"), if_match=1)
    with pytest.raises(InputError):
        store.update({"resourceType": "Patient", "id": "not an id!"})
    with pytest.raises(InputError):
        store.create({"resourceType": "NoSuchType"})
    with pytest.raises(ResourceNotFound):
        store.delete("Patient", "nobody")
    with pytest.raises(InputError):
        store.load([patient("p9"), {"resourceType": "NoSuchType", "id": "x"}])
    with pytest.raises(VersionConflict):
        with store.transaction() as tx:
            tx.update(patient("p2"))
            tx.update(patient("p1", family="Brown"), if_match=1)
    assert store.generation() == before
    with pytest.raises(ResourceNotFound):
        store.read("Patient", "p2")
    with pytest.raises(ResourceNotFound):
        store.read("Patient", "p9")


def test_a_failed_append_does_not_move_the_generation(store: SqlRepository) -> None:
    taken = new_id()
    store.append([audit_event(taken)])
    before = store.generation()
    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        store.append([audit_event(new_id()), audit_event(taken)])
    assert store.generation() == before


def test_concurrent_writes_each_move_the_generation(make_store: StoreFactory) -> None:
    """No increment is lost when writers commit at the same time."""
    stores = [make_store() for _ in range(4)]
    before = stores[0].generation()
    writes_each = 5
    errors: list[BaseException] = []

    def work(n: int, repo: SqlRepository) -> None:
        try:
            for k in range(writes_each):
                repo.update(patient(f"w{n}-{k}"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n, repo)) for n, repo in enumerate(stores * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert stores[0].generation() - before >= len(threads) * writes_each


# -- read_many ------------------------------------------------------------------------


def test_read_many_returns_current_versions_and_leaves_out_deleted_and_unknown(
    store: SqlRepository,
) -> None:
    store.update(patient("p1"))
    latest = store.update(patient("p1", family="Smith"))
    gone = store.update(patient("p2"))
    store.delete("Patient", "p2")
    flagged = store.update(flag("p1", "p1"))  # the same id, another type
    kept = store.update(patient("p3"))
    found = store.read_many(
        [
            ("Patient", "p1"),
            ("Patient", "p2"),
            ("Flag", "p1"),
            ("Patient", "p3"),
            ("Patient", "nobody"),
            ("Flag", "p3"),
            ("Patient", "p1"),  # asked twice
        ]
    )
    assert set(found) == {("Patient", "p1"), ("Flag", "p1"), ("Patient", "p3")}
    assert found[("Patient", "p1")] == latest == store.read("Patient", "p1")
    assert found[("Patient", "p1")].version_id == 2
    assert found[("Patient", "p1")].resource()["name"][0]["family"] == "Smith"
    assert found[("Flag", "p1")] == flagged
    assert found[("Patient", "p3")] == kept
    assert gone.id == "p2"
    assert all(isinstance(s.content, bytes) and not s.deleted for s in found.values())
    assert store.read_many([]) == {}


def test_read_many_reads_more_than_a_hundred_keys(store: SqlRepository) -> None:
    ids = [f"p{n}" for n in range(250)]
    store.load([patient(i) for i in ids])
    deleted = set(ids[::7])
    with store.transaction() as tx:
        for i in sorted(deleted):
            tx.delete("Patient", i)
    unknown = [f"unknown-{n}" for n in range(60)]
    keys = [("Patient", i) for i in [*ids, *unknown]]
    found = store.read_many(reversed(keys))  # any iterable, any order
    assert set(found) == {("Patient", i) for i in ids if i not in deleted}
    assert len(found) == 250 - len(deleted)
    for (_, i), stored in found.items():
        assert stored.id == i and stored.version_id == 1
        assert stored.resource()["identifier"][0]["value"] == f"N-{i}"
    with pytest.raises(ResourceGone):
        store.read("Patient", ids[0])


def test_read_many_sees_appended_records(store: SqlRepository) -> None:
    ids = [new_id() for _ in range(3)]
    store.append([audit_event(i) for i in ids])
    found = store.read_many(("AuditEvent", i) for i in ids)
    assert {s.id for s in found.values()} == set(ids)
    for i in ids:
        assert found[("AuditEvent", i)] == store.read("AuditEvent", i)
        assert found[("AuditEvent", i)].version_id == 1


# A model of the store: a sequence of writes over a few ids, and what read_many must
# then return for any keys.
IDS = [f"m{n}" for n in range(6)]
_op = st.tuples(
    st.sampled_from(["update", "delete", "transaction"]),
    st.sampled_from(["Patient", "Flag"]),
    st.sampled_from(IDS),
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(_op, max_size=12),
    asked=st.lists(st.tuples(st.sampled_from(["Patient", "Flag"]), st.sampled_from(IDS + ["zz"]))),
)
def test_read_many_matches_a_model_of_the_writes(
    store: SqlRepository, ops: list[tuple[str, str, str]], asked: list[tuple[str, str]]
) -> None:
    prefix = new_id()[:8]  # each example on its own ids in the shared store

    def resource(rtype: str, i: str, n: int) -> dict[str, Any]:
        made = patient(f"{prefix}-{i}") if rtype == "Patient" else flag(f"{prefix}-{i}", "x")
        made["text"] = {"status": "generated", "div": f"<div>{n}</div>"}
        return made

    model: dict[tuple[str, str], Stored | None] = {}
    for n, (op, rtype, i) in enumerate(ops):
        key = (rtype, f"{prefix}-{i}")
        if op == "update":
            model[key] = store.update(resource(rtype, i, n))
        elif op == "transaction":
            with store.transaction() as tx:
                model[key] = tx.update(resource(rtype, i, n))
        elif model.get(key) is not None:
            store.delete(*key)
            model[key] = None
    keys = [(rtype, f"{prefix}-{i}") for rtype, i in asked]
    found = store.read_many(keys)
    expected = {k: model[k] for k in keys if model.get(k) is not None}
    assert found == expected
    for k, stored in found.items():
        assert stored.content == store.read(*k).content


# -- append ---------------------------------------------------------------------------


def test_append_stores_new_records_with_meta_and_index(store: SqlRepository) -> None:
    ids = [new_id() for _ in range(4)]
    assert store.append([audit_event(i, marker="batch-one") for i in ids]) == 4
    for i in ids:
        stored = store.read("AuditEvent", i)
        body = stored.resource()
        assert stored.version_id == 1 and body["meta"]["versionId"] == "1"
        assert body["meta"]["lastUpdated"].endswith("Z")
        assert [h.version_id for h in store.history("AuditEvent", i)] == [1]
    assert count(store, "AuditEvent", ("_id", ",".join(ids))) == 4
    assert count(store, "AuditEvent", ("date", "2026-11-01")) == 4
    assert store.append([]) == 0


def test_append_with_an_id_already_taken_stores_none_of_the_batch(store: SqlRepository) -> None:
    taken = new_id()
    store.append([audit_event(taken)])
    fresh = [new_id() for _ in range(5)]
    before = count(store, "AuditEvent")
    batch = [audit_event(i, marker="never") for i in fresh[:3]]
    batch += [audit_event(taken, marker="never")]
    batch += [audit_event(i, marker="never") for i in fresh[3:]]
    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        store.append(batch)
    assert store.read_many(("AuditEvent", i) for i in fresh) == {}
    assert count(store, "AuditEvent") == before
    assert count(store, "AuditEvent", ("_id", ",".join(fresh))) == 0
    assert count(store, "AuditEvent", ("date", "2026-11-01")) == before
    assert store.read("AuditEvent", taken).resource()["agent"][0]["who"]["display"] == "audit"
    assert len(store.history("AuditEvent", count=1000)) == before
    # The store is usable afterwards, and the fresh ids are still free.
    assert store.append([audit_event(i) for i in fresh]) == 5


def test_append_with_an_id_twice_in_the_batch_stores_none(store: SqlRepository) -> None:
    twice = new_id()
    other = new_id()
    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        store.append([audit_event(other), audit_event(twice), audit_event(twice)])
    assert store.read_many([("AuditEvent", twice), ("AuditEvent", other)]) == {}
    assert count(store, "AuditEvent") == 0


def test_append_over_a_written_or_deleted_resource_stores_none(store: SqlRepository) -> None:
    """An id taken by the trust's own writes, even one since deleted, is taken."""
    store.update(audit_event("written"))
    store.update(audit_event("deleted"))
    store.delete("AuditEvent", "deleted")
    for taken in ("written", "deleted"):
        fresh = new_id()
        with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
            store.append([audit_event(fresh), audit_event(taken, marker="over")])
        assert store.read_many([("AuditEvent", fresh)]) == {}
    assert store.read("AuditEvent", "written").resource()["agent"][0]["who"]["display"] == "audit"
    with pytest.raises(ResourceGone):
        store.read("AuditEvent", "deleted")
    assert [h.version_id for h in store.history("AuditEvent", "deleted")] == [2, 1]


def test_append_refuses_a_record_without_an_id_and_stores_none(store: SqlRepository) -> None:
    fresh = new_id()
    no_id = {k: v for k, v in audit_event("x").items() if k != "id"}
    with pytest.raises(InputError):
        store.append([audit_event(fresh), no_id])
    assert store.read_many([("AuditEvent", fresh)]) == {}


def _flags_of_two_patients(store: SqlRepository, of_p2: str) -> None:
    """Patients p1 and p2; p1's flags f2 and f1 (written in that order) and one
    deleted, p2's `of_p2`."""
    store.load([patient("p1"), patient("p2")])
    store.update(flag("f2", "p1"))
    store.update(flag("f1", "p1"))
    store.update(flag(of_p2, "p2"))
    store.update(flag("gone", "p1"))
    store.delete("Flag", "gone")


def test_referring_finds_the_current_resources_that_point_at_a_target(
    store: SqlRepository,
) -> None:
    _flags_of_two_patients(store, "f3")
    moved = store.update(flag("f4", "p1"))
    store.update({**flag("f4", "p2"), "meta": {"versionId": str(moved.version_id)}})
    found = store.referring("Flag", "patient", ("Patient", "p1"))
    assert [s.id for s in found] == ["f1", "f2"]
    assert all(s.resource()["subject"]["reference"] == "Patient/p1" for s in found)
    assert [s.id for s in store.referring("Flag", "patient", ("Patient", "p2"))] == ["f3", "f4"]
    assert store.referring("Flag", "patient", ("Patient", "nobody")) == []
    assert store.referring("Flag", "patient", ("Group", "p1")) == []


def test_referring_finds_those_of_several_types_in_one_query(store: SqlRepository) -> None:
    _flags_of_two_patients(store, "elsewhere")
    store.update({"resourceType": "CareTeam", "id": "t1", "subject": {"reference": "Patient/p1"}})
    found = store.referring(("Flag", "CareTeam"), "patient", ("Patient", "p1"))
    assert [(s.resource_type, s.id) for s in found] == [
        ("CareTeam", "t1"),
        ("Flag", "f1"),
        ("Flag", "f2"),
    ]
    assert [s.id for s in store.referring(("Flag",), "patient", ("Patient", "p2"))] == ["elsewhere"]
    assert store.referring(("Flag", "CareTeam"), "patient", ("Patient", "nobody")) == []
