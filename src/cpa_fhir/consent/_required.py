"""Required elements: what a resource must keep to stay valid, from its profiles' snapshots."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cpa_fhir.conformance.package import ConformancePackage

_BASE = "http://hl7.org/fhir/StructureDefinition/"


class RequiredElements:
    """Which elements a resource must keep to stay valid, from the profiles' snapshots."""

    def __init__(self, package: ConformancePackage | None) -> None:
        self._package = package
        self._by_url: dict[str, tuple[tuple[str, ...], ...]] = {}
        self._by_profiles: dict[tuple[Any, ...], ProfileRequirements] = {}

    def _paths(self, url: str) -> tuple[tuple[str, ...], ...]:
        if url not in self._by_url:
            sd = self._package.resolve(url) if self._package is not None else None
            paths: list[tuple[str, ...]] = []
            for el in (sd or {}).get("snapshot", {}).get("element", []):
                steps = tuple(el["path"].split(".")[1:])
                required_extension = _required_extension(el, steps)
                if required_extension is not None:
                    paths.append((required_extension,))
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

    @staticmethod
    def _urls(resource: Mapping[str, Any]) -> list[Any]:
        meta = resource.get("meta")
        urls = list(meta.get("profile") or []) if isinstance(meta, dict) else []
        urls.append(_BASE + str(resource.get("resourceType")))
        return urls

    def of(self, resource: Mapping[str, Any]) -> ProfileRequirements | None:
        """The required elements of the resource's profiles, or None when its profile
        list cannot be read that way (an unhashable or unresolvable entry)."""
        urls = self._urls(resource)
        try:
            key = tuple(urls)
            found = self._by_profiles.get(key)
            if found is None:
                seen: set[tuple[str, ...]] = set()
                elements: list[tuple[str, ...]] = []
                for url in urls:
                    for steps in self._paths(url):
                        if steps not in seen:  # the first occurrence is the one reported
                            seen.add(steps)
                            elements.append(steps)
                found = self._by_profiles[key] = ProfileRequirements(elements)
        except Exception:  # let the plain check below meet the same error, if it does
            return None
        return found

    def missing(self, resource: Mapping[str, Any]) -> str | None:
        """The first required element the resource lacks, as a path, or None."""
        requirements = self.of(resource)
        if requirements is not None:
            return requirements.missing(resource)
        for url in self._urls(resource):
            for steps in self._paths(url):
                if not present(resource, steps, 0):
                    return f"{resource.get('resourceType')}.{_dotted(steps)}"
        return None


class ProfileRequirements:
    """The required elements of one list of profiles, in the order they are checked.

    For a resource that had every one of them, then lost elements: removing an
    element can take only that element and the ancestors it leaves empty, and
    masking a reference keeps the element but takes what was inside it. So only
    the required elements naming a removed element or one of its ancestors, or
    something inside a masked one, can be missing afterwards (`affected`).
    """

    __slots__ = ("steps", "_dotted", "_affected")

    def __init__(self, steps: Sequence[tuple[str, ...]]) -> None:
        self.steps = tuple(steps)
        self._dotted = tuple(_dotted(s) for s in self.steps)
        self._affected: dict[tuple[tuple[str, ...], bool], tuple[int, ...]] = {}

    def missing(self, resource: Mapping[str, Any]) -> str | None:
        for i, steps in enumerate(self.steps):
            if not present(resource, steps, 0):
                return self.describe(resource, i)
        return None

    def describe(self, resource: Mapping[str, Any], index: int) -> str:
        return f"{resource.get('resourceType')}.{self._dotted[index]}"

    def affected(self, names: tuple[str, ...], removal: bool) -> tuple[int, ...]:
        """The required elements a removal (or masking) at these element names can take."""
        found = self._affected.get((names, removal))
        if found is None:
            found = tuple(
                i
                for i, steps in enumerate(self.steps)
                if (len(steps) <= len(names) if removal else len(steps) > len(names))
                and all(map(_names, steps, names))
            )
            self._affected[(names, removal)] = found
        return found

    def missing_after(
        self,
        resource: Mapping[str, Any],
        removed: Iterable[tuple[str, ...]],
        masked: Iterable[tuple[str, ...]],
    ) -> list[int]:
        """Required elements the resource lacks, in order, of those removals and maskings
        at these element names could take."""
        affected: set[int] = set()
        for names in removed:
            affected.update(self.affected(names, True))
        for names in masked:
            affected.update(self.affected(names, False))
        return [i for i in sorted(affected) if not present(resource, self.steps[i], 0)]

    def present(self, resource: Mapping[str, Any], indices: Iterable[int]) -> bool:
        steps = self.steps
        return all(present(resource, steps[i], 0) for i in indices)


# A step naming an extension of the resource by its URL: `extension@URL`.
_EXTENSION_AT = "extension@"


def _required_extension(element: Mapping[str, Any], steps: tuple[str, ...]) -> str | None:
    """`extension@URL` for a slice of the resource's own extensions that must be there
    (a risk flag's source), else None. Removing it would leave the resource invalid."""
    if steps != ("extension",) or "sliceName" not in element or element.get("min", 0) < 1:
        return None
    for kind in element.get("type") or []:
        for url in kind.get("profile") or []:
            if isinstance(url, str):
                return _EXTENSION_AT + url
    return None


def _dotted(steps: tuple[str, ...]) -> str:
    """A required element's path as FHIRPath writes it (`extension('URL')`)."""
    return ".".join(
        f"extension('{s[len(_EXTENSION_AT) :]}')" if s.startswith(_EXTENSION_AT) else s
        for s in steps
    )


def _names(step: str, name: str) -> bool:
    """Whether a snapshot step (`value[x]` for a choice, `extension@URL` for an
    extension) names an element."""
    if step == name:
        return True
    if step.startswith(_EXTENSION_AT):
        return name == "extension"
    if not step.endswith("[x]"):
        return False
    stem = step[:-3]
    return name.startswith(stem) and name[len(stem) : len(stem) + 1].isupper()


def present(node: Any, steps: tuple[str, ...], at: int) -> bool:
    """Whether every instance of the parent path has the last step (from step `at`)."""
    if isinstance(node, list):
        return all(present(item, steps, at) for item in node)
    if not isinstance(node, dict):
        return True
    head = steps[at]
    last = at + 1 == len(steps)
    if head.startswith(_EXTENSION_AT):
        url = head[len(_EXTENSION_AT) :]
        found = node.get("extension")
        return isinstance(found, list) and any(
            isinstance(e, dict) and e.get("url") == url for e in found
        )
    if head.endswith("[x]"):
        stem = head[:-3]
        keys = [k for k in node if k.startswith(stem) and k[len(stem) : len(stem) + 1].isupper()]
        if last:
            return bool(keys)
        return all(present(node[k], steps, at + 1) for k in keys)
    if head not in node:
        return not last  # a parent that is absent needs none of its children
    return last or present(node[head], steps, at + 1)
