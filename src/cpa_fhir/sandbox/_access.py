"""What a partner's client may see of stored resources: the consent engine on every path.

For each patient whose data a request touches, the engine decides once (the
patient's Consents, the client's organisation, purpose and invoked legal
bases); each resource is then labelled and filtered with what it refers to,
exactly as `cpa-fhir share` filters a record. Resources outside any patient's
record (professionals, organisations) go only when shared content refers to
them, or when they are the client's own. Each disclosure is recorded as one
AuditEvent per patient.

What the engine derives from stored content (parsed resources, Consents, the
filtered form of each version for a set of allowed categories) is kept in a
`Derived` for as long as the store's generation is unchanged: any create,
update or delete moves it on and starts afresh, so a withdrawn consent or a
relabelled resource takes effect with the next request. A decision is kept for
the span of time in which it cannot change (`steady_span`).
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

import orjson

from cpa_fhir.consent import (
    CARER,
    Decision,
    LabelledResource,
    Recipient,
    RequiredElements,
    SharingPolicy,
    WithheldItem,
    audit_event,
    audit_instant,
    cares_for,
    decide,
    filter_record,
    is_active,
    label_resources,
    period_holds,
    steady_span,
    withheld_counts,
)
from cpa_fhir.consent._labelling import reference_key
from cpa_fhir.consent._output import outgoing_resource
from cpa_fhir.consent._references import PATIENT_ELEMENTS, foreign_subjects
from cpa_fhir.errors import ConsentFormatError, LabellingError, SearchError, SharingError
from cpa_fhir.fhir import jsonio
from cpa_fhir.sandbox._auth import Client
from cpa_fhir.store import SqlRepository, Stored

T = TypeVar("T")
log = logging.getLogger(__name__)

# How many steps of references from professionals and organisations are followed to
# label what refers to them (`PartnerView._filter_together`).
_INHERIT_STEPS = 3
# The server's own records (`AuditLog`) are appended without moving the generation:
# a read of one is never taken from what was derived.
APPENDED_TYPES = frozenset({"AuditEvent"})
# What a partner's request may be shown at most: every stored match, version or chain
# source is filtered before paging and counting (a page at a time, `SCAN_PAGE`), so
# that neither a total nor which visible matches a page holds depends on what is
# withheld; past this many visible the request is refused (400 too-costly), never
# answered from a part. Only what the partner may see counts towards it: the refusal
# tells nothing of what is withheld.
MAX_PARTNER_VISIBLE = 10_000
SCAN_PAGE = 1000
PARTNER_SCAN_SECONDS = 20.0


def partner_scan(
    fetch: Callable[[Stored | None, int, int], list[Stored]],
    visible: Callable[[list[Stored]], list[T]],
    what: str,
    *,
    versions: bool = False,
) -> list[T]:
    """Everything `fetch(last, taken, limit)` finds (the page after `last`, the last
    stored version read, or after the first `taken`), read a page at a time and each
    page narrowed by `visible` to what the partner may be shown: SearchError
    (too-costly) once that is more than `MAX_PARTNER_VISIBLE`, or once reading takes
    longer than `PARTNER_SCAN_SECONDS` (what is stored bounds the work, and a broad
    search of a large store must not hold a worker for minutes). Each resource is
    taken once (each version, with `versions`: a history)."""
    out: list[T] = []
    seen: set[tuple[Any, ...]] = set()
    last: Stored | None = None
    taken = 0
    deadline = time.monotonic() + PARTNER_SCAN_SECONDS
    while True:
        page = fetch(last, taken, SCAN_PAGE)
        # One written meanwhile may move another to the next page: not taken twice.
        keys = [
            (s.resource_type, s.id, s.version_id) if versions else (s.resource_type, s.id)
            for s in page
        ]
        fresh = [s for s, key in zip(page, keys, strict=True) if key not in seen]
        seen.update(keys)
        out += visible(fresh) if fresh else []
        if len(out) > MAX_PARTNER_VISIBLE:
            raise SearchError(
                f"more than {MAX_PARTNER_VISIBLE:,} {what} you may see:"
                " narrow the request (by patient, say)",
                code="too-costly",
            )
        if len(page) < SCAN_PAGE:
            return out
        if time.monotonic() > deadline:
            raise SearchError(
                f"the {what} took longer to read than this server allows:"
                " narrow the request (by patient, say)",
                code="too-costly",
            )
        last, taken = page[-1], taken + len(page)


def patient_of(resource: dict[str, Any]) -> str | None:
    """The id of the patient whose record a resource is in: named by a relative
    reference, as a patient of this server. An absolute URL may name another server's
    patient of the same id (even one of a version), so it names none here."""
    if resource.get("resourceType") == "Patient":
        return str(resource.get("id"))
    for name in PATIENT_ELEMENTS:
        ref = resource.get(name)
        if isinstance(ref, dict):
            url = ref.get("reference")
            key = reference_key(url) if isinstance(url, str) and "://" not in url else None
            if key and key.startswith("Patient/"):
                return key.split("/", 1)[1]
    return None


def _by_identifier(node: Any) -> Iterable[tuple[str | None, str, str]]:
    """(type, system, value) of each Reference within a resource that names what it
    refers to by an identifier alone (no `reference`)."""
    for v in node.values():
        for item in v if isinstance(v, list) else (v,):
            if not isinstance(item, dict):
                continue
            ident = item.get("identifier")
            if "reference" not in item and isinstance(ident, dict):
                system, value, kind = ident.get("system"), ident.get("value"), item.get("type")
                if isinstance(system, str) and isinstance(value, str):
                    yield (kind if isinstance(kind, str) else None), system, value
            yield from _by_identifier(item)


def _split_key(key: str) -> tuple[str, str]:
    resource_type, _, resource_id = key.partition("/")
    return resource_type, resource_id


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


@dataclass(frozen=True, slots=True)
class _ConsentInputs:
    consents: list[dict[str, Any]]
    restricting: list[dict[str, Any]]
    actors: dict[str, dict[str, Any]]


@dataclass
class _Shared:
    decision: Decision
    shared: list[str] = field(default_factory=list)
    categories: set[str] = field(default_factory=set)
    withheld: list[WithheldItem] = field(default_factory=list)
    # What was accounted, in order: the rest follows from it and the decision.
    accounted: list[_Shown] = field(default_factory=list)
    # What the answer counted but did not send (`PartnerView.count`): per type, and
    # each as it was accounted.
    counted: dict[str, int] = field(default_factory=dict)
    counted_shown: list[_Shown] = field(default_factory=list)
    # What a search's chained criteria were found to hold through, not sent
    # (`PartnerView.consult`): what of it the criteria compared is disclosed.
    consulted: list[str] = field(default_factory=list)
    consulted_shown: list[_Shown] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Shown:
    """One stored version as a client with given allowed categories may see it."""

    content: bytes | None  # None: withheld
    categories: frozenset[str]
    withheld: tuple[WithheldItem, ...]


class Derived:
    """What the engine derived from the store at one generation (`SqlRepository.generation`):
    parsed resources, whose record each belongs to, each patient's Consents and the
    filtered form of what was read. It is replaced whole when the generation moves on,
    so nothing in it outlives a change to what it was derived from."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.resources: dict[str, dict[str, Any] | None] = {}
        self.patients: dict[tuple[str, int], str | None] = {}
        self.consents: dict[str, _ConsentInputs] = {}
        self.care_teams: dict[str, list[dict[str, Any]]] = {}  # patient -> their CareTeams
        self.shown: dict[tuple[str, int, frozenset[str]], _Shown] = {}
        # (Type/id, version) -> a professional's or organisation's form as it goes
        self.supporting: dict[tuple[str, int, frozenset[str]], _Shown] = {}
        # (Type/id, version, the patients whose care teams it was labelled with)
        self.categories: dict[tuple[str, int, frozenset[str]], frozenset[str]] = {}
        # (patient, client) -> a decision and the span of time it holds for
        self.decisions: dict[tuple[str, str], tuple[Decision, datetime, datetime]] = {}
        self.audit_templates: dict[tuple[Any, ...], dict[str, Any]] = {}
        # The same templates found from what a request accounted (`_Shared.accounted`)
        # and its decision, by identity: no key to build from their content.
        self.audit_by_account: dict[
            tuple[Any, ...], tuple[Decision, tuple[_Shown | None, ...], dict[str, Any]]
        ] = {}
        # (type, id) -> the current version, as read
        self.current: dict[tuple[str, str], Stored] = {}
        # Practitioner/id -> the PractitionerRoles held (Type/id), whose categories it takes
        self.roles_held: dict[str, list[str]] = {}
        # Type/id -> a professional or organisation labelled as a whole with all it
        # refers to, for every record it appears in; None where that cannot be.
        self.labelled_wholes: dict[str, LabelledResource | None] = {}
        # Type/id -> what its current version refers to (Type/id), in order; for a
        # CareTeam, what its participants do, under "Type/id participant"
        self.references: dict[str, tuple[str, ...]] = {}
        # (type, system, value) of a reference by identifier -> what it names (Type/id)
        self.identified: dict[tuple[str | None, str, str], list[str]] = {}
        # Whether what a client sees of a version matches a search's criteria:
        # (type, id, version, criteria, what the client sees) -> answer
        self.matches_as_shown: dict[tuple[str, str, int, tuple[Any, ...], bytes], bool] = {}

    def size(self) -> int:
        return (
            len(self.resources) + len(self.patients) + len(self.consents) + len(self.shown)
            + len(self.supporting)
            + len(self.care_teams)
            + len(self.categories) + len(self.decisions) + len(self.audit_templates)
            + len(self.audit_by_account) + len(self.current) + len(self.matches_as_shown)
            + len(self.roles_held) + len(self.labelled_wholes) + len(self.identified)
            + len(self.references)
        )  # fmt: skip


class DerivedCache:
    """The current `Derived`, shared by the server's requests."""

    # The size is looked at every so many requests: a request adds a few entries.
    SIZE_CHECK_EVERY = 64

    def __init__(self, *, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._current = Derived(-1)
        self._lock = threading.Lock()
        self._calls = 0

    def at(self, generation: int) -> Derived:
        with self._lock:
            current = self._current
            if generation < current.generation:
                # A request that looked before a newer one: it must not see, nor
                # replace, what was derived later. It works on its own.
                return Derived(generation)
            self._calls += 1
            if generation > current.generation or (
                self._calls % self.SIZE_CHECK_EVERY == 0 and current.size() > self.max_entries
            ):
                current = self._current = Derived(generation)
            return current


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
        derived: Derived | None = None,
    ) -> None:
        self.repo = repo
        self.scopes = scopes
        self.client = client
        self.policy = policy
        self.required = required
        self.at = at.astimezone(policy.zone)  # the records' dates are days there
        self.derived = derived if derived is not None else Derived(repo.generation())
        self.recipient = Recipient(
            client.reference or f"Client/{client.id}",
            client.partner_type,
            client.identifiers,
            client.id,
        )
        self._decisions: dict[str, Decision] = {}
        # patient -> the kept decision this request's was made from (see audit_events)
        self._decided_from: dict[str, Decision] = {}
        self._disclosed: dict[str, _Shared] = {}
        # How what is filtered now is disclosed: sent (None), "counted" or "consulted".
        self._mode: str | None = None

    def moved_on(self, derived: Derived) -> None:
        """Read from now on what `derived` was made from (the store after this request's
        own writes, say): decisions are made afresh, and what was disclosed before
        stays to be audited."""
        self.derived = derived
        self._decisions = {}
        self._decided_from = {}

    # -- reading what the engine needs -------------------------------------------

    def _fetch(self, keys: Iterable[str]) -> None:
        """Parse into the cache, with one query, the current versions of `keys` not there yet."""
        cache = self.derived.resources
        missing = [k for k in dict.fromkeys(keys) if k not in cache]
        if not missing:
            return
        split = {key: _split_key(key) for key in missing}
        found = self.repo.read_many(split.values())
        for key in missing:
            stored = found.get(split[key])
            cache[key] = stored.resource() if stored is not None else None

    def read(self, resource_type: str, id: str) -> Stored:
        """`SqlRepository.read`, kept while the generation holds (it cannot change)."""
        if resource_type in APPENDED_TYPES:
            return self.repo.read(resource_type, id)
        key = (resource_type, id)
        stored = self.derived.current.get(key)
        if stored is None:
            stored = self.derived.current[key] = self.repo.read(resource_type, id)
        return stored

    def _get(self, key: str) -> dict[str, Any] | None:
        self._fetch([key])
        return self.derived.resources[key]

    def _consent_inputs(self, patient_id: str) -> _ConsentInputs:
        """The patient's Consents; those the index files under the patient that do not
        name it as this server's Patient/ID (an absolute URL, which may be this
        server's own base written out, or another server's), whose refusals hold and
        whose permits do not; and the actors they name."""
        known = self.derived.consents.get(patient_id)
        if known is not None:
            return known
        # The patient's care teams come in the same query: a decision for a partner
        # reads them next (its legal bases, or the places its record's members hold).
        found = self.repo.referring(("CareTeam", "Consent"), "patient", ("Patient", patient_id))
        consents: list[dict[str, Any]] = []
        restricting: list[dict[str, Any]] = []
        teams: list[dict[str, Any]] = []
        for stored in found:
            resource = stored.resource()
            if stored.resource_type == "CareTeam":
                if patient_of(resource) == patient_id:
                    teams.append(resource)
                continue
            (consents if patient_of(resource) == patient_id else restricting).append(resource)
        self.derived.care_teams.setdefault(patient_id, teams)
        wanted = [key for c in (*consents, *restricting) for key in _references(c.get("provision"))]
        self._fetch(wanted)
        actors = {k: r for k in wanted if (r := self.derived.resources[k]) is not None}
        # Those a Group, CareTeam or PractitionerRole actor stands for: a refusal of it
        # is a refusal of them.
        members = [
            key
            for actor in actors.values()
            if actor.get("resourceType") in ("Group", "CareTeam", "PractitionerRole")
            for key in _references(actor)
        ]
        # A Practitioner's roles, and the organisations they are with: a refusal of the
        # person is a refusal of where they work.
        for key, actor in list(actors.items()):
            if actor.get("resourceType") == "Practitioner":
                for stored in self.repo.referring(
                    "PractitionerRole", "practitioner", ("Practitioner", key.split("/", 1)[1])
                ):
                    role = stored.resource()
                    actors[f"PractitionerRole/{stored.id}"] = role
                    members.extend(_references(role.get("organization")))
        self._fetch(members)
        actors.update({k: r for k in members if (r := self.derived.resources[k]) is not None})
        known = self.derived.consents[patient_id] = _ConsentInputs(consents, restricting, actors)
        return known

    def _legal_bases(self, patient_id: str) -> tuple[Sequence[str], list[dict[str, Any]]]:
        """The client's legal bases that hold for this patient now, and the resources
        whose periods say how long that answer lasts. A legal basis is invoked for a
        person, not for everyone in the store: each disclosure is limited to what its
        basis needs (handbook §37.7). A carer's need to know (§36.1) is about the
        person they care for: it holds only for the patient the client's
        RelatedPerson cares for, while active and within its period. An agency's
        (public or child protection) holds only for a patient whose active care team
        records the agency's involvement now: a member acting on its behalf, the
        agency as a member, or a member in a role with it (PractitionerRole), named
        by reference or by identifier. For anyone else, what the patient's consent
        allows is all that goes."""
        if not self.client.exceptions:
            return self.client.exceptions, []
        if self.recipient.partner_type == CARER:
            carer = self._get(self.recipient.reference)
            if carer is None:
                return (), []
            cares = cares_for(carer, patient_id, self.at)
            return (self.client.exceptions if cares else ()), [carer]
        teams = self.derived.care_teams.get(patient_id)
        if teams is None:
            teams = self.derived.care_teams[patient_id] = self._of_patient("CareTeam", patient_id)
        roles: list[dict[str, Any]] = []  # the PractitionerRoles looked at, for their periods
        involved = any(
            team.get("status") in (None, "active")
            and period_holds(team.get("period"), self.at)
            and any(
                period_holds(p.get("period"), self.at) and self._is_us(p, roles)
                for p in team.get("participant") or []
                if isinstance(p, dict)
            )
            for team in teams
        )
        return (self.client.exceptions if involved else ()), [*teams, *roles]

    def _of_patient(self, resource_type: str, patient_id: str) -> list[dict[str, Any]]:
        """The current resources of a type whose patient is this one: found by the
        index, and kept only if they name this server's patient (the index files a
        reference to another server's Patient/ID under Patient/ID too)."""
        found = self.repo.referring(resource_type, "patient", ("Patient", patient_id))
        return [r for s in found if patient_of(r := s.resource()) == patient_id]

    def _is_us(self, participant: dict[str, Any], roles: list[dict[str, Any]]) -> bool:
        """Whether a care-team participant is the client's organisation, acts on its
        behalf, or holds a PractitionerRole with it that is active and in its period
        (those looked at are added to `roles`)."""
        for element in ("member", "onBehalfOf"):
            ref = participant.get(element)
            if not isinstance(ref, dict):
                continue
            if self._names_us(ref):
                return True
            key = reference_key(ref.get("reference"))
            if key is not None and key.startswith("PractitionerRole/"):
                role = self._get(key)
                if role is None:
                    continue
                roles.append(role)
                organization = role.get("organization")
                if (
                    is_active(role)
                    and period_holds(role.get("period"), self.at)
                    and isinstance(organization, dict)
                    and self._names_us(organization)
                ):
                    return True
        return False

    def _names_us(self, ref: dict[str, Any]) -> bool:
        """Whether a Reference names the client's organisation, by reference or by one
        of its identifiers."""
        if reference_key(ref.get("reference")) == self.recipient.reference:
            return True
        identifier = ref.get("identifier")
        return isinstance(identifier, dict) and (
            (identifier.get("system"), identifier.get("value")) in self.recipient.identifiers
        )

    def decision(self, patient_id: str) -> Decision:
        if patient_id in self._decisions:
            return self._decisions[patient_id]
        # The client fixes recipient, purpose and legal bases; the time matters only
        # within the span the decision was found to hold for.
        key = (patient_id, self.client.id)
        known = self.derived.decisions.get(key)
        if known is not None and known[1] <= self.at < known[2]:
            decision = replace(known[0], at=self.at)
            self._decided_from[patient_id] = known[0]
        else:
            inputs = self._consent_inputs(patient_id)
            bases, involvement = self._legal_bases(patient_id)
            try:
                decision = decide(
                    inputs.consents,
                    self.recipient,
                    self.client.purpose,
                    self.at,
                    self.policy,
                    exceptions=bases,
                    resources=inputs.actors,
                    restricting=inputs.restricting,
                )
            except ConsentFormatError as exc:
                # Fail closed for this patient alone, and say nothing of why to the
                # client: a refusal naming the Consent would tell that the record is
                # there (and its resources would answer as no one else's do).
                log.warning("sharing nothing of Patient/%s: %s", patient_id, exc.message)
                decision = _nothing_allowed(
                    self.recipient, self.client.purpose, self.at, self.policy
                )
            # Kept while neither a consent's period nor one of the involvement's
            # (a care-team role ending, a carer's) starts or ends.
            start, end = steady_span([*inputs.consents, *inputs.restricting, *involvement], self.at)
            if start < end:
                self.derived.decisions[key] = (decision, start, end)
            self._decided_from[patient_id] = decision
        self._decisions[patient_id] = decision
        return decision

    # -- filtering ------------------------------------------------------------------

    def filter_bytes(
        self, stored: Stored, *, referred: bool = False, account: bool = True
    ) -> bytes | None:
        """The stored version as this client may see it, or None when it is withheld.

        `referred`: the version is reached from content already shared (an
        `_include`), so professionals and organisations may go. `account`: it is
        sent, so the audit records it; False only to learn what could be sent.
        """
        return self.filter_many([stored], referred=referred, account=account)[0]

    def patients_of(self, stored: Stored) -> frozenset[str]:
        """The patient whose record a stored version is in, as a set: empty for a
        professional or organisation, in no one's record."""
        version = (f"{stored.resource_type}/{stored.id}", stored.version_id)
        if version not in self.derived.patients:
            self.derived.patients[version] = patient_of(stored.resource())
        patient = self.derived.patients[version]
        return frozenset({patient}) if patient is not None else frozenset()

    def filter_many(
        self,
        versions: Sequence[Stored],
        *,
        referred: bool = False,
        account: bool = True,
        reached_from: Mapping[tuple[str, str], frozenset[str]] | None = None,
    ) -> list[bytes | None]:
        """`filter_bytes` of each version. Those of one patient not filtered before are
        labelled and filtered together, as one record with what they refer to: the
        Patient, professionals and episode they share are labelled once, not once each.
        `reached_from`: for a professional or organisation reached by an include, the
        patients whose records it was reached from (by default, every patient this
        request has shared from)."""
        out: list[bytes | None] = [None] * len(versions)
        pending: dict[str, dict[str, tuple[int, Stored, dict[str, Any] | None]]] = {}
        derived = self.derived
        for i, stored in enumerate(versions):
            key = f"{stored.resource_type}/{stored.id}"
            version = (key, stored.version_id)
            resource: dict[str, Any] | None = None
            if version in derived.patients:
                patient = derived.patients[version]
            else:
                resource = stored.resource()
                patient = derived.patients[version] = patient_of(resource)
            if patient is None:
                if key == self.client.reference:
                    out[i] = stored.content  # an agency's own details: no one's record
                elif stored.resource_type in self.policy.supporting and referred:
                    patients = (
                        reached_from.get((stored.resource_type, stored.id), frozenset())
                        if reached_from is not None
                        else None
                    )
                    out[i] = self._filter_supporting(stored, key, account, patients)
                continue
            # A carer's own RelatedPerson is part of the record of the person it cares
            # for, and what the record says of the carer is carer information: it goes
            # as the decision allows, as anything of the record does, and is audited.
            decision = self.decision(patient)
            shown = derived.shown.get((key, stored.version_id, frozenset(decision.allowed)))
            if shown is not None:
                out[i] = self._account(patient, decision, key, stored.version_id, shown, account)
                continue
            group = pending.setdefault(patient, {})
            if key in group:  # two versions of one resource (history): not in one record
                resource = resource if resource is not None else stored.resource()
                shown = self._filter_together({key: resource}, decision)[key]
                out[i] = self._account(patient, decision, key, stored.version_id, shown, account)
                continue
            group[key] = (i, stored, resource)
        for patient, group in pending.items():
            decision = self.decision(patient)
            allowed = frozenset(decision.allowed)
            resources = {
                key: resource if resource is not None else stored.resource()
                for key, (_, stored, resource) in group.items()
            }
            for key, shown in self._filter_together(resources, decision).items():
                i, stored, _ = group[key]
                derived.shown[(key, stored.version_id, allowed)] = shown
                out[i] = self._account(patient, decision, key, stored.version_id, shown, account)
        return out

    def count(self, versions: Sequence[Stored]) -> None:
        """Note for the audit versions an answer tells of without sending them: the
        visible matches a total counts or a next page holds. That they exist, and
        match, is disclosed."""
        self._disclose_as("counted", versions)

    def consult(
        self,
        versions: Sequence[Stored],
        reached_from: Mapping[tuple[str, str], frozenset[str]] | None = None,
    ) -> None:
        """Note for the audit versions a search's chained criteria (`_has`, a chain)
        were found to hold through for what it answers: the criteria tell of them. A
        professional or organisation among them is noted under the records of the
        matches held through it (`reached_from`), as the chain judged it."""
        self._disclose_as("consulted", versions, reached_from)

    def _disclose_as(
        self,
        mode: str,
        versions: Sequence[Stored],
        reached_from: Mapping[tuple[str, str], frozenset[str]] | None = None,
    ) -> None:
        self._mode = mode
        try:
            self.filter_many(versions, referred=reached_from is not None, reached_from=reached_from)
        finally:
            self._mode = None

    def _account(
        self,
        patient: str,
        decision: Decision,
        key: str,
        version_id: int,
        shown: _Shown,
        account: bool,
    ) -> bytes | None:
        """Note for the audit what this request disclosed, or withheld, of `key` at that
        version (recorded as `Type/id/_history/n`: the id alone would name its later
        versions too, which were not disclosed)."""
        if not account:
            return shown.content
        key = f"{key}/_history/{version_id}"
        record = self._disclosed.get(patient)
        if record is None:
            record = self._disclosed[patient] = _Shared(decision)
        if self._mode is not None:
            if shown.content is not None:
                if self._mode == "counted":
                    rtype = key.split("/", 1)[0]
                    record.counted[rtype] = record.counted.get(rtype, 0) + 1
                    record.counted_shown.append(shown)
                elif key not in record.consulted:
                    record.consulted.append(key)
                    record.consulted_shown.append(shown)
                record.categories |= shown.categories
            return shown.content
        record.accounted.append(shown)
        record.withheld += shown.withheld
        if shown.content is None:
            return None
        record.shared.append(key)
        record.categories |= shown.categories
        return shown.content

    def _filter_together(
        self, resources: dict[str, dict[str, Any]], decision: Decision
    ) -> dict[str, _Shown]:
        """Label and filter resources with what they refer to, as `share` would."""
        # What belongs to another patient's record is not judged by this one's consent:
        # it is left out, and a reference to it goes as one to nothing would, or a
        # reference written into this record would probe that one.
        owners = {patient_of(r) for r in resources.values()}
        refs = self._referred(resources, {p for p in owners if p is not None})
        entries: list[tuple[str | None, dict[str, Any]]] = [(None, r) for r in resources.values()]
        entries += [
            (None, t)
            for r in dict.fromkeys(refs)
            if (t := self.derived.resources[r]) is not None
            and (patient_of(t) is None or patient_of(t) in owners)
        ]
        # What they refer to in the record is labelled element by element too: one that
        # loses an element it needs goes whole, as `share` drops it, and a reference
        # to it must not stay (it would name what the client cannot read).
        in_record = {
            r
            for r in refs
            if (t := self.derived.resources[r]) is not None and patient_of(t) in owners
        }
        allowed = frozenset(decision.allowed)
        try:
            labelled = label_resources(
                entries,
                self.policy,
                elements_of=resources.keys() | in_record,
                known=self._labelled_wholes(refs),
                # What they refer to that the client gets none of, by what it carries
                # as a whole, goes whole or not at all: its elements change nothing.
                elements_wanted=lambda key, cats: key in resources or cats <= allowed,
            )
            result = filter_record(labelled, decision, self.policy, self.required)
        except LabellingError as exc:
            # Withheld, as any resource is, without a word of why to the client.
            log.warning("withholding %s: %s", ", ".join(resources), exc.message)
            why = (WithheldItem(key, None, frozenset(), "cannot be labelled") for key in resources)
            return {w.reference: _Shown(None, frozenset(), (w,)) for w in why}
        shared = {f"{r['resourceType']}/{r['id']}": r for _, r in result.shared}
        out: dict[str, _Shown] = {}
        for key in resources:
            owner = self._get(f"Patient/{patient_of(resources[key])}") or {}
            if foreign_subjects(resources[key], {}, owner):
                # It contains what is about another patient: not this record's to judge.
                reason = "it contains what is about another patient"
                out[key] = _Shown(
                    None, frozenset(), (WithheldItem(key, None, frozenset(), reason),)
                )
                continue
            withheld = tuple(w for w in result.withheld if w.reference == key)
            mine = shared.get(key)
            if mine is None:
                out[key] = _Shown(None, frozenset(), withheld)
                continue
            labels = frozenset(
                c["code"]
                for c in mine.get("meta", {}).get("security", [])
                if c.get("system", "").endswith("cpa-information-category")
            )
            out[key] = _Shown(jsonio.dumps(mine), labels, withheld)
        return out

    def _referred(
        self, resources: Mapping[str, dict[str, Any]], patients: Collection[str] = ()
    ) -> list[str]:
        """Type/id of what `resources` refer to, fetched into the cache, and what the
        professionals and organisations among those refer to in turn: categories pass
        on through several steps (an activity, its performer's role, the role's
        organisation), as in a whole record; with the care teams of `patients` (the
        records being labelled) that name any of them as a member."""
        refs = [
            r
            for resource in resources.values()
            for r in dict.fromkeys(_references(resource))
            if r not in resources
        ]
        refs += [r for r in self._identified(resources.values()) if r not in resources]
        self._fetch(refs)
        known, frontier = {*refs, *resources}, [*refs, *resources]
        teams: set[str] = set()
        for _ in range(_INHERIT_STEPS):
            further = [
                r
                for k in frontier
                if k not in resources
                and (t := self.derived.resources[k]) is not None
                and t.get("resourceType") in self.policy.supporting
                for r in self._references_of(k)
                if r not in known
            ]
            # A team lends each member what their place in it carries, which takes what
            # the agency they act for carries: what its members refer to is needed.
            further += [
                r
                for k in frontier
                if k in teams
                for r in self._references_of(k, "participant")
                if r not in known and r not in further
            ]
            # A professional takes the categories of the roles they hold (policy `lend`).
            further += [
                r
                for k in frontier
                if k.startswith("Practitioner/")
                for r in self._roles_held(k)
                if r not in known and r not in further
            ]
            # And a member of a care team, what their place in it says (policy `lend`).
            named = [
                r
                for k in frontier
                if self._team_lends_to(k.split("/", 1)[0])
                for r in self._teams_in(k, patients)
                if r not in known and r not in further
            ]
            teams.update(named)
            further += dict.fromkeys(named)
            if not further:
                break
            self._fetch(further)
            known.update(further)
            refs += further
            frontier = further
        return refs

    def _labelled_wholes(self, keys: Iterable[str]) -> dict[str, LabelledResource]:
        """The professionals and organisations among `keys` labelled as wholes, once for
        every record they appear in: each with all it refers to and the roles lending
        to it, where all of those are professionals and organisations too (what they
        carry then depends on nothing of a record; a care team naming one is of a
        record, so one a team lends to is labelled with each record)."""
        cache = self.derived.labelled_wholes
        out: dict[str, LabelledResource] = {}
        for key in keys:
            if key not in cache:
                cache[key] = None
                resource = self.derived.resources.get(key)
                if resource is not None and resource.get("resourceType") in self.policy.supporting:
                    around = self._referred({key: resource})
                    others = [self.derived.resources[r] for r in around]
                    if all(
                        t is not None and t.get("resourceType") in self.policy.supporting
                        for t in others
                    ):
                        try:
                            cache[key] = label_resources(
                                [(None, resource), *((None, t) for t in others if t)],
                                self.policy,
                                elements_of=(),
                            )[0]
                        except LabellingError:
                            pass  # labelled with the record, it fails there and says why
            found = cache[key]
            if found is not None:
                out[key] = found
        return out

    def _identified(self, resources: Iterable[dict[str, Any]]) -> list[str]:
        """Type/id of the professionals and organisations (or resources of the type a
        Reference names) that references by identifier alone in `resources` name: the
        labeller reads such a reference as naming what it finds with that identifier,
        so it must be given them."""
        found: list[str] = []
        for resource in resources:
            for kind, system, value in _by_identifier(resource):
                key = (kind, system, value)
                named = self.derived.identified.get(key)
                if named is None:
                    types = [kind] if kind is not None else sorted(self.policy.supporting)
                    named = self.derived.identified[key] = [
                        f"{s.resource_type}/{s.id}"
                        for s in self.repo.identified(types, system, value)
                    ]
                found += named
        return list(dict.fromkeys(found))

    def _roles_held(self, practitioner: str) -> list[str]:
        """The PractitionerRoles (Type/id) whose practitioner is this one, fetched."""
        found = self.derived.roles_held.get(practitioner)
        if found is None:
            stored = self.repo.referring(
                "PractitionerRole", "practitioner", ("Practitioner", practitioner.split("/", 1)[1])
            )
            found = self.derived.roles_held[practitioner] = [
                f"PractitionerRole/{s.id}" for s in stored
            ]
            self._fetch(found)
        return found

    def _team_lends_to(self, resource_type: str) -> bool:
        """Whether a care team lends a member of this type what their place in it
        carries (its rules for elements with `lend`, and `lend_to`)."""
        return any(
            rule.lend and rule.elements and (not rule.lend_to or resource_type in rule.lend_to)
            for rule in self.policy.rules_by_type.get("CareTeam", ())
        )

    def _teams_in(self, member: str, patients: Collection[str]) -> list[str]:
        """The CareTeams (Type/id) of these patients' records naming this one as a
        member, fetched: a professional on thousands of teams is looked up in the few
        of the records at hand, not in them all."""
        found: list[str] = []
        for patient in sorted(patients):
            teams = self.derived.care_teams.get(patient)
            if teams is None:
                teams = self.derived.care_teams[patient] = self._of_patient("CareTeam", patient)
            for team in teams:
                key = f"CareTeam/{team.get('id')}"
                self.derived.resources.setdefault(key, team)
                if member in self._references_of(key, "participant"):
                    found.append(key)
        return found

    def _references_of(self, key: str, element: str | None = None) -> tuple[str, ...]:
        """What the current version of `key` (in the cache) refers to, or one of its
        elements does: kept, as a record's professionals and teams are asked often."""
        cached = key if element is None else f"{key} {element}"
        found = self.derived.references.get(cached)
        if found is None:
            resource = self.derived.resources.get(key)
            node = resource if element is None or resource is None else resource.get(element)
            found = self.derived.references[cached] = tuple(dict.fromkeys(_references(node)))
        return found

    def _filter_supporting(
        self, stored: Stored, key: str, account: bool, patients: frozenset[str] | None
    ) -> bytes | None:
        """A professional or organisation reached from what this request shares: sent
        if every category it carries may go to the client under the decision for one
        of the `patients` whose records it was reached from (by default, every patient
        this request has shared from), and then recorded in the audit of each of those
        it may go under. It goes as `cpa-fhir share` sends it: labelled, with no
        narrative or tags."""
        if patients is None:
            patients = frozenset(p for p, record in self._disclosed.items() if record.shared)
        version = (key, stored.version_id, patients)
        categories = self.derived.categories.get(version)
        if categories is None:
            # With what it refers to (a role's organisation), whose categories it takes,
            # and the care teams of the records it was reached from naming it: what its
            # place in one says it is, it is wherever it goes from that record.
            resource = stored.resource()
            around = [
                (None, t)
                for r in self._referred({key: resource}, patients)
                if (t := self.derived.resources[r]) is not None
                and (
                    t.get("resourceType") in self.policy.supporting
                    or t.get("resourceType") == "CareTeam"
                )
            ]
            try:
                labelled = label_resources(
                    [(None, resource), *around], self.policy, elements_of={key}
                )
            except LabellingError as exc:
                log.warning("withholding %s: %s", key, exc.message)
                return None
            # It goes whole or not at all: what any of its elements carries, it carries.
            categories = self.derived.categories[version] = labelled[0].categories.union(
                *(label.categories for label in labelled[0].elements)
            )
        under = sorted(p for p in patients if categories <= self.decision(p).allowed.keys())
        if not under:
            return None
        as_labelled = (key, stored.version_id, categories)
        shown = self.derived.supporting.get(as_labelled)
        if shown is None:
            form = outgoing_resource(stored.resource(), categories, False, self.policy)
            # One object per version and labels, so that kept AuditEvents match.
            shown = self.derived.supporting[as_labelled] = _Shown(
                jsonio.dumps(form), categories, ()
            )
        if account:
            sent = f"{key}/_history/{stored.version_id}"
            for patient in under:
                if self._mode is not None:  # told of, not sent
                    self._account(
                        patient, self.decision(patient), key, stored.version_id, shown, True
                    )
                    continue
                record = self._disclosed.get(patient)
                if record is None:
                    record = self._disclosed[patient] = _Shared(self.decision(patient))
                if sent not in record.shared:
                    record.accounted.append(shown)
                    record.shared.append(sent)
                    record.categories |= categories
        return shown.content

    # -- audit --------------------------------------------------------------------------

    def audit_events(self, new_id: Any, observer: dict[str, Any]) -> list[dict[str, Any]]:
        """One AuditEvent per patient whose information this request disclosed."""
        events = []
        recorded = None
        observer_key = orjson.dumps(observer)
        by_account = self.derived.audit_by_account
        for patient, shared in self._disclosed.items():
            if not shared.shared and not shared.counted and not shared.consulted:
                continue
            decision = shared.decision
            if recorded is None:
                recorded = audit_instant(decision.at)
            # Decisions and filtered forms are kept (in `derived`) while they hold, so
            # the same objects mean the same disclosure (a decision differs only in its
            # time, which the template does not hold); the identities are checked, as
            # an id may be reused once its object is gone.
            source = (
                self._decided_from.get(patient)
                if self._decisions.get(patient) is decision
                else None
            )
            accounted = (
                *shared.accounted,
                None,
                *shared.counted_shown,
                None,
                *shared.consulted_shown,
            )
            quick = (
                patient,
                self.recipient.reference,
                id(source),
                tuple(map(id, accounted)),
                observer_key,
            )
            known = by_account.get(quick) if source is not None else None
            if (
                known is not None
                and known[0] is source
                and all(map(operator.is_, known[1], accounted))
            ):
                events.append({**known[2], "id": new_id(), "recorded": recorded})
                continue
            categories = tuple(sorted(shared.categories & decision.allowed.keys()))
            counts = tuple(sorted(withheld_counts(shared.withheld).items()))
            # Disclosures alike but for their id and time have one AuditEvent but for those.
            key = (
                patient,
                self.recipient.reference,
                decision.recipient,
                decision.purpose,
                tuple(decision.allowed[c] for c in categories),
                tuple(shared.shared),
                counts,
                tuple(sorted(shared.counted.items())),
                tuple(shared.consulted),
                observer_key,
            )
            template = self.derived.audit_templates.get(key)
            if template is None:
                template = audit_event(
                    event_id="",
                    decision=decision,
                    shared=shared.shared,
                    shared_categories=categories,
                    withheld=shared.withheld,
                    requester=self.recipient.reference,
                    observer=observer,
                    patient=f"Patient/{patient}",
                    counted=shared.counted,
                    consulted=shared.consulted,
                )
                self.derived.audit_templates[key] = template
            if source is not None:
                by_account[quick] = (source, accounted, template)
            # A new top level; what lies below is shared with the template, never changed.
            events.append({**template, "id": new_id(), "recorded": recorded})
        return events


def _nothing_allowed(
    recipient: Recipient, purpose: str, at: datetime, policy: SharingPolicy
) -> Decision:
    """The decision for a patient whose Consents cannot be evaluated: nothing goes."""
    why = "the patient's Consents cannot be evaluated"
    return Decision(recipient, purpose, at, {}, {c: why for c in sorted(policy.categories)})


def refuse_reason(exc: SharingError) -> str:
    return f"sharing refused for this client: {exc.message}"
