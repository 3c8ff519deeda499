"""Record-level CPA rules, checked on a patient's whole record Bundle (pure).

Each rule spans resources, so no single-resource invariant can state it. The
rules and their sources in the CPA handbook are listed in `profiles/rules.md`;
rule ids there match the `rule` of each issue raised here. Time comes in as the
record's as-of date, never from the clock.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from cpa_fhir.fhir.models import bundle_entries, declared_profiles
from cpa_fhir.fhir.outcome import Issue

SNOMED = "http://snomed.info/sct"
CPA_PROGRAMME = "1092421000000100"
STANDARD = "1092211000000107"
ENHANCED = "1092221000000101"
CPA_REVIEW = "166121000000101"
REVIEW_MONTHS = {STANDARD: 12, ENHANCED: 6}
LEVEL_NAMES = {STANDARD: "Standard", ENHANCED: "Enhanced"}
FOLLOW_UP_DAYS = 7
HEALTH_AGENCIES = {"mental-health-trust", "health-board", "gp-practice"}
OPEN_TRANSFER = {"requested", "accepted", "in-progress"}
AWAITING_ACCEPTANCE = {"requested", "received", "ready"}
AFTER_ACCEPTANCE = {"accepted", "in-progress", "completed"}


@dataclass(frozen=True)
class Entry:
    index: int
    resource: dict[str, Any]

    @property
    def loc(self) -> str:
        return f"Bundle.entry[{self.index}].resource"


def _date(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def add_months(d: date, months: int) -> date:
    month = d.month - 1 + months
    year = d.year + month // 12
    month = month % 12 + 1
    return date(year, month, min(d.day, calendar.monthrange(year, month)[1]))


def _codings(concept: Any) -> Iterator[tuple[str | None, str | None]]:
    concepts = concept if isinstance(concept, list) else [concept]
    for c in concepts:
        if isinstance(c, dict):
            for coding in c.get("coding", []):
                if isinstance(coding, dict):
                    yield coding.get("system"), coding.get("code")


def _has_code(concept: Any, system: str, code: str) -> bool:
    return (system, code) in set(_codings(concept))


def _ext(resource: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in resource.get("extension", []) if isinstance(e, dict) and e.get("url") == url]


def _sub(ext: dict[str, Any], name: str) -> Any:
    for e in ext.get("extension", []):
        if isinstance(e, dict) and e.get("url") == name:
            for k, v in e.items():
                if k.startswith("value"):
                    return v
    return None


class Record:
    """Index of a record Bundle's entries by type and by reference."""

    def __init__(self, bundle: dict[str, Any], canonical: str):
        self.canonical = canonical
        self.entries: list[Entry] = []
        self._by_ref: dict[str, Entry] = {}
        for i, e in bundle_entries(bundle):
            if not isinstance(e.get("resource"), dict):
                continue
            entry = Entry(i, e["resource"])
            self.entries.append(entry)
            if isinstance(e.get("fullUrl"), str):
                self._by_ref[e["fullUrl"]] = entry
            rid = entry.resource.get("id")
            if rid:
                self._by_ref[f"{entry.resource.get('resourceType')}/{rid}"] = entry

    def of_type(self, rt: str) -> list[Entry]:
        return [e for e in self.entries if e.resource.get("resourceType") == rt]

    def resolve(self, reference: Any) -> Entry | None:
        ref = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(ref, str):
            return None
        if ref in self._by_ref:
            return self._by_ref[ref]
        tail = "/".join(ref.split("/")[-2:])
        return self._by_ref.get(tail)

    def url(self, kind: str, name: str) -> str:
        return f"{self.canonical}/{kind}/{name}"

    def levels(self, episode: dict[str, Any]) -> list[tuple[str | None, date | None, date | None]]:
        """CPA level periods of an episode as (SNOMED code, start, end), in start order."""
        out = []
        for ext in _ext(episode, self.url("StructureDefinition", "cpa-level")):
            level = _sub(ext, "level")
            code = next((c for s, c in _codings(level) if s == SNOMED and c in LEVEL_NAMES), None)
            period = _sub(ext, "period") or {}
            out.append((code, _date(period.get("start")), _date(period.get("end"))))
        return sorted(out, key=lambda lv: lv[1] or date.min)

    def cpa_episodes(self) -> list[Entry]:
        return [
            e
            for e in self.of_type("EpisodeOfCare")
            if _has_code(e.resource.get("type"), SNOMED, CPA_PROGRAMME)
        ]

    def agency_types(self, organization_ref: Any) -> set[str]:
        org = self.resolve(organization_ref)
        if org is None:
            return set()
        system = self.url("CodeSystem", "partner-agency-type")
        return {c for s, c in _codings(org.resource.get("type")) if s == system and c}


def _level_at(levels: list[tuple[str | None, date | None, date | None]], when: date) -> str | None:
    current = None
    for code, start, end in levels:
        if start is not None and start <= when and (end is None or when <= end):
            current = code
    return current


def check_record(bundle: dict[str, Any], as_of: date, canonical: str) -> list[Issue]:
    record = Record(bundle, canonical)
    issues: list[Issue] = []
    for rule in (_reviews, _follow_up, _discharge, _section117, _coordinator, _plans):
        try:
            issues.extend(rule(record, as_of))
        except (TypeError, AttributeError, KeyError, ValueError, OverflowError) as exc:
            # Fail closed: a rule that cannot read the record reports so.
            issues.append(
                Issue(
                    "error",
                    "processing",
                    f"Record rule could not be evaluated: {exc}",
                    "Bundle",
                    (rule.__doc__ or "").split(":", 1)[0],
                )
            )
    return issues


def _reviews(record: Record, as_of: date) -> Iterator[Issue]:
    """cpa-rec-review: reviews at least every 6 months on Enhanced, 12 on Standard (§50.1)."""
    review_encounters = [
        e
        for e in record.of_type("Encounter")
        if e.resource.get("status") == "finished"
        and _has_code(e.resource.get("type"), SNOMED, CPA_REVIEW)
    ]
    for episode in record.cpa_episodes():
        ep = episode.resource
        start = _date(ep.get("period", {}).get("start"))
        if start is None:
            continue
        reviews = sorted(
            d
            for e in review_encounters
            # A review filed under another episode does not count for this one.
            if not e.resource.get("episodeOfCare")
            or any(record.resolve(r) == episode for r in e.resource["episodeOfCare"])
            for d in [_date(e.resource.get("period", {}).get("start"))]
            if d is not None
        )
        end = _date(ep.get("period", {}).get("end")) if ep.get("status") == "finished" else None
        stop = min(end, as_of) if end else as_of
        levels = record.levels(ep)
        points = [start] + [d for d in reviews if start < d <= stop] + [stop]
        for a, b in zip(points, points[1:], strict=False):
            level = _level_at(levels, a)
            if level not in REVIEW_MONTHS:
                continue
            due = add_months(a, REVIEW_MONTHS[level])
            if b > due:
                what = "the as-of date" if b == stop and b not in reviews else f"the review on {b}"
                yield Issue(
                    "error",
                    "business-rule",
                    f"No CPA review between {a} and {what}: on {LEVEL_NAMES[level]} CPA a review is due "
                    f"within {REVIEW_MONTHS[level]} months (by {due})",
                    episode.loc,
                    "cpa-rec-review",
                )


def _class_code(encounter: dict[str, Any]) -> str | None:
    cls = encounter.get("class")
    return cls.get("code") if isinstance(cls, dict) else None


def _follow_up(record: Record, as_of: date) -> Iterator[Issue]:
    """cpa-rec-followup: face-to-face contact within 7 days of inpatient discharge (§31)."""
    encounters = record.of_type("Encounter")
    contacts = [
        d
        for e in encounters
        if _class_code(e.resource) in ("AMB", "HH") and e.resource.get("status") == "finished"
        for d in [_date(e.resource.get("period", {}).get("start"))]
        if d is not None
    ]
    for e in encounters:
        if _class_code(e.resource) != "IMP" or e.resource.get("status") != "finished":
            continue
        discharged = _date(e.resource.get("period", {}).get("end"))
        if discharged is None:
            continue
        if discharged > date.max - timedelta(days=FOLLOW_UP_DAYS):
            continue  # the follow-up is due after any date there is
        deadline = discharged + timedelta(days=FOLLOW_UP_DAYS)
        if as_of <= deadline:
            continue
        if not any(discharged <= d <= deadline for d in contacts):
            yield Issue(
                "error",
                "business-rule",
                f"No face-to-face contact (a finished AMB or HH encounter) within {FOLLOW_UP_DAYS} days "
                f"of discharge from inpatient care on {discharged} (by {deadline})",
                f"{e.loc}.period.end",
                "cpa-rec-followup",
            )


def _discharge(record: Record, as_of: date) -> Iterator[Issue]:
    """cpa-rec-discharge: never discharged straight from Enhanced (§19, §54.2)."""
    for episode in record.cpa_episodes():
        ep = episode.resource
        if ep.get("status") != "finished":
            continue
        end = _date(ep.get("period", {}).get("end"))
        levels = record.levels(ep)
        level = _level_at(levels, end) if end else (levels[-1][0] if levels else None)
        if level is None and levels:
            level = levels[-1][0]
        if level == ENHANCED:
            yield Issue(
                "error",
                "business-rule",
                "The CPA episode was discharged straight from Enhanced: step down to Standard first",
                f"{episode.loc}.status",
                "cpa-rec-discharge",
            )


def _section117(record: Record, as_of: date) -> Iterator[Issue]:
    """cpa-rec-s117: Section 117 discharge signed by health and by social care (§51, §56.9)."""
    url = record.url("StructureDefinition", "section117")
    for episode in record.cpa_episodes():
        for i, ext in enumerate(episode.resource.get("extension", [])):
            if not isinstance(ext, dict) or ext.get("url") != url:
                continue
            status = _sub(ext, "status")
            if not isinstance(status, dict) or status.get("code") != "discharged":
                continue
            loc = f"{episode.loc}.extension[{i}]"
            for name, wanted, label in (
                (
                    "healthSignOff",
                    HEALTH_AGENCIES,
                    "a health professional (trust, health board or GP)",
                ),
                ("socialCareSignOff", {"social-care"}, "local authority social care"),
            ):
                signer = record.resolve(_sub(ext, name))
                agencies = (
                    record.agency_types(signer.resource.get("organization"))
                    if signer and signer.resource.get("resourceType") == "PractitionerRole"
                    else set()
                )
                if not agencies & wanted:
                    yield Issue(
                        "error",
                        "business-rule",
                        f"Section 117 discharge must be signed off by {label}: {name} must be a "
                        "PractitionerRole in this record whose organisation is of that agency type",
                        loc,
                        "cpa-rec-s117",
                    )


def _same_person(record: Record, a: Any, b: Any) -> bool:
    """Whether two references name the same practitioner (PractitionerRole counts as its practitioner)."""

    def person(ref: Any) -> str | None:
        entry = record.resolve(ref)
        if entry is None:
            return ref.get("reference") if isinstance(ref, dict) else None
        res = entry.resource
        if res.get("resourceType") == "PractitionerRole":
            inner = record.resolve(res.get("practitioner"))
            if inner is not None:
                res = inner.resource
        return f"{res.get('resourceType')}/{res.get('id')}"

    return person(a) is not None and person(a) == person(b)


def _coordinator(record: Record, as_of: date) -> Iterator[Issue]:
    """cpa-rec-coordinator: one named coordinator, changed only on acceptance (§29.1, §30.1, §52.3)."""
    episodes = record.cpa_episodes()
    active = [e for e in episodes if e.resource.get("status") == "active"]
    if len(active) > 1:
        for e in active[1:]:
            yield Issue(
                "error",
                "business-rule",
                "More than one active CPA episode: a service user has one care coordinator at a time",
                f"{e.loc}.status",
                "cpa-rec-coordinator",
            )
    role_system = record.url("CodeSystem", "cpa-care-team-role")
    task_code = record.url("CodeSystem", "cpa-task-type")
    for episode in episodes:
        ep = episode.resource
        manager = ep.get("careManager")
        if manager is None:
            continue  # a missing coordinator is the profile's error (careManager 1..1)
        for team_ref in ep.get("team", []):
            team = record.resolve(team_ref)
            if team is None:
                continue
            for j, p in enumerate(team.resource.get("participant", [])):
                if not isinstance(p, dict) or not _has_code(
                    p.get("role"), role_system, "care-coordinator"
                ):
                    continue
                if not _same_person(record, p.get("member"), manager):
                    yield Issue(
                        "error",
                        "business-rule",
                        "The care team's care coordinator is not the episode's careManager: "
                        "there is one named coordinator",
                        f"{team.loc}.participant[{j}].member",
                        "cpa-rec-coordinator",
                    )
        tasks = [
            t
            for t in record.of_type("Task")
            if _has_code(t.resource.get("code"), task_code, "transfer-care-coordination")
            and record.resolve(t.resource.get("focus")) == episode
        ]
        open_tasks = [t for t in tasks if t.resource.get("status") in OPEN_TRANSFER]
        for t in open_tasks[1:]:
            yield Issue(
                "error",
                "business-rule",
                "More than one open transfer of care coordination for this episode",
                f"{t.loc}.status",
                "cpa-rec-coordinator",
            )
        accepted = sorted(
            (t for t in tasks if t.resource.get("status") in AFTER_ACCEPTANCE),
            key=lambda t: str(
                t.resource.get("executionPeriod", {}).get("start") or t.resource.get("authoredOn")
            ),
        )
        if accepted and not _same_person(record, manager, accepted[-1].resource.get("owner")):
            status = accepted[-1].resource.get("status")
            yield Issue(
                "error",
                "business-rule",
                f"The latest transfer is {status} but the episode's careManager is not the new "
                "coordinator (Task.owner)",
                f"{episode.loc}.careManager",
                "cpa-rec-coordinator",
            )
        for t in tasks:
            status = t.resource.get("status")
            if status in AWAITING_ACCEPTANCE and not _same_person(
                record, manager, t.resource.get("requester")
            ):
                yield Issue(
                    "error",
                    "business-rule",
                    f"The transfer is {status}, not yet accepted, so the coordinator must not change: "
                    "the episode's careManager must still be the current coordinator (Task.requester)",
                    f"{episode.loc}.careManager",
                    "cpa-rec-coordinator",
                )


def _plans(record: Record, as_of: date) -> Iterator[Issue]:
    """cpa-rec-plans: the care plan's crisis and contingency plans exist and point back (§5.3, §31)."""
    profile = record.url("StructureDefinition", "cpa-care-plan")
    for plan in record.of_type("CarePlan"):
        if profile not in declared_profiles(plan.resource):
            continue
        for name in ("crisis-plan", "contingency-plan"):
            for ext in _ext(plan.resource, record.url("StructureDefinition", name)):
                target = record.resolve(ext.get("valueReference"))
                if target is None or target.resource.get("resourceType") != "CarePlan":
                    yield Issue(
                        "error",
                        "business-rule",
                        f"The {name.replace('-', ' ')} is not a CarePlan in this record",
                        f"{plan.loc}.extension",
                        "cpa-rec-plans",
                    )
                    continue
                back = [record.resolve(r) for r in target.resource.get("partOf", [])]
                if plan not in back:
                    yield Issue(
                        "error",
                        "business-rule",
                        f"The {name.replace('-', ' ')} must be partOf the CPA care plan that names it",
                        f"{target.loc}.partOf",
                        "cpa-rec-plans",
                    )
