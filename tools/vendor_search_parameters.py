#!/usr/bin/env python3
"""Vendor the FHIR R4 (4.0.1) SearchParameter definitions the store indexes.

Reads SOURCE, a Bundle of R4 SearchParameter resources (the ``search-parameters.json``
of the R4 specification download, or a subset of it), and writes one compact JSON
object, by resource type then parameter code::

    {"Patient": {"identifier": {"type": "token", "expression": "Patient.identifier",
                                "target": []}, ...}, "Resource": {...}, ...}

A parameter shared by several resource types (``base`` lists them, and its FHIRPath
is a union over all of them) is split: each type keeps only the union branches that
start at that type, so an expression never walks another type's elements.
Parameters under ``Resource`` (and ``DomainResource``) apply to every resource type.
Only the parameter types the store indexes are kept (token, reference, date, string,
uri, number, quantity); composite and special parameters, and parameters without a
FHIRPath expression (``_text``, ``_content``), are left out.

https://hl7.org/fhir/R4/searchparameter.html

Usage::

    python tools/vendor_search_parameters.py SOURCE [OUTPUT]

OUTPUT defaults to ``src/cpa_fhir/fhir/definitions/r4-search-parameters.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

INDEXED_TYPES = frozenset({"token", "reference", "date", "string", "uri", "number", "quantity"})
DEFAULT_OUTPUT = (
    Path(__file__).resolve().parent.parent
    / "src/cpa_fhir/fhir/definitions/r4-search-parameters.json"
)


def split_union(expression: str) -> list[str]:
    """The top-level `|` branches of a FHIRPath expression (parentheses and quotes respected)."""
    branches: list[str] = []
    depth = 0
    quoted = False
    current: list[str] = []
    for char in expression:
        if char == "'" and (not current or current[-1] != "\\"):
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        elif not quoted and depth == 0 and char == "|":
            branches.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    branches.append("".join(current).strip())
    return [b for b in branches if b]


def branch_root(branch: str) -> str:
    """The type a branch starts at: `(Patient.name)` and `Patient.name` both give Patient."""
    return branch.lstrip("(").split(".", 1)[0].split(" ", 1)[0]


def expression_for(expression: str, base: str) -> str | None:
    branches = [b for b in split_union(expression) if branch_root(b) == base]
    return " | ".join(branches) if branches else None


def vendor(bundle: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for entry in bundle.get("entry", []):
        sp = entry.get("resource", {})
        if sp.get("resourceType") != "SearchParameter" or sp.get("type") not in INDEXED_TYPES:
            continue
        if not sp.get("expression"):
            continue
        for base in sp["base"]:
            expression = expression_for(sp["expression"], base)
            if expression is None:
                print(f"{sp['id']}: no branch for {base}; skipped", file=sys.stderr)
                continue
            key = "Resource" if base == "DomainResource" else base
            out.setdefault(key, {})[sp["code"]] = {
                "type": sp["type"],
                "expression": expression,
                "target": sorted(sp.get("target", [])),
            }
    return {t: dict(sorted(params.items())) for t, params in sorted(out.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a Bundle of R4 SearchParameter resources")
    parser.add_argument("output", type=Path, nargs="?", default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    vendored = vendor(json.loads(args.source.read_text()))
    text = json.dumps(vendored, separators=(",", ":"), sort_keys=False) + "\n"
    args.output.write_text(text)
    count = sum(len(p) for p in vendored.values())
    print(f"{count} parameters over {len(vendored)} types -> {args.output}")


if __name__ == "__main__":
    main()
