"""The record of a disclosure: one AuditEvent for the sender, one Provenance for the recipient.

AuditEvent follows the project's profile
https://cpa-fhir.org/fhir/StructureDefinition/cpa-disclosure-audit-event (DICOM
110106 Export; the basis of each category; what went and how much did not).
Provenance follows https://hl7.org/fhir/R4/provenance.html.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from cpa_fhir.consent._decision import Decision
from cpa_fhir.consent._filtering import WithheldItem
from cpa_fhir.consent._policy import CATEGORY_SYSTEM, LEGAL_BASIS_SYSTEM, PURPOSE_SYSTEM

AUDIT_PROFILE = "https://cpa-fhir.org/fhir/StructureDefinition/cpa-disclosure-audit-event"
BASIS_EXTENSION = "https://cpa-fhir.org/fhir/StructureDefinition/disclosure-basis"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
# The service user whose information went: an entity in the Patient role (as the
# IHE Basic Audit Log Patterns name the patient), so `AuditEvent?patient=` finds
# every disclosure of their record, whatever resources it held.
SUBJECT_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
    "code": "1",
    "display": "Person",
}
SUBJECT_ROLE = {
    "system": "http://terminology.hl7.org/CodeSystem/object-role",
    "code": "1",
    "display": "Patient",
}


COUNTED = "Counted in what was sent (a total, a next page), not sent"
CONSULTED = "Found by the search's criteria to hold for what was sent, not sent"


def disclosed_references(event: dict[str, Any]) -> list[str]:
    """Type/id of what an AuditEvent of a disclosure records as shared (not its subject),
    the version aside where it names one (`Type/id/_history/n`)."""
    return [
        e["what"]["reference"].split("/_history/")[0]
        for e in event.get("entity", [])
        if "what" in e and e.get("role") != SUBJECT_ROLE and e.get("description") != CONSULTED
    ]


def audit_instant(at: datetime) -> str:
    """AuditEvent.recorded for a moment."""
    return at.isoformat().replace("+00:00", "Z")


def basis_extensions(decision: Decision, categories: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for cat in sorted(categories):
        basis = decision.basis_of(cat)
        parts: list[dict[str, Any]] = [
            {"url": "category", "valueCoding": {"system": CATEGORY_SYSTEM, "code": cat}}
        ]
        if basis.consent is not None:
            parts.append({"url": "consent", "valueReference": {"reference": basis.consent}})
        else:
            parts.append(
                {
                    "url": "legalBasis",
                    "valueCoding": {"system": LEGAL_BASIS_SYSTEM, "code": basis.legal_basis},
                }
            )
        out.append({"url": BASIS_EXTENSION, "extension": parts})
    return out


def withheld_counts(withheld: Sequence[WithheldItem]) -> Counter[str]:
    """How many resources or elements each category kept back (one item may count for several)."""
    counts: Counter[str] = Counter()
    for item in withheld:
        if item.categories:
            counts.update(item.categories)
        else:
            counts["not-needed-or-incomplete"] += 1
    return counts


def audit_event(
    *,
    event_id: str,
    decision: Decision,
    shared: Sequence[str],
    shared_categories: Sequence[str],
    withheld: Sequence[WithheldItem],
    requester: str,
    observer: dict[str, Any],
    patient: str | None = None,
    counted: Mapping[str, int] | None = None,
    consulted: Sequence[str] = (),
) -> dict[str, Any]:
    """The one AuditEvent of a disclosure. `shared` lists Type/id of what went;
    `patient`, Patient/id of the service user whose record it came from; `counted`,
    per resource type, how many more the recipient was told of but not sent (a
    search's total, a next page); `consulted`, Type/id of what a search's criteria
    were found to hold through, not sent. The categories of both are among
    `shared_categories`."""
    entities: list[dict[str, Any]] = []
    if patient is not None:
        entities.append(
            {"what": {"reference": patient}, "type": SUBJECT_TYPE, "role": SUBJECT_ROLE}
        )
    entities += [{"what": {"reference": key}} for key in shared]
    entities += [{"what": {"reference": key}, "description": CONSULTED} for key in consulted]
    if counted:
        entities.append(
            {
                "description": COUNTED,
                "detail": [
                    {"type": f"counted-{rtype}", "valueString": str(n)}
                    for rtype, n in sorted(counted.items())
                ],
            }
        )
    counts = withheld_counts(withheld)
    if counts:
        entities.append(
            {
                "description": "Withheld from this disclosure",
                "detail": [
                    {"type": f"withheld-{cat}", "valueString": str(n)}
                    for cat, n in sorted(counts.items())
                ],
            }
        )
    recipient: dict[str, Any] = {"reference": decision.recipient.reference}
    if decision.recipient.display:
        recipient["display"] = decision.recipient.display
    return {
        "resourceType": "AuditEvent",
        "id": event_id,
        "meta": {"profile": [AUDIT_PROFILE]},
        "extension": basis_extensions(decision, shared_categories),
        "type": {"system": _DCM, "code": "110106", "display": "Export"},
        "action": "R",
        "recorded": audit_instant(decision.at),
        "outcome": "0",
        "purposeOfEvent": [{"coding": [{"system": PURPOSE_SYSTEM, "code": decision.purpose}]}],
        "agent": [
            {
                "type": {
                    "coding": [{"system": _DCM, "code": "110153", "display": "Source Role ID"}]
                },
                "who": {"reference": requester},
                "requestor": True,
            },
            {
                "type": {
                    "coding": [{"system": _DCM, "code": "110152", "display": "Destination Role ID"}]
                },
                "who": recipient,
                "requestor": False,
            },
        ],
        "source": {"observer": observer},
        "entity": entities,
    }


def provenance(
    *,
    provenance_id: str,
    decision: Decision,
    targets: Sequence[str],
    sender: str,
    policies: Sequence[str],
) -> dict[str, Any]:
    """Provenance for the shared bundle: who assembled it, when, why, under which policy."""
    return {
        "resourceType": "Provenance",
        "id": provenance_id,
        "target": [{"reference": t} for t in targets],
        "recorded": audit_instant(decision.at),
        "policy": list(policies),
        "reason": [{"coding": [{"system": PURPOSE_SYSTEM, "code": decision.purpose}]}],
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "assembler",
                            "display": "Assembler",
                        }
                    ]
                },
                "who": {"display": sender},
            }
        ],
    }
