"""The sharing decision: which categories may go to a recipient, and on what basis.

Consent is read as FHIR R4 privacy consent (https://hl7.org/fhir/R4/consent.html):
a base `deny` provision with nested provisions that permit or deny by actor,
purpose, period and security label. Deny beats permit; a Consent that is not
active, or whose period does not cover the time of disclosure, grants nothing.
Legal exceptions (handbook §36.1, §37.7) apply only when the sender names them,
to the recipients and purposes the policy lists, and only for their categories.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

from cpa_fhir.consent._labelling import reference_key
from cpa_fhir.consent._policy import (
    CARER,
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_ORDER,
    CONFIDENTIALITY_SYSTEM,
    PARTNER_TYPE_SYSTEM,
    PURPOSE_SYSTEM,
    SENSITIVITY_SYSTEM,
    SharingPolicy,
)
from cpa_fhir.errors import ConsentFormatError, RecipientError

PRIVACY_SCOPE = ("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy")


@dataclass(frozen=True, slots=True)
class Recipient:
    """Whom a disclosure goes to: a partner organisation or a carer."""

    reference: str  # Organization/id or RelatedPerson/id
    partner_type: str  # a partner-agency-type code, or "carer"
    identifiers: frozenset[tuple[str, str]] = frozenset()
    display: str | None = None


@dataclass(frozen=True, slots=True)
class Basis:
    """Why one category may go: a Consent, or a named legal exception."""

    category: str
    consent: str | None = None
    legal_basis: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    recipient: Recipient
    purpose: str
    at: datetime
    allowed: Mapping[str, Basis]
    denied: Mapping[str, str] = field(default_factory=dict)  # category -> why

    def basis_of(self, category: str) -> Basis:
        return self.allowed[category]


def _identifiers(resource: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    out = set()
    for ident in resource.get("identifier") or []:
        if (
            isinstance(ident, dict)
            and isinstance(ident.get("system"), str)
            and isinstance(ident.get("value"), str)
        ):
            out.add((ident["system"], ident["value"]))
    return frozenset(out)


def partner_types(org: Mapping[str, Any]) -> set[str]:
    out = set()
    for concept in org.get("type") or []:
        if isinstance(concept, dict):
            for c in concept.get("coding") or []:
                if (
                    isinstance(c, dict)
                    and c.get("system") == PARTNER_TYPE_SYSTEM
                    and isinstance(c.get("code"), str)
                ):
                    out.add(c["code"])
    return out


def recipient_from(resource: Mapping[str, Any]) -> Recipient:
    """A Recipient for an Organization of a known partner type, or a carer RelatedPerson."""
    rt, rid = resource.get("resourceType"), resource.get("id")
    if rt == "RelatedPerson":
        return Recipient(
            f"RelatedPerson/{rid}", CARER, _identifiers(resource), person_name(resource)
        )
    if rt == "Organization":
        kinds = partner_types(resource)
        if len(kinds) != 1:
            raise RecipientError(
                f"Organization/{rid} must have exactly one partner agency type to receive information"
            )
        return Recipient(
            f"Organization/{rid}", kinds.pop(), _identifiers(resource), person_name(resource)
        )
    raise RecipientError(f"a {rt} cannot receive a disclosure")


# The relationship that makes a RelatedPerson a carer (the cpa-carer profile's).
CARER_RELATIONSHIP = (
    "https://fhir.hl7.org.uk/CodeSystem/UKCore-AdditionalPersonRelationshipRole",
    "Carer",
)


def is_active(resource: Mapping[str, Any]) -> bool:
    """`active` true, or not given (in use unless said otherwise). Anything but a JSON
    boolean (0, "false") holds no basis."""
    return resource.get("active", True) is True


def cares_for(person: Mapping[str, Any] | None, patient_id: str, at: datetime) -> bool:
    """Whether a RelatedPerson is, at `at`, an active carer of Patient/`patient_id` as
    the record holds it: coded as a carer, active, naming that patient (a relative
    reference), within its period. A relative who is not a carer (an estranged former
    spouse) has no need to know; a period that cannot be read holds no basis."""
    if person is None or person.get("resourceType") != "RelatedPerson":
        return False
    patient = person.get("patient")
    if not isinstance(patient, dict) or patient.get("reference") != f"Patient/{patient_id}":
        return False
    relationships = person.get("relationship")
    coded = {
        (c.get("system"), c.get("code"))
        for r in (relationships if isinstance(relationships, list) else [])
        if isinstance(r, dict) and isinstance(r.get("coding"), list)
        for c in r["coding"]
        if isinstance(c, dict)
    }
    return (
        CARER_RELATIONSHIP in coded and is_active(person) and period_holds(person.get("period"), at)
    )


def person_name(resource: Mapping[str, Any]) -> str | None:
    """The first name a resource gives (an Organization's text; a person's given
    names and family name), or None; parts that are not text are passed over."""
    name = resource.get("name")
    if isinstance(name, str):
        return name
    if isinstance(name, list) and name and isinstance(name[0], dict):
        n = name[0]
        names = n.get("given")
        given = " ".join(g for g in names if isinstance(g, str)) if isinstance(names, list) else ""
        return " ".join(p for p in (given, n.get("family")) if isinstance(p, str) and p) or None
    return None


def resolve_recipient(
    spec: str, resources: Iterable[Mapping[str, Any]], policy: SharingPolicy
) -> Recipient:
    """`gp`, `gp:ORG-ID`, `probation`, ... or `carer:RELATEDPERSON-ID`, within a record."""
    name, colon, wanted = spec.partition(":")
    by_key = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources}
    if colon and not wanted and name != CARER:
        raise RecipientError(f"'{spec}' names no one: use {name}:ID, or {name} alone")
    if name == CARER:
        if not wanted:
            raise RecipientError("name the carer: carer:ID (a RelatedPerson in the record)")
        carer = by_key.get(f"RelatedPerson/{wanted}")
        if carer is None:
            raise RecipientError(f"the record has no RelatedPerson '{wanted}'")
        return recipient_from(carer)
    if name not in policy.recipients:
        known = ", ".join(sorted([*policy.recipients, "carer:ID"]))
        raise RecipientError(f"unknown recipient '{spec}': use one of {known}")
    kind = policy.recipients[name]
    if wanted:
        org = by_key.get(f"Organization/{wanted}")
        if org is None or kind not in partner_types(org):
            raise RecipientError(f"the record has no {kind} Organization '{wanted}'")
        return recipient_from(org)
    matches = [
        r
        for r in by_key.values()
        if r.get("resourceType") == "Organization" and kind in partner_types(r)
    ]
    if not matches:
        raise RecipientError(f"the record names no {kind} organisation to send to")
    if len(matches) > 1:
        ids = ", ".join(sorted(str(m.get("id")) for m in matches))
        raise RecipientError(
            f"the record names several {kind} organisations ({ids}): use {name}:ID"
        )
    return recipient_from(matches[0])


# -- reading Consent ---------------------------------------------------------


# The end of year 9999 (a consent "until 9999-12-31"): later than any instant.
_AFTER_ALL = datetime.max.replace(tzinfo=UTC)


def _instant(value: Any, where: str, *, end: bool, zone: tzinfo | None = UTC) -> datetime:
    """A FHIR date or dateTime as an instant; a date (or month, or year) is a day in
    `zone`, and ends at the end of it."""
    zone = zone or UTC
    if not isinstance(value, str):
        raise ConsentFormatError(f"{where} is not a date")
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            moment = datetime.combine(d, time.min, zone)
            if not end:
                return moment
            return moment + timedelta(days=1) if d < date.max else _AFTER_ALL
        if len(value) in (4, 7):
            year = int(value[:4])
            month = int(value[5:7]) if len(value) == 7 else 1
            start = datetime(year, month, 1, tzinfo=zone)
            if not end:
                return start
            if year == date.max.year and (len(value) == 4 or month == 12):
                return _AFTER_ALL
            if len(value) == 4:
                return datetime(year + 1, 1, 1, tzinfo=zone)
            return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=zone)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConsentFormatError(f"{where}: '{value}' is not a valid date") from exc
    if moment.tzinfo is None:
        raise ConsentFormatError(f"{where}: '{value}' has a time but no time zone")
    return moment


def period_holds(period: Any, at: datetime) -> bool:
    """`period_covers`, where a Period that cannot be read does not hold: no basis is
    found in what cannot be read."""
    try:
        return period_covers(period, at)
    except ConsentFormatError:
        return False


def period_covers(period: Any, at: datetime, where: str = "Period") -> bool:
    """Whether a FHIR Period (None: no bounds) holds at `at`, its dates days in `at`'s
    time zone; ConsentFormatError if it cannot be read."""
    if period is None:
        return True
    if not isinstance(period, dict):
        raise ConsentFormatError(f"{where}.period is not a Period")
    zone = at.tzinfo
    if "start" in period and at < _instant(
        period["start"], f"{where}.period.start", end=False, zone=zone
    ):
        return False
    if "end" in period and at >= _instant(
        period["end"], f"{where}.period.end", end=True, zone=zone
    ):
        return False
    return True


def _list(node: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = node.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConsentFormatError(f"{where}.{key} must be a list of objects")
    return value


def _label_categories(
    labels: list[Any], permit: bool, policy: SharingPolicy, where: str
) -> frozenset[str] | None:
    """Categories a provision's security labels cover; None when it names none."""
    if not labels:
        return None
    out: set[str] = set()
    sensitivities: set[str] = set()
    for i, c in enumerate(labels):
        system, code = c.get("system"), c.get("code")
        at = f"{where}.securityLabel[{i}]"
        if system == CATEGORY_SYSTEM:
            if code not in policy.categories:
                raise ConsentFormatError(f"{at}: unknown information category '{code}'")
            out.add(code)
        elif system == CONFIDENTIALITY_SYSTEM:
            if code not in CONFIDENTIALITY_ORDER:
                raise ConsentFormatError(f"{at}: unknown confidentiality code '{code}'")
            level = CONFIDENTIALITY_ORDER[code]
            for cat in policy.categories.values():
                cat_level = CONFIDENTIALITY_ORDER[cat.confidentiality]
                if permit and cat_level <= level and not cat.needs_explicit_permit:
                    out.add(cat.code)
                elif not permit and cat_level >= level:
                    out.add(cat.code)
        elif system == SENSITIVITY_SYSTEM:
            if code not in policy.categories_by_sensitivity:
                raise ConsentFormatError(f"{at}: sensitivity code '{code}' maps to no category")
            if not permit:
                out |= policy.categories_by_sensitivity[code]
            sensitivities.add(code)
        else:
            raise ConsentFormatError(f"{at}: labels from '{system}' cannot be evaluated")
    if permit and sensitivities:
        # What a category holds goes labelled with all its sensitivities: a permit covers
        # it only when it names them all (one for HIV is not one for gender identity).
        out |= {
            cat.code
            for cat in policy.categories.values()
            if cat.sensitivity and set(cat.sensitivity) <= sensitivities
        }
    return frozenset(out)


def _actor_matches(actors: list[Any], asked: _Asked, where: str, deny: bool) -> bool:
    """Whether a provision's actors name the recipient (by reference, by a fullUrl of
    the record, or by identifier). A permit names it only as an information
    recipient (v3-ParticipationType IRCP or PRCP). A refusal errs towards applying:
    in any role; by an absolute URL ending in the recipient's Type/id, as this
    server's own base may be written out in full; through a Group, CareTeam or
    PractitionerRole (or a contained one) that has the recipient as a member, on
    whose behalf one acts, or as its organisation; through a Practitioner whose role
    is with the recipient; and to an actor it cannot see."""
    if not actors:
        return True
    for i, actor in enumerate(actors):
        ref = actor.get("reference")
        if not isinstance(ref, dict):
            raise ConsentFormatError(f"{where}.actor[{i}].reference is missing")
        if not deny and not _recipient_role(actor):
            continue
        named = _names_recipient(ref, asked, deny)
        if named or (named is None and deny):
            return True
    return False


def _names_recipient(
    ref: Mapping[str, Any], asked: _Asked, deny: bool, depth: int = 0
) -> bool | None:
    """Whether a Reference names the recipient; None when what it names cannot be seen
    (a relative, urn or contained reference to what is not there). For a refusal, what it names is
    looked into: a Group's members, a CareTeam's members and those they act for, a
    PractitionerRole's organisation."""
    recipient = asked.recipient
    url = ref.get("reference")
    key: str | None = None
    target: Mapping[str, Any] | None = None
    if isinstance(url, str):
        if url.startswith("#"):
            target = asked.local.get(url[1:])
        else:
            key = asked.urls.get(url) or reference_key(url)
            if key is not None and key == recipient.reference:
                return True
            if deny and _url_names(url, recipient.reference):
                return True
            target = asked.resources.get(key) if key is not None else None
    idents = set()
    ident = ref.get("identifier")
    if (
        isinstance(ident, dict)
        and isinstance(ident.get("system"), str)
        and isinstance(ident.get("value"), str)
    ):
        idents.add((ident["system"], ident["value"]))
    if target is not None:
        idents |= _identifiers(target)
    if idents & recipient.identifiers:
        return True
    if deny and target is not None and depth < 2:
        for member in [*_members(target), *_roles_organisations(key, asked)]:
            if _names_recipient(member, asked, deny, depth + 1):
                return True
    if isinstance(url, str) and target is None and "://" not in url:
        # Of this record or store, yet not there (deleted, mistyped): not seen. Another
        # server's is someone else's unless its Type/id is the recipient's.
        return None
    if not isinstance(url, str) and not idents:
        return None  # a display alone: whom it means cannot be told
    if (
        target is None
        and idents
        and not {system for system, _ in idents} & {s for s, _ in recipient.identifiers}
    ):
        return None  # an identifier of a kind the recipient is not known by
    return False


def _members(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The References by which a Group, CareTeam or PractitionerRole stands for others."""
    kind = resource.get("resourceType")
    found: list[Any] = []
    if kind == "Group":
        found = [m.get("entity") for m in resource.get("member") or [] if isinstance(m, dict)]
    elif kind == "CareTeam":
        found = [
            p.get(element)
            for p in resource.get("participant") or []
            if isinstance(p, dict)
            for element in ("member", "onBehalfOf")
        ]
    elif kind == "PractitionerRole":
        found = [resource.get("organization")]
    return [m for m in found if isinstance(m, dict)]


def _roles_organisations(key: str | None, asked: _Asked) -> list[Mapping[str, Any]]:
    """The organisations a Practitioner works for in a role (PractitionerRole) among
    what the decision sees: a refusal of the person is a refusal of where they work."""
    if key is None or not key.startswith("Practitioner/"):
        return []
    found: list[Mapping[str, Any]] = []
    for role in asked.resources.values():
        if role.get("resourceType") != "PractitionerRole":
            continue
        person = role.get("practitioner")
        url = person.get("reference") if isinstance(person, dict) else None
        if isinstance(url, str) and (asked.urls.get(url) or reference_key(url)) == key:
            organisation = role.get("organization")
            if isinstance(organisation, dict):
                found.append(organisation)
    return found


# Provision elements the engine cannot honour: a Consent that uses them shares nothing,
# or a permit would grant more than it says (R4 Consent.provision).
_UNEVALUATED = (
    ("data", "single resources"),
    ("class", "resource type"),
    ("code", "content code"),
    ("dataPeriod", "the time of the data"),
    ("modifierExtension", "modifier extensions"),
)


def _refuse_unevaluated(node: Mapping[str, Any], where: str) -> None:
    for element, what in _UNEVALUATED:
        if node.get(element) is not None:
            raise ConsentFormatError(
                f"{where}: provisions by {what} ({element}) cannot be evaluated"
            )


_ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
# What sending information to a recipient is (consentaction): a permit for another
# action (collect, correct, use) grants nothing here.
_DISCLOSING = frozenset({"disclose", "access"})
_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
# An actor whose information a permit lets go to it: an (primary) information recipient.
_RECIPIENT_ROLES = frozenset({"IRCP", "PRCP"})
# v3-ActReason, as its OID names it.
_PURPOSE_OID = "urn:oid:2.16.840.1.113883.5.8"


def _action_matches(actions: list[Any], deny: bool) -> bool:
    """A permit grants disclosure only if its actions, where it names any, include
    disclosing; a refusal errs towards applying."""
    for i, action in enumerate(actions):
        if not isinstance(action.get("coding", []), list):
            raise ConsentFormatError(f"provision action[{i}].coding is not a list")
    if not actions or deny:
        return True
    return any(
        isinstance(c, dict) and c.get("system") == _ACTION_SYSTEM and c.get("code") in _DISCLOSING
        for a in actions
        for c in (a.get("coding") or [])
    )


def _recipient_role(actor: Mapping[str, Any]) -> bool:
    role = actor.get("role")
    codings = role.get("coding") if isinstance(role, dict) else None
    return isinstance(codings, list) and any(
        isinstance(c, dict)
        and c.get("system") == _ROLE_SYSTEM
        and c.get("code") in _RECIPIENT_ROLES
        for c in codings
    )


def _url_names(ref: Any, key: str) -> bool:
    """Whether an absolute reference ends in `Type/id` (perhaps with a version)."""
    if not isinstance(ref, str) or "://" not in ref:
        return False
    path = ref.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    parts = path.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return "/".join(parts[-2:]) == key


def _purpose_matches(purposes: list[Any], asked: _Asked, where: str, deny: bool) -> bool:
    """Whether a provision's purposes (v3-ActReason, by URL or OID) include the one
    asked for: it, or a broader purpose it falls within (the policy's `purpose-within`;
    a refusal for treatment covers continuity of care). A refusal for purposes coded
    otherwise cannot be told not to apply: it is an error."""
    if not purposes:
        return True
    within = asked.policy.purpose_within
    covering = {asked.purpose}
    code = asked.purpose
    while code in within and within[code] not in covering:
        code = within[code]
        covering.add(code)
    for i, p in enumerate(purposes):
        system = p.get("system")
        if system in (PURPOSE_SYSTEM, _PURPOSE_OID):
            if p.get("code") in covering:
                return True
        elif deny:
            raise ConsentFormatError(
                f"{where}.purpose[{i}]: a refusal for purposes coded in {system!r} cannot be"
                " evaluated"
            )
    return False


@dataclass
class _Tally:
    permitted: dict[str, str] = field(default_factory=dict)  # category -> Consent/id
    denied: dict[str, str] = field(default_factory=dict)  # category -> reason


@dataclass(frozen=True, slots=True)
class _Asked:
    """What every provision is judged against: the disclosure asked for."""

    recipient: Recipient
    purpose: str
    at: datetime
    resources: Mapping[str, Mapping[str, Any]]
    urls: Mapping[str, str]  # the record's fullUrls -> Type/id
    policy: SharingPolicy
    local: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # contained, by id


def _walk(
    node: Mapping[str, Any],
    scope: frozenset[str] | None,
    consent_key: str,
    where: str,
    asked: _Asked,
    tally: _Tally,
) -> None:
    kind = node.get("type")
    if kind not in ("permit", "deny"):
        raise ConsentFormatError(f"{where}.type must be permit or deny")
    actors = _list(node, "actor", where)
    purposes = _list(node, "purpose", where)
    labels = _list(node, "securityLabel", where)
    _refuse_unevaluated(node, where)
    deny = kind == "deny"
    applies = (
        period_covers(node.get("period"), asked.at, where)
        and _actor_matches(actors, asked, where, deny=deny)
        and _purpose_matches(purposes, asked, where, deny=deny)
        and _action_matches(_list(node, "action", where), deny)
    )
    if not applies:
        return
    policy = asked.policy
    named = _label_categories(labels, kind == "permit", policy, where)
    if deny:
        # A refusal holds for all it names (or everything), wherever it is nested: a
        # refusal inside a permit of other categories still refuses what it names
        # (deny beats permit, from this Consent or any other).
        covered = named if named is not None else frozenset(policy.categories)
    elif named is not None:
        covered = named if scope is None else named & scope
    elif scope is not None:
        covered = scope
    else:
        covered = frozenset(
            c.code for c in policy.categories.values() if not c.needs_explicit_permit
        )
    if kind == "deny":
        for c in covered:
            tally.denied.setdefault(c, f"refused in {consent_key}")
    elif kind == "permit":
        for c in covered:
            tally.permitted.setdefault(c, consent_key)
    for i, child in enumerate(_list(node, "provision", where)):
        _walk(child, covered, consent_key, f"{where}.provision[{i}]", asked, tally)


# Consent scopes (consentscope) that say nothing about sharing.
_OTHER_SCOPES = frozenset({"adr", "research", "treatment"})


def _evaluate_consent(
    consent: Mapping[str, Any], asked: _Asked, tally: _Tally, notes: list[str]
) -> None:
    key = f"Consent/{consent.get('id')}"
    if consent.get("resourceType") != "Consent":
        raise ConsentFormatError(f"{key} is not a Consent")
    scope = consent.get("scope")
    codings = scope.get("coding") if isinstance(scope, dict) else None
    codes = {
        c.get("code")
        for c in (codings if isinstance(codings, list) else [])
        if isinstance(c, dict) and c.get("system") == PRIVACY_SCOPE[0]
    }
    if PRIVACY_SCOPE[1] not in codes:
        if codes & _OTHER_SCOPES:
            return  # treatment or research consent says nothing about sharing
        # What cannot be told not to be about sharing may be a refusal of it.
        raise ConsentFormatError(f"{key}: its scope is not a consentscope code this engine reads")
    if consent.get("modifierExtension") is not None:
        raise ConsentFormatError(f"{key}: modifier extensions cannot be evaluated")
    status = consent.get("status")
    if status != "active":
        if not isinstance(status, str):
            raise ConsentFormatError(f"{key} has no status")
        notes.append(f"{key} is {status} and grants nothing")
        return
    root = consent.get("provision")
    if not isinstance(root, dict):
        raise ConsentFormatError(f"{key} has no provision")
    if root.get("type") != "deny":
        raise ConsentFormatError(f"{key}: the base provision must deny (permits are nested)")
    _refuse_unevaluated(root, f"{key}.provision")
    if not period_covers(root.get("period"), asked.at, f"{key}.provision"):
        notes.append(
            f"{key} does not cover {asked.at.date().isoformat()} (expired or not yet in force)"
        )
        return
    contained = consent.get("contained")
    local = {
        c["id"]: c
        for c in (contained if isinstance(contained, list) else [])
        if isinstance(c, dict) and isinstance(c.get("id"), str)
    }
    if local:
        asked = replace(asked, local=local)
    # The base deny is the default; only nested provisions grant or refuse.
    for i, child in enumerate(_list(root, "provision", f"{key}.provision")):
        _walk(child, None, key, f"{key}.provision.provision[{i}]", asked, tally)


def steady_span(consents: Sequence[Mapping[str, Any]], at: datetime) -> tuple[datetime, datetime]:
    """The span [start, end) around `at` in which `decide` on these Consents gives the
    same decision, `Decision.at` aside: time matters only where a period starts or ends,
    and the reasons given for a denial name the day. An empty span (start == end)
    when a period cannot be read: decide again, and let it say why."""
    # The day as the reasons name it: `at`'s date in its own zone.
    start = datetime.combine(at.date(), time.min, at.tzinfo)
    end = (
        datetime.combine(at.date() + timedelta(days=1), time.min, at.tzinfo)
        if at.date() < date.max
        else _AFTER_ALL
    )
    periods: list[Any] = []
    stack: list[Any] = list(consents)
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            period = node.get("period")
            if period is not None:
                periods.append(period)
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(node)
    try:
        for period in periods:
            if not isinstance(period, dict):
                return at, at
            for name, is_end in (("start", False), ("end", True)):
                if name in period:
                    edge = _instant(period[name], f"period.{name}", end=is_end, zone=at.tzinfo)
                    if edge <= at:
                        start = max(start, edge)
                    else:
                        end = min(end, edge)
    except ConsentFormatError:
        return at, at
    return start, end


def decide(
    consents: Sequence[Mapping[str, Any]],
    recipient: Recipient,
    purpose: str,
    at: datetime,
    policy: SharingPolicy,
    *,
    exceptions: Sequence[str] = (),
    resources: Mapping[str, Mapping[str, Any]] | None = None,
    restricting: Sequence[Mapping[str, Any]] = (),
    urls: Mapping[str, str] | None = None,
) -> Decision:
    """Decide per category. `resources` (Type/id -> resource) lets consent actors be
    matched by identifier as well as by reference, `urls` (fullUrl -> Type/id) by the
    record's fullUrls. `restricting`: Consents that may
    be the patient's but cannot be told to be (their patient named by an absolute
    URL, say): what they refuse is refused, what they permit is not permitted.
    Raises a SharingError when anything cannot be evaluated: the caller then shares
    nothing."""
    if at.tzinfo is None:
        raise ConsentFormatError("the time of disclosure needs a time zone")
    if purpose not in policy.purposes:
        raise RecipientError(
            f"unknown purpose of use '{purpose}': use one of {', '.join(sorted(policy.purposes))}"
        )
    asked = _Asked(recipient, purpose, at, resources or {}, urls or {}, policy)
    tally = _Tally()
    notes: list[str] = []
    for consent in consents:
        _evaluate_consent(consent, asked, tally, notes)
    for consent in restricting:
        refusals = _Tally()
        _evaluate_consent(consent, asked, refusals, [])
        for cat, why in refusals.denied.items():
            tally.denied.setdefault(cat, why)
    allowed: dict[str, Basis] = {}
    for cat, consent_key in tally.permitted.items():
        if cat not in tally.denied:
            allowed[cat] = Basis(cat, consent=consent_key)
    for code in exceptions:
        exc = policy.exceptions.get(code)
        if exc is None:
            raise RecipientError(
                f"unknown legal basis '{code}': use one of {', '.join(sorted(policy.exceptions))}"
            )
        if recipient.partner_type not in exc.recipients:
            raise RecipientError(f"{code} does not apply to a {recipient.partner_type} recipient")
        if purpose not in exc.purposes:
            raise RecipientError(f"{code} does not apply to purpose {purpose}")
        for cat in sorted(exc.categories):
            # A legal exception is the basis only where consent is not.
            if cat not in allowed:
                allowed[cat] = Basis(cat, legal_basis=code)
    no_consent = "; ".join(notes) if notes else "no consent covers it"
    denied = {
        c: tally.denied.get(c, no_consent) for c in sorted(policy.categories) if c not in allowed
    }
    return Decision(recipient, purpose, at, allowed, denied)
