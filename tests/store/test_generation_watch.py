"""The store's generation read on an event loop, shared among concurrent requests.

A server's partner requests each need the generation read after they arrived
(so that a write committed before the request is seen). `GenerationWatch` sends
one query at a time and gives each answer to every request that asked before
that query was sent; those asking meanwhile wait for the next. On PostgreSQL
the query goes over an asyncio connection (`SqlRepository.generation_watch`),
which survives the server dropping it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from cpa_fhir.store import SqlRepository
from cpa_fhir.store._generation import AsyncReader, GenerationWatch, SharedQueries
from tests.store.conftest import POSTGRES_URL, Postgres
from tests.store.test_generation import patient


class Counter:
    """A store's generation that writes move on, read by queries that take time: a
    query sees the value as it was when the query was sent."""

    def __init__(self, latency: float = 0.0) -> None:
        self.value = 0
        self.latency = latency
        self.sent = 0
        self.fail_next = 0

    async def read(self) -> int:
        self.sent += 1
        if self.fail_next:
            self.fail_next -= 1
            await asyncio.sleep(self.latency)
            raise ConnectionError("server closed the connection")
        seen = self.value
        await asyncio.sleep(self.latency)
        return seen


def test_concurrent_requests_share_one_query_in_flight_and_one_after_it() -> None:
    async def scenario() -> tuple[list[int], int]:
        counter = Counter(latency=0.01)
        watch = GenerationWatch(counter.read)
        first = asyncio.ensure_future(watch.current())
        await asyncio.sleep(0)  # its query is now out
        rest = [asyncio.ensure_future(watch.current()) for _ in range(40)]
        values = await asyncio.gather(first, *rest)
        return values, counter.sent

    values, sent = asyncio.run(scenario())
    assert values == [0] * 41
    assert sent == 2  # the first request's query, then one for the forty that came after


# Each step: a request asks, a write commits, or time passes (queries complete).
STEPS = st.lists(st.sampled_from(["ask", "write", "wait"]), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(steps=STEPS, latency_ms=st.integers(0, 3))
def test_no_request_is_given_a_generation_read_before_it_asked(
    steps: list[str], latency_ms: int
) -> None:
    """Whatever interleaving of requests, writes and query round trips: each request's
    answer is at least the generation when it asked (it sees every earlier write),
    and at most the generation when it got its answer."""

    async def scenario() -> None:
        counter = Counter(latency=latency_ms / 1000)
        watch = GenerationWatch(counter.read)
        answered_within: list[tuple[int, int, int]] = []

        async def request() -> None:
            at_ask = counter.value
            value = await watch.current()
            answered_within.append((at_ask, value, counter.value))

        tasks = []
        for step in steps:
            if step == "ask":
                tasks.append(asyncio.ensure_future(request()))
                await asyncio.sleep(0)
            elif step == "write":
                counter.value += 1
            else:
                await asyncio.sleep(latency_ms / 2000)
        await asyncio.gather(*tasks)
        assert len(answered_within) == len(tasks)
        for at_ask, value, at_answer in answered_within:
            assert at_ask <= value <= at_answer
        assert counter.sent <= len(tasks)

    asyncio.run(scenario())


def test_a_failed_query_fails_its_waiters_only_and_the_next_request_asks_again() -> None:
    async def scenario() -> tuple[list[Any], int, int]:
        counter = Counter(latency=0.005)
        counter.value = 7
        counter.fail_next = 1
        watch = GenerationWatch(counter.read)
        failing = asyncio.ensure_future(watch.current())
        await asyncio.sleep(0)  # its query is out, and will fail
        later = [asyncio.ensure_future(watch.current()) for _ in range(4)]
        results = await asyncio.gather(failing, *later, return_exceptions=True)
        again = await watch.current()
        return results, again, counter.sent

    results, again, sent = asyncio.run(scenario())
    assert isinstance(results[0], ConnectionError)
    assert results[1:] == [7, 7, 7, 7]  # asked after it went out: the next query's answer
    assert again == 7
    assert sent == 3


def test_one_cancelled_request_does_not_cancel_the_answer_others_wait_for() -> None:
    async def scenario() -> list[int]:
        counter = Counter(latency=0.01)
        counter.value = 3
        watch = GenerationWatch(counter.read)
        leaving = asyncio.ensure_future(watch.current())
        staying = [asyncio.ensure_future(watch.current()) for _ in range(3)]
        await asyncio.sleep(0)
        leaving.cancel()
        return list(await asyncio.gather(*staying))

    assert asyncio.run(scenario()) == [3, 3, 3]


def test_close_waits_for_the_query_in_flight_then_releases_the_reader() -> None:
    async def scenario() -> tuple[int, list[str]]:
        events: list[str] = []

        async def read() -> int:
            await asyncio.sleep(0.01)
            events.append("read")
            return 5

        async def close() -> None:
            events.append("closed")

        watch = GenerationWatch(read, close)
        pending = asyncio.ensure_future(watch.current())
        await asyncio.sleep(0)
        await watch.close()
        return await pending, events

    assert asyncio.run(scenario()) == (5, ["read", "closed"])


# -- on the real store ------------------------------------------------------------


def test_an_embedded_store_reads_its_generation_in_the_request(tmp_path: Path) -> None:
    with SqlRepository(f"sqlite:///{tmp_path / 'store.db'}") as store:
        assert store.generation_watch() is None


def test_the_watch_sees_another_writers_commits_and_survives_a_dropped_connection(
    postgres: Postgres,
) -> None:
    schema = postgres.new_schema()
    with (
        SqlRepository(POSTGRES_URL, schema=schema) as server,
        SqlRepository(POSTGRES_URL, schema=schema) as writer,  # another process's
    ):
        assert isinstance(server.generation_watch(), GenerationWatch)
        reader = AsyncReader(server.engine)  # what generation_watch() uses
        watch = GenerationWatch(reader.generation, reader.close)

        async def scenario() -> list[int]:
            seen = [await watch.current()]
            writer.create(patient("w1"))
            seen.append(await watch.current())
            # The database drops the watch's connection (a restart, an administrator).
            _terminate(writer, reader._connection.info.backend_pid)
            with pytest.raises(psycopg.OperationalError):
                await watch.current()
            writer.create(patient("w2"))
            seen.append(await watch.current())  # a new connection, opened for this request
            await watch.close()
            return seen

        before, after_one, after_two = asyncio.run(scenario())
        assert after_one == before + 1
        assert after_two == before + 2 == writer.generation() == server.generation()


def _terminate(store: SqlRepository, pid: int) -> None:
    with store.engine.connect() as connection:
        connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


class _UnreachableEngine:
    """An engine whose every connection attempt hangs a while, then fails (a database
    server that does not answer)."""

    def __init__(self, hang: float) -> None:
        self.hang = hang
        self.attempts = 0

    def raw_connection(self) -> Any:
        self.attempts += 1
        time.sleep(self.hang)
        raise OSError("connection timed out")


def test_an_unreachable_database_never_holds_the_event_loop() -> None:
    engine = _UnreachableEngine(hang=0.3)
    reader = AsyncReader(engine)  # type: ignore[arg-type]
    watch = GenerationWatch(reader.generation, reader.close)

    async def scenario() -> list[float]:
        gaps: list[float] = []
        running = True

        async def tick() -> None:
            last = time.monotonic()
            while running:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        for _ in range(2):  # the first request's attempt, and the next one's again
            with pytest.raises(OSError, match="timed out"):
                await watch.current()
        running = False
        await ticker
        return gaps

    gaps = asyncio.run(scenario())
    assert engine.attempts == 2
    # Other requests were served all along: the loop never stood still for the hang.
    assert max(gaps) < 0.2


# -- current versions by key, shared the same way ------------------------------------


class Rows:
    """A store whose values writes change, read by keyed queries that take time."""

    def __init__(self, latency: float = 0.01) -> None:
        self.values: dict[str, int] = {}
        self.latency = latency
        self.queries: list[list[str]] = []

    async def fetch(self, keys: list[str]) -> dict[str, int]:
        self.queries.append(sorted(keys))
        seen = {k: self.values[k] for k in keys if k in self.values}
        await asyncio.sleep(self.latency)
        return seen


def test_keys_asked_for_while_a_query_is_out_go_together_in_the_next() -> None:
    async def scenario() -> tuple[list[int | None], list[list[str]]]:
        rows = Rows()
        rows.values.update(a=1, b=2, c=3)
        reads = SharedQueries(rows.fetch)
        first = asyncio.ensure_future(reads.get("a"))
        await asyncio.sleep(0)  # its query is now out
        rest = [asyncio.ensure_future(reads.get(k)) for k in ("b", "c", "b", "nothing", "a")]
        values = await asyncio.gather(first, *rest)
        return list(values), rows.queries

    values, queries = asyncio.run(scenario())
    assert values == [1, 2, 3, 2, None, 1]
    # "a" again was asked for after the first query went: it waits for the next.
    assert queries == [["a"], ["a", "b", "c", "nothing"]]


@settings(max_examples=60, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["get", "write", "yield", "tick"]), st.sampled_from("xyz")),
        min_size=1,
        max_size=40,
    )
)
def test_no_read_is_given_a_value_read_before_it_asked(plan: list[tuple[str, str]]) -> None:
    """Whatever the interleaving, a read's value is at least what the store held when
    the read was asked for (writes only count up)."""

    async def scenario() -> None:
        rows = Rows(latency=0.002)
        reads = SharedQueries(rows.fetch)
        asked: list[tuple[str, int, asyncio.Future[int | None]]] = []
        for step, key in plan:
            if step == "get":
                held = rows.values.get(key, 0)
                asked.append((key, held, asyncio.ensure_future(reads.get(key))))
            elif step == "write":
                rows.values[key] = rows.values.get(key, 0) + 1
            elif step == "yield":  # let queries go out, not come back
                await asyncio.sleep(0)
            else:  # let them come back too
                await asyncio.sleep(0.003)
        for key, held, answer in asked:
            value = await answer
            assert (value or 0) >= held, (key, held, value)
        await reads.close()

    asyncio.run(scenario())


def test_the_current_versions_of_a_real_store_are_read_as_a_read_would(
    postgres: Postgres, tmp_path: Path
) -> None:
    schema = postgres.new_schema()
    with (
        SqlRepository(POSTGRES_URL, schema=schema) as server,
        SqlRepository(POSTGRES_URL, schema=schema) as writer,  # another process's
    ):
        reads = server.current_reads()
        assert reads is not None
        writer.update(patient("kept"))
        writer.update(patient("gone"))
        writer.delete("Patient", "gone")

        async def scenario() -> list[Any]:
            found = await asyncio.gather(
                reads.get(("Patient", "kept")),
                reads.get(("Patient", "gone")),
                reads.get(("Patient", "never-stored")),
            )
            writer.update({**patient("kept"), "active": False})
            again = await reads.get(("Patient", "kept"))  # asked after the write
            await reads.close()
            return [*found, again]

        kept, deleted, absent, again = asyncio.run(scenario())
        assert kept.version_id == 1 and not kept.deleted
        assert deleted.deleted and deleted.version_id == 2
        assert absent is None
        assert again.version_id == 2 and again.resource()["active"] is False
    with SqlRepository(f"sqlite:///{tmp_path / 'embedded.db'}") as embedded:
        assert embedded.current_reads() is None
