"""The SearchParameters a store indexes and accepts: R4's own plus the package's.

R4's definitions are vendored in `cpa_fhir/fhir/definitions/r4-search-parameters.json`
(written by `tools/vendor_search_parameters.py`); the project's own are SearchParameter
resources in the profiles package (https://hl7.org/fhir/R4/searchparameter.html).
`SearchParameters` itself is a plain value; only the loaders read files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Literal, cast

import orjson

from cpa_fhir.errors import ProfileError
from cpa_fhir.store._paths import Evaluator, compile_fhirpath_evaluator

ParameterType = Literal["token", "reference", "date", "string", "uri", "number", "quantity"]
PARAMETER_TYPES: frozenset[str] = frozenset(
    {"token", "reference", "date", "string", "uri", "number", "quantity"}
)
# Parameters every resource type has, answered from the stored row rather than an index.
COLUMN_PARAMETERS: frozenset[str] = frozenset({"_id", "_lastUpdated"})


@dataclass(frozen=True, slots=True)
class SearchParameter:
    """One search parameter of one resource type."""

    code: str
    type: ParameterType
    expression: str
    targets: tuple[str, ...] = ()
    url: str | None = None
    evaluate: Evaluator = field(compare=False, repr=False, default=lambda r: [])

    @classmethod
    def build(
        cls,
        code: str,
        type_: str,
        expression: str,
        targets: Iterable[str] = (),
        url: str | None = None,
    ) -> SearchParameter:
        if type_ not in PARAMETER_TYPES:
            raise ProfileError(f"search parameter {code}: type {type_} is not indexed")
        return cls(
            code=code,
            type=cast(ParameterType, type_),
            expression=expression,
            targets=tuple(targets),
            url=url,
            evaluate=_evaluator(expression),
        )


@cache
def _evaluator(expression: str) -> Evaluator:
    return compile_fhirpath_evaluator(expression)


class SearchParameters:
    """SearchParameters by resource type; `Resource` ones apply to every type."""

    def __init__(self, by_type: Mapping[str, Mapping[str, SearchParameter]]):
        common = dict(by_type.get("Resource", {}))
        self._by_type: dict[str, dict[str, SearchParameter]] = {
            t: {**common, **params} for t, params in by_type.items() if t != "Resource"
        }
        self._common = common
        self._indexed: dict[str, tuple[SearchParameter, ...]] = {}

    def for_type(self, resource_type: str) -> Mapping[str, SearchParameter]:
        return self._by_type.get(resource_type, self._common)

    def get(self, resource_type: str, code: str) -> SearchParameter | None:
        return self.for_type(resource_type).get(code)

    def indexed(self, resource_type: str) -> tuple[SearchParameter, ...]:
        """The parameters whose values go into the index tables for a resource type."""
        known = self._indexed.get(resource_type)
        if known is None:
            params = self.for_type(resource_type).values()
            known = tuple(p for p in params if p.code not in COLUMN_PARAMETERS)
            self._indexed[resource_type] = known
        return known

    def resource_types(self) -> frozenset[str]:
        return frozenset(self._by_type)

    def with_resources(self, search_parameters: Iterable[dict[str, Any]]) -> SearchParameters:
        """These parameters plus SearchParameter resources (a package's own)."""
        by_type: dict[str, dict[str, SearchParameter]] = {"Resource": dict(self._common)}
        for t, params in self._by_type.items():
            by_type[t] = {c: p for c, p in params.items() if c not in self._common}
        for sp in search_parameters:
            expression = sp.get("expression")
            if not isinstance(expression, str) or sp.get("type") not in PARAMETER_TYPES:
                raise ProfileError(
                    f"SearchParameter {sp.get('url')}: needs an expression and one of the "
                    f"types {', '.join(sorted(PARAMETER_TYPES))}"
                )
            for base in sp.get("base", []):
                by_type.setdefault(base, {})[sp["code"]] = SearchParameter.build(
                    sp["code"], sp["type"], expression, sp.get("target", []), sp.get("url")
                )
        return SearchParameters(by_type)


@cache
def r4_search_parameters() -> SearchParameters:
    """FHIR R4's own search parameters (vendored)."""
    raw = resources.files("cpa_fhir.fhir").joinpath("definitions/r4-search-parameters.json")
    data: dict[str, dict[str, dict[str, Any]]] = orjson.loads(raw.read_bytes())
    return SearchParameters(
        {
            resource_type: {
                code: SearchParameter.build(code, p["type"], p["expression"], p["target"])
                for code, p in params.items()
            }
            for resource_type, params in data.items()
        }
    )


@cache
def default_search_parameters() -> SearchParameters:
    """R4's search parameters plus the default profiles package's own SearchParameters.

    Without a profiles package (an installed copy with CPA_FHIR_PROFILES unset) only
    R4's are known, and a search on a project parameter is refused as unknown.
    """
    from cpa_fhir.conformance.package import default_package

    try:
        package = default_package()
    except ProfileError:
        return r4_search_parameters()
    return r4_search_parameters().with_resources(package.search_parameters())
