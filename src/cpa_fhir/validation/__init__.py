"""Validation against the CPA profiles package: issues as OperationOutcome (pure)."""

from cpa_fhir.validation._record_rules import check_record
from cpa_fhir.validation._validator import Validator
from cpa_fhir.validation.identifiers import is_valid_nhs_number, is_valid_sctid

__all__ = [
    "Validator",
    "check_record",
    "is_valid_nhs_number",
    "is_valid_sctid",
]
