from __future__ import annotations

import pytest

from cpa_fhir.config import load_policy
from cpa_fhir.conformance import ConformancePackage
from cpa_fhir.consent import RequiredElements, SharingPolicy
from tests.common import POLICY


@pytest.fixture(scope="session")
def policy() -> SharingPolicy:
    return load_policy(POLICY)


@pytest.fixture(scope="session")
def required(package: ConformancePackage) -> RequiredElements:
    return RequiredElements(package)
