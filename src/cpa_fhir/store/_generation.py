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
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Engine

from cpa_fhir.store._engine import READ_TIMEOUT_MS

GENERATION_SQL = "SELECT generation FROM store_change WHERE id = 1"


class GenerationWatch:
    """`current()`: the generation, read after the call began; one query for all the
    calls that wait on it. For one event loop (the one it is first used on)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[int]],
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._read = read
        self._close = close
        self._next: asyncio.Future[int] | None = None  # asked for, its query not yet sent
        self._in_flight: asyncio.Task[None] | None = None
        self.queries = 0  # how many were sent (for tests and measurements)

    async def current(self) -> int:
        waiting = self._next
        if waiting is None:
            waiting = self._next = asyncio.get_running_loop().create_future()
            waiting.add_done_callback(_retrieve)
            if self._in_flight is None:
                self._send()
        # One caller's cancellation must not cancel the answer the others wait on.
        return await asyncio.shield(waiting)

    async def close(self) -> None:
        """Wait for the query in flight, then release what reads (its connection)."""
        while self._in_flight is not None:  # it may send the next on its way out
            await asyncio.wait([self._in_flight])
        if self._close is not None:
            await self._close()

    def _send(self) -> None:
        answer, self._next = self._next, None
        assert answer is not None
        self.queries += 1
        self._in_flight = asyncio.get_running_loop().create_task(self._query(answer))

    async def _query(self, answer: asyncio.Future[int]) -> None:
        try:
            value = await self._read()
        except asyncio.CancelledError:
            answer.cancel()
            raise
        except Exception as exc:
            answer.set_exception(exc)
        else:
            answer.set_result(value)
        finally:
            self._in_flight = None
            if self._next is not None:  # asked for while this one was out
                self._send()


def _retrieve(future: asyncio.Future[int]) -> None:
    # Every caller may have gone (cancelled) before an error came: it is theirs, not
    # the loop's to report as never retrieved.
    if not future.cancelled():
        future.exception()


class AsyncGenerationReader:
    """Reads the generation on an asyncio connection of its own (PostgreSQL), opened
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

    async def read(self) -> int:
        connection = self._connection
        if connection is None:
            connection = self._connection = await self._connect()
        try:
            cursor = await connection.execute(GENERATION_SQL, prepare=True)
            row = await cursor.fetchone()
        except Exception:
            self._connection = None
            await _close_quietly(connection)
            raise
        return int(row[0]) if row else 0

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
