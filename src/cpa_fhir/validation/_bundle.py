"""The Bundle invariants of FHIR R4 (bdl-1 … bdl-12), checked natively (pure).

https://hl7.org/fhir/R4/bundle.html#invs — the same rules as the FHIRPath
expressions in the Bundle definition, without evaluating them entry by entry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from cpa_fhir.fhir.outcome import Issue

_SEARCH_OR_HISTORY = {"searchset", "history"}
_REQUESTS = {"batch", "transaction", "history"}
_RESPONSES = {"batch-response", "transaction-response", "history"}


def check_bundle(bundle: dict[str, Any]) -> list[Issue]:
    return list(_issues(bundle))


def _issues(b: dict[str, Any]) -> Iterator[Issue]:
    kind = b.get("type") if isinstance(b.get("type"), str) else None
    raw_entries = b.get("entry")
    entries: list[Any] = raw_entries if isinstance(raw_entries, list) else []

    def err(key: str, message: str, loc: str = "Bundle") -> Issue:
        return Issue("error", "invariant", f"{message} ({key})", loc, key)

    if "total" in b and kind not in _SEARCH_OR_HISTORY:
        yield err("bdl-1", "total only when a search or history")
    if kind == "document":
        if "identifier" not in b:
            yield err("bdl-9", "A document must have an identifier with a system and a value")
        if "timestamp" not in b:
            yield err("bdl-10", "A document must have a date")
        first = entries[0].get("resource", {}) if entries and isinstance(entries[0], dict) else {}
        if first.get("resourceType") != "Composition":
            yield err("bdl-11", "A document must have a Composition as the first resource")
    if kind == "message":
        first = entries[0].get("resource", {}) if entries and isinstance(entries[0], dict) else {}
        if first.get("resourceType") != "MessageHeader":
            yield err("bdl-12", "A message must have a MessageHeader as the first resource")
    versions: Counter[tuple[str, str]] = Counter()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            continue
        loc = f"Bundle.entry[{i}]"
        if "search" in e and kind != "searchset":
            yield err("bdl-2", "entry.search only when a search", loc)
        if ("request" in e) != (kind in _REQUESTS):
            yield err(
                "bdl-3",
                "entry.request mandatory for batch/transaction/history, otherwise prohibited",
                loc,
            )
        if ("response" in e) != (kind in _RESPONSES):
            yield err(
                "bdl-4",
                "entry.response mandatory for batch-response/transaction-response/history, otherwise prohibited",
                loc,
            )
        if not ({"resource", "request", "response"} & set(e)):
            yield err("bdl-5", "must be a resource unless there's a request or response", loc)
        full_url = e.get("fullUrl")
        if isinstance(full_url, str):
            if "/_history/" in full_url:
                yield err(
                    "bdl-8", "fullUrl cannot be a version specific reference", f"{loc}.fullUrl"
                )
            res = e.get("resource")
            version = (
                res.get("meta", {}).get("versionId", "")
                if isinstance(res, dict) and isinstance(res.get("meta"), dict)
                else ""
            )
            versions[(full_url, str(version))] += 1
    for (full_url, _), count in versions.items():
        if count > 1:
            yield err(
                "bdl-7",
                f"FullUrl must be unique in a bundle, or else entries with the same fullUrl must have different meta.versionId: {full_url} repeats",
            )
