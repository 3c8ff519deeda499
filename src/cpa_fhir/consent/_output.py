"""How content is labelled when it leaves: meta.security, and REDACTED where something was removed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cpa_fhir.consent._policy import (
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    HANDLING_SYSTEM,
    SENSITIVITY_SYSTEM,
    SharingPolicy,
)

REDACTED = {"system": HANDLING_SYSTEM, "code": "REDACTED", "display": "redacted"}


def security_labels(categories: Iterable[str], policy: SharingPolicy) -> list[dict[str, str]]:
    """meta.security codings for content carrying these categories."""
    cats = sorted(set(categories))
    level = policy.category_levels(frozenset(cats))
    out = [{"system": CONFIDENTIALITY_SYSTEM, "code": level}]
    sensitivity = sorted({s for c in cats for s in policy.categories[c].sensitivity})
    out += [{"system": SENSITIVITY_SYSTEM, "code": s} for s in sensitivity]
    out += [{"system": CATEGORY_SYSTEM, "code": c} for c in cats]
    return out


def outgoing_resource(
    content: dict[str, Any], categories: Iterable[str], redacted: bool, policy: SharingPolicy
) -> dict[str, Any]:
    """The resource as it leaves: a new top level and meta, labelled; the rest shared
    with `content`. Its narrative and tags stay behind: free text no rule reads (a
    narrative may say more than the elements it was written from, or hold what was
    removed from them), which the structured content it goes with makes redundant."""
    out = dict(content)
    out.pop("text", None)
    contained = out.get("contained")
    if isinstance(contained, list):
        # What it contains goes under the container's labels, as bare as it is.
        out["contained"] = [_bare(inner) for inner in contained]
    meta = _kept_meta(out.get("meta"))
    labels = security_labels(categories, policy)
    if redacted:
        labels.append(dict(REDACTED))
    meta["security"] = labels
    out["meta"] = meta
    return out


def _bare(resource: Any) -> Any:
    """A contained resource without narrative, tags or labels of its own."""
    if not isinstance(resource, dict):
        return resource
    out = {k: v for k, v in resource.items() if k != "text"}
    if "meta" in out:
        kept = _kept_meta(out["meta"])
        if kept:
            out["meta"] = kept
        else:
            del out["meta"]
    return out


# What of a resource's meta goes: its version, time and profiles. Not its tags, labels
# (the recipient's are made afresh), source (the sending system, which can name a
# prison's or probation's EPR) or extensions: text no rule reads.
META_SHARED = ("versionId", "lastUpdated", "profile")


def _kept_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        return {}
    return {k: meta[k] for k in META_SHARED if k in meta}
