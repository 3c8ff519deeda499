"""Search over stored resources, every parameter type: https://hl7.org/fhir/R4/search.html"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.errors import SearchError
from cpa_fhir.store import SearchResult, SqlRepository
from tests.store.conftest import BACKENDS, POSTGRES_URL, Postgres, example_resources

Params = list[tuple[str, str]]


def _open(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SqlRepository:
    if request.param == "sqlite":
        return SqlRepository(f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}")
    server: Postgres = request.getfixturevalue("postgres")
    return SqlRepository(POSTGRES_URL, schema=server.new_schema())


@pytest.fixture(scope="module", params=BACKENDS)
def examples(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqlRepository]:
    """The example records A-D, loaded once per backend."""
    store = _open(request, tmp_path_factory)
    store.load(example_resources())
    yield store
    store.close()


def search(store: SqlRepository, resource_type: str, params: Params) -> SearchResult:
    return store.search(store.parse(resource_type, params))


def ids(store: SqlRepository, resource_type: str, params: Params) -> list[str]:
    result = search(store, resource_type, [*params, ("_count", "1000")])
    assert result.total == len(result.matches)
    return [m.id for m in result.matches]


# --- the example records ----------------------------------------------------------

NHS = "https://fhir.nhs.uk/Id/nhs-number"
SNOMED = "http://snomed.info/sct"
ENHANCED, STANDARD = "1092221000000101", "1092211000000107"
PATIENTS = ["a-patient", "b-patient", "c-patient", "d-patient"]


def test_patient_by_nhs_number(examples: SqlRepository) -> None:
    a = examples.read("Patient", "a-patient").resource()
    nhs = next(i["value"] for i in a["identifier"] if i["system"] == NHS)
    assert ids(examples, "Patient", [("identifier", f"{NHS}|{nhs}")]) == ["a-patient"]
    assert ids(examples, "Patient", [("identifier", nhs)]) == ["a-patient"]
    assert ids(examples, "Patient", [("identifier", f"|{nhs}")]) == []
    assert ids(examples, "Patient", [("identifier", f"https://other|{nhs}")]) == []
    assert ids(examples, "Patient", [("identifier", f"{NHS}|")]) == PATIENTS


def test_care_plans_of_a_patient(examples: SqlRepository) -> None:
    params = [("subject", "Patient/c-patient"), ("status", "active")]
    assert ids(examples, "CarePlan", params) == [
        "c-careplan",
        "c-contingency-plan",
        "c-crisis-plan",
    ]
    assert ids(examples, "CarePlan", [("subject", "c-patient"), ("status", "draft")]) == []


@pytest.mark.parametrize(
    "params",
    [
        [("patient", "c-patient")],
        [("patient", "Patient/c-patient")],
        [("subject", "Patient/c-patient")],
        [("subject:Patient", "c-patient")],
        [("subject", "c-patient")],
    ],
)
def test_flags_of_a_patient(examples: SqlRepository, params: Params) -> None:
    assert len(ids(examples, "Flag", params)) == 4


def test_episodes_by_current_cpa_level(examples: SqlRepository) -> None:
    enhanced = ids(examples, "EpisodeOfCare", [("cpa-level", f"{SNOMED}|{ENHANCED}")])
    assert enhanced == ["c-episode", "d-episode"]
    # A was Enhanced once, but is Standard now: only the current level counts.
    standard = ids(examples, "EpisodeOfCare", [("cpa-level", STANDARD)])
    assert standard == ["a-episode", "b-episode"]


def test_token_or_and_not_and_missing(examples: SqlRepository) -> None:
    assert ids(examples, "Patient", [("gender", "male,female")]) == PATIENTS
    assert ids(examples, "Patient", [("gender", "male")]) == ["a-patient", "d-patient"]
    assert ids(examples, "Patient", [("gender:not", "male")]) == ["b-patient", "c-patient"]
    assert ids(examples, "Patient", [("gender", "male"), ("gender", "female")]) == []
    assert ids(examples, "Patient", [("gender:missing", "false")]) == PATIENTS
    assert ids(examples, "Patient", [("gender:missing", "true")]) == []
    assert ids(examples, "Patient", [("death-date:missing", "true")]) == PATIENTS


def test_uri(examples: SqlRepository) -> None:
    profile = "https://cpa-fhir.org/fhir/StructureDefinition/cpa-patient"
    assert ids(examples, "Patient", [("_profile", profile)]) == PATIENTS
    assert ids(examples, "Patient", [("_profile", profile[:-1])]) == []


def test_reference_target_type(examples: SqlRepository) -> None:
    assert ids(examples, "Patient", [("general-practitioner:Organization", "c-gp-practice")]) == [
        "c-patient"
    ]
    assert ids(examples, "Patient", [("general-practitioner:Practitioner", "c-gp-practice")]) == []
    with pytest.raises(SearchError):
        examples.parse("Flag", [("patient:Organization", "c-patient")])


def test_string_prefix_exact_and_contains(examples: SqlRepository) -> None:
    assert ids(examples, "Patient", [("family", "fictional-c")]) == ["c-patient"]
    assert ids(examples, "Patient", [("family", "FICTIONAL")]) == PATIENTS
    assert ids(examples, "Patient", [("family", "carey")]) == []
    assert ids(examples, "Patient", [("family:contains", "carey")]) == ["c-patient"]
    assert ids(examples, "Patient", [("family:exact", "Fictional-Carey")]) == ["c-patient"]
    assert ids(examples, "Patient", [("family:exact", "fictional-carey")]) == []
    assert ids(examples, "Patient", [("name", "fictional-a,fictional-b")]) == [
        "a-patient",
        "b-patient",
    ]
    # A LIKE wildcard in the value is a literal character.
    assert ids(examples, "Patient", [("family:contains", "%")]) == []


def test_dates(examples: SqlRepository) -> None:
    assert ids(examples, "Patient", [("birthdate", "1991")]) == ["a-patient"]
    assert ids(examples, "Patient", [("birthdate", "1991-07-14")]) == ["a-patient"]
    assert ids(examples, "Patient", [("birthdate", "lt1960")]) == ["d-patient"]
    assert ids(examples, "Patient", [("birthdate", "ge1989-09-30")]) == ["a-patient", "c-patient"]
    assert ids(examples, "Patient", [("birthdate", "gt1989-09-30")]) == ["a-patient"]
    assert ids(examples, "Patient", [("birthdate", "ne1991-07-14")]) == [
        "b-patient",
        "c-patient",
        "d-patient",
    ]
    # The admission (2026-04-08 to 2026-06-20) overlaps May but is not within it.
    may = [("date", "ge2026-05-01"), ("date", "le2026-05-31")]
    assert ids(examples, "Encounter", may) == ["c-admission-2026-04"]
    assert ids(examples, "Encounter", [("date", "2026-05")]) == []
    assert "c-admission-2026-04" in ids(examples, "Encounter", [("date", "2026")])
    assert ids(examples, "Encounter", [("date", "sa2026-10-20")]) == ["b-depot-2026-10"]
    # A dateTime with an offset compares in UTC: 10:00+01:00 is 09:00Z.
    assert ids(examples, "Encounter", [("date", "2026-10-20T09:00:00Z")]) == []
    assert ids(examples, "Encounter", [("date", "eb2022-01-11T10:00:01Z")]) == [
        "b-review-2020-01",
        "b-review-2021-01",
    ]
    # Open-ended periods run on for ever.
    assert "c-risk-self-harm" in ids(examples, "Flag", [("date", "gt2090")])


def test_id_and_last_updated(examples: SqlRepository) -> None:
    assert ids(examples, "Patient", [("_id", "a-patient,d-patient")]) == ["a-patient", "d-patient"]
    stored = examples.read("Patient", "a-patient").last_updated
    day = stored.strftime("%Y-%m-%d")
    assert ids(examples, "Patient", [("_lastUpdated", day)]) == PATIENTS
    assert ids(examples, "Patient", [("_lastUpdated", f"gt{day}")]) == []
    assert ids(examples, "Patient", [("_lastUpdated", f"lt{day}")]) == []
    assert ids(examples, "Patient", [("_lastUpdated", "ge2000")]) == PATIENTS


def test_sort(examples: SqlRepository) -> None:
    by_date = ids(examples, "Encounter", [("subject", "Patient/b-patient"), ("_sort", "date")])
    assert by_date[0] == "b-review-2020-01" and by_date[-1] == "b-depot-2026-10"
    descending = ids(examples, "Encounter", [("subject", "Patient/b-patient"), ("_sort", "-date")])
    assert descending == list(reversed(by_date))
    assert ids(examples, "Patient", [("_sort", "-family")]) == list(reversed(PATIENTS))
    assert ids(examples, "Patient", [("_sort", "-_id")]) == list(reversed(PATIENTS))
    assert ids(examples, "Patient", [("_sort", "gender,-birthdate")]) == [
        "c-patient",
        "b-patient",
        "a-patient",
        "d-patient",
    ]
    # Resources without the value come last either way.
    plans = ids(examples, "Condition", [("_sort", "-onset-date")])
    assert len(plans) == len(ids(examples, "Condition", []))


def test_paging_with_total(examples: SqlRepository) -> None:
    everything = ids(examples, "Encounter", [("_sort", "date")])
    pages: list[str] = []
    for offset in range(0, len(everything), 7):
        page = search(
            examples, "Encounter", [("_sort", "date"), ("_count", "7"), ("_offset", str(offset))]
        )
        assert page.total == len(everything)
        pages += [m.id for m in page.matches]
    assert pages == everything
    assert search(examples, "Encounter", [("_total", "none")]).total is None


def test_summary_count(examples: SqlRepository) -> None:
    result = search(examples, "Encounter", [("_summary", "count")])
    encounters = [r for r in example_resources() if r["resourceType"] == "Encounter"]
    assert result.total == len(encounters) and result.matches == []


def test_include_and_revinclude(examples: SqlRepository) -> None:
    result = search(
        examples,
        "CarePlan",
        [("subject", "c-patient"), ("_include", "CarePlan:subject"), ("_count", "2")],
    )
    assert [m.id for m in result.matches] == ["c-careplan", "c-contingency-plan"]
    assert [(i.resource_type, i.id) for i in result.included] == [("Patient", "c-patient")]
    typed = search(
        examples, "CarePlan", [("_id", "c-careplan"), ("_include", "CarePlan:subject:Group")]
    )
    assert typed.included == []
    result = search(
        examples,
        "Patient",
        [
            ("_id", "c-patient"),
            ("_revinclude", "Flag:patient"),
            ("_revinclude", "EpisodeOfCare:patient"),
        ],
    )
    assert sorted(i.id for i in result.included) == [
        "c-episode",
        "c-risk-disengagement",
        "c-risk-harm-to-others",
        "c-risk-self-harm",
        "c-risk-to-children",
    ]


def test_search_returns_stored_bytes(examples: SqlRepository) -> None:
    found = search(examples, "Patient", [("_id", "c-patient")]).matches[0]
    assert found.content == examples.read("Patient", "c-patient").content


# --- values the examples lack ------------------------------------------------------


def test_accents_numbers_and_quantities(store: SqlRepository) -> None:
    store.update(
        {"resourceType": "Patient", "id": "z", "name": [{"family": "Ñúñez", "given": ["Zoë"]}]}
    )
    store.update({"resourceType": "Patient", "id": "y", "name": [{"family": "Nunez"}]})
    assert ids(store, "Patient", [("given", "zoe")]) == ["z"]
    assert ids(store, "Patient", [("family", "NUÑ")]) == ["y", "z"]
    assert ids(store, "Patient", [("family:exact", "Ñúñez")]) == ["z"]
    for n, probability in enumerate([0.1, 0.25, 0.5, 100]):
        store.update(
            {
                "resourceType": "RiskAssessment",
                "id": f"r{n}",
                "status": "final",
                "subject": {"reference": "Patient/z"},
                "prediction": [{"probabilityDecimal": probability}],
            }
        )
    assert ids(store, "RiskAssessment", [("probability", "0.25")]) == ["r1"]
    assert ids(store, "RiskAssessment", [("probability", "0.3")]) == ["r1"]  # 0.25 <= x < 0.35
    assert ids(store, "RiskAssessment", [("probability", "gt0.25")]) == ["r2", "r3"]
    assert ids(store, "RiskAssessment", [("probability", "le0.25")]) == ["r0", "r1"]
    assert ids(store, "RiskAssessment", [("probability", "1e2")]) == ["r3"]
    assert ids(store, "RiskAssessment", [("probability", "ap110")]) == ["r3"]
    assert ids(store, "RiskAssessment", [("probability", "ne0.5")]) == ["r0", "r1", "r3"]
    store.update(
        {
            "resourceType": "Encounter",
            "id": "e",
            "status": "finished",
            "class": {"code": "AMB"},
            "length": {"value": 90, "system": "http://unitsofmeasure.org", "code": "min"},
        }
    )
    ucum = "http://unitsofmeasure.org"
    assert ids(store, "Encounter", [("length", f"90|{ucum}|min")]) == ["e"]
    assert ids(store, "Encounter", [("length", "gt60||min")]) == ["e"]
    assert ids(store, "Encounter", [("length", f"90|{ucum}|h")]) == []


# --- date prefixes against a reference implementation ---------------------------------


def _reference_range(text: str) -> tuple[datetime, datetime]:
    """[low, high) of a FHIR date, written independently of the store's own."""
    if len(text) == 4:
        return datetime(int(text), 1, 1, tzinfo=UTC), datetime(int(text) + 1, 1, 1, tzinfo=UTC)
    if len(text) == 7:
        year, month = int(text[:4]), int(text[5:])
        after = (year + 1, 1) if month == 12 else (year, month + 1)
        return datetime(year, month, 1, tzinfo=UTC), datetime(*after, 1, tzinfo=UTC)
    if len(text) == 10:
        low = datetime.fromisoformat(text).replace(tzinfo=UTC)
        return low, low + timedelta(days=1)
    low = datetime.fromisoformat(text)
    fraction = re.search(r"\.(\d+)", text)
    step = timedelta(milliseconds=1) if fraction else timedelta(seconds=1)
    return low, low + step


def _reference_match(prefix: str, target: tuple[datetime, datetime], value: str) -> bool:
    """The prefixes exactly as https://hl7.org/fhir/R4/search.html#prefix words them."""
    t_low, t_high = target
    s_low, s_high = _reference_range(value)
    contains = s_low <= t_low and t_high <= s_high
    above_overlaps = t_high > s_high  # the range above the search value meets the target
    below_overlaps = t_low < s_low
    return {
        "eq": contains,
        "ne": not contains,
        "gt": above_overlaps,
        "lt": below_overlaps,
        "ge": above_overlaps or contains,
        "le": below_overlaps or contains,
        "sa": t_low >= s_high,
        "eb": t_high <= s_low,
    }[prefix]


_ZONES = [UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5, minutes=-30))]


def _fhir_date(rng: Any) -> str:
    """A date/dateTime around new year 2020, at a random precision, in a random zone."""
    base = datetime(2019, 12, 30, tzinfo=UTC) + timedelta(seconds=rng.randrange(5 * 86400))
    moment = base.astimezone(rng.choice(_ZONES))
    precision = rng.choice(["year", "month", "day", "second", "millisecond"])
    if precision == "year":
        return f"{moment.year:04d}"
    if precision == "month":
        return f"{moment.year:04d}-{moment.month:02d}"
    if precision == "day":
        return moment.strftime("%Y-%m-%d")
    text = moment.isoformat(timespec="seconds" if precision == "second" else "milliseconds")
    return text.replace("+00:00", "Z")


_TARGETS = [_fhir_date(random.Random(n)) for n in range(60)]


@pytest.fixture(scope="module", params=BACKENDS)
def dated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqlRepository]:
    store = _open(request, tmp_path_factory)
    store.load(
        {
            "resourceType": "Condition",
            "id": f"c{n}",
            "subject": {"reference": "Patient/p"},
            "recordedDate": value,
        }
        for n, value in enumerate(_TARGETS)
    )
    yield store
    store.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    prefix=st.sampled_from(["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]),
    seed=st.integers(0, 10**9),
)
def test_date_prefixes_match_the_specification(
    dated: SqlRepository, prefix: str, seed: int
) -> None:
    value = _fhir_date(random.Random(seed))
    found = ids(dated, "Condition", [("recorded-date", f"{prefix}{value}")])
    expected = [
        f"c{n}"
        for n, target in enumerate(_TARGETS)
        if _reference_match(prefix, _reference_range(target), value)
    ]
    assert sorted(found) == sorted(expected), value
