"""`cpa-fhir share`: the Bundle on stdout, the withheld summary on stderr, the audit in a file;
refusals share nothing and exit non-zero with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import DEV_FULL, EXAMPLES, needs_dev_full

RECORD_C = next(EXAMPLES.glob("Bundle-record-C-*.json"))
AT = "2026-11-01T10:00:00Z"


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cpa_fhir", "share", *args], capture_output=True, timeout=120
    )


def test_share_writes_bundle_summary_and_audit(tmp_path: Path) -> None:
    audit = tmp_path / "audit.json"
    result = run(
        "--to", "gp", "--purpose", "TREAT", "--at", AT, "--audit", str(audit), str(RECORD_C)
    )
    assert result.returncode == 0, result.stderr.decode()
    bundle = json.loads(result.stdout)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    shared = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    assert "CarePlan/c-careplan" in shared and "Flag/c-risk-harm-to-others" not in shared
    stderr = result.stderr.decode()
    assert "withheld Flag/c-risk-harm-to-others: risk-to-others: no consent covers it" in stderr
    assert "Traceback" not in stderr
    event = json.loads(audit.read_text())
    assert event["resourceType"] == "AuditEvent"
    assert [a["who"]["reference"] for a in event["agent"]][1] == "Organization/c-gp-practice"


def test_share_to_a_file_with_an_exception(tmp_path: Path) -> None:
    out, audit = tmp_path / "out.json", tmp_path / "audit.json"
    result = run(
        "--to", "probation", "--purpose", "THREAT", "--exception", "public-protection",
        "--at", AT, "--audit", str(audit), "--out", str(out), str(RECORD_C),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    assert "Flag/c-risk-harm-to-others" in out.read_text()
    assert "public-protection" in audit.read_text()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--to", "probation", "--purpose", "THREAT"], "nothing was shared"),
        (["--to", "pharmacy", "--purpose", "TREAT"], "unknown recipient 'pharmacy'"),
        (
            ["--to", "gp", "--purpose", "TREAT", "--exception", "public-protection"],
            "does not apply",
        ),
        (["--to", "gp", "--purpose", "NOPE"], "unknown purpose of use"),
    ],
)
def test_refusals_share_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    audit = tmp_path / "audit.json"
    result = run(*args, "--at", AT, "--audit", str(audit), str(RECORD_C))
    assert result.returncode == 1
    assert result.stdout == b""
    assert not audit.exists()
    stderr = result.stderr.decode()
    assert says in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        (lambda p: p.write_text("{not json"), "not JSON"),
        (lambda p: None, "cannot read"),
    ],
)
def test_unreadable_record_is_one_line(tmp_path: Path, setup, says: str) -> None:  # type: ignore[no-untyped-def]
    record = tmp_path / "record.json"
    setup(record)
    result = run(
        "--to", "gp", "--purpose", "TREAT", "--audit", str(tmp_path / "a.json"), str(record)
    )
    assert result.returncode == 2
    stderr = result.stderr.decode().strip()
    assert says in stderr and len(stderr.splitlines()) == 1


def test_bad_time_is_one_line(tmp_path: Path) -> None:
    result = run(
        "--to",
        "gp",
        "--purpose",
        "TREAT",
        "--at",
        "yesterday",
        "--audit",
        str(tmp_path / "a.json"),
        str(RECORD_C),
    )
    assert result.returncode == 2
    assert "--at 'yesterday' is not a date-time" in result.stderr.decode()


def test_an_audit_file_that_is_standard_output_is_refused(tmp_path: Path) -> None:
    """With no --out the Bundle goes to standard output: an --audit naming the same
    place (/dev/stdout, redirected to a file) would have the one overwrite the other."""
    out = tmp_path / "outgoing.json"
    with out.open("wb") as stdout:
        result = subprocess.run(
            [sys.executable, "-m", "cpa_fhir", "share", "--to", "gp", "--purpose", "TREAT",
             "--at", AT, "--audit", "/dev/stdout", str(RECORD_C)],
            stdout=stdout, stderr=subprocess.PIPE, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("cpa-fhir: --audit names standard output")
    assert out.read_bytes() == b""


@pytest.mark.parametrize("kind", ["transaction", "batch", "searchset", None])
def test_a_record_is_a_collection_bundle(tmp_path: Path, kind: str | None) -> None:
    record = json.loads(RECORD_C.read_text())
    if kind is None:
        del record["type"]
    else:
        record["type"] = kind
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    audit = tmp_path / "audit.json"
    result = run("--to", "gp", "--purpose", "TREAT", "--at", AT, "--audit", str(audit), str(path))
    assert result.returncode == 1 and result.stdout == b""
    assert not audit.exists()
    (line,) = result.stderr.decode().strip().splitlines()
    assert "the record must be a collection Bundle" in line


FULL = DEV_FULL


@needs_dev_full
@pytest.mark.parametrize("audit_before", [None, b'{"kept": true}\n'])
def test_a_bundle_standard_output_cannot_take_leaves_no_audit_event(
    tmp_path: Path, audit_before: bytes | None
) -> None:
    """The AuditEvent and the Bundle land together or neither: an AuditEvent left for a
    Bundle standard output refused would record a disclosure that did not happen."""
    audit = tmp_path / "audit.json"
    if audit_before is not None:
        audit.write_bytes(audit_before)
    with FULL.open("wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "cpa_fhir", "share", "--to", "gp", "--purpose", "TREAT",
             "--at", AT, "--audit", str(audit), str(RECORD_C)],
            stdout=full, stderr=subprocess.PIPE, timeout=120,
        )  # fmt: skip
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert result.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("cpa-fhir: standard output: cannot write the outgoing Bundle")
    assert "nothing was shared" in last
    if audit_before is None:
        assert list(tmp_path.iterdir()) == []
    else:
        assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]
        assert audit.read_bytes() == audit_before


@needs_dev_full
def test_an_out_device_that_cannot_be_written_leaves_no_audit_event(tmp_path: Path) -> None:
    audit = tmp_path / "audit.json"
    result = run(
        "--to", "gp", "--purpose", "TREAT", "--at", AT, "--audit", str(audit),
        "--out", str(FULL), str(RECORD_C),
    )  # fmt: skip
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr and result.returncode == 1, stderr
    assert "cannot write the outgoing Bundle" in stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
