"""The CapabilityStatement at /metadata, generated from what really runs:
https://hl7.org/fhir/R4/capabilitystatement.html"""

from __future__ import annotations

from typing import Any

from cpa_fhir.conformance.package import ConformancePackage
from cpa_fhir.fhir.models import FHIR_VERSION
from cpa_fhir.store import SearchParameters

# The profiled types and the types they refer to.
SUPPORTED_TYPES = (
    "AuditEvent", "CarePlan", "CareTeam", "Condition", "Consent", "Encounter", "EpisodeOfCare",
    "Flag", "Goal", "Organization", "Patient", "Practitioner", "PractitionerRole", "Provenance",
    "RelatedPerson", "Task",
)  # fmt: skip
CHAINING = (
    "Chainable: name[:Type].parameter, up to 4 links. For a partner's client a match "
    "stays only if the chain holds through what it may see."
)
REVERSE_CHAINING = (
    "_has:Type:reference:parameter=value, nestable, up to 4 links; for a partner's "
    "client it must hold through what it may see."
)
INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)


def capability_statement(
    base_url: str, package: ConformancePackage, parameters: SearchParameters, version: str
) -> dict[str, Any]:
    profiles: dict[str, list[str]] = {}
    for url in package.profiles():
        sd = package.resolve(url) or {}
        if sd.get("kind") == "resource":
            profiles.setdefault(str(sd.get("type")), []).append(url)
    revincludes: dict[str, list[str]] = {}
    for source in SUPPORTED_TYPES:
        for code, p in sorted(parameters.for_type(source).items()):
            if p.type == "reference":
                for target in p.targets or SUPPORTED_TYPES:
                    revincludes.setdefault(target, []).append(f"{source}:{code}")
    resources = []
    for rtype in SUPPORTED_TYPES:
        params = parameters.for_type(rtype)
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": c} for c in INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            # If-None-Match and If-Modified-Since (a partner's are answered in full).
            "conditionalRead": "full-support",
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "searchInclude": sorted(
                f"{rtype}:{c}" for c, p in params.items() if p.type == "reference"
            ),
            "searchRevInclude": revincludes.get(rtype, []),
            "searchParam": [
                {"name": code, "type": p.type}
                | ({"documentation": CHAINING} if p.type == "reference" else {})
                for code, p in sorted(params.items())
            ]
            + [{"name": "_has", "type": "special", "documentation": REVERSE_CHAINING}],
            "operation": [
                {
                    "name": "validate",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                }
            ],
        }
        if rtype in profiles:
            entry["supportedProfile"] = sorted(profiles[rtype])
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "kind": "instance",
        "software": {"name": "cpa-fhir sandbox", "version": version},
        "implementation": {"description": "CPA sandbox FHIR server", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "extension": [
                        {
                            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                            "extension": [{"url": "token", "valueUri": f"{base_url}/token"}],
                        }
                    ],
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": "OAuth 2.0 client credentials (client secret or private_key_jwt); SMART system scopes. Partner clients see only what the consent engine allows; with write scopes, they update or delete only what they see whole, never update as create, and never write a Consent or what a Consent may name as an actor; conditional writes and PATCH are for the trust's own clients.",
                },
                "resource": resources,
                "interaction": [
                    {
                        "code": "transaction",
                        "documentation": "All or nothing; entries may be creates (with ifNoneExist), updates, conditional updates, deletes, conditional deletes, JSON Patches (as a Binary) and reads; urn:uuid references between entries are resolved, and two entries may not change one resource.",
                    },
                    {"code": "batch"},
                ],
                "operation": [
                    {
                        "name": "validate",
                        "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                    }
                ],
            }
        ],
    }
