"""Security labelling: which CPA information categories each resource and element carries.

Labels follow https://hl7.org/fhir/R4/security-labels.html: a resource carries
its categories, an HL7 confidentiality code and HL7 sensitivity codes in
`meta.security`; elements that need a different label (a care-plan activity
about substance use inside a shareable plan) are labelled on their own, as the
inline labels of HL7 DS4P do. The rules are data (`SharingPolicy.rules`);
content no rule labels takes the policy's most restrictive default category.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from cpa_fhir.consent._encoded import decoded_text, encoded_values, is_encoded
from cpa_fhir.consent._facts import RecordIndex, ResourceFacts
from cpa_fhir.consent._output import security_labels as security_labels
from cpa_fhir.consent._policy import (
    ANYWHERE,
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    SENSITIVITY_SYSTEM,
    LabelRule,
    SharingPolicy,
    WordIndex,
    meaning,
    plain_text,
    squash,
)
from cpa_fhir.consent._references import Path as Path
from cpa_fhir.consent._references import reference_key as reference_key
from cpa_fhir.consent._references import resolve as resolve_reference
from cpa_fhir.errors import LabellingError

# Keys whose values are identifiers of things, not text a person wrote.
_NOT_TEXT = frozenset({"reference", "system", "url", "id", "fullUrl", "div", "profile"})
# What `element = "*"` does not look at: the resource's type, id (read as the whole
# resource's) and metadata (labels come from the rules; what else of it would be read
# does not go), narrative (never sent) and contained resources (labelled as resources
# of their own).
_NOT_AN_ELEMENT = frozenset({"resourceType", "id", "meta", "text", "contained"})


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
    # Worked out by label_resource(s) for filtering; not copied by dataclasses.replace,
    # so a changed LabelledResource has its facts worked out afresh.
    facts: ResourceFacts | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def resource_type(self) -> str:
        return str(self.resource["resourceType"])


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
    if head == ANYWHERE:
        for key, value in node.items():
            if key not in _NOT_AN_ELEMENT:
                yield from _values(value, steps[1:], (*path, key))
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


def strings(
    node: Any,
    coded: Mapping[tuple[str, str], frozenset[str]] = MappingProxyType({}),
    skipped: frozenset[Path] = frozenset(),
    at: Path = (),
) -> list[str]:
    """Every string in a piece of content, keys aside, less the displays of codings of
    the `coded` codes where the display is the code's meaning as the policy gives it
    (the policy's rules say what those carry: "risk to others, including sexual and
    domestic violence" is not a fact; any other display is free text, and is read, as
    is what else such a coding holds, an extension), and less what lies at the
    `skipped` paths (from the node)."""
    out: list[str] = []
    _gather_strings(node, coded, skipped, at, out)
    return out


def _gather_strings(
    node: Any,
    coded: Mapping[tuple[str, str], frozenset[str]],
    skipped: frozenset[Path],
    at: Path,
    out: list[str],
) -> None:
    # Into a list, not yielded: a generator per level of nesting cost more than the
    # reading it does.
    if skipped and at in skipped:
        return
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _gather_strings(item, coded, skipped, (*at, i) if skipped else at, out)
    elif isinstance(node, dict):
        system, code, shown = node.get("system"), node.get("code"), node.get("display")
        display = None
        if coded and isinstance(system, str) and isinstance(code, str) and isinstance(shown, str):
            meanings = coded.get((system, code))
            if meanings and meaning(shown) in meanings:
                display = "display"
        for k, v in node.items():
            # Base64 content is not text as written: it is read as `_encoded_labels` says.
            if k != display and not is_encoded(k, v):
                _gather_strings(v, coded, skipped, (*at, k) if skipped else at, out)


def texts(node: Any) -> list[str]:
    """The human-readable strings in a piece of content."""
    out: list[str] = []
    _gather_texts(node, out)
    return out


def _gather_texts(node: Any, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, list):
        for item in node:
            _gather_texts(item, out)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k not in _NOT_TEXT and not is_encoded(k, v):
                _gather_texts(v, out)


def _has_extension(node: Any, url: str) -> bool:
    """Whether the content is, or holds at any depth, an extension with this URL: in
    `extension` or `modifierExtension`, nested in another, on a primitive (`_x`) or
    on any element within."""
    if isinstance(node, list):
        return any(_has_extension(item, url) for item in node)
    if not isinstance(node, dict):
        return False
    if node.get("url") == url:
        return True
    return any(_has_extension(v, url) for v in node.values() if isinstance(v, (dict, list)))


def _has_extension_outside(node: Any, url: str, skipped: Sequence[Path]) -> bool:
    """`_has_extension` of a resource, leaving out what lies at the `skipped` paths."""
    if not skipped:
        return _has_extension(node, url)
    skip = set(skipped)

    def walk(item: Any, path: Path) -> bool:
        if path in skip:
            return False
        if isinstance(item, dict):
            if item.get("url") == url and path:
                return True
            return any(walk(v, (*path, k)) for k, v in item.items() if isinstance(v, (dict, list)))
        if isinstance(item, list):
            return any(walk(v, (*path, i)) for i, v in enumerate(item))
        return False

    return walk(node, ())


# The categories of what a reference (as written) names, or None when it is unknown.
Resolver = Callable[[str], frozenset[str] | None]


class _Seen:
    """What labelling one resource has looked at, so that each rule does not walk it
    again: the values at each dotted path, and the text, of each object looked at."""

    __slots__ = (
        "_located", "_text", "_ascii_lowered", "_every", "_tokens", "_squash", "_at_starts",
        "coded", "word_starts", "_urls", "_text_hits", "text_starts",
    )  # fmt: skip

    @classmethod
    def of(cls, policy: SharingPolicy) -> _Seen:
        return cls(policy.coded, policy.word_starts, policy.text_word_starts)

    def __init__(
        self,
        coded: Mapping[tuple[str, str], frozenset[str]],
        word_starts: WordIndex,
        text_starts: WordIndex,
    ) -> None:
        self.coded = coded
        self.word_starts = word_starts
        # Every word rule, for `has_words`: several rules ask of one text.
        self.text_starts = text_starts
        self._text_hits: dict[int, frozenset[str] | None] = {}
        self._at_starts: dict[int, tuple[frozenset[str], dict[str, set[int]]] | None] = {}
        # By the object's id: all are parts of the resource, alive while it is labelled.
        self._located: dict[tuple[int, str], list[tuple[Path, Any]]] = {}
        self._text: dict[int, str] = {}
        self._ascii_lowered: dict[int, str | None] = {}
        self._every: dict[int, tuple[str, str | None, list[int], list[tuple[Path, Any]]]] = {}
        self._tokens: dict[str | None, frozenset[str]] = {}
        self._squash: dict[str, str] = {}
        self._urls: dict[int, frozenset[str]] = {}

    def locate(self, node: Any, dotted: str) -> list[tuple[Path, Any]]:
        found = self._located.get((id(node), dotted))
        if found is None:
            found = self._located[(id(node), dotted)] = list(locate(node, dotted))
        return found

    def text(self, node: Any) -> str:
        """Its texts joined by NUL, which no word contains, as `plain_text`: a word is
        found in the joined text exactly when it is found in one of them."""
        found = self._text.get(id(node))
        if found is None:
            found = self._text[id(node)] = plain_text("\x00".join(texts(node)))
        return found

    def ascii_lowered(self, node: Any) -> str | None:
        """Its text lowercased, each run of white space one space, when it is all
        ASCII; else None."""
        key = id(node)
        if key not in self._ascii_lowered:
            text = self.text(node)
            self._ascii_lowered[key] = " ".join(text.lower().split()) if text.isascii() else None
        return self._ascii_lowered[key]

    def urls(self, resource: Any) -> frozenset[str]:
        """Every `url` string in a resource, at any depth: no extension rule need walk
        a resource that holds none of its URL."""
        found = self._urls.get(id(resource))
        if found is None:
            out: set[str] = set()
            stack = [resource]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    url = node.get("url")
                    if isinstance(url, str):
                        out.add(url)
                    stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
                elif isinstance(node, list):
                    stack.extend(v for v in node if isinstance(v, (dict, list)))
            found = self._urls[id(resource)] = frozenset(out)
        return found

    def _squashed(self, lowered: str | None) -> str | None:
        """A lowered ASCII text squashed (`squash`), or None for None."""
        if lowered is None:
            return None
        found = self._squash.get(lowered)
        if found is None:
            found = self._squash[lowered] = squash(lowered)
        return found

    def _tokens_of(self, lowered: str | None) -> frozenset[str]:
        """The words (runs of letters and digits) of a lowered ASCII text."""
        found = self._tokens.get(lowered)
        if found is None:
            found = self._tokens[lowered] = frozenset(_TOKEN.findall(lowered or ""))
        return found

    def _elements(self, resource: Any) -> tuple[str, str | None, list[int], list[tuple[Path, Any]]]:
        """Every element of a resource (`element = "*"`) with all its strings, as one
        text (each element's strings joined by NUL, as `text`, the elements too), its
        form for `ascii_words`, where each element's text starts, and the elements."""
        found = self._every.get(id(resource))
        if found is None:
            located = self.locate(resource, ANYWHERE)
            parts = [plain_text("\x00".join(strings(value, self.coded))) for _, value in located]
            starts, at = [], 0
            for part in parts:
                starts.append(at)
                at += len(part) + 1
            text = "\x00".join(parts)
            lowered = " ".join(text.lower().split()) if text.isascii() else None
            found = self._every[id(resource)] = (text, lowered, starts, located)
        return found

    def elements_with_words(self, rule: LabelRule, resource: Any) -> list[tuple[Path, Any]]:
        """The elements of a resource whose strings hold the rule's words: the text of
        them all is searched once, and each match is placed in its element."""
        assert rule.words is not None
        if "\x00" in rule.words.pattern:  # a word with NUL in it: element by element
            return [
                (path, value)
                for path, value in self.locate(resource, ANYWHERE)
                if any(rule.words.search(plain_text(s)) for s in strings(value, self.coded))
            ]
        indexed = self.words_at_starts(resource)
        if indexed is not None and rule.id in indexed[0]:
            located = self._elements(resource)[3]
            return [located[i] for i in sorted(indexed[1].get(rule.id, ()))]
        text, lowered, starts, located = self._elements(resource)
        if rule.ruled_out(self._squashed(lowered), lambda: self._tokens_of(lowered)):
            return []
        hit = sorted({bisect_right(starts, m.start()) - 1 for m in rule.words.finditer(text)})
        return [located[i] for i in hit]

    def words_at_starts(self, resource: Any) -> tuple[frozenset[str], dict[str, set[int]]] | None:
        """For the rules `SharingPolicy.word_starts` indexes, the elements (by their
        place in `_elements`) where each finds its words, all found in one pass over
        the runs of letters of the resource's text; None when the text is not ASCII."""
        key = id(resource)
        if key in self._at_starts:
            return self._at_starts[key]
        text, lowered, starts, _ = self._elements(resource)
        found: tuple[frozenset[str], dict[str, set[int]]] | None = None
        if lowered is not None and self.word_starts.starts:
            index = self.word_starts
            found = (index.rule_ids, _found_at_starts(text, starts, index))
        self._at_starts[key] = found
        return found

    def _indexed_hits(self, node: Any) -> frozenset[str] | None:
        """The indexed rules (`text_starts`) whose words are in the node's text, found
        in one pass over it; None when the text is not ASCII."""
        key = id(node)
        if key in self._text_hits:
            return self._text_hits[key]
        text = self.text(node)
        found = (
            frozenset(_found_at_starts(text, (0,), self.text_starts)) if text.isascii() else None
        )
        self._text_hits[key] = found
        return found

    def coded_elements(
        self, resource: Any, policy: SharingPolicy
    ) -> Iterator[tuple[Path, frozenset[str]]]:
        """The elements of a resource holding a coding of a code the policy names, with
        the categories its rules give those codes: the text of them all is searched
        once for the codes' values, and only the elements that hold one are walked."""
        if policy.code_values is None:
            return
        text, _, starts, located = self._elements(resource)
        for i in sorted(
            {bisect_right(starts, m.start()) - 1 for m in policy.code_values.finditer(text)}
        ):
            path, value = located[i]
            found = _code_categories(value, policy.code_categories)
            if found:
                yield path, found

    def has_words(self, rule: LabelRule, node: Any) -> bool:
        """Whether the rule's words are in the node's text."""
        if rule.id in self.text_starts.rule_ids:
            # Several rules ask of one text (a resource's names, a plan's activity):
            # all are found at once.
            hits = self._indexed_hits(node)
            if hits is not None:
                return rule.id in hits
        lowered = self.ascii_lowered(node) if rule.prefiltered else None
        if rule.ruled_out(self._squashed(lowered), lambda: self._tokens_of(lowered)):
            return False  # none of them even as a substring
        assert rule.words is not None
        return rule.words.search(self.text(node)) is not None


def _found_at_starts(text: str, starts: Sequence[int], index: WordIndex) -> dict[str, set[int]]:
    """For the rules of a `WordIndex`, the parts of an ASCII text (by where each
    starts) where each finds its words: such a word starts a run of letters, so one
    pass over the runs finds them all."""
    hits: dict[str, set[int]] = {}
    table = index.starts
    lowered = text.lower()
    for m in index.runs.finditer(lowered):
        at = m.start()
        # The keys that start the run (a key is letters only, so found here it is
        # the start of this run, not of the next).
        candidates = (
            table.get(lowered[at : at + 3], ())
            + table.get(lowered[at : at + 2], ())
            + table.get(lowered[at : at + 1], ())
        )
        part = bisect_right(starts, at) - 1
        for pattern, rule_ids in candidates:
            done = hits.get(rule_ids[0])  # the rules of one pattern are found together
            if done is not None and part in done:
                continue
            if pattern.match(text, at):
                for rule_id in rule_ids:
                    hits.setdefault(rule_id, set()).add(part)
    return hits


def _code_categories(
    node: Any, code_categories: Mapping[tuple[str, str], frozenset[str]]
) -> frozenset[str]:
    """The categories of the codings in a piece of content that the policy names."""
    found: frozenset[str] = frozenset()
    if isinstance(node, dict):
        system, code = node.get("system"), node.get("code")
        if isinstance(system, str) and isinstance(code, str):
            found = code_categories.get((system, code), found)
        for value in node.values():
            if isinstance(value, (dict, list)):
                found |= _code_categories(value, code_categories)
    elif isinstance(node, list):
        for item in node:
            found |= _code_categories(item, code_categories)
    return found


def _matches(rule: LabelRule, node: Any, key: str, resource: dict[str, Any], seen: _Seen) -> bool:
    if rule.profile is not None:
        meta = resource.get("meta")
        profiles = meta.get("profile") if isinstance(meta, dict) else None
        if not (isinstance(profiles, list) and rule.profile in profiles):
            return False
    if rule.extension is not None and (
        rule.extension not in seen.urls(resource) or not _has_extension(node, rule.extension)
    ):
        return False
    if rule.codes:
        found = False
        for at in rule.codes_at:
            for _, value in seen.locate(node, at):
                if any((s, c) in rule.codes for s, c in _codings(rule, value, key)):
                    found = True
                    break
            if found:
                break
        if not found:
            return False
    if rule.words is not None:
        pattern = rule.words
        sources = (
            [v for at in rule.text_at for _, v in seen.locate(node, at)] if rule.text_at else [node]
        )
        if "\x00" in pattern.pattern:  # a word with NUL in it: search text by text
            return any(pattern.search(plain_text(t)) for src in sources for t in texts(src))
        if not any(seen.has_words(rule, src) for src in sources):
            return False
    return True


def _words_outside(
    rule: LabelRule,
    value: Any,
    path: Path,
    elements: Mapping[Path, tuple[set[str], list[str]]],
    seen: _Seen,
) -> bool:
    """Whether a rule for any element finds its words in the element at `path` outside
    the parts of it other rules have labelled with its categories already (a flag's
    `code.text`): those go or not on their own, and the rest of the element with them
    (its coding) is not held back for what they say."""
    width = len(path)
    inside = [
        sub[width:]
        for sub, (categories, _) in elements.items()
        if len(sub) > width and sub[:width] == path and set(rule.categories) <= categories
    ]
    if not inside:
        return True
    assert rule.words is not None
    return any(
        rule.words.search(plain_text(s)) for s in strings(value, seen.coded, frozenset(inside))
    )


def _inherited(
    rule: LabelRule, node: Any, key: str, resolve: Resolver, default: str, seen: _Seen
) -> set[str]:
    out: set[str] = set()
    for at in rule.inherit:
        for _, ref in seen.locate(node, at):
            if not isinstance(ref, dict):
                raise LabellingError(
                    f"labelling rule '{rule.id}' cannot be evaluated on {key}: {at} is not a Reference"
                )
            raw = ref.get("reference")
            cats = resolve(raw) if isinstance(raw, str) else None
            # Whatever the engine cannot see (a reference it cannot resolve, one by
            # identifier alone) is treated as the most restrictive.
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
            # A sensitivity the policy does not map is the most restrictive.
            out |= policy.categories_by_sensitivity.get(code, {policy.default_category})
        elif system == CONFIDENTIALITY_SYSTEM and code == "V":
            out.add(policy.default_category)
    return out


def _first_pass(
    resource: dict[str, Any], key: str, policy: SharingPolicy, seen: _Seen
) -> tuple[set[str], list[LabelRule]]:
    """Categories of the resource as a whole, before inheriting any, and the rules
    that matched it."""
    cats = _security_categories(resource, policy, key)
    rules: list[LabelRule] = []
    for rule in policy.rules_by_type.get(str(resource.get("resourceType")), ()):
        if rule.elements or not _matches(rule, resource, key, resource, seen):
            continue
        cats.update(rule.categories)
        rules.append(rule)
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
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise LabellingError("content to label is not a FHIR resource")
    key = f"{resource['resourceType']}/{resource.get('id')}"
    seen = _Seen.of(policy)
    first = _first_pass(resource, key, policy, seen)

    def by_reference(ref: str) -> frozenset[str] | None:
        target = reference_key(ref)
        return resolve(target) if target is not None else None

    labelled = _label(resource, key, first, policy, by_reference, full_url, seen)
    _attach_facts([labelled])
    return labelled


def _attach_facts(labelled: Sequence[LabelledResource]) -> None:
    """Keep with each resource what filtering will need to know of it (see _facts)."""
    record = RecordIndex({r.full_url: r.key for r in labelled if r.full_url})
    facts = [
        ResourceFacts(item.resource, item.categories, item.elements, item.full_url, record)
        for item in labelled
    ]
    for item, its_facts in zip(labelled, facts, strict=True):
        object.__setattr__(item, "facts", its_facts)  # frozen: set once, here
    record.gather([item.key for item in labelled], facts)


def _label(
    resource: dict[str, Any],
    key: str,
    first: tuple[set[str], list[LabelRule]],
    policy: SharingPolicy,
    resolve: Resolver,
    full_url: str | None,
    seen: _Seen,
    naming: Sequence[tuple[Path, frozenset[str]]] = (),
    *,
    elements_too: bool = True,
) -> LabelledResource:
    """`elements_too`: label its elements by what they say as well, else only what it
    carries as a whole (for a resource that is there only to be referred to)."""
    matched = first[1]
    cats = set(first[0])
    rules = [rule.id for rule in matched]
    default = policy.default_category
    for rule in matched:
        if rule.inherit:
            cats |= _inherited(rule, resource, key, resolve, default, seen)
    contained = resource.get("contained")
    if contained is not None:
        if not isinstance(contained, list):
            raise LabellingError(f"{key}: contained is not a list")
        # A contained resource is labelled as any other, and goes with its container or
        # not at all: what it carries is the container's (a `#id` reference to it can
        # then never be left pointing at nothing).
        for i, inner in enumerate(contained):
            if not isinstance(inner, dict) or not isinstance(inner.get("resourceType"), str):
                raise LabellingError(f"{key}: contained[{i}] is not a resource")
            inner_key = f"{key}#contained"
            inner_seen = _Seen.of(policy)
            found = _first_pass(inner, inner_key, policy, inner_seen)
            inner_labelled = _label(inner, inner_key, found, policy, resolve, None, inner_seen)
            cats |= inner_labelled.categories
            for label in inner_labelled.elements:
                cats |= label.categories
            rules.append(f"contained:{'+'.join(inner_labelled.rules)}")
    if not cats:
        cats = {default}
        rules = ["default"]
    elements, whole, whole_rules = _element_labels(
        resource, key, policy, resolve, full_url, seen, naming, elements_too=elements_too
    )
    cats |= whole
    rules += whole_rules
    labels = tuple(
        ElementLabel(path, frozenset(c), tuple(r))
        for path, (c, r) in sorted(elements.items(), key=lambda kv: [str(p) for p in kv[0]])
        # An element labelled only with what the whole resource carries needs no label.
        if not c <= cats
    )
    return LabelledResource(resource, key, frozenset(cats), tuple(rules), labels, full_url)


def _element_labels(
    resource: dict[str, Any],
    key: str,
    policy: SharingPolicy,
    resolve: Resolver,
    full_url: str | None,
    seen: _Seen,
    naming: Sequence[tuple[Path, frozenset[str]]] = (),
    *,
    elements_too: bool = True,
) -> tuple[dict[Path, tuple[set[str], list[str]]], set[str], list[str]]:
    """The categories and rules of each element of a resource the rules for elements
    label, and what those rules find of the resource as a whole (words in its names,
    an extension outside their elements), with the rules that find it."""
    default = policy.default_category
    elements: dict[Path, tuple[set[str], list[str]]] = {}
    whole: set[str] = set()
    whole_rules: list[str] = []
    names = _names(resource, full_url)
    for rule in policy.rules_by_type.get(resource["resourceType"], ()):
        if rule.anywhere:
            if names and seen.has_words(rule, names):
                # Its id goes wherever it does, and is in every reference to it; its
                # fullUrl and profiles go with it, and say what it is.
                whole.update(rule.categories)
                whole_rules.append(rule.id)
            if not elements_too:
                continue
            for path, value in seen.elements_with_words(rule, resource):
                if _words_outside(rule, value, path, elements, seen):
                    entry = elements.setdefault(path, (set(), []))
                    entry[0].update(rule.categories)
                    entry[1].append(rule.id)
            continue
        matched_paths: list[Path] = []
        for dotted in rule.elements:
            for path, value in seen.locate(resource, dotted):
                if not _matches(rule, value, key, resource, seen):
                    continue
                extra = set(rule.categories) | _inherited(rule, value, key, resolve, default, seen)
                entry = elements.setdefault(path, (set(), []))
                entry[0].update(extra)
                entry[1].append(rule.id)
                matched_paths.append(path)
        if (
            rule.elements
            and rule.extension is not None
            and rule.extension in seen.urls(resource)
            and _has_extension_outside(resource, rule.extension, matched_paths)
        ):
            # The extension where the rule's elements are not (modifierExtension, on a
            # primitive, inside another element): the whole resource carries it.
            whole.update(rule.categories)
            whole_rules.append(rule.id)
    for path, named in naming:
        # It names another resource of the record other than by reference (an
        # identifier, a canonical): it says what that resource is.
        entry = elements.setdefault(path, (set(), []))
        entry[0].update(named)
        entry[1].append(NAMING_RULE)
    for path, coded in seen.coded_elements(resource, policy) if elements_too else ():
        # A code carries what the policy's rules say of it wherever it is: its display
        # is not read for words, so it is its code that says it.
        entry = elements.setdefault(path, (set(), []))
        entry[0].update(coded)
        entry[1].append(CODED_RULE)
    if elements_too:
        _encoded_labels(resource, policy, elements)
    return elements, whole, whole_rules


UNREADABLE_RULE = "unreadable-content"
_TOKEN = re.compile(r"[a-z0-9]+")
# A word of an id, or of what names one: runs of what ids are made of.
_ID_WORD = re.compile(r"[A-Za-z0-9\-.]+")
CODED_RULE = "coded-anywhere"
NAMING_RULE = "names-a-resource"


class _Names:
    """How a record's resources can be named other than by a `reference`: by
    `Type/id` or fullUrl in any other string (a canonical, a URI), or by an
    identifier in a Reference; and the text that any such naming holds."""

    def __init__(
        self, entries: Sequence[tuple[str | None, dict[str, Any]]], by_url: Mapping[str, str]
    ):
        self.by_url = by_url
        self.keys = {f"{r['resourceType']}/{r.get('id')}" for _, r in entries}
        self.by_identifier: dict[tuple[str, str], str] = {}
        # A word (as `_ID_WORD` reads one) of each way of naming one: its id, its
        # fullUrl's last, an identifier value's longest. Only an element holding one
        # of them can name a resource so, and only those elements are walked.
        self.words: set[str] = set()
        for _, res in entries:
            key = f"{res['resourceType']}/{res.get('id')}"
            if isinstance(res.get("id"), str) and res["id"]:
                self.words.update(_ID_WORD.findall(plain_text(res["id"]))[-1:])
            for ident in (
                res.get("identifier") or [] if isinstance(res.get("identifier"), list) else []
            ):
                if isinstance(ident, dict):
                    system, value = ident.get("system"), ident.get("value")
                    if isinstance(system, str) and isinstance(value, str) and value:
                        self.by_identifier.setdefault((system, value), key)
                        self.words.update(sorted(_ID_WORD.findall(plain_text(value)), key=len)[-1:])
        for url in by_url:
            self.words.update(_ID_WORD.findall(plain_text(url))[-1:])

    def targets(self, node: Any, key: str) -> set[str]:
        """The record's resources (other than `key`) this content names so."""
        found: set[str] = set()
        if isinstance(node, dict):
            ident = node.get("identifier")
            if "reference" not in node and isinstance(ident, dict):
                system, value = ident.get("system"), ident.get("value")
                if isinstance(system, str) and isinstance(value, str):
                    target = self.by_identifier.get((system, value))
                    if target is not None:
                        found.add(target)
            for k, v in node.items():
                if k == "reference":
                    continue  # the filter follows references
                if isinstance(v, str):
                    if "/" in v:
                        target = resolve_reference(v, self.by_url)
                        if target in self.keys:
                            found.add(target)
                elif isinstance(v, (dict, list)):
                    found |= self.targets(v, key)
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, str):
                    if "/" in item:
                        target = resolve_reference(item, self.by_url)
                        if target in self.keys:
                            found.add(target)
                else:
                    found |= self.targets(item, key)
        found.discard(key)
        return found

    def elements(
        self, resource: dict[str, Any], key: str, seen: _Seen
    ) -> list[tuple[Path, set[str]]]:
        """Each element of the resource naming others so, with what it names."""
        if not self.words:
            return []
        text, _, starts, located = seen._elements(resource)
        if self.words.isdisjoint(_ID_WORD.findall(text)):
            return []
        out = []
        ends = [*starts[1:], len(text) + 1]
        for (path, value), begin, end in zip(located, starts, ends, strict=True):
            if self.words.isdisjoint(_ID_WORD.findall(text, begin, end - 1)):
                continue
            named = self.targets({path[-1]: value} if isinstance(path[-1], str) else [value], key)
            if named:
                out.append((path, named))
        return out


def _names(resource: dict[str, Any], full_url: str | None) -> str:
    """What names the resource as a whole, as one text for the rules for any element:
    its id, its fullUrl in the record, the profiles it claims, its version id (which
    goes with it, and may be any word an id may be)."""
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    version = meta.get("versionId") if isinstance(meta, dict) else None
    found = [
        resource.get("id"),
        full_url,
        *(profiles if isinstance(profiles, list) else ()),
        version,
    ]
    return plain_text("\x00".join(s for s in found if isinstance(s, str)))


def _encoded_labels(
    resource: dict[str, Any],
    policy: SharingPolicy,
    elements: dict[Path, tuple[set[str], list[str]]],
) -> None:
    """Label each base64 value of the resource (an attachment's data): text the policy
    can read with what the rules for any element find in it, anything else with the
    most restrictive category, since no rule can say what it holds."""
    anywhere: list[LabelRule] | None = None
    for path, value, holder in encoded_values(resource):
        text = decoded_text(value, holder, policy.readable_media_types)
        found: list[tuple[str, tuple[str, ...]]]
        if text is None:
            found = [(UNREADABLE_RULE, (policy.default_category,))]
        else:
            if anywhere is None:
                rules = policy.rules_by_type.get(resource["resourceType"], ())
                anywhere = [r for r in rules if r.anywhere]
            plain = plain_text(text)
            found = [(r.id, r.categories) for r in anywhere if r.words and r.words.search(plain)]
        for rule_id, categories in found:
            entry = elements.setdefault(path, (set(), []))
            entry[0].update(categories)
            entry[1].append(rule_id)


def _lending_rules(labelled: LabelledResource, policy: SharingPolicy) -> list[LabelRule]:
    """The rules with `lend` that matched a labelled resource: what it lends, it lends
    wherever it is labelled."""
    matched = set(labelled.rules)
    return [
        rule
        for rule in policy.rules_by_type.get(labelled.resource_type, ())
        if rule.lend and rule.id in matched
    ]


def _lent_to(rule: LabelRule, node: Any, seen: _Seen, by_url: Mapping[str, str]) -> set[str]:
    """What a lending rule's `lend` paths from `node` refer to (of the types it lends
    to), as `Type/id`."""
    found: set[str] = set()
    for at in rule.lend:
        for _, ref in seen.locate(node, at):
            raw = ref.get("reference") if isinstance(ref, dict) else None
            target = resolve_reference(raw, by_url) if isinstance(raw, str) else None
            if target is not None and (not rule.lend_to or target.split("/", 1)[0] in rule.lend_to):
                found.add(target)
    return found


def _borrowers(
    res: dict[str, Any], rules: Sequence[LabelRule], seen: _Seen, by_url: Mapping[str, str]
) -> set[str]:
    """What a resource's lending rules lend its categories to (what their `lend` paths
    refer to), as `Type/id`."""
    found: set[str] = set()
    for rule in rules:
        if not rule.elements:
            found |= _lent_to(rule, res, seen, by_url)
    return found


def _element_lending_rules(resource_type: str, policy: SharingPolicy) -> list[LabelRule]:
    return [r for r in policy.rules_by_type.get(resource_type, ()) if r.lend and r.elements]


def _element_loans(
    res: dict[str, Any],
    key: str,
    rules: Sequence[LabelRule],
    policy: SharingPolicy,
    resolve: Resolver,
    seen: _Seen,
    by_url: Mapping[str, str],
) -> list[tuple[frozenset[str], set[str]]]:
    """What each element a lending rule for elements matches carries (its label and
    those within it, as its rules, words and codes give them), and what its `lend`
    paths (from the element) refer to: a care-team member is what their place in the
    team says they are."""
    loans: list[tuple[Path, set[str]]] = []
    for rule in rules:
        for dotted in rule.elements:
            for path, value in seen.locate(res, dotted):
                if _matches(rule, value, key, res, seen):
                    targets = _lent_to(rule, value, seen, by_url)
                    if targets:
                        loans.append((path, targets))
    if not loans:
        return []
    elements = _element_labels(res, key, policy, resolve, None, seen)[0]
    out = []
    for path, targets in loans:
        width = len(path)
        carried = {c for at, (cats, _) in elements.items() if at[:width] == path for c in cats}
        out.append((frozenset(carried), targets))
    return out


def label_resources(
    entries: Sequence[tuple[str | None, dict[str, Any]]],
    policy: SharingPolicy,
    outside: Mapping[str, frozenset[str]] | None = None,
    *,
    elements_of: Container[str] | None = None,
    known: Mapping[str, LabelledResource] | None = None,
    elements_wanted: Callable[[str, frozenset[str]], bool] | None = None,
) -> list[LabelledResource]:
    """Label a patient's record: (fullUrl, resource) pairs. Rules that inherit
    see the other resources of the record, then `outside` (labels known from
    elsewhere, e.g. a store). `elements_of`: the resources (Type/id) whose elements
    are labelled by what they say (by default all); the others are there only to be
    referred to (what a store's answer refers to), and carry what they carry as a
    whole, which is all that is asked of them. `known`: such resources labelled as
    wholes before (by Type/id, with no fullUrl), with everything they refer to and
    every role that lends to them: labelled here, they would carry the same, so
    they are taken as they are (unless a resource labelled here lends to them).
    `elements_wanted(key, categories)`: whether a resource of `elements_of`, carrying
    these categories as a whole (inherited and lent included), is to be read any
    further; False for one the recipient gets none of whatever its elements say
    (it is then labelled with those categories alone: reading more would only
    add to them)."""
    first: dict[str, frozenset[str]] = {}
    by_url: dict[str, str] = {}
    passes = []
    known = known or {}

    def reused(key: str, url: str | None, res: dict[str, Any]) -> LabelledResource | None:
        before = known.get(key)
        if before is None or before.resource is not res or url is not None:
            return None
        return before if elements_of is not None and key not in elements_of else None

    for url, res in entries:
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise LabellingError("a record entry is not a FHIR resource")
        key = f"{res['resourceType']}/{res.get('id')}"
        seen = _Seen.of(policy)
        before = reused(key, url, res)
        if before is not None:
            found = (set(before.categories), _lending_rules(before, policy))
        else:
            found = _first_pass(res, key, policy, seen)
        first[key] = frozenset(found[0] or {policy.default_category})
        passes.append((key, found, seen))
        if url:
            by_url[url] = key

    def resolve(ref: str) -> frozenset[str] | None:
        target = resolve_reference(ref, by_url)
        if target is None:
            return None
        if target in first:
            return first[target]
        return outside.get(target) if outside is not None else None

    # What a resource inherits passes on to what inherits from it, however many steps
    # away (an activity, its performer's role, the role's organisation), and what a
    # role lends to its holder with it: inherit and lend until nothing changes.
    inheriting = [
        (res, key, found, seen)
        for (url, res), (key, found, seen) in zip(entries, passes, strict=True)
        if reused(key, url, res) is None and any(rule.inherit for rule in found[1])
    ]
    own = {key: found for key, found, _ in passes}
    # Each lender and the resources of the record it lends to: fixed, as references are.
    lenders = [
        (key, targets)
        for (_, res), (key, found, seen) in zip(entries, passes, strict=True)
        if (targets := _borrowers(res, found[1], seen, by_url) & own.keys())
    ]
    # Each resource with elements that lend (a care team's members), with the rules
    # that lend them: what an element carries can change as what it inherits does.
    element_lenders = [
        (res, key, rules, seen)
        for (_, res), (key, _, seen) in zip(entries, passes, strict=True)
        if (rules := _element_lending_rules(res["resourceType"], policy))
    ]

    # How many times `first` has changed, and the loans as they were read after so
    # many: they depend on nothing else, so they are read again only after a change.
    changes = 0
    read: tuple[int, list[tuple[str, frozenset[str], set[str]]]] | None = None

    def element_loans() -> list[tuple[str, frozenset[str], set[str]]]:
        nonlocal read
        if read is None or read[0] != changes:
            read = (
                changes,
                [
                    (key, carried, in_record)
                    for res, key, rules, seen in element_lenders
                    for carried, targets in _element_loans(
                        res, key, rules, policy, resolve, seen, by_url
                    )
                    if (in_record := targets & own.keys())
                ],
            )
        return read[1]

    loans = element_loans() if element_lenders else []
    # Each lender and what it lends to, whole or by its elements.
    lending_to = [*lenders, *((key, targets) for key, _, targets in loans)]
    taken = {
        key
        for (url, res), (key, _, _) in zip(entries, passes, strict=True)
        if reused(key, url, res) is not None
    }
    borrowing = {t for _, targets in lending_to for t in targets} - {k for _, k, _, _ in inheriting}
    default = policy.default_category

    def lending() -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for key, targets in lenders:
            for target in targets:
                out.setdefault(target, set()).update(first[key])
        for _, carried, targets in element_loans() if loans else ():
            for target in targets:
                out.setdefault(target, set()).update(carried)
        return out

    for _ in range(len(entries) + 1 if lenders or loans else len(inheriting)):
        changed = False
        lent = lending()
        for res, key, found, seen in inheriting:
            inherited = frozenset(
                set(found[0]).union(
                    lent.get(key, ()),
                    *(
                        _inherited(rule, res, key, resolve, default, seen)
                        for rule in found[1]
                        if rule.inherit
                    ),
                )
                or {default}
            )
            if inherited != first[key]:
                first[key] = inherited
                changed = True
        for key in borrowing:
            now = frozenset(set(own[key][0]) | lent.get(key, set()) or {default})
            if now != first[key]:
                first[key] = now
                changed = True
        if not changed:
            break
        changes += 1
    lent = lending()
    if any(not lent.get(key, set()) <= known[key].categories for key in taken):
        # The record lends one labelled before what it did not carry, which may pass on
        # to others labelled before: all are labelled afresh. (Lent nothing new, each
        # carries here what it carried, and so does all that takes from it.)
        return label_resources(
            entries, policy, outside, elements_of=elements_of, elements_wanted=elements_wanted
        )

    names = _Names(entries, by_url)

    # Asked of and not wanted: nothing of them goes, whatever their elements say. (Not
    # one with contained resources: what they carry stands in for the default category
    # it carries in `first`, so, read, it may carry less than that.)
    unread = {
        key
        for (_, res), (key, _, _) in zip(entries, passes, strict=True)
        if elements_wanted is not None
        and (elements_of is None or key in elements_of)
        and "contained" not in res
        and not elements_wanted(key, first[key])
    }

    def elementwise(key: str) -> bool:
        return (elements_of is None or key in elements_of) and key not in unread

    def naming(res: dict[str, Any], key: str, seen: _Seen) -> list[tuple[Path, frozenset[str]]]:
        if not elementwise(key):
            return []
        return [
            (path, frozenset().union(*(first[t] for t in targets)))
            for path, targets in names.elements(res, key, seen)
        ]

    labelled = [
        replace(before)  # a copy: the facts attached below are this record's
        if (before := reused(key, url, res)) is not None
        else LabelledResource(
            res, key, first[key], tuple(rule.id for rule in found[1]) or ("default",), (), url
        )
        if key in unread
        else _label(
            res,
            key,
            (set(found[0]) | lent.get(key, set()), found[1]),
            policy,
            resolve,
            url,
            seen,
            naming(res, key, seen),
            elements_too=elementwise(key),
        )
        for (url, res), (key, found, seen) in zip(entries, passes, strict=True)
    ]
    _attach_facts(labelled)
    return labelled
