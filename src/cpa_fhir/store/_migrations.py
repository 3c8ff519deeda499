"""Numbered, idempotent schema migrations, applied by the store itself.

`migrate(engine)` applies, in order, every migration not yet recorded in
`schema_version`, all in one transaction: either the store reaches the newest
version or it stays where it was. Two processes starting together are serialised
(PostgreSQL: a transaction-scoped advisory lock; SQLite: `BEGIN IMMEDIATE`), so the
second finds the work done. Running it again changes nothing.

Migration 1 creates the tables of `_schema` as first released. A later change to
the schema is a new migration, written so that it is a no-op where the change is
already present (`IF NOT EXISTS`), and is mirrored in `_schema`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cpa_fhir.store._indexing import (
    INDEXED_STRING_CHARS,
    INDEXED_TOKEN_CHARS,
    indexed_token,
    normalise,
)
from cpa_fhir.store._schema import (
    index_pending,
    metadata,
    schema_version,
    search_string,
    search_token,
    store_change,
    store_setting,
)

_LOCK_KEY = "cpa_fhir.store.migrate"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_tables(connection: Connection) -> None:
    metadata.create_all(connection, checkfirst=True)


def _index_history_by_time(connection: Connection) -> None:
    # System-wide history (https://hl7.org/fhir/R4/http.html#history) is ordered by time.
    connection.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_history_updated ON resource_history (last_updated)"
    )


def _create_settings(connection: Connection) -> None:
    store_setting.create(connection, checkfirst=True)


def _create_change_counter(connection: Connection) -> None:
    store_change.create(connection, checkfirst=True)
    connection.execute(
        sa.insert(store_change).from_select(
            ["id", "generation"],
            sa.select(sa.literal(1), sa.literal(0)).where(
                ~sa.exists().where(store_change.c.id == 1)
            ),
        )
    )


def _renormalise_strings(connection: Connection) -> None:
    # `normalise` became a compatibility caseless match: values it now folds
    # differently are folded again, so that searches for them still find them.
    stored = connection.execute(
        sa.select(search_string.c.value, search_string.c.normalised).distinct()
    )
    changed = [
        {"v": value, "n": wanted}
        for value, normalised in stored
        if (wanted := normalise(value)) != normalised
    ]
    if changed:
        connection.execute(
            search_string.update()
            .where(search_string.c.value == sa.bindparam("v"))
            .values(normalised=sa.bindparam("n")),
            changed,
        )


def _create_index_pending(connection: Connection) -> None:
    index_pending.create(connection, checkfirst=True)


def _bound_indexed_text(connection: Connection) -> None:
    # The index holds the beginning of a long string (`INDEXED_STRING_CHARS`) and a
    # long token as `indexed_token` writes it, which searches now compare with.
    connection.exec_driver_sql(
        f"UPDATE search_string SET normalised = substr(normalised, 1, {INDEXED_STRING_CHARS})"
        f" WHERE length(normalised) > {INDEXED_STRING_CHARS}"
    )
    for column in (search_token.c.code, search_token.c.system):
        long_values = connection.scalars(
            sa.select(column).where(sa.func.length(column) > INDEXED_TOKEN_CHARS).distinct()
        ).all()
        if long_values:
            connection.execute(
                search_token.update()
                .where(column == sa.bindparam("whole"))
                .values({column.name: sa.bindparam("indexed")}),
                [{"whole": v, "indexed": indexed_token(v)} for v in long_values],
            )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "resource, history and search index tables", _create_tables),
    Migration(2, "index history by time", _index_history_by_time),
    Migration(3, "settings kept with the data", _create_settings),
    Migration(4, "a counter of changing writes", _create_change_counter),
    Migration(
        5, "string index values folded as a compatibility caseless match", _renormalise_strings
    ),
    Migration(6, "appended records awaiting their search index", _create_index_pending),
    Migration(7, "long strings and tokens indexed by their beginning", _bound_indexed_text),
)
LATEST_VERSION = MIGRATIONS[-1].version


def migrate(engine: Engine, *, target: int | None = None) -> list[int]:
    """Bring the store's schema up to `target` (default: the newest); the versions applied."""
    target = LATEST_VERSION if target is None else target
    applied_now: list[int] = []
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # A migration over a large store may run longer than a statement may.
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:key || current_schema()))"),
                {"key": _LOCK_KEY},
            )
        schema_version.create(connection, checkfirst=True)
        done = set(connection.scalars(sa.select(schema_version.c.version)))
        for migration in MIGRATIONS:
            if migration.version in done or migration.version > target:
                continue
            migration.apply(connection)
            connection.execute(
                schema_version.insert().values(
                    version=migration.version,
                    description=migration.description,
                    applied_at=datetime.now(UTC),
                )
            )
            applied_now.append(migration.version)
    return applied_now


def current_version(engine: Engine) -> int:
    """The newest migration applied, 0 for an empty database."""
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("schema_version"):
            return 0
        return int(connection.scalar(sa.select(sa.func.max(schema_version.c.version))) or 0)
