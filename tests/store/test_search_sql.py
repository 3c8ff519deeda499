"""Search statements written as SQL text: every value the client sends is a bound
parameter, never part of the text, and matched as it is."""

from __future__ import annotations

import random
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpa_fhir.errors import SearchError
from cpa_fhir.store import Include, SqlRepository, parse_search
from cpa_fhir.store._search_sql import SearchStatements
from tests.store.conftest import POSTGRES_URL, Postgres

HOSTILE = ["O'Brien", '"x"', "100%", "a_b", "back\\slash", "what?", "%s", "--", ";drop", "hi!"]
NAMES = [
    "name",
    "name:exact",
    "name:contains",
    "family",
    "_id",
    "_lastUpdated",
    "birthdate",
    "identifier",
    "gender:not",
    "general-practitioner",
    "general-practitioner:Organization.name",
    "_has:CarePlan:subject:status",
    "_has:Flag:patient:_lastUpdated",
    "link:missing",
    "_sort",
]
values = st.one_of(
    st.sampled_from(HOSTILE),
    st.sampled_from(["ge2026-01-01", "ap2026", "ne2026-02", "x|y", "|y", "x|", "1,2"]),
    st.text(alphabet="ab'\"%_?\\;-|,", min_size=1, max_size=8),
)
_PLACEHOLDER = {"?": re.compile(r"\?"), "%s": re.compile(r"%s")}
# The only quoted text a statement holds: LIKE's escape character.
_OWN_LITERAL = "ESCAPE '!'"


@settings(max_examples=300, deadline=None)
@given(
    params=st.lists(st.tuples(st.sampled_from(NAMES), values), min_size=1, max_size=4),
    placeholder=st.sampled_from(["?", "%s"]),
)
def test_every_value_is_bound_and_none_is_written_into_the_text(
    params: list[tuple[str, str]], placeholder: str
) -> None:
    try:
        query = parse_search("Patient", params)
    except SearchError:
        return
    statements = SearchStatements(placeholder=placeholder, moment=lambda moment: moment)
    where = statements.where(query, now_micros=0)
    built = [
        statements.page(query, where, 0),
        statements.count(where),
        statements.include(Include("Patient", "organization"), ["a'b", "c"], limit=5, offset=2),
        statements.revinclude(
            Include("CarePlan", "subject"), "Patient", ["a'b", "c"], limit=5, offset=2
        ),
    ]
    for sql, bound in built:
        assert len(_PLACEHOLDER[placeholder].findall(sql)) == len(bound), sql
        text = sql.replace(_OWN_LITERAL, "")
        assert "'" not in text and '"' not in text and ";" not in text, sql
        if placeholder == "%s":
            assert "?" not in sql and "%" not in text.replace("%s", ""), sql


@pytest.mark.parametrize("family", HOSTILE)
def test_names_with_sql_characters_are_found_as_they_are(store: SqlRepository, family: str) -> None:
    store.load(
        {"resourceType": "Patient", "id": f"p{n}", "name": [{"family": name}]}
        for n, name in enumerate(HOSTILE)
    )

    def found(params: list[tuple[str, str]]) -> set[str]:
        return {m.id for m in store.search(store.parse("Patient", params)).matches}

    which = {f"p{n}" for n, name in enumerate(HOSTILE) if name == family}
    assert found([("name:exact", family)]) == which
    # `%` and `_` are themselves, not LIKE's wildcards; a quote is a quote.
    contains = {f"p{n}" for n, name in enumerate(HOSTILE) if family.lower() in name.lower()}
    assert found([("name:contains", family)]) == contains
    assert found([("family", family), ("_sort", "family")]) == {
        f"p{n}" for n, name in enumerate(HOSTILE) if name.lower().startswith(family.lower())
    }


def test_contains_works_whatever_postgresql_reads_a_backslash_as(postgres: Postgres) -> None:
    """With standard_conforming_strings off, PostgreSQL reads a backslash in a literal
    as an escape: LIKE's escape character is not one."""
    schema = postgres.new_schema()
    url = f"{POSTGRES_URL}?options=-cstandard_conforming_strings%3Doff"
    store = SqlRepository(url, schema=schema)
    try:
        store.load(
            {"resourceType": "Patient", "id": f"p{n}", "name": [{"family": name}]}
            for n, name in enumerate(HOSTILE)
        )
        found = store.search(store.parse("Patient", [("name:contains", "100%")]))
        assert [m.id for m in found.matches] == [f"p{HOSTILE.index('100%')}"]
        found = store.search(store.parse("Patient", [("name:contains", "i!")]))
        assert [m.id for m in found.matches] == [f"p{HOSTILE.index('hi!')}"]
    finally:
        store.close()


def test_long_strings_and_tokens_are_stored_and_found_by_their_beginning(
    store: SqlRepository,
) -> None:
    """A value longer than a B-tree entry holds (PostgreSQL refused 9,000 random
    characters outright) is indexed by its beginning, as HAPI FHIR does: stored, and
    found by it or by any of its beginning; `:exact` still compares the whole."""
    rng = random.Random(7)
    family = "".join(rng.choice(string.ascii_letters) for _ in range(9_000))
    value = "".join(rng.choice(string.ascii_letters) for _ in range(3_000))
    system = "urn:" + "".join(rng.choice(string.ascii_lowercase) for _ in range(3_000))
    made = store.create(
        {
            "resourceType": "Patient",
            "name": [{"family": family}],
            "identifier": [{"system": system, "value": value}],
        }
    )

    def found(params: list[tuple[str, str]]) -> list[str]:
        return [m.id for m in store.search(store.parse("Patient", params)).matches]

    assert found([("family", family)]) == [made.id]
    assert found([("family", family[:40].lower())]) == [made.id]
    assert found([("family:exact", family)]) == [made.id]
    assert found([("family:exact", family[:-1])]) == []
    assert found([("identifier", f"{system}|{value}")]) == [made.id]
    assert found([("identifier", value)]) == [made.id]
    assert found([("identifier", f"{system}|{value[:200]}")]) == []
    assert found([("family", "x" + family)]) == []


def test_long_tokens_match_only_themselves(store: SqlRepository) -> None:
    """Two identifiers alike in their first 260 characters are two identifiers: a
    search, a conditional create and a conditional update by one never take the
    other's resource, and no beginning of one finds it."""
    system, stem = "urn:test", "urn:uuid:" + "A" * 260
    one = store.create(
        {"resourceType": "Patient", "identifier": [{"system": system, "value": stem + "-one"}]}
    )

    def found(value: str) -> list[str]:
        query = store.parse("Patient", [("identifier", f"{system}|{value}")])
        return [m.id for m in store.search(query).matches]

    assert found(stem + "-one") == [one.id]
    assert found(stem + "-two") == [] and found(stem) == [] and found(stem[:256]) == []
    two = {"resourceType": "Patient", "identifier": [{"system": system, "value": stem + "-two"}]}
    created = store.create(two, if_none_exist=f"identifier={system}|{stem}-two")
    assert created.created and created.id != one.id
    updated = store.conditional_update({**two, "active": True}, f"identifier={system}|{stem}-three")
    assert updated.id not in (one.id, created.id)
    assert b"-one" in store.read("Patient", one.id).content


def test_contains_and_sort_see_the_first_512_characters_of_a_string(
    store: SqlRepository,
) -> None:
    """What the index holds of a long string, as the README says: its beginning."""
    store.load(
        [
            {"resourceType": "Patient", "id": "early", "name": [{"family": "needle" + "x" * 600}]},
            {"resourceType": "Patient", "id": "late", "name": [{"family": "x" * 510 + "needle"}]},
        ]
    )
    query = store.parse("Patient", [("family:contains", "needle")])
    assert [m.id for m in store.search(query).matches] == ["early"]
