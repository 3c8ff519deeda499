"""The thin FastAPI shell around the router: HTTP in, `Request` to the router, `Response` out."""

from __future__ import annotations

import gc
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread
import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.responses import Response as HttpResponse

from cpa_fhir.errors import FhirError
from cpa_fhir.sandbox._access import APPENDED_TYPES
from cpa_fhir.sandbox._audit_log import AuditBatcher, AuditWriteFailed
from cpa_fhir.sandbox._auth import AuthFailure, token_request
from cpa_fhir.sandbox._router import (
    FHIR_JSON,
    HttpError,
    Request,
    allowed_methods,
    outcome_response,
)
from cpa_fhir.sandbox._server import Sandbox
from cpa_fhir.store import SqlRepository, Stored, may_reach_types
from cpa_fhir.store._engine import POOL_SIZE
from cpa_fhir.store._generation import GenerationWatch, SharedQueries

_log = logging.getLogger(__name__)
MAX_BODY = 5 * 1024 * 1024
INDEX_BEHIND = (503, "the audit trail's search index could not be brought up to date; try again")
FHIR_PREFIX = "/fhir"
# Requests doing database work run on at most this many threads at once, as many as
# the store keeps pooled connections: more threads would only wait for a connection
# or contend for the interpreter.
WORKER_THREADS = POOL_SIZE
# The trust's reads by id on a database server: current versions by (type, id).
CurrentReads = SharedQueries[tuple[str, str], Stored]
INLINE_METHODS = frozenset({"GET", "HEAD"})
# A read: `Type/id`.
_READ_BY_ID = re.compile(r"[A-Z][A-Za-z]*/[A-Za-z0-9.\-]{1,64}/?")
# Parameters that change how a read is written, not what it finds.
_FORMAT_ONLY = frozenset({"_format", "_pretty"})


def _may_find_appended(
    method: str, path: str, query_string: bytes, headers: Mapping[str, str], body: bytes = b""
) -> bool:
    """Whether a request may find the server's own records by their search index: a
    search or conditional write whose criteria may reach them (`may_reach_types`),
    or a Bundle. The audit child writes their index rows after it answers, so such a
    request waits for them first (`AuditBatcher.index`); a search that cannot find
    them does not wait, and the child writes many records' rows at once."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return method == "POST"  # a batch or transaction
    criteria = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    searching = parts[-1] == "_search"
    if searching:
        try:  # the criteria in its form body too
            criteria += parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
        except (UnicodeDecodeError, ValueError):
            return True  # refused by the router; waiting does no harm
    condition = headers.get("if-none-exist")
    if condition is not None:
        # As the store reads it (`conditional_match`): a leading "?" is no part of a name.
        criteria += parse_qsl(condition.lstrip("?"), keep_blank_values=True)
    elif len(parts) > 1 and not searching and all(name in _FORMAT_ONLY for name, _ in criteria):
        return False  # a read, vread, history or operation, with nothing to search
    return may_reach_types(parts[0], criteria, APPENDED_TYPES)


_BASE_URLS: dict[tuple[Any, ...], str] = {}
_MAX_BASE_URLS = 64  # the Host header is the client's: do not keep every one
# What the benchmark's twin endpoint keeps at most: answers, and their bytes.
_MAX_BARE_ANSWERS = 1024
_MAX_BARE_BYTES = 64 * 1024 * 1024
_LOOPBACK = frozenset({"127.0.0.1", "::1"})


def _base_url(request: HttpRequest) -> str:
    scope = request.scope
    server = scope.get("server")
    key = (
        scope.get("scheme"),
        tuple(server) if server else None,
        scope.get("root_path"),
        request.headers.get("host"),
    )
    known = _BASE_URLS.get(key)
    if known is None:
        known = str(request.base_url).rstrip("/") + FHIR_PREFIX
        if len(_BASE_URLS) < _MAX_BASE_URLS:
            _BASE_URLS[key] = known
    return known


@asynccontextmanager
async def _steady_heap(_app: FastAPI) -> AsyncIterator[None]:
    """What is made before serving (models, profiles, policy) lives as long as the
    server: it is kept out of the cycle collector's passes, each of which had taken
    about 90 ms over it, stalling every request in flight."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@asynccontextmanager
async def _serving(
    app: FastAPI,
    audit: AuditBatcher,
    repo: SqlRepository,
    watching: list[GenerationWatch],
    reading: list[CurrentReads],
) -> AsyncIterator[None]:
    """While the app serves: a steady heap, the audit child's answers heard on the
    serving event loop itself, and the store's generation and current versions read
    on that loop (in `watching` and `reading`; without this lifespan each request
    reads them itself)."""
    async with _steady_heap(app):
        audit.attach()
        watch, reads = repo.generation_watch(), repo.current_reads()
        if watch is not None:
            watching.append(watch)
        if reads is not None:
            reading.append(reads)
        app.state.current_reads = reads  # to see how many queries served them
        try:
            yield
        finally:
            audit.detach()
            if watch is not None:
                watching.remove(watch)
                await watch.close()
            if reads is not None:
                reading.remove(reads)
                await reads.close()


async def _body(request: HttpRequest) -> bytes:
    headers = request.headers
    if "content-length" not in headers and "transfer-encoding" not in headers:
        return b""  # no body (RFC 9112 §6.3)
    declared = headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY:
        raise HttpError(413, f"the body is larger than {MAX_BODY} bytes", code="too-costly")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise HttpError(413, f"the body is larger than {MAX_BODY} bytes", code="too-costly")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client went before sending all of its body: the request is abandoned, no
        # fault of the server's (and the answer goes to no one).
        _log.debug(
            "%s %s: the client left before its body was sent", request.method, request.url.path
        )
        raise HttpError(
            400, "the client closed the connection before sending its body", code="incomplete"
        ) from None
    return b"".join(chunks)


def _fhir_path(scope: Mapping[str, Any], prefix: str) -> str:
    """The path under the FHIR base, from the request's own: a route's path parameter
    drops a final newline (its pattern's `$` matches before one), and the id before
    it would pass for the id without it. Below the root path the app is served at."""
    full, root = scope["path"], scope.get("root_path", "")
    if root and full.startswith(root):
        full = full[len(root) :]
    return str(full[len(prefix) + 1 :])  # after "{prefix}/"; nothing at the base


def _allowed_here(scope: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The methods a FHIR URL takes (as the router's 405 names them); None elsewhere."""
    full, root = scope["path"], scope.get("root_path", "")
    if root and full.startswith(root):
        full = full[len(root) :]
    if full != FHIR_PREFIX and not full.startswith(FHIR_PREFIX + "/"):
        return None
    return allowed_methods([p for p in full[len(FHIR_PREFIX) :].split("/") if p])


def _header_fields(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header fields by (lower-case) name; a field sent on several lines is one,
    its values joined by commas (RFC 9110 §5.3), not the last line alone."""
    fields: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    return fields


def _send(response: Any) -> HttpResponse:
    return HttpResponse(response.body, status_code=response.status, headers=response.headers)


def _send_head(response: Any) -> HttpResponse:
    """The answer to HEAD: GET's status and headers (its length included), no body."""
    headers = dict(response.headers)
    if response.status != 304:  # a 304 has no body whose length it could give
        headers["content-length"] = str(len(response.body))
    return HttpResponse(b"", status_code=response.status, headers=headers)


def create_app(
    sandbox: Sandbox, bare_endpoint: bool = False, *, audit_process: bool = True
) -> FastAPI:
    """The ASGI app. `bare_endpoint` (for benchmarks only) adds `GET /_bare/fhir/...`,
    the twin of each FHIR read and search: the first request with a given path,
    query and headers is answered by the FHIR endpoint, and a successful answer
    (status, headers and body) is kept in memory and sent again, as it was, to every
    later request identical to it, with no auth, consent, audit or database work:
    the HTTP stack's own cost for the same exchange. Since it neither authorises nor
    audits what it sends again, it answers loopback clients only, and the sandbox
    never serves it. `audit_process`: AuditEvents are stored by a child process
    where one can serve (stopped by `Sandbox.close`)."""
    app = FastAPI(
        title="cpa-fhir sandbox",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lambda app: _serving(app, audit, sandbox.repo, watching, reading),
    )
    watching: list[GenerationWatch] = []
    reading: list[CurrentReads] = []
    workers: list[anyio.CapacityLimiter] = []  # made on first use, inside the event loop

    def in_worker_thread(fn: Any, *args: Any) -> Any:
        if not workers:
            workers.append(anyio.CapacityLimiter(WORKER_THREADS))
        return anyio.to_thread.run_sync(fn, *args, limiter=workers[0])

    async def inline(fn: Any, *args: Any) -> Any:
        return fn(*args)

    inline_reads = sandbox.repo.embedded
    # A child process indexes and stores the AuditEvents on another core. Where none
    # can: on an embedded store a batch's commit is a short local write, made on the
    # event loop with no thread hand-over (and no wait for the interpreter lock).
    audit: AuditBatcher = AuditBatcher(
        sandbox.router.audit_log,
        inline if inline_reads else in_worker_thread,
        sandbox.router.audit_log.child_appender() if audit_process else None,
    )

    async def token(request: HttpRequest) -> HttpResponse:
        def refused(description: str, status: int = 400) -> HttpResponse:
            error = {"error": "invalid_request", "error_description": description}
            return JSONResponse(error, status, headers={"cache-control": "no-store"})

        try:
            body = await _body(request)
        except HttpError as exc:
            # Too large is a 413, as at the FHIR endpoint; whatever else, unreadable.
            return refused(exc.message if exc.status == 413 else "unreadable form", exc.status)
        try:
            pairs = parse_qsl(body.decode(), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError):
            return refused("unreadable form")
        counted = Counter(name for name, _ in pairs)
        repeated = sorted(name for name, n in counted.items() if n > 1)
        if repeated:
            # RFC 6749 §3.2: a parameter is sent once; which one would count is a guess.
            return refused(f"{repeated[0]} is given more than once")
        status, payload, challenge = token_request(
            dict(pairs),
            request.headers.get("authorization"),
            sandbox.registry,
            now=int(time.time()),
            signing_key=sandbox.signing_key,
            token_url=str(request.url),
            issuer=_base_url(request),
        )
        return JSONResponse(payload, status, headers={"cache-control": "no-store", **challenge})

    async def fhir(request: HttpRequest) -> HttpResponse:
        return await answer(request, _fhir_path(request.scope, FHIR_PREFIX))

    async def answer(request: HttpRequest, path: str) -> HttpResponse:
        try:
            body = await _body(request)
            client, scopes = None, frozenset[str]()
            if path.strip("/") != "metadata":
                client, scopes = sandbox.tokens.verify(
                    request.headers.get("authorization"), now=int(time.time())
                )
            req = Request(
                # HEAD is GET without the body (RFC 9110 §9.3.2): answered as GET, and
                # the body left off when it is sent.
                method="GET" if request.method == "HEAD" else request.method,
                path=path,
                # Straight from the ASGI scope: the parsed URL object costs more.
                query=parse_qsl(
                    request.scope["query_string"].decode("latin-1"), keep_blank_values=True
                ),
                headers=_header_fields(request.scope["headers"]),
                body=body,
                base_url=_base_url(request),
            )
        except (HttpError, AuthFailure) as exc:
            return _send(outcome_response(exc))
        query_string = request.scope["query_string"]
        if _may_find_appended(req.method, path, query_string, req.headers, req.body):
            try:
                await audit.index()
            except AuditWriteFailed:
                return _send(outcome_response(HttpError(*INDEX_BEHIND, code="transient")))
        # A partner's request reads the generation first (see `PartnerView`): on a
        # database server, without holding the event loop for the round trip.
        generation = None
        if watching and client is not None and not client.sees_everything:
            generation = await watching[0].current()
        read_by_id = req.method in INLINE_METHODS and _READ_BY_ID.fullmatch(path) is not None
        if read_by_id and reading and client is not None and client.sees_everything:
            # A read by id on a database server, for the trust: the current version
            # read on this loop, with those other requests ask for meanwhile, in one
            # query, and the event loop free while it is out.
            rtype, rid = path.strip("/").split("/")
            try:
                req = replace(req, current=(rtype, rid, await reading[0].get((rtype, rid))))
            except Exception:
                # The store did not answer: the router reads it again and says why,
                # on a worker thread, so that the event loop does not wait on it.
                read_by_id = False
        if req.method in INLINE_METHODS and (inline_reads or read_by_id):
            # On an embedded store reads are CPU-bound, never waiting on a network; on
            # a database server a read by id was read above (the trust's), or is a
            # primary-key lookup on a kept connection (its time bounded, see
            # `ReadConnections`). Either way a hop to a worker thread, and the contest
            # for the interpreter lock it starts, would cost more than it frees the
            # event loop.
            response = sandbox.router.handle(
                req, client, scopes, defer_audit=True, generation=generation
            )
        else:
            # Writes wait on locks and commits, and a database server's replies
            # take a network round trip: off the event loop.
            response = await in_worker_thread(
                partial(sandbox.router.handle, defer_audit=True, generation=generation),
                req,
                client,
                scopes,
            )
        if response.audit is not None:
            # The disclosure's AuditEvents commit (with others', in one transaction)
            # before its body leaves; the event loop serves others meanwhile.
            try:
                await audit.record(response.audit)
            except AuditWriteFailed:
                response = response.unaudited()
        if request.method == "HEAD":
            return _send_head(response)
        return _send(response)

    # Routes are matched in order: the FHIR API, which takes nearly every request,
    # before the token endpoint.
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
    app.router.add_route(FHIR_PREFIX + "/{path:path}", fhir, methods=methods)
    # The base as clients write it, with no slash: a batch or transaction is POSTed
    # there, and a redirect would make a client send it twice or not at all.
    app.router.add_route(FHIR_PREFIX, fhir, methods=methods)
    app.add_api_route("/token", token, methods=["POST"])

    if bare_endpoint:
        answered: dict[tuple[Any, ...], tuple[bytes, int, dict[str, str]]] = {}
        kept_bytes = 0

        # Routed as the FHIR endpoint is (a plain Starlette route, its response made as
        # `_send` makes it), so that the two differ only in the work behind them.
        async def bare(request: HttpRequest) -> HttpResponse:
            nonlocal kept_bytes
            scope = request.scope
            client = scope.get("client")
            if request.method != "GET" or not client or client[0] not in _LOOPBACK:
                return _send(outcome_response(HttpError(404, "no such endpoint", code="not-found")))
            path = _fhir_path(request.scope, "/_bare" + FHIR_PREFIX)
            # Every header counts (the token, Accept, Host for the links): the same
            # request, byte for byte, or the endpoint itself answers.
            key = (path, scope["query_string"], tuple(scope["headers"]))
            kept = answered.get(key)
            if kept is None:
                first = await answer(request, path)
                if not 200 <= first.status_code < 300:
                    return first  # an error is answered afresh each time
                if len(answered) >= _MAX_BARE_ANSWERS or kept_bytes > _MAX_BARE_BYTES:
                    # Doing the work each time would pass for the twin's speed.
                    return _send(
                        outcome_response(
                            HttpError(
                                507, "the twin endpoint keeps no more answers", code="too-costly"
                            )
                        )
                    )
                headers = {k: v for k, v in first.headers.items() if k != "content-length"}
                kept = answered[key] = (bytes(first.body), first.status_code, headers)
                kept_bytes += len(kept[0])
            body, status, headers = kept
            return HttpResponse(body, status_code=status, headers=headers)

        app.router.add_route("/_bare" + FHIR_PREFIX + "/{path:path}", bare, methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def routing(request: HttpRequest, exc: StarletteHTTPException) -> HttpResponse:
        # What the framework answers itself (no route for the path, a method no route
        # takes): an OperationOutcome like every other error, with its status.
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        text = f"{request.method} {request.url.path}: {exc.detail}"
        outcome = FhirError(text, code=code)
        headers = dict(exc.headers or {})
        allowed = _allowed_here(request.scope) if exc.status_code == 405 else None
        if allowed is not None:
            # The methods this URL takes, not all the FHIR route's.
            headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
            headers["allow"] = ", ".join(allowed)
        return HttpResponse(
            orjson.dumps(outcome.to_operation_outcome()),
            exc.status_code,
            headers=headers,
            media_type=FHIR_JSON,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
        # Never a traceback to a client; the operator's log has it.
        outcome = FhirError("the server could not complete the request", code="exception")
        return HttpResponse(orjson.dumps(outcome.to_operation_outcome()), 500, media_type=FHIR_JSON)

    return app
