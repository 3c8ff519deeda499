"""A FHIR package of conformance resources, with the R4 core definitions beneath it.

Loading reads files (the edge); the loaded `ConformancePackage` is a plain value
that pure stages take as an argument. https://hl7.org/fhir/packages.html
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from cpa_fhir._artifacts import find_artifact
from cpa_fhir.conformance.snapshot import (
    differential_elements,
    generate_snapshot,
    snapshot_elements,
)
from cpa_fhir.conformance.terminology import Terminology
from cpa_fhir.errors import ProfileError

CANONICAL_TYPES = ("StructureDefinition", "ValueSet", "CodeSystem", "SearchParameter")


@dataclass
class ConformancePackage:
    """The package's own canonical resources plus those it depends on, by url."""

    name: str
    version: str
    canonical: str
    own: dict[str, dict[str, Any]]
    core: dict[str, dict[str, Any]]
    terminology: Terminology = field(init=False)

    def __post_init__(self) -> None:
        self.terminology = Terminology(self.resolve)
        for sd in self.structure_definitions():
            if not snapshot_elements(sd):
                sd["snapshot"] = {"element": generate_snapshot(sd, self.resolve)}

    def resolve(self, url: str) -> dict[str, Any] | None:
        url = url.split("|", 1)[0]
        return self.own.get(url) or self.core.get(url)

    def structure_definitions(self) -> list[dict[str, Any]]:
        """The package's own StructureDefinitions, bases before the profiles built on them."""
        own = [r for r in self.own.values() if r["resourceType"] == "StructureDefinition"]
        ordered: list[dict[str, Any]] = []
        seen: set[str] = set()

        def visit(sd: dict[str, Any]) -> None:
            if sd["url"] in seen:
                return
            seen.add(sd["url"])
            base_url = sd.get("baseDefinition")
            base = self.own.get(base_url) if isinstance(base_url, str) else None
            if base is not None:
                visit(base)
            for el in differential_elements(sd):
                types = el.get("type")
                for t in types if isinstance(types, list) else []:
                    # Only the order depends on these: a malformed type is for
                    # snapshot generation and validation to report, not to crash on.
                    profiles = t.get("profile") if isinstance(t, dict) else None
                    for p in profiles if isinstance(profiles, list) else []:
                        if isinstance(p, str) and p in self.own:
                            visit(self.own[p])
            ordered.append(sd)

        for sd in sorted(own, key=lambda s: s["url"]):
            visit(sd)
        return ordered

    def search_parameters(self) -> list[dict[str, Any]]:
        """The package's own SearchParameters (https://hl7.org/fhir/R4/searchparameter.html)."""
        return sorted(
            (r for r in self.own.values() if r["resourceType"] == "SearchParameter"),
            key=lambda r: str(r["url"]),
        )

    def profiles(self) -> list[str]:
        """Urls of the package's own resource profiles (not extensions, not UK Core)."""
        return sorted(
            sd["url"]
            for sd in self.structure_definitions()
            if sd.get("kind") == "resource" and sd["url"].startswith(self.canonical)
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ProfileError(f"{path.name}: cannot read conformance resource ({exc})") from exc
    # Every JSON file of a package is a manifest or a resource: both are objects. Saying
    # so here keeps every command that loads the package from failing (or skipping the
    # file) in its own way further on.
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: not a JSON object (it is {_json_type(data)})")
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "true or false"}.get(type(value), "a number")


@cache
def core_definitions() -> dict[str, dict[str, Any]]:
    """The vendored FHIR R4 4.0.1 definitions, by canonical url."""
    raw = resources.files("cpa_fhir.fhir").joinpath("definitions/r4-core.json").read_bytes()
    bundle = orjson.loads(raw)
    return {e["resource"]["url"]: e["resource"] for e in bundle["entry"]}


def load_package(
    folder: str | os.PathLike[str], *, rebuild_snapshots: bool = False
) -> ConformancePackage:
    """Load a FHIR package folder (package.json plus conformance resources as JSON).

    Snapshots shipped in the files are used as they are unless `rebuild_snapshots`
    asks for them to be generated afresh from the differentials.
    """
    root = Path(folder)
    manifest_path = root / "package.json"
    if not manifest_path.is_file():
        raise ProfileError(f"{root} is not a FHIR package: it has no package.json")
    manifest = _read_json(manifest_path)
    for key in ("name", "version", "canonical"):
        if not isinstance(manifest.get(key), str):
            raise ProfileError(f"{manifest_path}: '{key}' must be a string")
    own: dict[str, dict[str, Any]] = {}
    for path in sorted(root.glob("*.json")):
        if path.name == "package.json":
            continue
        res = _read_json(path)
        if res.get("resourceType") in CANONICAL_TYPES and "url" in res:
            if not isinstance(res["url"], str):
                raise ProfileError(f"{path}: 'url' must be a string")
            if rebuild_snapshots and res["resourceType"] == "StructureDefinition":
                res.pop("snapshot", None)
            own[res["url"]] = res
    return ConformancePackage(
        name=manifest["name"],
        version=manifest["version"],
        canonical=manifest["canonical"],
        own=own,
        core=core_definitions(),
    )


def default_package_dir() -> Path:
    """The profiles package: $CPA_FHIR_PROFILES, or `profiles/` of this source checkout."""
    env = os.environ.get("CPA_FHIR_PROFILES")
    if env:
        return Path(env)
    found = find_artifact("profiles/package.json")
    if found is None:
        raise ProfileError(
            "the profiles package was not found: set CPA_FHIR_PROFILES to its folder"
        )
    return found.parent


@cache
def default_package() -> ConformancePackage:
    return load_package(default_package_dir())
