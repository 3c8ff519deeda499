"""Property: any JSON a client can send gets issues back, never an exception."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.validation import Validator
from tests.common import EXAMPLES

RECORDS = [orjson.loads(p.read_bytes()) for p in sorted(EXAMPLES.glob("*.json"))]

# orjson (and JSON parsers generally) only carry 64-bit integers.
json_integers = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | json_integers | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=6,
) | st.sampled_from(
    [{"resourceType": "Patient"}, {"resourceType": "xxx"}, {"reference": 5}, {"coding": 3}]
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if path:
        yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_validating_corrupted_records_never_raises(
    validator: Validator, data: st.DataObject
) -> None:
    record = copy.deepcopy(data.draw(st.sampled_from(RECORDS)))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(record))))
        target = record
        for key in path[:-1]:
            target = target[key]
        # A copy: sampled examples are shared between test cases, and later draws mutate.
        target[path[-1]] = copy.deepcopy(data.draw(json_values))
    issues = validator.validate(orjson.dumps(record))
    assert all(i.severity in ("fatal", "error", "warning", "information") for i in issues)
