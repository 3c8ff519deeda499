"""References inside resources: where they are, and the `Type/id` they name."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

Path = tuple[str | int, ...]
# The elements by which a resource names the patient whose record it is in.
PATIENT_ELEMENTS = ("subject", "patient", "for", "beneficiary")


def foreign_subjects(
    resource: Any, urls: Mapping[str, str], patient: Mapping[str, Any]
) -> list[str]:
    """Who a resource, or a resource it contains, names as the one whose record it is
    in, where that is not `patient` or cannot be told to be: another `Patient/ID` (as
    resolved in a record whose fullUrls are `urls`), another server's patient, a
    contained Patient, an identifier not the patient's, a display alone."""
    ours = f"Patient/{patient.get('id')}"
    identifiers = {
        (i.get("system"), i.get("value"))
        for i in (patient.get("identifier") or [])
        if isinstance(i, dict)
    }
    contained = _contained(resource)
    found: list[str] = []
    for item in [resource, *contained]:
        for name in PATIENT_ELEMENTS:
            value = item.get(name)
            for ref in value if isinstance(value, list) else [value]:
                if not isinstance(ref, dict):
                    continue
                url = ref.get("reference")
                ident = ref.get("identifier")
                if isinstance(url, str):
                    if url.startswith("#"):
                        inner = next((c for c in contained if c.get("id") == url[1:]), None)
                        if inner is None or inner.get("resourceType") == "Patient":
                            found.append(url)
                        continue
                    target = resolve(url, urls)
                    if target is None and "://" in url and "/Patient/" in url:
                        found.append(url)  # another server's patient
                    elif target is not None and target.startswith("Patient/") and target != ours:
                        found.append(target)
                elif isinstance(ident, dict):
                    if (ident.get("system"), ident.get("value")) not in identifiers:
                        found.append(f"identifier {ident.get('system')}|{ident.get('value')}")
                elif ref:
                    found.append(str(ref.get("display", "a reference to no one")))
    return found


def _contained(resource: Any) -> list[dict[str, Any]]:
    contained = resource.get("contained") if isinstance(resource, dict) else None
    return [c for c in contained if isinstance(c, dict)] if isinstance(contained, list) else []


def reference_key(ref: Any) -> str | None:
    """`Type/id` of a relative reference (history suffix dropped), else None: an
    absolute URL, even of a version, may name another server's resource of that id."""
    if not isinstance(ref, str) or "://" in ref or ref.startswith("urn:"):
        return None
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        return f"{parts[-4]}/{parts[-3]}"
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return f"{parts[-2]}/{parts[-1]}"
    return None


def references(node: Any, path: Path = ()) -> Iterator[tuple[Path, str]]:
    """Every object with a `reference` string, depth first in document order, and where it is."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            yield path, ref
        for k, v in node.items():
            if isinstance(v, (dict, list)):
                yield from references(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from references(v, (*path, i))


def resolve(ref: str, by_url: Mapping[str, str]) -> str | None:
    """The `Type/id` a reference names in a record whose entries' fullUrls are `by_url`:
    by fullUrl (of the entry, or of a version of it), else as a relative reference."""
    if ref in by_url:
        return by_url[ref]
    if "/_history/" in ref:
        current = by_url.get(ref[: ref.index("/_history/")])
        if current is not None:
            return current
    return reference_key(ref)
