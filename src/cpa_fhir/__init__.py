"""cpa-fhir: FHIR R4 interoperability for the UK mental-health Care Programme Approach."""

from cpa_fhir.conformance import ConformancePackage, default_package, load_package
from cpa_fhir.errors import FhirError, InputError, ProfileError
from cpa_fhir.fhir import FHIR_VERSION, Issue, operation_outcome
from cpa_fhir.validation import Validator

__version__ = "0.1.0"

__all__ = [
    "ConformancePackage",
    "FHIR_VERSION",
    "FhirError",
    "InputError",
    "Issue",
    "ProfileError",
    "Validator",
    "default_package",
    "load_package",
    "operation_outcome",
]
