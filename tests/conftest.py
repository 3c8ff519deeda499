from __future__ import annotations

import pytest

from cpa_fhir.conformance import ConformancePackage, load_package
from cpa_fhir.validation import Validator
from tests.common import PROFILES


@pytest.fixture(scope="session")
def package() -> ConformancePackage:
    return load_package(PROFILES)


@pytest.fixture(scope="session")
def validator(package: ConformancePackage) -> Validator:
    return Validator(package)
