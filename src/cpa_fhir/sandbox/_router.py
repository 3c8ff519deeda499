"""The FHIR RESTful API, without a web framework: https://hl7.org/fhir/R4/http.html

`Router.handle` takes a plain `Request` (method, path below the base, query
pairs, headers, body) and the authenticated client, and returns a `Response`.
Reads and searches serve the stored JSON bytes; writes are validated against
the profiles first. Partner clients see only what the consent engine allows
(`PartnerView`), on every path that returns data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jsonpatch
import jsonpointer
import orjson

from cpa_fhir.consent import RequiredElements, SharingPolicy
from cpa_fhir.consent._labelling import reference_key
from cpa_fhir.consent._output import META_SHARED as PARTNER_META
from cpa_fhir.consent._references import references
from cpa_fhir.errors import (
    FhirError,
    InputError,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
    SearchError,
    SharingError,
    UnknownParameter,
    VersionConflict,
)
from cpa_fhir.fhir import jsonio
from cpa_fhir.fhir.models import R4_RESOURCE_TYPES
from cpa_fhir.fhir.outcome import Issue, operation_outcome
from cpa_fhir.fhir.subset import Summary, subset
from cpa_fhir.sandbox._access import DerivedCache, PartnerView, partner_scan
from cpa_fhir.sandbox._audit_log import AuditLog, AuditWriteFailed, Events
from cpa_fhir.sandbox._auth import AuthFailure, Client, allows, require
from cpa_fhir.sandbox._bundles import CONDITIONAL_REFERENCE
from cpa_fhir.sandbox._chains import chains_hold, reference_targets
from cpa_fhir.store import (
    Criterion,
    DateValue,
    SearchParameters,
    SearchQuery,
    SortKey,
    SqlRepository,
    Stored,
    current_or_error,
    index_resource,
    known_parameters,
    local_references,
    matching,
    parse_search,
    reference_target,
    time_ordered_id,
)
from cpa_fhir.store._dates import to_micros
from cpa_fhir.store._query import (
    MAX_INCLUDES,
    MAX_OFFSET,
    ChainLink,
    Include,
    whole_number,
)
from cpa_fhir.validation import Validator

FHIR_JSON = "application/fhir+json; charset=utf-8"
JSON_PATCH = "application/json-patch+json"
_JSON_TYPES = ("application/fhir+json", "application/json", "json", "application/json+fhir")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Version ids are stored as 32-bit integers: a longer one names no version.
_log = logging.getLogger(__name__)
_VERSION_DIGITS = 9
# Far deeper than any FHIR content nests; deeper would break copying and writing it.
MAX_BODY_DEPTH = 128


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # below the base, no leading slash: "Patient/1/_history/2"
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    base_url: str = "http://localhost/fhir"
    # The current version of the resource a read names, as the server read it for
    # this request after it arrived: (type, id, the version or None if none is
    # stored). Read here otherwise.
    current: tuple[str, str, Stored | None] | None = None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # The disclosure's AuditEvents, when the caller commits them itself
    # (`Router.handle(..., defer_audit=True)`): the body must not leave before.
    audit: Events | None = None
    # What to answer instead if they cannot be committed, where the request wrote
    # something first (a Bundle): the writes stand, and the client must learn so.
    if_audit_fails: Response | None = None

    def unaudited(self) -> Response:
        """The answer when this response's disclosure cannot be recorded."""
        return self.if_audit_fails or audit_failed_response()


AUDIT_FAILED = (
    503,
    "the disclosure could not be recorded, so nothing is shared",
)


def audit_failed_response() -> Response:
    return outcome_response(HttpError(*AUDIT_FAILED, code="transient"))


class HttpError(FhirError):
    """A client error with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "invalid",
        issues: list[Issue] | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message, code=code)
        self.status = status
        self.issues = issues
        self.headers = dict(headers or {})

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues) if self.issues else self.to_operation_outcome()


STATUS_OF: dict[type[FhirError], int] = {
    ResourceNotFound: 404,
    ResourceGone: 410,
    VersionConflict: 409,
    PreconditionFailed: 412,
    SearchError: 400,
    InputError: 400,
    SharingError: 403,
}


def status_of(exc: FhirError) -> int:
    if isinstance(exc, (HttpError, AuthFailure)):
        return exc.status
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 400


def outcome_response(exc: FhirError) -> Response:
    body = exc.outcome() if isinstance(exc, HttpError) else exc.to_operation_outcome()
    headers = {"content-type": FHIR_JSON, **(exc.headers if isinstance(exc, HttpError) else {})}
    if isinstance(exc, AuthFailure) and exc.status == 401:
        headers["www-authenticate"] = 'Bearer realm="cpa-fhir"'
    return Response(status_of(exc), orjson.dumps(body), headers)


def _etag(stored: Stored) -> dict[str, str]:
    return {"etag": f'W/"{stored.version_id}"', "last-modified": http_date(stored.last_updated)}


# https://hl7.org/fhir/R4/http.html#ops and search.html#errors: the values of Prefer's
# `return` and `handling` this server knows, as written there.
_PREFERENCES = {
    "return": {p.lower(): p for p in ("minimal", "representation", "OperationOutcome")},
    "handling": {"strict": "strict", "lenient": "lenient"},
}


def _preference(header: str | None, name: str) -> str | None:
    """A preference of a Prefer header (RFC 7240), None if it states none this server
    knows under `name` (then it answers as it would without one)."""
    for preference in (header or "").split(","):
        token, _, value = preference.split(";")[0].partition("=")
        if token.strip().lower() == name:
            return _PREFERENCES[name].get(value.strip().strip('"').lower())
    return None


def _read_subset(
    request: Request, rtype: str, parameters: SearchParameters
) -> tuple[Summary | None, frozenset[str] | None]:
    """The `_summary` and `_elements` of a read (https://hl7.org/fhir/R4/http.html#read),
    read as a search reads them (SearchError, a 400, for what it refuses)."""
    asked = [(k, v) for k, v in request.query if k in ("_summary", "_elements")]
    if not asked:
        return None, None
    query = parse_search(rtype, asked, parameters)
    if query.summary_count:
        # A count is of a search's matches: a read has none to count.
        raise HttpError(400, "_summary=count is for searches, not a read", code="invalid")
    return query.summary, query.elements


def _subset_bytes(
    content: bytes, summary: Summary | None, elements: frozenset[str] | None
) -> bytes:
    """Stored (or filtered) JSON as `_summary` or `_elements` asks: as it is if neither."""
    if summary is None and elements is None:
        return content
    return jsonio.dumps(subset(jsonio.loads(content), summary=summary, elements=elements))


def _with_outcome(searchset: bytes, issues: list[Issue]) -> bytes:
    """A searchset with an OperationOutcome entry (search.mode `outcome`) added."""
    bundle = jsonio.loads(searchset)
    entry = {"resource": operation_outcome(issues), "search": {"mode": "outcome"}}
    bundle.setdefault("entry", []).append(entry)
    return jsonio.dumps(bundle)


_MONTH = "(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"\d{2}:\d{2}:\d{2}"
# The three forms of an HTTP date (RFC 9110 §5.6.7): IMF-fixdate, and the obsolete
# RFC 850 and asctime forms a recipient must still take.
_HTTP_DATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{{2}} {_MONTH} \d{{4}} {_TIME} GMT"
    rf"|(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, \d{{2}}-{_MONTH}-\d{{2}} {_TIME} GMT"
    rf"|(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MONTH} [ \d]\d {_TIME} \d{{4}}"
)


def _not_modified(headers: Mapping[str, str], stored: Stored) -> bool:
    """Whether a conditional read (RFC 9110 §13.1.2 and §13.1.3) finds the client's
    copy current: If-None-Match names its version (weakly compared, or `*`), or,
    without If-None-Match, If-Modified-Since is no earlier than its last update. That
    is compared to the millisecond, though an HTTP date goes only to the second: two
    updates within one second must not pass for one. A value that is not one HTTP
    date is ignored, as RFC 9110 says."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        tags = [tag.strip() for tag in if_none_match.split(",")]
        return "*" in tags or f'"{stored.version_id}"' in (t.removeprefix("W/") for t in tags)
    since = headers.get("if-modified-since")
    if since is None or not _HTTP_DATE.fullmatch(since.strip()):
        return False
    try:
        client_copy = parsedate_to_datetime(since)
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    if client_copy.tzinfo is None:  # RFC 850 and asctime dates: GMT all the same
        client_copy = client_copy.replace(tzinfo=UTC)
    return stored.last_updated <= client_copy


@lru_cache(maxsize=4096)
def http_date(moment: datetime) -> str:
    """An HTTP date (RFC 9110 §5.6.7), kept: the same versions are read again and
    again, and writing one takes some twenty times as long as looking it up."""
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _instant(moment: datetime) -> str:
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


class Router:
    """The sandbox's FHIR interactions over a repository."""

    def __init__(
        self,
        repo: SqlRepository,
        validator: Validator,
        policy: SharingPolicy,
        required: RequiredElements,
        capability: Callable[[str], dict[str, Any]],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        new_id: Callable[[], str] = time_ordered_id,
    ) -> None:
        self.repo = repo
        self.audit_log = AuditLog(repo)
        self.derived = DerivedCache()
        self.validator = validator
        self.policy = policy
        self.required = required
        self.capability = capability
        self.clock = clock
        self.new_id = new_id

    # -- entry point ----------------------------------------------------------------

    def handle(
        self,
        request: Request,
        client: Client | None,
        scopes: frozenset[str],
        *,
        defer_audit: bool = False,
        generation: int | None = None,
    ) -> Response:
        """Answer one request. A partner's disclosure is committed to the audit trail
        before this returns, or, with `defer_audit`, handed back in `Response.audit`
        for the caller to commit before it sends the body. `generation`: the store's,
        read after the request arrived (else read here)."""
        try:
            self._negotiate(request)
            parts = [p for p in request.path.split("/") if p]
            if parts == ["metadata"]:
                if request.method != "GET":
                    raise not_allowed(request.method, "metadata", parts)
                return self._json(200, self.capability(request.base_url))
            if client is None:
                raise AuthFailure("this server needs a bearer token: POST /token first", status=401)
            view = (
                None
                if client.sees_everything
                else PartnerView(
                    self.repo,
                    client,
                    self.policy,
                    self.required,
                    self.clock(),
                    scopes,
                    self.derived.at(self.repo.generation() if generation is None else generation),
                )
            )
            response = self._route(request, parts, client, scopes, view)
            if view is not None:
                observer = {"display": "cpa-fhir sandbox"}
                events = view.audit_events(self.new_id, observer)
                if defer_audit:
                    response.audit = events or None
                else:
                    try:
                        self.audit_log.record(events)
                    except AuditWriteFailed:
                        return response.unaudited()
            return response
        except FhirError as exc:
            return outcome_response(exc)
        except AuditWriteFailed:
            # A disclosure that cannot be recorded does not happen.
            return audit_failed_response()

    def _route_safely(
        self, request: Request, client: Client, scopes: frozenset[str], view: PartnerView | None
    ) -> Response:
        """One entry of a batch: its error becomes its own response. So does a fault of
        the server's (logged), since the entries before it may have been committed:
        the client must still learn which."""
        try:
            return self._route(
                request, [p for p in request.path.split("/") if p], client, scopes, view
            )
        except FhirError as exc:
            return outcome_response(exc)
        except Exception:
            _log.exception("a Bundle entry failed: %s %s", request.method, request.path)
            return outcome_response(
                HttpError(500, "the server could not complete this entry", code="exception")
            )

    def _route(
        self,
        request: Request,
        parts: list[str],
        client: Client,
        scopes: frozenset[str],
        view: PartnerView | None,
    ) -> Response:
        method = request.method
        if parts and parts[0] not in R4_RESOURCE_TYPES:
            raise HttpError(404, f"unknown resource type '{parts[0]}'", code="not-supported")
        allowed = allowed_methods(parts)
        if allowed is not None and method not in allowed:
            raise not_allowed(method, request.path.strip("/") or "the base URL", parts)
        if not parts:
            return self._bundle(request, client, scopes, view)
        rtype = parts[0]
        n = len(parts)
        if n == 1:
            if method == "GET":
                return self._search(request, rtype, request.query, client, scopes, view)
            if method == "POST":
                return self._create(request, rtype, client, scopes, view)
            if method == "PUT":
                return self._conditional_update(request, rtype, scopes, view)
            if method == "DELETE":
                return self._conditional_delete(request, rtype, scopes, view)
            raise not_allowed(method, rtype, parts)
        second = parts[1]
        if n == 2 and second == "_search" and method == "POST":
            form = _form(request)
            return self._search(request, rtype, request.query + form, client, scopes, view)
        if n == 2 and second == "_history" and method == "GET":
            return self._history(request, rtype, None, client, scopes, view)
        if n == 2 and second == "$validate" and method == "POST":
            return self._validate(request, rtype, None, client, scopes)
        if not _ID.fullmatch(second):
            raise HttpError(400, f"'{second}' is not a valid resource id", code="value")
        rid = second
        if n == 2:
            if method == "GET":
                return self._read(request, rtype, rid, None, client, scopes, view)
            if method == "PUT":
                return self._update(request, rtype, rid, client, scopes, view)
            if method == "DELETE":
                return self._delete(request, rtype, rid, scopes, view)
            if method == "PATCH":
                return self._patch(request, rtype, rid, scopes, view)
            raise not_allowed(method, f"{rtype}/{rid}", parts)
        if n == 3 and parts[2] == "$validate" and method == "POST":
            return self._validate(request, rtype, rid, client, scopes)
        if parts[2] == "_history" and method == "GET":
            if n == 3:
                return self._history(request, rtype, rid, client, scopes, view)
            if n == 4:
                if not _is_decimal(parts[3]) or len(parts[3]) > _VERSION_DIGITS:
                    raise HttpError(400, f"'{parts[3]}' is not a version id", code="value")
                return self._read(request, rtype, rid, int(parts[3]), client, scopes, view)
        raise HttpError(404, f"no such interaction: {method} {request.path}", code="not-supported")

    # -- content --------------------------------------------------------------------

    def _negotiate(self, request: Request) -> None:
        fmt = dict(request.query).get("_format")
        accept = fmt or request.headers.get("accept", "")
        if accept and not _takes_fhir_json(accept):
            raise HttpError(
                406,
                f"this server speaks application/fhir+json only, not '{accept}'",
                code="not-supported",
            )

    def _body(self, request: Request) -> dict[str, Any]:
        _no_content_coding(request)
        ctype = _media_type(request.headers.get("content-type", ""))
        if ctype not in _JSON_TYPES:
            raise HttpError(
                415,
                f"send application/fhir+json, not '{ctype or 'no content type'}'",
                code="not-supported",
            )
        _utf8_only(request)
        try:
            data = jsonio.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, f"the body is not JSON: {exc}", code="structure") from None
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            raise HttpError(400, "the body is not a FHIR resource", code="structure")
        if _deeper_than(data, MAX_BODY_DEPTH):
            raise HttpError(
                400,
                f"the body nests objects and lists more than {MAX_BODY_DEPTH} deep",
                code="too-costly",
            )
        _no_repeated_names(request.body, "the body")
        return data

    def _json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> Response:
        return Response(status, jsonio.dumps(body), {"content-type": FHIR_JSON, **(headers or {})})

    def validate(self, resource: dict[str, Any], profile: str | None = None) -> list[Issue]:
        """The validator's issues with a resource, and those of what this store needs
        of it before partners may be served under it (`store_rules`)."""
        return [*self.validator.validate(resource, profile=profile), *store_rules(resource)]

    def _check_valid(self, resource: dict[str, Any]) -> None:
        _no_conditional_references(resource)
        issues = self.validate(resource)
        if any(i.is_error for i in issues):
            raise HttpError(
                422,
                "the resource does not conform to the profiles",
                code="processing",
                issues=issues,
            )

    # -- instance and type interactions ---------------------------------------------

    def _read(
        self,
        request: Request,
        rtype: str,
        rid: str,
        version: int | None,
        client: Client,
        scopes: frozenset[str],
        view: PartnerView | None,
    ) -> Response:
        require(scopes, rtype, "read")
        # The request's own faults first: said alike whatever is (or is not) stored,
        # and before any precondition (RFC 9110 §13.2.1).
        summary, elements = _read_subset(request, rtype, self.repo.parameters)
        if view is None:
            if version is None:
                known = request.current
                if known is not None and known[:2] == (rtype, rid):
                    stored = current_or_error(rtype, rid, known[2])
                else:
                    stored = self.repo.read(rtype, rid)
            else:
                stored = self.repo.vread(rtype, rid, version)
            if _not_modified(request.headers, stored):
                return Response(304, b"", _etag(stored))
            content = _subset_bytes(stored.content, summary, elements)
            return Response(200, content, {"content-type": FHIR_JSON, **_etag(stored)})
        # A partner's conditional read is always answered in full: its copy of a version
        # was filtered under the consent of its day, and a 304 would vouch for it
        # still (HTTP lets a server answer 200 to any conditional GET).
        if version is None:
            stored = self._partner_current(view, rtype, rid)
        else:
            stored = self._partner_version(view, rtype, rid, version)
        shown = view.filter_bytes(stored)
        if shown is None:
            # Withheld and absent look the same: a 403 would tell that it exists.
            raise _unknown(rtype, rid)
        shown = _subset_bytes(shown, summary, elements)
        return Response(200, shown, {"content-type": FHIR_JSON, **_etag(stored)})

    # -- what a partner may know exists ----------------------------------------------
    # Absent and withheld answer alike, word for word; a deletion is told only of
    # what the partner could see before it. Otherwise a status, a message or a
    # version number would tell it that something it may not see exists.

    def _partner_current(self, view: PartnerView, rtype: str, rid: str) -> Stored:
        """The current version, for a partner: unknown (404) when absent, and when
        deleted unless it could see the version before the deletion (then 410)."""
        try:
            return view.read(rtype, rid)
        except ResourceNotFound:
            raise _unknown(rtype, rid) from None
        except ResourceGone as exc:
            if exc.version_id is not None and self._saw_before(view, rtype, rid, exc.version_id):
                raise
            raise _unknown(rtype, rid) from None

    def _partner_version(self, view: PartnerView, rtype: str, rid: str, version: int) -> Stored:
        """One version, for a partner, as `_partner_current` tells of the current one,
        and only of a resource it may know of now (`_known_now`)."""
        try:
            stored = self.repo.vread(rtype, rid, version)
        except ResourceNotFound:
            raise _unknown(rtype, rid) from None
        except ResourceGone:
            if self._saw_before(view, rtype, rid, version) and self._known_now(view, rtype, rid):
                raise
            raise _unknown(rtype, rid) from None
        if not self._known_now(view, rtype, rid):
            raise _unknown(rtype, rid)
        return stored

    def _known_now(self, view: PartnerView, rtype: str, rid: str) -> bool:
        """Whether a partner may know the resource is there now: it sees the current
        version, or saw what a deletion deleted. A resource that has become withheld
        (a need now naming substance use) is unknown to it in every interaction, its
        earlier versions too: one version shown and the current one not would tell
        that it is there and has become something the partner may not see."""
        try:
            current = view.read(rtype, rid)
        except ResourceNotFound:
            return False
        except ResourceGone as exc:
            return exc.version_id is not None and self._saw_before(view, rtype, rid, exc.version_id)
        return view.filter_bytes(current, account=False) is not None

    def _saw_before(self, view: PartnerView, rtype: str, rid: str, deletion: int) -> bool:
        """Whether the partner could see what a deletion (at that version) deleted."""
        if deletion < 2:
            return False
        try:
            before = self.repo.vread(rtype, rid, deletion - 1)
        except (ResourceNotFound, ResourceGone):
            return False
        return view.filter_bytes(before, account=False) is not None

    def _version_to_replace(
        self, view: PartnerView | None, rtype: str, rid: str, if_match: int | None
    ) -> int | None:
        """The version an update or delete must find: If-Match's, and for a partner's
        client the current one, checked to be one it sees whole, so that a write in
        between is a conflict. A partner never updates as create: a refused create
        would tell that the id is taken by something withheld."""
        if view is None:
            return if_match
        _partner_writable(view, rtype)
        current = self._partner_current(view, rtype, rid)
        self._partner_replaceable(view, current)
        _check_if_match(current, if_match)
        return current.version_id

    def _version_of(self, rtype: str, rid: str) -> Callable[[], int | None]:
        """The current version of a resource, read when asked (None if none is there):
        what an If-Match list is compared with."""

        def read() -> int | None:
            try:
                return self.repo.read(rtype, rid).version_id
            except (ResourceNotFound, ResourceGone):
                return None

        return read

    def _match_version(self, rtype: str, criteria: str, base: str) -> Callable[[], int | None]:
        """The version of what a conditional write's criteria match, read when asked."""

        def match() -> int | None:
            found = self.repo.conditional_match(rtype, criteria, "the criteria", base)
            return found.version_id if found is not None else None

        return match

    def _partner_replaceable(self, view: PartnerView, stored: Stored) -> None:
        """A partner may update or delete only a resource it sees whole: replacing one
        it sees redacted would erase what was withheld from it (403), and one it may
        not see at all is unknown to it (404)."""
        shown = view.filter_bytes(stored, account=False)
        if shown is None:
            raise _unknown(stored.resource_type, stored.id)
        seen = jsonio.loads(shown)
        # Labels are the server's, made for the recipient; anything else that differs
        # (an element removed, a reference masked, the trust's own labels) was withheld.
        seen["meta"] = {k: v for k, v in seen["meta"].items() if k != "security"}
        whole = _without_unseen_meta(stored.resource())
        if seen != whole:
            raise HttpError(
                403,
                f"{stored.resource_type}/{stored.id} holds information withheld from this "
                "client: only the trust's own clients may change or delete it",
                code="forbidden",
            )

    def _create(
        self,
        request: Request,
        rtype: str,
        client: Client,
        scopes: frozenset[str],
        view: PartnerView | None,
    ) -> Response:
        require(scopes, rtype, "create")
        _partner_writable(view, rtype)
        resource = self._body(request)
        if resource["resourceType"] != rtype:
            raise HttpError(400, f"the body is a {resource['resourceType']}, not a {rtype}")
        resource.pop("id", None)  # the server assigns ids on create
        condition = request.headers.get("if-none-exist")
        criteria = _criteria(request)
        if condition is None and criteria:
            # Criteria in the query of a create, as some clients (fhirpy) send them, are
            # a conditional create too: never ignored, never a silent duplicate.
            condition = criteria
        if condition is not None:
            _whole_store_search(view, "a conditional create")
        if view is not None:
            resource = _partner_written(view, resource)
        self._check_valid(resource)
        stored = self.repo.create(resource, if_none_exist=condition, base=request.base_url)
        # A create never updates: what was not created matched the condition.
        return self._written(request, stored, matched=not stored.created, view=view)

    def _update(
        self,
        request: Request,
        rtype: str,
        rid: str,
        client: Client,
        scopes: frozenset[str],
        view: PartnerView | None,
    ) -> Response:
        require(scopes, rtype, "update")
        resource = self._body(request)
        if resource["resourceType"] != rtype:
            raise HttpError(400, f"the body is a {resource['resourceType']}, not a {rtype}")
        if resource.get("id") != rid:
            raise HttpError(400, f"the body's id must be '{rid}', as in the URL", code="value")
        if_match = _if_match(request.headers.get("if-match"), self._version_of(rtype, rid))
        expected = self._version_to_replace(view, rtype, rid, if_match)
        expected = self._write_preconditions(request, rtype, rid, view, expected)
        if view is not None:
            resource = _partner_written(view, resource, view.read(rtype, rid))
        self._check_valid(resource)
        try:
            stored = self.repo.update(resource, if_match=expected)
        except VersionConflict as exc:
            raise _conflict(exc, if_match, view) from None
        return self._written(request, stored, view=view)

    def _write_preconditions(
        self,
        request: Request,
        rtype: str,
        rid: str,
        view: PartnerView | None,
        expected: int | None,
    ) -> int | None:
        """If-None-Match, If-Unmodified-Since and `If-Match: *` on an update or delete
        (RFC 9110 §13.1.1, §13.1.2, §13.1.4): 412 when the resource is there (`*`) or at
        a version named, or changed since the date, or (`If-Match: *`) not there. The version they were checked against is the one
        the write must find, so that a write in between is a conflict, not a pass."""
        if_none_match = request.headers.get("if-none-match")
        since = request.headers.get("if-unmodified-since")
        any_version = request.headers.get("if-match", "").strip() == "*"
        if if_none_match is None and since is None and not any_version:
            return expected
        try:
            current: Stored | None = (view.read if view is not None else self.repo.read)(rtype, rid)
        except (ResourceNotFound, ResourceGone):
            current = None
        if current is None:
            if any_version:
                raise precondition_failed(f"{rtype}/{rid} is not there (If-Match: *)")
            return expected  # nothing there: no version to match, no date to compare
        if if_none_match is not None:
            tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
            if "*" in tags or f'"{current.version_id}"' in tags:
                raise precondition_failed(
                    f"{rtype}/{rid} is at version {current.version_id}, which If-None-Match "
                    "asks not to write over"
                )
        # If-Match, where given, decides; If-Unmodified-Since is then not looked at.
        if_match_given = request.headers.get("if-match") is not None and not any_version
        if since is not None and not if_match_given and _HTTP_DATE.fullmatch(since.strip()):
            try:
                client_copy = parsedate_to_datetime(since)
            except (TypeError, ValueError, IndexError, OverflowError):
                client_copy = None
            if client_copy is not None:
                if client_copy.tzinfo is None:
                    client_copy = client_copy.replace(tzinfo=UTC)
                # Compared to the second, as an HTTP date is written.
                if current.last_updated.replace(microsecond=0) > client_copy:
                    raise precondition_failed(
                        f"{rtype}/{rid} has changed since {since.strip()} (If-Unmodified-Since)"
                    )
        # A version already asked for (If-Match, or the one a partner was checked against)
        # stands: a stale one must still fail.
        return expected if expected is not None else current.version_id

    def _delete(
        self,
        request: Request,
        rtype: str,
        rid: str,
        scopes: frozenset[str],
        view: PartnerView | None,
    ) -> Response:
        require(scopes, rtype, "delete")
        if_match = _if_match(request.headers.get("if-match"), self._version_of(rtype, rid))
        try:
            expected = self._version_to_replace(view, rtype, rid, if_match)
        except ResourceGone:
            return Response(204)  # a partner's: deleted already, and it could see it
        expected = self._write_preconditions(request, rtype, rid, view, expected)
        try:
            self.repo.delete(rtype, rid, if_match=expected)
        except ResourceGone:
            pass  # deleting twice is not an error (R4 http.html#delete)
        except ResourceNotFound:
            if view is not None:
                raise  # a partner's: unknown, as what is withheld from it is
            never_there(rtype, rid, expected)
        except VersionConflict as exc:
            raise _conflict(exc, if_match, view) from None
        return Response(204)

    def _conditional_update(
        self, request: Request, rtype: str, scopes: frozenset[str], view: PartnerView | None
    ) -> Response:
        require(scopes, rtype, "update")
        criteria = _write_criteria(request, rtype, view, "a conditional update")
        resource = self._body(request)
        if resource["resourceType"] != rtype:
            raise HttpError(400, f"the body is a {resource['resourceType']}, not a {rtype}")
        if_match = _if_match(
            request.headers.get("if-match"), self._match_version(rtype, criteria, request.base_url)
        )
        self._check_valid(resource)
        if_match = self._conditional_preconditions(request, rtype, criteria, if_match)
        try:
            stored = self.repo.conditional_update(
                resource, criteria, if_match=if_match, base=request.base_url
            )
        except VersionConflict as exc:
            raise _conflict(exc, if_match) from None
        return self._written(request, stored)

    def _conditional_preconditions(
        self, request: Request, rtype: str, criteria: str, if_match: int | None
    ) -> int | None:
        """`_write_preconditions` of a conditional write (the trust's alone), against
        its one match: the version the write must then find."""
        headers = request.headers
        if not any(h in headers for h in ("if-none-match", "if-unmodified-since", "if-match")):
            return if_match
        found = self.repo.conditional_match(rtype, criteria, "the criteria", request.base_url)
        if found is None:
            if headers.get("if-match", "").strip() == "*":
                raise precondition_failed(f"no {rtype} matches (If-Match: *)")
            return if_match
        return self._write_preconditions(request, rtype, found.id, None, if_match)

    def _conditional_delete(
        self, request: Request, rtype: str, scopes: frozenset[str], view: PartnerView | None
    ) -> Response:
        require(scopes, rtype, "delete")
        criteria = _write_criteria(request, rtype, view, "a conditional delete")
        if_match = _if_match(
            request.headers.get("if-match"), self._match_version(rtype, criteria, request.base_url)
        )
        if_match = self._conditional_preconditions(request, rtype, criteria, if_match)
        try:
            deleted = self.repo.conditional_delete(
                rtype, criteria, if_match=if_match, base=request.base_url
            )
        except VersionConflict as exc:
            raise _conflict(exc, if_match, view) from None
        if deleted is None and if_match is not None:
            raise HttpError(
                412,
                _not_named(f"no {rtype} matches, so none is at version {if_match}", if_match),
                code="conflict",
            )
        return Response(204)

    def _patch(
        self,
        request: Request,
        rtype: str,
        rid: str,
        scopes: frozenset[str],
        view: PartnerView | None,
    ) -> Response:
        """JSON Patch (RFC 6902) of the current version: https://hl7.org/fhir/R4/http.html#patch"""
        require(scopes, rtype, "update")
        # The patch works on, and answers with, the stored resource, withheld parts and all.
        _trust_only(view, "a patch", "it works on the whole stored resource")
        _no_content_coding(request)
        ctype = _media_type(request.headers.get("content-type", ""))
        if ctype != JSON_PATCH:
            raise HttpError(
                415, f"send a JSON Patch as {JSON_PATCH}, not '{ctype or 'no content type'}'",
                code="not-supported",
            )  # fmt: skip
        _utf8_only(request)
        patch = json_patch(request.body, "the body")
        if_match = _if_match(request.headers.get("if-match"), self._version_of(rtype, rid))
        current = self.repo.read(rtype, rid)
        _check_if_match(current, if_match)
        self._write_preconditions(request, rtype, rid, view, current.version_id)
        patched = patched_resource(patch, current)
        self._check_valid(patched)
        try:
            # Against the version patched, so that a write in between is not undone.
            stored = self.repo.update(patched, if_match=current.version_id)
        except VersionConflict as exc:
            raise _conflict(exc, if_match) from None
        return self._written(request, stored)

    def _written(
        self,
        request: Request,
        stored: Stored,
        *,
        matched: bool = False,
        view: PartnerView | None = None,
    ) -> Response:
        """The answer to a write, its body as the client's `Prefer: return=` asks
        (https://hl7.org/fhir/R4/http.html#ops): the resource (the default), none,
        or an OperationOutcome. `matched`: a conditional create found `stored`, and
        wrote nothing. A partner's (`view`) shows of meta what its reads do: what it
        wrote, not the stored source, tags and extensions kept with it."""
        location = f"{request.base_url}/{stored.resource_type}/{stored.id}"
        headers = {"location": f"{location}/_history/{stored.version_id}", **_etag(stored)}
        status = 201 if stored.created else 200
        wanted = _preference(request.headers.get("prefer"), "return")
        if wanted is not None:
            headers["preference-applied"] = f"return={wanted}"
        if wanted == "minimal":
            return Response(status, b"", headers)
        if wanted == "OperationOutcome":
            key = f"{stored.resource_type}/{stored.id}"
            if matched:
                message = f"{key} matched the condition, so nothing was created: version {stored.version_id}"
            else:
                done = "created" if stored.created else "updated"
                message = f"{key} {done}: version {stored.version_id}"
            return self._json(
                status, operation_outcome([Issue("information", "informational", message)]), headers
            )
        content = stored.content if view is None else _partner_answer(stored.content)
        return Response(status, content, {"content-type": FHIR_JSON, **headers})

    def _validate(
        self, request: Request, rtype: str, rid: str | None, client: Client, scopes: frozenset[str]
    ) -> Response:
        require(scopes, rtype, "read")
        body = self._body(request)
        resource: Any = body
        profile = dict(request.query).get("profile")
        if body.get("resourceType") == "Parameters":
            listed = body.get("parameter") or []
            if not isinstance(listed, list):
                raise HttpError(400, "Parameters.parameter must be a list")
            params = [p for p in listed if isinstance(p, dict)]
            resource = next(
                (p.get("resource") for p in params if p.get("name") == "resource"), None
            )
            for p in params:
                if p.get("name") == "profile":
                    profile = p.get("valueUri") or p.get("valueCanonical")
                    if not isinstance(profile, str):
                        raise HttpError(400, "the 'profile' parameter is not a canonical URL")
            if not isinstance(resource, dict):
                raise HttpError(400, "the Parameters carry no 'resource'")
        if resource.get("resourceType") != rtype:
            raise HttpError(400, f"$validate on {rtype} needs a {rtype}")
        issues = self.validate(resource, profile=profile)
        return self._json(200, operation_outcome(issues))

    # -- search and history ---------------------------------------------------------

    def _search(
        self,
        request: Request,
        rtype: str,
        params: list[tuple[str, str]],
        client: Client,
        scopes: frozenset[str],
        view: PartnerView | None,
    ) -> Response:
        require(scopes, rtype, "search")
        params = [(k, v) for k, v in params if k != "_format"]
        lenient = _preference(request.headers.get("prefer"), "handling") == "lenient"
        left_out: list[UnknownParameter] = []
        if lenient:
            # https://hl7.org/fhir/R4/search.html#errors: what is not understood is
            # left out of the search and of its self link, and said why.
            params, left_out = known_parameters(rtype, params, self.repo.parameters)
        query = _chains_within_scopes(self.repo.parse(rtype, params), scopes)
        if view is None:
            query = local_references(query, request.base_url)
            result = self.repo.search(
                query,
                # Included resources go, and are followed, only where the scopes reach.
                keep_included=lambda found, *_: [
                    s for s in found if _allowed(scopes, s.resource_type)
                ],
            )
            response = self._searchset(
                request, rtype, params, query, result.matches, result.included, result.total,
                includes_cut=result.includes_cut,
            )  # fmt: skip
        else:
            response = self._partner_search(request, rtype, params, query, view)
        if lenient:
            response.headers["preference-applied"] = "handling=lenient"
        if left_out:
            response.body = _with_outcome(
                response.body,
                [
                    Issue("warning", exc.code, f"ignored: {exc.message}", exc.expression)
                    for exc in left_out
                ],
            )
        return response

    def _partner_search(
        self,
        request: Request,
        rtype: str,
        params: list[tuple[str, str]],
        query: SearchQuery,
        view: PartnerView,
    ) -> Response:
        # Count and page only what this client may see: the total must not
        # reveal what was withheld, so filter every match, then page.
        # (the total is counted here, of what is visible: the database need not count)
        # Criteria that what is withheld could stop from matching the stored form
        # while the form shown matches them are not asked of the database, only of
        # what is shown (a part removed is `:missing`, a code removed is `:not`
        # there, and the labels shown are the server's).
        unsure = tuple(c for c in query.criteria if _shown_could_match_alone(c))
        asked = replace(query, criteria=tuple(c for c in query.criteria if c not in unsure))
        # In the order of ids (a sorted search is put in the client's order below).
        # Nothing included: what the matches include is found for the page alone, below.
        everything = replace(
            asked, summary_count=False, total="none", sort=(), include=(), revinclude=()
        )
        chained = [c for c in query.criteria if c.chain]
        # (type, id) of a match -> what its chained criteria hold through
        through: dict[tuple[str, str], set[tuple[str, str]]] = {}

        def shown_matches(found: list[Stored]) -> list[tuple[Stored, bytes]]:
            everyone = view.filter_many(found, account=False)
            candidates = [(s, shown) for s, shown in zip(found, everyone, strict=True) if shown]
            matched = _matched_as_shown(candidates, query, view, self.repo, judge_all=bool(unsure))
            out = []
            for stored, shown in candidates:
                key = (stored.resource_type, stored.id)
                if key not in matched:
                    continue
                if chained:
                    ends = chains_hold(stored, shown, chained, view, self.repo)
                    if ends is None:
                        continue
                    through[key] = ends
                out.append((stored, shown))
            return out

        visible = partner_scan(
            lambda last, _, limit: (
                self.repo.search(
                    replace(everything, offset=0, count=limit, after_id=last.id if last else None)
                ).matches
            ),
            shown_matches,
            "matches",
        )
        if query.sort:
            # The database ordered the matches by all they hold: the client's order
            # comes from what it sees, or where a match stands would tell of a
            # withheld value.
            visible = _in_order_seen(visible, query, self.repo)
        total = len(visible)
        page = visible[query.offset : query.offset + query.count] if not query.summary_count else []
        # What goes out is disclosed (and audited): this page; and that the rest of
        # what the client may see is there, by the total or a next page.
        view.filter_many([stored for stored, _ in page])
        sent = {id(stored) for stored, _ in page}
        view.count([stored for stored, _ in visible if id(stored) not in sent])
        if through:
            # What the criteria held through, for every match the answer tells of: a
            # professional or organisation under the records of the matches it was
            # reached from, as the chain judged it (`chains_hold`).
            patients = {(s.resource_type, s.id): view.patients_of(s) for s, _ in visible}
            reached: dict[tuple[str, str], frozenset[str]] = {}
            for match, ends_of_match in through.items():
                for end in ends_of_match:
                    reached[end] = reached.get(end, frozenset()) | patients[match]
            view.consult(list(self.repo.read_many(sorted(reached)).values()), reached)
        included: list[tuple[Stored, bytes]] = []
        cut = False
        if page and (query.include or query.revinclude):
            included, cut = self._partner_included(query, page, view)
        return self._searchset_bytes(
            request, rtype, params, query, page, included, total, includes_cut=cut
        )

    def _partner_included(
        self, query: SearchQuery, page: list[tuple[Stored, bytes]], view: PartnerView
    ) -> tuple[list[tuple[Stored, bytes]], bool]:
        """What a partner's page includes: what it may see, followed only through the
        references it is shown. A link the consent engine removed (a professional in
        a withheld part of a care team, the performer of a withheld activity) is not
        followed, or the resource at its end would tell of it. A professional or
        organisation is judged, and audited, under the records it was reached from."""
        shown_of = {(s.resource_type, s.id): shown for s, shown in page}
        # Whose records each resource was reached from: a record's own patient; for a
        # professional or organisation, the records of what links to it.
        reach: dict[tuple[str, str], frozenset[str]] = {
            (s.resource_type, s.id): view.patients_of(s) for s, _ in page
        }

        def keep(
            found: list[Stored],
            sources: list[Stored],
            forward: list[Include],
            reverse: list[Include],
        ) -> list[Stored]:
            candidates = [s for s in found if _allowed(view.scopes, s.resource_type)]
            sources_by_key = {(s.resource_type, s.id): s for s in sources}
            linked_from: dict[tuple[str, str], set[tuple[str, str]]] = {}
            for include in forward:
                for key in sources_by_key:
                    if key[0] == include.source_type:
                        for target in _shown_targets(shown_of[key], key[0], include, self.repo):
                            linked_from.setdefault(target, set()).add(key)
            reached: dict[tuple[str, str], frozenset[str]] = {}
            for stored in candidates:
                key = (stored.resource_type, stored.id)
                # A professional or organisation is reached only by a link it is shown
                # (as `share` sends one only where shared content refers to it): one
                # that refers to a source (a reverse include) is reached from no record.
                sources_of = linked_from.get(key, set())
                reached[key] = frozenset().union(*(reach.get(k, frozenset()) for k in sources_of))
            seen = view.filter_many(candidates, referred=True, account=False, reached_from=reached)
            kept: list[Stored] = []
            for stored, shown in zip(candidates, seen, strict=True):
                if shown is None:
                    continue
                key = (stored.resource_type, stored.id)
                if key in linked_from or any(
                    target in sources_by_key
                    for include in reverse
                    if include.source_type == stored.resource_type
                    for target in _shown_targets(shown, stored.resource_type, include, self.repo)
                ):
                    shown_of[key] = shown
                    reach[key] = view.patients_of(stored) or reached[key]
                    kept.append(stored)
            return kept

        included, cut = self.repo.included(query, [s for s, _ in page], keep)
        # Only what goes out is disclosed (and audited).
        shown = view.filter_many(
            included,
            referred=True,
            reached_from={
                (s.resource_type, s.id): reach[(s.resource_type, s.id)] for s in included
            },
        )
        return [(s, b) for s, b in zip(included, shown, strict=True) if b is not None], cut

    def _searchset(
        self,
        request: Request,
        rtype: str,
        params: list[tuple[str, str]],
        query: SearchQuery,
        matches: list[Stored],
        included: list[Stored],
        total: int | None,
        *,
        includes_cut: bool = False,
    ) -> Response:
        return self._searchset_bytes(
            request, rtype, params, query,
            [(s, s.content) for s in matches],
            [(s, s.content) for s in included],
            total, includes_cut=includes_cut,
        )  # fmt: skip

    def _searchset_bytes(
        self,
        request: Request,
        rtype: str,
        params: list[tuple[str, str]],
        query: SearchQuery,
        matches: list[tuple[Stored, bytes]],
        included: list[tuple[Stored, bytes]],
        total: int | None,
        *,
        includes_cut: bool = False,
    ) -> Response:
        base = request.base_url
        if query.summary_count:
            links = [
                {
                    "relation": "self",
                    "url": _page_url(base, rtype, params, query.offset, query.count),
                }
            ]
        else:
            # Without a total (_total=none) there is a next page while this one is full.
            known = (
                total
                if total is not None
                else query.offset + len(matches) + (1 if len(matches) >= query.count else 0)
            )
            links = _page_links(base, rtype, params, query.offset, query.count, known)
        head: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": self.new_id(),
            "meta": {"lastUpdated": _instant(self.clock())},
            "type": "searchset",
        }
        if total is not None:
            head["total"] = total
        head["link"] = links
        if query.summary is not None or query.elements is not None:
            matches = [
                (s, _subset_bytes(content, query.summary, query.elements)) for s, content in matches
            ]
        parts = [
            b'{"fullUrl":'
            + orjson.dumps(f"{base}/{s.resource_type}/{s.id}")
            + b',"resource":'
            + content
            + b',"search":{"mode":"'
            + mode
            + b'"}}'
            for mode, items in ((b"match", matches), (b"include", included))
            for s, content in items
        ]
        if includes_cut:
            issue = Issue(
                "warning",
                "too-costly",
                f"includes stopped at {MAX_INCLUDES} resources: ask for fewer matches"
                " a page (_count), or follow fewer links, to have them all",
                "_include",
            )
            outcome = {"resource": operation_outcome([issue]), "search": {"mode": "outcome"}}
            parts.append(jsonio.dumps(outcome))
        body = (
            jsonio.dumps(head)[:-1] + b',"entry":[' + b",".join(parts) + b"]}"
            if parts
            else jsonio.dumps(head)
        )
        return Response(200, body, {"content-type": FHIR_JSON})

    def _history(
        self,
        request: Request,
        rtype: str,
        rid: str | None,
        client: Client,
        scopes: frozenset[str],
        view: PartnerView | None,
    ) -> Response:
        require(scopes, rtype, "read")
        for name, _ in request.query:
            if name not in HISTORY_PARAMETERS:
                raise HttpError(
                    400,
                    f"history does not support '{name}': it takes"
                    f" {', '.join(sorted(HISTORY_PARAMETERS - {'_pretty'}))}",
                    code="not-supported",
                )
        names = [name for name, _ in request.query]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise HttpError(400, f"history takes '{repeated[0]}' once", code="value")
        q = dict(request.query)
        since = None
        if "_since" in q:
            try:
                since = datetime.fromisoformat(q["_since"].replace("Z", "+00:00"))
            except ValueError:
                raise HttpError(
                    400, f"_since {q['_since']!r} is not an instant", code="value"
                ) from None
            if since.tzinfo is None:
                raise HttpError(400, "_since needs a time zone", code="value")
            try:
                since = since.astimezone(UTC)
            except OverflowError:
                raise HttpError(
                    400,
                    f"_since {q['_since']!r} is outside the instants this server keeps",
                    code="value",
                ) from None
        count = _bounded_int(q, "_count", 100, 1, 1000)
        offset = _bounded_int(q, "_offset", 0, 0, None)
        if view is None:
            versions = self.repo.history(rtype, rid, since=since, count=count, offset=offset)
            total = self.repo.history_total(rtype, rid, since=since)
            if (
                rid is not None
                and total == 0
                and (since is None or self.repo.history_total(rtype, rid) == 0)
            ):
                raise ResourceNotFound(f"{rtype}/{rid} is not known")
        else:
            # Count and page only what this client may see, as for a search.

            def scan(since: datetime | None) -> list[Stored]:
                try:
                    return partner_scan(
                        lambda _, taken, limit: self.repo.history(
                            rtype, rid, since=since, count=limit, offset=taken
                        ),
                        lambda versions: self._partner_history(versions, view),
                        "versions",
                        versions=True,
                    )
                except ResourceNotFound:
                    raise _unknown(rtype, str(rid)) from None

            visible = scan(since)
            # Nothing since then of one it may see is an empty page; of one it may
            # not, or that is not there, it is unknown.
            if rid is not None and not visible and (since is None or not scan(None)):
                raise _unknown(rtype, rid)
            total = len(visible)
            versions = visible[offset : offset + count]
            sent = {id(s) for s in versions}
            view.count([s for s in visible if id(s) not in sent and not s.deleted])
        entries = []
        for s, content in zip(versions, self._history_content(versions, view), strict=True):
            entry: dict[str, Any] = {"fullUrl": f"{request.base_url}/{s.resource_type}/{s.id}"}
            method = "DELETE" if s.deleted else ("POST" if s.version_id == 1 else "PUT")
            entry["request"] = {
                "method": method,
                "url": f"{s.resource_type}/{s.id}" if method != "POST" else s.resource_type,
            }
            entry["response"] = {
                "status": "204" if s.deleted else ("201" if s.version_id == 1 else "200"),
                "etag": f'W/"{s.version_id}"',
                "lastModified": _instant(s.last_updated),
            }
            if content is not None:
                entry["resource"] = orjson.Fragment(content)
            entries.append(entry)
        path = f"{rtype}/{rid}/_history" if rid is not None else f"{rtype}/_history"
        kept = [(k, v) for k, v in request.query if k not in ("_format",)]
        body = {
            "resourceType": "Bundle",
            "id": self.new_id(),
            "type": "history",
            "total": total,
            "link": _page_links(request.base_url, path, kept, offset, count, total),
            "entry": entries,
        }
        return self._json(200, body)

    def _partner_history(self, versions: list[Stored], view: PartnerView) -> list[Stored]:
        """The versions a partner may know of: those it may see, and deletions of what
        it could see before (not even the fact that something withheld was deleted),
        of resources it may know of now (`_known_now`)."""
        known: dict[tuple[str, str], bool] = {}

        def known_now(s: Stored) -> bool:
            key = (s.resource_type, s.id)
            if key not in known:
                known[key] = self._known_now(view, *key)
            return known[key]

        return [
            s
            for s in versions
            if (
                (s.deleted and self._saw_before(view, s.resource_type, s.id, s.version_id))
                or (not s.deleted and view.filter_bytes(s, account=False) is not None)
            )
            and known_now(s)
        ]

    def _history_content(
        self, versions: list[Stored], view: PartnerView | None
    ) -> list[bytes | None]:
        if view is None:
            return [None if s.deleted else s.content for s in versions]
        return [None if s.deleted else view.filter_bytes(s) for s in versions]

    # -- batch and transaction ----------------------------------------------------------

    def _bundle(
        self, request: Request, client: Client, scopes: frozenset[str], view: PartnerView | None
    ) -> Response:
        from cpa_fhir.sandbox._bundles import run_bundle

        return run_bundle(self, request, client, scopes, view)


def _allowed(scopes: frozenset[str], resource_type: str) -> bool:
    return allows(scopes, resource_type, "read")


def _chains_within_scopes(query: SearchQuery, scopes: frozenset[str]) -> SearchQuery:
    """A chain or `_has` criterion reads the resources it passes through, as a search
    of them would: only those of types the token may search. Each link's types are
    narrowed to those; a link left with none is refused (403), or a client could
    read, a guess at a time, values of a type its scopes keep from it."""
    criteria = []
    for criterion in query.criteria:
        links: list[ChainLink] = []
        for i, link in enumerate(criterion.chain):
            reachable = tuple(t for t in link.to_types if allows(scopes, t, "search"))
            if not reachable:
                require(scopes, link.to_types[0] if link.to_types else "*", "search")
            from_types = links[i - 1].to_types if i else link.from_types
            links.append(replace(link, from_types=from_types, to_types=reachable))
        criteria.append(replace(criterion, chain=tuple(links)) if links else criterion)
    return replace(query, criteria=tuple(criteria))


_READS = ("GET", "HEAD")


def allowed_methods(parts: list[str]) -> tuple[str, ...] | None:
    """The methods a path below the base takes (its segments), as a 405's Allow names
    them (RFC 9110 §15.5.6); None for a path that names nothing served here."""
    n = len(parts)
    if n == 0:
        return ("POST",)  # a batch or transaction
    if parts == ["metadata"]:
        return _READS
    if parts[0] not in R4_RESOURCE_TYPES or n > 4:
        return None
    if n == 1:
        return (*_READS, "POST", "PUT", "DELETE")
    second = parts[1]
    if n == 2:
        if second in ("_search", "$validate"):
            return ("POST",)
        if second == "_history":
            return _READS
        if second.startswith(("_", "$")):
            return None  # neither an id nor an interaction served here
        return (*_READS, "PUT", "DELETE", "PATCH")
    if n == 3 and parts[2] == "$validate":
        return ("POST",)
    if parts[2] == "_history":
        return _READS
    return None


def not_allowed(method: str, where: str, parts: list[str]) -> HttpError:
    """A 405 naming, in Allow, the methods the path takes."""
    allowed = allowed_methods(parts) or ()
    return HttpError(
        405,
        f"{method} is not allowed on {where}: it takes {', '.join(allowed)}",
        code="not-supported",
        headers={"allow": ", ".join(allowed)},
    )


def _no_content_coding(request: Request) -> None:
    """415 for a body with a content coding: read as it is, a compressed body is no
    JSON, and one labelled so but not is not what the client meant (RFC 9110 §8.4)."""
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("identity", ""):
        raise HttpError(
            415, f"send the body without content coding, not {coding!r}", code="not-supported"
        )


def _media_type(header: str) -> str:
    """A Content-Type's or Accept item's type/subtype, parameters aside, in lower case:
    media types are compared without regard to case (RFC 9110 §8.3.1)."""
    return header.split(";")[0].strip().lower()


def _parameters(header: str) -> dict[str, str]:
    """A Content-Type's or Accept item's parameters (RFC 9110 §5.6.6), names in lower
    case, values unquoted."""
    found = {}
    for part in header.split(";")[1:]:
        name, _, value = part.partition("=")
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        found[name.strip().lower()] = value
    return found


# What this server sends: FHIR R4 JSON (https://hl7.org/fhir/R4/http.html#version-parameter).
_R4_VERSION = re.compile(r"4\.0(?:\.\d+)?")


def _quality(text: str | None) -> float:
    """A weight (RFC 9110 §12.4.2); one that cannot be read is taken as 1, as none is."""
    try:
        q = float(text) if text is not None else 1.0
    except ValueError:
        return 1.0
    return q if 0.0 <= q <= 1.0 else 1.0


def _takes_fhir_json(accept: str) -> bool:
    """Whether an Accept header (or `_format`) takes FHIR R4 JSON: the most specific of
    its ranges that matches it decides, by its weight (RFC 9110 §12.5.1), so `q=0`
    refuses it; a range naming another fhirVersion does not match it."""
    best, weight = -1, 0.0
    for item in accept.split(","):
        mtype = _media_type(item)
        params = _parameters(item)
        version = params.get("fhirversion")
        if version is not None and not _R4_VERSION.fullmatch(version):
            continue
        if mtype in _JSON_TYPES:
            level = 3 if version is not None else 2
        elif mtype in ("application/*", "*/*"):
            level = 1 if mtype == "application/*" else 0
        else:
            continue
        q = _quality(params.get("q"))
        if level > best:
            best, weight = level, q
        elif level == best:
            weight = max(weight, q)
    return weight > 0


def _utf8_only(request: Request) -> None:
    """415 for a body its Content-Type says is in a charset other than UTF-8: it would
    be read as UTF-8 all the same (RFC 8259 §8.1), and mean what the client did not."""
    charset = _parameters(request.headers.get("content-type", "")).get("charset")
    if charset is not None and charset.lower() != "utf-8":
        raise HttpError(
            415,
            f"this server accepts bodies in UTF-8 only, not charset={charset}: send it as UTF-8",
            code="not-supported",
        )


def _form(request: Request) -> list[tuple[str, str]]:
    if request.body:
        _no_content_coding(request)
    ctype = _media_type(request.headers.get("content-type", ""))
    if request.body and ctype != "application/x-www-form-urlencoded":
        raise HttpError(
            415, "POST _search takes application/x-www-form-urlencoded", code="not-supported"
        )
    if request.body:
        _utf8_only(request)
    try:
        return parse_qsl(
            request.body.decode(), keep_blank_values=True, strict_parsing=bool(request.body)
        )
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "the form body is malformed", code="structure") from None


def _criteria(request: Request) -> str:
    """The search criteria in the query of a write (`_format` aside), as a query string."""
    return urlencode([(k, v) for k, v in request.query if k != "_format"])


def _write_criteria(request: Request, rtype: str, view: PartnerView | None, what: str) -> str:
    """The criteria of a conditional update or delete: there must be some (never "every
    one of the type"), and the client must be the trust's own."""
    criteria = _criteria(request)
    if not criteria:
        raise HttpError(
            400, f"{request.method} {rtype} needs an id or search criteria, e.g. "
            f"{rtype}?identifier=...", code="required",
        )  # fmt: skip
    _whole_store_search(view, what)
    return criteria


def store_rules(resource: dict[str, Any]) -> list[Issue]:
    """What the store needs of a resource beyond the profiles. A Consent must name its
    patient as `Patient/ID` on this server: the consent engine finds a patient's
    Consents by that reference, and one it cannot tell to be the patient's would be
    held to its refusals alone, its permits unused."""
    if resource.get("resourceType") != "Consent":
        return []
    patient = resource.get("patient")
    ref = patient.get("reference") if isinstance(patient, dict) else None
    key = reference_key(ref)
    if key is not None and key.startswith("Patient/") and ref == key:
        return []
    return [
        Issue(
            "error",
            "invariant",
            "Consent.patient must be a reference Patient/ID to a patient on this server"
            f" (not {ref!r}), so that partners are served under this Consent",
            "Consent.patient",
            "cpa-fhir-store-consent-patient",
        )
    ]


def _expression(path: Sequence[str | int]) -> str:
    """Where in a resource a path is, as FHIRPath after its type: `.subject.reference`."""
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path)


def _no_conditional_references(resource: dict[str, Any]) -> None:
    """400 for a write, outside a transaction, of a resource holding a conditional
    reference (`Patient?identifier=...`): those are resolved in transactions only
    (R4 http.html#trules), and stored as written one would name nothing."""
    for path, ref in references(resource):
        if CONDITIONAL_REFERENCE.fullmatch(ref):
            where = _expression(path)
            raise HttpError(
                400,
                f"{resource.get('resourceType')}{where}.reference: the conditional reference "
                f"{ref!r} is resolved only in a transaction; send the write in a transaction "
                "Bundle, or refer to Type/id",
                code="not-supported",
            )


def json_patch(body: bytes, what: str) -> jsonpatch.JsonPatch:
    """A JSON Patch (RFC 6902) read from bytes; 400 if they are not one."""
    try:
        operations = jsonio.loads(body)
        if not isinstance(operations, list):
            raise TypeError("a JSON Patch is a list of operations")
        if _deeper_than(operations, MAX_BODY_DEPTH):
            raise HttpError(
                400,
                f"{what} nests objects and lists more than {MAX_BODY_DEPTH} deep",
                code="too-costly",
            )
        _no_repeated_names(body, what)
        return jsonpatch.JsonPatch(operations)
    except (
        orjson.JSONDecodeError,
        jsonpatch.InvalidJsonPatch,
        jsonpointer.JsonPointerException,  # a path that is not a JSON Pointer
        TypeError,
    ) as exc:
        raise HttpError(400, f"{what} is not a JSON Patch: {exc}", code="structure") from None


def _no_repeated_names(body: bytes, what: str) -> None:
    """400 for JSON whose object names a property twice (read once its depth is known
    to be bounded): it is not FHIR JSON, and which value counts would be a guess."""
    name = jsonio.repeated_name(body)
    if name is not None:
        raise HttpError(
            400, f"{what} gives the property '{name}' twice in one object", code="structure"
        )


def patched_resource(patch: jsonpatch.JsonPatch, current: Stored) -> dict[str, Any]:
    """The current version with the patch applied; 422 if it cannot be, or would change
    the resource's type or id."""
    try:
        patched = patch.apply(current.resource())
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise HttpError(422, f"the patch cannot be applied: {exc}", code="processing") from None
    if not isinstance(patched, dict) or (
        patched.get("resourceType"), patched.get("id")) != (current.resource_type, current.id
    ):  # fmt: skip
        raise HttpError(422, "a patch may not change the resource's type or id", code="invariant")
    if _deeper_than(patched, MAX_BODY_DEPTH):  # as a resource sent whole would be
        raise HttpError(
            400, f"the patched resource nests more than {MAX_BODY_DEPTH} deep", code="too-costly"
        )
    return patched


def precondition_failed(message: str) -> HttpError:
    """412 for a header's condition (If-Match, If-None-Match, If-Unmodified-Since) that
    the resource does not meet: a conflict with its state (https://hl7.org/fhir/R4/http.html),
    not the several matches a conditional write's criteria may find."""
    return HttpError(412, message, code="conflict")


def _check_if_match(current: Stored, if_match: int | None) -> None:
    """412 when the client's If-Match names another version than the current one."""
    if if_match is not None and if_match != current.version_id:
        raise HttpError(
            412,
            _not_named(
                f"{current.resource_type}/{current.id} is at version {current.version_id}, "
                f"not {if_match}",
                if_match,
            ),
            code="conflict",
        )


def never_there(rtype: str, rid: str, expected: int | None) -> None:
    """A trust's delete of what was never there: done already, "if the resource does
    not exist at all" (R4 http.html#delete), unless it named a version to find (412)."""
    if expected is not None:
        message = f"{rtype}/{rid} is not there, not at version {expected}"
        raise HttpError(412, _not_named(message, expected), code="conflict")


def _unknown(rtype: str, rid: str) -> ResourceNotFound:
    """What a partner hears of a resource it may not know of, absent or withheld alike."""
    return ResourceNotFound(f"{rtype}/{rid} is not known to this server")


def _conflict(
    exc: VersionConflict, if_match: int | None, view: PartnerView | None = None
) -> HttpError:
    """A write that found another version than expected: 412 if the client named the
    version it expected (If-Match), else 409. A partner is not told what it found: the
    resource may have changed into, or been deleted as, something it may not see."""
    message = (
        _not_named(exc.message, if_match)
        if view is None
        else "the resource changed while it was being written"
    )
    return HttpError(412 if if_match is not None else 409, message, code="conflict")


# What the consent engine decides from, never a partner's to write: the trust's
# record of what the service user agreed, and every type a Consent may name as an
# actor (R4 Consent.provision.actor.reference), whose identifiers decide whether a
# recipient is the one named: a partner that could edit one could make it name itself.
DECISION_TYPES = frozenset(
    {
        "Consent",
        "CareTeam",
        "Device",
        "Group",
        "Organization",
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "RelatedPerson",
    }
)


# The record of what was disclosed, and of where what was sent came from: a partner
# that could write one could put a disclosure in the trail that never happened.
TRAIL_TYPES = frozenset({"AuditEvent", "Provenance"})


def _partner_writable(view: PartnerView | None, rtype: str) -> None:
    """Refuse a partner's client (403) a write to what consent decisions are made from,
    or to the audit trail."""
    if view is not None and rtype in TRAIL_TYPES:
        raise HttpError(
            403,
            f"{rtype} resources are written by the trust and this server only: they are"
            " the record of what was disclosed",
            code="forbidden",
        )
    if view is not None and rtype in DECISION_TYPES:
        raise HttpError(
            403,
            f"{rtype} resources are written by the trust's own clients only: consent "
            "decisions are made from them",
            code="forbidden",
        )


def _partner_written(
    view: PartnerView, resource: dict[str, Any], replacing: Stored | None = None
) -> dict[str, Any]:
    """What a partner's client writes, as stored: no security labels (the server's), and
    nothing naming a professional or organisation of this server other than the
    client's own organisation (403), but what the version it replaces (`replacing`)
    said. One goes to a partner when shared content refers to it: a reference the
    partner wrote itself would let it fetch any one in the store, and learn it is
    there. Every string is looked at, not only `reference`s: a canonical, a URL whose
    query or path ends in one, is read as a reference by the index. Such a party can
    be named by display, or contained.

    Any other resource of this server it may name only in a reference, which goes as
    one to nothing does when what it names is withheld from the partner: named as the
    consent engine also reads a name (`Type/id` in another string, a reference by
    identifier alone), it is labelled with what the resource it finds carries, so
    reading it back would tell the partner whether the store holds one it may not be
    told of (403 for it, whatever the store holds). Its own organisation it may name
    by any of the identifiers it is registered with."""
    supporting = "|".join(sorted(view.policy.supporting))
    # The whole string, as a URL's path or query names one; a note that mentions a URL,
    # or an extension's own `url`, names nothing.
    naming = re.compile(rf"\S*?(?:^|[/?=&:])({supporting})/([^/?#&\s]+)(?:/_history/\S+)?")
    # What the version it replaces held, as the partner was shown it: a name it may
    # keep only from the meta it is not shown would tell it what that meta holds.
    before_resource = _without_unseen_meta(replacing.resource()) if replacing else {}
    before = set(_strings_at(before_resource).values())
    named_before = set(_named_by_identifier(before_resource).values())
    own = view.client.identifiers
    for path, by_identifier in _named_by_identifier(resource).items():
        kind, system, value = by_identifier
        if by_identifier in named_before or (
            kind in ("", "Organization") and (system, value) in own
        ):
            continue
        raise HttpError(
            403,
            f"{resource.get('resourceType')}{_expression(path)}: a partner's client may "
            "not name a resource by identifier alone, other than its own organisation "
            "(the server would look it up): refer to what it may read, or name a "
            "professional or organisation by display or as a contained resource",
            code="forbidden",
        )
    for path, text in _strings_at(resource).items():
        if text in before:
            continue
        named = None
        if path[-1:] != ("url",):
            found = naming.fullmatch(text)
            named = (found.group(1), found.group(2)) if found else None
            # And as the search index reads it (by its last segments, whatever comes
            # before them: "a b/Practitioner/x"), when what it names could be an id.
            target = reference_target(text)
            if named is None and target and target[0] in view.policy.supporting:
                if target[1] and _FHIR_ID.fullmatch(target[1]):
                    named = (target[0], target[1])
        where = _expression(path)
        if named is not None and f"{named[0]}/{named[1]}" != view.client.reference:
            raise HttpError(
                403,
                f"{resource.get('resourceType')}{where}: a partner's client may not refer to "
                f"a {named[0]} of this server other than its own organisation; name it "
                "by display, or contain it",
                code="forbidden",
            )
        if path[-1:] != ("reference",) and _names_by_type_and_id(text, view):
            raise HttpError(
                403,
                f"{resource.get('resourceType')}{where}: a partner's client may name a "
                "resource of this server only in a reference",
                code="forbidden",
            )
    return _without_server_labels(_meta_kept_from(resource, replacing))


# https://hl7.org/fhir/R4/datatypes.html#id
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _names_by_type_and_id(text: str, view: PartnerView) -> bool:
    """Whether a string names a resource of this server (`Type/id`, as the consent
    engine reads a name in a string that is not a reference), other than the client's
    own organisation."""
    key = reference_key(text) if "/" in text else None
    if key is None or key == view.client.reference:
        return False
    rtype, _, rid = key.partition("/")
    return rtype in R4_RESOURCE_TYPES and _FHIR_ID.fullmatch(rid) is not None


def _named_by_identifier(
    node: Any, path: tuple[str | int, ...] = ()
) -> dict[tuple[str | int, ...], tuple[str, str, str]]:
    """Each Reference that names by identifier alone what it refers to (the consent
    engine looks it up in the store: of the type it gives, or any professional or
    organisation): where it is, and the type ("" for none), system and value."""
    found: dict[tuple[str | int, ...], tuple[str, str, str]] = {}
    if isinstance(node, dict):
        ident, kind = node.get("identifier"), node.get("type")
        if "reference" not in node and isinstance(ident, dict):
            found[(*path, "identifier")] = (
                kind if isinstance(kind, str) else "",
                str(ident.get("system")),
                str(ident.get("value")),
            )
        for key, value in node.items():
            found.update(_named_by_identifier(value, (*path, key)))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.update(_named_by_identifier(item, (*path, i)))
    return found


# The stored meta a partner is not shown, and its update keeps as it is.
_UNSEEN_META = ("source", "tag", "extension")


def _without_unseen_meta(resource: dict[str, Any]) -> dict[str, Any]:
    """A stored resource less the meta a partner is not shown (its source, tags and
    extensions)."""
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return resource
    return {**resource, "meta": {k: v for k, v in meta.items() if k not in _UNSEEN_META}}


def _meta_kept_from(resource: dict[str, Any], replacing: Stored | None) -> dict[str, Any]:
    """A partner's replacement with the stored version's meta source, tags and
    extensions, which the partner is not shown: they are not its to erase, nor to
    change (what it sends of them counts only where none is stored)."""
    if replacing is None:
        return resource
    stored = replacing.resource().get("meta")
    kept = (
        {k: v for k, v in stored.items() if k in _UNSEEN_META} if isinstance(stored, dict) else {}
    )
    if not kept:
        return resource
    given = resource.get("meta")
    meta: dict[str, Any] = given if isinstance(given, dict) else {}
    return {**resource, "meta": {**meta, **kept}}


def _partner_answer(content: bytes) -> bytes:
    """A stored resource as the answer to a partner's write: its meta as partners are
    shown it (version, time, profiles)."""
    resource = jsonio.loads(content)
    meta = resource.get("meta")
    if not isinstance(meta, dict) or set(meta) <= set(PARTNER_META):
        return content
    resource["meta"] = {k: meta[k] for k in PARTNER_META if k in meta}
    return jsonio.dumps(resource)


def _strings_at(node: Any, path: tuple[str | int, ...] = ()) -> dict[tuple[str | int, ...], str]:
    """Every string of a resource by where it is (a contained resource's too), keys and
    its own id and type aside."""
    found: dict[tuple[str | int, ...], str] = {}
    if isinstance(node, str):
        found[path] = node
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.update(_strings_at(item, (*path, i)))
    elif isinstance(node, dict):
        for key, value in node.items():
            if not (len(path) == 0 and key in ("id", "resourceType")):
                found.update(_strings_at(value, (*path, key)))
    return found


def _without_server_labels(resource: dict[str, Any]) -> dict[str, Any]:
    """A partner's resource less the security labels in its meta and its contained
    resources' (each labelled as a resource of its own): labels are the server's, made
    for each recipient; kept, they would read as the trust's own, and one the policy
    does not know would leave the patient's record unlabelled, so withheld from all."""
    contained = resource.get("contained")
    if isinstance(contained, list):
        resource = {
            **resource,
            "contained": [
                _without_server_labels(inner) if isinstance(inner, dict) else inner
                for inner in contained
            ],
        }
    meta = resource.get("meta")
    if not isinstance(meta, dict) or "security" not in meta:
        return resource
    rest = {k: v for k, v in meta.items() if k != "security"}
    if not rest:  # no empty object left behind (a contained resource's meta)
        return {k: v for k, v in resource.items() if k != "meta"}
    return {**resource, "meta": rest}


def _whole_store_search(view: PartnerView | None, what: str) -> None:
    """A conditional write matches against everything stored, withheld or not: whether
    it found one, none or several would tell a partner what it may not see."""
    _trust_only(view, what, "its search would look beyond what this client may see")


def _trust_only(view: PartnerView | None, what: str, why: str) -> None:
    """Refuse a partner's client (403) an interaction that would go past its consent view."""
    if view is not None:
        raise HttpError(
            403, f"{what} is open to the trust's own clients only: {why}", code="forbidden"
        )


# An If-Match list (RFC 9110 §13.1.1): entity-tags, weak or strong, each a quoted
# opaque string, separated by commas.
_ENTITY_TAG = r'(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"'
_ENTITY_TAGS = re.compile(rf"\s*{_ENTITY_TAG}(?:\s*,\s*{_ENTITY_TAG})*\s*")
# A version's ETag is W/"n", n written as this server writes it (no leading zero).
_VERSION_TAG = re.compile(rf"[1-9][0-9]{{0,{_VERSION_DIGITS - 1}}}")
# What an If-Match naming no version (W/"01", W/"x") asks for: no version is, so it
# is stale (412) as any other version not there is.
_NO_VERSION: int = 10**_VERSION_DIGITS


def _if_match(value: Any, current: Callable[[], int | None]) -> int | None:
    """The version a write must find, from If-Match: None for none, and for `*` (any
    version: that the resource is there is checked by `Router._write_preconditions`).
    Tags are compared as the strings they are, weakly (W/"1" and "1" both name
    version 1; W/"01" names none). Of a list, the current version (`current`, read
    only then) if a tag names it, else one that is not there (a 412)."""
    if value is None or (isinstance(value, str) and value.strip() == "*"):
        return None
    if not isinstance(value, str):
        raise HttpError(400, f'If-Match {value!r} is not a version ETag like W/"3"', code="value")
    tags: list[str]
    if _is_decimal(value.strip()):
        tags = [value.strip()]  # a version id alone, as some clients send it
    elif _ENTITY_TAGS.fullmatch(value):
        tags = re.findall(_ENTITY_TAG, value)
    else:
        raise HttpError(400, f'If-Match {value!r} is not a version ETag like W/"3"', code="value")
    named = {int(tag) for tag in tags if _VERSION_TAG.fullmatch(tag)}
    if not named:
        return _NO_VERSION
    if len(tags) == 1:
        return named.pop()
    now = current()
    return now if now in named else _NO_VERSION


def _not_named(message: str, if_match: int | None) -> str:
    """A conflict's message, where If-Match named no version there is."""
    if if_match != _NO_VERSION:
        return message
    return (
        message.replace(f", not {_NO_VERSION}", ", which If-Match does not name")
        .replace(f"not at version {_NO_VERSION}", "not at a version If-Match names")
        .replace(f"none is at version {_NO_VERSION}", "none is at a version If-Match names")
    )


def _deeper_than(node: Any, limit: int) -> bool:
    """Whether JSON content nests objects and lists more than `limit` deep (walked
    without recursion, so that depth itself cannot break the walk)."""
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        stack.extend((c, depth + 1) for c in children if type(c) in (dict, list))
    return False


def _is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes superscripts, which int() refuses."""
    return text.isascii() and text.isdigit()


def _bounded_int(
    query: Mapping[str, str], name: str, default: int, low: int, high: int | None
) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    value = whole_number(name, raw, MAX_OFFSET)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise HttpError(400, f"{name} must be {bounds}", code="value")
    return value


# What a history interaction takes (https://hl7.org/fhir/R4/http.html#history);
# `_at` and `_list` are not supported, and said so.
HISTORY_PARAMETERS = frozenset({"_since", "_count", "_offset", "_format", "_pretty"})


def _page_links(
    base: str, path: str, params: list[tuple[str, str]], offset: int, count: int, total: int
) -> list[dict[str, str]]:
    """self, and next and previous where there are such pages (none of `_count=0`:
    a page of nothing has no page after it, or a client following next would loop)."""
    links = [{"relation": "self", "url": _page_url(base, path, params, offset, count)}]
    if count == 0:
        return links
    if offset + count < total:
        links.append(
            {"relation": "next", "url": _page_url(base, path, params, offset + count, count)}
        )
    if offset > 0:
        previous = max(0, offset - count)
        links.append(
            {"relation": "previous", "url": _page_url(base, path, params, previous, count)}
        )
    return links


def _page_url(base: str, rtype: str, params: list[tuple[str, str]], offset: int, count: int) -> str:
    kept = [(k, v) for k, v in params if k not in ("_offset", "_count")]
    return f"{base}/{rtype}?{urlencode([*kept, ('_count', str(count)), ('_offset', str(offset))])}"


def _in_order_seen(
    matches: list[tuple[Stored, bytes]], query: SearchQuery, repo: SqlRepository
) -> list[tuple[Stored, bytes]]:
    """The matches in the order of `query.sort`, as the store orders them (each sort
    parameter's least value, or greatest when descending, those without one last;
    then the id), but by the values of what the client is shown."""
    seen: dict[int, dict[str, Any]] = {}

    def values(item: tuple[Stored, bytes], key: SortKey) -> list[Any]:
        stored, shown = item
        if key.parameter == "_id":
            return [stored.id]
        if key.parameter == "_lastUpdated":
            return [stored.last_updated]
        parameter = repo.parameters.get(stored.resource_type, key.parameter)
        if parameter is None:
            return []
        resource = seen.get(id(item))
        if resource is None:
            resource = seen[id(item)] = jsonio.loads(shown)
        rows = index_resource(resource, [parameter])
        if key.type == "string":
            return [row[2] for row in rows.strings]
        if key.type in ("token", "uri"):
            return [row[2] for row in rows.tokens]
        if key.type == "date":
            return [row[2] if key.descending else row[1] for row in rows.dates]
        return [row[1] for row in rows.numbers]

    ordered = sorted(
        matches,
        key=lambda item: item[0].id,
        reverse=len(query.sort) == 1
        and query.sort[0].parameter == "_id"
        and query.sort[0].descending,
    )
    for key in reversed(query.sort):  # stable: the last key first, the first last

        def sort_value(item: tuple[Stored, bytes], key: SortKey = key) -> tuple[bool, Any]:
            found = values(item, key)
            if not found:
                return (not key.descending, None)  # after every value, either way
            return (key.descending, max(found) if key.descending else min(found))

        ordered.sort(key=sort_value, reverse=key.descending)
    return ordered


def _shown_targets(
    shown: bytes, rtype: str, include: Include, repo: SqlRepository
) -> set[tuple[str, str]]:
    """What a client is `shown` of a resource refers to by the include's parameter,
    of its target type if it names one."""
    targets = reference_targets(jsonio.loads(shown), rtype, include.parameter, repo)
    return {t for t in targets if include.target_type in (None, t[0])}


def _shown_could_match_alone(criterion: Criterion) -> bool:
    """Whether the form a client is shown could match `criterion` where the stored
    form does not. Filtering removes, so most criteria found true of what is shown
    are true of what is stored; not these: `:missing=true`, `:not`, and the
    metadata parameters (the labels shown are added by the consent engine). At the
    end of a chain as well: `chains_hold` judges those on what is shown."""
    return (
        criterion.missing is True
        or criterion.modifier == "not"
        or criterion.parameter in ("_security", "_tag", "_profile", "_source")
    )


def _matched_as_shown(
    candidates: list[tuple[Stored, bytes]],
    query: SearchQuery,
    view: PartnerView,
    repo: SqlRepository,
    *,
    judge_all: bool,
) -> set[tuple[str, str]]:
    """Which candidates the query's unchained criteria match as the client sees them:
    found by what it is shown, never by what was withheld, and by a part withheld
    as by one that is not there. The database matched the stored forms: one shown
    whole stands, unless criteria were left for here (`judge_all`). (Kept for the
    store's generation, with the filtered forms it judges.)"""
    criteria = tuple(c for c in query.criteria if not c.chain)
    if not criteria:
        return {(s.resource_type, s.id) for s, _ in candidates}
    matched: set[tuple[str, str]] = set()
    to_judge: list[tuple[Stored, bytes, Any]] = []
    # `ap` is judged against now: an answer is not kept where it was asked.
    now_dependent = any(
        isinstance(v, DateValue) and v.prefix == "ap" for c in criteria for v in c.values
    )
    for stored, shown in candidates:
        key = (stored.resource_type, stored.id)
        if not judge_all and shown == stored.content:
            matched.add(key)
            continue
        known_key = (stored.resource_type, stored.id, stored.version_id, criteria, shown)
        known = None if now_dependent else view.derived.matches_as_shown.get(known_key)
        if known is None:
            to_judge.append((stored, shown, known_key))
        elif known:
            matched.add(key)
    if to_judge:
        found = matching(
            query,
            [(stored, jsonio.loads(shown)) for stored, shown, _ in to_judge],
            repo.parameters,
            now_micros=to_micros(repo.clock()),
        )
        for stored, _, known_key in to_judge:
            hit = (stored.resource_type, stored.id) in found
            if not now_dependent:
                view.derived.matches_as_shown[known_key] = hit
            if hit:
                matched.add((stored.resource_type, stored.id))
    return matched
