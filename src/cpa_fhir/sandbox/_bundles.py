"""Batch and transaction Bundles: https://hl7.org/fhir/R4/http.html#transaction

A transaction is all or nothing: every entry is validated first, references
between entries (`urn:uuid:` fullUrls) are resolved to the ids the server
assigns, and the writes run in one database transaction. A batch runs each
entry on its own and reports each outcome. Reads inside either go through the
same consent filtering as single requests.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from cpa_fhir.errors import FhirError, ResourceGone, VersionConflict
from cpa_fhir.fhir.outcome import Issue
from cpa_fhir.sandbox._auth import Client, require
from cpa_fhir.store import time_ordered_id

if TYPE_CHECKING:
    from cpa_fhir.sandbox._access import PartnerView
    from cpa_fhir.sandbox._router import Request, Response, Router

MAX_ENTRIES = 500
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


def _error(status: int, message: str, where: str | None = None) -> FhirError:
    from cpa_fhir.sandbox._router import HttpError

    exc = HttpError(status, message)
    exc.expression = where
    return exc


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _error(400, "Bundle.entry must be a list of entries")
    if len(entries) > MAX_ENTRIES:
        raise _error(413, f"a Bundle may hold at most {MAX_ENTRIES} entries")
    for i, e in enumerate(entries):
        req = e.get("request")
        if (
            not isinstance(req, dict)
            or req.get("method") not in _ORDER
            or not isinstance(req.get("url"), str)
        ):
            raise _error(
                400, "each entry needs request.method and request.url", f"Bundle.entry[{i}].request"
            )
        if req["method"] in ("POST", "PUT") and not isinstance(e.get("resource"), dict):
            raise _error(
                400, f"a {req['method']} entry needs a resource", f"Bundle.entry[{i}].resource"
            )
        if req["method"] == "PATCH":
            raise _error(422, "PATCH is not supported in Bundles", f"Bundle.entry[{i}].request")
    return entries


def _rewrite(node: Any, ids: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in ids:
                out[k] = ids[v]
            else:
                out[k] = _rewrite(v, ids)
        return out
    if isinstance(node, list):
        return [_rewrite(v, ids) for v in node]
    return node


def _sub_request(
    request: Request, method: str, url: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> Request:
    from cpa_fhir.sandbox._router import Request

    parts = urlsplit(url)
    return Request(
        method=method,
        path=parts.path.strip("/"),
        query=parse_qsl(parts.query, keep_blank_values=True),
        headers={"content-type": "application/fhir+json", **headers},
        body=orjson.dumps(body) if body is not None else b"",
        base_url=request.base_url,
    )


def _response_entry(resp: Response) -> dict[str, Any]:
    entry: dict[str, Any] = {"response": {"status": str(resp.status)}}
    if "location" in resp.headers:
        entry["response"]["location"] = resp.headers["location"]
    if "etag" in resp.headers:
        entry["response"]["etag"] = resp.headers["etag"]
    if resp.body:
        body = orjson.loads(resp.body)
        if resp.status >= 400:
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
    from cpa_fhir.sandbox._router import HttpError

    bundle = router._body(request)
    if bundle["resourceType"] != "Bundle" or bundle.get("type") not in ("batch", "transaction"):
        raise HttpError(400, "POST to the base URL takes a batch or transaction Bundle")
    entries = _entries(bundle)
    if bundle["type"] == "batch":
        results = []
        for e in entries:
            req = e["request"]
            sub = _sub_request(
                request, req["method"], req["url"], e.get("resource"), _entry_headers(req)
            )
            results.append(_response_entry(router._route_safely(sub, client, scopes, view)))
        return router._json(
            200,
            {
                "resourceType": "Bundle",
                "id": router.new_id(),
                "type": "batch-response",
                "entry": results,
            },
        )
    return _transaction(router, request, entries, client, scopes, view)


def _entry_headers(req: dict[str, Any]) -> dict[str, str]:
    headers = {}
    if isinstance(req.get("ifNoneExist"), str):
        headers["if-none-exist"] = req["ifNoneExist"]
    if isinstance(req.get("ifMatch"), str):
        headers["if-match"] = req["ifMatch"]
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
        HttpError,
        _conflict,
        _if_match,
        _partner_writable,
        _whole_store_search,
        _without_server_labels,
    )

    # Assign ids to new resources first, so that entries can refer to each other.
    ids: dict[str, str] = {}
    prepared: list[dict[str, Any]] = []
    for i, e in enumerate(entries):
        req = e["request"]
        method = req["method"]
        resource = copy.deepcopy(e.get("resource")) if isinstance(e.get("resource"), dict) else None
        rtype = req["url"].split("?")[0].strip("/").split("/")[0]
        if_match = _if_match(req.get("ifMatch")) if method in ("PUT", "DELETE") else None
        if resource is not None and view is not None:
            resource = _without_server_labels(resource)
        if method == "POST":
            assert resource is not None
            require(scopes, rtype, "create")
            _partner_writable(view, rtype)
            if resource.get("resourceType") != rtype:
                raise HttpError(400, f"entry {i}: the resource is not a {rtype}")
            new_id = time_ordered_id()
            condition = req.get("ifNoneExist")
            matched = None
            if isinstance(condition, str):
                _whole_store_search(view, "a conditional create")
                found = router.repo.conditional_match(rtype, condition, f"entry {i}: ifNoneExist")
                if found is not None:
                    new_id = matched = found.id
                    resource = None  # exists already: nothing to write
            if isinstance(e.get("fullUrl"), str):
                ids[e["fullUrl"]] = f"{rtype}/{new_id}"
            prepared.append(
                {
                    "i": i,
                    "method": method,
                    "type": rtype,
                    "id": new_id,
                    "resource": resource,
                    "req": req,
                    "condition": condition if isinstance(condition, str) else None,
                    "matched": matched,
                }
            )
        elif method == "PUT":
            assert resource is not None
            require(scopes, rtype, "update")
            rid = req["url"].strip("/").split("/")[1] if "/" in req["url"].strip("/") else None
            if rid is None or resource.get("id") != rid or resource.get("resourceType") != rtype:
                raise HttpError(400, f"entry {i}: PUT needs Type/id matching the resource")
            if isinstance(e.get("fullUrl"), str):
                ids[e["fullUrl"]] = f"{rtype}/{rid}"
            prepared.append(
                {
                    "i": i,
                    "method": method,
                    "type": rtype,
                    "id": rid,
                    "resource": resource,
                    "req": req,
                    "if_match": if_match,
                    "expected": router._version_to_replace(view, rtype, rid, if_match),
                }
            )
        elif method == "DELETE":
            require(scopes, rtype, "delete")
            parts = req["url"].strip("/").split("/")
            if len(parts) != 2:
                raise HttpError(400, f"entry {i}: DELETE needs Type/id")
            try:
                expected = router._version_to_replace(view, rtype, parts[1], if_match)
            except ResourceGone:
                expected = None  # deleted already, and the partner could see it
            prepared.append(
                {
                    "i": i,
                    "method": method,
                    "type": rtype,
                    "id": parts[1],
                    "resource": None,
                    "req": req,
                    "if_match": if_match,
                    "expected": expected,
                }
            )
        else:
            prepared.append(
                {"i": i, "method": method, "type": rtype, "id": None, "resource": None, "req": req}
            )
    # Resolve references, then validate everything before writing anything.
    for p in prepared:
        if p["resource"] is not None:
            p["resource"] = _rewrite(p["resource"], ids)
            p["resource"]["id"] = p["id"]
            issues = router.validator.validate(p["resource"])
            if any(x.is_error for x in issues):
                issues = [_in_entry(x, p["i"], p["type"]) for x in issues]
                raise HttpError(
                    422,
                    f"entry {p['i']} does not conform to the profiles",
                    code="processing",
                    issues=issues,
                )
    results: dict[int, dict[str, Any]] = {}
    # What this transaction writes or deletes, as Type/id: an ifNoneExist that matches
    # it differently once those are made is the bundle's own contradiction, not a race.
    touched: dict[str, set[int]] = {}
    for p in prepared:
        if p["method"] in ("POST", "PUT", "DELETE"):
            touched.setdefault(f"{p['type']}/{p['id']}", set()).add(p["i"])
    with router.repo.transaction() as tx:
        for p in sorted(prepared, key=lambda p: _ORDER[p["method"]]):
            i = p["i"]
            try:
                if p["method"] == "DELETE":
                    try:
                        tx.delete(p["type"], p["id"], if_match=p["expected"])
                    except VersionConflict as exc:
                        raise _conflict(exc, p["if_match"], view) from None
                    except FhirError as exc:
                        if exc.code != "deleted":
                            raise
                    results[i] = {"response": {"status": "204"}}
                elif p["method"] in ("POST", "PUT"):
                    if p.get("condition") is not None:
                        # Matched again, now that writers are serialised: another
                        # transaction may have created a match since (or removed it).
                        found = tx.conditional_match(p["type"], p["condition"], "ifNoneExist")
                        now = found.id if found is not None else None
                        if now != p["matched"]:
                            mine = {f"{p['type']}/{x}" for x in (now, p["matched"]) if x}
                            if any(touched.get(k, set()) - {i} for k in mine):
                                raise HttpError(
                                    400,
                                    f"entry {i}: what ifNoneExist {p['condition']!r} matches "
                                    "is written or deleted by another entry of this "
                                    "transaction",
                                    code="invalid",
                                )
                            raise VersionConflict(
                                f"entry {i}: what ifNoneExist {p['condition']!r} matches "
                                "changed while the transaction ran; send it again"
                            )
                    if p["resource"] is None:
                        stored = tx.read(p["type"], p["id"])
                        status = "200"
                    else:
                        expected = p["expected"] if p["method"] == "PUT" else None
                        try:
                            stored = tx.update(p["resource"], if_match=expected)
                        except VersionConflict as exc:
                            raise _conflict(exc, p["if_match"], view) from None
                        status = "201" if stored.created else "200"
                    results[i] = {
                        "fullUrl": f"{request.base_url}/{stored.resource_type}/{stored.id}",
                        "resource": orjson.Fragment(stored.content),
                        "response": {
                            "status": status,
                            "location": f"{request.base_url}/{stored.resource_type}/{stored.id}/_history/{stored.version_id}",
                            "etag": f'W/"{stored.version_id}"',
                        },
                    }
            except FhirError as exc:
                exc.expression = exc.expression or f"Bundle.entry[{i}]"
                raise
    # Reads see the state after the writes, through the same filtering.
    for p in prepared:
        if p["method"] in ("GET", "HEAD"):
            sub = _sub_request(request, "GET", p["req"]["url"], None, {})
            results[p["i"]] = _response_entry(router._route_safely(sub, client, scopes, view))
    body = {
        "resourceType": "Bundle",
        "id": router.new_id(),
        "type": "transaction-response",
        "entry": [results[i] for i in range(len(entries))],
    }
    return router._json(200, body)


def _in_entry(issue: Issue, index: int, rtype: str) -> Issue:
    where = issue.expression or rtype
    inside = where[len(rtype) :] if where.startswith(rtype) else f".{where}"
    return replace(issue, expression=f"Bundle.entry[{index}].resource{inside}")
