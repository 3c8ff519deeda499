"""Paths to the test data, so tests never depend on the working directory."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"
EXAMPLES = PROFILES / "examples"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
INVALID = FIXTURES / "invalid"
INVALID_MANIFEST = INVALID / "manifest.json"
POLICY = ROOT / "policy" / "sharing.toml"
