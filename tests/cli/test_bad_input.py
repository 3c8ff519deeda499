"""Bad input found by probing the CLI: each is one `cpa-fhir: ` line and a non-zero exit.

Hand-edited files (a profiles package, the sharing policy, a store file) and odd
options must be reported, naming what is wrong, never met with a traceback.
"""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import DEV_FULL, EXAMPLES, POLICY, needs_dev_full

RECORD_C = next(EXAMPLES.glob("Bundle-record-C-*.json"))
MANIFEST = {"name": "test.package", "version": "0.1.0", "canonical": "http://example.org/fhir"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpa_fhir", *args], capture_output=True, text=True, timeout=120
    )


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a refused command, after the common checks."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpa-fhir: "), result.stderr
    return lines[0]


def package(folder: Path, *files: tuple[str, object]) -> Path:
    """A small profiles package: a manifest plus the given files (name, JSON value)."""
    folder.mkdir()
    (folder.parent / "patient.json").write_text('{"resourceType": "Patient"}')
    (folder / "package.json").write_text(json.dumps(MANIFEST))
    for name, content in files:
        (folder / name).write_text(json.dumps(content))
    return folder


def profile(*differential: object) -> dict[str, object]:
    return {
        "resourceType": "StructureDefinition",
        "url": "http://example.org/fhir/StructureDefinition/Odd",
        "name": "Odd",
        "status": "draft",
        "kind": "resource",
        "abstract": False,
        "type": "Patient",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Patient",
        "derivation": "constraint",
        "differential": {"element": list(differential)},
    }


def package_commands(folder: Path, tmp_path: Path) -> list[list[str]]:
    """Every command that loads a profiles package, pointed at `folder`."""
    audit = str(tmp_path / "audit.json")
    return [
        ["validate", str(folder.parent / "patient.json"), "--package", str(folder)],
        ["share", str(RECORD_C), "--to", "gp", "--purpose", "TREAT", "--audit", audit,
         "--package", str(folder)],
        ["profiles", "build", "--package", str(folder)],
    ]  # fmt: skip


# ---------------------------------------------------------------- sandbox --host


@pytest.mark.parametrize("host", ["a" * 64 + ".com", "a..b"])
def test_a_host_name_idna_cannot_encode_is_one_line(tmp_path: Path, host: str) -> None:
    result = run("sandbox", "--port", "0", "--host", host, "--db", f"sqlite:///{tmp_path / 's.db'}")
    line = one_line(result, 1)
    assert line.startswith(f"cpa-fhir: cannot listen on {host} port 0: ")
    assert not (tmp_path / "s.db").exists()  # refused before the store was made


# ---------------------------------------------------------------- profiles packages


def test_a_manifest_that_is_not_an_object_is_one_line(tmp_path: Path) -> None:
    folder = package(tmp_path / "pkg")
    (folder / "package.json").write_text("[]")
    for command in package_commands(folder, tmp_path):
        line = one_line(run(*command), 2)
        assert f"{folder / 'package.json'}: not a JSON object" in line, command


def test_a_manifest_without_a_name_is_one_line(tmp_path: Path) -> None:
    folder = package(tmp_path / "pkg")
    (folder / "package.json").write_text('{"version": "1", "canonical": "http://x"}')
    line = one_line(
        run("validate", str(folder.parent / "patient.json"), "--package", str(folder)), 2
    )
    assert "package.json: 'name' must be a string" in line


def test_a_package_file_that_is_not_an_object_is_one_line_for_every_command(
    tmp_path: Path,
) -> None:
    # validate used to skip such a file, and profiles build to crash on it.
    folder = package(tmp_path / "pkg", ("StructureDefinition-odd.json", [1]))
    for command in package_commands(folder, tmp_path):
        line = one_line(run(*command), 2)
        assert f"{folder / 'StructureDefinition-odd.json'}: not a JSON object" in line, command


@pytest.mark.parametrize(
    ("element", "says"),
    [
        # An id with no parent sent snapshot generation into endless recursion.
        ({"id": "x"}, "differential element x is not inside Patient"),
        ({"id": "x", "path": 5}, "differential element x: its path is not a string"),
        ({"id": 5}, "differential element 1 has no id or path that is a string"),
        ({"path": ["Patient"]}, "differential element 1 has no id or path that is a string"),
    ],
)
def test_a_differential_element_without_a_place_is_one_line(
    tmp_path: Path, element: dict[str, object], says: str
) -> None:
    folder = package(tmp_path / "pkg", ("StructureDefinition-odd.json", profile(element)))
    for command in (
        ["validate", str(folder.parent / "patient.json"), "--package", str(folder)],
        ["profiles", "build", "--package", str(folder)],
    ):
        line = one_line(run(*command), 2)
        assert line == f"cpa-fhir: http://example.org/fhir/StructureDefinition/Odd: {says}"


ODD = "http://example.org/fhir/StructureDefinition/Odd"
ODDER = "http://example.org/fhir/StructureDefinition/Odder"


@pytest.mark.parametrize(
    ("bases", "says"),
    [
        ({ODD: ODD}, f"circular baseDefinition: {ODD} -> {ODD}"),
        ({ODD: ODDER, ODDER: ODD}, f"circular baseDefinition: {ODDER} -> {ODD} -> {ODDER}"),
    ],
    ids=["itself", "each-other"],
)
def test_a_circular_base_definition_is_one_line(
    tmp_path: Path, bases: dict[str, str], says: str
) -> None:
    """A base definition whose own base leads back to it sent snapshot generation
    into endless recursion (a RecursionError traceback)."""
    files = []
    for url, base in bases.items():
        sd = {**profile({"id": "Patient.name", "path": "Patient.name", "min": 1})}
        sd.update(url=url, name=url.rsplit("/", 1)[1], baseDefinition=base)
        files.append((f"StructureDefinition-{sd['name']}.json", sd))
    folder = package(tmp_path / "pkg", *files)
    for command in (
        ["validate", str(folder.parent / "patient.json"), "--package", str(folder)],
        ["profiles", "build", "--package", str(folder)],
    ):
        assert one_line(run(*command), 2) == f"cpa-fhir: {says}", command


# ---------------------------------------------------------------- sharing policy


@pytest.mark.parametrize(("value", "kind"), [("[]", "an array"), ("{}", "a table")])
def test_a_policy_value_of_the_wrong_type_is_one_line(
    tmp_path: Path, value: str, kind: str
) -> None:
    text = POLICY.read_text()
    assert 'confidentiality = "N"' in text
    policy = tmp_path / "sharing.toml"
    policy.write_text(text.replace('confidentiality = "N"', f"confidentiality = {value}", 1))
    result = run(
        "share", str(RECORD_C), "--to", "gp", "--purpose", "TREAT",
        "--audit", str(tmp_path / "audit.json"), "--policy", str(policy),
    )  # fmt: skip
    line = one_line(result, 2)
    assert line == (
        f"cpa-fhir: {policy}: category 'administrative': "
        f"confidentiality must be a string (N, R or V), not {kind}"
    )
    assert result.stdout == "" and not (tmp_path / "audit.json").exists()


# ---------------------------------------------------------------- sandbox --db


def test_a_store_whose_tables_are_not_ours_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w2.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE resource_current(x text)")
    db.close()
    url = f"sqlite:///{path}"
    result = run("sandbox", "--port", "0", "--db", url)
    line = one_line(result, 1)
    assert line.startswith(f"cpa-fhir: cannot load the example patients into {url}: ")
    assert "resource_current" in line
    assert "FHIR base URL" not in result.stdout


# ---------------------------------------------------------------- validate, odd records


@pytest.mark.parametrize("given", [[1], None, 5, "Ann"])
def test_a_patient_whose_given_names_are_not_text_is_summarised(
    tmp_path: Path, given: object
) -> None:
    record = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"resourceType": "Patient", "name": [{"given": given}]}}],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    result = run("validate", str(path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1) and result.stderr == ""
    assert "1 file(s): " in result.stdout


def test_a_record_discharged_in_the_last_week_of_9999_is_judged(tmp_path: Path) -> None:
    record = json.loads(next(EXAMPLES.glob("Bundle-record-C-*.json")).read_text())
    for e in record["entry"]:
        if e["resource"].get("id") == "c-admission-2026-04":
            e["resource"]["period"]["end"] = "9999-12-30T11:00:00+00:00"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    result = run("validate", str(path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1)


def _share_c(
    tmp_path: Path, *extra: str, record: Path = RECORD_C
) -> subprocess.CompletedProcess[str]:
    audit = str(tmp_path / "audit.json")
    return run("share", str(record), "--to", "gp", "--purpose", "TREAT", "--audit", audit, *extra)


def test_an_outgoing_bundle_that_cannot_be_written_leaves_no_audit_event(tmp_path: Path) -> None:
    """An AuditEvent written for a Bundle that was never written would record a
    disclosure that did not happen."""
    result = _share_c(tmp_path, "--out", str(tmp_path / "no-such-folder" / "out.json"))
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert "nothing was written" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
    written = _share_c(tmp_path, "--out", str(tmp_path / "out.json"))
    assert written.returncode == 0, written.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "out.json"]


def test_a_recipient_with_an_empty_id_is_one_line(tmp_path: Path) -> None:
    result = run("share", str(RECORD_C), "--to", "gp:", "--purpose", "TREAT", "--audit", str(tmp_path / "a.json"))  # fmt: skip
    assert "names no one" in one_line(result, 1)


def test_a_record_nested_too_deep_to_check_shares_nothing(tmp_path: Path) -> None:
    record = json.loads(RECORD_C.read_text())
    node: dict[str, object] = {"url": "https://local.example/x", "valueString": "x"}
    for _ in range(400):
        node = {"url": "https://local.example/x", "extension": [node]}
    review = next(
        e["resource"] for e in record["entry"] if e["resource"]["id"] == "c-review-2026-09"
    )
    review["extension"] = [node]
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps(record))
    result = _share_c(tmp_path, record=deep)
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr[-2000:]
    assert "nothing was shared" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "audit.json").exists()


def test_an_out_path_that_is_a_folder_leaves_nothing_written(tmp_path: Path) -> None:
    (tmp_path / "out.json").mkdir()
    result = _share_c(tmp_path, "--out", str(tmp_path / "out.json"))
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert "nothing was written" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_out_and_audit_naming_one_file_is_refused(tmp_path: Path) -> None:
    result = _share_c(tmp_path, "--out", str(tmp_path / "audit.json"))
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert "must differ" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_files_replaced_keep_their_permissions_and_links_are_followed(tmp_path: Path) -> None:
    """A disclosure written over a file kept private stays private; an --out that is a
    symbolic link writes the file it names."""
    (tmp_path / "secure").mkdir()
    target = tmp_path / "secure" / "disclosure.json"
    target.write_bytes(b"")
    target.chmod(0o600)
    link = tmp_path / "out.json"
    link.symlink_to(target)
    audit = tmp_path / "audit.json"
    audit.write_bytes(b"")
    audit.chmod(0o600)
    result = run("share", str(RECORD_C), "--to", "gp", "--purpose", "TREAT", "--audit", str(audit), "--out", str(link))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and target.read_bytes().startswith(b"{")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "out.json", "secure"]


@needs_dev_full
@pytest.mark.parametrize(
    ("command", "code"),
    [
        (["validate", str(RECORD_C)], 2),
        (["validate", "--format", "json", str(RECORD_C)], 2),
        (["profiles", "build", "--package", "{package}"], 2),
        (["sandbox", "token", "--client", "gp", "--db", "sqlite:///{db}"], 2),
        (["sandbox", "--port", "0", "--db", "sqlite:///{db}"], 1),
        (["--help"], 2),
    ],
    ids=["validate", "validate-json", "profiles-build", "sandbox-token", "sandbox", "help"],
)
def test_standard_output_that_cannot_be_written_is_one_line(
    tmp_path: Path, command: list[str], code: int
) -> None:
    """`> /dev/full`: one line saying so and a non-zero exit, not a traceback (nor one
    more at exit, when what is buffered is flushed)."""
    folder = package(tmp_path / "package", ("StructureDefinition-odd.json", profile()))
    args = [a.format(package=folder, db=tmp_path / "s.db") for a in command]
    with DEV_FULL.open("wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "cpa_fhir", *args],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    line = one_line(result, code)
    assert line.startswith("cpa-fhir: cannot write to standard output ("), line
