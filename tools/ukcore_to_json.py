#!/usr/bin/env python3
"""Convert FHIR R4 XML conformance resources (the UK Core reference copy) to FHIR JSON.

The conversion follows the FHIR R4 JSON representation
(https://hl7.org/fhir/R4/json.html), driven by the R4 base StructureDefinitions held in
``r4-core.json`` (see ``tools/vendor_r4_definitions.py``):

* an element becomes a property of the same name; it is an array when its base
  definition has ``max`` other than ``"1"``;
* a primitive's ``value`` attribute becomes the property's value, a JSON boolean or
  number for ``boolean``, ``integer``, ``positiveInt``, ``unsignedInt`` and ``decimal``
  (a decimal keeps its exact digits); the primitive's ``id`` and ``extension`` go into the
  ``_name`` sibling (an array aligned with the values, ``null`` where absent);
* choice elements keep their typed name (``valueString``, ``fixedUri``, ``patternCoding``);
* the ``id`` attribute of a complex element and an extension's ``url`` attribute become
  properties; ``contentReference`` elements (``CodeSystem.concept.concept``) and
  contained resources are followed; an XHTML ``div`` becomes a string;
* properties keep the order of the XML, after ``resourceType``.

Every XML file under SOURCE_DIR is written to OUTPUT_DIR as ``<resourceType>-<id>.json``.

Usage::

    python tools/ukcore_to_json.py SOURCE_DIR R4_CORE_JSON OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
SYSTEM_PREFIX = "http://hl7.org/fhirpath/System."
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
INTEGER_TYPES = frozenset({"integer", "positiveInt", "unsignedInt"})

ElementDef = dict[str, Any]


class ConversionError(Exception):
    """The XML does not fit the R4 definitions."""


class RawNumber(str):
    """A JSON number kept as its exact source text (FHIR decimals)."""


@dataclass(frozen=True)
class Child:
    """How one XML child element maps onto its definition."""

    definition: ElementDef  # the element as it appears under its parent (max, name)
    path: str  # path of the element whose children describe the content
    type_code: str  # the FHIR type of this occurrence


class Definitions:
    """Element definitions of the R4 base types and resources, by path."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.elements: dict[str, ElementDef] = {}
        self.kinds: dict[str, str] = {}
        self.parents: set[str] = set()
        self.aliases: dict[str, str] = {}  # data-type profiles (SimpleQuantity) -> base type
        for entry in bundle["entry"]:
            sd = entry["resource"]
            if sd["resourceType"] != "StructureDefinition":
                continue
            if sd.get("derivation") == "constraint":
                if sd["kind"] != "resource" and sd["type"] != "Extension":
                    self.aliases[sd["id"]] = sd["type"]
                continue
            self.kinds[sd["type"]] = sd["kind"]
            for element in sd["snapshot"]["element"]:
                self.elements[element["path"]] = element
                self.parents.add(element["path"].rsplit(".", 1)[0])

    def child(self, parent_path: str, name: str) -> Child:
        """Resolve the XML child NAME of the element at PARENT_PATH."""
        definition = self.elements.get(f"{parent_path}.{name}")
        type_code = ""
        if definition is not None:
            types = definition.get("type", [])
            type_code = types[0]["code"] if len(types) == 1 else ""
        else:
            definition, type_code = self._choice(parent_path, name)
        target = definition.get("contentReference", "")
        path = target[1:] if target.startswith("#") else definition["path"]
        if not type_code and not target:
            raise ConversionError(f"{parent_path}.{name}: ambiguous type")
        return Child(definition, path, type_code)

    def _choice(self, parent_path: str, name: str) -> tuple[ElementDef, str]:
        prefix = f"{parent_path}."
        for path, definition in self.elements.items():
            if not (path.startswith(prefix) and path.endswith("[x]")):
                continue
            base = path[len(prefix) : -3]
            if "." in base or not name.startswith(base):
                continue
            suffix = name[len(base) :]
            for type_ in definition.get("type", []):
                code = type_["code"]
                if code[:1].upper() + code[1:] == suffix:
                    return definition, code
        raise ConversionError(f"unknown element {parent_path}.{name}")

    def is_primitive(self, type_code: str) -> bool:
        """True for FHIR primitive types and the FHIRPath System types."""
        return type_code.startswith(SYSTEM_PREFIX) or self.kinds.get(type_code) == "primitive-type"

    def is_resource(self, type_code: str) -> bool:
        """True when TYPE_CODE names a resource (``Resource`` included)."""
        return self.kinds.get(type_code) == "resource"


def _local(tag: str) -> tuple[str, str]:
    """Split an ElementTree tag into (namespace, local name)."""
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return namespace, local
    return "", tag


def _fhir_type(child: Child) -> str:
    """The FHIR primitive type name, also for System.* types carrying the fhir-type extension."""
    if not child.type_code.startswith(SYSTEM_PREFIX):
        return child.type_code
    for type_ in child.definition.get("type", []):
        for extension in type_.get("extension", []):
            if extension.get("url") == FHIR_TYPE_EXT:
                return str(extension["valueUrl"])
    return child.type_code[len(SYSTEM_PREFIX) :].lower()


def primitive_value(text: str, fhir_type: str) -> Any:
    """The JSON value of a primitive's ``value`` attribute."""
    if fhir_type == "boolean":
        if text not in ("true", "false"):
            raise ConversionError(f"bad boolean {text!r}")
        return text == "true"
    if fhir_type in INTEGER_TYPES:
        return int(text)
    if fhir_type == "decimal":
        Decimal(text)  # raises on malformed input
        return RawNumber(text)
    return text


def xhtml_string(element: ET.Element) -> str:
    """Serialise an XHTML ``div`` with its default namespace declaration."""
    ET.register_namespace("", XHTML_NS)
    clone = copy.deepcopy(element)
    clone.tail = None
    return ET.tostring(clone, encoding="unicode")


class Converter:
    """Turns FHIR XML elements into JSON-ready dictionaries."""

    def __init__(self, definitions: Definitions) -> None:
        self.defs = definitions

    def resource(self, element: ET.Element) -> dict[str, Any]:
        """Convert a resource element (its tag is the resource type)."""
        namespace, name = _local(element.tag)
        if namespace != FHIR_NS or self.defs.kinds.get(name) != "resource":
            raise ConversionError(f"not a FHIR resource: {element.tag}")
        result: dict[str, Any] = {"resourceType": name}
        result.update(self.complex(element, name))
        return result

    def complex(self, element: ET.Element, path: str) -> dict[str, Any]:
        """Convert the attributes and children of a non-primitive element at PATH."""
        result: dict[str, Any] = {}
        for attribute, text in element.attrib.items():
            definition = self.defs.elements.get(f"{path}.{attribute}", {})
            if "xmlAttr" not in definition.get("representation", []):
                raise ConversionError(f"unexpected attribute {path}@{attribute}")
            result[attribute] = text
        groups: dict[str, tuple[Child, list[ET.Element]]] = {}
        for child_element in element:
            namespace, name = _local(child_element.tag)
            if name not in groups:
                groups[name] = (self.defs.child(path, name), [])
            expected = XHTML_NS if groups[name][0].type_code == "xhtml" else FHIR_NS
            if namespace != expected:
                raise ConversionError(f"{path}: unexpected element {child_element.tag}")
            groups[name][1].append(child_element)
        for name, (child, occurrences) in groups.items():
            repeats = child.definition.get("max", "1") != "1"
            if not repeats and len(occurrences) > 1:
                raise ConversionError(f"{path}.{name}: repeated but max is 1")
            if child.type_code == "xhtml":
                result[name] = xhtml_string(occurrences[0])
            elif child.type_code and self.defs.is_primitive(child.type_code):
                self._primitive(result, name, child, occurrences, repeats)
            else:
                values = [self.value(occurrence, child) for occurrence in occurrences]
                result[name] = values if repeats else values[0]
        return result

    def value(self, element: ET.Element, child: Child) -> Any:
        """Convert one occurrence of a non-primitive child."""
        if self.defs.is_resource(child.type_code):
            inner = list(element)
            if len(inner) != 1:
                raise ConversionError(f"{child.path}: expected exactly one resource")
            return self.resource(inner[0])
        if child.path in self.defs.parents:  # backbone element or contentReference target
            return self.complex(element, child.path)
        return self.complex(element, self.defs.aliases.get(child.type_code, child.type_code))

    def _primitive(
        self,
        result: dict[str, Any],
        name: str,
        child: Child,
        occurrences: list[ET.Element],
        repeats: bool,
    ) -> None:
        fhir_type = _fhir_type(child)
        values: list[Any] = []
        extras: list[dict[str, Any] | None] = []
        for occurrence in occurrences:
            unexpected = set(occurrence.attrib) - {"id", "value"}
            if unexpected:
                raise ConversionError(f"{child.path}: unexpected attributes {unexpected}")
            text = occurrence.get("value")
            if text is None and not len(occurrence) and "id" not in occurrence.attrib:
                raise ConversionError(f"{child.path}: primitive without value or extension")
            values.append(None if text is None else primitive_value(text, fhir_type))
            extra: dict[str, Any] = {}
            if "id" in occurrence.attrib:
                extra["id"] = occurrence.attrib["id"]
            for extension in occurrence:
                if _local(extension.tag) != (FHIR_NS, "extension"):
                    raise ConversionError(f"{child.path}: unexpected {extension.tag}")
                extra.setdefault("extension", []).append(self.complex(extension, "Extension"))
            extras.append(extra or None)
        if any(v is not None for v in values):
            result[name] = values if repeats else values[0]
        if any(e is not None for e in extras):
            result[f"_{name}"] = extras if repeats else extras[0]


def dumps(value: Any, indent: int = 0) -> str:
    """JSON text indented like ``json.dumps(indent=2)``, writing RawNumber digits as they are."""
    if isinstance(value, RawNumber):
        return str(value)
    if not isinstance(value, (dict, list)) or not value:
        return json.dumps(value, ensure_ascii=False)
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        items = [
            f"{json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 1)}" for k, v in value.items()
        ]
        brackets = "{}"
    else:
        items = [dumps(v, indent + 1) for v in value]
        brackets = "[]"
    body = ",\n".join(pad + item for item in items)
    return f"{brackets[0]}\n{body}\n{'  ' * indent}{brackets[1]}"


def convert_file(path: Path, converter: Converter) -> dict[str, Any]:
    """Parse one FHIR XML file and convert its root resource."""
    try:
        return converter.resource(ET.parse(path).getroot())
    except ConversionError as error:
        raise ConversionError(f"{path.name}: {error}") from error


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "source_dir", type=Path, help="folder of FHIR XML files (searched recursively)"
    )
    parser.add_argument("r4_core", type=Path, help="r4-core.json from vendor_r4_definitions.py")
    parser.add_argument("output_dir", type=Path, help="folder to write the JSON files into")
    args = parser.parse_args(argv)

    converter = Converter(Definitions(json.loads(args.r4_core.read_text(encoding="utf-8"))))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(args.source_dir.rglob("*.xml"))
    for source in sources:
        try:
            resource = convert_file(source, converter)
        except ConversionError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        target = args.output_dir / f"{resource['resourceType']}-{resource['id']}.json"
        target.write_text(dumps(resource) + "\n", encoding="utf-8")
        print(f"{source.name} -> {target.name}", file=sys.stderr)
    print(f"converted {len(sources)} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
