"""A partner's search, history and reverse chain filter every stored match, a page at
a time, not a first part of them: what is withheld changes neither its totals nor
which visible matches it is given, in either sort order. Its bound counts only what
it may see: past it the request is refused, never answered from a part, and the
refusal tells nothing of what is withheld. (Its own sandbox: the test adds
resources.)"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest

from cpa_fhir.sandbox import Sandbox
from tests.sandbox.conftest import Fhir, outcome, resource_keys
from tests.sandbox.test_consent_freshness import Changes, changes  # noqa: F401
from tests.sandbox.test_existence import _answer, _withheld_and_absent

VISIBLE_BOUND = "cpa_fhir.sandbox._access.MAX_PARTNER_VISIBLE"
PAGE = "cpa_fhir.sandbox._access.SCAN_PAGE"


def _total(client: Fhir, url: str, **params: str) -> int:
    r = client.get(url, params={"_count": "100", **params})
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


def _visible(client: Fhir) -> tuple[int, int, list[str], list[str]]:
    def page(sort: str) -> list[str]:
        r = client.get("Encounter", params={"_sort": sort, "_count": "3"})
        assert r.status_code == 200, r.text
        return sorted(resource_keys(r.json()))

    return (
        _total(client, "Encounter"),
        _total(client, "Encounter/_history"),
        page("date"),
        page("-date"),
    )


@pytest.fixture(scope="module")
def crowded(trust: Fhir) -> int:
    """A's encounters (never the GP's), many more than the GP may see, dated before
    and after all of its; how many stored encounters there are now."""
    withheld = trust.get("Encounter/a-review-2025-10").json()
    for field in ("id", "meta"):
        withheld.pop(field)
    stored = _total(trust, "Encounter")
    entries = []
    for i in range(3 * stored):
        encounter = copy.deepcopy(withheld)
        encounter["period"] = {"start": f"{1990 + i % 2 * 80}-01-01"}  # 1990 or 2070
        entries.append({"resource": encounter, "request": {"method": "POST", "url": "Encounter"}})
    r = trust.post("", {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert r.status_code == 200, r.text
    return _total(trust, "Encounter")


def test_withheld_matches_change_nothing_a_partner_is_given(
    as_client: Any, trust: Fhir, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp: Fhir = as_client("gp")
    before = _visible(gp)
    assert before[0] > 3  # more than a page of 3, so which page the sort gives matters
    assert gp.get("Encounter/a-review-2025-10").status_code == 404
    stored = request.getfixturevalue("crowded")
    assert stored > 3 * before[0]
    # Were only a first part of the stored matches filtered, the withheld would crowd
    # out the visible ones in one order or the other: read in pages of 7, all of them.
    monkeypatch.setattr(PAGE, 7)
    assert _visible(gp) == before


@pytest.mark.usefixtures("crowded")
def test_the_bound_counts_only_what_the_partner_may_see(
    as_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp: Fhir = as_client("gp")
    shown, versions = _total(gp, "Encounter"), _total(gp, "Encounter/_history")
    monkeypatch.setattr(PAGE, 5)
    monkeypatch.setattr(VISIBLE_BOUND, max(shown, versions))
    assert (_total(gp, "Encounter"), _total(gp, "Encounter/_history")) == (shown, versions)
    monkeypatch.setattr(VISIBLE_BOUND, shown - 1)
    for url in ("Encounter", "Encounter/_history"):
        issue = outcome(gp.get(url), 400)["issue"][0]
        assert issue["code"] == "too-costly", issue


@pytest.mark.usefixtures("crowded")
def test_a_withheld_record_answers_past_the_bound_as_no_record(
    as_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's many encounters are withheld from the GP: searched with the bound at one,
    they answer as the encounters of a patient that does not exist do."""
    gp: Fhir = as_client("gp")
    monkeypatch.setattr(VISIBLE_BOUND, 1)
    monkeypatch.setattr(PAGE, 5)
    of_a = gp.get("Encounter", params={"patient": "Patient/a-patient"})
    of_none = gp.get("Encounter", params={"patient": "Patient/no-such-patient"})
    assert of_a.status_code == of_none.status_code == 200
    assert of_a.json()["total"] == of_none.json()["total"] == 0


def test_a_withheld_resources_long_history_answers_as_an_absent_ones(
    sandbox: Sandbox,
    changes: Changes,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    call, rtype, hidden, absent = _withheld_and_absent(sandbox, "gp")
    changes.edit(f"{rtype}/{hidden}", lambda r: r.setdefault("meta", {}).pop("tag", None))
    monkeypatch.setattr(VISIBLE_BOUND, 1)
    monkeypatch.setattr(PAGE, 1)
    withheld = _answer(call("GET", f"{rtype}/{hidden}/_history"), hidden)
    missing = _answer(call("GET", f"{rtype}/{absent}/_history"), absent)
    assert withheld == missing


def test_a_reverse_chain_filters_every_source_and_bounds_what_is_shown(
    as_client: Any, trust: Fhir, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp: Fhir = as_client("gp")
    chained = {"_has:Encounter:patient:status": "finished"}
    found = gp.get("Patient", params=chained)
    assert found.status_code == 200 and "Patient/c-patient" in resource_keys(found.json())
    shown = _total(gp, "Encounter", patient="Patient/c-patient")
    monkeypatch.setattr(PAGE, 2)
    monkeypatch.setattr(VISIBLE_BOUND, shown)
    assert "Patient/c-patient" in resource_keys(gp.get("Patient", params=chained).json())
    monkeypatch.setattr(VISIBLE_BOUND, shown - 1)
    assert outcome(gp.get("Patient", params=chained), 400)["issue"][0]["code"] == "too-costly"


def test_a_partners_scan_follows_no_includes(
    as_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_partner_search` scans with `everything`, which keeps the query's `_include`s
    and `_revinclude`s: `run_search` follows them (unfiltered, up to MAX_INCLUDES,
    iterating) from every scan page of stored matches, withheld ones too, and throws
    the result away. Only the page given should be followed, by `_partner_included`."""
    import cpa_fhir.store._repository as repository

    gp: Fhir = as_client("gp")
    real = repository.include_rounds
    calls: list[list[str]] = []

    def spy(query: Any, matches: list[Any], *args: Any, **kw: Any) -> Any:
        if query.include or query.revinclude:
            calls.append([f"{m.resource_type}/{m.id}" for m in matches])
        return real(query, matches, *args, **kw)

    monkeypatch.setattr(repository, "include_rounds", spy)
    params = {"_include": "Encounter:subject", "_revinclude:iterate": "Observation:encounter"}
    r = gp.get("Encounter", params={**params, "_count": "1"})
    assert r.status_code == 200, r.text
    given = {
        f"Encounter/{e['resource']['id']}"
        for e in r.json()["entry"]
        if e["search"]["mode"] == "match"
    }
    followed = {key for sources in calls for key in sources}
    assert followed <= given, f"includes followed from {len(followed - given)} not given"


def test_a_scan_that_takes_too_long_is_refused(
    as_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gp: Fhir = as_client("gp")
    assert gp.get("Encounter").status_code == 200
    monkeypatch.setattr(PAGE, 1)
    monkeypatch.setattr("cpa_fhir.sandbox._access.PARTNER_SCAN_SECONDS", 0.0)
    issue = outcome(gp.get("Encounter"), 400)["issue"][0]
    assert issue["code"] == "too-costly" and "longer" in issue["details"]["text"]


def _between_pages(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, shown: set[str], act: Any
) -> list[str]:
    """Read the GP's scan a match at a time; once the first page holding a match it is
    shown has been read, `act(key)` on that match (once). The keys acted on."""
    monkeypatch.setattr(PAGE, 1)
    real_search = sandbox.repo.search
    done: list[str] = []

    def search(query: Any, **kw: Any) -> Any:
        result = real_search(query, **kw)
        if not done and query.resource_type == "Encounter" and result.matches:
            key = f"Encounter/{result.matches[0].id}"
            if key in shown:
                done.append(key)
                act(key)
        return result

    monkeypatch.setattr(sandbox.repo, "search", search)
    return done


def test_a_match_written_between_scan_pages_is_given_once(
    sandbox: Sandbox,
    as_client: Any,
    trust: Fhir,
    changes: Changes,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between two pages of the GP's scan the trust amends a match the GP was shown on
    the page before and stores a new encounter whose id sorts first: the match is
    given once, at one version, and counted once."""
    gp: Fhir = as_client("gp")
    shown = resource_keys(gp.get("Encounter", params={"_count": "100"}).json())
    assert len(shown) >= 2

    def amend_and_add(key: str) -> None:
        body = trust.get(key).json()
        changes.saved[key] = copy.deepcopy(body)
        body["language"] = "en-GB"
        sandbox.repo.update(body)
        first = copy.deepcopy(body)
        first.update(id="0000-between-pages")
        first.pop("meta", None)
        sandbox.repo.update(first)  # update as create, an id sorting first
        changes.created.append("Encounter/0000-between-pages")

    done = _between_pages(sandbox, monkeypatch, shown, amend_and_add)
    after = gp.get("Encounter", params={"_count": "100"})
    assert after.status_code == 200, after.text
    assert done
    entries = [f"Encounter/{e['resource']['id']}" for e in after.json()["entry"]]
    assert [k for k, n in Counter(entries).items() if n > 1] == []
    assert after.json()["total"] == len(set(entries))


def test_a_match_deleted_between_scan_pages_moves_no_other_out(
    sandbox: Sandbox,
    as_client: Any,
    changes: Changes,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pages follow the last id read, not a count of rows: a match deleted after its
    page was read does not move the next one onto the page already read."""
    gp: Fhir = as_client("gp")
    shown = resource_keys(gp.get("Encounter", params={"_count": "100"}).json())
    assert len(shown) >= 3
    deleted = _between_pages(sandbox, monkeypatch, shown, changes.delete)
    after = gp.get("Encounter", params={"_count": "100"})
    assert after.status_code == 200, after.text
    assert deleted
    assert resource_keys(after.json()) >= shown - set(deleted)
