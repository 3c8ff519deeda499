"""References between the entries of a Bundle (pure).

https://hl7.org/fhir/R4/bundle.html#references — a relative reference resolves
against the fullUrl of the entry that holds it; `urn:uuid:` and absolute
references must match a fullUrl. In a collection (a patient record) every
reference must resolve inside the Bundle; transactions and batches may point
at resources the server already holds, so there they are not checked.
"""

from __future__ import annotations

import re
from typing import Any

from cpa_fhir.conformance.package import ConformancePackage
from cpa_fhir.fhir.models import bundle_entries, declared_profiles
from cpa_fhir.fhir.outcome import Issue
from cpa_fhir.validation._walker import ReferenceSite

_RELATIVE = re.compile(
    r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(/_history/[A-Za-z0-9\-.]{1,64})?$"
)
_ENTRY = re.compile(r"^Bundle\.entry\[(\d+)\]")
_BASE = "http://hl7.org/fhir/StructureDefinition/"


def _base_of(full_url: str) -> str | None:
    m = re.match(r"^(.*/)[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$", full_url)
    return m.group(1) if m else None


def check_references(
    bundle: dict[str, Any], sites: list[ReferenceSite], package: ConformancePackage
) -> list[Issue]:
    kind = bundle.get("type")
    if kind in ("transaction", "batch", "transaction-response", "batch-response"):
        return []
    entries = dict(bundle_entries(bundle))
    by_full_url: dict[str, dict[str, Any]] = {}
    by_type_id: dict[str, dict[str, Any]] = {}
    for e in entries.values():
        res = e.get("resource")
        if not isinstance(res, dict):
            continue
        if isinstance(e.get("fullUrl"), str):
            by_full_url[e["fullUrl"]] = res
        if "id" in res:
            by_type_id[f"{res.get('resourceType')}/{res['id']}"] = res
    strict = kind in ("collection", "document")
    issues: list[Issue] = []
    for site in sites:
        ref = site.reference
        if ref.startswith("#"):
            continue
        target = _resolve(ref, site.location, entries, by_full_url, by_type_id)
        if target is None:
            if (
                ref.startswith(("http://", "https://"))
                and ref not in by_full_url
                and _base_of(ref) is None
            ):
                continue
            if strict:
                issues.append(
                    Issue(
                        "error",
                        "not-found",
                        f"Reference '{ref}' does not resolve to any entry of this Bundle",
                        site.location,
                        "cpa-rec-references",
                    )
                )
            continue
        issues.extend(_check_target(site, target, package))
    return issues


def _resolve(
    ref: str,
    location: str,
    entries: dict[int, dict[str, Any]],
    by_full_url: dict[str, dict[str, Any]],
    by_type_id: dict[str, dict[str, Any]],
) -> dict[str, Any] | None:
    if ref in by_full_url:
        return by_full_url[ref]
    m = _RELATIVE.match(ref)
    if not m:
        return None
    plain = f"{m.group(1)}/{m.group(2)}"
    entry_match = _ENTRY.match(location)
    if entry_match:
        index = int(entry_match.group(1))
        full_url = entries.get(index, {}).get("fullUrl")
        base = _base_of(full_url) if isinstance(full_url, str) else None
        if base and base + plain in by_full_url:
            return by_full_url[base + plain]
    return by_type_id.get(plain)


def _check_target(
    site: ReferenceSite, target: dict[str, Any], package: ConformancePackage
) -> list[Issue]:
    if not site.target_profiles:
        return []
    rt = target.get("resourceType")
    if not isinstance(rt, str):
        return []  # not a resource; reported where the entry is walked
    allowed_types: dict[str, list[str]] = {}
    for url in site.target_profiles:
        sd = package.resolve(url)
        t = sd.get("type") if sd else url.removeprefix(_BASE)
        allowed_types.setdefault(str(t), []).append(url)
    if rt not in allowed_types and "Resource" not in allowed_types:
        return [
            Issue(
                "error",
                "invalid",
                f"Reference '{site.reference}' points to a {rt}; allowed: {', '.join(sorted(allowed_types))}",
                site.location,
                "cpa-rec-references",
            )
        ]
    wanted = [u for u in allowed_types.get(str(rt), []) if not u.startswith(_BASE)]
    if not wanted:
        return []
    if any(_derives_from(p, w, package) for p in declared_profiles(target) for w in wanted):
        return []
    return [
        Issue(
            "error",
            "invalid",
            f"Reference '{site.reference}' must point to a {rt} conforming to {', '.join(wanted)}",
            site.location,
            "cpa-rec-references",
        )
    ]


def _derives_from(url: str, ancestor: str, package: ConformancePackage) -> bool:
    seen = set()
    while url and url not in seen:
        if url == ancestor:
            return True
        seen.add(url)
        sd = package.resolve(url)
        url = sd.get("baseDefinition", "") if sd else ""
    return False
