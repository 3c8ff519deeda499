"""Group commit of the server's AuditEvents (`AuditLog`, `AuditBatcher`).

Every request's events are stored exactly once and the request hears of it only
once they are committed; one request's bad events fail that request alone; a
request never hears "committed" for events that were not.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cpa_fhir.sandbox._audit_log import AuditBatcher, AuditLog, AuditWriteFailed
from cpa_fhir.store import SqlRepository

WRITER_NAME = "cpa-fhir-audit"


def event(marker: str = "audit", id: str | None = None) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "id": id or uuid.uuid4().hex,
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106"},
        "recorded": "2026-11-01T10:00:00Z",
        "agent": [{"who": {"display": marker}, "requestor": True}],
        "source": {"observer": {"display": "tests"}},
    }


def events(n: int, marker: str = "audit") -> list[dict[str, Any]]:
    return [event(marker) for _ in range(n)]


def ids(batch: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("id")) for e in batch]


def stored_ids(store: SqlRepository, wanted: list[str]) -> set[str]:
    return {i for (_, i) in store.read_many(("AuditEvent", i) for i in wanted)}


def total(store: SqlRepository) -> int:
    query = store.parse("AuditEvent", [("_summary", "count")])
    return int(store.search(query).total or 0)


def assert_only_the_bad_failed(
    store: SqlRepository,
    requests: list[list[dict[str, Any]]],
    bad: dict[int, list[dict[str, Any]]],
    results: list[BaseException | None],
) -> None:
    """Each bad request (one event's id taken before, one event invalid) failed alone:
    every other request's events are stored, once, and none of the bad ones'."""
    for n, result in enumerate(results):
        if n in bad:
            assert isinstance(result, AuditWriteFailed), n
        else:
            assert result is None, (n, result)
    wanted = [i for n, r in enumerate(requests) if n not in bad for i in ids(r)]
    assert stored_ids(store, wanted) == set(wanted)
    assert stored_ids(store, [bad[19][0]["id"]]) == set()
    assert total(store) == 1 + len(wanted)


class Appends:
    """Wraps `store.append`: what each call was given, and a gate to hold calls back."""

    def __init__(self, store: SqlRepository) -> None:
        self.store = store
        self.original = store.append
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, resources: Any) -> int:
        batch = list(resources)
        self.calls.append(ids(batch))
        self.entered.set()
        assert self.gate.wait(30)
        return int(self.original(batch))


@pytest.fixture
def appends(store: SqlRepository, monkeypatch: pytest.MonkeyPatch) -> Appends:
    wrapper = Appends(store)
    monkeypatch.setattr(store, "append", wrapper)
    return wrapper


@pytest.fixture
def log(store: SqlRepository) -> Iterator[AuditLog]:
    made = AuditLog(store)
    yield made
    made.close()


def _run_threads(target: Any, args: list[tuple[Any, ...]], timeout: float = 60) -> None:
    threads = [threading.Thread(target=target, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a caller never heard back"


# -- AuditLog.record ---------------------------------------------------------------


def test_record_from_many_threads_stores_every_event_exactly_once(
    store: SqlRepository, log: AuditLog, appends: Appends
) -> None:
    requests = [events(1 + n % 3, marker=f"r{n}") for n in range(60)]
    returned: list[int] = []
    failures: list[BaseException] = []

    def caller(n: int) -> None:
        try:
            log.record(requests[n])
            # Committed when record returns: readable at once.
            assert stored_ids(store, ids(requests[n])) == set(ids(requests[n]))
            returned.append(n)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    _run_threads(caller, [(n,) for n in range(len(requests))])
    assert not failures
    assert sorted(returned) == list(range(len(requests)))
    everything = [i for r in requests for i in ids(r)]
    assert stored_ids(store, everything) == set(everything)
    assert total(store) == len(everything)
    committed = [i for call in appends.calls for i in call]
    assert sorted(committed) == sorted(everything), "an event was written twice, or not at all"


def test_requests_that_arrive_during_a_commit_share_the_next(
    store: SqlRepository, log: AuditLog, appends: Appends
) -> None:
    appends.gate.clear()
    first = events(2)
    rest = [events(1) for _ in range(10)]
    t = threading.Thread(target=log.record, args=(first,))
    t.start()
    assert appends.entered.wait(10)
    threads = [threading.Thread(target=log.record, args=(r,)) for r in rest]
    for th in threads:
        th.start()
    time.sleep(0.2)  # they queue behind the held commit
    appends.gate.set()
    for th in [t, *threads]:
        th.join(30)
    assert appends.calls[0] == ids(first)
    assert len(appends.calls) == 2, appends.calls
    assert sorted(appends.calls[1]) == sorted(i for r in rest for i in ids(r))
    assert total(store) == 12


def test_record_of_nothing_returns_at_once(store: SqlRepository, appends: Appends) -> None:
    log = AuditLog(store)
    log.record([])
    assert appends.calls == []
    log.close()


def test_a_request_whose_events_cannot_be_stored_fails_alone(
    store: SqlRepository, log: AuditLog
) -> None:
    taken = event()
    store.append([taken])
    good = [events(2, marker=f"good{n}") for n in range(12)]
    bad = [[event(), event(id=taken["id"])], [event(), {"resourceType": "AuditEvent"}]]
    outcome: dict[int, str] = {}
    requests = good + bad

    def caller(n: int) -> None:
        try:
            log.record(requests[n])
            outcome[n] = "ok"
        except AuditWriteFailed:
            outcome[n] = "failed"

    _run_threads(caller, [(n,) for n in range(len(requests))])
    assert outcome == {
        **{n: "ok" for n in range(len(good))},
        **{len(good) + n: "failed" for n in range(len(bad))},
    }
    wanted = [i for r in good for i in ids(r)]
    assert stored_ids(store, wanted) == set(wanted)
    assert stored_ids(store, [bad[0][0]["id"], bad[1][0]["id"]]) == set()
    assert total(store) == 1 + len(wanted)


class _Abort(BaseException):
    """Not an Exception: what a driver, a timeout library or an interrupt may raise."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_record_never_reports_events_committed_that_were_not(
    store: SqlRepository, log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def abort(resources: Any) -> int:
        raise _Abort("the write was interrupted")

    monkeypatch.setattr(store, "append", abort)
    mine = events(1)
    outcome: list[str] = []

    def caller() -> None:
        try:
            log.record(mine)
            outcome.append("returned as committed")
        except BaseException as exc:
            outcome.append(type(exc).__name__)

    _run_threads(caller, [()], timeout=10)
    assert stored_ids(store, ids(mine)) == set()
    assert outcome != ["returned as committed"], "record returned, yet nothing was stored"


# -- AuditLog.write ------------------------------------------------------------------


def test_write_commits_good_batches_in_one_transaction(
    store: SqlRepository, log: AuditLog, appends: Appends
) -> None:
    batches = [events(n) for n in (1, 2, 3)]
    assert log.write(batches) == [None, None, None]
    assert len(appends.calls) == 1
    assert total(store) == 6


def test_write_with_one_bad_batch_stores_the_good_ones_and_fails_only_the_bad(
    store: SqlRepository, log: AuditLog
) -> None:
    taken = event()
    store.append([taken])
    good = [events(2), events(1), events(3)]
    clash = [event(), event(id=taken["id"])]  # one fine, one taken: neither stored
    batches = [good[0], clash, good[1], [{"resourceType": "AuditEvent"}], good[2]]
    errors = log.write(batches)
    assert [e is None for e in errors] == [True, False, True, False, True]
    assert all(isinstance(e, Exception) for e in errors if e is not None)
    wanted = [i for b in good for i in ids(b)]
    assert stored_ids(store, wanted) == set(wanted)
    assert stored_ids(store, [clash[0]["id"]]) == set()
    assert total(store) == 1 + len(wanted)


def test_write_of_two_requests_with_one_id_stores_it_once(
    store: SqlRepository, log: AuditLog
) -> None:
    shared = uuid.uuid4().hex
    first = [event(marker="first", id=shared)]
    second = [event(marker="second"), event(marker="second", id=shared)]
    errors = log.write([first, second])
    assert errors[0] is None and errors[1] is not None
    assert store.read("AuditEvent", shared).resource()["agent"][0]["who"]["display"] == "first"
    assert total(store) == 1


# -- AuditBatcher --------------------------------------------------------------------


def test_batcher_stores_every_request_once_and_fails_only_the_bad(
    store: SqlRepository, appends: Appends
) -> None:
    log = AuditLog(store, max_batch=4)
    taken = event()
    store.append([taken])
    good = [events(1 + n % 2, marker=f"g{n}") for n in range(30)]
    bad = {7: [event(id=taken["id"])], 19: [event(), {"resourceType": "AuditEvent"}]}
    requests = [bad.get(n, g) for n, g in enumerate(good)]

    async def main() -> list[BaseException | None]:
        batcher = AuditBatcher(log, asyncio.to_thread)
        results = await asyncio.gather(
            *(batcher.record(r) for r in requests), return_exceptions=True
        )
        await batcher.record([])
        return list(results)

    results = asyncio.run(main())
    assert_only_the_bad_failed(store, requests, bad, results)
    # Group commit, at most max_batch requests a transaction: 8 batches, and each of
    # the two that failed retried request by request.
    assert len(appends.calls) == 1 + 8 + 2 * 4  # the taken id's, first
    assert all(len(c) <= 4 * 2 for c in appends.calls)
    log.close()


def test_batcher_commits_what_arrives_meanwhile_in_the_next_batch(
    store: SqlRepository, appends: Appends
) -> None:
    log = AuditLog(store)
    appends.gate.clear()
    first = events(1)
    rest = [events(1) for _ in range(15)]

    async def main() -> None:
        batcher = AuditBatcher(log, asyncio.to_thread)
        head = asyncio.ensure_future(batcher.record(first))
        await asyncio.to_thread(appends.entered.wait, 10)
        tail = [asyncio.ensure_future(batcher.record(r)) for r in rest]
        await asyncio.sleep(0.05)
        assert not head.done() and not any(t.done() for t in tail)
        appends.gate.set()
        await asyncio.gather(head, *tail)

    asyncio.run(main())
    assert appends.calls[0] == ids(first)
    assert len(appends.calls) == 2
    assert sorted(appends.calls[1]) == sorted(i for r in rest for i in ids(r))
    assert total(store) == 16
    log.close()


def test_batcher_fails_the_whole_batch_when_the_commit_itself_fails_then_recovers(
    store: SqlRepository,
) -> None:
    log = AuditLog(store)
    calls = 0

    async def broken_then_working(fn: Any, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("the worker pool is gone")
        return await asyncio.to_thread(fn, *args)

    first = [events(1) for _ in range(5)]
    later = events(2)

    async def main() -> list[BaseException | None]:
        batcher = AuditBatcher(log, broken_then_working)
        results = await asyncio.gather(*(batcher.record(r) for r in first), return_exceptions=True)
        await batcher.record(later)  # the next batch is committed as usual
        return list(results)

    results = asyncio.run(main())
    assert all(isinstance(r, AuditWriteFailed) for r in results)
    assert stored_ids(store, [i for r in first for i in ids(r)]) == set()
    assert stored_ids(store, ids(later)) == set(ids(later))
    log.close()


# -- close ---------------------------------------------------------------------------


def _writers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == WRITER_NAME}


def test_close_stops_the_writer(store: SqlRepository) -> None:
    before = _writers()
    log = AuditLog(store)
    log.close()  # never started: nothing to stop
    log.record(events(1))
    started = _writers() - before
    assert len(started) == 1
    log.close()
    (writer,) = started
    writer.join(5)
    assert not writer.is_alive()
    log.close()  # twice is fine
    # Recording again starts a writer again, and close stops that one too.
    log.record(events(1))
    again = _writers() - before
    assert len(again) == 1 and writer not in again
    log.close()
    for t in again:
        t.join(5)
        assert not t.is_alive()
    assert total(store) == 2


def test_close_lets_the_queued_requests_finish(store: SqlRepository, appends: Appends) -> None:
    before = _writers()
    log = AuditLog(store)
    appends.gate.clear()
    requests = [events(1) for _ in range(8)]
    threads = [threading.Thread(target=log.record, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    assert appends.entered.wait(10)
    time.sleep(0.1)
    closer = threading.Thread(target=log.close)
    closer.start()
    time.sleep(0.1)
    appends.gate.set()
    for t in [*threads, closer]:
        t.join(30)
        assert not t.is_alive()
    wanted = [i for r in requests for i in ids(r)]
    assert stored_ids(store, wanted) == set(wanted)
    for t in _writers() - before:
        t.join(5)
        assert not t.is_alive()
