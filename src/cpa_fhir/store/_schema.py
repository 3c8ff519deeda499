"""The store's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

- `resource_history`: every version of every resource, as stored JSON bytes
  (https://hl7.org/fhir/R4/http.html#history); a delete is a version with no content.
- `resource_current`: the latest version of each resource, so a read is one
  primary-key lookup that returns the stored bytes as they are.
- `search_token`, `search_string`, `search_reference`, `search_date`, `search_number`:
  the search index of current, not deleted, versions
  (https://hl7.org/fhir/R4/search.html#ptypes), one row per indexed value.
  Each has an index led by (resource type, parameter, value...) for searching and
  one by (resource type, resource id) for replacing a resource's rows and for
  checking further criteria against resources already found.
- `store_change`: one row counting the write transactions that changed resources, so
  a server can tell cheaply whether what it derived from them (consent decisions,
  security labels) still holds.
- `schema_version`: the migrations applied (see `_migrations`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData()


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database.

    PostgreSQL keeps it as `timestamptz`; SQLite has no time zones, so the value is
    stored as naive UTC and given its zone back when read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _type_column() -> sa.Column[str]:
    return sa.Column("resource_type", sa.String(64), nullable=False)


def _id_column(name: str = "resource_id") -> sa.Column[str]:
    return sa.Column(name, sa.String(64), nullable=False)


# Normalised strings compare byte-wise, so that a prefix range uses the btree index
# whatever the database's default collation.
_BYTEWISE_TEXT = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")

resource_history = sa.Table(
    "resource_history",
    metadata,
    _type_column(),
    _id_column("id"),
    sa.Column("version_id", sa.Integer, nullable=False),
    sa.Column("last_updated", UtcDateTime, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=True),
    sa.PrimaryKeyConstraint("resource_type", "id", "version_id"),
    sa.Index("ix_history_type_updated", "resource_type", "last_updated"),
)

resource_current = sa.Table(
    "resource_current",
    metadata,
    _type_column(),
    _id_column("id"),
    sa.Column("version_id", sa.Integer, nullable=False),
    sa.Column("last_updated", UtcDateTime, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=True),
    sa.PrimaryKeyConstraint("resource_type", "id"),
    sa.Index("ix_current_type_updated", "resource_type", "last_updated"),
)

search_token = sa.Table(
    "search_token",
    metadata,
    _type_column(),
    _id_column(),
    sa.Column("param", sa.String(100), nullable=False),
    sa.Column("system", sa.Text, nullable=True),
    sa.Column("code", sa.Text, nullable=False),
    sa.Index("ix_token_value", "resource_type", "param", "code", "system", "resource_id"),
    sa.Index("ix_token_resource", "resource_type", "resource_id", "param"),
)

search_string = sa.Table(
    "search_string",
    metadata,
    _type_column(),
    _id_column(),
    sa.Column("param", sa.String(100), nullable=False),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("normalised", _BYTEWISE_TEXT, nullable=False),
    sa.Index("ix_string_value", "resource_type", "param", "normalised", "resource_id"),
    sa.Index("ix_string_resource", "resource_type", "resource_id", "param"),
)

search_reference = sa.Table(
    "search_reference",
    metadata,
    _type_column(),
    _id_column(),
    sa.Column("param", sa.String(100), nullable=False),
    sa.Column("target_type", sa.String(64), nullable=True),
    sa.Column("target_id", sa.String(64), nullable=True),
    sa.Column("url", sa.Text, nullable=True),
    sa.Index(
        "ix_reference_target", "resource_type", "param", "target_id", "target_type", "resource_id"
    ),
    sa.Index("ix_reference_resource", "resource_type", "resource_id", "param"),
)

search_date = sa.Table(
    "search_date",
    metadata,
    _type_column(),
    _id_column(),
    sa.Column("param", sa.String(100), nullable=False),
    sa.Column("low", sa.BigInteger, nullable=False),
    sa.Column("high", sa.BigInteger, nullable=False),
    sa.Index("ix_date_value", "resource_type", "param", "low", "high"),
    sa.Index("ix_date_resource", "resource_type", "resource_id", "param"),
)

search_number = sa.Table(
    "search_number",
    metadata,
    _type_column(),
    _id_column(),
    sa.Column("param", sa.String(100), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("system", sa.Text, nullable=True),
    sa.Column("code", sa.Text, nullable=True),
    sa.Index("ix_number_value", "resource_type", "param", "value"),
    sa.Index("ix_number_resource", "resource_type", "resource_id", "param"),
)

# Small values the tool keeps with the data, e.g. the sandbox's token-signing key.
store_setting = sa.Table(
    "store_setting",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Records appended whose search-index rows are still to come, in a later transaction
# (`SqlRepository.append_indexing_later`); a store that stopped in between gets them
# from `SqlRepository.index_pending`.
index_pending = sa.Table(
    "index_pending",
    metadata,
    sa.Column("resource_type", sa.String(64), primary_key=True),
    sa.Column("resource_id", sa.String(64), primary_key=True),
)

store_change = sa.Table(
    "store_change",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", UtcDateTime, nullable=False),
)

INDEX_TABLES: tuple[sa.Table, ...] = (
    search_token,
    search_string,
    search_reference,
    search_date,
    search_number,
)
