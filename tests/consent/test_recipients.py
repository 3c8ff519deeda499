"""Who a disclosure goes to, named from whatever shape a resource's name has."""

from __future__ import annotations

from typing import Any

import pytest

from cpa_fhir.consent import person_name, recipient_from


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ([{"given": ["Ann", "Marie"], "family": "Fictional-Carey"}], "Ann Marie Fictional-Carey"),
        ([{"given": "Ann", "family": "Fictional-Carey"}], "Fictional-Carey"),
        ([{"given": 5}], None),
        ([{"given": [1, "Ann", None]}], "Ann"),
        ([{"given": None, "family": 7}], None),
        ([{"family": "Fictional-Carey"}, {"family": "Other"}], "Fictional-Carey"),
        ("Riverside Practice", "Riverside Practice"),
        ([], None),
        ([5], None),
        (None, None),
    ],
)
def test_a_name_is_read_from_whatever_shape_it_has(name: Any, expected: str | None) -> None:
    person = {"resourceType": "RelatedPerson", "id": "x", "name": name}
    assert person_name(person) == expected
    assert recipient_from(person).display == expected
