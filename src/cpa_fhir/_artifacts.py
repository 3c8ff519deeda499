"""Finding the project's declarative artifacts (profiles/, policy/, sandbox/) in a checkout."""

from __future__ import annotations

from pathlib import Path


def find_artifact(relative: str) -> Path | None:
    """`relative` in the nearest folder above this source tree that holds it, or None."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / relative
        if candidate.is_file():
            return candidate
    return None
