"""`steady_span`: the span of time around a moment in which a decision cannot change.

For generated Consents whose periods (of the Consent and of nested provisions) start
and end at every granularity FHIR allows (year, year-month, date, dateTime with a
zone), and a moment `at`: within [start, end) `decide` gives what it gives at `at`
(Decision.at aside); start <= at < end; and the span stops exactly at a period's
boundary or at midnight where `at` is (a date is a day there), beyond which the
decision may differ. The boundaries
are worked out here from how each period was generated, not by the engine's parser.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.config import load_policy
from cpa_fhir.consent import CATEGORY_SYSTEM, Decision, Recipient, decide, steady_span
from cpa_fhir.errors import ConsentFormatError
from tests.common import POLICY

POLICY_ = load_policy(POLICY)
CATEGORIES = sorted(POLICY_.categories)
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PRIVACY = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
    ]
}
TREATMENT = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "treatment"}
    ]
}
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"
GP = Recipient("Organization/c-gp-practice", "gp-practice", frozenset({(ODS, "Y90303")}))
PROBATION = Recipient("Organization/c-probation", "probation")
# (recipient, purpose, legal bases invoked)
ASKING = [(GP, "TREAT", ()), (PROBATION, "THREAT", ("public-protection",))]
ACTORS = [
    {"reference": "Organization/c-gp-practice"},
    {"identifier": {"system": ODS, "value": "Y90303"}},
    {"reference": "Organization/c-probation"},
    {"reference": "Organization/c-social-care"},
]
ZONES = [
    UTC,
    timezone(timedelta(hours=1)),
    timezone(timedelta(hours=-5)),
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=14)),
    timezone(timedelta(hours=-10)),
]
# Moments near which the granularities matter: year and month ends, a day mid-month,
# the changes of UK summer time.
ANCHORS = [
    datetime(2026, 11, 1, 10, 0, tzinfo=UTC),
    datetime(2026, 12, 31, 23, 30, tzinfo=UTC),
    datetime(2027, 1, 1, 0, 10, tzinfo=UTC),
    datetime(2026, 6, 30, 23, 50, tzinfo=UTC),
    datetime(2026, 2, 28, 12, 0, tzinfo=UTC),
    datetime(2026, 3, 29, 0, 30, tzinfo=UTC),
    datetime(2026, 10, 25, 1, 0, tzinfo=UTC),
]
DAYS = 3 * 24 * 60  # edges fall within three days of the moment, in minutes
MICRO = timedelta(microseconds=1)


def _midnight(moment: datetime) -> datetime:
    """The start of `moment`'s day in its own zone: the day a denial's reason names."""
    day = moment.date()
    return datetime(day.year, day.month, day.day, tzinfo=moment.tzinfo)


def _month_after(year: int, month: int, zone: tzinfo) -> datetime:
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=zone)


@dataclass(frozen=True)
class Edge:
    """A period's start or end as FHIR text, and the instant it means for a
    disclosure (a date, month or year is one in the zone of the moment of disclosure,
    and ends where the next one begins)."""

    text: str
    instant: datetime


@st.composite
def edges(draw: st.DrawFn, near: datetime, end: bool) -> Edge:
    moment = near + timedelta(
        minutes=draw(st.integers(-DAYS, DAYS)), seconds=draw(st.integers(0, 59))
    )
    kind = draw(st.sampled_from(["year", "month", "date", "datetime", "datetime", "exact"]))
    days_zone = near.tzinfo or UTC
    day = moment.astimezone(days_zone)
    if kind == "year":
        start = datetime(day.year, 1, 1, tzinfo=days_zone)
        after = datetime(day.year + 1, 1, 1, tzinfo=days_zone)
        return Edge(f"{day.year:04d}", after if end else start)
    if kind == "month":
        start = datetime(day.year, day.month, 1, tzinfo=days_zone)
        instant = _month_after(day.year, day.month, days_zone) if end else start
        return Edge(f"{day.year:04d}-{day.month:02d}", instant)
    if kind == "date":
        start = _midnight(day)
        return Edge(day.date().isoformat(), start + timedelta(days=1) if end else start)
    zone = draw(st.sampled_from(ZONES))
    if kind == "exact":
        moment = near  # an edge right at the moment of disclosure
    if draw(st.booleans()):
        moment = moment.replace(microsecond=draw(st.integers(0, 999)) * 1000)
    else:
        moment = moment.replace(microsecond=0)
    local = moment.astimezone(zone)
    text = local.isoformat()
    if zone is UTC and draw(st.booleans()):
        text = text.replace("+00:00", "Z")
    return Edge(text, moment)


@st.composite
def periods(draw: st.DrawFn, near: datetime) -> tuple[dict[str, str], list[datetime]] | None:
    if draw(st.integers(0, 2)) == 0:
        return None
    period: dict[str, str] = {}
    instants: list[datetime] = []
    for name, is_end in (("start", False), ("end", True)):
        if draw(st.integers(0, 3)) > 0:
            edge = draw(edges(near, is_end))
            period[name] = edge.text
            instants.append(edge.instant)
    return period, instants


RECIPIENT_ROLE = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}
    ]
}


@st.composite
def provisions(
    draw: st.DrawFn, near: datetime, depth: int, boundaries: list[datetime]
) -> dict[str, Any]:
    node: dict[str, Any] = {"type": draw(st.sampled_from(["permit", "permit", "deny"]))}
    if draw(st.booleans()):
        node["actor"] = [{"role": RECIPIENT_ROLE, "reference": draw(st.sampled_from(ACTORS))}]
    if draw(st.integers(0, 2)) == 0:
        node["purpose"] = [
            {"system": PURPOSE_SYSTEM, "code": draw(st.sampled_from(["TREAT", "COC", "THREAT"]))}
        ]
    labels = draw(st.lists(st.sampled_from(CATEGORIES), max_size=3, unique=True))
    if labels:
        node["securityLabel"] = [{"system": CATEGORY_SYSTEM, "code": c} for c in labels]
    drawn = draw(periods(near))
    if drawn is not None:
        node["period"] = drawn[0]
        boundaries += drawn[1]
    if depth < 3 and draw(st.integers(0, 2)) == 0:
        node["provision"] = [
            draw(provisions(near, depth + 1, boundaries)) for _ in range(draw(st.integers(1, 2)))
        ]
    return node


@dataclass
class Case:
    consents: list[dict[str, Any]]
    at: datetime
    boundaries: list[datetime]  # every period start and end, as instants


@st.composite
def cases(draw: st.DrawFn, zones: list[timezone] | None = None) -> Case:
    anchor = draw(st.sampled_from(ANCHORS))
    at = anchor + timedelta(
        minutes=draw(st.integers(-DAYS, DAYS)), microseconds=draw(st.integers(0, 59_999_999))
    )
    if zones is not None:
        at = at.astimezone(draw(st.sampled_from(zones)))
    boundaries: list[datetime] = []
    consents = []
    for n in range(draw(st.integers(1, 3))):
        root: dict[str, Any] = {"type": "deny"}
        drawn = draw(periods(at))
        if drawn is not None:
            root["period"] = drawn[0]
            boundaries += drawn[1]
        root["provision"] = [
            draw(provisions(at, 1, boundaries)) for _ in range(draw(st.integers(0, 3)))
        ]
        consents.append(
            {
                "resourceType": "Consent",
                "id": f"consent-{n}",
                "status": draw(st.sampled_from(["active", "active", "active", "inactive"])),
                "scope": copy.deepcopy(draw(st.sampled_from([PRIVACY, PRIVACY, TREATMENT]))),
                "patient": {"reference": "Patient/p"},
                "provision": root,
            }
        )
    return Case(consents, at, boundaries)


def _decide(case: Case, at: datetime, asking: int) -> Decision:
    recipient, purpose, exceptions = ASKING[asking]
    return decide(
        case.consents, recipient, purpose, at, POLICY_, exceptions=exceptions, resources={}
    )


def _moments(start: datetime, end: datetime, fractions: list[float]) -> list[datetime]:
    width = end - start
    inside = [start, end - MICRO]
    inside += [start + min(width * f, width - MICRO) for f in fractions]
    return inside


def _check(case: Case, asking: int, fractions: list[float], *, same_zone: bool) -> None:
    start, end = steady_span(case.consents, case.at)
    assert start <= case.at < end, (start, case.at, end)
    midnight = _midnight(case.at)
    # The span is bounded by every boundary and by the day of `at` (in its zone), exactly.
    assert start == max([midnight, *(b for b in case.boundaries if b <= case.at)])
    assert end == min([midnight + timedelta(days=1), *(b for b in case.boundaries if b > case.at)])
    # So at `end` the next boundary or day begins, where the decision may change.
    assert end in case.boundaries or end == midnight + timedelta(days=1)
    expected = _decide(case, case.at, asking)
    for t in _moments(start, end, fractions):
        # A period's edge keeps its own zone: read each moment as the clock would.
        t = t.astimezone(case.at.tzinfo if same_zone else UTC)
        got = _decide(case, t, asking)
        assert got.allowed == expected.allowed, (t, case.at)
        assert got.denied == expected.denied, (t, case.at)


SPAN_SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@SPAN_SETTINGS
@given(
    case=cases(),
    asking=st.integers(0, len(ASKING) - 1),
    fractions=st.lists(st.floats(0, 1, exclude_max=True), max_size=4),
)
def test_the_decision_holds_throughout_the_span(
    case: Case, asking: int, fractions: list[float]
) -> None:
    """Moments in UTC, as the server's clock gives them."""
    _check(case, asking, fractions, same_zone=False)


@SPAN_SETTINGS
@given(
    case=cases(zones=ZONES[1:]),
    asking=st.integers(0, len(ASKING) - 1),
    fractions=st.lists(st.floats(0, 1, exclude_max=True), max_size=4),
)
def test_the_decision_holds_throughout_the_span_for_a_moment_in_any_zone(
    case: Case, asking: int, fractions: list[float]
) -> None:
    """`decide` takes any aware moment; the span must hold for the same clock's
    later readings, in the zone it reads in."""
    _check(case, asking, fractions, same_zone=True)


@settings(max_examples=200, deadline=None)
@given(case=cases(), asking=st.integers(0, len(ASKING) - 1))
def test_the_decision_may_change_at_the_end_of_the_span(case: Case, asking: int) -> None:
    """Where the span ends at a boundary that changes the decision, the span did
    not reach past it: the decision at `end` is never one the span claimed."""
    start, end = steady_span(case.consents, case.at)
    before = _decide(case, end - MICRO, asking)
    at_end = _decide(case, end, asking)
    changed = (before.allowed, before.denied) != (at_end.allowed, at_end.denied)
    if changed:
        assert end in case.boundaries or end == _midnight(case.at) + timedelta(days=1)


# -- examples ---------------------------------------------------------------------------


def _consent(root_period: Any = None, permit_period: Any = None) -> dict[str, Any]:
    permit: dict[str, Any] = {
        "type": "permit",
        "actor": [
            {"role": RECIPIENT_ROLE, "reference": {"reference": "Organization/c-gp-practice"}}
        ],
        "securityLabel": [{"system": CATEGORY_SYSTEM, "code": "care-plan"}],
    }
    if permit_period is not None:
        permit["period"] = permit_period
    root: dict[str, Any] = {"type": "deny", "provision": [permit]}
    if root_period is not None:
        root["period"] = root_period
    return {
        "resourceType": "Consent",
        "id": "c",
        "status": "active",
        "scope": PRIVACY,
        "provision": root,
    }


AT = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("root", "permit", "span"),
    [
        (None, None, (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC))),
        (
            {"start": "2026-06-18", "end": "2027-06-17"},
            None,
            (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
        ),
        (
            None,
            {"start": "2026-11-01T09:30:00+01:00", "end": "2026-11-01T12:00:00+01:00"},
            (datetime(2026, 11, 1, 8, 30, tzinfo=UTC), datetime(2026, 11, 1, 11, 0, tzinfo=UTC)),
        ),
        (
            {"end": "2026-11-01T10:00:00Z"},  # ended just now: the span starts here
            None,
            (AT, datetime(2026, 11, 2, tzinfo=UTC)),
        ),
        (
            {"start": "2026"},
            {"end": "2026-11"},
            (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
        ),
    ],
)
def test_examples_of_spans(root: Any, permit: Any, span: tuple[datetime, datetime]) -> None:
    assert steady_span([_consent(root, permit)], AT) == span


@pytest.mark.parametrize(
    "period",
    [
        "2026-11-01",
        ["2026-11-01"],
        {"start": "2026-13"},
        {"end": "01/11/2026"},
        {"start": "2026-11-01T10:00:00"},  # a time without a zone
        {"start": 2026},
    ],
)
def test_an_unreadable_period_gives_an_empty_span(period: Any) -> None:
    for root, permit in ((period, None), (None, period)):
        assert steady_span([_consent(root, permit)], AT) == (AT, AT)
        with pytest.raises(ConsentFormatError):
            decide([_consent(root, permit)], GP, "TREAT", AT, POLICY_)


def test_no_consents_hold_for_the_utc_day() -> None:
    at = datetime(2026, 11, 1, 23, 59, 59, 999999, tzinfo=UTC)
    assert steady_span([], at) == (datetime(2026, 11, 1, tzinfo=UTC), at + MICRO)


@pytest.mark.parametrize("end", ["9999-12-31", "9999-12", "9999", "9999-12-31T23:59:59Z"])
def test_a_consent_until_the_end_of_9999_holds_to_then(end: str) -> None:
    """The end of 9999's last day, month or year is past every instant there is: the
    consent holds, where working out the day after it once failed."""
    consent = _consent(permit_period={"start": "2026-01-01", "end": end})
    assert "care-plan" in decide([consent], GP, "TREAT", AT, POLICY_).allowed
    start, stop = steady_span([consent], AT)
    assert start <= AT < stop
    last_day = datetime(9999, 12, 31, 12, 0, tzinfo=UTC)
    assert "care-plan" in decide([consent], GP, "TREAT", last_day, POLICY_).allowed
    assert steady_span([consent], last_day)[0] <= last_day < steady_span([consent], last_day)[1]
