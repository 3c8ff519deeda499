"""The conformance package: loading, snapshots and terminology."""

from cpa_fhir.conformance.package import (
    ConformancePackage,
    default_package,
    default_package_dir,
    load_package,
)
from cpa_fhir.conformance.snapshot import generate_snapshot
from cpa_fhir.conformance.terminology import Terminology

__all__ = [
    "ConformancePackage",
    "Terminology",
    "default_package",
    "default_package_dir",
    "generate_snapshot",
    "load_package",
]
