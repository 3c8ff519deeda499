"""The resource repository: FHIR's RESTful interactions over SQL.

Implements the storage side of https://hl7.org/fhir/R4/http.html: create (and
conditional create, https://hl7.org/fhir/R4/http.html#ccreate), read, vread,
update (with version-aware If-Match, https://hl7.org/fhir/R4/http.html#concurrency,
and update-as-create), delete, instance/type/system history, search
(https://hl7.org/fhir/R4/search.html), all-or-nothing transactions
(https://hl7.org/fhir/R4/http.html#transaction) and a bulk load.

Reads and searches return the stored JSON bytes as they were written; nothing is
parsed through models on the way out.

Concurrency: every write runs in a database transaction that first locks the
resource's current row (PostgreSQL `SELECT ... FOR UPDATE`; SQLite takes the
database write lock at `BEGIN IMMEDIATE`). So concurrent updates of one resource
are serialised: without If-Match each lands as its own successive version (no
update is lost); with a stale If-Match the loser gets `VersionConflict`. Two
concurrent creates of one new id: one wins, the other gets `VersionConflict`.
Conditional creates of one type are serialised (an advisory lock on PostgreSQL)
so that two cannot both find no match and both create.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, partial
from typing import Any, Protocol
from urllib.parse import parse_qsl

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from cpa_fhir.errors import (
    InputError,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
    SearchError,
    VersionConflict,
)
from cpa_fhir.fhir import jsonio
from cpa_fhir.fhir.models import R4_RESOURCE_TYPES
from cpa_fhir.store._appender import ProcessAppender
from cpa_fhir.store._dates import to_micros
from cpa_fhir.store._engine import (
    READ_ONLY,
    ReadConnections,
    create_store_engine,
)
from cpa_fhir.store._generation import (
    GENERATION_SQL,
    AsyncReader,
    GenerationWatch,
    SharedQueries,
)
from cpa_fhir.store._ids import time_ordered_id
from cpa_fhir.store._indexing import IndexRows, RecordIndexer, index_resource
from cpa_fhir.store._migrations import migrate as migrate_schema
from cpa_fhir.store._query import (
    MAX_INCLUDES,
    MAX_OFFSET,
    Include,
    SearchQuery,
    local_references,
    parse_search,
)
from cpa_fhir.store._schema import (
    INDEX_TABLES,
    index_pending,
    resource_current,
    resource_history,
    search_date,
    search_number,
    search_reference,
    search_string,
    search_token,
    store_change,
    store_setting,
)
from cpa_fhir.store._search_parameters import SearchParameters, default_search_parameters
from cpa_fhir.store._search_sql import COLUMNS, Fragment, SearchStatements

_SEARCH_STATEMENTS: dict[str, SearchStatements] = {}


def search_statements(dialect: Dialect) -> SearchStatements:
    """The search statements for a database: its driver's placeholder, and
    `last_updated` bound as the column stores it."""
    known = _SEARCH_STATEMENTS.get(dialect.name)
    if known is None:
        processor = resource_current.c.last_updated.type.bind_processor(dialect)
        known = _SEARCH_STATEMENTS[dialect.name] = SearchStatements(
            placeholder="%s" if dialect.name == "postgresql" else "?",
            moment=processor if processor is not None else (lambda moment: moment),
        )
    return known


Clock = Callable[[], datetime]
DEFAULT_HISTORY_COUNT = 100
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored version of a resource.

    `content` is the resource's JSON exactly as stored, meta.versionId and
    meta.lastUpdated included; empty for a deletion. `created` is true on the value a
    create (or an update that created) returns, when this call made the resource.
    """

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    deleted: bool
    content: bytes
    created: bool = field(default=False, compare=False)

    def resource(self) -> dict[str, Any]:
        """The content parsed as JSON (for callers that need a dict; servers need not)."""
        parsed: dict[str, Any] = jsonio.loads(self.content)
        return parsed


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One page of matches in order, the resources `_include`d/`_revinclude`d, the total.

    `total` is None when `_total=none` asked not to count.
    """

    matches: list[Stored]
    included: list[Stored]
    total: int | None
    offset: int
    count: int
    # Including stopped at `MAX_INCLUDES`: `included` is not all.
    includes_cut: bool = False


class Repository(Protocol):
    """The store's interactions; `SqlRepository` implements it."""

    def create(
        self, resource: dict[str, Any], *, if_none_exist: str | None = None, base: str | None = None
    ) -> Stored: ...

    def read(self, resource_type: str, id: str) -> Stored: ...

    def vread(self, resource_type: str, id: str, version_id: int) -> Stored: ...

    def update(self, resource: dict[str, Any], *, if_match: int | None = None) -> Stored: ...

    def delete(self, resource_type: str, id: str, *, if_match: int | None = None) -> Stored: ...

    def conditional_update(
        self,
        resource: dict[str, Any],
        criteria: str,
        *,
        if_match: int | None = None,
        base: str | None = None,
    ) -> Stored: ...

    def conditional_delete(
        self,
        resource_type: str,
        criteria: str,
        *,
        if_match: int | None = None,
        base: str | None = None,
    ) -> Stored | None: ...

    def conditional_match(
        self, resource_type: str, criteria: str, what: str, base: str | None = None
    ) -> Stored | None: ...

    def history(
        self,
        resource_type: str | None = None,
        id: str | None = None,
        *,
        since: datetime | None = None,
        count: int = DEFAULT_HISTORY_COUNT,
        offset: int = 0,
    ) -> list[Stored]: ...

    def history_total(
        self,
        resource_type: str | None = None,
        id: str | None = None,
        *,
        since: datetime | None = None,
    ) -> int: ...

    def search(
        self, query: SearchQuery, *, keep_included: KeepIncluded | None = None
    ) -> SearchResult: ...

    def included(
        self, query: SearchQuery, matches: list[Stored], keep: KeepIncluded
    ) -> tuple[list[Stored], bool]: ...

    def transaction(self) -> AbstractContextManager[Repository]: ...

    def load(self, resources: Iterable[dict[str, Any]]) -> int: ...


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _instant(moment: datetime) -> str:
    """A FHIR instant in UTC with milliseconds: https://hl7.org/fhir/R4/datatypes.html#instant"""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 64 and set(value) <= _ID_CHARS


def _check_resource(resource: Any, *, needs_id: bool) -> tuple[str, str | None]:
    if not isinstance(resource, dict):
        raise InputError("a resource must be a JSON object")
    resource_type = resource.get("resourceType")
    if resource_type not in R4_RESOURCE_TYPES:
        raise InputError(f"{resource_type!r} is not an R4 resource type", expression="resourceType")
    resource_id = resource.get("id")
    if resource_id is None and not needs_id:
        return resource_type, None
    if not _valid_id(resource_id):
        raise InputError(f"{resource_id!r} is not a valid resource id", expression="id")
    return resource_type, resource_id


def _version_conflict(
    resource_type: str, resource_id: str, found: int | None, if_match: int
) -> VersionConflict:
    """If-Match named a version the resource is not at (found: None when it is not
    there, never made or deleted)."""
    where = f"at version {found}" if found is not None else "not there"
    return VersionConflict(
        f"{resource_type}/{resource_id} is {where}, not at version {if_match}",
        current_version=found,
    )


def _with_meta(resource: dict[str, Any], version: int, last_updated: str) -> dict[str, Any]:
    """The resource with meta.versionId and meta.lastUpdated set, other meta kept."""
    meta = resource.get("meta")
    kept: dict[str, Any] = meta if isinstance(meta, dict) else {}
    return {**resource, "meta": {**kept, "versionId": str(version), "lastUpdated": last_updated}}


# PostgreSQL's SQLSTATE for a statement cancelled, as by statement_timeout.
_QUERY_CANCELED = "57014"


def _stopped_for_time(error: Any) -> bool:
    """Whether PostgreSQL stopped the statement for running too long."""
    return getattr(error, "sqlstate", None) == _QUERY_CANCELED


# PostgreSQL's SQLSTATEs for a transaction it rolled back to let another go on: a
# deadlock (two transactions writing the same resources in different orders), and a
# serialization failure.
_ROLLED_BACK_FOR_ANOTHER = frozenset({"40P01", "40001"})


def _lost_to_another(error: Any) -> bool:
    """Whether PostgreSQL rolled the transaction back for a concurrent one's sake."""
    return getattr(error, "sqlstate", None) in _ROLLED_BACK_FOR_ANOTHER


def _too_costly() -> SearchError:
    return SearchError(
        "the search ran longer than this server allows;"
        " narrow it with fewer or more selective criteria",
        code="too-costly",
    )


def _content(resource: dict[str, Any]) -> bytes:
    """The resource's JSON to store; InputError if any of its text holds a NUL.

    PostgreSQL's text (the search index) cannot hold one, nor can FHIR's XML form:
    refused on every database, so that a store behaves the same on each.
    """
    content = jsonio.dumps(resource)
    # JSON escapes a NUL as \u0000: only then need the resource be walked.
    if b"\\u0000" in content and _has_nul(resource):
        raise InputError("the resource's text contains a NUL character (U+0000)", code="invalid")
    return content


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _row_to_stored(row: Any, *, created: bool = False) -> Stored:
    return Stored(
        resource_type=row.resource_type,
        id=row.id,
        version_id=row.version_id,
        last_updated=row.last_updated,
        deleted=row.deleted,
        content=bytes(row.content) if row.content is not None else b"",
        created=created,
    )


_SELECT_CURRENT = f"SELECT {COLUMNS} FROM resource_current"
_READ_BATCH = 100


def current_or_error(resource_type: str, id: str, found: Stored | None) -> Stored:
    """What a read of the current version answers, given what was found (None for
    nothing): the version, or ResourceNotFound, or ResourceGone for a deletion."""
    if found is None:
        raise ResourceNotFound(f"{resource_type}/{id} is not known")
    if found.deleted:
        raise ResourceGone(
            f"{resource_type}/{id} was deleted (version {found.version_id})",
            version_id=found.version_id,
        )
    return found


def _driver_row_to_stored(row: tuple[Any, ...]) -> Stored:
    """A row of `_SELECT_CURRENT` as the driver returns it (SQLite: text times, integer
    booleans; PostgreSQL: aware times)."""
    resource_type, id, version_id, last_updated, deleted, content = row
    if isinstance(last_updated, str):
        last_updated = datetime.fromisoformat(last_updated)
    last_updated = (
        last_updated.replace(tzinfo=UTC)
        if last_updated.tzinfo is None
        else last_updated.astimezone(UTC)
    )
    return Stored(
        resource_type=resource_type,
        id=id,
        version_id=int(version_id),
        last_updated=last_updated,
        deleted=bool(deleted),
        content=bytes(content) if content is not None else b"",
    )


_COLUMNS = (
    resource_current.c.resource_type,
    resource_current.c.id,
    resource_current.c.version_id,
    resource_current.c.last_updated,
    resource_current.c.deleted,
    resource_current.c.content,
)


# Rows inserted as one pipeline of statements on PostgreSQL; more go by COPY.
_POSTGRES = postgresql.dialect()  # type: ignore[no-untyped-call]
_PIPELINE_ROWS = 1_000


def _array_type(column: sa.Column[Any]) -> str:
    """PostgreSQL's array type of a column's values: collation aside (the column has
    it), and length too, since an explicit cast to varchar(n) cuts a longer value
    short without a word, where storing it in the column refuses it."""
    compiled = column.type.compile(dialect=_POSTGRES).split(" COLLATE ")[0]
    return re.sub(r"VARCHAR\(\d+\)", "VARCHAR", compiled) + "[]"


@cache
def _insert_arrays(table: sa.Table) -> str:
    """INSERT of any number of rows, given one array per column (PostgreSQL), sent in
    binary: the text form of an array quotes each element, which cost the client more
    than the rest of the write. A column's values must be of one Python type."""
    columns = ", ".join(c.name for c in table.columns)
    arrays = ", ".join(f"%b::{_array_type(c)}" for c in table.columns)
    return f"INSERT INTO {table.name} ({columns}) SELECT * FROM unnest({arrays})"


# An appended record's index rows, kept for a later transaction: type, id, rows.
IndexedRecord = tuple[str, str, IndexRows]
# Keys per statement when clearing pending records: well within any bound-parameter limit.
_PENDING_CHUNK = 400


def _index_tables(
    indexed: list[tuple[str, str, IndexRows]],
) -> list[tuple[sa.Table, list[tuple[Any, ...]]]]:
    """The index tables' rows of resources, each with its type and id first."""
    tokens: list[tuple[Any, ...]] = []
    strings: list[tuple[Any, ...]] = []
    references: list[tuple[Any, ...]] = []
    dates: list[tuple[Any, ...]] = []
    numbers: list[tuple[Any, ...]] = []
    for resource_type, resource_id, rows in indexed:
        key = (resource_type, resource_id)
        tokens += [(*key, *row) for row in rows.tokens]
        strings += [(*key, *row) for row in rows.strings]
        references += [(*key, *row) for row in rows.references]
        dates += [(*key, *row) for row in rows.dates]
        numbers += [(*key, *row) for row in rows.numbers]
    return [
        (search_token, tokens),
        (search_string, strings),
        (search_reference, references),
        (search_date, dates),
        (search_number, numbers),
    ]


def _string_bounds(table: sa.Table) -> list[tuple[int, str, int]]:
    return [
        (i, column.name, column.type.length)
        for i, column in enumerate(table.columns)
        if isinstance(column.type, sa.String) and column.type.length
    ]


_BOUNDS = {table: _string_bounds(table) for table in INDEX_TABLES}


def _check_fits(table: sa.Table, rows: list[tuple[Any, ...]]) -> None:
    """InputError for an index row with a value longer than its column holds."""
    bounds = _BOUNDS[table]
    for row in rows:
        for i, name, length in bounds:
            value = row[i]
            if isinstance(value, str) and len(value) > length:
                raise InputError(
                    f"{row[0]}/{row[1]}: a {name} of {len(value)} characters is longer than "
                    f"the {length} the search index holds"
                )


Rows = Callable[[Fragment], list[tuple[Any, ...]]]


def run_search(
    query: SearchQuery,
    statements: SearchStatements,
    rows: Rows,
    *,
    now_micros: int,
    keep_included: KeepIncluded | None = None,
) -> SearchResult:
    """A search's page of matches, what they include (see `include_rounds`), and
    (unless not asked for) the total, each statement run through `rows`."""
    where = statements.where(query, now_micros=now_micros)
    counted = query.total != "none" or query.summary_count
    if query.summary_count or query.count == 0:
        counts = _count(statements, where, rows) if counted else None
        return SearchResult([], [], counts, query.offset, query.count)
    page = statements.page(query, where, min(query.offset, MAX_OFFSET))
    matches = [_driver_row_to_stored(r) for r in rows(page)]
    total: int | None = None
    if counted:
        if len(matches) < query.count and (matches or query.offset == 0):
            # A page that is not full is the last: the matches before it and on it
            # are all there are. Most searches of one patient's record fit one
            # page, and so need no second statement.
            total = query.offset + len(matches)
        else:
            total = _count(statements, where, rows)
    included, cut = include_rounds(
        query,
        matches,
        lambda forward, reverse, sources: include_round(
            statements, forward, reverse, sources, rows
        ),
        keep_included,
    )
    return SearchResult(matches, included, total, query.offset, query.count, cut)


def _count(statements: SearchStatements, where: Fragment, rows: Rows) -> int:
    return int(rows(statements.count(where))[0][0] or 0)


# Of what an include step found: those to keep, given the resources it started from
# and the `_include`s and `_revinclude`s it followed.
KeepIncluded = Callable[[list[Stored], list[Stored], list[Include], list[Include]], list[Stored]]
IncludeRound = Callable[[list[Include], list[Include], list[Stored]], Iterable[list[Stored]]]


def include_rounds(
    query: SearchQuery,
    matches: list[Stored],
    one_round: IncludeRound,
    keep: KeepIncluded | None = None,
) -> tuple[list[Stored], bool]:
    """What the query's `_include`s and `_revinclude`s add to the matches, each once,
    and whether it stopped at `MAX_INCLUDES`. Every include is followed from the
    matches; an iterated one (`:iterate`) from what the step before added too, until
    a step adds nothing new. `keep` chooses, of each page of what a step finds, which
    go on (a client's scopes; what a partner may see, and is linked to in what it is
    shown): only those are followed further, and only they count towards the bound,
    so that it says nothing of what was left out."""
    seen = {(m.resource_type, m.id) for m in matches}
    out: list[Stored] = []
    frontier = matches
    first = True
    while frontier:
        forward = [i for i in query.include if first or i.iterate]
        reverse = [i for i in query.revinclude if first or i.iterate]
        if not forward and not reverse:
            break
        added: list[Stored] = []
        for page in one_round(forward, reverse, frontier):
            found = {
                (s.resource_type, s.id): s for s in page if (s.resource_type, s.id) not in seen
            }
            candidates = list(found.values())
            kept = (
                keep(candidates, frontier, forward, reverse) if keep and candidates else candidates
            )
            # Only what is kept counts as reached: what `keep` left out (reached by a
            # link the client is not shown) may still come by one it is shown, later.
            for stored in kept:
                key = (stored.resource_type, stored.id)
                if key in seen:
                    continue
                if len(out) + len(added) >= MAX_INCLUDES:
                    return out + added, True
                seen.add(key)
                added.append(stored)
        out += added
        frontier = added
        first = False
    return out, False


def include_round(
    statements: SearchStatements,
    forward: list[Include],
    reverse: list[Include],
    sources: list[Stored],
    rows: Rows,
) -> Iterator[list[Stored]]:
    """One step of including, page by page: what `sources` refer to by `forward`, and
    what refers to them by `reverse` (not deleted; in statement order, repeats
    included). Paged so that a step that would find a great many is read only as far
    as it is used."""
    ids_by_type: dict[str, list[str]] = {}
    for stored in sources:
        ids_by_type.setdefault(stored.resource_type, []).append(stored.id)
    pages: list[Callable[..., Fragment]] = [
        partial(statements.include, include, ids_by_type[include.source_type], limit=_PAGE)
        for include in forward
        if include.source_type in ids_by_type
    ]
    for include in reverse:
        # Unnamed, an iterated one's target is any type among the sources.
        targets = [include.target_type] if include.target_type else list(ids_by_type)
        pages += [
            partial(statements.revinclude, include, target, ids_by_type[target], limit=_PAGE)
            for target in targets
            if target in ids_by_type
        ]
    for statement in pages:
        offset = 0
        while True:
            page = [_driver_row_to_stored(row) for row in rows(statement(offset=offset))]
            if page:
                yield page
            if len(page) < _PAGE:
                break
            offset += _PAGE


# Rows an include statement reads at a time.
_PAGE = 1000


class _Operations:
    """The interactions on one open connection, inside its transaction."""

    def __init__(
        self,
        connection: Connection,
        parameters: SearchParameters,
        clock: Clock,
        records: RecordIndexer | None = None,
    ):
        self.connection = connection
        self.parameters = parameters
        self.clock = clock
        # Indexes the server's own records (`append_new`), made from templates.
        self.records = records if records is not None else RecordIndexer()
        self.postgres = connection.dialect.name == "postgresql"

    # --- reads ---------------------------------------------------------------------

    def read(self, resource_type: str, id: str) -> Stored:
        row = self.connection.execute(
            sa.select(*_COLUMNS).where(
                resource_current.c.resource_type == resource_type, resource_current.c.id == id
            )
        ).first()
        return current_or_error(resource_type, id, None if row is None else _row_to_stored(row))

    def vread(self, resource_type: str, id: str, version_id: int) -> Stored:
        h = resource_history.c
        row = self.connection.execute(
            sa.select(
                h.resource_type, h.id, h.version_id, h.last_updated, h.deleted, h.content
            ).where(h.resource_type == resource_type, h.id == id, h.version_id == version_id)
        ).first()
        if row is None:
            raise ResourceNotFound(f"{resource_type}/{id} has no version {version_id}")
        if row.deleted:
            raise ResourceGone(
                f"{resource_type}/{id} version {version_id} is a deletion", version_id=version_id
            )
        return _row_to_stored(row)

    def _history_where(
        self, resource_type: str | None, id: str | None, since: datetime | None
    ) -> list[sa.ColumnElement[bool]]:
        h = resource_history.c
        conditions: list[sa.ColumnElement[bool]] = []
        if resource_type is not None:
            conditions.append(h.resource_type == resource_type)
        if id is not None:
            if resource_type is None:
                raise ValueError("instance history needs the resource type")
            conditions.append(h.id == id)
        if since is not None:
            try:
                conditions.append(h.last_updated >= since.astimezone(UTC))
            except OverflowError:
                # Before year 1 or after 9999 in UTC (`0001-01-01T00:00+14:00`): every
                # version is since the one, none since the other.
                if since.year != 1:
                    conditions.append(sa.false())
        return conditions

    def history(
        self,
        resource_type: str | None,
        id: str | None,
        since: datetime | None,
        count: int,
        offset: int = 0,
    ) -> list[Stored]:
        h = resource_history.c
        statement = (
            sa.select(h.resource_type, h.id, h.version_id, h.last_updated, h.deleted, h.content)
            .where(*self._history_where(resource_type, id, since))
            # Newest first; ties in time broken by identity, so that pages never overlap.
            .order_by(h.last_updated.desc(), h.resource_type, h.id, h.version_id.desc())
            # Past every row, a page is empty however far: bounded, the database's
            # integer holds them.
            .limit(min(count, MAX_OFFSET))
            .offset(min(offset, MAX_OFFSET))
        )
        rows = [_row_to_stored(r) for r in self.connection.execute(statement)]
        if id is not None and not rows and since is None and offset == 0:
            raise ResourceNotFound(f"{resource_type}/{id} is not known")
        return rows

    def history_total(
        self, resource_type: str | None, id: str | None, since: datetime | None
    ) -> int:
        statement = (
            sa.select(sa.func.count())
            .select_from(resource_history)
            .where(*self._history_where(resource_type, id, since))
        )
        return int(self.connection.scalar(statement) or 0)

    def search(
        self, query: SearchQuery, *, keep_included: KeepIncluded | None = None
    ) -> SearchResult:
        return run_search(
            query,
            search_statements(self.connection.dialect),
            self._statement_rows,
            now_micros=to_micros(self.clock()),
            keep_included=keep_included,
        )

    def included(
        self, query: SearchQuery, matches: list[Stored], keep: KeepIncluded
    ) -> tuple[list[Stored], bool]:
        statements = search_statements(self.connection.dialect)
        return include_rounds(
            query,
            matches,
            lambda forward, reverse, sources: include_round(
                statements, forward, reverse, sources, self._statement_rows
            ),
            keep,
        )

    def _statement_rows(self, statement: Fragment) -> list[tuple[Any, ...]]:
        return list(self.connection.exec_driver_sql(*statement).tuples())

    # --- writes --------------------------------------------------------------------

    def create(
        self, resource: dict[str, Any], if_none_exist: str | None, base: str | None = None
    ) -> Stored:
        resource_type, _ = _check_resource(resource, needs_id=False)
        if if_none_exist is not None:
            existing = self.conditional_match(resource_type, if_none_exist, "If-None-Exist", base)
            if existing is not None:
                return existing
        # A create always makes a new resource: the server assigns the id
        # (https://hl7.org/fhir/R4/http.html#create).
        resource = {**resource, "id": time_ordered_id()}
        return self._write(resource_type, resource["id"], resource, if_match=None, must_be_new=True)

    def conditional_match(
        self, resource_type: str, criteria: str, what: str, base: str | None = None
    ) -> Stored | None:
        """The one current resource the criteria match, or None; PreconditionFailed if
        they match several (https://hl7.org/fhir/R4/http.html#cond-update). Writers
        that search and then write are serialised, so two cannot both find none.
        `base`: this server's base URL, a reference under which the criteria name as
        the relative one it resolves to, as a search does (`local_references`)."""
        query = parse_search(
            resource_type, parse_qsl(criteria.lstrip("?"), keep_blank_values=True), self.parameters
        )
        if base is not None:
            query = local_references(query, base)
        if not query.criteria:
            # A malformed request, not a precondition found to fail: nothing was matched.
            raise SearchError(f"{what} needs at least one search criterion", code="invalid")
        if self.postgres:
            self.connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                {"key": f"cpa_fhir.store.create:{resource_type}"},
            )
        found = self.search(
            SearchQuery(resource_type=resource_type, criteria=query.criteria, count=2, total="none")
        ).matches
        if len(found) > 1:
            raise PreconditionFailed(f"{what} {criteria!r} matches more than one {resource_type}")
        return found[0] if found else None

    def conditional_update(
        self,
        resource: dict[str, Any],
        criteria: str,
        if_match: int | None,
        base: str | None = None,
    ) -> Stored:
        resource_type, body_id = _check_resource(resource, needs_id=False)
        found = self.conditional_match(resource_type, criteria, "a conditional update", base)
        if found is not None:
            if body_id is not None and body_id != found.id:
                raise InputError(
                    f"the body's id '{body_id}' is not that of the {resource_type} the "
                    f"criteria match ({found.id})",
                    code="invalid",
                )
            return self._write(
                resource_type, found.id, {**resource, "id": found.id}, if_match=if_match
            )
        if if_match is not None:
            raise VersionConflict(f"no {resource_type} matches, so none is at version {if_match}")
        if body_id is None:  # none matches: a create, with an id the server assigns
            resource = {**resource, "id": time_ordered_id()}
            return self._write(
                resource_type, resource["id"], resource, if_match=None, must_be_new=True
            )
        current = self._lock_current(resource_type, body_id)
        if current is not None and not current.deleted:
            # It exists but does not match: updating it would not be what was asked.
            raise VersionConflict(
                f"{resource_type}/{body_id} exists but does not match the criteria",
                current_version=current.version_id,
            )
        return self._write(resource_type, body_id, resource, if_match=None)

    def conditional_delete(
        self,
        resource_type: str,
        criteria: str,
        *,
        if_match: int | None = None,
        base: str | None = None,
    ) -> Stored | None:
        found = self.conditional_match(resource_type, criteria, "a conditional delete", base)
        if found is None:
            return None
        return self.delete(resource_type, found.id, if_match=if_match)

    def update(self, resource: dict[str, Any], if_match: int | None) -> Stored:
        resource_type, resource_id = _check_resource(resource, needs_id=True)
        assert resource_id is not None
        return self._write(resource_type, resource_id, resource, if_match=if_match)

    def delete(self, resource_type: str, id: str, if_match: int | None = None) -> Stored:
        current = self._lock_current(resource_type, id)
        if current is None:
            raise ResourceNotFound(f"{resource_type}/{id} is not known")
        if if_match is not None and (current.deleted or current.version_id != if_match):
            found = None if current.deleted else current.version_id
            raise _version_conflict(resource_type, id, found, if_match)
        if current.deleted:
            return _row_to_stored(current)
        now = self._now()
        version = current.version_id + 1
        self._store_version(resource_type, id, version, now, None, exists=True)
        self._replace_index(resource_type, id, None, exists=True)
        return Stored(resource_type, id, version, now, True, b"")

    def _now(self) -> datetime:
        moment = self.clock().astimezone(UTC)
        # meta.lastUpdated carries milliseconds; the column holds the same instant.
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def _lock_current(self, resource_type: str, id: str) -> Any:
        statement = sa.select(*_COLUMNS).where(
            resource_current.c.resource_type == resource_type, resource_current.c.id == id
        )
        if self.postgres:
            statement = statement.with_for_update()
        return self.connection.execute(statement).first()

    def _write(
        self,
        resource_type: str,
        resource_id: str,
        resource: dict[str, Any],
        *,
        if_match: int | None,
        must_be_new: bool = False,
    ) -> Stored:
        current = None if must_be_new else self._lock_current(resource_type, resource_id)
        if if_match is not None:
            found = current.version_id if current is not None and not current.deleted else None
            if found != if_match:
                raise _version_conflict(resource_type, resource_id, found, if_match)
        if current is not None and not current.deleted:
            unchanged = _row_to_stored(current)
            # As HAPI FHIR and Medplum do: a write that changes nothing makes no version
            # (a feed sending what is stored again neither grows the history nor moves
            # the store on, which every cache keyed by the generation would pay for).
            # Compared as written, keys sorted: 1.50 is not 1.5, nor 1.0 1 (precision).
            same_meta = jsonio.canonical(_with_meta(resource, unchanged.version_id, ""))
            stored_meta = _with_meta(unchanged.resource(), unchanged.version_id, "")
            if same_meta == jsonio.canonical(stored_meta):
                _content(resource)  # refused alike, stored or not (a NUL)
                return unchanged
        version = current.version_id + 1 if current is not None else 1
        now = self._now()
        stored = _with_meta(resource, version, _instant(now))
        content = _content(stored)
        try:
            self._store_version(
                resource_type, resource_id, version, now, content, exists=current is not None
            )
        except IntegrityError as exc:
            raise VersionConflict(
                f"{resource_type}/{resource_id} was written concurrently", current_version=None
            ) from exc
        self._replace_index(resource_type, resource_id, stored, exists=current is not None)
        return Stored(
            resource_type,
            resource_id,
            version,
            now,
            False,
            content,
            created=current is None or current.deleted,
        )

    def _store_version(
        self,
        resource_type: str,
        resource_id: str,
        version: int,
        now: datetime,
        content: bytes | None,
        *,
        exists: bool,
    ) -> None:
        values = {
            "resource_type": resource_type,
            "id": resource_id,
            "version_id": version,
            "last_updated": now,
            "deleted": content is None,
            "content": content,
        }
        self.connection.execute(resource_history.insert().values(**values))
        if exists:
            self.connection.execute(
                resource_current.update()
                .where(
                    resource_current.c.resource_type == resource_type,
                    resource_current.c.id == resource_id,
                )
                .values(**values)
            )
        else:
            self.connection.execute(resource_current.insert().values(**values))

    def _replace_index(
        self, resource_type: str, resource_id: str, resource: dict[str, Any] | None, *, exists: bool
    ) -> None:
        if exists:
            self._forget_index(resource_type, resource_id)
        if resource is not None:
            rows = index_resource(resource, self.parameters.indexed(resource_type))
            self._insert_index([(resource_type, resource_id, rows)])

    def _forget_index(self, resource_type: str, resource_id: str) -> None:
        """Delete a resource's index rows, and any still to come for what was appended."""
        # The pending note first: a writer indexing the record meanwhile then either
        # finished before (its rows deleted next) or finds no note and writes none.
        for table in (index_pending, *INDEX_TABLES):
            self.connection.execute(
                table.delete().where(
                    table.c.resource_type == resource_type, table.c.resource_id == resource_id
                )
            )

    def _insert_index(self, indexed: list[tuple[str, str, IndexRows]]) -> None:
        batches = _index_tables(indexed)
        # Said the same on every database (SQLite would store a longer value as it is).
        for table, rows in batches:
            _check_fits(table, rows)
        self._insert_tables(batches)

    def _insert_tables(self, batches: list[tuple[sa.Table, list[tuple[Any, ...]]]]) -> None:
        """Insert rows into several tables (see `_insert_rows`). On PostgreSQL a few rows
        go as one pipeline of statements, a single round trip, where a COPY per table
        would wait on the server several times each; each table's rows in one
        statement, as arrays, for a row-by-row insert is parsed, planned and run once
        a row, which costs the server several times the row."""
        batches = [(table, rows) for table, rows in batches if rows]
        if self.postgres and sum(len(rows) for _, rows in batches) <= _PIPELINE_ROWS:
            driver_connection: Any = self.connection.connection.driver_connection
            with driver_connection.pipeline(), driver_connection.cursor() as cursor:
                for table, rows in batches:
                    cursor.execute(
                        _insert_arrays(table), [list(c) for c in zip(*rows, strict=True)]
                    )
            return
        for table, rows in batches:
            self._insert_rows(table, rows)

    def _insert_rows(self, table: sa.Table, rows: list[tuple[Any, ...]]) -> None:
        """Insert plain rows (in column order) straight through the driver, for speed.

        The values must be what the driver takes as they are (the index tables hold
        only text and numbers); PostgreSQL takes them by COPY, SQLite by executemany.
        """
        columns = ", ".join(c.name for c in table.columns)
        if self.postgres:
            driver_connection: Any = self.connection.connection.driver_connection
            with driver_connection.cursor() as cursor:
                with cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            return
        placeholders = ", ".join("?" for _ in table.columns)
        self.connection.exec_driver_sql(
            f"INSERT INTO {table.name} ({columns}) VALUES ({placeholders})", rows
        )

    def load(self, resources: Iterable[dict[str, Any]], batch_size: int) -> int:
        loaded = 0
        batch: dict[tuple[str, str], dict[str, Any]] = {}
        for resource in resources:
            resource_type, resource_id = _check_resource(resource, needs_id=False)
            if resource_id is None:
                resource_id = time_ordered_id()
                resource = {**resource, "id": resource_id}
            key = (resource_type, resource_id)
            if key in batch or len(batch) >= batch_size:
                loaded += self._load_batch(batch)
                batch = {}
            batch[key] = resource
        return loaded + self._load_batch(batch)

    def append_new(
        self,
        resources: Iterable[dict[str, Any]],
        index_later: list[IndexedRecord] | None = None,
    ) -> int:
        """Insert resources that are new by construction (the server's own records,
        with fresh ids), straight through the driver: no lookup of a current version.
        An id already taken fails the whole call (primary key). With `index_later`,
        their index rows are added to it, for `index_appended`, and noted as pending."""
        now = self._now()
        instant = _instant(now)
        stamp: Any = now
        if not self.postgres:
            processor = resource_current.c.last_updated.type.bind_processor(self.connection.dialect)
            stamp = processor(now) if processor is not None else now
        rows: list[tuple[Any, ...]] = []
        indexed: list[tuple[str, str, IndexRows]] = []
        for resource in resources:
            resource_type, resource_id = _check_resource(resource, needs_id=True)
            assert resource_id is not None
            stored = _with_meta(resource, 1, instant)
            rows.append((resource_type, resource_id, 1, stamp, False, _content(stored)))
            indexed.append(
                (
                    resource_type,
                    resource_id,
                    self.records.index(stored, self.parameters.indexed(resource_type)),
                )
            )
        if not rows:
            return 0
        if index_later is None:
            self._insert_tables(
                [(resource_history, rows), (resource_current, rows), *_index_tables(indexed)]
            )
        else:
            # Rows that cannot be stored fail the append now, as they would have with
            # the records, not the later transaction of every record's index rows.
            for table, index_rows in _index_tables(indexed):
                _check_fits(table, index_rows)
            pending = [(resource_type, resource_id) for resource_type, resource_id, _ in indexed]
            self._insert_tables(
                [(resource_history, rows), (resource_current, rows), (index_pending, pending)]
            )
            index_later.extend(indexed)
        return len(rows)

    def index_appended(self, indexed: list[IndexedRecord]) -> int:
        """Write the index rows of appended records still pending (those a later write
        has not replaced meanwhile); how many records were indexed."""
        still = self._clear_pending([(entry[0], entry[1]) for entry in indexed])
        kept = []
        for entry in indexed:  # each once, should it be listed twice
            key = (entry[0], entry[1])
            if key in still:
                still.discard(key)
                kept.append(entry)
        # Checked to fit when they were appended (`append_new`): not again.
        self._insert_tables(_index_tables(kept))
        return len(kept)

    def _clear_pending(self, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Delete the pending notes of these records; the keys of those there were.

        Straight through the driver, a statement per type and chunk of ids: the
        audit writer does this after every few requests, and a statement built and
        compiled afresh each time (its list of keys written into it) cost more than
        the rest of indexing them."""
        ids_by_type: dict[str, list[str]] = {}
        for resource_type, resource_id in keys:
            ids_by_type.setdefault(resource_type, []).append(resource_id)
        cleared: set[tuple[str, str]] = set()
        # In one order for every writer, so that two clearing the same notes in
        # several statements each cannot wait on each other's row locks.
        for resource_type, ids in sorted(ids_by_type.items()):
            ids.sort()
            for start in range(0, len(ids), _PENDING_CHUNK):
                chunk = ids[start : start + _PENDING_CHUNK]
                if self.postgres:
                    sql = (
                        "DELETE FROM index_pending WHERE resource_type = %s"
                        " AND resource_id = ANY(%s) RETURNING resource_id"
                    )
                    params: tuple[Any, ...] = (resource_type, chunk)
                else:
                    sql = (
                        "DELETE FROM index_pending WHERE resource_type = ? AND resource_id IN "
                        f"({', '.join('?' * len(chunk))}) RETURNING resource_id"
                    )
                    params = (resource_type, *chunk)
                removed = self.connection.exec_driver_sql(sql, params)
                cleared.update((resource_type, row[0]) for row in removed)
        return cleared

    def index_pending(self) -> int:
        """Index every appended record still pending, from its stored content (after a
        stop between an append and its index); how many were indexed."""
        return self.index_appended(self.pending_records())

    def pending_records(self) -> list[IndexedRecord]:
        """The appended records still pending, with their index rows made from what
        is stored."""
        c = resource_current.c
        found = self.connection.execute(
            sa.select(c.resource_type, c.id, c.content)
            .join(
                index_pending,
                sa.and_(
                    index_pending.c.resource_type == c.resource_type,
                    index_pending.c.resource_id == c.id,
                ),
            )
            .where(~c.deleted)
        ).all()
        indexed = [
            (
                row.resource_type,
                row.id,
                index_resource(
                    jsonio.loads(row.content), self.parameters.indexed(row.resource_type)
                ),
            )
            for row in found
        ]
        # Deleting or replacing a record clears its pending note, so every one found
        # here is current; another writer's are taken by whichever clears them first.
        return indexed

    def _load_batch(self, batch: dict[tuple[str, str], dict[str, Any]]) -> int:
        if not batch:
            return 0
        c = resource_current.c
        existing: dict[tuple[str, str], int] = {}
        by_type: dict[str, list[str]] = {}
        for resource_type, resource_id in batch:
            by_type.setdefault(resource_type, []).append(resource_id)
        for resource_type, ids in by_type.items():
            statement = sa.select(c.resource_type, c.id, c.version_id).where(
                c.resource_type == resource_type, c.id.in_(ids)
            )
            if self.postgres:
                statement = statement.with_for_update()
            for row in self.connection.execute(statement):
                existing[(row.resource_type, row.id)] = row.version_id
        now = self._now()
        instant = _instant(now)
        history_rows: list[dict[str, Any]] = []
        new_rows: list[dict[str, Any]] = []
        changed_rows: list[dict[str, Any]] = []
        indexed: list[tuple[str, str, IndexRows]] = []
        for (resource_type, resource_id), resource in batch.items():
            version = existing.get((resource_type, resource_id), 0) + 1
            stored = _with_meta(resource, version, instant)
            values = {
                "resource_type": resource_type,
                "id": resource_id,
                "version_id": version,
                "last_updated": now,
                "deleted": False,
                "content": _content(stored),
            }
            history_rows.append(values)
            (changed_rows if version > 1 else new_rows).append(values)
            indexed.append(
                (
                    resource_type,
                    resource_id,
                    index_resource(stored, self.parameters.indexed(resource_type)),
                )
            )
        self.connection.execute(resource_history.insert(), history_rows)
        if new_rows:
            self.connection.execute(resource_current.insert(), new_rows)
        if changed_rows:
            for values in changed_rows:
                self.connection.execute(
                    resource_current.update()
                    .where(c.resource_type == values["resource_type"], c.id == values["id"])
                    .values(**values)
                )
                self._forget_index(str(values["resource_type"]), str(values["id"]))
        self._insert_index(indexed)
        return len(batch)


class _Bound:
    """Repository interactions that share one connection and its transaction."""

    def __init__(self, operations: _Operations):
        self._operations = operations

    def create(
        self, resource: dict[str, Any], *, if_none_exist: str | None = None, base: str | None = None
    ) -> Stored:
        return self._operations.create(resource, if_none_exist, base)

    def read(self, resource_type: str, id: str) -> Stored:
        return self._operations.read(resource_type, id)

    def vread(self, resource_type: str, id: str, version_id: int) -> Stored:
        return self._operations.vread(resource_type, id, version_id)

    def update(self, resource: dict[str, Any], *, if_match: int | None = None) -> Stored:
        return self._operations.update(resource, if_match)

    def delete(self, resource_type: str, id: str, *, if_match: int | None = None) -> Stored:
        return self._operations.delete(resource_type, id, if_match)

    def conditional_update(
        self,
        resource: dict[str, Any],
        criteria: str,
        *,
        if_match: int | None = None,
        base: str | None = None,
    ) -> Stored:
        return self._operations.conditional_update(resource, criteria, if_match, base)

    def conditional_delete(
        self,
        resource_type: str,
        criteria: str,
        *,
        if_match: int | None = None,
        base: str | None = None,
    ) -> Stored | None:
        return self._operations.conditional_delete(
            resource_type, criteria, if_match=if_match, base=base
        )

    def conditional_match(
        self, resource_type: str, criteria: str, what: str, base: str | None = None
    ) -> Stored | None:
        return self._operations.conditional_match(resource_type, criteria, what, base)

    def history(
        self,
        resource_type: str | None = None,
        id: str | None = None,
        *,
        since: datetime | None = None,
        count: int = DEFAULT_HISTORY_COUNT,
        offset: int = 0,
    ) -> list[Stored]:
        return self._operations.history(resource_type, id, since, count, offset)

    def history_total(
        self,
        resource_type: str | None = None,
        id: str | None = None,
        *,
        since: datetime | None = None,
    ) -> int:
        return self._operations.history_total(resource_type, id, since)

    def search(
        self, query: SearchQuery, *, keep_included: KeepIncluded | None = None
    ) -> SearchResult:
        return self._operations.search(query, keep_included=keep_included)

    def included(
        self, query: SearchQuery, matches: list[Stored], keep: KeepIncluded
    ) -> tuple[list[Stored], bool]:
        return self._operations.included(query, matches, keep)

    def transaction(self) -> AbstractContextManager[Repository]:
        # Already inside one: nested work joins it.
        return nullcontext(self)

    def load(self, resources: Iterable[dict[str, Any]], *, batch_size: int = 1000) -> int:
        return self._operations.load(resources, batch_size)

    def append_new(self, resources: Iterable[dict[str, Any]]) -> int:
        return self._operations.append_new(resources)


class SqlRepository:
    """A `Repository` on SQLite (`sqlite:///file.db`) or PostgreSQL (`postgresql://...`).

    The schema is created or upgraded when the repository opens (`migrate=False` to
    skip). `parameters` are the SearchParameters indexed and accepted (default: R4's
    plus the profiles package's); `clock` gives meta.lastUpdated (default: now, UTC).
    Each call runs in its own transaction; `transaction()` groups calls into one.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        parameters: SearchParameters | None = None,
        clock: Clock | None = None,
        migrate: bool = True,
        engine: Engine | None = None,
    ):
        self.engine = engine if engine is not None else create_store_engine(url, schema=schema)
        self.parameters = parameters if parameters is not None else default_search_parameters()
        self.clock: Clock = clock if clock is not None else _utc_now
        self.postgres = self.engine.dialect.name == "postgresql"
        self.schema = schema
        self._readers = ReadConnections(self.engine)
        # Searches on a database server keep connections of their own, with the
        # engine's time limit for a statement (longer than a read's); on SQLite they
        # share the readers'.
        self._searchers = (
            ReadConnections(self.engine, statement_timeout_ms=None)
            if self.postgres
            else self._readers
        )
        self._records = RecordIndexer()
        if migrate:
            migrate_schema(self.engine)

    @property
    def embedded(self) -> bool:
        """Whether the database runs inside this process (SQLite), not as a server."""
        return self.engine.dialect.name == "sqlite"

    def close(self) -> None:
        self._readers.close()
        self._searchers.close()
        self.engine.dispose()

    def analyze(self) -> None:
        """Refresh the database's statistics, so that it plans searches well after a bulk load."""
        tables = ", ".join(t.name for t in (resource_current, resource_history, *INDEX_TABLES))
        if self.engine.dialect.name == "postgresql":
            autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            with autocommit.connect() as connection:
                # Over a large store ANALYZE may take longer than a statement may;
                # the pooled connection gets its bound back after.
                connection.exec_driver_sql("SET statement_timeout = 0")
                try:
                    connection.exec_driver_sql(f"ANALYZE {tables}")
                finally:
                    connection.exec_driver_sql("RESET statement_timeout")
        else:
            with self.engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE")

    def __enter__(self) -> SqlRepository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _bound(
        self, *, read_only: bool, counted: bool = True, searching: bool = False
    ) -> Iterator[_Bound]:
        """A connection and its transaction. `searching` (read-only): a statement that
        PostgreSQL stopped for running too long (`STATEMENT_TIMEOUT_MS`) is SearchError."""
        with self.engine.connect() as connection:
            if read_only and self.postgres:
                # READ COMMITTED gives each statement its own snapshot anyway, so a
                # read needs no BEGIN and COMMIT round trips.
                connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            elif read_only:
                connection = connection.execution_options(**{READ_ONLY: True})
            try:
                with connection.begin():
                    yield _Bound(
                        _Operations(connection, self.parameters, self.clock, self._records)
                    )
                    if not read_only and counted:
                        # In the same transaction: the change and its count commit together.
                        connection.execute(
                            store_change.update()
                            .where(store_change.c.id == 1)
                            .values(generation=store_change.c.generation + 1)
                        )
            except DBAPIError as exc:
                if searching and _stopped_for_time(exc.orig):
                    raise _too_costly() from exc
                if not read_only and _lost_to_another(exc.orig):
                    # Nothing of it was written: the writer lost a race, as one that
                    # found another version did, and may send it again.
                    raise VersionConflict(
                        "another write to the same resources ran at the same time;"
                        " nothing was written: send it again"
                    ) from exc
                raise

    # --- the hot read paths, straight through the driver --------------------------
    # A read by id is the server's commonest request; SQLAlchemy's statement
    # handling costs several times the query itself, so these few fixed statements
    # go to the driver directly and convert their few columns by hand.

    def _driver_rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if not self.postgres:
            sql = sql.replace("%s", "?")
        return self._readers.rows(sql, params)

    def generation(self) -> int:
        """How many changing write transactions the store has committed: equal values
        mean nothing was created, updated or deleted in between (`append` aside)."""
        rows = self._driver_rows(GENERATION_SQL, ())
        return int(rows[0][0]) if rows else 0

    def generation_watch(self) -> GenerationWatch | None:
        """`generation` for the requests of one event loop, without blocking it (see
        `GenerationWatch`), or None on an embedded store, whose `generation` is a
        short local read. `GenerationWatch.close` closes its connection."""
        if self.embedded:
            return None
        reader = AsyncReader(self.engine)
        return GenerationWatch(reader.generation, reader.close)

    def current_reads(self) -> SharedQueries[tuple[str, str], Stored] | None:
        """Current versions by (type, id) for the requests of one event loop, without
        blocking it: the keys asked for while one query is out go together in the
        next (`SharedQueries`), each read after it was asked for, on an asyncio
        connection of its own. None on an embedded store, whose reads are short
        local calls. A key not stored is None; a deleted one is a deleted version
        (see `current_or_error`). `SharedQueries.close` closes its connection."""
        if self.embedded:
            return None
        reader = AsyncReader(self.engine)

        async def fetch(keys: list[tuple[str, str]]) -> dict[tuple[str, str], Stored]:
            rows = await reader.rows(
                f"{_SELECT_CURRENT} WHERE (resource_type, id) IN"
                " (SELECT * FROM unnest(%s::text[], %s::text[]))",
                ([t for t, _ in keys], [i for _, i in keys]),
            )
            return {(row[0], row[1]): _driver_row_to_stored(row) for row in rows}

        return SharedQueries(fetch, reader.close)

    def referring(
        self, resource_type: str | tuple[str, ...], parameter: str, target: tuple[str, str]
    ) -> list[Stored]:
        """The current resources of a type whose reference `parameter` points at `target`
        (type, id), oldest id first: `Consent?patient=Patient/1` in one indexed query.
        Given several types, those of all of them, by type and id, in one query."""
        if not isinstance(resource_type, str):
            kinds = ", ".join(["%s"] * len(resource_type))
            rows = self._driver_rows(
                f"{_SELECT_CURRENT} WHERE NOT deleted AND (resource_type, id) IN ("
                "SELECT resource_type, resource_id FROM search_reference WHERE resource_type"
                f" IN ({kinds}) AND param = %s AND target_id = %s AND target_type = %s)"
                " ORDER BY resource_type, id",
                (*resource_type, parameter, target[1], target[0]),
            )
            return [_driver_row_to_stored(row) for row in rows]
        rows = self._driver_rows(
            f"{_SELECT_CURRENT} WHERE resource_type = %s AND NOT deleted AND id IN ("
            "SELECT resource_id FROM search_reference WHERE resource_type = %s AND param = %s"
            " AND target_id = %s AND target_type = %s) ORDER BY id",
            (resource_type, resource_type, parameter, target[1], target[0]),
        )
        return [_driver_row_to_stored(row) for row in rows]

    def identified(self, resource_types: Sequence[str], system: str, value: str) -> list[Stored]:
        """The current resources of these types with this identifier (`identifier`
        search parameter), by type and id: what a Reference by identifier alone names."""
        if not resource_types:
            return []
        kinds = ", ".join(["%s"] * len(resource_types))
        rows = self._driver_rows(
            f"{_SELECT_CURRENT} WHERE NOT deleted AND (resource_type, id) IN ("
            f"SELECT resource_type, resource_id FROM search_token WHERE resource_type IN ({kinds})"
            " AND param = 'identifier' AND code = %s AND system = %s) ORDER BY resource_type, id",
            (*resource_types, value, system),
        )
        return [_driver_row_to_stored(row) for row in rows]

    def read_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Stored]:
        """The current, not deleted, versions of several resources by (type, id);
        those unknown or deleted are left out."""
        wanted = list(dict.fromkeys(keys))
        found: dict[tuple[str, str], Stored] = {}
        for start in range(0, len(wanted), _READ_BATCH):
            chunk = wanted[start : start + _READ_BATCH]
            where = " OR ".join(["(resource_type = %s AND id = %s)"] * len(chunk))
            params = tuple(v for key in chunk for v in key)
            for row in self._driver_rows(f"{_SELECT_CURRENT} WHERE {where}", params):
                stored = _driver_row_to_stored(row)
                if not stored.deleted:
                    found[(stored.resource_type, stored.id)] = stored
        return found

    def transaction(self) -> AbstractContextManager[Repository]:
        """One transaction for several interactions: all commit, or none (on an exception)."""
        return self._bound(read_only=False)

    def setting(self, name: str, create: Callable[[], str]) -> str:
        """A value kept with the data; the first caller's `create()` wins a race."""
        with self.engine.begin() as connection:
            row = connection.execute(
                sa.select(store_setting.c.value).where(store_setting.c.name == name)
            ).first()
            if row is not None:
                return str(row[0])
        try:
            with self.engine.begin() as connection:
                connection.execute(store_setting.insert().values(name=name, value=create()))
        except IntegrityError:
            pass  # another process stored it first
        with self.engine.begin() as connection:
            return str(
                connection.execute(
                    sa.select(store_setting.c.value).where(store_setting.c.name == name)
                ).scalar_one()
            )

    def parse(self, resource_type: str, params: Iterable[tuple[str, str]]) -> SearchQuery:
        """Parse search parameters against this repository's SearchParameters."""
        return parse_search(resource_type, params, self.parameters)

    def create(
        self, resource: dict[str, Any], *, if_none_exist: str | None = None, base: str | None = None
    ) -> Stored:
        with self._bound(read_only=False) as bound:
            return bound.create(resource, if_none_exist=if_none_exist, base=base)

    def read(self, resource_type: str, id: str) -> Stored:
        rows = self._driver_rows(
            f"{_SELECT_CURRENT} WHERE resource_type = %s AND id = %s", (resource_type, id)
        )
        return current_or_error(resource_type, id, _driver_row_to_stored(rows[0]) if rows else None)

    def vread(self, resource_type: str, id: str, version_id: int) -> Stored:
        with self._bound(read_only=True) as bound:
            return bound.vread(resource_type, id, version_id)

    def update(self, resource: dict[str, Any], *, if_match: int | None = None) -> Stored:
        with self._bound(read_only=False) as bound:
            return bound.update(resource, if_match=if_match)

    def delete(self, resource_type: str, id: str, *, if_match: int | None = None) -> Stored:
        """Delete the resource (a new, deleted version); with `if_match`, only if that
        is its current version (VersionConflict otherwise)."""
        with self._bound(read_only=False) as bound:
            return bound.delete(resource_type, id, if_match=if_match)

    def conditional_update(
        self,
        resource: dict[str, Any],
        criteria: str,
        *,
        if_match: int | None = None,
        base: str | None = None,
    ) -> Stored:
        """Update the one resource of its type the search `criteria` match; where none
        does, create it (keeping the body's id, if it has one). PreconditionFailed if
        several match: https://hl7.org/fhir/R4/http.html#cond-update. `base`, this
        server's base URL, as for `conditional_match`."""
        with self._bound(read_only=False) as bound:
            return bound.conditional_update(resource, criteria, if_match=if_match, base=base)

    def conditional_delete(
        self,
        resource_type: str,
        criteria: str,
        *,
        if_match: int | None = None,
        base: str | None = None,
    ) -> Stored | None:
        """Delete the one resource the search `criteria` match (None where none does);
        PreconditionFailed if several match: https://hl7.org/fhir/R4/http.html#cdelete.
        With `if_match`, only if the match is at that version (VersionConflict)."""
        with self._bound(read_only=False) as bound:
            return bound.conditional_delete(resource_type, criteria, if_match=if_match, base=base)

    def conditional_match(
        self, resource_type: str, criteria: str, what: str, base: str | None = None
    ) -> Stored | None:
        """The one current resource of the type the search `criteria` match, or None;
        PreconditionFailed if several do (`what` names the request in the message;
        `base`, this server's base URL, as for `_Operations.conditional_match`). A read:
        only within `transaction()` is a write that follows serialised with the others
        that search first, as a conditional create is."""
        with self._bound(read_only=True, searching=True) as bound:
            return bound.conditional_match(resource_type, criteria, what, base)

    def history(
        self,
        resource_type: str | None = None,
        id: str | None = None,
        *,
        since: datetime | None = None,
        count: int = DEFAULT_HISTORY_COUNT,
        offset: int = 0,
    ) -> list[Stored]:
        """Versions newest first, `count` of them from `offset`."""
        with self._bound(read_only=True, searching=True) as bound:
            return bound.history(resource_type, id, since=since, count=count, offset=offset)

    def history_total(
        self,
        resource_type: str | None = None,
        id: str | None = None,
        *,
        since: datetime | None = None,
    ) -> int:
        """How many versions `history` pages through."""
        with self._bound(read_only=True, searching=True) as bound:
            return bound.history_total(resource_type, id, since=since)

    def search(
        self, query: SearchQuery, *, keep_included: KeepIncluded | None = None
    ) -> SearchResult:
        """The query's page, total and includes, read at one moment. `keep_included`
        (no I/O: it runs inside that moment's read) chooses what includes go on."""
        # On this thread's kept connection: a pooled one's check-out, transaction and
        # return cost about as much as a search of one patient's record.
        try:
            with self._searchers.snapshot() as rows:
                return run_search(
                    query,
                    search_statements(self.engine.dialect),
                    lambda statement: rows(*statement),
                    now_micros=to_micros(self.clock()),
                    keep_included=keep_included,
                )
        except Exception as exc:
            if _stopped_for_time(exc):
                raise _too_costly() from exc
            raise

    def included(
        self, query: SearchQuery, matches: list[Stored], keep: KeepIncluded
    ) -> tuple[list[Stored], bool]:
        """What the query's includes add to `matches` (see `include_rounds`), each page
        read at a moment of its own, so that `keep` may read the store in between."""
        statements = search_statements(self.engine.dialect)

        def rows(statement: Fragment) -> list[tuple[Any, ...]]:
            try:
                with self._searchers.snapshot() as read:
                    return read(*statement)
            except Exception as exc:
                if _stopped_for_time(exc):
                    raise _too_costly() from exc
                raise

        return include_rounds(
            query,
            matches,
            lambda forward, reverse, sources: include_round(
                statements, forward, reverse, sources, rows
            ),
            keep,
        )

    def load(self, resources: Iterable[dict[str, Any]], *, batch_size: int = 1000) -> int:
        """Store many resources in one transaction, inserting in batches; the count stored.

        A resource with an id keeps it (a new version if it exists already); one
        without gets a new id.
        """
        with self._bound(read_only=False) as bound:
            return bound.load(resources, batch_size=batch_size)

    def load_if_new(
        self, resource_type: str, resources: Callable[[], Iterable[dict[str, Any]]]
    ) -> int:
        """`load` what `resources()` makes into a store that has never held a resource
        of this type (none stored, none deleted); 0 where it has. Deleted ones count:
        loaded again, they would come back, over what was written since. Stores
        loading together are serialised (PostgreSQL: an advisory lock; SQLite: the
        write lock), so the second finds what the first loaded, and loads nothing."""
        with self._bound(read_only=False) as bound:
            connection = bound._operations.connection
            if self.postgres:
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(hashtext(:key || current_schema()))"),
                    {"key": f"cpa_fhir.store.load:{resource_type}"},
                )
            held = connection.execute(
                sa.select(resource_current.c.id)
                .where(resource_current.c.resource_type == resource_type)
                .limit(1)
            ).first()
            return 0 if held is not None else bound.load(resources())

    def child_appender(self) -> ProcessAppender | None:
        """`append` done by a child process with its own connection (see `_appender`),
        or None where a child could not do it as this repository would: search
        parameters of its own (the child indexes with the default ones), or no POSIX."""
        if self.parameters is not default_search_parameters() or not ProcessAppender.supported():
            return None
        return ProcessAppender(self.engine.url.render_as_string(hide_password=False), self.schema)

    def append_indexing_later(
        self, resources: Iterable[dict[str, Any]], index_later: list[IndexedRecord]
    ) -> int:
        """`append`, with the records' search-index rows left for `index_appended`, in a
        later transaction: fewer rows to write before the caller may go on (the
        server's AuditEvents, whose disclosure waits on their commit). Until then a
        search does not find them; reads by id do."""
        with self._bound(read_only=False, counted=False) as bound:
            return bound._operations.append_new(resources, index_later)

    def index_appended(self, indexed: list[IndexedRecord]) -> int:
        """Write the index rows `append_indexing_later` left (see `_Operations`)."""
        with self._bound(read_only=False, counted=False) as bound:
            return bound._operations.index_appended(indexed)

    def index_pending(self) -> int:
        """Index the appended records whose index rows never came (their writer
        stopped first), from the stored content."""
        with self._bound(read_only=False, counted=False) as bound:
            return bound._operations.index_pending()

    def any_pending(self) -> bool:
        """Whether any appended record awaits its index rows (one short statement)."""
        return bool(self._driver_rows("SELECT 1 FROM index_pending LIMIT 1", ()))

    def pending_records(self) -> list[IndexedRecord]:
        """The appended records whose index rows never came, with those rows, for
        `index_appended`."""
        with self._bound(read_only=True) as bound:
            return bound._operations.pending_records()

    def append(self, resources: Iterable[dict[str, Any]]) -> int:
        """Store new records the server itself makes (its AuditEvents), each with a
        fresh id, in one transaction; an id already taken stores none of them. They
        do not count as a change in `generation`: nothing derived from the store's
        content depends on them, so they invalidate nothing."""
        with self._bound(read_only=False, counted=False) as bound:
            return bound.append_new(resources)
