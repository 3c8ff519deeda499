"""ValueSet membership for binding checks (pure).

Expands ValueSets whose content is available locally: `compose.include` with
listed concepts, whole CodeSystems held in full (`content = complete`), and
other ValueSets. An include this package cannot enumerate (an external system
such as SNOMED CT without listed concepts, or a filter) makes membership
*unknown* for codes of that system, never *false*: the validator then reports
nothing rather than a wrong error.
https://hl7.org/fhir/R4/valueset.html#compositions
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Resolve = Callable[[str], dict[str, Any] | None]


@dataclass
class Expansion:
    codes: set[tuple[str, str]] = field(default_factory=set)
    open_systems: set[str] = field(default_factory=set)
    open_any: bool = False

    def contains(self, system: str | None, code: str) -> bool | None:
        """True or False when known; None when this package cannot tell."""
        if (system or "", code) in self.codes:
            return True
        if system is None:
            # A bare code (a `code` element): of a system this package cannot enumerate
            # (BCP 13 mime types, BCP 47 languages), it may well be in the ValueSet.
            if any(c == code for _, c in self.codes):
                return True
            return None if self.open_any or self.open_systems else False
        if system in self.open_systems or self.open_any:
            return None
        return False


def _concepts(concepts: Iterable[dict[str, Any]]) -> Iterable[str]:
    for c in concepts:
        yield c["code"]
        yield from _concepts(c.get("concept", []))


class Terminology:
    def __init__(self, resolve: Resolve):
        self._resolve = resolve
        self._cache: dict[str, Expansion | None] = {}

    def expand(self, url: str) -> Expansion | None:
        url = url.split("|", 1)[0]
        if url not in self._cache:
            self._cache[url] = None  # guards against ValueSets that include themselves
            self._cache[url] = self._expand(url)
        return self._cache[url]

    def _expand(self, url: str) -> Expansion | None:
        vs = self._resolve(url)
        if vs is None or vs.get("resourceType") != "ValueSet":
            return None
        exp = Expansion()
        if "expansion" in vs and not vs.get("compose"):
            for c in vs["expansion"].get("contains", []):
                exp.codes.add((c.get("system", ""), c["code"]))
            return exp
        compose = vs.get("compose", {})
        for inc in compose.get("include", []):
            self._include(inc, exp)
        for exc in compose.get("exclude", []):
            excluded = Expansion()
            self._include(exc, excluded)
            exp.codes -= excluded.codes
        return exp

    def _include(self, inc: dict[str, Any], exp: Expansion) -> None:
        system = inc.get("system")
        part = Expansion()
        if system:
            if inc.get("concept"):
                part.codes |= {(system, c["code"]) for c in inc["concept"]}
            elif inc.get("filter"):
                part.open_systems.add(system)
            else:
                cs = self._resolve(system)
                if cs is not None and cs.get("content") == "complete":
                    part.codes |= {(system, code) for code in _concepts(cs.get("concept", []))}
                else:
                    part.open_systems.add(system)
        for vs_url in inc.get("valueSet", []):
            other = self.expand(vs_url)
            if other is None:
                part.open_any = True
            elif not system:
                part.codes |= other.codes
                part.open_systems |= other.open_systems
                part.open_any |= other.open_any
            else:  # intersection of a system include and a ValueSet
                part.codes &= other.codes
        exp.codes |= part.codes
        exp.open_systems |= part.open_systems
        exp.open_any |= part.open_any
