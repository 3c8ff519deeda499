"""Index rows and the compiled SearchParameter paths."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fhirpathpy import compile as compile_fhirpath
from fhirpathpy.models import models
from hypothesis import given
from hypothesis import strategies as st

from cpa_fhir.store import default_search_parameters, index_resource, normalise
from cpa_fhir.store._dates import MAX_TIME, MIN_TIME, date_range, to_micros, value_ranges
from cpa_fhir.store._paths import compile_path
from tests.store.conftest import example_resources

RESOURCES = example_resources()
PARAMETERS = default_search_parameters()


def _micros(*args: int) -> int:
    return to_micros(datetime(*args, tzinfo=UTC))  # type: ignore[misc]


def _comparable(values: list[object]) -> list[str]:
    return sorted(json.dumps(v, sort_keys=True, default=str) for v in values)


def test_compiled_paths_agree_with_fhirpath() -> None:
    """Where fhirpathpy can evaluate an expression alone, the fast walker gives the same."""
    compared = 0
    for resource in RESOURCES:
        for parameter in PARAMETERS.indexed(resource["resourceType"]):
            walker = compile_path(parameter.expression)
            # resolve() needs a server, and fhirpathpy cannot start at Resource.
            if walker is None or "resolve()" in parameter.expression:
                continue
            if parameter.expression.startswith("Resource.") or parameter.code == "cpa-level":
                continue
            expected = compile_fhirpath(parameter.expression, models["r4"])(resource)
            assert _comparable(walker(resource)) == _comparable(expected), parameter
            compared += 1
    assert compared > 500


def test_nearly_every_expression_compiles() -> None:
    expressions = {p.expression for t in PARAMETERS.resource_types() for p in PARAMETERS.indexed(t)}
    slow = {e for e in expressions if compile_path(e) is None}
    assert slow == {
        "Patient.deceased.exists() and Patient.deceased != false",
        "Bundle.entry[0].resource",
    }


def test_where_resolve_is_reads_the_reference_type() -> None:
    walker = compile_path("Flag.subject.where(resolve() is Patient)")
    assert walker is not None
    assert walker({"resourceType": "Flag", "subject": {"reference": "Patient/1"}})
    assert not walker({"resourceType": "Flag", "subject": {"reference": "Group/1"}})
    assert walker({"resourceType": "Flag", "subject": {"reference": "https://x/fhir/Patient/1"}})
    assert not walker({"resourceType": "Flag", "subject": {"reference": "#contained"}})


def test_patient_rows() -> None:
    patient = next(r for r in RESOURCES if r["id"] == "a-patient")
    rows = index_resource(patient, PARAMETERS.indexed("Patient"))
    nhs = next(i["value"] for i in patient["identifier"] if "nhs-number" in i["system"])
    assert ("identifier", "https://fhir.nhs.uk/Id/nhs-number", nhs) in rows.tokens
    assert ("gender", None, "male") in rows.tokens
    assert ("family", "Fictional-Abbott", "fictional-abbott") in rows.strings
    assert ("general-practitioner", "Organization", "a-gp-practice", None) in rows.references
    assert ("birthdate", _micros(1991, 7, 14), _micros(1991, 7, 15)) in rows.dates
    phone = next(t for t in patient["telecom"] if t["system"] == "phone")["value"]
    assert ("phone", None, phone) in rows.tokens


def test_current_cpa_level_only() -> None:
    episode = next(r for r in RESOURCES if r["id"] == "a-episode")
    rows = index_resource(episode, PARAMETERS.indexed("EpisodeOfCare"))
    levels = {c for p, _, c in rows.tokens if p == "cpa-level"}
    assert levels == {"1092211000000107"}  # Standard now; Enhanced has ended


def test_every_example_indexes() -> None:
    for resource in RESOURCES:
        rows = index_resource(resource, PARAMETERS.indexed(resource["resourceType"]))
        assert rows.count() > 0, resource["id"]


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("2026", _micros(2026, 1, 1), _micros(2027, 1, 1)),
        ("2026-12", _micros(2026, 12, 1), _micros(2027, 1, 1)),
        ("2024-02-29", _micros(2024, 2, 29), _micros(2024, 3, 1)),
        ("2026-04-03T10:15", _micros(2026, 4, 3, 10, 15), _micros(2026, 4, 3, 10, 16)),
        ("2026-04-03T10:15:30Z", _micros(2026, 4, 3, 10, 15, 30), _micros(2026, 4, 3, 10, 15, 31)),
        (
            "2026-04-03T10:15:30.5+01:00",
            _micros(2026, 4, 3, 9, 15, 30, 500000),
            _micros(2026, 4, 3, 9, 15, 30, 600000),
        ),
        ("9999", _micros(9999, 1, 1), MAX_TIME),
    ],
)
def test_date_ranges(text: str, low: int, high: int) -> None:
    assert date_range(text) == (low, high)


@pytest.mark.parametrize(
    "text", ["", "26", "2026-13", "2026-02-30", "2026-01-01T25:00", "0000", "2026-01-01 10:00"]
)
def test_not_dates(text: str) -> None:
    assert date_range(text) is None


def test_periods_are_open_ended() -> None:
    assert value_ranges({"start": "2026"}) == [(_micros(2026, 1, 1), MAX_TIME)]
    assert value_ranges({"end": "2026"}) == [(MIN_TIME, _micros(2027, 1, 1))]
    assert value_ranges({"start": "garbage"}) == []


@given(st.text(max_size=30))
def test_date_range_is_total_and_ordered(text: str) -> None:
    found = date_range(text)
    assert found is None or found[0] < found[1]


@given(st.text(max_size=20))
def test_normalise_is_idempotent_and_case_blind(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once
    assert normalise(text.upper()) == normalise(text.lower()) or not text.isascii()


def test_normalise_strips_accents() -> None:
    assert normalise("Zoë Ñúñez STRASSE") == normalise("zoe nunez strasse")
