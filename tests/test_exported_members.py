"""Each public package's __all__ matches what it really exports (as httpx does)."""

import importlib

import pytest

PACKAGES = [
    "cpa_fhir",
    "cpa_fhir.fhir",
    "cpa_fhir.conformance",
    "cpa_fhir.validation",
    "cpa_fhir.consent",
    "cpa_fhir.store",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_exported(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported)
    public = {
        n
        for n in vars(module)
        if not n.startswith("_") and not isinstance(getattr(module, n), type(module))
    }
    assert set(exported) == public - {"annotations"}
