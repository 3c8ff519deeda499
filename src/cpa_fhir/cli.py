"""The `cpa-fhir` command line (the edge: files, standard streams, exit codes)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cpa_fhir.config import load_policy
from cpa_fhir.conformance.package import ConformancePackage, default_package_dir, load_package
from cpa_fhir.consent import RequiredElements, ShareRequest, person_name
from cpa_fhir.consent import share as share_record
from cpa_fhir.errors import FhirError
from cpa_fhir.fhir import jsonio
from cpa_fhir.fhir.models import bundle_entries
from cpa_fhir.fhir.outcome import operation_outcome
from cpa_fhir.validation import Validator

app = typer.Typer(
    help="FHIR R4 interoperability for the Care Programme Approach (CPA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
profiles_app = typer.Typer(help="Work on the profiles package.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
sandbox_app = typer.Typer(
    help="The sandbox FHIR server: run it, or get a token for one of its clients.",
    invoke_without_command=True,
)
app.add_typer(sandbox_app, name="sandbox")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

PackageOption = Annotated[
    Path | None,
    typer.Option("--package", help="Profiles package folder (default: the project's profiles/)."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"cpa-fhir: {message}", markup=False)
    return typer.Exit(code)


def _package(folder: Path | None) -> ConformancePackage:
    try:
        return load_package(folder or default_package_dir())
    except FhirError as exc:
        raise _fail(exc.message) from None


def _inputs(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        else:
            files.append(p)
    return files


def _summary(resource: Any) -> str:
    """What a file holds, in a few words: the resource type, or a record's patient and size."""
    if not isinstance(resource, dict):
        return ""
    if resource.get("resourceType") != "Bundle":
        return str(resource.get("resourceType", ""))
    entries = [
        e["resource"] for _, e in bundle_entries(resource) if isinstance(e.get("resource"), dict)
    ]
    patients = [r for r in entries if r.get("resourceType") == "Patient"]
    who = ""
    if len(patients) == 1:
        who = f"record of {person_name(patients[0]) or 'an unnamed patient'}: "
    types = len({r.get("resourceType") for r in entries})
    return f"{who}{len(entries)} resources of {types} types"


@app.command()
def validate(
    files: Annotated[
        list[Path], typer.Argument(help="JSON files or folders of them.", show_default=False)
    ],
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", help="Validate against this profile url instead of meta.profile."
        ),
    ] = None,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Date for record rules (default: Bundle.timestamp)."),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format", help="text (one line an issue) or json (OperationOutcome per file)."
        ),
    ] = "text",
    package: PackageOption = None,
) -> None:
    """Validate FHIR resources or Bundles against the CPA profiles; exit 1 on any error."""
    if output_format not in ("text", "json"):
        raise _fail(f"unknown --format {output_format!r}: use text or json")
    if profile is not None and not profile.strip():
        raise _fail("--profile needs a profile's canonical URL")
    when = None
    if as_of:
        try:
            when = date.fromisoformat(as_of)
        except ValueError:
            raise _fail(f"--as-of {as_of!r} is not a date (YYYY-MM-DD)") from None
    validator = Validator(_package(package))
    paths = _inputs(files)
    if not paths:
        raise _fail("no JSON files to validate")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _fail(f"{missing[0]}: no such file")
    table = Table(title="CPA validation")
    table.add_column("file", overflow="fold")
    table.add_column("content")
    for name in ("errors", "warnings", "result"):
        table.add_column(name, no_wrap=True)
    invalid = 0
    failed = False
    with _standard_output():
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise _fail(f"{path}: cannot read ({exc.strerror or exc})") from None
            issues = validator.validate(data, profile=profile, as_of=when)
            errors = [i for i in issues if i.is_error]
            warnings = [i for i in issues if i.severity == "warning"]
            failed = failed or bool(errors)
            if output_format == "json":
                out.print_json(orjson.dumps(operation_outcome(issues)).decode())
                continue
            for issue in issues:
                if issue.severity in ("fatal", "error", "warning"):
                    out.print(f"{path}: {issue.line()}", markup=False)
            try:
                content = _summary(jsonio.loads(data))
            except orjson.JSONDecodeError:
                content = "(not JSON)"
            invalid += bool(errors)
            table.add_row(
                path.name,
                content,
                str(len(errors)),
                str(len(warnings)),
                "[red]invalid[/red]" if errors else "[green]valid[/green]",
            )
        if output_format == "text":
            out.print(table)
            out.print(
                f"{len(paths)} file(s): {len(paths) - invalid} valid, {invalid} invalid",
                markup=False,
            )
    raise typer.Exit(1 if failed else 0)


def _instant(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(f"--at {text!r} is not a date-time (e.g. 2026-11-01T10:00:00Z)") from None
    if moment.tzinfo is None:
        raise _fail(f"--at {text!r} needs a time zone (e.g. Z or +01:00)")
    return moment


def _is_standard_output(path: Path) -> bool:
    """Whether a path is where standard output goes (/dev/stdout, or the file it is
    redirected to)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError):  # not there yet, or standard output is no file
        return False


def _write(path: Path, data: bytes, what: str) -> None:
    _write_together([(path, data, what)])


# A step written last, once the files are in place: where it goes, what it is, and
# the writing (e.g. the outgoing Bundle to standard output).
Last = tuple[str, str, Callable[[], None]]


def _write_together(
    files: list[tuple[Path, bytes, str]],
    *,
    last: Last | None = None,
    nothing: str = "nothing was written",
) -> None:
    """Write every file or none: each goes to a file of its own beside its place (the
    place a symbolic link names), and all are moved into place once every one is
    written, the first last; a move that fails puts back what the others replaced. A
    disclosure's AuditEvent must not be left recording a Bundle that could not be
    written, nor the reverse. A file replaced keeps its permissions; a device or pipe
    (/dev/stdout) is written as it is, once the files are in place, and then `last`:
    if either fails the files are put back as they were (what a device or pipe took
    cannot be taken back, and is named). `nothing`: what the message says of that."""
    targets = [(path.resolve(), data, what) for path, data, what in files]
    if len({path for path, _, _ in targets}) != len(targets):
        raise _fail("the files to write must differ (--out and --audit name one file)", 1)
    for path, _, what in targets:
        if path.is_dir():
            raise _fail(f"{path}: cannot write the {what} (a folder); {nothing}", 1)
    streams = [(p, d, w) for p, d, w in targets if p.exists() and not p.is_file()]
    written: list[tuple[Path, Path]] = []
    try:
        for path, data, what in targets:
            if (path, data, what) in streams:
                continue
            spare = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                _write_private(spare, data, like=path if path.exists() else None)
            except OSError as exc:
                raise _fail(
                    f"{path}: cannot write the {what} ({exc.strerror or exc}); {nothing}", 1
                ) from None
            written.append((spare, path))
        moved = _move_into_place(written, nothing)
        written = []
    finally:
        for spare, _ in written:
            spare.unlink(missing_ok=True)
    steps: list[Last] = [
        (str(path), what, partial(_write_stream, path, data)) for path, data, what in streams
    ]
    for n, (where, what, step) in enumerate([*steps, *([last] if last else [])]):
        try:
            step()
        except OSError as exc:
            _put_back(moved)
            gone = ", ".join(where for where, _, _ in steps[:n])
            told = f"; what went to {gone} cannot be taken back" if gone else ""
            raise _fail(
                f"{where}: cannot write the {what} ({exc.strerror or exc}); {nothing}{told}", 1
            ) from None
    for _, before in moved:
        if before is not None:
            before.unlink(missing_ok=True)


def _write_stream(path: Path, data: bytes) -> None:
    with path.open("wb") as stream:
        stream.write(data)


def _move_into_place(
    moves: list[tuple[Path, Path]], nothing: str
) -> list[tuple[Path, Path | None]]:
    """Move each spare onto its path, the last first; all, or none. What each path held
    before is set aside (`_put_back` puts it back), for the caller to remove."""
    done: list[tuple[Path, Path | None]] = []  # path, what it held before (set aside)
    try:
        for spare, path in reversed(moves):
            before = (
                path.with_name(f".{path.name}.{uuid.uuid4().hex}.old") if path.exists() else None
            )
            if before is not None:
                os.replace(path, before)
            done.append((path, before))
            os.replace(spare, path)
    except OSError as exc:
        _put_back(done)
        raise _fail(f"{path}: cannot write ({exc.strerror or exc}); {nothing}", 1) from None
    return done


def _put_back(done: list[tuple[Path, Path | None]]) -> None:
    """Each path as it was before `_move_into_place`: gone, or what it held."""
    for path, before in reversed(done):
        path.unlink(missing_ok=True)
        if before is not None:
            os.replace(before, path)


def _abandon_standard_output() -> None:
    """Standard output pointed at the null device once it could not be written: what
    is still buffered would otherwise fail again at exit, with a traceback."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file (a test's capture): nothing is flushed at exit
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)


@contextmanager
def _standard_output(code: int = 2) -> Iterator[None]:
    """What a command prints, one line on standard error and exit `code` if standard
    output cannot be written (a full disk, a closed pipe), not a traceback."""
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        _abandon_standard_output()
        raise _fail(f"cannot write to standard output ({exc.strerror or exc})", code) from None


def _to_standard_output(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except OSError:
        _abandon_standard_output()
        raise


def _write_private(spare: Path, data: bytes, *, like: Path | None) -> None:
    """A new file readable by its owner alone while it is written; then with the
    permissions of the file it replaces, or those a new file gets here."""
    descriptor = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
    if like is not None:
        shutil.copymode(like, spare)
    else:
        mask = os.umask(0)
        os.umask(mask)
        spare.chmod(0o666 & ~mask)


@app.command()
def share(
    record: Annotated[Path, typer.Argument(help="A patient's record: a collection Bundle.")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="gp, social-care, probation, police, children-services, voluntary-provider, "
            "private-provider or health-board (append :ID to pick one), or carer:ID.",
        ),
    ],
    purpose: Annotated[
        str, typer.Option("--purpose", help="HL7 purpose of use, e.g. TREAT, COC, FAMRQT.")
    ],
    audit: Annotated[
        Path, typer.Option("--audit", help="Write the disclosure's AuditEvent to this file.")
    ],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write the outgoing Bundle here instead of standard output."),
    ] = None,
    exception: Annotated[
        list[str] | None,
        typer.Option(
            "--exception",
            help="Invoke a legal basis for disclosure without consent (repeatable): "
            "public-protection, child-protection, adult-protection, carers-need-to-know.",
        ),
    ] = None,
    requester: Annotated[
        str | None,
        typer.Option("--requester", help="Who asks, e.g. Practitioner/ID (default: the trust)."),
    ] = None,
    at: Annotated[
        str | None, typer.Option("--at", help="Time of disclosure (default: now).")
    ] = None,
    policy_file: Annotated[
        Path | None,
        typer.Option(
            "--policy", help="Sharing policy (default: the project's policy/sharing.toml)."
        ),
    ] = None,
    package: PackageOption = None,
) -> None:
    """Share what consent or the law allows from a record with one recipient.

    The outgoing Bundle goes to standard output (or --out), what was withheld
    and why to standard error, and the AuditEvent to --audit. Anything that
    cannot be evaluated shares nothing (exit 1).
    """
    when = _instant(at)
    try:
        data = record.read_bytes()
    except OSError as exc:
        raise _fail(f"{record}: cannot read ({exc.strerror or exc})") from None
    try:
        bundle = jsonio.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"{record}: not JSON ({exc})") from None
    try:
        policy = load_policy(policy_file)
    except FhirError as exc:
        raise _fail(exc.message) from None
    loaded = _package(package)
    try:
        disclosure = share_record(
            bundle,
            ShareRequest(to, purpose, tuple(exception or ()), requester),
            policy,
            at=when,
            new_id=lambda: str(uuid.uuid4()),
            required=RequiredElements(loaded),
        )
    except FhirError as exc:
        raise _fail(f"sharing refused, nothing was shared: {exc.message}", 1) from None
    for line in disclosure.withheld_summary():
        err.print(line, markup=False)
    if disclosure.bundle is None or disclosure.audit_event is None:
        raise _fail("nothing was shared", 1)
    # The last guard: what leaves must conform to the profiles.
    try:
        problems = [i for i in Validator(loaded).validate(disclosure.bundle) if i.is_error]
    except RecursionError:
        raise _fail(
            "sharing refused, nothing was shared: the record nests too deeply to be checked", 1
        ) from None
    if problems:
        for issue in problems:
            err.print(issue.line(), markup=False)
        raise _fail("sharing refused, nothing was shared: the outgoing Bundle is not valid", 1)
    event = jsonio.dumps(disclosure.audit_event, option=orjson.OPT_INDENT_2) + b"\n"
    body = jsonio.dumps(disclosure.bundle, option=orjson.OPT_INDENT_2) + b"\n"
    if out_file is None:
        if _is_standard_output(audit):
            # The Bundle would overwrite the record of its own disclosure, or the reverse.
            raise _fail(
                "--audit names standard output, where the outgoing Bundle goes: give "
                "--out or another --audit file; nothing was shared",
                1,
            )
        # The AuditEvent is put in place, then the Bundle sent; if it cannot be sent the
        # AuditEvent is taken back, so that it records no disclosure that did not happen.
        _write_together(
            [(audit, event, "AuditEvent")],
            last=("standard output", "outgoing Bundle", partial(_to_standard_output, body)),
            nothing="nothing was shared",
        )
    else:
        _write_together([(audit, event, "AuditEvent"), (out_file, body, "outgoing Bundle")])
    err.print(
        f"shared {len(disclosure.shared)} resource(s) with {disclosure.decision.recipient.reference}"
        f" for {purpose}; withheld {len(disclosure.withheld)} item(s)",
        markup=False,
    )


@profiles_app.command("build")
def profiles_build(package: PackageOption = None) -> None:
    """Regenerate the snapshots of the package's StructureDefinitions in place."""
    folder = package or default_package_dir()
    try:
        loaded = load_package(folder, rebuild_snapshots=True)
    except FhirError as exc:
        raise _fail(exc.message) from None
    written = 0
    for path in sorted(folder.glob("StructureDefinition-*.json")):
        sd = jsonio.loads(path.read_bytes())
        built = loaded.own.get(sd.get("url", ""))
        if built is None:
            continue
        sd["snapshot"] = built["snapshot"]
        new = jsonio.dumps(sd, option=orjson.OPT_INDENT_2) + b"\n"
        if new != path.read_bytes():
            try:
                path.write_bytes(new)
            except OSError as exc:
                raise _fail(f"{path}: cannot write ({exc.strerror or exc})", 1) from None
            written += 1
    with _standard_output():
        out.print(f"{written} StructureDefinition(s) updated in {folder}", markup=False)


DbOption = Annotated[
    str,
    typer.Option("--db", help="Store URL: sqlite:///FILE (default) or postgresql://USER@HOST/DB."),
]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _open_sandbox(db: str) -> Any:
    from cpa_fhir.sandbox import open_sandbox

    try:
        return open_sandbox(db)
    except FhirError as exc:
        raise _fail(exc.message) from None
    except Exception as exc:  # a database that cannot be reached or opened
        raise _fail(f"cannot open the store {db}: {_first_line(exc)}") from None


@sandbox_app.callback()
def sandbox(
    ctx: typer.Context,
    db: DbOption = "sqlite:///cpa-sandbox.db",
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free one).")
    ] = 8080,
) -> None:
    """Start the sandbox: create the schema, load patients A–D into an empty store, serve."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from cpa_fhir.sandbox import create_app, seed_examples

    # Listen before anything else: an address that cannot be had is said at once,
    # not after a banner naming it (and the port chosen for 0 is the one printed).
    listening = _listen(host, port)
    box = _open_sandbox(db)
    try:
        loaded = seed_examples(box)
    except BaseException as exc:
        box.close()
        for sock in listening:
            sock.close()
        if not isinstance(exc, Exception):
            raise  # Ctrl-C and the like end the command as they would anywhere else
        # A store that opens but cannot take the examples, e.g. a file whose tables
        # are someone else's: the database's own first line says why.
        why = exc.message if isinstance(exc, FhirError) else _first_line(exc)
        raise _fail(f"cannot load the example patients into {db}: {why}", 1) from None
    port = listening[0].getsockname()[1]
    base = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    try:
        with _standard_output(1):
            if loaded:
                out.print(f"loaded the example patients A–D: {loaded} resources", markup=False)
            out.print(
                f"FHIR base URL: {base}/fhir  (CapabilityStatement at {base}/fhir/metadata)",
                markup=False,
            )
            out.print(
                f"get a token:   cpa-fhir sandbox token --client gp --db {db}\n"
                f"   or:         curl -s -d grant_type=client_credentials -d client_id=gp "
                f"-d client_secret=gp-demo-secret {base}/token\n"
                f"then:          curl -H 'Authorization: Bearer TOKEN' {base}/fhir/CarePlan?subject=Patient/c-patient\n"
                f"clients:       {', '.join(sorted(box.registry.clients))} (sandbox/clients.toml)",
                markup=False,
            )
        server = uvicorn.Server(uvicorn.Config(create_app(box), log_level="warning"))
        server.run(sockets=listening)
    finally:
        for sock in listening:
            sock.close()
        box.close()


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address the host names (`localhost`: 127.0.0.1 and
    ::1, where the machine has both), on one port; a one-line error if there is none
    to have. An address the machine cannot listen on (IPv6 turned off, say) is passed
    over if another can be had. With port 0 the system chooses a port on the first
    address; should another program hold it on another address, a port is chosen
    again, so that the host name reaches this server alone."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(
            dict.fromkeys((int(family), str(sockaddr[0])) for family, *_, sockaddr in found)
        )
        for _ in range(_PORT_CHOICES if port == 0 else 1):
            sockets = _listen_at(addresses, port)
            if sockets is not None:
                return sockets
        raise OSError(errno.EADDRINUSE, "no port the system chose was free at every address")
    except OSError as exc:
        why = (exc.strerror or str(exc)).split(" (while attempting")[0]
        raise _fail(f"cannot listen on {host} port {port}: {why}", 1) from None
    except UnicodeError as exc:
        # A host name the idna codec cannot encode (an empty label, or one over 63
        # characters) fails before any lookup, as UnicodeError rather than OSError.
        raise _fail(f"cannot listen on {host} port {port}: {exc}", 1) from None


_PORT_CHOICES = 10


def _listen_at(addresses: list[tuple[int, str]], port: int) -> list[socket.socket] | None:
    """Sockets on one port at each address; None if, with port 0, the port chosen at
    the first is taken at another."""
    sockets: list[socket.socket] = []
    unusable: OSError | None = None
    try:
        for family, address in addresses:
            chosen = port or (sockets[0].getsockname()[1] if sockets else 0)
            try:
                sockets.append(socket.create_server((address, chosen), family=family, backlog=2048))
            except OSError as exc:
                if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    unusable = exc
                    continue
                if port == 0 and sockets and exc.errno == errno.EADDRINUSE:
                    for taken in sockets:
                        taken.close()
                    return None
                raise
        if not sockets:
            raise unusable or OSError(errno.EADDRNOTAVAIL, "the host names no address")
        return sockets
    except BaseException:
        for taken in sockets:
            taken.close()
        raise


@sandbox_app.command("token")
def sandbox_token(
    client: Annotated[str, typer.Option("--client", help="A client of sandbox/clients.toml.")],
    db: DbOption = "sqlite:///cpa-sandbox.db",
    issuer: Annotated[
        str, typer.Option("--issuer", help="Base URL the token names.")
    ] = "http://127.0.0.1:8080/fhir",
) -> None:
    """Print a bearer token for one of the sandbox's clients (valid on that store)."""
    box = _open_sandbox(db)
    try:
        token = box.token_for(client, issuer)
    except FhirError as exc:
        raise _fail(exc.message) from None
    with _standard_output():
        out.print(token["access_token"], markup=False)


def main() -> None:
    try:
        app()
    except FhirError as exc:
        err.print(f"cpa-fhir: {exc.message}", markup=False)
        sys.exit(2)
    except OSError as exc:
        # What no command caught: the help or a usage message that standard output
        # cannot take, or a file; one line all the same.
        if exc.filename is None:
            _abandon_standard_output()
            message = f"cannot write to standard output ({exc.strerror or exc})"
        else:
            message = f"{exc.filename}: {exc.strerror or exc}"
        err.print(f"cpa-fhir: {message}", markup=False)
        sys.exit(2)


__all__ = ["app", "main"]
