"""Paths to the test data, so tests never depend on the working directory, a
helper for the example records, and the mark of tests that need /dev/full."""

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"
EXAMPLES = PROFILES / "examples"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
INVALID = FIXTURES / "invalid"
INVALID_MANIFEST = INVALID / "manifest.json"
POLICY = ROOT / "policy" / "sharing.toml"


def entry_resource(record: dict[str, Any], key: str) -> dict[str, Any]:
    """The resource `Type/id` of a record Bundle (the object itself, to change)."""
    rtype, rid = key.split("/")
    found: dict[str, Any] = next(
        e["resource"]
        for e in record["entry"]
        if (e["resource"]["resourceType"], e["resource"]["id"]) == (rtype, rid)
    )
    return found


# A Linux device that refuses every write: standard output that cannot be written.
DEV_FULL = Path("/dev/full")


needs_dev_full = pytest.mark.skipif(
    not DEV_FULL.exists(), reason="no /dev/full here (a Linux device that refuses every write)"
)
