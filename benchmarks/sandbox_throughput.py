"""Throughput and latency of the sandbox FHIR server over HTTP, against a bare endpoint.

The real app (`create_app(open_sandbox(...), bare_endpoint=True)`, the example records
A-D seeded) runs under uvicorn in a child process on a free loopback port; this process
is the load generator: C concurrent clients (asyncio tasks, one keep-alive HTTP/1.1
connection each) send requests for a fixed time after a short warm-up. Scenarios:

- trust read / GP read: `GET /fhir/{type}/{id}` of Patient/c-patient,
  CarePlan/c-careplan, EpisodeOfCare/c-episode with a token of the `trust` client (sees
  everything) or the `gp` client (a partner: consent-filtered, and each disclosure is
  recorded as an AuditEvent, stored by the app's child writer process).
- trust search / GP search: `CarePlan?subject=Patient/c-patient&status=active` and
  `Flag?patient=Patient/c-patient`, alternately.

Each scenario has a bare twin, its baseline: the same requests, token and all, sent to
`GET /_bare/fhir/...`, which answers each with the very bytes (status, headers, body)
the FHIR endpoint gave the first such request, kept in memory by the app, with no
auth, consent or database work: what uvicorn + FastAPI cost on their own for the same
exchange. A twin runs just before its scenario, and the pairs take turns over several
rounds (`--rounds`), each reported over all its rounds: a slow spell of a shared
machine then falls on every scenario alike. Each prints requests/s, p50/p95/p99
latency, the CPU the server and the load generator used, and requests/s and p50 as
ratios to its twin measured in the same run.
Target: consent-filtered (GP) reads at least 0.5x their bare twin's requests/s.

`--patients N` first bulk-loads N synthetic patients (store_search.py's: the example
records cloned with new ids, about 26 resources each, practitioners and organisations
shared), then
times patient-scoped searches for random patients: by the trust client over every
patient, by the GP client over clones of record C (whose Consent names the GP practice,
so the GP sees them), one client at a time (latency) and with C clients (throughput),
each for as long as all the rounds of a scenario above.
Target: patient-scoped search p95 under 20 ms over 10,000 patients on PostgreSQL.

    python benchmarks/sandbox_throughput.py                  # SQLite, about 45 s
    python benchmarks/sandbox_throughput.py --db postgresql://postgres@127.0.0.1/test \\
        --patients 10000
    python benchmarks/sandbox_throughput.py --only gp-read,gp-search --profile

A PostgreSQL run uses a fresh schema and drops it afterwards (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import os
import pstats
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from cpa_fhir.sandbox import create_app, open_sandbox, seed_examples
from cpa_fhir.store._engine import normalise_url

# The synthetic patients of the store benchmark (this folder): the same clones.
from store_search import SHARED_TYPES, patient_ids, synthetic  # isort: skip

READS = ["Patient/c-patient", "CarePlan/c-careplan", "EpisodeOfCare/c-episode"]
SEARCHES = ["CarePlan?subject=Patient/{}&status=active", "Flag?patient=Patient/{}"]
SCENARIOS = ["trust-read", "gp-read", "trust-search", "gp-search"]
BARE = "/_bare"  # the prefix of the bare twin of each FHIR request
TARGET_READ_RATIO = 0.5
TARGET_SEARCH_P95_MS = 20.0
HOST = "127.0.0.1"


# -- the server, in a child process -------------------------------------------------------


def serve(url: str, schema: str | None, port: int, profile_out: str | None, clock: str) -> None:
    """Run the app with the bare endpoint until SIGINT (then write the profile, if asked:
    from the SIGUSR1 the load generator sends when it starts measuring).

    `clock`: "cpu" profiles each thread's CPU time (where the work is), "wall" the
    elapsed time (waiting for the connection pool, locks and the database too)."""
    import uvicorn

    box = open_sandbox(url, schema=schema)
    app = create_app(box, bare_endpoint=True)
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    main_profile = cProfile.Profile(timer) if profile_out else None
    profiles: list[cProfile.Profile] = []
    profiling = threading.Event()
    if main_profile is not None:

        def start(*_: Any) -> None:
            profiling.set()
            main_profile.enable()

        signal.signal(signal.SIGUSR1, start)
        # cProfile sees one thread: one profile for the event loop, one per worker thread
        # around the router (where the database and consent work runs).
        local = threading.local()
        handle = box.router.handle

        def profiled(*args: Any, **kwargs: Any) -> Any:
            if not profiling.is_set() or threading.current_thread() is threading.main_thread():
                # On the event loop's thread the main profile sees it already.
                return handle(*args, **kwargs)
            prof = getattr(local, "profile", None)
            if prof is None:
                prof = local.profile = cProfile.Profile(timer)
                profiles.append(prof)
            prof.enable()
            try:
                return handle(*args, **kwargs)
            finally:
                prof.disable()

        box.router.handle = profiled  # type: ignore[method-assign]
    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning")
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it stopped on
    if main_profile is not None and profile_out:
        main_profile.disable()
        stats = pstats.Stats(main_profile)
        for prof in profiles:
            stats.add(prof)
        stats.dump_stats(profile_out)
    box.close()


class Server:
    """The app in a child process (`--serve`), so that it and the load generator each
    have their own interpreter (and GIL)."""

    def __init__(
        self, url: str, schema: str | None, profile_out: str | None, clock: str = "cpu"
    ) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, __file__, "--serve", str(self.port), "--db", url]
        if schema:
            command += ["--schema", schema]
        if profile_out:
            command += ["--profile-out", profile_out, "--profile-clock", clock]
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                sys.exit(f"the server exited with code {self.process.returncode}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    sys.exit("the server did not start within 60 s")
                time.sleep(0.1)
        self.base = f"http://{HOST}:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start_profile(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the load generator -------------------------------------------------------------------


class Connection:
    """A minimal keep-alive HTTP/1.1 client: GET with prepared bytes, Content-Length bodies.
    Far cheaper per request than a general client, so the load generator (one core at
    most) is less likely to be what limits the bare endpoint."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def get(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def request_bytes(port: int, path: str, token: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}", "Accept: application/fhir+json"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Result:
    name: str
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds
    errors: int = 0
    server_cpu: float = 0.0
    client_cpu: float = 0.0

    @classmethod
    def pooled(cls, rounds: list[Result]) -> Result:
        """One scenario's rounds as one measurement: all requests over all the time."""
        first = rounds[0]
        total = cls(first.name, first.concurrency, sum(r.seconds for r in rounds))
        for r in rounds:
            total.latencies += r.latencies
            total.errors += r.errors
        total.server_cpu = sum(r.server_cpu for r in rounds) / len(rounds)
        total.client_cpu = sum(r.client_cpu for r in rounds) / len(rounds)
        return total

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, p: float) -> float:
        """Milliseconds (nearest rank)."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return 1000 * ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def _load(
    port: int, next_request: Callable[[], bytes], concurrency: int, warmup: float, seconds: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    stop = start + seconds

    async def client() -> None:
        nonlocal errors
        connection = await Connection.open(port)
        try:
            while True:
                request = next_request()
                t0 = time.perf_counter()
                status, _ = await connection.get(request)
                elapsed = time.perf_counter() - t0
                now = loop.time()
                if now >= stop:
                    return
                if now >= start:
                    latencies.append(elapsed)
                    errors += status != 200
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors


def measure(
    server: Server,
    name: str,
    next_request: Callable[[], bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
) -> Result:
    cpu0, proc0 = server.cpu_seconds(), time.process_time()
    latencies, errors = asyncio.run(_load(server.port, next_request, concurrency, warmup, seconds))
    result = Result(name, concurrency, seconds, latencies, errors)
    # CPU over the warm-up too: a rate over the whole run.
    total = seconds + warmup
    result.server_cpu = (server.cpu_seconds() - cpu0) / total
    result.client_cpu = (time.process_time() - proc0) / total
    return result


def cycle(requests: list[bytes]) -> Callable[[], bytes]:
    state = {"i": 0}

    def next_request() -> bytes:
        state["i"] += 1
        return requests[state["i"] % len(requests)]

    return next_request


async def _get_once(port: int, request: bytes) -> tuple[int, bytes]:
    connection = await Connection.open(port)
    try:
        return await connection.get(request)
    finally:
        connection.close()


def same_answer(one: tuple[int, bytes], other: tuple[int, bytes]) -> bool:
    """Whether two answers are alike, but for a searchset Bundle's own id and time."""
    if one == other:
        return True
    bodies = [orjson.loads(body) for _, body in (one, other)]
    for body in bodies:
        if body.get("resourceType") == "Bundle":
            body.pop("id", None)
            body.pop("meta", None)
    return one[0] == other[0] and bodies[0] == bodies[1]


def get_once(server: Server, path: str, token: str | None) -> tuple[int, bytes]:
    return asyncio.run(_get_once(server.port, request_bytes(server.port, path, token)))


# -- reporting ------------------------------------------------------------------------------


HEADER = (
    f"{'scenario':<34}{'conc':>5}{'req/s':>8}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
    f"{'errors':>7}{'srv CPU':>8}{'gen CPU':>8}{'req/s÷twin':>11}{'p50÷twin':>9}"
)


def row(result: Result, twin: Result | None) -> str:
    ratios = ""
    if twin is not None and twin.latencies:
        ratios = (
            f"{result.rate / twin.rate:>11.2f}{result.percentile(50) / twin.percentile(50):>9.1f}"
        )
    return (
        f"{result.name:<34}{result.concurrency:>5}{result.rate:>8,.0f}"
        f"{result.percentile(50):>8.1f}{result.percentile(95):>8.1f}{result.percentile(99):>8.1f}"
        f"{result.errors:>7}{result.server_cpu:>7.0%} {result.client_cpu:>7.0%}{ratios}"
    )


def print_profile(path: str, top: int, clock: str) -> None:
    print()
    print(
        f"Server-side cProfile ({clock} time, event loop + router worker threads summed), "
        f"top {top} by own time:"
    )
    stats = pstats.Stats(path, stream=sys.stdout).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    print(f"Top {top} by cumulative time (cpa_fhir functions):")
    stats = pstats.Stats(path, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(r"cpa_fhir", top)


# -- main -----------------------------------------------------------------------------------


def load_patients(url: str, schema: str | None, patients: int) -> tuple[int, float]:
    box = open_sandbox(url, schema=schema)
    try:
        # The shared professionals and organisations are seeded already.
        own = (r for r in synthetic(patients) if r["resourceType"] not in SHARED_TYPES)
        start = time.perf_counter()
        loaded = 0
        while chunk := list(itertools.islice(own, 25_000)):
            loaded += box.repo.load(chunk)
            rate = loaded / (time.perf_counter() - start)
            print(f"  loaded {loaded:,} resources ({rate:,.0f} resources/s)", flush=True)
        box.repo.analyze()
        return loaded, time.perf_counter() - start
    finally:
        box.repo.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--db", help="store URL (default: a SQLite file in a temporary folder)")
    parser.add_argument(
        "--seconds", type=float, default=1.5, help="per scenario and round (default 1.5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="per scenario and round (default 0.5)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times each scenario is measured, the scenarios taking turns (default 3)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="clients (default 32)")
    parser.add_argument("--patients", type=int, default=0, help="synthetic patients to load")
    parser.add_argument(
        "--only", help=f"comma-separated scenarios of {','.join(SCENARIOS)} (default all)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the server")
    parser.add_argument("--top", type=int, default=30, help="--profile: functions shown (30)")
    parser.add_argument(
        "--profile-clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="--profile: each thread's CPU time (default) or elapsed time, waits included",
    )
    parser.add_argument("--profile-save", help="--profile: also keep the pstats file here")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema")
    parser.add_argument("--seed", type=int, default=1, help="random patients' seed")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve is not None:
        serve(args.db, args.schema, args.serve, args.profile_out, args.profile_clock)
        return 0

    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    # `bare` named the single bare endpoint there once was: each scenario now has its twin.
    only.discard("bare")
    if not only:
        parser.error(f"each scenario comes with its bare twin: name some of {','.join(SCENARIOS)}")
    if only - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(only - set(SCENARIOS)))}")
    temp = tempfile.TemporaryDirectory()
    url = args.db or f"sqlite:///{temp.name}/sandbox.db"
    driver = normalise_url(url).drivername
    schema = None
    admin = None
    if driver.startswith("postgresql"):
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(normalise_url(url))
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    profile_out = (args.profile_save or f"{temp.name}/server.prof") if args.profile else None
    server: Server | None = None
    try:
        box = open_sandbox(url, schema=schema)
        seeded = seed_examples(box)
        box.repo.close()
        print(
            f"store: {driver}{f' (schema {schema})' if schema else ''}; seeded {seeded} resources"
        )
        loaded = 0
        if args.patients:
            print(f"bulk-loading {args.patients:,} synthetic patients ...", flush=True)
            loaded, load_seconds = load_patients(url, schema, args.patients)
            print(
                f"loaded {loaded:,} resources in {load_seconds:.1f} s "
                f"({loaded / load_seconds:,.0f} resources/s), ANALYZE included"
            )

        server = Server(url, schema, profile_out, args.profile_clock)
        port = server.port
        box = open_sandbox(url, schema=schema)
        issuer = f"{server.base}/fhir"
        tokens = {c: box.token_for(c, issuer)["access_token"] for c in ("trust", "gp")}
        box.repo.close()

        # Sanity: each twin answers as the FHIR endpoint does, and then from memory.
        for path in [f"/fhir/{p}" for p in READS] + ["/fhir/" + t.format("c-patient") for t in SEARCHES]:  # fmt: skip
            for client in ("trust", "gp"):
                direct = get_once(server, path, tokens[client])
                twin = [get_once(server, BARE + path, tokens[client]) for _ in range(2)]
                if direct[0] != 200 or twin[0] != twin[1] or not same_answer(direct, twin[0]):
                    sys.exit(f"the bare twin of {path} ({client}) answers otherwise")
        for template in SEARCHES:
            path = "/fhir/" + template.format("c-patient")
            totals = [
                orjson.loads(get_once(server, path, tokens[c])[1]).get("total")
                for c in ("trust", "gp")
            ]
            print(f"  {path}: total {totals[0]} (trust), {totals[1]} (gp)")

        print(
            f"server: uvicorn (asyncio, h11) in a child process; load: {args.concurrency} "
            f"clients, keep-alive HTTP/1.1 on loopback; {args.rounds} rounds, the scenarios "
            f"taking turns, each {args.seconds:g} s after {args.warmup:g} s warm-up; "
            f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}"
        )
        print(
            "load average before measuring: "
            + " ".join(f"{x:.1f}" for x in os.getloadavg())
            + " (other busy processes slow every scenario; the ratios hold up better)"
        )
        if args.profile:
            print("(--profile: the server runs under cProfile, so its rates are not comparable)")
            server.start_profile()
        print()
        print(HEADER)

        def reqs(paths: list[str], token: str | None) -> list[bytes]:
            return [request_bytes(port, p, token) for p in paths]

        search_paths = ["/fhir/" + t.format("c-patient") for t in SEARCHES]
        read_paths = [f"/fhir/{p}" for p in READS]
        plan: list[tuple[str, str, list[str], str]] = [
            ("trust-read", "read by id, trust", read_paths, "trust"),
            ("gp-read", "read by id, GP (consent)", read_paths, "gp"),
            ("trust-search", "patient search, trust", search_paths, "trust"),
            ("gp-search", "patient search, GP (consent)", search_paths, "gp"),
        ]
        # Rounds: the scenarios take turns, each just after its twin, so that a slower
        # spell of the machine (another process, a throttled core) falls on all alike.
        chosen = [
            (key, name, reqs(paths, tokens[client]), reqs([BARE + p for p in paths], tokens[client]))
            for key, name, paths, client in plan
            if key in only
        ]  # fmt: skip
        rounds: dict[str, list[Result]] = {key: [] for key, *_ in chosen}
        twin_rounds: dict[str, list[Result]] = {key: [] for key, *_ in chosen}
        for _ in range(args.rounds):
            for key, name, requests, twin_requests in chosen:
                for into, label, sent in (
                    (twin_rounds, "  its bare twin", twin_requests),
                    (rounds, name, requests),
                ):
                    into[key].append(
                        measure(
                            server, label, cycle(sent), args.concurrency, args.seconds, args.warmup
                        )
                    )
        results = {key: Result.pooled(measured) for key, measured in rounds.items()}
        twins = {key: Result.pooled(measured) for key, measured in twin_rounds.items()}
        for key in results:
            print(row(twins[key], None))
            print(row(results[key], twins[key]), flush=True)

        if args.patients:
            print()
            print(
                f"Patient-scoped searches over random synthetic patients ({args.patients:,} "
                f"patients; trust: any patient, GP: clones of record C)"
            )
            print(HEADER)
            rng = random.Random(args.seed)
            everyone = [patient for patient, _ in patient_ids(args.patients)]
            c_clones = [p for p in everyone if p.startswith("c-")]  # clones of record C

            def random_search(token: str, pool: list[str]) -> Callable[[], bytes]:
                def next_request() -> bytes:
                    path = "/fhir/" + rng.choice(SEARCHES).format(rng.choice(pool))
                    return request_bytes(port, path, token)

                return next_request

            probe = "/fhir/" + SEARCHES[0].format(c_clones[0])
            totals = [orjson.loads(get_once(server, probe, tokens[c])[1]).get("total") for c in ("trust", "gp")]  # fmt: skip
            print(f"  check {probe}: total {totals[0]} (trust), {totals[1]} (gp)")
            searches: list[Result] = []
            for client, pool in (("trust", everyone), ("gp", c_clones)):
                for concurrency in (1, args.concurrency):
                    label = f"random patient search, {'GP' if client == 'gp' else client}"
                    # As long as all rounds of a scenario above: enough searches for a p95.
                    result = measure(
                        server,
                        label,
                        random_search(tokens[client], pool),
                        concurrency,
                        args.seconds * args.rounds,
                        args.warmup,
                    )
                    searches.append(result)
                    print(row(result, None), flush=True)

        print()
        if "gp-read" in results:
            ratio = results["gp-read"].rate / twins["gp-read"].rate
            verdict = "PASS" if ratio >= TARGET_READ_RATIO else "MISS"
            each = [
                g.rate / b.rate
                for g, b in zip(rounds["gp-read"], twin_rounds["gp-read"], strict=True)
            ]
            print(
                f"Consent-filtered (GP) read throughput / its bare twin: {ratio:.2f}x "
                f"(rounds {min(each):.2f}-{max(each):.2f}x; "
                f"target: at least {TARGET_READ_RATIO:g}x)  {verdict}"
            )
        if args.patients:
            for result in searches:
                if result.concurrency != 1:
                    continue
                p95 = result.percentile(95)
                verdict = "PASS" if p95 < TARGET_SEARCH_P95_MS else "MISS"
                print(
                    f"{result.name}, one client at a time: p95 {p95:.1f} ms over "
                    f"{args.patients:,} patients (target: under {TARGET_SEARCH_P95_MS:g} ms "
                    f"on PostgreSQL at 10,000)  {verdict}"
                )
        busiest = max(twins.values(), key=lambda twin: twin.client_cpu, default=None)
        if busiest is not None and busiest.client_cpu > 0.85:
            print(
                f"note: the load generator used {busiest.client_cpu:.0%} of a CPU on a bare "
                "twin, so that rate (and the ratios) may be limited by it"
            )
    finally:
        if server is not None:
            server.stop()
        if profile_out and Path(profile_out).is_file():
            print_profile(profile_out, args.top, args.profile_clock)
        if admin is not None:
            if not args.keep:
                with admin.begin() as connection:
                    connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            admin.dispose()
        temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
