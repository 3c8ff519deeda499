"""The fast FHIRPath path gives fhirpathpy's answer wherever it gives one.

Checked on every invariant evaluation the example records and the invalid
fixtures cause, on corrupted records, and on generated values for every package
invariant the fast path compiles.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.conformance import ConformancePackage
from cpa_fhir.validation import Validator
from cpa_fhir.validation._fhirpath import Fallback, compile_fast
from cpa_fhir.validation._tree import Node, _evaluable
from cpa_fhir.validation._validator import compile_invariant, fhirpathpy_outcome
from tests.common import EXAMPLES, INVALID

FILES = sorted(EXAMPLES.glob("*.json")) + sorted(INVALID.glob("invalid-*.json"))
RECORDS = [orjson.loads(p.read_bytes()) for p in sorted(EXAMPLES.glob("Bundle-record-*.json"))]


class ComparingValidator(Validator):
    """Evaluates every invariant both ways and keeps any disagreement."""

    def __init__(self, package: ConformancePackage):
        super().__init__(package)
        self.fast_answers = 0
        self.fallbacks = 0
        self.disagreements: list[tuple[str, str, Any, bool, bool | None]] = []

    def evaluate_invariant(
        self, constraint: dict[str, Any], v: Any, root: dict[str, Any], node: Node
    ) -> bool | None:
        outcome = super().evaluate_invariant(constraint, v, root, node)
        expression = constraint.get("expression")
        if not expression:
            return outcome
        fn, fast = self._compiled[expression]
        if fn is None or fast is None:
            return outcome
        path = node.el["path"]
        expected = fhirpathpy_outcome(fn, v, path, root)
        try:
            got = fast(v, path)
        except Fallback:
            self.fallbacks += 1
        else:
            self.fast_answers += 1
            if got != expected:
                self.disagreements.append((expression, path, v, got, expected))
        assert outcome == expected
        return outcome


@pytest.fixture(scope="module")
def comparing(package: ConformancePackage) -> ComparingValidator:
    return ComparingValidator(package)


def test_agrees_on_examples_and_invalid_fixtures(comparing: ComparingValidator) -> None:
    for path in FILES:
        comparing.validate(path.read_bytes())
    assert comparing.disagreements == []
    # The fast path does answer: nearly every evaluation here is in the subset.
    assert comparing.fast_answers > 10 * max(comparing.fallbacks, 1)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if path:
        yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _mutation(data: st.DataObject, value: Any) -> Any:
    """Near misses an invariant cares about: emptied, doubled, retyped, re-coded."""
    return data.draw(
        st.sampled_from(
            [
                None,
                [],
                {},
                True,
                3,
                "",
                "offered",
                "carer",
                "care-coordinator",
                "entered-in-error",
                "RelatedPerson",
                {"extension": [{"url": "x", "valueString": "y"}]},
                [value, value],
                [value, None],
                {"url": "status", "valueCode": "offered"},
            ]
        )
    )


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_agrees_on_corrupted_records(comparing: ComparingValidator, data: st.DataObject) -> None:
    record = copy.deepcopy(data.draw(st.sampled_from(RECORDS)))
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(list(_paths(record))))
        target = record
        for key in path[:-1]:
            target = target[key]
        key = path[-1]
        if isinstance(key, str) and data.draw(st.booleans()):
            # A primitive's extension sibling, or a renamed element.
            target["_" + key if data.draw(st.booleans()) else key + "X"] = {"extension": []}
        else:
            target[key] = _mutation(data, target[key])
    comparing.validate(orjson.dumps(record))
    assert comparing.disagreements == []


# -- generated values for each compiled package invariant ----------------------
_CHOICE_SUFFIXES = ["Coding", "String", "Code", "Boolean", "Reference", "Quantity", "Period"]


@pytest.fixture(scope="module")
def compiled_invariants(package: ConformancePackage) -> list[tuple[str, str]]:
    """(expression, element path) of every package invariant the fast path compiles."""
    found: set[tuple[str, str]] = set()
    for sd in [*package.core.values(), *package.structure_definitions()]:
        for el in sd.get("snapshot", {}).get("element", []):
            for c in el.get("constraint", []):
                expression = c.get("expression")
                if expression and _evaluable(c) and compile_fast(expression) is not None:
                    found.add((expression, el["path"]))
    return sorted(found)


def _values_for(expression: str, path: str) -> st.SearchStrategy[Any]:
    names = set(re.findall(r"[A-Za-z][A-Za-z0-9]*", re.sub(r"'(?:[^'\\]|\\.)*'", "", expression)))
    names |= {"url", "extension", "value", "resourceType"}
    keys = sorted(
        names | {"_" + n for n in names} | {n + s for n in names for s in _CHOICE_SUFFIXES}
    )
    literals = re.findall(r"'((?:[^'\\]|\\.)*)'", expression)
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(-2, 12)
        | st.sampled_from([*literals, "", "x", path.split(".")[0]])
    )
    values = st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(keys), inner),
        max_leaves=14,
    )
    return st.dictionaries(st.sampled_from(keys), values, max_size=6) | values


def test_most_package_invariants_compile(compiled_invariants: list[tuple[str, str]]) -> None:
    assert len(compiled_invariants) > 100


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_agrees_on_generated_values(
    compiled_invariants: list[tuple[str, str]], data: st.DataObject
) -> None:
    expression, path = data.draw(st.sampled_from(compiled_invariants))
    fn, fast = compile_invariant(expression)
    assert fn is not None and fast is not None
    value = data.draw(_values_for(expression, path))
    root = value if isinstance(value, dict) else {"resourceType": path.split(".")[0]}
    expected = fhirpathpy_outcome(fn, value, path, root)
    try:
        got = fast(value, path)
    except Fallback:
        return
    assert got == expected, (expression, path, value)
