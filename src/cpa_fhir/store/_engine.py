"""Database engines for the store: a SQLite file by default, PostgreSQL by URL.

SQLite runs in WAL mode (readers never wait for the writer, and a process killed
mid-write leaves the last committed state: https://sqlite.org/wal.html). Every write
transaction starts with `BEGIN IMMEDIATE`, taking the write lock before it reads, so a
read-modify-write cannot interleave with another; reads start a plain `BEGIN`.
PostgreSQL URLs (`postgresql://...`) use the psycopg 3 driver; `schema` puts the
store's tables in that schema (via the connection's search_path). A URL's own
`options` (`?options=-csearch_path%3Dmine`) are kept, the store's added after them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

READ_ONLY = "cpa_fhir_read_only"
_SQLITE_BUSY_TIMEOUT_MS = 30_000
# A server runs requests on a pool of worker threads; with fewer pooled connections
# than threads, the extra connections are opened and closed on every request.
POOL_SIZE = 16
POOL_OVERFLOW = 24
# The longest a kept read connection's statement may run on PostgreSQL.
READ_TIMEOUT_MS = 5_000
# The longest any of the store's statements may run on PostgreSQL (migrations and
# ANALYZE aside): far past any real search or write, it stops one the database
# cannot answer in reasonable time (whose client has most likely gone) from running
# on. Set as a connection option, so that it costs no round trip.
STATEMENT_TIMEOUT_MS = 30_000


def normalise_url(url: str | URL) -> URL:
    """The SQLAlchemy URL for a store URL: `postgresql://` means psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise ValueError(
            f"unsupported store URL {parsed.drivername}://: use sqlite:///FILE or postgresql://..."
        )
    if parsed.drivername.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise ValueError("the SQLite store needs a file: sqlite:///path/to/store.db")
    return parsed


def create_store_engine(
    url: str | URL,
    *,
    schema: str | None = None,
    durable: bool = False,
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    **kwargs: Any,
) -> Engine:
    """An engine on the store. `durable`: on SQLite, each commit is on disk before it
    returns (synchronous=FULL), not only safe from a crash of the process (NORMAL);
    PostgreSQL commits durably either way.

    On PostgreSQL the URL's `options` are kept and the store's own follow them; the
    server applies them in order, so `schema`, when given, wins over a search_path
    the URL sets."""
    parsed = normalise_url(url)
    kwargs.setdefault("pool_size", POOL_SIZE)
    kwargs.setdefault("max_overflow", POOL_OVERFLOW)
    if parsed.drivername.startswith("sqlite"):
        engine = sa.create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000},
            **kwargs,
        )
        sa.event.listen(engine, "connect", _sqlite_connect_durable if durable else _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    # psycopg prepares statements it runs often, and PostgreSQL may then switch to one
    # generic plan for all values; a search's best plan depends on its values (one
    # patient's few rows versus every active care plan), so plan each execution.
    # psycopg takes `options` from connect_args in place of the URL's: keep both.
    given = parsed.query.get("options", ())
    options = [given] if isinstance(given, str) else list(given)
    options.append("-cplan_cache_mode=force_custom_plan")
    options.append(f"-cstatement_timeout={int(statement_timeout_ms)}")
    if schema is not None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
            raise ValueError(f"{schema!r} is not a plain schema name")
        options.append(f"-csearch_path={schema}")
    return sa.create_engine(parsed, connect_args={"options": " ".join(options)}, **kwargs)


def _sqlite_connect(dbapi_connection: Any, _record: Any, *, durable: bool = False) -> None:
    # Let SQLAlchemy's begin event, not the sqlite3 module, open transactions.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL cannot corrupt the database; a power cut may lose the last commits.
    cursor.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_connect_durable(dbapi_connection: Any, record: Any) -> None:
    _sqlite_connect(dbapi_connection, record, durable=True)


def _sqlite_begin(connection: Connection) -> None:
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


class ReadConnections:
    """One open connection per thread for single-statement reads, outside the pool.

    A read by id is one short statement; checking a pooled connection out and back
    in (with the pool's rollback on return) costs several times the statement. Each
    thread keeps its own connection, in autocommit, so each statement sees what was
    committed when it runs, as a pooled read would. A connection that fails is
    dropped, and the thread opens a new one on its next read. On PostgreSQL a
    statement runs for at most `READ_TIMEOUT_MS` (unless told otherwise): a server
    may make these reads on its event loop.
    """

    def __init__(
        self, engine: Engine, *, statement_timeout_ms: int | None = READ_TIMEOUT_MS
    ) -> None:
        self._engine = engine
        self._statement_timeout_ms = statement_timeout_ms
        self._postgres = engine.dialect.name == "postgresql"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: dict[int, Any] = {}  # thread ident -> its connection

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The rows of one statement, written with the driver's own placeholders."""
        connection = self._thread_connection()
        try:
            cursor = connection.execute(sql, params)
            try:
                return list(cursor.fetchall())
            finally:
                cursor.close()
        except Exception:
            self._drop()
            raise

    @contextmanager
    def snapshot(self) -> Iterator[Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]]:
        """`rows` for the statements of one search (its page, its total and what it
        includes), on this thread's connection. On SQLite they see the store as it
        was at one moment, in one read transaction; on PostgreSQL each sees what is
        committed when it runs, as in any transaction at READ COMMITTED, so they go
        without one (no round trips to begin and end it)."""
        connection = self._thread_connection()
        if self._postgres:
            yield self.rows
            return
        try:
            connection.execute("BEGIN")
        except Exception:
            self._drop()
            raise
        try:
            yield self.rows
        finally:
            # A statement that failed dropped the connection: nothing left to end.
            kept = getattr(self._local, "connection", None)
            if kept is not None and kept is connection:
                try:
                    kept.execute("COMMIT")
                except Exception:
                    self._drop()

    def _thread_connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        return connection if connection is not None else self._connect()

    def _connect(self) -> Any:
        wrapper = self._engine.raw_connection()
        connection: Any = wrapper.driver_connection
        wrapper.detach()  # the pool forgets it: this thread owns it until closed
        if self._postgres:
            connection.autocommit = True
            # These reads may run on a server's event loop: a statement that hangs
            # (a lock held by a schema change, a stalled server) must not hold it long.
            if self._statement_timeout_ms is not None:  # else the engine's own
                connection.execute(f"SET statement_timeout = {int(self._statement_timeout_ms)}")
        me = threading.get_ident()
        alive = {t.ident for t in threading.enumerate()}
        with self._lock:
            # Connections of threads that have ended, and of an ended thread whose
            # ident this one now has.
            ended = [i for i in self._open if i not in alive or i == me]
            stale = [self._open.pop(i) for i in ended]
            self._open[me] = connection
        for old in stale:
            self._close_quietly(old)
        self._local.connection = connection
        return connection

    def _drop(self) -> None:
        self._local.connection = None
        with self._lock:
            connection = self._open.pop(threading.get_ident(), None)
        if connection is not None:
            self._close_quietly(connection)

    def close(self) -> None:
        """Close every thread's connection (each thread opens anew if it reads again)."""
        with self._lock:
            connections, self._open = list(self._open.values()), {}
        self._local = threading.local()
        for connection in connections:
            self._close_quietly(connection)

    @staticmethod
    def _close_quietly(connection: Any) -> None:
        try:
            connection.close()
        except Exception:  # already broken: nothing more to release
            pass
