"""Persistence and search of FHIR resources: https://hl7.org/fhir/R4/http.html

`SqlRepository` stores resources as JSON with their version history and a search
index, on a SQLite file or PostgreSQL; `parse_search` turns query parameters into a
`SearchQuery` (https://hl7.org/fhir/R4/search.html).
"""

from cpa_fhir.store._ids import time_ordered_id
from cpa_fhir.store._indexing import IndexRows, index_resource, normalise, reference_target
from cpa_fhir.store._matching import matching
from cpa_fhir.store._migrations import LATEST_VERSION, MIGRATIONS, current_version, migrate
from cpa_fhir.store._query import (
    MAX_CHAIN_LINKS,
    MAX_COUNT,
    ChainLink,
    Criterion,
    DateValue,
    Include,
    NumberValue,
    ReferenceValue,
    SearchQuery,
    SortKey,
    StringValue,
    TokenValue,
    known_parameters,
    local_references,
    may_reach_types,
    parse_search,
)
from cpa_fhir.store._repository import (
    Repository,
    SearchResult,
    SqlRepository,
    Stored,
    current_or_error,
)
from cpa_fhir.store._search_parameters import (
    SearchParameter,
    SearchParameters,
    default_search_parameters,
    r4_search_parameters,
)

__all__ = [
    "ChainLink",
    "Criterion",
    "DateValue",
    "Include",
    "IndexRows",
    "LATEST_VERSION",
    "MAX_CHAIN_LINKS",
    "MAX_COUNT",
    "MIGRATIONS",
    "NumberValue",
    "ReferenceValue",
    "Repository",
    "SearchParameter",
    "SearchParameters",
    "SearchQuery",
    "SearchResult",
    "SortKey",
    "SqlRepository",
    "Stored",
    "StringValue",
    "TokenValue",
    "current_or_error",
    "current_version",
    "default_search_parameters",
    "index_resource",
    "known_parameters",
    "local_references",
    "matching",
    "may_reach_types",
    "migrate",
    "normalise",
    "parse_search",
    "r4_search_parameters",
    "reference_target",
    "time_ordered_id",
]
