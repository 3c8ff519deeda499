"""What a partner's first search of a patient's record costs the server, in process.

A GP's patient-scoped search of a patient the server has not read before labels
the record it finds, decides and filters it, and audits it: the cold path that the
10,000-patient latency target of `sandbox_throughput.py` measures over HTTP. Here
the same searches go straight to the router (no HTTP, no other process), so that
their cost can be counted without the machine's noise:

    python benchmarks/cold_partner_search.py                 # times, and a ratio
    python benchmarks/cold_partner_search.py --db cold.db --searches 1   # the store, once
    valgrind --tool=callgrind python benchmarks/cold_partner_search.py --db cold.db --gp-only --searches 0
    valgrind --tool=callgrind python benchmarks/cold_partner_search.py --db cold.db --gp-only --searches 20

The difference of the two callgrind totals over 20 is the instructions one cold
GP search costs (callgrind counts the same whatever else the machine runs). The
store is a SQLite file of `--patients` synthetic patients (those of
`store_search.py`), made in a temporary folder, or `--db` kept between runs.
Each search is of a different clone of record C, whose Consent names the GP; in
the same run the trust (which sees everything: no labelling, no audit) makes the
same searches of other clones, the baseline of the ratio printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from cpa_fhir.sandbox import open_sandbox, seed_examples
from cpa_fhir.sandbox._router import Request

# The synthetic patients of the store benchmark (this folder): the same clones.
from store_search import SHARED_TYPES, patient_ids, synthetic  # isort: skip

SEARCH = "CarePlan"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--db", help="SQLite file to use (made if new) instead of a temporary one")
    parser.add_argument("--patients", type=int, default=400, help="synthetic patients (400)")
    parser.add_argument("--searches", type=int, default=40, help="cold GP searches timed (40)")
    parser.add_argument(
        "--gp-only", action="store_true", help="no trust searches (for counting instructions)"
    )
    args = parser.parse_args(argv)
    # Each client searches its own half of the clones of record C, one left for a warm-up.
    most = len([p for p, _ in patient_ids(args.patients) if p.startswith("c-")]) // 2 - 1
    if not 0 <= args.searches <= most:
        parser.error(f"--searches: 0 to {most} with {args.patients} patients")
    temp = tempfile.TemporaryDirectory()
    path = args.db or os.path.join(temp.name, "cold.db")
    fresh = not os.path.exists(path)
    box = open_sandbox(f"sqlite:///{path}")
    try:
        if fresh:
            seed_examples(box)
            box.repo.load(
                r for r in synthetic(args.patients) if r["resourceType"] not in SHARED_TYPES
            )
            box.repo.analyze()
        clones = [p for p, _ in patient_ids(args.patients) if p.startswith("c-")]
        # The GP's searches take the first half of the clones, the trust's the second.
        first_half, second_half = clones[: len(clones) // 2], clones[len(clones) // 2 :]

        def search(client_id: str, patient: str) -> float:
            client = box.registry.clients[client_id]
            query = [("subject", f"Patient/{patient}"), ("status", "active")]
            start = time.process_time()
            answer = box.router.handle(Request("GET", SEARCH, query), client, client.scopes)
            spent = time.process_time() - start
            if answer.status != 200:
                raise SystemExit(f"{client_id} search of {patient}: status {answer.status}")
            return spent * 1000

        # One of each first: what is made once (policy, profiles, the professionals'
        # labels for this store generation) is not a cold search's cost.
        search("gp", first_half[0])
        gp = [search("gp", p) for p in first_half[1 : 1 + args.searches]]
        if args.gp_only:
            return 0
        search("trust", second_half[0])
        trust = [search("trust", p) for p in second_half[1 : 1 + args.searches]]
        if args.searches:
            gp_ms, trust_ms = statistics.median(gp), statistics.median(trust)
            print(
                f"cold {SEARCH} search of a patient not read before, CPU time, median of "
                f"{args.searches} ({args.patients} patients, SQLite):"
            )
            print(f"  GP (labelled, decided, filtered, audited)  {gp_ms:7.2f} ms")
            print(f"  trust (sees everything)                    {trust_ms:7.2f} ms")
            print(f"  ratio GP / trust                           {gp_ms / trust_ms:7.1f}x")
    finally:
        box.repo.close()
        temp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
