"""The fast filter shares, withholds and labels exactly what the reference filter does.

`reference_filter` is the filter as first written (deep copies, whole-resource
walks, required elements checked everywhere). Here both run on the same labelled
records and decisions, and their outputs must be equal: the shared resources
(fullUrl and content, in order), the withheld items (in order) and the shared
categories. Records: the example records A-D under every recipient type and
consent state of the decision table, the generated records of the property tests
under generated consents and under arbitrary sets of allowed categories, and
hand-made records with the awkward shapes a FHIR record may take.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.conformance import ConformancePackage
from cpa_fhir.consent import (
    Basis,
    Decision,
    LabelledResource,
    Recipient,
    RequiredElements,
    SharingPolicy,
    decide,
    filter_record,
    label_resources,
    record_entries,
    resolve_recipient,
)
from cpa_fhir.errors import RecipientError
from tests.consent import reference_filter
from tests.consent.test_decision_table import (
    CASES,
    EXCEPTIONS,
    OWN,
    RECIPIENTS,
    _recipient,
    _variants,
    _with_consent,
)
from tests.consent.test_decision_table import RECORDS as EXAMPLE_RECORDS
from tests.consent.test_properties import SHARING, Case, cases, generated_records

AT = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def oracle_required(package: ConformancePackage) -> reference_filter.RequiredElements:
    return reference_filter.RequiredElements(package)


def assert_same_as_reference(
    labelled: list[LabelledResource],
    decision: Decision,
    policy: SharingPolicy,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    """Filter with both, compare, and check the input was not changed."""
    before = copy.deepcopy([item.resource for item in labelled])
    try:
        expected = reference_filter.filter_record(labelled, decision, policy, oracle_required)
    except Exception as exc:  # what cannot be filtered must fail the same way
        with pytest.raises(type(exc)):
            filter_record(labelled, decision, policy, required)
        return
    assert [item.resource for item in labelled] == before
    result = filter_record(labelled, decision, policy, required)
    assert [item.resource for item in labelled] == before, "the record must not be changed"
    assert result.withheld == expected.withheld
    assert result.shared_categories == expected.shared_categories
    assert [url for url, _ in result.shared] == [url for url, _ in expected.shared]
    for (_, got), (_, want) in zip(result.shared, expected.shared, strict=True):
        assert got == want
        # Same keys in the same order: the bytes that leave are the same too.
        assert orjson.dumps(got) == orjson.dumps(want)
    # The serialised entries are those entries, byte for byte.
    assert result.entry_bytes() == [
        orjson.dumps({"fullUrl": url, "resource": res} if url else {"resource": res})
        for url, res in expected.shared
    ]
    # Filtering again gives the same: nothing was kept from the first time that should not be.
    again = filter_record(labelled, decision, policy, required)
    assert again.shared == result.shared and again.withheld == result.withheld


def _decision(
    record: dict[str, Any], recipient: Recipient, purpose: str, exceptions: tuple[str, ...]
) -> Decision | None:
    entries = record_entries(record)
    resources = {f"{r['resourceType']}/{r['id']}": r for _, r in entries}
    consents = [r for r in resources.values() if r["resourceType"] == "Consent"]
    try:
        return decide(
            consents, recipient, purpose, AT, SHARING, exceptions=exceptions, resources=resources
        )
    except RecipientError:
        return None


# -- the example records under the decision table's recipients and consent states -----


@pytest.mark.parametrize(
    ("letter", "kind", "variant", "exception"),
    CASES,
    ids=[f"{a}-{b}-{c}-{d or 'no-exception'}" for a, b, c, d in CASES],
)
def test_decision_table_cases(
    letter: str,
    kind: str,
    variant: str,
    exception: str | None,
    policy: SharingPolicy,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    record = EXAMPLE_RECORDS[letter]
    recipient = _recipient(record, kind)
    purpose = RECIPIENTS[kind][1]
    status, period, provisions, _ = _variants(recipient.reference, purpose)[variant]
    record = _with_consent(record, status, period, provisions)
    if exception and kind not in EXCEPTIONS[exception][0]:
        return  # refused before filtering (test_decision_table checks that)
    decision = _decision(record, recipient, purpose, (exception,) if exception else ())
    assert decision is not None
    labelled = label_resources(record_entries(record), policy)
    assert_same_as_reference(labelled, decision, policy, required, oracle_required)


@pytest.mark.parametrize(("letter", "to", "purpose", "exceptions", "allowed"), OWN)
def test_examples_own_consents(
    letter: str,
    to: str,
    purpose: str,
    exceptions: tuple[str, ...],
    allowed: set[str],
    policy: SharingPolicy,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    record = EXAMPLE_RECORDS[letter]
    entries = record_entries(record)
    recipient = resolve_recipient(to, [r for _, r in entries], policy)
    decision = _decision(record, recipient, purpose, exceptions)
    assert decision is not None
    labelled = label_resources(entries, policy)
    assert_same_as_reference(labelled, decision, policy, required, oracle_required)


# -- generated records ----------------------------------------------------------------


@PROPERTY_SETTINGS
@given(case=cases())
def test_generated_records_and_consents(
    case: Case,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    decision = _decision(case.g.record, case.recipient, case.purpose, case.exceptions)
    if decision is None:
        return
    labelled = label_resources(record_entries(case.g.record), SHARING)
    assert_same_as_reference(labelled, decision, SHARING, required, oracle_required)


def _allowing(categories: set[str]) -> Decision:
    recipient = Recipient("Organization/x-anyone", "gp-practice")
    allowed = {c: Basis(c, consent="Consent/x") for c in sorted(categories)}
    denied = {c: "no consent covers it" for c in SHARING.categories if c not in categories}
    return Decision(recipient, "TREAT", AT, allowed, denied)


@PROPERTY_SETTINGS
@given(
    g=generated_records(),
    allowed=st.sets(st.sampled_from(sorted(SHARING.categories))),
)
def test_generated_records_any_allowed_categories(
    g: Any,
    allowed: set[str],
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    """Decisions no consent would make: every mix of allowed and withheld categories."""
    labelled = label_resources(record_entries(g.record), SHARING)
    assert_same_as_reference(labelled, _allowing(allowed), SHARING, required, oracle_required)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    letter=st.sampled_from(sorted(EXAMPLE_RECORDS)),
    allowed=st.sets(st.sampled_from(sorted(SHARING.categories))),
    data=st.data(),
)
def test_parts_of_records(
    letter: str,
    allowed: set[str],
    data: st.DataObject,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    """Callers may filter some of what they labelled, in another order, or twice over."""
    labelled = label_resources(record_entries(EXAMPLE_RECORDS[letter]), SHARING)
    picked = data.draw(st.lists(st.sampled_from(labelled), max_size=len(labelled) + 3))
    assert_same_as_reference(picked, _allowing(allowed), SHARING, required, oracle_required)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    record=st.one_of(
        st.sampled_from(sorted(EXAMPLE_RECORDS)).map(lambda letter: EXAMPLE_RECORDS[letter]),
        generated_records().map(lambda g: g.record),
    ),
    allowed=st.sets(st.sampled_from(sorted(SHARING.categories))),
    data=st.data(),
)
def test_elements_left_unread_where_nothing_of_a_resource_goes(
    record: dict[str, Any],
    allowed: set[str],
    data: st.DataObject,
    required: RequiredElements,
) -> None:
    """The server reads the elements of what a search's matches refer to only where the
    client may get some of it (`elements_wanted`): one whose whole carries a category
    withheld goes not at all, whatever its elements say. What is shared is then
    exactly what is shared when every element of the record is read."""
    entries = record_entries(copy.deepcopy(record))
    keys = sorted({f"{r['resourceType']}/{r.get('id')}" for _, r in entries})
    matches = set(data.draw(st.lists(st.sampled_from(keys), max_size=4)))
    decision = _allowing(allowed)
    asked: list[str] = []

    def wanted(key: str, categories: frozenset[str]) -> bool:
        asked.append(key)
        return key in matches or categories <= allowed

    every = filter_record(label_resources(entries, SHARING), decision, SHARING, required)
    some = label_resources(entries, SHARING, elements_wanted=wanted)
    assert set(asked) == set(keys)
    assert filter_record(some, decision, SHARING, required).shared == every.shared


def test_elements_read_of_what_holds_contained_resources(required: RequiredElements) -> None:
    """A resource matching no rule of its own carries the default category as a whole,
    until what it contains is read: that takes its place. Left unread, the Condition
    here would carry the default category, and go not at all, where read it carries
    medication alone, and goes with the Goal that names it."""
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p"},
        "contained": [{"resourceType": "Medication", "id": "m1", "code": {"text": "x"}}],
    }
    entries = _entries(
        _patient(), _goal("g1", addresses=[{"reference": "Condition/c1"}]), condition
    )
    allowed = set(SHARING.categories) - {SHARING.default_category}
    decision = _allowing(allowed)

    def wanted(key: str, categories: frozenset[str]) -> bool:
        return key == "Goal/g1" or categories <= allowed

    every = filter_record(label_resources(entries, SHARING), decision, SHARING, required)
    some = label_resources(entries, SHARING, elements_wanted=wanted)
    assert "Condition/c1" in {r["resourceType"] + "/" + r["id"] for _, r in every.shared}
    assert filter_record(some, decision, SHARING, required).shared == every.shared


# -- awkward shapes -------------------------------------------------------------------

BASE = "https://example.org/fhir/"


def _entries(*resources: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    return [(BASE + f"{r['resourceType']}/{r['id']}", r) for r in resources]


def _patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p",
        "name": [{"family": "Fictional"}],
        "birthDate": "1980-01-01",
    }


def _flag(id_: str, code: str = "self-harm") -> dict[str, Any]:
    return {
        "resourceType": "Flag",
        "id": id_,
        "meta": {"profile": ["https://cpa-fhir.org/fhir/StructureDefinition/cpa-risk-flag"]},
        "status": "active",
        "category": [{"text": "risk"}],
        "code": {
            "coding": [
                {"system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-risk-type", "code": code}
            ]
        },
        "subject": {"reference": "Patient/p"},
        "period": {"start": "2026-01-01"},
    }


def _goal(id_: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Goal",
        "id": id_,
        "lifecycleStatus": "active",
        "description": {"text": "stay well"},
        "subject": {"reference": "Patient/p"},
        **extra,
    }


def _org(id_: str) -> dict[str, Any]:
    return {"resourceType": "Organization", "id": id_, "name": f"Organisation {id_}"}


AWKWARD: dict[str, list[dict[str, Any]]] = {
    "references every way": [
        _patient(),
        _flag("f1"),
        _org("o1"),
        _goal(
            "g1",
            addresses=[
                {"reference": "Flag/f1"},
                {"reference": BASE + "Flag/f1"},
                {"reference": "Flag/f1/_history/2"},
                {"reference": BASE + "Flag/f1/_history/2"},
                {"reference": "urn:uuid:0d6d2b3e-4f6b-4a5b-9a33-111111111111"},
                {"reference": "https://elsewhere.example/fhir/Flag/f9"},
                {"reference": "#contained-1"},
                {"reference": "Flag/missing"},
                {"reference": "not a reference"},
            ],
            expressedBy={"reference": BASE + "Organization/o1", "display": "them"},
        ),
    ],
    "required list emptied, and optional list emptied": [
        _patient(),
        _flag("f1"),
        _flag("f2", "harm-to-others"),
        {
            "resourceType": "CareTeam",
            "id": "t1",
            "meta": {"profile": ["https://cpa-fhir.org/fhir/StructureDefinition/cpa-care-team"]},
            "subject": {"reference": "Patient/p"},
            "participant": [
                {"role": [{"text": "risk"}], "member": {"reference": "Flag/f1"}},
                {"role": [{"text": "risk"}], "member": {"reference": "Flag/f2"}},
            ],
            "reasonReference": [{"reference": "Flag/f1"}, {"reference": "Flag/f2"}],
            "note": [{"text": "about Flag/f1"}],
        },
    ],
    "a resource lacking a required element already": [
        _patient(),
        _flag("f1"),
        {
            "resourceType": "CareTeam",
            "id": "t1",
            "meta": {"profile": ["https://cpa-fhir.org/fhir/StructureDefinition/cpa-care-team"]},
            "participant": [{"role": [{"text": "risk"}], "member": {"reference": "Patient/p"}}],
            "reasonReference": [{"reference": "Flag/f1"}],
            "managingOrganization": [{"reference": "Flag/f1"}],
        },
        {"resourceType": "Goal", "id": "g1", "addresses": [{"reference": "Flag/f1"}]},
    ],
    "masked reference a profile needs whole": [
        _patient(),
        _flag("f1"),
        {
            "resourceType": "RelatedPerson",
            "id": "rp",
            "meta": {"profile": ["https://cpa-fhir.org/fhir/StructureDefinition/cpa-carer"]},
            "patient": {"reference": "Flag/f1"},
            "relationship": [{"text": "son"}],
            "name": [{"family": "Fictional"}],
        },
    ],
    "nested references": [
        _patient(),
        _flag("f1"),
        _org("o1"),
        _goal(
            "g1",
            addresses=[
                {
                    "reference": "Flag/f1",
                    "extension": [
                        {"url": "x", "valueReference": {"reference": "Organization/o1"}},
                        {"url": "y", "valueReference": {"reference": "Flag/f1"}},
                    ],
                }
            ],
        ),
    ],
    "empty containers in the input": [
        _patient(),
        _flag("f1"),
        _goal("g1", addresses=[{"reference": "Flag/f1"}], note=[], extension=[{}]),
        _goal("g2", note=[], outcomeCode=[{}]),
    ],
    "a reference at the root": [
        _patient(),
        _flag("f1"),
        _goal("g1", reference="Flag/f1"),
    ],
    "lists of lists": [
        _patient(),
        _flag("f1"),
        _goal("g1", odd=[[{"reference": "Flag/f1"}], [{"reference": "Patient/p"}]]),
    ],
    "mixed list": [
        _patient(),
        _flag("f1"),
        _goal("g1", addresses=[{"reference": "Flag/f1"}, {"display": "a risk"}]),
        _goal("g2", addresses=[{"display": "a risk"}, {"reference": "Flag/f1"}]),
    ],
    "primitive extensions": [
        _patient(),
        _flag("f1"),
        _goal(
            "g1",
            status="active",
            _status={"extension": [{"url": "x", "valueReference": {"reference": "Flag/f1"}}]},
        ),
    ],
    "supporting resources referring to each other": [
        _patient(),
        _org("o1"),
        _org("o2") | {"partOf": {"reference": "Organization/o1"}},
        _org("o3") | {"partOf": {"reference": "Organization/o3"}},
        {
            "resourceType": "Practitioner",
            "id": "pr",
            "extension": [{"url": "x", "valueReference": {"reference": "Organization/o2"}}],
        },
        _goal("g1", expressedBy={"reference": "Practitioner/pr"}),
    ],
}


def _aliased() -> list[dict[str, Any]]:
    shared = {"reference": "Flag/f1"}
    also = [{"reference": "Flag/f1"}]
    return [
        _patient(),
        _flag("f1"),
        _goal("g1", addresses=[shared, shared], outcomeReference=also, extra=also),
    ]


@pytest.mark.parametrize("name", [*AWKWARD, "aliased"])
@pytest.mark.parametrize(
    "allowed",
    [
        {"administrative", "care-plan", "risk-to-self"},
        {"administrative", "care-plan"},
        {"administrative", "care-plan", "carer"},
        set(),
    ],
    ids=["with-flags", "without-flags", "carer", "nothing"],
)
def test_awkward_shapes(
    name: str,
    allowed: set[str],
    policy: SharingPolicy,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    resources = _aliased() if name == "aliased" else copy.deepcopy(AWKWARD[name])
    labelled = label_resources(_entries(*resources), policy)
    assert_same_as_reference(labelled, _allowing(allowed), policy, required, oracle_required)


def test_labels_changed_or_made_by_hand(
    policy: SharingPolicy,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    """LabelledResources not made by label_resources, or changed since, filter the same."""
    labelled = label_resources(record_entries(EXAMPLE_RECORDS["C"]), policy)
    decision = _allowing({"administrative", "care-plan", "crisis", "medication"})
    by_hand = [
        LabelledResource(
            item.resource, item.key, item.categories, item.rules, item.elements, item.full_url
        )
        for item in labelled
    ]
    assert_same_as_reference(by_hand, decision, policy, required, oracle_required)
    relabelled = [
        dataclasses.replace(item, categories=item.categories | {"carer"})
        if item.resource_type == "Goal"
        else item
        for item in labelled
    ]
    assert_same_as_reference(relabelled, decision, policy, required, oracle_required)
    no_elements = [dataclasses.replace(item, elements=()) for item in labelled]
    assert_same_as_reference(no_elements, decision, policy, required, oracle_required)


def test_same_key_twice(
    policy: SharingPolicy,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    """A record may hold one resource twice (a caller gathering referred resources can)."""
    entries = record_entries(EXAMPLE_RECORDS["A"])
    doubled = entries + [(None, r) for _, r in entries[:8]]
    doubled += [(f"urn:uuid:{i}", r) for i, (_, r) in enumerate(entries[:8])]
    labelled = label_resources(doubled, policy)
    for allowed in ({"administrative", "care-plan", "crisis"}, {"administrative"}):
        assert_same_as_reference(labelled, _allowing(allowed), policy, required, oracle_required)


def test_many_records_one_decision(
    policy: SharingPolicy,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    """Every example record to its GP, labelled once and filtered under many decisions."""
    cats = sorted(policy.categories)
    choices = random.Random(117)
    for _, record in sorted(EXAMPLE_RECORDS.items()):
        labelled = label_resources(record_entries(record), policy)
        for _ in range(25):
            decision = _allowing({c for c in cats if choices.random() < 0.6})
            assert_same_as_reference(labelled, decision, policy, required, oracle_required)


@pytest.mark.parametrize("letter", sorted(EXAMPLE_RECORDS))
@pytest.mark.parametrize("oddity", ["empty list", "shared object"])
def test_example_records_of_awkward_shape(
    letter: str,
    oddity: str,
    policy: SharingPolicy,
    required: RequiredElements,
    oracle_required: reference_filter.RequiredElements,
) -> None:
    """Every resource of an example record made awkward, so that none can be changed by
    copying along paths: the deep-copying way must give the same."""
    record = copy.deepcopy(EXAMPLE_RECORDS[letter])
    for entry in record["entry"]:
        resource = entry["resource"]
        if oddity == "empty list":
            resource["contained"] = []
        else:
            resource["extension"] = [*resource.get("extension", []), resource.get("meta", {})]
    labelled = label_resources(record_entries(record), policy)
    choices = random.Random(letter)
    cats = sorted(policy.categories)
    for _ in range(12):
        decision = _allowing({c for c in cats if choices.random() < 0.6})
        assert_same_as_reference(labelled, decision, policy, required, oracle_required)
