"""The store's generation, asked for by a server's many requests on one event loop.

A partner's request first reads the generation (`SqlRepository.generation`), to
know whether what was derived from the store still holds. On a database server
that is a network round trip, and made as a blocking call it would hold the event
loop for as long; made for every request, one at a time, it would be most of a
cached read's time. `GenerationWatch` makes it on an asyncio connection instead,
and shares each answer among the requests that asked before its query was sent:
one query in flight at a time, and the requests that ask meanwhile wait for the
next one. A request is never given a value read before it asked, so it sees
every write committed before it arrived, as if it had asked alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Engine

from cpa_fhir.store._engine import READ_TIMEOUT_MS

GENERATION_SQL = "SELECT generation FROM store_change WHERE id = 1"

K = TypeVar("K")
V = TypeVar("V")


class SharedQueries(Generic[K, V]):
    """`get(key)`: the value of `key`, read by a query sent after the call began; the
    keys asked for while a query is out go together in the next. One query in flight
    at a time, for one event loop (the one it is first used on). A key the query
    does not find is None."""

    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._fetch = fetch
        self._close = close
        self._next: dict[K, asyncio.Future[V | None]] = {}  # asked for, not yet sent
        self._in_flight: asyncio.Task[None] | None = None
        self.queries = 0  # how many were sent (for tests and measurements)

    async def get(self, key: K) -> V | None:
        waiting = self._next.get(key)
        if waiting is None:
            waiting = self._next[key] = asyncio.get_running_loop().create_future()
            waiting.add_done_callback(_retrieve)
            if self._in_flight is None:
                self._send()
        # One caller's cancellation must not cancel the answer the others wait on.
        return await asyncio.shield(waiting)

    async def close(self) -> None:
        """Wait for the query in flight (a read's time at most: then it is cancelled),
        then release what reads (its connection)."""
        while self._in_flight is not None:  # it may send the next on its way out
            task = self._in_flight
            await asyncio.wait([task], timeout=READ_TIMEOUT_MS / 1000)
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        if self._close is not None:
            await self._close()

    def _send(self) -> None:
        asked, self._next = self._next, {}
        self.queries += 1
        self._in_flight = asyncio.get_running_loop().create_task(self._query(asked))

    async def _query(self, asked: dict[K, asyncio.Future[V | None]]) -> None:
        try:
            found = await self._fetch(list(asked))
        except asyncio.CancelledError:
            # Shut down (or the loop torn down): what waits for the next goes too,
            # rather than a query sent that nobody would wait for or close.
            waiting, self._next = self._next, {}
            for answer in (*asked.values(), *waiting.values()):
                answer.cancel()
            raise
        except Exception as exc:
            for answer in asked.values():
                answer.set_exception(exc)
        else:
            for key, answer in asked.items():
                answer.set_result(found.get(key))
        finally:
            self._in_flight = None
            if self._next:  # asked for while this one was out
                self._send()


class GenerationWatch(SharedQueries[None, int]):
    """`current()`: the generation, read after the call began; one query for all the
    calls that wait on it."""

    def __init__(
        self,
        read: Callable[[], Awaitable[int]],
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        async def fetch(_keys: list[None]) -> dict[None, int]:
            return {None: await read()}

        super().__init__(fetch, close)

    async def current(self) -> int:
        value = await self.get(None)
        assert value is not None
        return value


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Every caller may have gone (cancelled) before an error came: it is theirs, not
    # the loop's to report as never retrieved.
    if not future.cancelled():
        future.exception()


class AsyncReader:
    """Reads on an asyncio connection of its own (PostgreSQL), opened
    on first use with the store's connection parameters and kept; dropped after a
    failure, and opened again on the next read. A read runs for at most
    `READ_TIMEOUT_MS`, as the store's kept read connections do, and so does opening
    a connection. Nothing here blocks the event loop, not even while the database
    is unreachable: the parameters are learnt once, from a connection the engine
    opens on a worker thread (waited for as long)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Any = None
        self._parameters: tuple[str, str | None] | None = None  # dsn, password

    async def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement (prepared: the same few are sent again and again)."""
        connection = self._connection
        if connection is None:
            connection = self._connection = await self._connect()
        try:
            # The server stops the statement after READ_TIMEOUT_MS; this bounds the
            # wait on a network that stopped answering as well.
            return await asyncio.wait_for(
                self._fetch_all(connection, sql, params), READ_TIMEOUT_MS / 1000 + 1
            )
        except Exception:
            self._connection = None
            await _close_quietly(connection)
            raise

    @staticmethod
    async def _fetch_all(connection: Any, sql: str, params: tuple[Any, ...]) -> list[Any]:
        cursor = await connection.execute(sql, params, prepare=True)
        return list(await cursor.fetchall())

    async def generation(self) -> int:
        found = await self.rows(GENERATION_SQL)
        return int(found[0][0]) if found else 0

    async def _connect(self) -> Any:
        import psycopg

        if self._parameters is None:
            # The engine's connection has no time limit of its own: the requests
            # waiting on this one fail after READ_TIMEOUT_MS, as a slow read would.
            self._parameters = await asyncio.wait_for(
                asyncio.to_thread(self._engine_parameters), READ_TIMEOUT_MS / 1000
            )
        dsn, password = self._parameters
        connection = await psycopg.AsyncConnection.connect(
            dsn,
            password=password,
            autocommit=True,
            connect_timeout=max(1, READ_TIMEOUT_MS // 1000),
        )
        try:
            await connection.execute(f"SET statement_timeout = {READ_TIMEOUT_MS}")
        except BaseException:
            await _close_quietly(connection)
            raise
        return connection

    def _engine_parameters(self) -> tuple[str, str | None]:
        """The parameters of a connection the engine opens (its options, such as the
        schema's search_path, included): the same server, database and settings."""
        wrapper = self._engine.raw_connection()
        try:
            info = wrapper.driver_connection.info  # type: ignore[union-attr]
            return str(info.dsn), info.password
        finally:
            wrapper.close()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await _close_quietly(connection)


async def _close_quietly(connection: Any) -> None:
    try:
        await connection.close()
    except Exception:  # already broken: nothing more to release
        pass
