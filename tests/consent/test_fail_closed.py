"""Any error shares nothing and says why; and the policy data is checked before use."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from cpa_fhir.consent import RequiredElements, ShareRequest, SharingPolicy, parse_policy, share
from cpa_fhir.errors import (
    ConsentFormatError,
    LabellingError,
    PolicyError,
    RecipientError,
    SharingError,
)
from tests.common import EXAMPLES, POLICY, PROFILES

AT = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
RECORD_C = orjson.loads(next(EXAMPLES.glob("Bundle-record-C-*.json")).read_bytes())
Json = dict[str, Any]


def _find(record: Json, rtype: str, rid: str | None = None) -> Json:
    return next(
        e["resource"]
        for e in record["entry"]
        if e["resource"]["resourceType"] == rtype and (rid is None or e["resource"]["id"] == rid)
    )


def _unknown_category_in_consent(r: Json) -> None:
    _find(r, "Consent")["provision"]["provision"][0]["securityLabel"][0]["code"] = "gossip"


def _provision_without_type(r: Json) -> None:
    del _find(r, "Consent")["provision"]["provision"][0]["type"]


def _impossible_period(r: Json) -> None:
    _find(r, "Consent")["provision"]["period"]["end"] = "2027-02-30"


def _base_permit(r: Json) -> None:
    _find(r, "Consent")["provision"]["type"] = "permit"


def _label_system_unknown(r: Json) -> None:
    _find(r, "Consent")["provision"]["provision"][0]["securityLabel"][0]["system"] = "urn:x"


def _provision_about_data(r: Json) -> None:
    _find(r, "Consent")["provision"]["provision"][0]["data"] = [
        {"meaning": "instance", "reference": {"reference": "CarePlan/c-careplan"}}
    ]


def _consent_without_status(r: Json) -> None:
    del _find(r, "Consent")["status"]


def _consent_for_another_patient(r: Json) -> None:
    _find(r, "Consent")["patient"] = {"reference": "Patient/someone-else"}


def _unknown_category_on_resource(r: Json) -> None:
    _find(r, "CarePlan", "c-careplan")["meta"]["security"] = [
        {
            "system": "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category",
            "code": "gossip",
        }
    ]


def _rule_cannot_evaluate(r: Json) -> None:
    _find(r, "Flag", "c-risk-self-harm")["code"]["coding"] = "self-harm"


def _no_patient(r: Json) -> None:
    r["entry"] = [e for e in r["entry"] if e["resource"]["resourceType"] != "Patient"]


def _entry_without_resource(r: Json) -> None:
    r["entry"].append({"fullUrl": "urn:uuid:x"})


def _duplicate_entry(r: Json) -> None:
    r["entry"].append(copy.deepcopy(r["entry"][3]))


DEFECTS: list[tuple[str, Callable[[Json], None], type[SharingError], str]] = [
    ("unknown category in consent", _unknown_category_in_consent, ConsentFormatError, "gossip"),
    ("provision without type", _provision_without_type, ConsentFormatError, "permit or deny"),
    ("impossible date", _impossible_period, ConsentFormatError, "2027-02-30"),
    ("base provision permits", _base_permit, ConsentFormatError, "base provision must deny"),
    ("label from unknown system", _label_system_unknown, ConsentFormatError, "urn:x"),
    ("provision about single resources", _provision_about_data, ConsentFormatError, "data"),
    ("consent without status", _consent_without_status, ConsentFormatError, "no status"),
    ("consent about someone else", _consent_for_another_patient, SharingError, "not about"),
    ("unknown category on content", _unknown_category_on_resource, LabellingError, "gossip"),
    ("rule cannot be evaluated", _rule_cannot_evaluate, LabellingError, "cannot be evaluated"),
    ("record without a patient", _no_patient, SharingError, "exactly one Patient"),
    ("entry without resource", _entry_without_resource, SharingError, "no resource"),
    ("resource twice", _duplicate_entry, SharingError, "twice"),
]


@pytest.mark.parametrize(("name", "defect", "error", "says"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_defects_share_nothing(
    name: str,
    defect: Callable[[Json], None],
    error: type[SharingError],
    says: str,
    policy: SharingPolicy,
    required: RequiredElements,
) -> None:
    record = copy.deepcopy(RECORD_C)
    defect(record)
    with pytest.raises(error, match=None) as caught:
        share(
            record,
            ShareRequest("gp", "TREAT"),
            policy,
            at=AT,
            new_id=lambda: "x",
            required=required,
        )
    assert says in caught.value.message


REQUEST_DEFECTS = [
    (ShareRequest("pharmacy", "TREAT"), "unknown recipient 'pharmacy'"),
    (ShareRequest("carer:nobody", "FAMRQT"), "no RelatedPerson 'nobody'"),
    (ShareRequest("carer", "FAMRQT"), "name the carer"),
    (ShareRequest("gp:c-probation", "TREAT"), "no gp-practice Organization 'c-probation'"),
    (ShareRequest("gp", "GOSSIP"), "unknown purpose of use 'GOSSIP'"),
    (ShareRequest("gp", "TREAT", ("public-protection",)), "does not apply to a gp-practice"),
    (ShareRequest("probation", "TREAT", ("public-protection",)), "does not apply to purpose TREAT"),
    (ShareRequest("probation", "THREAT", ("because-i-said-so",)), "unknown legal basis"),
]


@pytest.mark.parametrize(("request_", "says"), REQUEST_DEFECTS, ids=[r[1] for r in REQUEST_DEFECTS])
def test_bad_requests_share_nothing(
    request_: ShareRequest, says: str, policy: SharingPolicy, required: RequiredElements
) -> None:
    with pytest.raises(RecipientError) as caught:
        share(RECORD_C, request_, policy, at=AT, new_id=lambda: "x", required=required)
    assert says in caught.value.message


def test_naive_time_is_refused(policy: SharingPolicy, required: RequiredElements) -> None:
    with pytest.raises(SharingError, match="time zone"):
        share(
            RECORD_C,
            ShareRequest("gp", "TREAT"),
            policy,
            at=datetime(2026, 11, 1),
            new_id=lambda: "x",
            required=required,
        )


# -- the policy data ----------------------------------------------------------------


def _policy_data() -> Json:
    return tomllib.loads(POLICY.read_text())


def _codes(name: str) -> set[str]:
    cs = orjson.loads((PROFILES / f"CodeSystem-{name}.json").read_bytes())
    return {c["code"] for c in cs["concept"]}


def test_policy_speaks_the_profiles_language(policy: SharingPolicy) -> None:
    assert set(policy.categories) == _codes("cpa-information-category")
    assert set(policy.exceptions) <= _codes("disclosure-legal-basis")
    assert set(policy.recipients.values()) <= _codes("partner-agency-type")
    for exc in policy.exceptions.values():
        assert exc.recipients <= _codes("partner-agency-type") | {"carer"}
    vs = orjson.loads((PROFILES / "ValueSet-purpose-of-use.json").read_bytes())
    assert policy.purposes == {
        c["code"] for inc in vs["compose"]["include"] for c in inc["concept"]
    }
    labels = orjson.loads((PROFILES / "ValueSet-cpa-security-label.json").read_bytes())
    sensitivity = {
        c["code"]
        for inc in labels["compose"]["include"]
        if inc["system"].endswith("v3-ActCode")
        for c in inc["concept"]
    }
    assert set(policy.categories_by_sensitivity) <= sensitivity
    # The most restrictive category is the default for what no rule labels.
    assert policy.default_category == "personal"


def _set(path: str, value: Any) -> Callable[[Json], None]:
    def change(data: Json) -> None:
        node = data
        keys = path.split("/")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return change


POLICY_DEFECTS = [
    (_set("default_category", "administrative"), "must be very restricted"),
    (_set("default_category", "nothing"), "default_category must name"),
    (_set("category/crisis/confidentiality", "Z"), "category 'crisis' needs a confidentiality"),
    (_set("rule/0/category", "gossip"), "rule 'patient' names unknown category 'gossip'"),
    (_set("rule/0/colour", "blue"), "unknown key(s): colour"),
    (_set("rule/0/resource", KeyError), "needs a resource and a category"),
    (_set("rule/5/codes", ["no-bar"]), "must be written system|code"),
    (_set("rule/1/id", "patient"), "rule ids must be unique: patient"),
    (_set("exception/public-protection/categories", ["gossip"]), "unknown category 'gossip'"),
    (_set("exception/public-protection/purposes", ["GOSSIP"]), "unknown purpose 'GOSSIP'"),
    (_set("purposes", []), "lists no purposes"),
    (_set("time_zone", "Mars/Olympus_Mons"), "time_zone must name an IANA time zone"),
    (_set("time_zone", ["Europe/London"]), "time_zone must name an IANA time zone"),
    (_set("time_zone", "../../etc/passwd"), "time_zone must name an IANA time zone"),
    (_set("time_zone", "Europe"), "time_zone must name an IANA time zone"),
]


@pytest.mark.parametrize(("change", "says"), POLICY_DEFECTS, ids=[p[1] for p in POLICY_DEFECTS])
def test_unusable_policy_is_refused(change: Callable[[Json], None], says: str) -> None:
    data = _policy_data()
    change(data)
    with pytest.raises(PolicyError) as caught:
        parse_policy(data)
    assert says in caught.value.message
