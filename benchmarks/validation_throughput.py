"""Validation throughput of cpa-fhir against a bare fhir.resources parse.

Workload: the four example CPA record Bundles (service users A-D),
`profiles/examples/Bundle-record-*.json`, read once as bytes. Throughput is counted in resources,
meaning the resources inside the Bundles' entries (the Bundle wrappers
themselves are not counted); each pass handles every Bundle once.

- bare parse: `Bundle.model_validate_json(data)` with the fhir.resources R4B
  Bundle model, straight from the same bytes. This is the idiomatic one-call
  "JSON bytes in, model out" parse; `model_validate(orjson.loads(data))` (what
  the validator does internally for its structural stage) is timed too and
  shown for reference, but the ratio uses `model_validate_json`.
- validation: `Validator(load_package(PROFILES)).validate(data)` on the bytes.

The validator compiles profile trees, ValueSet expansions and FHIRPath
expressions on first use, so the first pass is timed on its own ("cold"); then
one warm-up pass, then several timed rounds (each a few passes of validation
and of the bare parse, interleaved), reporting the median round. The target is
validation time at most 3x the bare parse time.

    python benchmarks/validation_throughput.py             # the table
    python benchmarks/validation_throughput.py --profile   # cProfile of the validation loop
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from fhir.resources.R4B import get_fhir_model_class

from cpa_fhir import Validator, load_package

HERE = Path(__file__).resolve().parent
PROFILES = HERE.parent / "profiles"
EXAMPLES = PROFILES / "examples"
TARGET_RATIO = 3.0


def _load_examples() -> list[tuple[str, bytes, int]]:
    """(file name, bytes, number of entry resources) for each example record Bundle."""
    out = []
    for path in sorted(EXAMPLES.glob("Bundle-record-*.json")):
        data = path.read_bytes()
        bundle = orjson.loads(data)
        if bundle.get("resourceType") != "Bundle":
            continue
        count = sum(1 for e in bundle.get("entry", []) if isinstance(e, dict) and isinstance(e.get("resource"), dict))
        out.append((path.name, data, count))
    if not out:
        sys.exit(f"no example Bundles found in {EXAMPLES}")
    return out


def _pass_time(fn: Callable[[bytes], object], datas: list[bytes], passes: int) -> float:
    """Seconds per pass (every Bundle once), averaged over `passes` passes."""
    start = time.perf_counter()
    for _ in range(passes):
        for data in datas:
            fn(data)
    return (time.perf_counter() - start) / passes


def _passes_for(seconds_per_pass: float, budget: float) -> int:
    return max(1, round(budget / max(seconds_per_pass, 1e-9)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="approximate total time of the timed rounds (default 8)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="run cProfile over the warm validation loop and print hotspots"
    )
    parser.add_argument("--top", type=int, default=25, help="functions shown with --profile (default 25)")
    parser.add_argument(
        "--sort", default="cumulative", help="pstats sort key for --profile: cumulative, tottime, ... (default cumulative)"
    )
    args = parser.parse_args(argv)

    examples = _load_examples()
    datas = [data for _, data, _ in examples]
    n_resources = sum(count for _, _, count in examples)
    n_bytes = sum(len(d) for d in datas)

    bundle_model = get_fhir_model_class("Bundle")

    def bare_parse(data: bytes) -> object:
        return bundle_model.model_validate_json(data)

    def orjson_parse(data: bytes) -> object:
        return bundle_model.model_validate(orjson.loads(data))

    # -- cold start -------------------------------------------------------------
    t0 = time.perf_counter()
    package = load_package(PROFILES)
    validator = Validator(package)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    issue_counts = [len(validator.validate(data)) for data in datas]
    cold_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for data in datas:
        bare_parse(data)
    cold_parse_s = time.perf_counter() - t0

    # -- warm-up, and a first estimate of a pass's cost for sizing the rounds ------
    for data in datas:
        orjson_parse(data)
    est_validate = _pass_time(validator.validate, datas, 1)
    est_parse = _pass_time(bare_parse, datas, 1)

    if args.profile:
        passes = _passes_for(est_validate, 3.0)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(passes):
            for data in datas:
                validator.validate(data)
        profiler.disable()
        print(f"cProfile of {passes} warm validation passes ({passes * len(datas)} Bundles), top {args.top} by {args.sort}:")
        pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats(args.sort).print_stats(args.top)
        return 0

    # -- timed rounds -----------------------------------------------------------
    # Split the budget between the two workloads in proportion to their cost, so
    # each round measures both over a similar span; interleaving guards against drift.
    per_round = args.seconds / max(args.rounds, 1)
    share_validate = est_validate / (est_validate + 2 * est_parse)
    v_passes = _passes_for(est_validate, per_round * share_validate)
    p_passes = _passes_for(est_parse, per_round * (1 - share_validate) / 2)

    parse_rounds, orjson_rounds, validate_rounds = [], [], []
    for _ in range(args.rounds):
        parse_rounds.append(_pass_time(bare_parse, datas, p_passes))
        validate_rounds.append(_pass_time(validator.validate, datas, v_passes))
        orjson_rounds.append(_pass_time(orjson_parse, datas, p_passes))

    parse_s = statistics.median(parse_rounds)
    orjson_s = statistics.median(orjson_rounds)
    validate_s = statistics.median(validate_rounds)
    ratio = validate_s / parse_s

    def rate(seconds: float) -> str:
        return f"{n_resources / seconds:>12,.0f}"

    def spread(rounds: list[float]) -> str:
        return f"{min(rounds) * 1e3:7.1f}-{max(rounds) * 1e3:.1f}"

    print(
        f"Workload: {len(datas)} record Bundles ({', '.join(name.split('-')[2] for name, _, _ in examples)}), "
        f"{n_resources} entry resources, {n_bytes / 1024:.0f} KiB per pass"
    )
    print(
        f"Python {sys.version.split()[0]}; {args.rounds} rounds (median shown); per round "
        f"{v_passes} validation passes, {p_passes} parse passes"
    )
    print(f"Issues per Bundle (sanity): {issue_counts}")
    print()
    print(f"{'':42}{'resources/s':>12}  {'ms/pass':>8}  {'rounds ms/pass':>15}")
    print(f"{'bare parse (Bundle.model_validate_json)':42}{rate(parse_s)}  {parse_s * 1e3:8.1f}  {spread(parse_rounds):>15}")
    print(
        f"{'  for reference: orjson + model_validate':42}{rate(orjson_s)}  {orjson_s * 1e3:8.1f}  "
        f"{spread(orjson_rounds):>15}"
    )
    print(
        f"{'cpa-fhir validation (Validator.validate)':42}{rate(validate_s)}  {validate_s * 1e3:8.1f}  "
        f"{spread(validate_rounds):>15}"
    )
    print()
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"Ratio validation / bare parse: {ratio:.2f}x   (target: at most {TARGET_RATIO:g}x)   {verdict}")
    print(
        f"Cold: package load {load_s * 1e3:.0f} ms; first validation pass {cold_s * 1e3:.0f} ms "
        f"(warm {validate_s * 1e3:.0f} ms); first parse pass {cold_parse_s * 1e3:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
