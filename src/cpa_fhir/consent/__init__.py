"""Consent-aware sharing: label, decide, filter, audit. Pure: no I/O.

The policy (categories, labelling rules, recipients, legal exceptions) is data,
parsed by `parse_policy`; the time and ids are passed in.
"""

from cpa_fhir.consent._audit import (
    audit_event,
    audit_instant,
    disclosed_references,
    provenance,
    withheld_counts,
)
from cpa_fhir.consent._decision import (
    Basis,
    Decision,
    Recipient,
    cares_for,
    decide,
    is_active,
    period_covers,
    period_holds,
    person_name,
    recipient_from,
    resolve_recipient,
    steady_span,
)
from cpa_fhir.consent._filtering import (
    FilterResult,
    RequiredElements,
    WithheldItem,
    filter_record,
)
from cpa_fhir.consent._labelling import (
    ElementLabel,
    LabelledResource,
    label_resource,
    label_resources,
    security_labels,
)
from cpa_fhir.consent._policy import (
    CARER,
    CATEGORY_SYSTEM,
    LEGAL_BASIS_SYSTEM,
    Category,
    LabelRule,
    LegalException,
    SharingPolicy,
    parse_policy,
)
from cpa_fhir.consent._share import (
    DISCLOSURE_PROFILE,
    Disclosure,
    ShareRequest,
    record_entries,
    share,
)

__all__ = [
    "Basis",
    "CARER",
    "CATEGORY_SYSTEM",
    "Category",
    "DISCLOSURE_PROFILE",
    "Decision",
    "Disclosure",
    "ElementLabel",
    "FilterResult",
    "LEGAL_BASIS_SYSTEM",
    "LabelRule",
    "LabelledResource",
    "LegalException",
    "Recipient",
    "RequiredElements",
    "ShareRequest",
    "SharingPolicy",
    "WithheldItem",
    "audit_event",
    "audit_instant",
    "cares_for",
    "decide",
    "disclosed_references",
    "filter_record",
    "is_active",
    "label_resource",
    "label_resources",
    "parse_policy",
    "period_covers",
    "period_holds",
    "person_name",
    "provenance",
    "recipient_from",
    "record_entries",
    "resolve_recipient",
    "security_labels",
    "share",
    "steady_span",
    "withheld_counts",
]
