"""Every example in the package is valid; every invalid example fails with the expected issue."""

from __future__ import annotations

import json

import pytest

from cpa_fhir.fhir.outcome import Issue
from cpa_fhir.validation import Validator
from tests.common import EXAMPLES, INVALID, INVALID_MANIFEST

VALID = sorted(EXAMPLES.glob("*.json"))
MANIFEST = json.loads(INVALID_MANIFEST.read_text())


def test_there_is_a_record_for_each_handbook_service_user() -> None:
    names = [p.name for p in VALID]
    for letter in "ABCD":
        assert any(n.startswith(f"Bundle-record-{letter}-") for n in names)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_example_is_valid(validator: Validator, path) -> None:  # type: ignore[no-untyped-def]
    issues = validator.validate(path.read_bytes())
    assert [i.line() for i in issues if i.severity != "information"] == []


def _matches(issue: Issue, rule: str) -> bool:
    kind, _, name = rule.partition(":")
    if kind == "slice":
        return issue.code == "required" and f":{name} is required" in issue.message
    if kind == "min":
        return issue.code == "required" and issue.message.startswith(f"{name} is required")
    if kind == "binding":
        return issue.code == "code-invalid"
    if kind == "structure":
        return issue.code in ("structure", "value")
    return issue.rule == rule


@pytest.mark.parametrize("case", MANIFEST, ids=lambda c: c["file"])
def test_invalid_example_fails_with_the_expected_issue(
    validator: Validator, case: dict[str, str]
) -> None:
    issues = validator.validate((INVALID / case["file"]).read_bytes())
    errors = [i for i in issues if i.is_error]
    assert errors, f"{case['file']} passed validation"
    expected = [
        i for i in errors if _matches(i, case["rule"]) and i.expression == case["expression"]
    ]
    assert expected, f"expected {case['rule']} at {case['expression']}; got:\n" + "\n".join(
        i.line() for i in errors
    )


@pytest.mark.parametrize("case", MANIFEST, ids=lambda c: c["file"])
def test_invalid_example_breaks_only_its_rule(validator: Validator, case: dict[str, str]) -> None:
    """No unrelated error: each invalid example isolates one rule (same-rule echoes allowed)."""
    issues = validator.validate((INVALID / case["file"]).read_bytes())
    unrelated = [
        i
        for i in issues
        if i.is_error
        and not _matches(i, case["rule"])
        and not (i.expression or "").startswith(case["expression"])
    ]
    allowed_echoes = {"cpa-eoc-3", "cpa-rec-discharge", "nhs-number", "cpa-pat-1", "cpa-ct-1"}
    unrelated = [
        i
        for i in unrelated
        if i.rule not in allowed_echoes and case["rule"] not in ("cpa-rec-plans",)
    ]
    assert unrelated == [], "\n".join(i.line() for i in unrelated)


def test_every_profile_has_an_invalid_example(package) -> None:  # type: ignore[no-untyped-def]
    covered = set()
    for case in MANIFEST:
        data = json.loads((INVALID / case["file"]).read_text())
        resources = (
            [e["resource"] for e in data.get("entry", [])]
            if data["resourceType"] == "Bundle"
            else [data]
        )
        index = case["expression"].split(".resource")[0]
        if not index.startswith("Bundle.entry["):
            covered.update(data.get("meta", {}).get("profile", []))
        for i, r in enumerate(resources):
            if data["resourceType"] != "Bundle" or index == f"Bundle.entry[{i}]":
                covered.update(r.get("meta", {}).get("profile", []))
    assert set(package.profiles()) - covered == set()


def test_every_record_rule_has_an_invalid_example() -> None:
    rules = {
        "cpa-rec-review",
        "cpa-rec-followup",
        "cpa-rec-discharge",
        "cpa-rec-s117",
        "cpa-rec-coordinator",
        "cpa-rec-references",
        "cpa-rec-plans",
    }
    assert rules <= {c["rule"] for c in MANIFEST}
