"""Errors raised by cpa-fhir, each able to render itself as an OperationOutcome.

    FhirError                  anything this package refuses, with FHIR issue data
    ├── InputError             input that is not readable FHIR JSON at all
    ├── ProfileError           a conformance package that cannot be loaded or used
    ├── MappingError           a source record that cannot be mapped
    ├── SharingError           nothing may be shared: the engine could not decide safely
    │   ├── PolicyError        the sharing policy data is unusable
    │   ├── ConsentFormatError a Consent the engine cannot evaluate
    │   ├── RecipientError     an unknown or ambiguous recipient, or a basis that does not apply
    │   └── LabellingError     a labelling rule that cannot be evaluated on some content
    ├── ConnectorError         a partner system could not be reached or refused
    │   ├── UpstreamStatusError
    │   └── AuthError
    ├── SearchError            a search the store cannot run: unknown or malformed parameters
    └── StoreError             a store request refused for the state of the stored resource
        ├── ResourceNotFound   no such resource or version
        ├── ResourceGone       the resource was deleted
        ├── VersionConflict    the resource changed since the version the writer saw
        └── PreconditionFailed a conditional request's condition cannot be met

Issue codes are from http://hl7.org/fhir/R4/valueset-issue-type.html.
"""

from __future__ import annotations

from typing import Any

from cpa_fhir.fhir.outcome import Issue, operation_outcome


class FhirError(Exception):
    """Base class: a message plus the issue code and location FHIR needs."""

    code = "processing"
    severity = "error"

    def __init__(self, message: str, *, expression: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.expression = expression
        if code is not None:
            self.code = code

    def to_issue(self) -> Issue:
        return Issue(
            severity=self.severity,  # type: ignore[arg-type]
            code=self.code,
            message=self.message,
            expression=self.expression,
        )

    def to_operation_outcome(self) -> dict[str, Any]:
        return operation_outcome([self.to_issue()])


class InputError(FhirError):
    """The input is not well-formed JSON, or not a FHIR resource."""

    code = "structure"


class ProfileError(FhirError):
    """A profile, extension or ValueSet is missing or unusable."""

    code = "not-found"


class MappingError(FhirError):
    """A source record could not be turned into FHIR."""

    code = "invalid"


class SharingError(FhirError):
    """The consent engine refused to share anything: it fails closed."""

    code = "processing"


class PolicyError(SharingError):
    """The sharing policy (labelling rules, categories, exceptions) is unusable."""

    code = "invalid"


class ConsentFormatError(SharingError):
    """A Consent resource is malformed or uses something the engine cannot evaluate."""

    code = "invalid"


class RecipientError(SharingError):
    """The recipient is unknown or ambiguous, or a named legal basis does not apply."""

    code = "not-found"


class LabellingError(SharingError):
    """A labelling rule could not be evaluated on the content in front of it."""


class ConnectorError(FhirError):
    """A partner system failed."""

    code = "transient"


class UpstreamStatusError(ConnectorError):
    """A partner answered with an error status."""


class AuthError(ConnectorError):
    """Authentication with a partner failed."""

    code = "security"


class SearchError(FhirError):
    """A search parameter is unknown, unsupported or malformed (HTTP 400).

    https://hl7.org/fhir/R4/search.html#errors: a server must not silently ignore a
    parameter it does not understand when it cannot honour the search.
    """

    code = "invalid"


class UnknownParameter(SearchError):
    """A search parameter, or its modifier, that this server does not know or does not
    support: what a client's `Prefer: handling=lenient` asks to have ignored."""


class StoreError(FhirError):
    """A create, read, update or delete refused for the stored resource's state."""


class ResourceNotFound(StoreError):
    """No resource (or version) with that type and id exists (HTTP 404)."""

    code = "not-found"


class ResourceGone(StoreError):
    """The resource existed but is deleted (HTTP 410): https://hl7.org/fhir/R4/http.html#read

    `version_id` is the deletion's version, where known."""

    code = "deleted"

    def __init__(
        self, message: str, *, version_id: int | None = None, expression: str | None = None
    ):
        super().__init__(message, expression=expression)
        self.version_id = version_id


class VersionConflict(StoreError):
    """The resource is no longer at the version the writer saw (HTTP 409/412).

    https://hl7.org/fhir/R4/http.html#concurrency; `current_version` is the stored one.
    """

    code = "conflict"

    def __init__(
        self, message: str, *, current_version: int | None = None, expression: str | None = None
    ):
        super().__init__(message, expression=expression)
        self.current_version = current_version


class PreconditionFailed(StoreError):
    """A conditional request's criteria match several resources where it needs one at
    most, e.g. If-None-Exist (HTTP 412).

    https://hl7.org/fhir/R4/http.html#ccreate
    """

    code = "multiple-matches"


__all__ = [
    "AuthError",
    "ConnectorError",
    "ConsentFormatError",
    "FhirError",
    "InputError",
    "LabellingError",
    "MappingError",
    "PolicyError",
    "PreconditionFailed",
    "ProfileError",
    "RecipientError",
    "ResourceGone",
    "ResourceNotFound",
    "SearchError",
    "SharingError",
    "StoreError",
    "UpstreamStatusError",
    "VersionConflict",
]
