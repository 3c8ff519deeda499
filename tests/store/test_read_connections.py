"""Reads by id on a connection each thread keeps (`ReadConnections`), and server ids.

A kept connection must read what is committed when it reads, as a pooled one
would; one that fails is replaced; those of ended threads, and all on close, are
closed. Server-assigned ids grow with time (UUID version 7), so that new rows
land together in the indexes.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cpa_fhir.errors import ResourceNotFound
from cpa_fhir.store import SqlRepository, time_ordered_id
from cpa_fhir.store._engine import create_store_engine
from tests.store.conftest import POSTGRES_URL, Postgres, StoreFactory

FHIR_ID = re.compile(r"[A-Za-z0-9\-\.]{1,64}")


def patient(id: str, family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": id, "name": [{"family": family}]}


def in_thread(fn: Any) -> Any:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    return out[0]


def test_a_kept_connection_reads_what_others_commit_later(make_store: StoreFactory) -> None:
    reader, writer = make_store(), make_store()
    writer.update(patient("p1", "Before"))
    assert b"Before" in reader.read("Patient", "p1").content  # the connection is open now
    generation = reader.generation()
    writer.update(patient("p1", "After"))
    writer.update(patient("p2", "New"))
    assert b"After" in reader.read("Patient", "p1").content
    assert reader.read("Patient", "p2").version_id == 1
    assert reader.generation() == generation + 2
    writer.delete("Patient", "p2")
    with pytest.raises(Exception, match="deleted"):
        reader.read("Patient", "p2")


def test_each_thread_reads_on_its_own_connection(store: SqlRepository) -> None:
    store.update(patient("p1", "Shared"))
    store.read("Patient", "p1")
    mine = store._readers._local.connection
    store.read("Patient", "p1")
    assert store._readers._local.connection is mine  # kept, not one per read
    theirs = in_thread(lambda: (store.read("Patient", "p1"), store._readers._local.connection)[1])
    assert theirs is not None and theirs is not mine


def test_a_failed_read_replaces_the_connection(store: SqlRepository) -> None:
    store.update(patient("p1", "Kept"))
    store.read("Patient", "p1")
    before = store._readers._local.connection
    with pytest.raises(Exception, match="no_such_column|no such column"):
        store._readers.rows("SELECT no_such_column FROM resource_current", ())
    assert store._readers._local.connection is None
    assert b"Kept" in store.read("Patient", "p1").content
    assert store._readers._local.connection is not before
    with pytest.raises(ResourceNotFound):
        store.read("Patient", "absent")


def test_a_sqlite_search_sees_one_moment_and_the_next_sees_what_was_committed_since(
    tmp_path: Path,
) -> None:
    """A search's statements (page, total, includes) agree with one another even when
    a write commits between them; the next search sees that write. (On a database
    server a search runs on a pooled connection.)"""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    reader, writer = SqlRepository(url), SqlRepository(url)
    writer.update(patient("p1", "Same"))
    count = "SELECT count(*) FROM resource_current WHERE resource_type = 'Patient'"
    with reader._readers.snapshot() as rows:
        assert rows(count, ())[0][0] == 1
        writer.update(patient("p2", "Same"))  # committed by another connection
        assert rows(count, ())[0][0] == 1  # the same moment, still
    found = reader.search(reader.parse("Patient", [("family", "Same")]))
    assert {m.id for m in found.matches} == {"p1", "p2"} and found.total == 2


def test_a_search_that_fails_leaves_the_next_one_working(store: SqlRepository) -> None:
    store.update(patient("p1", "Kept"))
    with pytest.raises(Exception, match="no_such_column|no such column"):
        with store._readers.snapshot() as rows:
            rows("SELECT no_such_column FROM resource_current", ())
    assert store._readers._local.connection is None  # dropped, not left mid-transaction
    found = store.search(store.parse("Patient", [("family", "Kept")]))
    assert [m.id for m in found.matches] == ["p1"]


def test_connections_of_ended_threads_and_all_on_close_are_closed(store: SqlRepository) -> None:
    store.update(patient("p1", "Once"))
    ended = in_thread(lambda: (store.read("Patient", "p1"), store._readers._local.connection)[1])
    store.read("Patient", "p1")  # this thread opens its own: the ended one's is closed
    assert ended not in store._readers._open.values()
    with pytest.raises(Exception, match="closed"):
        ended.execute("SELECT 1")
    mine = store._readers._local.connection
    store.close()
    assert store._readers._open == {}
    with pytest.raises(Exception, match="closed"):
        mine.execute("SELECT 1")


def test_server_ids_are_uuid7_in_time_order() -> None:
    first = [time_ordered_id() for _ in range(50)]
    time.sleep(0.002)
    later = time_ordered_id()
    for value in [*first, later]:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == value and FHIR_ID.fullmatch(value)
        assert abs(int(value[:8] + value[9:13], 16) - time.time_ns() // 1_000_000) < 60_000
    assert len(set(first)) == len(first)
    assert all(value < later for value in first)


def test_server_ids_are_unique_across_threads_and_a_forked_child() -> None:
    # Random bits come from a pool drawn a page at a time: threads must not share a
    # draw, and a forked child must not reuse what its parent had drawn.
    time_ordered_id()  # the pool holds random bytes now
    made: list[str] = []
    threads = [
        threading.Thread(target=lambda: made.extend(time_ordered_id() for _ in range(2000)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == len(made) == 8000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(time_ordered_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        childs = pipe.read().split()
    os.waitpid(pid, 0)
    parents = [time_ordered_id() for _ in range(100)]
    # Ids made in the same millisecond share their first 48 bits; the rest must differ.
    assert not {c[14:] for c in childs} & {p[14:] for p in parents}


def test_created_resources_get_time_ordered_ids(store: SqlRepository) -> None:
    made = store.create({"resourceType": "Patient"})
    assert uuid.UUID(made.id).version == 7


def test_a_durable_sqlite_engine_syncs_each_commit_to_disk(tmp_path: Path) -> None:
    # The audit writer's engine: a commit is on disk before it returns (FULL), where
    # the store's own writes need only survive a crash of the process (NORMAL).
    url = f"sqlite:///{tmp_path / 'store.db'}"
    for durable, level in ((False, 1), (True, 2)):
        engine = create_store_engine(url, durable=durable)
        try:
            with engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == level
        finally:
            engine.dispose()


def test_kept_read_connections_bound_a_statement_on_postgresql(postgres: Postgres) -> None:
    store = SqlRepository(POSTGRES_URL, schema=postgres.new_schema())
    # The sandbox reads by id on its event loop: a hung statement must end.
    assert store._readers.rows("SHOW statement_timeout", ()) == [("5s",)]
    with pytest.raises(Exception, match="statement timeout"):
        store._readers.rows("SELECT pg_sleep(6)", ())
    # The connection that failed is replaced; reads go on.
    assert store._readers.rows("SELECT 1", ()) == [(1,)]
    store.close()
