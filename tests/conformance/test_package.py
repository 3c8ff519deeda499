"""The profiles folder is a self-contained FHIR R4 package that other tools can load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cpa_fhir.conformance import ConformancePackage, generate_snapshot
from tests.common import PROFILES

FILES = sorted(p for p in PROFILES.glob("*.json") if p.name != "package.json")
MANIFEST = json.loads((PROFILES / "package.json").read_text())
CANONICAL = MANIFEST["canonical"]
UK_CORE = ("https://fhir.hl7.org.uk/", "http://hl7.org/fhir/6.0/")
# Referenced by UK Core but defined outside R4 and UK Core: a later FHIR release's
# ValueSet, and an R4 core resource the vendored subset does not carry.
KNOWN_EXTERNAL = {
    "http://hl7.org/fhir/ValueSet/patient-fetalstatus",
    "http://hl7.org/fhir/StructureDefinition/BodyStructure",
}


def _load(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


def test_manifest() -> None:
    assert MANIFEST["fhirVersions"] == ["4.0.1"]
    assert MANIFEST["dependencies"] == {"hl7.fhir.r4.core": "4.0.1"}
    assert MANIFEST["name"] and MANIFEST["version"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_is_named_after_its_resource_and_url_is_canonical(path: Path) -> None:
    res = _load(path)
    assert path.name == f"{res['resourceType']}-{res['id']}.json"
    if res["url"].startswith(UK_CORE):
        return
    assert res["url"] == f"{CANONICAL}/{res['resourceType']}/{res['id']}"
    if res["resourceType"] == "StructureDefinition":
        assert res["fhirVersion"] == "4.0.1"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_resource_parses_as_fhir(path: Path) -> None:
    res = _load(path)
    get_fhir_model_class(res["resourceType"]).model_validate(res)


def _canonicals(res: dict) -> list[str]:  # type: ignore[type-arg]
    refs = []
    if res["resourceType"] == "StructureDefinition":
        refs.append(res["baseDefinition"])
        for el in res["differential"]["element"] + res.get("snapshot", {}).get("element", []):
            for t in el.get("type", []):
                refs += t.get("profile", []) + t.get("targetProfile", [])
            binding = el.get("binding", {})
            if binding.get("strength") in ("required", "extensible") and "valueSet" in binding:
                refs.append(binding["valueSet"])
    if res["resourceType"] == "ValueSet":
        for inc in res.get("compose", {}).get("include", []):
            refs += inc.get("valueSet", [])
            if inc.get("system", "").startswith((CANONICAL, *UK_CORE)):
                refs.append(inc["system"])
    return [r.split("|", 1)[0] for r in refs]


# Definitions of FHIR R4 itself come from the declared dependency hl7.fhir.r4.core.
R4_CORE = (
    "http://hl7.org/fhir/StructureDefinition/",
    "http://hl7.org/fhir/ValueSet/",
    "http://terminology.hl7.org/ValueSet/",
)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_canonical_resolves_offline(package: ConformancePackage, path: Path) -> None:
    refs = set(_canonicals(_load(path))) - KNOWN_EXTERNAL
    missing = {r for r in refs if package.resolve(r) is None and not r.startswith(R4_CORE)}
    assert missing == set()
    # Whatever the CPA profiles themselves bind or build on is vendored, not only declared.
    if not _load(path)["url"].startswith(UK_CORE):
        own = {r for r in _canonicals({**_load(path), "snapshot": {}}) if r not in KNOWN_EXTERNAL}
        assert {r for r in own if package.resolve(r) is None and not r.startswith(R4_CORE)} == set()


@pytest.mark.parametrize(
    "path", [p for p in FILES if p.name.startswith("StructureDefinition-")], ids=lambda p: p.name
)
def test_committed_snapshot_is_up_to_date(package: ConformancePackage, path: Path) -> None:
    sd = _load(path)
    assert sd.get("snapshot", {}).get("element"), "run `cpa-fhir profiles build`"
    fresh = copy.deepcopy(sd)
    fresh.pop("snapshot")
    assert generate_snapshot(fresh, package.resolve) == sd["snapshot"]["element"], (
        "run `cpa-fhir profiles build`"
    )


def test_every_local_code_system_concept_is_documented() -> None:
    for path in PROFILES.glob("CodeSystem-*.json"):
        cs = _load(path)
        if cs["url"].startswith(UK_CORE):
            continue
        assert cs["content"] == "complete"
        for concept in cs["concept"]:
            assert concept.get("display") and concept.get("definition"), (
                path.name,
                concept["code"],
            )
