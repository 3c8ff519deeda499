"""Consent filtering throughput against plain serialisation of the same record.

Workload: example record C (`profiles/examples/Bundle-record-C-enhanced-s117.json`,
47 entry resources) plus three resources made from its own (a risk Flag, a need
naming a sensitive matter, a review contact) to make a record of exactly 50
resources, shared with one recipient (`--recipient`, default gp) for one purpose
(`--purpose`, default TREAT) under the record's own Consent. Throughput is
counted in records and in the record's 50 resources.

- full pipeline: `share(...)` (label, decide, filter, Provenance and AuditEvent)
  and `orjson.dumps` of the outgoing Bundle.
- filtering: `filter_record(labelled, decision, policy, required)` with the labels
  and the decision computed once beforehand, then the outgoing collection Bundle
  written as bytes from `FilterResult.entry_bytes()` (each shared entry serialised;
  an unchanged resource's serialisation is made once, when it is first shared, and
  kept with its labels). Checked once, before timing, to give the same Bundle as
  serialising the shared resources with `orjson.dumps`. Every call filters afresh:
  nothing of one call's result is kept for the next.
- filtering, as objects: the same, with the Bundle built from `FilterResult.shared`
  (the resources as dicts) and serialised with `orjson.dumps`, for comparison.
- baseline: `orjson.dumps(record)`, the same unfiltered record serialised; the
  target is filtering at most 1.5x this. `json.dumps(record)` (stdlib) is timed
  too, as a second baseline, and, as a third, the record serialised as a typical
  Python FHIR stack does: from the FHIR model library's Bundle (fhir.resources,
  parsed once beforehand), `Bundle.json()`.

After a warm-up, each is timed in several interleaved rounds and the median round
is reported.

    python benchmarks/consent_filtering.py             # the table
    python benchmarks/consent_filtering.py --profile   # cProfile of the filtering loop
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import itertools
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from cpa_fhir.config import load_policy
from cpa_fhir.conformance import load_package
from cpa_fhir.consent import (
    RequiredElements,
    ShareRequest,
    decide,
    filter_record,
    label_resources,
    record_entries,
    resolve_recipient,
    share,
)
from cpa_fhir.fhir.models import model_class

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROFILES = ROOT / "profiles"
RECORD = PROFILES / "examples" / "Bundle-record-C-enhanced-s117.json"
POLICY = ROOT / "policy" / "sharing.toml"
AT = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
TARGET_RATIO = 1.5
RESOURCES = 50
BUNDLE_START = b'{"resourceType":"Bundle","type":"collection","entry":['
BUNDLE_END = b"]}"
FILTERING = "filtering: filter_record + entry bytes"
MODEL_BASELINE = "third baseline: fhir.resources json()"


def build_record() -> dict[str, Any]:
    """Record C with three more resources made from its own: 50 in all."""
    record: dict[str, Any] = orjson.loads(RECORD.read_bytes())
    entries = record["entry"]
    by_key = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e for e in entries}
    consent_at = next(
        i for i, e in enumerate(entries) if e["resource"]["resourceType"] == "Consent"
    )
    added = []
    for key, new_id, change in (
        ("Flag/c-risk-self-harm", "c-risk-self-harm-2025", {"period": {"start": "2025-02-01"}}),
        (
            "Condition/c-need-accommodation",
            "c-need-debt",
            {"code": {"text": "Rent arrears and debt put her tenancy at risk"}},
        ),
        ("Encounter/c-review-2026-09", "c-review-2026-10", {}),
    ):
        entry = copy.deepcopy(by_key[key])
        entry["resource"].update(change, id=new_id)
        entry["fullUrl"] = entry["fullUrl"].rsplit("/", 1)[0] + "/" + new_id
        added.append(entry)
    entries[consent_at:consent_at] = added
    if len(entries) != RESOURCES:
        sys.exit(f"the workload record has {len(entries)} resources, not {RESOURCES}")
    return record


def _per_call(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call, averaged over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _calls_for(seconds_per_call: float, budget: float) -> int:
    return max(1, round(budget / max(seconds_per_call, 1e-9)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=1.5, help="about how long each measurement takes (1.5)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds; the median is reported"
    )
    parser.add_argument("--recipient", default="gp", help="as `cpa-fhir share --to` (default gp)")
    parser.add_argument("--purpose", default="TREAT", help="purpose of use (default TREAT)")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the filtering loop instead"
    )
    parser.add_argument("--top", type=int, default=20, help="--profile: functions shown (20)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    policy = load_policy(POLICY)
    required = RequiredElements(load_package(PROFILES))
    setup_s = time.perf_counter() - t0
    record = build_record()
    entries = record_entries(record)
    resources = {f"{r['resourceType']}/{r['id']}": r for _, r in entries}
    recipient = resolve_recipient(args.recipient, resources.values(), policy)
    request = ShareRequest(recipient, args.purpose)
    consents = [r for r in resources.values() if r["resourceType"] == "Consent"]
    ids = itertools.count()

    def new_id() -> str:
        return f"bench-{next(ids)}"

    def full() -> bytes:
        disclosure = share(record, request, policy, at=AT, new_id=new_id, required=required)
        return orjson.dumps(disclosure.bundle)

    labelled = label_resources(entries, policy)
    decision = decide(consents, recipient, args.purpose, AT, policy, resources=resources)

    def filtering() -> bytes:
        result = filter_record(labelled, decision, policy, required)
        return BUNDLE_START + b",".join(result.entry_bytes()) + BUNDLE_END

    def filtering_objects() -> bytes:
        result = filter_record(labelled, decision, policy, required)
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"fullUrl": url, "resource": res} if url else {"resource": res}
                for url, res in result.shared
            ],
        }
        return orjson.dumps(bundle)

    if orjson.loads(filtering()) != orjson.loads(filtering_objects()):
        sys.exit("the Bundle written from entry_bytes() differs from the serialised objects")

    def baseline() -> bytes:
        return orjson.dumps(record)

    def stdlib() -> str:
        return json.dumps(record)

    bundle_class = model_class("Bundle")
    if bundle_class is None:
        sys.exit("the FHIR model library has no Bundle model")
    bundle_model = bundle_class.model_validate(record)

    def model_library() -> str:
        return str(bundle_model.json())

    # Warm-up (fills the profiles' required-element cache), doubling as an estimate.
    t0 = time.perf_counter()
    disclosure = share(record, request, policy, at=AT, new_id=new_id, required=required)
    cold_s = time.perf_counter() - t0
    if disclosure.bundle is None:
        sys.exit(f"nothing may go to {recipient.reference} for {args.purpose}: nothing to measure")
    shared = len(disclosure.shared)
    out_bytes = len(full())
    measures: list[tuple[str, Callable[[], object]]] = [
        ("baseline: orjson.dumps(record)", baseline),
        ("second baseline: json.dumps(record)", stdlib),
        (MODEL_BASELINE, model_library),
        (FILTERING, filtering),
        ("filtering, as objects: + .shared", filtering_objects),
        ("full pipeline: share + orjson", full),
    ]
    estimates = {name: _per_call(fn, 3) for name, fn in measures}

    if args.profile:
        calls = _calls_for(estimates[FILTERING], 3.0)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            filtering()
        profiler.disable()
        print(f"cProfile of {calls} filtering calls; top {args.top} functions by own time:")
        pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(
            args.top
        )
        return 0

    per_round = args.seconds / max(args.rounds, 1)
    per_measure = {name: _calls_for(estimates[name], per_round) for name, _ in measures}
    rounds: dict[str, list[float]] = {name: [] for name, _ in measures}
    for _ in range(args.rounds):
        for name, fn in measures:
            rounds[name].append(_per_call(fn, per_measure[name]))
    median = {name: statistics.median(r) for name, r in rounds.items()}
    orjson_s = median["baseline: orjson.dumps(record)"]
    json_s = median["second baseline: json.dumps(record)"]
    model_s = median[MODEL_BASELINE]

    print(
        f"Workload: record C plus 3 resources, {RESOURCES} resources, "
        f"{len(orjson.dumps(record)) / 1024:.0f} KiB; to {recipient.reference} "
        f"({recipient.partner_type}) for {args.purpose}: {shared} resources shared "
        f"({out_bytes / 1024:.0f} KiB out), {len(disclosure.withheld)} items withheld"
    )
    print(
        f"Python {sys.version.split()[0]}; median of {args.rounds} rounds of about "
        f"{per_round:.2f} s each per measurement"
    )
    print()
    header = f"{'':38}{'resources/s':>12}{'records/s':>11}{'ms/record':>11}"
    print(header + f"{'x orjson':>10}{'x json':>8}{'x model':>9}")
    for name, _ in measures:
        s = median[name]
        print(
            f"{name:38}{RESOURCES / s:>12,.0f}{1 / s:>11,.0f}{s * 1e3:>11.3f}"
            f"{s / orjson_s:>10.1f}{s / json_s:>8.2f}{s / model_s:>9.2f}"
        )
    print()
    ratio = median[FILTERING] / orjson_s
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(
        f"Ratio filtering / orjson.dumps(record): {ratio:.1f}x "
        f"(target: at most {TARGET_RATIO:g}x)  {verdict}"
    )
    print(
        f"Ratio full pipeline / orjson.dumps(record): "
        f"{median['full pipeline: share + orjson'] / orjson_s:.1f}x; "
        f"against json.dumps: filtering "
        f"{median[FILTERING] / json_s:.2f}x, full pipeline "
        f"{median['full pipeline: share + orjson'] / json_s:.2f}x; against the model "
        f"library's json(): filtering {median[FILTERING] / model_s:.2f}x, full pipeline "
        f"{median['full pipeline: share + orjson'] / model_s:.2f}x"
    )
    print(
        f"Cold: policy and profiles load {setup_s * 1e3:.0f} ms; first share "
        f"{cold_s * 1e3:.0f} ms (warm: {median['full pipeline: share + orjson'] * 1e3:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
