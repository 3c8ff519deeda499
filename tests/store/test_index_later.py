"""Records appended with their search-index rows to follow (`append_indexing_later`,
`index_appended`, `index_pending`): read by id at once, found by search once indexed,
indexed exactly once, and never for a version that was replaced or deleted first."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from cpa_fhir.errors import InputError
from cpa_fhir.store import SqlRepository
from cpa_fhir.store._repository import _Operations
from cpa_fhir.store._schema import index_pending, search_reference


def _event(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "id": uuid.uuid4().hex,
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106"},
        "recorded": "2026-11-01T10:00:00Z",
        "agent": [{"who": {"display": "tests"}, "requestor": True}],
        "source": {"observer": {"display": "tests"}},
        "entity": [{"what": {"reference": f"Patient/{patient}"}}],
    }


def _found(store: SqlRepository, patient: str) -> set[str]:
    query = store.parse("AuditEvent", [("entity", f"Patient/{patient}"), ("_count", "1000")])
    return {m.id for m in store.search(query).matches}


def _reference_rows(store: SqlRepository, resource_id: str) -> int:
    c = search_reference.c
    with store.engine.connect() as connection:
        count = connection.execute(
            sa.select(sa.func.count()).where(
                c.resource_type == "AuditEvent", c.resource_id == resource_id
            )
        ).scalar_one()
    return int(count)


def _pending(store: SqlRepository) -> int:
    with store.engine.connect() as connection:
        return int(
            connection.execute(sa.select(sa.func.count()).select_from(index_pending)).scalar_one()
        )


def test_read_at_once_and_found_once_indexed(store: SqlRepository) -> None:
    patient = uuid.uuid4().hex
    events = [_event(patient) for _ in range(3)]
    later: list[Any] = []
    assert store.append_indexing_later(events, later) == 3
    assert len(store.read_many(("AuditEvent", e["id"]) for e in events)) == 3
    assert _found(store, patient) == set()
    assert _pending(store) == 3
    assert store.index_appended(later) == 3
    assert _found(store, patient) == {e["id"] for e in events}
    assert _pending(store) == 0


def test_what_a_stopped_writer_left_is_indexed_once(store: SqlRepository) -> None:
    patient = uuid.uuid4().hex
    events = [_event(patient) for _ in range(2)]
    later: list[Any] = []
    store.append_indexing_later(events, later)
    # Its writer stopped before indexing: the next one indexes from the stored content.
    assert store.index_pending() == 2
    assert _found(store, patient) == {e["id"] for e in events}
    # The first writer coming back late indexes nothing twice.
    assert store.index_appended(later) == 0
    assert store.index_pending() == 0
    for e in events:
        assert _reference_rows(store, e["id"]) == _reference_rows_of_fresh(store, patient)


def _reference_rows_of_fresh(store: SqlRepository, patient: str) -> int:
    fresh = _event(patient)
    store.append([fresh])
    return _reference_rows(store, fresh["id"])


def test_a_record_replaced_or_deleted_first_keeps_only_its_own_index(
    store: SqlRepository,
) -> None:
    before, after = uuid.uuid4().hex, uuid.uuid4().hex
    replaced, deleted = _event(before), _event(before)
    later: list[Any] = []
    store.append_indexing_later([replaced, deleted], later)
    store.update(_event(after) | {"id": replaced["id"]})
    store.delete("AuditEvent", deleted["id"])
    assert store.index_appended(later) == 0
    assert store.index_pending() == 0
    assert _found(store, before) == set()
    assert _found(store, after) == {replaced["id"]}


def test_a_record_whose_index_cannot_be_stored_fails_its_append(store: SqlRepository) -> None:
    # Else it would be committed, and every later indexing of every record would fail.
    patient = uuid.uuid4().hex
    bad = _event(patient) | {"agent": [{"who": {"reference": "Organization/" + "x" * 70}}]}
    later: list[Any] = []
    with pytest.raises(InputError, match="longer than"):
        store.append_indexing_later([bad], later)
    assert later == [] and store.read_many([("AuditEvent", bad["id"])]) == {}
    good = _event(patient)
    store.append_indexing_later([good], later)
    assert store.index_appended(later) == 1
    assert _found(store, patient) == {good["id"]}


# PostgreSQL only: SQLite lets one writer in at a time, so the two cannot overlap.
@pytest.mark.parametrize("backend", ["postgresql"])
def test_an_update_racing_the_indexing_leaves_only_its_own_rows(
    store: SqlRepository,
) -> None:
    before, after = uuid.uuid4().hex, uuid.uuid4().hex
    record = _event(before)
    later: list[Any] = []
    store.append_indexing_later([record], later)
    with store.engine.connect() as indexing:
        transaction = indexing.begin()
        # The index rows written, not yet committed, while an update of the record runs.
        _Operations(indexing, store.parameters, store.clock).index_appended(later)
        updating = threading.Thread(
            target=store.update, args=(_event(after) | {"id": record["id"]},)
        )
        updating.start()
        updating.join(0.5)
        assert updating.is_alive()  # waiting for the indexing's locks
        transaction.commit()
    updating.join(10)
    assert _found(store, before) == set()
    assert _found(store, after) == {record["id"]}


def test_many_records_of_several_types_are_each_indexed_once(store: SqlRepository) -> None:
    # More than one statement's worth of pending notes, of two types, one of them
    # indexed already by another writer: each of the rest is indexed, once.
    patient = uuid.uuid4().hex
    events = [_event(patient) for _ in range(450)]
    flags = [
        {
            "resourceType": "Flag",
            "id": uuid.uuid4().hex,
            "status": "active",
            "code": {"text": "appended"},
            "subject": {"reference": f"Patient/{patient}"},
        }
        for _ in range(3)
    ]
    later: list[Any] = []
    assert store.append_indexing_later([*events, *flags], later) == 453
    first = [entry for entry in later if entry[1] == events[0]["id"]]
    assert store.index_appended(first) == 1
    assert store.index_appended(later) == 452
    assert store.index_appended(later) == 0
    assert _pending(store) == 0
    assert _found(store, patient) == {e["id"] for e in events}
    flag_query = store.parse("Flag", [("patient", f"Patient/{patient}")])
    assert {m.id for m in store.search(flag_query).matches} == {f["id"] for f in flags}
    assert _reference_rows(store, events[-1]["id"]) == _reference_rows(store, events[0]["id"])
