"""Search and write input at the edges: refused as a SearchError/InputError, or answered.

Each case once made the store raise an unhandled database or Python error (a 500):
dates past year 9999 or before year 1, huge offsets, numbers past a double's range,
searches with hundreds of criteria, NUL characters, and a store URL's own options.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from cpa_fhir.errors import InputError, SearchError
from cpa_fhir.store import SqlRepository
from cpa_fhir.store._dates import clamped_moment, to_micros
from cpa_fhir.store._engine import STATEMENT_TIMEOUT_MS, create_store_engine
from cpa_fhir.store._query import (
    MAX_COUNT,
    MAX_CRITERIA,
    MAX_IDS,
    MAX_OFFSET,
    MAX_SUBQUERIES,
    MAX_VALUES,
)
from tests.store.conftest import POSTGRES_URL, Postgres

Params = list[tuple[str, str]]


def ids(store: SqlRepository, resource_type: str, params: Params) -> list[str]:
    return [m.id for m in store.search(store.parse(resource_type, params)).matches]


def refused(store: SqlRepository, resource_type: str, params: Params) -> SearchError:
    """The SearchError the search raises, whether at parse or when run."""
    with pytest.raises(SearchError) as caught:
        store.search(store.parse(resource_type, params))
    return caught.value


# --- 1. _lastUpdated at the ends of the calendar ------------------------------------


@pytest.mark.parametrize(
    ("value", "matches"),
    [
        ("9999", False),
        ("9999-12-31", False),
        ("9999-12-31T23:59:59.999Z", False),
        ("ap9999", False),
        ("sa9999", False),
        ("gt9999-12-31T23:59:59.999Z", False),
        ("eb9999", True),
        ("lt9999", True),
        ("le9999", True),
        ("ne9999", True),
        ("ap0001-01-01", False),
        ("0001", False),
        ("lt0001-01-01T00:00:00+14:00", False),
        ("ge0001-01-01T00:00:00+14:00", True),
        ("gt0001", True),
        ("sa0001", True),
    ],
)
def test_last_updated_at_the_ends_of_the_calendar(
    store: SqlRepository, value: str, matches: bool
) -> None:
    made = store.create({"resourceType": "Patient"})  # last updated in 2026
    assert ids(store, "Patient", [("_lastUpdated", value)]) == ([made.id] if matches else [])


def test_a_date_on_the_last_day_of_9999_is_indexed_and_found(store: SqlRepository) -> None:
    made = store.create({"resourceType": "Patient", "birthDate": "9999-12-31"})
    store.create({"resourceType": "Patient", "birthDate": "2000-01-01"})
    assert ids(store, "Patient", [("birthdate", "9999-12-31")]) == [made.id]
    assert ids(store, "Patient", [("birthdate", "9999")]) == [made.id]
    assert ids(store, "Patient", [("birthdate", "gt9999-12-31T23:59:59.999Z")]) == []
    assert ids(store, "Patient", [("birthdate", "sa9999-12-30")]) == [made.id]


# --- 2. history's _since and _offset, a search's _offset ------------------------------


def test_history_since_beyond_the_calendar_in_utc(store: SqlRepository) -> None:
    made = store.create({"resourceType": "Patient"})
    store.update({"resourceType": "Patient", "id": made.id, "active": True})
    # The first instant of year 1 at +14:00 is before year 1 in UTC: everything is since.
    first = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
    assert [s.version_id for s in store.history("Patient", since=first)] == [2, 1]
    assert store.history_total("Patient", since=first) == 2
    assert [s.version_id for s in store.history("Patient", made.id, since=first)] == [2, 1]
    # The last second of 9999 at -14:00 is after 9999 in UTC: nothing is since.
    last = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14)))
    assert store.history("Patient", since=last) == []
    assert store.history(since=last) == []
    assert store.history_total("Patient", since=last) == 0


@pytest.mark.parametrize("offset", [10**20, 10**50, MAX_OFFSET + 1])
def test_history_past_every_version_is_an_empty_page(store: SqlRepository, offset: int) -> None:
    made = store.create({"resourceType": "Patient"})
    assert store.history("Patient", offset=offset) == []
    assert store.history(offset=offset) == []
    assert store.history("Patient", made.id, offset=offset) == []
    assert store.history("Patient", count=10**20) != []


@pytest.mark.parametrize(
    ("offset", "read_as"),
    [("99999999999999999999", MAX_OFFSET), ("9" * 5000, MAX_OFFSET), ("0" * 30 + "1", 1)],
)
def test_search_offset_of_any_size(store: SqlRepository, offset: str, read_as: int) -> None:
    store.create({"resourceType": "Patient"})
    query = store.parse("Patient", [("_offset", offset)])
    assert query.offset == read_as
    result = store.search(query)
    assert result.matches == [] and result.total == 1


def test_search_count_of_any_size_is_the_largest_page(store: SqlRepository) -> None:
    store.create({"resourceType": "Patient"})
    query = store.parse("Patient", [("_count", "9" * 5000)])
    assert query.count == MAX_COUNT
    assert len(store.search(query).matches) == 1
    with pytest.raises(SearchError):
        store.parse("Patient", [("_count", "-1")])
    with pytest.raises(SearchError):
        store.parse("Patient", [("_offset", "١")])  # a digit, but not an ASCII one


# --- 3. numbers past a double's range -------------------------------------------------


@pytest.mark.parametrize(
    "value", ["1e9999999", "1e-9999999", "0e9999999", "0e-9999999", "ap1e400", "2e308"]
)
def test_number_no_double_holds_is_refused(store: SqlRepository, value: str) -> None:
    error = refused(store, "RiskAssessment", [("probability", value)])
    assert "not a number this server can search with" in error.message
    error = refused(store, "Encounter", [("length", f"{value}|http://unitsofmeasure.org|min")])
    assert "not a number this server can search with" in error.message


def test_numbers_at_the_ends_of_a_double_are_searched(store: SqlRepository) -> None:
    made = store.create(
        {
            "resourceType": "RiskAssessment",
            "status": "final",
            "subject": {"reference": "Patient/p"},
            "prediction": [{"probabilityDecimal": 0.5}],
        }
    )
    assert ids(store, "RiskAssessment", [("probability", "1.7976931348623157e308")]) == []
    assert ids(store, "RiskAssessment", [("probability", "lt1.7976931348623157e308")]) == [made.id]
    assert ids(store, "RiskAssessment", [("probability", "gt1e-300")]) == [made.id]
    assert ids(store, "RiskAssessment", [("probability", "0.50")]) == [made.id]


# --- 4. too many criteria or values ---------------------------------------------------


def test_thousand_criteria_are_refused_quickly(store: SqlRepository) -> None:
    started = time.monotonic()
    error = refused(store, "Patient", [("name", "x")] * 1000)
    assert error.code == "too-costly"
    assert f"at most {MAX_CRITERIA} criteria" in error.message
    error = refused(store, "Patient", [("name", ",".join(["x"] * 1000))])
    assert error.code == "too-costly" and error.expression == "name"
    assert time.monotonic() - started < 5


def test_limits_are_at_the_numbers_given(store: SqlRepository) -> None:
    made = store.create({"resourceType": "Patient", "name": [{"family": "Smith"}]})
    many = ",".join([*(f"x{i}" for i in range(MAX_VALUES - 1)), "smith"])
    assert ids(store, "Patient", [("name", many)] * MAX_CRITERIA) == [made.id]
    refused(store, "Patient", [("name", many)] * (MAX_CRITERIA + 1))
    refused(store, "Patient", [("name", many + ",y")])
    refused(store, "Patient", [("name:missing", "false")] * (MAX_CRITERIA + 1))
    refused(store, "Patient", [("general-practitioner:Practitioner.name", many + ",y")])


def test_a_page_of_ids_is_not_limited_as_other_values(store: SqlRepository) -> None:
    # The server looks up a page of matches (up to MAX_COUNT) by _id.
    made = store.create({"resourceType": "Patient"})
    listed = ",".join([*(f"x{i}" for i in range(MAX_COUNT - 1)), made.id])
    assert ids(store, "Patient", [("_id", listed), ("_count", str(MAX_COUNT))]) == [made.id]
    # Through a chain it is compared in every subquery, so it is limited as the others.
    refused(store, "Observation", [("patient._id", listed)])


def test_ids_are_bounded_in_all_not_only_a_parameter_at_a_time(store: SqlRepository) -> None:
    """Each id is a bound value (PostgreSQL takes at most 65,535 a statement): as many
    as MAX_IDS are found, over several `_id` criteria too; more are refused, not a 500."""
    made = store.create({"resourceType": "Patient"})
    half = MAX_IDS // 2
    first = ",".join([*(f"x{i}" for i in range(half - 1)), made.id])
    second = ",".join([*(f"y{i}" for i in range(half - 1)), made.id])
    assert ids(store, "Patient", [("_id", first), ("_id", second)]) == [made.id]
    error = refused(store, "Patient", [("_id", first)] * 7)
    assert error.code == "too-costly" and f"at most {MAX_IDS} ids" in error.message


def test_chains_fanning_out_to_many_types_are_refused(store: SqlRepository) -> None:
    # `target` may refer to any of ~145 types: one subquery for each.
    chain = ("target.target.target.target._id", "x")
    assert ids(store, "Provenance", [chain] * 3) == []
    error = refused(store, "Provenance", [chain] * 4)
    assert error.code == "too-costly" and f"the {MAX_SUBQUERIES} allowed" in error.message
    # Naming the target type keeps it to one.
    typed = ("target:Provenance.target:Provenance.target:Patient._id", "x")
    assert ids(store, "Provenance", [typed] * MAX_CRITERIA) == []


def test_repeated_includes_run_once(store: SqlRepository) -> None:
    query = store.parse("Observation", [("_include", "Observation:patient")] * 1000)
    assert len(query.include) == 1


def test_a_search_past_its_time_stops_with_a_clear_error(postgres: Postgres) -> None:
    """PostgreSQL's statements have a time limit, a search's reported as too costly
    (SQLite has no statement timeout: there the limits on criteria bound searches)."""
    schema = postgres.new_schema()
    engine = create_store_engine(POSTGRES_URL, schema=schema, statement_timeout_ms=200)
    store = SqlRepository(POSTGRES_URL, schema=schema, engine=engine)
    try:
        store.create({"resourceType": "Patient"})
        with store.engine.connect() as blocker:
            # A lock the search waits on: as long a wait as any slow statement.
            blocker.exec_driver_sql("SET statement_timeout = 0")
            blocker.exec_driver_sql("LOCK TABLE resource_current IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(SearchError) as caught:
                store.search(store.parse("Patient", []))
            assert time.monotonic() - started < 5
            assert caught.value.code == "too-costly"
            assert "longer than this server allows" in caught.value.message
            blocker.rollback()
        assert len(ids(store, "Patient", [])) == 1  # the store serves on
    finally:
        store.close()


def test_every_connection_of_the_store_has_the_bound(postgres: Postgres) -> None:
    with SqlRepository(POSTGRES_URL, schema=postgres.new_schema()) as store:
        store.analyze()  # lifts it for itself, and gives the connection back bounded
        with store.engine.connect() as one, store.engine.connect() as two:
            for connection in (one, two):
                shown = connection.exec_driver_sql("SHOW statement_timeout").scalar()
                assert shown == f"{STATEMENT_TIMEOUT_MS // 1000}s"
        # Searches keep connections of their own: a search's bound, not a read's.
        store.search(store.parse("Patient", []))
        shown = store._searchers.rows("SHOW statement_timeout", ())
        assert shown == [(f"{STATEMENT_TIMEOUT_MS // 1000}s",)]


# --- 5. NUL characters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource_type", "params"),
    [
        ("Patient", [("name", "\x00")]),
        ("Patient", [("name:exact", "a\x00")]),
        ("Patient", [("identifier", "a\x00b")]),
        ("Patient", [("identifier", "s\x00|c")]),
        ("Patient", [("_id", "a\x00")]),
        ("Patient", [("general-practitioner", "Practitioner/a\x00")]),
        ("Encounter", [("length", "5|u\x00|min")]),
        ("Observation", [("patient.name", "x,\x00")]),
        ("Observation", [("_profile", "http://x/\x00")]),
    ],
)
def test_nul_in_a_search_value_is_refused(
    store: SqlRepository, resource_type: str, params: Params
) -> None:
    assert "NUL" in refused(store, resource_type, params).message


def test_nul_in_a_resource_is_refused_and_nothing_stored(store: SqlRepository) -> None:
    bad: list[dict[str, Any]] = [
        {"resourceType": "Patient", "name": [{"family": "a\x00b"}]},
        {"resourceType": "Patient", "gender": "ma\x00le"},
        {"resourceType": "Patient", "extension": [{"url": "x", "valueString": "\x00"}]},
        {"resourceType": "Patient", "a\x00": 1},
    ]
    for resource in bad:
        with pytest.raises(InputError, match="NUL"):
            store.create(resource)
        with pytest.raises(InputError, match="NUL"):
            store.update({**resource, "id": "p1"})
        with pytest.raises(InputError, match="NUL"):
            store.load([{"resourceType": "Patient", "id": "ok"}, {**resource, "id": "p2"}])
    assert store.history_total() == 0
    # A backslash before "u0000" is text, not a NUL: stored and found.
    kept = store.create({"resourceType": "Patient", "name": [{"family": "a\\u0000b"}]})
    assert kept.resource()["name"][0]["family"] == "a\\u0000b"
    assert ids(store, "Patient", [("name:exact", "a\\u0000b")]) == [kept.id]


# --- 6. a PostgreSQL URL's own options ------------------------------------------------


def _url_with_options(options: str) -> str:
    url = sa.engine.make_url(POSTGRES_URL).update_query_dict({"options": options})
    return url.render_as_string(hide_password=False)


def _tables_in(postgres: Postgres, schema: str) -> set[str]:
    with postgres.engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
            {"s": schema},
        )
        return {row[0] for row in rows}


def _search_path(url: str, schema: str | None = None) -> str:
    engine = create_store_engine(url, schema=schema)
    try:
        with engine.connect() as connection:
            return str(connection.exec_driver_sql("SHOW search_path").scalar())
    finally:
        engine.dispose()


def test_url_options_are_kept(postgres: Postgres) -> None:
    schema = postgres.new_schema()  # t_..., dropped at the end of the session
    url = _url_with_options(f"-csearch_path={schema} -capplication_name=cpa-{uuid.uuid4().hex}")
    # Checked before any table is made, so that a failure cannot create them in public.
    assert _search_path(url) == schema
    store = SqlRepository(url)
    try:
        made = store.create({"resourceType": "Patient"})
        assert {"resource_current", "resource_history"} <= _tables_in(postgres, schema)
        assert store.read("Patient", made.id).id == made.id
        with store.engine.connect() as connection:
            shown = connection.exec_driver_sql("SHOW plan_cache_mode").scalar()
            assert shown == "force_custom_plan"
            name = connection.exec_driver_sql("SHOW application_name").scalar()
            assert str(name).startswith("cpa-")
    finally:
        store.close()


def test_schema_argument_wins_over_url_search_path(postgres: Postgres) -> None:
    from_url, given = postgres.new_schema(), postgres.new_schema()
    url = _url_with_options(f"-csearch_path={from_url}")
    assert _search_path(url, given) == given
    store = SqlRepository(url, schema=given)
    try:
        store.create({"resourceType": "Patient"})
        assert "resource_current" in _tables_in(postgres, given)
        assert _tables_in(postgres, from_url) == set()
    finally:
        store.close()


def test_engine_url_keeps_its_options_for_a_child_process(postgres: Postgres) -> None:
    # The appender's child opens the store from the engine's URL: its options go too.
    schema = postgres.new_schema()
    url = _url_with_options("-capplication_name=kept")
    engine = create_store_engine(url, schema=schema)
    try:
        assert engine.url.query["options"] == "-capplication_name=kept"
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW application_name").scalar() == "kept"
            assert connection.exec_driver_sql("SHOW search_path").scalar() == schema
    finally:
        engine.dispose()


def test_clamped_moment_moves_only_what_a_datetime_cannot_hold() -> None:
    now = datetime(2026, 4, 3, 10, 15, tzinfo=UTC)
    assert clamped_moment(to_micros(now)) == now
    assert clamped_moment(2**62) == datetime.max.replace(tzinfo=UTC)
    assert clamped_moment(-(2**62)) == datetime.min.replace(tzinfo=UTC)


# --- values longer than the index holds ---------------------------------------------


def test_a_reference_longer_than_the_index_holds_is_refused_not_cut_short(
    store: SqlRepository,
) -> None:
    """Cut to 64 characters, the id of another patient's reference would index as
    this one's, and a search (or the Consents looked up for a patient) would find it."""
    mine = "p" * 64
    store.create({"resourceType": "Patient", "id": mine})
    with pytest.raises(InputError, match="longer than"):
        store.create(
            {
                "resourceType": "Flag",
                "status": "active",
                "code": {"text": "risk"},
                "subject": {"reference": f"Patient/{mine}-someone-else"},
            }
        )
    assert ids(store, "Flag", [("subject", f"Patient/{mine}")]) == []
    assert store.referring("Flag", "subject", ("Patient", mine)) == []
