"""A hand-edited package with a file of the wrong shape is a ProfileError naming the file
(or the StructureDefinition and element), never a TypeError, AttributeError or
RecursionError from deep inside loading or snapshot generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cpa_fhir.conformance.package import load_package
from cpa_fhir.errors import ProfileError

URL = "http://example.org/fhir/StructureDefinition/Odd"
MANIFEST = {"name": "test.package", "version": "0.1.0", "canonical": "http://example.org/fhir"}


def write_package(folder: Path, manifest: Any = MANIFEST, **files: Any) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "package.json").write_text(json.dumps(manifest))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


def odd_profile(**changes: Any) -> dict[str, Any]:
    sd: dict[str, Any] = {
        "resourceType": "StructureDefinition",
        "url": URL,
        "name": "Odd",
        "kind": "resource",
        "type": "Patient",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Patient",
        "derivation": "constraint",
        "differential": {"element": [{"id": "Patient.name", "path": "Patient.name", "min": 1}]},
    }
    sd.update(changes)
    return sd


def test_a_well_formed_small_package_loads(tmp_path: Path) -> None:
    loaded = load_package(write_package(tmp_path, **{"StructureDefinition-odd": odd_profile()}))
    name = next(e for e in loaded.own[URL]["snapshot"]["element"] if e["id"] == "Patient.name")
    assert name["min"] == 1


@pytest.mark.parametrize(
    ("manifest", "says"),
    [
        ([], "package.json: not a JSON object (it is an array)"),
        ("x", "package.json: not a JSON object (it is a string)"),
        ({"version": "1", "canonical": "http://x"}, "package.json: 'name' must be a string"),
        ({**MANIFEST, "canonical": 1}, "package.json: 'canonical' must be a string"),
    ],
)
def test_an_unusable_manifest_is_named(tmp_path: Path, manifest: Any, says: str) -> None:
    with pytest.raises(ProfileError) as caught:
        load_package(write_package(tmp_path, manifest))
    assert caught.value.message == f"{tmp_path}/{says}"


@pytest.mark.parametrize("content", [[1], None, 3, "StructureDefinition"])
def test_a_resource_file_that_is_not_an_object_is_named(tmp_path: Path, content: Any) -> None:
    folder = write_package(tmp_path, **{"StructureDefinition-odd": content})
    for rebuild in (False, True):  # validate's loading and profiles build's alike
        with pytest.raises(ProfileError) as caught:
            load_package(folder, rebuild_snapshots=rebuild)
        assert caught.value.message.startswith(
            f"{folder / 'StructureDefinition-odd.json'}: not a JSON object"
        )


def test_a_canonical_url_that_is_not_a_string_is_named(tmp_path: Path) -> None:
    folder = write_package(tmp_path, **{"StructureDefinition-odd": odd_profile(url=["x"])})
    with pytest.raises(ProfileError, match="StructureDefinition-odd.json: 'url' must be a string"):
        load_package(folder)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        # An id with no parent: _materialize looked for the parent "" for ever.
        ({"differential": {"element": [{"id": "x", "path": "x"}]}}, "element x is not inside"),
        ({"differential": {"element": [{"id": "x", "path": 5}]}}, "x: its path is not a string"),
        ({"differential": {"element": [{"min": 1}]}}, "element 1 has no id or path"),
        ({"differential": {"element": [1]}}, "differential.element must be a list of objects"),
        ({"differential": []}, "differential.element must be a list of objects"),
        ({"snapshot": {"element": 5}}, "snapshot.element must be a list of objects"),
        (
            {"differential": {"element": [{"id": "Patient.name", "constraint": 5}]}},
            "Patient.name: constraint must be a list of objects",
        ),
        ({"differential": {"element": [{"id": "Patient.nope"}]}}, "no element Patient.nope"),
        ({"baseDefinition": ["x"]}, "has no baseDefinition"),
    ],
)
def test_a_malformed_structure_definition_is_named(
    tmp_path: Path, changes: dict[str, Any], says: str
) -> None:
    folder = write_package(tmp_path, **{"StructureDefinition-odd": odd_profile(**changes)})
    with pytest.raises(ProfileError) as caught:
        load_package(folder)
    assert caught.value.message.startswith(URL) and says in caught.value.message


def test_a_circular_base_definition_is_named(tmp_path: Path) -> None:
    """A -> B -> A (and A -> A) recursed without end; now the cycle is said."""
    other = "http://example.org/fhir/StructureDefinition/Other"
    folder = write_package(
        tmp_path,
        **{
            "StructureDefinition-odd": odd_profile(baseDefinition=other),
            "StructureDefinition-other": odd_profile(url=other, name="Other", baseDefinition=URL),
        },
    )
    for rebuild in (False, True):
        with pytest.raises(ProfileError) as caught:
            load_package(folder, rebuild_snapshots=rebuild)
        assert caught.value.message == f"circular baseDefinition: {other} -> {URL} -> {other}"
    itself = write_package(
        tmp_path / "itself", **{"StructureDefinition-odd": odd_profile(baseDefinition=URL)}
    )
    with pytest.raises(ProfileError, match=f"circular baseDefinition: {URL} -> {URL}$"):
        load_package(itself)


def test_a_type_profile_that_is_its_own_definition_is_named(tmp_path: Path) -> None:
    """An element typed by the very profile it is in would be unrolled without end."""
    extension = "http://example.org/fhir/StructureDefinition/ext"
    looped = {
        "resourceType": "StructureDefinition",
        "url": extension,
        "name": "Ext",
        "kind": "complex-type",
        "type": "Extension",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Extension",
        "derivation": "constraint",
        "differential": {
            "element": [
                {
                    "id": "Extension.extension:inner",
                    "path": "Extension.extension",
                    "sliceName": "inner",
                    "type": [{"code": "Extension", "profile": [extension]}],
                },
                {"id": "Extension.extension:inner.url", "path": "Extension.extension.url"},
            ]
        },
    }
    folder = write_package(tmp_path, **{"StructureDefinition-ext": looped})
    with pytest.raises(ProfileError, match="circular type profile"):
        load_package(folder)
