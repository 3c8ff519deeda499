"""Properties of the consent engine: nothing disallowed is ever shared.

Records are the four example records with generated content added whose
categories are known by construction (from the policy's stated intent, not by
asking the labeller): risk Flags, care-plan activities and notes, needs
(Conditions) and a second carer, each carrying a unique marker string. The
record's Consent is replaced by generated Consents. For every disclosure the
engine either refuses (SharingError, and nothing at all comes out) or sends a
bundle in which no marker of a category it did not allow appears, whose labels
stay within what was allowed, whose references all resolve, which validates
against the profiles, and which comes with one AuditEvent that names the basis
of every category shared. The decision itself is checked against a small
reference model of the generated Consents.
"""

from __future__ import annotations

import base64
import copy
import itertools
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cpa_fhir.config import load_policy
from cpa_fhir.consent import (
    CATEGORY_SYSTEM,
    LEGAL_BASIS_SYSTEM,
    Disclosure,
    Recipient,
    RequiredElements,
    ShareRequest,
    SharingPolicy,
    decide,
    disclosed_references,
    filter_record,
    label_resources,
    recipient_from,
    record_entries,
    share,
)
from cpa_fhir.errors import RecipientError, SharingError
from cpa_fhir.validation import Validator
from tests.common import EXAMPLES, POLICY, PROFILES

AT = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
RECORDS: dict[str, dict[str, Any]] = {
    p.name.split("-")[2]: orjson.loads(p.read_bytes())
    for p in sorted(EXAMPLES.glob("Bundle-record-*.json"))
}
POLICY_DATA = tomllib.loads(POLICY.read_text(encoding="utf-8"))
# Not the `policy` fixture: hypothesis prints every argument of a failing test.
SHARING = load_policy(POLICY)

SD = "https://cpa-fhir.org/fhir/StructureDefinition/"
CS = "https://cpa-fhir.org/fhir/CodeSystem/"
CARE_PLAN_PROFILE = SD + "cpa-care-plan"
RISK_FLAG_PROFILE = SD + "cpa-risk-flag"
CONSENT_PROFILE = SD + "cpa-consent"
RISK_LEVEL = SD + "risk-level"
MAPPA_LEVEL = SD + "mappa-level"
RISK_SYSTEM = CS + "cpa-risk-type"
PARTNER_TYPE_SYSTEM = CS + "partner-agency-type"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
SENSITIVITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
LEVELS = {"N": 3, "R": 4, "V": 5}
IRCP = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "code": "IRCP",
            "display": "information recipient",
        }
    ]
}

# -- categories by construction ---------------------------------------------------
# What the policy says each kind of content is (policy/sharing.toml, [[rule]] and
# [words]), written out here so that the test does not ask the labeller.

# Flag rules: the cpa-risk-type code of a risk Flag and the categories it carries.
RISK_CATEGORIES: dict[str, frozenset[str]] = {
    "self-neglect": frozenset({"risk-to-self"}),
    "self-harm": frozenset({"risk-to-self"}),
    "disengagement": frozenset({"risk-to-self"}),
    "wandering-falling": frozenset({"risk-to-self"}),
    "diminished-capacity": frozenset({"risk-to-self"}),
    "abuse-by-others": frozenset({"risk-to-self", "safeguarding-adults"}),
    "harm-to-others": frozenset({"risk-to-others"}),
    "criminal-justice": frozenset({"risk-to-others", "offending"}),
    "risk-to-children": frozenset({"safeguarding-children"}),
}
# A MAPPA level on a Flag is offending information (rule mappa-level).
MAPPA_CATEGORIES = frozenset({"offending"})
# Words from the [words] lists: each names every list one of whose entries it contains.
WORDS: dict[str, frozenset[str]] = {
    "cannabis": frozenset({"substance-use"}),
    "alcohol": frozenset({"substance-use"}),
    "church": frozenset({"spiritual"}),
    "prayer": frozenset({"spiritual"}),
    "debt": frozenset({"finances"}),
    "parenting": frozenset({"child-care"}),
    "sexuality": frozenset({"sexuality"}),
    "assault": frozenset({"abuse"}),
    "domestic violence": frozenset({"abuse", "risk-to-others"}),
    "probation": frozenset({"offending"}),
    "violent": frozenset({"risk-to-others"}),
    "overdose": frozenset({"risk-to-self"}),
    "self-harm": frozenset({"risk-to-self"}),
}
# Neutral text: names no sensitive matter.
FILLERS = [
    "seen at the weekly review",
    "plan agreed with the team",
    "to be discussed at the next meeting",
    "keeps in touch by phone",
]
# Partner agency types and what their involvement says (rules agency, agency-*).
AGENCY_CATEGORIES: dict[str, frozenset[str]] = {
    "mental-health-trust": frozenset({"administrative"}),
    "gp-practice": frozenset({"administrative"}),
    "social-care": frozenset({"administrative"}),
    "voluntary-provider": frozenset({"administrative"}),
    "private-provider": frozenset({"administrative"}),
    "health-board": frozenset({"administrative"}),
    "probation": frozenset({"offending"}),
    "police": frozenset({"offending"}),
    "children-services": frozenset({"safeguarding-children"}),
}
# Consent periods: (start, end, whether the period covers AT = 2026-11-01T10:00Z).
# A date ends at the end of its day; an end instant is exclusive.
PERIODS: list[tuple[str | None, str | None, bool]] = [
    ("2026-06-18", "2027-06-17", True),
    ("2025-01-01", "2026-10-31", False),
    ("2026-11-02", "2027-11-01", False),
    ("2026-11-01", "2026-11-01", True),
    ("2026", None, True),
    (None, "2026-11", True),
    (None, "2026-10", False),
    ("2026-11-01T10:00:00Z", None, True),
    ("2026-11-01T11:00:00+01:00", "2026-11-01T10:00:01Z", True),
    (None, "2026-11-01T10:00:00Z", False),
    ("2026-11-01T10:00:01Z", None, False),
]
STATUSES = ["draft", "proposed", "active", "rejected", "inactive", "entered-in-error"]


def _ref_key(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _partner_types(org: dict[str, Any]) -> set[str]:
    return {
        c["code"]
        for t in org.get("type", [])
        for c in t.get("coding", [])
        if c.get("system") == PARTNER_TYPE_SYSTEM
    }


# -- generated records ------------------------------------------------------------


@dataclass
class Generated:
    """A record with generated content, and what each marker in it is by construction."""

    letter: str
    record: dict[str, Any]
    markers: dict[str, frozenset[str]] = field(default_factory=dict)
    # Type/id of each generated resource -> the categories it carries as a whole
    resources: dict[str, frozenset[str]] = field(default_factory=dict)
    count: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # whom and why the Consents are mostly about, so that something is shared
    recipient_hint: str | None = None
    purpose_hint: str | None = None

    def marker(self, categories: frozenset[str]) -> str:
        m = f"MARK-{next(self.count)}-END"
        self.markers[m] = categories
        return m

    @property
    def entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.record["entry"]
        return entries

    def of_type(self, rt: str) -> list[dict[str, Any]]:
        return [e["resource"] for e in self.entries if e["resource"]["resourceType"] == rt]

    def get(self, key: str) -> dict[str, Any]:
        for e in self.entries:
            resource: dict[str, Any] = e["resource"]
            if _ref_key(resource) == key:
                return resource
        raise KeyError(key)

    @property
    def base(self) -> str:
        url: str = self.entries[0]["fullUrl"]
        return url[: -len(_ref_key(self.entries[0]["resource"]))]

    def add(self, resource: dict[str, Any], categories: frozenset[str]) -> None:
        self.entries.append({"fullUrl": self.base + _ref_key(resource), "resource": resource})
        self.resources[_ref_key(resource)] = categories

    @property
    def patient(self) -> dict[str, Any]:
        return self.of_type("Patient")[0]

    @property
    def plan(self) -> dict[str, Any]:
        return next(
            r for r in self.of_type("CarePlan") if CARE_PLAN_PROFILE in r["meta"]["profile"]
        )

    @property
    def carer(self) -> dict[str, Any]:
        return self.of_type("RelatedPerson")[0]

    def organizations(self) -> list[dict[str, Any]]:
        return [o for o in self.of_type("Organization") if len(_partner_types(o)) == 1]


def _text(draw: st.DrawFn, marker: str, word: str | None) -> str:
    filler = draw(st.sampled_from(FILLERS))
    return f"{marker} {filler} ({word})" if word else f"{marker} {filler}"


_maybe_word = st.none() | st.sampled_from(sorted(WORDS))


def _word_categories(word: str | None) -> frozenset[str]:
    return WORDS[word] if word else frozenset()


def _add_flag(draw: st.DrawFn, g: Generated) -> None:
    template = next(
        f
        for f in g.of_type("Flag")
        if RISK_FLAG_PROFILE in f["meta"]["profile"]
        and not any(e["url"] == MAPPA_LEVEL for e in f.get("extension", []))
    )
    code = draw(st.sampled_from(sorted(RISK_CATEGORIES)))
    cats = RISK_CATEGORIES[code]
    flag = copy.deepcopy(template)
    flag["id"] = f"gen-flag-{len(g.resources) + 1}"
    flag.pop("text", None)
    flag["extension"] = [e for e in flag.get("extension", []) if e["url"] == RISK_LEVEL]
    flag["extension"].append(
        {
            "url": SD + "risk-source",
            "extension": [
                {"url": "source", "valueString": "plan agreed with the team"},
                {"url": "verified", "valueBoolean": True},
            ],
        }
    )
    marker = g.marker(cats)
    flag["code"] = {
        "coding": [{"system": RISK_SYSTEM, "code": code}],
        "text": _text(draw, marker, None),
    }
    if code in ("harm-to-others", "criminal-justice") and draw(st.booleans()):
        # The MAPPA level is labelled on its own (element label): the rest may go.
        mappa = g.marker(cats | MAPPA_CATEGORIES)
        flag["extension"].append(
            {
                "url": MAPPA_LEVEL,
                "valueCodeableConcept": {
                    "coding": [{"system": CS + "mappa-level", "code": "2"}],
                    "text": f"{mappa} MAPPA level 2",
                },
            }
        )
    g.add(flag, cats)
    if draw(st.booleans()):
        ref: dict[str, Any] = {"reference": _ref_key(flag)}
        if draw(st.booleans()):
            ref["display"] = f"{marker} risk flag"
        g.plan.setdefault("supportingInfo", []).append(ref)


def _performer(draw: st.DrawFn, g: Generated) -> tuple[dict[str, Any], frozenset[str]]:
    choices: list[tuple[str, frozenset[str]]] = [
        (_ref_key(g.patient), frozenset({"administrative"})),
        (_ref_key(g.carer), frozenset({"carer"})),
    ]
    choices += [(_ref_key(p), frozenset({"administrative"})) for p in g.of_type("Practitioner")]
    for org in g.of_type("Organization"):
        kinds = _partner_types(org)
        choices.append((_ref_key(org), frozenset().union(*(AGENCY_CATEGORIES[k] for k in kinds))))
    pick = draw(st.sampled_from(choices))  # the profile requires a performer
    return {"reference": pick[0]}, pick[1]


def _add_activity(draw: st.DrawFn, g: Generated) -> str:
    performer, performer_cats = _performer(draw, g)
    word = draw(_maybe_word)
    marker = g.marker(frozenset({"care-plan"}) | performer_cats | _word_categories(word))
    description = _text(draw, marker, word)
    detail = {"status": "in-progress", "description": description, "performer": [performer]}
    g.plan.setdefault("activity", []).append({"detail": detail})
    return description


def _add_plan_note(draw: st.DrawFn, g: Generated) -> None:
    word = draw(_maybe_word)
    marker = g.marker(frozenset({"care-plan"}) | _word_categories(word))
    g.plan.setdefault("note", []).append({"text": _text(draw, marker, word)})


def _add_need(draw: st.DrawFn, g: Generated) -> None:
    template = next(
        c
        for c in g.of_type("Condition")
        if any(
            cd.get("code") == "problem-list-item"
            for cat in c.get("category", [])
            for cd in cat.get("coding", [])
        )
    )
    word = draw(_maybe_word)
    cats = frozenset({"care-plan"}) | _word_categories(word)
    marker = g.marker(cats)
    need: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"gen-need-{len(g.resources) + 1}",
    }
    for key in (
        "meta", "clinicalStatus", "verificationStatus", "category", "subject",
        "recordedDate", "recorder",
    ):  # fmt: skip
        if key in template:
            need[key] = copy.deepcopy(template[key])
    if word is not None and draw(st.booleans()):
        need["code"] = {"text": _text(draw, marker, None)}
        need["note"] = [{"text": f"{marker} {word}"}]
    else:
        need["code"] = {"text": _text(draw, marker, word)}
    g.add(need, cats)
    if draw(st.booleans()):
        ref: dict[str, Any] = {"reference": _ref_key(need)}
        if draw(st.booleans()):
            ref["display"] = need["code"]["text"]
        g.plan.setdefault("addresses", []).append(ref)


# Attachment media types as records give them, and the charset each is written in;
# whether the policy reads the text (readable_media_types) or not.
ATTACHMENT_TYPES: list[tuple[str | None, str, bool]] = [
    ("text/plain", "utf-8", True),
    ("text/plain; charset=utf-8", "utf-8", True),
    ('Text/Plain; charset="ISO-8859-1"', "latin-1", True),
    ("text/plain; charset=utf-16", "utf-16", True),
    ("text/html", "utf-8", False),
    ("application/pdf", "utf-8", False),
    ("image/png", "utf-8", False),
]


# The words the policy reads in any element: all but those of money and faith (the
# *-anywhere rules), which it reads only where plans and needs hold them.
WORDS_ANYWHERE = sorted(w for w, c in WORDS.items() if not c & {"finances", "spiritual"})


def _add_attachment(draw: st.DrawFn, g: Generated) -> None:
    """A photo of the Patient whose base64 data holds text: readable text carries what
    its words say (and the Patient's own category); any other, the most restrictive."""
    content_type, charset, readable = draw(st.sampled_from(ATTACHMENT_TYPES))
    word = draw(st.none() | st.sampled_from(WORDS_ANYWHERE))
    cats = (
        frozenset({"administrative"}) | _word_categories(word)
        if readable
        else frozenset({POLICY_DATA["default_category"]})
    )
    marker = g.marker(cats)
    text = f"{marker} {word if word else draw(st.sampled_from(FILLERS))} caf\u00e9"
    encoded = base64.b64encode(text.encode(charset)).decode()
    if draw(st.booleans()):  # as MIME writes it, in lines
        encoded = "\n".join(encoded[i : i + 16] for i in range(0, len(encoded), 16))
    photo: dict[str, Any] = {"data": encoded}
    if content_type is not None:
        photo["contentType"] = content_type
    g.patient.setdefault("photo", []).append(photo)


def _add_carer(draw: st.DrawFn, g: Generated) -> None:
    carer = copy.deepcopy(g.carer)
    carer["id"] = f"gen-carer-{len(g.resources) + 1}"
    carer.pop("text", None)
    marker = g.marker(frozenset({"carer"}))
    carer["name"] = [{"use": "official", "text": marker, "family": "Fictional-Generated"}]
    g.add(carer, frozenset({"carer"}))


@st.composite
def generated_records(draw: st.DrawFn) -> Generated:
    """An example record with generated content, and without its Consent."""
    letter = draw(st.sampled_from(sorted(RECORDS)))
    g = Generated(letter, copy.deepcopy(RECORDS[letter]))
    g.record["entry"] = [e for e in g.entries if e["resource"]["resourceType"] != "Consent"]
    for _ in range(draw(st.integers(0, 3))):
        _add_flag(draw, g)
    descriptions = [_add_activity(draw, g) for _ in range(draw(_often(2, st.integers(0, 3))))]
    for _ in range(draw(st.integers(0, 2))):
        _add_plan_note(draw, g)
    for _ in range(draw(st.integers(0, 3))):
        _add_need(draw, g)
    if draw(st.booleans()):
        _add_carer(draw, g)
    for _ in range(draw(_often(0, st.integers(1, 2), tenths=6))):
        _add_attachment(draw, g)
    if descriptions and draw(_often(True, st.booleans())):
        # A narrative written from the activities: it must go when any of them does.
        items = "".join(f"<li>{d}</li>" for d in descriptions)
        g.plan["text"] = {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><ul>{items}</ul></div>',
        }
    return g


# -- generated consents -----------------------------------------------------------


@dataclass(frozen=True)
class Provision:
    kind: str  # permit | deny
    actor: str | None
    purposes: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    period: tuple[str | None, str | None, bool] | None
    children: tuple[Provision, ...] = ()

    def fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        if self.period is not None:
            out["period"] = _period(self.period)
        if self.actor is not None:
            out["actor"] = [{"role": IRCP, "reference": {"reference": self.actor}}]
        if self.labels:
            out["securityLabel"] = [{"system": s, "code": c} for s, c in self.labels]
        if self.purposes:
            out["purpose"] = [{"system": PURPOSE_SYSTEM, "code": p} for p in self.purposes]
        if self.children:
            out["provision"] = [c.fhir() for c in self.children]
        return out


def _period(p: tuple[str | None, str | None, bool]) -> dict[str, str]:
    return {k: v for k, v in (("start", p[0]), ("end", p[1])) if v is not None}


def _security_label_choices(policy_data: dict[str, Any]) -> list[tuple[str, str]]:
    cats = policy_data["category"]
    out = [(CATEGORY_SYSTEM, c) for c in sorted(cats)]
    out += [(CONFIDENTIALITY_SYSTEM, c) for c in ("N", "R", "V")]
    sens = sorted({s for spec in cats.values() for s in spec.get("sensitivity", [])})
    return out + [(SENSITIVITY_SYSTEM, s) for s in sens]


LABEL_CHOICES = _security_label_choices(POLICY_DATA)
# Each kind of label (category, confidentiality, sensitivity) about as often as the others.
security_labels = st.sampled_from(
    [CATEGORY_SYSTEM, CONFIDENTIALITY_SYSTEM, SENSITIVITY_SYSTEM]
).flatmap(lambda system: st.sampled_from([lc for lc in LABEL_CHOICES if lc[0] == system]))
PURPOSES = sorted(POLICY_DATA["purposes"])


def _often(
    value: Any, otherwise: st.SearchStrategy[Any], tenths: int = 8
) -> st.SearchStrategy[Any]:
    """`value` most of the time (and when shrinking), else a draw from `otherwise`."""
    return st.integers(0, 9).flatmap(lambda n: st.just(value) if n < tenths else otherwise)


@st.composite
def provisions(draw: st.DrawFn, g: Generated, depth: int) -> Provision:
    kind = draw(st.sampled_from(["permit", "permit", "deny"]))
    actors = [_ref_key(o) for o in g.organizations()] + [_ref_key(g.carer)]
    actor = draw(_often(g.recipient_hint, st.none() | st.sampled_from(actors)))
    purposes: tuple[str, ...] = ()
    if draw(st.booleans()):
        purposes = tuple(draw(st.lists(st.sampled_from(PURPOSES), max_size=2, unique=True)))
        purposes = draw(_often(tuple(sorted({*purposes, g.purpose_hint})), st.just(purposes)))
    labels = tuple(draw(st.lists(security_labels, max_size=3, unique=True)))
    if depth == 1 and actor is None and not labels:
        labels = (draw(security_labels),)  # cpa-cons-2: actor or label
    period = draw(_often(None, st.sampled_from(PERIODS)))
    children: tuple[Provision, ...] = ()
    if depth < 3 and draw(st.integers(0, 3)) == 0:
        children = tuple(draw(st.lists(provisions(g, depth + 1), min_size=1, max_size=2)))
    return Provision(kind, actor, purposes, labels, period, children)


@dataclass(frozen=True)
class ConsentSpec:
    status: str
    period: tuple[str | None, str | None, bool]
    provisions: tuple[Provision, ...]


def _consent_resource(spec: ConsentSpec, template: dict[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {"type": "deny", "period": _period(spec.period)}
    if spec.provisions:
        root["provision"] = [p.fhir() for p in spec.provisions]
    out: dict[str, Any] = {
        "resourceType": "Consent",
        "id": "gen-consent",
        "meta": {"profile": [CONSENT_PROFILE]},
        "status": spec.status,
    }
    for key in (
        "scope",
        "category",
        "patient",
        "dateTime",
        "performer",
        "organization",
        "policyRule",
    ):
        if key in template:
            out[key] = copy.deepcopy(template[key])
    out["provision"] = root
    return out


@st.composite
def consent_resources(draw: st.DrawFn, g: Generated, template: dict[str, Any]) -> dict[str, Any]:
    spec = ConsentSpec(
        status=draw(_often("active", st.sampled_from(STATUSES), tenths=6)),
        period=draw(_often(PERIODS[0], st.sampled_from(PERIODS))),
        provisions=tuple(draw(provisions(g, 1)) for _ in range(draw(_often(2, st.integers(0, 4))))),
    )
    return _consent_resource(spec, template)


# -- a reference model of the decision ---------------------------------------------


def _covers(period: dict[str, str] | None) -> bool:
    if period is None:
        return True
    for p in PERIODS:
        if _period(p) == period:
            return p[2]
    raise AssertionError(f"period not generated here: {period}")


def _named(labels: list[dict[str, str]], permit: bool) -> set[str] | None:
    if not labels:
        return None
    cats = POLICY_DATA["category"]
    out: set[str] = set()
    sensitivities = {label["code"] for label in labels if label["system"] == SENSITIVITY_SYSTEM}
    if permit:
        # a permit covers a category only by naming every sensitivity it carries
        out |= {
            c
            for c, spec in cats.items()
            if spec.get("sensitivity") and set(spec["sensitivity"]) <= sensitivities
        }
    for label in labels:
        system, code = label["system"], label["code"]
        if system == CATEGORY_SYSTEM:
            out.add(code)
        elif system == CONFIDENTIALITY_SYSTEM:
            for c, spec in cats.items():
                level = LEVELS[spec["confidentiality"]]
                # a permit must name a very restricted category to cover it (rule 7)
                if permit and level <= LEVELS[code] and spec["confidentiality"] != "V":
                    out.add(c)
                elif not permit and level >= LEVELS[code]:
                    out.add(c)
        elif not permit:
            out |= {c for c, spec in cats.items() if code in spec.get("sensitivity", [])}
    return out


def expected_allowed(
    consents: list[dict[str, Any]], recipient: Recipient, purpose: str, exceptions: tuple[str, ...]
) -> dict[str, set[str]]:
    """Category -> the possible bases (Consent/id or legal-basis code) that allow it."""
    cats = POLICY_DATA["category"]
    permitted: dict[str, set[str]] = {}
    denied: set[str] = set()
    # The purpose asked for and those it falls within (v3-ActReason is-a, as the policy
    # lists it): a provision for any of them covers it.
    within = POLICY_DATA.get("purpose-within", {})
    covering = [purpose]
    while covering[-1] in within:
        covering.append(within[covering[-1]])

    def walk(node: dict[str, Any], scope: set[str] | None, key: str) -> None:
        actors = [a["reference"]["reference"] for a in node.get("actor", [])]
        purposes = [p["code"] for p in node.get("purpose", [])]
        if not _covers(node.get("period")):
            return
        if actors and recipient.reference not in actors:
            return
        if purposes and not set(covering) & set(purposes):
            return
        permit = node["type"] == "permit"
        named = _named(node.get("securityLabel", []), permit)
        if not permit:  # a refusal: all it names, at any depth
            covered = set(cats) if named is None else named
        elif named is not None:
            covered = named if scope is None else named & scope
        elif scope is not None:
            covered = set(scope)
        else:
            covered = {c for c, spec in cats.items() if spec["confidentiality"] != "V"}
        if permit:
            for c in covered:
                permitted.setdefault(c, set()).add(key)
        else:
            denied.update(covered)
        for child in node.get("provision", []):
            walk(child, covered, key)

    for consent in consents:
        root = consent["provision"]
        if consent["status"] != "active" or not _covers(root.get("period")):
            continue
        for child in root.get("provision", []):
            walk(child, None, f"Consent/{consent['id']}")
    allowed = {c: keys for c, keys in permitted.items() if c not in denied}
    for code in exceptions:
        spec = POLICY_DATA["exception"][code]
        for c in spec["categories"]:
            allowed.setdefault(c, set()).add(code)
    return allowed


def exception_applies(code: str, recipient: Recipient, purpose: str) -> bool:
    spec = POLICY_DATA["exception"][code]
    names = POLICY_DATA["recipients"]
    kinds = {names.get(n, n) for n in spec["recipients"]}
    return recipient.partner_type in kinds and purpose in spec["purposes"]


# -- the request --------------------------------------------------------------------


class Case:
    """A generated record and what is asked of it."""

    def __init__(
        self, g: Generated, recipient: Recipient, purpose: str, exceptions: tuple[str, ...]
    ) -> None:
        self.g = g
        self.recipient = recipient
        self.purpose = purpose
        self.exceptions = exceptions

    def request(self) -> ShareRequest:
        return ShareRequest(self.recipient, self.purpose, self.exceptions)

    def __repr__(self) -> str:
        """Short enough to print on failure: what was generated, not the whole record."""
        g = self.g
        consents = [
            f"{r['status']} {_show_period(r['provision'].get('period'))} "
            f"[{'; '.join(_show(p) for p in r['provision'].get('provision', []))}]"
            for r in g.of_type("Consent")
        ]
        plan = {  # what was added to the care plan
            k: [v for v in g.plan[k] if b"gen-" in orjson.dumps(v) or b"MARK-" in orjson.dumps(v)]
            for k in ("activity", "note", "addresses", "supportingInfo")
            if k in g.plan
        }
        generated = {
            key: [t for t in _strings(g.get(key)) if "MARK-" in t or t in RISK_CATEGORIES]
            for key in g.resources
        }
        return (
            f"Case(record {g.letter}, to {self.recipient.reference} "
            f"({self.recipient.partner_type}), purpose {self.purpose}, "
            f"exceptions {list(self.exceptions)},\n"
            f"  markers {dict((m, sorted(c)) for m, c in g.markers.items())},\n"
            f"  consents {consents},\n"
            f"  plan {orjson.dumps(plan).decode()},\n"
            f"  generated {generated})"
        )


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _show_period(period: dict[str, str] | None) -> str:
    return "" if period is None else f"{period.get('start', '')}..{period.get('end', '')}"


def _show(p: dict[str, Any]) -> str:
    """A provision on one line: type, period, actor, purposes, labels, [children]."""
    bits = [str(p.get("type"))]
    if "period" in p:
        bits.append(_show_period(p["period"]))
    bits += [f"actor={a['reference']['reference']}" for a in p.get("actor", [])]
    if p.get("purpose"):
        bits.append("purpose=" + ",".join(x["code"] for x in p["purpose"]))
    if p.get("securityLabel"):
        bits.append("labels=" + ",".join(x["code"] for x in p["securityLabel"]))
    if p.get("provision"):
        bits.append("[" + "; ".join(_show(c) for c in p["provision"]) + "]")
    return " ".join(bits)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    g = draw(generated_records())
    candidates = [recipient_from(o) for o in g.organizations()] + [recipient_from(g.carer)]
    recipient = draw(st.sampled_from(candidates))
    exception_codes = sorted(POLICY_DATA["exception"])
    purpose_pool = list(PURPOSES)
    for code in exception_codes:
        if exception_applies(code, recipient, "THREAT") or recipient.partner_type == "carer":
            purpose_pool += POLICY_DATA["exception"][code]["purposes"]
    purpose = draw(st.sampled_from(purpose_pool))
    applicable = [c for c in exception_codes if exception_applies(c, recipient, purpose)]
    mode = draw(st.integers(0, 5))  # mostly none, or ones that apply
    if mode <= 2 or (mode <= 4 and not applicable):
        exceptions: tuple[str, ...] = ()
    elif mode <= 4:
        exceptions = tuple(draw(st.lists(st.sampled_from(applicable), min_size=1, unique=True)))
    else:
        codes = st.lists(st.sampled_from(exception_codes), max_size=2, unique=True)
        exceptions = tuple(draw(codes))
    # Consents mostly about this recipient and purpose, so that something is shared.
    g.recipient_hint = recipient.reference
    g.purpose_hint = purpose
    template = next(
        e["resource"]
        for e in RECORDS[g.letter]["entry"]
        if e["resource"]["resourceType"] == "Consent"
    )
    n_consents = draw(_often(1, st.integers(0, 3)))
    consents = [draw(consent_resources(g, template)) for _ in range(n_consents)]
    for i, c in enumerate(consents):
        c["id"] = f"gen-consent-{i + 1}"
        g.entries.append({"fullUrl": g.base + f"Consent/{c['id']}", "resource": c})
    return Case(g, recipient, purpose, exceptions)


def _ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"out-{next(counter)}"


def _run(case: Case, required: RequiredElements) -> Disclosure:
    return share(case.g.record, case.request(), SHARING, at=AT, new_id=_ids(), required=required)


# -- checks ---------------------------------------------------------------------------


def _categories(resource: dict[str, Any]) -> set[str]:
    return {
        s["code"]
        for s in resource.get("meta", {}).get("security", [])
        if s.get("system") == CATEGORY_SYSTEM
    }


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            yield ref
        for v in node.values():
            yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def _leaks(content: Any, markers: dict[str, frozenset[str]], allowed: set[str]) -> list[str]:
    """The markers in the content whose categories are not all allowed: in its text
    and in its base64 data, read as any recipient may read them."""
    text = orjson.dumps(content).decode()
    for value in re.findall(r'"(?:data|valueBase64Binary)":"([^"]*)"', text):
        raw = base64.b64decode(value.replace("\\n", ""))
        text += "\x00".join(["", raw.decode("latin-1"), raw.decode("utf-16", "replace")])
    return sorted(
        f"{m} ({', '.join(sorted(cats - allowed))} not allowed)"
        for m, cats in markers.items()
        if not cats <= allowed and m in text
    )


# The cpa-consent snapshot expands Consent.provision.provision without its own
# recursive `provision` (R4: contentReference #Consent.provision), so nested
# provisions below the first level are reported as unknown elements although R4
# allows them. Known gap in the profile: see test_nested_provisions_validate.
_NESTED_PROVISION_GAP = re.compile(
    r"provision\.provision\[\d+\](\.provision\[\d+\])*\.provision: Unknown element 'provision'"
)


def _errors(validator: Validator, resource: dict[str, Any]) -> list[str]:
    return [
        i.line()
        for i in validator.validate(resource)
        if i.is_error and not _NESTED_PROVISION_GAP.search(i.line())
    ]


PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the generators themselves ---------------------------------------------------------


def test_word_table_matches_the_policy_word_lists() -> None:
    """WORDS and FILLERS say what the policy's [words] lists make of them."""
    lists: dict[str, list[str]] = POLICY_DATA["words"]

    def named(text: str) -> set[str]:
        return {
            name
            for name, words in lists.items()
            if any(re.search(rf"(?<!\w){re.escape(w)}", text, re.IGNORECASE) for w in words)
        }

    for word, cats in WORDS.items():
        assert named(word) == set(cats), word
    for text in [*FILLERS, "MARK-1-END", "risk flag"]:
        assert named(text) == set(), text
    assert named("MAPPA level 2") == set(MAPPA_CATEGORIES)


def test_tables_name_the_policy_categories_and_codes() -> None:
    cats = set(POLICY_DATA["category"])
    for table in (RISK_CATEGORIES, WORDS, AGENCY_CATEGORIES):
        for v in table.values():
            assert v <= cats
    for system, table in ((RISK_SYSTEM, RISK_CATEGORIES), (PARTNER_TYPE_SYSTEM, AGENCY_CATEGORIES)):
        name = system.rsplit("/", 1)[1]
        concepts = orjson.loads((PROFILES / f"CodeSystem-{name}.json").read_bytes())["concept"]
        assert {c["code"] for c in concepts} == set(table)
    assert set(PURPOSES) == set(POLICY_DATA["purposes"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_generated_records_are_valid(case: Case, validator: Validator) -> None:
    """The generated records conform to the profiles, so the properties mean something."""
    assert _errors(validator, case.g.record) == []


# -- the properties -----------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(case=cases())
def test_nothing_disallowed_is_ever_shared(
    case: Case, required: RequiredElements, validator: Validator
) -> None:
    policy = SHARING
    record = case.g.record
    before = copy.deepcopy(record)
    markers = case.g.markers
    consents = [
        e["resource"] for e in record["entry"] if e["resource"]["resourceType"] == "Consent"
    ]
    must_refuse = any(
        not exception_applies(c, case.recipient, case.purpose) for c in case.exceptions
    )
    disclosure: Disclosure | None = None
    refusal: SharingError | None = None
    try:
        disclosure = _run(case, required)
    except SharingError as exc:
        refusal = exc
    # g. the input record is never changed
    assert record == before

    # The filtering stage on its own, without the last guard in share(): no marker leaks.
    entries = record_entries(record)
    resources = {_ref_key(r): r for _, r in entries}
    try:
        decision = decide(
            consents, case.recipient, case.purpose, AT, policy,
            exceptions=case.exceptions, resources=resources,
        )  # fmt: skip
    except RecipientError:
        assert must_refuse
        assert disclosure is None
        event("refused: an exception does not apply")
        return
    assert not must_refuse, "an exception that does not apply was accepted"
    allowed = set(decision.allowed)

    # The decision is what the generated Consents and the named exceptions allow.
    expected = expected_allowed(consents, case.recipient, case.purpose, case.exceptions)
    assert allowed == set(expected), (
        f"allowed beyond the consents: {sorted(allowed - set(expected))}; "
        f"not allowed though consented: {sorted(set(expected) - allowed)}"
    )
    for cat, basis in decision.allowed.items():
        assert (basis.consent or basis.legal_basis) in expected[cat], (cat, basis)

    result = filter_record(label_resources(entries, policy), decision, policy, required)
    assert _leaks([r for _, r in result.shared], markers, allowed) == []
    for _, res in result.shared:
        assert _categories(res) <= allowed, (_ref_key(res), _categories(res) - allowed)
    assert record == before

    # a. refused, or nothing whose categories are not all allowed goes
    assert disclosure is not None, f"valid input refused: {refusal}"
    assert disclosure.decision.allowed == decision.allowed
    if disclosure.bundle is None:
        # nothing at all may go: then there is no AuditEvent either
        assert disclosure.audit_event is None
        assert disclosure.shared == []
        event("nothing may go")
        return
    bundle = disclosure.bundle
    assert _leaks(bundle, markers, allowed) == []
    withheld = sum(1 for m in markers if not markers[m] <= allowed)
    event("shared" + (", some markers withheld" if withheld else ""))

    # b. labels within what was allowed, and at least what the content is
    shared = [e["resource"] for e in bundle["entry"]]
    content = [r for r in shared if r["resourceType"] != "Provenance"]
    shared_categories: set[str] = set()
    for res in content:
        cats = _categories(res)
        assert cats, f"{_ref_key(res)} goes without a category label"
        assert cats <= allowed, (_ref_key(res), cats - allowed)
        shared_categories |= cats
        if _ref_key(res) in case.g.resources:
            assert case.g.resources[_ref_key(res)] <= cats, _ref_key(res)
    assert [r for r in shared if r["resourceType"] == "Provenance"] != []

    # c. no reference dangles
    urls = {e["fullUrl"] for e in bundle["entry"] if "fullUrl" in e}
    keys = {_ref_key(r) for r in shared}
    dangling = [
        ref
        for ref in _references(bundle)
        if not ref.startswith("#") and ref not in urls and ref not in keys
    ]
    assert dangling == []

    # d. one AuditEvent, valid, naming the basis of exactly the categories shared
    audit = disclosure.audit_event
    assert audit is not None and audit["resourceType"] == "AuditEvent"
    assert _errors(validator, audit) == []
    bases: dict[str, dict[str, Any]] = {}
    for ext in audit.get("extension", []):
        if ext["url"] != "https://cpa-fhir.org/fhir/StructureDefinition/disclosure-basis":
            continue
        parts = {p["url"]: p for p in ext["extension"]}
        cat = parts["category"]["valueCoding"]["code"]
        assert cat not in bases, f"basis of {cat} given twice"
        bases[cat] = parts
    assert set(bases) == shared_categories
    for cat, parts in bases.items():
        basis = decision.allowed[cat]
        if basis.consent is not None:
            assert parts["consent"]["valueReference"]["reference"] == basis.consent
            assert "legalBasis" not in parts
        else:
            coding = parts["legalBasis"]["valueCoding"]
            assert (coding["system"], coding["code"]) == (LEGAL_BASIS_SYSTEM, basis.legal_basis)
    what = disclosed_references(audit)
    assert sorted(what) == sorted(_ref_key(r) for r in content) == sorted(disclosure.shared)
    assert audit["purposeOfEvent"][0]["coding"][0]["code"] == case.purpose

    # e. what leaves conforms to the profiles
    assert _errors(validator, bundle) == []
    assert record == before


# -- f. evaluation errors never produce output ---------------------------------------


def _active_consent(
    g: Generated, provision: dict[str, Any] | None, period: dict[str, str]
) -> dict[str, Any]:
    template = next(
        e["resource"]
        for e in RECORDS[g.letter]["entry"]
        if e["resource"]["resourceType"] == "Consent"
    )
    spec = ConsentSpec("active", PERIODS[0], ())
    consent = _consent_resource(spec, template)
    consent["id"] = "gen-consent-defect"
    consent["provision"]["period"] = period
    if provision is not None:
        consent["provision"]["provision"] = [provision]
    return consent


DEFECTS = [
    "unknown-consent-category",
    "provision-without-type",
    "root-provision-without-type",
    "impossible-root-date",
    "impossible-nested-date",
    "unknown-resource-category",
    "flag-coding-not-a-list",
]


def _inject(draw: Callable[..., Any], g: Generated, defect: str) -> None:
    covering = {"start": "2026-06-18", "end": "2027-06-17"}
    label = {"system": CATEGORY_SYSTEM, "code": "care-plan"}
    consent: dict[str, Any] | None = None
    if defect == "unknown-consent-category":
        code = draw(st.sampled_from(["not-a-category", "Care-Plan", "", "substance use"]))
        kind = draw(st.sampled_from(["permit", "deny"]))
        consent = _active_consent(
            g,
            {"type": kind, "securityLabel": [{"system": CATEGORY_SYSTEM, "code": code}]},
            covering,
        )
    elif defect == "provision-without-type":
        consent = _active_consent(g, {"securityLabel": [label]}, covering)
    elif defect == "root-provision-without-type":
        consent = _active_consent(g, {"type": "permit", "securityLabel": [label]}, covering)
        del consent["provision"]["type"]
    elif defect == "impossible-root-date":
        bad = draw(st.sampled_from(["2026-02-30", "2026-13-01", "2026-11-31T10:00:00Z"]))
        consent = _active_consent(g, None, {"start": bad})
    elif defect == "impossible-nested-date":
        bad = draw(st.sampled_from(["2026-02-30", "2026-13-01", "2026-04-31"]))
        consent = _active_consent(
            g, {"type": "permit", "securityLabel": [label], "period": {"end": bad}}, covering
        )
    elif defect == "unknown-resource-category":
        target = draw(st.sampled_from([e["resource"] for e in g.entries]))
        target.setdefault("meta", {}).setdefault("security", []).append(
            {"system": CATEGORY_SYSTEM, "code": draw(st.sampled_from(["not-a-category", "Carer"]))}
        )
    elif defect == "flag-coding-not-a-list":
        target = draw(st.sampled_from(g.of_type("Flag")))
        coding = target["code"]["coding"]
        target["code"]["coding"] = draw(st.sampled_from([coding[0], "self-harm", 7]))
    if consent is not None:
        position = draw(st.integers(0, len(g.entries)))
        g.entries.insert(
            position, {"fullUrl": g.base + "Consent/gen-consent-defect", "resource": consent}
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), defect=st.sampled_from(DEFECTS), data=st.data())
def test_evaluation_errors_never_produce_output(
    case: Case,
    defect: str,
    data: st.DataObject,
    required: RequiredElements,
) -> None:
    case.exceptions = tuple(
        c for c in case.exceptions if exception_applies(c, case.recipient, case.purpose)
    )
    _inject(data.draw, case.g, defect)
    before = copy.deepcopy(case.g.record)
    with pytest.raises(SharingError):
        _run(case, required)
    assert case.g.record == before


def test_nested_provisions_validate(validator: Validator) -> None:
    """R4 nests provisions to any depth; below the profiled levels the base rules hold."""
    consent = copy.deepcopy(
        next(
            e["resource"]
            for e in RECORDS["C"]["entry"]
            if e["resource"]["resourceType"] == "Consent"
        )
    )
    label = {"system": CATEGORY_SYSTEM, "code": "substance-use"}
    deepest = {"type": "permit", "purpose": [{"system": PURPOSE_SYSTEM, "code": "TREAT"}]}
    consent["provision"]["provision"][0]["provision"] = [
        {"type": "deny", "securityLabel": [label], "provision": [deepest]}
    ]
    assert [i.line() for i in validator.validate(consent) if i.is_error] == []
    deepest["colour"] = "blue"  # still checked at depth 4
    errors = [i.line() for i in validator.validate(consent) if i.is_error]
    assert len(errors) == 1 and "provision[0].provision[0].provision[0].colour" in errors[0]


# -- examples, for orientation --------------------------------------------------------


@pytest.mark.parametrize("letter", sorted(RECORDS))
def test_the_example_records_go_to_their_gp(
    letter: str, policy: SharingPolicy, required: RequiredElements, validator: Validator
) -> None:
    """With their own Consents the example records share with the GP: the generators
    start from records the engine handles."""
    record = copy.deepcopy(RECORDS[letter])
    disclosure = share(
        record, ShareRequest("gp", "TREAT"), policy, at=AT, new_id=_ids(), required=required
    )
    assert record == RECORDS[letter]
    assert disclosure.bundle is not None and disclosure.audit_event is not None
    assert _errors(validator, disclosure.bundle) == []
    assert _errors(validator, disclosure.audit_event) == []
