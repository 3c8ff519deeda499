"""What a partner's client may see of stored resources: the consent engine on every path.

For each patient whose data a request touches, the engine decides once (the
patient's Consents, the client's organisation, purpose and invoked legal
bases); each resource is then labelled and filtered with what it refers to,
exactly as `cpa-fhir share` filters a record. Resources outside any patient's
record (professionals, organisations) go only when shared content refers to
them, or when they are the client's own. Each disclosure is recorded as one
AuditEvent per patient.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from cpa_fhir.consent import (
    Decision,
    Recipient,
    RequiredElements,
    SharingPolicy,
    WithheldItem,
    audit_event,
    decide,
    filter_record,
    label_resources,
)
from cpa_fhir.consent._labelling import reference_key
from cpa_fhir.errors import ResourceGone, ResourceNotFound, SharingError
from cpa_fhir.sandbox._auth import Client
from cpa_fhir.store import SqlRepository, Stored

# Where each resource type names the patient whose record it belongs to.
PATIENT_ELEMENTS = ("subject", "patient", "for", "beneficiary")


def patient_of(resource: dict[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        return str(resource.get("id"))
    for name in PATIENT_ELEMENTS:
        ref = resource.get(name)
        if isinstance(ref, dict):
            key = reference_key(ref.get("reference"))
            if key and key.startswith("Patient/"):
                return key.split("/", 1)[1]
    return None


def _references(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            key = reference_key(ref)
            if key:
                yield key
        for v in node.values():
            if isinstance(v, (dict, list)):
                yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


@dataclass
class _Shared:
    decision: Decision
    shared: list[str] = field(default_factory=list)
    categories: set[str] = field(default_factory=set)
    withheld: list[WithheldItem] = field(default_factory=list)


class PartnerView:
    """One request's view of the store for a partner's client."""

    def __init__(
        self,
        repo: SqlRepository,
        client: Client,
        policy: SharingPolicy,
        required: RequiredElements,
        at: datetime,
        scopes: frozenset[str] = frozenset(),
    ) -> None:
        self.repo = repo
        self.scopes = scopes
        self.client = client
        self.policy = policy
        self.required = required
        self.at = at
        self.recipient = Recipient(
            client.reference or f"Client/{client.id}",
            client.partner_type,
            client.identifiers,
            client.id,
        )
        self._decisions: dict[str, Decision] = {}
        self._cache: dict[str, dict[str, Any] | None] = {}
        self._disclosed: dict[str, _Shared] = {}

    # -- reading what the engine needs -------------------------------------------

    def _get(self, key: str) -> dict[str, Any] | None:
        if key not in self._cache:
            rtype, _, rid = key.partition("/")
            try:
                self._cache[key] = self.repo.read(rtype, rid).resource()
            except (ResourceNotFound, ResourceGone):
                self._cache[key] = None
        return self._cache[key]

    def decision(self, patient_id: str) -> Decision:
        if patient_id not in self._decisions:
            query = self.repo.parse(
                "Consent", [("patient", f"Patient/{patient_id}"), ("_count", "1000")]
            )
            consents = [s.resource() for s in self.repo.search(query).matches]
            actors: dict[str, dict[str, Any]] = {}
            for c in consents:
                for key in _references(c.get("provision")):
                    found = self._get(key)
                    if found is not None:
                        actors[key] = found
            self._decisions[patient_id] = decide(
                consents,
                self.recipient,
                self.client.purpose,
                self.at,
                self.policy,
                exceptions=self.client.exceptions,
                resources=actors,
            )
        return self._decisions[patient_id]

    # -- filtering ------------------------------------------------------------------

    def filter(self, resource: dict[str, Any], *, referred: bool = False) -> dict[str, Any] | None:
        """The resource as this client may see it, or None when it is withheld.

        `referred`: the resource is reached from content already shared (an
        `_include`), so professionals and organisations may go.
        """
        key = f"{resource.get('resourceType')}/{resource.get('id')}"
        if key == self.client.reference:
            return resource  # a partner may always see itself
        patient = patient_of(resource)
        if patient is None:
            if resource.get("resourceType") in self.policy.supporting and referred:
                return self._filter_supporting(resource)
            return None
        decision = self.decision(patient)
        entries: list[tuple[str | None, dict[str, Any]]] = [(None, resource)]
        seen = {key}
        for ref in _references(resource):
            if ref not in seen:
                seen.add(ref)
                target = self._get(ref)
                if target is not None:
                    entries.append((None, target))
        labelled = label_resources(entries, self.policy)
        result = filter_record(labelled, decision, self.policy, self.required)
        mine = next((r for _, r in result.shared if f"{r['resourceType']}/{r['id']}" == key), None)
        record = self._disclosed.setdefault(patient, _Shared(decision))
        if mine is None:
            record.withheld += [w for w in result.withheld if w.reference == key]
            return None
        record.shared.append(key)
        labels = {
            c["code"]
            for c in mine.get("meta", {}).get("security", [])
            if c.get("system", "").endswith("cpa-information-category")
        }
        record.categories |= labels
        record.withheld += [w for w in result.withheld if w.reference == key]
        return mine

    def _filter_supporting(self, resource: dict[str, Any]) -> dict[str, Any] | None:
        labelled = label_resources([(None, resource)], self.policy)
        allowed = set()
        for d in self._decisions.values():
            allowed |= set(d.allowed)
        if labelled[0].categories - allowed:
            return None
        return resource

    def filter_bytes(self, stored: Stored, *, referred: bool = False) -> bytes | None:
        shown = self.filter(stored.resource(), referred=referred)
        return None if shown is None else orjson.dumps(shown)

    # -- audit --------------------------------------------------------------------------

    def audit_events(self, new_id: Any, observer: dict[str, Any]) -> list[dict[str, Any]]:
        """One AuditEvent per patient whose information this request disclosed."""
        events = []
        for shared in self._disclosed.values():
            if not shared.shared:
                continue
            events.append(
                audit_event(
                    event_id=new_id(),
                    decision=shared.decision,
                    shared=shared.shared,
                    shared_categories=sorted(shared.categories & set(shared.decision.allowed)),
                    withheld=shared.withheld,
                    requester=self.recipient.reference,
                    observer=observer,
                )
            )
        return events


def refuse_reason(exc: SharingError) -> str:
    return f"sharing refused for this client: {exc.message}"
