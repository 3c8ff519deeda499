"""The `cpa-fhir` command: readable lines, exit codes, no tracebacks for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.common import EXAMPLES, INVALID


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpa_fhir", *args], capture_output=True, text=True, timeout=120
    )


def test_valid_examples_pass_and_print_a_summary() -> None:
    result = run("validate", str(EXAMPLES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout
    assert "Traceback" not in result.stderr


def test_invalid_example_fails_with_located_lines() -> None:
    result = run("validate", str(INVALID / "invalid-patient-nhs-number-check-digit.json"))
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if "ERROR" in line]
    assert any("Bundle.entry[0].resource" in line and "cpa-pat-1" in line for line in lines), (
        result.stdout
    )


def test_json_format_is_an_operation_outcome() -> None:
    result = run(
        "validate", "--format", "json", str(INVALID / "invalid-careteam-two-coordinators.json")
    )
    assert result.returncode == 1
    outcome = json.loads(result.stdout)
    assert outcome["resourceType"] == "OperationOutcome"
    assert all({"severity", "code", "details"} <= set(i) for i in outcome["issue"])
    assert any(i.get("expression") for i in outcome["issue"])


def test_not_json_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceType": "Patient",')
    result = run("validate", str(bad))
    assert result.returncode == 1
    assert "Not well-formed JSON" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_property_given_twice_is_not_fhir_json(tmp_path: Path) -> None:
    """Of two values a parser keeps one, not every parser the same: a file one reader
    finds valid could carry what another reads otherwise."""
    record = next(EXAMPLES.glob("Bundle-record-A-*.json")).read_text()
    twice = tmp_path / "twice.json"
    twice.write_text(record.replace('"type": "collection"', '"type": "collection", "type": "x"', 1))
    assert twice.read_text() != record
    result = run("validate", str(twice))
    assert result.returncode == 1
    assert "'type' is given twice" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_not_fhir_and_not_r4(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.json").write_text('{"resourceType": "Citation"}')
    result = run("validate", str(tmp_path))
    assert result.returncode == 1
    assert "Not a FHIR resource" in result.stdout
    assert "not a FHIR R4 (4.0.1) resource type" in result.stdout


def test_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run("validate", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr


def test_unknown_profile_and_bad_options() -> None:
    example = str(next(EXAMPLES.glob("AuditEvent-*.json")))
    result = run(
        "validate", "--profile", "https://cpa-fhir.org/fhir/StructureDefinition/nope", example
    )
    assert result.returncode == 1 and "not known" in result.stdout
    assert run("validate", "--as-of", "yesterday", example).returncode == 2
    assert run("validate", "--format", "xml", example).returncode == 2


def test_named_profile_of_the_wrong_type() -> None:
    example = str(next(EXAMPLES.glob("AuditEvent-*.json")))
    result = run(
        "validate",
        "--profile",
        "https://cpa-fhir.org/fhir/StructureDefinition/cpa-patient",
        example,
    )
    assert result.returncode == 1 and "is for Patient, not AuditEvent" in result.stdout


def test_an_empty_profile_is_refused_not_ignored() -> None:
    result = run("validate", "--profile", "", str(EXAMPLES))
    assert result.returncode == 2  # a usage error, as any bad option
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "--profile" in result.stderr
