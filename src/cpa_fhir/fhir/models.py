"""The one module that picks the FHIR release.

The wire format is FHIR R4 (4.0.1). fhir.resources 8.x ships R5, R4B and STU3
models only; R4B (4.3.0) models parse the R4 resource types this project uses,
so they serve for structural parsing. Differences are handled here: R4B-only
resource types are refused, and R4-only types (not modelled in R4B) are reported
as unsupported rather than silently parsed as something else. Element-level
differences are caught by the R4 StructureDefinitions in `definitions/`.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class

FHIR_VERSION = "4.0.1"

# Every concrete resource type of FHIR R4 4.0.1 (https://hl7.org/fhir/R4/resourcelist.html).
R4_RESOURCE_TYPES: frozenset[str] = frozenset(
    """Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
    AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
    CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
    ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
    Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
    CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
    DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
    GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
    ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
    Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
    MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
    Parameters Patient PaymentNotice PaymentReconciliation Person PlanDefinition Practitioner
    PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse RelatedPerson
    RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject
    RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen
    SpecimenDefinition StructureDefinition StructureMap Subscription Substance
    SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
    SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task
    TerminologyCapabilities TestReport TestScript ValueSet VerificationResult VisionPrescription""".split()
)


def declared_profiles(resource: dict[str, Any]) -> list[str]:
    """The profile urls a resource claims in meta.profile, ignoring malformed entries."""
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    return [p for p in profiles if isinstance(p, str)] if isinstance(profiles, list) else []


def bundle_entries(bundle: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(index, entry) of a Bundle's well-formed entries; malformed ones are left to validation."""
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    return [(i, e) for i, e in enumerate(entries) if isinstance(e, dict)]


def model_class(resource_type: str) -> Any | None:
    """The R4B model that parses an R4 resource type, or None when R4B does not model it."""
    if resource_type not in R4_RESOURCE_TYPES:
        return None
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return None
