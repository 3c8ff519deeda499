"""Property: removing or corrupting any required element of a valid example is an error located there."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.validation import Validator
from cpa_fhir.validation._tree import Node
from tests.common import EXAMPLES

Path = tuple[str | int, ...]


def _required_sites(
    validator: Validator, node: Node, obj: dict[str, Any], path: Path, loc: str
) -> Iterator[tuple[Path, str, str]]:
    """(path in the JSON, FHIRPath location, element name) of each present element the profile requires."""
    for name, child in node.children.items():
        if child.is_choice or name not in obj:
            continue
        if child.min >= 1:
            yield (*path, name), f"{loc}.{name}", name
        if child.children:
            values = obj[name] if isinstance(obj[name], list) else [obj[name]]
            for i, v in enumerate(values):
                if isinstance(v, dict):
                    sub_path = (*path, name, i) if isinstance(obj[name], list) else (*path, name)
                    sub_loc = f"{loc}.{name}[{i}]" if child.is_array else f"{loc}.{name}"
                    yield from _required_sites(validator, child, v, sub_path, sub_loc)


def _sites(validator: Validator) -> list[tuple[str, Path, str, str]]:
    sites = []
    for example in sorted(EXAMPLES.glob("*.json")):
        data = orjson.loads(example.read_bytes())
        resources: list[tuple[dict[str, Any], Path, str]]
        if data["resourceType"] == "Bundle":
            resources = [
                (e["resource"], ("entry", i, "resource"), f"Bundle.entry[{i}].resource")
                for i, e in enumerate(data["entry"])
            ]
        else:
            resources = [(data, (), data["resourceType"])]
        for resource, path, loc in resources:
            for url in resource.get("meta", {}).get("profile", []):
                tree = validator.tree_for_url(url)
                assert tree is not None
                for site in _required_sites(validator, tree, resource, path, loc):
                    sites.append((example.name, *site))
    return sites


@pytest.fixture(scope="module")
def sites(validator: Validator) -> list[tuple[str, Path, str, str]]:
    found = _sites(validator)
    assert len(found) > 200  # the examples exercise the profiles' required elements broadly
    return found


def _apply(data: Any, path: Path, action: str) -> None:
    *parents, last = path
    target = data
    for p in parents:
        target = target[p]
    if action == "remove":
        del target[last]
    else:
        current = target[last]
        # The wrong JSON kind for the element: an object where a primitive goes and vice versa.
        target[last] = 12345 if isinstance(current, (dict, list)) else {"corrupted": True}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), action=st.sampled_from(["remove", "corrupt"]))
def test_breaking_a_required_element_is_an_error_located_there(
    validator: Validator, sites: list[tuple[str, Path, str, str]], data: st.DataObject, action: str
) -> None:
    file, path, loc, name = data.draw(st.sampled_from(sites))
    record = orjson.loads((EXAMPLES / file).read_bytes())
    broken = copy.deepcopy(record)
    _apply(broken, path, action)
    issues = validator.validate(broken)
    errors = [i for i in issues if i.is_error]
    located = [
        i
        for i in errors
        if i.expression
        and (
            i.expression == loc
            or i.expression.startswith(loc + ".")
            or i.expression.startswith(loc + "[")
        )
    ]
    assert located, f"{action} {loc} in {file}: errors were\n" + "\n".join(i.line() for i in errors)
