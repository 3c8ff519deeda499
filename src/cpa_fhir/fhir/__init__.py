"""FHIR release choice, OperationOutcome issues and the vendored R4 definitions."""

from cpa_fhir.fhir.models import (
    FHIR_VERSION,
    R4_RESOURCE_TYPES,
    bundle_entries,
    declared_profiles,
    model_class,
)
from cpa_fhir.fhir.outcome import Issue, operation_outcome, sort_issues

__all__ = [
    "FHIR_VERSION",
    "Issue",
    "R4_RESOURCE_TYPES",
    "bundle_entries",
    "declared_profiles",
    "model_class",
    "operation_outcome",
    "sort_issues",
]
