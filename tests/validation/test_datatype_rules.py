"""The rules of FHIR's own datatypes and JSON form hold wherever a value sits: a
Period ends after it starts (per-1), a contact value has its system (cpt-2), a local
reference names something contained (ref-1); no nulls, no empty arrays."""

from __future__ import annotations

from typing import Any

import pytest

from cpa_fhir.conformance import default_package
from cpa_fhir.validation import Validator

VALIDATOR = Validator(default_package())


def _rules(resource: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    return [(i.rule, i.expression) for i in VALIDATOR.validate(resource) if i.is_error]


def _observation(**changes: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, **changes}


@pytest.mark.parametrize(
    ("period", "broken"),
    [
        ({"start": "2026-01-01", "end": "2020-01-01"}, True),
        ({"start": "2020-01-01", "end": "2026-01-01"}, False),
        ({"start": "2026-01-01T10:00:00Z", "end": "2026-01-01T09:00:00Z"}, True),
        ({"start": "2026-01-01"}, False),
        (
            {
                "_start": {"extension": [{"url": "https://local.example/x", "valueString": "y"}]},
                "end": "2020-01-01",
            },
            False,
        ),  # fmt: skip
    ],
)
def test_a_period_ends_after_it_starts(period: dict[str, Any], broken: bool) -> None:
    rules = _rules(_observation(effectivePeriod=period))
    assert (("per-1", "Observation.effectivePeriod") in rules) == broken, rules


def test_a_contact_value_has_its_system() -> None:
    assert ("cpt-2", "Patient.telecom[0]") in _rules(
        {"resourceType": "Patient", "telecom": [{"value": "01234 567890"}]}
    )
    assert _rules({"resourceType": "Patient", "telecom": [{"system": "phone", "value": "1"}]}) == []


def test_a_local_reference_names_something_contained() -> None:
    contained = [{"resourceType": "Practitioner", "id": "p1"}]
    assert _rules(_observation(contained=contained, performer=[{"reference": "#p1"}])) == []
    assert ("ref-1", "Observation.performer[0].reference") in _rules(
        _observation(contained=contained, performer=[{"reference": "#p2"}])
    )


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("valueString", None),
        ("identifier", []),
        ("note", []),
        ("_status", None),  # a primitive's extensions: null where no value stands beside it
        ("_issued", []),
    ],
)
def test_nulls_and_empty_arrays_are_not_fhir_json(element: str, value: Any) -> None:
    """Nulls are FHIR JSON only in an array of primitives or of their extensions, to
    keep the two in step (`"_given": [null, {...}]`)."""
    assert any(e == f"Observation.{element}" for _, e in _rules(_observation(**{element: value})))


def test_a_null_beside_a_primitive_in_an_array_is_fhir_json() -> None:
    patient = {
        "resourceType": "Patient",
        "name": [{"given": ["Ann", "Bea"], "_given": [None, {"id": "b"}]}],
    }
    assert _rules(patient) == []


@pytest.mark.parametrize(
    "period",
    [
        {"start": "2026-04-03", "end": "2026-04-03T00:30:00+01:00"},  # a day and a time in it
        {"start": "2026-05", "end": "2026-05-01T00:15:00+01:00"},
        {"start": "2026-04-03T10:00:00+01:00", "end": "2026-04-03T09:30:00Z"},  # 09:00Z first
    ],
)
def test_ends_of_different_precision_or_zone_are_compared_as_fhirpath_does(
    period: dict[str, Any],
) -> None:
    assert _rules(_observation(effectivePeriod=period)) == []


def test_a_contained_resource_may_name_another_its_container_holds() -> None:
    observation = _observation(
        contained=[
            {"resourceType": "Practitioner", "id": "p1", "name": [{"family": "Okafor"}]},
            {"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "#p1"}},
        ],
        performer=[{"reference": "#r1"}],
    )
    assert _rules(observation) == []


def _errors(resource: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [(i.expression, i.message) for i in VALIDATOR.validate(resource) if i.is_error]


@pytest.mark.parametrize(
    ("element", "value", "said"),
    [
        (
            "valueBoolean",
            "false",
            "A boolean must be true or false in JSON, not the string 'false'",
        ),
        ("valueBoolean", 0, "A boolean must be true or false in JSON, not the number 0"),
        ("valueInteger", True, "An integer must be a whole number in JSON, not true"),
        ("valueInteger", 1.0, "An integer must be a whole number in JSON, not the number 1.0"),
        ("valueString", 5, "A string must be a string in JSON, not the number 5"),
        ("valueDateTime", 2026, "A dateTime must be a string in JSON, not the number 2026"),
    ],
)
def test_a_primitive_has_its_json_form(element: str, value: Any, said: str) -> None:
    """FHIR JSON writes booleans as true/false, numbers as numbers, the rest as strings:
    the model parse would take "false" or 0 for false, and a record recorded inactive
    that way would read as active to anything that reads JSON."""
    errors = _errors(_observation(**{element: value}))
    assert (f"Observation.{element}", said) in errors, errors
    good = {"valueBoolean": False, "valueInteger": 1, "valueString": "5", "valueDateTime": "2026"}
    assert not _errors(_observation(**{element: good[element]}))


def test_a_decimal_may_be_any_json_number_and_nothing_else() -> None:
    quantity = {"value": 1, "unit": "mg"}
    assert not _errors(_observation(valueQuantity=quantity))
    assert not _errors(_observation(valueQuantity={**quantity, "value": 1.5}))
    errors = _errors(_observation(valueQuantity={**quantity, "value": "1.5"}))
    assert (
        "Observation.valueQuantity.value",
        "A decimal must be a number in JSON, not the string '1.5'",
    ) in errors


@pytest.mark.parametrize("mime", ["image/jpeg", "application/pdf", "text/plain; charset=utf-8"])
def test_an_attachment_may_be_of_any_mime_type(mime: str) -> None:
    """The mimetypes ValueSet is all of BCP 13, which no package can list: a bare code of
    a system that cannot be enumerated is not known to be outside it."""
    document = {"contentType": mime, "url": "https://example.org/letter"}
    attached = {"url": "https://local.example/letter", "valueAttachment": document}
    assert not _errors(_observation(extension=[attached]))
    wrong = {**attached, "valueAttachment": {**document, "contentType": 7}}
    assert _errors(_observation(extension=[wrong]))


@pytest.mark.parametrize(
    ("resource", "said"),
    [
        ({"resourceType": "Procedure", "status": "completed", "bogus": "x"}, "Procedure.bogus"),
        ({"resourceType": "Procedure", "status": "completed"}, "Procedure.subject"),
        (
            _observation(contained=[{"resourceType": "Basic", "id": "b"}]),
            "Observation.contained[0].code",
        ),
    ],
)
def test_a_type_without_a_definition_here_is_still_checked_for_its_elements(
    resource: dict[str, Any], said: str
) -> None:
    """The R4 definitions vendored here do not hold every type (Procedure, Basic, ...):
    for those the models alone can say an element is unknown or a required one
    missing, and they must, or anything at all would pass for one."""
    assert said in [where for where, _ in _errors(resource)]
    fine = {
        "resourceType": "Procedure",
        "status": "completed",
        "subject": {"reference": "Patient/p"},
    }
    assert _errors(fine) == []
