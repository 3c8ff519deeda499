"""`_summary` and `_elements` (cpa_fhir.fhir.subset): what is kept, what is marked."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpa_fhir.fhir.subset import (
    SUBSETTED,
    SubsetError,
    element_rules,
    requested_elements,
    subset,
)
from tests.common import EXAMPLES

RESOURCES: list[dict[str, Any]] = [
    e["resource"]
    for path in sorted(EXAMPLES.glob("Bundle-record-*.json"))
    for e in orjson.loads(path.read_bytes())["entry"]
]
CARE_PLAN = next(r for r in RESOURCES if r["resourceType"] == "CarePlan")
PATIENT = next(r for r in RESOURCES if r["resourceType"] == "Patient")


def _tags(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return list(resource["meta"]["tag"])


def test_a_summary_keeps_the_summary_and_mandatory_elements_and_says_it_is_partial() -> None:
    part = subset(CARE_PLAN, summary="true")
    rules = element_rules("CarePlan")
    assert rules is not None
    assert "activity" in CARE_PLAN and "activity" not in part  # not a summary element
    assert "text" not in part
    assert {"status", "intent", "subject"} <= part.keys()  # mandatory
    assert part.keys() - {"resourceType", "id", "meta"} <= rules.summary | rules.mandatory
    assert SUBSETTED in _tags(part)


def test_text_keeps_the_narrative_and_what_must_be_there_and_data_drops_only_the_narrative() -> (
    None
):
    with_text = {**PATIENT, "text": {"status": "generated", "div": "<div>x</div>"}}
    text = subset(with_text, summary="text")
    # Patient has no element every instance must have, but modifiers stay (active).
    assert text.keys() == {"resourceType", "id", "meta", "text"} | (PATIENT.keys() & {"active"})
    data = subset(with_text, summary="data")
    assert data.keys() == with_text.keys() - {"text"} | {"meta"}
    assert SUBSETTED in _tags(data)


def test_elements_keep_what_is_named_choices_and_primitive_extensions_with_it() -> None:
    patient = {
        **copy.deepcopy(PATIENT),
        "deceasedBoolean": False,
        "_birthDate": {"extension": [{"url": "http://example.org/x", "valueString": "y"}]},
    }
    part = subset(patient, elements=requested_elements("Patient", "birthDate,deceased"))
    named = {"resourceType", "id", "meta", "birthDate", "_birthDate", "deceasedBoolean"}
    assert part.keys() == named | (PATIENT.keys() & {"active"})
    assert part["_birthDate"] == patient["_birthDate"]


def test_subsetting_twice_marks_once_and_never_changes_its_input() -> None:
    before = copy.deepcopy(CARE_PLAN)
    once = subset(CARE_PLAN, summary="true")
    twice = subset(once, summary="true")
    assert CARE_PLAN == before
    assert twice == once and _tags(twice).count(SUBSETTED) == 1


def test_nothing_asked_or_a_type_without_a_definition_goes_whole() -> None:
    assert subset(CARE_PLAN) is CARE_PLAN
    odd = {"resourceType": "ImmunizationEvaluation", "id": "x", "status": "completed"}
    assert subset(odd, summary="true") is odd


@pytest.mark.parametrize(
    "value", ["shoe", "CarePlan.shoe", "Patient.name", "name.family", "Status", "1x"]
)
def test_an_element_the_type_does_not_have_is_refused(value: str) -> None:
    with pytest.raises(SubsetError):
        requested_elements("CarePlan", value)


def test_the_type_may_be_named_and_blank_items_are_passed_over() -> None:
    assert requested_elements("CarePlan", "CarePlan.title, status,,") == {"title", "status"}


@settings(max_examples=300, deadline=None)
@given(
    resource=st.sampled_from(RESOURCES),
    summary=st.sampled_from([None, "true", "text", "data"]),
    data=st.data(),
)
def test_a_part_holds_only_what_the_whole_holds_unchanged(
    resource: dict[str, Any], summary: Any, data: st.DataObject
) -> None:
    rules = element_rules(resource["resourceType"])
    assert rules is not None
    if summary is not None:
        part = subset(resource, summary=summary)
        wanted = None
    else:
        # Names the type has, most of them present in the resource.
        present = sorted(n for k in resource if (n := rules.name_of(k)) is not None)
        names = st.sampled_from(present) | st.sampled_from(sorted(rules.elements))
        wanted = frozenset(data.draw(st.lists(names, min_size=1, max_size=6)))
        part = subset(resource, elements=wanted)
        assert wanted & set(present) <= {rules.name_of(k) for k in part}  # all asked for
    for key, value in part.items():
        if key != "meta":
            assert resource[key] == value  # nothing added, nothing altered
    assert {k: v for k, v in part["meta"].items() if k != "tag"} == {
        k: v for k, v in resource.get("meta", {}).items() if k != "tag"
    }
    assert rules.mandatory & {rules.name_of(k) for k in resource} <= {
        rules.name_of(k) for k in part
    }
    if wanted is not None:
        assert {rules.name_of(k) for k in part} - {None} <= wanted | rules.mandatory | {
            "id",
            "meta",
        }
