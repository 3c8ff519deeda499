"""One disclosure from a patient's record: label, decide, filter, audit — or nothing.

Everything the engine needs is passed in: the record, the policy, the time and
a source of ids. Any error, expected or not, becomes a SharingError and no
bundle: the engine fails closed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cpa_fhir.consent._audit import audit_event, provenance
from cpa_fhir.consent._decision import (
    Decision,
    Recipient,
    cares_for,
    decide,
    partner_types,
    resolve_recipient,
)
from cpa_fhir.consent._filtering import FilterResult, RequiredElements, WithheldItem, filter_record
from cpa_fhir.consent._labelling import LabelledResource, label_resources
from cpa_fhir.consent._policy import (
    CARER,
    CONFIDENTIALITY_SYSTEM,
    LEGAL_BASIS_SYSTEM,
    SharingPolicy,
)
from cpa_fhir.consent._references import foreign_subjects, resolve
from cpa_fhir.errors import ConsentFormatError, LabellingError, RecipientError, SharingError

DISCLOSURE_PROFILE = "https://cpa-fhir.org/fhir/StructureDefinition/cpa-disclosure-bundle"


@dataclass(frozen=True, slots=True)
class ShareRequest:
    """What the sender asks: to whom (`gp`, `gp:ID`, `carer:ID`, ... or a Recipient),
    for which purpose, under which legal exceptions if any, and who asks."""

    to: str | Recipient
    purpose: str
    exceptions: tuple[str, ...] = ()
    requester: str | None = None


@dataclass(frozen=True, slots=True)
class Disclosure:
    """The outcome: the bundle to send (None when nothing may go), its AuditEvent,
    the decision, and what was withheld (for the sender only)."""

    bundle: dict[str, Any] | None
    audit_event: dict[str, Any] | None
    decision: Decision
    withheld: list[WithheldItem] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)

    def withheld_summary(self) -> list[str]:
        """Lines for the sender: each thing withheld and why."""
        lines = [f"withheld {w.reference}{w.element or ''}: {w.reason}" for w in self.withheld]
        if self.bundle is None:
            lines.append("nothing may be shared with this recipient for this purpose")
        return lines


def record_entries(record: Mapping[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """(fullUrl, resource) pairs of a record Bundle, refusing anything malformed."""
    if not isinstance(record, Mapping) or record.get("resourceType") != "Bundle":
        raise SharingError("the record must be a Bundle")
    if record.get("type") != "collection":
        # A transaction, batch or search result is a request or an answer, not a record.
        raise SharingError(f"the record must be a collection Bundle, not {record.get('type')!r}")
    entries = record.get("entry")
    if not isinstance(entries, list):
        raise SharingError("the record Bundle has no entries")
    out: list[tuple[str | None, dict[str, Any]]] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        res = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise SharingError(f"Bundle.entry[{i}] holds no resource")
        if not isinstance(res.get("id"), str):
            raise SharingError(f"Bundle.entry[{i}] ({res['resourceType']}) has no id")
        key = f"{res['resourceType']}/{res['id']}"
        if key in seen:
            raise SharingError(f"the record holds {key} twice")
        seen.add(key)
        url = e.get("fullUrl")
        out.append((url if isinstance(url, str) else None, res))
    return out


def _patient(entries: Sequence[tuple[str | None, dict[str, Any]]]) -> dict[str, Any]:
    patients = [r for _, r in entries if r["resourceType"] == "Patient"]
    if len(patients) != 1:
        raise SharingError(f"a record holds exactly one Patient (found {len(patients)})")
    return patients[0]


def _consents(
    entries: Sequence[tuple[str | None, dict[str, Any]]], patient: dict[str, Any]
) -> list[dict[str, Any]]:
    out = []
    for _, r in entries:
        if r["resourceType"] != "Consent":
            continue
        ref = r.get("patient")
        target = ref.get("reference") if isinstance(ref, dict) else None
        if target != f"Patient/{patient['id']}":
            raise SharingError(f"Consent/{r.get('id')} is not about this record's patient")
        out.append(r)
    return out


def _all_of_one_patient(
    entries: Sequence[tuple[str | None, dict[str, Any]]],
    patient: dict[str, Any],
    urls: Mapping[str, str],
) -> None:
    """Refuse a record holding what is, or may be, about another patient (in an entry
    or in what an entry contains): this one's consent does not decide what of
    another's may go."""
    for _, r in entries:
        others = foreign_subjects(r, urls, patient)
        if others:
            raise SharingError(
                f"{r['resourceType']}/{r['id']} is about {others[0]}, not this record's"
                " patient: a record is one patient's"
            )


def _as_named(person: dict[str, Any] | None, urls: Mapping[str, str]) -> dict[str, Any] | None:
    """A RelatedPerson with its patient as the record's `Patient/ID`, however written."""
    patient = person.get("patient") if person is not None else None
    ref = patient.get("reference") if isinstance(patient, dict) else None
    target = resolve(ref, urls) if isinstance(ref, str) else None
    if person is None or target is None:
        return person
    return {**person, "patient": {"reference": target}}


def _trust(entries: Sequence[tuple[str | None, dict[str, Any]]]) -> dict[str, Any] | None:
    for _, r in entries:
        if r["resourceType"] == "Organization" and "mental-health-trust" in partner_types(r):
            return r
    return None


def share(
    record: Mapping[str, Any],
    request: ShareRequest,
    policy: SharingPolicy,
    *,
    at: datetime,
    new_id: Callable[[], str],
    required: RequiredElements,
) -> Disclosure:
    """Label the record, decide for the recipient and purpose, filter, and audit.

    Raises SharingError (and shares nothing) when anything cannot be evaluated.
    """
    try:
        return _share(record, request, policy, at, new_id, required)
    except SharingError:
        raise
    except Exception as exc:  # fail closed on anything unforeseen
        raise SharingError(f"sharing refused: the record could not be evaluated ({exc})") from exc


def _share(
    record: Mapping[str, Any],
    request: ShareRequest,
    policy: SharingPolicy,
    at: datetime,
    new_id: Callable[[], str],
    required: RequiredElements,
) -> Disclosure:
    if at.tzinfo is None:
        raise ConsentFormatError("the time of disclosure needs a time zone")
    at = at.astimezone(policy.zone)  # the records' dates are days there
    entries = record_entries(record)
    patient = _patient(entries)
    consents = _consents(entries, patient)
    resources = {f"{r['resourceType']}/{r['id']}": r for _, r in entries}
    urls = {url: f"{r['resourceType']}/{r['id']}" for url, r in entries if url}
    _all_of_one_patient(entries, patient, urls)
    if isinstance(request.to, Recipient):
        recipient = request.to
    else:
        recipient = resolve_recipient(request.to, resources.values(), policy)
    if (
        recipient.partner_type == CARER
        and request.exceptions
        and not cares_for(_as_named(resources.get(recipient.reference), urls), patient["id"], at)
    ):
        raise RecipientError(
            f"{recipient.reference} is not an active carer of this record's patient at"
            f" {at.date().isoformat()}: a carer's legal basis does not hold"
        )
    decision = decide(
        consents,
        recipient,
        request.purpose,
        at,
        policy,
        exceptions=request.exceptions,
        resources=resources,
        urls=urls,
    )
    labelled = label_resources(entries, policy)
    result = filter_record(labelled, decision, policy, required)
    return assemble(result, labelled, decision, request, record, entries, policy, new_id)


def assemble(
    result: FilterResult,
    labelled: Sequence[LabelledResource],
    decision: Decision,
    request: ShareRequest,
    record: Mapping[str, Any],
    entries: Sequence[tuple[str | None, dict[str, Any]]],
    policy: SharingPolicy,
    new_id: Callable[[], str],
) -> Disclosure:
    trust = _trust(entries)
    sender = str(trust.get("name")) if trust and trust.get("name") else "cpa-fhir"
    observer: dict[str, Any] = (
        {"reference": f"Organization/{trust['id']}"} if trust else {"display": sender}
    )
    requester = request.requester or (observer.get("reference") or decision.recipient.reference)
    if not result.shared:
        return Disclosure(None, None, decision, result.withheld, [])
    shared_keys = [f"{r['resourceType']}/{r['id']}" for _, r in result.shared]
    for cat in result.shared_categories:
        if cat not in decision.allowed:
            raise LabellingError(f"filtering let '{cat}' content through without a basis")
    bases = sorted(
        {
            b.consent or f"{LEGAL_BASIS_SYSTEM}#{b.legal_basis}"
            for c, b in decision.allowed.items()
            if c in result.shared_categories
        }
    )
    prov = provenance(
        provenance_id=new_id(),
        decision=decision,
        targets=[url or key for (url, _), key in zip(result.shared, shared_keys, strict=True)],
        sender=sender,
        policies=bases,
    )
    # The Provenance is as confidential as the most confidential thing it vouches for.
    level = policy.category_levels(result.shared_categories)
    prov["meta"] = {"security": [{"system": CONFIDENTIALITY_SYSTEM, "code": level}]}
    base = _base_url(result.shared)
    entry = [
        {"fullUrl": url, "resource": res} if url else {"resource": res}
        for url, res in result.shared
    ]
    entry.append(
        {
            "fullUrl": f"{base}Provenance/{prov['id']}" if base else f"urn:uuid:{prov['id']}",
            "resource": prov,
        }
    )
    bundle = {
        "resourceType": "Bundle",
        "id": new_id(),
        "meta": {"profile": [DISCLOSURE_PROFILE]},
        "type": "collection",
        "timestamp": decision.at.isoformat().replace("+00:00", "Z"),
        "entry": entry,
    }
    event = audit_event(
        event_id=new_id(),
        decision=decision,
        shared=shared_keys,
        shared_categories=sorted(result.shared_categories),
        withheld=result.withheld,
        requester=requester,
        observer=observer,
        patient=f"Patient/{_patient(entries)['id']}",
    )
    return Disclosure(bundle, event, decision, result.withheld, shared_keys)


def _base_url(shared: Sequence[tuple[str | None, dict[str, Any]]]) -> str | None:
    for url, res in shared:
        suffix = f"{res['resourceType']}/{res['id']}"
        if url and url.endswith(suffix):
            return url[: -len(suffix)]
    return None
