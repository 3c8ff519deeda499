"""Create, read, vread, update, delete, history, transactions and concurrency.

https://hl7.org/fhir/R4/http.html
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from cpa_fhir.errors import (
    InputError,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
    VersionConflict,
)
from cpa_fhir.store import LATEST_VERSION, SqlRepository, current_version, migrate
from cpa_fhir.store._schema import search_string, search_token
from tests.common import ROOT
from tests.store.conftest import StoreFactory, TickingClock, example_resources

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"profile": ["https://cpa-fhir.org/fhir/StructureDefinition/cpa-patient"]},
    "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009"}],
    "name": [{"family": "Jones", "given": ["Ana"]}],
    "birthDate": "1980-04-02",
}


def test_create_assigns_id_version_and_last_updated(store: SqlRepository) -> None:
    created = store.create({k: v for k, v in PATIENT.items() if k != "id"})
    assert created.created and created.version_id == 1 and not created.deleted
    body = orjson.loads(created.content)
    assert body["id"] == created.id and len(created.id) == 36
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] == "2026-01-01T00:00:01.000Z"
    assert body["meta"]["profile"] == PATIENT["meta"]["profile"]
    assert store.read("Patient", created.id).content == created.content


def test_create_ignores_a_client_id(store: SqlRepository) -> None:
    assert store.create(PATIENT).id != "p1"


def test_read_returns_the_stored_bytes_unparsed(store: SqlRepository) -> None:
    written = store.update(PATIENT)
    read = store.read("Patient", "p1")
    assert read == written and read.content == written.content
    assert isinstance(read.content, bytes)


def test_update_creates_then_versions(store: SqlRepository) -> None:
    first = store.update(PATIENT)
    assert first.created and first.version_id == 1
    second = store.update({**PATIENT, "gender": "female"})
    assert not second.created and second.version_id == 2
    assert store.read("Patient", "p1").resource()["gender"] == "female"
    assert "gender" not in store.vread("Patient", "p1", 1).resource()
    assert store.vread("Patient", "p1", 2).content == second.content
    with pytest.raises(ResourceNotFound):
        store.vread("Patient", "p1", 3)


def test_if_match_stale_version_conflicts(store: SqlRepository) -> None:
    store.update(PATIENT)
    store.update({**PATIENT, "gender": "male"}, if_match=1)
    with pytest.raises(VersionConflict) as raised:
        store.update({**PATIENT, "gender": "female"}, if_match=1)
    assert raised.value.current_version == 2
    assert raised.value.to_operation_outcome()["issue"][0]["code"] == "conflict"
    assert store.read("Patient", "p1").version_id == 2
    with pytest.raises(VersionConflict):
        store.update({**PATIENT, "id": "absent"}, if_match=1)


def test_delete_then_read_is_gone_and_history_keeps_it(store: SqlRepository) -> None:
    store.update(PATIENT)
    deleted = store.delete("Patient", "p1")
    assert deleted.deleted and deleted.version_id == 2 and deleted.content == b""
    with pytest.raises(ResourceGone) as raised:
        store.read("Patient", "p1")
    assert raised.value.code == "deleted"
    with pytest.raises(ResourceGone):
        store.vread("Patient", "p1", 2)
    assert store.vread("Patient", "p1", 1).version_id == 1
    assert store.delete("Patient", "p1").version_id == 2  # deleting again changes nothing
    assert [(h.version_id, h.deleted) for h in store.history("Patient", "p1")] == [
        (2, True),
        (1, False),
    ]
    assert store.search(store.parse("Patient", [])).total == 0
    # Updating a deleted resource brings it back as a new version.
    assert store.update(PATIENT).version_id == 3
    assert store.read("Patient", "p1").version_id == 3


def test_unknown_resources(store: SqlRepository) -> None:
    with pytest.raises(ResourceNotFound) as raised:
        store.read("Patient", "nope")
    assert raised.value.code == "not-found"
    with pytest.raises(ResourceNotFound):
        store.delete("Patient", "nope")
    with pytest.raises(ResourceNotFound):
        store.history("Patient", "nope")


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Nope", "id": "x"},
        {"resourceType": "Patient", "id": "has space"},
        {"resourceType": "Patient", "id": "x" * 65},
        {"resourceType": "Patient"},
        ["not", "an", "object"],
    ],
)
def test_update_refuses_malformed_resources(store: SqlRepository, resource: Any) -> None:
    with pytest.raises(InputError):
        store.update(resource)


def test_history_of_type_and_system_newest_first(store: SqlRepository) -> None:
    store.update(PATIENT)
    store.update({**PATIENT, "id": "p2"})
    store.update({**PATIENT, "gender": "other"})
    store.update({"resourceType": "Flag", "id": "f1", "status": "active"})
    assert [(h.id, h.version_id) for h in store.history("Patient")] == [
        ("p1", 2),
        ("p2", 1),
        ("p1", 1),
    ]
    assert [h.resource_type for h in store.history()] == ["Flag", "Patient", "Patient", "Patient"]
    assert len(store.history(count=2)) == 2
    since = store.history("Patient", "p1")[0].last_updated
    assert [(h.id, h.version_id) for h in store.history(since=since)] == [("f1", 1), ("p1", 2)]


def test_conditional_create(store: SqlRepository) -> None:
    criteria = "identifier=https://fhir.nhs.uk/Id/nhs-number|9000000009"
    first = store.create(PATIENT, if_none_exist=criteria)
    assert first.created
    again = store.create(PATIENT, if_none_exist=criteria)
    assert not again.created and again.id == first.id and again.version_id == 1
    store.create(PATIENT)  # a second patient with the same NHS number
    with pytest.raises(PreconditionFailed):
        store.create(PATIENT, if_none_exist=criteria)
    other = store.create(PATIENT, if_none_exist="identifier=https://x|1")
    assert other.created


def test_transaction_commits_together(store: SqlRepository) -> None:
    with store.transaction() as tx:
        tx.update(PATIENT)
        tx.update({"resourceType": "Flag", "id": "f1", "status": "active"})
        # Writes are visible inside the transaction, to reads and searches alike.
        assert tx.read("Patient", "p1").version_id == 1
        assert tx.search(store.parse("Flag", [("_id", "f1")])).total == 1
    assert store.read("Flag", "f1").version_id == 1


def test_failed_transaction_leaves_nothing(store: SqlRepository) -> None:
    store.update(PATIENT)
    with pytest.raises(VersionConflict):
        with store.transaction() as tx:
            tx.update({**PATIENT, "gender": "female"})
            tx.create({"resourceType": "Flag", "status": "active"})
            tx.delete("Patient", "p1")
            tx.update({**PATIENT, "gender": "male"}, if_match=1)  # stale: fails
    assert store.read("Patient", "p1").version_id == 1
    assert "gender" not in store.read("Patient", "p1").resource()
    assert store.search(store.parse("Flag", [])).total == 0
    assert store.search(store.parse("Patient", [("gender", "female")])).total == 0
    assert len(store.history()) == 1


def test_load_in_bulk_then_reload_makes_new_versions(store: SqlRepository) -> None:
    resources = example_resources()
    assert store.load(resources, batch_size=37) == len(resources)
    assert store.read("Patient", "c-patient").version_id == 1
    assert store.search(store.parse("Patient", [])).total == 4
    changed = [r for r in resources if r["resourceType"] == "Patient"]
    store.load([{**r, "gender": "unknown"} for r in changed])
    assert store.read("Patient", "c-patient").version_id == 2
    assert store.search(store.parse("Patient", [("gender", "unknown")])).total == 4
    assert store.search(store.parse("Patient", [("gender", "male")])).total == 0


def test_concurrent_updates_lose_nothing(make_store: StoreFactory) -> None:
    """Each of N writers without If-Match lands as its own version."""
    writers = 8
    setup = make_store()
    setup.update(PATIENT)
    stores = [make_store() for _ in range(writers)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers)

    def write(n: int) -> None:
        barrier.wait()
        try:
            stores[n].update({**PATIENT, "name": [{"family": f"Writer{n}"}]})
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    history = setup.history("Patient", "p1")
    assert [h.version_id for h in history] == list(range(writers + 1, 0, -1))
    families = {h.resource()["name"][0]["family"] for h in history[:-1]}
    assert families == {f"Writer{n}" for n in range(writers)}
    # The index describes the newest version only.
    newest = history[0].resource()["name"][0]["family"]
    assert setup.search(setup.parse("Patient", [("family", newest)])).total == 1
    assert setup.search(setup.parse("Patient", [("family", "writer")])).total == 1


def test_concurrent_if_match_updates_have_one_winner(make_store: StoreFactory) -> None:
    writers = 6
    setup = make_store()
    setup.update(PATIENT)
    stores = [make_store() for _ in range(writers)]
    outcomes: list[str] = []
    barrier = threading.Barrier(writers)

    def write(n: int) -> None:
        barrier.wait()
        try:
            stores[n].update({**PATIENT, "gender": "other"}, if_match=1)
            outcomes.append("ok")
        except VersionConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * (writers - 1) + ["ok"]
    assert setup.read("Patient", "p1").version_id == 2


def test_concurrent_conditional_creates_make_one(make_store: StoreFactory) -> None:
    writers = 6
    stores = [make_store() for _ in range(writers)]
    barrier = threading.Barrier(writers)
    ids: list[str] = []

    def write(n: int) -> None:
        barrier.wait()
        ids.append(stores[n].create(PATIENT, if_none_exist="identifier=9000000009").id)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == writers


# A writer that commits one resource, then dies (SIGKILL) in the middle of a large
# uncommitted transaction.
_KILLED_WRITER = """
import sys
from cpa_fhir.store import SqlRepository
url, schema = sys.argv[1], sys.argv[2] or None
store = SqlRepository(url, schema=schema)
store.update({"resourceType": "Patient", "id": "kept", "gender": "female"})
print("committed", flush=True)
with store.transaction() as tx:
    for n in range(1_000_000):
        tx.update({"resourceType": "Patient", "id": f"lost-{n}", "gender": "male"})
        if n == 200:
            print("writing", flush=True)
"""


def test_store_is_consistent_after_a_writer_is_killed(
    store_location: tuple[str, str | None], make_store: StoreFactory
) -> None:
    url, schema = store_location
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, url, schema or ""],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "committed"
        assert writer.stdout.readline().strip() == "writing"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
        if writer.stdout is not None:
            writer.stdout.close()
    store = make_store()  # reopens and migrates
    assert store.read("Patient", "kept").version_id == 1
    everything = store.search(store.parse("Patient", [("_count", "1000")]))
    assert [m.id for m in everything.matches] == ["kept"]
    assert store.search(store.parse("Patient", [("gender", "male")])).total == 0
    assert len(store.history()) == 1
    assert store.update({"resourceType": "Patient", "id": "lost-1"}).version_id == 1
    assert current_version(store.engine) == LATEST_VERSION


# --- migrations -------------------------------------------------------------------


def _schema_shape(engine: sa.Engine) -> dict[str, Any]:
    inspector = sa.inspect(engine)
    return {
        table: (
            sorted(c["name"] for c in inspector.get_columns(table)),
            sorted(i["name"] or "" for i in inspector.get_indexes(table)),
        )
        for table in sorted(inspector.get_table_names())
    }


def test_upgrading_bounds_long_strings_and_tokens_indexed_whole_before(
    make_store: StoreFactory,
) -> None:
    # Before version 7 a long value was indexed whole (where the database took it):
    # searches now compare its beginning, so the index is cut to it. (A string is
    # matched by prefix, so it was found either way.)
    store = make_store(migrate=False)
    migrate(store.engine, target=6)
    family, code = "Q" * 600, "c" * 300
    patient = {"resourceType": "Patient", "id": "p-long", "name": [{"family": family}]}
    store.update({**patient, "identifier": [{"value": code}]})
    with store.engine.begin() as connection:  # as an older version stored them
        connection.execute(
            search_string.update()
            .where(search_string.c.resource_id == "p-long", search_string.c.param == "family")
            .values(normalised=family.lower())
        )
        connection.execute(
            search_token.update()
            .where(search_token.c.resource_id == "p-long", search_token.c.param == "identifier")
            .values(code=code)
        )

    def found(params: list[tuple[str, str]]) -> set[str]:
        return {m.id for m in store.search(store.parse("Patient", params)).matches}

    assert found([("identifier", code)]) == set()  # compared by its first 256 characters
    assert migrate(store.engine) == [7]
    assert found([("family", family)]) == {"p-long"}
    assert found([("identifier", code)]) == {"p-long"}


def test_migrate_is_idempotent(make_store: StoreFactory) -> None:
    store = make_store()
    shape = _schema_shape(store.engine)
    assert migrate(store.engine) == []
    assert _schema_shape(store.engine) == shape
    assert current_version(store.engine) == LATEST_VERSION
    assert "resource_current" in shape and "search_token" in shape


def test_a_store_at_version_1_upgrades(make_store: StoreFactory) -> None:
    store = make_store(migrate=False)
    assert current_version(store.engine) == 0
    assert migrate(store.engine, target=1) == [1]
    store.update(PATIENT)
    indexes = _schema_shape(store.engine)["resource_history"][1]
    assert "ix_history_updated" not in indexes
    assert migrate(store.engine) == list(range(2, LATEST_VERSION + 1))
    assert "ix_history_updated" in _schema_shape(store.engine)["resource_history"][1]
    assert store.read("Patient", "p1").version_id == 1


def test_upgrading_refolds_strings_indexed_by_the_older_normalise(
    make_store: StoreFactory,
) -> None:
    # Before version 5 the index folded case before decomposing: the mathematical
    # capital alpha became a Greek capital alpha, which no search (always folded) finds.
    store = make_store(migrate=False)
    migrate(store.engine, target=4)
    patient = {"resourceType": "Patient", "id": "p-math", "name": [{"family": "\U0001d6e2lpha"}]}
    store.update(patient)
    with store.engine.begin() as connection:
        connection.execute(
            search_string.update()
            .where(search_string.c.resource_id == "p-math")
            .values(normalised=sa.func.replace(search_string.c.normalised, "α", "Α"))
        )

    def found() -> set[str]:
        query = store.parse("Patient", [("family", "αlpha")])
        return {m.id for m in store.search(query).matches}

    assert found() == set()
    assert migrate(store.engine, target=5) == [5]
    assert found() == {"p-math"}


def test_stores_opened_together_migrate_once(make_store: StoreFactory) -> None:
    first = make_store(migrate=False)
    barrier = threading.Barrier(4)
    applied: list[list[int]] = []

    def open_one() -> None:
        barrier.wait()
        applied.append(migrate(first.engine))

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(applied, key=len) == [[], [], [], list(range(1, LATEST_VERSION + 1))]


def test_clock_gives_last_updated(make_store: StoreFactory) -> None:
    clock = TickingClock()
    store = make_store(clock=clock)
    stored = store.update(PATIENT)
    assert stored.last_updated == clock.now
    assert store.read("Patient", "p1").last_updated == clock.now


@pytest.mark.parametrize("pipeline_rows", [0, 1_000_000])
def test_index_rows_are_the_same_by_copy_or_by_pipeline(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch, pipeline_rows: int
) -> None:
    # PostgreSQL takes a few rows as one pipeline of inserts and many by COPY.
    from cpa_fhir.store import _repository
    from cpa_fhir.store._indexing import index_resource
    from cpa_fhir.store._schema import INDEX_TABLES

    monkeypatch.setattr(_repository, "_PIPELINE_ROWS", pipeline_rows)
    store = make_store()
    resources = example_resources()[:40]
    for resource in resources:
        store.update(resource)
    audit = {
        "resourceType": "AuditEvent",
        "id": "pipeline-audit",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106"},
        "recorded": "2026-11-01T10:00:00Z",
        "agent": [{"who": {"reference": "Organization/gp"}, "requestor": True}],
        "source": {"observer": {"display": "tests"}},
    }
    store.append([audit])
    with store.engine.connect() as connection:
        stored = {
            table.name: sorted(
                tuple(map(str, row)) for row in connection.execute(sa.select(table)).all()
            )
            for table in INDEX_TABLES
        }
    expected: dict[str, list[tuple[str, ...]]] = {t.name: [] for t in INDEX_TABLES}
    for resource in [*resources, audit]:
        rows = index_resource(resource, store.parameters.indexed(resource["resourceType"]))
        key = (resource["resourceType"], resource["id"])
        for table, found in zip(
            INDEX_TABLES,
            (rows.tokens, rows.strings, rows.references, rows.dates, rows.numbers),
            strict=True,
        ):
            expected[table.name] += [tuple(map(str, (*key, *row))) for row in found]
    assert stored == {name: sorted(rows) for name, rows in expected.items()}


@pytest.mark.parametrize("count", [1, 2, 3, 5, 6])
def test_every_page_tells_the_same_total(store: SqlRepository, count: int) -> None:
    flags = [
        {
            "resourceType": "Flag",
            "id": f"paged-{i}",
            "status": "active",
            "code": {"text": "paged"},
            "subject": {"reference": "Patient/paged"},
        }
        for i in range(5)
    ]
    store.load(flags)
    seen: list[str] = []
    for offset in range(0, 8):
        query = store.parse(
            "Flag",
            [("patient", "Patient/paged"), ("_count", str(count)), ("_offset", str(offset))],
        )
        result = store.search(query)
        assert result.total == 5, (count, offset)
        if offset % count == 0:
            seen += [m.id for m in result.matches]
    assert sorted(seen) == sorted(f["id"] for f in flags)
    unnumbered = store.parse("Flag", [("patient", "Patient/paged"), ("_total", "none")])
    assert store.search(unnumbered).total is None
    counted = store.parse("Flag", [("patient", "Patient/paged"), ("_summary", "count")])
    assert (store.search(counted).total, store.search(counted).matches) == (5, [])
