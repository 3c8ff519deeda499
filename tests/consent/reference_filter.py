"""The consent filter as it was first written: a test oracle for the fast one.

Straightforward and slow on purpose: every resource that changes is deep-copied,
references are found by walking the whole resource each time round the fixpoint
loop, and required elements are checked on every shared resource. The fast
filter (`cpa_fhir.consent.filter_record`) must give exactly what this gives.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cpa_fhir.conformance.package import ConformancePackage
from cpa_fhir.consent._decision import Decision
from cpa_fhir.consent._filtering import WithheldItem
from cpa_fhir.consent._labelling import ElementLabel, LabelledResource, Path
from cpa_fhir.consent._policy import (
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    HANDLING_SYSTEM,
    SENSITIVITY_SYSTEM,
    SharingPolicy,
)

DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
MASKED = {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]}
REDACTED = {"system": HANDLING_SYSTEM, "code": "REDACTED", "display": "redacted"}
_BASE = "http://hl7.org/fhir/StructureDefinition/"
# `Type/id`, perhaps with a path before it and a version after it.
_TYPE_ID = re.compile(r"(?:.*/)?([A-Z][A-Za-z]*)/([^/]+)(/_history/[^/]+)?")
_LEVELS = "NRV"  # HL7 confidentiality, least to most restricted, as far as CPA uses it


def reference_key(ref: str) -> str | None:
    """The `Type/id` a reference names without the record's fullUrls: a relative one
    (https://hl7.org/fhir/R4/references.html#literal); an absolute URL, even of a
    version, is found by fullUrl only, urn: ones never."""
    found = _TYPE_ID.fullmatch(ref)
    if found is None or ref.startswith("urn:") or "://" in ref:
        return None
    return f"{found.group(1)}/{found.group(2)}"


def security_labels(categories: set[str], policy: SharingPolicy) -> list[dict[str, str]]:
    """meta.security of content carrying the categories: the most restrictive of their
    confidentiality codes, then their sensitivity codes, then the categories, each sorted."""
    kinds = [policy.categories[c] for c in categories]
    level = max((k.confidentiality for k in kinds), key=_LEVELS.index, default="N")
    sensitivity = sorted({code for k in kinds for code in k.sensitivity})
    return [
        {"system": CONFIDENTIALITY_SYSTEM, "code": level},
        *({"system": SENSITIVITY_SYSTEM, "code": code} for code in sensitivity),
        *({"system": CATEGORY_SYSTEM, "code": c} for c in sorted(categories)),
    ]


@dataclass(frozen=True, slots=True)
class FilterResult:
    shared: list[tuple[str | None, dict[str, Any]]]  # (fullUrl, resource) in record order
    withheld: list[WithheldItem]
    shared_categories: frozenset[str]


class RequiredElements:
    """Which elements a resource must keep to stay valid, from the profiles' snapshots."""

    def __init__(self, package: ConformancePackage | None) -> None:
        self._package = package
        self._by_url: dict[str, tuple[tuple[str, ...], ...]] = {}

    def _paths(self, url: str) -> tuple[tuple[str, ...], ...]:
        if url not in self._by_url:
            sd = self._package.resolve(url) if self._package is not None else None
            paths: list[tuple[str, ...]] = []
            for el in (sd or {}).get("snapshot", {}).get("element", []):
                steps = tuple(el["path"].split(".")[1:])
                if steps == ("extension",) and "sliceName" in el and el.get("min", 0) >= 1:
                    # A required slice of the resource's own extensions, by its URL.
                    urls = [u for k in el.get("type") or [] for u in k.get("profile") or []]
                    if urls:
                        paths.append((f"extension('{urls[0]}')",))
                    continue
                if (
                    el.get("min", 0) >= 1
                    and steps
                    and "sliceName" not in el
                    and "extension" not in steps
                    and "modifierExtension" not in steps
                ):
                    paths.append(steps)
            self._by_url[url] = tuple(paths)
        return self._by_url[url]

    def missing(self, resource: Mapping[str, Any]) -> str | None:
        """The first required element the resource lacks, as a path, or None."""
        meta = resource.get("meta")
        urls = list(meta.get("profile") or []) if isinstance(meta, dict) else []
        urls.append(_BASE + str(resource.get("resourceType")))
        for url in urls:
            for steps in self._paths(url):
                if not _present(resource, steps):
                    return f"{resource.get('resourceType')}.{'.'.join(steps)}"
        return None


def _present(node: Any, steps: Sequence[str]) -> bool:
    """Whether every instance of the parent path has the last step."""
    if isinstance(node, list):
        return all(_present(item, steps) for item in node)
    if not isinstance(node, dict):
        return True
    head = steps[0]
    if head.startswith("extension('"):
        url = head[len("extension('") : -2]
        return any(isinstance(e, dict) and e.get("url") == url for e in node.get("extension") or [])
    if head.endswith("[x]"):
        stem = head[:-3]
        keys = [k for k in node if k.startswith(stem) and k[len(stem) : len(stem) + 1].isupper()]
    else:
        keys = [head] if head in node else []
    if len(steps) == 1:
        return bool(keys)
    # A parent that is absent needs none of its children.
    return all(_present(node[k], steps[1:]) for k in keys)


def _remove(resource: dict[str, Any], paths: list[Path]) -> None:
    """Remove elements; list items from the end so earlier indices stay valid."""
    # List items become a placeholder first, so the indices of the others stay valid.
    for path in paths:
        _remove_one(resource, path)


def _remove_one(node: Any, path: Path) -> None:
    parents: list[Any] = [node]
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return
        parents.append(node)
    last = path[-1]
    try:
        if isinstance(last, int):
            node[last] = _GONE
        else:
            node.pop(last, None)
            node.pop(f"_{last}", None)
    except (IndexError, TypeError, AttributeError):
        return


_GONE: Any = object()


def _prune(node: Any) -> Any:
    """Drop removed list items and the empty objects and lists removal leaves."""
    if isinstance(node, dict):
        for k in list(node):
            v = _prune(node[k])
            if v is _GONE or v == {} or v == []:
                del node[k]
            else:
                node[k] = v
        return node
    if isinstance(node, list):
        kept = [_prune(v) for v in node if v is not _GONE]
        return [v for v in kept if v is not _GONE and v != {} and v != []]
    return node


def _references(node: Any, path: Path = ()) -> Iterator[tuple[Path, str]]:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            yield path, ref
        for k, v in node.items():
            if isinstance(v, (dict, list)):
                yield from _references(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _references(v, (*path, i))


def _get(node: Any, path: Path) -> Any:
    for step in path:
        node = node[step]
    return node


def _set(node: Any, path: Path, value: Any) -> None:
    _get(node, path[:-1])[path[-1]] = value


class _Resolver:
    """Maps a reference, relative or by fullUrl, to the Type/id of a record entry."""

    def __init__(self, record: Sequence[LabelledResource]) -> None:
        self.by_url = {r.full_url: r.key for r in record if r.full_url}

    def __call__(self, ref: str) -> str | None:
        if ref in self.by_url:
            return self.by_url[ref]
        versioned = re.fullmatch(r"(.*)/_history/[^/]+", ref)
        if versioned is not None and versioned.group(1) in self.by_url:
            return self.by_url[versioned.group(1)]
        return reference_key(ref)


def filter_record(
    record: Sequence[LabelledResource],
    decision: Decision,
    policy: SharingPolicy,
    required: RequiredElements,
) -> FilterResult:
    """Apply a decision to a labelled record. Pure: the input is not changed."""
    allowed = frozenset(decision.allowed)
    withheld: list[WithheldItem] = []
    kept: dict[str, LabelledResource] = {}
    for item in record:
        denied = item.categories - allowed
        if denied:
            withheld.append(WithheldItem(item.key, None, denied, _why(denied, decision)))
        else:
            kept[item.key] = item

    # Element labels: copy a resource only when something inside it must go.
    content: dict[str, dict[str, Any]] = {}
    redacted: set[str] = set()
    element_categories: dict[str, set[str]] = {}
    for key, item in kept.items():
        doomed: list[ElementLabel] = [e for e in item.elements if e.categories - allowed]
        element_categories[key] = {
            c for e in item.elements if not (e.categories - allowed) for c in e.categories
        }
        if not doomed:
            content[key] = item.resource
            continue
        copied = copy.deepcopy(item.resource)
        _remove(copied, [e.path for e in doomed])
        _prune(copied)
        content[key] = copied
        redacted.add(key)
        for e in doomed:
            denied = e.categories - allowed
            withheld.append(WithheldItem(key, e.expression, denied, _why(denied, decision)))

    resolve = _Resolver(record)
    dropped: dict[str, str] = {}
    # Withholding one resource can strip another of something it needs: repeat
    # until nothing changes.
    while True:
        live = {k for k in content if k not in dropped}
        reachable = _reachable(live, content, resolve, kept, policy)
        for key in live - reachable:
            dropped[key] = "not needed: no shared content refers to it"
        live = reachable
        changed = False
        for key in sorted(live):
            res = content[key]
            masked, removed = _scrub(res, live, resolve, required)
            if masked is not res:
                content[key] = masked
                redacted.add(key)
            if removed:
                redacted.add(key)
            missing = required.missing(content[key])
            if missing is not None:
                dropped[key] = f"a required element ({missing}) was withheld"
                changed = True
        if not changed:
            break

    shared: list[tuple[str | None, dict[str, Any]]] = []
    shared_categories: set[str] = set()
    for item in record:
        key = item.key
        if key not in content:
            continue
        if key in dropped:
            withheld.append(WithheldItem(key, None, frozenset(), dropped[key]))
            continue
        res = content[key]
        cats = set(item.categories) | element_categories.get(key, set())
        shared_categories |= cats
        out = dict(res)
        out.pop("text", None)  # narrative and tags are free text no rule reads
        if isinstance(out.get("contained"), list):
            bare = []
            for inner in out["contained"]:
                inner = {k: v for k, v in inner.items() if k != "text"}
                given = inner.get("meta")
                inner_meta = {k: v for k, v in given.items() if k in ("versionId", "lastUpdated", "profile")} if isinstance(given, dict) else {}  # fmt: skip
                inner.pop("meta", None)
                if inner_meta:
                    inner["meta"] = inner_meta
                bare.append(inner)
            out["contained"] = bare
        # meta keeps its version, time and profiles alone (no tags, source, extensions)
        given = out.get("meta")
        meta = {k: v for k, v in given.items() if k in ("versionId", "lastUpdated", "profile")} if isinstance(given, dict) else {}  # fmt: skip
        labels = security_labels(cats, policy)
        if key in redacted:
            labels.append(dict(REDACTED))
        meta["security"] = labels
        out["meta"] = meta
        shared.append((item.full_url, out))
    return FilterResult(shared, withheld, frozenset(shared_categories))


def _why(denied: frozenset[str], decision: Decision) -> str:
    reasons = sorted({f"{c}: {decision.denied.get(c, 'not allowed')}" for c in denied})
    return "; ".join(reasons)


def _reachable(
    live: set[str],
    content: Mapping[str, dict[str, Any]],
    resolve: _Resolver,
    kept: Mapping[str, LabelledResource],
    policy: SharingPolicy,
) -> set[str]:
    """Live resources, less supporting ones that nothing shared refers to."""
    roots = {k for k in live if kept[k].resource_type not in policy.supporting}
    seen = set(roots)
    frontier = list(roots)
    while frontier:
        key = frontier.pop()
        for _, ref in _references(content[key]):
            target = resolve(ref)
            if target in live and target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def _scrub(
    resource: dict[str, Any],
    live: set[str],
    resolve: _Resolver,
    required: RequiredElements,
) -> tuple[dict[str, Any], bool]:
    """Remove references to anything not shared; mask those a resource must keep."""
    doomed: list[Path] = []
    for path, ref in _references(resource):
        if ref.startswith("#"):
            continue
        target = resolve(ref)
        if target is None and ref.startswith(("http://", "https://", "urn:")):
            doomed.append(path)  # an address outside the record would tell where else data is
            continue
        if target not in live:
            doomed.append(path)
    if not doomed:
        return resource, False
    out = copy.deepcopy(resource)
    list_items = [p for p in doomed if p and isinstance(p[-1], int)]
    singles = [p for p in doomed if p and not isinstance(p[-1], int)]
    for p in singles:
        _set(out, p, copy.deepcopy(MASKED))
    emptied: list[Path] = []
    for p in list_items:
        parent = _get(out, p[:-1])
        parent[p[-1]] = _GONE
        if all(v is _GONE for v in parent):
            emptied.append(p[:-1])
    for p in emptied:
        parent = _get(out, p)
        parent[:] = [copy.deepcopy(MASKED)]
    _prune(out)
    # A list emptied of references stays only where the profile requires it.
    for p in emptied:
        try:
            holder = _get(out, p[:-1])
        except (KeyError, IndexError, TypeError):
            continue
        trial = copy.deepcopy(out)
        del _get(trial, p[:-1])[p[-1]]
        _prune(trial)
        if required.missing(trial) is None:
            del holder[p[-1]]
    _prune(out)
    return out, True
