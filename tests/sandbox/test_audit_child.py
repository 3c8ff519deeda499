"""AuditEvents stored by a child process (`AuditLog.child_appender`, `ProcessAppender`).

The same promises as the in-process group commit: every request's events are
stored exactly once, a request hears "committed" only once they are, one bad
request fails alone; and a child that dies fails only the requests it had not
answered (their fate unknown), after which a new child serves.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cpa_fhir.sandbox._audit_log import AuditBatcher, AuditLog
from cpa_fhir.store import SqlRepository, default_search_parameters
from cpa_fhir.store._appender import AppendFailed, AppendRejected, ProcessAppender
from tests.sandbox.test_audit_log import (
    assert_only_the_bad_failed,
    event,
    events,
    ids,
    stored_ids,
    total,
)
from tests.store.conftest import StoreFactory

pytestmark = pytest.mark.skipif(not ProcessAppender.supported(), reason="needs POSIX")

FIXED = datetime(2026, 11, 1, 9, 30, 15, 123000, tzinfo=UTC)


def child(log: AuditLog) -> ProcessAppender:
    appender = log.child_appender()
    assert appender is not None
    return appender


def test_child_stores_every_request_once_and_fails_only_the_bad(store: SqlRepository) -> None:
    log = AuditLog(store)
    taken = event()
    store.append([taken])
    good = [events(1 + n % 2, marker=f"g{n}") for n in range(30)]
    bad = {7: [event(id=taken["id"])], 19: [event(), {"resourceType": "AuditEvent"}]}
    requests = [bad.get(n, g) for n, g in enumerate(good)]

    async def main() -> list[BaseException | None]:
        batcher = AuditBatcher(log, asyncio.to_thread, child(log))
        results = await asyncio.gather(
            *(batcher.record(r) for r in requests), return_exceptions=True
        )
        return list(results)

    try:
        results = asyncio.run(main())
    finally:
        log.close()
    assert_only_the_bad_failed(store, requests, bad, results)


def test_child_stamps_events_with_the_servers_clock(make_store: StoreFactory) -> None:
    store = make_store(clock=lambda: FIXED)
    log = AuditLog(store)
    sent = events(3)

    async def main() -> None:
        await AuditBatcher(log, asyncio.to_thread, child(log)).record(sent)

    try:
        asyncio.run(main())
    finally:
        log.close()
    for found in store.read_many(("AuditEvent", i) for i in ids(sent)).values():
        meta = orjson.loads(found.content)["meta"]
        assert (meta["versionId"], meta["lastUpdated"]) == ("1", "2026-11-01T09:30:15.123Z")
        assert found.last_updated == FIXED


def test_a_child_that_dies_fails_what_it_had_not_answered_and_a_new_one_serves(
    store: SqlRepository,
) -> None:
    appender = store.child_appender()
    assert appender is not None

    async def main() -> None:
        await appender.append(events(1), FIXED)  # running and ready
        process = appender._process
        assert process is not None
        process.send_signal(signal.SIGSTOP)  # it takes nothing more in
        lost = [events(1 + n % 2) for n in range(5)]
        waiting = [asyncio.ensure_future(appender.append(e, FIXED)) for e in lost]
        await asyncio.sleep(0.05)  # all sent
        process.kill()
        process.wait()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, AppendFailed) for r in results), results
        later = events(2)
        assert await appender.append(later, FIXED) == 2
        assert appender._process is not process and appender._process is not None
        assert stored_ids(store, ids(later)) == set(ids(later))
        lost_ids = [i for e in lost for i in ids(e)]
        assert stored_ids(store, lost_ids) == set()

    try:
        asyncio.run(main())
    finally:
        appender.close()


def test_a_rejected_batch_stores_nothing_and_the_child_goes_on(store: SqlRepository) -> None:
    appender = store.child_appender()
    assert appender is not None
    taken = event()
    store.append([taken])

    async def main() -> None:
        mixed = [*events(2), event(id=taken["id"])]
        with pytest.raises(AppendRejected):
            await appender.append(mixed, FIXED)
        assert stored_ids(store, ids(mixed[:2])) == set()
        fine = events(2)
        assert await appender.append(fine, FIXED) == 2

    try:
        asyncio.run(main())
    finally:
        appender.close()


def test_close_stops_the_child(store: SqlRepository) -> None:
    log = AuditLog(store)
    appender = child(log)

    async def main() -> None:
        assert await appender.append(events(1), FIXED) == 1

    asyncio.run(main())
    processes = [c._process for c in log._children]
    assert processes and all(p is not None and p.poll() is None for p in processes)
    log.close()
    assert all(p is not None and p.poll() is not None for p in processes)


def test_no_child_for_a_store_with_its_own_search_parameters(make_store: StoreFactory) -> None:
    own: list[dict[str, Any]] = [
        {
            "resourceType": "SearchParameter",
            "url": "https://example.org/SearchParameter/audit-marker",
            "code": "marker",
            "base": ["AuditEvent"],
            "type": "string",
            "expression": "AuditEvent.agent.who.display",
        }
    ]
    store = make_store(parameters=default_search_parameters().with_resources(own))
    # A child indexes with the default parameters: it would leave `marker` unindexed.
    assert store.child_appender() is None
    assert AuditLog(store).child_appender() is None


def test_overlapping_requests_each_hear_of_their_own_records(store: SqlRepository) -> None:
    appender = store.child_appender()
    assert appender is not None
    sent = [events(1 + n % 3, marker=f"o{n}") for n in range(60)]

    async def main() -> list[int]:
        # All sent before any answer comes: the child commits them in whatever groups
        # reach it, and answers each request in the order sent.
        return list(await asyncio.gather(*(appender.append(s, FIXED) for s in sent)))

    try:
        counts = asyncio.run(main())
    finally:
        appender.close()
    assert counts == [len(s) for s in sent]
    wanted = [i for s in sent for i in ids(s)]
    assert stored_ids(store, wanted) == set(wanted)
    assert total(store) == len(wanted)


def test_a_cancelled_request_leaves_the_channel_working(store: SqlRepository) -> None:
    appender = store.child_appender()
    assert appender is not None

    async def main() -> None:
        await appender.append(events(1), FIXED)
        process = appender._process
        abandoned = events(2)
        task = asyncio.ensure_future(appender.append(abandoned, FIXED))
        await asyncio.sleep(0)  # sent
        task.cancel()
        later = events(3)
        assert await appender.append(later, FIXED) == 3
        assert appender._process is process  # the same child, still in step
        # What was sent before the client went away is recorded all the same.
        assert stored_ids(store, ids(abandoned)) == set(ids(abandoned))

    try:
        asyncio.run(main())
    finally:
        appender.close()


def test_the_appender_serves_one_event_loop_after_another(store: SqlRepository) -> None:
    appender = store.child_appender()
    assert appender is not None
    first, second = events(1), events(2)
    try:
        assert asyncio.run(appender.append(first, FIXED)) == 1
        # The first loop has ended: its channel cannot hear replies any more.
        assert asyncio.run(appender.append(second, FIXED)) == 2
    finally:
        appender.close()
    assert stored_ids(store, ids(first + second)) == set(ids(first + second))


def test_event_loops_running_at_once_in_threads_each_hear_their_replies(
    store: SqlRepository,
) -> None:
    """Replies are read on one loop; requests from loops in other threads, running
    meanwhile, are answered on their own."""
    appender = store.child_appender()
    assert appender is not None
    sent = {n: [events(1 + k % 2, marker=f"t{n}-{k}") for k in range(15)] for n in range(4)}
    counts: dict[int, list[int]] = {}
    start = threading.Barrier(len(sent))

    def in_thread(n: int) -> None:
        async def main() -> list[int]:
            start.wait()
            results = []
            for batch in sent[n]:  # one after another, interleaved with the others'
                results.append(await asyncio.wait_for(appender.append(batch, FIXED), 30))
            return results

        counts[n] = asyncio.run(main())

    threads = [threading.Thread(target=in_thread, args=(n,)) for n in sent]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        appender.close()
    assert counts == {n: [len(b) for b in batches] for n, batches in sent.items()}
    wanted = [i for batches in sent.values() for b in batches for i in ids(b)]
    assert stored_ids(store, wanted) == set(wanted)


def test_a_request_waiting_when_the_listening_loop_ends_hears_its_reply(
    store: SqlRepository,
) -> None:
    appender = store.child_appender()
    assert appender is not None
    listening, waiting, answered = threading.Event(), threading.Event(), threading.Event()
    home_may_end = threading.Event()
    outcome: list[Any] = []

    async def home() -> None:
        appender.attach()  # replies are read here, as the server's loop reads them
        assert await appender.append(events(1), FIXED) == 1
        listening.set()
        home_may_end.wait(30)
        appender.detach()  # the server stops serving: a thread reads from now on

    async def other() -> None:
        task = asyncio.ensure_future(appender.append(events(2), FIXED))
        await asyncio.sleep(0.05)  # sent while the home loop still runs
        waiting.set()
        outcome.append(await asyncio.wait_for(task, 30))
        answered.set()

    try:
        home_thread = threading.Thread(target=asyncio.run, args=(home(),))
        home_thread.start()
        assert listening.wait(30)
        process = appender._process
        assert process is not None
        process.send_signal(signal.SIGSTOP)  # its reply comes only once the home has ended
        other_thread = threading.Thread(target=asyncio.run, args=(other(),))
        other_thread.start()
        assert waiting.wait(30)
        home_may_end.set()
        home_thread.join(30)
        process.send_signal(signal.SIGCONT)
        assert answered.wait(30)
        other_thread.join(30)
    finally:
        appender.close()
    assert outcome == [2]


def test_a_loop_that_stopped_without_closing_hands_the_replies_on(store: SqlRepository) -> None:
    appender = store.child_appender()
    assert appender is not None
    first, second = events(1), events(2)
    stopped = asyncio.new_event_loop()
    try:
        assert stopped.run_until_complete(appender.append(first, FIXED)) == 1
        # `stopped` is open but runs no more: the next loop must read the replies.
        assert asyncio.run(asyncio.wait_for(appender.append(second, FIXED), 30)) == 2
    finally:
        appender.close()
        stopped.close()
    assert stored_ids(store, ids(first + second)) == set(ids(first + second))


def test_closing_fails_what_waits_and_a_new_child_serves(store: SqlRepository) -> None:
    appender = store.child_appender()
    assert appender is not None

    async def main() -> None:
        await appender.append(events(1), FIXED)
        process = appender._process
        assert process is not None
        process.send_signal(signal.SIGSTOP)  # it answers nothing more
        waiting = asyncio.ensure_future(appender.append(events(1), FIXED))
        await asyncio.sleep(0.05)
        process.send_signal(signal.SIGCONT)
        appender.close()
        with pytest.raises(AppendFailed):
            await waiting
        assert await appender.append(events(2), FIXED) == 2
        assert appender._process is not process

    try:
        asyncio.run(main())
    finally:
        appender.close()


def _by_patient(store: SqlRepository, patient: str) -> set[str]:
    query = store.parse("AuditEvent", [("entity", f"Patient/{patient}"), ("_count", "1000")])
    return {m.id for m in store.search(query).matches}


def _about(patient: str) -> dict[str, Any]:
    return event() | {"entity": [{"what": {"reference": f"Patient/{patient}"}}]}


def test_index_returns_once_everything_sent_before_can_be_found(store: SqlRepository) -> None:
    # The child answers once records are committed and writes their index rows after;
    # `index()` is the wait a search of them makes first.
    log = AuditLog(store)

    async def main() -> None:
        batcher = AuditBatcher(log, asyncio.to_thread, child(log))
        for _ in range(8):
            patient = uuid.uuid4().hex
            requests = [[_about(patient)] for _ in range(40)]
            await asyncio.gather(*(batcher.record(r) for r in requests))
            await batcher.index()
            assert _by_patient(store, patient) == {r[0]["id"] for r in requests}

    try:
        asyncio.run(main())
    finally:
        log.close()


def test_an_idle_child_indexes_unasked(store: SqlRepository) -> None:
    # Another process searching the store (no `index()` to ask with) finds the
    # records once the child has had nothing to do for a moment.
    log = AuditLog(store)
    patient = uuid.uuid4().hex
    sent = [_about(patient) for _ in range(3)]

    async def main() -> set[str]:
        await AuditBatcher(log, asyncio.to_thread, child(log)).record(sent)
        found: set[str] = set()
        for _ in range(200):
            found = _by_patient(store, patient)
            if found:
                break
            await asyncio.sleep(0.01)
        return found

    try:
        found = asyncio.run(main())
    finally:
        log.close()
    assert found == {e["id"] for e in sent}


def test_a_new_child_indexes_what_an_earlier_one_left(store: SqlRepository) -> None:
    # As if a child had committed these and stopped before writing their index rows.
    patient = uuid.uuid4().hex
    left = [_about(patient) for _ in range(3)]
    store.append_indexing_later(left, [])
    assert _by_patient(store, patient) == set()
    log = AuditLog(store)

    async def main() -> None:
        batcher = AuditBatcher(log, asyncio.to_thread, child(log))
        await batcher.record(events(1))

    try:
        asyncio.run(main())
    finally:
        log.close()
    assert _by_patient(store, patient) == {e["id"] for e in left}


def test_index_waits_for_what_another_writer_committed_and_has_not_indexed(
    store: SqlRepository,
) -> None:
    # Two servers on one store, each with its own child: a search on one must find
    # the AuditEvents the other's child committed and is yet to index (here, as if
    # that child were still busy, their index rows never come from it).
    log = AuditLog(store)

    async def main() -> None:
        batcher = AuditBatcher(log, asyncio.to_thread, child(log))
        await batcher.record(events(1))  # this child is up, its own backlog read
        for _ in range(3):
            patient = uuid.uuid4().hex
            elsewhere = [_about(patient) for _ in range(4)]
            store.append_indexing_later(elsewhere, [])
            assert _by_patient(store, patient) == set()
            await batcher.index()
            assert _by_patient(store, patient) == {e["id"] for e in elsewhere}

    try:
        asyncio.run(main())
    finally:
        log.close()


def test_a_stopping_child_indexes_what_it_committed(store: SqlRepository) -> None:
    log = AuditLog(store)
    patient = uuid.uuid4().hex
    sent = [_about(patient) for _ in range(5)]

    async def main() -> None:
        await AuditBatcher(log, asyncio.to_thread, child(log)).record(sent)

    asyncio.run(main())
    log.close()  # the child stops when the server closes its end
    assert _by_patient(store, patient) == {e["id"] for e in sent}


@pytest.mark.parametrize(
    ("body", "waits"),
    [
        (b"", False),
        (b"subject=Patient%2F1&status=active", False),
        (b"_revinclude=AuditEvent%3Apatient", True),
        (b"_h%61s%3AAuditEvent%3Apatient%3Aaction=R", True),
        (b"\xff\xfe", True),  # not a form: refused later, and waiting does no harm
        (b"a=1&&&", True),
    ],
)
def test_a_search_posted_as_a_form_waits_by_the_criteria_in_its_body(
    body: bytes, waits: bool
) -> None:
    from cpa_fhir.sandbox._app import _may_find_appended

    assert _may_find_appended("POST", "CarePlan/_search", b"", {}, body) is waits
    assert _may_find_appended("POST", "AuditEvent/_search", b"", {}, body) is True


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "waits"),
    [
        ("GET", "AuditEvent", b"patient=Patient/1", {}, True),
        ("POST", "Patient/_search", b"", {}, False),  # its criteria: the form body's
        ("GET", "Patient", b"_revinclude=*", {}, True),
        ("GET", "Patient", b"_h%61s:Audit%45vent:patient:action=R", {}, True),
        ("GET", "Provenance", b"target.action=R", {}, True),  # an untyped chain
        ("GET", "AuditEvent", b"", {}, True),
        ("GET", "Patient", b"_revinclude=AuditEvent:patient", {}, True),
        # Searches that cannot find AuditEvents answer without waiting for their rows.
        ("GET", "CarePlan", b"subject=Patient/1&status=active", {}, False),
        ("GET", "Patient", b"", {}, False),
        ("GET", "Patient", b"_revinclude=Provenance:target", {}, False),
        ("POST", "Patient", b"", {"if-none-exist": "_has:AuditEvent:patient:action=R"}, True),
        ("POST", "Patient", b"", {"if-none-exist": "identifier=urn:x|1"}, False),
        # Written with the "?" of a query string, as the store reads it too.
        ("POST", "Patient", b"", {"if-none-exist": "?_has:AuditEvent:patient:action=R"}, True),
        ("POST", "Patient", b"", {"if-none-exist": "?identifier=urn:x|1"}, False),
        ("POST", "Patient", b"", {}, False),  # a plain create searches nothing
        ("PUT", "Flag", b"identifier=urn:x|1", {}, False),
        ("DELETE", "AuditEvent", b"identifier=urn:x|1", {}, True),
        ("GET", "AuditEvent/1", b"_elements=id", {}, True),
        ("GET", "Patient/1", b"_elements=id", {}, False),
        ("GET", "", b"_type=AuditEvent", {}, False),  # the base answers GET with 405
        ("POST", "", b"", {}, True),  # a batch or transaction may search
        ("GET", "Patient/1", b"", {}, False),
        ("GET", "Patient/1", b"_format=json", {}, False),
        ("GET", "Patient/1/_history/2", b"", {}, False),
        ("PUT", "Flag/1", b"", {}, False),
    ],
)
def test_searches_and_conditional_writes_that_may_find_audit_events_wait_for_their_index(
    method: str, path: str, query: bytes, headers: dict[str, str], waits: bool
) -> None:
    from cpa_fhir.sandbox._app import _may_find_appended

    assert _may_find_appended(method, path, query, headers) is waits


class _FlakyStore:
    """A store whose first read of pending records fails (its write lock held, say)."""

    def __init__(self) -> None:
        self.reads = 0
        self.indexed: list[Any] = []

    def pending_records(self) -> list[Any]:
        self.reads += 1
        if self.reads == 1:
            raise OSError("database is locked")
        return [("AuditEvent", "left", None)]

    def index_appended(self, records: list[Any]) -> int:
        self.indexed += records
        return len(records)


def test_what_an_earlier_child_left_is_read_again_until_it_can_be() -> None:
    from cpa_fhir.store._appender import _Backlog

    store = _FlakyStore()
    backlog = _Backlog(store)
    assert backlog.write() is not None  # the start-up read failed: not done, still due
    assert backlog
    backlog.records.append(("AuditEvent", "mine", None))  # this child's, meanwhile
    assert backlog.write() is None
    # Read from the store, which holds this child's pending records too.
    assert store.indexed == [("AuditEvent", "left", None)] and not backlog


def test_the_serving_app_hears_the_child_on_its_own_event_loop(tmp_path: Any) -> None:
    """While the app serves, no thread of its own reads the child's answers (one
    would contend with the event loop for the interpreter on every disclosure);
    once it stops, whatever still waits is heard by a thread."""
    from fastapi.testclient import TestClient

    from cpa_fhir.sandbox import create_app, open_sandbox, seed_examples

    box = open_sandbox(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        seed_examples(box)
        token = box.token_for("gp", "http://testserver/fhir")["access_token"]
        with TestClient(create_app(box)) as http:
            response = http.get(
                "/fhir/CarePlan/c-careplan", headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 200
            (appender,) = box.router.audit_log._children
            channel = appender._channel
            assert channel is not None and channel._reader is None
        assert appender._attached is None
        # Served again, by a client that runs no lifespan: a thread hears the answers.
        response = TestClient(create_app(box)).get(
            "/fhir/CarePlan/c-careplan", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200
    finally:
        box.close()
