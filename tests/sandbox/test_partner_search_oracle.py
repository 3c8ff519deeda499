"""A partner's search answers as a search of a store that holds only what the partner
is shown would answer it.

The oracle: every resource of the seeded sandbox that the partner can read, in the
form it reads it, loaded into a store of its own, searched by its own queries. For
generated criteria (tokens with and without system, `:not`, `:missing`; references;
string prefixes, `:exact`, `:contains`; dates with prefixes; labels; one-link
chains, to organisations as the partner is shown them by an include), the
partner's matches and total over HTTP must be the oracle's: nothing
found by what was withheld from it, nothing missed for what it is shown, no count
that tells of either.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpa_fhir.store import SqlRepository, default_search_parameters, index_resource
from tests.sandbox.conftest import Fhir, resource_keys

PARTNERS = ["gp", "carer", "probation"]
TYPES = [
    "Patient", "CarePlan", "CareTeam", "EpisodeOfCare", "Encounter", "Flag", "Condition",
    "Goal", "RelatedPerson", "Task", "Organization",
]  # fmt: skip
REGISTRY = default_search_parameters()
Criterion = tuple[str, str]


def _day(micros: int) -> str | None:
    """The UTC day of an instant; None for an open end (out of the calendar's range)."""
    try:
        return datetime.fromtimestamp(micros / 1e6, UTC).date().isoformat()
    except (ValueError, OverflowError, OSError):
        return None


def _criteria(resource: dict[str, Any]) -> set[Criterion]:
    """Criteria that the resource's own values match, and near misses of them."""
    rtype = resource["resourceType"]
    rows = index_resource(resource, REGISTRY.indexed(rtype))
    out: set[Criterion] = set()
    for code, system, value in rows.tokens:
        if code.startswith("_") and code not in ("_security", "_tag"):
            continue
        out |= {(code, f"{system}|{value}" if system else value), (f"{code}:not", value)}
        out |= {(f"{code}:missing", "true"), (f"{code}:missing", "false")}
    for code, target_type, target_id, _ in rows.references:
        if target_type and target_id:
            out |= {(code, f"{target_type}/{target_id}"), (f"{code}:missing", "true")}
    for code, text, normalised in rows.strings:
        out |= {(code, text[:3]), (f"{code}:exact", text), (f"{code}:contains", normalised[1:4])}
    for code, low, high in rows.dates:
        if (first := _day(low)) is not None:
            out |= {(code, f"{prefix}{first}") for prefix in ("eq", "ge", "lt", "ne", "sa")}
        if (last := _day(high - 1)) is not None:
            out.add((code, f"le{last}"))
    return out


@pytest.fixture(scope="module")
def stored(trust: Fhir) -> dict[str, dict[str, Any]]:
    """Everything of the seeded types, as the trust reads it."""
    out = {}
    for rtype in TYPES:
        body = trust.get(rtype, params={"_count": "1000"}).json()
        for entry in body.get("entry", []):
            resource = entry["resource"]
            out[f"{rtype}/{resource['id']}"] = resource
    return out


class Candidates(list[tuple[str, Criterion]]):
    """(type, criterion) pairs, said briefly when a failing example is reported."""

    def __repr__(self) -> str:
        return f"<{len(self)} candidate criteria>"


@pytest.fixture(scope="module")
def candidates(stored: dict[str, dict[str, Any]]) -> Candidates:
    found: set[tuple[str, Criterion]] = set()
    for key, resource in stored.items():
        rtype = key.split("/")[0]
        found |= {(rtype, c) for c in _criteria(resource)}
        # One-link chains: a reference parameter followed to what it points at.
        for code, target_type, target_id, _ in index_resource(
            resource, REGISTRY.indexed(rtype)
        ).references:
            target = stored.get(f"{target_type}/{target_id}")
            if target is not None:
                for name, value in sorted(_criteria(target))[:12]:
                    if not name.startswith("_"):
                        found.add((rtype, (f"{code}:{target_type}.{name}", value)))
    return Candidates(sorted(found))


@pytest.fixture(scope="module", params=PARTNERS)
def partner_and_oracle(
    request: pytest.FixtureRequest,
    as_client: Any,
    stored: dict[str, dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Fhir, SqlRepository, set[str]]]:
    partner: Fhir = as_client(request.param)
    shown = []
    for key in stored:
        response = partner.get(key)
        if response.status_code == 200:
            shown.append(response.json())
    # And the organisations it is shown as an include sends them, through what it reads.
    included: dict[str, dict[str, Any]] = {}
    for resource in list(shown):
        rtype = resource["resourceType"]
        for param in REGISTRY.indexed(rtype):
            if param.type == "reference" and "Organization" in param.targets:
                bundle = partner.get(
                    rtype, params={"_id": resource["id"], "_include": f"{rtype}:{param.code}"}
                ).json()
                for entry in bundle.get("entry", []):
                    if entry["search"]["mode"] == "include":
                        found = entry["resource"]
                        included[f"{found['resourceType']}/{found['id']}"] = found
    known = {f"{r['resourceType']}/{r['id']}" for r in shown}
    shown += [r for key, r in included.items() if key not in known and key in stored]
    assert shown, f"{request.param} is shown nothing"
    path: Path = tmp_path_factory.mktemp("oracle") / "shown.db"
    oracle = SqlRepository(f"sqlite:///{path}")
    oracle.load(shown)
    yield partner, oracle, known  # and what it can read directly
    oracle.close()


@settings(
    max_examples=60,
    deadline=None,
    # The candidates come from the store each backend's sandbox holds: an example
    # saved under one is not replayed under another.
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(first=st.integers(min_value=0), second=st.none() | st.integers(min_value=0))
def test_a_partner_is_answered_as_a_store_of_what_it_is_shown_would_answer(
    partner_and_oracle: tuple[Fhir, SqlRepository, set[str]],
    candidates: Candidates,
    first: int,
    second: int | None,
) -> None:
    """`first` picks a criterion; `second`, if any, another of the same type."""
    partner, oracle, readable = partner_and_oracle
    rtype, criterion = candidates[first % len(candidates)]
    params = [criterion]
    if second is not None:
        same_type = [c for t, c in candidates if t == rtype]
        params.append(same_type[second % len(same_type)])
    response = partner.get(rtype, params=[*params, ("_count", "1000")])
    if response.status_code == 403:  # a type, or a chain's, outside its scopes
        return
    assert response.status_code == 200, (params, response.text)
    body = response.json()
    expected = oracle.search(oracle.parse(rtype, [*params, ("_count", "1000")]))
    matches = {f"{s.resource_type}/{s.id}" for s in expected.matches}
    if rtype == "Organization":  # searched for, one is found as a read finds it
        matches &= readable
    assert resource_keys(body) == matches, params
    assert body["total"] == len(matches), params
