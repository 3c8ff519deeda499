#!/usr/bin/env python3
"""Patient-scoped search latency of the store, against a primary-key read in the same run.

Generates N synthetic patients by cloning the example records (profiles/examples) with
new ids (about 26 resources each; practitioners and organisations are shared), bulk-loads
them, then times searches a care-record view makes for one patient at a time:

    CarePlan?subject=Patient/X&status=active
    Flag?patient=X
    Encounter?subject=Patient/X&_sort=-date&_count=10
    EpisodeOfCare?patient=X&cpa-level=<Enhanced>
    CarePlan?subject:Patient.identifier=<NHS number of X>&status=active   (chained)
    Flag?patient.identifier=<NHS number of X>                              (chained)
    Patient?_has:Flag:patient:_id=<a flag of X>                            (reverse chained)

and, as the baseline, a read of the same patient's care plan by primary key. Prints
p50/p95/p99 latency per query, sequential throughput and each search's p95 over the
baseline's p95.

    python benchmarks/store_search.py                          # SQLite, 500 patients
    python benchmarks/store_search.py --db postgresql://postgres@127.0.0.1/test --patients 10000
    python benchmarks/store_search.py --db postgresql://... --patients 5000 --explain

`--explain` prints the database's plans (PostgreSQL: EXPLAIN ANALYZE) of the chained
NHS-number search and of the `_has` search for one patient before the timings.

A PostgreSQL run loads into a fresh schema and drops it afterwards (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from cpa_fhir.store import SearchQuery, SqlRepository
from cpa_fhir.store._engine import normalise_url
from cpa_fhir.store._repository import search_statements

EXAMPLES = Path(__file__).resolve().parent.parent / "profiles" / "examples"
SHARED_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization"})
ENHANCED = "http://snomed.info/sct|1092221000000101"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


def records() -> list[list[dict[str, Any]]]:
    out = []
    for path in sorted(EXAMPLES.glob("Bundle-record-*.json")):
        bundle = orjson.loads(path.read_bytes())
        out.append([e["resource"] for e in bundle["entry"]])
    return out


def _rewrite(value: Any, own_ids: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, own_ids) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in own_ids:
            out["reference"] = own_ids[ref]
        return out
    if isinstance(value, list):
        return [_rewrite(v, own_ids) for v in value]
    return value


def synthetic(patients: int) -> Iterator[dict[str, Any]]:
    """The shared resources once, then each patient's record cloned with new ids."""
    templates = records()
    seen_shared: set[tuple[str, str]] = set()
    for record in templates:
        for resource in record:
            key = (resource["resourceType"], resource["id"])
            if resource["resourceType"] in SHARED_TYPES and key not in seen_shared:
                seen_shared.add(key)
                yield resource
    for n in range(patients):
        record = templates[n % len(templates)]
        own = [r for r in record if r["resourceType"] not in SHARED_TYPES]
        own_ids = {
            f"{r['resourceType']}/{r['id']}": f"{r['resourceType']}/{r['id']}-{n}" for r in own
        }
        for resource in own:
            clone = _rewrite(resource, own_ids)
            clone["id"] = f"{resource['id']}-{n}"
            if clone["resourceType"] == "Patient":
                for identifier in clone.get("identifier", []):
                    if identifier.get("system") == "https://fhir.nhs.uk/Id/nhs-number":
                        identifier["value"] = f"{9_000_000_000 + n}"
            yield clone


def patient_ids(patients: int) -> list[tuple[str, str]]:
    """(patient id, care plan id) of each synthetic patient."""
    prefixes = [r[0]["id"].split("-")[0] for r in records()]
    return [
        (f"{prefixes[n % 4]}-patient-{n}", f"{prefixes[n % 4]}-careplan-{n}")
        for n in range(patients)
    ]


def nhs_number(patient_id: str) -> str:
    """The synthetic NHS number `synthetic` gives the patient with this id."""
    return f"{NHS}|{9_000_000_000 + int(patient_id.rsplit('-', 1)[1])}"


def flag_id(patient_id: str) -> str:
    """One risk flag of the synthetic patient (each example record has one of these)."""
    prefix, _, n = patient_id.partition("-patient-")
    first_flag = {"a": "risk-self-harm", "b": "risk-self-neglect", "c": "risk-self-harm"}
    return f"{prefix}-{first_flag.get(prefix, 'risk-falls')}-{n}"


def explain(store: SqlRepository, query: SearchQuery) -> str:
    """The database's plan for the search the repository would run (its page query)."""
    with store.engine.connect() as connection:
        statements = search_statements(connection.dialect)
        sql, values = statements.page(query, statements.where(query, now_micros=0), 0)
        postgres = connection.dialect.name == "postgresql"
        prefix = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " if postgres else "EXPLAIN QUERY PLAN "
        rows = connection.exec_driver_sql(prefix + sql, values).all()
    return "\n".join(str(row[0]) if postgres else f"{row[1]:>3} {row[3]}" for row in rows)


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def measure(
    name: str, run: Callable[[str, str], object], targets: list[tuple[str, str]]
) -> list[float]:
    for patient, plan in targets[:50]:  # warm-up
        run(patient, plan)
    samples = []
    for patient, plan in targets:
        start = time.perf_counter()
        run(patient, plan)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="store URL (default: a SQLite file in a temporary folder)")
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--queries", type=int, default=1000, help="timed queries of each kind")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema")
    parser.add_argument(
        "--explain", action="store_true", help="print the plan of the chained NHS-number search"
    )
    args = parser.parse_args()

    schema = None
    temp = None
    url = args.db
    if url is None:
        temp = tempfile.TemporaryDirectory()
        url = f"sqlite:///{temp.name}/store.db"
    elif normalise_url(url).drivername.startswith("postgresql"):
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(normalise_url(url))
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    store = SqlRepository(url, schema=schema)
    try:
        start = time.perf_counter()
        loaded = store.load(synthetic(args.patients))
        load_seconds = time.perf_counter() - start
        store.analyze()
        print(f"store: {normalise_url(url).drivername}{f' (schema {schema})' if schema else ''}")
        print(
            f"loaded {loaded} resources for {args.patients} patients in {load_seconds:.1f} s "
            f"({loaded / load_seconds:,.0f} resources/s)"
        )
        rng = random.Random(1)
        everyone = patient_ids(args.patients)
        targets = [rng.choice(everyone) for _ in range(args.queries)]

        def query(
            resource_type: str, params: Callable[[str], list[tuple[str, str]]]
        ) -> Callable[[str, str], object]:
            return lambda patient, plan: store.search(store.parse(resource_type, params(patient)))

        cases: dict[str, Callable[[str, str], object]] = {
            "read CarePlan/<id> (baseline)": lambda patient, plan: store.read("CarePlan", plan),
            "CarePlan?subject=Patient/X&status=active": query(
                "CarePlan", lambda p: [("subject", f"Patient/{p}"), ("status", "active")]
            ),
            "Flag?patient=X": query("Flag", lambda p: [("patient", p)]),
            "Encounter?subject=Patient/X&_sort=-date&_count=10": query(
                "Encounter",
                lambda p: [("subject", f"Patient/{p}"), ("_sort", "-date"), ("_count", "10")],
            ),
            "EpisodeOfCare?patient=X&cpa-level=Enhanced": query(
                "EpisodeOfCare", lambda p: [("patient", p), ("cpa-level", ENHANCED)]
            ),
            "CarePlan?subject:Patient.identifier=NHS&status=active": query(
                "CarePlan",
                lambda p: [("subject:Patient.identifier", nhs_number(p)), ("status", "active")],
            ),
            "Flag?patient.identifier=NHS": query(
                "Flag", lambda p: [("patient.identifier", nhs_number(p))]
            ),
            "Patient?_has:Flag:patient:_id=F": query(
                "Patient", lambda p: [("_has:Flag:patient:_id", flag_id(p))]
            ),
        }
        check = store.search(
            store.parse("CarePlan", [("subject", f"Patient/{targets[0][0]}"), ("status", "active")])
        )
        assert check.total == 3, check.total
        chained = store.parse(
            "CarePlan",
            [("subject:Patient.identifier", nhs_number(targets[0][0])), ("status", "active")],
        )
        assert store.search(chained).total == 3
        has = store.parse("Patient", [("_has:Flag:patient:_id", flag_id(targets[0][0]))])
        assert [m.id for m in store.search(has).matches] == [targets[0][0]]
        if args.explain:
            print(f"plan of CarePlan?subject:Patient.identifier={nhs_number(targets[0][0])}")
            print(explain(store, chained))
            print(f"plan of Patient?_has:Flag:patient:_id={flag_id(targets[0][0])}")
            print(explain(store, has))
        baseline_p95 = None
        print(f"{'query':<52} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'q/s':>7} {'p95/base':>9}")
        for name, run in cases.items():
            samples = measure(name, run, targets)
            p95 = percentile(samples, 95)
            baseline_p95 = baseline_p95 or p95
            print(
                f"{name:<52} {percentile(samples, 50):7.2f} {p95:7.2f} {percentile(samples, 99):7.2f} "
                f"{1000 / statistics.mean(samples):7.0f} {p95 / baseline_p95:8.1f}x"
            )
    finally:
        store.close()
        if schema is not None and not args.keep:
            with admin.begin() as connection:
                connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            admin.dispose()
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
