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
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
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
    name, _, wanted = spec.partition(":")
    by_key = {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources}
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


def _instant(value: Any, where: str, *, end: bool) -> datetime:
    """A FHIR date or dateTime as an instant; a date ends at the end of its day."""
    if not isinstance(value, str):
        raise ConsentFormatError(f"{where} is not a date")
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            moment = datetime.combine(d, time.min, UTC)
            if not end:
                return moment
            return moment + timedelta(days=1) if d < date.max else _AFTER_ALL
        if len(value) in (4, 7):
            year = int(value[:4])
            month = int(value[5:7]) if len(value) == 7 else 1
            start = datetime(year, month, 1, tzinfo=UTC)
            if not end:
                return start
            if year == date.max.year and (len(value) == 4 or month == 12):
                return _AFTER_ALL
            if len(value) == 4:
                return datetime(year + 1, 1, 1, tzinfo=UTC)
            return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConsentFormatError(f"{where}: '{value}' is not a valid date") from exc
    if moment.tzinfo is None:
        raise ConsentFormatError(f"{where}: '{value}' has a time but no time zone")
    return moment


def period_covers(period: Any, at: datetime, where: str = "Period") -> bool:
    """Whether a FHIR Period (None: no bounds) holds at `at`; ConsentFormatError if it
    cannot be read."""
    if period is None:
        return True
    if not isinstance(period, dict):
        raise ConsentFormatError(f"{where}.period is not a Period")
    if "start" in period and at < _instant(period["start"], f"{where}.period.start", end=False):
        return False
    if "end" in period and at >= _instant(period["end"], f"{where}.period.end", end=True):
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
            out |= policy.categories_by_sensitivity[code]
        else:
            raise ConsentFormatError(f"{at}: labels from '{system}' cannot be evaluated")
    return frozenset(out)


def _actor_matches(
    actors: list[Any],
    recipient: Recipient,
    resources: Mapping[str, Mapping[str, Any]],
    where: str,
) -> bool:
    if not actors:
        return True
    for i, actor in enumerate(actors):
        ref = actor.get("reference")
        if not isinstance(ref, dict):
            raise ConsentFormatError(f"{where}.actor[{i}].reference is missing")
        key = reference_key(ref.get("reference"))
        if key is not None and key == recipient.reference:
            return True
        idents = set()
        ident = ref.get("identifier")
        if (
            isinstance(ident, dict)
            and isinstance(ident.get("system"), str)
            and isinstance(ident.get("value"), str)
        ):
            idents.add((ident["system"], ident["value"]))
        if key is not None and key in resources:
            idents |= _identifiers(resources[key])
        if idents & recipient.identifiers:
            return True
    return False


def _purpose_matches(purposes: list[Any], purpose: str) -> bool:
    if not purposes:
        return True
    return any(p.get("system") == PURPOSE_SYSTEM and p.get("code") == purpose for p in purposes)


@dataclass
class _Tally:
    permitted: dict[str, str] = field(default_factory=dict)  # category -> Consent/id
    denied: dict[str, str] = field(default_factory=dict)  # category -> reason


def _walk(
    node: Mapping[str, Any],
    scope: frozenset[str] | None,
    consent_key: str,
    where: str,
    recipient: Recipient,
    purpose: str,
    at: datetime,
    resources: Mapping[str, Mapping[str, Any]],
    policy: SharingPolicy,
    tally: _Tally,
) -> None:
    kind = node.get("type")
    if kind not in ("permit", "deny"):
        raise ConsentFormatError(f"{where}.type must be permit or deny")
    actors = _list(node, "actor", where)
    purposes = _list(node, "purpose", where)
    labels = _list(node, "securityLabel", where)
    if node.get("data") is not None:
        raise ConsentFormatError(
            f"{where}: provisions about single resources (data) cannot be evaluated"
        )
    applies = (
        period_covers(node.get("period"), at, where)
        and _actor_matches(actors, recipient, resources, where)
        and _purpose_matches(purposes, purpose)
    )
    if not applies:
        return
    named = _label_categories(labels, kind == "permit", policy, where)
    if named is not None:
        covered = named if scope is None else named & scope
    elif scope is not None:
        covered = scope
    elif kind == "permit":
        covered = frozenset(
            c.code for c in policy.categories.values() if not c.needs_explicit_permit
        )
    else:
        covered = frozenset(policy.categories)
    if kind == "deny":
        for c in covered:
            tally.denied.setdefault(c, f"refused in {consent_key}")
    elif kind == "permit":
        for c in covered:
            tally.permitted.setdefault(c, consent_key)
    for i, child in enumerate(_list(node, "provision", where)):
        _walk(
            child,
            covered,
            consent_key,
            f"{where}.provision[{i}]",
            recipient,
            purpose,
            at,
            resources,
            policy,
            tally,
        )


def _evaluate_consent(
    consent: Mapping[str, Any],
    recipient: Recipient,
    purpose: str,
    at: datetime,
    resources: Mapping[str, Mapping[str, Any]],
    policy: SharingPolicy,
    tally: _Tally,
    notes: list[str],
) -> None:
    key = f"Consent/{consent.get('id')}"
    if consent.get("resourceType") != "Consent":
        raise ConsentFormatError(f"{key} is not a Consent")
    scope = consent.get("scope")
    codings = scope.get("coding") if isinstance(scope, dict) else None
    if not isinstance(codings, list) or not any(
        isinstance(c, dict) and (c.get("system"), c.get("code")) == PRIVACY_SCOPE for c in codings
    ):
        return  # treatment or research consent says nothing about sharing
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
    if not period_covers(root.get("period"), at, f"{key}.provision"):
        notes.append(f"{key} does not cover {at.date().isoformat()} (expired or not yet in force)")
        return
    # The base deny is the default; only nested provisions grant or refuse.
    for i, child in enumerate(_list(root, "provision", f"{key}.provision")):
        _walk(
            child,
            None,
            key,
            f"{key}.provision.provision[{i}]",
            recipient,
            purpose,
            at,
            resources,
            policy,
            tally,
        )


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
                    edge = _instant(period[name], f"period.{name}", end=is_end)
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
) -> Decision:
    """Decide per category. `resources` (Type/id -> resource) lets consent actors be
    matched by identifier as well as by reference. Raises a SharingError when
    anything cannot be evaluated: the caller then shares nothing."""
    if at.tzinfo is None:
        raise ConsentFormatError("the time of disclosure needs a time zone")
    if purpose not in policy.purposes:
        raise RecipientError(
            f"unknown purpose of use '{purpose}': use one of {', '.join(sorted(policy.purposes))}"
        )
    resources = resources or {}
    tally = _Tally()
    notes: list[str] = []
    for consent in consents:
        _evaluate_consent(consent, recipient, purpose, at, resources, policy, tally, notes)
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
