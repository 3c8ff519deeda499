"""Store fixtures: each test's repository on a fresh SQLite file and a fresh PostgreSQL schema.

PostgreSQL is at $CPA_TEST_POSTGRES_URL (default: the local server's `test` database).
Each repository gets its own schema, named after this session's random prefix, dropped
afterwards, so parallel runs never meet. When the server cannot be reached the
PostgreSQL cases skip with the reason, except with CPA_REQUIRE_POSTGRES=1 (CI): then
they fail.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from cpa_fhir.store import SqlRepository
from tests.common import EXAMPLES

POSTGRES_URL = os.environ.get(
    "CPA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]


def example_resources() -> list[dict[str, Any]]:
    """Every resource of the four example records, plus the standalone examples
    (a disclosure Bundle repeats part of a record, so it is not one of them)."""
    out: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES.glob("*.json")):
        if path.name.startswith("Bundle-disclosure-"):
            continue
        data = orjson.loads(path.read_bytes())
        if data["resourceType"] == "Bundle":
            out += [e["resource"] for e in data["entry"]]
        else:
            out.append(data)
    return out


class TickingClock:
    """A clock that moves one second per reading, so each write has its own instant."""

    def __init__(self, start: datetime = datetime(2026, 1, 1, tzinfo=UTC)):
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


class Postgres:
    """Schemas for this session on the test server."""

    def __init__(self) -> None:
        self.prefix = f"t_{uuid.uuid4().hex[:10]}"
        self.counter = itertools.count()
        self.engine = sa.create_engine(
            POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://")
        )
        self.created: list[str] = []

    def new_schema(self) -> str:
        name = f"{self.prefix}_{next(self.counter)}"
        with self.engine.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {name}")
        self.created.append(name)
        return name

    def drop(self, name: str) -> None:
        with self.engine.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        with server.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as exc:
        reason = f"PostgreSQL unreachable at {POSTGRES_URL}: {exc.orig}"
        if os.environ.get("CPA_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason} (CPA_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    yield server
    for name in server.created:
        server.drop(name)
    server.engine.dispose()


StoreFactory = Callable[..., SqlRepository]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_location(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[str, str | None]:
    """(url, schema) of an empty store on the backend under test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}", None
    server: Postgres = request.getfixturevalue("postgres")
    return POSTGRES_URL, server.new_schema()


@pytest.fixture
def make_store(store_location: tuple[str, str | None]) -> Iterator[StoreFactory]:
    """Open repositories on the test's store (several may share it, as processes would)."""
    url, schema = store_location
    opened: list[SqlRepository] = []

    def open_store(**kwargs: Any) -> SqlRepository:
        repository = SqlRepository(url, schema=schema, **kwargs)
        opened.append(repository)
        return repository

    yield open_store
    for repository in opened:
        repository.close()


@pytest.fixture
def store(make_store: StoreFactory) -> SqlRepository:
    return make_store(clock=TickingClock())
