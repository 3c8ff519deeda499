"""The labeller gives exactly the labels of the labeller as first written.

`reference_labelling` is the labeller as first written (every rule walks what
it looks at afresh). Both label the example records, the generated records of
the property tests, and those records with defects the labeller must refuse;
the labels (categories, rules, element labels and their paths) must be equal,
and a record one refuses the other refuses with the same message.
"""

from __future__ import annotations

import bisect
import copy
import re
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.consent import SharingPolicy, label_resources, record_entries
from cpa_fhir.consent._labelling import _found_at_starts
from cpa_fhir.errors import LabellingError
from tests.consent import reference_labelling
from tests.consent.test_decision_table import RECORDS as EXAMPLE_RECORDS
from tests.consent.test_properties import DEFECTS, SHARING, _inject, cases, generated_records


def _labels(labelled: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (
            item.key,
            item.categories,
            item.rules,
            [(e.path, e.categories, e.rules) for e in item.elements],
            item.full_url,
        )
        for item in labelled
    ]


def assert_same_labels(
    entries: list[tuple[str | None, dict[str, Any]]],
    policy: SharingPolicy,
    outside: dict[str, frozenset[str]] | None = None,
) -> None:
    before = copy.deepcopy(entries)
    try:
        expected = reference_labelling.label_resources(entries, policy, outside)
    except LabellingError as exc:
        with pytest.raises(LabellingError) as raised:
            label_resources(entries, policy, outside)
        assert str(raised.value) == str(exc)
        return
    assert _labels(label_resources(entries, policy, outside)) == _labels(expected)
    assert entries == before


@pytest.mark.parametrize("letter", sorted(EXAMPLE_RECORDS))
def test_example_records(letter: str, policy: SharingPolicy) -> None:
    entries = record_entries(EXAMPLE_RECORDS[letter])
    assert_same_labels(entries, policy)
    # Alone, each resource sees nothing of the others it refers to; or sees it from outside.
    for entry in entries:
        assert_same_labels([entry], policy)
        assert_same_labels([entry], policy, {"Organization/c-probation": frozenset({"offending"})})


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(g=generated_records())
def test_generated_records(g: Any) -> None:
    assert_same_labels(record_entries(g.record), SHARING)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), defect=st.sampled_from(DEFECTS), data=st.data())
def test_records_with_defects(case: Any, defect: str, data: st.DataObject) -> None:
    _inject(data.draw, case.g, defect)
    assert_same_labels(record_entries(case.g.record), SHARING)


def _variants(word: str) -> list[str]:
    """A word as records may hold it: in other cases, after a letter, in other scripts'
    letters that match it regardless of case (long s, Kelvin sign, dotted I)."""
    lookalikes = word.replace("s", "\u017f").replace("k", "\u212a").replace("i", "\u0130")
    return [
        word.upper(),
        word.title(),
        f"x{word}",
        f"\u00e9{word}",
        f"({word})",
        lookalikes,
        f"\u00e9 {lookalikes}",
        word[:-1],
    ]


@pytest.mark.parametrize("letter", sorted(EXAMPLE_RECORDS))
def test_words_in_any_case_and_script(letter: str, policy: SharingPolicy) -> None:
    """Word rules find words case-insensitively, after no letter, in any script."""
    words = sorted({w for rule in policy.rules if rule.ascii_words for w in rule.ascii_words})
    entries = record_entries(copy.deepcopy(EXAMPLE_RECORDS[letter]))
    targets = [r for _, r in entries if r["resourceType"] in ("Goal", "Condition", "CarePlan")]
    for i, word in enumerate(words):
        for j, text in enumerate(_variants(word)):
            resource = targets[(i + j) % len(targets)]
            if resource["resourceType"] == "CarePlan":
                activity = {"detail": {"status": "in-progress", "description": text}}
                resource.setdefault("activity", []).append(activity)
            else:
                resource.setdefault("note", []).append({"text": text})
    assert_same_labels(entries, policy)


@pytest.mark.parametrize("letter", sorted(EXAMPLE_RECORDS))
def test_words_in_what_names_a_resource(letter: str, policy: SharingPolicy) -> None:
    """A resource's id, fullUrl and profiles are read for every rule's words at once:
    the labels are those of reading them for each rule in turn."""
    words = sorted({w for rule in policy.rules if rule.ascii_words for w in rule.ascii_words})
    entries = record_entries(copy.deepcopy(EXAMPLE_RECORDS[letter]))
    renamed = []
    for i, (url, resource) in enumerate(entries):
        variants = _variants(words[i % len(words)])
        text = variants[i % len(variants)]
        where = i % 3
        if where == 0:
            resource["id"] = f"r{i}-{text.encode('ascii', 'replace').decode()}"[:64]
        elif where == 1:
            url = f"https://example.org/fhir/{text}/{i}"
        else:
            resource.setdefault("meta", {})["profile"] = [f"https://example.org/{text}"]
        renamed.append((url, resource))
    assert_same_labels(renamed, policy)


@pytest.mark.parametrize("letter", sorted(EXAMPLE_RECORDS))
def test_professionals_labelled_before_are_taken_as_they_are(
    letter: str, policy: SharingPolicy
) -> None:
    """Professionals and organisations labelled once, on their own (all they refer
    to, and the roles lending to them, beside them), label a record as they would if
    labelled with it: the server labels them once for every record they appear in."""
    entries = [(None, r) for _, r in record_entries(copy.deepcopy(EXAMPLE_RECORDS[letter]))]
    supporting = [(u, r) for u, r in entries if r["resourceType"] in policy.supporting]
    own = {f"{r['resourceType']}/{r['id']}" for _, r in entries} - {
        f"{r['resourceType']}/{r['id']}" for _, r in supporting
    }
    assert supporting and own
    before = {
        item.key: item for item in label_resources(supporting, policy, elements_of=frozenset())
    }
    expected = label_resources(entries, policy, elements_of=own)
    reused = label_resources(entries, policy, elements_of=own, known=before)
    assert _labels(reused) == _labels(expected)
    # What a role labelled with the record lends a professional labelled before is
    # added to what they carry, as if labelled together.
    role = copy.deepcopy(next(r for _, r in supporting if r["resourceType"] == "PractitionerRole"))
    role["id"] = "lending-role"
    team_role = "https://cpa-fhir.org/fhir/CodeSystem/cpa-care-team-role"
    role["code"] = [{"coding": [{"system": team_role, "code": "probation-officer"}]}]
    lent = [*entries, (None, role)]
    expected = label_resources(lent, policy, elements_of=own)
    reused = label_resources(lent, policy, elements_of=own, known=before)
    assert _labels(reused) == _labels(expected)
    held = role["practitioner"]["reference"]
    assert "offending" in next(i.categories for i in reused if i.key == held)


_POLICY_WORDS = sorted({w for rule in SHARING.rules if rule.ascii_words for w in rule.ascii_words})


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.one_of(
            st.sampled_from(_POLICY_WORDS).flatmap(lambda w: st.sampled_from(_variants(w))),
            st.text(alphabet=string.ascii_letters + string.digits + " -_/.'\x00", max_size=12),
        ),
        max_size=12,
    ),
    joins=st.lists(st.sampled_from(["", " ", "-", "\x00", "x", "9"]), min_size=12, max_size=12),
)
def test_word_starts_are_found_at_every_run_of_letters(parts: list[str], joins: list[str]) -> None:
    """Where each indexed rule's words are, found by trying only the runs of letters that
    start with a key of the index, is where trying every rule at every run finds them."""
    text = "".join(p + j for p, j in zip(parts, joins, strict=False))
    text = text.encode("ascii", "ignore").decode()
    starts = [0, *(i + 1 for i, ch in enumerate(text) if ch == "\x00")]
    for index in (SHARING.word_starts, SHARING.text_word_starts):
        patterns = {p: ids for found in index.starts.values() for p, ids in found}
        expected: dict[str, set[int]] = {}
        for run in re.finditer("[a-z]+", text.lower()):
            part = bisect.bisect_right(starts, run.start()) - 1
            for pattern, rule_ids in patterns.items():
                if pattern.match(text, run.start()):
                    for rule_id in rule_ids:
                        expected.setdefault(rule_id, set()).add(part)
        assert _found_at_starts(text, starts, index) == expected
