"""Which of some resources, in a form given rather than as stored, a search's
criteria match.

A partner is shown a filtered form of what is stored, and its search must answer
for that form: found by what it is shown, never by what was withheld, and a match
for a redacted part (`:missing=true` where the part went) too. The criteria are run
as the store runs them, the same SQL text over the same tables, in an in-memory
SQLite database of this thread's own that holds only the given forms, for the one
transaction it takes, so the answer cannot drift from the store's own.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from cpa_fhir.store._indexing import index_resource
from cpa_fhir.store._query import SearchQuery
from cpa_fhir.store._repository import Stored, _index_tables, search_statements
from cpa_fhir.store._schema import INDEX_TABLES, resource_current
from cpa_fhir.store._search_parameters import SearchParameters

_DIALECT = sqlite.dialect()
_TABLES = (resource_current, *INDEX_TABLES)
_local = threading.local()


def matching(
    query: SearchQuery,
    given: Sequence[tuple[Stored, dict[str, Any]]],
    parameters: SearchParameters,
    *,
    now_micros: int,
) -> set[tuple[str, str]]:
    """The (type, id) of those of `given` (a stored version, and the form of it to
    judge) that the query's unchained criteria match."""
    if not given:
        return set()
    connection = _scratch()
    statements = search_statements(_DIALECT)
    stamp = resource_current.c.last_updated.type.bind_processor(_DIALECT)
    current = [
        (
            s.resource_type,
            s.id,
            s.version_id,
            stamp(s.last_updated) if stamp is not None else s.last_updated,
            False,
            b"",
        )
        for s, _ in given
    ]
    indexed = [
        (s.resource_type, s.id, index_resource(form, parameters.indexed(s.resource_type)))
        for s, form in given
    ]
    criteria = tuple(c for c in query.criteria if not c.chain)
    judged = replace(query, criteria=criteria, count=len(given), offset=0, sort=())
    connection.execute("BEGIN")
    try:
        for table, rows in [(resource_current, current), *_index_tables(indexed)]:
            if rows:
                placeholders = ", ".join("?" for _ in table.columns)
                connection.executemany(f"INSERT INTO {table.name} VALUES ({placeholders})", rows)
        where = statements.where(judged, now_micros=now_micros)
        sql, values = statements.page(judged, where, 0)
        return {(row[0], row[1]) for row in connection.execute(sql, values)}
    finally:
        connection.execute("ROLLBACK")


def _scratch() -> sqlite3.Connection:
    """This thread's in-memory database, its tables made on first use (and always
    empty between calls: each call rolls back what it put in)."""
    connection: sqlite3.Connection | None = getattr(_local, "connection", None)
    if connection is None:
        connection = sqlite3.connect(":memory:", isolation_level=None)
        for table in _TABLES:
            connection.execute(str(sa.schema.CreateTable(table).compile(dialect=_DIALECT)))
        _local.connection = connection
    return connection
