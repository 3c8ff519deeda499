"""The sharing policy: categories, labelling rules, recipients and legal exceptions.

The policy is data (`policy/sharing.toml`); `parse_policy` checks it and turns
it into values the engine can run fast. Nothing here reads files.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cpa_fhir.errors import PolicyError

CATEGORY_SYSTEM = "https://cpa-fhir.org/fhir/CodeSystem/cpa-information-category"
LEGAL_BASIS_SYSTEM = "https://cpa-fhir.org/fhir/CodeSystem/disclosure-legal-basis"
PARTNER_TYPE_SYSTEM = "https://cpa-fhir.org/fhir/CodeSystem/partner-agency-type"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
SENSITIVITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
HANDLING_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"

CARER = "carer"
CONFIDENTIALITY_ORDER = {"U": 0, "L": 1, "M": 2, "N": 3, "R": 4, "V": 5}
_EXPLICIT_LEVEL = CONFIDENTIALITY_ORDER["V"]


@dataclass(frozen=True, slots=True)
class Category:
    """One CPA information category and the HL7 labels it carries."""

    code: str
    confidentiality: str
    sensitivity: tuple[str, ...] = ()

    @property
    def needs_explicit_permit(self) -> bool:
        """Very restricted content is permitted only by naming it (CPA.md rule 7)."""
        return CONFIDENTIALITY_ORDER[self.confidentiality] >= _EXPLICIT_LEVEL


@dataclass(frozen=True, slots=True)
class LabelRule:
    """One labelling rule; see the comments in `policy/sharing.toml`."""

    id: str
    resource_types: frozenset[str]
    categories: tuple[str, ...]
    elements: tuple[str, ...] = ()
    profile: str | None = None
    codes: frozenset[tuple[str, str]] = frozenset()
    codes_at: tuple[str, ...] = ("code",)
    words: re.Pattern[str] | None = None
    text_at: tuple[str, ...] = ()
    extension: str | None = None
    inherit: tuple[str, ...] = ()
    # Reference path(s) to resources that take this resource's categories: what a role
    # is, the professional holding it is (a children's social worker).
    lend: tuple[str, ...] = ()
    # The resource types `lend` reaches (all when empty): a care team's service user is
    # not what their place in the team says.
    lend_to: frozenset[str] = frozenset()
    # Each phrase `words` finds, lowercased, with all but letters and digits taken
    # out, when all are ASCII: in ASCII text so squashed, `words` can match only where
    # one of them is a substring (the separators a match may leave out are what is
    # taken out), which is much quicker to rule out than to search for.
    ascii_words: tuple[str, ...] = ()
    # Of each whole-word abbreviation (`=OD`), itself lowercased: found only where it is
    # a word of the text (a run of letters and digits), as "od" in "code" is not.
    ascii_tokens: frozenset[str] = frozenset()
    # The words as the policy lists them (`!phrase` and `=word` marks and all).
    listed: tuple[str, ...] = ()
    # Whether `ascii_words` and `ascii_tokens` say where `words` may match (all ASCII).
    prefiltered: bool = False
    # `ascii_words` as one pattern: one search in C, not a loop of substring tests.
    ascii_any: re.Pattern[str] | None = None

    def ruled_out(self, squashed: str | None, tokens: Callable[[], frozenset[str]]) -> bool:
        """Whether `words` cannot match ASCII text so squashed (`squash`; None: not
        ASCII, cannot be told), its words (runs of letters and digits) given by
        `tokens` if needed."""
        if not self.prefiltered or squashed is None:
            return False
        if self.ascii_any is not None and self.ascii_any.search(squashed):
            return False
        return not self.ascii_tokens or self.ascii_tokens.isdisjoint(tokens())

    @property
    def anywhere(self) -> bool:
        """`element = "*"`: every element of the resource, on its own, its words read
        in every string it holds (an identifier's system, a reference, an extension's
        URL: the recipient reads those too), not only its text."""
        return self.elements == (ANYWHERE,)


ANYWHERE = "*"
# Typographic forms of the characters the policy's words are written with, letters
# of other scripts that look like Latin ones, and characters that show nothing: a
# word is found however a word processor (or someone hiding it) wrote it
# ("self\u2011harm", "children\u2019s", "S\u200buicidal", Cyrillic "prob\u0430tion").
_LOOKALIKES = {
    # Cyrillic
    "\u0430": "a", "\u0435": "e", "\u043e": "o", "\u0440": "p", "\u0441": "c",
    "\u0443": "y", "\u0445": "x", "\u0456": "i", "\u0458": "j", "\u0455": "s",
    "\u04bb": "h", "\u0501": "d", "\u051b": "q", "\u051d": "w", "\u043a": "k",
    "\u043c": "m", "\u043d": "h", "\u0442": "t", "\u0432": "b",
    "\u0410": "A", "\u0412": "B", "\u0415": "E", "\u041a": "K", "\u041c": "M",
    "\u041d": "H", "\u041e": "O", "\u0420": "P", "\u0421": "C", "\u0422": "T",
    "\u0425": "X", "\u0406": "I", "\u0408": "J", "\u0405": "S",
    # Greek
    "\u03bf": "o", "\u03b1": "a", "\u03b9": "i", "\u03ba": "k", "\u03bd": "v",
    "\u03c1": "p", "\u03c4": "t", "\u03c5": "u", "\u03c7": "x", "\u03b5": "e",
    "\u039f": "O", "\u0391": "A", "\u0392": "B", "\u0395": "E", "\u0397": "H",
    "\u0399": "I", "\u039a": "K", "\u039c": "M", "\u039d": "N", "\u03a1": "P",
    "\u03a4": "T", "\u03a5": "Y", "\u03a7": "X", "\u0396": "Z",
}  # fmt: skip
_APOSTROPHES = "\u2018\u2019\u201b\u02bc\u2032\uff07\u0060\u00b4"


def _plain_of(ch: str) -> str:
    """What one character is read as: a dash, an apostrophe, a Latin look-alike, or
    nothing (format characters, variation selectors, tags, combining marks), else
    itself."""
    if ch in _LOOKALIKES:
        return _LOOKALIKES[ch]
    if ch in _APOSTROPHES:
        return "'"
    if ch == "_":
        return "-"
    kind = unicodedata.category(ch)
    if kind == "Pd" or ch == "\u2043":
        return "-"
    if kind in ("Cf", "Mn", "Me") or "\ufe00" <= ch <= "\ufe0f" or ch == "\u034f":
        return ""
    if "\U000e0000" <= ch <= "\U000e0fff":  # tags and variation selectors supplement
        return ""
    return ch


_PLAIN: dict[str, str] = {}


def plain_text(text: str) -> str:
    """Text as the policy's words are matched against it: percent-escapes (of a URL)
    and HTML character references decoded, as a recipient's software shows them;
    compatibility forms folded and accents taken off (NFKD: full-width letters,
    ligatures), dashes and apostrophes plain, Cyrillic and Greek look-alikes as the
    Latin letters they look like, invisible characters gone, `_` a hyphen. ASCII text
    with none of those is returned as it is, but for `_`."""
    if "%" in text:
        text = unquote(text)
    if "&" in text:
        text = html.unescape(text)
    if text.isascii():
        return text.replace("_", "-") if "_" in text else text
    out = []
    for ch in unicodedata.normalize("NFKD", text):
        plain = _PLAIN.get(ch)
        if plain is None:
            plain = _PLAIN[ch] = _plain_of(ch)
        out.append(plain)
    return "".join(out)


def meaning(display: str) -> str:
    """A code's display as compared with the policy's `code-displays`: its plain text,
    case and runs of white space aside."""
    return " ".join(plain_text(display).casefold().split())


class RulesByType(Mapping[str, tuple["LabelRule", ...]]):
    """The rules for each resource type: its own, then those for every type
    (`resource = "*"`), which hold for any type, named or not."""

    def __init__(
        self, by_type: Mapping[str, tuple[LabelRule, ...]], anywhere: tuple[LabelRule, ...]
    ):
        self._by_type = dict(by_type)
        self._anywhere = anywhere
        self._cache: dict[str, tuple[LabelRule, ...]] = {}

    def __getitem__(self, resource_type: str) -> tuple[LabelRule, ...]:
        found = self._cache.get(resource_type)
        if found is None:
            found = self._by_type.get(resource_type, ()) + self._anywhere
            if len(self._cache) < 1024:  # types a client names are not all kept
                self._cache[resource_type] = found
        return found

    def get(self, resource_type: str, default: Any = None) -> tuple[LabelRule, ...]:
        return self[resource_type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_type)

    def __len__(self) -> int:
        return len(self._by_type)


@dataclass(frozen=True, slots=True)
class LegalException:
    """A named legal basis for disclosure without consent (handbook §36.1, §37.7)."""

    code: str
    recipients: frozenset[str]
    purposes: frozenset[str]
    categories: frozenset[str]


@dataclass(frozen=True, slots=True)
class SharingPolicy:
    categories: Mapping[str, Category]
    default_category: str
    rules: tuple[LabelRule, ...]
    recipients: Mapping[str, str]
    exceptions: Mapping[str, LegalException]
    supporting: frozenset[str]
    purposes: frozenset[str] = frozenset()
    # v3-ActReason is-a: a purpose, the broader purpose it falls within (COC -> TREAT).
    purpose_within: Mapping[str, str] = field(default_factory=dict)
    rules_by_type: Mapping[str, tuple[LabelRule, ...]] = field(default_factory=dict)
    # Every (system, code) a rule names: what those codes carry, the rules say; with
    # the displays that are its meaning (`meaning`), which are not read for words.
    coded: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    # The categories of each such code, wherever it is (a risk code as a medication's
    # reason says what the risk Flag would), and any of their code values in text.
    code_categories: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    code_values: re.Pattern[str] | None = None
    categories_by_sensitivity: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Where the record's dates are days: a consent "until 2026-07-31" ends at midnight
    # there (https://hl7.org/fhir/R4/datatypes.html#date: a date has no time zone).
    zone: tzinfo = UTC
    # The rules for any element, by the first letters of their words, for one pass
    # over the elements of a resource to find them all.
    word_starts: WordIndex = field(default_factory=lambda: WordIndex({}, frozenset()))
    # Every rule with words, likewise: several rules ask of one text at once.
    text_word_starts: WordIndex = field(default_factory=lambda: WordIndex({}, frozenset()))
    # Media types of base64 content (an attachment's data) read as text; any other
    # such content is unreadable and takes the default category.
    readable_media_types: frozenset[str] = frozenset()

    def category_levels(self, categories: frozenset[str]) -> str:
        """The confidentiality code of content carrying these categories: the highest."""
        best = "N"
        for c in categories:
            level = self.categories[c].confidentiality
            if CONFIDENTIALITY_ORDER[level] > CONFIDENTIALITY_ORDER[best]:
                best = level
        return best


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PolicyError(f"{where} must be a string or a list of strings")


def _toml_type(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    named = {bool: "true or false", int: "an integer", float: "a float"}
    return named.get(type(value), f"a {type(value).__name__}")


def _known(codes: tuple[str, ...], known: Mapping[str, Any], what: str, where: str) -> None:
    for c in codes:
        if c not in known:
            raise PolicyError(f"{where} names unknown {what} '{c}'")


# Between the parts of a listed phrase: any run of characters that are not letters or
# digits, or none ("self-harm": self harm, self/harm, selfharm); never the NUL that
# joins the texts of separate elements.
_BETWEEN = r"[^\w\x00]*"


def _bare_word(word: str) -> str:
    """A listed word without its mark (`=` whole word only)."""
    return word[1:] if word.startswith("=") else word


def _word_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    """Words found at the start of a word (after anything but a letter: a digit, a
    percent-escape's), in any case; `=word` only as a whole word (an abbreviation:
    "=OD" is not the start of "odd"). The parts of a phrase may be joined by any
    punctuation or white space, or by none, and an apostrophe may be left out
    ("childrens services"). A listed `!phrase` is one that does not count though it
    holds a listed word after a beginning of its own ("!non-offender": the Mental
    Health Act's words for a civil section): the word is not found after that
    beginning. Matched against `plain_text`, so written in its forms too."""
    listed = [w for w in words if not w.startswith("!")]
    not_after: dict[str, list[str]] = {}
    for negated in (plain_text(w[1:]).lower() for w in words if w.startswith("!")):
        for word in listed:
            at = negated.find(plain_text(_bare_word(word)).lower())
            if at > 0:
                not_after.setdefault(word, []).append(negated[:at])

    def one(word: str) -> str:
        parts = re.split(r"[\s\-]+", plain_text(_bare_word(word)).strip())
        escaped = _BETWEEN.join(re.escape(p).replace("'", "'?") for p in parts if p)
        guards = "".join(f"(?<!{re.escape(p)})" for p in not_after.get(word, []))
        whole = r"(?![^\W\d_])" if word.startswith("=") else ""
        return guards + escaped + whole

    alternatives = "|".join(one(w) for w in sorted(listed, key=len, reverse=True))
    return re.compile(rf"(?<![^\W\d_])(?:{alternatives})", re.IGNORECASE)


_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def squash(text: str) -> str:
    """ASCII text lowercased, with all but letters and digits taken out."""
    return _NOT_ALNUM.sub("", text.lower())


def _necessary_part(word: str) -> tuple[str, bool]:
    """What of a listed ASCII word every text it is found in holds: the word squashed,
    and whether it is a whole word of such a text (an abbreviation found only whole,
    all letters and digits) rather than a part of the squashed text."""
    bare = _bare_word(word)
    return squash(bare), word.startswith("=") and bare.isalnum()


@dataclass(frozen=True, slots=True)
class WordIndex:
    """Rules whose every word starts with an ASCII letter, by the first one to three
    letters (lowercased) of each of their words: in ASCII text, such a word can be
    found only where a run of letters starts with them, so one pass over the text's
    runs of letters finds the matches of all of them. Under each key, the rules are
    grouped by their pattern (rules for several types share a word list), so that
    each pattern is tried once where a run starts."""

    starts: Mapping[str, tuple[tuple[re.Pattern[str], tuple[str, ...]], ...]]
    rule_ids: frozenset[str]  # the rules it indexes
    # Where, in lowercased text, a run of letters starts with one of the keys: the
    # runs that start otherwise (most of them) are skipped without a look.
    runs: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", re.compile(r"(?<![a-z])" + _alternatives(self.starts)))


def _alternatives(keys: Iterable[str]) -> str:
    """A pattern matching any of these (non-empty) strings, as a tree of their letters:
    the regular expression engine then tries the letters, not each string."""
    tree: dict[str, Any] = {}
    for key in filter(None, keys):
        node = tree
        for letter in key:
            node = node.setdefault(letter, {})
        node[""] = {}

    def branch(node: dict[str, Any]) -> str:
        ends = "" in node
        arms = [re.escape(letter) + branch(rest) for letter, rest in sorted(node.items()) if letter]
        if not arms:
            return ""
        joined = arms[0] if len(arms) == 1 and not ends else "(?:" + "|".join(arms) + ")"
        return joined + "?" if ends else joined

    # A pattern that matches nothing where there is no key.
    return branch(tree) if tree else "(?!)"


def _word_starts(rules: Sequence[LabelRule]) -> WordIndex:
    """A `WordIndex` of these rules (those it can index)."""
    index: dict[str, list[LabelRule]] = {}
    for rule in rules:
        if rule.words is None or "\x00" in rule.words.pattern:
            continue
        keys = set()
        for word in rule.listed:
            if word.startswith("!"):
                continue
            first = re.match(r"[a-z]+", plain_text(_bare_word(word)).lower())
            if first is None or not plain_text(_bare_word(word)).isascii():
                break  # a word this index cannot find: the rule is searched whole
            keys.add(first.group()[:3])
        else:
            for key in keys:
                index.setdefault(key, []).append(rule)
    # Every rule of a pattern, under each key: where the pattern matches, all of them do.
    by_pattern: dict[re.Pattern[str], list[str]] = {}
    for rule in dict.fromkeys(r for rules in index.values() for r in rules):
        assert rule.words is not None
        by_pattern.setdefault(rule.words, []).append(rule.id)
    starts = {
        key: tuple(
            (pattern, tuple(by_pattern[pattern]))
            for pattern in dict.fromkeys(r.words for r in rules if r.words is not None)
        )
        for key, rules in index.items()
    }
    return WordIndex(starts, frozenset(r.id for rules in index.values() for r in rules))


def _rule(
    raw: Any,
    index: int,
    systems: Mapping[str, str],
    categories: Mapping[str, Category],
    word_lists: Mapping[str, tuple[str, ...]],
) -> LabelRule:
    if not isinstance(raw, dict):
        raise PolicyError(f"rule {index + 1} must be a table")
    rule_id = raw.get("id")
    where = f"rule '{rule_id}'" if isinstance(rule_id, str) else f"rule {index + 1}"
    allowed = {
        "id", "resource", "category", "element", "profile", "codes", "codes_at",
        "text", "text_at", "extension", "inherit", "lend", "lend_to",
    }  # fmt: skip
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise PolicyError(f"{where} has unknown key(s): {', '.join(unknown)}")
    if not isinstance(rule_id, str) or not rule_id:
        raise PolicyError(f"{where} needs an id")
    if "resource" not in raw or "category" not in raw:
        raise PolicyError(f"{where} needs a resource and a category")
    cats = _strings(raw["category"], f"{where}: category")
    _known(cats, categories, "category", where)
    codes: set[tuple[str, str]] = set()
    for token in _strings(raw.get("codes", []), f"{where}: codes"):
        system, sep, code = token.rpartition("|")
        if not sep or not system or not code:
            raise PolicyError(f"{where}: code '{token}' must be written system|code")
        codes.add((systems.get(system, system), code))
    words: re.Pattern[str] | None = None
    ascii_words: tuple[str, ...] = ()
    ascii_tokens: frozenset[str] = frozenset()
    prefiltered = False
    listed: tuple[str, ...] = ()
    if "text" in raw:
        text = raw["text"]
        if isinstance(text, str) and text in word_lists:
            listed = word_lists[text]
        else:
            listed = _strings(text, f"{where}: text")
        if not [w for w in listed if not w.startswith("!")]:
            raise PolicyError(f"{where}: text lists no words")
        for w in listed:
            if not plain_text(_bare_word(w.removeprefix("!"))).strip(" -"):
                raise PolicyError(f"{where}: text lists an empty word {w!r}")
        for w in listed:
            if w.startswith("!") and not any(
                0 < plain_text(w[1:]).lower().find(plain_text(x).lower())
                for x in listed
                if not x.startswith("!")
            ):
                raise PolicyError(
                    f"{where}: '{w}' holds none of the listed words after a beginning of its own"
                )
        words = _word_pattern(listed)
        parts = [_necessary_part(w) for w in listed if not w.startswith("!")]
        prefiltered = all(w.isascii() for w in listed) and all(p for p, _ in parts)
        if prefiltered:
            ascii_words = tuple(sorted({p for p, whole in parts if not whole}))
            ascii_tokens = frozenset(p for p, whole in parts if whole)
    profile = raw.get("profile")
    extension = raw.get("extension")
    for name, value in (("profile", profile), ("extension", extension)):
        if value is not None and not isinstance(value, str):
            raise PolicyError(f"{where}: {name} must be a URL")
    elements = _strings(raw.get("element", []), f"{where}: element")
    others = (
        "codes", "codes_at", "text_at", "profile", "extension", "inherit", "lend", "lend_to",
    )  # fmt: skip
    if ANYWHERE in elements and (len(elements) > 1 or words is None or set(others) & set(raw)):
        raise PolicyError(
            f'{where}: element "*" stands alone, with text and none of {", ".join(others)}'
        )
    if "lend_to" in raw and "lend" not in raw:
        raise PolicyError(f"{where}: lend_to says what lend reaches, and there is no lend")
    resource_types = frozenset(_strings(raw["resource"], f"{where}: resource"))
    if ANYWHERE in resource_types and len(resource_types) > 1:
        raise PolicyError(f'{where}: resource "*" stands alone')
    return LabelRule(
        id=rule_id,
        resource_types=resource_types,
        categories=cats,
        elements=elements,
        profile=profile,
        codes=frozenset(codes),
        codes_at=_strings(raw.get("codes_at", ["code"]), f"{where}: codes_at"),
        words=words,
        text_at=_strings(raw.get("text_at", []), f"{where}: text_at"),
        extension=extension,
        inherit=_strings(raw.get("inherit", []), f"{where}: inherit"),
        lend=_strings(raw.get("lend", []), f"{where}: lend"),
        lend_to=frozenset(_strings(raw.get("lend_to", []), f"{where}: lend_to")),
        ascii_words=ascii_words,
        ascii_tokens=ascii_tokens,
        listed=tuple(listed) if words is not None else (),
        prefiltered=prefiltered,
        ascii_any=re.compile("|".join(map(re.escape, ascii_words))) if ascii_words else None,
    )


def parse_policy(data: Mapping[str, Any]) -> SharingPolicy:
    """Check policy data (as read from TOML or JSON) and build the engine's policy.

    Raises PolicyError naming the first problem: the engine never runs on a
    policy it cannot fully understand.
    """
    if not isinstance(data, Mapping):
        raise PolicyError("the sharing policy must be a table")
    raw_categories = data.get("category")
    if not isinstance(raw_categories, Mapping) or not raw_categories:
        raise PolicyError("the sharing policy defines no categories")
    categories: dict[str, Category] = {}
    for code, spec in raw_categories.items():
        if not isinstance(spec, Mapping):
            raise PolicyError(f"category '{code}' must be a table")
        level = spec.get("confidentiality")
        if level is not None and not isinstance(level, str):
            # Checked first: a TOML array or table is not even hashable, let alone a code.
            raise PolicyError(
                f"category '{code}': confidentiality must be a string (N, R or V), "
                f"not {_toml_type(level)}"
            )
        if level not in CONFIDENTIALITY_ORDER:
            raise PolicyError(f"category '{code}' needs a confidentiality code (N, R or V)")
        sensitivity = _strings(spec.get("sensitivity", []), f"category '{code}': sensitivity")
        categories[code] = Category(code, level, sensitivity)
    default = data.get("default_category")
    if not isinstance(default, str) or default not in categories:
        raise PolicyError("default_category must name one of the categories")
    if categories[default].confidentiality != "V":
        raise PolicyError("default_category must be very restricted (V): unlabelled content is")
    systems = data.get("systems", {})
    if not isinstance(systems, Mapping) or not all(isinstance(v, str) for v in systems.values()):
        raise PolicyError("[systems] must map short names to code system URLs")
    raw_words = data.get("words", {})
    if not isinstance(raw_words, Mapping):
        raise PolicyError("[words] must map names to lists of words")
    word_lists = {k: _strings(v, f"words '{k}'") for k, v in raw_words.items()}
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError("rules must be an array of tables ([[rule]])")
    rules = tuple(_rule(r, i, systems, categories, word_lists) for i, r in enumerate(raw_rules))
    ids = [r.id for r in rules]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise PolicyError(f"rule ids must be unique: {', '.join(duplicates)}")
    recipients = data.get("recipients", {})
    if not isinstance(recipients, Mapping) or not all(
        isinstance(v, str) for v in recipients.values()
    ):
        raise PolicyError("[recipients] must map names to partner agency types")
    exceptions: dict[str, LegalException] = {}
    raw_exceptions = data.get("exception", {})
    if not isinstance(raw_exceptions, Mapping):
        raise PolicyError("[exception.*] must be tables")
    for code, spec in raw_exceptions.items():
        where = f"exception '{code}'"
        if not isinstance(spec, Mapping):
            raise PolicyError(f"{where} must be a table")
        cats = _strings(spec.get("categories", []), f"{where}: categories")
        _known(cats, categories, "category", where)
        targets = _strings(spec.get("recipients", []), f"{where}: recipients")
        purposes = _strings(spec.get("purposes", []), f"{where}: purposes")
        if not cats or not targets or not purposes:
            raise PolicyError(f"{where} needs recipients, purposes and categories")
        exceptions[code] = LegalException(
            code, frozenset(targets), frozenset(purposes), frozenset(cats)
        )
    supporting = frozenset(_strings(data.get("supporting", []), "supporting"))
    known_purposes = frozenset(_strings(data.get("purposes", []), "purposes"))
    if not known_purposes:
        raise PolicyError("the sharing policy lists no purposes of use")
    for exc in exceptions.values():
        _known(
            tuple(sorted(exc.purposes)),
            {p: p for p in known_purposes},
            "purpose",
            f"exception '{exc.code}'",
        )
    within = data.get("purpose-within", {})
    if not isinstance(within, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in within.items()
    ):
        raise PolicyError("purpose-within must be a table of purpose = broader purpose")
    for start in within:
        seen, code = {start}, within[start]
        while code in within:
            if code in seen:
                raise PolicyError(f"purpose-within: {start} falls within itself")
            seen.add(code)
            code = within[code]
    by_type: dict[str, list[LabelRule]] = {}
    anywhere: list[LabelRule] = []
    for r in rules:
        if ANYWHERE in r.resource_types:
            anywhere.append(r)
            continue
        for t in r.resource_types:
            by_type.setdefault(t, []).append(r)
    by_sensitivity: dict[str, set[str]] = {}
    for c in categories.values():
        for s in c.sensitivity:
            by_sensitivity.setdefault(s, set()).add(c.code)
    zone_name = data.get("time_zone", "UTC")
    try:
        zone = ZoneInfo(zone_name) if isinstance(zone_name, str) else None
    except (ZoneInfoNotFoundError, ValueError, OSError):  # "Europe" is a folder of zones
        zone = None
    if zone is None:
        raise PolicyError(
            f"time_zone must name an IANA time zone (Europe/London), not {zone_name!r}"
        )
    readable = _strings(data.get("readable_media_types", []), "readable_media_types")
    for media_type in readable:
        kind, slash, subtype = media_type.partition("/")
        if (
            not slash
            or not kind
            or not subtype
            or ";" in media_type
            or media_type != media_type.strip()
        ):
            raise PolicyError(
                f"readable_media_types: {media_type!r} is not a media type (type/subtype, no parameters)"
            )
    code_categories: dict[tuple[str, str], frozenset[str]] = {}
    for r in rules:
        for pair in r.codes:
            code_categories[pair] = code_categories.get(pair, frozenset()) | frozenset(r.categories)
    meanings = data.get("code-displays", {})
    if not isinstance(meanings, Mapping) or not all(isinstance(v, str) for v in meanings.values()):
        raise PolicyError('[code-displays] must map "system|code" to the display of its meaning')
    displays: dict[tuple[str, str], set[str]] = {}
    for token, display in meanings.items():
        system, sep, code = token.rpartition("|")
        pair = (systems.get(system, system), code)
        if not sep or pair not in code_categories:
            raise PolicyError(f"[code-displays]: '{token}' is not a code a rule names")
        displays.setdefault(pair, set()).add(meaning(display))
    return SharingPolicy(
        zone=zone,
        readable_media_types=frozenset(m.lower() for m in readable),
        categories=categories,
        default_category=default,
        rules=rules,
        recipients=dict(recipients),
        exceptions=exceptions,
        supporting=supporting,
        purposes=known_purposes,
        purpose_within=dict(within),
        coded={pair: frozenset(displays.get(pair, ())) for pair in code_categories},
        code_categories=code_categories,
        code_values=re.compile(_alternatives(plain_text(c) for _, c in code_categories))
        if code_categories
        else None,
        rules_by_type=RulesByType({t: tuple(rs) for t, rs in by_type.items()}, tuple(anywhere)),
        word_starts=_word_starts(anywhere),
        text_word_starts=_word_starts(rules),
        categories_by_sensitivity={k: frozenset(v) for k, v in by_sensitivity.items()},
    )
