"""The profiles package in an independent FHIR validator: Medplum (@medplum/core 5.2.13).

Medplum shares no code with cpa-fhir, so these tests show that the package works outside
our own validator: every StructureDefinition loads, every example is valid, and every
invalid example whose rule the profiles can express is rejected.

`tests/conformance/independent/validate.mjs` does the work in one `node` run per module;
see its header for what Medplum checks, what it does not (terminology) and the two
documented adaptations the harness makes for Medplum's slicing parser.

Needs `node` on PATH and `npm ci --prefix tests/conformance/independent` (done by
`.ci/run`). Without them the tests are skipped, unless CPA_REQUIRE_INDEPENDENT_VALIDATOR
is set (as in CI), in which case they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.common import EXAMPLES, INVALID, INVALID_MANIFEST, PROFILES, ROOT

pytestmark = pytest.mark.node

HARNESS_DIR = ROOT / "tests" / "conformance" / "independent"
HARNESS = HARNESS_DIR / "validate.mjs"
REQUIRE_ENV = "CPA_REQUIRE_INDEPENDENT_VALIDATOR"
TIMEOUT_SECONDS = 300


def _required() -> bool:
    return bool(os.environ.get(REQUIRE_ENV))


def _unavailable() -> str | None:
    """Why the independent validator cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "Node.js (`node`) is not on PATH"
    if not (HARNESS_DIR / "node_modules" / "@medplum" / "core").is_dir():
        return (
            f"{HARNESS_DIR.relative_to(ROOT)}/node_modules is missing: "
            "run `npm ci --prefix tests/conformance/independent`"
        )
    return None


def _skip_or_fail(reason: str) -> None:
    if _required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set, so the independent validator must run)")
    pytest.skip(f"independent validator unavailable: {reason}")


# --- what to validate (known at collection time) ------------------------------------------


def _structure_definitions() -> list[Path]:
    return sorted(PROFILES.glob("StructureDefinition-*.json"))


def _examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json")) if EXAMPLES.is_dir() else []


def _manifest_entries() -> list[dict[str, Any]] | None:
    """The manifest's entries, or None when there is no manifest yet."""
    if not INVALID_MANIFEST.is_file():
        return None
    data = json.loads(INVALID_MANIFEST.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("examples", data.get("entries"))
    if not isinstance(data, list) or not all(isinstance(e, dict) and "file" in e for e in data):
        raise ValueError(
            f"{INVALID_MANIFEST}: expected a list of objects with a 'file' "
            '(or {"examples": [...]})'
        )
    return data


def _invalid_path(entry: dict[str, Any]) -> Path:
    path = Path(entry["file"])
    return path if path.is_absolute() else INVALID / path


def _independent_invalid() -> list[dict[str, Any]]:
    entries = _manifest_entries() or []
    return [e for e in entries if e.get("independent") is True]


def _files_to_validate() -> list[Path]:
    files = _examples() + [_invalid_path(e) for e in _independent_invalid()]
    return [f for f in dict.fromkeys(files) if f.is_file()]


# --- one node run for the module ----------------------------------------------------------


@pytest.fixture(scope="module")
def medplum() -> dict[str, Any]:
    reason = _unavailable()
    if reason is not None:
        _skip_or_fail(reason)
    node = shutil.which("node")
    assert node is not None
    cmd = [node, str(HARNESS), str(PROFILES), *(str(f) for f in _files_to_validate())]
    proc = subprocess.run(
        cmd, cwd=HARNESS_DIR, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"validate.mjs failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def _file_report(report: dict[str, Any], path: Path) -> dict[str, Any]:
    for entry in report["files"]:
        if Path(entry["file"]).resolve() == path.resolve():
            return entry
    raise AssertionError(f"{path} is missing from the harness report")


def _errors(file_report: dict[str, Any], *, medplum_only: bool = False) -> list[str]:
    """Error-severity issues of one file, one readable line each."""
    out = []
    if file_report.get("error"):
        out.append(f"[harness] {file_report['error']}")
    for res in file_report["resources"]:
        for issue in res["issues"]:
            if issue["severity"] not in ("error", "fatal"):
                continue
            if medplum_only and issue.get("source") != "medplum":
                continue
            where = res["location"] or res["resourceType"]
            profile = res["profile"] or f"base {res['resourceType']}"
            if res.get("element"):
                profile = f"{res['element']} against {profile}"
            out.append(
                f"{where} [{profile}] {issue['code']} at {issue['expression']}: {issue['text']}"
            )
    return out


def _id(path: Path) -> str:
    return path.name.removesuffix(".json")


# --- (a) the package loads ----------------------------------------------------------------


@pytest.mark.parametrize("sd_file", _structure_definitions(), ids=_id)
def test_structure_definition_loads_in_medplum(medplum: dict[str, Any], sd_file: Path) -> None:
    errors = [e for e in medplum["loadErrors"] if e["file"] == sd_file.name]
    assert not errors, f"Medplum cannot load {sd_file.name}: " + "; ".join(
        e["error"] for e in errors
    )
    assert sd_file.name in {e["file"] for e in medplum["loaded"]}


def test_harness_saw_the_whole_package(medplum: dict[str, Any]) -> None:
    seen = {e["file"] for e in medplum["loaded"]} | {e["file"] for e in medplum["loadErrors"]}
    assert seen == {p.name for p in _structure_definitions()}
    assert medplum["validator"] == {"name": "@medplum/core", "version": "5.2.13"}


# --- (b) every example is valid -----------------------------------------------------------

_EXAMPLE_PARAMS = [pytest.param(p, id=_id(p)) for p in _examples()] or [
    pytest.param(None, id="none", marks=pytest.mark.skip(reason=f"no examples in {EXAMPLES}"))
]


@pytest.mark.parametrize("example", _EXAMPLE_PARAMS)
def test_example_is_valid_in_medplum(medplum: dict[str, Any], example: Path) -> None:
    report = _file_report(medplum, example)
    assert report["resources"], f"{example.name}: nothing was validated"
    errors = _errors(report)
    assert not errors, f"Medplum reports {len(errors)} error(s) in {example.name}:\n" + "\n".join(
        errors
    )


# --- (c) invalid examples the profiles can express are rejected ---------------------------

# Rules the profiles express but Medplum 5.2.13 cannot check, by manifest file. Marked
# xfail(strict): if Medplum starts catching one, the test fails until it is removed here.
MEDPLUM_GAPS = {
    "invalid-careplan-activity-no-performer.json": (
        "Medplum applies a profile one backbone level deep only: CarePlan.activity.detail "
        "is validated against base CarePlan, so detail.performer 1..* is not checked"
    ),
    "invalid-disclosure-with-total.json": (
        "Medplum reports no issue for the disclosure Bundle's own invariant cpa-disc-3 "
        "(total.empty()) when validating the Bundle against cpa-disclosure-bundle"
    ),
}


def _invalid_params() -> list[Any]:
    entries = _manifest_entries()
    if entries is None:
        reason = f"no invalid-example manifest yet ({INVALID_MANIFEST.relative_to(ROOT)})"
        return [pytest.param(None, id="no-manifest", marks=pytest.mark.skip(reason=reason))]
    independent = [e for e in entries if e.get("independent") is True]
    if not independent:
        reason = 'no manifest entry has "independent": true'
        return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=reason))]
    params = []
    for e in independent:
        gap = MEDPLUM_GAPS.get(Path(e["file"]).name)
        marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
        params.append(pytest.param(e, id=Path(e["file"]).stem, marks=marks))
    return params


def _in_file(res: dict[str, Any], expression: str) -> str:
    """An issue expression (rooted at the resource type) as a path in the file."""
    root = res["resourceType"] or ""
    if res["location"] and (expression == root or expression.startswith(root + ".")):
        return res["location"] + expression[len(root) :]
    return expression


def _related(a: str, b: str) -> bool:
    """Whether one path contains the other (same element, or an ancestor of it)."""
    short, long = sorted((a, b), key=len)
    return long == short or long.startswith(short + ".") or long.startswith(short + "[")


@pytest.mark.parametrize("entry", _invalid_params())
def test_invalid_example_is_rejected_by_medplum(
    medplum: dict[str, Any], entry: dict[str, Any]
) -> None:
    path = _invalid_path(entry)
    assert path.is_file(), f"manifest entry {entry['file']} does not exist ({path})"
    report = _file_report(medplum, path)
    # Only Medplum's own findings count: "profile could not be loaded" is the harness
    # speaking, and would make the test pass for the wrong reason.
    errors = _errors(report, medplum_only=True)
    assert errors, (
        f"Medplum accepts {entry['file']}, which breaks {entry.get('rule')!r} "
        f"at {entry.get('expression')!r}; all issues:\n" + "\n".join(_errors(report) or ["(none)"])
    )
    where = entry.get("expression")
    if where:
        located = [
            _in_file(res, expr)
            for res in report["resources"]
            for issue in res["issues"]
            if issue["severity"] in ("error", "fatal") and issue.get("source") == "medplum"
            for expr in issue["expression"].split(", ")
        ]
        assert any(_related(where, p) for p in located), (
            f"Medplum rejects {entry['file']}, but not at {where!r} where it breaks "
            f"{entry.get('rule')!r}:\n" + "\n".join(errors)
        )
