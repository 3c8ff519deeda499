"""Security labelling as it was first written: a test oracle for the faster labeller.

Each rule walks what it looks at afresh (`locate`, `texts`); the faster labeller
(`cpa_fhir.consent.label_resources`) must give exactly the same labels.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cpa_fhir.consent._policy import (
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    SENSITIVITY_SYSTEM,
    LabelRule,
    SharingPolicy,
    plain_text,
)
from cpa_fhir.errors import LabellingError

Path = tuple[str | int, ...]
# Keys whose values are identifiers of things, not text a person wrote.
_NOT_TEXT = frozenset({"reference", "system", "url", "id", "fullUrl", "div", "profile"})
_NOT_AN_ELEMENT = {"resourceType", "id", "meta", "text", "contained"}


def _base64(key: Any, value: Any) -> bool:
    return key in ("data", "valueBase64Binary") and isinstance(value, str)


@dataclass(frozen=True, slots=True)
class ElementLabel:
    """Categories carried by one element of a resource, at `path` from its root."""

    path: Path
    categories: frozenset[str]
    rules: tuple[str, ...]

    @property
    def expression(self) -> str:
        out = ""
        for step in self.path:
            out += f"[{step}]" if isinstance(step, int) else f".{step}"
        return out


@dataclass(frozen=True, slots=True)
class LabelledResource:
    """A resource as given, with the labels the policy gives it and its elements."""

    resource: dict[str, Any]
    key: str
    categories: frozenset[str]
    rules: tuple[str, ...]
    elements: tuple[ElementLabel, ...] = ()
    full_url: str | None = None

    @property
    def resource_type(self) -> str:
        return str(self.resource["resourceType"])


def reference_key(ref: Any) -> str | None:
    """`Type/id` of a relative reference (history suffix dropped), else None."""
    if not isinstance(ref, str) or "://" in ref or ref.startswith("urn:"):
        return None
    parts = ref.split("/")
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return f"{parts[-2]}/{parts[-1]}"
    if len(parts) >= 4 and parts[-2] == "_history":
        return f"{parts[-4]}/{parts[-3]}"
    return None


def _values(node: Any, steps: Sequence[str], path: Path) -> Iterator[tuple[Path, Any]]:
    """Every value at a dotted path, each list item on its own path."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _values(item, steps, (*path, i))
        return
    if not steps:
        yield path, node
        return
    if not isinstance(node, dict):
        return
    head = steps[0]
    if head == "*":
        for k in node:
            if k not in _NOT_AN_ELEMENT:
                yield from _values(node[k], steps[1:], (*path, k))
    elif head in node:
        yield from _values(node[head], steps[1:], (*path, head))


def locate(node: Any, dotted: str) -> Iterator[tuple[Path, Any]]:
    return _values(node, dotted.split(".") if dotted else [], ())


def _codings(rule: LabelRule, value: Any, key: str) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, dict):
        codings = value.get("coding")
        if codings is None:
            yield value.get("system"), value.get("code")
            return
        if not isinstance(codings, list):
            raise LabellingError(
                f"labelling rule '{rule.id}' cannot be evaluated on {key}: 'coding' is not a list"
            )
        for c in codings:
            if not isinstance(c, dict):
                raise LabellingError(
                    f"labelling rule '{rule.id}' cannot be evaluated on {key}: a coding is not an object"
                )
            yield c.get("system"), c.get("code")
    elif isinstance(value, str):
        yield None, value
    else:
        raise LabellingError(
            f"labelling rule '{rule.id}' cannot be evaluated on {key}: expected a code, found {type(value).__name__}"
        )


def texts(node: Any) -> Iterator[str]:
    """The human-readable strings in a piece of content."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from texts(item)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k not in _NOT_TEXT and not _base64(k, v):
                yield from texts(v)


def every_string(node: Any, coded: Mapping[tuple[str, str], frozenset[str]]) -> list[str]:
    """All strings, less the displays of codings of the coded codes that are their
    meaning (as the policy gives it)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in every_string(item, coded)]
    if isinstance(node, dict):
        pair = (node.get("system"), node.get("code"))
        display = node.get("display")
        known = (
            all(isinstance(x, str) for x in pair)
            and isinstance(display, str)
            and " ".join(plain_text(display).casefold().split()) in coded.get(pair, ())
        )
        return [
            s
            for k, v in node.items()
            if not (known and k == "display") and not _base64(k, v)
            for s in every_string(v, coded)
        ]
    return []


def _has_extension(node: Any, url: str) -> bool:
    """Anywhere within: every object under the node is looked at."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("url") == url:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


Resolver = Callable[[str], frozenset[str] | None]


def _matches(
    rule: LabelRule,
    node: Any,
    key: str,
    resource: dict[str, Any],
    coded: frozenset[tuple[str, str]] = frozenset(),
) -> bool:
    if rule.profile is not None:
        meta = resource.get("meta")
        profiles = meta.get("profile") if isinstance(meta, dict) else None
        if not (isinstance(profiles, list) and rule.profile in profiles):
            return False
    if rule.extension is not None and not _has_extension(node, rule.extension):
        return False
    if rule.codes:
        found = False
        for at in rule.codes_at:
            for _, value in locate(node, at):
                if any((s, c) in rule.codes for s, c in _codings(rule, value, key)):
                    found = True
                    break
            if found:
                break
        if not found:
            return False
    if rule.words is not None:
        pattern = rule.words
        sources: Iterable[Any] = (
            (v for at in rule.text_at for _, v in locate(node, at)) if rule.text_at else (node,)
        )
        found = (
            every_string(src, coded) if rule.elements == ("*",) else texts(src) for src in sources
        )
        if not any(pattern.search(plain_text(t)) for each in found for t in each):
            return False
    return True


def _inherited(rule: LabelRule, node: Any, key: str, resolve: Resolver, default: str) -> set[str]:
    out: set[str] = set()
    for at in rule.inherit:
        for _, ref in locate(node, at):
            if not isinstance(ref, dict):
                raise LabellingError(
                    f"labelling rule '{rule.id}' cannot be evaluated on {key}: {at} is not a Reference"
                )
            raw = ref.get("reference")
            cats = resolve(raw) if isinstance(raw, str) else None
            # Whatever the engine cannot see is treated as the most restrictive.
            out |= cats if cats is not None else {default}
    return out


def _security_categories(resource: dict[str, Any], policy: SharingPolicy, key: str) -> set[str]:
    """Categories an EPR already put on the resource, as category or sensitivity codes."""
    meta = resource.get("meta")
    labels = meta.get("security") if isinstance(meta, dict) else None
    if labels is None:
        return set()
    if not isinstance(labels, list):
        raise LabellingError(f"{key}: meta.security is not a list")
    out: set[str] = set()
    for c in labels:
        if not isinstance(c, dict):
            raise LabellingError(f"{key}: a meta.security label is not a Coding")
        system, code = c.get("system"), c.get("code")
        if not isinstance(code, str):
            raise LabellingError(f"{key}: a meta.security label has no code")
        if system == CATEGORY_SYSTEM:
            if code not in policy.categories:
                raise LabellingError(f"{key} carries unknown information category '{code}'")
            out.add(code)
        elif system == SENSITIVITY_SYSTEM:
            out |= policy.categories_by_sensitivity.get(code, {policy.default_category})
        elif system == CONFIDENTIALITY_SYSTEM and code == "V":
            out.add(policy.default_category)
    return out


def _first_pass(
    resource: dict[str, Any], key: str, policy: SharingPolicy
) -> tuple[set[str], list[str]]:
    cats = _security_categories(resource, policy, key)
    rules: list[str] = []
    for rule in policy.rules_by_type.get(str(resource.get("resourceType")), ()):
        if rule.elements or not _matches(rule, resource, key, resource):
            continue
        cats.update(rule.categories)
        rules.append(rule.id)
    return cats, rules


def label_resource(
    resource: dict[str, Any],
    policy: SharingPolicy,
    resolve: Resolver,
    *,
    full_url: str | None = None,
) -> LabelledResource:
    """Labels for one resource. `resolve` gives the categories of a referenced
    resource (`Type/id`), or None when it is unknown, for rules that inherit."""

    def by_reference(ref: str) -> frozenset[str] | None:
        target = reference_key(ref)
        return resolve(target) if target is not None else None

    return _label(resource, policy, by_reference, full_url)


def _outside_labelled(
    rule: LabelRule,
    value: Any,
    path: Path,
    elements: dict[Path, tuple[set[str], list[str]]],
    policy: SharingPolicy,
) -> bool:
    """The words in the element with its parts other rules labelled with the rule's
    categories blanked out."""
    rest = copy.deepcopy(value)
    for sub, (cats, _) in elements.items():
        if len(sub) > len(path) and sub[: len(path)] == path and set(rule.categories) <= cats:
            parent: Any = rest
            for step in sub[len(path) : -1]:
                parent = parent[step]
            parent[sub[-1]] = None
    assert rule.words is not None
    return any(rule.words.search(plain_text(s)) for s in every_string(rest, policy.coded))


def _label(
    resource: dict[str, Any],
    policy: SharingPolicy,
    resolve: Resolver,
    full_url: str | None,
    lent: set[str] | frozenset[str] = frozenset(),
    naming: Sequence[tuple[Path, frozenset[str]]] = (),
) -> LabelledResource:
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise LabellingError("content to label is not a FHIR resource")
    key = f"{resource['resourceType']}/{resource.get('id')}"
    cats, rules = _first_pass(resource, key, policy)
    cats |= lent
    default = policy.default_category
    for rule in policy.rules_by_type.get(resource["resourceType"], ()):
        if rule.inherit and not rule.elements and _matches(rule, resource, key, resource):
            cats |= _inherited(rule, resource, key, resolve, default)
    contained = resource.get("contained")
    if contained is not None:
        if not isinstance(contained, list):
            raise LabellingError(f"{key}: contained is not a list")
        for i, inner in enumerate(contained):
            if not isinstance(inner, dict) or not isinstance(inner.get("resourceType"), str):
                raise LabellingError(f"{key}: contained[{i}] is not a resource")
            inner_labelled = _label(inner, policy, resolve, None)
            cats |= inner_labelled.categories
            for label in inner_labelled.elements:
                cats |= label.categories
            rules.append(f"contained:{'+'.join(inner_labelled.rules)}")
    if not cats:
        cats = {default}
        rules = ["default"]
    elements, whole, whole_rules = _elements(resource, key, policy, resolve, full_url, naming)
    cats |= whole
    rules += whole_rules
    labels = tuple(
        ElementLabel(path, frozenset(c), tuple(r))
        for path, (c, r) in sorted(elements.items(), key=lambda kv: [str(p) for p in kv[0]])
        # An element labelled only with what the whole resource carries needs no label.
        if not c <= cats
    )
    return LabelledResource(resource, key, frozenset(cats), tuple(rules), labels, full_url)


def _elements(
    resource: dict[str, Any],
    key: str,
    policy: SharingPolicy,
    resolve: Resolver,
    full_url: str | None,
    naming: Sequence[tuple[Path, frozenset[str]]] = (),
) -> tuple[dict[Path, tuple[set[str], list[str]]], set[str], list[str]]:
    """Each labelled element's categories and rules, and what the rules for elements
    find of the resource as a whole, with those rules."""
    default = policy.default_category
    whole: set[str] = set()
    whole_rules: list[str] = []
    elements: dict[Path, tuple[set[str], list[str]]] = {}
    for rule in policy.rules_by_type.get(resource["resourceType"], ()):
        matched: list[Path] = []
        if rule.elements == ("*",):
            assert rule.words is not None
            profiles = (resource.get("meta") or {}).get("profile") or []
            version = (resource.get("meta") or {}).get("versionId")
            if any(
                isinstance(name, str) and rule.words.search(plain_text(name))
                for name in [resource.get("id"), full_url, *profiles, version]
            ):
                whole.update(rule.categories)
                whole_rules.append(rule.id)
        for dotted in rule.elements:
            for path, value in locate(resource, dotted):
                if not _matches(rule, value, key, resource, policy.coded):
                    continue
                if dotted == "*" and not _outside_labelled(rule, value, path, elements, policy):
                    continue
                extra = set(rule.categories) | _inherited(rule, value, key, resolve, default)
                entry = elements.setdefault(path, (set(), []))
                entry[0].update(extra)
                entry[1].append(rule.id)
                matched.append(path)
        if rule.elements and rule.extension is not None:
            # The extension anywhere but in the elements the rule labelled.
            rest = copy.deepcopy(resource)
            for path in sorted(matched, key=lambda p: [str(x) for x in p], reverse=True):
                parent: Any = rest
                for step in path[:-1]:
                    parent = parent[step]
                parent[path[-1]] = None
            if _has_extension(rest, rule.extension):
                whole.update(rule.categories)
                whole_rules.append(rule.id)
    for path, targets in naming:
        entry = elements.setdefault(path, (set(), []))
        entry[0].update(targets)
        entry[1].append("names-a-resource")
    for path, value in locate(resource, "*"):
        codes = set(_all_codings(value)) & set(policy.coded)
        if codes:
            entry = elements.setdefault(path, (set(), []))
            for rule in policy.rules:
                if codes & rule.codes:
                    entry[0].update(rule.categories)
            entry[1].append("coded-anywhere")
    for path, holder in _base64_values(resource):
        text = _readable(holder[path[-1]], holder.get("contentType"), policy)
        for rule in policy.rules_by_type.get(resource["resourceType"], ()):
            if text is None:
                break
            if rule.elements == ("*",) and rule.words and rule.words.search(plain_text(text)):
                entry = elements.setdefault(path, (set(), []))
                entry[0].update(rule.categories)
                entry[1].append(rule.id)
        if text is None:
            entry = elements.setdefault(path, (set(), []))
            entry[0].add(default)
            entry[1].append("unreadable-content")
    return elements, whole, whole_rules


def _all_codings(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
            yield node["system"], node["code"]
        for v in node.values():
            yield from _all_codings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _all_codings(v)


def _base64_values(resource: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """Each base64 value outside the resource's metadata, narrative and contained
    resources: its path and the object holding it."""
    found: list[tuple[Path, dict[str, Any]]] = []
    stack: list[tuple[Path, Any]] = [
        ((k,), v) for k, v in resource.items() if k not in _NOT_AN_ELEMENT
    ]
    for k, v in resource.items():
        if k not in _NOT_AN_ELEMENT and _base64(k, v):
            found.append(((k,), resource))
    while stack:
        path, node = stack.pop()
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else ()
        )
        for k, v in items:
            if isinstance(node, dict) and _base64(k, v):
                found.append(((*path, k), node))
            else:
                stack.append(((*path, k), v))
    return found


def _readable(value: str, content_type: Any, policy: SharingPolicy) -> str | None:
    if not isinstance(content_type, str):
        return None
    parts = [p.strip() for p in content_type.split(";")]
    if parts[0].lower() not in policy.readable_media_types:
        return None
    charset = next(
        (
            p.split("=", 1)[1].strip().strip('"')
            for p in parts[1:]
            if p.lower().startswith("charset=")
        ),
        "utf-8",
    )
    try:
        raw = base64.b64decode(re.sub(r"\s", "", value), validate=True)
        return raw.decode(charset) + "\x00" + raw.decode("latin-1")
    except (LookupError, ValueError):
        return None


def label_resources(
    entries: Sequence[tuple[str | None, dict[str, Any]]],
    policy: SharingPolicy,
    outside: Mapping[str, frozenset[str]] | None = None,
) -> list[LabelledResource]:
    """Label a patient's record: (fullUrl, resource) pairs. Rules that inherit
    see the other resources of the record, then `outside` (labels known from
    elsewhere, e.g. a store)."""
    own: dict[str, set[str]] = {}
    first: dict[str, frozenset[str]] = {}
    by_url: dict[str, str] = {}
    for url, res in entries:
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise LabellingError("a record entry is not a FHIR resource")
        key = f"{res['resourceType']}/{res.get('id')}"
        cats, _ = _first_pass(res, key, policy)
        own[key] = cats
        first[key] = frozenset(cats or {policy.default_category})
        if url:
            by_url[url] = key

    def resolve(ref: str) -> frozenset[str] | None:
        versioned = ref.split("/_history/")[0] if "/_history/" in ref else None
        target = (
            by_url.get(ref)
            or (by_url.get(versioned) if versioned is not None else None)
            or reference_key(ref)
        )
        if target is None:
            return None
        if target in first:
            return first[target]
        return outside.get(target) if outside is not None else None

    def lent_to(key: str) -> set[str]:
        """The categories of the resources whose lending rules refer to this one."""
        out: set[str] = set()
        for _url, lender in entries:
            lender_key = f"{lender['resourceType']}/{lender.get('id')}"
            for rule in policy.rules_by_type.get(lender["resourceType"], ()):
                if not rule.lend or rule.elements or not _matches(rule, lender, lender_key, lender):
                    continue
                if key in _targets(rule, lender):
                    out |= first[lender_key]
            # A rule for elements lends what each element it matches carries (its label
            # and those within it, what names other resources aside).
            for rule in policy.rules_by_type.get(lender["resourceType"], ()):
                if not rule.lend or not rule.elements:
                    continue
                for dotted in rule.elements:
                    for path, value in locate(lender, dotted):
                        if not _matches(rule, value, lender_key, lender, policy.coded):
                            continue
                        if key not in _targets(rule, value):
                            continue
                        labelled = _elements(lender, lender_key, policy, resolve, None)[0]
                        for at, (cats, _) in labelled.items():
                            if at[: len(path)] == path:
                                out |= cats
        return out

    def _targets(rule: LabelRule, node: Any) -> set[str]:
        found = set()
        for at in rule.lend:
            for _, ref in locate(node, at):
                raw = ref.get("reference") if isinstance(ref, dict) else None
                target = by_url.get(raw) or reference_key(raw) if isinstance(raw, str) else None
                if target is not None and (
                    not rule.lend_to or target.split("/")[0] in rule.lend_to
                ):
                    found.add(target)
        return found

    # Inheritance passes on through any number of steps: repeat until nothing changes.
    default = policy.default_category
    for _ in range(len(entries) + 1):
        changed = False
        for _url, res in entries:
            key = f"{res['resourceType']}/{res.get('id')}"
            inherited = set(own[key]) | lent_to(key)
            for rule in policy.rules_by_type.get(res["resourceType"], ()):
                if rule.inherit and not rule.elements and _matches(rule, res, key, res):
                    inherited |= _inherited(rule, res, key, resolve, default)
            now = frozenset(inherited or {default})
            if now != first[key]:
                first[key] = now
                changed = True
        if not changed:
            break
    keys = {f"{r['resourceType']}/{r.get('id')}" for _, r in entries}
    identifiers = {}
    for _, res in entries:
        for ident in res.get("identifier") if isinstance(res.get("identifier"), list) else []:
            if isinstance(ident, dict) and isinstance(ident.get("system"), str):
                if isinstance(ident.get("value"), str) and ident["value"]:
                    identifiers.setdefault(
                        (ident["system"], ident["value"]), f"{res['resourceType']}/{res.get('id')}"
                    )

    def named(node: Any, parent_key: Any = None) -> set[str]:
        """What this content names by identifier or in a string not a reference."""
        out: set[str] = set()
        if isinstance(node, str):
            if parent_key != "reference" and "/" in node:
                versioned = node.split("/_history/")[0] if "/_history/" in node else None
                target = (
                    by_url.get(node)
                    or (by_url.get(versioned) if versioned is not None else None)
                    or reference_key(node)
                )
                if target in keys:
                    out.add(target)
        elif isinstance(node, list):
            for item in node:
                out |= named(item, parent_key)
        elif isinstance(node, dict):
            ident = node.get("identifier")
            if "reference" not in node and isinstance(ident, dict):
                target = identifiers.get((ident.get("system"), ident.get("value")))
                if target is not None:
                    out.add(target)
            for k, v in node.items():
                out |= named(v, k)
        return out

    def naming(res: dict[str, Any]) -> list[tuple[Path, frozenset[str]]]:
        key = f"{res['resourceType']}/{res.get('id')}"
        out = []
        for path, value in locate(res, "*"):
            targets = named(value, path[-1] if isinstance(path[-1], str) else None) - {key}
            if targets:
                out.append((path, frozenset().union(*(first[t] for t in targets))))
        return out

    return [
        _label(
            res,
            policy,
            resolve,
            url,
            lent_to(f"{res['resourceType']}/{res.get('id')}"),
            naming(res),
        )
        for url, res in entries
    ]


def security_labels(categories: Iterable[str], policy: SharingPolicy) -> list[dict[str, str]]:
    """meta.security codings for content carrying these categories."""
    cats = sorted(set(categories))
    level = policy.category_levels(frozenset(cats))
    out = [{"system": CONFIDENTIALITY_SYSTEM, "code": level}]
    sensitivity = sorted({s for c in cats for s in policy.categories[c].sensitivity})
    out += [{"system": SENSITIVITY_SYSTEM, "code": s} for s in sensitivity]
    out += [{"system": CATEGORY_SYSTEM, "code": c} for c in cats]
    return out
