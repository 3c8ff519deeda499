"""Index rows and the compiled SearchParameter paths."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fhirpathpy import compile as compile_fhirpath
from fhirpathpy.models import models
from hypothesis import given
from hypothesis import strategies as st

from cpa_fhir.store import default_search_parameters, index_resource, normalise
from cpa_fhir.store._dates import MAX_TIME, MIN_TIME, date_range, to_micros, value_ranges
from cpa_fhir.store._indexing import RecordIndexer
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


# -- RecordIndexer: the server's own records, made from templates ----------------------

_AUDIT_PARAMETERS = PARAMETERS.indexed("AuditEvent")
_instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.isoformat().replace("+00:00", "Z"))
_codes = st.sampled_from(["R", "E", "C", "110106", "110152", "withheld-offending"])
_refs = st.sampled_from(
    ["Organization/gp", "CarePlan/c-careplan", "Patient/c-patient", "Practitioner/p1"]
)


@st.composite
def _audit_events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": draw(st.uuids()).hex,
        "meta": {
            "versionId": draw(st.sampled_from(["1", "2"])),
            "lastUpdated": draw(_instants),
            "profile": draw(st.lists(st.sampled_from(["https://a/p1", "https://a/p2"]))),
            "security": [{"system": "https://a/s", "code": draw(_codes)}],
        },
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": draw(_codes)},
        "action": draw(_codes),
        "recorded": draw(_instants),
        "outcome": draw(st.sampled_from(["0", "4"])),
        "agent": [
            {"who": {"reference": draw(_refs)}, "requestor": draw(st.booleans())}
            for _ in range(draw(st.integers(1, 3)))
        ],
        "entity": [{"what": {"reference": draw(_refs)}} for _ in range(draw(st.integers(0, 3)))],
    }
    return event


@given(st.lists(_audit_events(), min_size=1, max_size=6), st.data())
def test_record_indexer_gives_the_rows_indexing_would(
    templates: list[dict[str, Any]], data: st.DataObject
) -> None:
    """Records alike but for id, time and version metadata, and records unlike: each
    gets exactly the rows `index_resource` gives it, whatever was indexed before."""
    indexer = RecordIndexer()
    for _ in range(12):
        template = data.draw(st.sampled_from(templates))
        record = {
            **template,
            "id": data.draw(st.uuids()).hex,
            "recorded": data.draw(_instants),
            "meta": {**template["meta"], "lastUpdated": data.draw(_instants)},
        }
        assert indexer.index(record, _AUDIT_PARAMETERS) == index_resource(record, _AUDIT_PARAMETERS)


def test_record_indexer_indexes_only_what_varies_once_it_knows_a_template() -> None:
    indexer = RecordIndexer()
    calls: list[str] = []
    counted = tuple(
        dataclasses.replace(p, evaluate=lambda r, p=p: (calls.append(p.code), p.evaluate(r))[1])
        for p in _AUDIT_PARAMETERS
    )
    event = {
        "resourceType": "AuditEvent",
        "id": "a",
        "recorded": "2026-11-01T10:00:00Z",
        "meta": {"lastUpdated": "2026-11-01T10:00:00Z", "profile": ["https://a/p"]},
        "agent": [{"who": {"reference": "Organization/gp"}}],
    }
    indexer.index(event, counted)
    assert len(calls) == len(counted)
    calls.clear()
    again = {**event, "id": "b", "recorded": "2026-11-02T10:00:00Z"}
    rows = indexer.index(again, counted)
    assert calls == ["date"]  # the only parameter that reads what differs
    assert rows == index_resource(again, _AUDIT_PARAMETERS)
