"""The thin FastAPI shell around the router: HTTP in, `Request` to the router, `Response` out."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.responses import Response as HttpResponse

from cpa_fhir.errors import FhirError
from cpa_fhir.sandbox._auth import AuthFailure, token_request, verify_token
from cpa_fhir.sandbox._router import FHIR_JSON, HttpError, Request, outcome_response
from cpa_fhir.sandbox._server import Sandbox

MAX_BODY = 5 * 1024 * 1024
FHIR_PREFIX = "/fhir"


def _base_url(request: HttpRequest) -> str:
    return str(request.base_url).rstrip("/") + FHIR_PREFIX


async def _body(request: HttpRequest) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise HttpError(413, f"the body is larger than {MAX_BODY} bytes", code="too-costly")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise HttpError(413, f"the body is larger than {MAX_BODY} bytes", code="too-costly")
        chunks.append(chunk)
    return b"".join(chunks)


def _send(response: Any) -> HttpResponse:
    return HttpResponse(response.body, status_code=response.status, headers=response.headers)


def create_app(sandbox: Sandbox, bare_endpoint: bool = False) -> FastAPI:
    """The ASGI app. `bare_endpoint` (for benchmarks) adds `GET /_bare/{type}/{id}`: the
    stored JSON a read returns, kept in memory after its first request, with no auth,
    consent or database work: the HTTP stack's own cost."""
    app = FastAPI(title="cpa-fhir sandbox", docs_url=None, redoc_url=None, openapi_url=None)

    if bare_endpoint:
        bare: dict[tuple[str, str], bytes] = {}

        @app.get("/_bare/{resource_type}/{id}")
        async def bare_read(resource_type: str, id: str) -> HttpResponse:
            key = (resource_type, id)
            if key not in bare:
                try:
                    bare[key] = sandbox.repo.read(resource_type, id).content
                except FhirError as exc:
                    return _send(outcome_response(exc))
            return HttpResponse(bare[key], media_type=FHIR_JSON)

    @app.post("/token")
    async def token(request: HttpRequest) -> HttpResponse:
        try:
            body = await _body(request)
            form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        except (HttpError, UnicodeDecodeError, ValueError):
            return JSONResponse(
                {"error": "invalid_request", "error_description": "unreadable form"}, 400
            )
        status, payload = token_request(
            form,
            request.headers.get("authorization"),
            sandbox.registry,
            now=int(time.time()),
            signing_key=sandbox.signing_key,
            token_url=str(request.url),
            issuer=_base_url(request),
        )
        return JSONResponse(payload, status, headers={"cache-control": "no-store"})

    @app.api_route(
        FHIR_PREFIX + "/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
    )
    async def fhir(path: str, request: HttpRequest) -> HttpResponse:
        try:
            body = await _body(request)
            client, scopes = None, frozenset[str]()
            if path.strip("/") != "metadata":
                client, scopes = verify_token(
                    request.headers.get("authorization"),
                    sandbox.registry,
                    now=int(time.time()),
                    signing_key=sandbox.signing_key,
                )
            req = Request(
                method=request.method,
                path=path,
                query=parse_qsl(request.url.query, keep_blank_values=True),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                base_url=_base_url(request),
            )
        except (HttpError, AuthFailure) as exc:
            return _send(outcome_response(exc))
        # The router does blocking database work: run it off the event loop.
        response = await run_in_threadpool(sandbox.router.handle, req, client, scopes)
        return _send(response)

    @app.exception_handler(Exception)
    async def unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
        # Never a traceback to a client; the operator's log has it.
        outcome = FhirError("the server could not complete the request", code="exception")
        return HttpResponse(orjson.dumps(outcome.to_operation_outcome()), 500, media_type=FHIR_JSON)

    return app
