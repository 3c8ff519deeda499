"""Batch and transaction Bundles: https://hl7.org/fhir/R4/http.html#transaction

A transaction is all or nothing: every entry is validated first, references
between entries (`urn:uuid:` fullUrls) are resolved to the ids the server
assigns, and the writes run in one database transaction. A batch runs each
entry on its own and reports each outcome. Reads inside either go through the
same consent filtering as single requests.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from cpa_fhir.consent._references import references
from cpa_fhir.errors import FhirError, ResourceGone, ResourceNotFound, VersionConflict
from cpa_fhir.fhir import jsonio
from cpa_fhir.fhir.outcome import Issue
from cpa_fhir.sandbox._auth import Client, require
from cpa_fhir.store import time_ordered_id

if TYPE_CHECKING:
    from cpa_fhir.sandbox._access import PartnerView
    from cpa_fhir.sandbox._router import Request, Response, Router
    from cpa_fhir.store import Repository

JSON_PATCH = "application/json-patch+json"
MAX_ENTRIES = 500
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


def _error(status: int, message: str, where: str | None = None, code: str = "invalid") -> FhirError:
    from cpa_fhir.sandbox._router import HttpError

    exc = HttpError(status, message, code=code)
    exc.expression = where
    return exc


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _error(400, "Bundle.entry must be a list of entries")
    if len(entries) > MAX_ENTRIES:
        raise _error(413, f"a Bundle may hold at most {MAX_ENTRIES} entries", code="too-costly")
    for i, e in enumerate(entries):
        req = e.get("request")
        if (
            not isinstance(req, dict)
            or not isinstance(req.get("method"), str)
            or req["method"] not in _ORDER
            or not isinstance(req.get("url"), str)
        ):
            raise _error(
                400, "each entry needs request.method and request.url", f"Bundle.entry[{i}].request"
            )
        for header in ("ifMatch", "ifNoneExist", "ifNoneMatch", "ifModifiedSince"):
            # A condition that cannot be read must not be skipped: the write would go
            # ahead unconditionally.
            if header in req and not isinstance(req[header], str):
                raise _error(400, f"{header} must be a string", f"Bundle.entry[{i}].request")
        if req["method"] in ("POST", "PUT") and not isinstance(e.get("resource"), dict):
            raise _error(
                400, f"a {req['method']} entry needs a resource", f"Bundle.entry[{i}].resource"
            )
    return entries


def _patch_body(entry: dict[str, Any], i: int) -> bytes:
    """A PATCH entry's JSON Patch: the data of the Binary it carries, whose contentType
    says it is one (https://hl7.org/fhir/R4/http.html#patch)."""
    binary = entry.get("resource")
    where = f"Bundle.entry[{i}].resource"
    if not isinstance(binary, dict) or binary.get("resourceType") != "Binary":
        raise _error(400, "a PATCH entry carries its JSON Patch as a Binary resource", where)
    content_type = binary.get("contentType")
    if not isinstance(content_type, str) or content_type.split(";")[0].strip() != JSON_PATCH:
        raise _error(415, f"a PATCH entry's Binary must be a JSON Patch ({JSON_PATCH})", where)
    data = binary.get("data")
    try:
        if not isinstance(data, str):
            raise ValueError("no data")
        return base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        raise _error(400, "a PATCH entry's Binary.data must be base64", where) from None


def _without_format(query: str) -> str:
    """Search criteria as a conditional entry gives them, less `_format` (which names
    no criterion), as for a conditional write alone."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if all(k != "_format" for k, _ in pairs):
        return query
    return urlencode([(k, v) for k, v in pairs if k != "_format"])


# A link in the narrative to an entry's fullUrl (R4 http.html#trules: `<a href="">`
# and `<img src="">`), its quotes captured to be kept.
_NARRATIVE_LINK = re.compile(r"""(\b(?:href|src)\s*=\s*)(["'])(urn:(?:uuid|oid):[^"'<>\s]+)\2""")


# Elements whose strings are text or codes, not links (R4 replaces links in elements
# of type uri, url, canonical, oid and uuid): an identifier's value may well be the
# urn:uuid its entry's fullUrl is, and names the resource, not its id here.
_NOT_LINKS = frozenset(
    {"value", "valueString", "valueMarkdown", "valueCode", "valueId", "code", "display", "text"}
)


def _rewrite(node: Any, ids: dict[str, str]) -> Any:
    """A resource with its links to entries replaced by what they resolved to."""
    return _map_links(node, lambda link: ids.get(link, link))


def _map_links(node: Any, change: Callable[[str], str], key: str | None = None) -> Any:
    """A resource with each link that may name an entry given by `change`: every
    reference, and, where an entry's fullUrl is a `urn:uuid:` or `urn:oid:`, any other
    element that is one (of type uri, url, canonical, oid or uuid: an extension's
    value, an attachment's URL; not an identifier's value or other text) and a
    narrative link to one, as R4 says of all matching links (http.html#trules)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                out[k] = change(v)
            elif k == "div" and isinstance(v, str) and "urn:" in v:
                out[k] = _NARRATIVE_LINK.sub(lambda m: f"{m[1]}{m[2]}{change(m[3])}{m[2]}", v)
            else:
                out[k] = _map_links(v, change, k)
        return out
    if isinstance(node, list):
        return [_map_links(v, change, key) for v in node]
    if (
        isinstance(node, str)
        and key not in _NOT_LINKS
        and node.startswith(("urn:uuid:", "urn:oid:"))
    ):
        return change(node)
    return node


# `Type?criteria`: criteria or none, so that `Patient?` is refused as `Patient?&` is,
# not stored as written.
CONDITIONAL_REFERENCE = re.compile(r"([A-Z][A-Za-z]*)\?(.*)", re.DOTALL)


def _resolve_conditional_references(
    resource: dict[str, Any],
    i: int,
    ids: dict[str, str],
    router: Any,
    view: Any,
    resolved: list[tuple[int, str, str, str]],
    base: str,
) -> None:
    """Add to `ids` what the entry's conditional references (`Patient?identifier=...`)
    match, one resource each (R4 http.html#trules), and to `resolved` (entry, reference,
    type, criteria) to match them again under the write lock; refuse a reference to a
    `urn:` no entry has, or criteria matching none or several."""
    from cpa_fhir.sandbox._router import HttpError, _whole_store_search

    for _, ref in references(resource):
        if ref in ids:
            continue
        if ref.startswith(("urn:uuid:", "urn:oid:")):
            raise HttpError(
                400, f"entry {i} refers to {ref}, which no entry of the Bundle is", code="invalid"
            )
        conditional = CONDITIONAL_REFERENCE.fullmatch(ref)
        if conditional is None:
            continue
        _whole_store_search(view, "a conditional reference")
        rtype, criteria = conditional.groups()
        found = router.repo.conditional_match(
            rtype, _without_format(criteria), f"entry {i}: the reference {ref}", base
        )
        if found is None:
            raise HttpError(
                400, f"entry {i}: the reference {ref} matches no resource", code="not-found"
            )
        ids[ref] = f"{rtype}/{found.id}"
        resolved.append((i, ref, rtype, _without_format(criteria)))


def _sub_request(
    request: Request,
    method: str,
    url: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    *,
    patch: bytes | None = None,
) -> Request:
    """An entry as the request it stands for; `patch`: a PATCH entry's JSON Patch."""
    from cpa_fhir.sandbox._router import HttpError, Request

    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed '[' and the like
        raise HttpError(400, f"{url!r} is not a URL: {exc}", code="value") from None
    path = parts.path.strip("/")
    if not path:
        # Batches within batches would each be held to the entry limit alone, and
        # without end: one Bundle is one level of entries.
        raise HttpError(400, "a Bundle entry's request is to a resource, not the base URL")
    content_type = "application/fhir+json" if patch is None else JSON_PATCH
    # The Bundle's Prefer (return=, handling=) holds for each entry.
    prefer = {"prefer": request.headers["prefer"]} if "prefer" in request.headers else {}
    return Request(
        method=method,
        path=path,
        query=parse_qsl(parts.query, keep_blank_values=True),
        headers={"content-type": content_type, **prefer, **headers},
        body=patch if patch is not None else jsonio.dumps(body) if body is not None else b"",
        base_url=request.base_url,
    )


def _response_entry(resp: Response, method: str = "GET") -> dict[str, Any]:
    """A response as a Bundle entry's; to a HEAD, as to a GET less the body."""
    entry: dict[str, Any] = {"response": {"status": str(resp.status)}}
    if "location" in resp.headers:
        entry["response"]["location"] = resp.headers["location"]
    if "etag" in resp.headers:
        entry["response"]["etag"] = resp.headers["etag"]
    if resp.body and method != "HEAD":
        body = orjson.Fragment(resp.body)  # already JSON: written as it is
        if (
            resp.status >= 400
            or resp.headers.get("preference-applied") == "return=OperationOutcome"
        ):
            entry["response"]["outcome"] = body
        else:
            entry["resource"] = body
    return entry


def run_bundle(
    router: Router,
    request: Request,
    client: Client,
    scopes: frozenset[str],
    view: PartnerView | None,
) -> Response:
    from cpa_fhir.sandbox._router import HttpError, outcome_response

    bundle = router._body(request)
    if bundle["resourceType"] != "Bundle" or bundle.get("type") not in ("batch", "transaction"):
        raise HttpError(400, "POST to the base URL takes a batch or transaction Bundle")
    entries = _entries(bundle)
    if bundle["type"] == "batch":
        if view is None:
            _independent(entries)
        results = []
        written = False
        for i, e in enumerate(entries):
            req = e["request"]
            if view is not None and written and req["method"] in ("GET", "HEAD"):
                # A read after the batch's own writes sees them, as the trust's does.
                view.moved_on(router.derived.at(router.repo.generation()))
                written = False
            written = written or req["method"] not in ("GET", "HEAD")
            try:
                patch = _patch_body(e, i) if req["method"] == "PATCH" else None
                resource = e.get("resource") if patch is None else None
                method = "GET" if req["method"] == "HEAD" else req["method"]
                sub = _sub_request(
                    request, method, req["url"], resource, _entry_headers(req), patch=patch
                )
            except FhirError as exc:  # this entry's own error
                results.append(_response_entry(outcome_response(exc)))
                continue
            answer = router._route_safely(sub, client, scopes, view)
            results.append(_response_entry(answer, req["method"]))
        body = {
            "resourceType": "Bundle",
            "id": router.new_id(),
            "type": "batch-response",
            "entry": results,
        }
        return _answer(router, body, [e["request"]["method"] for e in entries], view)
    return _transaction(router, request, entries, client, scopes, view)


def _independent(entries: list[dict[str, Any]]) -> None:
    """Refuse a batch whose entries depend on each other: "For a batch, there SHALL be
    no interdependencies between the different entries in the Bundle that cause change
    on the server ... Servers SHALL validate that this is the case" (R4
    http.html#transaction). An entry linking to another's `urn:` fullUrl is one (a
    transaction resolves such links; a batch would store them unresolved, naming
    nothing)."""
    urls: dict[str, int] = {}
    for i, e in enumerate(entries):
        full_url = e.get("fullUrl")
        if isinstance(full_url, str) and full_url.startswith(("urn:uuid:", "urn:oid:")):
            urls.setdefault(full_url, i)
    if not urls:
        return
    for i, e in enumerate(entries):
        resource = e.get("resource")
        if not isinstance(resource, dict):
            continue
        for link in _links(resource):
            j = urls.get(link)
            if j is not None and j != i:
                raise _error(
                    400,
                    f"entry {i} refers to {link}, the fullUrl of entry {j}: the entries of a "
                    "batch may not depend on each other (send a transaction)",
                    f"Bundle.entry[{i}]",
                )


def _links(resource: dict[str, Any]) -> list[str]:
    """The links of a resource that a transaction would resolve (`_map_links`)."""
    found: list[str] = []

    def noted(link: str) -> str:
        found.append(link)
        return link

    _map_links(resource, noted)
    return found


def _entry_headers(req: dict[str, Any]) -> dict[str, str]:
    """An entry's conditions as the HTTP headers they stand for."""
    headers = {}
    if isinstance(req.get("ifNoneExist"), str):
        headers["if-none-exist"] = req["ifNoneExist"]
    if isinstance(req.get("ifMatch"), str):
        headers["if-match"] = req["ifMatch"]
    if isinstance(req.get("ifNoneMatch"), str):
        headers["if-none-match"] = req["ifNoneMatch"]
    since = req.get("ifModifiedSince")
    if isinstance(since, str):
        # An instant here, an HTTP date in the header; one that cannot be read is
        # ignored, as the header's would be.
        from cpa_fhir.sandbox._router import http_date

        try:
            moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
            if moment.tzinfo is not None:
                headers["if-modified-since"] = http_date(moment)
        except (ValueError, OverflowError):  # not an instant, or none UTC can hold
            pass
    return headers


def _transaction(
    router: Router,
    request: Request,
    entries: list[dict[str, Any]],
    client: Client,
    scopes: frozenset[str],
    view: PartnerView | None,
) -> Response:
    from cpa_fhir.sandbox._router import (
        _ID,
        HttpError,
        _check_if_match,
        _conflict,
        _if_match,
        _partner_written,
        _trust_only,
        _whole_store_search,
        json_patch,
        never_there,
        patched_resource,
    )

    # A reference under this server's base in criteria names what a relative one does.
    base = request.base_url
    # Find what each entry writes first (new ids assigned, conditional ones matched), so
    # that entries can refer to each other and none writes what another does.
    ids: dict[str, str] = {}
    urls: dict[str, int] = {}  # fullUrl -> the entry it is of
    prepared: list[dict[str, Any]] = []
    for i, e in enumerate(entries):
        try:
            req = e["request"]
            method = req["method"]
            resource = (
                copy.deepcopy(e.get("resource")) if isinstance(e.get("resource"), dict) else None
            )
            path, _, query = req["url"].partition("?")
            criteria = _without_format(query)
            parts = path.strip("/").split("/")
            rtype = parts[0]
            if not rtype:
                raise HttpError(
                    400, f"entry {i}: a Bundle entry's request is to a resource, not the base URL"
                )
            if method in ("GET", "HEAD"):
                # Read after the writes commit: refused now if it cannot be, not then.
                _sub_request(request, "GET", req["url"], None, {})
            elif len(parts) == 2 and not _ID.fullmatch(parts[1]):
                raise HttpError(400, f"entry {i}: '{parts[1]}' is not a valid resource id")
            if method not in ("PUT", "DELETE", "PATCH"):
                if_match = None
            elif len(parts) == 2:
                if_match = _if_match(req.get("ifMatch"), router._version_of(rtype, parts[1]))
            elif criteria and view is None:
                matched = _scoped_match(router, scopes, method, rtype, criteria, base)
                if_match = _if_match(req.get("ifMatch"), matched)
            else:
                # Refused below: no criteria, or a partner's conditional write, whose
                # search must not run at all (it would look past what it may see).
                if_match = _if_match(req.get("ifMatch"), lambda: None)
            p: dict[str, Any] = {
                "i": i, "method": method, "type": rtype, "id": None, "resource": None, "req": req,
                "if_match": if_match, "expected": None, "condition": None, "matched": None,
            }  # fmt: skip
            if method == "POST":
                assert resource is not None
                if len(parts) != 1:
                    raise HttpError(
                        400, f"entry {i}: POST creates in a type ('{rtype}'), not at '{path}'"
                    )
                _may_write(i, resource, rtype, "create", scopes, view)
                p["id"] = time_ordered_id()
                p["resource"] = resource
                condition = req.get("ifNoneExist")
                if criteria:
                    # Criteria in the URL ask what ifNoneExist asks, as for a POST alone.
                    if isinstance(condition, str) and sorted(
                        parse_qsl(_without_format(condition.lstrip("?")), keep_blank_values=True)
                    ) != sorted(parse_qsl(criteria, keep_blank_values=True)):
                        raise HttpError(
                            400, f"entry {i}: the URL's criteria and ifNoneExist differ"
                        )
                    condition = criteria
                if isinstance(condition, str):
                    condition = _without_format(condition.lstrip("?"))
                    _whole_store_search(view, "a conditional create")
                    found = router.repo.conditional_match(
                        rtype, condition, f"entry {i}: ifNoneExist", base
                    )
                    p["condition"] = condition
                    if found is not None:
                        p["id"] = p["matched"] = found.id
                        p["resource"] = None  # exists already: nothing to write
            elif method == "PUT":
                assert resource is not None
                _may_write(i, resource, rtype, "update", scopes, view)
                if len(parts) == 1 and criteria:
                    # Conditional update: the one match is updated, or, with none, the
                    # resource is created (with its own id, if it has one).
                    _whole_store_search(view, "a conditional update")
                    found = router.repo.conditional_match(
                        rtype, criteria, f"entry {i}: conditional update", base
                    )
                    body_id = resource.get("id")
                    if found is not None and body_id not in (None, found.id):
                        raise HttpError(
                            400, f"entry {i}: the resource's id '{body_id}' is not that of the "
                            f"{rtype} the criteria match", code="invalid",
                        )  # fmt: skip
                    if found is None and if_match is not None:
                        raise _none_at_version(i, rtype, if_match)
                    p["condition"] = criteria
                    p["matched"] = found.id if found is not None else None
                    p["id"] = p["matched"] or (body_id if isinstance(body_id, str) else None)
                    p["id"] = p["id"] or time_ordered_id()
                    p["expected"] = _conditional_entry_preconditions(
                        router, request, req, p, if_match
                    )
                elif len(parts) == 2 and not criteria:
                    if resource.get("id") != parts[1]:
                        raise HttpError(400, f"entry {i}: PUT needs Type/id matching the resource")
                    p["id"] = parts[1]
                    p["expected"] = router._version_to_replace(view, rtype, parts[1], if_match)
                    p["expected"] = _entry_preconditions(router, request, req, rtype, p, view)
                else:
                    raise HttpError(400, f"entry {i}: PUT needs Type/id, or Type?criteria")
                p["resource"] = resource
            elif method == "DELETE":
                require(scopes, rtype, "delete")
                if len(parts) == 1 and criteria:
                    _whole_store_search(view, "a conditional delete")
                    found = router.repo.conditional_match(
                        rtype, criteria, f"entry {i}: conditional delete", base
                    )
                    if found is None and if_match is not None:
                        raise _none_at_version(i, rtype, if_match)
                    p["condition"] = criteria
                    p["id"] = p["matched"] = found.id if found is not None else None
                    p["expected"] = _conditional_entry_preconditions(
                        router, request, req, p, if_match
                    )
                elif len(parts) == 2 and not criteria:
                    p["id"] = parts[1]
                    try:
                        p["expected"] = router._version_to_replace(view, rtype, parts[1], if_match)
                    except ResourceGone:
                        p["gone"] = True  # deleted already, and the partner could see it
                    else:
                        p["expected"] = _entry_preconditions(router, request, req, rtype, p, view)
                else:
                    raise HttpError(400, f"entry {i}: DELETE needs Type/id, or Type?criteria")
            elif method == "PATCH":
                require(scopes, rtype, "update")
                _trust_only(view, "a patch", "it works on the whole stored resource")
                if len(parts) != 2 or criteria:
                    raise HttpError(400, f"entry {i}: PATCH needs Type/id")
                patch = json_patch(_patch_body(e, i), f"entry {i}'s Binary")
                current = router.repo.read(rtype, parts[1])
                _check_if_match(current, if_match)
                p["id"] = parts[1]
                p["resource"] = patched_resource(patch, current)
                # Written over the version patched, so that a write in between is not undone.
                p["expected"] = current.version_id
            if view is not None and p["resource"] is not None:
                # After the checks above: a refusal here must not tell what they keep.
                replacing = view.read(rtype, p["id"]) if method == "PUT" else None
                p["resource"] = _partner_written(view, p["resource"], replacing)
        except FhirError as exc:
            exc.expression = exc.expression or f"Bundle.entry[{i}]"
            raise
        full_url = e.get("fullUrl")
        if isinstance(full_url, str) and method in ("POST", "PUT"):
            if full_url in urls:
                raise HttpError(
                    400,
                    f"entries {urls[full_url]} and {i} have one fullUrl ({full_url}): a"
                    " reference to it would name either (bdl-7)",
                    code="invalid",
                )
            urls[full_url] = i
            if p["id"]:
                ids[full_url] = f"{rtype}/{p['id']}"
        prepared.append(p)
    # What this transaction writes or deletes, as Type/id. Two entries may not both
    # (R4 http.html#trules); an ifNoneExist or condition that matches it differently once
    # the writes are made is the bundle's own contradiction, not a race.
    touched: dict[str, set[int]] = {}
    for p in prepared:
        writes = p["resource"] is not None if p["method"] == "POST" else p["method"] != "GET"
        if writes and p["method"] != "HEAD" and p["id"] is not None:
            touched.setdefault(f"{p['type']}/{p['id']}", set()).add(p["i"])
    for key, which in touched.items():
        if len(which) > 1:
            first, second = sorted(which)[:2]
            raise HttpError(
                400, f"entries {first} and {second} both write {key}: a transaction may "
                "change each resource once", code="invalid",
            )  # fmt: skip
    # Resolve references, then validate everything before writing anything.
    resolved: list[tuple[int, str, str, str]] = []
    deleted = {
        f"{p['type']}/{p['id']}": p["i"] for p in prepared if p["method"] == "DELETE" and p["id"]
    }
    for p in prepared:
        if p["resource"] is not None:
            _resolve_conditional_references(
                p["resource"], p["i"], ids, router, view, resolved, base
            )
            for i, ref, _, _ in resolved:
                if i == p["i"] and ids[ref] in deleted:
                    raise HttpError(
                        400, f"entry {i}: the reference {ref} matches {ids[ref]}, which entry "
                        f"{deleted[ids[ref]]} deletes", code="invalid",
                    )  # fmt: skip
            p["resource"] = _rewrite(p["resource"], ids)
            p["resource"]["id"] = p["id"]
            issues = router.validate(p["resource"])
            if any(x.is_error for x in issues):
                issues = [_in_entry(x, p["i"], p["type"]) for x in issues]
                raise HttpError(
                    422,
                    f"entry {p['i']} does not conform to the profiles",
                    code="processing",
                    issues=issues,
                )
    results: dict[int, dict[str, Any]] = {}
    with router.repo.transaction() as tx:
        for i, ref, rtype, criteria in resolved:
            # Matched again now that writers are serialised, before this one writes: a
            # transaction in between may have made, changed or removed what it names.
            found = tx.conditional_match(rtype, criteria, f"entry {i}: the reference {ref}", base)
            if found is None or f"{rtype}/{found.id}" != ids[ref]:
                raise VersionConflict(
                    f"entry {i}: what the reference {ref} matches changed while the "
                    "transaction ran; send it again"
                )
        for p in sorted(prepared, key=lambda p: _ORDER[p["method"]]):
            i = p["i"]
            try:
                if p["condition"] is not None:
                    _match_again(tx, p, touched, base)
                if p["method"] == "DELETE":
                    if p["id"] is not None and not p.get("gone"):
                        try:
                            tx.delete(p["type"], p["id"], if_match=p["expected"])
                        except VersionConflict as exc:
                            raise _conflict(exc, p["if_match"], view) from None
                        except ResourceNotFound:
                            if view is not None:
                                raise
                            never_there(p["type"], p["id"], p["expected"])
                        except FhirError as exc:
                            if exc.code != "deleted":
                                raise
                    results[i] = {"response": {"status": "204"}}
                elif p["method"] in ("POST", "PUT", "PATCH"):
                    if p["resource"] is None:
                        stored = tx.read(p["type"], p["id"])
                        status = "200"
                    else:
                        expected = None if p["method"] == "POST" else p["expected"]
                        try:
                            if p["method"] == "PUT" and p["condition"] is not None:
                                # As a conditional update alone: none matching, an id
                                # the resource brings must not be another's.
                                stored = tx.conditional_update(
                                    p["resource"], p["condition"], if_match=expected, base=base
                                )
                            else:
                                stored = tx.update(p["resource"], if_match=expected)
                        except VersionConflict as exc:
                            raise _conflict(exc, p["if_match"], view) from None
                        status = "201" if stored.created else "200"
                    # As the write alone would answer (`Router._written`), in the
                    # entry's resource or response.outcome.
                    written = _response_entry(
                        router._written(request, stored, matched=p["resource"] is None, view=view)
                    )
                    results[i] = {
                        "fullUrl": f"{request.base_url}/{stored.resource_type}/{stored.id}",
                        **written,
                        "response": {**written["response"], "status": status},
                    }
            except FhirError as exc:
                exc.expression = exc.expression or f"Bundle.entry[{i}]"
                raise
    # Reads see the state after the writes, through the same filtering: a partner's
    # view, made before them, moves on to what the store now holds.
    if view is not None and any(p["method"] in ("GET", "HEAD") for p in prepared):
        view.moved_on(router.derived.at(router.repo.generation()))
    for p in prepared:
        if p["method"] in ("GET", "HEAD"):
            sub = _sub_request(request, "GET", p["req"]["url"], None, _entry_headers(p["req"]))
            answer = router._route_safely(sub, client, scopes, view)
            results[p["i"]] = _response_entry(answer, p["method"])
    body = {
        "resourceType": "Bundle",
        "id": router.new_id(),
        "type": "transaction-response",
        "entry": [results[i] for i in range(len(entries))],
    }
    return _answer(router, body, [e["request"]["method"] for e in entries], view)


def _answer(
    router: Router, body: dict[str, Any], methods: list[str], view: PartnerView | None
) -> Response:
    """A Bundle's answer. A partner's whose writes are stored carries what to answer if
    its reads' AuditEvents cannot be recorded: the same, each read refused (503),
    rather than a 503 for all that would tell the client nothing was written."""
    from cpa_fhir.sandbox._router import audit_failed_response

    response = router._json(200, body)
    reads = ("GET", "HEAD")
    wrote = any(
        method not in reads and str(entry["response"]["status"]).startswith("2")
        for method, entry in zip(methods, body["entry"], strict=True)
    )
    if view is not None and wrote:
        refused = _response_entry(audit_failed_response())
        entries = [
            refused if method in reads else entry
            for method, entry in zip(methods, body["entry"], strict=True)
        ]
        response.if_audit_fails = router._json(200, {**body, "entry": entries})
    return response


def _may_write(
    i: int,
    resource: dict[str, Any],
    rtype: str,
    interaction: Literal["create", "update"],
    scopes: frozenset[str],
    view: PartnerView | None,
) -> None:
    """Refuse an entry that would write what its client may not, or another type."""
    from cpa_fhir.sandbox._router import HttpError, _partner_writable

    require(scopes, rtype, interaction)
    _partner_writable(view, rtype)
    if resource.get("resourceType") != rtype:
        raise HttpError(400, f"entry {i}: the resource is not a {rtype}")


def _scoped_match(
    router: Router, scopes: frozenset[str], method: str, rtype: str, criteria: str, base: str
) -> Callable[[], int | None]:
    """The version of what a conditional entry's criteria match (for an If-Match list),
    searched only where the token's scopes reach, as the write itself is."""

    def matched() -> int | None:
        require(scopes, rtype, "delete" if method == "DELETE" else "update")
        return router._match_version(rtype, criteria, base)()

    return matched


def _none_at_version(i: int, rtype: str, if_match: int) -> FhirError:
    """412 for a conditional entry naming a version when nothing matches."""
    from cpa_fhir.sandbox._router import HttpError, _not_named

    message = _not_named(
        f"entry {i}: no {rtype} matches, so none is at version {if_match}", if_match
    )
    return HttpError(412, message, code="conflict")


def _entry_preconditions(
    router: Router,
    request: Request,
    req: dict[str, Any],
    rtype: str,
    p: dict[str, Any],
    view: PartnerView | None,
) -> int | None:
    """An update or delete entry's `ifNoneMatch` (and `ifMatch: *`), as the headers are
    on the request alone (`Router._write_preconditions`): the version to write over."""
    sub = _sub_request(request, p["method"], req["url"], None, _entry_headers(req))
    expected: int | None = router._write_preconditions(sub, rtype, p["id"], view, p["expected"])
    return expected


def _conditional_entry_preconditions(
    router: Router, request: Request, req: dict[str, Any], p: dict[str, Any], if_match: int | None
) -> int | None:
    """A conditional update's or delete's preconditions, against its match (if any)."""
    from cpa_fhir.sandbox._router import precondition_failed

    if p["matched"] is None:
        if str(req.get("ifMatch", "")).strip() == "*":
            raise precondition_failed(f"entry {p['i']}: no {p['type']} matches (ifMatch: *)")
        return if_match
    sub = _sub_request(request, p["method"], req["url"], None, _entry_headers(req))
    expected: int | None = router._write_preconditions(sub, p["type"], p["matched"], None, if_match)
    return expected


def _match_again(
    tx: Repository, p: dict[str, Any], touched: dict[str, set[int]], base: str
) -> None:
    """Match an entry's condition (ifNoneExist, or a conditional update's or delete's
    criteria) again, now that writers are serialised: another transaction may have
    made or removed a match since it was first matched (`base`: this server's)."""
    from cpa_fhir.sandbox._router import HttpError

    what = "ifNoneExist" if p["method"] == "POST" else f"conditional {p['method']}"
    found = tx.conditional_match(p["type"], p["condition"], what, base)
    now = found.id if found is not None else None
    if now == p["matched"]:
        return
    i = p["i"]
    mine = {f"{p['type']}/{x}" for x in (now, p["matched"]) if x}
    if any(touched.get(k, set()) - {i} for k in mine):
        raise HttpError(
            400, f"entry {i}: what {what} {p['condition']!r} matches is written or deleted "
            "by another entry of this transaction", code="invalid",
        )  # fmt: skip
    raise VersionConflict(
        f"entry {i}: what {what} {p['condition']!r} matches changed while the transaction "
        "ran; send it again"
    )


def _in_entry(issue: Issue, index: int, rtype: str) -> Issue:
    where = issue.expression or rtype
    inside = where[len(rtype) :] if where.startswith(rtype) else f".{where}"
    return replace(issue, expression=f"Bundle.entry[{index}].resource{inside}")
