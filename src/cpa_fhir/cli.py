"""The `cpa-fhir` command line (the edge: files, standard streams, exit codes)."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cpa_fhir.conformance.package import ConformancePackage, default_package_dir, load_package
from cpa_fhir.errors import FhirError
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
        names = patients[0].get("name") or [{}]
        name = names[0] if isinstance(names, list) and names else {}
        given = " ".join(name.get("given", [])) if isinstance(name, dict) else ""
        family = name.get("family", "") if isinstance(name, dict) else ""
        who = f"record of {given} {family}".replace("  ", " ").strip() + ": "
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
            content = _summary(orjson.loads(data))
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
            f"{len(paths)} file(s): {len(paths) - invalid} valid, {invalid} invalid", markup=False
        )
    raise typer.Exit(1 if failed else 0)


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
        sd = orjson.loads(path.read_bytes())
        built = loaded.own.get(sd.get("url", ""))
        if built is None:
            continue
        sd["snapshot"] = built["snapshot"]
        new = orjson.dumps(sd, option=orjson.OPT_INDENT_2) + b"\n"
        if new != path.read_bytes():
            path.write_bytes(new)
            written += 1
    out.print(f"{written} StructureDefinition(s) updated in {folder}", markup=False)


def main() -> None:
    try:
        app()
    except FhirError as exc:
        err.print(f"cpa-fhir: {exc.message}", markup=False)
        sys.exit(2)


__all__ = ["app", "main"]
