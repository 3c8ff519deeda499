"""Table-driven: for each example patient, each recipient type, each state of consent and
each legal exception, exactly which categories may go, on what basis, and what is withheld."""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from cpa_fhir.consent import (
    CATEGORY_SYSTEM,
    Recipient,
    RequiredElements,
    ShareRequest,
    SharingPolicy,
    recipient_from,
    share,
)
from cpa_fhir.errors import RecipientError
from tests.common import EXAMPLES

AT = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
ACTREASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"

RECORDS = {
    letter: orjson.loads(next(EXAMPLES.glob(f"Bundle-record-{letter}-*.json")).read_bytes())
    for letter in "ABCD"
}

# The categories each example record holds (read from the records: every record has a
# patient, a care plan, a crisis plan, a risk to self, a carer and a consent; C adds
# children's services, probation, risk to others and child care).
COMMON = {"administrative", "care-plan", "carer", "crisis", "personal", "risk-to-self"}
PRESENT = {
    "A": COMMON,
    "B": COMMON,
    "C": COMMON | {"child-care", "offending", "risk-to-others", "safeguarding-children"},
    "D": COMMON,
}
# Categories some resource of the record carries on its own, so they must go when allowed.
STANDALONE = {
    "A": COMMON - {"personal"},
    "B": COMMON - {"personal"},
    "C": (COMMON - {"personal"}) | {"safeguarding-children"},
    "D": COMMON - {"personal"},
}
# (Not C's risk to others: its flag's required source is a probation report, which is
# offending information, and the other content naming it names other matters too.)

# Recipient kind -> (partner agency type, purpose of use asked for).
RECIPIENTS = {
    "gp": ("gp-practice", "TREAT"),
    "social-care": ("social-care", "PATSFTY"),
    "probation": ("probation", "THREAT"),
    "children-services": ("children-services", "THREAT"),
    "carer": ("carer", "FAMRQT"),
}

# What each legal exception covers, and for whom (CPA.md, handbook §36.1, §37.7).
EXCEPTIONS = {
    "public-protection": ({"probation"}, {"administrative", "risk-to-others", "offending"}),
    "child-protection": (
        {"children-services"},
        {"administrative", "safeguarding-children", "child-care"},
    ),
    "adult-protection": ({"social-care"}, {"administrative", "safeguarding-adults", "abuse"}),
    "carers-need-to-know": ({"carer"}, {"administrative", "crisis", "risk-to-others"}),
}

GIVEN = {"administrative", "care-plan", "crisis", "risk-to-self"}
# A permit that names no category covers every normal and restricted category, never the
# very restricted ones (rule 7: sensitive matters must be named).
UNNAMED = {
    "administrative", "demographics", "crisis", "care-plan", "medication", "diagnosis",
    "risk-to-self", "risk-to-others", "carer",
}  # fmt: skip


def _labels(codes: set[str]) -> list[dict[str, str]]:
    return [{"system": CATEGORY_SYSTEM, "code": c} for c in sorted(codes)]


def _provision(
    kind: str, actor: str | None, purpose: str | None, codes: set[str] | None
) -> dict[str, Any]:
    p: dict[str, Any] = {"type": kind}
    if actor:
        p["actor"] = [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP",
                        }
                    ]
                },
                "reference": {"reference": actor},
            }
        ]
    if purpose:
        p["purpose"] = [{"system": ACTREASON, "code": purpose}]
    if codes is not None:
        p["securityLabel"] = _labels(codes)
    return p


# Consent states: (status, period of the base provision, nested provisions(actor, purpose),
# categories expected to be allowed by consent).
def _variants(
    actor: str, purpose: str
) -> dict[str, tuple[str, dict[str, str], list[Any], set[str]]]:
    year = {"start": "2026-06-01", "end": "2027-05-31"}
    given = [_provision("permit", actor, purpose, GIVEN)]
    return {
        "given": ("active", year, given, GIVEN),
        "given-without-categories": (
            "active",
            year,
            [_provision("permit", actor, purpose, None)],
            UNNAMED,
        ),
        "partly-given": (
            "active",
            year,
            [
                _provision("permit", actor, purpose, GIVEN | {"carer"}),
                _provision("deny", None, None, {"crisis", "carer"}),
            ],
            {"administrative", "care-plan", "risk-to-self"},
        ),
        "refused": ("active", year, [], set()),
        "withdrawn": ("inactive", year, given, set()),
        "draft": ("draft", year, given, set()),
        "rejected": ("rejected", year, given, set()),
        "expired": ("active", {"start": "2025-06-01", "end": "2026-10-31"}, given, set()),
        "for-someone-else": (
            "active",
            year,
            [_provision("permit", "Organization/someone-else", purpose, GIVEN)],
            set(),
        ),
        "for-another-purpose": (
            "active",
            year,
            # LEGAL falls within none of the purposes asked for, nor they within it.
            [_provision("permit", actor, "LEGAL", GIVEN)],
            set(),
        ),
    }


def _recipient(record: dict[str, Any], kind: str) -> Recipient:
    partner_type, _ = RECIPIENTS[kind]
    for e in record["entry"]:
        r = e["resource"]
        if kind == "carer" and r["resourceType"] == "RelatedPerson":
            return recipient_from(r)
        types = (
            {c.get("code") for t in r.get("type", []) for c in t.get("coding", [])}
            if r["resourceType"] == "Organization"
            else set()
        )
        if partner_type in types:
            return recipient_from(r)
    # The record does not involve this agency: it asks anyway.
    return Recipient(f"Organization/x-{kind}", partner_type)


def _with_consent(
    record: dict[str, Any], status: str, period: dict[str, str], provisions: list[Any]
) -> dict[str, Any]:
    out = copy.deepcopy(record)
    for e in out["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Consent":
            r["status"] = status
            r["provision"] = {"type": "deny", "period": period}
            if provisions:
                r["provision"]["provision"] = provisions
    return out


CASES = [
    (letter, kind, variant, exception)
    for letter, kind, variant in itertools.product("ABCD", RECIPIENTS, _variants("X", "TREAT"))
    for exception in [None, *EXCEPTIONS]
]


def _categories(resource: dict[str, Any]) -> set[str]:
    return {
        c["code"]
        for c in resource.get("meta", {}).get("security", [])
        if c["system"] == CATEGORY_SYSTEM
    }


@pytest.mark.parametrize(
    ("letter", "kind", "variant", "exception"),
    CASES,
    ids=[f"{a}-{b}-{c}-{d or 'no-exception'}" for a, b, c, d in CASES],
)
def test_exact_categories(
    letter: str,
    kind: str,
    variant: str,
    exception: str | None,
    policy: SharingPolicy,
    required: RequiredElements,
) -> None:
    record = RECORDS[letter]
    recipient = _recipient(record, kind)
    purpose = RECIPIENTS[kind][1]
    status, period, provisions, by_consent = _variants(recipient.reference, purpose)[variant]
    record = _with_consent(record, status, period, provisions)
    request = ShareRequest(recipient, purpose, (exception,) if exception else ())
    ids = itertools.count()

    def run() -> Any:
        return share(
            record, request, policy, at=AT, new_id=lambda: f"id-{next(ids)}", required=required
        )

    if exception and kind not in EXCEPTIONS[exception][0]:
        # A legal basis that does not hold for this recipient shares nothing.
        with pytest.raises(RecipientError):
            run()
        return
    by_law = EXCEPTIONS[exception][1] - by_consent if exception else set()
    allowed = by_consent | by_law

    disclosure = run()

    assert set(disclosure.decision.allowed) == allowed
    for cat, basis in disclosure.decision.allowed.items():
        if cat in by_consent:
            assert basis.consent is not None and basis.legal_basis is None
        else:
            assert basis.legal_basis == exception and basis.consent is None

    present = PRESENT[letter]
    withheld = {c for w in disclosure.withheld for c in w.categories}
    assert withheld == present - allowed
    if disclosure.bundle is None:
        assert not allowed & STANDALONE[letter]
        assert disclosure.audit_event is None
        return
    shared = set().union(
        *(
            _categories(e["resource"])
            for e in disclosure.bundle["entry"]
            if e["resource"]["resourceType"] != "Provenance"
        )
    )
    assert allowed & STANDALONE[letter] <= shared <= allowed & present
    # The audit names a basis for exactly what went.
    basis_categories = {
        part["valueCoding"]["code"]
        for ext in disclosure.audit_event["extension"]
        for part in ext["extension"]
        if part["url"] == "category"
    }
    assert basis_categories == shared


# The examples' own consents, as recorded with each service user.
OWN = [
    ("A", "gp", "TREAT", (), {"administrative", "care-plan", "crisis", "medication"}),
    ("A", "carer:a-carer-mother", "FAMRQT", (), {"administrative", "crisis"}),
    ("A", "carer:a-carer-mother", "TREAT", (), set()),
    ("B", "gp", "COC", (), {"administrative", "care-plan", "medication"}),
    ("B", "voluntary-provider", "COC", (), {"administrative", "care-plan", "crisis"}),
    ("C", "gp", "TREAT", (), {"administrative", "care-plan", "crisis", "medication"}),
    ("C", "social-care", "CAREMGT", (), {"administrative", "care-plan"}),
    ("C", "probation", "THREAT", (), set()),
    (
        "C",
        "probation",
        "THREAT",
        ("public-protection",),
        {"administrative", "risk-to-others", "offending"},
    ),
    (
        "C",
        "children-services",
        "THREAT",
        ("child-protection",),
        {"administrative", "safeguarding-children", "child-care"},
    ),
    (
        "C",
        "carer:c-carer-son",
        "FAMRQT",
        ("carers-need-to-know",),
        {"administrative", "crisis", "risk-to-others"},
    ),
    ("D", "private-provider", "TREAT", (), {"administrative", "care-plan", "crisis", "medication"}),
    ("D", "social-care", "CAREMGT", (), {"administrative", "care-plan", "crisis", "medication"}),
    ("D", "health-board", "TREAT", (), set()),
]


@pytest.mark.parametrize(("letter", "to", "purpose", "exceptions", "allowed"), OWN)
def test_examples_own_consents(
    letter: str,
    to: str,
    purpose: str,
    exceptions: tuple[str, ...],
    allowed: set[str],
    policy: SharingPolicy,
    required: RequiredElements,
) -> None:
    disclosure = share(
        RECORDS[letter],
        ShareRequest(to, purpose, exceptions),
        policy,
        at=AT,
        new_id=lambda: "x",
        required=required,
    )
    assert set(disclosure.decision.allowed) == allowed


def test_consent_ends_with_its_period(policy: SharingPolicy, required: RequiredElements) -> None:
    """C's consent runs to 2027-06-17 inclusive, a day in the policy's time zone
    (Europe/London): the next day there, from 23:00 UTC in summer, the GP gets nothing."""
    london = ZoneInfo("Europe/London")
    on_last_day = datetime(2027, 6, 17, 23, 59, tzinfo=london)
    day_after = datetime(2027, 6, 17, 23, 0, tzinfo=UTC)
    assert day_after == datetime(2027, 6, 18, 0, 0, tzinfo=london)
    last = share(
        RECORDS["C"],
        ShareRequest("gp", "TREAT"),
        policy,
        at=on_last_day,
        new_id=lambda: "x",
        required=required,
    )
    after = share(
        RECORDS["C"],
        ShareRequest("gp", "TREAT"),
        policy,
        at=day_after,
        new_id=lambda: "x",
        required=required,
    )
    assert "care-plan" in last.decision.allowed
    assert after.decision.allowed == {}
    assert after.bundle is None and after.audit_event is None
    assert "expired" in after.decision.denied["care-plan"]


def test_deny_beats_permit_across_consents(
    policy: SharingPolicy, required: RequiredElements
) -> None:
    """A later Consent that refuses crisis information wins over an earlier permit."""
    record = copy.deepcopy(RECORDS["A"])
    consent = next(
        e["resource"] for e in record["entry"] if e["resource"]["resourceType"] == "Consent"
    )
    refusal = copy.deepcopy(consent)
    refusal["id"] = "a-consent-refusal"
    refusal["provision"]["provision"] = [
        _provision("deny", "Organization/a-gp-practice", None, {"crisis"})
    ]
    record["entry"].append(
        {"fullUrl": "https://example.org/fhir/Consent/a-consent-refusal", "resource": refusal}
    )
    disclosure = share(
        record, ShareRequest("gp", "TREAT"), policy, at=AT, new_id=lambda: "x", required=required
    )
    assert set(disclosure.decision.allowed) == {"administrative", "care-plan", "medication"}
    assert disclosure.decision.denied["crisis"] == "refused in Consent/a-consent-refusal"
    assert "CarePlan/a-crisis-plan" not in disclosure.shared
