"""Validation throughput of cpa-fhir against a bare fhir.resources parse.

Workload: the four example CPA record Bundles (service users A-D),
`profiles/examples/Bundle-record-*.json`, read once as bytes. Throughput is
counted in resources, meaning the resources inside the Bundles' entries (the
Bundle wrappers themselves are not counted); one pass handles every Bundle once.

- bare parse: `Bundle.model_validate_json(data)` with the fhir.resources R4B
  Bundle model, straight from the same bytes: the one-call "JSON bytes in,
  model out" parse. `Bundle.model_validate(orjson.loads(data))` (what the
  validator itself does for its structural stage) is timed too and shown for
  reference; the ratio uses `model_validate_json`.
- validation: `Validator(load_package(PROFILES)).validate(data)` on the bytes.

The first pass of each is timed on its own ("cold": the validator compiles
profile trees, ValueSet expansions and FHIRPath expressions on first use). Then
one warm-up pass, then several rounds, each timing a few passes of the bare
parse and of validation, interleaved; the median round is reported. The target
is validation time at most 3x the bare parse time.

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
        entries = [e for e in bundle.get("entry", []) if isinstance(e, dict)]
        count = sum(1 for e in entries if isinstance(e.get("resource"), dict))
        out.append((path.name, data, count))
    if not out:
        sys.exit(f"no example record Bundles found in {EXAMPLES}")
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


def _profile(validator: Validator, datas: list[bytes], passes: int, top: int, sort: str) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(passes):
        for data in datas:
            validator.validate(data)
    profiler.disable()
    print(f"cProfile of {passes} warm validation passes ({passes * len(datas)} Bundles)")
    print(f"Top {top} functions by {sort}:")
    pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats(sort).print_stats(top)
    print("cpa_fhir.validation functions by own time (tottime), top 15:")
    stats = pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime")
    stats.print_stats(r"cpa_fhir[/\\]validation", 15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds; the median is reported (default 5)"
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="about how long all rounds take (default 8)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the warm validation loop instead"
    )
    parser.add_argument("--top", type=int, default=25, help="--profile: functions shown (25)")
    parser.add_argument(
        "--sort", default="cumulative", help="--profile: pstats sort key (default cumulative)"
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

    # -- cold: the first pass of each in this process ----------------------------
    t0 = time.perf_counter()
    for data in datas:
        bare_parse(data)
    cold_parse_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    validator = Validator(load_package(PROFILES))
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    issue_counts = [len(validator.validate(data)) for data in datas]
    cold_s = time.perf_counter() - t0

    # -- warm-up, doubling as an estimate of each pass's cost to size the rounds ----
    for data in datas:
        orjson_parse(data)
    est_validate = _pass_time(validator.validate, datas, 1)
    est_parse = _pass_time(bare_parse, datas, 1)

    if args.profile:
        _profile(validator, datas, _passes_for(est_validate, 3.0), args.top, args.sort)
        return 0

    # -- timed rounds ---------------------------------------------------------------
    # Each round gives validation about as much time as the two parses together.
    per_round = args.seconds / max(args.rounds, 1)
    v_passes = _passes_for(est_validate, per_round / 2)
    p_passes = _passes_for(est_parse, per_round / 4)
    parse_rounds: list[float] = []
    orjson_rounds: list[float] = []
    validate_rounds: list[float] = []
    for _ in range(args.rounds):
        parse_rounds.append(_pass_time(bare_parse, datas, p_passes))
        validate_rounds.append(_pass_time(validator.validate, datas, v_passes))
        orjson_rounds.append(_pass_time(orjson_parse, datas, p_passes))

    parse_s = statistics.median(parse_rounds)
    validate_s = statistics.median(validate_rounds)
    ratio = validate_s / parse_s

    names = ", ".join(name.split("-")[2] for name, _, _ in examples)
    print(
        f"Workload: {len(datas)} record Bundles ({names}), {n_resources} entry resources, "
        f"{n_bytes / 1024:.0f} KiB per pass"
    )
    print(
        f"Python {sys.version.split()[0]}; median of {args.rounds} rounds; per round "
        f"{v_passes} validation passes, {p_passes} passes of each parse"
    )
    print(f"Issues per Bundle (sanity check): {issue_counts}")
    print()
    print(f"{'':42}{'resources/s':>12}{'ms/pass':>10}{'rounds, ms/pass':>18}")
    for label, rounds in (
        ("bare parse (Bundle.model_validate_json)", parse_rounds),
        ("  reference: orjson.loads + model_validate", orjson_rounds),
        ("cpa-fhir validation (Validator.validate)", validate_rounds),
    ):
        median = statistics.median(rounds)
        spread = f"{min(rounds) * 1e3:.1f}-{max(rounds) * 1e3:.1f}"
        print(f"{label:42}{n_resources / median:>12,.0f}{median * 1e3:>10.1f}{spread:>18}")
    print()
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(
        f"Ratio validation / bare parse: {ratio:.2f}x "
        f"(target: at most {TARGET_RATIO:g}x)  {verdict}"
    )
    print(
        f"Cold: first parse pass {cold_parse_s * 1e3:.0f} ms; package load {load_s * 1e3:.0f} ms; "
        f"first validation pass {cold_s * 1e3:.0f} ms (warm: {validate_s * 1e3:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
